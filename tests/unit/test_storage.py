"""The storage allow-list: symlinks and '..' resolved, and every qcow2 backing chain confined, on real files.

Images are made with the real qemu-img, and the inspector reads them with it: the attacks are the images a
tenant can make (a backing file outside, a header written into a raw disk), not a model of them.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import types
from pathlib import Path, PurePosixPath

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from controller import storage
from controller.api import Disk, DiskFormat, DomainSpec
from controller.storage import Layer, ResolvedDisk, ResolvedStorage, StorageCheck, StorageInspector

FIFO_TIMEOUT = 5.0


def spec(**domain: object) -> DomainSpec:
    return DomainSpec.model_validate({"memoryMiB": 64, **domain})


def qcow2(disk: Path) -> DomainSpec:
    return spec(disks=[{"path": str(disk), "format": "qcow2"}])


def check(domain: DomainSpec, allowed: list[Path], **options: object) -> StorageCheck:
    return asyncio.run(StorageInspector(allowed, **options).check(domain))  # type: ignore[arg-type]


def problems(domain: DomainSpec, allowed: list[Path], **options: object) -> tuple[str, ...]:
    found = check(domain, allowed, **options)
    assert (found.resolved is None) == bool(found.problems), "resolved exactly when there is no problem"
    return found.problems


def qemu_img(*args: str | bytes) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def image(path: Path, *, backing: str | bytes | None = None, backing_format: str | None = "raw") -> Path:
    """A qcow2 image at path; its backing name is written as given (relative names stay relative), unchecked."""
    args: list[str | bytes] = ["create", "-f", "qcow2"]
    if backing is not None:
        args += ["-u", "-b", backing]
        if backing_format is not None:
            args += ["-F", backing_format]
    qemu_img(*args, str(path), "1M")
    return path


def raw(path: Path, content: bytes = b"\0" * 65536) -> Path:
    path.write_bytes(content)
    return path


def script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def allowed(tmp_path: Path) -> Path:
    directory = tmp_path / "images"
    directory.mkdir()
    return directory


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    directory = tmp_path / "elsewhere"
    directory.mkdir()
    return directory


def counting_qemu_img(tmp_path: Path) -> tuple[str, Path]:
    """A qemu-img that counts its runs in a file, and that file."""
    runs = tmp_path / "runs"
    runs.write_text("")
    return script(tmp_path / "counting-qemu-img", f'echo run >> {runs}\nexec qemu-img "$@"\n'), runs


def checked_twice(inspector: StorageInspector, domain: DomainSpec) -> tuple[StorageCheck, StorageCheck]:
    """Two checks of one spec by one inspector (in one event loop, as the operator makes them)."""

    async def twice() -> tuple[StorageCheck, StorageCheck]:
        return await inspector.check(domain), await inspector.check(domain)

    return asyncio.run(twice())


def run_count(runs: Path) -> int:
    return len(runs.read_text().splitlines())


# --- the decision ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("real", "expected"),
    [
        ("/images/d.img", True),
        ("/images/sub/d.img", True),
        ("/images", True),
        ("/images-evil/d.img", False),
        ("/imagesd.img", False),
        ("/other/d.img", False),
        ("/", False),
    ],
)
def test_inside_is_a_directory_boundary_not_a_prefix(real: str, expected: bool) -> None:
    assert storage.inside(real, ["/images"]) is expected


SEGMENTS = st.sampled_from(["images", "images-evil", "imagesx", "i", "d.img", "sub"])


@given(st.lists(SEGMENTS, max_size=4), st.lists(st.lists(SEGMENTS, max_size=3), max_size=3))
def test_inside_agrees_with_path_containment(real: list[str], dirs: list[list[str]]) -> None:
    path = PurePosixPath("/", *real)
    allowed = [PurePosixPath("/", *d) for d in dirs]
    assert storage.inside(str(path), [str(d) for d in allowed]) == any(path.is_relative_to(d) for d in allowed)


def test_the_root_as_allowed_directory_takes_everything() -> None:
    assert storage.inside("/etc/shadow", ["/"])


def test_no_usable_directory_takes_nothing() -> None:
    assert not storage.inside("/images/d.img", [])


# --- the spec's own paths -----------------------------------------------------------------------------------


def test_paths_inside_are_allowed_and_come_back_resolved(allowed: Path) -> None:
    raw(allowed / "disk.img")
    raw(allowed / "vmlinuz-6.1")
    raw(allowed / "initrd.img")
    (allowed / "vmlinuz").symlink_to("vmlinuz-6.1")
    found = check(
        spec(
            kernel=str(allowed / "vmlinuz"),
            initrd=f"{allowed}/sub/../initrd.img",
            disks=[{"path": str(allowed / "disk.img")}],
        ),
        [allowed],
    )
    assert found == StorageCheck(
        (),
        ResolvedStorage(
            kernel=str(allowed / "vmlinuz-6.1"),
            initrd=str(allowed / "initrd.img"),
            disks=(ResolvedDisk((Layer(str(allowed / "disk.img"), DiskFormat.RAW),)),),
        ),
    )


def test_outside_symlink_and_dotdot_are_refused(allowed: Path, outside: Path) -> None:
    secret = raw(outside / "secret")
    (allowed / "link.img").symlink_to(secret)
    for path in (str(secret), str(allowed / "link.img"), f"{allowed}/../elsewhere/secret"):
        found = problems(spec(disks=[{"path": path}]), [allowed])
        assert len(found) == 1
        assert found[0].startswith(f"disks[0].path {path}")
        assert "outside the allowed storage directories" in found[0]
        if path != str(secret):
            assert f"(resolves to {secret})" in found[0]


def test_a_sibling_with_a_common_prefix_is_not_inside(allowed: Path, tmp_path: Path) -> None:
    sibling = tmp_path / "images-evil"
    sibling.mkdir()
    raw(sibling / "d.img")
    assert problems(spec(disks=[{"path": str(sibling / "d.img")}]), [allowed])


def test_a_missing_file_is_reported(tmp_path: Path) -> None:
    found = problems(spec(initrd=str(tmp_path / "nope"), kernel=str(tmp_path / "nope")), [tmp_path])
    assert [p.split()[0] for p in found] == ["kernel", "initrd"]
    assert all("does not exist" in p for p in found)


def test_a_fifo_or_a_directory_is_not_a_file(allowed: Path, tmp_path: Path) -> None:
    runner, runs = counting_qemu_img(tmp_path)
    os.mkfifo(allowed / "fifo")
    (allowed / "dir").mkdir()
    found = problems(
        spec(disks=[{"path": str(allowed / "fifo"), "format": "qcow2"}, {"path": str(allowed / "dir")}]),
        [allowed],
        qemu_img=runner,
    )
    assert [p.split()[0] for p in found] == ["disks[0].path", "disks[1].path"]
    assert all("does not exist or is not a file" in p for p in found)
    assert run_count(runs) == 0, "neither is handed to qemu-img"


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
    raw(tmp_path / "vmlinuz")
    resolved = {k: str(tmp_path) + v.removeprefix("/images") for k, v in paths.items()}
    found = problems(unchecked(**resolved), [tmp_path])
    bad = [p for p in found if p.startswith(label + " ")]
    assert len(bad) == 1, found
    assert "contains control characters" in bad[0]
    assert not any(c in bad[0] for c in "\0\n\x7f"), "the message shows the character escaped, not raw"


def test_a_path_the_os_cannot_encode_is_a_problem(tmp_path: Path) -> None:
    # A lone surrogate: os.fsencode raises UnicodeEncodeError (a ValueError) inside realpath.
    found = problems(unchecked(disk=f"{tmp_path}/\ud800.img"), [tmp_path])
    assert len(found) == 1
    assert found[0].startswith("disks[0].path ")
    assert "cannot be resolved on the node" in found[0]


def test_a_link_to_a_name_the_definition_cannot_hold_is_a_problem(allowed: Path) -> None:
    target = os.fsencode(allowed) + b"/\xff\n.img"
    Path(os.fsdecode(target)).write_bytes(b"")
    (allowed / "link.img").symlink_to(os.fsdecode(target))
    found = problems(spec(disks=[{"path": str(allowed / "link.img")}]), [allowed])
    assert len(found) == 1
    assert "a name the domain definition cannot hold" in found[0]
    found[0].encode()  # a status can carry it


def test_an_os_error_while_resolving_is_a_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_realpath = os.path.realpath

    def realpath(path: str) -> str:
        if "unreadable" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_realpath(path)

    monkeypatch.setattr(storage.os.path, "realpath", realpath)
    found = problems(spec(disks=[{"path": f"{tmp_path}/unreadable/d.img"}]), [tmp_path])
    assert len(found) == 1
    assert "cannot be resolved on the node (PermissionError" in found[0]
    assert "Permission denied" in found[0]


def test_a_file_system_that_hangs_is_a_problem_in_bounded_time(allowed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    released = threading.Event()
    real_stat = os.stat

    def stat(path: str) -> os.stat_result:
        if "dead-mount" in str(path):
            released.wait()
        return real_stat(path)

    monkeypatch.setattr(storage.os, "stat", stat)
    started = time.monotonic()
    try:
        (found,) = problems(spec(disks=[{"path": str(allowed / "dead-mount.img")}]), [allowed], timeout=0.3)
    finally:
        released.set()
    assert time.monotonic() - started < 3
    assert found == "the storage could not be checked: the node's file system did not answer within 0.3 s"


def test_an_unusable_allowed_directory_is_reported_and_the_others_still_apply(tmp_path: Path) -> None:
    raw(tmp_path / "d.img")
    found = problems(spec(disks=[{"path": str(tmp_path / "d.img")}]), [Path("/images\0"), tmp_path])
    assert len(found) == 1, "the usable directory still allows its file"
    assert found[0].startswith("allowed storage directory '/images\\x00' contains control characters (\\x00)")
    assert found[0].endswith("fix the operator's --allowed-storage-dir")


def test_a_spec_without_files_looks_at_no_file_system() -> None:
    found = check(spec(), [Path("/images\0")])
    assert found == StorageCheck((), ResolvedStorage(None, None, ())), "the allowed directories matter to files only"


# --- backing chains -----------------------------------------------------------------------------------------


def test_a_chain_inside_is_allowed_and_spelled_out_with_relative_names_resolved(allowed: Path) -> None:
    raw(allowed / "base.raw")
    (allowed / "sub").mkdir()
    image(allowed / "sub" / "mid.qcow2", backing="../base.raw", backing_format="raw")
    image(allowed / "top.qcow2", backing="sub/mid.qcow2", backing_format="qcow2")
    (allowed / "vm.qcow2").symlink_to("top.qcow2")
    found = check(qcow2(allowed / "vm.qcow2"), [allowed])
    assert found.problems == ()
    assert found.resolved is not None
    assert found.resolved.disks == (
        ResolvedDisk(
            (
                Layer(str(allowed / "top.qcow2"), DiskFormat.QCOW2),
                Layer(str(allowed / "sub" / "mid.qcow2"), DiskFormat.QCOW2),
                Layer(str(allowed / "base.raw"), DiskFormat.RAW),
            )
        ),
    )


def test_a_qcow2_without_backing_file_is_its_own_chain(allowed: Path) -> None:
    found = check(qcow2(image(allowed / "solo.qcow2")), [allowed])
    assert found.resolved is not None
    assert found.resolved.disks == (ResolvedDisk((Layer(str(allowed / "solo.qcow2"), DiskFormat.QCOW2),)),)


def test_a_backing_file_outside_is_refused(allowed: Path, outside: Path) -> None:
    secret = raw(outside / "secret.raw")
    top = image(allowed / "top.qcow2", backing=str(secret))
    (found,) = problems(qcow2(top), [allowed])
    assert found.startswith(f"disks[0].path {top}: backing file {secret} is outside the allowed storage directories")


def test_a_relative_backing_name_that_climbs_out_is_refused(allowed: Path, outside: Path) -> None:
    secret = raw(outside / "secret.raw")
    top = image(allowed / "top.qcow2", backing="../elsewhere/secret.raw")
    (found,) = problems(qcow2(top), [allowed])
    assert f"backing file {allowed}/../elsewhere/secret.raw (resolves to {secret}) is outside" in found


def test_a_backing_link_inside_that_points_outside_is_refused(allowed: Path, outside: Path) -> None:
    secret = raw(outside / "secret.raw")
    (allowed / "base.raw").symlink_to(secret)
    top = image(allowed / "top.qcow2", backing=str(allowed / "base.raw"))
    (found,) = problems(qcow2(top), [allowed])
    assert f"backing file {allowed / 'base.raw'} (resolves to {secret}) is outside" in found


def test_the_second_backing_file_outside_is_refused_and_named(allowed: Path, outside: Path) -> None:
    secret = raw(outside / "secret.raw")
    mid = image(allowed / "mid.qcow2", backing=str(secret))
    top = image(allowed / "top.qcow2", backing=str(mid), backing_format="qcow2")
    (found,) = problems(qcow2(top), [allowed])
    assert found.startswith(f"disks[0].path {top}: backing file {secret} (named by {mid}) is outside")


def test_a_qcow2_header_written_into_a_raw_file_is_read_when_attached_as_qcow2(allowed: Path, tmp_path: Path) -> None:
    # What a guest can do: write a qcow2 header naming a host file into its own raw disk. Attached elsewhere
    # as qcow2, that header is what QEMU would follow.
    header = image(tmp_path / "header.qcow2", backing="/etc/passwd")
    disk = raw(allowed / "guest-disk.img", header.read_bytes() + b"\0" * 65536)
    (found,) = problems(qcow2(disk), [allowed])
    assert "backing file /etc/passwd is outside the allowed storage directories" in found

    runner, runs = counting_qemu_img(tmp_path)
    as_raw = check(spec(disks=[{"path": str(disk)}]), [allowed], qemu_img=runner)
    assert as_raw.resolved is not None, "attached as raw, nothing in it is a reference"
    assert as_raw.resolved.disks == (ResolvedDisk((Layer(str(disk), DiskFormat.RAW),)),)
    assert run_count(runs) == 0, "a raw disk is never parsed"


def test_a_backing_file_without_a_recorded_format_is_refused(allowed: Path) -> None:
    raw(allowed / "base.raw")
    top = image(allowed / "top.qcow2", backing="base.raw")
    # Hide the backing format's header extension (0xe2792aca) under an unknown magic, which QEMU skips:
    # qemu-img 7.2 no longer writes such an image, older ones did.
    data = top.read_bytes()
    extension = data.index(bytes.fromhex("e2792aca"))
    top.write_bytes(data[:extension] + bytes.fromhex("12345678") + data[extension + 4 :])
    (found,) = problems(qcow2(top), [allowed])
    assert f"backing file {allowed / 'base.raw'} has no recorded format" in found
    assert "rebase with -F" in found


@pytest.mark.parametrize(
    "backing",
    [
        'json:{"driver":"raw","file":{"driver":"file","filename":"/etc/passwd"}}',
        "nbd:localhost:10809",
        "http://example.com/disk.img",
        "file:/etc/passwd",
    ],
)
def test_a_backing_name_with_a_protocol_is_refused(allowed: Path, backing: str) -> None:
    top = image(allowed / "top.qcow2", backing=backing)
    (found,) = problems(qcow2(top), [allowed])
    assert f"backing file {backing} is not a plain file path" in found


def test_a_backing_format_other_than_raw_or_qcow2_is_refused(allowed: Path) -> None:
    raw(allowed / "base.vmdk")
    top = image(allowed / "top.qcow2", backing=str(allowed / "base.vmdk"), backing_format="vmdk")
    (found,) = problems(qcow2(top), [allowed])
    assert "has format vmdk; backing files must be raw or qcow2" in found


@pytest.mark.parametrize("where", ["outside", "inside"])
def test_an_external_data_file_is_refused(allowed: Path, outside: Path, where: str) -> None:
    data = (outside if where == "outside" else allowed) / "data.bin"
    top = allowed / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={data}", str(top), "1M")
    (found,) = problems(qcow2(top), [allowed])
    assert f"disks[0].path {top} has an external data file {data}" in found


def test_a_data_file_deeper_in_the_chain_is_refused(allowed: Path, outside: Path) -> None:
    mid = allowed / "mid.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={outside / 'data.bin'}", str(mid), "1M")
    top = image(allowed / "top.qcow2", backing=str(mid), backing_format="qcow2")
    (found,) = problems(qcow2(top), [allowed])
    assert f"backing file {mid} has an external data file {outside / 'data.bin'}" in found


def test_a_fifo_as_backing_file_is_refused_unopened(allowed: Path) -> None:
    os.mkfifo(allowed / "fifo")
    top = image(allowed / "top.qcow2", backing=str(allowed / "fifo"))
    started = time.monotonic()
    (found,) = problems(qcow2(top), [allowed], timeout=FIFO_TIMEOUT)
    assert time.monotonic() - started < FIFO_TIMEOUT / 2, "nothing waited on the FIFO"
    assert f"backing file {allowed / 'fifo'} does not exist or is not a file" in found


def test_a_missing_backing_file_is_refused(allowed: Path) -> None:
    top = image(allowed / "top.qcow2", backing=str(allowed / "gone.raw"))
    (found,) = problems(qcow2(top), [allowed])
    assert f"backing file {allowed / 'gone.raw'} does not exist or is not a file" in found


def test_a_chain_that_loops_is_refused(allowed: Path) -> None:
    first, second = allowed / "0.qcow2", allowed / "1.qcow2"
    image(first, backing=str(second), backing_format="qcow2")
    image(second, backing=str(first), backing_format="qcow2")
    (found,) = problems(qcow2(first), [allowed])
    assert found.endswith(f"backing file {first} (named by {second}) is already in the chain: the chain loops")


def test_an_image_that_is_its_own_backing_file_is_refused(allowed: Path) -> None:
    # qemu-img refuses to write an image's own name as its backing file; a link to it passes.
    (allowed / "self.qcow2").symlink_to("top.qcow2")
    top = image(allowed / "top.qcow2", backing=str(allowed / "self.qcow2"), backing_format="qcow2")
    (found,) = problems(qcow2(top), [allowed])
    assert found.endswith(f"backing file {allowed / 'self.qcow2'} is already in the chain: the chain loops")


def test_a_chain_longer_than_the_limit_is_refused(allowed: Path) -> None:
    layers = [raw(allowed / "0.raw")]
    for i in range(1, storage.MAX_CHAIN_LENGTH + 1):
        layers.append(
            image(allowed / f"{i}.qcow2", backing=str(layers[-1]), backing_format="raw" if i == 1 else "qcow2")
        )
    at_limit = check(qcow2(layers[-2]), [allowed])
    assert at_limit.resolved is not None
    assert len(at_limit.resolved.disks[0].chain) == storage.MAX_CHAIN_LENGTH
    (found,) = problems(qcow2(layers[-1]), [allowed])
    assert f"the backing chain is longer than {storage.MAX_CHAIN_LENGTH} images" in found


def test_a_backing_name_that_is_not_utf8_is_refused(allowed: Path) -> None:
    name = os.fsencode(allowed) + b"/base\xff.raw"
    Path(os.fsdecode(name)).write_bytes(b"\0" * 512)
    top = image(allowed / "top.qcow2", backing=name)
    # qemu-img reports the byte as U+FFFD, a name no file has here: whatever it reports, the check only
    # ever takes a name it found, checked, and will pin.
    (found,) = problems(qcow2(top), [allowed])
    assert found.startswith(f"disks[0].path {top}: backing file {allowed}/base")
    found.encode()  # a status can carry it


def test_each_disk_is_checked_and_reported_on_its_own(allowed: Path, outside: Path) -> None:
    good = image(allowed / "good.qcow2", backing=str(raw(allowed / "base.raw")))
    bad = image(allowed / "bad.qcow2", backing=str(raw(outside / "secret.raw")))
    found = problems(
        spec(disks=[{"path": str(good), "format": "qcow2"}, {"path": str(bad), "format": "qcow2"}]), [allowed]
    )
    assert [p.split()[0] for p in found] == ["disks[1].path"]


# --- qemu-img -----------------------------------------------------------------------------------------------


def test_a_qcow2_disk_that_is_not_qcow2_is_refused_with_qemu_imgs_words(allowed: Path) -> None:
    disk = raw(allowed / "plain.img")
    (found,) = problems(qcow2(disk), [allowed])
    assert found.startswith(f"disks[0].path {disk}: qemu-img cannot read it as qcow2 (")
    assert "not in qcow2 format" in found


@pytest.mark.parametrize("hang", ["exec sleep 60", "sleep 60"], ids=["itself", "in-a-child-holding-its-pipes"])
def test_a_hung_qemu_img_is_killed_at_the_timeout(allowed: Path, tmp_path: Path, hang: str) -> None:
    pid_file = tmp_path / "pid"
    hung = script(tmp_path / "hung-qemu-img", f"echo $$ > {pid_file}\n{hang}\n")
    disk = image(allowed / "top.qcow2")
    started = time.monotonic()
    (found,) = problems(qcow2(disk), [allowed], qemu_img=hung, timeout=0.5)
    assert time.monotonic() - started < 5, "nothing waited for the hung process or its pipes"
    assert found == f"disks[0].path {disk}: qemu-img info did not answer within 0.5 s and was killed"
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)  # killed and reaped


def test_a_missing_qemu_img_is_a_problem(allowed: Path, tmp_path: Path) -> None:
    (found,) = problems(qcow2(image(allowed / "top.qcow2")), [allowed], qemu_img=str(tmp_path / "no-such-qemu-img"))
    assert "qemu-img could not be run (FileNotFoundError" in found
    assert "install qemu-utils" in found


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("echo 'not json'", "qemu-img's report cannot be read ("),
        ("echo '[1, 2]'", "qemu-img's report cannot be read (not a JSON object)"),
        ("echo '{\"full-backing-filename\": 5}'", "a backing or data file name is not a string"),
        (
            'echo \'{"format-specific": {"data": {"data-file": ["/x"]}}}\'',
            "a backing or data file name is not a string",
        ),
        ("head -c 2000000 /dev/zero", "larger than 1 MiB"),
        ("echo 'qemu-img: it broke' >&2; exit 1", "qemu-img cannot read it as qcow2 (it broke)"),
        ("exit 3", "qemu-img cannot read it as qcow2 (exit status 3)"),
    ],
)
def test_whatever_qemu_img_says_is_a_problem_not_an_exception(
    allowed: Path, tmp_path: Path, output: str, expected: str
) -> None:
    liar = script(tmp_path / "lying-qemu-img", output + "\n")
    (found,) = problems(qcow2(image(allowed / "top.qcow2")), [allowed], qemu_img=liar)
    assert expected in found


@pytest.mark.parametrize(
    "domain",
    [
        DomainSpec.model_construct(memory_mib=64, disks=[Disk.model_construct(path=None)]),
        DomainSpec.model_construct(memory_mib=64, disks=None),
        DomainSpec.model_construct(memory_mib=64, kernel=b"/images/vmlinuz", disks=[]),
        DomainSpec.model_construct(memory_mib=64, disks=[Disk.model_construct(path="/images/x", format="vmdk")]),
    ],
)
def test_a_spec_no_validation_has_seen_is_a_problem_not_an_exception(allowed: Path, domain: DomainSpec) -> None:
    assert problems(domain, [allowed])


# --- the cache ----------------------------------------------------------------------------------------------


def settled(monkeypatch: pytest.MonkeyPatch, seconds: float = 60.0) -> None:
    """Make every file look unchanged for a while, as the images of a steady node are."""
    later = time.time_ns() + int(seconds * 1e9)
    monkeypatch.setattr(storage, "time", types.SimpleNamespace(time_ns=lambda: later))


def test_a_settled_chain_is_read_once_then_costs_only_stats(
    allowed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settled(monkeypatch)
    runner, runs = counting_qemu_img(tmp_path)
    mid = image(allowed / "mid.qcow2", backing=str(raw(allowed / "base.raw")))
    top = image(allowed / "top.qcow2", backing=str(mid), backing_format="qcow2")
    inspector = StorageInspector([allowed], qemu_img=runner)

    first, second = checked_twice(inspector, qcow2(top))
    assert first == second
    assert first.resolved is not None
    assert run_count(runs) == 2, "one run per qcow2 layer, the first time only"

    os.utime(mid)  # a new version of the file: read again
    asyncio.run(inspector.check(qcow2(top)))
    assert run_count(runs) == 3


def test_a_header_read_right_after_a_change_is_read_again(allowed: Path, tmp_path: Path) -> None:
    # Rewritten within the same timestamp tick, a header would keep its stat: one that changed just before
    # it was read is not kept.
    runner, runs = counting_qemu_img(tmp_path)
    top = image(allowed / "top.qcow2")
    inspector = StorageInspector([allowed], qemu_img=runner)

    checked_twice(inspector, qcow2(top))
    assert run_count(runs) == 2


def test_a_problem_is_never_kept(allowed: Path, outside: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settled(monkeypatch)
    runner, runs = counting_qemu_img(tmp_path)
    disk = raw(allowed / "plain.img")
    inspector = StorageInspector([allowed], qemu_img=runner)

    checked_twice(inspector, qcow2(disk))
    assert run_count(runs) == 2, "a failed read is tried again (it may have been a passing failure)"


def test_the_cache_is_bounded(allowed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settled(monkeypatch)
    monkeypatch.setattr(storage, "_CACHE_ENTRIES", 2)
    runner, runs = counting_qemu_img(tmp_path)
    disks = [image(allowed / f"{i}.qcow2") for i in range(3)]
    inspector = StorageInspector([allowed], qemu_img=runner)

    async def each(*order: int) -> None:
        for i in order:
            await inspector.check(qcow2(disks[i]))

    asyncio.run(each(0, 1, 0, 2))  # 1 is the least recently used when 2 comes in
    assert run_count(runs) == 3
    asyncio.run(each(0, 2))
    assert run_count(runs) == 3, "the recently used ones are kept"
    asyncio.run(each(1))
    assert run_count(runs) == 4, "the least recently used one was dropped"


# --- as the DaemonSet runs it --------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def checked_with_capabilities(disk: Path, allowed: Path, capabilities: list[str]) -> tuple[str, ...]:
    """The problems the inspector finds when run as root with only these capabilities, as in the container
    (its bounding set drops the rest: root's permitted set is then exactly these)."""
    keep = ",".join(["-all", *(f"+{name.lower()}" for name in capabilities)])
    code = (
        "import asyncio, json, sys; from pathlib import Path; "
        "from controller.storage import StorageInspector; from controller.api import DomainSpec; "
        "spec = DomainSpec.model_validate({'memoryMiB': 64, 'disks': [{'path': sys.argv[1], 'format': 'qcow2'}]}); "
        "print(json.dumps(asyncio.run(StorageInspector([Path(sys.argv[2])]).check(spec)).problems))"
    )
    argv = ["setpriv", f"--bounding-set={keep}", "--", sys.executable, "-c", code, str(disk), str(allowed)]
    done = subprocess.run(argv, check=True, capture_output=True, text=True, cwd=ROOT)
    return tuple(json.loads(done.stdout))


def test_the_daemonsets_capabilities_read_an_image_only_its_owner_may_read(allowed: Path) -> None:
    """libvirt's volumes are 0600, and a running VM's image belongs to the QEMU user: root without capabilities
    cannot read its header, root with the DaemonSet's one capability can."""
    assert os.geteuid() == 0, "plays the container's root: the bed runs as root"
    container = yaml.safe_load((ROOT / "manifests" / "daemonset.yaml").read_text())["spec"]["template"]["spec"]
    capabilities = container["containers"][0]["securityContext"]["capabilities"]
    assert capabilities["drop"] == ["ALL"]
    disk = image(allowed / "private.qcow2")
    os.chown(disk, 65534, 65534)
    disk.chmod(0o600)
    assert checked_with_capabilities(disk, allowed, capabilities.get("add", [])) == ()
    (without,) = checked_with_capabilities(disk, allowed, [])
    assert "qemu-img cannot read it as qcow2" in without
    assert "Permission denied" in without
