"""The reconcile decision: from desired state, observed domain, status and the clock, the next step.

This is controller-runtime's Reconcile contract as a pure function: level-triggered (it reads the whole
situation every time, never an edge), idempotent (deciding again on the same inputs changes nothing
more), and it says when to look again. It has no I/O: the shell observes libvirt and Kubernetes, calls
`decide`, writes the status it returns, posts the events, and performs the one action.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from controller import nodepolicy, shutdown
from controller.api import (
    Condition,
    ObservedPowerState,
    PowerState,
    RestartPolicy,
    ShutdownMethod,
    ShutdownMode,
    ShutdownOutcome,
    ShutdownPurpose,
    ShutdownRecord,
    VirtualMachineSpec,
    VirtualMachineStatus,
)
from controller.maintenance import NO_TURN, Turn, TurnKind
from controller.nodepolicy import NodeMemory, Refusal
from controller.shutdown import ShutdownMark


class DomainState(StrEnum):
    RUNNING = "Running"
    PAUSED = "Paused"
    # Paused by QEMU on a disk I/O error (a full disk): resumed, it pauses again at once; it cannot hear.
    PAUSED_ON_ERROR = "PausedOnError"
    # Suspended to RAM by the guest (ACPI S3): it cannot be resumed, only woken up.
    SUSPENDED = "Suspended"
    SHUTTING_DOWN = "ShuttingDown"
    STOPPED = "Stopped"


class StopCause(StrEnum):
    """Why a stopped domain stopped, as libvirt reports it."""

    SHUTDOWN = "Shutdown"
    DESTROYED = "Destroyed"
    CRASHED = "Crashed"
    UNKNOWN = "Unknown"


@dataclass(frozen=True)
class Domain:
    """The libvirt domain as observed; owner_uid is None for a domain without vmop's metadata."""

    uuid: str
    owner_uid: str | None
    spec_hash: str | None
    state: DomainState
    stop_cause: StopCause | None = None
    shutdown_mark: ShutdownMark | None = None
    # A guest agent holds the agent channel (None: no channel, or the domain is not running).
    agent_connected: bool | None = None
    # What the definition's storage was resolved to (paths, backing chains) when it was written.
    storage_hash: str | None = None


@dataclass(frozen=True)
class VirtualMachine:
    """The VirtualMachine as read from Kubernetes; spec is None when it could not be read (spec_error says why)."""

    namespace: str
    name: str
    uid: str
    generation: int
    deleting: bool
    has_finalizer: bool
    restart_token: str | None
    spec: VirtualMachineSpec | None
    status: VirtualMachineStatus
    spec_error: str | None = None


class ActionKind(StrEnum):
    ADD_FINALIZER = "AddFinalizer"
    REMOVE_FINALIZER = "RemoveFinalizer"
    DEFINE = "Define"
    START = "Start"
    SUSPEND = "Suspend"
    RESUME = "Resume"
    WAKE_UP = "WakeUp"
    REQUEST_SHUTDOWN = "RequestShutdown"
    FORCE_OFF = "ForceOff"
    UNDEFINE = "Undefine"


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    methods: tuple[ShutdownMethod, ...] = ()
    # Why a policy's method is not among `methods` (recorded with the request's attempt).
    skipped: str = ""


@dataclass(frozen=True)
class Failure:
    """An action the shell took and libvirt or the API server refused.

    The decision reports it (Synced False, observedGeneration held back unless the refusal is one that
    stalls the VM, as a refused definition does) for as long as the same action is still what the VM
    needs, and takes that action again only at retry_at. A refused definition does not
    stop anything else: power transitions go on with the domain as it is defined.
    """

    action: ActionKind
    message: str
    retry_at: datetime
    spec_hash: str | None = None  # for a refused DEFINE: the definition that was refused


@dataclass(frozen=True)
class Event:
    type: str
    reason: str
    message: str


@dataclass(frozen=True)
class Plan:
    """What the shell does: write status (if changed), post events, take the action, look again at wake_at."""

    status: VirtualMachineStatus
    action: Action | None = None
    events: tuple[Event, ...] = ()
    wake_at: datetime | None = None
    # The stop the node keeps in the domain's metadata; None keeps nothing (the shell clears an old mark
    # only once the status holds no stop under way, so a step that did not reach the stop logic keeps it).
    shutdown_mark: ShutdownMark | None = None


@dataclass(frozen=True)
class Settings:
    """The knobs of the decision that are the operator's, not the user's."""

    resync: timedelta = timedelta(minutes=5)


# Outcomes of stops nobody asked for, and whether each restartPolicy undoes them.
_UNASKED_OUTCOMES = {ShutdownOutcome.GUEST_INITIATED, ShutdownOutcome.CRASHED, ShutdownOutcome.DESTROYED}
# States in which a VM found stopped was stopped unasked. Unknown is among them: a domain seen stopped after
# libvirt could not be reached may have stopped meanwhile, and restartPolicy judges that stop by its cause
# (a guest's own power-off stays off under OnFailure and Never) instead of taking "not known" for "off".
_RUNNING_STATES = {
    ObservedPowerState.RUNNING,
    ObservedPowerState.PAUSED,
    ObservedPowerState.SHUTTING_DOWN,
    ObservedPowerState.UNKNOWN,
}


