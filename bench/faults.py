"""Benchmark `faults`: the force overshoot under each fault of the reliability work, as one table (issue 13).

One node, one operator (which allows the bridge `vmopnosuchbr0`, absent from the bed's libvirtd), and per
scenario a fresh set of firmware-only guests (they ignore ACPI, so each one is forced),
`gracePeriodSeconds: 5`, `retryIntervalSeconds: 1`. The bench asks them to stop at once, reads the
deadline each VM's status records, stages the fault so that it spans the deadline, and measures each
VM's force against that deadline from its own observers, never from the operator's word:

* SIGTERM: when QEMU got libvirt's destroy (QEMU's own timestamped log, as in `deadline`);
* STOPPED: when libvirt reported the guest off (the bed's lifecycle listener, on its own connection).

The deadline is read from status again once the stop is reported (for the API-server case, once the API
server is back) and compared with the one read right after the request (`deadline_changed`). A SIGTERM
before the deadline is an early force; a VM with no SIGTERM after the request was never forced.

The faults, times relative to the first VM's deadline D (the VMs' deadlines lie within about 0.1 s):

* none: the same setup without a fault, as the reference;
* api_server_down: kube-apiserver stopped 3 s before D (SIGTERM; SIGKILL 2 s later if it has not exited:
  it stops listening at once but its graceful end can take the bed's whole 20 s; etcd stays) and started
  again on the same address 2 s after the last deadline; the operator forces while it is gone;
* operator_killed: the operator SIGKILLed 8 s before D and a new one started at once, so that it is up
  again before the deadline; this round has `gracePeriodSeconds: 10`, since a restarted operator needs
  about 3 s to act (more under load);
* libvirtd_restarted: libvirtd stopped 0.5 s before D (its guests keep running) and started again 0.5 s
  after it: no libvirtd exists at the deadline, so the force can only come once it is back and the
  operator has reconnected (its reconnection backs off from 0.5 s);
* neighbour_refused: three VMs on the same node created 0.3 s before D, each refused around the
  deadline: a disk outside the allowed storage directory (by the operator, StorageNotAllowed), a bridge
  on no allow list (by the operator, NetworkNotAllowed), an allowed bridge libvirt does not have (by
  libvirt, StartFailed); they are deleted after the round;
* handover: a second operator for the node started as a standby before the request, and the acting one
  sent SIGTERM (as a rollout does) 0.5 s before D, so that the standby takes the node lock just before
  the deadline and must force.

The bed belongs to the whole bench: whatever a scenario stops (the API server, libvirtd, the operator)
is started again within the scenario, and again in `finally` if the scenario failed half way; after a
libvirtd restart the bed's lifecycle listener is replaced by one on the new daemon.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes

from bench.bed import Bed, LifecycleListener, parallel
from bench.shutdown import SETTLE_SECONDS, domain_name, end_section, sigterm_time
from bench.stats import summary
from testbed.vmop import OperatorProcess, Vms, condition, parse_time, vm_manifest
from testbed.wait import WaitTimeout, wait_until

GRACE_SECONDS = 5
RETRY_SECONDS = 1
# Allowed on the node but absent from the bed's libvirtd: a VM on it is refused by libvirt, not by vmop.
MISSING_BRIDGE = "vmopnosuchbr0"
# On no allow list: refused by the operator before libvirt is asked.
STRAY_BRIDGE = "vmopstraybr0"
OPERATOR_ARGS = ("--allowed-bridge", MISSING_BRIDGE)
# How long after the last deadline a force is still waited for before the VM counts as never forced.
FORCE_WAIT_SECONDS = 30.0

API_DOWN_BEFORE = 3.0
API_UP_AFTER_LAST = 2.0
# kube-apiserver's graceful end could take the whole 20 s default with the bench's watches open (it stops
# listening within about a second): SIGKILL after 2 s, so that it is back on time.
API_STOP_TIMEOUT = 2.0
# A restarted operator takes about 3 s to act on an idle machine (interpreter, imports, kopf), more under
# load: this round has a longer grace so that the new one is up before the deadline.
KILLED_GRACE_SECONDS = 10
KILL_BEFORE = 8.0
LIBVIRTD_DOWN_BEFORE = 0.5
LIBVIRTD_UP_AFTER = 0.5
NEIGHBOURS_BEFORE = 0.3
SIGTERM_BEFORE = 0.5

SCENARIOS = ("none", "api_server_down", "operator_killed", "libvirtd_restarted", "neighbour_refused", "handover")


@dataclass
class Context:
    """What the scenarios share: the bed, the namespace and node, and whichever operator acts right now."""

    bed: Bed
    namespace: str
    node: str
    operator: OperatorProcess
    outside: Path
    count: int
    grace: int = GRACE_SECONDS
    standby: OperatorProcess | None = None
    extra_operators: list[OperatorProcess] = field(default_factory=list)


@dataclass
class Requested:
    """A scenario's VMs once each has its stop requested and its deadline in status."""

    names: list[str]
    since: float
    deadlines: dict[str, float]

    @property
    def first(self) -> float:
        return min(self.deadlines.values())

    @property
    def last(self) -> float:
        return max(self.deadlines.values())


