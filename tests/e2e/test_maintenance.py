"""Node maintenance (issue 14): a NoExecute taint on the operator's own Node stops its VMs by their own
shutdownPolicy, in priority groups, lowest first, keeps them off while it stays, and starts them again
highest first when it goes.

Order and timing are read from the timestamps the operator writes in each VM's status (requestedAt,
deadline, completedAt, startedAt), never from how long the test waited: a group's first request comes no
sooner than the last VM of the lower groups was seen off, a forced stop lands at its deadline, and a group
starts no sooner than every VM of the higher ones was started. Each wait is for evidence the operator
reacted (a status it wrote, an Event it posted), never a bare sleep.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import kubernetes
import libvirt
import pytest

from testbed.controlplane import ControlPlane
from testbed.vmop import condition, parse_time
from testbed.wait import holds_until, wait_until
from tests.e2e.conftest import Vmop

MAINTENANCE = "vmop.dev/maintenance"
UNREACHABLE = "node.kubernetes.io/unreachable"
MARGIN = timedelta(seconds=1)  # a forced stop lands ~0.25 s after its deadline here (bench: p99 0.246 s)
HELD_METRIC = "vmop_virtual_machines_held_by_taint"
GRACE, RETRY = 5, 1
PRIORITIES = (0, 10, 20)
STOP_TIMEOUT = 120.0  # every group of a maintenance, one after the other, on guests under TCG
START_TIMEOUT = 180.0  # every group booted again, one after the other

Groups = dict[int, list[str]]
Bodies = dict[str, dict[str, Any]]


def taint_name(key: str) -> str:
    return f"{key}:NoExecute"


def tolerate(key: str, seconds: int | None = None) -> dict[str, Any]:
    toleration: dict[str, Any] = {"key": key, "operator": "Exists", "effect": "NoExecute"}
    if seconds is not None:
        toleration["tolerationSeconds"] = seconds
    return toleration


class Node:
    """The test's own Node object, through the admin's client: its taints, and the Events vmop posts on it."""

    def __init__(self, control_plane: ControlPlane, name: str) -> None:
        self.core = kubernetes.client.CoreV1Api(control_plane.api_client())
        self.name = name

    def taint(self, key: str = MAINTENANCE, *, time_added: datetime | None = None) -> None:
        """One NoExecute taint (replacing any other); with time_added, its timeAdded, as the node lifecycle
        controller writes it (kubectl taint writes none)."""
        taint: dict[str, Any] = {"key": key, "effect": "NoExecute"}
        if time_added is not None:
            taint["timeAdded"] = time_added.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.core.patch_node(self.name, {"spec": {"taints": [taint]}})

    def untaint(self) -> None:
        self.core.patch_node(self.name, {"spec": {"taints": []}})

    def time_added(self, key: str) -> datetime:
        """The timeAdded of a taint, as the API server keeps it."""
        spec = self.core.read_node(self.name).spec
        taints = (spec.taints if spec is not None else None) or []
        taint = next(t for t in taints if t.key == key)
        assert taint.time_added is not None, f"the taint {key} has no timeAdded: {taint}"
        added: datetime = taint.time_added
        return added

    def events(self) -> list[Any]:
        items = self.core.list_namespaced_event(
            "default", field_selector=f"involvedObject.kind=Node,involvedObject.name={self.name}"
        ).items
        return sorted(items, key=lambda e: (e.event_time or e.first_timestamp, e.metadata.name))

    def describe_events(self) -> str:
        return "; ".join(f"{e.reason} x{e.count or 1}: {e.message}" for e in self.events())

    def wait_events(self, *reasons: str, timeout: float = 30.0) -> list[Any]:
        """The Node's Events once one of each of `reasons` has been posted (they go out in the background,
        after the plan that caused them)."""

        def posted() -> list[Any] | None:
            events = self.events()
            seen = {e.reason for e in events}
            return events if all(reason in seen for reason in reasons) else None

        return wait_until(
            posted,
            timeout=timeout,
            message=lambda: f"Events {reasons} on Node {self.name}; posted so far: {self.describe_events()}",
        )


@pytest.fixture
def node(vmop: Vmop, control_plane: ControlPlane) -> Node:
    return Node(control_plane, vmop.node_name)


def shutdown_of(body: dict[str, Any]) -> dict[str, Any]:
    record: dict[str, Any] = body.get("status", {}).get("shutdown") or {}
    return record


def held(body: dict[str, Any]) -> bool:
    """Stopped by a taint and kept off: the stop finished, heldByTaint set, Ready says why."""
    status = body.get("status", {})
    return (
        status.get("powerState") == "Stopped"
        and bool(status.get("heldByTaint"))
        and bool(shutdown_of(body).get("completedAt"))
        and (condition(body, "Ready") or {}).get("reason") == "HeldByTaint"
    )


def wait_held(vmop: Vmop, names: list[str], *, timeout: float = STOP_TIMEOUT) -> Bodies:
    return {name: vmop.vms.wait(name, held, timeout=timeout, what="stopped and held by the taint") for name in names}


def wait_started_again(vmop: Vmop, stopped: Bodies, *, timeout: float = START_TIMEOUT) -> Bodies:
    """Each VM running again after the stop in `stopped`, its heldByTaint cleared (a start after that stop)."""
    bodies = {}
    for name, before in stopped.items():
        after = parse_time(shutdown_of(before)["completedAt"])

        def again(body: dict[str, Any], after: datetime = after) -> bool:
            status = body.get("status", {})
            return (
                status.get("powerState") == "Running"
                and not status.get("heldByTaint")
                and status.get("startedAt") is not None
                and parse_time(status["startedAt"]) > after
            )

        bodies[name] = vmop.vms.wait(name, again, timeout=timeout, what="running again, no longer held")
    return bodies


def create_group(vmop: Vmop, priority: int, *kinds: str, grace: int = GRACE, retry: int = RETRY) -> list[str]:
    """One VM of each kind at this priority, named kind-priority; not waited for."""
    names = []
    for kind in kinds:
        name = f"{kind}-{priority}"
        vmop.create(
            name,
            kind=kind,
            priority=priority,
            shutdown_policy={"gracePeriodSeconds": grace, "retryIntervalSeconds": retry},
        )
        names.append(name)
    return names


def wait_all_running(vmop: Vmop, names: list[str]) -> Bodies:
    """Booted in parallel, then each waited for until its guest listens for ACPI."""
    return {name: vmop.wait_running(name) for name in names}


def members(groups: Groups) -> list[str]:
    return [name for priority in sorted(groups) for name in groups[priority]]


def assert_stopped_lowest_first(groups: Groups, bodies: Bodies) -> None:
    """No request of a group before every VM of the lower groups was off."""
    priorities = sorted(groups)
    for index, priority in enumerate(priorities[1:], start=1):
        lower = [name for p in priorities[:index] for name in groups[p]]
        last_off = max(parse_time(shutdown_of(bodies[name])["completedAt"]) for name in lower)
        first_asked = min(parse_time(shutdown_of(bodies[name])["requestedAt"]) for name in groups[priority])
        assert first_asked >= last_off, (
            f"priority {priority} was asked at {first_asked}, before the lower groups were all off ({last_off})"
        )


def assert_started_highest_first(groups: Groups, bodies: Bodies) -> None:
    """No start of a group before every VM of the higher groups was started."""
    priorities = sorted(groups, reverse=True)
    for index, priority in enumerate(priorities[1:], start=1):
        higher = [name for p in priorities[:index] for name in groups[p]]
        last_started = max(parse_time(bodies[name]["status"]["startedAt"]) for name in higher)
        first_started = min(parse_time(bodies[name]["status"]["startedAt"]) for name in groups[priority])
        assert first_started >= last_started, (
            f"priority {priority} started at {first_started}, before the higher groups all ran ({last_started})"
        )


def assert_taint_stop(body: dict[str, Any], *, outcome: str, taint: str = taint_name(MAINTENANCE)) -> None:
    """A stop the taint made, by the VM's own policy: graceful, or forced at (and not before) its deadline."""
    name = body["metadata"]["name"]
    record = shutdown_of(body)
    assert record["purpose"] == "Taint", f"{name}: {record}"
    assert record["taint"] == taint, f"{name}: {record}"
    assert body["status"]["heldByTaint"] == taint, f"{name}: {body['status']}"
    assert record["outcome"] == outcome, f"{name}: {record}"
    requested, deadline = parse_time(record["requestedAt"]), parse_time(record["deadline"])
    completed = parse_time(record["completedAt"])
    grace = body["spec"]["shutdownPolicy"]["gracePeriodSeconds"]
    assert (deadline - requested).total_seconds() == grace, f"{name}: {record}"
    if outcome == "Forced":
        assert timedelta(0) <= completed - deadline < MARGIN, f"{name}: forced {completed - deadline} after"
    else:
        assert completed < deadline, f"{name}: {record}"


