"""The storage allow-list resolves symlinks and '..' before deciding."""

from __future__ import annotations

from pathlib import Path

from controller import storage
from controller.api import DomainSpec


def spec(**domain: object) -> DomainSpec:
    return DomainSpec.model_validate({"memoryMiB": 64, **domain})


def test_paths_inside_are_allowed(tmp_path: Path) -> None:
    allowed = tmp_path / "images"
    allowed.mkdir()
    (allowed / "disk.img").write_bytes(b"")
    (allowed / "vmlinuz").write_bytes(b"")
    assert (
        storage.problems(spec(kernel=str(allowed / "vmlinuz"), disks=[{"path": str(allowed / "disk.img")}]), [allowed])
        == ()
    )


def test_outside_symlink_and_dotdot_are_refused(tmp_path: Path) -> None:
    allowed = tmp_path / "images"
    allowed.mkdir()
    secret = tmp_path / "secret"
    secret.write_bytes(b"")
    (allowed / "link.img").symlink_to(secret)
    for path in (str(secret), str(allowed / "link.img"), f"{allowed}/../secret"):
        found = storage.problems(spec(disks=[{"path": path}]), [allowed])
        assert len(found) == 1
        assert "outside the allowed storage directories" in found[0]
        assert "disks[0].path" in found[0]


def test_a_sibling_with_a_common_prefix_is_not_inside(tmp_path: Path) -> None:
    allowed = tmp_path / "images"
    sibling = tmp_path / "images-evil"
    allowed.mkdir()
    sibling.mkdir()
    (sibling / "d.img").write_bytes(b"")
    assert storage.problems(spec(disks=[{"path": str(sibling / "d.img")}]), [allowed])


def test_a_missing_file_is_reported(tmp_path: Path) -> None:
    found = storage.problems(spec(initrd=str(tmp_path / "nope"), kernel=str(tmp_path / "nope")), [tmp_path])
    assert [p.split()[0] for p in found] == ["kernel", "initrd"]
    assert all("does not exist" in p for p in found)
