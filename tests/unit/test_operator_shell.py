"""The operator's shell under faults: the force lands at its deadline whatever the API server and libvirt do.

The real Operator, VmWorker, StatusWriter and Backstop run on looptime's fake loop clock against the
in-memory fakes of tests/unit/shellfakes.py. Force times are asserted against the deadline on the
operator's own clock, to the millisecond (the fakes answer instantly, so anything later is the shell's).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest

from controller.api import ShutdownPurpose
from controller.clock import Clock
from controller.metrics import Metrics
from controller.operator import NodeMemoryReads, Operator
from controller.reconcile import DomainState, StopCause
from controller.settings import from_args
from controller.shutdown import ShutdownMark
from controller.statuswriter import HOLD_MAX
from tests.unit.shellfakes import (
    FakeEvents,
    FakeHypervisor,
    FakeKube,
    FakeStorage,
    FakeWall,
    run_on_fake_time,
    until,
)

MS = timedelta(milliseconds=1)


class Env:
    """One node's operator with fake neighbours; VMs are firmware-only (no paths to allow)."""

    def __init__(self, *flags: str, resync: float = 300.0, libvirt_up: bool = True) -> None:
        loop = asyncio.get_running_loop()
        self.wall = FakeWall()
        self.wall.loop_time = loop.time
        self.clock = Clock(wall=self.wall.time, monotonic=loop.time)
        self.hyp = FakeHypervisor(self.clock, down=not libvirt_up)
        self.kube = FakeKube()
        self.events = FakeEvents()
        settings = from_args(
            ["--node-name", "node-a", "--libvirt-uri", "test:///default", "--resync-seconds", str(resync), *flags]
        )
        self.storage = FakeStorage()
        self.op = Operator(
            settings,
            kube=self.kube,  # type: ignore[arg-type]
            hypervisor=self.hyp,  # type: ignore[arg-type]
            events=self.events,  # type: ignore[arg-type]
            metrics=Metrics(),
            clock=self.clock,
            storage=self.storage,  # type: ignore[arg-type]
        )

    def add(self, name: str, *, power: str = "Running", **policy: Any) -> None:
        spec = {"nodeName": "node-a", "powerState": power, "shutdownPolicy": policy, "domain": {"memoryMiB": 64}}
        self.op.object_event("ADDED", self.kube.create(name, spec))

    def edit(self, name: str, **spec: Any) -> None:
        self.op.object_event("MODIFIED", self.kube.edit(name, **spec))

    def edit_policy(self, name: str, **policy: Any) -> None:
        current = dict(self.kube.objects["ns", name]["spec"]["shutdownPolicy"])
        self.edit(name, shutdownPolicy={**current, **policy})

    def domain(self, name: str) -> Any:
        return self.hyp.domains.get(f"ns_{name}")

    def state(self, name: str) -> DomainState | None:
        domain = self.domain(name)
        return domain.state if domain else None

    def requests(self, name: str) -> list[datetime]:
        return [at for uuid, at in self.hyp.requests if uuid == f"uid-{name}"]

    def shutdown(self, name: str) -> dict[str, Any]:
        return dict(self.kube.status(name).get("shutdown") or {})

    async def running(self, name: str, **kwargs: Any) -> None:
        self.add(name, **kwargs)
        await until(lambda: self.kube.status(name).get("powerState") == "Running", what=f"{name} Running")


def scenario(body: Callable[[], Any]) -> None:
    run_on_fake_time(body)


