"""Benchmarks 4 and 5 on libvirt's test:///default driver: reconcile throughput, scale, foreign VMs, idle cost.

The test driver lives inside the operator process (each process has its own in-memory hypervisor), so a
thousand domains cost nothing but the operator's own work, which is what these figures are about.
"""

from __future__ import annotations

import re
import time
from typing import Any

from bench.bed import Bed, VmWatch, cpu_seconds, parallel, peak_rss_mib, rss_mib
from testbed.vmop import OperatorProcess, vm_manifest
from testbed.wait import wait_until

# The test driver's node has 3 GiB, and its built-in domain "test" runs with 8 GiB: without a ceiling of its
# own, the node's memory check (issue 10) would refuse every start. A thousand 16 MiB VMs need 16 GiB.
TEST_DRIVER = ("--libvirt-uri", "test:///default", "--virt-type", "test", "--memory-ceiling-mib", "1000000")
_FIRMWARE_ONLY = {"memoryMiB": 16}
"""No kernel, initrd or disk: nothing for the storage allow-list to refuse on a host without those files."""


def connected(operator: OperatorProcess) -> bool:
    return operator.metric("vmop_libvirt_connected") == 1


def start_test_driver_operator(bed: Bed, node: str) -> OperatorProcess:
    """The operator on libvirt's in-process test driver, once it is connected."""
    operator = bed.operator(node, *TEST_DRIVER)
    wait_until(lambda: connected(operator), timeout=10, message=lambda: f"not connected:\n{operator.log_tail()}")
    return operator


def _manifest(bed: Bed, name: str, node: str) -> dict[str, Any]:
    return vm_manifest(name, node_name=node, libvirt=bed.libvirt, domain=_FIRMWARE_ONLY)


def _create(bed: Bed, namespace: str, names: list[str], node: str) -> float:
    """Create as fast as the API takes them (16 threads); returns when the first create was sent."""
    vms = bed.vms(namespace)
    manifests = {name: _manifest(bed, name, node) for name in names}
    started = time.time()
    parallel(lambda name: vms.create(manifests[name]), names)
    return started


def _converged(vm_watch: VmWatch, namespace: str, names: list[str], since: float, timeout: float) -> float:
    """Seconds from `since` until the last of the VMs read Running in the watch."""
    keys = [f"{namespace}/{n}" for n in names]
    vm_watch.wait_all(keys, "Running", timeout=timeout)
    arrivals = [vm_watch.first(k, "Running", since) for k in keys]
    return max(t for t in arrivals if t is not None) - since


def wait_quiet(bed: Bed, quiet: float = 3.0, timeout: float = 120.0) -> None:
    """Until the operator has made no API request for `quiet` seconds: trailing Events and status writes
    belong to the work just measured."""
    log = bed.audit.path
    end = time.monotonic() + timeout
    last_size, last_change = -1, time.monotonic()
    while time.monotonic() < end:
        size = log.stat().st_size if log.exists() else 0
        if size != last_size:
            last_size, last_change = size, time.monotonic()
        elif time.monotonic() - last_change >= quiet:
            return
        time.sleep(0.2)


def wait_cpu_quiet(pid: int, quiet: float = 2.0, timeout: float = 60.0) -> None:
    """Until the process has used under 2% of a core for `quiet` seconds: events it was still digesting."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        before = cpu_seconds(pid)
        time.sleep(quiet)
        if cpu_seconds(pid) - before < 0.02 * quiet:
            return


def own_vms_tracked(operator: OperatorProcess) -> int:
    """The operator's own count of VMs it holds (its vmop_virtual_machines gauge, summed over states)."""
    return int(sum(float(v) for v in re.findall(r"^vmop_virtual_machines\{[^}]*\} (\S+)$", operator.metrics(), re.M)))


def _requests(bed: Bed, start: float, end: float) -> tuple[int, dict[str, int]]:
    counts = bed.audit.operator_requests(start, end)
    return sum(counts.values()), dict(sorted(counts.items()))


