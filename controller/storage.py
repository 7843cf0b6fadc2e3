"""The storage allow-list: every file a domain would open must resolve inside an allowed directory.

A VirtualMachine's author is not necessarily the node's administrator; without this check, a spec could
attach any file of the host (a disk of another VM, /etc/shadow) to a guest. The spec's paths are not all a
domain opens: a qcow2 image names a backing file (and may name a data file) in its header, and whoever
writes that header chooses them. A guest writes the whole of its raw disk, so a raw disk attached
elsewhere as qcow2 carries a header the guest made. So each qcow2 header is read, one file at a time, and
every file of the backing chain must pass the same check as the spec's own paths.

The check hands back what it checked, symlinks resolved and the chain spelled out, for the domain XML to
pin: libvirt then opens those files and no others, whatever a header or a symlink says at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import stat
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from controller.api import DiskFormat, DomainSpec

DEFAULT_ALLOWED_DIRS = (Path("/var/lib/libvirt/images"),)

# A bound, so that the walk ends whatever the headers say; more than anyone keeps by hand.
MAX_CHAIN_LENGTH = 16
# Headers kept; more than the images of any node's VMs, and small (a few hundred bytes each).
_CACHE_ENTRIES = 4096
# qemu-img processes at a time: an operator starting with hundreds of VMs does not fork hundreds at once.
_CONCURRENT_RUNS = 4
# Threads for realpath and stat, the storage's own: a dead mount holds these, not the event loop's default
# ones (which resolve the API server's name).
_FILE_THREADS = 4
# qemu-img's report lists a qcow2's internal snapshots: a crafted table could fill the operator's memory.
_MAX_REPORT_BYTES = 1 << 20
_MAX_ERROR_BYTES = 4096
# A file's timestamps move in ticks (a jiffy; a second on some file systems, two on FAT): a header rewritten
# in the tick it was read in keeps its stat. A header is kept only if its file had not changed for longer
# than any tick when it was read, the way git treats "racily clean" index entries.
_SETTLED_NS = 3_000_000_000


@dataclass(frozen=True)
class Layer:
    path: str  # resolved: no symlink, no ".."
    format: DiskFormat


@dataclass(frozen=True)
class ResolvedDisk:
    chain: tuple[Layer, ...]  # the disk itself (in the spec's format), then its backing files in order


@dataclass(frozen=True)
class ResolvedStorage:
    kernel: str | None
    initrd: str | None
    disks: tuple[ResolvedDisk, ...]  # in the spec's order


@dataclass(frozen=True)
class StorageCheck:
    problems: tuple[str, ...]
    resolved: ResolvedStorage | None  # None exactly when there are problems


def inside(real: str, allowed_dirs: Sequence[str]) -> bool:
    """Whether a resolved path lies in one of the resolved allowed directories (a shared prefix is not enough)."""
    return any(real == d or real.startswith(d.rstrip(os.sep) + os.sep) for d in allowed_dirs)


def _paths(spec: DomainSpec) -> list[tuple[str, str]]:
    """The spec's paths by field; every disk, whatever its path, as each must come back resolved or refused."""
    boot = [(label, path) for label, path in (("kernel", spec.kernel), ("initrd", spec.initrd)) if path]
    return boot + [(f"disks[{i}].path", disk.path) for i, disk in enumerate(spec.disks)]


def _control_characters(path: str) -> str:
    """The control characters (C0 and DEL) in a path, as escapes a person can read, or ""."""
    found = dict.fromkeys(c for c in path if ord(c) < 0x20 or ord(c) == 0x7F)
    return ", ".join(repr(c).strip("'") for c in found)


def _writable(text: str) -> bool:
    """Whether text can go into the domain XML and a status: no control characters, nothing but UTF-8."""
    if _control_characters(text):
        return False
    try:
        text.encode()
    except UnicodeEncodeError:  # lone surrogates: bytes that were not UTF-8, kept by surrogateescape
        return False
    return True


def _shown(name: str) -> str:
    """A name as a message can carry it: escaped unless it can be written as it is (an image's header holds
    whatever bytes its author chose)."""
    return name if _writable(name) else ascii(name)


