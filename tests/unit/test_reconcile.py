"""The reconcile decision, driven like the shell drives it: on a fake clock, against a fake libvirt domain."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import pytest

from controller.api import (
    DomainSpec,
    ObservedPowerState,
    PowerState,
    RestartPolicy,
    ShutdownMethod,
    ShutdownMode,
    ShutdownOutcome,
    ShutdownPolicy,
    ShutdownPurpose,
    VirtualMachineSpec,
    VirtualMachineStatus,
)
from controller.maintenance import NO_TURN, Turn
from controller.nodepolicy import NodeMemory, Refusal
from controller.reconcile import (
    NODE_MEMORY_RETRY,
    RAN_LONG_ENOUGH,
    ActionKind,
    Domain,
    DomainState,
    Failure,
    Plan,
    Settings,
    StopCause,
    VirtualMachine,
    after_request,
    crash_loop_delay,
    decide,
    unreachable,
)
from tests.unit.clock import T0, US, s

UID = "5f0c1d3e-0000-4000-8000-000000000001"
HASH = "hash-1"
RESYNC = Settings().resync

A = ActionKind
RUNNING, STOPPED, PAUSED = PowerState.RUNNING, PowerState.STOPPED, PowerState.PAUSED


def make_spec(
    power: PowerState = RUNNING, restart: RestartPolicy = RestartPolicy.ALWAYS, **policy: object
) -> VirtualMachineSpec:
    return VirtualMachineSpec(
        node_name="node-a",
        power_state=power,
        restart_policy=restart,
        shutdown_policy=ShutdownPolicy.model_validate(policy),
        domain=DomainSpec(memory_mib=64),
    )


def make_vm(spec: VirtualMachineSpec | None = None, **changes: Any) -> VirtualMachine:
    """A new VirtualMachine; pass spec=None with spec_error=... for one whose spec cannot be read."""
    vm = VirtualMachine(
        namespace="ns",
        name="vm1",
        uid=UID,
        generation=1,
        deleting=False,
        has_finalizer=False,
        restart_token=None,
        spec=make_spec(),
        status=VirtualMachineStatus(),
    )
    return replace(vm, spec=spec if spec is not None or "spec_error" in changes else vm.spec, **changes)


def cond(status: VirtualMachineStatus, type_: str) -> tuple[str, str] | None:
    c = status.condition(type_)
    return None if c is None else (c.status, c.reason)


def kinds(plan: Plan) -> list[tuple[str, str]]:
    return [(e.type, e.reason) for e in plan.events]


@dataclass
class World:
    """The shell and libvirt, faked: applies plans, executes actions on a fake domain, and holds the clock."""

    vm: VirtualMachine
    domain: Domain | None = None
    now: datetime = T0
    spec_hash: str = HASH
    refusals: tuple[Refusal, ...] = ()
    node_memory: NodeMemory | None = None
    storage_hash: str | None = None  # what the storage resolves to now (None: not looked at in this step)
    events: list[tuple[str, str]] = field(default_factory=list)
    actions: list[tuple[ActionKind, datetime]] = field(default_factory=list)
    plans: list[Plan] = field(default_factory=list)
    gone: bool = False
    # Actions libvirt refuses, with its message; the shell's report of the last refusal, and its backoff.
    refuse: dict[ActionKind, str] = field(default_factory=dict)
    failure: Failure | None = None
    retry: timedelta = timedelta(seconds=2)
    turn: Turn = NO_TURN  # what the node's maintenance asks of this VM

    @property
    def status(self) -> VirtualMachineStatus:
        return self.vm.status

    @property
    def spec(self) -> VirtualMachineSpec:
        assert self.vm.spec is not None
        return self.vm.spec

    def decide(self) -> Plan:
        return decide(
            self.vm,
            self.domain,
            self.now,
            expected_spec_hash=self.spec_hash,
            expected_storage_hash=self.storage_hash,
            refusals=self.refusals,
            node_memory=self.node_memory,
            failure=self.failure,
            turn=self.turn,
        )

    def step(self) -> Plan:
        """One reconcile: decide, write the status, post the events, execute the action."""
        plan = self.decide()
        self.plans.append(plan)
        status = plan.status
        if plan.action is not None and plan.action.kind is A.REQUEST_SHUTDOWN:
            assert status.shutdown is not None
            assert status.shutdown.deadline is not None, "the deadline is written before the request is sent"
            status, sent = after_request(status, method=plan.action.methods[0].value, refusals="", now=self.now)
            self.events.extend(kinds(plan))
            self.events.extend((event.type, event.reason) for event in sent)
        else:
            self.events.extend(kinds(plan))
        self.vm = replace(self.vm, status=status)
        if plan.action is not None:
            self.actions.append((plan.action.kind, self.now))
            kind = plan.action.kind
            if kind in self.refuse:
                hash_ = self.spec_hash if kind is A.DEFINE else None
                self.failure = Failure(kind, self.refuse[kind], self.now + self.retry, spec_hash=hash_)
            else:
                self.failure = None
                self.execute(kind)
        return plan

    def execute(self, kind: ActionKind) -> None:
        dom = self.domain
        match kind:
            case A.ADD_FINALIZER:
                self.vm = replace(self.vm, has_finalizer=True)
            case A.REMOVE_FINALIZER:
                self.vm = replace(self.vm, has_finalizer=False)
                self.gone = self.vm.deleting
            case A.DEFINE if dom is None:
                self.domain = Domain(
                    "dom-uuid", self.vm.uid, self.spec_hash, DomainState.STOPPED, storage_hash=self.storage_hash
                )
            case A.DEFINE:
                assert dom is not None
                self.domain = replace(dom, spec_hash=self.spec_hash, storage_hash=self.storage_hash)
            case A.UNDEFINE:
                assert dom is not None
                assert dom.state is DomainState.STOPPED
                self.domain = None
            case A.START | A.RESUME | A.WAKE_UP:
                assert dom is not None
                self.domain = replace(dom, state=DomainState.RUNNING, stop_cause=None)
            case A.SUSPEND:
                assert dom is not None
                self.domain = replace(dom, state=DomainState.PAUSED)
            case A.FORCE_OFF:
                self.stops(StopCause.DESTROYED)
            case A.REQUEST_SHUTDOWN:
                pass  # the guest decides; tests make it stop with stops()

    def settle(self, limit: int = 20) -> list[ActionKind]:
        """Reconcile until there is nothing to do now; the actions taken, in order."""
        taken: list[ActionKind] = []
        for _ in range(limit):
            if self.gone:
                return taken
            plan = self.step()
            if plan.action is None:
                return taken
            taken.append(plan.action.kind)
        raise AssertionError(f"no fixed point: {taken}")

    def run_until(self, until: datetime) -> list[tuple[ActionKind, datetime]]:
        """Reconcile, sleeping until each plan's wake_at, up to `until`; the actions taken and when."""
        start = len(self.actions)
        for _ in range(10_000):
            plan = self.step()
            if plan.action is not None or self.gone:
                if self.gone:
                    break
                continue
            assert plan.wake_at is not None
            assert plan.wake_at > self.now
            if plan.wake_at > until:
                break
            self.now = plan.wake_at
        return self.actions[start:]

    def advance(self, delta: timedelta) -> None:
        self.now += delta

    def edit(self, spec: VirtualMachineSpec | None = None, **changes: object) -> None:
        """A user's edit of the spec: a new generation."""
        new = spec or self.spec.model_copy(update=changes)
        self.vm = replace(self.vm, spec=new, generation=self.vm.generation + 1)

    def edit_policy(self, **changes: object) -> None:
        self.edit(shutdown_policy=self.spec.shutdown_policy.model_copy(update=changes))

    def stops(self, cause: StopCause) -> None:
        assert self.domain is not None
        self.domain = replace(self.domain, state=DomainState.STOPPED, stop_cause=cause)

    def restart(self, token: str) -> None:
        self.vm = replace(self.vm, restart_token=token)

    def delete(self) -> None:
        self.vm = replace(self.vm, deleting=True)


