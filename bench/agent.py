"""Benchmark `agent`: what a hung QEMU guest agent costs, on real guests.

The cooperative guest image carries Debian's qemu-guest-agent behind a kernel-command-line knob;
`agent="hung"` holds the agent's virtio port open and never reads it, so libvirt sees an agent connected
and every agent command waits for an answer that never comes. Three figures:

1. vmop's stop of a hung-agent guest (methods [Agent, ACPI], the operator's default --agent-timeout):
   status.shutdown.requestedAt to the first attempt (the Agent call timed out, then ACPI was accepted)
   and to the listener's STOPPED event.
2. libvirt's own default shutdown call, virDomainShutdownFlags(0), made by the bench on its own libvirt
   connection on a guest of the same kind (defined and started through vmop): how long the call blocks,
   whether it fails or falls back to ACPI, and when the guest stops; and the same with ACPI_POWER_BTN.
   For reference, the default call also on a guest whose agent takes guest-shutdown and ignores it
   (agent="ignore"): libvirt then waits for a poweroff that does not come.
3. A neighbour's force: firmware-only guests forced at a short deadline while ten hung-agent stops keep
   agent calls in flight on the same operator, against the same with no hung agents.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from typing import Any

import libvirt

from bench.bed import Bed, parallel
from bench.shutdown import COOP_BATCH, SETTLE_SECONDS, chunks, domain_name, end_section, sigterm_time
from bench.stats import summary
from controller.settings import parser as operator_flags
from testbed.vmop import parse_time, vm_manifest

AGENT_FIRST = ["Agent", "ACPI"]
_NOT_CONNECTED = "Agent: not connected"

# The bench's own shutdown call waits in a thread for at most this long, so a call that never returns
# cannot hang the run; cleanup destroys the guest, which ends the call.
CALL_CAP_SECONDS = 180.0

# How long a hung-agent guest keeps being asked in the neighbour measurement: never forced meanwhile.
_HUNG_GRACE = 3600


def operator_agent_timeout() -> float:
    """The agent timeout of the operators the bench starts: they get no --agent-timeout, so the default
    (or VMOP_AGENT_TIMEOUT, which they would inherit)."""
    return float(operator_flags().get_default("agent_timeout"))


def _status(body: dict[str, Any] | None) -> dict[str, Any]:
    return (body or {}).get("status") or {}


def _boot_agent_guests(bed: Bed, namespace: str, node: str, specs: dict[str, dict[str, Any]]) -> None:
    """Create cooperative guests through vmop, COOP_BATCH at a time.

    A guest counts once its console says the agent side is up (GUEST-AGENT-READY mode=<mode>) and acpid
    listens (GUEST-READY), and its status says agentConnected: without that, vmop skips the Agent method
    and libvirt's default call skips the agent too, and nothing here would measure a hung agent.
    """
    vms = bed.vms(namespace)
    vm_watch = bed.watch(namespace)
    try:

        def create(name: str) -> None:
            vms.create(vm_manifest(name, node_name=node, libvirt=bed.libvirt, kind="coop", **specs[name]))

        for chunk in chunks(list(specs), COOP_BATCH):
            parallel(create, chunk)
            vm_watch.wait_all(chunk, "Running", timeout=120)
            for name in chunk:
                domain = domain_name(namespace, name)
                bed.libvirt.wait_guest_ready(domain, timeout=120)
                line = f"GUEST-AGENT-READY mode={specs[name]['agent']}"
                if line not in bed.libvirt.console_log(domain):
                    raise RuntimeError(f"{domain} printed GUEST-READY but no {line!r}: is the agent image built?")
        for name in specs:
            vms.wait(name, lambda b: _status(b).get("agentConnected") is True, timeout=60, what="agentConnected")
    finally:
        vm_watch.stop()


def vmop_stop(bed: Bed, namespace: str, name: str, agent_timeout: float) -> dict[str, Any]:
    """Figure 1: a hung-agent guest stopped through vmop; all times from the status and the listener."""
    vms = bed.vms(namespace)
    domain = domain_name(namespace, name)
    since = time.time()
    vms.patch_spec(name, powerState="Stopped")
    stopped = bed.listener.wait_stopped([domain], since, 60).get(domain)
    body = vms.wait(
        name, lambda b: bool((_status(b).get("shutdown") or {}).get("outcome")), timeout=30, what="the outcome"
    )
    record = _status(body)["shutdown"]
    requested = parse_time(record["requestedAt"]).timestamp()
    first = record["recentAttempts"][0]
    result = {
        "agent_timeout": agent_timeout,
        "requested_to_first_attempt": round(parse_time(first["time"]).timestamp() - requested, 3),
        "requested_to_stopped": round(stopped - requested, 3) if stopped is not None else None,
        "patch_to_requested": round(requested - since, 3),
        "first_attempt_method": first["method"],
        "first_attempt_message": first["message"],
        "attempts": record["attempts"],
        "outcome": record.get("outcome"),
        "acpi_press_accepted": "GUEST-POWERBUTTON accepted" in bed.libvirt.console_log(domain),
    }
    print(f"  vmop stop of a hung-agent guest: {result}", flush=True)
    return result


class _Call:
    """One virDomainShutdownFlags call on a connection of its own, on a thread, so that the bench can give
    up waiting for it; close() ends the connection once the call has returned (or the guest is gone)."""

    def __init__(self, bed: Bed, domain: str, flags: int) -> None:
        self.domain = domain
        self.conn = bed.libvirt.connect()
        self.dom = self.conn.lookupByName(domain)
        self.flags = flags
        self.started = 0.0
        self.returned: float | None = None
        self.error: libvirt.libvirtError | None = None
        self.thread = threading.Thread(target=self._run, name=f"shutdown:{domain}", daemon=True)

    def _run(self) -> None:
        try:
            self.dom.shutdownFlags(self.flags)
        except libvirt.libvirtError as error:
            self.error = error
        self.returned = time.time()

    def start(self) -> None:
        self.started = time.time()
        self.thread.start()

    def wait(self, cap: float) -> None:
        """Until the call has returned, or `cap` seconds after it started."""
        self.thread.join(max(0.0, self.started + cap - time.time()))

    def close(self) -> None:
        self.thread.join(10)
        if not self.thread.is_alive():
            with contextlib.suppress(libvirt.libvirtError):
                self.conn.close()


def start_call(bed: Bed, namespace: str, name: str, *, flags: int, calls: list[_Call]) -> _Call:
    """Figure 2: the bench's own shutdownFlags(flags) on a running hung-agent guest, started on its thread."""
    call = _Call(bed, domain_name(namespace, name), flags)
    calls.append(call)
    call.start()
    return call


