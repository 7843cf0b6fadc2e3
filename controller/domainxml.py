"""The libvirt domain definition of a VirtualMachine, built with ElementTree from the model.

Every domain vmop defines carries the VirtualMachine's UID in vmop's own metadata element: that mark is
what lets the operator tell its domains from anyone else's, and it never touches an unmarked one.

Files are named as the storage check resolved them, never as the spec gave them: a symlink that is swapped
after the check changes nothing the domain opens. Each disk's backing chain is spelled out to its end, so
libvirt takes it from here and never reads one from an image header, which whoever writes the image chose.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from controller.api import DiskBus, DomainSpec, InterfaceType, ShutdownPurpose
from controller.shutdown import ShutdownMark
from controller.storage import Layer, ResolvedStorage

METADATA_URI = "https://vmop.dev/libvirt/v1alpha1"
METADATA_PREFIX = "vmop"
# Once, not per definition: ElementTree keeps the prefixes in one table for the process, and registering
# scans it and compiles a pattern each time.
ET.register_namespace(METADATA_PREFIX, METADATA_URI)
_AGENT_CHANNEL = "org.qemu.guest_agent.0"
_TARGET_PREFIX = {DiskBus.VIRTIO: "vd", DiskBus.SATA: "sd", DiskBus.SCSI: "sd", DiskBus.IDE: "hd"}


@dataclass(frozen=True)
class HostDefaults:
    """What the node's operator decides about every domain, whatever the spec says."""

    virt_type: str = "kvm"
    console_log_dir: Path | None = None
    tcg_tb_cache_mib: int | None = None
    # libvirt's nwfilter on every interface (clean-traffic: a guest cannot spoof MAC, IP or ARP), or None.
    interface_filter: str | None = None


@dataclass(frozen=True)
class Owner:
    uid: str
    spec_hash: str
    storage_hash: str | None = None  # None: defined by a version that did not record it


def spec_hash(spec: DomainSpec, host: HostDefaults) -> str:
    """A digest of everything the definition is built from, stored in the domain to detect a changed spec."""
    material = {"spec": spec.model_dump(mode="json", by_alias=True), "host": repr(host)}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=4096)
def storage_hash(storage: ResolvedStorage) -> str:
    """A digest of the files the definition names, stored in the domain to detect storage that now resolves
    elsewhere (a link pointed at another file, an image rebased) while the spec stayed the same.

    Cached by value: every step of every VM asks it, and most VMs' storage resolves the same way each time
    (a thousand firmware-only VMs share one)."""
    material = json.dumps(dataclasses.asdict(storage), sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrs)
    if text is not None:
        element.text = text
    return element


def _target_names(spec: DomainSpec) -> list[str]:
    counters: dict[str, int] = {}
    names = []
    for disk in spec.disks:
        prefix = _TARGET_PREFIX[disk.bus]
        index = counters.get(prefix, 0)
        counters[prefix] = index + 1
        names.append(prefix + "abcdefghijklmnopqrstuvwxyz"[index])
    return names


def _backing_chain(disk: ET.Element, backing: tuple[Layer, ...]) -> None:
    """The chain below a disk, ended by an empty backingStore. Given a chain, libvirt probes no header for
    one and hands QEMU each layer's backing itself ("backing": null at the end), so QEMU does not open the
    file a header names either (seen on libvirt 9.0 with QEMU 7.2)."""
    parent = disk
    for layer in backing:
        parent = _sub(parent, "backingStore", type="file")
        _sub(parent, "format", type=layer.format.value)
        _sub(parent, "source", file=layer.path)
    _sub(parent, "backingStore")