def running(spec: VirtualMachineSpec | None = None, **vm_changes: Any) -> World:
    """A VM created and brought to its desired power state by the operator, settled."""
    w = World(make_vm(spec, **vm_changes))
    w.settle()
    assert w.domain is not None
    assert cond(w.status, "Ready") == ("True", w.spec.power_state.value)
    w.events.clear()
    w.actions.clear()
    w.plans.clear()
    return w


def stopped_as_asked(w: World) -> None:
    """powerState Stopped, the request sent, the guest shut itself down, and the stop recorded."""
    w.edit(power_state=STOPPED)
    w.settle()
    w.stops(StopCause.SHUTDOWN)
    w.settle()


def stopping(spec: VirtualMachineSpec | None = None) -> World:
    """A running VM asked to stop (graceful): the first request has been sent at T0."""
    w = running(spec)
    w.edit(power_state=STOPPED)
    action = w.step().action
    assert action is not None
    assert action.kind is A.REQUEST_SHUTDOWN
    return w


def assert_fixed_point(w: World) -> None:
    """Deciding again on the written status changes nothing, posts nothing and does nothing."""
    first, second = w.decide(), w.decide()
    assert first == second
    assert first.action is None
    assert first.events == ()
    assert first.status == w.status


# --- creation and steady state -------------------------------------------------------------------------


def test_new_vm_adds_the_finalizer_then_defines_then_starts() -> None:
    w = World(make_vm())
    assert w.settle() == [A.ADD_FINALIZER, A.DEFINE, A.START]
    # One Event for a new VM: its start, which names the domain just defined (no Defined Event before it).
    assert w.events == [("Normal", "Starting")]
    start = next(plan for plan in w.plans if plan.action is not None and plan.action.kind is A.START)
    assert start.events[0].message == "starting (libvirt domain ns_vm1, first start)"
    assert w.status.domain_name == "ns_vm1"
    assert w.status.domain_uuid == "dom-uuid"
    assert w.status.power_state is ObservedPowerState.RUNNING
    assert cond(w.status, "Ready") == ("True", "Running")
    assert cond(w.status, "Synced") == ("True", "Reconciled")
    assert w.status.observed_generation == 1
    assert w.status.shutdown is None


def test_a_new_vm_with_power_state_stopped_is_defined_and_not_started() -> None:
    w = World(make_vm(make_spec(STOPPED)))
    assert w.settle() == [A.ADD_FINALIZER, A.DEFINE]
    assert w.events == [("Normal", "Defined")]
    assert cond(w.status, "Ready") == ("True", "Stopped")
    assert w.status.shutdown is None


def test_running_and_desired_running_takes_no_action_and_is_ready() -> None:
    w = running()
    plan = w.decide()
    assert plan.action is None
    assert plan.events == ()
    assert plan.wake_at == w.now + RESYNC
    assert cond(plan.status, "Ready") == ("True", "Running")
    assert cond(plan.status, "Synced") == ("True", "Reconciled")


def test_conditions_follow_the_api_conventions() -> None:
    w = running()
    ready = w.status.condition("Ready")
    assert ready is not None
    assert ready.observed_generation == 1
    assert ready.last_transition_time.tzinfo is not None
    # A later decide with nothing changed keeps lastTransitionTime.
    w.advance(s(3600))
    assert w.decide().status.condition("Ready") == ready


def _scenario_running() -> World:
    return running()


def _scenario_stopped() -> World:
    w = stopping()
    w.stops(StopCause.SHUTDOWN)
    w.settle()
    return w


def _scenario_waiting() -> World:
    w = stopping()
    w.step()  # the shell decides again at once after an action: this generation is now settled
    w.advance(s(1))
    return w


def _scenario_overdue() -> World:
    w = stopping(make_spec(grace_period_seconds=5, retry_interval_seconds=0, force_after_deadline=False))
    w.run_until(T0 + s(6))
    return w


def _scenario_held() -> World:
    w = running(make_spec(restart=RestartPolicy.NEVER))
    w.stops(StopCause.SHUTDOWN)
    w.settle()
    return w


def _scenario_paused() -> World:
    w = running(make_spec(PAUSED))
    w.settle()
    return w


def _scenario_conflict() -> World:
    w = World(make_vm(has_finalizer=True), domain=Domain("x", "someone-else", None, DomainState.RUNNING))
    w.settle()
    return w


def _scenario_storage() -> World:
    w = World(
        make_vm(has_finalizer=True),
        refusals=(Refusal("StorageNotAllowed", "disk /etc/shadow is outside /var/lib/vmop"),),
    )
    w.settle()
    return w


def _scenario_invalid() -> World:
    w = World(make_vm(spec=None, spec_error="memoryMiB: field required", has_finalizer=True))
    w.settle()
    return w


@pytest.mark.parametrize(
    "scenario",
    [
        _scenario_running,
        _scenario_stopped,
        _scenario_waiting,
        _scenario_overdue,
        _scenario_held,
        _scenario_paused,
        _scenario_conflict,
        _scenario_storage,
        _scenario_invalid,
    ],
)
def test_idempotent_once_the_status_is_written(scenario: Callable[[], World]) -> None:
    assert_fixed_point(scenario())


def progress(status: VirtualMachineStatus) -> tuple[tuple[str, str] | None, tuple[str, str] | None]:
    return cond(status, "Reconciling"), cond(status, "Stalled")


@pytest.mark.parametrize(
    ("scenario", "expected"),
    [
        (_scenario_running, (None, None)),
        (_scenario_stopped, (None, None)),
        (_scenario_paused, (None, None)),
        (_scenario_waiting, (("True", "ShuttingDown"), None)),
        (_scenario_held, (None, ("True", "StoppedGuestInitiated"))),  # left off by restartPolicy Never
        (_scenario_overdue, (None, ("True", "ShutdownOverdue"))),
        (_scenario_conflict, (None, ("True", "DomainConflict"))),
        (_scenario_storage, (None, ("True", "StorageNotAllowed"))),
        (_scenario_invalid, (None, ("True", "InvalidSpec"))),
    ],
)
def test_reconciling_and_stalled_are_present_only_while_true(
    scenario: Callable[[], World], expected: tuple[tuple[str, str] | None, tuple[str, str] | None]
) -> None:
    """What kstatus (Flux's health check) reads: InProgress while Reconciling, Failed while Stalled."""
    assert progress(scenario().status) == expected


def test_reconciling_follows_a_start_and_a_stop_and_goes_when_they_are_done() -> None:
    w = World(make_vm())
    seen = []
    for _ in range(10):
        plan = w.step()
        seen.append(progress(plan.status))
        if plan.action is None:
            break
    assert seen[0] == (("True", "Initializing"), None)
    assert (("True", "Starting"), None) in seen
    assert seen[-1] == (None, None)
    w.edit(power_state=STOPPED)
    assert progress(w.step().status) == (("True", "ShuttingDown"), None)
    w.stops(StopCause.SHUTDOWN)
    w.settle()
    assert progress(w.status) == (None, None)


