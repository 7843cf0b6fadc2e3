"""The domain definition: built from the model with a real XML library, carrying vmop's ownership mark,
naming files as the storage check resolved them, with every backing chain pinned to its end.

Also the domain's name (controller.reconcile.domain_name), which names libvirt's files for the domain.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from controller import domainxml
from controller.api import DiskFormat, DomainSpec
from controller.reconcile import domain_name
from controller.storage import Layer, ResolvedDisk, ResolvedStorage

UID = "5f0c1d3e-0000-4000-8000-000000000001"


def as_given(spec: DomainSpec) -> ResolvedStorage:
    """The storage of a spec whose paths are real already (no links) and whose images have no backing file."""
    disks = tuple(ResolvedDisk((Layer(d.path, d.format),)) for d in spec.disks)
    return ResolvedStorage(spec.kernel, spec.initrd, disks)


def build(
    spec: DomainSpec, host: domainxml.HostDefaults | None = None, storage: ResolvedStorage | None = None
) -> ET.Element:
    xml = domainxml.build(
        name="ns_vm",
        namespace="ns",
        vm_name="vm",
        uid=UID,
        spec=spec,
        host=host or domainxml.HostDefaults(),
        storage=storage or as_given(spec),
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
    assert mark.get("storageHash") == domainxml.storage_hash(as_given(spec))


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
    assert root.find("devices/interface/filterref") is None, "no filter unless the node asks for one"


def test_files_are_named_as_resolved_and_every_chain_is_pinned_to_its_end() -> None:
    spec = DomainSpec.model_validate(
        {
            "memoryMiB": 64,
            "kernel": "/images/vmlinuz-link",
            "initrd": "/images/initrd-link",
            "disks": [{"path": "/images/top-link", "format": "qcow2"}, {"path": "/images/data.img"}],
        }
    )
    storage = ResolvedStorage(
        kernel="/images/vmlinuz-6.1",
        initrd="/images/initrd-6.1",
        disks=(
            ResolvedDisk(
                (
                    Layer("/images/top.qcow2", DiskFormat.QCOW2),
                    Layer("/images/mid.qcow2", DiskFormat.QCOW2),
                    Layer("/images/base.raw", DiskFormat.RAW),
                )
            ),
            ResolvedDisk((Layer("/images/data.img", DiskFormat.RAW),)),
        ),
    )
    root = build(spec, storage=storage)
    assert root.findtext("os/kernel") == "/images/vmlinuz-6.1"
    assert root.findtext("os/initrd") == "/images/initrd-6.1"
    top, data = root.findall("devices/disk")
    assert top.find("source").get("file") == "/images/top.qcow2"
    assert top.find("driver").get("type") == "qcow2"
    chain = []
    store = top.find("backingStore")
    while store is not None and store.get("type") is not None:
        assert store.get("type") == "file"
        chain.append((store.find("format").get("type"), store.find("source").get("file")))
        store = store.find("backingStore")
    assert chain == [("qcow2", "/images/mid.qcow2"), ("raw", "/images/base.raw")]
    assert store is not None
    empty = "<backingStore />"
    assert ET.tostring(store, encoding="unicode") == empty, "the end: libvirt probes no header for more"
    end = data.find("backingStore")
    assert end is not None
    assert ET.tostring(end, encoding="unicode") == empty, "a raw disk says it has no backing file too"
    assert "link" not in ET.tostring(root, encoding="unicode"), "no path as the spec gave it"


def test_storage_that_resolves_elsewhere_changes_the_storage_hash_not_the_spec_hash() -> None:
    spec = DomainSpec.model_validate({"memoryMiB": 64, "disks": [{"path": "/images/link", "format": "qcow2"}]})
    one = ResolvedStorage(None, None, (ResolvedDisk((Layer("/images/a.qcow2", DiskFormat.QCOW2),)),))
    other = ResolvedStorage(None, None, (ResolvedDisk((Layer("/images/b.qcow2", DiskFormat.QCOW2),)),))
    rebased = ResolvedStorage(
        None,
        None,
        (ResolvedDisk((Layer("/images/a.qcow2", DiskFormat.QCOW2), Layer("/images/base.raw", DiskFormat.RAW))),),
    )
    hashes = {domainxml.storage_hash(s) for s in (one, other, rebased)}
    assert len(hashes) == 3
    assert domainxml.storage_hash(one) == domainxml.storage_hash(
        ResolvedStorage(None, None, (ResolvedDisk((Layer("/images/a.qcow2", DiskFormat.QCOW2),)),))
    )
    marks = [build(spec, storage=s).find(f"metadata/{{{domainxml.METADATA_URI}}}vm") for s in (one, other)]
    assert marks[0].get("specHash") == marks[1].get("specHash")
    assert marks[0].get("storageHash") != marks[1].get("storageHash")


def test_an_interface_filter_goes_on_every_interface_and_into_the_spec_hash() -> None:
    spec = DomainSpec.model_validate(
        {"memoryMiB": 64, "interfaces": [{"type": "network", "source": "default"}, {"type": "bridge", "source": "br0"}]}
    )
    host = domainxml.HostDefaults(interface_filter="clean-traffic")
    interfaces = build(spec, host).findall("devices/interface")
    assert [i.find("filterref").get("filter") for i in interfaces] == ["clean-traffic", "clean-traffic"]
    assert domainxml.spec_hash(spec, host) != domainxml.spec_hash(spec, domainxml.HostDefaults())


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
    owner = domainxml.parse_owner(f'<vm uid="{UID}" namespace="ns" name="vm" specHash="abc" storageHash="def"/>')
    assert owner == domainxml.Owner(uid=UID, spec_hash="abc", storage_hash="def")
    older = domainxml.parse_owner(f'<vm uid="{UID}" namespace="ns" name="vm" specHash="abc"/>')
    assert older == domainxml.Owner(uid=UID, spec_hash="abc", storage_hash=None), "defined before storageHash"
    assert domainxml.parse_owner(None) is None
    assert domainxml.parse_owner("<vm/>") is None
    assert domainxml.parse_owner("not xml <") is None


def test_four_ide_disks_take_the_four_ide_units() -> None:
    spec = DomainSpec.model_validate(
        {"memoryMiB": 64, "disks": [{"path": f"/{i}.img", "bus": "ide"} for i in range(4)] + [{"path": "/v.img"}]}
    )
    targets = [(d.find("target").get("dev"), d.find("target").get("bus")) for d in build(spec).findall("devices/disk")]
    assert targets == [("hda", "ide"), ("hdb", "ide"), ("hdc", "ide"), ("hdd", "ide"), ("vda", "virtio")]


# The longest names the API takes: a namespace is a DNS label (63), an object name a DNS subdomain (253).
LONGEST_NAMESPACE = "n" * 63
LONGEST_NAME = ".".join(["a" * 63] * 3 + ["b" * 61])
NAME_MAX = 255


def test_a_domain_name_that_fits_keeps_the_namespace_and_name() -> None:
    assert domain_name("default", "web-1") == "default_web-1"
    fits = "x" * (200 - len("ns_"))
    assert domain_name("ns", fits) == f"ns_{fits}", "a name of exactly 200 characters is kept whole"


def test_a_long_domain_name_is_shortened_readable_and_unique() -> None:
    assert len(LONGEST_NAME) == 253
    name = domain_name(LONGEST_NAMESPACE, LONGEST_NAME)
    assert len(name) == 200
    assert name.startswith(f"{LONGEST_NAMESPACE}_{LONGEST_NAME[:100]}"), "readable: namespace and name first"
    assert re.fullmatch(r"[^_]+_[^_]+_[0-9a-f]{12}", name), name
    assert name == domain_name(LONGEST_NAMESPACE, LONGEST_NAME), "stable across calls and restarts"
    # Names that differ only past the cut, or only in where namespace ends and name begins, stay apart.
    others = {
        domain_name(LONGEST_NAMESPACE, LONGEST_NAME[:-1] + "c"),
        domain_name(LONGEST_NAMESPACE, LONGEST_NAME[:-1]),
        domain_name(LONGEST_NAMESPACE[:-1], "n" + LONGEST_NAME[:-1]),
        domain_name("ns", "x" * 198),
        domain_name("ns", "x" * 197),
    }
    assert len(others | {name}) == 6
    # A whole name never takes the shape of a shortened one: it has one "_", a shortened one two, and no
    # namespace or name can hold a "_". The closest a name can come is kept whole, and differs.
    look_alike = name.split("_", 1)[1].replace("_", "-")
    assert len(f"{LONGEST_NAMESPACE}_{look_alike}") == 200
    assert domain_name(LONGEST_NAMESPACE, look_alike) == f"{LONGEST_NAMESPACE}_{look_alike}" != name


@pytest.mark.parametrize(("namespace", "name"), [("ns", "vm"), ("ns", LONGEST_NAME), (LONGEST_NAMESPACE, LONGEST_NAME)])
def test_every_file_libvirt_names_after_the_domain_fits_name_max(namespace: str, name: str) -> None:
    domain = domain_name(namespace, name)
    root = ET.fromstring(
        domainxml.build(
            name=domain,
            namespace=namespace,
            vm_name=name,
            uid=UID,
            spec=DomainSpec(memoryMiB=16),
            host=domainxml.HostDefaults(console_log_dir=Path("/var/log/vmop")),
            storage=ResolvedStorage(None, None, ()),
        )
    )
    assert root.findtext("name") == domain
    mark = root.find(f"metadata/{{{domainxml.METADATA_URI}}}vm")
    assert mark is not None
    assert (mark.get("namespace"), mark.get("name")) == (namespace, name), "the metadata keeps the whole name"
    console = Path(root.find("devices/serial/source").get("path"))
    # <name>.xml (config), <name>.log (QEMU log, console), with room to spare for the suffixes of libvirt's
    # temporary files (<name>.xml.new and the like).
    for file_name in (console.name, f"{domain}.xml", f"{domain}.log"):
        assert len(file_name.encode()) <= NAME_MAX - 40, file_name