def _r(value: float | None, digits: int = 3) -> float | None:
    return round(value, digits) if value is not None else None


def _sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.time()))


def _shutdown(body: dict[str, Any] | None) -> dict[str, Any]:
    return ((body or {}).get("status") or {}).get("shutdown") or {}


def _ts(value: str | None) -> float | None:
    return parse_time(value).timestamp() if value else None


def _logged(operator: OperatorProcess, text: str, since: float) -> float | None:
    """When the operator first logged a line containing `text` at or after `since` (its own clock, ms)."""
    for record in operator.log_records():
        when = record.get("time")
        if when and text in str(record.get("message", "")) and (at := parse_time(when).timestamp()) >= since:
            return at
    return None


def _rel(value: float | None, d: float) -> float | None:
    return _r(value - d) if value is not None else None


# ---- one round: start the guests, ask them to stop, stage the fault, measure


def _start(ctx: Context, names: Sequence[str]) -> None:
    vms = ctx.bed.vms(ctx.namespace)
    vm_watch = ctx.bed.watch(ctx.namespace)
    try:
        policy = {"gracePeriodSeconds": ctx.grace, "retryIntervalSeconds": RETRY_SECONDS}
        parallel(
            lambda name: vms.create(
                vm_manifest(name, node_name=ctx.node, libvirt=ctx.bed.libvirt, kind="firmware", shutdown_policy=policy)
            ),
            names,
        )
        vm_watch.wait_all(names, "Running", timeout=60)
    finally:
        vm_watch.stop()
    time.sleep(SETTLE_SECONDS)


def _request_stop(ctx: Context, names: list[str]) -> Requested:
    """Set every VM to Stopped at once; returns once each status has a first request and a deadline."""
    vms = ctx.bed.vms(ctx.namespace)
    since = time.time()
    parallel(lambda name: vms.patch_spec(name, powerState="Stopped"), names)

    def deadlines() -> dict[str, float] | None:
        records = dict(zip(names, parallel(lambda n: _shutdown(vms.get(n)), names), strict=True))
        found = {
            n: parse_time(r["deadline"]).timestamp()
            for n, r in records.items()
            if r.get("deadline") and r.get("attempts", 0) >= 1 and (_ts(r.get("requestedAt")) or 0) >= since - 1
        }
        return found if len(found) == len(names) else None

    found = wait_until(deadlines, timeout=20, message="not every VM had its stop requested", interval=0.05)
    return Requested(names, since, found)


def _records(ctx: Context, names: Sequence[str], timeout: float) -> dict[str, dict[str, Any]]:
    """Each VM's status.shutdown once its outcome is reported (or what there is after the timeout); an API
    server that has just come back may refuse the first reads."""
    vms = ctx.bed.vms(ctx.namespace)
    last: dict[str, dict[str, Any]] = {}

    def read() -> dict[str, dict[str, Any]] | None:
        try:
            last.update(zip(names, parallel(lambda n: _shutdown(vms.get(n)), names), strict=True))
        except Exception:  # the API server is not back yet: try again
            return None
        return dict(last) if all(last[n].get("outcome") for n in names) else None

    try:
        return wait_until(read, timeout=timeout, message="outcomes", interval=0.1)
    except WaitTimeout:
        return dict(last)


