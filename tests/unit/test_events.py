"""The Event recorder against an in-memory API that answers, refuses, breaks and hangs on cue.

What must hold whatever the API server does: `post()` returns at once and never raises; a hung call costs
its timeout, not the Events behind it; repeats become one object with a count; what cannot be posted is
dropped and counted, and logged without flooding the log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pytest
import urllib3
from kubernetes import client

from controller.events import EventRecorder
from tests.unit.clock import T0, s

HANG = "hang"
TIMEOUT = 0.2  # the recorder's per-call timeout in these tests; a hung call is given up after 1.5 times this


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@dataclass
class Call:
    verb: str
    kwargs: dict[str, Any]


@dataclass
class RawResponse:
    """What the client returns with _preload_content=False: urllib3's response, of which `data` is read."""

    data: bytes


@dataclass
class FakeEventsApi:
    """The two Event calls of a CoreV1Api, in memory; `script` says how each next call goes (then: answer)."""

    script: deque[BaseException | str] = field(default_factory=deque)
    hang_all: bool = False
    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    delay: float = 0.0  # how long each call that answers takes
    in_flight: int = 0
    most_in_flight: int = 0

    def create_namespaced_event(self, **kwargs: Any) -> Any:
        """As the client answers with _preload_content=False (the recorder asks so): the raw response."""
        self._misbehave("create", kwargs)
        assert kwargs.get("_preload_content") is False
        body: client.CoreV1Event = kwargs["body"]
        with self.lock:
            name = f"{body.metadata.generate_name}{len(self.events):05x}"
            self.events[name] = {
                "body": body,
                "count": body.count,
                "firstTimestamp": body.first_timestamp,
                "lastTimestamp": body.last_timestamp,
            }
        return RawResponse(json.dumps({"metadata": {"name": name, "namespace": body.metadata.namespace}}).encode())

    def patch_namespaced_event(self, **kwargs: Any) -> client.CoreV1Event:
        self._misbehave("patch", kwargs)
        with self.lock:
            stored = self.events.get(kwargs["name"])
            if stored is None:
                raise client.ApiException(status=404, reason="Not Found")
            stored.update(kwargs["body"])
            body: client.CoreV1Event = stored["body"]
            return body

    def _misbehave(self, verb: str, kwargs: dict[str, Any]) -> None:
        with self.lock:
            self.calls.append(Call(verb, kwargs))
            how = self.script.popleft() if self.script else (HANG if self.hang_all else None)
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            self._answer(how)
        finally:
            with self.lock:
                self.in_flight -= 1

    def _answer(self, how: BaseException | str | None) -> None:
        if how is None and self.delay:
            time.sleep(self.delay)
        if how == HANG:
            # Ignores _request_timeout, as a call stuck outside the socket would; once released it ends the
            # way a socket timeout does, having written nothing.
            self.release.wait(timeout=30)
            raise urllib3.exceptions.ReadTimeoutError(None, "/api/v1/events", "read timed out")  # type: ignore[arg-type]
        if isinstance(how, BaseException):
            raise how

    def verbs(self) -> list[str]:
        with self.lock:
            return [call.verb for call in self.calls]

    def counts(self) -> list[int]:
        with self.lock:
            return sorted(stored["count"] for stored in self.events.values())


def vm(name: str = "web-1", uid: str = "uid-1") -> dict[str, Any]:
    return {"metadata": {"namespace": "default", "name": name, "uid": uid, "resourceVersion": "42"}}


def recorder(api: FakeEventsApi, clock: FakeClock | None = None, **kwargs: Any) -> EventRecorder:
    kwargs.setdefault("retry_backoff", 0.01)
    return EventRecorder(api, node_name="node-a", timeout=TIMEOUT, clock=clock or FakeClock(), **kwargs)


def counts_are(api: FakeEventsApi, *counts: int) -> Callable[[], bool]:
    return lambda: api.counts() == list(counts)


