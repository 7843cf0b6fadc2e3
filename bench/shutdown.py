"""Benchmarks 1-3 on real QEMU guests: deadline precision, graceful detection, parallel shutdown through vmop.

Times come from the bench's own observers (bed.LifecycleListener for "libvirt says it stopped", bed.VmWatch
for "the API says Stopped"), and deadlines from each VM's status, as a user would read them.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import libvirt

from bench.bed import Bed, MachineCpu, parallel
from bench.stats import percentile, summary
from testbed.libvirthost import DaemonLimits
from testbed.vmop import OperatorProcess, parse_time, vm_manifest

# Guest QEMU processes starting up compete with the operator for the 2 cores; a stop measured while
# they still boot would measure the boot.
SETTLE_SECONDS = 2.0

COOP_BATCH = 10
"""Cooperative guests booted at a time. Each boot costs ~5 CPU-seconds under TCG whatever the batch, and
smaller batches only add each batch's idle tail (batches of 5 made the unasked section 120 s instead of
87 s); 10 at once boot well within the readiness timeout on 2 busy cores."""


def domain_name(namespace: str, name: str) -> str:
    return f"{namespace}_{name}"


_SIGTERM = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z qemu-system-\S+: terminating on signal 15", re.M)


def sigterm_time(bed: Bed, domain: str, since: float) -> float | None:
    """When QEMU got the SIGTERM of libvirt's destroy, from its own log (libvirt runs it with -msg
    timestamp=on). It splits an overshoot into the operator's share (deadline to SIGTERM) and libvirt's
    (SIGTERM to STOPPED: libvirt polls for the process to go in 200 ms steps)."""
    try:
        text = (bed.libvirt.qemu_log_dir / f"{domain}.log").read_text(errors="replace")
    except OSError:
        return None
    times = [datetime.fromisoformat(m + "+00:00").timestamp() for m in _SIGTERM.findall(text)]
    return next((t for t in times if t >= since), None)


def chunks(items: Sequence[str], size: int) -> list[Sequence[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def start_vms(
    bed: Bed,
    namespace: str,
    *,
    node: str,
    kinds: dict[str, str],
    policy: dict[str, Any] | None,
    watch_timeout: float,
    priorities: dict[str, int] | None = None,
    **manifest: Any,
) -> None:
    """Create the VMs through vmop and wait until each runs; cooperative guests boot COOP_BATCH at a time
    and count only once acpid listens, or the first ACPI press is lost.
    manifest: more of vm_manifest's arguments, the same for every VM."""
    vms = bed.vms(namespace)
    vm_watch = bed.watch(namespace)
    try:

        def create(name: str) -> None:
            vms.create(
                vm_manifest(
                    name,
                    node_name=node,
                    libvirt=bed.libvirt,
                    kind=kinds[name],
                    shutdown_policy=policy,
                    priority=(priorities or {}).get(name),
                    **manifest,
                )
            )

        firmware = [n for n, k in kinds.items() if k != "coop"]
        parallel(create, firmware)
        vm_watch.wait_all(firmware, "Running", timeout=watch_timeout)
        for batch in chunks([n for n, k in kinds.items() if k == "coop"], COOP_BATCH):
            parallel(create, batch)
            vm_watch.wait_all(batch, "Running", timeout=watch_timeout)
            for name in batch:
                bed.libvirt.wait_guest_ready(domain_name(namespace, name), timeout=120)
    finally:
        vm_watch.stop()


def _stop_all(bed: Bed, namespace: str, names: Sequence[str]) -> float:
    """Set every VM to Stopped at (nearly) the same instant; returns when the first patch was sent."""
    vms = bed.vms(namespace)
    since = time.time()
    parallel(lambda name: vms.patch_spec(name, powerState="Stopped"), names, threads=max(1, min(32, len(names))))
    return since


def end_section(bed: Bed, namespace: str) -> None:
    bed.purge(namespace)
    bed.remove_domains(f"{namespace}_")


def forced_summary(n: int, samples: Sequence[tuple[float, float]], grace: float | None, **extra: Any) -> dict[str, Any]:
    """One N's forced stops: (SIGTERM, STOPPED) per VM, seconds relative to its deadline.

    SIGTERM is the headline: libvirt reports STOPPED only at its next 200 ms poll after the signal, so a
    SIGTERM sent up to 200 ms early would hide behind a STOPPED after the deadline.
    """
    sigterms = [s for s, _ in samples]
    stops = [t for _, t in samples]
    return {
        "n": n,
        "measured": len(samples),
        "early_sigterm": sum(1 for s in sigterms if s < 0),
        "early_stopped": sum(1 for t in stops if t < 0),
        "sigterm": summary(sigterms),
        "stopped": summary(stops),
        "overshoot_pct_of_grace": {
            "p99": round(percentile(stops, 99) / grace * 100, 2) if stops and grace else None,
            "max": round(max(stops) / grace * 100, 2) if stops and grace else None,
        },
        **extra,
        "samples": [{"sigterm": round(s, 4), "stopped": round(t, 4)} for s, t in samples],
    }


