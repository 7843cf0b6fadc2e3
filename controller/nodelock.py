"""One active operator per node: an exclusive flock on a file in a host directory the DaemonSet mounts.

Two copies acting for one node (a rollout with maxSurge, a second install, a copy started by hand)
would each ask the guests and each write a deadline. A Lease in the API would not do: it outlives a
SIGKILLed holder until it expires, and it cannot be taken or kept while the API server is down, when
deadlines must still be kept. The kernel releases a flock the instant its holder dies, however it dies,
and needs nothing but the node; a standby blocked on it acts the moment it is released.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from pathlib import Path


class NodeLock:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        """Take the lock if it is free; never waits."""
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._hold(fd)
        return True

    async def acquire(self) -> None:
        """Wait for the lock; the wait runs in a thread of its own so that the event loop goes on.

        The thread blocks in the kernel, which wakes it the instant the holder releases the lock or dies.
        """
        fd = self._open()
        try:
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)  # the thread may still get the lock on this fd; closing releases it again
            raise
        self._hold(fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor of the open file releases the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _hold(self, fd: int) -> None:
        # Who holds it, for a person looking at the node; the lock itself is the flock, not this text.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