def call_result(bed: Bed, call: _Call, *, cap: float) -> dict[str, Any]:
    """What a started call did: waited for up to `cap` seconds from its start."""
    call.wait(cap)
    domain, flags = call.domain, call.flags
    blocked = round(call.returned - call.started, 3) if call.returned is not None else None
    # ACPI makes this guest power off within a second; a guest still up 30 s after the call is not stopping
    stopped = bed.listener.wait_stopped([domain], call.started, 30 if call.returned is not None else 0).get(domain)
    console = bed.libvirt.console_log(domain)
    result = {
        "flags": flags,
        "blocked": blocked,
        "still_blocked_after": None if call.returned is not None else cap,
        "error": str(call.error) if call.error is not None else None,
        "error_code": call.error.get_error_code() if call.error is not None else None,
        "acpi_press_accepted": "GUEST-POWERBUTTON accepted" in console,
        "agent_shutdown_seen": "GUEST-AGENT-SHUTDOWN" in console,
        "call_to_stopped": round(stopped - call.started, 3) if stopped is not None else None,
    }
    print(f"  libvirt shutdownFlags({flags}) on {domain}: {result}", flush=True)
    return result


def _neighbours(
    bed: Bed, namespace: str, node: str, label: str, *, count: int, grace: int, spacing: float
) -> tuple[dict[str, Any], list[float]]:
    """Firmware-only guests (they ignore ACPI) stopped `spacing` seconds apart with a short grace, so that
    their deadlines fall one by one; overshoot = listener STOPPED - status deadline, split at QEMU's
    timestamped SIGTERM into the operator's share and libvirt's (as in the deadline benchmark). Returns the
    summary and the deadlines (as time.time() values)."""
    vms = bed.vms(namespace)
    names = [f"nb-{label}-{i}" for i in range(count)]
    policy = {"gracePeriodSeconds": grace, "retryIntervalSeconds": 1}
    vm_watch = bed.watch(namespace)
    try:
        parallel(
            lambda n: vms.create(
                vm_manifest(n, node_name=node, libvirt=bed.libvirt, kind="firmware", shutdown_policy=policy)
            ),
            names,
        )
        vm_watch.wait_all(names, "Running", timeout=60)
    finally:
        vm_watch.stop()
    time.sleep(SETTLE_SECONDS)
    since = time.time()
    for i, name in enumerate(names):
        time.sleep(max(0.0, since + i * spacing - time.time()))
        vms.patch_spec(name, powerState="Stopped")
    domains = [domain_name(namespace, n) for n in names]
    stops = bed.listener.wait_stopped(domains, since, count * spacing + grace + 30)
    overshoots, deadlines, operator_share, libvirt_share = [], [], [], []
    for name, domain in zip(names, domains, strict=True):
        deadline = (_status(vms.get(name)).get("shutdown") or {}).get("deadline")
        if deadline is None or domain not in stops:
            continue
        at = parse_time(deadline).timestamp()
        deadlines.append(at)
        overshoots.append(stops[domain] - at)
        sigterm = sigterm_time(bed, domain, since)
        if sigterm is not None:
            operator_share.append(sigterm - at)
            libvirt_share.append(stops[domain] - sigterm)
    result = {
        **summary(overshoots),
        "n": count,
        "measured": len(overshoots),
        "min": round(min(overshoots), 4) if overshoots else None,
        "forced_before_deadline": sum(1 for o in overshoots if o < 0),
        "deadline_to_sigterm": summary(operator_share),
        "sigterm_to_stopped": summary(libvirt_share),
    }
    return result, deadlines


