"""The node's backstop: forces marked domains at their deadlines before any worker has their VirtualMachine.

An operator that starts while the API server is down (or slow) has no VirtualMachines to work on: kopf
lists nothing. The deadlines are on the node all the same, in each running domain's shutdown mark, so
the backstop reads libvirt alone at start-up and forces each marked domain whose deadline passes while
no worker has taken it over. What it forced it keeps, so that the worker, once the API server is back,
reports the stop as it happened (Forced, at the time it was done).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from controller.api import ShutdownOutcome, ShutdownRecord
from controller.clock import Clock
from controller.hypervisor import Hypervisor, HypervisorError, HypervisorUnavailable
from controller.shutdown import ShutdownMark, complete

logger = logging.getLogger("vmop.backstop")
_RETRY = 1.0


class Backstop:
    def __init__(self, hypervisor: Hypervisor, clock: Clock) -> None:
        self._hypervisor = hypervisor
        self._clock = clock
        self._timers: dict[str, asyncio.Task[None]] = {}
        self._forced: dict[str, ShutdownRecord] = {}
        self._taken: set[str] = set()

    async def arm(self) -> None:
        """Read the marks once, after the first libvirt connection, and set a timer for each one to force."""
        await self._hypervisor.wait_connected()
        while True:
            try:
                marks = await self._hypervisor.shutdown_marks()
                break
            except (HypervisorError, HypervisorUnavailable) as error:
                logger.warning("could not read the shutdown marks (%s); retrying", error)
                await asyncio.sleep(_RETRY)
        for uuid, name, mark in marks:
            if mark.force and uuid not in self._taken:
                logger.info(
                    "domain %s has a stop under way; forcing at %s unless its VirtualMachine is seen first",
                    name,
                    mark.deadline.isoformat(),
                    extra={"domain": name},
                )
                self._timers[uuid] = asyncio.create_task(self._force_at_deadline(uuid, name, mark))

    def hand_over(self, uuid: str) -> ShutdownRecord | None:
        """A worker takes the VM over: no timer acts for it from now on. Returns the stop forced meanwhile."""
        self._taken.add(uuid)
        timer = self._timers.pop(uuid, None)
        if timer is not None:
            timer.cancel()
        return self._forced.pop(uuid, None)

    async def close(self) -> None:
        timers = list(self._timers.values())
        for timer in timers:
            timer.cancel()
        await asyncio.gather(*timers, return_exceptions=True)

    async def _force_at_deadline(self, uuid: str, name: str, mark: ShutdownMark) -> None:
        await asyncio.sleep(max(0.0, self._clock.seconds_until(mark.deadline)))
        while True:
            try:
                await self._hypervisor.force_off(uuid)
                break
            except (HypervisorError, HypervisorUnavailable) as error:
                logger.error("forcing %s at its deadline failed (%s); retrying", name, error, extra={"domain": name})
                await asyncio.sleep(_RETRY)
        now = self._clock.now()
        logger.info(
            "forced %s off %.3fs after its deadline, before its VirtualMachine was seen",
            name,
            (now - mark.deadline).total_seconds(),
            extra={"domain": name},
        )
        record = ShutdownRecord(purpose=mark.purpose, requested_at=mark.requested_at, deadline=mark.deadline)
        self._forced[uuid] = complete(record, ShutdownOutcome.FORCED, now)
        with contextlib.suppress(KeyError):
            del self._timers[uuid]
