"""The deployed product: the operator in its pod, probed, logged, scraped, replaced and rolled out by Kubernetes."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime
from typing import Any

import libvirt
from prometheus_client.parser import text_string_to_metric_families

from testbed.daemonset import DeployedVmop, write_surge_overlay
from testbed.vmop import OPERATOR_NAMESPACE, parse_time
from testbed.wait import wait_until
from tests.deployed.conftest import Deployment, World, record
from tests.e2e.test_faults import MARGIN, ShutoffWatch

CAP_DAC_READ_SEARCH = 2


def metric(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


def container_running(pod: dict[str, Any]) -> bool:
    """Its container has started: before, `kubectl logs -f` ends at once and there is nothing to scrape."""
    statuses = pod.get("status", {}).get("containerStatuses") or []
    return bool(statuses) and "running" in statuses[0].get("state", {})


def shutdown_record(world: World, name: str, outcome: str, timeout: float = 90) -> dict[str, Any]:
    body = world.vms.wait(
        name,
        lambda b: (b.get("status", {}).get("shutdown") or {}).get("outcome") == outcome,
        timeout=timeout,
        what=f"the stop's outcome {outcome}",
    )
    found: dict[str, Any] = body["status"]["shutdown"]
    return found


def deadline_written(world: World, name: str) -> datetime:
    body = world.vms.wait(
        name,
        lambda b: (b.get("status", {}).get("shutdown") or {}).get("attempts", 0) >= 1,
        timeout=60,
        what="the first shutdown request",
    )
    return parse_time(body["status"]["shutdown"]["deadline"])


def qemu_identity(world: World, name: str) -> tuple[int, str]:
    """The domain's id and its QEMU's start time: both change if the guest is stopped or restarted."""
    domain = world.deployment.libvirt.connect().lookupByName(world.domain_name(name))
    pid = int((world.deployment.libvirt.runtime_dir / "libvirt" / "qemu" / "run" / f"{domain.name()}.pid").read_text())
    with open(f"/proc/{pid}/stat") as stat:
        started = stat.read().rsplit(")", 1)[1].split()[19]
    return domain.ID(), f"{pid}:{started}"


def test_the_daemonset_rolls_out_and_its_pod_turns_ready_in_the_pod_network(deployed: Deployment) -> None:
    vmop = deployed.vmop
    vmop.rollout_status()
    pod = vmop.ready_pod()
    status = pod["status"]
    assert status["hostIP"] != status["podIP"], "the pod has an address of its own, not the host's network"
    (container,) = status["containerStatuses"]
    assert container["ready"] is True
    assert container["restartCount"] == 0, "the liveness probe never failed"
    assert pod["spec"]["nodeName"] == deployed.node_name
    # The kubelet's probes reached /healthz at the pod's address; so does anyone on the pod network.
    assert metric(vmop.scrape(pod), "vmop_node_lock_held") == 1
    wait_until(
        lambda: metric(vmop.scrape(pod), "vmop_libvirt_connected") == 1,
        timeout=30,
        message="the pod did not reach libvirtd through the mounted socket",
    )


def test_the_operator_in_the_pod_stops_a_guest_gracefully_and_forces_a_stubborn_one_at_its_deadline(
    world: World,
) -> None:
    world.create("coop", shutdown_policy={"gracePeriodSeconds": 60, "retryIntervalSeconds": 2})
    world.create("stubborn", kind="stubborn", shutdown_policy={"gracePeriodSeconds": 6, "retryIntervalSeconds": 2})
    world.wait_running("coop")
    world.wait_running("stubborn")

    world.vms.patch_spec("coop", powerState="Stopped")
    graceful = shutdown_record(world, "coop", "Graceful")
    assert parse_time(graceful["completedAt"]) < parse_time(graceful["deadline"])
    state = world.deployment.libvirt.connect().lookupByName(world.domain_name("coop")).state()
    assert tuple(state) == (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN)

    watch = ShutoffWatch(world.deployment.libvirt, world.domain_name("stubborn"))
    world.vms.patch_spec("stubborn", powerState="Stopped")
    deadline = deadline_written(world, "stubborn")
    shutoff = watch.wait(timeout=(deadline - datetime.now(UTC)).total_seconds() + 30)
    forced = shutdown_record(world, "stubborn", "Forced")
    assert parse_time(forced["deadline"]) == deadline
    assert deadline <= shutoff < deadline + MARGIN, f"forced {shutoff - deadline} after the deadline"
    record("pod-forced", late=(shutoff - deadline).total_seconds())


def test_kubectl_logs_shows_json_lines_with_the_vms_fields(world: World) -> None:
    world.create("logged", kind="firmware")
    world.wait_running("logged")
    pod = world.deployment.vmop.ready_pod()["metadata"]["name"]
    vm = f"{world.namespace}/logged"

    def lines_of_the_vm() -> list[dict[str, Any]]:
        records = []
        for line in world.deployment.vmop.logs(pod).splitlines():
            record_ = json.loads(line)  # every line is JSON: a line that is not fails the test here
            if record_.get("vm") == vm:
                records.append(record_)
        return records

    records = wait_until(lines_of_the_vm, timeout=30, message=f"no log line of {vm}")
    assert all({"time", "level", "message"} <= set(r) for r in records)
    assert any(r.get("domain") == world.domain_name("logged") for r in records)


def test_metrics_are_scraped_from_the_pods_address(world: World) -> None:
    vmop = world.deployment.vmop
    pod = vmop.ready_pod()
    before = metric(vmop.scrape(pod), "vmop_virtual_machines", power_state="Running") or 0
    world.create("counted", kind="firmware")
    world.wait_running("counted")
    wait_until(
        lambda: (metric(vmop.scrape(pod), "vmop_virtual_machines", power_state="Running") or 0) >= before + 1,
        timeout=30,
        message="the running VM was not counted in the pod's metrics",
    )


def test_the_container_runs_with_only_its_one_capability_and_a_read_only_root(deployed: Deployment) -> None:
    vmop = deployed.vmop
    pod = vmop.ready_pod()["metadata"]["name"]
    status = dict(
        line.split(":\t", 1) for line in vmop.exec(pod, "cat", "/proc/1/status").stdout.splitlines() if ":\t" in line
    )
    assert status["Name"].strip() == "vmop", "the operator is PID 1 (exec form), so the kubelet's SIGTERM is its"
    assert status["Uid"].split()[:2] == ["0", "0"]
    expected = f"{1 << CAP_DAC_READ_SEARCH:016x}"
    for kind in ("CapEff", "CapPrm", "CapBnd"):
        assert status[kind].strip() == expected, f"{kind} is {status[kind]}: all dropped but DAC_READ_SEARCH"
    assert status["CapAmb"].strip() == "0" * 16
    assert status["NoNewPrivs"].strip() == "1"
    assert status["Seccomp"].strip() == "2", "the runtime's default seccomp filter"
    write = vmop.exec(pod, "python3", "-c", "open('/probe', 'w')", check=False)
    assert write.returncode != 0
    assert "Read-only file system" in write.stderr


def test_a_pod_deleted_during_a_graceful_stop_is_replaced_and_the_new_one_keeps_the_deadline(world: World) -> None:
    vmop = world.deployment.vmop
    world.create("bystander", kind="firmware")
    world.create("stubborn", kind="stubborn", shutdown_policy={"gracePeriodSeconds": 25, "retryIntervalSeconds": 3})
    world.wait_running("bystander")
    world.wait_running("stubborn")
    bystander = qemu_identity(world, "bystander")
    old = vmop.ready_pod()["metadata"]["name"]
    watch = ShutoffWatch(world.deployment.libvirt, world.domain_name("stubborn"))
    world.vms.patch_spec("stubborn", powerState="Stopped")
    deadline = deadline_written(world, "stubborn")

    world.deployment.control_plane.kubectl("delete", "pod", "-n", OPERATOR_NAMESPACE, old, "--wait=false")
    new = vmop.ready_pod(other_than=old)
    vmop.follow(new["metadata"]["name"])
    assert datetime.now(UTC) < deadline, "the new pod was Ready before the deadline (else the test proves nothing)"

    shutoff = watch.wait(timeout=(deadline - datetime.now(UTC)).total_seconds() + 30)
    forced = shutdown_record(world, "stubborn", "Forced")
    assert parse_time(forced["deadline"]) == deadline, "the new pod kept the deadline the old one wrote"
    assert deadline <= shutoff < deadline + MARGIN, f"forced {shutoff - deadline} after the deadline"
    assert qemu_identity(world, "bystander") == bystander, "the pod's replacement stopped or restarted a guest"
    events = world.vms.event_reasons("stubborn")
    assert events.count("StopRequested") == 1, f"the new pod did not start the stop again: {events}"
    record("pod-replaced", late=(shutoff - deadline).total_seconds())


def test_a_rollout_restart_with_a_surge_never_has_two_operators_acting_on_the_node(world: World, tmp_path: Any) -> None:
    deployment = world.deployment
    vmop = deployment.vmop
    surge = write_surge_overlay(tmp_path / "surge", deployment.overlay)
    vmop.apply(surge)
    vmop.rollout_status()
    world.create("bystander", kind="firmware")
    world.wait_running("bystander")
    bystander = qemu_identity(world, "bystander")
    old = vmop.ready_pod()["metadata"]["name"]
    vmop.follow(old)

    overlaps: list[list[str]] = []
    acting_seen: set[str] = set()
    done = threading.Event()

    def acting(pod: dict[str, Any]) -> bool:
        try:
            return metric(DeployedVmop.scrape(pod, timeout=1), "vmop_node_lock_held") == 1
        except OSError:
            return False  # not listening yet, or already gone

    def sample() -> None:
        """The pods' lock gauges, from their own addresses, until the rollout is over.

        Scrapes are one after another, never at one instant: a pod seen acting, then another, then the
        first again, proves both acted at once; two readings alone could straddle a 2 ms handover.
        """
        pods: dict[str, dict[str, Any]] = {}
        listed_at = 0.0
        while not done.is_set():
            if time.monotonic() - listed_at > 0.5:
                listed_at = time.monotonic()
                pods = {pod["metadata"]["name"]: pod for pod in vmop.pods() if container_running(pod)}
                for name in pods:
                    vmop.follow(name)  # from its first line, which may already be written
            if not pods:
                time.sleep(0.02)
                continue
            first, *others = pods.values()
            before = acting(first)
            also = [pod["metadata"]["name"] for pod in others if acting(pod)]
            after = acting(first)
            acting_seen.update(also + ([first["metadata"]["name"]] if before or after else []))
            if before and after and also:
                overlaps.append([first["metadata"]["name"], *also])
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        deployment.control_plane.kubectl("rollout", "restart", "-n", OPERATOR_NAMESPACE, "ds/vmop")
        vmop.rollout_status()
        new = vmop.ready_pod(other_than=old)["metadata"]["name"]
        vmop.wait_pod_gone(old)
        wait_until(lambda: new in acting_seen, timeout=30, message="the new pod never acted")
    finally:
        done.set()
        sampler.join(10)
    assert overlaps == [], f"two operators acted at once: {overlaps[:3]}"

    new_records = vmop.follow(new).records()
    old_records = vmop.follow(old).records()
    standby = next(r for r in new_records if "waiting as a standby" in r["message"])
    holding = next(r for r in new_records if r["message"].startswith("holding"))
    released = next(r for r in old_records if r["message"].startswith("released"))
    assert standby["time"] <= released["time"] <= holding["time"], "the new pod acted only once the old let go"
    assert qemu_identity(world, "bystander") == bystander, "the rollout stopped or restarted a guest"
    record(
        "surge-rollout",
        handover=(parse_time(holding["time"]) - parse_time(released["time"])).total_seconds(),
    )
