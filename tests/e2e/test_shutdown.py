"""Stopping a VM: graceful before the deadline, forced at and not before it, retries, Force, and overdue."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import libvirt

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
    assert in_order(vmop.vms.event_reasons("coop"), "StopRequested", "ShutdownRequested", "StoppedGracefully")


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
    reasons = vmop.vms.event_reasons("stub")
    assert in_order(reasons, "StopRequested", "ShutdownRequested", "ShutdownRequestResent", "ForcedOff")