def test_a_running_vm_whose_new_spec_the_node_refuses_is_stalled_though_ready() -> None:
    w = running()
    w.refusals = (Refusal("NetworkNotAllowed", "bridge br9 is not allowed on this node"),)
    w.edit(power_state=RUNNING, restart_policy=RestartPolicy.NEVER)
    w.settle()
    assert cond(w.status, "Ready") == ("True", "Running")
    assert progress(w.status) == (None, ("True", "NetworkNotAllowed"))
    w.refusals = ()
    w.settle()
    assert progress(w.status) == (None, None)


def test_waiting_for_node_memory_is_reconciling_not_stalled() -> None:
    """The VM starts by itself once memory frees up: no person needs to act."""
    w = World(make_vm(has_finalizer=True), node_memory=NodeMemory(committed_mib=0, ceiling_mib=32))
    w.settle()
    reconciling, stalled = progress(w.status)
    assert reconciling == ("True", "NodeMemoryFull")
    assert stalled is None


def test_deciding_twice_on_the_same_inputs_gives_the_same_plan() -> None:
    w = World(make_vm(has_finalizer=True))
    assert w.decide() == w.decide()
    w = stopping()
    w.advance(s(10))
    first = w.decide()
    assert first == w.decide()
    assert first.action is not None
    assert first.action.kind is A.REQUEST_SHUTDOWN


# --- graceful stop -------------------------------------------------------------------------------------


def test_deadline_is_in_the_status_of_the_plan_that_sends_the_first_request() -> None:
    w = running(make_spec(grace_period_seconds=90))
    w.now = T0 + US
    w.edit(power_state=STOPPED)
    plan = w.decide()
    assert plan.action is not None
    assert plan.action.kind is A.REQUEST_SHUTDOWN
    record = plan.status.shutdown
    assert record is not None
    assert record.purpose is ShutdownPurpose.STOP
    assert record.requested_at == T0 + US
    assert record.deadline == T0 + US + s(90)
    assert record.outcome is None
    assert plan.status.power_state is ObservedPowerState.SHUTTING_DOWN
    assert cond(plan.status, "Ready") == ("False", "ShuttingDown")
    assert kinds(plan) == [("Normal", "StopRequested")]
    assert "ACPI" in plan.events[0].message
    assert (T0 + US + s(90)).isoformat() in plan.events[0].message


def test_cooperative_guest_stops_gracefully() -> None:
    w = stopping(make_spec(grace_period_seconds=60))
    w.advance(s(3) + US)
    w.stops(StopCause.SHUTDOWN)
    assert w.settle() == []
    record = w.status.shutdown
    assert record is not None
    assert record.outcome is ShutdownOutcome.GRACEFUL
    assert record.completed_at == T0 + s(3) + US
    assert record.attempts == 1
    assert w.events[-1] == ("Normal", "StoppedGracefully")
    assert w.status.power_state is ObservedPowerState.STOPPED
    assert cond(w.status, "Ready") == ("True", "Stopped")
    assert cond(w.status, "ShutdownOverdue") is None
    assert_fixed_point(w)


def test_stubborn_guest_gets_resends_then_is_forced_exactly_at_the_deadline() -> None:
    w = running(make_spec(grace_period_seconds=35, retry_interval_seconds=10))
    w.edit(power_state=STOPPED)
    taken = w.run_until(T0 + s(34))
    assert taken == [(A.REQUEST_SHUTDOWN, T0 + s(k)) for k in (0, 10, 20, 30)]
    assert [e for e in w.events if e[0] == "Normal"] == [
        ("Normal", "StopRequested"),
        ("Normal", "ShutdownRequested"),
    ] + [("Normal", "ShutdownRequestResent")] * 2  # requests 2 and 4; request 3 is counted, not posted
    record = w.status.shutdown
    assert record is not None
    assert record.attempts == 4
    assert [a.method for a in record.recent_attempts] == ["ACPI"] * 4
    assert w.decide().wake_at == T0 + s(35)

    w.now = T0 + s(35) - US
    assert w.decide().action is None
    w.now = T0 + s(35)
    assert w.settle() == [A.FORCE_OFF]
    record = w.status.shutdown
    assert record is not None
    assert record.outcome is ShutdownOutcome.FORCED
    assert record.method == "Force"
    assert record.deadline == T0 + s(35)
    assert w.events[-1] == ("Normal", "ForcedOff")
    assert cond(w.status, "Ready") == ("True", "Stopped")


@pytest.mark.parametrize(
    ("grace", "interval", "now", "wake_at"),
    [(120, 10, s(1), s(10)), (5, 10, s(1), s(5)), (60, 0, s(1), s(60)), (60, 10, s(55), s(60))],
)
def test_wake_at_is_the_next_retry_or_the_deadline_whichever_first(
    grace: int, interval: int, now: timedelta, wake_at: timedelta
) -> None:
    w = running(make_spec(grace_period_seconds=grace, retry_interval_seconds=interval))
    w.edit(power_state=STOPPED)
    w.run_until(T0 + now)
    w.now = T0 + now
    plan = w.decide()
    assert plan.action is None
    assert plan.wake_at == T0 + wake_at


def test_methods_are_passed_to_the_action_in_order() -> None:
    w = running(make_spec(methods=[ShutdownMethod.AGENT, ShutdownMethod.ACPI]))
    assert w.domain is not None
    w.domain = replace(w.domain, agent_connected=True)
    w.edit(power_state=STOPPED)
    plan = w.step()
    assert plan.action is not None
    assert plan.action.methods == (ShutdownMethod.AGENT, ShutdownMethod.ACPI)
    record = w.status.shutdown
    assert record is not None
    assert record.method == "Agent"
    assert record.recent_attempts[-1].method == "Agent"


def test_attempts_are_bounded_to_the_last_ten() -> None:
    w = running(make_spec(grace_period_seconds=3600, retry_interval_seconds=1))
    w.edit(power_state=STOPPED)
    w.run_until(T0 + s(14))
    record = w.status.shutdown
    assert record is not None
    assert record.attempts == 15
    assert [a.time for a in record.recent_attempts] == [T0 + s(k) for k in range(5, 15)]


def test_mode_force_turns_off_at_once() -> None:
    w = running(make_spec(mode=ShutdownMode.FORCE))
    w.edit(power_state=STOPPED)
    plan = w.step()
    assert plan.action is not None
    assert plan.action.kind is A.FORCE_OFF
    assert kinds(plan) == [("Normal", "ForcingOff")]
    assert w.settle() == []
    record = w.status.shutdown
    assert record is not None
    assert record.outcome is ShutdownOutcome.FORCED
    assert record.attempts == 0


def test_switching_to_force_mid_shutdown_forces_at_once() -> None:
    w = stopping(make_spec(grace_period_seconds=120))
    w.advance(s(7))
    w.edit_policy(mode=ShutdownMode.FORCE)
    assert w.settle() == [A.FORCE_OFF]
    record = w.status.shutdown
    assert record is not None
    assert record.outcome is ShutdownOutcome.FORCED
    assert record.deadline == T0 + s(7)


def test_lowering_the_grace_period_mid_shutdown_brings_the_deadline_forward() -> None:
    w = stopping(make_spec(grace_period_seconds=120, retry_interval_seconds=0))
    w.advance(s(5))
    w.edit_policy(grace_period_seconds=30)
    plan = w.step()
    assert plan.status.shutdown is not None
    assert plan.status.shutdown.deadline == T0 + s(30)
    assert plan.wake_at == T0 + s(30)
    assert w.run_until(T0 + s(60)) == [(A.FORCE_OFF, T0 + s(30))]


