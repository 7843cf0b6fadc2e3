"""The Argo CD health check, run by a real Lua 5.1 (the version Argo CD embeds) on statuses the models make."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from controller.api import Condition, ObservedPowerState, VirtualMachineStatus

SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "argocd-health.lua"
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def lua(value: Any) -> str:
    """A Lua table constructor for a JSON-like value (strings quoted as JSON does, which Lua 5.1 reads)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"[{json.dumps(k)}] = {lua(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "{" + ", ".join(lua(v) for v in value) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "nil"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value, ensure_ascii=False)


def health(status: VirtualMachineStatus | None, generation: int = 1) -> str:
    obj: dict[str, Any] = {"metadata": {"generation": generation}, "spec": {"nodeName": "n1"}}
    if status is not None:
        obj["status"] = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    program = f'obj = {lua(obj)}\nlocal hs = dofile("{SCRIPT}")\nprint(hs.status .. "|" .. hs.message)'
    result = subprocess.run(["lua5.1", "-e", program], capture_output=True, text=True, check=True, timeout=10)
    return result.stdout.strip().split("|", 1)[0]


def status(power: ObservedPowerState, *conditions: tuple[str, str, str]) -> VirtualMachineStatus:
    return VirtualMachineStatus(
        power_state=power,
        conditions=[
            Condition(type=t, status=s, reason=r, last_transition_time=NOW, observed_generation=1)
            for t, s, r in conditions
        ],
    )


R, S = ObservedPowerState.RUNNING, ObservedPowerState.STOPPED


@pytest.mark.parametrize(
    ("vm_status", "expected"),
    [
        (None, "Progressing"),
        (status(R, ("Ready", "True", "Running"), ("Synced", "True", "Reconciled")), "Healthy"),
        (status(S, ("Ready", "True", "Stopped"), ("Synced", "True", "Reconciled")), "Suspended"),
        (status(ObservedPowerState.SHUTTING_DOWN, ("Ready", "False", "ShuttingDown")), "Progressing"),
        (status(R, ("Ready", "False", "ShutdownOverdue"), ("ShutdownOverdue", "True", "DeadlinePassed")), "Degraded"),
        (status(S, ("Ready", "False", "StorageNotAllowed"), ("Synced", "False", "StorageNotAllowed")), "Degraded"),
        (status(S, ("Ready", "False", "NetworkNotAllowed"), ("Synced", "False", "NetworkNotAllowed")), "Degraded"),
        (status(S, ("Ready", "False", "OverVmLimits"), ("Synced", "False", "OverVmLimits")), "Degraded"),
        (status(S, ("Ready", "False", "NodeMemoryFull"), ("Synced", "False", "NodeMemoryFull")), "Degraded"),
        (status(R, ("Ready", "False", "DomainConflict"), ("Synced", "False", "DomainConflict")), "Degraded"),
        (status(ObservedPowerState.UNKNOWN, ("Ready", "Unknown", "HypervisorUnreachable")), "Degraded"),
        (status(S, ("Ready", "False", "StoppedGuestInitiated")), "Suspended"),
        (status(S, ("Ready", "False", "HeldByTaint")), "Suspended"),
        (status(S, ("Ready", "False", "WaitingToStart")), "Progressing"),
        (status(S, ("Ready", "False", "StoppedCrashed")), "Degraded"),
        (status(R, ("Ready", "True", "Running"), ("Synced", "False", "DefinitionRefused")), "Degraded"),
        (status(R, ("Ready", "True", "Running"), ("Synced", "False", "DefinitionPending")), "Healthy"),
        (status(S, ("Ready", "False", "StartFailed"), ("Synced", "False", "StartFailed")), "Degraded"),
        (status(R, ("Ready", "False", "ForceOffFailed"), ("Synced", "False", "ForceOffFailed")), "Degraded"),
        (status(S, ("Ready", "False", "CrashLoopBackOff")), "Degraded"),
    ],
)
def test_health_follows_the_conditions(vm_status: VirtualMachineStatus | None, expected: str) -> None:
    assert health(vm_status) == expected


def test_a_spec_the_operator_has_not_seen_is_progressing() -> None:
    ready = status(R, ("Ready", "True", "Running"))
    assert health(ready, generation=2) == "Progressing"
