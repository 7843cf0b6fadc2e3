"""One VM's trouble stays that VM's and shows in its conditions: refused edits and starts, suspended and
paused guests, crash loops, Event floods, a domain undefined from outside.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import kubernetes
import libvirt
import pytest

from testbed.controlplane import ControlPlane, KubectlError
from testbed.vmop import condition, parse_time
from testbed.wait import wait_until
from tests.e2e.conftest import Vmop
from tests.e2e.test_faults import MARGIN, ShutoffWatch, start_stop, wait_forced

MISSING_BRIDGE = [{"type": "bridge", "source": "vmopnosuchbr0"}]


def reason(body: dict[str, Any], type_: str) -> str | None:
    found = condition(body, type_)
    return found["reason"] if found else None


def test_an_edit_refused_mid_stop_says_why_and_the_force_stays_on_time(vmop: Vmop) -> None:
    vmop.start_operator()
    deadline = start_stop(vmop, "refused", grace=10, retry=2)
    watch = ShutoffWatch(vmop.libvirt, vmop.domain_name("refused"))
    body = vmop.vms.get("refused")
    assert body is not None
    domain = dict(
        body["spec"]["domain"], interfaces=[{"type": "network", "source": "default", "macAddress": "01:00:5e:00:00:01"}]
    )
    with pytest.raises(kubernetes.client.ApiException) as refused:
        vmop.vms.patch_spec("refused", domain=domain)
    assert refused.value.status == 422
    assert "unicast" in str(refused.value.body)
    shutoff = watch.wait(timeout=(deadline - datetime.now(UTC)).total_seconds() + 10)
    assert deadline <= shutoff < deadline + MARGIN
    wait_forced(vmop, "refused")


def test_a_start_libvirt_refuses_shows_in_the_conditions_until_it_is_fixed(
    vmop: Vmop, control_plane: ControlPlane
) -> None:
    # The node allows the bridge, so that what refuses the start is libvirt (the bridge does not exist).
    vmop.start_operator("--allowed-bridge", MISSING_BRIDGE[0]["source"])
    vmop.create("bridged", domain={"memoryMiB": 16, "interfaces": MISSING_BRIDGE})
    body = vmop.vms.wait(
        "bridged", lambda b: reason(b, "Synced") == "StartFailed", timeout=60, what="Synced=False StartFailed"
    )
    synced = condition(body, "Synced")
    assert synced is not None
    assert synced["status"] == "False"
    assert "vmopnosuchbr0" in synced["message"], "libvirt's own words"
    assert reason(body, "Ready") == "StartFailed"
    assert body["status"].get("observedGeneration") != body["metadata"]["generation"]
    with pytest.raises(KubectlError):  # what `kubectl wait` and Argo CD see: not Ready
        control_plane.kubectl(
            "wait", "-n", vmop.namespace, "--for=condition=Ready", "--timeout=3s", "virtualmachine/bridged"
        )

    vmop.vms.patch_spec("bridged", domain={"memoryMiB": 16, "interfaces": []})
    body = vmop.vms.wait(
        "bridged",
        lambda b: (
            (condition(b, "Ready") or {}).get("status") == "True"
            and b["status"].get("observedGeneration") == b["metadata"]["generation"]
        ),
        timeout=60,
        what="Ready after the fix",
    )
    assert condition(body, "Synced")["status"] == "True"  # type: ignore[index]
    assert body["status"]["powerState"] == "Running"


def test_a_guest_suspended_to_ram_is_woken_to_hear_the_stop(vmop: Vmop) -> None:
    """Asked to stop while it sleeps (its operator was away: one that watches wakes it, as powerState says)."""
    operator = vmop.start_operator()
    # A press right after the wake-up can come before the guest listens again: the resends are for that.
    vmop.create(
        "sleeper",
        kind="coop",
        suspend_after=8,
        shutdown_policy={"gracePeriodSeconds": 10, "retryIntervalSeconds": 1},
    )
    vmop.wait_running("sleeper")
    operator.stop()
    assert vmop.domain_state("sleeper") == libvirt.VIR_DOMAIN_RUNNING, "it went to sleep too early for the test"
    wait_until(
        lambda: vmop.domain_state("sleeper") == libvirt.VIR_DOMAIN_PMSUSPENDED,
        timeout=30,
        message="the guest did not suspend itself to RAM",
    )
    vmop.vms.patch_spec("sleeper", powerState="Stopped")
    vmop.start_operator()
    body = vmop.vms.wait(
        "sleeper", lambda b: (b["status"].get("shutdown") or {}).get("outcome"), timeout=30, what="the stop"
    )
    assert body["status"]["shutdown"]["outcome"] == "Graceful", "woken up, it heard the request"
    reasons = vmop.vms.wait_events("sleeper", "StopRequested", "WakingUp", "StoppedGracefully")
    assert reasons.index("StopRequested") < reasons.index("WakingUp")
    assert "GUEST-RESUMED from RAM" in vmop.libvirt.console_log(vmop.domain_name("sleeper"))


def test_a_paused_guest_that_cannot_hear_is_forced_at_the_deadline(vmop: Vmop) -> None:
    """Paused while its operator was away (as QEMU pauses a guest on an I/O error), then asked to stop."""
    operator = vmop.start_operator()
    vmop.create("frozen", kind="stubborn", shutdown_policy={"gracePeriodSeconds": 5, "retryIntervalSeconds": 1})
    vmop.wait_running("frozen", ready=False)
    operator.stop()
    vmop.domain("frozen").suspend()
    vmop.vms.patch_spec("frozen", powerState="Stopped")
    vmop.start_operator()
    record = wait_forced(vmop, "frozen")
    deadline = parse_time(record["deadline"])
    assert deadline - parse_time(record["requestedAt"]) == timedelta(seconds=5)
    assert timedelta(0) <= parse_time(record["completedAt"]) - deadline < MARGIN
    reasons = vmop.vms.wait_events("frozen", "StopRequested", "Resuming", "ForcedOff")
    assert reasons.index("StopRequested") < reasons.index("Resuming"), "the deadline was set before the resume"


def test_a_crash_loop_backs_off_and_says_so(vmop: Vmop) -> None:
    operator = vmop.start_operator()
    vmop.create("phoenix", kind="coop", poweroff_after=1, restart_policy="Always")
    # Each start, with the guest's own power-off that came before it (status.shutdown stays on record
    # while the guest runs again): the back-off is measured between the two on the operator's clock,
    # so a slow boot on a busy machine neither hides nor fakes it.
    starts: dict[str, str | None] = {}
    reasons: set[str] = set()

    def four_starts() -> bool:
        body = vmop.vms.get("phoenix") or {}
        status = body.get("status", {})
        started = status.get("startedAt")
        if started and started not in starts:
            starts[started] = (status.get("shutdown") or {}).get("completedAt")
        reasons.add(reason(body, "Ready") or "")
        return len(starts) >= 4

    wait_until(four_starts, timeout=150, interval=0.1, message=lambda: f"starts so far: {starts}")
    waits = []
    for started, stopped in list(starts.items())[1:]:
        assert stopped is not None, f"a stop on record before each restart: {starts}"
        assert parse_time(stopped) <= parse_time(started), f"the stop before the restart: {starts}"
        waits.append((parse_time(started) - parse_time(stopped)).total_seconds())
    # None before the first restart, then 10 s, then 20 s (a step's own latency on top, never less).
    assert waits[0] < 10, f"the first restart does not wait: {waits}"
    assert waits[1] >= 10, f"the second waits 10 s: {waits}"
    assert waits[2] >= 20, f"the third waits 20 s: {waits}"
    assert "CrashLoopBackOff" in reasons
    body = vmop.vms.get("phoenix")
    assert body is not None
    assert body["status"]["restarts"] >= 3
    events = vmop.vms.events("phoenix")
    assert len(events) <= 8, f"a handful of Event objects, with counts: {[(e.reason, e.count) for e in events]}"
    assert max(e.count or 1 for e in events) >= 3, "repeats are counted on one Event"
    # The JSON log a log system filters on: each line of this VM carries its name, its domain and the reason.
    logged = [r for r in operator.log_records() if r.get("reason") == "CrashLoopBackOff"]
    assert logged, "the reason is a field of the log line"
    assert logged[0]["vm"] == f"{vmop.namespace}/phoenix"
    assert logged[0]["domain"] == vmop.domain_name("phoenix")


def test_a_long_stop_with_a_short_retry_interval_posts_few_events(vmop: Vmop) -> None:
    vmop.start_operator()
    vmop.create("chatty", kind="firmware", shutdown_policy={"gracePeriodSeconds": 60, "retryIntervalSeconds": 1})
    vmop.vms.wait("chatty", lambda b: b.get("status", {}).get("powerState") == "Running", timeout=60, what="Running")
    vmop.vms.patch_spec("chatty", powerState="Stopped")
    record = wait_forced(vmop, "chatty", timeout=90)
    assert record["attempts"] >= 55, "every request is counted in the status"
    events = vmop.vms.wait_events("chatty", "ForcedOff")
    objects = vmop.vms.events("chatty")
    during_stop = [e for e in objects if e.reason not in ("Defined", "Starting")]
    assert len(during_stop) < 10, [(e.reason, e.count) for e in during_stop]
    assert events.count("ShutdownRequestResent") <= 6


def test_a_domain_undefined_outside_while_running_is_still_stopped_and_never_orphaned(vmop: Vmop) -> None:
    vmop.start_operator()
    vmop.create("adrift", kind="coop", shutdown_policy={"gracePeriodSeconds": 30})
    vmop.wait_running("adrift")
    vmop.domain("adrift").undefine()  # `virsh undefine` on a running domain: it is transient now
    assert not vmop.domain("adrift").isPersistent()
    vmop.vms.patch_spec("adrift", powerState="Stopped")
    body = vmop.vms.wait(
        "adrift", lambda b: (b["status"].get("shutdown") or {}).get("outcome"), timeout=60, what="the stop"
    )
    assert body["status"]["shutdown"]["outcome"] == "Graceful"
    assert "DomainConflict" not in vmop.vms.event_reasons("adrift")
    vmop.vms.delete("adrift")
    vmop.vms.wait_gone("adrift", timeout=60)
    names = [d.name() for d in vmop.libvirt.connect().listAllDomains()]
    assert vmop.domain_name("adrift") not in names