def test_raising_the_grace_period_mid_shutdown_never_pushes_the_deadline_back() -> None:
    w = stopping(make_spec(grace_period_seconds=30, retry_interval_seconds=0))
    w.advance(s(5))
    w.edit_policy(grace_period_seconds=3600)
    plan = w.step()
    assert plan.status.shutdown is not None
    assert plan.status.shutdown.deadline == T0 + s(30)
    assert w.run_until(T0 + s(60)) == [(A.FORCE_OFF, T0 + s(30))]


def test_a_restarted_operator_keeps_the_original_deadline() -> None:
    w = running(make_spec(grace_period_seconds=60, retry_interval_seconds=0))
    w.edit(power_state=STOPPED)
    first = w.decide()
    # The status is written, then the operator is killed before it sends the request.
    stored = VirtualMachineStatus.model_validate(first.status.model_dump(by_alias=True, mode="json"))
    w.vm = replace(w.vm, status=stored)
    w.now = T0 + s(20)
    plan = w.step()
    assert plan.action is not None
    assert plan.action.kind is A.REQUEST_SHUTDOWN
    assert kinds(plan) == []  # the stop was announced already
    assert plan.status.shutdown == first.status.shutdown
    # Killed again after the request; a new process forces at the original deadline, not one from now.
    w.now = T0 + s(40)
    assert w.run_until(T0 + s(200)) == [(A.FORCE_OFF, T0 + s(60))]


# --- forceAfterDeadline: false -------------------------------------------------------------------------


def test_force_after_deadline_false_never_forces_reports_overdue_once_and_keeps_asking() -> None:
    w = running(make_spec(grace_period_seconds=20, retry_interval_seconds=10, force_after_deadline=False))
    w.edit(power_state=STOPPED)
    taken = w.run_until(T0 + s(100))
    assert taken == [(A.REQUEST_SHUTDOWN, T0 + s(k)) for k in range(0, 101, 10)]
    assert w.events.count(("Warning", "ShutdownOverdue")) == 1
    assert cond(w.status, "ShutdownOverdue") == ("True", "DeadlinePassed")
    # Before the deadline Ready says shutting down; from the deadline on it says overdue, re-sends included.
    for plan in w.plans:
        overdue_now = cond(plan.status, "ShutdownOverdue")
        ready = cond(plan.status, "Ready")
        assert ready is not None
        if overdue_now == ("True", "DeadlinePassed"):
            assert ready == ("False", "ShutdownOverdue")
        else:
            assert ready == ("False", "ShuttingDown")
    assert_fixed_point(w)

    w.advance(s(1))
    w.stops(StopCause.SHUTDOWN)
    assert w.settle() == []
    assert w.status.shutdown is not None
    assert w.status.shutdown.outcome is ShutdownOutcome.GRACEFUL
    assert cond(w.status, "ShutdownOverdue") == ("False", "Stopped")
    assert cond(w.status, "Ready") == ("True", "Stopped")


def test_overdue_is_reported_at_the_deadline_not_before() -> None:
    w = running(make_spec(grace_period_seconds=30, retry_interval_seconds=0, force_after_deadline=False))
    w.edit(power_state=STOPPED)
    w.run_until(T0 + s(30) - US)
    w.now = T0 + s(30) - US
    assert cond(w.decide().status, "ShutdownOverdue") is None
    w.now = T0 + s(30)
    plan = w.step()
    assert plan.action is None
    assert kinds(plan) == [("Warning", "ShutdownOverdue")]
    assert cond(plan.status, "ShutdownOverdue") == ("True", "DeadlinePassed")


def test_overdue_then_mode_force_forces_at_once() -> None:
    w = running(make_spec(grace_period_seconds=5, retry_interval_seconds=0, force_after_deadline=False))
    w.edit(power_state=STOPPED)
    w.run_until(T0 + s(50))
    w.now = T0 + s(50)
    w.edit_policy(mode=ShutdownMode.FORCE)
    assert w.settle() == [A.FORCE_OFF]
    assert w.status.shutdown is not None
    assert w.status.shutdown.outcome is ShutdownOutcome.FORCED
    assert cond(w.status, "ShutdownOverdue") == ("False", "Stopped")


def test_running_again_when_overdue_cancels_and_clears_overdue() -> None:
    w = running(make_spec(grace_period_seconds=5, retry_interval_seconds=0, force_after_deadline=False))
    w.edit(power_state=STOPPED)
    w.run_until(T0 + s(10))
    assert cond(w.status, "ShutdownOverdue") == ("True", "DeadlinePassed")
    w.now = T0 + s(10)
    w.edit(power_state=RUNNING)
    assert w.settle() == []
    assert cond(w.status, "ShutdownOverdue") == ("False", "Cancelled")
    assert cond(w.status, "Ready") == ("True", "Running")
    assert w.status.shutdown is not None
    assert w.status.shutdown.outcome is ShutdownOutcome.CANCELLED


# --- changing one's mind -------------------------------------------------------------------------------


def test_running_again_during_a_graceful_stop_cancels_it_and_nothing_is_forced() -> None:
    w = stopping(make_spec(grace_period_seconds=30, retry_interval_seconds=10))
    w.advance(s(5))
    w.edit(power_state=RUNNING)
    plan = w.step()
    assert plan.action is None
    assert kinds(plan) == [("Normal", "StopCancelled")]
    record = w.status.shutdown
    assert record is not None
    assert record.outcome is ShutdownOutcome.CANCELLED
    assert record.completed_at == T0 + s(5)
    assert cond(w.status, "Ready") == ("True", "Running")
    assert w.status.power_state is ObservedPowerState.RUNNING
    assert w.run_until(T0 + s(120)) == []
    assert_fixed_point(w)


def test_a_guest_that_powers_off_anyway_after_a_cancelled_stop_is_started_again() -> None:
    w = stopping(make_spec(grace_period_seconds=30, restart=RestartPolicy.NEVER))
    w.advance(s(5))
    w.edit(power_state=RUNNING)
    w.settle()
    w.advance(s(2))
    w.stops(StopCause.SHUTDOWN)  # the guest heard the earlier request
    assert w.settle() == [A.START]
    assert w.domain is not None
    assert w.domain.state is DomainState.RUNNING
    assert A.FORCE_OFF not in [k for k, _ in w.actions]


def test_stopping_a_paused_vm_sets_the_deadline_before_it_resumes_the_guest() -> None:
    w = running(make_spec(PAUSED, grace_period_seconds=60))
    w.settle()
    w.edit(power_state=STOPPED)
    plan = w.step()
    assert plan.action is not None
    assert plan.action.kind is A.RESUME
    assert plan.status.shutdown is not None, "the stop is recorded before the resume"
    assert plan.status.shutdown.deadline == T0 + s(60)
    assert plan.shutdown_mark is not None
    assert plan.shutdown_mark.deadline == T0 + s(60)
    assert cond(plan.status, "Ready") == ("False", "Resuming")
    w.advance(s(4))
    plan = w.step()
    assert plan.action is not None
    assert plan.action.kind is A.REQUEST_SHUTDOWN
    assert plan.status.shutdown is not None
    assert plan.status.shutdown.requested_at == T0
    assert plan.status.shutdown.deadline == T0 + s(60), "the resume does not move the deadline"


