"""The operator shell: one worker task per VirtualMachine of this node, wired to kopf, libvirt and Kubernetes.

kopf watches VirtualMachines and hands each event of this node's VMs to its worker; libvirt lifecycle
events wake the worker of their domain. One step of a worker is observe -> decide -> act: it observes the
domain, checks what the node allows of the spec (storage only when nothing is running that a stop could
be waiting on; the node's memory only before a start or a new VM's first definition, which then asks the
core once more), asks the pure
core (`reconcile.decide`), keeps a stop's deadline in the domain's own
metadata before the first request, acts, and only then reports. The report leaves beside the step: the
status through the VM's StatusWriter, Events through the recorder; neither is ever awaited, so an API
server that hangs or refuses never delays a force. The worker sleeps until woken or until the time the
core named, and never past a deadline it may have to force. It decides nothing itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from datetime import datetime, timedelta
from typing import Any

import kopf
import pydantic

from controller import domainxml, maintenance, nodepolicy
from controller.api import (
    FINALIZER,
    GROUP,
    PLURAL,
    RESTART_ANNOTATION,
    VERSION,
    DomainSpec,
    ObservedPowerState,
    PowerState,
    ShutdownRecord,
    VirtualMachineSpec,
    VirtualMachineStatus,
    read_status,
)
from controller.backstop import Backstop
from controller.clock import Clock
from controller.events import EventRecorder
from controller.hypervisor import Hypervisor, HypervisorError, HypervisorUnavailable
from controller.kube import Kube, KubeError
from controller.logs import vm_logger
from controller.maintenance import NO_TURN, UNKNOWN_TURN, Member, NodePlan, Taint, Turn
from controller.metrics import Metrics
from controller.nodelock import NodeLock
from controller.nodepolicy import NodeMemory, Refusal, StartReservations
from controller.reconcile import (
    Action,
    ActionKind,
    Domain,
    DomainState,
    Event,
    Failure,
    Plan,
    VirtualMachine,
    active_stop,
    after_request,
    decide,
    domain_name,
    unreachable,
)
from controller.reconcile import Settings as DecisionSettings
from controller.settings import Settings
from controller.shutdown import FORCE_LEAD
from controller.statuswriter import StatusWriter
from controller.storage import StorageCheck, StorageInspector

logger = logging.getLogger("vmop.operator")
Key = tuple[str, str]
_MAX_BACKOFF = 60.0
# Past a deadline whose force failed, it is tried again this often, whatever the backoff says.
_OVERDUE_RETRY = 1.0
# This long before a force's deadline (no request is re-sent in it: shutdown.FORCE_LEAD), a worker decides
# the force and arms it (see VmWorker._look_ahead): a hundred VMs sharing a deadline cost the event loop
# tenths of a second of steps, which must not be spent at the deadline itself.
_FORCE_LEAD = FORCE_LEAD.total_seconds()
_FIRST_RELIST_RETRY = 2.0
# The maintenance plan is made at most this often: one plan covers a burst of steps (a thousand VMs
# starting would otherwise cost a plan of all of them per step), and the order it keeps is between groups
# of VMs that take seconds to stop or start. Deadlines are each worker's own and never wait for a plan.
_MAINTENANCE_BATCH = 0.1


class _RetryForever:
    """kopf's backoffs between retries of its own requests, without an end.

    kopf gives up a request after its last backoff, and a failed resource discovery stops the whole
    operator: one that starts while the API server is down would exit, backstop and all, and take its
    node's deadlines with it. An unsized iterable is retried without end (2 s apart, so that the first
    list comes within seconds of the API server's return).
    """

    def __iter__(self) -> Iterator[float]:
        yield 0.5
        yield 1.0
        while True:
            yield 2.0


class _NoDiffBase(kopf.DiffBaseStorage):
    """No diff base: kopf keeps one for its on.create/on.update/on.field handlers, and vmop has only event
    handlers. kopf's default builds one on every watch event all the same, a deep copy of the whole object
    (status and managedFields included), and reads the last one back from an annotation, for nothing."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


ParsedSpec = tuple[VirtualMachineSpec | None, str | None]
"""A spec as read: the model, or None and why it cannot be read."""