def _measure(ctx: Context, requested: Requested, staged: dict[str, Any]) -> dict[str, Any]:
    """Per VM: SIGTERM and STOPPED against the deadline the status holds once the stop is reported."""
    bed = ctx.bed
    domains = {n: domain_name(ctx.namespace, n) for n in requested.names}
    wait = max(0.0, requested.last - time.time()) + FORCE_WAIT_SECONDS
    stops = bed.listener.wait_stopped(domains.values(), requested.since, wait)
    records = _records(ctx, requested.names, timeout=30)
    reported = time.time()
    samples: list[dict[str, Any]] = []
    sigterms: list[float] = []
    stoppeds: list[float] = []
    early = not_forced = changed = 0
    for name in requested.names:
        record = records.get(name) or {}
        deadline = _ts(record.get("deadline"))
        if deadline is None:
            deadline = requested.deadlines[name]  # no status to read (the API server never came back)
        elif abs(deadline - requested.deadlines[name]) > 1e-6:
            changed += 1
        sigterm = sigterm_time(bed, domains[name], requested.since)
        stopped = stops.get(domains[name])
        if sigterm is None:
            not_forced += 1
        late_sigterm = _r(sigterm - deadline, 4) if sigterm is not None else None
        late_stopped = _r(stopped - deadline, 4) if stopped is not None else None
        completed = _ts(record.get("completedAt"))
        if late_sigterm is not None:
            sigterms.append(late_sigterm)
        if late_stopped is not None:
            stoppeds.append(late_stopped)
        first_seen = late_sigterm if late_sigterm is not None else late_stopped
        if first_seen is not None and first_seen < 0:
            early += 1
        samples.append(
            {
                "vm": name,
                "deadline_offset": _r(deadline - requested.first, 4),
                "sigterm": late_sigterm,
                "stopped": late_stopped,
                "outcome": record.get("outcome"),
                "completed_at": _r(completed - deadline, 4) if completed is not None else None,
            }
        )
    result = {
        **staged,
        "grace": ctx.grace,
        "n": len(requested.names),
        "measured": sum(1 for s in samples if s["sigterm"] is not None and s["stopped"] is not None),
        "early_sigterm": early,
        "not_forced": not_forced,
        "not_stopped": len(requested.names) - len(stops),
        "deadline_changed": changed,
        "outcomes_reported": sum(1 for s in samples if s["outcome"]),
        "outcomes_forced": sum(1 for s in samples if s["outcome"] == "Forced"),
        "outcomes_read": _r(reported - requested.first),
        "deadline_spread": _r(requested.last - requested.first),
        "sigterm": summary(sigterms),
        "stopped": summary(stoppeds),
        "samples": samples,
    }
    return result


Stage = Callable[["Context", Requested], dict[str, Any]]
Prepare = Callable[["Context"], None]
After = Callable[["Context", Requested, dict[str, Any]], None]


def _round(ctx: Context, prefix: str, stage: Stage, prepare: Prepare | None, after: After | None) -> dict[str, Any]:
    names = [f"{prefix}-{i}" for i in range(ctx.count)]
    _start(ctx, names)
    if prepare is not None:
        prepare(ctx)
    requested = _request_stop(ctx, names)
    staged = stage(ctx, requested)
    result = _measure(ctx, requested, staged)
    if after is not None:
        after(ctx, requested, result)
    return result


# ---- the faults; each returns what it did, with its times in seconds relative to the first deadline


def _no_fault(_ctx: Context, requested: Requested) -> dict[str, Any]:
    return {"fault": "none: the stop requested and nothing else done"}


class _PortProbe:
    """When the API server's port first refused a TCP connection: the moment it was really down."""

    def __init__(self, server: str) -> None:
        url = urlsplit(server)
        self._address = (url.hostname or "127.0.0.1", url.port or 443)
        self.refused_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="faults:apiserver-port", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with socket.create_connection(self._address, timeout=0.5):
                    pass
            except OSError:
                self.refused_at = time.time()
                return
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