def _agent_timed_out(attempt: dict[str, Any]) -> bool:
    """The request's Agent call was made and failed (here: libvirt's guest-sync timed out), not skipped."""
    message = attempt.get("message", "")
    return message.startswith("Agent: ") and not message.startswith(_NOT_CONNECTED)


def _agent_calls_in_flight(bodies: Sequence[dict[str, Any] | None], instant: float, agent_timeout: float) -> int:
    """How many of the hung-agent VMs had an agent call in flight at `instant`, at least.

    Each request to a hung agent waits out the agent timeout before ACPI and the attempt's record (its
    time is taken after the request), so an attempt recorded in (instant, instant + timeout] began at or
    before `instant`: a lower bound, from the status alone.
    """
    count = 0
    for body in bodies:
        attempts = (_status(body).get("shutdown") or {}).get("recentAttempts") or []
        times = [parse_time(a["time"]).timestamp() for a in attempts if _agent_timed_out(a)]
        if any(instant < t <= instant + agent_timeout for t in times):
            count += 1
    return count


_SPACING = 0.75
"""Seconds between the neighbours' stops, so that their deadlines fall one by one."""


def neighbour_force(
    bed: Bed, namespace: str, node: str, *, names: Sequence[str], count: int, grace: int
) -> dict[str, Any]:
    """Figure 3, with the hung-agent guests `names` running: a neighbour's force overshoot while they are
    idle, and while their stops are in flight (each request: an agent call that times out, then ACPI, which
    they ignore). The round with no hung agent at all is run before they exist (agent_costs)."""
    vms = bed.vms(namespace)
    hung = len(names)
    agent_timeout = operator_agent_timeout()
    results: dict[str, Any] = {}
    results["idle"], _ = _neighbours(bed, namespace, node, "idle", count=count, grace=grace, spacing=_SPACING)
    print(f"  neighbour force, {hung} hung-agent guests running, not asked: {results['idle']}", flush=True)

    # Stopped one after another across one request cycle (the agent timeout, then the retry interval), so
    # that their agent calls are spread over it: stopped at once, they would ask in step, and every
    # second of each cycle would have no agent call in flight at all.
    since = time.time()
    cycle = agent_timeout + 1
    for i, name in enumerate(names):
        time.sleep(max(0.0, since + i * cycle / hung - time.time()))
        vms.patch_spec(name, powerState="Stopped")
    # past the first request of each (an agent call, then ACPI): from here on they re-ask every second
    for name in names:
        vms.wait(
            name,
            lambda b: (_status(b).get("shutdown") or {}).get("attempts", 0) >= 1,
            timeout=agent_timeout + 30,
            what="a first request",
        )
    results["in_flight"], deadlines = _neighbours(
        bed, namespace, node, "inflight", count=count, grace=grace, spacing=_SPACING
    )
    # the agent calls in flight at the last deadline end up to one agent timeout later
    if deadlines:
        time.sleep(max(0.0, max(deadlines) + agent_timeout + 1.0 - time.time()))
    bodies = [vms.get(n) for n in names]
    records = [_status(b).get("shutdown") or {} for b in bodies]
    attempts = [a for r in records for a in r.get("recentAttempts") or [] if parse_time(a["time"]).timestamp() >= since]
    results["in_flight"] |= {
        "agent_calls_in_flight_at_deadlines": [_agent_calls_in_flight(bodies, d, agent_timeout) for d in deadlines],
        "hung_requests": sum(r.get("attempts", 0) for r in records),
        "hung_requests_agent_timed_out": sum(1 for a in attempts if _agent_timed_out(a)),
        "hung_requests_agent_skipped": sum(1 for a in attempts if a.get("message", "").startswith(_NOT_CONNECTED)),
        "hung_still_running": sum(1 for b in bodies if _status(b).get("powerState") == "ShuttingDown"),
        "hung_attempt_message": attempts[0].get("message") if attempts else None,
    }
    print(f"  neighbour force, {hung} hung-agent stops in flight: {results['in_flight']}", flush=True)
    return results