@pytest.mark.parametrize("mode", ["ok", "hang", "refuse", "down"])
def test_the_force_lands_at_the_deadline_whatever_the_api_server_does(mode: str) -> None:
    async def run() -> None:
        env = Env()
        await env.op.start()
        await env.running("web", gracePeriodSeconds=10, retryIntervalSeconds=2)
        env.kube.mode = mode
        env.edit("web", powerState="Stopped")
        await until(lambda: "uid-web" in env.hyp.forced, what="the force")
        first = env.requests("web")[0]
        assert timedelta(0) <= env.hyp.forced["uid-web"] - (first + timedelta(seconds=10)) < MS
        assert [(at - first).total_seconds() for at in env.requests("web")] == [0, 2, 4, 6, 8], "resent on time"
        env.kube.mode = "ok"
        await until(lambda: env.shutdown("web").get("outcome") == "Forced", within=30, what="the report")
        record = env.shutdown("web")
        assert datetime.fromisoformat(record["deadline"]) == first + timedelta(seconds=10)
        assert env.events.reasons("web").count("ForcedOff") == 1
        await env.op.stop()

    scenario(run)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ({"gracePeriodSeconds": 4}, lambda first, edited: first + timedelta(seconds=4)),
        ({"mode": "Force"}, lambda first, edited: edited),
    ],
    ids=["lowered-grace", "mode-force"],
)
def test_a_deadline_brought_forward_is_kept_while_the_api_server_hangs(
    edit: dict[str, Any], expected: Callable[[datetime, datetime], datetime]
) -> None:
    async def run() -> None:
        env = Env()
        await env.op.start()
        await env.running("web", gracePeriodSeconds=60, retryIntervalSeconds=0)
        env.kube.mode = "hang"
        env.edit("web", powerState="Stopped")
        await until(lambda: env.requests("web"), what="the first request")
        first = env.requests("web")[0]
        await asyncio.sleep(3)
        edited = env.clock.now()
        env.edit_policy("web", **edit)
        await until(lambda: "uid-web" in env.hyp.forced, what="the force")
        assert timedelta(0) <= env.hyp.forced["uid-web"] - expected(first, edited) < MS
        await env.op.stop()

    scenario(run)


@pytest.mark.parametrize("step", [3600.0, -3600.0], ids=["forward-1h", "back-1h"])
def test_a_wall_clock_step_neither_forces_early_nor_late(step: float) -> None:
    async def run() -> None:
        env = Env()
        await env.op.start()
        await env.running("web", gracePeriodSeconds=10, retryIntervalSeconds=0)
        env.edit("web", powerState="Stopped")
        await until(lambda: env.requests("web"), what="the first request")
        await asyncio.sleep(1)
        env.wall.offset += step  # the node syncs its clock
        await until(lambda: "uid-web" in env.hyp.forced, what="the force")
        forced_after = env.hyp.forced["uid-web"] - env.requests("web")[0]
        assert timedelta(seconds=10) <= forced_after < timedelta(seconds=10) + MS, "after its grace, not an hour off"
        await env.op.stop()

    scenario(run)


def test_clock_reads_the_wall_once_and_then_counts_monotonic_time() -> None:
    wall, mono = [1_800_000_000.0], [50.0]
    clock = Clock(wall=lambda: wall[0], monotonic=lambda: mono[0])
    start = clock.now()
    wall[0] += 3600
    mono[0] += 2.5
    assert clock.now() - start == timedelta(seconds=2.5)


def test_a_neighbours_libvirt_failures_stay_its_own() -> None:
    """A bridge that does not exist: libvirt says "system error" for that domain alone."""

    async def run() -> None:
        env = Env()
        await env.op.start()
        await env.running("web", gracePeriodSeconds=5, retryIntervalSeconds=1)
        env.hyp.broken["ns_bad"] = "Cannot get interface MTU on 'nosuchbr0': No such device"
        env.add("bad")
        env.edit("web", powerState="Stopped")
        await until(lambda: "uid-web" in env.hyp.forced, what="the neighbour's force")
        first = env.requests("web")[0]
        assert timedelta(0) <= env.hyp.forced["uid-web"] - (first + timedelta(seconds=5)) < MS
        await until(lambda: env.shutdown("web").get("outcome") == "Forced", within=10, what="the report")
        web_states = [s.get("powerState") for key, s in env.kube.status_writes if key == ("ns", "web")]
        assert "Unknown" not in web_states
        assert "HypervisorUnreachable" not in env.events.reasons("web")
        assert "ActionFailed" in env.events.reasons("bad")
        assert env.hyp.connected, "nobody disconnected"
        await env.op.stop()

    scenario(run)


def test_a_force_that_fails_is_retried_every_second_past_the_deadline() -> None:
    """A QEMU in uninterruptible sleep: destroy fails for that domain until it can be killed."""

    async def run() -> None:
        env = Env()
        await env.op.start()
        await env.running("web", gracePeriodSeconds=5, retryIntervalSeconds=0)
        env.edit("web", powerState="Stopped")
        await until(lambda: env.requests("web"), what="the first request")
        env.hyp.broken["uid-web"] = "Failed to terminate process 4242 with SIGKILL: Device or resource busy"
        await asyncio.sleep(60)  # the errors' backoff grows, but not past a second once the deadline passed
        del env.hyp.broken["uid-web"]
        fixed = env.clock.now()
        await until(lambda: "uid-web" in env.hyp.forced, what="the force")
        assert env.hyp.forced["uid-web"] - fixed <= timedelta(seconds=1)
        await env.op.stop()

    scenario(run)