def restarts(policy: RestartPolicy, outcome: ShutdownOutcome) -> bool:
    if policy is RestartPolicy.ALWAYS:
        return True
    if policy is RestartPolicy.ON_FAILURE:
        return outcome is not ShutdownOutcome.GUEST_INITIATED
    return False


def set_condition(
    conditions: list[Condition],
    *,
    type_: str,
    status: str,
    reason: str,
    message: str,
    now: datetime,
    generation: int,
) -> list[Condition]:
    """Replace one condition, keeping lastTransitionTime unless the status really changed."""
    old = next((c for c in conditions if c.type == type_), None)
    changed = old is None or old.status != status
    condition = Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=now.replace(microsecond=0) if changed or old is None else old.last_transition_time,
        observed_generation=generation,
    )
    return [c for c in conditions if c.type != type_] + [condition]


def _iso(moment: datetime | None) -> str:
    return moment.isoformat() if moment else "none"


def _seconds(delta: timedelta) -> str:
    return f"{delta.total_seconds():.2f}s"


@dataclass
class _Decision:
    """Accumulates one decision: the status to write and the events to post."""

    vm: VirtualMachine
    now: datetime
    settings: Settings
    status: VirtualMachineStatus
    events: list[Event] = field(default_factory=list)
    ready: tuple[str, str, str] = ("Unknown", "Reconciling", "")
    synced: tuple[str, str, str] = ("True", "Reconciled", "")
    overdue: tuple[str, str, str] | None = None
    agent: tuple[str, str, str] | None = None
    mark: ShutdownMark | None = None
    failure: Failure | None = None
    node_memory: NodeMemory | None = None
    # What a VM that runs on is told of the node's maintenance (its group's stop waits for the lower ones).
    note: str = ""

    def event(self, type_: str, reason: str, message: str) -> None:
        self.events.append(Event(type_, reason, message))

    def held_back(self, kind: ActionKind) -> bool:
        """This action failed and waits for its retry: the step takes it not, and so records nothing of it."""
        return self.failure is not None and self.failure.action is kind and self.now < self.failure.retry_at

    def update(self, **changes: object) -> None:
        self.status = self.status.model_copy(update=changes)

    def plan(self, action: Action | None = None, wake_at: datetime | None = None) -> Plan:
        failure = self.failure
        if action is not None and failure is not None and action.kind is failure.action:
            reason = "DefinitionRefused" if action.kind is ActionKind.DEFINE else f"{action.kind.value}Failed"
            self.synced = ("False", reason, failure.message)
            if self.ready[0] != "True":
                self.ready = ("False", reason, failure.message)
            if self.now < failure.retry_at:
                # Not again before its time: the shell's backoff, held here so that one step both reports
                # the failure and waits.
                action, wake_at = None, min(wake_at, failure.retry_at) if wake_at else failure.retry_at
        if self.note and self.ready[0] == "True" and not self.ready[2]:
            self.ready = (*self.ready[:2], self.note)
        resync_at = self.now + self.settings.resync
        conditions = list(self.status.conditions)
        generation = self.vm.generation
        for type_, value in (
            ("Ready", self.ready),
            ("Synced", self.synced),
            ("ShutdownOverdue", self.overdue),
            ("AgentConnected", self.agent),
        ):
            if value is None:
                continue
            condition_status, reason, message = value
            conditions = set_condition(
                conditions,
                type_=type_,
                status=condition_status,
                reason=reason,
                message=message,
                now=self.now,
                generation=generation,
            )
        reconciling, stalled = _progress(self.ready, self.synced)
        for type_, why in (("Reconciling", reconciling), ("Stalled", stalled)):
            if why is None:
                # Abnormal-true conditions are absent when false, as GitOps tools (kstatus) expect.
                conditions = [c for c in conditions if c.type != type_]
                continue
            conditions = set_condition(
                conditions,
                type_=type_,
                status="True",
                reason=why[0],
                message=why[1],
                now=self.now,
                generation=generation,
            )
        status = self.status.model_copy(update={"conditions": conditions})
        if (self.synced[0] == "True" and action is None) or stalled is not None:
            # Acted on means settled: an action still to take may yet fail, and then this generation is not.
            # A stalled generation is settled too, as refused: kstatus reads a generation ahead of
            # observedGeneration as InProgress before it reads Stalled, so a refused edit would never fail.
            status = status.model_copy(update={"observed_generation": generation})
        return Plan(
            status=status,
            action=action,
            events=tuple(self.events),
            wake_at=min(wake_at, resync_at) if wake_at else resync_at,
            shutdown_mark=self.mark,
        )