def agent_costs(bed: Bed, hung: int, neighbours: int, neighbour_grace: int) -> dict[str, Any]:
    namespace = bed.namespace("bench-agent")
    node = f"node-{namespace}"
    operator = bed.operator(node)
    agent_timeout = operator_agent_timeout()
    calls: list[_Call] = []
    results: dict[str, Any] = {"agent_timeout": agent_timeout, "call_cap": CALL_CAP_SECONDS}
    neighbour: dict[str, Any] = {
        "hung_guests": hung,
        "grace": neighbour_grace,
        "spacing": _SPACING,
        "agent_timeout": agent_timeout,
    }
    try:
        # The neighbours' reference, before any hung agent exists.
        neighbour["none"], _ = _neighbours(
            bed, namespace, node, "none", count=neighbours, grace=neighbour_grace, spacing=_SPACING
        )
        print(f"  neighbour force, no hung agents: {neighbour['none']}", flush=True)
        # For reference, libvirt's default call on an agent that takes guest-shutdown and ignores it: libvirt
        # holds it for a fixed 60 s, so it is made as soon as its guest is up, and runs while the other guests
        # boot and figures 1 and 2 are taken (each on a guest and a connection of its own); no neighbour round
        # runs beside it.
        _boot_agent_guests(bed, namespace, node, {"ignore-default": {"agent": "ignore", "restart_policy": "Never"}})
        ignore = start_call(bed, namespace, "ignore-default", flags=libvirt.VIR_DOMAIN_SHUTDOWN_DEFAULT, calls=calls)
        # vmop-hung is stopped through vmop; the other two are left to the bench's own libvirt calls and stay
        # off once they power off (restartPolicy Never): vmop never asks them anything. The hung-* guests
        # are figure 3's.
        hung_names = [f"hung-{i:02d}" for i in range(hung)]
        hung_policy: dict[str, Any] = {
            "methods": AGENT_FIRST,
            "gracePeriodSeconds": _HUNG_GRACE,
            "retryIntervalSeconds": 1,
        }
        guests: dict[str, dict[str, Any]] = {
            "vmop-hung": {"agent": "hung", "shutdown_policy": {"methods": AGENT_FIRST}},
            "default-hung": {"agent": "hung", "restart_policy": "Never"},
            "acpi-hung": {"agent": "hung", "restart_policy": "Never"},
        }
        guests |= {n: {"agent": "hung", "ignore_presses": 1000, "shutdown_policy": hung_policy} for n in hung_names}
        _boot_agent_guests(bed, namespace, node, guests)
        time.sleep(SETTLE_SECONDS)
        results["vmop"] = vmop_stop(bed, namespace, "vmop-hung", agent_timeout)
        for label, name, flags in (
            ("libvirt_default", "default-hung", libvirt.VIR_DOMAIN_SHUTDOWN_DEFAULT),
            ("libvirt_acpi", "acpi-hung", libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN),
        ):
            call = start_call(bed, namespace, name, flags=flags, calls=calls)
            results[label] = call_result(bed, call, cap=CALL_CAP_SECONDS)
        results["libvirt_default_ignore"] = call_result(bed, ignore, cap=CALL_CAP_SECONDS)
        time.sleep(SETTLE_SECONDS)
        results["neighbour"] = neighbour | neighbour_force(
            bed, namespace, node, names=hung_names, count=neighbours, grace=neighbour_grace
        )
        return results
    finally:
        operator.stop()
        end_section(bed, namespace)
        for call in calls:
            call.close()
