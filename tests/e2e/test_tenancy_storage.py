"""A tenant's storage cannot lead QEMU out of the allowed directory, neither through an image nor a symlink.

The paths a spec names are checked; the files an image names are what this file is about: a qcow2 backing
file (at any depth), an external data file, and a qcow2 header a guest wrote into a raw disk that another
VM attaches as qcow2. Each is refused before anything is defined. What is taken is pinned: the domain names
the files as resolved, with the whole backing chain spelled out, so a symlink swapped after the check, or
a header rewritten, changes nothing the next start opens unless the operator has checked it again.
"""

from __future__ import annotations

import os
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from testbed.vmop import condition
from testbed.wait import holds_until, wait_until
from tests.e2e.conftest import Vmop

STORAGE_NOT_ALLOWED = "StorageNotAllowed"


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, stdin=subprocess.DEVNULL)


def qcow2(path: Path, *, backing: Path | None = None, backing_format: str = "raw") -> Path:
    """An image; the backing name is written as given and not looked at (-u), as a tenant could write it."""
    qemu_img(
        "create", "-f", "qcow2", *(["-u", "-b", str(backing), "-F", backing_format] if backing else []), str(path), "1M"
    )
    return path


@pytest.fixture
def storage(vmop: Vmop) -> Iterator[Callable[[str], Path]]:
    """Names for files in the bed's shared storage directory (resolved, as the domain XML names them), made
    unique by the test's namespace and removed at the end."""
    directory = Path(os.path.realpath(vmop.libvirt.storage_dir))
    made: list[Path] = []

    def name(base: str) -> Path:
        path = directory / f"{vmop.namespace}-{base}"
        made.append(path)
        return path

    try:
        yield name
    finally:
        for path in made:
            path.unlink(missing_ok=True)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A host file the guests must never see."""
    secret = tmp_path / "secret.raw"
    secret.write_bytes(b"HOST SECRET\n" * 4096)
    return secret


def shared(path: Path, mode: int = 0o666) -> Path:
    """Readable (and writable, for a disk's own image) by QEMU, which runs as the bed's daemon user."""
    path.chmod(mode)
    return path


def domain_names(vmop: Vmop) -> list[str]:
    return [d.name() for d in vmop.libvirt.connect().listAllDomains()]


def firmware(*disks: dict[str, str]) -> dict[str, Any]:
    return {"memoryMiB": 16, "disks": list(disks)}


def wait_refused(vmop: Vmop, name: str, *named: str) -> str:
    """The StorageNotAllowed condition (the operator's evidence that it looked), naming each of `named`,
    and its Warning Event; returns the condition's message."""
    body = vmop.vms.wait(
        name,
        lambda b: (condition(b, "Synced") or {}).get("reason") == STORAGE_NOT_ALLOWED,
        timeout=60,
        what=STORAGE_NOT_ALLOWED,
    )
    message: str = condition(body, "Synced")["message"]
    for text in named:
        assert text in message, message
    vmop.vms.wait_events(name, STORAGE_NOT_ALLOWED)
    warnings = [e for e in vmop.vms.events(name) if e.reason == STORAGE_NOT_ALLOWED]
    assert warnings, "an Event tells the user"
    assert all(e.type == "Warning" for e in warnings)
    return message


def chain_of(disk: ET.Element) -> list[tuple[str | None, str | None]]:
    """(format, file) of the disk and each backing layer, to the empty backingStore that must end it."""
    layers = [(disk.find("driver").get("type"), disk.find("source").get("file"))]
    store = disk.find("backingStore")
    while store is not None and store.get("type") is not None:
        layers.append((store.find("format").get("type"), store.find("source").get("file")))
        store = store.find("backingStore")
    assert store is not None, "the chain is pinned to its end: libvirt reads no header for more"
    assert not list(store), "an empty backingStore ends it"
    return layers


def inactive_xml(vmop: Vmop, name: str) -> ET.Element:
    return ET.fromstring(vmop.domain(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))


def open_files(vmop: Vmop, name: str) -> set[str]:
    """The files the domain's QEMU process holds open: what it was made to open, not what a definition says."""
    pid_file = vmop.libvirt.runtime_dir / "libvirt" / "qemu" / "run" / f"{vmop.domain_name(name)}.pid"
    pid = int(pid_file.read_text())
    fds = Path(f"/proc/{pid}/fd")
    opened = set()
    for fd in fds.iterdir():
        try:
            opened.add(os.readlink(fd))
        except FileNotFoundError:
            continue  # closed meanwhile
    return opened


# --- what an image names -------------------------------------------------------------------------------------


def backing_outside(storage: Callable[[str], Path], secret: Path) -> tuple[Path, str]:
    return qcow2(storage("top.qcow2"), backing=secret), str(secret)


def second_backing_outside(storage: Callable[[str], Path], secret: Path) -> tuple[Path, str]:
    mid = qcow2(storage("mid.qcow2"), backing=secret)
    return qcow2(storage("top.qcow2"), backing=mid, backing_format="qcow2"), str(secret)


def data_file_outside(storage: Callable[[str], Path], secret: Path) -> tuple[Path, str]:
    data = secret.with_name("data.bin")
    top = storage("top.qcow2")
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={data}", str(top), "1M")
    return top, str(data)


def qcow2_header_in_a_raw_disk(storage: Callable[[str], Path], secret: Path) -> tuple[Path, str]:
    # What a guest can write into its own raw disk: a qcow2 header naming a host file. A VM that attaches
    # that disk as qcow2 would read the host file through it.
    header = qcow2(secret.with_name("header.qcow2"), backing=secret)
    disk = storage("guest-written.img")
    disk.write_bytes(header.read_bytes() + b"\0" * 65536)
    return disk, str(secret)


@pytest.mark.parametrize(
    "attack", [backing_outside, second_backing_outside, data_file_outside, qcow2_header_in_a_raw_disk]
)
def test_a_file_an_image_names_outside_is_refused_and_nothing_is_defined(
    vmop: Vmop,
    storage: Callable[[str], Path],
    outside: Path,
    attack: Callable[[Callable[[str], Path], Path], tuple[Path, str]],
) -> None:
    disk, named = attack(storage, outside)
    shared(disk)
    vmop.start_operator()
    vmop.create("sneaky", domain=firmware({"path": str(disk), "format": "qcow2"}))
    wait_refused(vmop, "sneaky", "disks[0].path", str(disk), named)
    assert vmop.domain_name("sneaky") not in domain_names(vmop), "nothing is defined, so nothing can start"


# --- what is taken is pinned ---------------------------------------------------------------------------------


def test_a_chain_inside_is_defined_resolved_and_pinned_and_qemu_opens_just_that(
    vmop: Vmop, storage: Callable[[str], Path]
) -> None:
    base = storage("base.raw")
    base.write_bytes(b"\0" * 1024 * 1024)
    shared(base, 0o644)
    mid = shared(qcow2(storage("mid.qcow2"), backing=base), 0o644)
    top = shared(qcow2(storage("top.qcow2"), backing=mid, backing_format="qcow2"))
    disk_link, kernel_link, initrd_link = storage("disk-link"), storage("kernel-link"), storage("initrd-link")
    disk_link.symlink_to(top.name)
    images = vmop.libvirt.images
    kernel_link.symlink_to(images.kernel)
    initrd_link.symlink_to(images.coop_initrd)

    vmop.start_operator()
    manifest = vmop.manifest("layered")
    manifest["spec"]["domain"].update(
        kernel=str(kernel_link), initrd=str(initrd_link), disks=[{"path": str(disk_link), "format": "qcow2"}]
    )
    vmop.vms.create(manifest)
    vmop.wait_running("layered", ready=False)

    root = inactive_xml(vmop, "layered")
    assert root.findtext("os/kernel") == os.path.realpath(images.kernel)
    assert root.findtext("os/initrd") == os.path.realpath(images.coop_initrd)
    (disk,) = root.findall("devices/disk")
    assert chain_of(disk) == [("qcow2", str(top)), ("qcow2", str(mid)), ("raw", str(base))]
    assert "-link" not in ET.tostring(root, encoding="unicode"), "no path as the spec gave it"
    opened = open_files(vmop, "layered")
    assert {str(top), str(mid), str(base)} <= opened, opened


def test_a_swapped_symlink_is_checked_again_before_the_next_start(
    vmop: Vmop, storage: Callable[[str], Path], outside: Path
) -> None:
    first, second = storage("first.raw"), storage("second.raw")
    for disk in (first, second):
        disk.write_bytes(b"\0" * 1024 * 1024)
        shared(disk)
    link = storage("disk.img")
    link.symlink_to(first.name)

    def point(target: Path) -> None:
        """Swap the link in one step (rename over it), as a writer of the directory would."""
        new = link.with_name(link.name + ".new")
        new.symlink_to(target)
        os.replace(new, link)

    def restart(token: str) -> None:
        vmop.vms.patch("swapped", {"metadata": {"annotations": {"vmop.dev/restartedAt": token}}})

    vmop.start_operator()
    vmop.create("swapped", domain=firmware({"path": str(link), "format": "raw"}), shutdown_policy={"mode": "Force"})
    vmop.wait_running("swapped", ready=False)
    (source,) = [d.find("source").get("file") for d in inactive_xml(vmop, "swapped").findall("devices/disk")]
    assert source == str(first), "the definition names the link's target, not the link"

    # Swapped to a host file: the running guest keeps its file; the next start is refused.
    point(outside)
    restart("2030-01-01T00:00:00Z")
    wait_refused(vmop, "swapped", f"{link} (resolves to {outside})")
    assert not vmop.domain("swapped").isActive()
    holds_until(
        lambda: not vmop.domain("swapped").isActive(),
        seconds=2,
        message="a domain whose storage is refused was started",
    )
    assert str(outside) not in vmop.domain("swapped").XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)

    # Swapped to another allowed file: the domain is redefined to it, then started.
    point(second)
    restart("2030-01-01T00:01:00Z")
    body = vmop.wait_running("swapped", ready=False)
    assert (condition(body, "Synced") or {}).get("reason") != STORAGE_NOT_ALLOWED
    vmop.vms.wait_events("swapped", "DefinitionUpdated")
    (source,) = [d.find("source").get("file") for d in inactive_xml(vmop, "swapped").findall("devices/disk")]
    assert source == str(second)
    live = ET.fromstring(vmop.domain("swapped").XMLDesc(0))
    assert live.find("devices/disk/source").get("file") == str(second), "started on the new definition"
    wait_until(lambda: str(second) in open_files(vmop, "swapped"), timeout=10, message="QEMU opened the new file")
    assert str(first) not in open_files(vmop, "swapped")


# --- domains defined before these checks ---------------------------------------------------------------------


def old_style_definition(vmop: Vmop, name: str, disk: Path) -> str:
    """A definition as a vmop without storage checks wrote it: the disk as the spec names it (a link), no
    pinned chain, no storageHash, and a specHash of that version (another digest)."""
    body = vmop.vms.get(name)
    assert body is not None
    uid = body["metadata"]["uid"]
    domain = ET.Element("domain", type=vmop.libvirt.domain_type)
    ET.SubElement(domain, "name").text = vmop.domain_name(name)
    ET.SubElement(domain, "uuid").text = uid
    metadata = ET.SubElement(domain, "metadata")
    ET.SubElement(
        metadata,
        "{https://vmop.dev/libvirt/v1alpha1}vm",
        {"uid": uid, "namespace": vmop.namespace, "name": name, "specHash": "0123456789abcdef"},
    )
    ET.SubElement(domain, "memory", unit="MiB").text = "16"
    ET.SubElement(ET.SubElement(domain, "os"), "type").text = "hvm"
    devices = ET.SubElement(domain, "devices")
    element = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(element, "driver", name="qemu", type="raw")
    ET.SubElement(element, "source", file=str(disk))
    ET.SubElement(element, "target", dev="vda", bus="virtio")
    ET.register_namespace("vmop", "https://vmop.dev/libvirt/v1alpha1")
    return ET.tostring(domain, encoding="unicode")


def test_an_upgrade_pins_what_older_definitions_left_open_and_never_stops_a_guest_for_it(
    vmop: Vmop, storage: Callable[[str], Path], outside: Path
) -> None:
    """Domains an older vmop defined name links and leave chains to headers. The new operator redefines each
    once (for its next start), and one whose storage it now refuses keeps running but does not start again."""
    target, moved = storage("kept.raw"), storage("moved.raw")
    for disk in (target, moved):
        disk.write_bytes(b"\0" * 1024 * 1024)
        shared(disk)
    kept_link, moved_link = storage("kept.img"), storage("moved.img")
    kept_link.symlink_to(target.name)
    moved_link.symlink_to(moved.name)
    conn = vmop.libvirt.connect()
    for name, link in (("kept", kept_link), ("moved", moved_link)):
        vmop.create(name, domain=firmware({"path": str(link), "format": "raw"}), shutdown_policy={"mode": "Force"})
        conn.defineXML(old_style_definition(vmop, name, link)).create()
    # After the old guest started, its link is pointed out of the allowed directory.
    os.replace(moved_link, moved_link.with_name("gone.img"))
    moved_link.symlink_to(outside)
    started = {name: vmop.domain(name).ID() for name in ("kept", "moved")}

    vmop.start_operator()
    vmop.vms.wait_events("kept", "DefinitionUpdated")
    (disk,) = inactive_xml(vmop, "kept").findall("devices/disk")
    assert chain_of(disk) == [("raw", str(target))], "the link resolved, the chain pinned to its end"
    assert inactive_xml(vmop, "kept").find("metadata/{https://vmop.dev/libvirt/v1alpha1}vm").get("storageHash")
    wait_refused(vmop, "moved", f"{moved_link} (resolves to {outside})")
    assert {name: vmop.domain(name).ID() for name in ("kept", "moved")} == started, "no guest was stopped"
    assert str(outside) not in vmop.domain("moved").XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)

    vmop.vms.patch_spec("moved", powerState="Stopped")
    wait_until(lambda: not vmop.domain("moved").isActive(), timeout=30, message="the stop asked for")
    vmop.vms.patch_spec("moved", powerState="Running")
    vmop.vms.wait(
        "moved",
        lambda b: (
            (condition(b, "Ready") or {}).get("reason") == STORAGE_NOT_ALLOWED
            and (condition(b, "Ready") or {}).get("observedGeneration") == b["metadata"]["generation"]
        ),
        timeout=30,
        what="Ready=False StorageNotAllowed after powerState Running",
    )
    holds_until(
        lambda: not vmop.domain("moved").isActive(),
        seconds=2,
        message="a domain whose storage is refused was started",
    )
