"""The node lock: one holder at a time, handed over the instant the holder releases it or dies."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

from controller.nodelock import NodeLock


def test_a_second_copy_waits_and_takes_over_at_release(tmp_path: Path) -> None:
    async def scenario() -> None:
        path = tmp_path / "locks" / "node-a.lock"
        active, standby = NodeLock(path), NodeLock(path)
        assert active.try_acquire()
        assert not standby.try_acquire()
        waiting = asyncio.create_task(standby.acquire())
        await asyncio.sleep(0.2)
        assert not waiting.done(), "the standby waits while the lock is held"
        released = time.monotonic()
        active.release()
        await asyncio.wait_for(waiting, timeout=5)
        assert time.monotonic() - released < 0.5
        assert standby.held
        assert path.read_text().strip().isdigit(), "the file names the holder's pid for a person"
        standby.release()

    asyncio.run(scenario())


def test_the_lock_is_free_the_instant_its_holder_is_killed(tmp_path: Path) -> None:
    path = tmp_path / "node-a.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from controller.nodelock import NodeLock; "
            f"assert NodeLock(Path({str(path)!r})).try_acquire(); print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        standby = NodeLock(path)
        assert not standby.try_acquire()

        async def take_over() -> float:
            killed = time.monotonic()
            holder.send_signal(signal.SIGKILL)
            await asyncio.wait_for(standby.acquire(), timeout=5)
            return time.monotonic() - killed

        assert asyncio.run(take_over()) < 0.5
        standby.release()
    finally:
        holder.kill()
        holder.wait()