STALLED_REASONS = frozenset(
    {
        "InvalidSpec",
        "DomainConflict",
        "DefinitionRefused",
        nodepolicy.STORAGE_NOT_ALLOWED,
        nodepolicy.NETWORK_NOT_ALLOWED,
        nodepolicy.OVER_VM_LIMITS,
        "CrashLoopBackOff",
        "PausedOnIOError",
        "ShutdownOverdue",
    }
    | {f"Stopped{outcome.value}" for outcome in _UNASKED_OUTCOMES}  # left off by restartPolicy
)
"""Reasons that no waiting cures: a person must change the spec, the node's policy or the guest's disk.

NodeMemoryFull is not among them (the VM starts by itself once another stops), nor is a failed action
(it is retried with backoff)."""


def _progress(
    ready: tuple[str, str, str], synced: tuple[str, str, str]
) -> tuple[tuple[str, str] | None, tuple[str, str] | None]:
    """The Reconciling and Stalled conditions (reason, message), None where absent.

    GitOps tools read these two before Ready: kstatus (Flux's health check) compares observedGeneration
    with the generation, then says InProgress while Reconciling is true and Failed while Stalled is, and
    reads Ready only when both are absent. Both derive from Ready and Synced so that they never disagree.
    """
    for condition_status, reason, message in (synced, ready):
        if condition_status != "True" and reason in STALLED_REASONS:
            return None, (reason, message)
    for condition_status, reason, message in (ready, synced):
        if condition_status != "True":
            return (reason, message), None
    return None, None


def decide(
    vm: VirtualMachine,
    domain: Domain | None,
    now: datetime,
    *,
    expected_spec_hash: str | None,
    expected_storage_hash: str | None = None,
    refusals: tuple[Refusal, ...] = (),
    node_memory: NodeMemory | None = None,
    settings: Settings = Settings(),
    failure: Failure | None = None,
    turn: Turn = NO_TURN,
) -> Plan:
    """The next step for one VM.

    expected_spec_hash identifies the domain definition the spec asks for; expected_storage_hash what its
    storage resolves to now, None when the shell did not look in this step (it looks before every
    definition and start, and only then: a stop never waits on a file system). refusals are what the
    node does not allow of the spec (storage, networks, sizes); node_memory is the node's committed
    memory, looked at before a start and before the first definition of a VM to run. failure is the last
    action that failed, if it has not succeeded since. turn is what the node's maintenance asks of this VM
    (see controller.maintenance).
    """
    if failure is not None and failure.action is ActionKind.DEFINE and failure.spec_hash != expected_spec_hash:
        failure = None  # refused for a spec that is no longer asked for
    d = _Decision(vm=vm, now=now, settings=settings, status=vm.status, failure=failure, node_memory=node_memory)
    previous_synced = vm.status.condition("Synced")

    def warn_once(reason: str, message: str) -> None:
        if previous_synced is None or previous_synced.reason != reason:
            d.event("Warning", reason, message)

    if domain is not None and domain.owner_uid != vm.uid:
        message = (
            f"a libvirt domain named {_domain_name(vm)} exists and is not this VirtualMachine's "
            f"(uid {domain.owner_uid or 'none: not defined by vmop'}); vmop leaves it alone"
        )
        d.synced = ("False", "DomainConflict", message)
        d.ready = ("False", "DomainConflict", message)
        warn_once("DomainConflict", message)
        return d.plan(Action(ActionKind.REMOVE_FINALIZER) if vm.deleting and vm.has_finalizer else None)

    if vm.spec is None:
        message = f"the spec cannot be read: {vm.spec_error}"
        d.synced = ("False", "InvalidSpec", message)
        d.ready = ("Unknown", "InvalidSpec", message)
        warn_once("InvalidSpec", message)
        if vm.deleting and domain is None and vm.has_finalizer:
            return d.plan(Action(ActionKind.REMOVE_FINALIZER))
        return d.plan()

    spec = vm.spec
    if domain is not None:
        d.update(shutdown=shutdown.adopt(vm.status.shutdown, domain.shutdown_mark))
        d.update(domain_name=_domain_name(vm), domain_uuid=domain.uuid, power_state=_observed(domain, d.status))
        if vm.spec is not None and vm.spec.domain.guest_agent:
            d.update(agent_connected=domain.agent_connected is True)
            d.agent = _agent_condition(domain)

    if vm.deleting:
        return _delete(d, spec, domain)

    if not vm.has_finalizer:
        d.ready = ("False", "Initializing", "adding the finalizer that undefines the domain on delete")
        if domain is None:
            d.update(power_state=ObservedPowerState.STOPPED)  # known, not Unknown: there is no domain to run
        return d.plan(Action(ActionKind.ADD_FINALIZER))

    if refusals:
        reason = refusals[0].reason
        message = "; ".join(refusal.message for refusal in refusals)
        d.synced = ("False", reason, message)
        warn_once(reason, message)
        if domain is None:
            d.ready = ("False", reason, "nothing is defined until the node allows the spec")
            d.update(power_state=ObservedPowerState.STOPPED)
            return d.plan()

    refused = failure if failure is not None and failure.action is ActionKind.DEFINE else None
    if domain is None:
        d.ready = ("False", "Defining", "defining the libvirt domain")
        if refused is not None:
            d.ready = d.synced = ("False", "DefinitionRefused", f"libvirt refused the definition: {refused.message}")
            if now < refused.retry_at:
                return d.plan(wake_at=refused.retry_at)
        if spec.power_state is not PowerState.STOPPED:
            # A VM to run is defined only when it can also start: one the node has no memory for is not
            # left behind in libvirt as a definition that cannot run.
            held = _held_for_memory(d)
            if held is not None:
                d.update(power_state=ObservedPowerState.STOPPED)
                return held
        if vm.status.domain_uuid is None:
            # A new VM: a restart annotation it was created with is not a request to restart.
            d.update(
                domain_name=_domain_name(vm), power_state=ObservedPowerState.STOPPED, restarted_at=vm.restart_token
            )
            if spec.power_state is PowerState.STOPPED:
                d.event("Normal", "Defined", f"defining libvirt domain {_domain_name(vm)}")
            # A VM to run is started in the next step, and its Starting Event, the one a user looks for,
            # names the domain: one Event per new VM, not two within milliseconds.
        else:
            # Drift: the status keeps what was last seen, so that restartPolicy judges the stop once defined.
            d.event(
                "Warning",
                "DomainMissing",
                f"libvirt domain {_domain_name(vm)} was undefined outside vmop; defining it again",
            )
        return d.plan(Action(ActionKind.DEFINE))

    target = spec.power_state
    restart_pending = vm.restart_token is not None and vm.restart_token != vm.status.restarted_at
    # Storage that resolves elsewhere now (a link pointed at another allowed file, a rebased image) is
    # written into the definition before the next start, never under a running guest.
    storage_moved = (
        expected_storage_hash is not None
        and domain.storage_hash != expected_storage_hash
        and domain.state is DomainState.STOPPED
    )
    if not refusals and (domain.spec_hash != expected_spec_hash or storage_moved):
        # Power transitions never wait on a definition: a stop under way or asked for goes first, and the
        # new definition (which takes effect at the next start anyway) is written once the domain is off.
        stopping = target is PowerState.STOPPED or restart_pending or active_stop(d.status) is not None
        if refused is not None and now < refused.retry_at:
            d.synced = ("False", "DefinitionRefused", f"libvirt refused the new definition: {refused.message}")
        elif stopping and domain.state is not DomainState.STOPPED:
            d.synced = ("False", "DefinitionPending", "the new definition is written once the domain is off")
        else:
            d.event(
                "Normal", "DefinitionUpdated", "the spec changed: redefining the domain (takes effect at next start)"
            )
            if refused is not None:
                d.synced = ("False", "DefinitionRefused", f"libvirt refused the new definition: {refused.message}")
            return d.plan(Action(ActionKind.DEFINE))

    held = _maintenance(d, spec, domain, turn)
    if held is not None:
        return held
    if restart_pending and target is not PowerState.STOPPED and domain.state is not DomainState.STOPPED:
        return _stop(d, spec, domain, ShutdownPurpose.RESTART)
    if restart_pending:
        # The restart's stop is done (or there was nothing to stop): what remains is to start, once.
        d.update(restarted_at=vm.restart_token)
    if target is PowerState.STOPPED:
        return _stop(d, spec, domain, ShutdownPurpose.STOP)
    return _run(d, spec, domain, target, blocked=refusals[0] if refusals else None, restart=restart_pending)


