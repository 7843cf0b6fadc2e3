"""The domain definition: built from the model with a real XML library, carrying vmop's ownership mark."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from controller import domainxml
from controller.api import DomainSpec

UID = "5f0c1d3e-0000-4000-8000-000000000001"


def build(spec: DomainSpec, host: domainxml.HostDefaults | None = None) -> ET.Element:
    xml = domainxml.build(
        name="ns_vm", namespace="ns", vm_name="vm", uid=UID, spec=spec, host=host or domainxml.HostDefaults()
    )
    return ET.fromstring(xml)


def test_direct_kernel_boot_with_ownership_metadata() -> None:
    spec = DomainSpec.model_validate(
        {"memoryMiB": 128, "vcpus": 2, "kernel": "/k", "initrd": "/i", "cmdline": "console=ttyS0 x='<&>'"}
    )
    root = build(spec, domainxml.HostDefaults(virt_type="qemu", tcg_tb_cache_mib=16))
    assert root.get("type") == "qemu"
    assert root.findtext("name") == "ns_vm"
    assert root.findtext("uuid") == UID
    assert root.findtext("memory") == "128"
    assert root.findtext("vcpu") == "2"
    assert root.findtext("os/kernel") == "/k"
    assert root.findtext("os/cmdline") == "console=ttyS0 x='<&>'", "special characters survive, escaped by the library"
    assert root.find("features/tcg/tb-cache") is not None
    assert root.findtext("on_crash") == "destroy"
    mark = root.find(f"metadata/{{{domainxml.METADATA_URI}}}vm")
    assert mark is not None
    assert mark.get("uid") == UID
    assert mark.get("specHash") == domainxml.spec_hash(
        spec, domainxml.HostDefaults(virt_type="qemu", tcg_tb_cache_mib=16)
    )


def test_disks_get_distinct_targets_per_bus_and_firmware_boot() -> None:
    spec = DomainSpec.model_validate(
        {
            "memoryMiB": 64,
            "disks": [
                {"path": "/a.qcow2", "format": "qcow2"},
                {"path": "/b.img", "readOnly": True},
                {"path": "/c.img", "bus": "sata"},
            ],
            "interfaces": [{"type": "bridge", "source": "br0", "macAddress": "52:54:00:AA:BB:CC"}],
            "guestAgent": True,
        }
    )
    root = build(spec)
    assert root.find("os/kernel") is None
    assert root.find("os/boot").get("dev") == "hd"
    disks = root.findall("devices/disk")
    assert [d.find("target").get("dev") for d in disks] == ["vda", "vdb", "sda"]
    assert disks[0].find("driver").get("type") == "qcow2"
    assert disks[1].find("readonly") is not None
    assert root.find("devices/interface/source").get("bridge") == "br0"
    assert root.find("devices/interface/mac").get("address") == "52:54:00:aa:bb:cc"
    assert root.find("devices/channel/target").get("name") == "org.qemu.guest_agent.0"
    assert root.find("devices/serial").get("type") == "pty"


def test_console_log_dir_gives_a_file_console() -> None:
    root = build(DomainSpec(memoryMiB=16), domainxml.HostDefaults(console_log_dir=Path("/var/log/vmop")))
    assert root.find("devices/serial/source").get("path") == "/var/log/vmop/ns_vm.log"


def test_spec_hash_changes_with_the_spec_and_the_host() -> None:
    a, b = DomainSpec(memoryMiB=16), DomainSpec(memoryMiB=32)
    host = domainxml.HostDefaults()
    assert domainxml.spec_hash(a, host) == domainxml.spec_hash(DomainSpec(memoryMiB=16), host)
    assert domainxml.spec_hash(a, host) != domainxml.spec_hash(b, host)
    assert domainxml.spec_hash(a, host) != domainxml.spec_hash(a, domainxml.HostDefaults(virt_type="qemu"))


def test_parse_owner_reads_the_mark_libvirt_returns() -> None:
    owner = domainxml.parse_owner(f'<vm uid="{UID}" namespace="ns" name="vm" specHash="abc"/>')
    assert owner == domainxml.Owner(uid=UID, spec_hash="abc")
    assert domainxml.parse_owner(None) is None
    assert domainxml.parse_owner("<vm/>") is None
    assert domainxml.parse_owner("not xml <") is None
