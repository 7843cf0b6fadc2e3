"""What Flux says of a VM's health, by kstatus itself, on statuses a real operator wrote on the bed.

Each verdict is computed on a body already read back after the status write that the check is about
(Ready, the shutdown record, the refusal), so that it judges what the operator wrote and not a status it
has not yet got to. An overdue stop reads Failed too: tests/e2e/test_shutdown.py checks it on its way.
"""

from __future__ import annotations

from typing import Any

from testbed.kstatus import verdict
from testbed.vmop import condition
from tests.e2e.conftest import Vmop
from tests.e2e.test_one_vm_trouble import reason
from tests.e2e.test_shutdown import stopped
from tests.e2e.test_tenancy_limits import settled

STRAY_BRIDGE = [{"type": "bridge", "source": "vmopevil0"}]


def assert_verdict(body: dict[str, Any], expected: str) -> str:
    """kstatus's status on body is expected; its message, which says why when it is not, is returned."""
    found = verdict(body)
    assert found.status == expected, f"{found}; conditions: {body['status'].get('conditions')}"
    return found.message


def ready_as_asked(body: dict[str, Any]) -> bool:
    return settled(body) and (condition(body, "Ready") or {}).get("status") == "True"


def test_a_vm_running_or_stopped_as_asked_is_current(vmop: Vmop) -> None:
    vmop.start_operator()
    vmop.create("coop", shutdown_policy={"gracePeriodSeconds": 60})
    vmop.wait_running("coop")
    body = vmop.vms.wait("coop", ready_as_asked, timeout=30, what="Ready and settled")
    assert_verdict(body, "Current")

    vmop.vms.patch_spec("coop", powerState="Stopped")
    body = vmop.vms.wait("coop", lambda b: stopped(b) and ready_as_asked(b), timeout=60, what="stopped and settled")
    assert body["status"]["shutdown"]["outcome"] == "Graceful"
    assert_verdict(body, "Current")


def test_a_vm_is_in_progress_while_it_stops_and_current_once_off(vmop: Vmop) -> None:
    vmop.start_operator()
    vmop.create("stub", kind="stubborn", shutdown_policy={"gracePeriodSeconds": 10, "retryIntervalSeconds": 2})
    vmop.wait_running("stub", ready=False)
    assert_verdict(vmop.vms.wait("stub", ready_as_asked, timeout=30, what="Ready and settled"), "Current")

    vmop.vms.patch_spec("stub", powerState="Stopped")
    # Under way and with the new generation observed, so that the verdict comes from the VM's conditions and
    # not from a generation the operator has not yet caught up with.
    body = vmop.vms.wait(
        "stub",
        lambda b: (b["status"].get("shutdown") or {}).get("deadline") and not stopped(b) and settled(b),
        timeout=8,
        what="the stop under way, the new generation observed",
    )
    assert reason(body, "Reconciling") == "ShuttingDown"
    assert_verdict(body, "InProgress")

    body = vmop.vms.wait("stub", lambda b: stopped(b) and ready_as_asked(b), timeout=30, what="forced off, settled")
    assert body["status"]["shutdown"]["outcome"] == "Forced"
    assert condition(body, "Reconciling") is None
    assert_verdict(body, "Current")


def test_a_spec_the_node_refuses_is_failed_until_it_is_fixed(vmop: Vmop) -> None:
    vmop.start_operator()  # no --allowed-bridge: every bridge is refused
    vmop.create("stray", domain={"memoryMiB": 16, "interfaces": STRAY_BRIDGE})
    vmop.create("later", power_state="Stopped", domain={"memoryMiB": 16})

    body = vmop.vms.wait("stray", lambda b: reason(b, "Stalled") == "NetworkNotAllowed", timeout=30, what="Stalled")
    assert "vmopevil0" in assert_verdict(body, "Failed")

    # A refused edit of a VM that was fine, as a GitOps tool would apply a bad revision: Failed at once, not
    # InProgress until the tool's health check times out.
    body = vmop.vms.wait("later", ready_as_asked, timeout=30, what="defined, Ready and settled")
    assert_verdict(body, "Current")
    vmop.vms.patch_spec("later", domain={"interfaces": STRAY_BRIDGE})
    body = vmop.vms.wait("later", lambda b: reason(b, "Stalled") == "NetworkNotAllowed", timeout=30, what="Stalled")
    assert_verdict(body, "Failed")

    vmop.vms.patch_spec("later", domain={"interfaces": []})
    body = vmop.vms.wait(
        "later", lambda b: ready_as_asked(b) and condition(b, "Stalled") is None, timeout=30, what="the fix settled"
    )
    assert_verdict(body, "Current")