def destroys_sent(operator: OperatorProcess) -> dict[str, tuple[float, float]]:
    """Per domain UUID (the VM's uid), from the operator's log ("destroy sent ..."), on its own clock: how
    late after its deadline it sent its armed destroy (the operator's share of a force's overshoot; the
    rest, to QEMU's SIGTERM, is libvirtd's and the machine's), and how long before the deadline the destroy
    was ready to send (armed, connected, the domain looked up)."""
    return {
        r["domain"]: (float(r["late"]), float(r["ahead"]))
        for r in operator.log_records()
        if str(r.get("message", "")).startswith("destroy sent") and "late" in r and "ahead" in r
    }


def vmop_force_round(
    bed: Bed, operator: OperatorProcess, namespace: str, node: str, n: int, *, grace: int, retry: int
) -> dict[str, Any]:
    """N firmware-only guests (they ignore ACPI) created through vmop and set to Stopped at once: when did
    each get its SIGTERM (QEMU's log) and stop (the listener) against the deadline in its status, and when
    did the operator send the destroy (its log)?"""
    names = [f"fw{n}-{i:03d}" for i in range(n)]
    start_vms(
        bed,
        namespace,
        node=node,
        kinds=dict.fromkeys(names, "firmware"),
        policy={"gracePeriodSeconds": grace, "retryIntervalSeconds": retry},
        watch_timeout=60 + 2 * n,
    )
    # No settling here: what is measured comes a whole grace period after the stop, long after the last
    # firmware guest's start (SETTLE_SECONDS is for figures taken at the stop itself).
    vms = bed.vms(namespace)
    vm_watch = bed.watch(namespace)
    with MachineCpu() as cpu:
        since = _stop_all(bed, namespace, names)
        stops = bed.listener.wait_stopped([domain_name(namespace, x) for x in names], since, grace + 30)
        try:
            vm_watch.wait_all([x for x in names if domain_name(namespace, x) in stops], "Stopped", timeout=60)
        finally:
            vm_watch.stop()
    sent = destroys_sent(operator)
    samples, attempts, outcomes, deadlines, sigterms, sent_late, sent_to_sigterm, ready = [], [], [], [], [], [], [], []
    for name in names:
        domain = domain_name(namespace, name)
        body = vms.get(name) or {}
        shutdown = (body.get("status") or {}).get("shutdown") or {}
        stopped = stops.get(domain)
        sigterm = sigterm_time(bed, domain, since)
        if not shutdown.get("deadline") or stopped is None or sigterm is None:
            continue
        deadline = parse_time(shutdown["deadline"]).timestamp()
        deadlines.append(deadline)
        sigterms.append(sigterm)
        samples.append((sigterm - deadline, stopped - deadline))
        attempts.append(int(shutdown.get("attempts") or 0))
        outcomes.append(shutdown.get("outcome"))
        if (destroy := sent.get(body["metadata"]["uid"])) is not None:
            late, ahead = destroy
            sent_late.append(late)
            sent_to_sigterm.append(sigterm - deadline - late)
            ready.append(ahead)
    result = forced_summary(
        n,
        samples,
        grace,
        requests_sent=sum(attempts),
        forced=sum(1 for o in outcomes if o == "Forced"),
        deadlines_spread=round(max(deadlines) - min(deadlines), 4) if deadlines else None,
        destroy_sent=summary(sent_late),
        destroy_sent_to_sigterm=summary(sent_to_sigterm),
        destroy_ready_ahead={"min": round(min(ready), 4) if ready else None, "p50": round(percentile(ready, 50), 4)},
        # forced without being armed ahead (decided only at or after the deadline): none in the log
        destroy_not_armed=len(samples) - len(sent_late),
        # what the forces competed with: the machine's cores from the first deadline to the last SIGTERM
        machine_cpu_while_due=cpu.share(min(deadlines), max(sigterms)) if deadlines else None,
    )
    print(f"  vmop N={n}: { {k: v for k, v in result.items() if k != 'samples'} }", flush=True)
    return result


def libvirt_alone(bed: Bed, n: int, label: str) -> dict[str, Any]:
    """The floor under any operator: n guests defined straight on libvirt and destroyed (gracefully, as vmop
    does) at one instant, each from its own thread and connection, by the bench itself. The "deadline" is
    that instant: what comes after it is libvirt's and the machine's."""
    names = [f"bench-alone-{label}-{i:03d}" for i in range(n)]
    conns: list[libvirt.virConnect] = []
    try:
        parallel(lambda name: bed.libvirt.create_guest(name, "firmware"), names, threads=8)
        time.sleep(SETTLE_SECONDS)
        conns = [libvirt.open(bed.libvirt.uri) for _ in names]
        domains = [conn.lookupByName(name) for conn, name in zip(conns, names, strict=True)]
        instant = time.time() + 1.0

        def destroy(domain: libvirt.virDomain) -> None:
            time.sleep(max(0.0, instant - time.time()))
            domain.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)

        parallel(destroy, domains, threads=n)
        stops = bed.listener.wait_stopped(names, instant - 1, 30)
        samples = [
            (sigterm - instant, stops[name] - instant)
            for name in names
            if name in stops and (sigterm := sigterm_time(bed, name, instant - 1)) is not None
        ]
        result = forced_summary(n, samples, None)
        print(f"  libvirt alone, {n} destroys at once: { {k: v for k, v in result.items() if k != 'samples'} }")
        return result
    finally:
        for conn in conns:
            conn.close()
        bed.remove_domains(f"bench-alone-{label}-")


