"""Fakes of the shell's outside world for the operator's unit tests: libvirt and Kubernetes in memory.

Each fails on demand the way the real thing does: Kubernetes hangs, refuses, reports a conflict or is
down; libvirt is unreachable, or fails for one domain only. Time is the event loop's (looptime's fake
loop in the tests), and every force and request is recorded at the operator's own clock, so a test
asserts force times against deadlines to the microsecond.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import xml.etree.ElementTree as ET
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import looptime

from controller import domainxml
from controller.api import DomainSpec
from controller.clock import Clock
from controller.hypervisor import HypervisorError, HypervisorUnavailable
from controller.kube import CONFLICT, NOT_FOUND, KubeError
from controller.reconcile import Domain, DomainState, StopCause
from controller.shutdown import ShutdownMark
from controller.storage import ResolvedStorage, StorageCheck


class FakeWall:
    """The machine's wall clock, which a test may step by hours; the operator must not care."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.offset = start
        self.loop_time: Callable[[], float] = lambda: 0.0

    def time(self) -> float:
        return self.offset + self.loop_time()


@dataclass
class FakeDomain:
    name: str
    uuid: str
    owner_uid: str | None
    spec_hash: str | None
    state: DomainState = DomainState.STOPPED
    stop_cause: StopCause | None = None
    mark: ShutdownMark | None = None
    stubborn: bool = True  # ignores shutdown requests
    starts: int = 0
    agent_connected: bool | None = None
    memory_mib: int = 64
    storage_hash: str | None = None