def stop_known_only_to_libvirt(env: Env) -> tuple[Any, datetime, datetime]:
    """A stop begun 25 s ago by an operator now gone, whose status write never landed: only the mark has it."""
    env.kube.create(
        "web",
        {
            "nodeName": "node-a",
            "powerState": "Stopped",
            "shutdownPolicy": {"gracePeriodSeconds": 30},
            "domain": {"memoryMiB": 64},
        },
    )
    now = env.clock.now()
    deadline = now + timedelta(seconds=5)
    domain = env.hyp.running("ns_web", uid="uid-web", spec_hash=None)
    domain.mark = ShutdownMark(ShutdownPurpose.STOP, now - timedelta(seconds=25), deadline, True)
    return domain, now, deadline


def test_the_backstop_forces_from_the_domain_mark_while_the_api_server_is_down() -> None:
    """A restarted operator, the API server down: only libvirt knows of the stop, and that is enough."""

    async def run() -> None:
        env = Env()
        env.kube.mode = "down"
        domain, now, deadline = stop_known_only_to_libvirt(env)
        await env.op.start()  # kopf lists nothing: no object_event
        await until(lambda: "uid-web" in env.hyp.forced, what="the backstop's force")
        assert timedelta(0) <= env.hyp.forced["uid-web"] - deadline < MS

        env.kube.mode = "ok"  # back; kopf's own list never comes: the operator's first relist finds the VM
        await until(lambda: env.shutdown("web").get("outcome") == "Forced", within=10, what="the report")
        record = env.shutdown("web")
        assert datetime.fromisoformat(record["deadline"]) == deadline
        assert datetime.fromisoformat(record["requestedAt"]) == now - timedelta(seconds=25)
        assert datetime.fromisoformat(record["completedAt"]) == env.hyp.forced["uid-web"]
        assert "ForcedOff" in env.events.reasons("web")
        assert domain.starts == 0
        await env.op.stop()

    scenario(run)


def test_a_worker_that_exists_first_takes_the_stop_over_from_the_backstop() -> None:
    async def run() -> None:
        env = Env()
        _domain, now, deadline = stop_known_only_to_libvirt(env)
        await env.op.start()
        env.op.object_event(None, await env.kube.get("ns", "web"))
        await until(lambda: "uid-web" in env.hyp.forced, what="the force")
        assert timedelta(0) <= env.hyp.forced["uid-web"] - deadline < MS, "the status lacked it; the mark kept it"
        await until(lambda: env.shutdown("web").get("outcome") == "Forced", within=10, what="the report")
        assert datetime.fromisoformat(env.shutdown("web")["requestedAt"]) == now - timedelta(seconds=25)
        await env.op.stop()

    scenario(run)


def test_the_stop_is_kept_in_the_domain_before_the_first_request() -> None:
    async def run() -> None:
        env = Env()
        await env.op.start()
        await env.running("web", gracePeriodSeconds=10, retryIntervalSeconds=0)
        env.kube.mode = "hang"
        marks_at_request: list[ShutdownMark | None] = []
        request = env.hyp.request_shutdown

        async def spy(uuid: str, methods: tuple[Any, ...]) -> tuple[str | None, str]:
            marks_at_request.append(env.hyp.by_uuid(uuid).mark)
            return await request(uuid, methods)

        env.hyp.request_shutdown = spy  # type: ignore[method-assign]
        env.edit("web", powerState="Stopped")
        await until(lambda: marks_at_request, what="the request")
        mark = marks_at_request[0]
        assert mark is not None
        assert mark.force
        assert mark.deadline == env.requests("web")[0] + timedelta(seconds=10)
        env.edit("web", powerState="Running")  # cancelled: the mark goes
        await until(lambda: env.domain("web").mark is None, within=5, what="the mark dropped")
        await env.op.stop()

    scenario(run)


