"""The libvirt adapter: the only module that talks to libvirt.

libvirt-python's calls block, so each runs in a thread pool of its own, large enough that many VMs can
be forced off at the same instant; the asyncio event loop never waits on libvirt. Lifecycle events come
from libvirt's own (thread-safe) default event loop, run on one dedicated thread, and are handed to
asyncio with call_soon_threadsafe: libvirtaio would run that loop on asyncio itself, but its handle
bookkeeping is not thread-safe, and every call made from the pool updates those handles. When the
daemon goes away, calls fail with HypervisorUnavailable and a background task reconnects with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import libvirt

from controller import domainxml
from controller.api import ShutdownMethod
from controller.reconcile import Domain, DomainState, StopCause

logger = logging.getLogger("vmop.hypervisor")
T = TypeVar("T")

_STOP_CAUSES = {
    libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN: StopCause.SHUTDOWN,
    libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED: StopCause.DESTROYED,
    libvirt.VIR_DOMAIN_SHUTOFF_CRASHED: StopCause.CRASHED,
    libvirt.VIR_DOMAIN_SHUTOFF_FAILED: StopCause.CRASHED,
}
# Errors that mean the connection, not the request, failed.
_CONNECTION_ERRORS = {libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_RPC, libvirt.VIR_ERR_NO_CONNECT}


@functools.cache
def start_libvirt_event_loop() -> None:
    """Once per process, before the first connection: libvirt delivers events only through a running loop.

    Public because any process that listens to libvirt needs exactly this (the benchmarks do too)."""
    libvirt.virEventRegisterDefaultImpl()

    def run() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=run, name="libvirt-events", daemon=True).start()


def _close_quietly(*conns: Any) -> None:
    """Close connections that may already be dead: there is nothing to do about a failure here."""
    for conn in conns:
        if conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()


class HypervisorUnavailable(Exception):
    """libvirt cannot be reached; the VM's state is unknown until it can."""


class HypervisorError(Exception):
    """libvirt refused a request; the message says what and why."""


def _state(domain: Any) -> tuple[DomainState, StopCause | None]:
    state, reason = domain.state()
    if state in (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PMSUSPENDED):
        return DomainState.PAUSED, None
    if state == libvirt.VIR_DOMAIN_SHUTDOWN:
        return DomainState.SHUTTING_DOWN, None
    if state == libvirt.VIR_DOMAIN_SHUTOFF:
        return DomainState.STOPPED, _STOP_CAUSES.get(reason, StopCause.UNKNOWN)
    if state == libvirt.VIR_DOMAIN_CRASHED:
        return DomainState.STOPPED, StopCause.CRASHED
    return DomainState.RUNNING, None


