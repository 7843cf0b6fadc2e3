"""The libvirt adapter against libvirt's in-process test driver: real libvirt calls, no daemon.

The test driver refuses the ACPI and agent shutdown flags and cannot model a stubborn guest, so graceful
shutdown itself is proved end to end on the real daemon; here: connecting, the ownership mark, states,
stop causes, lifecycle events, forcing off, and refusals reported per method.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import libvirt
import pytest

from controller import domainxml
from controller import hypervisor as hypervisor_module
from controller.api import DomainSpec, ShutdownMethod, ShutdownPurpose
from controller.hypervisor import Hypervisor, Lane, is_connection_error
from controller.reconcile import DomainState, StopCause
from controller.shutdown import ShutdownMark
from controller.storage import ResolvedStorage
from tests.unit.clock import T0


def test_adapter_on_the_test_driver() -> None:
    async def scenario() -> None:
        events: list[str] = []
        event_seen, connected = asyncio.Event(), asyncio.Event()

        def domain_event(name: str) -> None:
            events.append(name)
            event_seen.set()

        hypervisor = Hypervisor("test:///default")
        hypervisor.listen(on_domain_event=domain_event, on_connection_change=lambda up: up and connected.set())
        await hypervisor.open()
        try:
            await asyncio.wait_for(connected.wait(), timeout=5)
            uid = str(uuid.uuid4())
            name = f"ns_{uid[:8]}"
            spec = DomainSpec(memoryMiB=16)
            host = domainxml.HostDefaults(virt_type="test")
            nothing = ResolvedStorage(kernel=None, initrd=None, disks=())
            xml = domainxml.build(
                name=name, namespace="ns", vm_name=uid[:8], uid=uid, spec=spec, host=host, storage=nothing
            )
            await hypervisor.define(xml)
            await hypervisor.start_domain(uid)
            running = await hypervisor.observe(name)
            assert running is not None
            assert (running.state, running.owner_uid, running.uuid) == (DomainState.RUNNING, uid, uid)
            assert running.spec_hash == domainxml.spec_hash(spec, host)
            assert running.shutdown_mark is None

            mark = ShutdownMark(ShutdownPurpose.STOP, T0, T0 + timedelta(seconds=30, microseconds=7), force=True)
            await hypervisor.set_shutdown_mark(uid, mark)
            marked = await hypervisor.observe(name)
            assert marked is not None
            assert marked.shutdown_mark == mark, "the mark reads back to the microsecond"
            assert await hypervisor.shutdown_marks() == [(uid, name, mark)]
            await hypervisor.set_shutdown_mark(uid, None)
            assert await hypervisor.shutdown_marks() == []
            await asyncio.wait_for(event_seen.wait(), timeout=5)
            assert name in events, "the lifecycle event names the domain"

            method, refusals = await hypervisor.request_shutdown(uid, (ShutdownMethod.AGENT, ShutdownMethod.ACPI))
            assert method is None
            assert refusals.startswith("Agent: ")
            assert "; ACPI: " in refusals

            await hypervisor.force_off(uid)
            stopped = await hypervisor.observe(name)
            assert stopped is not None
            assert (stopped.state, stopped.stop_cause) == (DomainState.STOPPED, StopCause.DESTROYED)
            await hypervisor.force_off(uid)  # already off: not an error

            await hypervisor.undefine(uid)
            assert await hypervisor.observe(name) is None

            foreign = await hypervisor.observe("test")  # the driver's own domain carries no vmop mark
            assert foreign is not None
            assert foreign.owner_uid is None
        finally:
            await hypervisor.close()

    asyncio.run(scenario())


class _Conn:
    def __init__(self, alive: bool) -> None:
        self.alive = alive

    def isAlive(self) -> bool:  # libvirt's name
        if self.alive is None:
            raise libvirt.libvirtError("invalid connection pointer in virConnectIsAlive")
        return self.alive


def _error(code: int, domain: int) -> libvirt.libvirtError:
    error = libvirt.libvirtError("test")
    error.err = (code, domain, "test", 2, None, None, None, 0, 0)
    return error


@pytest.mark.parametrize(
    ("code", "domain", "alive", "connection"),
    [
        # Per-domain failures libvirt reports as system errors: that VM's, not the node's.
        (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_QEMU, True, False),  # QEMU that SIGKILL cannot end
        (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_NONE, True, False),  # name too long for a file
        (libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_QEMU, True, False),  # a bridge that does not exist
        (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_FROM_DOMAIN, True, False),
        # The connection itself.
        (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC, True, True),  # the socket broke
        (libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_REMOTE, True, True),
        (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_FROM_NONE, True, True),
        (libvirt.VIR_ERR_INVALID_CONN, libvirt.VIR_FROM_NONE, True, True),
        (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_QEMU, False, True),  # and the connection is dead
        (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_QEMU, None, True),  # closed under us
    ],
)
def test_connection_failures_are_told_from_request_failures(
    code: int, domain: int, alive: bool | None, connection: bool
) -> None:
    assert is_connection_error(_error(code, domain), _Conn(alive)) is connection  # type: ignore[arg-type]


async def _running_domains(hypervisor: Hypervisor, count: int) -> list[str]:
    """`count` firmware-only domains defined and started on the test driver; their UUIDs."""
    host = domainxml.HostDefaults(virt_type="test")
    nothing = ResolvedStorage(kernel=None, initrd=None, disks=())
    uids = [str(uuid.uuid4()) for _ in range(count)]
    for uid in uids:
        xml = domainxml.build(
            name=f"ns_{uid[:8]}",
            namespace="ns",
            vm_name=uid[:8],
            uid=uid,
            spec=DomainSpec(memoryMiB=16),
            host=host,
            storage=nothing,
        )
        await hypervisor.define(xml)
        await hypervisor.start_domain(uid)
    return uids


async def _state(hypervisor: Hypervisor, uid: str) -> DomainState:
    domain = await hypervisor.observe(f"ns_{uid[:8]}")
    assert domain is not None
    return domain.state


def test_an_armed_force_is_sent_when_due_on_a_connection_of_its_own_and_can_be_called_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        connected = asyncio.Event()
        actions: list[str] = []
        hypervisor = Hypervisor("test:///default", on_action=actions.append)
        hypervisor.listen(on_domain_event=lambda _n: None, on_connection_change=lambda up: up and connected.set())
        await hypervisor.open()
        try:
            await asyncio.wait_for(connected.wait(), timeout=5)
            uids = await _running_domains(hypervisor, 3)

            loop = asyncio.get_running_loop()
            began = loop.time()
            abort = asyncio.Event()
            armed = [asyncio.create_task(hypervisor.force_off(uid, delay=0.3)) for uid in uids[:2]]
            called_off = asyncio.create_task(hypervisor.force_off(uids[2], delay=0.3, abort=abort))
            await asyncio.sleep(0.1)
            assert [await _state(hypervisor, uid) for uid in uids] == [DomainState.RUNNING] * 3, (
                "nothing sent before it is due"
            )
            abort.set()
            assert await called_off is False
            assert await asyncio.gather(*armed) == [True, True]
            assert loop.time() - began >= 0.3
            assert [await _state(hypervisor, uid) for uid in uids] == [
                DomainState.STOPPED,
                DomainState.STOPPED,
                DomainState.RUNNING,
            ]
            assert len(hypervisor._idle_forces) >= 2, "the two forces had connections of their own, kept for reuse"
            assert actions.count("destroy") == 2, "a force called off is no action"
            sent = [r for r in caplog.records if r.getMessage().startswith("destroy sent")]
            assert sorted(r.__dict__["domain"] for r in sent) == sorted(uids[:2]), "each armed force says when"
            assert all(r.__dict__["late"] >= 0 for r in sent), "never before it fell due"
            for uid in uids:
                await hypervisor.force_off(uid)
                await hypervisor.undefine(uid)
        finally:
            await hypervisor.close()

    with caplog.at_level(logging.INFO, logger="vmop.hypervisor"):
        asyncio.run(scenario())


def test_an_armed_force_whose_early_look_up_fails_is_still_sent_when_due_and_not_before(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The armed destroy looks its domain up while it waits; a failed look must neither fail the force
    (its fallback, a plain destroy, would then go out at once, before the deadline) nor delay it."""
    looks: list[float] = []
    real_lookup = hypervisor_module._lookup

    def flaky_lookup(conn: Any, uid: str) -> Any:
        looks.append(time.monotonic())
        if len(looks) == 1:
            raise _error(libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_QEMU)
        return real_lookup(conn, uid)

    async def scenario() -> None:
        hypervisor = Hypervisor("test:///default")
        await hypervisor.open()
        try:
            await asyncio.wait_for(hypervisor.wait_connected(), timeout=5)
            (uid,) = await _running_domains(hypervisor, 1)
            monkeypatch.setattr(hypervisor_module, "_lookup", flaky_lookup)
            began = time.monotonic()
            force = asyncio.create_task(hypervisor.force_off(uid, delay=0.3))
            await asyncio.sleep(0.15)
            assert len(looks) == 1, "looked up ahead, and failed"
            assert await _state(hypervisor, uid) is DomainState.RUNNING, "the failed look sent nothing early"
            assert await force is True
            assert looks[1] - began >= 0.3, "looked up again only when due"
            assert await _state(hypervisor, uid) is DomainState.STOPPED
            await hypervisor.undefine(uid)
        finally:
            await hypervisor.close()

    asyncio.run(scenario())


