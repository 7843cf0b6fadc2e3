"""The storage allow-list resolves symlinks and '..' before deciding."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from controller import storage
from controller.api import Disk, DomainSpec


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


def unchecked(**paths: str) -> DomainSpec:
    """A spec that skipped validation (an object stored before the schema refused control characters)."""
    disks = [Disk.model_construct(path=paths.pop("disk"))] if "disk" in paths else []
    return DomainSpec.model_construct(memory_mib=64, disks=disks, **paths)


@pytest.mark.parametrize(
    ("paths", "label"),
    [
        ({"disk": "/images/a\0b.img"}, "disks[0].path"),
        ({"kernel": "/images/vmlinuz\0"}, "kernel"),
        ({"kernel": "/images/vmlinuz", "initrd": "/images/in\nitrd"}, "initrd"),
        ({"disk": "/images/\x7f.img"}, "disks[0].path"),
    ],
)
def test_control_characters_are_a_problem_not_an_exception(tmp_path: Path, paths: dict[str, str], label: str) -> None:
    (tmp_path / "vmlinuz").write_bytes(b"")
    resolved = {k: str(tmp_path) + v.removeprefix("/images") for k, v in paths.items()}
    found = storage.problems(unchecked(**resolved), [tmp_path])
    bad = [p for p in found if p.startswith(label + " ")]
    assert len(bad) == 1, found
    assert "contains control characters" in bad[0]
    assert not any(c in bad[0] for c in "\0\n\x7f"), "the message shows the character escaped, not raw"


def test_a_path_the_os_cannot_encode_is_a_problem(tmp_path: Path) -> None:
    # A lone surrogate: os.fsencode raises UnicodeEncodeError (a ValueError) inside realpath.
    found = storage.problems(unchecked(disk=f"{tmp_path}/\ud800.img"), [tmp_path])
    assert len(found) == 1
    assert found[0].startswith("disks[0].path ")
    assert "cannot be resolved on the node" in found[0]


def test_an_os_error_while_resolving_is_a_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_realpath = os.path.realpath

    def realpath(path: str) -> str:
        if "unreadable" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_realpath(path)

    monkeypatch.setattr(storage.os.path, "realpath", realpath)
    found = storage.problems(spec(disks=[{"path": f"{tmp_path}/unreadable/d.img"}]), [tmp_path])
    assert len(found) == 1
    assert "cannot be resolved on the node (PermissionError" in found[0]
    assert "Permission denied" in found[0]


def test_an_unusable_allowed_directory_is_reported_and_the_others_still_apply(tmp_path: Path) -> None:
    (tmp_path / "d.img").write_bytes(b"")
    found = storage.problems(spec(disks=[{"path": str(tmp_path / "d.img")}]), [Path("/images\0"), tmp_path])
    assert len(found) == 1, "the usable directory still allows its file"
    assert found[0].startswith("allowed storage directory '/images\\x00' contains control characters (\\x00)")
    assert found[0].endswith("fix the operator's --allowed-storage-dir")