def _resolve(path: str) -> tuple[str | None, str | None]:
    """(the real path, None), or (None, why it cannot be resolved): never an exception, whatever the input."""
    bad = _control_characters(path)
    if bad:
        return None, f"contains control characters ({bad}), which no file name on the node can hold"
    try:
        # realpath resolves symlinks and "..", so neither can lead out of an allowed directory.
        real = os.path.realpath(path)
    except (OSError, ValueError, RuntimeError) as error:
        # ValueError: a character no file name can hold (NUL, a lone surrogate); OSError, RuntimeError: what
        # readlink, getcwd and symlink loops can raise, in this Python or another one.
        return None, f"cannot be resolved on the node ({type(error).__name__}: {error})"
    # The real path goes into the domain XML: a symlink's target can hold what the spec's path may not.
    if not _writable(real):
        return None, f"resolves to {real!a}, a name the domain definition cannot hold"
    return real, None


@dataclass(frozen=True)
class _File:
    """Where a path leads on the node: its real path and what is there (None: nothing, or not to be seen)."""

    real: str
    stat: os.stat_result | None

    @property
    def regular(self) -> bool:
        return self.stat is not None and stat.S_ISREG(self.stat.st_mode)


def _find(path: str) -> _File | str:
    """The file a path leads to, or why it cannot be resolved. It stats, never opens: a FIFO or a device
    someone named must not be opened before it is known to be neither."""
    real, why = _resolve(path)
    if real is None:
        assert why is not None
        return why
    try:
        return _File(real, os.stat(real))
    except (OSError, ValueError):
        return _File(real, None)


def _survey(allowed_dirs: Sequence[Path], paths: Sequence[str]) -> tuple[_Allowed, list[str], list[_File | str]]:
    """The allowed directories resolved (and the problems with them) and the spec's paths found, in one trip
    to a thread."""
    usable, problems = [], []
    for directory in allowed_dirs:
        real, why = _resolve(str(directory))
        if real is None:
            problems.append(
                f"allowed storage directory {str(directory)!r} {why}: fix the operator's --allowed-storage-dir"
            )
        else:
            usable.append(real)
    return _Allowed(tuple(usable)), problems, [_find(path) for path in paths]


@dataclass(frozen=True)
class _Allowed:
    """The allowed directories, resolved: the judge of every file the storage is made of."""

    dirs: tuple[str, ...]

    def judge(self, label: str, name: str, found: _File | str, *, context: str = "") -> str | None:
        """The problem with one file, or None: it resolves inside the allowed directories, to a regular file
        (a FIFO, a device, a directory is never handed to QEMU). context follows the name in the message."""
        if isinstance(found, str):
            return f"{label} {name!r}{context} {found}"
        if not inside(found.real, self.dirs):
            where = f" (resolves to {found.real})" if found.real != name else ""
            listed = ", ".join(self.dirs) or "(none usable)"
            return f"{label} {_shown(name)}{where}{context} is outside the allowed storage directories {listed}"
        if not found.regular:
            return f"{label} {_shown(name)}{context} does not exist or is not a file"
        return None


@dataclass(frozen=True)
class _Header:
    """What a qcow2 header names outside itself, as qemu-img reports it."""

    backing: str | None  # full-backing-filename: relative names made absolute against the image's directory
    backing_format: str | None
    data_file: str | None


def _header(report: Any) -> _Header:
    """The header's references out of qemu-img's JSON report; ValueError if it does not read as one."""
    if not isinstance(report, dict):
        raise ValueError("not a JSON object")
    specific = report.get("format-specific")
    data = specific.get("data") if isinstance(specific, dict) else None
    fields = (
        report.get("full-backing-filename", report.get("backing-filename")),
        report.get("backing-filename-format"),
        data.get("data-file") if isinstance(data, dict) else None,
    )
    if not all(value is None or isinstance(value, str) for value in fields):
        raise ValueError("a backing or data file name is not a string")
    return _Header(*fields)


async def _drain(stream: asyncio.StreamReader | None, limit: int) -> bytes:
    """All a stream says up to limit + 1 bytes (one more than the limit: there was too much); the rest is
    read and dropped. Read to its end, always: asyncio's wait() returns only once the pipes have closed, and a
    child blocked on a full pipe never closes them."""
    assert stream is not None
    kept = bytearray()
    while chunk := await stream.read(1 << 16):
        kept += chunk[: max(0, limit + 1 - len(kept))]
    return bytes(kept)


_CacheKey = tuple[str, int, int, int, int, int]
_T = TypeVar("_T")