class Hypervisor:
    def __init__(
        self,
        uri: str,
        *,
        on_domain_event: Callable[[str], None],
        on_connection_change: Callable[[bool], None],
        workers: int = 64,
        agent_timeout: float = 5.0,
        graceful_destroy_timeout: float = 5.0,
        reconnect_max_backoff: float = 30.0,
    ) -> None:
        self.uri = uri
        self._on_domain_event = on_domain_event
        self._on_connection_change = on_connection_change
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="libvirt")
        self._agent_timeout = agent_timeout
        self._graceful_destroy_timeout = graceful_destroy_timeout
        self._reconnect_max_backoff = reconnect_max_backoff
        self._conn: Any = None
        # Forced stops have a connection of their own: a call on a connection where other domains are being
        # destroyed can wait out libvirt's 200 ms kill poll, and at a deadline every millisecond is overshoot.
        self._force_conn: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lost = asyncio.Event()
        self._reconnector: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self._conn is not None

    async def open(self) -> None:
        """Start libvirt's event loop, then connect (and keep reconnecting)."""
        start_libvirt_event_loop()
        self._loop = asyncio.get_running_loop()
        self._lost.set()
        self._reconnector = asyncio.create_task(self._keep_connected(), name="libvirt-reconnect")

    async def close(self) -> None:
        """Drop the connection; guests are left exactly as they are."""
        if self._reconnector is not None:
            self._reconnector.cancel()
            await asyncio.gather(self._reconnector, return_exceptions=True)
        conns, self._conn, self._force_conn = (self._conn, self._force_conn), None, None
        await self._run(_close_quietly, *conns)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _keep_connected(self) -> None:
        backoff = 0.5
        while True:
            await self._lost.wait()
            try:
                conn, force_conn = await self._run(self._connect)
            except libvirt.libvirtError as error:
                logger.warning(
                    "libvirt at %s is unreachable: %s; retrying in %.1fs",
                    self.uri,
                    error,
                    backoff,
                    extra={"libvirt_uri": self.uri},
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._reconnect_max_backoff)
                continue
            backoff = 0.5
            self._conn, self._force_conn = conn, force_conn
            self._lost.clear()
            logger.info("connected to libvirt at %s", self.uri, extra={"libvirt_uri": self.uri})
            self._on_connection_change(True)

    def _connect(self) -> tuple[Any, Any]:
        """Open both connections and subscribe to events (blocking calls, so they run in the pool)."""
        opened: list[Any] = []
        try:
            conn = libvirt.open(self.uri)
            opened.append(conn)
            force_conn = libvirt.open(self.uri)
            opened.append(force_conn)
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._lifecycle, None)
            conn.registerCloseCallback(self._closed, None)
            for c in opened:
                # Keepalive makes a dead daemon show as a closed connection instead of a hung call.
                # In-process drivers (test:///default) have no daemon to lose and refuse it, which is fine.
                try:
                    c.setKeepAlive(5, 3)
                except libvirt.libvirtError as error:
                    if error.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                        raise
        except libvirt.libvirtError:
            _close_quietly(*opened)
            raise
        return conn, force_conn

    def _lifecycle(self, _conn: Any, domain: Any, event: int, detail: int, _opaque: Any) -> None:
        # On the libvirt-events thread: only hand over to the asyncio loop.
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._on_domain_event, domain.name())

    def _closed(self, _conn: Any, reason: int, _opaque: Any) -> None:
        logger.warning("the libvirt connection closed (reason %d); reconnecting", reason)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._disconnected)

    def _disconnected(self) -> None:
        if self._conn is None:
            return
        # Closed, not only dropped: a connection that still lives would go on delivering events twice.
        self._executor.submit(_close_quietly, self._conn, self._force_conn)
        self._conn = self._force_conn = None
        self._lost.set()
        self._on_connection_change(False)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _call(self, what: str, fn: Callable[[Any], T], *, force_lane: bool = False) -> T:
        """Run fn(connection) in the pool, turning libvirt's errors into the adapter's two kinds."""
        conn = self._force_conn if force_lane else self._conn
        if conn is None:
            raise HypervisorUnavailable(f"libvirt at {self.uri} is not connected")
        try:
            return await self._run(fn, conn)
        except libvirt.libvirtError as error:
            if error.get_error_code() in _CONNECTION_ERRORS or not conn.isAlive():
                self._disconnected()
                raise HypervisorUnavailable(f"libvirt at {self.uri}: {error}") from error
            raise HypervisorError(f"{what}: {error}") from error

    async def observe(self, name: str) -> Domain | None:
        def observe(conn: Any) -> Domain | None:
            try:
                domain = conn.lookupByName(name)
                state, cause = _state(domain)
            except libvirt.libvirtError as error:
                if error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return None
                raise
            try:
                # The persistent definition's mark: a redefinition of a running domain changes only that one,
                # and the live mark would still carry the old spec hash until the next boot.
                metadata = domain.metadata(
                    libvirt.VIR_DOMAIN_METADATA_ELEMENT, domainxml.METADATA_URI, libvirt.VIR_DOMAIN_AFFECT_CONFIG
                )
            except libvirt.libvirtError as error:
                # No mark, or a transient domain (no persistent definition): either way not vmop's.
                if error.get_error_code() not in (
                    libvirt.VIR_ERR_NO_DOMAIN_METADATA,
                    libvirt.VIR_ERR_OPERATION_INVALID,
                ):
                    raise
                metadata = None
            owner = domainxml.parse_owner(metadata)
            return Domain(
                uuid=domain.UUIDString(),
                owner_uid=owner.uid if owner else None,
                spec_hash=owner.spec_hash if owner else None,
                state=state,
                stop_cause=cause,
            )

        return await self._call(f"observing domain {name}", observe)

    async def define(self, xml: str) -> None:
        await self._call("defining the domain", lambda conn: conn.defineXML(xml))

    async def start_domain(self, name: str) -> None:
        await self._call(f"starting {name}", lambda conn: conn.lookupByName(name).create())

    async def suspend(self, name: str) -> None:
        await self._call(f"pausing {name}", lambda conn: conn.lookupByName(name).suspend())

    async def resume(self, name: str) -> None:
        await self._call(f"resuming {name}", lambda conn: conn.lookupByName(name).resume())

    async def undefine(self, name: str) -> None:
        flags = libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        await self._call(f"undefining {name}", lambda conn: conn.lookupByName(name).undefineFlags(flags))

    async def request_shutdown(self, name: str, methods: tuple[ShutdownMethod, ...]) -> tuple[str | None, str]:
        """Ask the guest by each method in turn; return the method libvirt accepted and why others were not.

        Explicit flags always: with flags 0, libvirt tries the guest agent first, and a missing or hung
        agent can block that call for about a minute. The agent attempt is bounded twice: libvirt's own
        agent timeout, and a timeout around the call, so it never delays the ACPI fallback or the deadline.
        """
        refusals: list[str] = []
        for method in methods:
            try:
                if method is ShutdownMethod.AGENT:
                    await asyncio.wait_for(
                        self._call(f"agent shutdown of {name}", self._agent_shutdown(name)),
                        timeout=self._agent_timeout + 1,
                    )
                else:
                    await self._call(
                        f"ACPI shutdown of {name}",
                        lambda conn: conn.lookupByName(name).shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN),
                    )
                return method.value, "; ".join(refusals)
            except HypervisorError as error:
                refusals.append(f"{method.value}: {error}")
            except TimeoutError:
                refusals.append(f"{method.value}: no answer within {self._agent_timeout:.0f}s")
        return None, "; ".join(refusals)

    def _agent_shutdown(self, name: str) -> Callable[[Any], None]:
        def agent_shutdown(conn: Any) -> None:
            domain = conn.lookupByName(name)
            # Without an agent channel this fails, and so does shutdownFlags below: at once, with the reason.
            with contextlib.suppress(libvirt.libvirtError):
                domain.agentSetResponseTimeout(math.ceil(self._agent_timeout), 0)
            domain.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)

        return agent_shutdown

    async def force_off(self, name: str) -> None:
        """SIGTERM first (QEMU flushes its caches and exits); SIGKILL only if it is still there after a bound."""

        def destroy(flags: int) -> Callable[[Any], None]:
            def run(conn: Any) -> None:
                try:
                    conn.lookupByName(name).destroyFlags(flags)
                except libvirt.libvirtError as error:
                    if error.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:  # already off
                        raise

            return run

        try:
            await asyncio.wait_for(
                self._call(
                    f"graceful destroy of {name}", destroy(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL), force_lane=True
                ),
                timeout=self._graceful_destroy_timeout,
            )
            return
        except (TimeoutError, HypervisorError) as error:
            logger.warning(
                "graceful destroy of %s did not finish (%s): destroying",
                name,
                error or "timeout",
                extra={"domain": name},
            )
        await self._call(f"destroy of {name}", destroy(libvirt.VIR_DOMAIN_DESTROY_DEFAULT), force_lane=True)
