"""Benchmark `maintenance`: a node's VMs stopped in priority order by a NoExecute taint, and started again.

One operator, one node, G priority groups of N VMs each (some cooperative Linux guests, the rest
firmware-only guests that ignore ACPI, so every group has a stubborn guest and waits out its grace period).
The bench taints the node (`vmop.dev/maintenance=:NoExecute`, what `kubectl taint` writes, sent as a
patch of the Node's taints by the bench's own client so that no kubectl start-up is counted) and measures,
from the moment it sent the patch:

* when every VM was off (the largest status.shutdown.completedAt, and the libvirt listener's last STOPPED);
* per group, its span (first requestedAt to last completedAt), its outcomes, and the gap between a group's
  last completedAt and the next group's first requestedAt (the planner's hand-over);
* the total against the sum of the groups' grace periods, which is the least it can be when each group
  has a stubborn guest;
* the order: a group's first request before the previous group's last stop is a violation.

Then it removes the taint and measures the way back: from the untaint to every VM `Running` (the watch),
per group (highest first) the first status.startedAt to the last start libvirt reported (the bed's
lifecycle listener), the gaps between groups, and the order. The Node's Events and the
operator's `vmop_virtual_machines_held_by_taint` gauge are read too.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import kubernetes

from bench.bed import Bed, parallel
from bench.shutdown import SETTLE_SECONDS, domain_name, end_section, start_vms
from bench.stats import summary
from testbed.vmop import condition, parse_time
from testbed.wait import wait_until

TAINT_KEY = "vmop.dev/maintenance"
TAINT_NAME = f"{TAINT_KEY}:NoExecute"
PRIORITY_STEP = 10


def _ts(value: str | None) -> float | None:
    return parse_time(value).timestamp() if value else None


def _r(value: float | None, digits: int = 3) -> float | None:
    return round(value, digits) if value is not None else None


def _taints(bed: Bed, node: str) -> list[Any]:
    spec = kubernetes.client.CoreV1Api(bed.api).read_node(node).spec
    return list(spec.taints or []) if spec is not None else []


def _set_taint(bed: Bed, node: str, present: bool) -> float:
    """Add or remove the maintenance taint, keeping the Node's other taints; returns when the patch was sent.
    The Node's taints have no merge key, so the patch carries the whole list, as kubectl's does."""
    core = kubernetes.client.CoreV1Api(bed.api)
    taints = [
        {"key": t.key, "value": t.value, "effect": t.effect, "timeAdded": t.time_added}
        for t in _taints(bed, node)
        if t.key != TAINT_KEY
    ]
    if present:
        taints.append({"key": TAINT_KEY, "effect": "NoExecute"})
    sent = time.time()
    core.patch_node(node, {"spec": {"taints": taints or None}})
    return sent


def _node_events(bed: Bed, node: str, since: float) -> list[dict[str, Any]]:
    """The Node's Events (in "default", where Events of cluster-scoped objects go) from `since` on."""
    core = kubernetes.client.CoreV1Api(bed.api)
    found = core.list_namespaced_event(
        "default", field_selector=f"involvedObject.kind=Node,involvedObject.name={node}"
    ).items
    events = []
    for event in found:
        when = event.event_time or event.first_timestamp or event.metadata.creation_timestamp
        at = when.timestamp() if when is not None else None
        if at is not None and at >= since - 1:
            events.append({"at": at, "reason": event.reason, "type": event.type, "message": event.message})
    return sorted(events, key=lambda e: (e["at"], e["reason"]))


def _wait_node_event(bed: Bed, node: str, since: float, reason: str, timeout: float) -> None:
    wait_until(
        lambda: any(e["reason"] == reason for e in _node_events(bed, node, since)),
        timeout=timeout,
        message=f"no {reason} Event on Node {node}",
        interval=0.5,
    )