async def until(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def run(scenario: Callable[[], Coroutine[Any, Any, None]], api: FakeEventsApi) -> None:
    try:
        asyncio.run(scenario())
    finally:
        api.release.set()  # no thread of the pool outlives the test


def test_post_never_blocks_or_raises_whatever_the_api_does() -> None:
    api = FakeEventsApi(hang_all=True)

    async def scenario() -> None:
        events = recorder(api, max_queue=50, close_timeout=0.3)
        events.post(vm(), type_="Normal", reason="Before", message="posted before start")
        await events.start()
        started = time.monotonic()
        for i in range(200):
            events.post(vm(), type_="Normal", reason="Started", message=f"domain started ({i})")
        malformed: Any
        for malformed in ({}, {"metadata": {}}, None):
            events.post(malformed, type_="Warning", reason="Bad", message="no metadata")
        assert time.monotonic() - started < 0.5, "200 posts against a hung API took as long as a call"
        closing = time.monotonic()
        await events.close()
        assert time.monotonic() - closing < 1.0, "close() waited on the hung API"
        events.post(vm(), type_="Normal", reason="After", message="posted after close")
        assert events.dropped >= 150

    run(scenario, api)


def test_repeats_are_one_event_with_a_count() -> None:
    api, clock = FakeEventsApi(), FakeClock()

    async def scenario() -> None:
        events = recorder(api, clock)
        await events.start()
        for n in (1, 2, 3):
            events.post(vm(), type_="Warning", reason="ShutdownOverdue", message="the guest ignores ACPI")
            await until(counts_are(api, n))
            clock.advance(timedelta(minutes=1))
        await events.close()

    run(scenario, api)
    assert api.verbs() == ["create", "patch", "patch"]
    (stored,) = api.events.values()
    assert stored["firstTimestamp"] == T0
    assert stored["lastTimestamp"] == "2026-01-01T00:02:00Z"
    patch = api.calls[-1].kwargs
    assert patch["_content_type"] == "application/merge-patch+json"
    assert patch["name"] == next(iter(api.events))
    assert patch["body"] == {"count": 3, "lastTimestamp": "2026-01-01T00:02:00Z"}


def test_repeats_waiting_in_the_queue_are_one_write() -> None:
    api, clock = FakeEventsApi(), FakeClock()

    async def scenario() -> None:
        events = recorder(api, clock)
        for _ in range(5):
            events.post(vm(), type_="Normal", reason="ShutdownRequestResent", message="same words")
            clock.advance(s(1))
        await events.start()
        await events.close()

    run(scenario, api)
    assert api.verbs() == ["create"]
    body = next(iter(api.events.values()))["body"]
    assert (body.count, body.first_timestamp, body.last_timestamp) == (5, T0, T0 + s(4))


def test_different_words_types_or_objects_are_different_events() -> None:
    api = FakeEventsApi()

    async def scenario() -> None:
        events = recorder(api)
        await events.start()
        events.post(vm(), type_="Normal", reason="ShutdownRequested", message="request 1 by ACPI")
        events.post(vm(), type_="Normal", reason="ShutdownRequested", message="request 2 by ACPI")
        events.post(vm(), type_="Warning", reason="ShutdownRequested", message="request 1 by ACPI")
        events.post(vm(), type_="Normal", reason="ShutdownRequestResent", message="request 1 by ACPI")
        events.post(vm("web-2", "uid-2"), type_="Normal", reason="ShutdownRequested", message="request 1 by ACPI")
        await events.close()

    run(scenario, api)
    assert api.verbs() == ["create"] * 5
    assert api.counts() == [1] * 5


def test_a_repeat_after_the_window_or_after_the_event_is_gone_is_a_new_event() -> None:
    api, clock = FakeEventsApi(), FakeClock()

    def post(events: EventRecorder) -> None:
        events.post(vm(), type_="Warning", reason="HypervisorUnreachable", message="libvirt is unreachable")

    async def scenario() -> None:
        events = recorder(api, clock)
        await events.start()
        post(events)
        await until(lambda: len(api.events) == 1)
        clock.advance(timedelta(minutes=10, seconds=1))
        post(events)
        await until(lambda: len(api.events) == 2)
        with api.lock:
            api.events.clear()  # expired, or deleted by someone
        post(events)
        await until(lambda: len(api.events) == 1)
        await events.close()

    run(scenario, api)
    assert api.verbs() == ["create", "create", "patch", "create"]
    assert api.counts() == [1]


def test_the_memory_of_posted_events_is_bounded() -> None:
    api = FakeEventsApi()

    async def scenario() -> None:
        events = recorder(api, cache_size=2)
        await events.start()
        for message in ("a", "b", "c"):
            events.post(vm(), type_="Normal", reason="R", message=message)
        await until(lambda: len(api.events) == 3)
        events.post(vm(), type_="Normal", reason="R", message="c")  # still remembered: patched
        events.post(vm(), type_="Normal", reason="R", message="a")  # forgotten: a new object
        await events.close()

    run(scenario, api)
    assert api.verbs() == ["create"] * 3 + ["patch", "create"]


def test_a_full_queue_drops_counts_and_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    api = FakeEventsApi()
    caplog.set_level(logging.WARNING, logger="vmop.events")

    async def scenario() -> None:
        events = recorder(api, max_queue=3)
        for i in range(10):
            events.post(vm(), type_="Normal", reason="R", message=f"m{i}")
        events.post(vm(), type_="Normal", reason="R", message="m0")  # a repeat of a queued one is merged, not lost
        assert events.dropped == 7
        assert [r.message for r in caplog.records if "queue full" in r.message] == [
            "Event queue full (3 waiting): dropping new Events until it drains"
        ]
        await events.start()
        await until(lambda: len(api.events) == 3)
        await until(lambda: any("7 Event(s) were dropped" in r.message for r in caplog.records))
        await events.close()

    run(scenario, api)
    assert api.counts() == [1, 1, 2]


def test_a_burst_goes_out_a_few_at_a_time_and_a_repeat_waits_for_its_like() -> None:
    """A thousand VMs starting post a thousand Events: four on their way at once, not one; a repeat of one
    on its way is not posted beside it, but counted on it once it is there."""
    api = FakeEventsApi(delay=0.1)

    async def scenario() -> None:
        events = recorder(api)
        await events.start()
        started = time.monotonic()
        for i in range(12):
            events.post(vm(f"vm-{i}", f"uid-{i}"), type_="Normal", reason="Starting", message="starting")
        await until(lambda: api.in_flight > 0)
        events.post(vm("vm-0", "uid-0"), type_="Normal", reason="Starting", message="starting")
        await until(lambda: len(api.calls) == 13 and api.in_flight == 0)
        elapsed = time.monotonic() - started
        assert elapsed < 12 * 0.1 * 0.75, f"one at a time would take 1.2 s: {elapsed:.2f}s"
        await events.close()

    run(scenario, api)
    assert api.most_in_flight == 4
    assert sorted(api.verbs()) == ["create"] * 12 + ["patch"]
    assert sorted(api.counts()) == [1] * 11 + [2]


def test_a_hung_call_costs_its_timeout_not_the_events_behind_it() -> None:
    api = FakeEventsApi(script=deque([HANG]))

    async def scenario() -> None:
        events = recorder(api)
        await events.start()
        events.post(vm(), type_="Normal", reason="ShutdownRequested", message="first")
        await until(lambda: len(api.calls) == 1)
        started = time.monotonic()
        events.post(vm(), type_="Normal", reason="ShutdownRequested", message="first")  # while it hangs
        events.post(vm(), type_="Normal", reason="Stopped", message="second")
        await until(lambda: len(api.events) == 2)
        elapsed = time.monotonic() - started
        assert elapsed < TIMEOUT * 1.5 + 1.0, f"the queue stood still for {elapsed:.2f}s"
        assert events.failed == 0
        await events.close()

    run(scenario, api)
    assert api.verbs() == ["create", "create", "create"]
    assert api.counts() == [1, 2], "the repeat posted during the hang was merged into the retry"
    assert {call.kwargs["_request_timeout"] for call in api.calls} == {TIMEOUT}


def test_refusals_are_dropped_and_retries_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="vmop.events")
    api = FakeEventsApi(
        script=deque(
            [
                client.ApiException(status=409, reason="Conflict"),
                client.ApiException(status=403, reason="Forbidden"),
                *[client.ApiException(status=500, reason="Internal Server Error")] * 3,
            ]
        )
    )

    async def scenario() -> None:
        events = recorder(api, max_attempts=3)
        await events.start()
        events.post(vm(), type_="Normal", reason="A", message="refused: conflict")
        await until(lambda: len(api.calls) == 1)
        events.post(vm(), type_="Normal", reason="B", message="refused: forbidden")
        await until(lambda: len(api.calls) == 2)
        events.post(vm(), type_="Normal", reason="C", message="server error every time")
        await until(lambda: len(api.calls) == 5)
        events.post(vm(), type_="Normal", reason="D", message="the server is fine again")
        await until(lambda: len(api.events) == 1)
        assert (events.failed, events.dropped) == (3, 0)
        await events.close()

    run(scenario, api)
    failures = [r for r in caplog.records if r.message.startswith("could not post Event")]
    assert len(failures) == 1, "five failures within a minute are one log line"
    assert "409 Conflict" in failures[0].message


