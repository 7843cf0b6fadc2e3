"""The operator shell: one worker task per VirtualMachine of this node, wired to kopf, libvirt and Kubernetes.

kopf watches VirtualMachines and hands each event of this node's VMs to its worker; libvirt lifecycle
events wake the worker of their domain. A worker observes, asks the pure core (`reconcile.decide`) what
to do, writes the status it returns (before acting: a deadline is persisted before the first request),
acts, and sleeps until woken or until the time the core named. It decides nothing itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import kopf
import pydantic
from kubernetes import client

from controller import domainxml, storage
from controller.api import (
    FINALIZER,
    GROUP,
    PLURAL,
    RESTART_ANNOTATION,
    VERSION,
    ObservedPowerState,
    VirtualMachineSpec,
    VirtualMachineStatus,
)
from controller.hypervisor import Hypervisor, HypervisorError, HypervisorUnavailable
from controller.kube import Kube
from controller.metrics import Metrics
from controller.reconcile import (
    Action,
    ActionKind,
    Plan,
    VirtualMachine,
    after_request,
    decide,
    domain_name,
    unreachable,
)
from controller.reconcile import Settings as DecisionSettings
from controller.settings import Settings

logger = logging.getLogger("vmop.operator")
Key = tuple[str, str]
_MAX_BACKOFF = 60.0


def utcnow() -> datetime:
    return datetime.now(UTC)


def read_vm(body: dict[str, Any]) -> VirtualMachine:
    """The core's view of a VirtualMachine object; an unreadable spec is reported, never raised."""
    meta = body["metadata"]
    spec: VirtualMachineSpec | None = None
    error: str | None = None
    try:
        spec = VirtualMachineSpec.model_validate(body.get("spec") or {})
    except pydantic.ValidationError as exc:
        error = "; ".join(f"spec.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    try:
        status = VirtualMachineStatus.model_validate(body.get("status") or {})
    except pydantic.ValidationError:
        # The status is the operator's own; one it cannot read is rebuilt from what libvirt shows.
        logger.exception("unreadable status of %s/%s; starting from an empty one", meta["namespace"], meta["name"])
        status = VirtualMachineStatus()
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


def _resource_version(body: dict[str, Any]) -> int | None:
    try:
        return int(body["metadata"]["resourceVersion"])
    except (KeyError, ValueError):
        return None


def _status_json(status: VirtualMachineStatus) -> dict[str, Any]:
    result: dict[str, Any] = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    return result


class VmWorker:
    """Reconciles one VirtualMachine, one step at a time, until its object is gone."""

    def __init__(self, operator: Operator, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        self.key: Key = (meta["namespace"], meta["name"])
        self.domain = domain_name(*self.key)
        self.body = body
        self._op = operator
        self._wake = asyncio.Event()
        self._backoff = 0.0
        self._last_action: Action | None = None
        self._log = logging.LoggerAdapter(logger, {"vm": f"{self.key[0]}/{self.key[1]}", "domain": self.domain})
        self.task = asyncio.create_task(self._run(), name=f"vm:{self.key[0]}/{self.key[1]}")

    def update(self, body: dict[str, Any]) -> None:
        """Take a newer version of the object; a watch event older than our own last write is ignored."""
        new, old = _resource_version(body), _resource_version(self.body)
        if new is None or old is None or new >= old:
            self.body = body
        self.wake()

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                delay = await self._reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:
                self._log.exception("reconcile failed unexpectedly")
                self._op.metrics.reconcile_errors.labels("unexpected").inc()
                delay = self._next_backoff()
            if delay is None:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.0, delay))

    def _next_backoff(self) -> float:
        self._backoff = min(_MAX_BACKOFF, max(1.0, self._backoff * 2))
        return self._backoff

    async def _reconcile(self) -> float | None:
        """One step; returns seconds until the next look, or None to look again at once (an action was taken)."""
        op = self._op
        vm = read_vm(self.body)
        try:
            observed = await op.hypervisor.observe(self.domain)
        except HypervisorUnavailable as error:
            await self._apply(vm, unreachable(vm, str(error), utcnow()))
            return op.decision_settings.resync.total_seconds()
        spec_domain = vm.spec.domain if vm.spec else None
        plan = decide(
            vm,
            observed,
            utcnow(),
            expected_spec_hash=domainxml.spec_hash(spec_domain, op.settings.host) if spec_domain else None,
            storage_problems=storage.problems(spec_domain, op.settings.allowed_storage_dirs) if spec_domain else (),
            settings=op.decision_settings,
        )
        await self._apply(vm, plan)
        self._op.power_state_seen(self.key, plan.status.power_state)
        if plan.action is None:
            self._backoff = 0.0
            self._last_action = None
            return (plan.wake_at - utcnow()).total_seconds() if plan.wake_at else None
        if plan.action == self._last_action:
            # Every action changes what the next decision sees; the same one again at once had no effect.
            # Back off rather than spin against libvirt and the API server, and say so.
            self._log.warning("%s again without effect: backing off", plan.action.kind.value)
            self._op.metrics.reconcile_errors.labels("repeated").inc()
            self._last_action = None
            return self._next_backoff()
        self._last_action = plan.action
        try:
            await self._act(vm, plan.status, plan.action)
        except HypervisorUnavailable as error:
            await self._apply(vm, unreachable(vm, str(error), utcnow()))
            return op.decision_settings.resync.total_seconds()
        except (HypervisorError, client.ApiException) as error:
            message = f"{plan.action.kind.value} failed: {getattr(error, 'reason', None) or error}"
            self._log.error(message)
            op.metrics.reconcile_errors.labels(plan.action.kind.value).inc()
            await op.kube.post_event(self.body, type_="Warning", reason="ActionFailed", message=message)
            return self._next_backoff()
        self._backoff = 0.0
        return None

    async def _apply(self, vm: VirtualMachine, plan: Plan) -> None:
        """Write the plan's status if it changed, then post its events."""
        await self._write_status(vm.status, plan.status)
        for event in plan.events:
            self._log.info("%s: %s", event.reason, event.message, extra={"reason": event.reason})
            await self._op.kube.post_event(self.body, type_=event.type, reason=event.reason, message=event.message)

    async def _write_status(self, old: VirtualMachineStatus, new: VirtualMachineStatus) -> None:
        if new == old:
            return
        self.body = await self._op.kube.replace_status(self.key[0], self.key[1], _status_json(new))
        self._op.status_written(old, new)

    async def _act(self, vm: VirtualMachine, status: VirtualMachineStatus, action: Action) -> None:
        op = self._op
        hyp = op.hypervisor
        self._log.debug("action %s", action.kind.value)
        match action.kind:
            case ActionKind.ADD_FINALIZER:
                self.body = await op.kube.add_finalizer(self.body)
            case ActionKind.REMOVE_FINALIZER:
                self.body = await op.kube.remove_finalizer(self.body)
            case ActionKind.DEFINE:
                assert vm.spec is not None
                await hyp.define(
                    domainxml.build(
                        name=self.domain,
                        namespace=vm.namespace,
                        vm_name=vm.name,
                        uid=vm.uid,
                        spec=vm.spec.domain,
                        host=op.settings.host,
                    )
                )
            case ActionKind.START:
                await hyp.start_domain(self.domain)
            case ActionKind.SUSPEND:
                await hyp.suspend(self.domain)
            case ActionKind.RESUME:
                await hyp.resume(self.domain)
            case ActionKind.FORCE_OFF:
                await hyp.force_off(self.domain)
            case ActionKind.UNDEFINE:
                await hyp.undefine(self.domain)
            case ActionKind.REQUEST_SHUTDOWN:
                await self._request_shutdown(status, action)

    async def _request_shutdown(self, status: VirtualMachineStatus, action: Action) -> None:
        assert status.shutdown is not None
        deadline = status.shutdown.deadline
        # A slow guest agent must never push the force back: a request gets at most the time left until
        # the deadline (libvirt's own agent timeout bounds it further; a late answer is simply dropped).
        budget = (deadline - utcnow()).total_seconds() if deadline is not None else None
        try:
            method, refusals = await asyncio.wait_for(
                self._op.hypervisor.request_shutdown(self.domain, action.methods),
                timeout=budget if budget is not None and budget > 0 else None,
            )
        except TimeoutError:
            method, refusals = None, "no method answered before the deadline"
        new_status, event = after_request(status, method=method, refusals=refusals, now=utcnow())
        await self._write_status(status, new_status)
        self._log.info("%s: %s", event.reason, event.message, extra={"reason": event.reason})
        await self._op.kube.post_event(self.body, type_=event.type, reason=event.reason, message=event.message)