def _agent_condition(domain: Domain) -> tuple[str, str, str]:
    if domain.state is DomainState.STOPPED:
        return ("False", "DomainStopped", "")
    if domain.agent_connected:
        return ("True", "Connected", "")
    return (
        "False",
        "NotConnected",
        "no guest agent holds the channel (is qemu-guest-agent installed and running in the guest?): "
        "shutdown requests go to the next method",
    )


def domain_name(namespace: str, name: str) -> str:
    """The libvirt domain's name for the VM namespace/name: `<namespace>_<name>` whenever that fits.

    libvirt keeps files named after the domain (`<name>.xml`, `<name>.log`, ...) that must fit NAME_MAX (255
    bytes), and the API takes names of up to 253 characters: a longer name keeps its first 187 characters and
    ends in "_" and 12 hex digits of a hash of namespace/name, 200 characters in all. "_" is allowed in neither
    namespace nor object names, so names from different namespaces never clash, and a shortened name (two
    "_") never equals a whole one (one "_").
    """

    max_length, digits = 200, 12
    whole = f"{namespace}_{name}"
    if len(whole) <= max_length:
        return whole
    digest = hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()[:digits]
    return f"{whole[: max_length - digits - 1]}_{digest}"


def _domain_name(vm: VirtualMachine) -> str:
    return domain_name(vm.namespace, vm.name)