def test_connection_errors_are_retried_until_the_api_answers(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vmop.events")
    api = FakeEventsApi(
        script=deque(
            [
                urllib3.exceptions.MaxRetryError(None, "/api/v1/events"),  # type: ignore[arg-type]
                urllib3.exceptions.ProtocolError("Connection aborted.", ConnectionResetError()),
                ConnectionRefusedError(111, "Connection refused"),
            ]
        )
    )

    async def scenario() -> None:
        events = recorder(api, max_attempts=4)
        await events.start()
        events.post(vm(), type_="Normal", reason="Started", message="domain started")
        await until(lambda: len(api.events) == 1)
        await events.close()
        assert (events.failed, events.dropped) == (0, 0)

    run(scenario, api)
    assert api.verbs() == ["create"] * 4
    assert any(r.message.startswith("posting Events again after 3 failed") for r in caplog.records)


def test_close_posts_what_is_queued() -> None:
    api = FakeEventsApi()

    async def scenario() -> None:
        events = recorder(api)
        for i in range(5):
            events.post(vm(), type_="Normal", reason="R", message=f"m{i}")
        await events.start()
        await events.close()
        assert events.dropped == 0

    run(scenario, api)
    assert len(api.events) == 5


def test_post_from_another_thread() -> None:
    api = FakeEventsApi()

    async def scenario() -> None:
        events = recorder(api)
        await events.start()
        thread = threading.Thread(
            target=events.post, args=(vm(),), kwargs={"type_": "Normal", "reason": "Lifecycle", "message": "m"}
        )
        thread.start()
        thread.join()
        await until(lambda: len(api.events) == 1)
        await events.close()

    run(scenario, api)


def test_the_event_says_what_kube_post_event_said() -> None:
    api = FakeEventsApi()
    message = "é" * 1000  # 2000 bytes: over the API server's 1 kB limit

    async def scenario() -> None:
        events = recorder(api)
        await events.start()
        events.post(vm(), type_="Warning", reason="ShutdownRequestFailed", message=message)
        await events.close()

    run(scenario, api)
    (call,) = api.calls
    assert call.kwargs["namespace"] == "default"
    body: client.CoreV1Event = call.kwargs["body"]
    assert body.metadata.generate_name == "web-1."
    assert body.metadata.namespace == "default"
    ref = body.involved_object
    assert (ref.api_version, ref.kind, ref.name, ref.namespace, ref.uid, ref.resource_version) == (
        "vmop.dev/v1alpha1",
        "VirtualMachine",
        "web-1",
        "default",
        "uid-1",
        "42",
    )
    assert (body.type, body.reason, body.action, body.count) == (
        "Warning",
        "ShutdownRequestFailed",
        "ShutdownRequestFailed",
        1,
    )
    assert body.message == "é" * 512
    assert (body.first_timestamp, body.last_timestamp, body.event_time) == (T0, T0, T0)
    assert (body.reporting_component, body.reporting_instance) == ("vmop", "vmop-node-a")
    assert body.source is not None
    assert (body.source.component, body.source.host) == ("vmop", "node-a")
