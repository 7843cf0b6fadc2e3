"""Stopping a VM: graceful before the deadline, forced at and not before it, retries, Force, and overdue."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import libvirt

from testbed.kstatus import verdict
from testbed.vmop import condition, parse_time
from testbed.wait import holds_until
from tests.e2e.conftest import Vmop


def stopped(body: dict[str, Any]) -> bool:
    record = body.get("status", {}).get("shutdown") or {}
    return bool(record.get("outcome")) and body["status"].get("powerState") in ("Stopped", "Crashed")


def in_order(reasons: list[str], *expected: str) -> bool:
    """True if expected occur in reasons in this order (other reasons may come between)."""
    position = 0
    for reason in reasons:
        if position < len(expected) and reason == expected[position]:
            position += 1
    return position == len(expected)


def test_cooperative_guest_stops_gracefully_before_its_deadline(vmop: Vmop) -> None:
    vmop.start_operator()
    vmop.create("coop", shutdown_policy={"gracePeriodSeconds": 60})
    vmop.wait_running("coop")

    vmop.vms.patch_spec("coop", powerState="Stopped")
    body = vmop.vms.wait("coop", stopped, timeout=60, what="the stop to finish")

    record = body["status"]["shutdown"]
    assert record["outcome"] == "Graceful"
    assert record["purpose"] == "Stop"
    assert parse_time(record["completedAt"]) < parse_time(record["deadline"])
    assert [a["method"] for a in record["recentAttempts"]] == ["ACPI"]
    assert body["status"]["powerState"] == "Stopped"
    assert condition(body, "Ready")["status"] == "True"
    state, reason = vmop.domain("coop").state()
    assert (state, reason) == (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN)
    expected = ("StopRequested", "ShutdownRequested", "StoppedGracefully")
    assert in_order(vmop.vms.wait_events("coop", *expected), *expected)


def test_stubborn_guest_is_forced_off_after_and_not_before_its_deadline(vmop: Vmop) -> None:
    vmop.start_operator()
    vmop.create("stub", kind="stubborn", shutdown_policy={"gracePeriodSeconds": 6, "retryIntervalSeconds": 2})
    vmop.wait_running("stub")

    vmop.vms.patch_spec("stub", powerState="Stopped")
    body = vmop.vms.wait(
        "stub", lambda b: (b["status"].get("shutdown") or {}).get("deadline"), timeout=30, what="a deadline"
    )
    deadline = parse_time(body["status"]["shutdown"]["deadline"])
    requested = parse_time(body["status"]["shutdown"]["requestedAt"])
    assert (deadline - requested).total_seconds() == 6

    margin = 0.3
    holds_until(
        lambda: vmop.domain_state("stub") == libvirt.VIR_DOMAIN_RUNNING,
        seconds=(deadline - datetime.now(UTC)).total_seconds() - margin,
        message="the stubborn guest stopped before its deadline",
    )
    body = vmop.vms.wait("stub", stopped, timeout=30, what="the forced stop")

    record = body["status"]["shutdown"]
    assert record["outcome"] == "Forced"
    assert parse_time(record["completedAt"]) >= deadline
    assert record["attempts"] >= 3, "requests at 0 s, 2 s and 4 s of a 6 s grace period"
    assert parse_time(record["deadline"]) == deadline, "the deadline never moves"
    state, reason = vmop.domain("stub").state()
    assert (state, reason) == (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED)
    expected = ("StopRequested", "ShutdownRequested", "ShutdownRequestResent", "ForcedOff")
    assert in_order(vmop.vms.wait_events("stub", *expected), *expected)


def test_guest_that_ignores_two_presses_stops_on_a_later_retry(vmop: Vmop) -> None:
    vmop.start_operator()
    vmop.create(
        "deaf",
        ignore_presses=2,
        shutdown_policy={"gracePeriodSeconds": 60, "retryIntervalSeconds": 1},
    )
    vmop.wait_running("deaf")

    vmop.vms.patch_spec("deaf", powerState="Stopped")
    body = vmop.vms.wait("deaf", stopped, timeout=60, what="the stop to finish")

    record = body["status"]["shutdown"]
    assert record["outcome"] == "Graceful"
    assert record["attempts"] == 3
    assert [a["method"] for a in record["recentAttempts"]] == ["ACPI", "ACPI", "ACPI"]
    console = vmop.libvirt.console_log(vmop.domain_name("deaf"))
    assert console.count("GUEST-POWERBUTTON-IGNORED") == 2
    assert "GUEST-POWERBUTTON accepted" in console
    expected = ("ShutdownRequested", "ShutdownRequestResent", "StoppedGracefully")
    assert in_order(vmop.vms.wait_events("deaf", *expected), *expected)


def test_mode_force_turns_the_vm_off_at_once(vmop: Vmop) -> None:
    vmop.start_operator()
    vmop.create("scratch", kind="stubborn", shutdown_policy={"mode": "Force", "gracePeriodSeconds": 3600})
    vmop.wait_running("scratch", ready=False)

    vmop.vms.patch_spec("scratch", powerState="Stopped")
    body = vmop.vms.wait("scratch", stopped, timeout=30, what="the forced stop")

    record = body["status"]["shutdown"]
    assert record["outcome"] == "Forced"
    assert record["attempts"] == 0, "Force never asks the guest"
    assert record["deadline"] == record["requestedAt"]
    assert (parse_time(record["completedAt"]) - parse_time(record["requestedAt"])).total_seconds() < 5
    vmop.vms.wait_events("scratch", "ForcingOff")


def test_never_forcing_reports_overdue_until_mode_force(vmop: Vmop) -> None:
    operator = vmop.start_operator()
    vmop.create(
        "precious",
        kind="stubborn",
        shutdown_policy={"gracePeriodSeconds": 2, "retryIntervalSeconds": 1, "forceAfterDeadline": False},
    )
    vmop.wait_running("precious", ready=False)

    vmop.vms.patch_spec("precious", powerState="Stopped")
    body = vmop.vms.wait(
        "precious",
        lambda b: (condition(b, "ShutdownOverdue") or {}).get("status") == "True",
        timeout=30,
        what="ShutdownOverdue",
    )
    assert condition(body, "Ready")["reason"] == "ShutdownOverdue"
    assert verdict(body).status == "Failed", "Flux's health check: only a person can end this stop"
    attempts_when_overdue = body["status"]["shutdown"]["attempts"]
    holds_until(
        lambda: vmop.domain_state("precious") == libvirt.VIR_DOMAIN_RUNNING,
        seconds=3,
        message="a VM with forceAfterDeadline false was turned off",
    )
    body = vmop.vms.get("precious")
    assert body is not None
    assert body["status"]["shutdown"]["attempts"] > attempts_when_overdue, "requests go on after the deadline"
    assert vmop.vms.wait_events("precious", "ShutdownOverdue").count("ShutdownOverdue") == 1
    assert operator.metric("vmop_virtual_machines_shutdown_overdue") == 1, "what the VmopShutdownOverdue alert reads"

    vmop.vms.patch("precious", {"spec": {"shutdownPolicy": {"mode": "Force"}}})
    body = vmop.vms.wait("precious", stopped, timeout=30, what="the stop after switching to Force")
    assert body["status"]["shutdown"]["outcome"] == "Forced"
    assert condition(body, "ShutdownOverdue")["status"] == "False"
    assert operator.metric("vmop_virtual_machines_shutdown_overdue") == 0


def test_agent_method_without_an_agent_falls_back_to_acpi_at_once(vmop: Vmop) -> None:
    vmop.start_operator()
    vmop.create("noagent", shutdown_policy={"methods": ["Agent", "ACPI"], "gracePeriodSeconds": 60})
    vmop.wait_running("noagent")

    vmop.vms.patch_spec("noagent", powerState="Stopped")
    body = vmop.vms.wait("noagent", stopped, timeout=30, what="the stop to finish")

    record = body["status"]["shutdown"]
    assert record["outcome"] == "Graceful"
    first = record["recentAttempts"][0]
    assert first["method"] == "ACPI"
    assert "Agent" in first["message"]
    assert (parse_time(first["time"]) - parse_time(record["requestedAt"])).total_seconds() < 2


def test_switching_back_to_running_cancels_the_stop_and_forces_nothing(vmop: Vmop) -> None:
    vmop.start_operator()
    vmop.create("fickle", kind="stubborn", shutdown_policy={"gracePeriodSeconds": 4, "retryIntervalSeconds": 1})
    vmop.wait_running("fickle", ready=False)
    domain_id = vmop.domain("fickle").ID()

    deadline = vmop.stop_requested("fickle")
    vmop.vms.patch_spec("fickle", powerState="Running")
    body = vmop.vms.wait(
        "fickle",
        lambda b: (b["status"].get("shutdown") or {}).get("outcome") == "Cancelled",
        timeout=30,
        what="the stop to be cancelled",
    )
    holds_until(
        lambda: vmop.domain_state("fickle") == libvirt.VIR_DOMAIN_RUNNING and vmop.domain("fickle").ID() == domain_id,
        seconds=(deadline - datetime.now(UTC)).total_seconds() + 1.5,
        message="a cancelled stop still forced the VM off",
    )
    body = vmop.vms.get("fickle")
    assert body is not None
    assert body["status"]["powerState"] == "Running"
    assert condition(body, "Ready")["status"] == "True"
    vmop.vms.wait_events("fickle", "StopCancelled")