def _api_server_down(ctx: Context, requested: Requested) -> dict[str, Any]:
    control_plane = ctx.bed.control_plane
    d = requested.first
    _sleep_until(d - API_DOWN_BEFORE)
    probe = _PortProbe(control_plane.server)
    stopping = time.time()
    control_plane.stop_apiserver(timeout=API_STOP_TIMEOUT)
    stopped = time.time()
    probe.stop()
    _sleep_until(requested.last + API_UP_AFTER_LAST)
    starting = time.time()
    control_plane.start_apiserver()  # on this (the main) thread: the server dies with the thread that forks it
    ready = time.time()
    return {
        "fault": (
            f"kube-apiserver stopped (SIGTERM, SIGKILL after {API_STOP_TIMEOUT:g} s; etcd kept) {API_DOWN_BEFORE:g} s "
            f"before the first deadline and started again {API_UP_AFTER_LAST:g} s after the last, on the same address"
        ),
        "apiserver_stop_sent": _r(stopping - d),
        "apiserver_refusing": _rel(probe.refused_at, d),
        "apiserver_exited": _r(stopped - d),
        "apiserver_start_sent": _r(starting - d),
        "apiserver_ready": _r(ready - d),
    }


def _after_api_server(_ctx: Context, _requested: Requested, result: dict[str, Any]) -> None:
    """How long the status took to catch up once the API server was back (the bench reads every 0.1 s)."""
    result["outcomes_read_after_apiserver_ready"] = _r(result["outcomes_read"] - result["apiserver_ready"])


def _operator_killed(ctx: Context, requested: Requested) -> dict[str, Any]:
    d = requested.first
    _sleep_until(d - KILL_BEFORE)
    killing = time.time()
    ctx.operator.kill()
    killed = time.time()
    ctx.operator = ctx.bed.operator(ctx.node, *OPERATOR_ARGS)  # same log file; waits until healthy
    healthy = time.time()
    return {
        "fault": (
            f"operator SIGKILLed {KILL_BEFORE:g} s before the deadline (grace {KILLED_GRACE_SECONDS} s in this round) "
            "and a new one started at once, so that it acts again before the deadline"
        ),
        "sigkill_sent": _r(killing - d),
        "operator_dead": _r(killed - d),
        "new_operator_healthy": _r(healthy - d),
        "restarted_before_deadline": healthy < d,
    }


def _socket_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


class _Relisten:
    """A new lifecycle listener, connected the moment the new libvirtd answers: the bed's listener went
    with the old daemon, and the force may come as soon as the operator reconnects."""

    def __init__(self, bed: Bed) -> None:
        self._bed = bed
        self._socket = bed.libvirt.runtime_dir / "libvirt" / "libvirt-sock"
        self.listener: LifecycleListener | None = None
        self.connected_at: float | None = None
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="faults:relisten", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if _socket_answers(self._socket):
                try:
                    self.listener = LifecycleListener(self._bed.libvirt.uri)
                    self.connected_at = time.time()
                    return
                except Exception as error:  # answering, but not taking clients yet
                    self.error = error
            time.sleep(0.01)

    def join(self, timeout: float) -> LifecycleListener | None:
        self._thread.join(timeout)
        self._stop.set()
        return self.listener