def idle(bed: Bed, count: int, baseline_own: int, seconds: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """An operator with `count` steady VMs, watched for `seconds`; on the way, its RSS with only
    `baseline_own` VMs in an otherwise empty cluster (the reference for the foreign-VM case)."""
    namespace = bed.namespace("bench-idle")
    node = f"node-{namespace}"
    vm_watch = bed.watch(namespace)
    operator = start_test_driver_operator(bed, node)
    names = [f"idle-{i:04d}" for i in range(count)]
    try:
        since = _create(bed, namespace, names[:baseline_own], node)
        _converged(vm_watch, namespace, names[:baseline_own], since, timeout=60)
        wait_quiet(bed)
        baseline = {
            "own": baseline_own,
            "foreign": 0,
            "rss_mib": round(rss_mib(operator.pid), 1),
            "peak_rss_mib": round(peak_rss_mib(operator.pid), 1),
        }
        since = _create(bed, namespace, names[baseline_own:], node)
        _converged(vm_watch, namespace, names, since, timeout=300)
        wait_quiet(bed)
        start, cpu_before = time.time(), cpu_seconds(operator.pid)
        time.sleep(seconds)
        end, cpu_after = time.time(), cpu_seconds(operator.pid)
        requests, by_kind = _requests(bed, start, end)
        result = {
            "vms": count,
            "seconds": seconds,
            "cpu_seconds": round(cpu_after - cpu_before, 3),
            "api_requests": requests,
            "api_requests_by_kind": by_kind,
            "rss_mib": round(rss_mib(operator.pid), 1),
        }
        print(f"  idle: {result}; baseline {baseline}", flush=True)
        return result, baseline
    finally:
        operator.stop()
        vm_watch.stop()
        bed.purge(namespace)


def scale(bed: Bed, count: int, own_of_foreign_case: int, baseline: dict[str, Any]) -> dict[str, Any]:
    """`count` VMs on one node created at once; then the same objects with all but `own_of_foreign_case`
    on other nodes, served by a fresh operator of another node."""
    namespace = bed.namespace("bench-scale")
    node_a, node_b = f"node-a-{namespace}", f"node-b-{namespace}"
    cluster = bed.watch(None)  # what an operator watching without a selector receives
    names = [f"vm-{i:04d}" for i in range(count)]
    operator_a = start_test_driver_operator(bed, node_a)
    result: dict[str, Any] = {}
    try:
        since = _create(bed, namespace, names, node_a)
        created = time.time() - since
        converge = _converged(cluster, namespace, names, since, timeout=480)
        wait_quiet(bed)
        requests, by_kind = _requests(bed, since, time.time())
        result.update(
            {
                "vms": count,
                "converge": round(converge, 2),
                "create_seconds": round(created, 2),
                "vms_per_second": round(count / converge, 1),
                "api_requests": requests,
                "api_requests_by_kind": by_kind,
                "rss_mib": round(peak_rss_mib(operator_a.pid), 1),
                "rss_now_mib": round(rss_mib(operator_a.pid), 1),
                "cpu_seconds": round(cpu_seconds(operator_a.pid), 1),
            }
        )
        print(f"  scale: {result}", flush=True)
        operator_a.stop()

        # The same objects, all but a few of them another node's: drop some of node A's (its operator is
        # gone, so finalizers are lifted by hand) and give node B as many of its own.
        vms = bed.vms(namespace)

        def drop(name: str) -> None:
            vms.patch(name, {"metadata": {"finalizers": None}})
            vms.delete(name)

        parallel(drop, names[:own_of_foreign_case])
        own = [f"own-{i:02d}" for i in range(own_of_foreign_case)]
        foreign = names[own_of_foreign_case:]
        # What node B's operator receives: the same list and watch it makes, with its field selector (the
        # audit log's list_watch_uris below shows that selector on the operator's own requests).
        node_b_view = bed.watch(None, field_selector=f"spec.nodeName={node_b}")
        events_before = node_b_view.events
        b_started = time.time()
        operator_b = start_test_driver_operator(bed, node_b)
        wait_cpu_quiet(operator_b.pid)
        rss_after_list = rss_mib(operator_b.pid)
        since = _create(bed, namespace, own, node_b)
        converge_b = _converged(cluster, namespace, own, since, timeout=120)
        wait_quiet(bed)

        # Every foreign VM changes once (an annotation, as a GitOps tool would write): with its field selector,
        # B should receive none of these events and spend no CPU on them.
        wait_cpu_quiet(operator_b.pid)
        churn_events_before, cpu_before = node_b_view.events, cpu_seconds(operator_b.pid)
        parallel(lambda name: vms.patch(name, {"metadata": {"annotations": {"bench.vmop.dev/touched": "1"}}}), foreign)
        wait_cpu_quiet(operator_b.pid)
        churn_cpu = cpu_seconds(operator_b.pid) - cpu_before
        churn_events = node_b_view.events - churn_events_before
        b_requests, b_by_kind = _requests(bed, b_started, time.time())
        result["foreign_990"] = {
            "vms": own_of_foreign_case + len(foreign),
            "own": own_of_foreign_case,
            "foreign": len(foreign),
            "converge": round(converge_b, 2),
            "api_requests": b_requests,
            "api_requests_by_kind": b_by_kind,
            "rss_mib": round(rss_mib(operator_b.pid), 1),
            "rss_after_initial_list_mib": round(rss_after_list, 1),
            "peak_rss_mib": round(peak_rss_mib(operator_b.pid), 1),
            "rss_baseline_own_only_mib": baseline["rss_mib"],
            "rss_over_baseline_mib": round(rss_mib(operator_b.pid) - baseline["rss_mib"], 1),
            "own_vms_tracked": own_vms_tracked(operator_b),
            "objects_listed_at_start": node_b_view.listed,
            "watch_events_received": node_b_view.events - events_before,
            "cluster_watch_events_meanwhile": cluster.events - events_before,
            "foreign_churn_events": churn_events,
            "foreign_churn_cpu_seconds": round(churn_cpu, 3),
            "list_watch_uris": bed.audit.operator_list_watch_uris(b_started, time.time()),
        }
        print(f"  scale, foreign: {result['foreign_990']}", flush=True)
        operator_b.stop()
        return result
    finally:
        operator_a.stop()
        cluster.stop()
