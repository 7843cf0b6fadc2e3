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
import enum
import functools
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import libvirt

from controller import domainxml
from controller.api import ShutdownMethod
from controller.reconcile import Domain, DomainState, StopCause
from controller.shutdown import ShutdownMark

logger = logging.getLogger("vmop.hypervisor")
T = TypeVar("T")

_STOP_CAUSES = {
    libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN: StopCause.SHUTDOWN,
    libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED: StopCause.DESTROYED,
    libvirt.VIR_DOMAIN_SHUTOFF_CRASHED: StopCause.CRASHED,
    libvirt.VIR_DOMAIN_SHUTOFF_FAILED: StopCause.CRASHED,
}
# What says that the connection, not the request, failed. VIR_ERR_SYSTEM_ERROR is not among them: libvirt
# reports many per-domain failures with it (a bridge that does not exist, a name too long for a file, a
# QEMU that SIGKILL cannot end), and one VM's failure must not disconnect every VM of the node.
_CONNECTION_ERROR_CODES = {libvirt.VIR_ERR_RPC, libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_INVALID_CONN}
_CONNECTION_ERROR_DOMAINS = {libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE}


@functools.cache
def start_libvirt_event_loop() -> None:
    """Once per process, before the first connection: libvirt delivers events only through a running loop.

    Public because any process that listens to libvirt needs exactly this (the benchmarks do too)."""
    libvirt.virEventRegisterDefaultImpl()
    # libvirt prints every error to stderr unless told otherwise; each one reaches the adapter as an
    # exception, and an expected one (a domain not defined yet, no shutdown mark) is not worth a line.
    libvirt.registerErrorHandler(lambda _ctx, _error: None, None)

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


# Connections for forces kept open when idle: more are opened while many forces are under way at once.
_IDLE_FORCE_CONNECTIONS = 16

# How long a lost connection is tried again every 0.25 s before the retries back off.
_FAST_RECONNECT_SECONDS = 10.0

# How long node_memory keeps what it read of a running domain (see there).
_MEMORY_REREAD = 10.0

# How long an agent shutdown that failed waits to see the guest go down anyway (see _agent_shutdown).
_AGENT_EOF_GRACE = 1.0

# As many agent calls at once as libvirtd serves on one connection by default (max_client_requests).
_AGENT_THREADS = 5


class Lane(enum.Enum):
    """Connections of their own, each with libvirtd's per-client limit (max_client_requests, 5 by default).

    MAIN observes and takes ordinary actions. FORCE only destroys, on threads of its own: at a deadline every
    millisecond is overshoot, and a destroy waits out libvirt's 200 ms kill poll on the connection and the
    thread it uses (a destroy armed ahead of its deadline holds its thread until then). AGENT only
    talks to guest agents: a hung agent holds its call until the agent timeout, and five of them would
    hold a whole connection, every other VM's observe and force included.
    """

    MAIN = "main"
    FORCE = "force"
    AGENT = "agent"


class HypervisorUnavailable(Exception):
    """libvirt cannot be reached; the VM's state is unknown until it can."""


class HypervisorError(Exception):
    """libvirt refused a request; the message says what and why."""


def _alive(conn: Any) -> bool:
    try:
        return bool(conn.isAlive())
    except libvirt.libvirtError:  # a connection closed under us answers with "invalid connection pointer"
        return False


def is_connection_error(error: libvirt.libvirtError, conn: Any) -> bool:
    """The connection failed, not the request: by error code or domain, or a connection no longer alive."""
    return (
        error.get_error_code() in _CONNECTION_ERROR_CODES
        or error.get_error_domain() in _CONNECTION_ERROR_DOMAINS
        or not _alive(conn)
    )


def _keep_alive(conn: Any) -> None:
    """Keepalive makes a dead daemon show as a closed connection instead of a hung call. In-process drivers
    (test:///default) have no daemon to lose and refuse it, which is fine."""
    try:
        conn.setKeepAlive(5, 3)
    except libvirt.libvirtError as error:
        if error.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
            raise


def _lookup(conn: Any, uuid: str) -> Any:
    """Domains are acted on by UUID (the VirtualMachine's UID): a name can be taken by another domain."""
    return conn.lookupByUUIDString(uuid)


