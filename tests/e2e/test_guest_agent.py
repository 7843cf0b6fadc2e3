"""The guest agent for real: qemu-guest-agent in the guest, obeying, absent, hung, or ignoring shutdown.

Each guest is the cooperative image with Debian's qemu-ga behind a kernel-command-line knob, and the
domain has the agent channel (spec.domain.guestAgent). The operator runs with a 2 s agent timeout, so
that a hung agent's cost is visible against it.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from testbed.vmop import condition, parse_time
from testbed.wait import wait_until
from tests.e2e.conftest import Vmop
from tests.e2e.test_faults import MARGIN, ShutoffWatch, wait_forced

AGENT_TIMEOUT = 2.0
AGENT_FIRST = {"methods": ["Agent", "ACPI"]}


def agent_state(vmop: Vmop, name: str, connected: bool) -> dict[str, Any]:
    """Wait until the status says what libvirt says of the agent (and the guest is ready for ACPI)."""
    vmop.wait_running(name)
    return vmop.vms.wait(
        name,
        lambda b: (
            b["status"].get("agentConnected") is connected
            and (condition(b, "AgentConnected") or {}).get("status") == str(connected)
        ),
        timeout=60,
        what=f"agentConnected {connected}",
    )


def console(vmop: Vmop, name: str) -> str:
    return vmop.libvirt.console_log(vmop.domain_name(name))


def wait_console(vmop: Vmop, name: str, line: str) -> None:
    wait_until(
        lambda: line in console(vmop, name),
        timeout=60,
        message=lambda: f"{line} not on the console of {name}:\n{console(vmop, name)[-500:]}",
    )


def stop_and_wait(vmop: Vmop, name: str) -> dict[str, Any]:
    vmop.vms.patch_spec(name, powerState="Stopped")
    body = vmop.vms.wait(
        name, lambda b: (b["status"].get("shutdown") or {}).get("outcome"), timeout=60, what="the stop"
    )
    record: dict[str, Any] = body["status"]["shutdown"]
    return record


def first_attempt_took(record: dict[str, Any]) -> timedelta:
    return parse_time(record["recentAttempts"][0]["time"]) - parse_time(record["requestedAt"])


def test_the_agent_shuts_the_guest_down(vmop: Vmop) -> None:
    vmop.start_operator("--agent-timeout", str(AGENT_TIMEOUT))
    vmop.create("obedient", kind="coop", agent="ok", shutdown_policy=AGENT_FIRST)
    agent_state(vmop, "obedient", True)
    wait_console(vmop, "obedient", "GUEST-AGENT-READY")
    record = stop_and_wait(vmop, "obedient")
    assert record["outcome"] == "Graceful"
    assert record["method"] == "Agent"
    assert "GUEST-AGENT-SHUTDOWN" in console(vmop, "obedient")
    assert "GUEST-POWERBUTTON" not in console(vmop, "obedient"), "ACPI was never needed"


def test_a_channel_without_an_agent_goes_to_acpi_at_once(vmop: Vmop) -> None:
    vmop.start_operator("--agent-timeout", str(AGENT_TIMEOUT))
    vmop.create("agentless", kind="coop", agent="absent", shutdown_policy=AGENT_FIRST)
    agent_state(vmop, "agentless", False)
    record = stop_and_wait(vmop, "agentless")
    assert record["outcome"] == "Graceful"
    assert record["method"] == "ACPI"
    assert record["recentAttempts"][0]["message"] == "Agent: not connected"
    assert first_attempt_took(record) < timedelta(seconds=AGENT_TIMEOUT), "no agent timeout was waited"


def test_a_hung_agent_costs_at_most_the_agent_timeout_then_acpi_stops_the_guest(vmop: Vmop) -> None:
    vmop.start_operator("--agent-timeout", str(AGENT_TIMEOUT))
    vmop.create("hung", kind="coop", agent="hung", shutdown_policy=AGENT_FIRST)
    agent_state(vmop, "hung", True)
    record = stop_and_wait(vmop, "hung")
    assert record["outcome"] == "Graceful"
    assert record["method"] == "ACPI"
    assert record["recentAttempts"][0]["message"].startswith("Agent: ")
    took = first_attempt_took(record)
    assert took < timedelta(seconds=AGENT_TIMEOUT + 1.5), f"the hung agent cost {took}"
    assert "GUEST-POWERBUTTON accepted" in console(vmop, "hung")


def test_an_agent_that_ignores_shutdown_is_forced_at_the_deadline(vmop: Vmop) -> None:
    vmop.start_operator("--agent-timeout", str(AGENT_TIMEOUT))
    vmop.create(
        "deaf",
        kind="coop",
        agent="ignore",
        ignore_presses=1000,
        shutdown_policy={**AGENT_FIRST, "gracePeriodSeconds": 8, "retryIntervalSeconds": 3},
    )
    agent_state(vmop, "deaf", True)
    wait_console(vmop, "deaf", "GUEST-AGENT-READY")
    deadline = vmop.stop_requested("deaf")
    watch = ShutoffWatch(vmop.libvirt, vmop.domain_name("deaf"))
    shutoff = watch.wait(timeout=(deadline - datetime.now(UTC)).total_seconds() + 10)
    assert deadline <= shutoff < deadline + MARGIN, f"forced {shutoff - deadline} after the deadline"
    record = wait_forced(vmop, "deaf")
    # qemu-ga never answers guest-shutdown (it expects to die): libvirt cannot tell an agent that ignored it
    # from a hung one, so the attempt ends at the agent timeout and ACPI follows, which this guest ignores too.
    first = record["recentAttempts"][0]
    assert first["message"].startswith("Agent: no answer within"), first
    assert "GUEST-AGENT-SHUTDOWN-IGNORED" in console(vmop, "deaf"), "the agent was asked, and heard it"


def test_ten_hung_agents_delay_no_neighbours_force(vmop: Vmop) -> None:
    operator = vmop.start_operator("--agent-timeout", "5")
    hung = [f"hung-{i}" for i in range(10)]
    for name in hung:
        vmop.create(
            name,
            kind="coop",
            agent="hung",
            ignore_presses=1000,
            shutdown_policy={**AGENT_FIRST, "gracePeriodSeconds": 600, "retryIntervalSeconds": 1},
        )
    vmop.create("neighbour", kind="stubborn", shutdown_policy={"gracePeriodSeconds": 12, "retryIntervalSeconds": 1})
    for name in hung:
        agent_state(vmop, name, True)
    vmop.wait_running("neighbour", ready=False)
    for name in hung:
        vmop.vms.patch_spec(name, powerState="Stopped")
    # Every hung agent's request is in flight (each holds a libvirt call for the agent timeout) ...
    wait_until(
        lambda: all((vmop.vms.get(n) or {}).get("status", {}).get("shutdown") for n in hung),
        timeout=30,
        message="the hung VMs' stops did not begin",
    )
    deadline = vmop.stop_requested("neighbour")
    watch = ShutoffWatch(vmop.libvirt, vmop.domain_name("neighbour"))
    shutoff = watch.wait(timeout=(deadline - datetime.now(UTC)).total_seconds() + 10)
    # ... and the neighbour is forced on time all the same.
    assert deadline <= shutoff < deadline + MARGIN, f"forced {shutoff - deadline} after the deadline"
    assert all(vmop.vms.get(n)["status"]["powerState"] == "ShuttingDown" for n in hung)  # type: ignore[index]
    assert operator.metric("vmop_libvirt_connected") == 1