@dataclass
class FakeHypervisor:
    clock: Clock
    domains: dict[str, FakeDomain] = field(default_factory=dict)  # by name
    forced: dict[str, datetime] = field(default_factory=dict)  # uuid -> when forced, at the operator's clock
    requests: list[tuple[str, datetime]] = field(default_factory=list)
    armed: list[tuple[str, datetime]] = field(default_factory=list)  # forces armed ahead of their deadline
    called_off: list[tuple[str, datetime]] = field(default_factory=list)
    broken: dict[str, str] = field(default_factory=dict)  # uuid or name -> the per-domain system error
    down: bool = False
    connected: bool = False
    cooperative_delay: float = 0.5
    total_memory_mib: int = 65536
    start_seconds: float = 0.0  # how long a start takes (QEMU's launch), during which the domain is not running
    _up: asyncio.Event = field(default_factory=asyncio.Event)
    _on_event: Callable[[str], None] = lambda _n: None
    _on_connection: Callable[[bool], None] = lambda _c: None

    def listen(self, *, on_domain_event: Callable[[str], None], on_connection_change: Callable[[bool], None]) -> None:
        self._on_event, self._on_connection = on_domain_event, on_connection_change

    async def open(self) -> None:
        if not self.down:
            self.connect()

    def connect(self) -> None:
        self.down = False
        self.connected = True
        self._up.set()
        self._on_connection(True)

    async def close(self) -> None:
        self.connected = False

    async def wait_connected(self) -> None:
        await self._up.wait()

    def _check(self, ref: str) -> None:
        if self.down:
            raise HypervisorUnavailable("libvirt is not connected")
        if ref in self.broken:
            raise HypervisorError(f"internal error: {self.broken[ref]}")

    def by_uuid(self, uuid: str) -> FakeDomain:
        return next(d for d in self.domains.values() if d.uuid == uuid)

    def running(self, name: str, *, uid: str, spec_hash: str | None, stubborn: bool = True) -> FakeDomain:
        domain = FakeDomain(name, uid, uid, spec_hash, DomainState.RUNNING, stubborn=stubborn)
        self.domains[name] = domain
        return domain

    def stop(self, domain: FakeDomain, cause: StopCause) -> None:
        domain.state, domain.stop_cause, domain.mark = DomainState.STOPPED, cause, None
        self._on_event(domain.name)

    async def observe(self, name: str) -> Domain | None:
        self._check(name)
        d = self.domains.get(name)
        if d is None:
            return None
        return Domain(
            d.uuid, d.owner_uid, d.spec_hash, d.state, d.stop_cause, d.mark, d.agent_connected, d.storage_hash
        )

    async def shutdown_marks(self) -> list[tuple[str, str, ShutdownMark]]:
        self._check("")
        return [(d.uuid, d.name, d.mark) for d in self.domains.values() if d.mark and d.state is DomainState.RUNNING]

    async def set_shutdown_mark(self, uuid: str, mark: ShutdownMark | None) -> None:
        self._check(uuid)
        self.by_uuid(uuid).mark = mark

    async def define(self, xml: str) -> None:
        root = ET.fromstring(xml)
        name, uuid = root.findtext("name") or "", root.findtext("uuid") or ""
        self._check(name)
        owner = root.find(f"metadata/{{{domainxml.METADATA_URI}}}vm")
        assert owner is not None
        memory = int(root.findtext("memory") or 0)
        existing = self.domains.get(name)
        if existing is None:
            existing = self.domains[name] = FakeDomain(name, uuid, owner.get("uid"), owner.get("specHash"))
        existing.spec_hash, existing.storage_hash = owner.get("specHash"), owner.get("storageHash")
        existing.memory_mib = memory

    async def node_memory(self) -> tuple[int, dict[str, int]]:
        self._check("")
        # As a real call does, it yields: another worker's start may be decided meanwhile.
        await asyncio.sleep(0.01)
        running = {d.uuid: d.memory_mib for d in self.domains.values() if d.state is not DomainState.STOPPED}
        return self.total_memory_mib, running

    async def start_domain(self, uuid: str) -> None:
        self._check(uuid)
        await asyncio.sleep(self.start_seconds)
        domain = self.by_uuid(uuid)
        domain.state, domain.stop_cause = DomainState.RUNNING, None
        domain.starts += 1

    async def suspend(self, uuid: str) -> None:
        self._check(uuid)
        self.by_uuid(uuid).state = DomainState.PAUSED

    async def resume(self, uuid: str) -> None:
        self._check(uuid)
        self.by_uuid(uuid).state = DomainState.RUNNING

    async def undefine(self, uuid: str) -> None:
        self._check(uuid)
        del self.domains[self.by_uuid(uuid).name]

    async def request_shutdown(self, uuid: str, methods: tuple[Any, ...]) -> tuple[str | None, str]:
        self._check(uuid)
        self.requests.append((uuid, self.clock.now()))
        domain = self.by_uuid(uuid)
        if not methods:
            return None, ""
        if not domain.stubborn:
            asyncio.get_running_loop().call_later(
                self.cooperative_delay,
                lambda: domain.state is DomainState.RUNNING and self.stop(domain, StopCause.SHUTDOWN),
            )
        return methods[0].value, ""

    async def force_off(self, uuid: str, *, delay: float = 0.0, abort: asyncio.Event | None = None) -> bool:
        if delay > 0:  # as libvirt's adapter does, an armed destroy first waits, then finds its domain
            self.armed.append((uuid, self.clock.now()))
            if abort is None:
                await asyncio.sleep(delay)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(abort.wait(), delay)
                    self.called_off.append((uuid, self.clock.now()))
                    return False
        self._check(uuid)
        domain = self.by_uuid(uuid)
        self.forced.setdefault(uuid, self.clock.now())
        if domain.state is not DomainState.STOPPED:
            self.stop(domain, StopCause.DESTROYED)
        return True