def assert_held_count(vmop: Vmop, count: int) -> None:
    wait_until(
        lambda: vmop.operator.metric(HELD_METRIC) == count,
        timeout=15,
        message=lambda: f"{HELD_METRIC} is {vmop.operator.metric(HELD_METRIC)}, not {count}",
    )


def group_of(event: Any) -> int:
    found = re.search(r"priority (-?\d+)", event.message or "")
    assert found is not None, f"{event.reason} names no priority: {event.message}"
    return int(found.group(1))


def wait_group_events(node: Node, reason: str, priorities: list[int]) -> list[Any]:
    """The Node's Events of this reason once they name exactly these priority groups."""

    def groups_named() -> list[Any] | None:
        events = [e for e in node.events() if e.reason == reason]
        return events if {group_of(e) for e in events} == set(priorities) else None

    return wait_until(
        groups_named,
        timeout=15,
        message=lambda: f"{reason} for priorities {priorities}; posted: {node.describe_events()}",
    )


def assert_one_event_per_group(node: Node, reason: str, priorities: list[int]) -> None:
    """One Event of this reason for each group, each posted once."""
    events = wait_group_events(node, reason, priorities)
    assert len(events) == len(priorities), node.describe_events()
    assert all((e.count or 1) == 1 for e in events), node.describe_events()