def _observed(domain: Domain, status: VirtualMachineStatus) -> ObservedPowerState:
    active = status.shutdown is not None and status.shutdown.outcome is None
    match domain.state:
        case DomainState.RUNNING:
            return ObservedPowerState.SHUTTING_DOWN if active else ObservedPowerState.RUNNING
        case DomainState.PAUSED | DomainState.PAUSED_ON_ERROR | DomainState.SUSPENDED:
            return ObservedPowerState.PAUSED
        case DomainState.SHUTTING_DOWN:
            return ObservedPowerState.SHUTTING_DOWN
        case DomainState.STOPPED:
            return ObservedPowerState.CRASHED if domain.stop_cause is StopCause.CRASHED else ObservedPowerState.STOPPED


def active_stop(status: VirtualMachineStatus) -> ShutdownRecord | None:
    record = status.shutdown
    return record if record is not None and record.outcome is None else None


def _finish_requested_stop(d: _Decision, record: ShutdownRecord, domain: Domain) -> None:
    """The VM stopped while vmop was stopping it: say how, and how long it took."""
    assert record.deadline is not None
    assert record.requested_at is not None
    past_deadline = d.now >= record.deadline
    match domain.stop_cause:
        case StopCause.CRASHED:
            outcome = ShutdownOutcome.CRASHED
        case StopCause.DESTROYED:
            outcome = ShutdownOutcome.FORCED if past_deadline else ShutdownOutcome.DESTROYED
        case StopCause.SHUTDOWN:
            outcome = ShutdownOutcome.GRACEFUL
        case _:
            outcome = ShutdownOutcome.FORCED if past_deadline else ShutdownOutcome.GRACEFUL
    d.update(shutdown=shutdown.complete(record, outcome, d.now), power_state=_observed(domain, d.status))
    took = _seconds(d.now - record.requested_at)
    match outcome:
        case ShutdownOutcome.GRACEFUL:
            d.event(
                "Normal",
                "StoppedGracefully",
                f"the guest shut down {took} after the first request ({record.attempts} request(s), {record.method})",
            )
        case ShutdownOutcome.FORCED:
            d.event("Normal", "ForcedOff", f"forced off {_seconds(d.now - record.deadline)} after the deadline")
        case ShutdownOutcome.CRASHED:
            d.event("Warning", "Crashed", f"the guest crashed {took} into its shutdown")
        case _:
            d.event("Warning", "DestroyedOutside", f"the domain was destroyed outside vmop {took} into its shutdown")


def _maintenance(d: _Decision, spec: VirtualMachineSpec, domain: Domain, turn: Turn) -> Plan | None:
    """A node taint's stop, and the hold that follows it until the VM's turn to start; None: no hold.

    A stop a taint began goes on to its deadline while the taint stays, and while the taints are not
    known (an operator just started, before its first read of the Node: nothing starts then); it is
    cancelled, as any stop, once the VM may run again. heldByTaint is set with the stop and cleared when
    the VM is seen running again, so that the next priority group starts only after it.
    """
    record = active_stop(d.status)
    taint_stop = record if record is not None and record.purpose is ShutdownPurpose.TAINT else None
    off = domain.state is DomainState.STOPPED
    wants_running = spec.power_state is not PowerState.STOPPED
    if turn.kind is TurnKind.STOP or (taint_stop is not None and turn.kind in (TurnKind.WAIT, TurnKind.UNKNOWN)):
        taint = turn.taint if turn.kind is TurnKind.STOP else taint_stop.taint if taint_stop else None
        if not wants_running and taint_stop is None:
            return None  # the user's own stop, which nothing holds once the taint goes
        d.update(held_by_taint=taint if wants_running else None)
        plan = _stop(d, spec, domain, ShutdownPurpose.TAINT, taint=taint)
        if not off or not wants_running:
            return plan
        turn = Turn(TurnKind.WAIT, taint)  # off now: Ready says what keeps it off (the stop's report stands)
    if not wants_running:
        d.update(held_by_taint=None)
        return None
    held_by = d.status.held_by_taint
    if not off:
        if held_by is not None:
            # Seen running (a taint stop under way is cancelled below, in this same step): the next group
            # may start.
            d.update(held_by_taint=None)
        if turn.kind is TurnKind.WAIT:
            d.note = f"node taint {turn.taint}: {turn.why}"
        return None
    match turn.kind:
        case TurnKind.WAIT:
            d.update(held_by_taint=turn.taint)
            message = f"held off by the node's taint {turn.taint}: starts again when it is removed"
            d.ready = ("False", "HeldByTaint", message)
        case TurnKind.START_LATER:
            d.ready = ("False", "WaitingToStart", f"the node's taint {held_by} is gone: {turn.why}")
        case TurnKind.UNKNOWN:
            # Held or not: the node may have been tainted while the operator was away.
            d.ready = ("False", "HeldByTaint" if held_by else "WaitingToStart", turn.why)
        case _:
            return None
    d.update(power_state=ObservedPowerState.STOPPED)
    return d.plan()