def test_a_paused_guest_that_pauses_again_is_forced_at_the_deadline() -> None:
    """A guest paused on an I/O error pauses again at once when resumed: the deadline still forces it."""
    w = running(make_spec(PAUSED, grace_period_seconds=60))
    w.settle()
    w.edit(power_state=STOPPED)

    def step_and_pause_again() -> ActionKind | None:
        plan = w.step()
        assert w.domain is not None
        w.domain = replace(w.domain, state=DomainState.PAUSED)
        return plan.action.kind if plan.action else None

    assert step_and_pause_again() is A.RESUME
    w.advance(s(60) - US)
    assert step_and_pause_again() is A.RESUME
    w.advance(US)
    assert step_and_pause_again() is A.FORCE_OFF


def test_stopping_a_paused_vm_with_mode_force_does_not_resume() -> None:
    w = running(make_spec(PAUSED, mode=ShutdownMode.FORCE))
    w.settle()
    w.edit(power_state=STOPPED)
    assert w.settle() == [A.FORCE_OFF]


def test_paused_is_reached_by_suspend_and_left_by_resume() -> None:
    w = running()
    w.edit(power_state=PAUSED)
    plan = w.step()
    assert plan.action is not None
    assert plan.action.kind is A.SUSPEND
    assert w.settle() == []
    assert cond(w.status, "Ready") == ("True", "Paused")
    assert w.status.power_state is ObservedPowerState.PAUSED
    w.edit(power_state=RUNNING)
    assert w.settle() == [A.RESUME]
    assert cond(w.status, "Ready") == ("True", "Running")


# --- drift and restartPolicy ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "cause", "outcome", "restarted"),
    [
        (RestartPolicy.ALWAYS, StopCause.DESTROYED, ShutdownOutcome.DESTROYED, True),
        (RestartPolicy.ALWAYS, StopCause.SHUTDOWN, ShutdownOutcome.GUEST_INITIATED, True),
        (RestartPolicy.ALWAYS, StopCause.CRASHED, ShutdownOutcome.CRASHED, True),
        (RestartPolicy.ON_FAILURE, StopCause.DESTROYED, ShutdownOutcome.DESTROYED, True),
        (RestartPolicy.ON_FAILURE, StopCause.SHUTDOWN, ShutdownOutcome.GUEST_INITIATED, False),
        (RestartPolicy.ON_FAILURE, StopCause.CRASHED, ShutdownOutcome.CRASHED, True),
        (RestartPolicy.NEVER, StopCause.DESTROYED, ShutdownOutcome.DESTROYED, False),
        (RestartPolicy.NEVER, StopCause.SHUTDOWN, ShutdownOutcome.GUEST_INITIATED, False),
        (RestartPolicy.NEVER, StopCause.CRASHED, ShutdownOutcome.CRASHED, False),
    ],
)
def test_unasked_stops_follow_the_restart_policy(
    policy: RestartPolicy, cause: StopCause, outcome: ShutdownOutcome, restarted: bool
) -> None:
    w = running(make_spec(restart=policy))
    w.advance(s(42))
    w.stops(cause)
    plan = w.step()
    assert kinds(plan) == [("Warning", f"Stopped{outcome.value}")] + ([("Normal", "Starting")] if restarted else [])
    record = plan.status.shutdown
    assert record is not None
    assert record.purpose is ShutdownPurpose.NONE
    assert record.outcome is outcome
    assert record.completed_at == T0 + s(42)
    expected_state = ObservedPowerState.CRASHED if cause is StopCause.CRASHED else ObservedPowerState.STOPPED
    assert plan.status.power_state is expected_state
    ready = plan.status.condition("Ready")
    assert ready is not None
    assert ready.status == "False"
    if restarted:
        assert plan.action is not None
        assert plan.action.kind is A.START
        assert ready.reason == "Starting"
        assert f"restartPolicy {policy.value}" in ready.message
        assert w.settle() == []
        assert cond(w.status, "Ready") == ("True", "Running")
    else:
        assert plan.action is None
        assert ready.reason == f"Stopped{outcome.value}"
        assert f"restartPolicy {policy.value}" in ready.message
        w.advance(s(3600))
        assert_fixed_point(w)


def _held() -> World:
    w = running(make_spec(restart=RestartPolicy.ON_FAILURE))
    w.stops(StopCause.SHUTDOWN)
    assert w.settle() == []
    return w


def test_a_held_vm_starts_after_a_spec_change() -> None:
    w = _held()
    w.edit(restart_policy=RestartPolicy.ON_FAILURE)  # any edit: a new generation
    assert w.settle() == [A.START]
    assert cond(w.status, "Ready") == ("True", "Running")


def test_a_held_vm_starts_after_a_spec_change_that_redefines_the_domain() -> None:
    w = _held()
    w.spec_hash = "hash-2"
    w.edit(domain=DomainSpec(memory_mib=128))
    assert w.settle() == [A.DEFINE, A.START]


def test_a_held_vm_starts_on_a_new_restart_annotation_once() -> None:
    w = _held()
    w.restart("2026-01-01T00:05:00Z")
    assert w.settle() == [A.START]
    assert w.status.restarted_at == "2026-01-01T00:05:00Z"
    assert_fixed_point(w)


def test_an_outside_destroy_during_a_graceful_stop_is_reported() -> None:
    w = stopping(make_spec(grace_period_seconds=60))
    w.advance(s(5))
    w.stops(StopCause.DESTROYED)
    assert w.settle() == []
    assert w.status.shutdown is not None
    assert w.status.shutdown.outcome is ShutdownOutcome.DESTROYED
    assert w.events[-1] == ("Warning", "DestroyedOutside")


# --- restart by annotation -----------------------------------------------------------------------------


def test_restart_annotation_stops_gracefully_then_starts_once_per_value() -> None:
    w = running()
    w.restart("2026-01-01T00:01:00Z")
    plan = w.step()
    assert plan.action is not None
    assert plan.action.kind is A.REQUEST_SHUTDOWN
    assert plan.events[0].message.startswith("restart:")
    assert plan.status.shutdown is not None
    assert plan.status.shutdown.purpose is ShutdownPurpose.RESTART
    w.advance(s(2))
    w.stops(StopCause.SHUTDOWN)
    assert w.settle() == [A.START]
    assert w.status.restarted_at == "2026-01-01T00:01:00Z"
    assert w.status.shutdown is not None
    assert w.status.shutdown.outcome is ShutdownOutcome.GRACEFUL
    assert ("Normal", "StoppedGracefully") in w.events
    assert cond(w.status, "Ready") == ("True", "Running")
    assert w.settle() == []  # once per value
    w.restart("2026-01-01T00:02:00Z")
    assert w.settle() == [A.REQUEST_SHUTDOWN]


def test_restart_of_a_stubborn_guest_forces_at_the_deadline_then_starts() -> None:
    w = running(make_spec(grace_period_seconds=10, retry_interval_seconds=0))
    w.restart("r1")
    taken = w.run_until(T0 + s(20))
    assert [k for k, _ in taken] == [A.REQUEST_SHUTDOWN, A.FORCE_OFF, A.START]
    assert taken[1][1] == T0 + s(10)
    assert w.status.shutdown is not None
    assert w.status.shutdown.outcome is ShutdownOutcome.FORCED


def test_restart_annotation_present_at_creation_does_not_restart() -> None:
    w = World(make_vm(restart_token="2025-12-31T23:00:00Z"))
    assert w.settle() == [A.ADD_FINALIZER, A.DEFINE, A.START]
    assert w.status.restarted_at == "2025-12-31T23:00:00Z"
    assert w.status.shutdown is None
    w.advance(s(60))
    assert w.settle() == []