class Operator:
    """Holds the workers of this node's VirtualMachines, and nothing for any other node's."""

    def __init__(self, settings: Settings, kube: Kube, metrics: Metrics) -> None:
        self.settings = settings
        self.kube = kube
        self.metrics = metrics
        self.decision_settings = DecisionSettings(resync=settings.resync)
        self.hypervisor = Hypervisor(
            settings.libvirt_uri,
            on_domain_event=self.domain_event,
            on_connection_change=self.connection_changed,
            workers=settings.libvirt_workers,
            agent_timeout=settings.agent_timeout,
            graceful_destroy_timeout=settings.graceful_destroy_timeout,
        )
        self.workers: dict[Key, VmWorker] = {}
        self._by_domain: dict[str, VmWorker] = {}
        self._power_states: dict[Key, ObservedPowerState] = {}

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
        if worker is not None and worker.body["metadata"]["uid"] != meta["uid"]:
            self._forget(worker)  # the name was reused by a new object: its predecessor is gone
            worker = None
        if worker is None:
            worker = VmWorker(self, body)
            self.workers[key] = worker
            self._by_domain[worker.domain] = worker
        else:
            worker.update(body)

    def _forget(self, worker: VmWorker) -> None:
        worker.task.cancel()
        self.workers.pop(worker.key, None)
        self._by_domain.pop(worker.domain, None)
        self._power_states.pop(worker.key, None)
        self.metrics.power_states(Counter(self._power_states.values()))

    def domain_event(self, name: str) -> None:
        worker = self._by_domain.get(name)
        if worker is not None:
            worker.wake()

    def connection_changed(self, connected: bool) -> None:
        self.metrics.libvirt_connected.set(1 if connected else 0)
        for worker in self.workers.values():
            worker.wake()

    def status_written(self, old: VirtualMachineStatus, new: VirtualMachineStatus) -> None:
        if new.shutdown is not None and new.shutdown.outcome is not None and old.shutdown != new.shutdown:
            self.metrics.stop_finished(new.shutdown)

    def power_state_seen(self, key: Key, state: ObservedPowerState) -> None:
        """Counted on every reconcile, not only on status writes: after an operator restart nothing is written."""
        if self._power_states.get(key) != state:
            self._power_states[key] = state
            self.metrics.power_states(Counter(self._power_states.values()))

    async def stop(self) -> None:
        """Stop the workers and drop the libvirt connection; every guest is left exactly as it is."""
        tasks = [worker.task for worker in self.workers.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.hypervisor.close()


def register(registry: kopf.OperatorRegistry, operator: Operator, login: Callable[..., Any]) -> None:
    """Wire the operator into kopf. Only event handlers: kopf then keeps no state in the objects."""

    def mine(spec: kopf.Spec, **_: Any) -> bool:
        return operator.is_mine(dict(spec))

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        # One operator per node, all equal: peering would make them freeze each other.
        settings.peering.standalone = True
        # Only this node's VirtualMachines, filtered by the API server (spec.nodeName is a selectable field
        # of the CRD): the operator of a node receives, parses and holds nothing of other nodes' VMs. The
        # `when` filter below stays as a second line, for API servers without selectable fields.
        settings.watching.field_selectors[GROUP, PLURAL] = f"spec.nodeName={operator.settings.node_name}"
        # Least privilege: no CRD or namespace scanning, and kopf posts no Events of its own.
        settings.scanning.disabled = True
        settings.posting.enabled = False
        await operator.hypervisor.open()

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        await operator.stop()

    kopf.on.login(registry=registry)(login)

    @kopf.on.probe(id="libvirtConnected", registry=registry)
    def libvirt_connected(**_: Any) -> bool:
        return operator.hypervisor.connected

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry, when=mine)
    async def virtual_machine(event: kopf.RawEvent, **_: Any) -> None:
        operator.object_event(event["type"], dict(event["object"]))
