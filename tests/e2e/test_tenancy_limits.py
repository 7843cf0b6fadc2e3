"""What a node does not allow a tenant stays out of libvirt: networks off its lists, VMs over its per-VM caps,
and starts past its memory ceiling, each tried on the real bed.

Each refusal is waited for as the operator reports it (the condition), and only then is libvirt asked: a
domain that does not exist yet could still be defined a moment later.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

import libvirt

from controller.nodepolicy import NETWORK_NOT_ALLOWED, NODE_MEMORY_FULL, OVER_VM_LIMITS
from testbed.vmop import condition
from tests.e2e.conftest import Vmop
from tests.e2e.test_one_vm_trouble import reason

NETWORK_FLAGS = ("--allowed-bridge", "vmopbr0", "--allowed-network", "vmopnet", "--interface-filter", "clean-traffic")


def defined(vmop: Vmop, name: str) -> bool:
    return vmop.domain_name(name) in {domain.name() for domain in vmop.libvirt.connect().listAllDomains()}


def settled(body: dict[str, Any]) -> bool:
    """The operator has acted on this generation and found nothing left to do."""
    return bool(body.get("status", {}).get("observedGeneration") == body["metadata"]["generation"])


def wait_refused(vmop: Vmop, name: str, why: str) -> dict[str, Any]:
    """The refusal as a user sees it: Synced False, a Warning Event, and nothing of the VM in libvirt."""
    body = vmop.vms.wait(name, lambda b: reason(b, "Synced") == why, timeout=30, what=f"Synced=False {why}")
    assert condition(body, "Synced")["status"] == "False"  # type: ignore[index]
    vmop.vms.wait_events(name, why)
    assert {e.type for e in vmop.vms.events(name) if e.reason == why} == {"Warning"}
    return body


def test_an_interface_on_no_allow_list_is_refused_and_nothing_is_defined(vmop: Vmop) -> None:
    vmop.start_operator(*NETWORK_FLAGS)
    strays = {
        "stray-bridge": ([{"type": "bridge", "source": "vmopevil0"}], "interfaces[0]: bridge 'vmopevil0'"),
        "stray-network": ([{"type": "network", "source": "default"}], "interfaces[0]: network 'default'"),
        # An allowed interface carries no other in with it, and a bridge's name is no network's.
        "smuggled": (
            [{"type": "bridge", "source": "vmopbr0"}, {"type": "network", "source": "vmopbr0"}],
            "interfaces[1]: network 'vmopbr0'",
        ),
    }
    for name, (interfaces, _) in strays.items():
        vmop.create(name, domain={"memoryMiB": 16, "interfaces": interfaces})
    allowed = [{"type": "bridge", "source": "vmopbr0"}, {"type": "network", "source": "vmopnet"}]
    # Stopped: a start would fail here, since the bed's session libvirtd has neither bridge nor network.
    vmop.create("allowed", power_state="Stopped", domain={"memoryMiB": 16, "interfaces": allowed})

    for name, (_, words) in strays.items():
        body = wait_refused(vmop, name, NETWORK_NOT_ALLOWED)
        message = condition(body, "Synced")["message"]  # type: ignore[index]
        assert words in message
        flag = "--allowed-bridge" if words.split()[1] == "bridge" else "--allowed-network"
        assert flag in message, "the message says how the node's administrator allows it"
        assert reason(body, "Ready") == NETWORK_NOT_ALLOWED
        assert not defined(vmop, name), "nothing is defined for a refused network"

    vmop.vms.wait("allowed", settled, timeout=30, what="the allowed VM defined")
    root = ET.fromstring(vmop.domain("allowed").XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    sources = [(i.get("type"), i.find("source").attrib) for i in root.iterfind("devices/interface")]  # type: ignore[union-attr]
    assert sources == [("bridge", {"bridge": "vmopbr0"}), ("network", {"network": "vmopnet"})]
    # Anti-spoofing is libvirt's nwfilter, which the bed's unprivileged daemon does not run: what is shown
    # here is that every interface vmop defines carries the filter the node asked for.
    filters = [i.find("filterref") for i in root.iterfind("devices/interface")]
    assert [f.get("filter") if f is not None else None for f in filters] == ["clean-traffic", "clean-traffic"]


def test_a_vm_over_the_per_vm_caps_is_refused_until_it_fits(vmop: Vmop) -> None:
    vmop.start_operator("--max-vcpus-per-vm", "2", "--max-memory-mib-per-vm", "32")
    vmop.create("wide", domain={"memoryMiB": 16, "vcpus": 3})
    vmop.create("tall", domain={"memoryMiB": 33})
    for name, words in (("wide", "vcpus 3 is over this node's limit of 2"), ("tall", "memoryMiB 33 is over")):
        body = wait_refused(vmop, name, OVER_VM_LIMITS)
        assert words in condition(body, "Synced")["message"]  # type: ignore[index]
        assert reason(body, "Ready") == OVER_VM_LIMITS
        assert not defined(vmop, name), "nothing is defined over the caps"

    # At the caps exactly: the limits are inclusive.
    vmop.vms.patch_spec("wide", domain={"vcpus": 2})
    vmop.vms.patch_spec("tall", domain={"memoryMiB": 32})
    for name in ("wide", "tall"):
        vmop.wait_running(name, ready=False)
        assert vmop.domain_state(name) == libvirt.VIR_DOMAIN_RUNNING
    assert vmop.domain("wide").info()[3] == 2
    assert vmop.domain("tall").maxMemory() == 32 * 1024


def test_a_vm_past_the_node_memory_ceiling_waits_undefined_until_memory_is_free(vmop_own_libvirt: Vmop) -> None:
    """On a libvirtd of its own, so that no other test's guests count against the ceiling."""
    vmop = vmop_own_libvirt
    vmop.start_operator("--memory-ceiling-mib", "48")
    # Force: firmware guests ignore ACPI.
    vmop.create("first", domain={"memoryMiB": 32}, shutdown_policy={"mode": "Force"})
    vmop.wait_running("first", ready=False)

    vmop.create("second", domain={"memoryMiB": 32})
    body = vmop.vms.wait(
        "second", lambda b: reason(b, "Ready") == NODE_MEMORY_FULL, timeout=60, what="Ready=False NodeMemoryFull"
    )
    ready = condition(body, "Ready")
    assert ready is not None
    assert ready["status"] == "False"
    assert "32 MiB already committed" in ready["message"]
    assert "ceiling of 48 MiB" in ready["message"]
    assert reason(body, "Synced") == NODE_MEMORY_FULL
    vmop.vms.wait_events("second", NODE_MEMORY_FULL)
    assert {e.type for e in vmop.vms.events("second") if e.reason == NODE_MEMORY_FULL} == {"Warning"}
    assert not defined(vmop, "second"), "neither defined nor started"
    assert vmop.domain_state("first") == libvirt.VIR_DOMAIN_RUNNING

    vmop.vms.patch_spec("first", powerState="Stopped")
    vmop.vms.wait("first", lambda b: b["status"].get("powerState") == "Stopped", timeout=60, what="first stopped")
    # Nothing tells the waiting VM that memory was freed: it looks again by itself.
    vmop.wait_running("second", ready=False, timeout=90)
    assert vmop.domain_state("second") == libvirt.VIR_DOMAIN_RUNNING
    assert vmop.domain_state("first") == libvirt.VIR_DOMAIN_SHUTOFF


def test_a_stricter_cap_never_stops_a_running_vm(vmop: Vmop) -> None:
    first = vmop.start_operator()
    vmop.create("incumbent", domain={"memoryMiB": 32})
    vmop.wait_running("incumbent", ready=False)
    domain_id = vmop.domain("incumbent").ID()
    first.stop()

    vmop.start_operator("--max-memory-mib-per-vm", "16")
    body = wait_refused(vmop, "incumbent", OVER_VM_LIMITS)
    assert "memoryMiB 32 is over" in condition(body, "Synced")["message"]  # type: ignore[index]
    # The report is written after the step's action: a stop decided with the refusal would have been sent.
    assert vmop.domain_state("incumbent") == libvirt.VIR_DOMAIN_RUNNING
    assert vmop.domain("incumbent").ID() == domain_id, "a refusal never turns a running VM off"
    assert body["status"]["powerState"] == "Running"
    assert condition(body, "Ready")["status"] == "True"  # type: ignore[index]