def test_restart_annotation_on_a_stopped_vm_is_consumed_without_starting() -> None:
    w = running(make_spec(STOPPED))
    w.restart("r1")
    assert w.settle() == []
    assert w.status.restarted_at == "r1"
    w.edit(power_state=RUNNING)
    assert w.settle() == [A.START]


# --- deletion ------------------------------------------------------------------------------------------


def test_delete_graceful_stops_then_undefines_then_removes_the_finalizer() -> None:
    w = running(make_spec(grace_period_seconds=60))
    w.delete()
    plan = w.step()
    assert plan.action is not None
    assert plan.action.kind is A.REQUEST_SHUTDOWN
    assert plan.events[0].message.startswith("delete:")
    assert plan.status.shutdown is not None
    assert plan.status.shutdown.purpose is ShutdownPurpose.DELETE
    assert plan.status.shutdown.deadline == T0 + s(60)
    w.advance(s(3))
    w.stops(StopCause.SHUTDOWN)
    assert w.settle() == [A.UNDEFINE, A.REMOVE_FINALIZER]
    assert w.gone
    assert ("Normal", "StoppedGracefully") in w.events


def test_delete_graceful_of_a_stubborn_guest_forces_at_the_deadline() -> None:
    w = running(make_spec(grace_period_seconds=60, retry_interval_seconds=0))
    w.delete()
    taken = w.run_until(T0 + s(120))
    assert taken == [
        (A.REQUEST_SHUTDOWN, T0),
        (A.FORCE_OFF, T0 + s(60)),
        (A.UNDEFINE, T0 + s(60)),
        (A.REMOVE_FINALIZER, T0 + s(60)),
    ]


def test_delete_force_turns_off_at_once() -> None:
    w = running(make_spec(on_delete=ShutdownMode.FORCE))
    w.delete()
    plan = w.step()
    assert plan.action is not None
    assert plan.action.kind is A.FORCE_OFF
    assert kinds(plan) == [("Normal", "ForcingOff")]
    assert w.settle() == [A.UNDEFINE, A.REMOVE_FINALIZER]


def test_mode_force_during_a_graceful_delete_forces_at_once() -> None:
    w = running(make_spec(grace_period_seconds=600))
    w.delete()
    w.step()
    w.advance(s(5))
    w.edit_policy(mode=ShutdownMode.FORCE)
    assert w.settle() == [A.FORCE_OFF, A.UNDEFINE, A.REMOVE_FINALIZER]


def test_delete_of_a_stopped_vm_undefines_at_once() -> None:
    w = running(make_spec(STOPPED))
    w.delete()
    assert w.settle() == [A.UNDEFINE, A.REMOVE_FINALIZER]


# --- safety: foreign domains, storage, bad specs -------------------------------------------------------


@pytest.mark.parametrize("owner", ["11111111-2222-4333-8444-555555555555", None])
@pytest.mark.parametrize("power", [RUNNING, STOPPED, PAUSED])
@pytest.mark.parametrize("state", [DomainState.RUNNING, DomainState.STOPPED, DomainState.PAUSED])
@pytest.mark.parametrize("finalizer", [True, False])
def test_a_foreign_domain_is_never_touched(
    owner: str | None, power: PowerState, state: DomainState, finalizer: bool
) -> None:
    foreign = Domain("foreign-uuid", owner, "some-hash", state, StopCause.SHUTDOWN)
    w = World(make_vm(make_spec(power), has_finalizer=finalizer, restart_token="r1"), domain=foreign)
    plan = w.step()
    assert plan.action is None
    assert kinds(plan) == [("Warning", "DomainConflict")]
    assert cond(plan.status, "Synced") == ("False", "DomainConflict")
    assert cond(plan.status, "Ready") == ("False", "DomainConflict")
    w.advance(s(600))
    assert w.step().events == ()  # one Warning, not one per reconcile
    w.delete()
    assert w.settle() == ([A.REMOVE_FINALIZER] if finalizer else [])
    assert w.domain == foreign


def test_storage_problems_define_nothing() -> None:
    w = World(make_vm(), refusals=(Refusal("StorageNotAllowed", "disk /etc/shadow resolves outside /var/lib/vmop"),))
    assert w.settle() == [A.ADD_FINALIZER]
    assert w.domain is None
    assert cond(w.status, "Synced") == ("False", "StorageNotAllowed")
    assert cond(w.status, "Ready") == ("False", "StorageNotAllowed")
    assert w.events == [("Warning", "StorageNotAllowed")]
    w.advance(s(600))
    assert w.settle() == []
    assert w.events == [("Warning", "StorageNotAllowed")]
    w.refusals = ()
    w.edit()
    assert w.settle() == [A.DEFINE, A.START]
    assert cond(w.status, "Synced") == ("True", "Reconciled")


def test_storage_problems_with_a_defined_domain_neither_redefine_nor_start() -> None:
    w = running(make_spec(STOPPED))
    w.refusals = (Refusal("StorageNotAllowed", "kernel /tmp/k is outside /var/lib/vmop"),)
    w.spec_hash = "hash-2"
    w.edit(power_state=RUNNING)
    assert w.settle() == []
    assert cond(w.status, "Synced") == ("False", "StorageNotAllowed")
    assert cond(w.status, "Ready") == ("False", "StorageNotAllowed")


@pytest.mark.parametrize("domain_state", [None, DomainState.RUNNING, DomainState.STOPPED])
def test_an_invalid_spec_takes_no_action(domain_state: DomainState | None) -> None:
    domain = None if domain_state is None else Domain("dom-uuid", UID, HASH, domain_state)
    w = World(make_vm(spec=None, spec_error="spec.domain.memoryMiB: field required"), domain=domain)
    plan = w.step()
    assert plan.action is None
    assert cond(plan.status, "Synced") == ("False", "InvalidSpec")
    synced = plan.status.condition("Synced")
    assert synced is not None
    assert "memoryMiB" in synced.message
    assert kinds(plan) == [("Warning", "InvalidSpec")]
    assert w.step().events == ()
    assert w.domain == domain


def test_a_spec_hash_change_redefines_the_domain() -> None:
    w = running()
    w.spec_hash = "hash-2"
    w.edit(domain=DomainSpec(memory_mib=128, vcpus=2))
    plan = w.step()
    assert plan.action is not None
    assert plan.action.kind is A.DEFINE
    assert kinds(plan) == [("Normal", "DefinitionUpdated")]
    assert w.domain is not None
    assert w.domain.spec_hash == "hash-2"
    assert w.settle() == []
    assert w.domain.state is DomainState.RUNNING
    assert w.status.observed_generation == 2


def test_libvirt_unreachable_makes_the_state_unknown_and_warns_once() -> None:
    w = stopping()
    deadline = w.status.shutdown.deadline if w.status.shutdown else None
    plan = unreachable(w.vm, "connection refused", w.now + s(1))
    assert plan.action is None
    assert plan.status.power_state is ObservedPowerState.UNKNOWN
    assert cond(plan.status, "Ready") == ("Unknown", "HypervisorUnreachable")
    assert cond(plan.status, "Synced") == ("False", "HypervisorUnreachable")
    assert plan.status.shutdown is not None
    assert plan.status.shutdown.deadline == deadline, "an outage loses no deadline"
    assert kinds(plan) == [("Warning", "HypervisorUnreachable")]
    again = unreachable(replace(w.vm, status=plan.status), "connection refused", w.now + s(2))
    assert kinds(again) == []