def _libvirtd_restarted(ctx: Context, requested: Requested) -> dict[str, Any]:
    bed, d = ctx.bed, requested.first
    _sleep_until(d - LIBVIRTD_DOWN_BEFORE)
    stopping = time.time()
    bed.libvirt.stop_daemon()
    stopped = time.time()
    relisten = _Relisten(bed)
    _sleep_until(d + LIBVIRTD_UP_AFTER)
    starting = time.time()
    bed.libvirt.start_daemon()
    back = time.time()
    bed.renew_listener(relisten.join(timeout=10))
    listener = bed.listener
    # A guest already off when the new listener registered has no STOPPED on record: say so.
    conn = bed.libvirt.connect()
    try:
        off_before_listening = [
            n
            for n in requested.names
            if not conn.lookupByName(domain_name(ctx.namespace, n)).isActive()
            and listener.stopped_after(domain_name(ctx.namespace, n), requested.since) is None
        ]
    finally:
        conn.close()
    return {
        "fault": (
            f"libvirtd stopped (SIGTERM, guests left running) {LIBVIRTD_DOWN_BEFORE:g} s before the first "
            f"deadline and started again {LIBVIRTD_UP_AFTER:g} s after it: no libvirtd at the deadline"
        ),
        "libvirtd_stop_sent": _r(stopping - d),
        "libvirtd_exited": _r(stopped - d),
        "libvirtd_start_sent": _r(starting - d),
        "libvirtd_back": _r(back - d),
        "listener_connected": _rel(relisten.connected_at, d),
        "off_before_listener": off_before_listening,
    }


def _after_libvirtd(ctx: Context, requested: Requested, result: dict[str, Any]) -> None:
    """The operator's share once libvirtd was back: its reconnection (from its log), then the force."""
    d, back = requested.first, result["libvirtd_back"]
    result["operator_reconnected"] = _rel(_logged(ctx.operator, "connected to libvirt", d - LIBVIRTD_DOWN_BEFORE), d)
    result["sigterm_after_libvirtd_back"] = summary(
        [s["sigterm"] - back for s in result["samples"] if s["sigterm"] is not None]
    )


def _neighbour_refused(ctx: Context, requested: Requested) -> dict[str, Any]:
    d = requested.first
    vms = ctx.bed.vms(ctx.namespace)
    prefix = requested.names[0].rsplit("-", 1)[0]
    neighbours: dict[str, dict[str, Any]] = {
        f"{prefix}-disk-outside": {"memoryMiB": 16, "disks": [{"path": str(ctx.outside), "format": "raw"}]},
        f"{prefix}-bridge-not-allowed": {"memoryMiB": 16, "interfaces": [{"type": "bridge", "source": STRAY_BRIDGE}]},
        f"{prefix}-bridge-missing": {"memoryMiB": 16, "interfaces": [{"type": "bridge", "source": MISSING_BRIDGE}]},
    }
    _sleep_until(d - NEIGHBOURS_BEFORE)
    creating = time.time()
    parallel(
        lambda name: vms.create(
            vm_manifest(name, node_name=ctx.node, libvirt=ctx.bed.libvirt, domain=neighbours[name])
        ),
        list(neighbours),
    )
    created = time.time()
    return {
        "fault": (
            f"three VMs on the same node created {NEIGHBOURS_BEFORE:g} s before the deadline, each refused: a disk "
            "outside the allowed storage directory, a bridge on no allow list (both by the operator), an allowed "
            "bridge libvirt does not have (by libvirt)"
        ),
        "created_from": _r(creating - d),
        "created_until": _r(created - d),
        "neighbours": list(neighbours),
    }


def _with_condition(vms: Vms, name: str, type_: str) -> dict[str, Any] | None:
    body = vms.get(name)
    return body if body is not None and condition(body, type_) is not None else None


def _neighbour_refusals(ctx: Context, requested: Requested, result: dict[str, Any]) -> None:
    """How each neighbour was refused, and when its first Warning Event says so (relative to the deadline);
    then the neighbours are deleted, so that a start libvirt keeps refusing does not run into the next round."""
    names, d = result["neighbours"], requested.first
    vms = ctx.bed.vms(ctx.namespace)
    found: dict[str, Any] = {}
    for name in names:
        try:
            body = wait_until(
                partial(_with_condition, vms, name, "Synced"), timeout=15, message=f"no Synced condition on {name}"
            )
            synced = condition(body, "Synced") or {}
            uid = body["metadata"]["uid"]
            warnings = [e for e in vms.events(name) if e.type == "Warning" and e.involved_object.uid == uid]
        except (WaitTimeout, kubernetes.client.ApiException) as error:
            found[name] = {"error": str(error)}
            continue
        times = [when.timestamp() for e in warnings if (when := e.event_time or e.first_timestamp) is not None]
        found[name] = {
            "synced": synced.get("status"),
            "reason": synced.get("reason"),
            "warnings": sorted({str(e.reason) for e in warnings}),
            "first_warning": _r(min(times) - d) if times else None,
        }
    result["neighbours"] = found
    _drop(ctx, names)