def build(
    *,
    name: str,
    namespace: str,
    vm_name: str,
    uid: str,
    spec: DomainSpec,
    host: HostDefaults,
    storage: ResolvedStorage,
) -> str:
    """The definition of the spec, its files as the storage check resolved them (storage is that check's)."""
    domain = ET.Element("domain", type=host.virt_type)
    _sub(domain, "name", name)
    # The Kubernetes UID is a UUID: reusing it makes a redefinition of the same VM update, not clash.
    _sub(domain, "uuid", uid)
    metadata = _sub(domain, "metadata")
    ET.SubElement(
        metadata,
        f"{{{METADATA_URI}}}vm",
        {
            "uid": uid,
            "namespace": namespace,
            "name": vm_name,
            "specHash": spec_hash(spec, host),
            "storageHash": storage_hash(storage),
        },
    )
    _sub(domain, "memory", str(spec.memory_mib), unit="MiB")
    _sub(domain, "vcpu", str(spec.vcpus))

    os_element = _sub(domain, "os")
    _sub(os_element, "type", "hvm")
    if storage.kernel:
        _sub(os_element, "kernel", storage.kernel)
        if storage.initrd:
            _sub(os_element, "initrd", storage.initrd)
        if spec.cmdline:
            _sub(os_element, "cmdline", spec.cmdline)
    elif spec.disks:
        _sub(os_element, "boot", dev="hd")
    # With nothing to boot, SeaBIOS would reboot every minute; waiting is what a user expects of a stopped boot.
    _sub(os_element, "bios", rebootTimeout="-1")

    features = _sub(domain, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    if host.virt_type == "qemu" and host.tcg_tb_cache_mib:
        _sub(_sub(features, "tcg"), "tb-cache", str(host.tcg_tb_cache_mib), unit="MiB")
    _sub(domain, "clock", offset="utc")
    _sub(domain, "on_poweroff", "destroy")
    _sub(domain, "on_reboot", "restart")
    # A crash must end in a stopped domain whose reason says "crashed", so that restartPolicy can act on it.
    _sub(domain, "on_crash", "destroy")

    devices = _sub(domain, "devices")
    for disk, resolved, target in zip(spec.disks, storage.disks, _target_names(spec), strict=True):
        top, *backing = resolved.chain
        element = _sub(devices, "disk", type="file", device="disk")
        _sub(element, "driver", name="qemu", type=top.format.value)
        _sub(element, "source", file=top.path)
        _backing_chain(element, tuple(backing))
        _sub(element, "target", dev=target, bus=disk.bus.value)
        if disk.read_only:
            _sub(element, "readonly")
    for interface in spec.interfaces:
        element = _sub(devices, "interface", type=interface.type.value)
        source_attr = "network" if interface.type is InterfaceType.NETWORK else "bridge"
        _sub(element, "source", **{source_attr: interface.source})
        _sub(element, "model", type=interface.model)
        if interface.mac_address:
            _sub(element, "mac", address=interface.mac_address.lower())
        if host.interface_filter:
            _sub(element, "filterref", filter=host.interface_filter)
    if host.console_log_dir is not None:
        serial = _sub(devices, "serial", type="file")
        _sub(serial, "source", path=str(host.console_log_dir / f"{name}.log"), append="off")
    else:
        serial = _sub(devices, "serial", type="pty")
    _sub(serial, "target", port="0")
    if spec.guest_agent:
        channel = _sub(devices, "channel", type="unix")
        _sub(channel, "target", type="virtio", name=_AGENT_CHANNEL)
    _sub(devices, "controller", type="usb", model="none")
    _sub(devices, "memballoon", model="none")
    return ET.tostring(domain, encoding="unicode")


def parse_owner(metadata_xml: str | None) -> Owner | None:
    """vmop's mark from a domain's metadata element (as virDomainGetMetadata returns it), or None."""
    if not metadata_xml:
        return None
    try:
        element = ET.fromstring(metadata_xml)
    except ET.ParseError:
        return None
    uid = element.get("uid")
    if not uid:
        return None
    return Owner(uid=uid, spec_hash=element.get("specHash", ""), storage_hash=element.get("storageHash"))


# The stop under way, in an element of its own: a redefinition replaces the ownership mark's element,
# and this one lives only in the running domain's live definition, so it goes away when the domain stops.
SHUTDOWN_MARK_URI = "https://vmop.dev/libvirt/v1alpha1/shutdown"
SHUTDOWN_MARK_PREFIX = "vmopstop"


def shutdown_mark_xml(mark: ShutdownMark) -> str:
    element = ET.Element(
        "stop",
        {
            "purpose": mark.purpose.value,
            "requestedAt": mark.requested_at.isoformat(),
            "deadline": mark.deadline.isoformat(),
            "force": "true" if mark.force else "false",
        },
    )
    return ET.tostring(element, encoding="unicode")


def parse_shutdown_mark(metadata_xml: str | None) -> ShutdownMark | None:
    """The mark as virDomainGetMetadata returns it; anything unreadable is no mark (the status still has it)."""
    if not metadata_xml:
        return None
    try:
        element = ET.fromstring(metadata_xml)
        return ShutdownMark(
            purpose=ShutdownPurpose(element.get("purpose", "")),
            requested_at=datetime.fromisoformat(element.get("requestedAt", "")),
            deadline=datetime.fromisoformat(element.get("deadline", "")),
            force=element.get("force") == "true",
        )
    except (ET.ParseError, ValueError):
        return None


def agent_connected(live_xml: str) -> bool | None:
    """Whether a guest agent holds the domain's agent channel, as libvirt tracks it in the live definition
    (the channel target's state, kept up to date from QEMU's port events); None without such a channel."""
    if _AGENT_CHANNEL not in live_xml:
        return None  # most domains have none, and every look at a running domain asks: no parse for them
    try:
        root = ET.fromstring(live_xml)
    except ET.ParseError:
        return None
    for target in root.iterfind("devices/channel/target"):
        if target.get("name") == _AGENT_CHANNEL:
            return target.get("state") == "connected"
    return None