class FakeKube:
    """The API server as the operator's Kube sees it; `mode` says how it answers the operator's calls.

    ok: as it should; hang: no answer until the request times out (a black-holed or frozen server);
    refuse: 500 to everything; down: no connection at all. A user's edits always land (they go through
    another path), so a test can edit while the operator's calls fail.
    """

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.mode = "ok"
        self.timeout = 10.0
        self.conflicts = 0  # the next N status writes lose a race
        self.status_writes: list[tuple[tuple[str, str], dict[str, Any]]] = []
        self.nodes: dict[str, dict[str, Any]] = {}
        self._versions = itertools.count(100)

    def _bump(self, body: dict[str, Any]) -> dict[str, Any]:
        body["metadata"]["resourceVersion"] = str(next(self._versions))
        return copy.deepcopy(body)

    async def _answer(self) -> None:
        match self.mode:
            case "hang":
                # As the real Kube does against a black-holed server: nothing until its timeout.
                await asyncio.sleep(self.timeout)
                raise KubeError("no answer from the API server (timed out)", None)
            case "refuse":
                raise KubeError("500 Internal Server Error", 500)
            case "down":
                raise KubeError("no answer from the API server (connection refused)", None)

    def create(self, name: str, spec: dict[str, Any], namespace: str = "ns") -> dict[str, Any]:
        body = {
            "metadata": {"namespace": namespace, "name": name, "uid": f"uid-{name}", "generation": 1},
            "spec": spec,
        }
        self.objects[namespace, name] = body
        return self._bump(body)

    def edit(self, name: str, namespace: str = "ns", **spec: Any) -> dict[str, Any]:
        body = self.objects[namespace, name]
        body["spec"].update(spec)
        body["metadata"]["generation"] += 1
        return self._bump(body)

    def vanish(self, name: str, namespace: str = "ns") -> None:
        """Gone without the operator hearing of it (its watch was cut when it happened)."""
        del self.objects[namespace, name]
        next(self._versions)

    def status(self, name: str, namespace: str = "ns") -> dict[str, Any]:
        return dict(self.objects[namespace, name].get("status") or {})

    async def write_status(
        self, namespace: str, name: str, status: dict[str, Any], *, resource_version: str
    ) -> dict[str, Any]:
        await self._answer()
        body = self.objects.get((namespace, name))
        if body is None:
            raise KubeError("404 Not Found", NOT_FOUND)
        if self.conflicts or body["metadata"]["resourceVersion"] != resource_version:
            self.conflicts = max(0, self.conflicts - 1)
            self._bump(body)  # someone else's write
            raise KubeError("409 Conflict", CONFLICT)
        body["status"] = copy.deepcopy(status)
        self.status_writes.append(((namespace, name), copy.deepcopy(status)))
        return self._bump(body)

    async def get(self, namespace: str, name: str) -> dict[str, Any]:
        await self._answer()
        if (namespace, name) not in self.objects:
            raise KubeError("404 Not Found", NOT_FOUND)
        return copy.deepcopy(self.objects[namespace, name])

    async def list_node(self, node_name: str) -> tuple[list[dict[str, Any]], str]:
        await self._answer()
        version = str(next(self._versions))
        return [copy.deepcopy(b) for b in self.objects.values() if b["spec"]["nodeName"] == node_name], version

    async def get_node(self, node_name: str) -> dict[str, Any] | None:
        await self._answer()
        node = self.nodes.get(node_name)
        return copy.deepcopy(node) if node is not None else None

    async def add_finalizer(self, body: dict[str, Any]) -> dict[str, Any]:
        await self._answer()
        stored = self.objects[body["metadata"]["namespace"], body["metadata"]["name"]]
        stored["metadata"].setdefault("finalizers", []).append("vmop.dev/undefine-domain")
        return self._bump(stored)

    async def remove_finalizer(self, body: dict[str, Any]) -> dict[str, Any]:
        await self._answer()
        stored = self.objects[body["metadata"]["namespace"], body["metadata"]["name"]]
        stored["metadata"]["finalizers"].remove("vmop.dev/undefine-domain")
        return self._bump(stored)

    async def close(self) -> None:
        pass


@dataclass
class FakeEvents:
    posted: list[tuple[str, str, str, str]] = field(default_factory=list)  # (vm, type, reason, message)

    def post(self, body: dict[str, Any], *, type_: str, reason: str, message: str) -> None:
        self.posted.append((body["metadata"]["name"], type_, reason, message))

    def reasons(self, name: str) -> list[str]:
        return [reason for vm, _t, reason, _m in self.posted if vm == name]

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


def run_on_fake_time(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a scenario on an event loop whose clock jumps ahead whenever every task waits."""
    loop = looptime.new_event_loop(start=1000.0)
    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()


async def until(predicate: Callable[[], object], *, within: float = 600.0, what: str = "") -> None:
    """Wait in loop time for a predicate; fake time makes a long wait free."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while not predicate():
        if loop.time() > end:
            raise AssertionError(f"not within {within}s of loop time: {what}")
        await asyncio.sleep(0.05)


class FakeStorage:
    """The storage check: every spec allowed, or, with hang set, a file system that never answers."""

    def __init__(self) -> None:
        self.hang = False
        self.checks = 0

    async def check(self, spec: DomainSpec) -> StorageCheck:
        self.checks += 1
        if self.hang:
            await asyncio.Event().wait()
        return StorageCheck((), ResolvedStorage(kernel=None, initrd=None, disks=()))