def _drop(ctx: Context, names: Sequence[str]) -> None:
    vms = ctx.bed.vms(ctx.namespace)
    for name in names:
        with contextlib.suppress(kubernetes.client.ApiException):
            vms.delete(name)
    for name in names:
        with contextlib.suppress(WaitTimeout):
            vms.wait_gone(name, timeout=15)


_MILESTONES = (
    ("holds_lock", "acting for node"),
    ("startup_done", "Activity 'register.<locals>.startup' succeeded"),
    ("connected_to_libvirt", "connected to libvirt"),
    ("backstop_armed", "has a stop under way"),
)


def _milestones(operator: OperatorProcess, since: float, d: float) -> dict[str, float | None]:
    """A new acting operator's steps from its log: the node lock, kopf's startup (our startup handler), the
    libvirt connection, the backstop armed from the domain's shutdown mark (if it was, before kopf's list)."""
    return {key: _rel(_logged(operator, text, since), d) for key, text in _MILESTONES}


def _after_killed(ctx: Context, requested: Requested, result: dict[str, Any]) -> None:
    d = requested.first
    result["new_operator"] = _milestones(ctx.operator, d + result["operator_dead"], d)


def _after_handover(ctx: Context, requested: Requested, result: dict[str, Any]) -> None:
    d = requested.first
    result["standby"] = _milestones(ctx.operator, d + result["sigterm_sent"], d)


def _start_standby(ctx: Context) -> None:
    standby = OperatorProcess(
        kubeconfig=ctx.operator.kubeconfig,
        node_name=ctx.node,
        libvirt=ctx.bed.libvirt,
        log_path=ctx.bed.log_dir / f"operator-{ctx.node}-standby.log",
        extra_args=("--log-level", "INFO", *OPERATOR_ARGS),
    )
    ctx.extra_operators.append(standby)
    ctx.standby = standby.start(standby=True)


def _handover(ctx: Context, requested: Requested) -> dict[str, Any]:
    first, standby = ctx.operator, ctx.standby
    assert standby is not None
    process = first.process
    assert process is not None
    d = requested.first
    acting_before = (first.acting, standby.acting)
    _sleep_until(d - SIGTERM_BEFORE)
    sent = time.time()
    process.terminate()  # SIGTERM, as a rollout does; no wait here
    took_over = None
    with contextlib.suppress(WaitTimeout):
        wait_until(lambda: standby.acting, timeout=15, message="the standby did not take over", interval=0.01)
        took_over = time.time()
    process.wait(timeout=30)
    exited = time.time()
    ctx.operator, ctx.standby = standby, None
    return {
        "fault": (
            f"a standby operator for the node started before the request; the acting one sent SIGTERM "
            f"{SIGTERM_BEFORE:g} s before the deadline, so that the standby takes over across it and forces"
        ),
        "acting_before": {"first": acting_before[0], "standby": acting_before[1]},
        "sigterm_sent": _r(sent - d),
        "standby_acting": _r(took_over - d) if took_over is not None else None,
        "takeover_after_sigterm": _r(took_over - sent) if took_over is not None else None,
        "first_exited": _r(exited - d),
        "first_exit_code": process.returncode,
    }


# ---- the section


def _restore(ctx: Context) -> None:
    """Whatever a failed scenario left stopped, running again, so that the bed is whole for what follows."""
    bed = ctx.bed
    with contextlib.suppress(Exception):
        bed.control_plane.thaw_apiserver()
    if not bed.control_plane.apiserver_running:
        bed.control_plane.start_apiserver()
    if bed.libvirt.daemon_pid is None:
        bed.libvirt.start_daemon()
        bed.renew_listener()