def test_a_request_no_method_accepted_is_counted_and_warned() -> None:
    w = running()
    w.edit(power_state=STOPPED)
    plan = w.decide()
    assert plan.action is not None
    assert plan.action.kind is A.REQUEST_SHUTDOWN
    status, (event,) = after_request(plan.status, method=None, refusals="ACPI: unsupported", now=w.now)
    assert status.shutdown is not None
    assert status.shutdown.attempts == 1
    assert status.shutdown.recent_attempts[-1].method == "None"
    assert (event.type, event.reason) == ("Warning", "ShutdownRequestFailed")
    assert "ACPI: unsupported" in event.message


@pytest.mark.parametrize(
    ("policy", "cause", "started"),
    [
        (RestartPolicy.NEVER, StopCause.SHUTDOWN, False),
        (RestartPolicy.NEVER, StopCause.CRASHED, False),
        (RestartPolicy.ON_FAILURE, StopCause.SHUTDOWN, False),
        (RestartPolicy.ON_FAILURE, StopCause.CRASHED, True),
        (RestartPolicy.ALWAYS, StopCause.SHUTDOWN, True),
    ],
)
def test_a_stop_during_a_libvirt_outage_is_judged_by_restart_policy(
    policy: RestartPolicy, cause: StopCause, started: bool
) -> None:
    """Unknown is not gone, nor "was off": a guest that stopped while libvirt was unreachable is judged."""
    w = running(make_spec(restart=policy))
    w.vm = replace(w.vm, status=unreachable(w.vm, "connection refused", w.now + s(1)).status)
    w.stops(cause)
    w.advance(s(5))
    actions = w.settle()
    assert (A.START in actions) is started
    assert w.status.shutdown is not None
    assert w.status.shutdown.purpose is ShutdownPurpose.NONE
    assert w.status.shutdown.outcome is not ShutdownOutcome.CANCELLED


def test_resends_are_reported_at_powers_of_two_and_all_counted() -> None:
    w = stopping(make_spec(grace_period_seconds=3600, retry_interval_seconds=1))
    w.run_until(w.now + s(100))
    assert w.status.shutdown is not None
    assert w.status.shutdown.attempts == 101
    resent = [reason for _, reason in w.events if reason == "ShutdownRequestResent"]
    assert len(resent) == 6  # requests 2, 4, 8, 16, 32 and 64
    assert [reason for _, reason in w.events].count("ShutdownRequested") == 1


# ---- one VM's trouble: refused definitions, failed actions, crash loops, suspended guests


def test_a_definition_libvirt_refuses_during_a_stop_never_delays_the_force() -> None:
    """An edit libvirt refuses, mid-stop: the stop goes on and is forced at its deadline; Synced says why."""
    w = stopping(make_spec(grace_period_seconds=10, retry_interval_seconds=0))
    w.refuse[A.DEFINE] = "unsupported configuration: the MAC address is multicast"
    w.advance(s(1))
    w.spec_hash = "hash-refused"
    w.edit(shutdown_policy=w.spec.shutdown_policy)  # a new generation whose definition libvirt refuses
    taken = w.run_until(T0 + s(10))
    assert (A.FORCE_OFF, T0 + s(10)) in taken, "forced exactly at the deadline"
    assert A.DEFINE in [k for k, _ in taken], "the redefinition comes once the domain is off"
    synced = w.status.condition("Synced")
    assert synced is not None
    assert (synced.status, synced.reason) == ("False", "DefinitionRefused")
    assert "multicast" in synced.message
    # Observed and refused: a GitOps tool reads the generation as Stalled rather than waiting on it.
    assert cond(w.status, "Stalled") == ("True", "DefinitionRefused")
    assert w.status.observed_generation == w.vm.generation

    del w.refuse[A.DEFINE]  # the user fixes the spec: a new definition
    w.spec_hash = "hash-fixed"
    w.edit(shutdown_policy=w.spec.shutdown_policy)
    assert w.settle() == [A.DEFINE]
    assert cond(w.status, "Synced") == ("True", "Reconciled")
    assert w.status.observed_generation == w.vm.generation


def test_a_spec_change_mid_stop_is_defined_once_the_domain_is_off() -> None:
    w = stopping(make_spec(grace_period_seconds=10))
    w.spec_hash = "hash-2"
    w.edit(shutdown_policy=w.spec.shutdown_policy)
    assert w.step().action is None, "no redefinition in front of the stop"
    assert cond(w.status, "Synced") == ("False", "DefinitionPending")
    w.stops(StopCause.SHUTDOWN)
    assert w.settle() == [A.DEFINE]
    assert w.domain is not None
    assert w.domain.spec_hash == "hash-2"


def test_a_new_vm_libvirt_refuses_to_define_shows_it_and_retries_after_the_backoff() -> None:
    w = World(make_vm())
    w.refuse[A.DEFINE] = "internal error: name too long"
    assert w.settle() == [A.ADD_FINALIZER, A.DEFINE]
    assert cond(w.status, "Synced") == ("False", "DefinitionRefused")
    assert cond(w.status, "Ready") == ("False", "DefinitionRefused")
    plan = w.step()
    assert plan.action is None
    assert plan.wake_at == T0 + w.retry
    w.advance(w.retry)
    assert w.step().action is not None, "tried again at its time"


def test_a_start_that_fails_is_reported_until_it_succeeds() -> None:
    w = running()
    stopped_as_asked(w)
    w.refuse[A.START] = "Cannot get interface MTU on 'br0': No such device"
    w.edit(power_state=RUNNING)
    assert w.settle() == [A.START]
    assert cond(w.status, "Synced") == ("False", "StartFailed")
    assert cond(w.status, "Ready") == ("False", "StartFailed")
    assert w.status.observed_generation == w.vm.generation - 1, "not acted on yet"
    assert w.settle() == [], "not again before the backoff"
    del w.refuse[A.START]
    w.advance(w.retry)
    assert w.settle() == [A.START]
    assert cond(w.status, "Synced") == ("True", "Reconciled")
    assert cond(w.status, "Ready") == ("True", "Running")
    assert w.status.observed_generation == w.vm.generation


def test_a_crash_loop_backs_off_and_a_guest_that_runs_a_while_starts_the_count_again() -> None:
    w = running()
    delays = []
    for _ in range(6):
        w.advance(s(1))
        w.stops(StopCause.SHUTDOWN)  # the guest powers off a second after its boot
        stopped = w.now
        while (plan := w.step()).action is None:
            assert plan.wake_at is not None
            assert cond(w.status, "Ready") == ("False", "CrashLoopBackOff")
            w.now = plan.wake_at
        assert plan.action.kind is A.START
        delays.append((w.now - stopped).total_seconds())
        assert w.settle() == []  # seen running
    assert delays == [0, 10, 20, 40, 80, 160]
    assert w.status.restarts == 6
    assert [e for e in w.events if e[1] == "CrashLoopBackOff"] != []

    w.advance(RAN_LONG_ENOUGH)  # it ran for a minute this time
    w.stops(StopCause.SHUTDOWN)
    assert w.settle() == [A.START], "at once again"
    assert w.status.restarts == 1


def test_crash_loop_delays_are_capped_at_five_minutes() -> None:
    assert [crash_loop_delay(n).total_seconds() for n in (1, 2, 3, 6, 7, 40)] == [0, 10, 20, 160, 300, 300]


