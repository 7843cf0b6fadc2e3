"""What every part of the bed does with the processes it starts: ports for them, their log tails, stopping them."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any


def free_ports(count: int) -> list[int]:
    """Let the kernel pick loopback ports; holding all sockets until the end keeps the picks distinct.

    The ports are free only at this instant: a server may still lose the race for one.
    """
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def built_path(script: Path, *, timeout: float | None = None) -> str:
    """What a build.sh of the bed printed last: the path of what it built, or found in its cache. The script
    holds the cache key (versions and sums) and the build, so that both live in one place. Raises
    RuntimeError quoting its stderr if it failed."""
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=False, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{script} failed (exit {proc.returncode}); its stderr ends with:\n{tail(proc.stderr)}")
    return lines[-1]


def tail_file(path: Path, lines: int = 40) -> str:
    """The end of a log, for an error message; a log that cannot be read says why instead."""
    try:
        return tail(path.read_text(errors="replace"), lines)
    except OSError as error:
        return f"({path}: {error.strerror or error})"


def terminate(process: subprocess.Popen[Any], *, timeout: float, sig: signal.Signals = signal.SIGTERM) -> None:
    """Signal a child this bed started (by PID, never by name) and reap it; SIGKILL if it outlives timeout."""
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)


def alive(pid: int) -> bool:
    """A zombie counts as dead: a process this bed stopped may be reaped late (by PID 1 or a reaper)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status