def parse_spec(raw: dict[str, Any]) -> ParsedSpec:
    try:
        return VirtualMachineSpec.model_validate(raw), None
    except pydantic.ValidationError as exc:
        return None, "; ".join(f"spec.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())


def read_vm(body: dict[str, Any], status: VirtualMachineStatus, parsed: ParsedSpec | None = None) -> VirtualMachine:
    """The core's view of a VirtualMachine object; an unreadable spec is reported, never raised.

    The status is the worker's own (read once from the object when the worker starts, see read_status).
    parsed: the object's spec as already read (see VmWorker._read), else it is read here.
    """
    meta = body["metadata"]
    spec, error = parsed if parsed is not None else parse_spec(body.get("spec") or {})
    return VirtualMachine(
        namespace=meta["namespace"],
        name=meta["name"],
        uid=meta["uid"],
        generation=int(meta.get("generation", 0)),
        deleting=bool(meta.get("deletionTimestamp")),
        has_finalizer=FINALIZER in (meta.get("finalizers") or []),
        restart_token=(meta.get("annotations") or {}).get(RESTART_ANNOTATION),
        spec=spec,
        status=status,
        spec_error=error,
    )


def _decided_on(body: dict[str, Any]) -> tuple[Any, ...]:
    """What of the object a decision reads, besides the status the worker holds itself."""
    meta = body["metadata"]
    return (
        meta.get("generation"),
        meta.get("uid"),
        meta.get("deletionTimestamp"),
        tuple(meta.get("finalizers") or ()),
        (meta.get("annotations") or {}).get(RESTART_ANNOTATION),
        repr(body.get("spec")),
    )


def _kept(body: dict[str, Any]) -> dict[str, Any]:
    """What a worker keeps of its object: everything its decisions, Events and writes read.

    Not the managedFields (the API server's record of who wrote which field, most of an object's size)
    nor the status (the worker holds its own, read once when it starts): kept for each of a thousand VMs,
    they were a third of the operator's memory.
    """
    kept = {key: value for key, value in body.items() if key != "status"}
    meta = body["metadata"]
    if "managedFields" in meta:
        kept["metadata"] = {key: value for key, value in meta.items() if key != "managedFields"}
    return kept


def _resource_version(body: dict[str, Any]) -> int | None:
    try:
        return int(body["metadata"]["resourceVersion"])
    except (KeyError, ValueError):
        return None


def _takes_memory(plan: Plan, observed: Domain | None, spec: VirtualMachineSpec) -> bool:
    """A start, or the first definition of a VM to run: the steps the node's memory ceiling is asked about."""
    if plan.action is None:
        return False
    first_definition = plan.action.kind is ActionKind.DEFINE and observed is None
    return plan.action.kind is ActionKind.START or (first_definition and spec.power_state is not PowerState.STOPPED)


class NodeMemoryReads:
    """The node's memory as libvirt tells it, one read shared by every start reserved before it began.

    Each start reserves its memory and then needs a read of the running domains taken after that
    reservation (see StartReservations). A read lists every running domain, so one per start cost a
    thousand VMs starting at once a million libvirt calls on the node's one lane (1000 VMs converged in 26
    s without the check, 42 to 78 s with one read each). A read already under way began before this
    reservation and does not count for it; the next one serves every start waiting by then.
    """

    def __init__(self, read: Callable[[], Coroutine[Any, Any, tuple[int, dict[str, int]]]]) -> None:
        self._read = read
        self._tickets = 0
        self._task: asyncio.Task[tuple[int, dict[str, int]]] | None = None
        self._covers = 0  # the tickets the current read serves: all up to this one

    def ticket(self) -> int:
        """Taken right after a reservation, in the same step of the event loop."""
        self._tickets += 1
        return self._tickets

    async def after(self, ticket: int) -> tuple[int, dict[str, int]]:
        """A read that began after the reservation of `ticket`: (total MiB, running domains' MiB by uuid)."""
        while True:
            task = self._task
            if task is not None and self._covers >= ticket:
                return await asyncio.shield(task)
            if task is not None and not task.done():
                await asyncio.wait([task])  # began too early for this ticket: the next read will do
                continue
            self._covers = self._tickets
            self._task = asyncio.create_task(self._read(), name="node-memory")
            # Read by its waiters; this keeps an error nobody waited for out of the loop's log.
            self._task.add_done_callback(lambda done: done.cancelled() or done.exception())


class _CalledOff(Exception):
    """An armed force was called off before its deadline: the worker was woken by news."""


class VmWorker:
    """Reconciles one VirtualMachine, one step at a time, until its object is gone."""

    def __init__(self, operator: Operator, body: dict[str, Any], *, forced: ShutdownRecord | None = None) -> None:
        meta = body["metadata"]
        self.key: Key = (meta["namespace"], meta["name"])
        self.uid: str = meta["uid"]
        self.domain = domain_name(*self.key)
        self.body = _kept(body)
        self._op = operator
        # The status this worker last decided: the truth while it runs (one operator per node writes it);
        # the API server's copy may lag behind it while the writer retries.
        self._status, unreadable = read_status(body.get("status") or {})
        self._forced = forced
        self._wake = asyncio.Event()
        self._backoff = 0.0
        self._last_action: Action | None = None
        self._force_deadline: datetime | None = None
        # The last action that failed, until one succeeds: decide reports it and holds it back until its retry.
        self._failure: Failure | None = None
        # The last look at the spec's storage, and whether it was taken in this step (see _check_storage).
        self._storage: StorageCheck | None = None
        self._storage_fresh = False
        # What the node's maintenance asks of this VM (the operator's planner sets it), and what the planner
        # knows of it: None until its first step, then its view (None too for a VM the planner leaves out).
        self.turn: Turn = UNKNOWN_TURN
        self.member: Member | None = None
        self.stepped = False
        # The spec as last read, and its definition's hash: both kept until the spec changes (see _read).
        self._spec: tuple[dict[str, Any], ParsedSpec] | None = None
        self._spec_hash: tuple[DomainSpec, str] | None = None
        self._log = vm_logger(*self.key, self.domain, logger)
        if unreadable:
            self._log.warning("status fields %s cannot be read by this version; kept what can be", unreadable)
        self.writer = StatusWriter(
            operator.kube,
            namespace=self.key[0],
            name=self.key[1],
            written=self._status,
            resource_version=lambda: str(self.body["metadata"].get("resourceVersion", "")),
            on_body=self.update,
            log=self._log,
        )
        # In a context of its own: created from kopf's handler, the task would otherwise keep kopf's context
        # variables for as long as the VM lives, and with them the watch event that created it, whole.
        self.task = asyncio.create_task(
            self._run(), name=f"vm:{self.key[0]}/{self.key[1]}", context=contextvars.Context()
        )

    def update(self, body: dict[str, Any], fresh: bool = True) -> None:
        """Take a newer version of the object; a watch event older than our own last write is ignored.

        The worker is woken only when something it decides on changed: the echo of its own status write
        (fresh=False, or a watch event that differs from what it has only in status and version) is not
        news, and waking on it would turn any decision that is not a fixed point into a hot loop.
        """
        new, old = _resource_version(body), _resource_version(self.body)
        if new is not None and old is not None and new < old:
            return
        news = fresh and _decided_on(body) != _decided_on(self.body)
        self.body = _kept(body)
        if news:
            self.wake()

    def wake(self) -> None:
        self._wake.set()

    def cancel(self) -> None:
        self.task.cancel()
        self.writer.task.cancel()

    async def _run(self) -> None:
        # Until libvirt has answered once, nothing is known; "not known yet" is not "gone", nor news.
        await self._op.hypervisor.wait_connected()
        while True:
            self._wake.clear()
            try:
                delay = await self._step()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                # A bug of vmop's, not the VM's: logged with its traceback, counted, and shown on the VM.
                self._log.exception("reconcile failed unexpectedly")
                self._op.metrics.reconcile_errors.labels("unexpected").inc()
                self._op.events.post(
                    self.body, type_="Warning", reason="ReconcileError", message=f"vmop failed unexpectedly: {error!r}"
                )
                delay = self._next_backoff()
            if delay is None:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._clamp(delay))

    def _clamp(self, delay: float) -> float:
        """No sleep, backoff included, runs past a deadline this worker has to force."""
        if self._force_deadline is None:
            return max(0.0, delay)
        until = self._op.clock.seconds_until(self._force_deadline)
        if until > _FORCE_LEAD:
            until -= _FORCE_LEAD  # woken ahead of the deadline, to arm its force
        return max(0.0, min(delay, until if until > 0 else _OVERDUE_RETRY))

    def _next_backoff(self) -> float:
        self._backoff = min(_MAX_BACKOFF, max(1.0, self._backoff * 2))
        return self._backoff

    def _read(self) -> VirtualMachine:
        # The spec is read again only when it changed: most steps (a status write's echo, a libvirt event, a
        # resync) see the same spec, and a thousand VMs starting take four steps each.
        raw = self.body.get("spec") or {}
        if self._spec is None or self._spec[0] != raw:
            self._spec = (raw, parse_spec(raw))
        return read_vm(self.body, self._status, self._spec[1])

    async def _step(self) -> float | None:
        """One step; returns seconds until the next look, or None to look again at once (an action was taken)."""
        delay: float | None = 0.0
        try:
            delay = await self._reconcile()
            return delay
        finally:
            # A start's reservation of node memory lasts until its start call has returned (or was not made).
            self._op.reservations.release(self.uid)
            # A status decided on the way to the next step (one at once) lasts only until that step decides
            # again: the writer holds it for that step. Any other end of a step, a failure included, is where
            # the VM settles for now, and its status is written at once.
            if delay is None:
                self.writer.hold()
            else:
                self.writer.release()
            if not self.stepped:
                self.stepped = True
                self._op.first_step_done(self)
                self._op.maintenance_changed()

    async def _reconcile(self) -> float | None:
        op = self._op
        vm = self._read()
        try:
            observed = await op.hypervisor.observe(self.domain)
        except (HypervisorUnavailable, HypervisorError) as error:
            return self._look_failed(vm, "Observe", error)
        if self._forced is not None:
            vm = self._take_over_forced_stop(vm, self._forced)
            self._forced = None
        await self._check_storage(vm, observed)
        plan = self._decide(vm, observed)
        if vm.spec is not None and _takes_memory(plan, observed, vm.spec):
            try:
                node_memory = await self._node_memory(vm.spec.domain.memory_mib)
            except (HypervisorUnavailable, HypervisorError) as error:
                return self._look_failed(vm, "NodeMemory", error)
            plan = self._decide(vm, observed, node_memory)
        plan, armed_at = self._look_ahead(vm, observed, plan)
        self._seen(vm, observed, plan)
        mark = plan.shutdown_mark
        self._force_deadline = mark.deadline if mark is not None and mark.force else None
        if observed is not None and observed.owner_uid == vm.uid and observed.state is not DomainState.STOPPED:
            await self._keep_mark(plan, observed)
        op.status_seen(self.key, plan.status)
        if plan.action is None:
            self._report(vm.status, plan)
            self._last_action = None
            return op.clock.seconds_until(plan.wake_at) if plan.wake_at else None
        if plan.action == self._last_action:
            # Every action changes what the next decision sees; the same one again at once had no effect.
            # Back off rather than spin against libvirt and the API server, and say so.
            self._log.warning("%s again without effect: backing off", plan.action.kind.value)
            op.metrics.reconcile_errors.labels("repeated").inc()
            self._last_action = None
            self._report(vm.status, plan)
            return self._next_backoff()
        self._last_action = plan.action
        try:
            status, events = await self._act(vm, plan, armed_at)
        except _CalledOff:
            self._last_action = None
            return None  # something changed before the deadline: decided again, at once
        except HypervisorUnavailable as error:
            self._report(vm.status, plan)
            unknown = unreachable(dataclasses.replace(vm, status=plan.status), str(error), op.clock.now())
            self._report(plan.status, unknown)
            return op.decision_settings.resync.total_seconds()
        except (HypervisorError, KubeError) as error:
            self._report(vm.status, plan)
            self._failed(plan.action.kind.value, error)
            delay = self._next_backoff()
            if plan.action.kind is ActionKind.FORCE_OFF:
                delay = min(delay, _OVERDUE_RETRY)
            self._failure = Failure(
                plan.action.kind,
                str(error),
                op.clock.now() + timedelta(seconds=delay),
                spec_hash=self._expected_hash(vm) if plan.action.kind is ActionKind.DEFINE else None,
            )
            self._last_action = None
            return None  # decided again at once: the failure shows in the conditions, the retry waits
        self._report(vm.status, dataclasses.replace(plan, status=status, events=(*plan.events, *events)))
        self._backoff = 0.0
        self._failure = None
        return None

    def _seen(self, vm: VirtualMachine, observed: Domain | None, plan: Plan) -> None:
        """Tell the maintenance planner where this VM is, if that changed (a planner run costs all VMs)."""
        member = None
        if vm.spec is not None and not vm.deleting and (observed is None or observed.owner_uid == vm.uid):
            overdue = plan.status.condition("ShutdownOverdue")
            member = Member(
                key=self.key,
                priority=vm.spec.priority,
                tolerations=tuple(vm.spec.tolerations),
                wants_running=vm.spec.power_state is not PowerState.STOPPED,
                off=observed is None or observed.state is DomainState.STOPPED,
                held_by=plan.status.held_by_taint,
                overdue=overdue is not None and overdue.status == "True",
            )
        if member != self.member:
            self.member = member
            self._op.maintenance_changed()

    def _look_failed(self, vm: VirtualMachine, what: str, error: HypervisorUnavailable | HypervisorError) -> float:
        """A look at libvirt failed: unreachable is the node's (reported, looked at again at the resync, or
        when the connection is back), any other error this VM's (reported, retried with back-off)."""
        if isinstance(error, HypervisorUnavailable):
            self._report(vm.status, unreachable(vm, str(error), self._op.clock.now()))
            return self._op.decision_settings.resync.total_seconds()
        self._failed(what, error)
        return self._next_backoff()

    def _expected_hash(self, vm: VirtualMachine) -> str | None:
        if vm.spec is None:
            return None
        if self._spec_hash is None or self._spec_hash[0] is not vm.spec.domain:
            self._spec_hash = (vm.spec.domain, domainxml.spec_hash(vm.spec.domain, self._op.settings.host))
        return self._spec_hash[1]

    async def _check_storage(self, vm: VirtualMachine, observed: Domain | None) -> None:
        """Look at the spec's storage, unless the domain runs and a stop of it may be under way.

        Resolving paths and reading image headers touches file systems, and one that hangs (a dead NFS
        mount) must never hold back a stop or its force: those steps keep the last look, which is used
        only for reporting then, since no definition or start follows a stop in the same step. Every
        definition and start is decided on a look taken in its own step.
        """
        self._storage_fresh = False
        if vm.spec is None or vm.deleting:
            return
        running = observed is not None and observed.state is not DomainState.STOPPED
        stopping = (
            vm.spec.power_state is PowerState.STOPPED
            or active_stop(vm.status) is not None
            or (vm.restart_token is not None and vm.restart_token != vm.status.restarted_at)
        )
        if running and stopping:
            return
        self._storage = await self._op.storage.check(vm.spec.domain)
        self._storage_fresh = True

    async def _node_memory(self, wanted_mib: int) -> NodeMemory:
        """The node's committed memory for a start: reserved first, so that a concurrent start sees this one."""
        op = self._op
        in_flight = op.reservations.reserve(self.uid, wanted_mib)
        total_mib, running = await op.memory_reads.after(op.memory_reads.ticket())
        ceiling = op.settings.policy.memory_ceiling_mib
        return NodeMemory(
            committed_mib=nodepolicy.committed_mib(self.uid, running, in_flight),
            ceiling_mib=ceiling if ceiling is not None else total_mib,
        )

    def _look_ahead(self, vm: VirtualMachine, observed: Domain | None, plan: Plan) -> tuple[Plan, datetime | None]:
        """Within _FORCE_LEAD of a force deadline, with nothing to do before it: the plan for the deadline.

        The force is decided now, on what is seen now, as of the deadline, and armed: at the deadline nothing
        is left to do but send the destroy. Anything that changes meanwhile (the guest powers off, the spec
        is edited) wakes the worker, which calls the armed force off and decides again.
        """
        mark = plan.shutdown_mark
        if plan.action is not None or mark is None or not mark.force or plan.wake_at != mark.deadline:
            return plan, None
        if self._failure is not None and self._failure.action is ActionKind.FORCE_OFF:
            return plan, None  # a force that failed is retried as it falls due, not armed again at once
        # A timer may fire a hair early: the wake-up at deadline - _FORCE_LEAD must arm, not sleep again.
        if not 0 < self._op.clock.seconds_until(mark.deadline) <= _FORCE_LEAD + 0.001:
            return plan, None
        ahead = self._decide(vm, observed, now=mark.deadline)
        if ahead.action is None or ahead.action.kind is not ActionKind.FORCE_OFF:
            return plan, None
        return ahead, mark.deadline

    def _decide(
        self,
        vm: VirtualMachine,
        observed: Domain | None,
        node_memory: NodeMemory | None = None,
        *,
        now: datetime | None = None,
    ) -> Plan:
        op = self._op
        refusals: tuple[Refusal, ...] = ()
        storage = self._storage
        if vm.spec is not None:
            if storage is not None:
                refusals += tuple(Refusal(nodepolicy.STORAGE_NOT_ALLOWED, problem) for problem in storage.problems)
            refusals += nodepolicy.refusals(vm.spec.domain, op.settings.policy)
        fresh = storage if self._storage_fresh else None
        return decide(
            vm,
            observed,
            now or op.clock.now(),
            expected_spec_hash=self._expected_hash(vm),
            expected_storage_hash=domainxml.storage_hash(fresh.resolved) if fresh and fresh.resolved else None,
            refusals=refusals,
            node_memory=node_memory,
            settings=op.decision_settings,
            failure=self._failure,
            turn=self.turn,
        )

    async def _keep_mark(self, plan: Plan, observed: Domain) -> None:
        """The stop under way goes into the domain's metadata before anything is sent: the node's own copy.

        A failure here is reported and the step goes on: the status still carries the deadline, and the
        mark is only the backstop for when the status cannot be read.
        """
        wanted = plan.shutdown_mark
        if wanted == observed.shutdown_mark:
            return
        if wanted is None and (observed.shutdown_mark is None or active_stop(plan.status) is not None):
            return
        try:
            await self._op.hypervisor.set_shutdown_mark(observed.uuid, wanted)
        except (HypervisorError, HypervisorUnavailable) as error:
            self._log.warning("could not keep the stop in the domain's metadata: %s", error)

    def _take_over_forced_stop(self, vm: VirtualMachine, record: ShutdownRecord) -> VirtualMachine:
        """The backstop forced this VM before the worker existed: that stop is the status's now."""
        known = vm.status.shutdown
        # The status's own record stands only for a later stop, or for this one already reported.
        if (
            known is not None
            and known.requested_at is not None
            and record.requested_at is not None
            and (
                known.requested_at > record.requested_at
                or (known.requested_at == record.requested_at and known.outcome is not None)
            )
        ):
            return vm
        status = vm.status.model_copy(update={"shutdown": record})
        assert record.deadline is not None
        assert record.completed_at is not None
        late = (record.completed_at - record.deadline).total_seconds()
        event = Event(
            "Normal",
            "ForcedOff",
            f"forced off {late:.2f}s after the deadline (by the node, before the API server answered)",
        )
        self._report(vm.status, Plan(status=status, events=(event,)))
        return dataclasses.replace(vm, status=status)

    def _failed(self, what: str, error: Exception) -> None:
        message = f"{what} failed: {error}"
        self._log.error(message)
        self._op.metrics.reconcile_errors.labels(what).inc()
        self._op.events.post(self.body, type_="Warning", reason="ActionFailed", message=message)

    def _report(self, old: VirtualMachineStatus, plan: Plan) -> None:
        """Hand the status to the writer and the events to the recorder; neither is waited for."""
        self._status = plan.status
        self._op.status_changed(old, plan.status)
        self.writer.submit(plan.status)
        for event in plan.events:
            self._log.info("%s: %s", event.reason, event.message, extra={"reason": event.reason})
            self._op.events.post(self.body, type_=event.type, reason=event.reason, message=event.message)

    async def _act(
        self, vm: VirtualMachine, plan: Plan, armed_at: datetime | None = None
    ) -> tuple[VirtualMachineStatus, tuple[Event, ...]]:
        """Take the plan's action; returns the status after it (a request adds its attempt) and its events.

        A force armed for a deadline is sent at it, unless the worker is woken first (then _CalledOff)."""
        op = self._op
        hyp = op.hypervisor
        action = plan.action
        assert action is not None
        self._log.debug("action %s", action.kind.value)
        match action.kind:
            case ActionKind.ADD_FINALIZER:
                self.update(await op.kube.add_finalizer(self.body), fresh=False)
            case ActionKind.REMOVE_FINALIZER:
                self.update(await op.kube.remove_finalizer(self.body), fresh=False)
            case ActionKind.DEFINE:
                assert vm.spec is not None
                # A definition is decided only on a look at the storage taken in its own step, which found
                # nothing to refuse (see _check_storage): the domain gets the paths as resolved then.
                storage = self._storage
                assert self._storage_fresh
                assert storage is not None
                assert storage.resolved is not None
                await hyp.define(
                    domainxml.build(
                        name=self.domain,
                        namespace=vm.namespace,
                        vm_name=vm.name,
                        uid=vm.uid,
                        spec=vm.spec.domain,
                        host=op.settings.host,
                        storage=storage.resolved,
                    )
                )
            case ActionKind.START:
                await hyp.start_domain(self.uid)
            case ActionKind.SUSPEND:
                await hyp.suspend(self.uid)
            case ActionKind.RESUME:
                await hyp.resume(self.uid)
            case ActionKind.WAKE_UP:
                await hyp.wake_up(self.uid)
            case ActionKind.FORCE_OFF:
                if armed_at is None:
                    await hyp.force_off(self.uid)
                elif not await hyp.force_off(self.uid, delay=op.clock.seconds_until(armed_at), abort=self._wake):
                    raise _CalledOff
            case ActionKind.UNDEFINE:
                await hyp.undefine(self.uid)
            case ActionKind.REQUEST_SHUTDOWN:
                return await self._request_shutdown(plan.status, action)
        return plan.status, ()

    async def _request_shutdown(
        self, status: VirtualMachineStatus, action: Action
    ) -> tuple[VirtualMachineStatus, tuple[Event, ...]]:
        assert status.shutdown is not None
        deadline = status.shutdown.deadline
        # A slow guest agent must never push the force back: a request gets at most the time left until
        # the deadline (libvirt's own agent timeout bounds it further; a late answer is simply dropped).
        budget = self._op.clock.seconds_until(deadline) if deadline is not None else None
        try:
            method, refusals = await asyncio.wait_for(
                self._op.hypervisor.request_shutdown(self.uid, action.methods),
                timeout=budget if budget is not None and budget > 0 else None,
            )
        except TimeoutError:
            method, refusals = None, "no method answered before the deadline"
        refusals = "; ".join(part for part in (action.skipped, refusals) if part)
        return after_request(status, method=method, refusals=refusals, now=self._op.clock.now())


