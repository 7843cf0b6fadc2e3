"""libvirt going away: the operator keeps running, says so in conditions, reconnects, and loses no deadline.

This test owns a libvirt daemon of its own, because it stops the daemon that the other tests share.
"""

from __future__ import annotations

from datetime import UTC, datetime

import libvirt

from testbed.vmop import condition, parse_time
from tests.e2e.conftest import Vmop


def test_libvirt_outage_is_reported_and_the_deadline_is_kept(vmop_own_libvirt: Vmop) -> None:
    vmop, own_libvirt = vmop_own_libvirt, vmop_own_libvirt.libvirt
    operator = vmop.start_operator()
    vmop.create("patient", kind="stubborn", shutdown_policy={"gracePeriodSeconds": 6, "retryIntervalSeconds": 2})
    vmop.wait_running("patient", ready=False)
    deadline = vmop.stop_requested("patient")

    own_libvirt.stop_daemon()
    body = vmop.vms.wait(
        "patient",
        lambda b: (condition(b, "Synced") or {}).get("reason") == "HypervisorUnreachable",
        timeout=30,
        what="HypervisorUnreachable",
    )
    assert body["status"]["powerState"] == "Unknown"
    assert condition(body, "Ready")["status"] == "Unknown"
    vmop.vms.wait_events("patient", "HypervisorUnreachable")
    assert operator.process is not None
    assert operator.process.poll() is None, "the operator keeps running"

    # Back after the deadline has passed: the VM is forced off at once, against the original deadline.
    wait_past = (deadline - datetime.now(UTC)).total_seconds()
    if wait_past > 0:
        vmop.vms.wait(
            "patient", lambda b: datetime.now(UTC) > deadline, timeout=wait_past + 5, what="the deadline to pass"
        )
    own_libvirt.start_daemon()
    body = vmop.vms.wait(
        "patient",
        lambda b: (b["status"].get("shutdown") or {}).get("outcome") == "Forced",
        timeout=60,
        what="the forced stop after reconnecting",
    )
    shutdown = body["status"]["shutdown"]
    assert parse_time(shutdown["deadline"]) == deadline
    assert parse_time(shutdown["completedAt"]) >= deadline, "not forced before its deadline"
    assert condition(body, "Synced")["status"] == "True"
    # vmop's destroy, and nobody else's: a stubborn guest never powers off by itself, and the operator counts
    # what it sends. libvirt names the stop DESTROYED, or DAEMON when the destroy came while the restarted
    # daemon was still reconnecting to QEMU: a destroy SIGTERMs QEMU before it waits for the reconnect's job,
    # the reconnect then loses its monitor and ends the domain itself (qemuProcessReconnect's error path).
    assert operator.metric("vmop_libvirt_actions_total", action="destroy") >= 1
    state, reason = own_libvirt.connect().lookupByName(vmop.domain_name("patient")).state()
    assert state == libvirt.VIR_DOMAIN_SHUTOFF
    assert reason in (libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED, libvirt.VIR_DOMAIN_SHUTOFF_DAEMON), reason
