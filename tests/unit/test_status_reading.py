"""A status this version cannot fully read (written by a newer one) keeps what it can, the deadline first."""

from __future__ import annotations

from datetime import datetime

from controller.api import ShutdownPurpose, read_status

DEADLINE = "2026-11-24T10:02:00.123456Z"
NEWER = {
    "powerState": "Hibernating",  # a value a newer version writes
    "domainUUID": "u-1",
    "observedGeneration": 4,
    "shutdown": {
        "purpose": "Stop",
        "requestedAt": "2026-11-24T10:00:00Z",
        "deadline": DEADLINE,
        "attempts": 3,
        "method": "ACPI",
        "recentAttempts": [{"time": "2026-11-24T10:00:00Z", "method": "ACPI", "viaChannel": 7, "message": ""}],
        "escalation": "Later",
    },
    "conditions": [{"type": "Ready", "status": "Maybe", "reason": "X"}],
}


def test_an_unfinished_stop_keeps_its_deadline_whatever_else_does_not_read() -> None:
    raw = {**NEWER, "shutdown": {**NEWER["shutdown"], "purpose": "Migrate", "attempts": "many"}}
    status, lost = read_status(raw)
    assert status.shutdown is not None
    assert status.shutdown.deadline == datetime.fromisoformat(DEADLINE)
    assert status.shutdown.purpose is ShutdownPurpose.STOP
    assert status.shutdown.outcome is None
    assert status.domain_uuid == "u-1"
    assert status.observed_generation == 4
    assert set(lost) == {"powerState", "shutdown", "conditions"}


def test_a_finished_stop_that_does_not_read_is_dropped_not_revived() -> None:
    raw = {**NEWER, "shutdown": {**NEWER["shutdown"], "outcome": "Hibernated"}}
    status, lost = read_status(raw)
    assert status.shutdown is None, "an unreadable outcome must not turn into a stop under way"
    assert "shutdown" in lost


def test_a_readable_status_reads_as_it_is() -> None:
    status, lost = read_status({"powerState": "Running", "observedGeneration": 2})
    assert lost == []
    assert status.observed_generation == 2
