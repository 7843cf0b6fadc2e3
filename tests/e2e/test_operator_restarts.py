"""The operator's own restarts: a deadline survives SIGKILL, and running guests are never touched."""

from __future__ import annotations

from datetime import UTC, datetime

import libvirt

from testbed.vmop import parse_time
from testbed.wait import holds_until, wait_until
from tests.e2e.conftest import Vmop


def test_operator_killed_mid_shutdown_keeps_the_deadline(vmop: Vmop) -> None:
    vmop.start_operator()
    vmop.create("durable", kind="stubborn", shutdown_policy={"gracePeriodSeconds": 8, "retryIntervalSeconds": 2})
    vmop.wait_running("durable", ready=False)

    deadline = vmop.stop_requested("durable")
    vmop.operator.kill()
    assert vmop.domain_state("durable") == libvirt.VIR_DOMAIN_RUNNING

    vmop.start_operator()
    holds_until(
        lambda: vmop.domain_state("durable") == libvirt.VIR_DOMAIN_RUNNING,
        seconds=(deadline - datetime.now(UTC)).total_seconds() - 0.3,
        message="the restarted operator forced the VM off before the original deadline",
    )
    body = vmop.vms.wait(
        "durable", lambda b: (b["status"].get("shutdown") or {}).get("outcome"), timeout=30, what="the forced stop"
    )
    record = body["status"]["shutdown"]
    assert record["outcome"] == "Forced"
    assert parse_time(record["deadline"]) == deadline
    assert parse_time(record["completedAt"]) >= deadline
    assert (parse_time(record["completedAt"]) - deadline).total_seconds() < 5, "forced at the deadline, not later"


def test_operator_restart_leaves_running_guests_running(vmop: Vmop) -> None:
    vmop.start_operator()
    vmop.create("steady")
    vmop.create("still", power_state="Paused")
    vmop.wait_running("steady")
    vmop.vms.wait("still", lambda b: b.get("status", {}).get("powerState") == "Paused", timeout=60, what="Paused")
    ids = {name: vmop.domain(name).ID() for name in ("steady", "still")}

    vmop.operator.stop()
    assert vmop.domain_state("steady") == libvirt.VIR_DOMAIN_RUNNING
    assert vmop.domain_state("still") == libvirt.VIR_DOMAIN_PAUSED

    operator = vmop.start_operator()
    # Evidence that the new operator has reconciled both (it counts them on every reconcile, and writes
    # nothing since nothing changed); only then is "nothing changed" worth checking.
    wait_until(
        lambda: (
            operator.metric("vmop_virtual_machines", power_state="Running") == 1
            and operator.metric("vmop_virtual_machines", power_state="Paused") == 1
        ),
        timeout=30,
        message=lambda: f"power-state gauges after the restart:\n{operator.metrics()}",
    )
    holds_until(
        lambda: (
            vmop.domain_state("steady") == libvirt.VIR_DOMAIN_RUNNING
            and vmop.domain_state("still") == libvirt.VIR_DOMAIN_PAUSED
            and all(vmop.domain(name).ID() == ids[name] for name in ids)
        ),
        seconds=3,
        message="restarting the operator changed a guest",
    )
    body = vmop.vms.get("steady")
    assert body is not None
    assert body["status"]["powerState"] == "Running"