def _stop(
    d: _Decision, spec: VirtualMachineSpec, domain: Domain, purpose: ShutdownPurpose, *, taint: str | None = None
) -> Plan:
    record = active_stop(d.status)
    policy = shutdown.policy_for(spec.shutdown_policy, purpose)
    if domain.state is DomainState.STOPPED:
        if record is not None:
            _finish_requested_stop(d, record, domain)
        d.ready = ("True", "Stopped", "")
        if d.status.condition("ShutdownOverdue") is not None:
            d.overdue = ("False", "Stopped", "")
        return d.plan()

    graceful = policy.mode is not ShutdownMode.FORCE
    if record is None:
        # Begun (and its deadline set) before anything else, a resume included: a guest that cannot be
        # resumed or cannot hear (suspended, paused on an I/O error) is still forced at the deadline.
        record = shutdown.begin(policy, purpose, d.now)
        if taint is not None:
            record = record.model_copy(update={"taint": taint})
        deadline = record.deadline
        assert deadline is not None
        verb = {
            ShutdownPurpose.RESTART: "restart",
            ShutdownPurpose.DELETE: "delete",
            ShutdownPurpose.TAINT: f"node taint {taint}",
        }.get(purpose, "stop")
        if graceful and (policy.grace_period_seconds > 0 or not policy.force_after_deadline):
            d.event(
                "Normal",
                "StopRequested",
                f"{verb}: asking the guest to shut down ({', '.join(m.value for m in policy.methods)}); "
                f"deadline {deadline.isoformat()} ({policy.grace_period_seconds}s)",
            )
        else:
            why = "mode Force" if not graceful else "gracePeriodSeconds 0"
            d.event("Normal", "ForcingOff", f"{verb}: turning the VM off at once ({why})")

    step = shutdown.next_step(policy, record, d.now)
    d.update(shutdown=step.record)
    d.mark = shutdown.mark(step.record, policy)
    if domain.state is DomainState.PAUSED_ON_ERROR and step.kind is not shutdown.StepKind.FORCE:
        # It cannot hear, and resuming it only pauses it again: the deadline forces it.
        d.ready = ("False", "PausedOnIOError", _PAUSED_ON_ERROR)
        deadline = step.record.deadline
        return d.plan(wake_at=deadline if deadline is not None and d.now < deadline else None)
    if domain.state in (DomainState.PAUSED, DomainState.SUSPENDED) and step.kind is not shutdown.StepKind.FORCE:
        return _resume_to_hear(d, domain)
    d.update(power_state=ObservedPowerState.SHUTTING_DOWN)
    d.ready = ("False", "ShuttingDown", f"shutting down; deadline {_iso(step.record.deadline)}")
    if step.overdue:
        # Also on the re-sends after the deadline, so that Ready does not flap on every request.
        message = (
            f"the deadline {_iso(step.record.deadline)} passed and forceAfterDeadline is false: still asking the guest; "
            "set shutdownPolicy.mode to Force to turn it off"
        )
        d.ready = ("False", "ShutdownOverdue", message)
        d.overdue = ("True", "DeadlinePassed", message)
        previous = d.vm.status.condition("ShutdownOverdue")
        if previous is None or previous.status != "True":
            d.event("Warning", "ShutdownOverdue", message)
    match step.kind:
        case shutdown.StepKind.FORCE:
            return d.plan(Action(ActionKind.FORCE_OFF))
        case shutdown.StepKind.REQUEST:
            methods, skipped = step.methods, ""
            if ShutdownMethod.AGENT in methods and domain.agent_connected is not True:
                # Asking an agent that is not there costs the agent timeout, for nothing: the next method now.
                methods = tuple(m for m in methods if m is not ShutdownMethod.AGENT)
                skipped = "Agent: not connected"
            return d.plan(Action(ActionKind.REQUEST_SHUTDOWN, methods=methods, skipped=skipped))
    return d.plan(wake_at=step.wake_at)


_PAUSED_ON_ERROR = (
    "QEMU paused the guest on a disk I/O error (a full or failing disk); vmop does not resume it, since it "
    "would pause again at once: free the disk and resume it (virsh resume), or stop the VM"
)


def _resume_to_hear(d: _Decision, domain: Domain) -> Plan:
    """A paused guest cannot hear a shutdown request; its deadline is already set and counts from the stop.

    One the guest suspended to RAM itself cannot be resumed at all: it is woken up instead.
    """
    if domain.state is DomainState.SUSPENDED:
        message = "waking the guest up from its suspend to RAM so that it can hear the shutdown request"
        d.ready = ("False", "WakingUp", message)
        d.event("Normal", "WakingUp", message)
        return d.plan(Action(ActionKind.WAKE_UP))
    message = "resuming the paused guest so that it can hear the shutdown request"
    d.ready = ("False", "Resuming", message)
    d.event("Normal", "Resuming", message)
    return d.plan(Action(ActionKind.RESUME))


