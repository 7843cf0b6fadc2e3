"""Whatever a tenant writes into a VirtualMachine, the node's rules hold.

Random specs (paths in, out of and around the allowed storage directory, networks on and off the lists,
sizes at and past the caps and the API's bounds) go through the real API server to one running operator.
Each is refused by the API server whenever the operator's model refuses it, or else reported on the VM
for its generation; what a node rule refuses never reaches libvirt, and what is defined obeys every rule. The
operator must never fail unexpectedly, whatever it is sent.

The VMs are Stopped: an accepted spec is only defined, never booted, which keeps each example cheap.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes
import libvirt
import pydantic
import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

from controller.api import MAX_VCPUS, VirtualMachineSpec
from controller.nodepolicy import NETWORK_NOT_ALLOWED, OVER_VM_LIMITS, STORAGE_NOT_ALLOWED
from testbed.vmop import OperatorProcess, condition
from tests.e2e.conftest import Vmop
from tests.e2e.test_tenancy_limits import defined, settled

BRIDGES = frozenset({"vmopbr0", "br-lan.10"})
NETWORKS = frozenset({"vmopnet"})
MAX_VCPUS_PER_VM, MAX_MEMORY_MIB_PER_VM = 4, 64
API_MAX_MEMORY_MIB = 4194304
# The rules that keep a spec out of libvirt altogether (NodeMemoryFull only holds a start back: the VMs here
# are Stopped, so it never comes up).
NODE_RULES = frozenset({STORAGE_NOT_ALLOWED, NETWORK_NOT_ALLOWED, OVER_VM_LIMITS})
# libvirt refusing a definition is allowed, as long as the VM says so.
ACCEPTED = frozenset({"Reconciled", "DefinitionRefused"})
# Text the API takes (C0 controls and DEL it refuses: a few places and odd names below carry them).
TEXT = st.characters(min_codepoint=0x20, exclude_characters="\x7f", codec="utf-8")
ODD_NAMES = ("VMOPBR0", "vmopbr0 ", " vmopnet", "default", "virbr0", "vmopbr0\n", "br-lan.10/..", "é" * 253)


@dataclass(frozen=True)
class Place:
    """A path a spec may name, and whether the node must take it as a raw file or as a qcow2 image:
    True taken, False refused, None either (random text)."""

    label: str
    path: str
    raw: bool | None
    qcow2: bool | None


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", "create", "-q", *args], check=True, stdin=subprocess.DEVNULL)


@pytest.fixture
def places(vmop: Vmop, tmp_path: Path) -> Iterator[list[Place]]:
    """Files of every kind in the shared storage directory (named after the test's namespace), and outside."""
    storage = Path(vmop.libvirt.storage_dir)
    outside = tmp_path / "outside.img"
    outside.write_bytes(b"\0" * 65536)
    made: list[Path] = []

    def made_in_storage(name: str) -> Path:
        path = storage / f"{vmop.namespace}-{name}"
        made.append(path)
        return path

    raw, qcow2 = made_in_storage("raw.img"), made_in_storage("disk.qcow2")
    raw.write_bytes(b"\0" * 65536)
    qemu_img("-f", "qcow2", str(qcow2), "1M")
    over_inside, over_outside = made_in_storage("over-inside.qcow2"), made_in_storage("over-outside.qcow2")
    qemu_img("-f", "qcow2", "-b", str(raw), "-F", "raw", str(over_inside))
    qemu_img("-f", "qcow2", "-b", str(outside), "-F", "raw", str(over_outside))
    unicode = made_in_storage("dïsk é <&>'.img")
    unicode.write_bytes(b"\0" * 4096)
    link_in, link_out = made_in_storage("link-in.img"), made_in_storage("link-out.img")
    link_in.symlink_to(raw)
    link_out.symlink_to(outside)
    loop_a, loop_b = made_in_storage("loop-a.img"), made_in_storage("loop-b.img")
    loop_a.symlink_to(loop_b)
    loop_b.symlink_to(loop_a)
    fifo = made_in_storage("fifo.img")
    os.mkfifo(fifo)
    longest = f"{storage}/" + "x" * (4096 - len(str(storage)) - 1)
    images = vmop.libvirt.images
    try:
        yield [
            Place("kernel", str(images.kernel), raw=True, qcow2=False),
            Place("initrd", str(images.coop_initrd), raw=True, qcow2=False),
            Place("raw", str(raw), raw=True, qcow2=False),
            Place("qcow2", str(qcow2), raw=True, qcow2=True),
            Place("qcow2 backed inside", str(over_inside), raw=True, qcow2=True),
            Place("qcow2 backed outside", str(over_outside), raw=True, qcow2=False),
            Place("unicode name", str(unicode), raw=True, qcow2=False),
            Place("symlink inside", str(link_in), raw=True, qcow2=False),
            Place(".. that stays inside", f"{storage}/{vmop.namespace}-nowhere/../{raw.name}", raw=True, qcow2=False),
            Place("doubled slashes", f"{storage}//./{raw.name}", raw=True, qcow2=False),
            Place("symlink out", str(link_out), raw=False, qcow2=False),
            Place("symlink loop", str(loop_a), raw=False, qcow2=False),
            Place("fifo", str(fifo), raw=False, qcow2=False),
            Place("the directory itself", str(storage), raw=False, qcow2=False),
            Place("missing", f"{storage}/{vmop.namespace}-missing.img", raw=False, qcow2=False),
            Place(".. escape", f"{storage}/../../../../../../..{outside}", raw=False, qcow2=False),
            Place("outside", str(outside), raw=False, qcow2=False),
            Place("/etc/passwd", "/etc/passwd", raw=False, qcow2=False),
            Place("4096 characters", longest, raw=False, qcow2=False),
            Place("4097 characters", longest + "x", raw=False, qcow2=False),
            Place("control character", f"{storage}/{vmop.namespace}-a\x01b.img", raw=False, qcow2=False),
            Place("relative", raw.name, raw=False, qcow2=False),
        ]
    finally:
        for path in made:
            path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Case:
    """One spec's domain, and what the node's rules must make of it (None: the oracle cannot tell)."""

    domain: dict[str, Any]
    storage: bool | None
    networks: bool
    sizes: bool


def _taken(place: Place, format_: str) -> bool | None:
    return place.raw if format_ == "raw" else place.qcow2


@st.composite
def cases(draw: st.DrawFn, places: list[Place]) -> Case:
    """A spec that breaks the rules drawn first, and keeps the others: specs that break everything at once
    would almost never show what is taken. The verdicts are worked out from the values, not the intent."""
    breaks = draw(st.sets(st.sampled_from(["storage", "networks", "sizes"])))
    random = st.builds(
        lambda text: Place("random", "/" + text, raw=None, qcow2=None), st.text(TEXT, min_size=1, max_size=40)
    )
    refused = [p for p in places if not p.raw and not p.qcow2]
    any_place = st.one_of(st.sampled_from(refused), st.sampled_from(places), random)
    verdicts: list[bool | None] = []

    def file() -> str:
        place: Place = draw(any_place if "storage" in breaks else st.sampled_from([p for p in places if p.raw]))
        verdicts.append(place.raw)
        return place.path

    def disk() -> dict[str, str]:
        if "storage" in breaks:
            place, format_ = draw(any_place), draw(st.sampled_from(["raw", "qcow2"]))
        else:
            good = [(p, f) for p in places for f in ("raw", "qcow2") if _taken(p, f)]
            place, format_ = draw(st.sampled_from(good))
        verdicts.append(_taken(place, format_))
        return {"path": place.path, "format": format_, "bus": draw(st.sampled_from(["virtio", "sata", "scsi"]))}

    within = st.tuples(st.integers(1, MAX_VCPUS_PER_VM), st.integers(8, MAX_MEMORY_MIB_PER_VM))
    # At and past the caps, and past the API's bounds (the API server's to refuse).
    anywhere = st.tuples(
        st.one_of(
            st.integers(MAX_VCPUS_PER_VM + 1, MAX_VCPUS),
            st.sampled_from([MAX_VCPUS_PER_VM + 1, MAX_VCPUS, 0, MAX_VCPUS + 1]),
        ),
        st.one_of(
            st.integers(MAX_MEMORY_MIB_PER_VM + 1, API_MAX_MEMORY_MIB),
            st.sampled_from([MAX_MEMORY_MIB_PER_VM + 1, API_MAX_MEMORY_MIB, 7, API_MAX_MEMORY_MIB + 1]),
        ),
    )
    vcpus, memory = draw(anywhere if "sizes" in breaks else within)
    domain: dict[str, Any] = {"vcpus": vcpus, "memoryMiB": memory}
    if draw(st.booleans()):
        domain["kernel"] = file()
        if draw(st.booleans()):
            domain["initrd"] = file()
        if draw(st.booleans()):
            domain["cmdline"] = draw(st.text(TEXT, max_size=40))
    elif "storage" in breaks and draw(st.booleans()):
        domain["initrd"] = file()  # without a kernel: the API server's to refuse
    domain["disks"] = [disk() for _ in range(draw(st.integers("storage" in breaks, 3)))]
    allowed = [{"type": "bridge", "source": b} for b in sorted(BRIDGES)] + [
        {"type": "network", "source": n} for n in sorted(NETWORKS)
    ]
    stray = st.fixed_dictionaries(
        {
            "type": st.sampled_from(["bridge", "network"]),
            "source": st.one_of(
                st.sampled_from(sorted(BRIDGES | NETWORKS)),
                st.sampled_from(ODD_NAMES),
                st.text(TEXT, min_size=1, max_size=300),
            ),
        }
    )
    interfaces = draw(st.lists(st.sampled_from(allowed), max_size=2))
    if "networks" in breaks:  # anywhere among allowed ones, which must not carry it in
        interfaces.insert(draw(st.integers(0, len(interfaces))), draw(stray))
    domain["interfaces"] = interfaces
    return Case(
        domain=domain,
        storage=False if False in verdicts else (None if None in verdicts else True),
        networks=all(i["source"] in (BRIDGES if i["type"] == "bridge" else NETWORKS) for i in domain["interfaces"]),
        sizes=vcpus <= MAX_VCPUS_PER_VM and memory <= MAX_MEMORY_MIB_PER_VM,
    )


def unexpected_failures(operator: OperatorProcess, namespace: str) -> list[str]:
    """The operator's own bugs so far: its process gone, or reconciles that failed unexpectedly."""
    prefix = f"{namespace}/"
    assert operator.process is not None
    if operator.process.poll() is not None:
        return [f"the operator exited with {operator.process.returncode}:\n{operator.log_tail()}"]
    found = [
        f"{record.get('vm')}: {record.get('exception', '')}"
        for record in operator.log_records()
        if record.get("message") == "reconcile failed unexpectedly" and record.get("vm", "").startswith(prefix)
    ]
    counted = operator.metric("vmop_reconcile_errors_total", kind="unexpected")
    if counted:
        found.append(f"vmop_reconcile_errors_total{{kind='unexpected'}} is {counted}")
    return found


def reported(body: dict[str, Any]) -> bool:
    """The operator has said what it made of this generation: a refusal, or nothing left to do."""
    synced = condition(body, "Synced")
    if synced is None or synced.get("observedGeneration") != body["metadata"]["generation"]:
        return False
    # A new VM reads Synced=True before its spec is looked at (while its finalizer is added): only a
    # settled status says that the spec was taken.
    return synced["status"] == "False" or settled(body)


def assert_obeys_the_rules(vmop: Vmop, name: str) -> None:
    """What was defined is what the node allows: every file inside the storage directory, nothing else."""
    storage = Path(os.path.realpath(vmop.libvirt.storage_dir))
    root = ET.fromstring(vmop.domain(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    files = [e.get("file") for e in root.iter("source")] + [root.findtext("os/kernel"), root.findtext("os/initrd")]
    for file in filter(None, files):
        real = Path(os.path.realpath(file))
        assert real.is_relative_to(storage), f"{file} resolves to {real}, outside {storage}"
        assert real.is_file(), f"{file} is not a regular file"
    for interface in root.iterfind("devices/interface"):
        kind = interface.get("type")
        source = interface.find("source")
        assert source is not None
        assert source.get(kind or "") in (BRIDGES if kind == "bridge" else NETWORKS), ET.tostring(interface)
    assert int(root.findtext("vcpu") or 0) <= MAX_VCPUS_PER_VM
    memory = root.find("memory")
    assert memory is not None
    assert memory.get("unit") == "KiB"
    assert int(memory.text or 0) <= MAX_MEMORY_MIB_PER_VM * 1024


def test_no_spec_gets_past_the_node_rules_or_breaks_the_operator(vmop: Vmop, places: list[Place]) -> None:
    operator = vmop.start_operator(
        *(arg for bridge in sorted(BRIDGES) for arg in ("--allowed-bridge", bridge)),
        *(arg for network in sorted(NETWORKS) for arg in ("--allowed-network", network)),
        "--max-vcpus-per-vm", str(MAX_VCPUS_PER_VM),
        "--max-memory-mib-per-vm", str(MAX_MEMORY_MIB_PER_VM),
    )  # fmt: skip
    names = (f"vm-{n}" for n in itertools.count())
    outcomes: Counter[str] = Counter()

    # No example database: it would be written into the repository, and the random run is the point.
    @settings(max_examples=100, deadline=None, database=None)
    @given(case=cases(places))
    def check(case: Case) -> None:
        name = next(names)
        manifest = vmop.manifest(name, power_state="Stopped", domain=case.domain)
        try:
            VirtualMachineSpec.model_validate(manifest["spec"])
            valid = True
        except pydantic.ValidationError:
            valid = False
        try:
            vmop.vms.create(manifest)
        except kubernetes.client.ApiException as refused:
            if refused.status != 422:
                raise
            refusal = str(refused.body)
            outcomes["refused by the API server"] += 1
        else:
            refusal = None
        # The schema is generated from the operator's models: they refuse the same specs.
        assert valid != (refusal is not None), f"model takes it: {valid}; API server's refusal: {refusal}"
        if refusal is not None:
            return
        try:
            body = vmop.vms.wait(name, reported, timeout=30, what="a report for its generation")
            synced = condition(body, "Synced")
            assert synced is not None
            why = synced["reason"]
            outcomes[why] += 1
            note(f"{name}: Synced {why}: {synced['message']}")
            expected = set()
            if case.storage is False:
                expected.add(STORAGE_NOT_ALLOWED)
            if not case.networks:
                expected.add(NETWORK_NOT_ALLOWED)
                assert "is not allowed on this node" in synced["message"]
            if not case.sizes:
                expected.add(OVER_VM_LIMITS)
                assert "over this node's limit" in synced["message"]
            unsure = {STORAGE_NOT_ALLOWED} if case.storage is None else set()
            possible = (expected or ACCEPTED) | unsure
            assert why in possible, f"{why}: {synced['message']}"
            if why in NODE_RULES or why == "DefinitionRefused":
                assert not defined(vmop, name), "a refused spec must leave nothing in libvirt"
            else:
                assert vmop.domain_state(name) == libvirt.VIR_DOMAIN_SHUTOFF, "defined, never started"
                assert_obeys_the_rules(vmop, name)
        finally:
            vmop.vms.delete(name)
            vmop.vms.wait_gone(name, timeout=30)
        assert not defined(vmop, name), "a deleted VM's domain is undefined"
        failures = unexpected_failures(operator, vmop.namespace)
        assert not failures, failures

    check()
    print(f"outcomes: {dict(outcomes)}")
    assert sum(outcomes.values()) - outcomes["refused by the API server"] >= 10, "too few specs reached the operator"
