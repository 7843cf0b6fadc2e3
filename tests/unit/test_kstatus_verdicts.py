"""Flux's health verdict (kstatus, the library itself, built from testbed/kstatus) on statuses vmop writes.

The statuses are made by vmop's own models, so that a renamed field or condition shows here; the verdicts
are the library's, so that what is pinned is what Flux will say, not what we think it says.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from controller.api import Condition, ObservedPowerState, VirtualMachineStatus
from testbed.kstatus import Verdict, verdict, verdicts

NOW = datetime(2026, 1, 1, tzinfo=UTC)
R, S, D = ObservedPowerState.RUNNING, ObservedPowerState.STOPPED, ObservedPowerState.SHUTTING_DOWN


def vm(
    power: ObservedPowerState | None,
    *conditions: tuple[str, str, str, str],
    generation: int = 1,
    observed: int | None = 1,
    name: str = "web-1",
) -> dict[str, Any]:
    """A VirtualMachine as the API server serves it; conditions as (type, status, reason, message)."""
    obj: dict[str, Any] = {
        "apiVersion": "vmop.dev/v1alpha1",
        "kind": "VirtualMachine",
        "metadata": {"name": name, "namespace": "default", "generation": generation},
        "spec": {"nodeName": "n1"},
    }
    if power is not None:
        status = VirtualMachineStatus(
            power_state=power,
            observed_generation=observed,
            conditions=[
                Condition(type=t, status=s, reason=r, message=m, last_transition_time=NOW, observed_generation=1)
                for t, s, r, m in conditions
            ],
        )
        obj["status"] = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    return obj


READY_RUNNING = ("Ready", "True", "Running", "")
READY_STOPPED = ("Ready", "True", "Stopped", "")
SYNCED = ("Synced", "True", "Reconciled", "")
STOPPING = "shutdown requested 1 time; forced at 2026-01-01T00:02:00Z"
REFUSED = "interfaces[0]: bridge 'evil0' is not allowed on this node (--allowed-bridge)"


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        pytest.param(vm(R, READY_RUNNING, SYNCED), Verdict("Current", "Resource is Ready"), id="running-as-asked"),
        pytest.param(vm(S, READY_STOPPED, SYNCED), Verdict("Current", "Resource is Ready"), id="stopped-as-asked"),
        pytest.param(
            vm(
                D,
                ("Ready", "False", "ShuttingDown", STOPPING),
                SYNCED,
                ("Reconciling", "True", "ShuttingDown", STOPPING),
            ),
            Verdict("InProgress", STOPPING),
            id="shutting-down",
        ),
        pytest.param(
            vm(
                S,
                ("Ready", "False", "NetworkNotAllowed", REFUSED),
                ("Synced", "False", "NetworkNotAllowed", REFUSED),
                ("Stalled", "True", "NetworkNotAllowed", REFUSED),
                observed=None,
            ),
            Verdict("Failed", REFUSED),
            id="refused-on-creation",
        ),
        pytest.param(
            vm(
                S,
                READY_STOPPED,
                ("Synced", "False", "NetworkNotAllowed", REFUSED),
                ("Stalled", "True", "NetworkNotAllowed", REFUSED),
                generation=2,
                observed=2,
            ),
            Verdict("Failed", REFUSED),
            id="refused-update-observed",
        ),
        pytest.param(
            vm(R, READY_RUNNING, SYNCED, generation=2, observed=1),
            Verdict("InProgress", "VirtualMachine generation is 2, but latest observed generation is 1"),
            id="spec-not-yet-observed",
        ),
    ],
)
def test_verdict_follows_generation_and_conditions(obj: dict[str, Any], expected: Verdict) -> None:
    assert verdict(obj) == expected


def test_a_generation_ahead_outranks_stalled() -> None:
    """kstatus compares generations before it reads any condition: a refusal the operator reports without
    catching observedGeneration up reads InProgress, and a Flux health check waits out its timeout instead
    of failing at once. Stalled must come with observedGeneration at the generation it judged."""
    stalled = ("Stalled", "True", "NetworkNotAllowed", REFUSED)
    assert verdict(vm(S, READY_STOPPED, stalled, generation=2, observed=1)).status == "InProgress"


def test_without_reconciling_or_stalled_only_ready_is_read() -> None:
    """What kstatus makes of Ready alone: never Failed, however final the reason. This is why vmop writes
    Stalled beside Ready."""
    refused = vm(S, ("Ready", "False", "StorageNotAllowed", "disk outside /var/lib/libvirt/images"), observed=None)
    assert verdict(refused) == Verdict("InProgress", "disk outside /var/lib/libvirt/images")


def test_a_vm_nobody_has_looked_at_yet_is_current() -> None:
    """No status at all reads Current, as for any custom resource without conditions: kstatus cannot tell
    that an operator will write one. A health check right after an apply sees this until the node's
    operator writes its first status."""
    assert verdict(vm(None)) == Verdict("Current", "Resource is current")


def test_a_vm_being_deleted_is_terminating() -> None:
    deleting = vm(R, READY_RUNNING, SYNCED)
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert verdict(deleting).status == "Terminating"


def test_a_list_gets_one_verdict_per_item() -> None:
    """The shape `kubectl get virtualmachines -o json` prints."""
    items = [vm(R, READY_RUNNING, SYNCED, name="a"), vm(R, READY_RUNNING, SYNCED, generation=3, name="b")]
    found = verdicts({"apiVersion": "v1", "kind": "List", "items": items})
    assert {name: v.status for name, v in found.items()} == {"a": "Current", "b": "InProgress"}