def test_a_lost_race_is_decided_again_on_fresh_state() -> None:
    async def run() -> None:
        env = Env()
        await env.op.start()
        await env.running("web", gracePeriodSeconds=0)
        env.kube.edit("web", powerState="Stopped")  # the watch has not delivered it yet
        env.kube.conflicts = 1
        env.hyp.stop(env.domain("web"), StopCause.SHUTDOWN)  # decided on the old spec: started again
        await until(lambda: env.kube.status("web").get("powerState") == "Stopped", within=10, what="the status")
        assert env.state("web") is DomainState.STOPPED, "the edit was seen through the conflict, and acted on"
        assert env.kube.objects["ns", "web"]["status"]["observedGeneration"] == 2
        await env.op.stop()

    scenario(run)


def test_nothing_is_reported_before_libvirt_has_answered_once() -> None:
    async def run() -> None:
        env = Env(libvirt_up=False)
        await env.op.start()
        env.add("web")
        await asyncio.sleep(30)
        assert env.kube.status_writes == []
        assert env.events.posted == []
        env.hyp.connect()
        await until(lambda: env.kube.status("web").get("powerState") == "Running", within=10, what="Running")
        assert all(s.get("powerState") != "Unknown" for _, s in env.kube.status_writes)
        await env.op.stop()

    scenario(run)


def test_a_vm_gone_unheard_is_dropped_at_the_relist_and_its_domain_never_restarted() -> None:
    async def run() -> None:
        env = Env(resync=5)
        await env.op.start()
        await env.running("web")
        await env.running("kept")
        env.kube.vanish("web")  # deleted (finalizer removed by hand) while the watch was cut
        await until(lambda: ("ns", "web") not in env.op.workers, within=15, what="the worker dropped")
        assert ("ns", "kept") in env.op.workers
        starts = env.domain("web").starts
        env.hyp.stop(env.domain("web"), StopCause.SHUTDOWN)
        await asyncio.sleep(30)
        assert env.domain("web").starts == starts, "an orphan is never restarted"
        await env.op.stop()

    scenario(run)


def test_a_bug_in_one_step_shows_on_the_vm_and_the_worker_goes_on() -> None:
    async def run() -> None:
        env = Env()
        await env.op.start()
        observe = env.hyp.observe
        calls = [0]

        async def flaky(name: str) -> Any:
            calls[0] += 1
            if calls[0] == 1:
                raise RuntimeError("a bug")
            return await observe(name)

        env.hyp.observe = flaky  # type: ignore[method-assign]
        await env.running("web")
        assert "ReconcileError" in env.events.reasons("web")
        await env.op.stop()

    scenario(run)


def test_a_request_that_skips_a_disconnected_agent_says_so_in_its_attempt() -> None:
    async def run() -> None:
        env = Env()
        await env.op.start()
        spec = {
            "nodeName": "node-a",
            "shutdownPolicy": {"methods": ["Agent", "ACPI"], "gracePeriodSeconds": 30},
            "domain": {"memoryMiB": 64, "guestAgent": True},
        }
        env.op.object_event("ADDED", env.kube.create("web", spec))
        await until(lambda: env.kube.status("web").get("powerState") == "Running", what="Running")
        assert env.kube.status("web")["agentConnected"] is False
        env.edit("web", powerState="Stopped")
        await until(lambda: env.shutdown("web").get("attempts") == 1, within=10, what="the request reported")
        attempt = env.shutdown("web")["recentAttempts"][-1]
        assert attempt["method"] == "ACPI"
        assert attempt["message"] == "Agent: not connected"
        await env.op.stop()

    scenario(run)


def test_a_file_system_that_hangs_never_holds_back_a_stop_or_its_force() -> None:
    """The storage is looked at only when no stop of a running domain can be at stake."""

    async def run() -> None:
        env = Env()
        await env.op.start()
        await env.running("web", gracePeriodSeconds=10, retryIntervalSeconds=0)
        env.storage.hang = True  # a dead NFS mount: every look from now on waits forever
        asked = env.clock.now()
        env.edit("web", powerState="Stopped")
        await until(lambda: "uid-web" in env.hyp.forced, what="the force")
        (first,) = env.requests("web")
        assert first - asked < MS, "the request went out at once"
        assert timedelta(0) <= env.hyp.forced["uid-web"] - (first + timedelta(seconds=10)) < MS
        await env.op.stop()

    scenario(run)