def test_actions_are_told_and_the_node_memory_read_follows_starts_and_stops(tmp_path: Path) -> None:
    """Every call that changes a domain is told (the vmop_libvirt_actions metric), looks are not; the node's
    memory read keeps what it learnt of a running domain until that domain stops (or is started again)."""
    node = tmp_path / "node.xml"  # a test driver of its own: test:///default is shared within the process
    node.write_text("<node></node>")

    async def scenario() -> None:
        actions: list[str] = []
        hypervisor = Hypervisor(f"test://{node}", on_action=actions.append)
        await hypervisor.open()
        try:
            await asyncio.wait_for(hypervisor.wait_connected(), timeout=5)
            total, running = await hypervisor.node_memory()
            assert total > 0
            before = dict(running)
            uid = str(uuid.uuid4())
            name = f"ns_{uid[:8]}"
            xml = domainxml.build(
                name=name,
                namespace="ns",
                vm_name=uid[:8],
                uid=uid,
                spec=DomainSpec(memoryMiB=48),
                host=domainxml.HostDefaults(virt_type="test"),
                storage=ResolvedStorage(kernel=None, initrd=None, disks=()),
            )
            await hypervisor.define(xml)
            assert (await hypervisor.node_memory())[1] == before, "defined, not running"
            await hypervisor.start_domain(uid)
            assert (await hypervisor.node_memory())[1] == {**before, uid: 48}
            await hypervisor.observe(name)
            # Each connection to a test-driver file is a hypervisor of its own: the stop is made on the
            # connection that reads (force_off has a lane, so a connection, of its own).
            main = hypervisor._lanes[Lane.MAIN]
            main.lookupByUUIDString(uid).destroy()
            assert (await hypervisor.node_memory())[1] == before
            await hypervisor.start_domain(uid)
            assert (await hypervisor.node_memory())[1] == {**before, uid: 48}, "a new start, a new ID"
            main.lookupByUUIDString(uid).destroy()
            await hypervisor.undefine(uid)
            assert actions == ["define", "start", "start", "undefine"], "looks are not actions"
        finally:
            await hypervisor.close()

    asyncio.run(scenario())


