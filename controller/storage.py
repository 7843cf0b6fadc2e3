"""The storage allow-list: every path a domain would open must resolve inside an allowed directory.

A VirtualMachine's author is not necessarily the node's administrator; without this check, a spec could
attach any file of the host (a disk of another VM, /etc/shadow) to a guest.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from controller.api import DomainSpec

DEFAULT_ALLOWED_DIRS = (Path("/var/lib/libvirt/images"),)


def _paths(spec: DomainSpec) -> list[tuple[str, str]]:
    named = [("kernel", spec.kernel), ("initrd", spec.initrd)]
    named += [(f"disks[{i}].path", disk.path) for i, disk in enumerate(spec.disks)]
    return [(label, path) for label, path in named if path]


def _control_characters(path: str) -> str:
    """The control characters (C0 and DEL) in a path, as escapes a person can read, or ""."""
    found = dict.fromkeys(c for c in path if ord(c) < 0x20 or ord(c) == 0x7F)
    return ", ".join(repr(c).strip("'") for c in found)


def _resolve(path: str) -> tuple[str | None, str | None]:
    """(the real path, None), or (None, why it cannot be resolved): never an exception, whatever the input."""
    bad = _control_characters(path)
    if bad:
        return None, f"contains control characters ({bad}), which no file name on the node can hold"
    try:
        # realpath resolves symlinks and "..", so neither can lead out of an allowed directory.
        return os.path.realpath(path), None
    except (OSError, ValueError, RuntimeError) as error:
        # ValueError: a character no file name can hold (NUL, a lone surrogate); OSError, RuntimeError: what
        # readlink, getcwd and symlink loops can raise, in this Python or another one.
        return None, f"cannot be resolved on the node ({type(error).__name__}: {error})"


def problems(spec: DomainSpec, allowed_dirs: Sequence[Path]) -> tuple[str, ...]:
    """What is wrong with the spec's paths, in words a user can act on; empty when all are allowed.

    It never raises: a path that cannot even be resolved is one more problem to report on the VM, which then
    stays stoppable and deletable.
    """
    found = []
    allowed = []
    for directory in allowed_dirs:
        real_dir, why = _resolve(str(directory))
        if real_dir is None:
            found.append(
                f"allowed storage directory {str(directory)!r} {why}: fix the operator's --allowed-storage-dir"
            )
        else:
            allowed.append(real_dir)
    where_allowed = ", ".join(allowed) or "(none usable)"
    for label, path in _paths(spec):
        real, why = _resolve(path)
        if real is None:
            found.append(f"{label} {path!r} {why}")
        elif not any(real == d or real.startswith(d.rstrip(os.sep) + os.sep) for d in allowed):
            where = f" (resolves to {real})" if real != path else ""
            found.append(f"{label} {path}{where} is outside the allowed storage directories {where_allowed}")
        elif not os.path.isfile(real):
            found.append(f"{label} {path} does not exist or is not a file")
    return tuple(found)