def test_a_guest_suspended_to_ram_is_woken_up_to_hear_the_stop_and_forced_if_it_cannot() -> None:
    w = running(make_spec(grace_period_seconds=5))
    assert w.domain is not None
    w.domain = replace(w.domain, state=DomainState.SUSPENDED)
    w.edit(power_state=STOPPED)
    plan = w.step()
    assert plan.action is not None
    assert plan.action.kind is A.WAKE_UP, "a suspended guest is woken, never resumed"
    assert plan.status.shutdown is not None
    assert plan.status.shutdown.deadline == T0 + s(5)
    assert w.step().action is not None  # awake now: the request
    w.domain = replace(w.domain, state=DomainState.SUSPENDED)  # and it suspends again
    w.refuse[A.WAKE_UP] = "Requested operation is not valid: domain is not suspended"
    w.advance(s(5))
    plan = w.step()
    assert plan.action is not None
    assert plan.action.kind is A.FORCE_OFF


def test_a_suspended_guest_is_woken_up_when_it_should_run() -> None:
    w = running()
    assert w.domain is not None
    w.domain = replace(w.domain, state=DomainState.SUSPENDED)
    assert w.settle() == [A.WAKE_UP]
    assert cond(w.status, "Ready") == ("True", "Running")


def agent_spec(**policy: object) -> VirtualMachineSpec:
    spec = make_spec(methods=[ShutdownMethod.AGENT, ShutdownMethod.ACPI], **policy)
    return spec.model_copy(update={"domain": spec.domain.model_copy(update={"guest_agent": True})})


def test_an_agent_that_is_not_connected_is_not_asked_and_the_record_says_so() -> None:
    w = running(agent_spec())
    assert cond(w.status, "AgentConnected") == ("False", "NotConnected")
    assert w.status.agent_connected is False
    w.edit(power_state=STOPPED)
    plan = w.step()
    assert plan.action is not None
    assert plan.action.methods == (ShutdownMethod.ACPI,), "ACPI at once, not after the agent timeout"
    assert plan.action.skipped == "Agent: not connected"


def test_a_connected_agent_is_asked_first_and_shows_in_the_status() -> None:
    w = running(agent_spec())
    assert w.domain is not None
    w.domain = replace(w.domain, agent_connected=True)
    w.settle()
    assert cond(w.status, "AgentConnected") == ("True", "Connected")
    assert w.status.agent_connected is True
    w.edit(power_state=STOPPED)
    plan = w.step()
    assert plan.action is not None
    assert plan.action.methods == (ShutdownMethod.AGENT, ShutdownMethod.ACPI)
    assert plan.action.skipped == ""


def test_vms_without_an_agent_channel_have_no_agent_condition() -> None:
    w = running()
    assert w.status.condition("AgentConnected") is None
    assert w.status.agent_connected is None


def test_an_action_held_back_after_a_failure_is_a_fixed_point() -> None:
    """Deciding again before the retry changes nothing and posts nothing: no status write, no loop."""
    w = running()
    stopped_as_asked(w)
    w.refuse[A.START] = "internal error: UNIX socket path too long"
    w.edit(power_state=RUNNING)
    assert w.settle() == [A.START]
    w.advance(s(0.5))
    assert_fixed_point(w)


def test_a_guest_paused_on_an_io_error_is_not_resumed_and_is_forced_at_the_deadline() -> None:
    w = running(make_spec(grace_period_seconds=30))
    assert w.domain is not None
    w.domain = replace(w.domain, state=DomainState.PAUSED_ON_ERROR)
    assert w.settle() == [], "never resumed in a loop while it should run"
    assert cond(w.status, "Ready") == ("False", "PausedOnIOError")
    w.edit(power_state=STOPPED)
    plan = w.step()
    assert plan.action is None, "it cannot hear: no resume, no request"
    assert plan.status.shutdown is not None
    assert plan.wake_at == T0 + s(30)
    w.advance(s(30))
    assert w.settle() == [A.FORCE_OFF]


def test_a_guest_paused_on_an_io_error_past_an_unforced_deadline_does_not_spin() -> None:
    w = running(make_spec(grace_period_seconds=5, force_after_deadline=False))
    assert w.domain is not None
    w.domain = replace(w.domain, state=DomainState.PAUSED_ON_ERROR)
    w.edit(power_state=STOPPED)
    w.step()
    w.advance(s(10))
    plan = w.step()
    assert plan.action is None
    assert plan.wake_at is not None
    assert plan.wake_at > w.now, "no wake in the past: it would spin"


def test_a_refused_network_defines_nothing_and_says_which() -> None:
    refusal = Refusal("NetworkNotAllowed", "interfaces[0]: bridge 'mgmt0' is not allowed on this node")
    w = World(make_vm(), refusals=(refusal,))
    assert w.settle() == [A.ADD_FINALIZER]
    assert w.domain is None
    assert cond(w.status, "Synced") == ("False", "NetworkNotAllowed")
    assert cond(w.status, "Ready") == ("False", "NetworkNotAllowed")
    assert w.events == [("Warning", "NetworkNotAllowed")]


def test_a_refusal_found_while_the_domain_runs_never_stops_it() -> None:
    w = running(make_spec(RUNNING))
    w.refusals = (Refusal("OverVmLimits", "vcpus 8 is over this node's limit of 4 per VM"),)
    w.edit()
    assert w.settle() == []
    assert w.domain is not None
    assert w.domain.state is DomainState.RUNNING
    assert cond(w.status, "Synced") == ("False", "OverVmLimits")


def test_a_vm_over_the_node_memory_ceiling_is_neither_defined_nor_started_until_memory_is_free() -> None:
    w = World(make_vm(), node_memory=NodeMemory(committed_mib=950, ceiling_mib=1000))
    assert w.settle() == [A.ADD_FINALIZER]
    assert w.domain is None, "a VM to run that cannot start is not defined either"
    assert cond(w.status, "Ready") == ("False", "NodeMemoryFull")
    assert cond(w.status, "Synced") == ("False", "NodeMemoryFull")
    assert ("Warning", "NodeMemoryFull") in w.events
    plan = w.plans[-1]
    assert plan.wake_at == w.now + NODE_MEMORY_RETRY
    w.advance(NODE_MEMORY_RETRY)
    assert w.settle() == []
    assert w.events.count(("Warning", "NodeMemoryFull")) == 1, "said once, not at every look"
    w.node_memory = NodeMemory(committed_mib=100, ceiling_mib=1000)
    w.advance(NODE_MEMORY_RETRY)
    assert w.settle() == [A.DEFINE, A.START]
    assert cond(w.status, "Ready") == ("True", "Running")


def test_storage_that_resolves_elsewhere_is_written_before_the_next_start_never_under_a_running_guest() -> None:
    w = running(make_spec(RUNNING))
    w.storage_hash = "resolved-2"
    w.edit()
    assert w.settle() == [], "the running domain keeps its definition"
    stopped_as_asked(w)
    w.storage_hash = "resolved-3"
    w.edit(power_state=RUNNING)
    assert w.settle() == [A.DEFINE, A.START]
    assert w.domain is not None
    assert w.domain.storage_hash == "resolved-3"


def test_a_stopped_vm_is_defined_whatever_the_node_memory() -> None:
    w = World(make_vm(make_spec(STOPPED)), node_memory=NodeMemory(committed_mib=1000, ceiling_mib=1000))
    assert w.settle() == [A.ADD_FINALIZER, A.DEFINE]
    assert w.events == [("Normal", "Defined")]
    assert cond(w.status, "Ready") == ("True", "Stopped")