def deadline_overshoot(
    bed: Bed,
    sizes: Sequence[int],
    *,
    grace: int,
    retry: int,
    limits: Sequence[tuple[str, DaemonLimits]],
    alone: int,
) -> dict[str, Any]:
    """For each libvirtd configuration (the daemon restarted with it), `alone` destroys at one instant without
    vmop (libvirt_alone), then N stubborn guests stopped through vmop, for each N."""
    results: dict[str, Any] = {}
    for label, daemon_limits in limits:
        bed.restart_libvirtd(daemon_limits)
        namespace = bed.namespace(f"bench-deadline-{label}")
        node = f"node-{namespace}"
        operator = bed.operator(node)
        results[label] = {
            "libvirtd": dataclasses.asdict(daemon_limits),
            "libvirt_alone": libvirt_alone(bed, alone, label),
        }
        try:
            for n in sizes:
                print(f"  libvirtd {label} {daemon_limits}:", flush=True)
                results[label][str(n)] = vmop_force_round(bed, operator, namespace, node, n, grace=grace, retry=retry)
        finally:
            operator.stop()
            end_section(bed, namespace)
    return results


def graceful_detection(bed: Bed, count: int) -> dict[str, Any]:
    """Cooperative guests stopped at once: from libvirt's STOPPED event to status.powerState=Stopped in the API."""
    namespace = bed.namespace("bench-graceful")
    node = f"node-{namespace}"
    operator = bed.operator(node)
    names = [f"coop-{i:02d}" for i in range(count)]
    try:
        start_vms(
            bed,
            namespace,
            node=node,
            kinds=dict.fromkeys(names, "coop"),
            policy={"gracePeriodSeconds": 60, "retryIntervalSeconds": 5},
            watch_timeout=120,
        )
        time.sleep(SETTLE_SECONDS)
        vm_watch = bed.watch(namespace)
        since = _stop_all(bed, namespace, names)
        stops = bed.listener.wait_stopped([domain_name(namespace, n) for n in names], since, 60)
        try:
            vm_watch.wait_all([x for x in names if domain_name(namespace, x) in stops], "Stopped", timeout=30)
            latencies, operator_share, api_share = [], [], []
            for name in names:
                stopped = stops.get(domain_name(namespace, name))
                seen = vm_watch.first(name, "Stopped", since)
                if stopped is None or seen is None:
                    continue
                latencies.append(seen - stopped)
                # the write that made it Stopped is the operator's last status write before the watch saw it
                writes = bed.audit.status_writes(namespace, name, stopped - 0.05, seen)
                if writes:
                    operator_share.append(writes[-1] - stopped)
                    api_share.append(seen - writes[-1])
        finally:
            vm_watch.stop()
        outcomes = [
            ((bed.vms(namespace).get(n) or {}).get("status") or {}).get("shutdown", {}).get("outcome") for n in names
        ]
        result = {
            **summary(latencies),
            "n": count,
            "measured": len(latencies),
            "graceful_outcomes": sum(1 for o in outcomes if o == "Graceful"),
            "event_to_status_write": summary(operator_share),
            "status_write_to_watch": summary(api_share),
            "stop_request_to_event": summary([stops[d] - since for d in stops]),
        }
        print(f"  graceful detection: {result}", flush=True)
        return result
    finally:
        operator.stop()
        end_section(bed, namespace)


def parallel_vmop(bed: Bed, coop: int, stubborn: int, grace: int) -> dict[str, Any]:
    """A mixed set stopped at once through vmop with grace G: total wall time until every guest is off."""
    namespace = bed.namespace("bench-parallel")
    node = f"node-{namespace}"
    operator = bed.operator(node)
    kinds = {f"coop-{i:02d}": "coop" for i in range(coop)} | {f"fw-{i:02d}": "firmware" for i in range(stubborn)}
    names = list(kinds)
    try:
        start_vms(
            bed,
            namespace,
            node=node,
            kinds=kinds,
            policy={"gracePeriodSeconds": grace, "retryIntervalSeconds": 1},
            watch_timeout=120,
        )
        time.sleep(SETTLE_SECONDS)
        since = _stop_all(bed, namespace, names)
        stops = bed.listener.wait_stopped([domain_name(namespace, n) for n in names], since, grace + 60)
        result = {
            "total": round(max(stops.values()) - since, 3) if stops else None,
            "left_running": len(names) - len(stops),
        }
        print(f"  parallel via vmop: {result}", flush=True)
        return result
    finally:
        operator.stop()
        end_section(bed, namespace)