def assert_untouched(vmop: Vmop, name: str, before: dict[str, Any], domain_id: int) -> None:
    """Running all along: the same start, the same domain, never a stop."""
    body = vmop.vms.get(name)
    assert body is not None
    status = body["status"]
    assert status["powerState"] == "Running", status
    assert status["startedAt"] == before["status"]["startedAt"], status
    assert not status.get("shutdown"), status
    assert not status.get("heldByTaint"), status
    assert vmop.domain(name).ID() == domain_id, f"{name} was started again"


def test_a_taint_stops_groups_lowest_first_and_starts_them_highest_first(vmop: Vmop, node: Node) -> None:
    vmop.start_operator()
    groups = {priority: create_group(vmop, priority, "coop", "stubborn") for priority in PRIORITIES}
    vmop.create("tolerant", tolerations=[tolerate(MAINTENANCE)])
    running = wait_all_running(vmop, [*members(groups), "tolerant"])
    tolerant_domain = vmop.domain("tolerant").ID()
    assert vmop.operator.metric(HELD_METRIC) == 0

    node.taint()
    stopped = wait_held(vmop, members(groups))

    assert_stopped_lowest_first(groups, stopped)
    for priority, names in groups.items():
        coop, stubborn = names
        assert_taint_stop(stopped[coop], outcome="Graceful")
        assert_taint_stop(stopped[stubborn], outcome="Forced")
        for name in names:
            assert vmop.domain_state(name) == libvirt.VIR_DOMAIN_SHUTOFF, name
            assert parse_time(stopped[name]["status"]["startedAt"]) < parse_time(
                shutdown_of(stopped[name])["requestedAt"]
            ), f"{name} (priority {priority}) was started again while tainted"
    assert_held_count(vmop, 6)
    assert_untouched(vmop, "tolerant", running["tolerant"], tolerant_domain)
    node.wait_events("MaintenanceStarted", "StoppingGroup", "MaintenanceComplete")
    assert_one_event_per_group(node, "StoppingGroup", list(PRIORITIES))

    node.untaint()
    started = wait_started_again(vmop, stopped)

    assert_started_highest_first(groups, started)
    for name, body in started.items():
        assert (condition(body, "Ready") or {}).get("status") == "True", f"{name}: {body['status']}"
        assert vmop.domain_state(name) == libvirt.VIR_DOMAIN_RUNNING, name
    assert_held_count(vmop, 0)
    node.wait_events("StartingGroup", "MaintenanceEnded")
    assert_one_event_per_group(node, "StartingGroup", list(PRIORITIES))
    assert_untouched(vmop, "tolerant", running["tolerant"], tolerant_domain)


