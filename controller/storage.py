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


def problems(spec: DomainSpec, allowed_dirs: Sequence[Path]) -> tuple[str, ...]:
    """What is wrong with the spec's paths, in words a user can act on; empty when all are allowed."""
    allowed = [os.path.realpath(d) for d in allowed_dirs]
    found = []
    for label, path in _paths(spec):
        # realpath resolves symlinks and "..", so neither can lead out of an allowed directory.
        real = os.path.realpath(path)
        if not any(real == d or real.startswith(d.rstrip(os.sep) + os.sep) for d in allowed):
            where = f" (resolves to {real})" if real != path else ""
            found.append(f"{label} {path}{where} is outside the allowed storage directories {', '.join(allowed)}")
        elif not os.path.isfile(real):
            found.append(f"{label} {path} does not exist or is not a file")
    return tuple(found)
