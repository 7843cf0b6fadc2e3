"""A child subreaper that owns libvirtd across its restarts, so that every QEMU it leaves behind is reaped at once.

libvirtd double-forks QEMU, so a guest's parent is the nearest ancestor that is a subreaper, else PID 1. PID 1 on
these machines reaps about 2 s late, and libvirt counts a zombie as alive: every destroy and every guest poweroff
then takes 2 s longer. A subreaper that lives only as long as one libvirtd (`tini -s`) hands the guests to PID 1
when the daemon is restarted; this one is started once per bed and spawns the daemon again on request, so the
guests of every daemon generation stay its children.

It also makes the bed's clean-up certain: every process the daemon leaves behind ends up a child of the reaper,
and a child's PID cannot be reused until its parent reaps it, so killing by PID here never hits a stranger.

The file runs as a script on the standard library alone (`python -I reaper.py -- ARGV...`, started by `Reaper`).
The bed talks to it over its stdin and stdout, one line per command and one per reply:

    start          -> "started PID" or "error WHY"
    status         -> "running PID", "exited RETURNCODE" or "none"
    stop SECONDS   -> "exited RETURNCODE" or "error WHY": SIGTERM to the daemon, SIGKILL to its process group
                      after SECONDS; every other child (the guests) is left alone
    quit           -> stop the daemon, SIGKILL every remaining child until none is left, "killed PID...", exit 0

RETURNCODE is subprocess's: the exit status, or minus the signal number. End of input (the bed died without
saying quit), SIGTERM and SIGHUP act as quit, so that a crashed test run leaves no guest running on a shared box.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType

_PR_SET_CHILD_SUBREAPER = 36
_QUIT_DAEMON_TIMEOUT = 15.0
_KILL_ROUND_TIMEOUT = 10.0


class ReaperError(RuntimeError):
    """The reaper refused a command, died or did not answer; the message says which and quotes its log."""


class Reaper:
    """The bed's handle on one reaper process, which runs `argv` as its daemon on each start_daemon()."""

    def __init__(self, argv: Sequence[str], *, env: Mapping[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._buffer = b""
        with log_path.open("ab") as log:
            # A session of its own: a Ctrl-C meant for pytest must not kill the reaper before the bed's stop()
            # has asked it to take the guests down in order.
            self._process = subprocess.Popen(
                [sys.executable, "-I", str(Path(__file__).resolve()), "--", *argv],
                env=dict(env),
                cwd="/",
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self._process.pid

    def start_daemon(self) -> int:
        """Spawn the daemon and return its PID; refused while a daemon of this reaper still runs."""
        word, rest = self._ask("start")
        if word != "started":
            raise ReaperError(f"the reaper did not start the daemon: {rest}")
        return int(rest)

    def daemon_returncode(self) -> int | None:
        """None while the daemon runs; its returncode once it has exited (and been reaped)."""
        word, rest = self._ask("status")
        if word == "running":
            return None
        if word == "exited":
            return int(rest)
        raise ReaperError(f"the reaper has no daemon: {word} {rest}")

    def stop_daemon(self, timeout: float) -> int:
        """Stop the daemon alone and return its returncode; its guests keep running as the reaper's children."""
        word, rest = self._ask(f"stop {timeout}", timeout=2 * timeout + 5)
        if word != "exited":
            raise ReaperError(f"the reaper could not stop the daemon: {rest}")
        return int(rest)

    def close(self, timeout: float = 2 * _QUIT_DAEMON_TIMEOUT + 3 * _KILL_ROUND_TIMEOUT) -> list[int]:
        """Stop the daemon, kill every process it left behind, end the reaper; return the PIDs killed.

        If the reaper does not finish in time it is SIGKILLed (by PID: it is our child) and ReaperError
        says so; what it left behind is then the caller's to find.
        """
        try:
            word, rest = self._ask("quit", timeout=timeout)
            self._process.wait(timeout=5)
        except (ReaperError, subprocess.TimeoutExpired) as error:
            self._process.kill()
            self._process.wait()
            raise ReaperError(f"the reaper did not quit and was killed: {error}") from None
        finally:
            for pipe in (self._process.stdin, self._process.stdout):
                if pipe is not None:
                    pipe.close()
        if word != "killed":
            raise ReaperError(f"unexpected answer to quit: {word} {rest}")
        return [int(pid) for pid in rest.split()]

    def _ask(self, command: str, timeout: float = 10.0) -> tuple[str, str]:
        stdin, stdout = self._process.stdin, self._process.stdout
        assert stdin is not None
        assert stdout is not None
        try:
            stdin.write(f"{command}\n".encode())
            stdin.flush()
        except (BrokenPipeError, ValueError):
            raise ReaperError(f"the reaper is gone ({self._exit_text()}):\n{self._log_tail()}") from None
        deadline = time.monotonic() + timeout
        fd = stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise ReaperError(f"the reaper did not answer {command!r} within {timeout:.0f}s")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise ReaperError(
                    f"the reaper is gone ({self._exit_text()}) while asked {command!r}:\n{self._log_tail()}"
                )
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        word, _, rest = line.decode().partition(" ")
        return word, rest

    def _exit_text(self) -> str:
        code = self._process.poll()
        return "still running" if code is None else f"exited with {code}"

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])
        except OSError as error:
            return f"({self.log_path}: {error.strerror or error})"


# ---- the reaper process itself


class _Server:
    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.daemon_pid: int | None = None
        self.daemon_returncode: int | None = None
        self.quitting = ""
        """Why the reaper must take everything down and end, once something asked it to."""
        self._wake_r, wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(wake_w, False)
        # Every handled signal writes a byte here, so select() wakes for SIGCHLD without a polling interval.
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        signal.signal(signal.SIGTERM, self._quit_signal)
        signal.signal(signal.SIGHUP, self._quit_signal)

    def _quit_signal(self, signum: int, frame: FrameType | None) -> None:
        self.quitting = signal.Signals(signum).name

    def serve(self) -> None:
        buffer = b""
        while not self.quitting:
            readable, _, _ = select.select([0, self._wake_r], [], [])
            if self._wake_r in readable:
                self._drain_wakeups()
            self._reap()
            if 0 not in readable:
                continue
            chunk = os.read(0, 4096)
            if not chunk:
                self._log("the bed closed the control pipe without quit; taking everything down")
                break
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if not self._command(line.decode().split()):
                    return
        else:
            self._log(f"quitting on {self.quitting}; taking everything down")
        self._quit()

    def _command(self, words: list[str]) -> bool:
        """Carry out one command and answer it; False once the reaper is done."""
        self._reap()  # a daemon that died a moment ago must not be reported running
        match words:
            case ["start"]:
                self._reply(self._start())
            case ["status"]:
                if self.daemon_pid is None:
                    self._reply("none")
                elif self.daemon_returncode is None:
                    self._reply(f"running {self.daemon_pid}")
                else:
                    self._reply(f"exited {self.daemon_returncode}")
            case ["stop", seconds]:
                self._reply(self._stop_daemon(float(seconds)))
            case ["quit"]:
                self._reply("killed " + " ".join(str(pid) for pid in self._quit()))
                return False
            case _:
                self._reply(f"error unknown command {words!r}")
        return True

    def _start(self) -> str:
        if self.daemon_pid is not None and self.daemon_returncode is None:
            return f"error daemon {self.daemon_pid} is still running"
        try:
            pid = os.posix_spawnp(
                self.argv[0],
                self.argv,
                os.environ,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                    # stdout is the bed's reply pipe; the daemon writes to the log, as the reaper does
                    (os.POSIX_SPAWN_DUP2, 2, 1),
                ],
                # its own process group, so that a hung daemon and its helpers can be SIGKILLed together
                setsid=True,
                # Python ignores these; an ignored signal would stay ignored in the daemon
                setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
            )
        except OSError as error:
            return f"error cannot run {self.argv[0]}: {error}"
        self.daemon_pid, self.daemon_returncode = pid, None
        self._log(f"started daemon pid {pid}: {' '.join(self.argv)}")
        return f"started {pid}"

    def _stop_daemon(self, timeout: float) -> str:
        pid = self.daemon_pid
        if pid is None:
            return "error no daemon was started"
        if self.daemon_returncode is None:
            # not reaped yet, so the PID (and its process group ID) is still the daemon's
            os.kill(pid, signal.SIGTERM)
            if not self._wait(lambda: self.daemon_returncode is not None, timeout):
                self._log(f"daemon pid {pid} ignored SIGTERM for {timeout:.0f}s; SIGKILL to its process group")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                if not self._wait(lambda: self.daemon_returncode is not None, timeout):
                    return f"error daemon {pid} survived SIGKILL"
        self._log(f"daemon pid {pid} exited with {self.daemon_returncode}")
        return f"exited {self.daemon_returncode}"

    def _quit(self) -> list[int]:
        if self.daemon_pid is not None and self.daemon_returncode is None:
            self._stop_daemon(_QUIT_DAEMON_TIMEOUT)
        killed: list[int] = []
        # A killed child's own children become ours in turn, hence rounds until none is left.
        while True:
            self._reap()
            children = self._children()
            if not children:
                break
            for pid in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            killed.extend(children)
            gone = functools.partial(self._none_left, set(children))
            if not self._wait(gone, _KILL_ROUND_TIMEOUT):
                self._log(f"children {children} did not die of SIGKILL; giving up")
                break
        if killed:
            self._log(f"killed the processes left behind: {killed}")
        return killed

    def _none_left(self, pids: set[int]) -> bool:
        return not pids & set(self._children())

    def _wait(self, done: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            self._reap()
            if done():
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            # a SIGCHLD after the _reap above still writes to the wakeup pipe, so none is missed
            if select.select([self._wake_r], [], [], remaining)[0]:
                self._drain_wakeups()

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.daemon_pid:
                self.daemon_returncode = os.waitstatus_to_exitcode(status)

    def _children(self) -> list[int]:
        """Unreaped children included: a zombie still holds its PID until _reap."""
        pids: list[int] = []
        for task in Path("/proc/self/task").iterdir():
            with contextlib.suppress(OSError):
                pids.extend(int(pid) for pid in (task / "children").read_text().split())
        return pids

    def _drain_wakeups(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass

    def _reply(self, line: str) -> None:
        try:
            os.write(1, f"{line}\n".encode())
        except BrokenPipeError:
            self.quitting = "a closed reply pipe"

    def _log(self, message: str) -> None:
        with contextlib.suppress(OSError):
            os.write(2, f"=== reaper {os.getpid()}: {message}\n".encode())


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "--":
        print("usage: reaper.py -- DAEMON-ARGV...", file=sys.stderr)
        return 2
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return 1
    _Server(argv[1:]).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
