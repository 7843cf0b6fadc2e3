"""Benchmarks 1-3 on real QEMU guests: deadline precision, graceful detection, parallel shutdown through vmop.

Times come from the bench's own observers (bed.LifecycleListener for "libvirt says it stopped", bed.VmWatch
for "the API says Stopped"), and deadlines from each VM's status, as a user would read them.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from bench.bed import Bed, parallel
from bench.stats import summary
from testbed.vmop import parse_time, vm_manifest

# Guest QEMU processes starting up compete with the operator for the 2 cores; a stop measured while
# they still boot would measure the boot.
SETTLE_SECONDS = 2.0


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
    policy: dict[str, Any],
    watch_timeout: float,
    coop_batch: int = 3,
    priorities: dict[str, int] | None = None,
) -> None:
    """Create the VMs through vmop and wait until each runs; cooperative guests boot a few at a time (each
    boot costs ~5 CPU-seconds under TCG) and count only once acpid listens, or the first ACPI press is lost."""
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
                )
            )

        firmware = [n for n, k in kinds.items() if k != "coop"]
        parallel(create, firmware)
        vm_watch.wait_all(firmware, "Running", timeout=watch_timeout)
        for batch in chunks([n for n, k in kinds.items() if k == "coop"], coop_batch):
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


def deadline_overshoot(bed: Bed, sizes: Sequence[int], grace: int, retry: int) -> dict[str, Any]:
    """N firmware-only guests (they ignore ACPI) stopped at once: when did each stop against its deadline?"""
    namespace = bed.namespace("bench-deadline")
    node = f"node-{namespace}"
    operator = bed.operator(node)
    policy = {"gracePeriodSeconds": grace, "retryIntervalSeconds": retry}
    vms = bed.vms(namespace)
    results: dict[str, Any] = {}
    try:
        for n in sizes:
            names = [f"fw{n}-{i:02d}" for i in range(n)]
            start_vms(
                bed,
                namespace,
                node=node,
                kinds=dict.fromkeys(names, "firmware"),
                policy=policy,
                watch_timeout=60 + 2 * n,
            )
            time.sleep(SETTLE_SECONDS)
            vm_watch = bed.watch(namespace)
            since = _stop_all(bed, namespace, names)
            stops = bed.listener.wait_stopped([domain_name(namespace, x) for x in names], since, grace + 30)
            try:
                vm_watch.wait_all([x for x in names if domain_name(namespace, x) in stops], "Stopped", timeout=30)
            finally:
                vm_watch.stop()
            overshoots, operator_share, libvirt_share = [], [], []
            for name in names:
                domain = domain_name(namespace, name)
                stopped = stops.get(domain)
                body = vms.get(name) or {}
                deadline = ((body.get("status") or {}).get("shutdown") or {}).get("deadline")
                if stopped is None or not deadline:
                    continue
                at = parse_time(deadline).timestamp()
                overshoots.append(stopped - at)
                sigterm = sigterm_time(bed, domain, since)
                if sigterm is not None:
                    operator_share.append(sigterm - at)
                    libvirt_share.append(stopped - sigterm)
            results[str(n)] = {
                **summary(overshoots),
                "forced_before_deadline": sum(1 for o in overshoots if o < 0),
                "n": n,
                "measured": len(overshoots),
                "min": round(min(overshoots), 4) if overshoots else None,
                "deadline_to_sigterm": summary(operator_share),
                "sigterm_to_stopped": summary(libvirt_share),
            }
            print(f"  deadline N={n}: {results[str(n)]}", flush=True)
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
            coop_batch=4,
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