def _run(
    d: _Decision,
    spec: VirtualMachineSpec,
    domain: Domain,
    target: PowerState,
    *,
    blocked: Refusal | None,
    restart: bool,
) -> Plan:
    record = active_stop(d.status)
    alive = (DomainState.RUNNING, DomainState.PAUSED, DomainState.PAUSED_ON_ERROR, DomainState.SUSPENDED)
    if domain.state in alive and record is not None:
        assert record.purpose is not ShutdownPurpose.NONE
        d.update(shutdown=shutdown.complete(record, ShutdownOutcome.CANCELLED, d.now))
        d.update(power_state=_observed(domain, d.status))  # with the stop ended: Running, not ShuttingDown
        d.event(
            "Normal", "StopCancelled", f"powerState is {target.value} again: the stop is cancelled, nothing is forced"
        )
        if d.status.condition("ShutdownOverdue") is not None:
            d.overdue = ("False", "Cancelled", "")

    match domain.state:
        case DomainState.RUNNING if target is PowerState.PAUSED:
            d.ready = ("False", "Pausing", "")
            d.event("Normal", "Pausing", "pausing the guest")
            return d.plan(Action(ActionKind.SUSPEND))
        case DomainState.PAUSED if target is PowerState.RUNNING:
            d.ready = ("False", "Resuming", "")
            d.event("Normal", "Resuming", "resuming the guest")
            return d.plan(Action(ActionKind.RESUME))
        case DomainState.SUSPENDED if target is PowerState.RUNNING:
            d.ready = ("False", "WakingUp", "")
            d.event("Normal", "WakingUp", "waking the guest up from its suspend to RAM")
            return d.plan(Action(ActionKind.WAKE_UP))
        case DomainState.PAUSED_ON_ERROR:
            d.ready = ("False", "PausedOnIOError", _PAUSED_ON_ERROR)
            return d.plan()
        case DomainState.RUNNING | DomainState.PAUSED | DomainState.SUSPENDED:
            d.ready = ("True", target.value, "")
            return d.plan()
        case DomainState.SHUTTING_DOWN:
            d.ready = ("False", "GuestShuttingDown", "the guest is shutting itself down")
            return d.plan()

    # The domain is stopped while it should run.
    if record is not None:
        _finish_requested_stop(d, record, domain)
        return _start(d, blocked, "restarting: the stop is done" if restart else "starting")
    last = d.status.shutdown
    if last is not None and last.outcome is ShutdownOutcome.CANCELLED and last.deadline and d.now < last.deadline:
        return _start(d, blocked, "the guest powered off after a cancelled stop: starting it again")
    if d.vm.status.power_state in _RUNNING_STATES:
        outcome = {
            StopCause.SHUTDOWN: ShutdownOutcome.GUEST_INITIATED,
            StopCause.CRASHED: ShutdownOutcome.CRASHED,
        }.get(domain.stop_cause or StopCause.UNKNOWN, ShutdownOutcome.DESTROYED)
        last = ShutdownRecord(
            purpose=ShutdownPurpose.NONE, outcome=outcome, completed_at=d.now, generation=d.vm.generation
        )
        d.update(shutdown=last)
        what = {
            ShutdownOutcome.GUEST_INITIATED: "the guest powered itself off",
            ShutdownOutcome.CRASHED: "the guest crashed",
        }.get(outcome, "the domain was turned off outside vmop")
        d.event("Warning", f"Stopped{outcome.value}", f"{what} while powerState is {target.value}")
    if (
        not restart
        and last is not None
        and last.purpose is ShutdownPurpose.NONE
        and last.outcome in _UNASKED_OUTCOMES
        and last.generation == d.vm.generation
    ):
        if restarts(spec.restart_policy, last.outcome):
            return _restart_after_unasked_stop(d, spec, last, blocked)
        d.ready = (
            "False",
            f"Stopped{last.outcome.value}",
            f"left off by restartPolicy {spec.restart_policy.value}; change the spec or set the "
            "vmop.dev/restartedAt annotation to start it",
        )
        return d.plan()
    return _start(d, blocked, "starting")


# A guest that stops this soon after it was started is crash-looping: its next start waits.
RAN_LONG_ENOUGH = timedelta(seconds=60)
_CRASH_LOOP_FIRST_DELAY = timedelta(seconds=10)
_CRASH_LOOP_MAX_DELAY = timedelta(minutes=5)


def crash_loop_delay(restarts: int) -> timedelta:
    """Before the n-th start in a row after unasked stops: none for the first, then 10 s, doubling, 5 min at most."""
    if restarts <= 1:
        return timedelta(0)
    return min(_CRASH_LOOP_MAX_DELAY, _CRASH_LOOP_FIRST_DELAY * (1 << min(restarts - 2, 16)))