def _going_down(domain: Any, *, within: float) -> bool:
    """Whether the domain is shutting down or off, or becomes so within `within` seconds (polled)."""
    until = time.monotonic() + within
    while True:
        try:
            state = domain.state()[0]
        except libvirt.libvirtError as error:
            if error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:  # a transient domain gone with its guest
                return True
            raise
        if state in (libvirt.VIR_DOMAIN_SHUTDOWN, libvirt.VIR_DOMAIN_SHUTOFF):
            return True
        if time.monotonic() >= until:
            return False
        time.sleep(0.05)


def _metadata(domain: Any, uri: str, flags: int) -> str | None:
    """One metadata element, or None where there is none (or no persistent definition to read it from)."""
    try:
        text: str = domain.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, uri, flags)
    except libvirt.libvirtError as error:
        if error.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN_METADATA, libvirt.VIR_ERR_OPERATION_INVALID):
            return None
        raise
    return text


def _state(domain: Any) -> tuple[DomainState, StopCause | None]:
    state, reason = domain.state()
    if state == libvirt.VIR_DOMAIN_PAUSED:
        if reason == libvirt.VIR_DOMAIN_PAUSED_IOERROR:
            return DomainState.PAUSED_ON_ERROR, None
        return DomainState.PAUSED, None
    if state == libvirt.VIR_DOMAIN_PMSUSPENDED:
        return DomainState.SUSPENDED, None
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
        workers: int = 64,
        agent_timeout: float = 5.0,
        graceful_destroy_timeout: float = 5.0,
        reconnect_max_backoff: float = 30.0,
        on_action: Callable[[str], None] = lambda _action: None,
    ) -> None:
        """on_action(name) is told of every call that changes a domain, before it is made (see
        metrics.LIBVIRT_ACTIONS for the names)."""
        self.uri = uri
        self._on_action = on_action
        self._on_domain_event: Callable[[str], None] = lambda _name: None
        self._on_connection_change: Callable[[bool], None] = lambda _up: None
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="libvirt")
        # Agent calls have threads of their own, and few: libvirt holds a guest-shutdown that an agent
        # accepted but did not act on for a fixed 60 s, whatever the agent timeout, and each retry adds
        # one. In the shared pool such calls could take every thread and hold up other VMs' forces; here
        # a queued agent call only runs out of its own timeout, and the request goes on to ACPI.
        self._agent_executor = ThreadPoolExecutor(max_workers=_AGENT_THREADS, thread_name_prefix="libvirt-agent")
        # Forces have threads of their own, as many as ordinary calls: a destroy armed for a deadline waits on
        # its thread, and ordinary calls must neither be held up by armed ones nor hold them up.
        self._force_executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="libvirt-force")
        self._agent_timeout = agent_timeout
        self._graceful_destroy_timeout = graceful_destroy_timeout
        self._reconnect_max_backoff = reconnect_max_backoff
        self._lanes: dict[Lane, Any] = {}
        # Connections for forces not in use, the FORCE lane's own among them; each force takes one of its
        # own, and the connections of an older connect (a libvirtd restart) are never handed out again.
        self._idle_forces: list[Any] = []
        self._generation = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lost = asyncio.Event()
        self._up = asyncio.Event()
        self._reconnector: asyncio.Task[None] | None = None
        # node_memory's view of the running domains: (uuid, maximum MiB) by domain ID, on which connection.
        self._memory_by_id: dict[int, tuple[str, int]] = {}
        self._memory_conn: Any = None
        self._memory_reread_at = 0.0

    def listen(self, *, on_domain_event: Callable[[str], None], on_connection_change: Callable[[bool], None]) -> None:
        """Who hears of domain lifecycle events (by domain name) and of the connection going up or down."""
        self._on_domain_event = on_domain_event
        self._on_connection_change = on_connection_change

    @property
    def connected(self) -> bool:
        return bool(self._lanes)

    async def wait_connected(self) -> None:
        """Until the first connection: before it, nothing is known, and "not known yet" is not "gone"."""
        await self._up.wait()

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
        conns, self._lanes = list(self._lanes.values()), {}
        spares, self._idle_forces = [c for c in self._idle_forces if c not in conns], []
        await self._run(_close_quietly, *conns, *spares)
        for executor in (self._executor, self._agent_executor, self._force_executor):
            executor.shutdown(wait=False, cancel_futures=True)

    async def _keep_connected(self) -> None:
        """Reconnect every 0.25 s for the first 10 s of an outage, then back off.

        A libvirtd restart (an upgrade, a crash the init system repairs) takes about a second, and a force
        due meanwhile is sent only once the connection is back: each second of a doubling back-off would be
        a second past the deadline. A failed connect to a local socket costs nothing; a long outage is
        tried less and less often.
        """
        backoff, outage_began, attempts = 0.25, None, 0
        while True:
            await self._lost.wait()
            outage_began = outage_began or time.monotonic()
            try:
                lanes = await self._run(self._connect)
            except libvirt.libvirtError as error:
                fast = time.monotonic() - outage_began < _FAST_RECONNECT_SECONDS
                if not (fast and attempts):  # one line for the fast retries, then one per slow retry
                    logger.warning(
                        "libvirt at %s is unreachable: %s; retrying %s",
                        self.uri,
                        error,
                        f"every {backoff:.2f}s for {_FAST_RECONNECT_SECONDS:.0f}s" if fast else f"in {backoff:.1f}s",
                        extra={"libvirt_uri": self.uri},
                    )
                attempts += 1
                await asyncio.sleep(backoff)
                if time.monotonic() - outage_began >= _FAST_RECONNECT_SECONDS:
                    backoff = min(backoff * 2, self._reconnect_max_backoff)
                continue
            backoff, outage_began, attempts = 0.25, None, 0
            self._lanes = lanes
            self._generation += 1
            self._idle_forces = [lanes[Lane.FORCE]]
            self._lost.clear()
            self._up.set()
            logger.info("connected to libvirt at %s", self.uri, extra={"libvirt_uri": self.uri})
            self._on_connection_change(True)

    def _connect(self) -> dict[Lane, Any]:
        """Open a connection per lane and subscribe to events (blocking calls, so they run in the pool)."""
        opened: dict[Lane, Any] = {}
        try:
            for lane in Lane:
                opened[lane] = libvirt.open(self.uri)
            main = opened[Lane.MAIN]
            main.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._lifecycle, None)
            main.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE, self._agent_lifecycle, None)
            main.registerCloseCallback(self._closed, None)
            for c in opened.values():
                _keep_alive(c)
        except libvirt.libvirtError:
            _close_quietly(*opened.values())
            raise
        return opened

    async def _force_connection(self) -> tuple[Any, int]:
        """A connection of its own for one force, and the connect it belongs to.

        Two destroys on one connection wait for each other: of two graceful destroys sent 30 ms apart on
        one connection, the second's SIGTERM came 0.175 s late in 7 of 20 rounds (plain libvirt-python,
        libvirt 9.0), and never on two connections. A new one costs a connect, which an armed force pays
        a second ahead of its deadline.
        """
        if not self._lanes:
            raise HypervisorUnavailable(f"libvirt at {self.uri} is not connected")
        generation = self._generation
        if self._idle_forces:
            return self._idle_forces.pop(), generation

        def open_force() -> Any:
            conn = libvirt.open(self.uri)
            try:
                _keep_alive(conn)
            except libvirt.libvirtError:
                _close_quietly(conn)
                raise
            return conn

        try:
            return await self._run(open_force, lane=Lane.FORCE), generation
        except libvirt.libvirtError as error:
            raise HypervisorUnavailable(f"libvirt at {self.uri}: {error}") from error

    def _release_force(self, conn: Any, generation: int) -> None:
        current = generation == self._generation and bool(self._lanes)
        if current and len(self._idle_forces) < _IDLE_FORCE_CONNECTIONS and _alive(conn):
            self._idle_forces.append(conn)
        elif conn not in self._lanes.values():
            self._force_executor.submit(_close_quietly, conn)

    def _to_loop(self, fn: Callable[..., None], *args: Any) -> None:
        """From the libvirt-events thread, hand over to the asyncio loop; an event that libvirt delivers after
        the loop has closed (the operator is gone) has nobody to tell."""
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(fn, *args)

    def _lifecycle(self, _conn: Any, domain: Any, event: int, detail: int, _opaque: Any) -> None:
        self._to_loop(self._on_domain_event, domain.name())

    def _agent_lifecycle(self, _conn: Any, domain: Any, state: int, reason: int, _opaque: Any) -> None:
        self._to_loop(self._on_domain_event, domain.name())

    def _closed(self, _conn: Any, reason: int, _opaque: Any) -> None:
        logger.warning("the libvirt connection closed (reason %d); reconnecting", reason)
        self._to_loop(self._disconnected)

    def _disconnected(self) -> None:
        if not self._lanes:
            return
        # Closed, not only dropped: a connection that still lives would go on delivering events twice.
        spares = [c for c in self._idle_forces if c not in self._lanes.values()]
        self._executor.submit(_close_quietly, *self._lanes.values(), *spares)
        self._lanes, self._idle_forces = {}, []
        self._lost.set()
        self._on_connection_change(False)

    async def _run(self, fn: Callable[..., T], *args: Any, lane: Lane = Lane.MAIN) -> T:
        executor = {Lane.AGENT: self._agent_executor, Lane.FORCE: self._force_executor}.get(lane, self._executor)
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    async def _call(self, what: str, fn: Callable[[Any], T], *, lane: Lane = Lane.MAIN, conn: Any = None) -> T:
        """Run fn(connection) in the lane's pool, turning libvirt's errors into the adapter's two kinds; on
        the lane's connection, or on `conn` (a force's own: its failure tears down nothing else)."""
        conn = conn if conn is not None else self._lanes.get(lane)
        if conn is None:
            raise HypervisorUnavailable(f"libvirt at {self.uri} is not connected")
        try:
            return await self._run(fn, conn, lane=lane)
        except UnicodeDecodeError as error:
            # libvirt-python raises this instead of libvirtError when libvirt's message is not UTF-8 (a
            # path or a QEMU message in another encoding): still that request's failure, with what is legible.
            text = error.object.decode("utf-8", errors="replace") if isinstance(error.object, bytes) else ""
            raise HypervisorError(f"{what}: {text or 'libvirt failed with a message that is not UTF-8'}") from error
        except libvirt.libvirtError as error:
            if not is_connection_error(error, conn):
                raise HypervisorError(f"{what}: {error}") from error
            # Only the connection still in use is torn down: a late failure on one already replaced must
            # not close its fresh successor.
            if conn is self._lanes.get(lane):
                self._disconnected()
            raise HypervisorUnavailable(f"libvirt at {self.uri}: {error}") from error

    async def observe(self, name: str) -> Domain | None:
        def observe(conn: Any) -> Domain | None:
            try:
                domain = conn.lookupByName(name)
                state, cause = _state(domain)
            except libvirt.libvirtError as error:
                if error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return None
                raise
            # The persistent definition's mark: a redefinition of a running domain changes only that one,
            # and the live mark would still carry the old spec hash until the next boot. A running domain
            # undefined from outside has no persistent definition left; its live mark still says whose it is.
            owner_xml = _metadata(domain, domainxml.METADATA_URI, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
            if owner_xml is None and state is not DomainState.STOPPED:
                owner_xml = _metadata(domain, domainxml.METADATA_URI, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            owner = domainxml.parse_owner(owner_xml)
            mark, agent = None, None
            if owner is not None and state is not DomainState.STOPPED:
                mark_xml = _metadata(domain, domainxml.SHUTDOWN_MARK_URI, libvirt.VIR_DOMAIN_AFFECT_LIVE)
                mark = domainxml.parse_shutdown_mark(mark_xml)
                agent = domainxml.agent_connected(domain.XMLDesc(0))
            return Domain(
                uuid=domain.UUIDString(),
                owner_uid=owner.uid if owner else None,
                spec_hash=owner.spec_hash if owner else None,
                state=state,
                stop_cause=cause,
                shutdown_mark=mark,
                agent_connected=agent,
                storage_hash=owner.storage_hash if owner else None,
            )

        return await self._call(f"observing domain {name}", observe)

    async def shutdown_marks(self) -> list[tuple[str, str, ShutdownMark]]:
        """(uuid, name, mark) of every running vmop domain with a stop under way: what the node alone knows."""

        def read(conn: Any) -> list[tuple[str, str, ShutdownMark]]:
            found = []
            for domain in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                try:
                    owner = domainxml.parse_owner(
                        _metadata(domain, domainxml.METADATA_URI, libvirt.VIR_DOMAIN_AFFECT_LIVE)
                    )
                    xml = _metadata(domain, domainxml.SHUTDOWN_MARK_URI, libvirt.VIR_DOMAIN_AFFECT_LIVE)
                except libvirt.libvirtError as error:
                    if error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                        continue  # gone since the listing
                    raise
                mark = domainxml.parse_shutdown_mark(xml)
                if owner is not None and mark is not None and owner.uid == domain.UUIDString():
                    found.append((owner.uid, domain.name(), mark))
            return found

        return await self._call("listing the shutdown marks", read)

    async def set_shutdown_mark(self, uuid: str, mark: ShutdownMark | None) -> None:
        """Keep (or, with None, drop) the stop under way in the running domain's live metadata."""

        def write(conn: Any) -> None:
            xml = domainxml.shutdown_mark_xml(mark) if mark is not None else None
            key = domainxml.SHUTDOWN_MARK_PREFIX if mark is not None else None
            _lookup(conn, uuid).setMetadata(
                libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                xml,
                key,
                domainxml.SHUTDOWN_MARK_URI,
                libvirt.VIR_DOMAIN_AFFECT_LIVE,
            )

        self._on_action("set_shutdown_mark")
        await self._call(f"marking the stop of {uuid}", write)

    async def node_memory(self) -> tuple[int, dict[str, int]]:
        """The node's physical memory and what each running domain may hold (its maximum), in MiB.

        Every running domain counts, vmop's or not: the kernel's OOM killer does not ask whose QEMU it is.

        A thousand VMs starting at once ask this back to back, so a read looks up only the domains that
        started since the last one: a running domain is known by its ID, which libvirt gives each start
        anew, and its maximum is kept with the ID. Everything is read afresh on a new connection and every
        _MEMORY_REREAD seconds (a memory device hot-plugged into a running domain raises its maximum).
        """

        def read(conn: Any) -> tuple[int, dict[str, int]]:
            total_mib = int(conn.getInfo()[1])
            now = time.monotonic()
            known = self._memory_by_id if self._memory_conn is conn and now < self._memory_reread_at else {}
            if not known:
                self._memory_reread_at = now + _MEMORY_REREAD
            seen: dict[int, tuple[str, int]] = {}
            for domain_id in conn.listDomainsID():
                entry = known.get(domain_id)
                if entry is None:
                    try:
                        domain = conn.lookupByID(domain_id)
                        entry = (domain.UUIDString(), math.ceil(domain.maxMemory() / 1024))
                    except libvirt.libvirtError as error:
                        if error.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:  # stopped since the listing
                            raise
                        continue
                seen[domain_id] = entry
            self._memory_by_id, self._memory_conn = seen, conn
            return total_mib, dict(seen.values())

        return await self._call("reading the node's memory", read)

    async def define(self, xml: str) -> None:
        self._on_action("define")
        await self._call("defining the domain", lambda conn: conn.defineXML(xml))

    async def start_domain(self, uuid: str) -> None:
        self._on_action("start")
        await self._call(f"starting {uuid}", lambda conn: _lookup(conn, uuid).create())

    async def suspend(self, uuid: str) -> None:
        self._on_action("suspend")
        await self._call(f"pausing {uuid}", lambda conn: _lookup(conn, uuid).suspend())

    async def resume(self, uuid: str) -> None:
        self._on_action("resume")
        await self._call(f"resuming {uuid}", lambda conn: _lookup(conn, uuid).resume())

    async def wake_up(self, uuid: str) -> None:
        """A guest suspended to RAM: resume cannot reach it, a wake-up event (pMWakeup) does."""
        self._on_action("wake_up")
        await self._call(f"waking up {uuid}", lambda conn: _lookup(conn, uuid).pMWakeup(0))

    async def undefine(self, uuid: str) -> None:
        flags = libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA

        def undefine(conn: Any) -> None:
            domain = _lookup(conn, uuid)
            if domain.isPersistent():  # one made transient from outside vanished when it stopped
                domain.undefineFlags(flags)

        self._on_action("undefine")
        await self._call(f"undefining {uuid}", undefine)

    async def request_shutdown(self, uuid: str, methods: tuple[ShutdownMethod, ...]) -> tuple[str | None, str]:
        """Ask the guest by each method in turn; return the method libvirt accepted and why others were not.

        Explicit flags always: with flags 0, libvirt tries the guest agent first, and a missing or hung
        agent can block that call for about a minute. The agent attempt is bounded twice: libvirt's own
        agent timeout, and a timeout around the call, so it never delays the ACPI fallback or the deadline.
        """
        refusals: list[str] = []
        for method in methods:
            try:
                if method is ShutdownMethod.AGENT:
                    self._on_action("shutdown_agent")
                    await asyncio.wait_for(
                        self._call(f"agent shutdown of {uuid}", self._agent_shutdown(uuid), lane=Lane.AGENT),
                        timeout=self._agent_timeout + 1,
                    )
                else:
                    self._on_action("shutdown_acpi")
                    await self._call(
                        f"ACPI shutdown of {uuid}",
                        lambda conn: _lookup(conn, uuid).shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN),
                    )
                return method.value, "; ".join(refusals)
            except HypervisorError as error:
                refusals.append(f"{method.value}: {error}")
            except TimeoutError:
                refusals.append(f"{method.value}: no answer within {self._agent_timeout:.0f}s")
        return None, "; ".join(refusals)

    def _agent_shutdown(self, uuid: str) -> Callable[[Any], None]:
        def agent_shutdown(conn: Any) -> None:
            domain = _lookup(conn, uuid)
            # Without an agent channel this fails, and so does shutdownFlags below: at once, with the reason.
            with contextlib.suppress(libvirt.libvirtError):
                domain.agentSetResponseTimeout(math.ceil(self._agent_timeout), 0)
            try:
                domain.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)
            except libvirt.libvirtError as error:
                # qemu-ga sends no reply to guest-shutdown, and libvirt waits for QEMU's SHUTDOWN event
                # instead: a guest that powers off fast closes the agent's socket first, and libvirt reports
                # "End of file from agent socket" (an internal error) for a request that worked. A guest on
                # its way off took it. Any other refusal (no agent, a hung one) goes to the next method at once.
                lost_agent = error.get_error_code() == libvirt.VIR_ERR_INTERNAL_ERROR
                if not (lost_agent and _going_down(domain, within=_AGENT_EOF_GRACE)):
                    raise

        return agent_shutdown

    async def force_off(self, uuid: str, *, delay: float = 0.0, abort: asyncio.Event | None = None) -> bool:
        """SIGTERM first, so that QEMU flushes its caches and exits; SIGKILL only if it does not.

        With a delay, the destroy is armed: it waits on its own thread and is sent when the delay is up, so
        that at a deadline nothing is left to do but send it (no step of the event loop, no thread to find).
        Until then `abort` being set calls it off; returns False if it was called off, True once sent.

        libvirt's timeline: a graceful destroy sends SIGTERM and polls every 200 ms, giving up after 15 s
        without SIGKILL. After our bound (settings keep it below those 15 s) a plain destroy follows; it
        sends SIGTERM again and SIGKILL 10 s later (virProcessKillPainfully), so a QEMU that ignores SIGTERM
        is gone at most bound + 10 s (and a few polls) after the deadline.
        """
        called_off = threading.Event()
        due = time.monotonic() + delay

        def destroy(flags: int, armed: bool = False) -> Callable[[Any], bool]:
            def run(conn: Any) -> bool:
                domain, ahead = None, 0.0
                if armed:
                    # Looked up while waiting, so that at the deadline only the destroy is left to send. A
                    # failure here is no failure of the force: it looks again when due, never sooner.
                    with contextlib.suppress(libvirt.libvirtError):
                        domain = _lookup(conn, uuid)
                    ahead = due - time.monotonic()
                    if called_off.wait(max(0.0, ahead)):
                        return False
                sent = time.monotonic()
                self._on_action("destroy")  # here, on the force's thread: an armed destroy called off is none
                try:
                    (domain or _lookup(conn, uuid)).destroyFlags(flags)
                except libvirt.libvirtError as error:
                    if error.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:  # already off
                        raise
                if armed:
                    # The operator's own share of a late force (the rest is libvirtd's and QEMU's), and how long
                    # before the deadline it was ready to send (too little: its arming came late).
                    late = sent - due
                    logger.info(
                        "destroy sent %.4fs after it fell due (armed %.4fs, ready %.4fs before)",
                        late,
                        delay,
                        ahead,
                        extra={"domain": uuid, "late": late, "armed": delay, "ahead": ahead},
                    )
                return True

            return run

        conn, generation = await self._force_connection()
        watcher = asyncio.create_task(abort.wait()) if abort is not None else None
        if watcher is not None:
            watcher.add_done_callback(lambda _: called_off.set())
        try:
            try:
                return await asyncio.wait_for(
                    self._call(
                        f"graceful destroy of {uuid}",
                        destroy(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL, armed=True),
                        lane=Lane.FORCE,
                        conn=conn,
                    ),
                    timeout=max(0.0, delay) + self._graceful_destroy_timeout,
                )
            except (TimeoutError, HypervisorError) as error:
                logger.warning(
                    "graceful destroy of %s did not finish (%s): destroying",
                    uuid,
                    error or "timeout",
                    extra={"domain": uuid},
                )
            finally:
                called_off.set()  # a cancelled caller must not leave an armed destroy behind
                if watcher is not None:
                    watcher.cancel()
            return await self._call(
                f"destroy of {uuid}", destroy(libvirt.VIR_DOMAIN_DESTROY_DEFAULT), lane=Lane.FORCE, conn=conn
            )
        finally:
            self._release_force(conn, generation)
