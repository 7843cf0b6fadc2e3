"""The operator's one clock: wall-clock instants that advance only as the monotonic clock does.

Deadlines are instants on the wall clock, because they must cross restarts (they live in the status and
in the domain's metadata). Within one process, though, the wall clock can step: a node that syncs its
time after boot jumps by minutes or hours, and a deadline compared with that clock would be forced
early (a step forward) or late (a step back). So the process reads the wall clock once, at start, and
from then on counts on the monotonic clock, which is also the one asyncio sleeps on: the time a worker
computes until its deadline is exactly the time it sleeps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta


class Clock:
    def __init__(
        self, *, wall: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self._monotonic = monotonic
        self._anchor_mono = monotonic()
        self._anchor_wall = datetime.fromtimestamp(wall(), UTC)

    def now(self) -> datetime:
        return self._anchor_wall + timedelta(seconds=self._monotonic() - self._anchor_mono)

    def seconds_until(self, instant: datetime) -> float:
        return (instant - self.now()).total_seconds()