def test_unreachable_taint_stops_only_a_vm_that_asks_for_it(vmop: Vmop, node: Node) -> None:
    vmop.start_operator()
    vmop.create("plain", shutdown_policy={"gracePeriodSeconds": GRACE, "retryIntervalSeconds": RETRY})
    vmop.create(
        "opted",
        shutdown_policy={"gracePeriodSeconds": GRACE, "retryIntervalSeconds": RETRY},
        tolerations=[tolerate(UNREACHABLE, seconds=0)],
    )
    running = wait_all_running(vmop, ["plain", "opted"])
    plain_domain = vmop.domain("plain").ID()

    # As the node lifecycle controller taints a node whose kubelet stopped reporting.
    node.taint(UNREACHABLE, time_added=datetime.now(UTC))
    # The opted-in VM's stop is the evidence that the operator saw the taint.
    stopped = wait_held(vmop, ["opted"])
    assert_taint_stop(stopped["opted"], outcome="Graceful", taint=taint_name(UNREACHABLE))

    assert_untouched(vmop, "plain", running["plain"], plain_domain)
    plain = vmop.vms.get("plain")
    assert plain is not None
    assert (condition(plain, "Ready") or {}).get("status") == "True", plain["status"]
    assert_held_count(vmop, 1)

    node.untaint()
    wait_started_again(vmop, stopped)
    assert_held_count(vmop, 0)
    assert_untouched(vmop, "plain", running["plain"], plain_domain)


def test_operator_restarted_mid_maintenance_keeps_the_order_and_the_deadline(vmop: Vmop, node: Node) -> None:
    vmop.start_operator()
    groups = {
        0: create_group(vmop, 0, "stubborn", grace=10, retry=2),
        10: create_group(vmop, 10, "coop", "stubborn", grace=10, retry=2),
        20: create_group(vmop, 20, "stubborn", grace=10, retry=2),
    }
    wait_all_running(vmop, members(groups))

    node.taint()
    first = wait_held(vmop, groups[0])["stubborn-0"]
    asked = vmop.vms.wait(
        "stubborn-10", lambda b: bool(shutdown_of(b).get("requestedAt")), timeout=30, what="group 10's stop"
    )
    deadline = parse_time(shutdown_of(asked)["deadline"])
    vmop.operator.kill()
    vmop.start_operator()

    stopped = wait_held(vmop, members(groups))
    assert_stopped_lowest_first(groups, stopped)
    assert_taint_stop(stopped["stubborn-0"], outcome="Forced")
    assert_taint_stop(stopped["coop-10"], outcome="Graceful")
    assert_taint_stop(stopped["stubborn-10"], outcome="Forced")
    assert_taint_stop(stopped["stubborn-20"], outcome="Forced")
    assert parse_time(shutdown_of(stopped["stubborn-10"])["deadline"]) == deadline, "the restart kept the deadline"
    assert shutdown_of(stopped["stubborn-10"])["requestedAt"] == shutdown_of(asked)["requestedAt"]
    # Group 0 stayed off across the restart: the same start and the same stop as before it.
    assert stopped["stubborn-0"]["status"]["startedAt"] == first["status"]["startedAt"]
    assert shutdown_of(stopped["stubborn-0"]) == shutdown_of(first)
    assert vmop.domain_state("stubborn-0") == libvirt.VIR_DOMAIN_SHUTOFF
    assert_held_count(vmop, 4)
    wait_group_events(node, "StoppingGroup", list(groups))  # no group skipped (the new operator may repeat one)

    node.untaint()
    started = wait_started_again(vmop, stopped)
    assert_started_highest_first(groups, started)
    assert_held_count(vmop, 0)
    wait_group_events(node, "StartingGroup", list(groups))