def test_two_starts_at_once_never_take_the_node_past_its_memory_ceiling() -> None:
    async def run() -> None:
        env = Env("--memory-ceiling-mib", "100")  # room for one 64 MiB VM
        env.hyp.start_seconds = 1.0  # the second start is decided while the first one is under way
        await env.op.start()
        env.add("a", mode="Force")
        env.add("b", mode="Force")

        def one_running_one_waiting() -> bool:
            states = sorted(str(env.kube.status(n).get("powerState")) for n in ("a", "b"))
            reasons = [c["reason"] for n in ("a", "b") for c in env.kube.status(n).get("conditions", [])]
            return states == ["Running", "Stopped"] and "NodeMemoryFull" in reasons

        await until(one_running_one_waiting, what="one VM running, the other held by the ceiling")
        running = next(n for n in ("a", "b") if env.state(n) is DomainState.RUNNING)
        waiting = "b" if running == "a" else "a"
        # Defined or not (both may be defined before either starts), it is never started.
        assert env.domain(waiting) is None or env.domain(waiting).starts == 0
        await asyncio.sleep(60)
        assert env.domain(waiting) is None or env.domain(waiting).starts == 0, "it looks again, still no room"
        env.edit(running, powerState="Stopped")
        await until(lambda: env.state(waiting) is DomainState.RUNNING, what="the second start once memory is free")
        await env.op.stop()

    scenario(run)


def test_many_starts_at_once_share_node_memory_reads_and_stay_under_the_ceiling() -> None:
    """One read serves every start reserved before it began, so a burst costs a few reads, not one each."""

    async def run() -> None:
        env = Env("--memory-ceiling-mib", str(64 * 20 + 32))  # room for 20 of the 30 64 MiB VMs
        reads = 0
        read = env.hyp.node_memory

        async def counted() -> tuple[int, dict[str, int]]:
            nonlocal reads
            reads += 1
            return await read()

        env.op.memory_reads = NodeMemoryReads(counted)
        env.hyp.start_seconds = 0.5
        await env.op.start()
        names = [f"vm-{i}" for i in range(30)]
        for name in names:
            env.add(name, mode="Force")

        def twenty_running() -> bool:
            return sum(env.state(n) is DomainState.RUNNING for n in names) == 20

        await until(twenty_running, what="twenty running")
        await asyncio.sleep(60)
        assert sum(env.state(n) is DomainState.RUNNING for n in names) == 20, "never past the ceiling"
        held = [n for n in names if env.state(n) is not DomainState.RUNNING]
        assert all("NodeMemoryFull" in [c["reason"] for c in env.kube.status(n)["conditions"]] for n in held)
        assert reads < 30, f"{reads} reads for 30 starts at once"
        await env.op.stop()

    scenario(run)


def test_a_failed_look_at_the_node_memory_is_that_vms_failure_and_it_starts_once_libvirt_answers() -> None:
    async def run() -> None:
        env = Env()
        await env.op.start()
        env.hyp.broken[""] = "cannot list domains"  # the node-wide calls fail; per-domain calls work
        env.add("web")
        await until(lambda: "ActionFailed" in env.events.reasons("web"), what="the failure reported")
        assert env.domain("web") is None, "neither defined nor started without knowing the node's memory"
        del env.hyp.broken[""]
        await until(lambda: env.state("web") is DomainState.RUNNING, what="the start after libvirt answers")
        await env.op.stop()

    scenario(run)


def test_the_force_is_decided_a_second_ahead_and_sent_at_the_deadline() -> None:
    """At a deadline nothing is left to do but send the destroy: the step that decides it runs a second before,
    and no request is re-sent in that second (the one due at 9 s of a 10 s grace is not sent)."""

    async def run() -> None:
        env = Env()
        await env.op.start()
        await env.running("web", gracePeriodSeconds=10, retryIntervalSeconds=3)
        env.edit("web", powerState="Stopped")
        await until(lambda: "uid-web" in env.hyp.forced, what="the force")
        deadline = env.requests("web")[0] + timedelta(seconds=10)
        [(uuid, armed_at)] = env.hyp.armed
        assert uuid == "uid-web"
        assert timedelta(0) <= armed_at - (deadline - timedelta(seconds=1)) < MS, "armed a second ahead"
        assert [(at - env.requests("web")[0]).total_seconds() for at in env.requests("web")] == [0, 3, 6]
        assert timedelta(0) <= env.hyp.forced["uid-web"] - deadline < MS
        await until(lambda: env.shutdown("web").get("outcome") == "Forced", what="the report")
        assert env.events.reasons("web").count("ForcedOff") == 1
        await env.op.stop()

    scenario(run)