class Operator:
    """Holds the workers of this node's VirtualMachines, and nothing for any other node's."""

    def __init__(
        self,
        settings: Settings,
        *,
        kube: Kube,
        hypervisor: Hypervisor,
        events: EventRecorder,
        metrics: Metrics,
        clock: Clock,
        node_lock: NodeLock | None = None,
        storage: StorageInspector | None = None,
    ) -> None:
        self.settings = settings
        self.storage = storage or StorageInspector(settings.allowed_storage_dirs)
        self.reservations = StartReservations()
        self.memory_reads = NodeMemoryReads(hypervisor.node_memory)
        self.node_lock = node_lock
        self.kube = kube
        self.hypervisor = hypervisor
        self.events = events
        self.metrics = metrics
        self.clock = clock
        self.decision_settings = DecisionSettings(resync=settings.resync)
        self.backstop = Backstop(hypervisor, clock)
        hypervisor.listen(on_domain_event=self.domain_event, on_connection_change=self.connection_changed)
        self.workers: dict[Key, VmWorker] = {}
        self._by_domain: dict[str, VmWorker] = {}
        self._power_states: dict[Key, ObservedPowerState] = {}
        self._power_counts: Counter[ObservedPowerState] = Counter()  # of _power_states, kept as it changes
        self._overdue: set[Key] = set()  # VMs whose ShutdownOverdue condition is True
        self._reconciled = 0  # workers whose first step is done (the vmop_virtual_machines_reconciled gauge)
        self._tasks: list[asyncio.Task[None]] = []
        # The node's maintenance: its Node as last read (None: none exists), its NoExecute taints (None
        # until the Node has been read once), when each taint without timeAdded was first seen, the plan.
        self._node: dict[str, Any] | None = None
        self._taints: tuple[Taint, ...] | None = None
        self._taints_first_seen: dict[tuple[str, str, str], datetime] = {}
        self._node_plan: NodePlan | None = None
        self._listed = False
        self._maintenance_dirty = asyncio.Event()

    async def start(self) -> None:
        """After the node lock is held: connect to libvirt, arm the backstop, relist at every resync."""
        await self.events.start()
        await self.hypervisor.open()
        self._tasks = [
            asyncio.create_task(self.backstop.arm(), name="backstop"),
            asyncio.create_task(self._relist(), name="relist"),
            asyncio.create_task(self._read_node(), name="node"),
            asyncio.create_task(self._maintain(), name="maintenance"),
        ]

    def is_mine(self, spec: dict[str, Any]) -> bool:
        return spec.get("nodeName") == self.settings.node_name

    def object_event(self, event_type: str | None, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        key: Key = (meta["namespace"], meta["name"])
        worker = self.workers.get(key)
        if event_type == "DELETED":
            if worker is not None:
                self._forget(worker)
            return
        if worker is not None and worker.uid != meta["uid"]:
            self._forget(worker)  # the name was reused by a new object: its predecessor is gone
            worker = None
        if worker is None:
            worker = VmWorker(self, body, forced=self.backstop.hand_over(meta["uid"]))
            if self._taints == () and self._listed and not (body.get("status") or {}).get("heldByTaint"):
                # An untainted node with nothing held: the planner's answer is known before it runs.
                worker.turn = NO_TURN
            self.workers[key] = worker
            self._by_domain[worker.domain] = worker
        else:
            worker.update(body)

    async def _relist(self) -> None:
        """At every resync, what the watch may have missed: after a relist kopf sends no DELETED events.

        A worker whose object is not in the list (and is older than the list) is dropped, and its domain
        is left as it is: an orphan is never restarted. Objects in the list refresh their workers, so a
        deletion whose update was missed is seen too.
        """
        # The first one at once, and again every few seconds until it succeeds: kopf's own list may never
        # come (its discovery, run while the API server was still coming back, can miss the CRD, and kopf
        # does not look again), and a stop the backstop forced meanwhile must be reported within seconds.
        resync = self.decision_settings.resync.total_seconds()
        listed_once = False
        while True:
            try:
                items, list_version = await self.kube.list_node(self.settings.node_name)
            except KubeError as error:
                logger.warning("relist failed: %s", error)
                await asyncio.sleep(resync if listed_once else _FIRST_RELIST_RETRY)
                continue
            listed_once = True
            if not self._listed:
                self._listed = True
                self.maintenance_changed()
            listed = set()
            for body in items:
                listed.add((body["metadata"]["namespace"], body["metadata"]["name"]))
                self.object_event(None, body)
            for key, worker in list(self.workers.items()):
                version = _resource_version(worker.body)
                if key not in listed and version is not None and version < int(list_version):
                    logger.info(
                        "%s/%s is gone (not in the relist): its worker stops", *key, extra={"vm": "/".join(key)}
                    )
                    self._forget(worker)
            await asyncio.sleep(resync)

    async def _read_node(self) -> None:
        """The Node, read at once (again every few seconds until it answers) and at every resync; the watch
        (node_event) brings every change in between."""
        while True:
            try:
                node = await self.kube.get_node(self.settings.node_name)
            except KubeError as error:
                logger.warning("reading the Node failed: %s", error)
                await asyncio.sleep(
                    self.decision_settings.resync.total_seconds() if self._taints is not None else _FIRST_RELIST_RETRY
                )
                continue
            self.node_event(node)
            await asyncio.sleep(self.decision_settings.resync.total_seconds())

    def node_event(self, node: dict[str, Any] | None) -> None:
        """This node's Node object as now (None: there is none); a watch event or a read."""
        taints = maintenance.read_taints(node)
        now = self.clock.now()
        names = {taint.name for taint in taints}
        for name in names - self._taints_first_seen.keys():
            self._taints_first_seen[name] = now
        for name in self._taints_first_seen.keys() - names:
            del self._taints_first_seen[name]
        if node is not None:
            node = {**node, "apiVersion": "v1", "kind": "Node"}
        self._node = node
        if taints != self._taints:
            self._taints = taints
            self.maintenance_changed()

    def maintenance_changed(self) -> None:
        self._maintenance_dirty.set()

    async def _maintain(self) -> None:
        """Plan the node's maintenance whenever a VM, the Node or the clock (a tolerationSeconds) changes it.

        The plan is made once for a burst of changes (the task runs after the steps that caused them), and
        gives every worker its turn; a worker is woken only when its turn changed.
        """
        while True:
            await asyncio.sleep(_MAINTENANCE_BATCH)
            self._maintenance_dirty.clear()
            try:
                next_at = self._plan_maintenance()
            except Exception:
                # A bug of vmop's: counted and logged, and planned again at the next change; the workers
                # keep their turns meanwhile, so a stop under way goes on to its deadline.
                logger.exception("planning the node's maintenance failed unexpectedly")
                self.metrics.reconcile_errors.labels("unexpected").inc()
                next_at = None
            timeout = self.clock.seconds_until(next_at) if next_at is not None else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._maintenance_dirty.wait(), timeout=max(0.0, timeout) if timeout is not None else None
                )

    def _plan_maintenance(self) -> datetime | None:
        workers = list(self.workers.values())
        # Nothing is known of an order until the Node and every VM of the node have been seen once: until
        # then each worker keeps its UNKNOWN turn (stops under way go on, nothing starts, nothing new stops).
        if self._taints is None or not self._listed or not all(worker.stepped for worker in workers):
            return None
        members = [worker.member for worker in workers if worker.member is not None]
        plan = maintenance.plan(self._taints, self._taints_first_seen, members, self.clock.now())
        for worker in workers:
            turn = plan.turns.get(worker.key, NO_TURN)
            if turn != worker.turn:
                worker.turn = turn
                worker.wake()
        self.metrics.held_by_taint.set(sum(member.held_by is not None for member in members))
        if self._node is not None:
            for event in maintenance.node_events(self._node_plan, plan):
                logger.info("%s: %s", event.reason, event.message, extra={"reason": event.reason})
                self.events.post(self._node, type_=event.type, reason=event.reason, message=event.message)
        self._node_plan = plan
        return plan.next_at

    def _forget(self, worker: VmWorker) -> None:
        worker.cancel()
        if worker.stepped and self.workers.get(worker.key) is worker:
            self._reconciled -= 1
            self.metrics.vms_reconciled.set(self._reconciled)
        self.workers.pop(worker.key, None)
        self._by_domain.pop(worker.domain, None)
        self.maintenance_changed()
        self._power_state_is(worker.key, None)
        self._overdue.discard(worker.key)
        self.metrics.shutdowns_overdue.set(len(self._overdue))

    def first_step_done(self, worker: VmWorker) -> None:
        """A worker has looked at its VM and decided once: after a restart, the node is caught up when all have."""
        if self.workers.get(worker.key) is worker:  # not one forgotten (cancelled) in its first step
            self._reconciled += 1
            self.metrics.vms_reconciled.set(self._reconciled)

    def domain_event(self, name: str) -> None:
        worker = self._by_domain.get(name)
        if worker is not None:
            worker.wake()

    def connection_changed(self, connected: bool) -> None:
        self.metrics.libvirt_connected.set(1 if connected else 0)
        for worker in self.workers.values():
            worker.wake()

    def status_changed(self, old: VirtualMachineStatus, new: VirtualMachineStatus) -> None:
        """Counted when decided, not when written: metrics, like Events, never wait for the API server."""
        if new.shutdown is not None and new.shutdown.outcome is not None and old.shutdown != new.shutdown:
            self.metrics.stop_finished(new.shutdown)

    def _power_state_is(self, key: Key, state: ObservedPowerState | None) -> None:
        """Counted as it changes (None: the VM is gone), not recounted over every VM of the node: a thousand
        VMs starting change state a few thousand times."""
        old = self._power_states.pop(key, None)
        if state is not None:
            self._power_states[key] = state
        if old == state:
            return
        if old is not None:
            self._power_counts[old] -= 1
        if state is not None:
            self._power_counts[state] += 1
        self.metrics.power_states(self._power_counts)

    def status_seen(self, key: Key, status: VirtualMachineStatus) -> None:
        """Counted on every reconcile, not only on status writes: after an operator restart nothing is written."""
        state = status.power_state
        self._power_state_is(key, state)
        overdue = status.condition("ShutdownOverdue")
        if overdue is not None and overdue.status == "True":
            if key not in self._overdue:
                self._overdue.add(key)
                self.metrics.shutdowns_overdue.set(len(self._overdue))
        elif key in self._overdue:
            self._overdue.discard(key)
            self.metrics.shutdowns_overdue.set(len(self._overdue))

    async def stop(self) -> None:
        """Stop the workers and drop the libvirt connection; every guest is left exactly as it is."""
        tasks = [*self._tasks]
        for worker in self.workers.values():
            worker.cancel()
            tasks += [worker.task, worker.writer.task]
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.backstop.close()
        if self.node_lock is not None:
            # Nothing acts any more: a standby may take over now, not after the Events below are drained.
            self.node_lock.release()
            self.metrics.node_lock_held.set(0)
            logger.info("released %s: no longer acting for node %s", self.node_lock.path, self.settings.node_name)
        await self.hypervisor.close()
        await self.events.close()
        await self.kube.close()