class _GoingDomain:
    """A domain whose agent shutdown fails as libvirt reports a guest that closed the agent's socket first."""

    def __init__(self, states: list[int], code: int) -> None:
        self.states = states
        self.code = code

    def agentSetResponseTimeout(self, _timeout: int, _flags: int) -> None:
        pass

    def shutdownFlags(self, _flags: int) -> None:
        raise _error(self.code, libvirt.VIR_FROM_QEMU)

    def state(self) -> list[int]:
        return [self.states.pop(0) if len(self.states) > 1 else self.states[0], 0]


class _OneDomain:
    def __init__(self, domain: _GoingDomain) -> None:
        self.domain = domain

    def lookupByUUIDString(self, _uuid: str) -> _GoingDomain:
        return self.domain


_EOF, _UNRESPONSIVE = libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_ERR_AGENT_UNRESPONSIVE


@pytest.mark.parametrize(
    ("states", "code", "accepted"),
    [
        ([libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_SHUTOFF], _EOF, True),
        ([libvirt.VIR_DOMAIN_SHUTDOWN], _EOF, True),
        ([libvirt.VIR_DOMAIN_RUNNING], _EOF, False),
        ([libvirt.VIR_DOMAIN_SHUTOFF], _UNRESPONSIVE, False),  # not the lost socket: refused, looked at no more
    ],
)
def test_an_agent_shutdown_whose_guest_goes_down_anyway_was_accepted(
    states: list[int], code: int, accepted: bool
) -> None:
    """qemu-ga does not answer guest-shutdown: a fast guest closes the socket before libvirt sees QEMU's
    SHUTDOWN event, and the call fails for a request that worked (seen in the e2e agent test)."""
    shutdown = Hypervisor("test:///default", agent_timeout=1)._agent_shutdown("uid")
    conn = _OneDomain(_GoingDomain(states, code))
    if accepted:
        shutdown(conn)
    else:
        with pytest.raises(libvirt.libvirtError):
            shutdown(conn)