def _bodies(bed: Bed, namespace: str, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    vms = bed.vms(namespace)
    return dict(zip(names, parallel(lambda n: vms.get(n) or {}, names), strict=True))


def _active_domains(bed: Bed, prefix: str) -> int:
    conn = bed.libvirt.connect()
    try:
        return sum(1 for d in conn.listAllDomains() if d.name().startswith(prefix) and d.isActive())
    finally:
        conn.close()


def _stopping(
    bed: Bed, namespace: str, groups: list[list[str]], *, grace: int, since: float, held_seconds: float
) -> dict[str, Any]:
    """After the taint: wait until every VM is off and reported, then read the order from the statuses."""
    names = [n for group in groups for n in group]
    domains = {n: domain_name(namespace, n) for n in names}
    stops = bed.listener.wait_stopped(domains.values(), since, len(groups) * (grace + 60))

    def reported() -> dict[str, dict[str, Any]] | None:
        bodies = _bodies(bed, namespace, names)
        done = all(((b.get("status") or {}).get("shutdown") or {}).get("completedAt") for b in bodies.values())
        return bodies if done else None

    bodies = wait_until(reported, timeout=30, message="not every VM reported its stop", interval=0.5)
    per_group: list[dict[str, Any]] = []
    previous_last: float | None = None
    violations = 0
    for g, group in enumerate(groups):
        records = [(bodies[n].get("status") or {}).get("shutdown") or {} for n in group]
        requested = [t for r in records if (t := _ts(r.get("requestedAt"))) is not None]
        completed = [t for r in records if (t := _ts(r.get("completedAt"))) is not None]
        seen = [stops[domains[n]] for n in group if domains[n] in stops]
        # Forced stops against their own deadline (the listener's STOPPED time), as in `deadline`.
        overshoots = [
            stops[domains[n]] - deadline
            for n, r in zip(group, records, strict=True)
            if r.get("outcome") == "Forced" and domains[n] in stops and (deadline := _ts(r.get("deadline"))) is not None
        ]
        first, last = min(requested), max(completed)
        if previous_last is not None:
            violations += sum(1 for t in requested if t < previous_last)
        per_group.append(
            {
                "priority": PRIORITY_STEP * g,
                "vms": len(group),
                "first_requested_after_taint": _r(first - since),
                "last_completed_after_taint": _r(last - since),
                "span": _r(last - first),
                "span_minus_grace": _r(last - first - grace),
                "request_spread": _r(max(requested) - first),
                "forced_overshoot": summary(overshoots) if overshoots else None,
                "stopped_libvirt_to_completed_at": _r(last - max(seen)) if seen else None,
                "gap_from_previous_group": _r(first - previous_last) if previous_last is not None else None,
                "last_stopped_libvirt_after_taint": _r(max(seen) - since) if seen else None,
                "outcomes": dict(Counter(str(r.get("outcome")) for r in records)),
                "purposes": dict(Counter(str(r.get("purpose")) for r in records)),
                "taints": dict(Counter(str(r.get("taint")) for r in records)),
            }
        )
        previous_last = last
    total = max(g["last_completed_after_taint"] for g in per_group)
    sum_grace = grace * len(groups)
    # Held off: every VM stays off while the taint stays, whatever its powerState (Running) says.
    time.sleep(held_seconds)
    after = _bodies(bed, namespace, names)
    held_ready = Counter(str((condition(b, "Ready") or {}).get("reason")) for b in after.values())
    return {
        "total": total,
        "total_libvirt": _r(max(stops.values()) - since) if stops else None,
        "left_running": len(names) - len(stops),
        "sum_of_grace": sum_grace,
        "total_minus_sum_of_grace": _r(total - sum_grace),
        "order_violations": violations,
        "gaps": [g["gap_from_previous_group"] for g in per_group[1:]],
        "groups": per_group,
        "held_seconds": held_seconds,
        "running_while_held": _active_domains(bed, f"{namespace}_"),
        "held_by_taint": sum(1 for b in after.values() if (b.get("status") or {}).get("heldByTaint") == TAINT_NAME),
        "ready_reasons_while_held": dict(held_ready),
    }


def _starting(
    bed: Bed, namespace: str, groups: list[list[str]], *, since: float, seen: dict[str, float]
) -> dict[str, Any]:
    """After the untaint: the order of the starts, highest priority first, from statuses and libvirt."""
    names = [n for group in groups for n in group]
    bodies = _bodies(bed, namespace, names)
    per_group: list[dict[str, Any]] = []
    previous_last: float | None = None
    violations = 0
    for g in reversed(range(len(groups))):
        group = groups[g]
        decided = [t for n in group if (t := _ts((bodies[n].get("status") or {}).get("startedAt"))) is not None]
        libvirt_starts = [
            t for n in group if (t := bed.listener.started_after(domain_name(namespace, n), since)) is not None
        ]
        running = [seen[n] for n in group if n in seen]
        first = min(decided)
        # A group is running once libvirt has started its last VM (the watch's Running comes after the
        # operator's next look, so a next group may well be decided before that arrives).
        last = max(libvirt_starts) if libvirt_starts else max(running)
        if previous_last is not None:
            violations += sum(1 for t in decided if t < previous_last)
        per_group.append(
            {
                "priority": PRIORITY_STEP * g,
                "vms": len(group),
                "first_start_after_untaint": _r(first - since),
                "last_started_libvirt_after_untaint": _r(max(libvirt_starts) - since) if libvirt_starts else None,
                "last_running_seen_after_untaint": _r(max(running) - since) if running else None,
                "span": _r(last - first),
                "start_spread": _r(max(decided) - first),
                "gap_from_previous_group": _r(first - previous_last) if previous_last is not None else None,
            }
        )
        previous_last = last
    return {
        "total": _r(max(seen.values()) - since) if seen else None,
        "not_running": len(names) - len(seen),
        "order_violations": violations,
        "gaps": [g["gap_from_previous_group"] for g in per_group[1:]],
        "groups": per_group,
        "held_by_taint_left": sum(1 for b in bodies.values() if (b.get("status") or {}).get("heldByTaint")),
    }


def node_maintenance(bed: Bed, group_count: int, per_group: int, coop_per_group: int, grace: int) -> dict[str, Any]:
    namespace = bed.namespace("bench-maint")
    node = f"node-{namespace}"
    operator = bed.operator(node)
    kinds = [
        {f"p{PRIORITY_STEP * g:02d}-coop-{i:02d}": "coop" for i in range(coop_per_group)}
        | {f"p{PRIORITY_STEP * g:02d}-fw-{i:02d}": "firmware" for i in range(per_group - coop_per_group)}
        for g in range(group_count)
    ]
    groups = [list(k) for k in kinds]
    names = [n for group in groups for n in group]
    tainted = False
    result: dict[str, Any] = {
        "groups": group_count,
        "per_group": per_group,
        "coop_per_group": coop_per_group,
        "stubborn_per_group": per_group - coop_per_group,
        "grace": grace,
        "retry_interval": 1,
        "taint": TAINT_NAME,
    }
    try:
        # Firmware guests all at once, then the cooperative ones, each once acpid listens.
        start_vms(
            bed,
            namespace,
            node=node,
            kinds={name: kind for group in kinds for name, kind in group.items()},
            policy={"gracePeriodSeconds": grace, "retryIntervalSeconds": 1},
            watch_timeout=60 + 2 * len(names),
            priorities={name: PRIORITY_STEP * g for g, group in enumerate(groups) for name in group},
        )
        time.sleep(SETTLE_SECONDS)

        # ---- taint: every VM stops, lowest priority group first
        tainted = True
        since = _set_taint(bed, node, present=True)
        added = next((t.time_added for t in _taints(bed, node) if t.key == TAINT_KEY), None)
        result["time_added"] = added.isoformat() if added is not None else None
        stop = _stopping(bed, namespace, groups, grace=grace, since=since, held_seconds=3.0)
        _wait_node_event(bed, node, since, "MaintenanceComplete", timeout=30)
        stop["held_by_taint_gauge"] = operator.metric("vmop_virtual_machines_held_by_taint")
        result["stop"] = stop
        print(f"  maintenance stop: {stop}", flush=True)

        # ---- untaint: every VM starts again, highest priority group first
        vm_watch = bed.watch(namespace)
        try:
            back = _set_taint(bed, node, present=False)
            tainted = False
            vm_watch.wait_all(names, "Running", timeout=60 + 10 * group_count)
            seen = {n: t for n in names if (t := vm_watch.first(n, "Running", back)) is not None}
        finally:
            vm_watch.stop()
        wait_until(
            lambda: (
                not any((b.get("status") or {}).get("heldByTaint") for b in _bodies(bed, namespace, names).values())
            ),
            timeout=30,
            message="heldByTaint was not cleared on every VM",
            interval=0.5,
        )
        _wait_node_event(bed, node, back, "MaintenanceEnded", timeout=30)
        start = _starting(bed, namespace, groups, since=back, seen=seen)
        start["held_by_taint_gauge"] = operator.metric("vmop_virtual_machines_held_by_taint")
        result["start"] = start
        print(f"  maintenance start: {start}", flush=True)
        result["node_events"] = [{**e, "at": _r(e["at"] - since)} for e in _node_events(bed, node, since)]
        return result
    finally:
        if tainted:
            with contextlib.suppress(kubernetes.client.ApiException):
                _set_taint(bed, node, present=False)
        operator.stop()
        end_section(bed, namespace)
