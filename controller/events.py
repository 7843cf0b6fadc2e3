"""Kubernetes Events about VirtualMachines and their Node, posted beside the operator's work, never in front of it.

An Event is a report, not state: losing one costs a line in `kubectl get events`, while waiting on one can
push a forced stop past its deadline. So `post()` only queues, and one background task writes the queue
out (as kopf's posting engine does), a few Events at a time while the API server answers and one at a
time while it fails, each call with a timeout, in a thread (the Kubernetes client blocks), every failure
caught, retried a bounded number of times, then dropped and counted. The queue holds 10,000: a node whose
3,000 VMs start at once posts 3,000 Events within seconds.

The API server is shared with the whole cluster, and a controller that loops must not flood it. As
client-go's EventRecorder does, a repeat of an Event already posted (same object, type, reason and
message) raises the count of the existing object instead of creating another, and repeats still waiting
in the queue are merged there, so a burst costs one write.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes import client

from controller.api import GROUP, KIND, VERSION

logger = logging.getLogger("vmop.events")

_COMPONENT = "vmop"
_MERGE_PATCH = "application/merge-patch+json"
# The API server refuses a message over 1 kB and a reportingInstance over 128 characters with a 422.
_MESSAGE_BYTES = 1024
_INSTANCE_CHARS = 128
# Statuses that say "not now" rather than "never": anything else the server answers is refused for good.
_RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# One log line per recurring problem per this many seconds: a broken API server must not also flood the log.
_LOG_INTERVAL = 60.0
# The longest pause after failures: an API server back from an outage gets its Events within this.
_MAX_BACKOFF = 30.0
# Events on their way at once while the API server answers.
_CONCURRENCY = 4

# (namespace, name, uid, type, reason, message): what makes two Events the same one, told twice.
_Key = tuple[str, str, str, str, str, str]


def _utcnow() -> datetime:
    return datetime.now(UTC)


# Events about a cluster-scoped object (the Node) live here, where kubectl and the kubelet put them.
_CLUSTER_SCOPED_EVENTS_NAMESPACE = "default"


@dataclass
class _Pending:
    """Occurrences not yet on the API server; repeats merge here, so a burst is one write."""

    namespace: str
    name: str
    uid: str | None
    api_version: str
    kind: str
    scoped: bool  # the object has a namespace (a VirtualMachine), else the Event goes to "default"
    resource_version: str | None
    type_: str
    reason: str
    message: str
    first: datetime
    last: datetime
    count: int = 1
    attempts: int = 0


@dataclass
class _Posted:
    """What the API server holds for a key: the object a repeat patches, and the count it has."""

    name: str
    count: int
    last: datetime


class _Throttle:
    """Says yes once per interval; the `no`s are counted, so the next line can say how many it stands for."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._next = 0.0
        self.suppressed = 0

    def allow(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            self.suppressed += 1
            return False
        self._next = now + self._interval
        return True

    def take_suppressed(self) -> int:
        suppressed, self.suppressed = self.suppressed, 0
        return suppressed


class EventRecorder:
    """Posts core/v1 Events about VirtualMachines from a bounded queue that one background task drains.

    What is lost is counted, so that it can be exported and seen without reading logs: `dropped` counts
    occurrences lost before any attempt (queue full, or posted after `close()`), `failed` those the API
    server refused or never answered within the attempts. The clock gives the Events' timestamps and
    must return aware datetimes; it is called in `post()`, so an Event says when it happened, not when
    the queue got to it.
    """

    def __init__(
        self,
        api: Any,
        *,
        node_name: str,
        timeout: float = 5.0,
        clock: Callable[[], datetime] = _utcnow,
        max_queue: int = 10_000,
        max_attempts: int = 3,
        retry_backoff: float = 1.0,
        window: timedelta = timedelta(minutes=10),
        cache_size: int = 4096,
        close_timeout: float = 2.0,
    ) -> None:
        self._api = api
        self._node_name = node_name
        self._timeout = timeout
        self._clock = clock
        self._max_queue = max_queue
        self._max_attempts = max_attempts
        self._retry_backoff = retry_backoff
        self._window = window
        self._cache_size = cache_size
        self._close_timeout = close_timeout
        # post() may come from a thread of libvirt's or the client's; the lock is never held across an await.
        self._lock = threading.Lock()
        self._pending: dict[_Key, _Pending] = {}  # insertion order is the queue's order
        self._posted: OrderedDict[_Key, _Posted] = OrderedDict()  # least recently used first
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._wakeup = asyncio.Event()
        self._stopping = asyncio.Event()
        self._closed = False
        # Twice the Events on their way at once: a call stuck past its timeout keeps its thread, and must not
        # take the next Event's with it.
        self._executor = ThreadPoolExecutor(max_workers=2 * _CONCURRENCY, thread_name_prefix="vmop-events")
        self._delivering: set[_Key] = set()  # the Events on their way now
        self._overflowing = False
        self._overflow_dropped = 0
        self._failure_log = _Throttle(_LOG_INTERVAL)
        self._bad_post_log = _Throttle(_LOG_INTERVAL)
        self._failures_in_a_row = 0
        self.dropped = 0
        self.failed = 0

    # -- the caller's side: never waits, never raises ---------------------------------------------------

    def post(self, body: dict[str, Any], *, type_: str, reason: str, message: str) -> None:
        """Queue an Event about `body` (a VirtualMachine unless it says its kind, as a Node does); returns at
        once, whatever the API server is doing."""
        try:
            self._enqueue(body, type_=type_, reason=reason, message=message)
        except Exception:
            # A malformed body is a bug of the caller's, but reporting it must not become the caller's failure.
            if self._bad_post_log.allow():
                logger.exception("could not queue Event %s", reason)

    def _enqueue(self, body: dict[str, Any], *, type_: str, reason: str, message: str) -> None:
        meta = body["metadata"]
        scoped = "namespace" in meta
        namespace = meta["namespace"] if scoped else _CLUSTER_SCOPED_EVENTS_NAMESPACE
        name, uid = meta["name"], meta.get("uid")
        message = _truncate(message)
        key: _Key = (namespace, name, uid or "", type_, reason, message)
        now = self._clock()
        with self._lock:
            if self._closed:
                self.dropped += 1
                return
            pending = self._pending.get(key)
            if pending is not None:
                pending.count += 1
                pending.last = now
                return
            if len(self._pending) >= self._max_queue:
                self.dropped += 1
                self._overflow_dropped += 1
                first_drop = not self._overflowing
                self._overflowing = True
            else:
                self._pending[key] = _Pending(
                    namespace=namespace,
                    name=name,
                    uid=uid,
                    api_version=body.get("apiVersion") or f"{GROUP}/{VERSION}",
                    kind=body.get("kind") or KIND,
                    scoped=scoped,
                    resource_version=meta.get("resourceVersion"),
                    type_=type_,
                    reason=reason,
                    message=message,
                    first=now,
                    last=now,
                )
                first_drop = False
        if first_drop:
            # Once per episode: the line that says how many were lost comes when the queue is empty again.
            logger.warning("Event queue full (%d waiting): dropping new Events until it drains", self._max_queue)
        self._wake()

    def _wake(self) -> None:
        loop = self._loop
        if loop is None:
            return  # start() looks at the queue first thing
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wakeup.set()
        else:
            loop.call_soon_threadsafe(self._wakeup.set)

    # -- the background side ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start draining; Events posted before this were kept and go first."""
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._drain(), name="vmop-events")
        self._wakeup.set()

    async def close(self) -> None:
        """Post what is queued, for at most `close_timeout` seconds, then stop: a shutdown must not wait on a report."""
        with self._lock:
            self._closed = True
        self._stopping.set()
        self._wakeup.set()
        task, self._task = self._task, None
        if task is not None:
            await asyncio.wait({task}, timeout=self._close_timeout)
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        with self._lock:
            left = sum(pending.count for pending in self._pending.values())
            self._pending.clear()
            self.dropped += left
        if left:
            logger.warning("dropped %d Event(s) not posted by shutdown", left)
        # A call stuck in a thread must not hold the process: it is abandoned, not awaited.
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _drain(self) -> None:
        """Up to _CONCURRENCY Events on their way at once while the API server answers (a thousand VMs
        starting post a thousand Events within seconds), one at a time once it fails, as a paused queue."""
        in_flight: set[asyncio.Task[None]] = set()
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                while True:
                    room = 1 if self._failures_in_a_row else _CONCURRENCY
                    while len(in_flight) < room and (pending := self._pop()) is not None:
                        in_flight.add(asyncio.create_task(self._deliver_one(pending), name="vmop-event"))
                    if not in_flight:
                        break
                    _done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                if self._closed:
                    return
        finally:
            for task in in_flight:
                task.cancel()

    async def _deliver_one(self, pending: _Pending) -> None:
        try:
            await self._deliver(pending)
        except Exception:
            # Only a bug of ours gets here; it costs this Event, never the ones after it.
            logger.exception("Event %s lost to an unexpected error", pending.reason)
        finally:
            self._delivering.discard(_key(pending))

    def _pop(self) -> _Pending | None:
        """The oldest Event waiting whose like is not on its way already (a repeat posted meanwhile waits
        for it, to become a count on the same Event object)."""
        with self._lock:
            if not self._pending:
                overflow_dropped, self._overflow_dropped = self._overflow_dropped, 0
                self._overflowing = False
            else:
                key = next((key for key in self._pending if key not in self._delivering), None)
                if key is None:
                    return None
                self._delivering.add(key)
                return self._pending.pop(key)
        if overflow_dropped:
            logger.warning("Event queue drained; %d Event(s) were dropped while it was full", overflow_dropped)
        return None

    async def _deliver(self, pending: _Pending) -> None:
        pending.attempts += 1
        try:
            await self._write(pending)
        except Exception as error:
            transient = _retryable(error)
            retry = transient and pending.attempts < self._max_attempts and not self._closed
            if retry:
                self._requeue(pending)
            else:
                self.failed += pending.count
            self._log_failure(pending, error, dropped=not retry)
            if transient:
                # A refusal says the server is up and answering; only trouble reaching it slows the queue.
                self._failures_in_a_row += 1
                if not self._closed:
                    await self._back_off()
            return
        if self._failures_in_a_row:
            suppressed = self._failure_log.take_suppressed()
            logger.info(
                "posting Events again after %d failed attempt(s)%s",
                self._failures_in_a_row,
                f" ({suppressed} not logged)" if suppressed else "",
            )
        self._failures_in_a_row = 0

    async def _write(self, pending: _Pending) -> None:
        key = _key(pending)
        posted = self._posted.get(key)
        if posted is not None and pending.first - posted.last <= self._window:
            count = posted.count + pending.count
            try:
                # The count is absolute, so a patch retried after a timeout that did land counts nothing twice.
                await self._call(
                    self._api.patch_namespaced_event,
                    name=posted.name,
                    namespace=pending.namespace,
                    body={"count": count, "lastTimestamp": _rfc3339(pending.last)},
                    _content_type=_MERGE_PATCH,
                )
            except client.ApiException as error:
                if error.status != 404:
                    raise
                # The Event expired (the API server keeps them an hour) or was deleted: start a new one.
                del self._posted[key]
            else:
                posted.count, posted.last = count, pending.last
                self._posted.move_to_end(key)
                return
        # The answer as JSON, not as the client's model: only its name is needed, and building the model
        # costs more CPU than the request (every new VM gets an Event).
        created = await self._call(
            _answer_of(self._api.create_namespaced_event),
            namespace=pending.namespace,
            body=self._event(pending),
            _preload_content=False,
        )
        name = json.loads(created)["metadata"]["name"]
        self._posted[key] = _Posted(name=name, count=pending.count, last=pending.last)
        self._posted.move_to_end(key)
        while len(self._posted) > self._cache_size:
            self._posted.popitem(last=False)

    async def _call(self, fn: Any, /, **kwargs: Any) -> Any:
        call = functools.partial(fn, _request_timeout=self._timeout, **kwargs)
        future = asyncio.get_running_loop().run_in_executor(self._executor, call)
        # The client's own timeout ends a slow request with its reason; this one is for a call stuck where a
        # socket timeout does not reach (name resolution, a lock in the client), so the queue moves on.
        return await asyncio.wait_for(future, timeout=self._timeout * 1.5)

    def _event(self, pending: _Pending) -> Any:
        return client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{pending.name}.", namespace=pending.namespace),
            involved_object=client.V1ObjectReference(
                api_version=pending.api_version,
                kind=pending.kind,
                name=pending.name,
                namespace=pending.namespace if pending.scoped else None,
                uid=pending.uid,
                resource_version=pending.resource_version,
            ),
            type=pending.type_,
            reason=pending.reason,
            message=pending.message,
            first_timestamp=pending.first,
            last_timestamp=pending.last,
            event_time=pending.first,
            count=pending.count,
            action=pending.reason,
            reporting_component=_COMPONENT,
            reporting_instance=f"{_COMPONENT}-{self._node_name}"[:_INSTANCE_CHARS],
            source=client.V1EventSource(component=_COMPONENT, host=self._node_name),
        )

    def _requeue(self, pending: _Pending) -> None:
        """Back of the queue, not the front: one Event the server chokes on must not hold up the others."""
        key = _key(pending)
        with self._lock:
            newer = self._pending.get(key)
            if newer is None:
                self._pending[key] = pending
            else:
                # Repeats posted meanwhile wait in the queue already: carry this one's occurrences over to them.
                newer.count += pending.count
                newer.first = pending.first
                newer.attempts = pending.attempts

    async def _back_off(self) -> None:
        """Pause the whole queue after a failure: an API server in trouble is not helped by the next Event."""
        delay = min(self._retry_backoff * 2 ** (self._failures_in_a_row - 1), _MAX_BACKOFF)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=delay)

    def _log_failure(self, pending: _Pending, error: BaseException, *, dropped: bool) -> None:
        if not self._failure_log.allow():
            return
        suppressed = self._failure_log.take_suppressed()
        logger.warning(
            "could not post Event %s for %s/%s (attempt %d): %s; %s%s",
            pending.reason,
            pending.namespace,
            pending.name,
            pending.attempts,
            _describe(error, self._timeout),
            "dropped" if dropped else "will retry",
            f"; {suppressed} more failure(s) since the last report" if suppressed else "",
            extra={"vm": f"{pending.namespace}/{pending.name}"},
        )


def _answer_of(call: Callable[..., Any]) -> Callable[..., bytes]:
    """The call, returning its raw answer read to the end: in the pool's thread, which frees the connection."""

    def read(**kwargs: Any) -> bytes:
        return bytes(call(**kwargs).data)

    return read


def _key(pending: _Pending) -> _Key:
    return (pending.namespace, pending.name, pending.uid or "", pending.type_, pending.reason, pending.message)


def _truncate(message: str) -> str:
    """Cut at 1024 bytes, not characters: the API server counts bytes, and a cut never splits a character."""
    encoded = message.encode()
    if len(encoded) <= _MESSAGE_BYTES:
        return message
    return encoded[:_MESSAGE_BYTES].decode(errors="ignore")


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _retryable(error: BaseException) -> bool:
    """A refusal (403, 409, 422) will be refused again; a timeout, a reset connection or a 5xx may not be."""
    if isinstance(error, client.ApiException):
        return error.status in _RETRYABLE_STATUSES
    return True


def _describe(error: BaseException, timeout: float) -> str:
    if isinstance(error, client.ApiException):
        return f"{error.status} {error.reason}"
    if isinstance(error, TimeoutError):
        return f"no answer within {timeout:g}s"
    return f"{type(error).__name__}: {error}"