def run(bed: Bed, *, quick: bool) -> dict[str, Any]:
    count = 1 if quick else 3
    namespace = bed.namespace("bench-faults")
    node = f"node-{namespace}"
    outside_dir = Path(tempfile.mkdtemp(prefix="vmop-bench-outside-"))
    outside = outside_dir / "disk.raw"
    outside.write_bytes(b"\0" * 1024 * 1024)
    os.chmod(outside_dir, 0o755)
    outside.chmod(0o644)
    ctx = Context(bed, namespace, node, bed.operator(node, *OPERATOR_ARGS), outside, count)
    settings = {
        "vms_per_scenario": count,
        "guest": "firmware-only (ignores ACPI)",
        "grace": GRACE_SECONDS,
        "grace_operator_killed": KILLED_GRACE_SECONDS,
        "retry_interval": RETRY_SECONDS,
        "operator_args": list(OPERATOR_ARGS),
        "force_wait_seconds": FORCE_WAIT_SECONDS,
        "times": "seconds relative to the first VM's deadline (status.shutdown.deadline)",
    }
    scenarios: dict[str, Any] = {}
    clock = time.monotonic()
    try:
        plan: list[tuple[str, str, int, Stage, Prepare | None, After | None]] = [
            ("none", "none", GRACE_SECONDS, _no_fault, None, None),
            ("api_server_down", "apidown", GRACE_SECONDS, _api_server_down, None, _after_api_server),
            ("operator_killed", "killed", KILLED_GRACE_SECONDS, _operator_killed, None, _after_killed),
            ("libvirtd_restarted", "libvirtd", GRACE_SECONDS, _libvirtd_restarted, None, _after_libvirtd),
            ("neighbour_refused", "neighbour", GRACE_SECONDS, _neighbour_refused, None, _neighbour_refusals),
            ("handover", "handover", GRACE_SECONDS, _handover, _start_standby, _after_handover),
        ]
        for key, prefix, grace, stage, prepare, after in plan:
            started = time.monotonic()
            ctx.grace = grace
            try:
                result = _round(ctx, prefix, stage, prepare, after)
            except Exception as error:
                _restore(ctx)
                result = {"error": f"{type(error).__name__}: {error}"}
            result["seconds"] = round(time.monotonic() - started, 1)
            scenarios[key] = result
            print(f"  fault {key}: {_line(result)}", flush=True)
    finally:
        _restore(ctx)
        for operator in [ctx.operator, *ctx.extra_operators]:
            operator.stop()
        end_section(bed, namespace)
        shutil.rmtree(outside_dir, ignore_errors=True)
    return {"settings": settings, "scenarios": scenarios, "seconds": round(time.monotonic() - clock, 1)}


# ---- the table


def _f(value: Any, digits: int = 3) -> str:
    if isinstance(value, float) and not math.isnan(value):
        return f"{value:.{digits}f}"
    return "-" if value is None or isinstance(value, float) else str(value)


def _line(s: dict[str, Any]) -> str:
    if "error" in s:
        return f"failed: {s['error']}"
    sigterm, stopped = s.get("sigterm") or {}, s.get("stopped") or {}
    text = (
        f"SIGTERM p50 {_f(sigterm.get('p50'))} max {_f(sigterm.get('max'))}; "
        f"STOPPED p50 {_f(stopped.get('p50'))} max {_f(stopped.get('max'))}; "
        f"early {s.get('early_sigterm')}"
    )
    if s.get("not_forced"):
        text += f", NOT FORCED {s['not_forced']} of {s.get('n')}"
    return text


_TARGETS = {
    "none": "STOPPED p99 < 0.25",
    "libvirtd_restarted": "libvirtd back + reconnect",
}


def rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The section's lines of the printed table: (benchmark, result, target)."""
    scenarios = result.get("scenarios") or {}
    out: list[tuple[str, str, str]] = []
    for name in SCENARIOS:
        s = scenarios.get(name)
        if s is None:
            continue
        label = f"fault: {name}, s past the deadline" + (f" (N={s['n']})" if "n" in s else "")
        out.append((label, _line(s), _TARGETS.get(name, "as none")))
    return out