class StorageInspector:
    """The check of a spec's storage against the allowed directories, the backing chains included.

    The operator calls it on every step of every VM, so a header is read once per version of its file:
    a steady state costs stats. Every file system call runs in a thread and every wait is bounded by the
    timeout: a hung NFS mount must neither stop the event loop, where the other VMs' stops and forces run,
    nor hold this VM's worker for good.
    """

    def __init__(self, allowed_dirs: Sequence[Path], *, timeout: float = 10.0, qemu_img: str = "qemu-img") -> None:
        self._allowed_dirs = tuple(allowed_dirs)
        self._timeout = timeout
        self._qemu_img = qemu_img
        self._headers: OrderedDict[_CacheKey, _Header] = OrderedDict()
        self._runs = asyncio.Semaphore(_CONCURRENT_RUNS)
        self._files = ThreadPoolExecutor(max_workers=_FILE_THREADS, thread_name_prefix="vmop-storage")

    async def check(self, spec: DomainSpec) -> StorageCheck:
        """What is wrong with the spec's storage, in words a user can act on, or else what it resolves to.

        It never raises: a path that cannot even be resolved, a header that cannot be read, a spec no
        validation has seen, are problems to report on the VM, which stays stoppable and deletable.
        """
        try:
            return await self._check(spec)
        except TimeoutError:
            why = f"the node's file system did not answer within {self._timeout:g} s"
            return StorageCheck((f"the storage could not be checked: {why}",), None)
        except Exception as error:
            return StorageCheck((f"the storage could not be checked ({type(error).__name__}: {error})",), None)

    async def _on_files(self, call: Callable[[], _T]) -> _T:
        """A file system call in the storage's threads; TimeoutError if it does not return in time (its thread
        stays blocked, and the next calls wait for a free one, or time out too)."""
        async with asyncio.timeout(self._timeout):
            return await asyncio.get_running_loop().run_in_executor(self._files, call)

    async def _check(self, spec: DomainSpec) -> StorageCheck:
        named = _paths(spec)
        if not named:
            # No file: nothing to refuse (the allowed directories matter to files only), no file system to wait on.
            return StorageCheck((), ResolvedStorage(None, None, ()))
        allowed, problems, found = await self._on_files(partial(_survey, self._allowed_dirs, [p for _, p in named]))
        placed: dict[str, _File] = {}
        for (label, path), file in zip(named, found, strict=True):
            problem = allowed.judge(label, path, file)
            if problem is not None:
                problems.append(problem)
            elif isinstance(file, _File):
                placed[label] = file
        disks = []
        for i, disk in enumerate(spec.disks):
            label = f"disks[{i}].path"
            if label in placed:
                chain = await self._chain(f"{label} {disk.path}", placed[label], disk.format, allowed)
                if isinstance(chain, str):
                    problems.append(chain)
                else:
                    disks.append(ResolvedDisk(chain))
        if problems:
            return StorageCheck(tuple(problems), None)
        kernel, initrd = placed.get("kernel"), placed.get("initrd")
        return StorageCheck(
            (), ResolvedStorage(kernel.real if kernel else None, initrd.real if initrd else None, tuple(disks))
        )

    async def _chain(self, disk: str, file: _File, format_: DiskFormat, allowed: _Allowed) -> tuple[Layer, ...] | str:
        """A disk's chain (disk: its label and path, for messages), each backing file checked before qemu-img
        reads it; or the first problem.

        One file at a time, never qemu-img --backing-chain: that would open every file the headers name, a
        FIFO or a device among them, before any was checked. A raw layer ends the chain: QEMU does not parse
        a raw file, so nothing in it is a reference.
        """
        assert file.stat is not None
        chain = [Layer(file.real, format_)]
        seen = {(file.stat.st_dev, file.stat.st_ino)}
        while format_ is DiskFormat.QCOW2:
            subject = disk if len(chain) == 1 else f"{disk}: backing file {file.real}"
            header = await self._header_of(file)
            if isinstance(header, str):
                return f"{subject}: {header}"
            if header.data_file is not None:
                return (
                    f"{subject} has an external data file {_shown(header.data_file)}, which the domain definition "
                    "cannot pin (QEMU would open whatever the header names when it starts): convert the image to "
                    "one without (qemu-img convert -O qcow2)"
                )
            if header.backing is None:
                break
            name = _shown(header.backing)
            named_by = f" (named by {file.real})" if len(chain) > 1 else ""
            backing = f"{disk}: backing file {name}{named_by}"
            if not header.backing.startswith("/"):
                # What is not an absolute path after QEMU joined it to the image's directory has a protocol
                # prefix (nbd:, http:, json:{...}), which QEMU reads before any directory could be joined.
                return (
                    f"{backing} is not a plain file path (QEMU would open it through a protocol): rebase "
                    f"{file.real} onto a file inside the allowed storage directories (qemu-img rebase -F FORMAT)"
                )
            if header.backing_format is None:
                return (
                    f"{backing} has no recorded format, so QEMU would probe it, and a probe is how a raw image "
                    f"becomes qcow2: rebase with -F (qemu-img rebase -u -b {name} -F raw {file.real}, or -F qcow2)"
                )
            if header.backing_format not in {f.value for f in DiskFormat}:
                return f"{backing} has format {_shown(header.backing_format)}; backing files must be raw or qcow2"
            if len(chain) == MAX_CHAIN_LENGTH:
                return (
                    f"{disk}: the backing chain is longer than {MAX_CHAIN_LENGTH} images: flatten it (qemu-img convert)"
                )
            found = await self._on_files(partial(_find, header.backing))
            problem = allowed.judge(f"{disk}: backing file", header.backing, found, context=named_by)
            if problem is not None:
                return problem
            assert isinstance(found, _File)
            assert found.stat is not None
            if (found.stat.st_dev, found.stat.st_ino) in seen:
                return f"{backing} is already in the chain: the chain loops"
            seen.add((found.stat.st_dev, found.stat.st_ino))
            file, format_ = found, DiskFormat(header.backing_format)
            chain.append(Layer(file.real, format_))
        return tuple(chain)

    async def _header_of(self, file: _File) -> _Header | str:
        """The file's qcow2 header, read by qemu-img unless this version of the file was read before."""
        st = file.stat
        assert st is not None
        key = (file.real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        known = self._headers.get(key)
        if known is not None:
            self._headers.move_to_end(key)
            return known
        started = time.time_ns()
        header = await self._qemu_img_info(file.real)
        if isinstance(header, _Header) and started - st.st_ctime_ns > _SETTLED_NS:
            self._headers[key] = header
            if len(self._headers) > _CACHE_ENTRIES:
                self._headers.popitem(last=False)
        return header

    async def _qemu_img_info(self, real: str) -> _Header | str:
        # -U: no lock, so that the image of a running VM can be read; -f: the format is the spec's or the
        # header's, never probed; without --backing-chain qemu-img opens this one file (and qemu-img info
        # opens no data file either).
        argv = (self._qemu_img, "info", "--output=json", "-U", "-f", DiskFormat.QCOW2.value, real)
        async with self._runs:
            try:
                # A session of its own: the child's PID is also its group's, which kills it with whatever
                # it started (a wrapper script's children too), and nothing else.
                process = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    start_new_session=True,
                )
            except (OSError, ValueError) as error:
                return (
                    f"qemu-img could not be run ({type(error).__name__}: {error}): install qemu-utils where the "
                    "operator runs"
                )
            output = asyncio.gather(_drain(process.stdout, _MAX_REPORT_BYTES), _drain(process.stderr, _MAX_ERROR_BYTES))
            try:
                async with asyncio.timeout(self._timeout):
                    # Shielded: at the timeout the pipes are still read to their end, after the kill.
                    out, err = await asyncio.shield(output)
                    returncode = await process.wait()
            except TimeoutError:
                return f"qemu-img info did not answer within {self._timeout:g} s and was killed"
            finally:
                if process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    await process.wait()
                await output
        if len(out) > _MAX_REPORT_BYTES:
            return (
                f"qemu-img's report on it is larger than {_MAX_REPORT_BYTES >> 20} MiB (an image with that many "
                "internal snapshots is not taken)"
            )
        if returncode != 0:
            lines = err.decode(errors="replace").strip().splitlines() or [f"exit status {returncode}"]
            return f"qemu-img cannot read it as qcow2 ({_shown(lines[-1].removeprefix('qemu-img: '))})"
        try:
            # surrogateescape: a name that is not UTF-8 still names its file exactly.
            return _header(json.loads(out.decode(errors="surrogateescape")))
        except ValueError as error:
            return f"qemu-img's report cannot be read ({error})"