def register(registry: kopf.OperatorRegistry, operator: Operator, login: Callable[..., Any]) -> None:
    """Wire the operator into kopf. Only event handlers: kopf then keeps no state in the objects."""

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        # One operator per node, all equal: peering would make them freeze each other (the node lock
        # decides which copy acts).
        settings.peering.standalone = True
        # Only this node's VirtualMachines, filtered by the API server (spec.nodeName is a selectable field
        # of the CRD): the operator of a node receives, parses and holds nothing of other nodes' VMs. The
        # check in the handler below stays as a second line, for API servers without selectable fields.
        settings.watching.field_selectors[GROUP, PLURAL] = f"spec.nodeName={operator.settings.node_name}"
        # Its own Node only (its taints drive the node's maintenance), and nothing of any other node.
        settings.watching.field_selectors["v1", "nodes"] = f"metadata.name={operator.settings.node_name}"
        # Least privilege: no CRD or namespace scanning, and kopf posts no Events of its own.
        settings.scanning.disabled = True
        settings.posting.enabled = False
        settings.persistence.diffbase_storage = _NoDiffBase()
        # Never give up on the API server, and relist within seconds of its return rather than after
        # kopf's default backoffs (up to 21 s between tries); a relist is one request.
        settings.networking.error_backoffs = _RetryForever()
        settings.networking.request_timeout = operator.settings.api_timeout * 3
        settings.networking.connect_timeout = operator.settings.api_timeout
        await operator.start()

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        await operator.stop()

    kopf.on.login(registry=registry)(login)

    @kopf.on.probe(id="libvirtConnected", registry=registry)
    def libvirt_connected(**_: Any) -> bool:
        return operator.hypervisor.connected

    @kopf.on.event("v1", "nodes", registry=registry)
    async def node(event: kopf.RawEvent, **_: Any) -> None:
        body: dict[str, Any] = dict(event["object"])
        if body.get("metadata", {}).get("name") == operator.settings.node_name:
            operator.node_event(None if event["type"] == "DELETED" else body)

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def virtual_machine(event: kopf.RawEvent, **_: Any) -> None:
        # On the raw object rather than in a kopf `when` filter, which builds every handler argument anew
        # on each event to call it: this handler runs for every watch event of every VM of the node.
        body: dict[str, Any] = dict(event["object"])
        if operator.is_mine(body.get("spec") or {}):
            operator.object_event(event["type"], body)
