"""The status of one VM, written beside its worker and never in front of it.

A worker hands over each status it decides and goes on to its next action at once; this writer sends
the newest one (older ones it never got to are simply superseded), retries with backoff while the API
server refuses or does not answer, and writes only on the object version it has seen (a conflict makes
it read the object afresh, hand it to the worker to decide on, and write the newest status again).

A status decided on the way to the worker's next step is held (see `hold`): a VM being created passes
through Initializing, Defining and Starting in milliseconds, and what a user, a GitOps tool or a metric
needs is where it settles. As controller-runtime's reconcilers write the status once, when a Reconcile
returns, the writer writes once the worker waits (`release`), or once a status has been held for
`hold_max` seconds, so that a state that lasts (a start that takes long, an action that hangs) shows.
Holding a status never holds an action: the worker does not wait for the writer in any case.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
from collections.abc import Callable
from typing import Any

from controller.api import VirtualMachineStatus
from controller.kube import CONFLICT, NOT_FOUND, Kube, KubeError

_RETRY_FIRST, _RETRY_MAX = 0.5, 5.0
# The longest a status waits for the step that settles: a VM's creation takes a few steps, each a libvirt
# call or an API request, which under a burst of a thousand VMs queue for seconds; a state that outlasts
# this is shown while it lasts.
HOLD_MAX = 5.0


def status_json(status: VirtualMachineStatus) -> dict[str, Any]:
    result: dict[str, Any] = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    return result


class StatusWriter:
    def __init__(
        self,
        kube: Kube,
        *,
        namespace: str,
        name: str,
        written: VirtualMachineStatus | None,
        resource_version: Callable[[], str],
        on_body: Callable[[dict[str, Any], bool], None],
        log: logging.LoggerAdapter[logging.Logger],
        hold_max: float = HOLD_MAX,
    ) -> None:
        """written: what the API server already holds. on_body(body, fresh) takes the object after a write
        (fresh=False: only our own write changed it) or after a conflict (fresh=True: decide again)."""
        self._kube = kube
        self._namespace, self._name = namespace, name
        self._written = written
        self._pending: VirtualMachineStatus | None = None
        self._resource_version = resource_version
        self._on_body = on_body
        self._log = log
        self._wake = asyncio.Event()
        self._hold_max = hold_max
        self._held = False
        self._lingering: asyncio.Future[None] | None = None  # the writer waits on it while it holds a status
        self._held_since: float | None = None  # loop time of the oldest submission not yet written
        # A context of its own, as the worker's (see VmWorker): nothing of kopf's handler is kept alive by it.
        self.task = asyncio.create_task(self._run(), name=f"status:{namespace}/{name}", context=contextvars.Context())

    def submit(self, status: VirtualMachineStatus) -> None:
        """Never waits: the newest status replaces any not yet written."""
        self._pending = status
        if self._held_since is None:
            self._held_since = asyncio.get_running_loop().time()
        self._wake.set()

    def hold(self) -> None:
        """The worker goes straight on to its next step: what it submits meanwhile waits for that step (or
        hold_max), since the next step decides again at once."""
        self._held = True

    def release(self) -> None:
        """The worker waits (for an event, a retry, a deadline): the newest status is written now."""
        self._held = False
        _wake_up(self._lingering)

    @property
    def settled(self) -> bool:
        """Everything submitted has been written."""
        return self._pending is None or self._pending == self._written

    async def _run(self) -> None:
        retry = _RETRY_FIRST
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.settled:
                self._held_since = None
                continue
            await self._linger()
            status, self._held_since = self._pending, None  # a status submitted from now on is held anew
            if status is None or self.settled:
                continue
            try:
                await self._write(status)
            except KubeError as error:
                if error.status == NOT_FOUND:
                    self._log.info("the object is gone; its status is not written")
                    return
                if error.status == CONFLICT:
                    await self._refresh()
                    self._wake.set()
                    continue
                self._log.warning("status not written (%s); retrying in %.1fs", error, retry)
                await asyncio.sleep(retry)
                retry = min(_RETRY_MAX, retry * 2) * random.uniform(0.8, 1.0)
                self._wake.set()
                continue
            retry = _RETRY_FIRST

    async def _write(self, status: VirtualMachineStatus) -> None:
        """One write; the object it returns goes to the worker and is not kept here (the loop above waits
        for the next status for as long as the VM lives)."""
        body = await self._kube.write_status(
            self._namespace, self._name, status_json(status), resource_version=self._resource_version()
        )
        self._written = status
        self._on_body(body, False)

    async def _linger(self) -> None:
        """While the worker is held, until it is released or the oldest unwritten status is hold_max old.

        A bare future and a timer, not wait_for: thousands of writers linger at once in a burst, and
        wait_for costs a task each and a cancellation at every timeout."""
        if not self._held:
            return
        loop = asyncio.get_running_loop()
        since = self._held_since if self._held_since is not None else loop.time()
        left = since + self._hold_max - loop.time()
        if left <= 0:
            return
        self._lingering = loop.create_future()
        timer = loop.call_later(left, _wake_up, self._lingering)
        try:
            await self._lingering
        finally:
            timer.cancel()
            self._lingering = None

    async def _refresh(self) -> None:
        try:
            body = await self._kube.get(self._namespace, self._name)
        except KubeError as error:
            self._log.warning("could not re-read the object after a conflict: %s", error)
            await asyncio.sleep(_RETRY_FIRST)
            return
        self._on_body(body, True)


def _wake_up(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)