def _restart_after_unasked_stop(
    d: _Decision, spec: VirtualMachineSpec, last: ShutdownRecord, blocked: Refusal | None
) -> Plan:
    """restartPolicy starts the VM again, at once the first time, with growing delays while it keeps stopping."""
    assert last.completed_at is not None
    started = d.status.started_at
    ran = last.completed_at - started if started is not None else None
    count = 1 if ran is None or ran >= RAN_LONG_ENOUGH else d.status.restarts + 1
    # From the later of the stop and the last start: a guest that died before it was seen running left
    # only the older stop on record.
    start_at = max(last.completed_at, started or last.completed_at) + crash_loop_delay(count)
    if d.now < start_at:
        message = (
            f"the guest stopped {_seconds(ran or timedelta(0))} after its start ({count - 1} start(s) in a row): "
            f"starting it again at {start_at.isoformat()}"
        )
        d.ready = ("False", "CrashLoopBackOff", message)
        previous = d.vm.status.condition("Ready")
        if previous is None or previous.reason != "CrashLoopBackOff":
            d.event(
                "Warning",
                "CrashLoopBackOff",
                "the guest keeps stopping soon after it starts: starting it again with growing delays",
            )
        return d.plan(wake_at=start_at)
    return _start(d, blocked, f"restartPolicy {spec.restart_policy.value}: starting again", restarts=count)


# How often a start refused for the node's memory looks again: other VMs stopping free it, and their
# workers do not tell this one.
NODE_MEMORY_RETRY = timedelta(seconds=15)


def _held_for_memory(d: _Decision) -> Plan | None:
    """Not started (nor, for a new VM, defined) while the node's memory has no room for it; None if it has."""
    memory = d.node_memory
    assert d.vm.spec is not None
    refused = nodepolicy.memory_refusal(d.vm.spec.domain.memory_mib, memory) if memory is not None else None
    if refused is None:
        return None
    d.ready = d.synced = ("False", refused.reason, refused.message)
    previous = d.vm.status.condition("Ready")
    if previous is None or previous.reason != refused.reason:
        d.event("Warning", refused.reason, refused.message)
    return d.plan(wake_at=d.now + NODE_MEMORY_RETRY)


def _start(d: _Decision, blocked: Refusal | None, why: str, *, restarts: int = 0) -> Plan:
    if blocked is not None:
        d.ready = ("False", blocked.reason, "not started while the node refuses the spec")
        return d.plan()
    held = _held_for_memory(d)
    if held is not None:
        return held
    d.ready = ("False", "Starting", why)
    if not d.held_back(ActionKind.START):
        first = d.vm.status.started_at is None
        d.update(started_at=d.now, restarts=restarts)
        d.event("Normal", "Starting", f"{why} (libvirt domain {_domain_name(d.vm)}, first start)" if first else why)
    return d.plan(Action(ActionKind.START))


def _delete(d: _Decision, spec: VirtualMachineSpec, domain: Domain | None) -> Plan:
    if domain is None:
        d.ready = ("False", "Deleting", "the domain is undefined")
        return d.plan(Action(ActionKind.REMOVE_FINALIZER) if d.vm.has_finalizer else None)
    if domain.state is DomainState.STOPPED:
        record = active_stop(d.status)
        if record is not None:
            _finish_requested_stop(d, record, domain)
        d.ready = ("False", "Deleting", "undefining the domain (disks are kept)")
        d.event("Normal", "Undefining", f"undefining libvirt domain {_domain_name(d.vm)}; disks are kept")
        return d.plan(Action(ActionKind.UNDEFINE))
    return _stop(d, spec, domain, ShutdownPurpose.DELETE)


def unreachable(vm: VirtualMachine, error: str, now: datetime, settings: Settings = Settings()) -> Plan:
    """libvirt cannot be asked: the state is unknown, and nothing is lost (a deadline waits in status)."""
    d = _Decision(vm=vm, now=now, settings=settings, status=vm.status)
    message = f"libvirt is unreachable: {error}; reconnecting"
    d.update(power_state=ObservedPowerState.UNKNOWN)
    d.ready = ("Unknown", "HypervisorUnreachable", message)
    d.synced = ("False", "HypervisorUnreachable", message)
    previous = vm.status.condition("Synced")
    if previous is None or previous.reason != "HypervisorUnreachable":
        d.event("Warning", "HypervisorUnreachable", message)
    return d.plan()


def after_request(
    status: VirtualMachineStatus, *, method: str | None, refusals: str, now: datetime
) -> tuple[VirtualMachineStatus, tuple[Event, ...]]:
    """Record a shutdown request the shell sent, and say what happened: which method libvirt accepted.

    Resends are reported sparsely, at requests 2, 4, 8, 16, ...: a day-long grace with a 10 s interval
    would otherwise post 8,640 Events (KubeVirt posts only the first). The status counts every one.
    """
    assert status.shutdown is not None
    record = shutdown.record_attempt(status.shutdown, method=method, message=refusals, now=now)
    new_status = status.model_copy(update={"shutdown": record})
    if method is None:
        return new_status, (Event("Warning", "ShutdownRequestFailed", f"no method was accepted: {refusals}"),)
    attempts = record.attempts
    if attempts > 1 and attempts & (attempts - 1):
        return new_status, ()
    reason = "ShutdownRequested" if attempts == 1 else "ShutdownRequestResent"
    message = f"request {attempts} by {method}; deadline {_iso(record.deadline)}"
    if attempts > 1:
        message += f" (resends are reported at requests 2, 4, 8, ...; the next at {attempts * 2})"
    return new_status, (Event("Normal", reason, message + (f" (not by: {refusals})" if refusals else "")),)