def test_a_new_vm_has_its_status_written_once_where_it_settles() -> None:
    """Initializing, Defining and Starting last as long as a step: the status is written when the VM runs."""

    async def run() -> None:
        env = Env()
        await env.op.start()
        await asyncio.sleep(1)  # the node read and listed: a new VM's maintenance turn is known at once
        await env.running("web")
        await asyncio.sleep(10)
        writes = [s for key, s in env.kube.status_writes if key == ("ns", "web")]
        assert [s["powerState"] for s in writes] == ["Running"]
        assert env.events.reasons("web") == ["Starting"], "one Event for a new VM"
        await env.op.stop()

    scenario(run)


@pytest.mark.parametrize("news", ["guest powers off", "spec back to Running"])
def test_news_in_the_last_second_calls_the_armed_force_off(news: str) -> None:
    async def run() -> None:
        env = Env()
        await env.op.start()
        await env.running("web", gracePeriodSeconds=10, retryIntervalSeconds=0)
        env.edit("web", powerState="Stopped")
        await until(lambda: env.hyp.armed, what="the force armed")
        await asyncio.sleep(0.5)
        if news == "guest powers off":
            env.hyp.stop(env.domain("web"), StopCause.SHUTDOWN)
            outcome = "Graceful"
        else:
            env.edit("web", powerState="Running")
            outcome = "Cancelled"
        await asyncio.sleep(5)
        assert "uid-web" not in env.hyp.forced
        assert [uuid for uuid, _at in env.hyp.called_off] == ["uid-web"]
        await until(lambda: env.shutdown("web").get("outcome") == outcome, what=f"outcome {outcome}")
        await env.op.stop()

    scenario(run)


def test_a_state_that_lasts_is_written_while_it_lasts() -> None:
    """A start that takes 30 s (a QEMU that is slow to launch): what was decided before it is written within
    HOLD_MAX, not when the start ends."""

    async def run() -> None:
        env = Env()
        env.hyp.start_seconds = 30
        await env.op.start()
        await asyncio.sleep(1)
        added = asyncio.get_running_loop().time()
        env.add("web")
        await until(lambda: env.kube.status("web").get("powerState"), within=20, what="a status during the start")
        assert asyncio.get_running_loop().time() - added <= HOLD_MAX + 0.1
        assert env.state("web") is DomainState.STOPPED, "the start is still under way"
        ready = next(c for c in env.kube.status("web")["conditions"] if c["type"] == "Ready")
        assert ready["status"] == "False"
        await until(lambda: env.kube.status("web").get("powerState") == "Running", within=60, what="Running")
        await env.op.stop()

    scenario(run)


def test_an_operator_restarted_under_steady_vms_writes_nothing_and_does_nothing() -> None:
    async def run() -> None:
        env = Env()
        await env.op.start()
        for name in ("web", "db"):
            await env.running(name)
        await asyncio.sleep(10)
        await env.op.stop()
        writes, posted = len(env.kube.status_writes), len(env.events.posted)
        starts = {name: env.domain(name).starts for name in ("web", "db")}

        metrics = Metrics()
        restarted = Operator(
            env.op.settings,
            kube=env.kube,  # type: ignore[arg-type]
            hypervisor=env.hyp,  # type: ignore[arg-type]
            events=env.events,  # type: ignore[arg-type]
            metrics=metrics,
            clock=env.clock,
            storage=env.storage,  # type: ignore[arg-type]
        )
        await restarted.start()
        for name in ("web", "db"):
            restarted.object_event(None, await env.kube.get("ns", name))  # kopf's first list
        await until(
            lambda: metrics.registry.get_sample_value("vmop_virtual_machines_reconciled") == 2,
            within=10,
            what="both VMs looked at once",
        )
        await asyncio.sleep(30)
        assert len(env.kube.status_writes) == writes
        assert len(env.events.posted) == posted
        assert {name: env.domain(name).starts for name in ("web", "db")} == starts
        restarted.object_event("DELETED", await env.kube.get("ns", "db"))
        assert metrics.registry.get_sample_value("vmop_virtual_machines_reconciled") == 1
        await restarted.stop()

    scenario(run)
