"""Flux's health verdict on VirtualMachines, computed by kstatus itself (testbed/kstatus/main.go).

Flux waits on and reports the health of what it applies with kstatus, which reads no resource-specific
rules for a custom resource: only metadata.generation against status.observedGeneration, the conditions
Reconciling and Stalled when True, and failing those the Ready condition. What Flux shows for a VM is
therefore decided by the library's code and vmop's status together; the bed runs the library's code, not a
copy of its rules, so that a change to either is seen.
"""

from __future__ import annotations

import functools
import json
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from testbed.processes import built_path, tail

BUILD_SCRIPT = Path(__file__).resolve().parent / "kstatus" / "build.sh"


class KstatusError(RuntimeError):
    """The probe could not be built or run; the message carries its stderr."""


class Verdict(NamedTuple):
    status: str  # Current, InProgress, Failed, Terminating, ...
    message: str


@functools.cache
def binary() -> Path:
    """The first call on a machine without the cache downloads the Go modules and builds (seconds to a
    minute), later ones only look."""
    try:
        return Path(built_path(BUILD_SCRIPT, timeout=600))
    except RuntimeError as error:
        raise KstatusError(str(error)) from None


def verdicts(document: Mapping[str, Any]) -> dict[str, Verdict]:
    """kstatus's verdict on each object of a List (as `kubectl get -o json` prints it) or on one object, by name.

    One process for a whole List, as Flux judges a whole revision at once; the timeout is for a probe that
    hangs, which a pure computation on a few objects never should."""
    proc = subprocess.run(
        [str(binary())], input=json.dumps(document), capture_output=True, text=True, check=False, timeout=30
    )
    if proc.returncode != 0:
        raise KstatusError(f"kstatus failed (exit {proc.returncode}): {tail(proc.stderr)}")
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    return {line["name"]: Verdict(line["status"], line["message"]) for line in lines}


def verdict(obj: Mapping[str, Any]) -> Verdict:
    """kstatus's verdict on one object, for tests that follow one VM."""
    (only,) = verdicts(obj).values()
    return only