def test_toleration_seconds_delays_the_stop_from_the_taints_time_added(vmop: Vmop, node: Node) -> None:
    vmop.start_operator()
    policy = {"gracePeriodSeconds": GRACE, "retryIntervalSeconds": RETRY}
    vmop.create("prompt", shutdown_policy=policy)
    vmop.create("patient", shutdown_policy=policy, tolerations=[tolerate(MAINTENANCE, seconds=5)])
    wait_all_running(vmop, ["prompt", "patient"])

    node.taint(time_added=datetime.now(UTC))
    added = node.time_added(MAINTENANCE)
    stopped = wait_held(vmop, ["prompt", "patient"], timeout=60)

    prompt, patient = (parse_time(shutdown_of(stopped[n])["requestedAt"]) for n in ("prompt", "patient"))
    assert prompt < added + timedelta(seconds=5), f"prompt asked at {prompt}, taint added at {added}"
    tolerated_until = added + timedelta(seconds=5)
    assert tolerated_until <= patient < tolerated_until + MARGIN, (
        f"patient asked at {patient}; it tolerates the taint until {tolerated_until}"
    )
    for name in ("prompt", "patient"):
        assert_taint_stop(stopped[name], outcome="Graceful")


def test_overdue_vm_that_is_never_forced_holds_up_the_next_group(vmop: Vmop, node: Node) -> None:
    vmop.start_operator()
    vmop.create(
        "precious",
        kind="stubborn",
        priority=0,
        shutdown_policy={"gracePeriodSeconds": 2, "retryIntervalSeconds": 1, "forceAfterDeadline": False},
    )
    (following,) = create_group(vmop, 10, "coop")
    wait_all_running(vmop, ["precious", following])

    node.taint()
    vmop.vms.wait(
        "precious",
        lambda b: (condition(b, "ShutdownOverdue") or {}).get("status") == "True",
        timeout=30,
        what="ShutdownOverdue",
    )
    events = node.wait_events("MaintenanceHeldUp")
    held_up = next(e for e in events if e.reason == "MaintenanceHeldUp")
    assert held_up.type == "Warning"
    assert f"{vmop.namespace}/precious" in held_up.message, held_up.message
    # The operator has planned with precious overdue: the next group is not asked while it runs.
    holds_until(
        lambda: (
            not shutdown_of(vmop.vms.get(following) or {})
            and vmop.domain_state("precious") == libvirt.VIR_DOMAIN_RUNNING
        ),
        seconds=3,
        message=lambda: f"{following} was asked while precious held the maintenance up",
    )

    vmop.vms.patch("precious", {"spec": {"shutdownPolicy": {"mode": "Force"}}})
    stopped = wait_held(vmop, ["precious", following], timeout=60)
    assert_stopped_lowest_first({0: ["precious"], 10: [following]}, stopped)
    record = shutdown_of(stopped["precious"])
    assert record["outcome"] == "Forced", record
    assert record["purpose"] == "Taint", record
    assert_taint_stop(stopped[following], outcome="Graceful")
    node.wait_events("MaintenanceComplete")
