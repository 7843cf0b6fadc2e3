"""Shutdown escalation: ask the guest, ask again at an interval, force at the deadline.

Pure functions of (policy, shutdown record, now). The record lives in the VM's status and is written
before the first request is sent, so an operator that is killed mid-shutdown and restarted keeps the
original deadline: deadlines are instants on the wall clock, never counted sleeps (Nova's timer of
one-second sleeps overshot by up to 50%).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from controller.api import (
    ShutdownAttempt,
    ShutdownMethod,
    ShutdownMode,
    ShutdownOutcome,
    ShutdownPolicy,
    ShutdownPurpose,
    ShutdownRecord,
)

RECENT_ATTEMPTS_KEPT = 10
FORCE_METHOD = "Force"

FORCE_LEAD = timedelta(seconds=1)
"""The last stretch before a deadline that ends in a force belongs to the force: no request is re-sent in
it (no guest finishes a shutdown in a second, so such a request could only compete with the force for the
node), and the shell decides the force at its start and arms it (operator.VmWorker._look_ahead), so that
at the deadline nothing is left to do but send the destroy. The retry interval counts from the end of each
request, so re-sends drift: before this rule one fell a few tenths of a second before the deadline, and
with 100 VMs at once the force behind it was ready only 0.4 s ahead at the median, and some 0.4 s late."""


class StepKind(StrEnum):
    REQUEST = "Request"
    FORCE = "Force"
    WAIT = "Wait"


@dataclass(frozen=True)
class ShutdownMark:
    """The node's own copy of a stop under way, kept in the running domain's libvirt metadata.

    Written before the first request, it lets the node force at the deadline while the API server cannot
    be reached, and tells a restarted operator of a stop whose status write never landed.
    """

    purpose: ShutdownPurpose
    requested_at: datetime
    deadline: datetime
    force: bool


@dataclass(frozen=True)
class Step:
    """The next step of one VM's shutdown."""

    kind: StepKind
    record: ShutdownRecord
    methods: tuple[ShutdownMethod, ...] = ()
    overdue: bool = False
    wake_at: datetime | None = None


def policy_for(policy: ShutdownPolicy, purpose: ShutdownPurpose) -> ShutdownPolicy:
    """The policy a stop of this purpose follows: deletion may be forced by onDelete."""
    if purpose is ShutdownPurpose.DELETE and policy.on_delete is ShutdownMode.FORCE:
        return policy.model_copy(update={"mode": ShutdownMode.FORCE})
    return policy


def begin(policy: ShutdownPolicy, purpose: ShutdownPurpose, now: datetime) -> ShutdownRecord:
    forced = policy.mode is ShutdownMode.FORCE
    return ShutdownRecord(
        purpose=purpose,
        requested_at=now,
        deadline=now if forced else now + timedelta(seconds=policy.grace_period_seconds),
        method=FORCE_METHOD if forced else None,
    )


def effective_deadline(policy: ShutdownPolicy, record: ShutdownRecord, now: datetime) -> datetime:
    """The deadline under the current policy: it may come forward, never go back (as for pods)."""
    assert record.requested_at is not None
    assert record.deadline is not None
    deadline = min(record.deadline, record.requested_at + timedelta(seconds=policy.grace_period_seconds))
    if policy.mode is ShutdownMode.FORCE:
        deadline = min(deadline, now)
    return deadline


def last_attempt_at(record: ShutdownRecord) -> datetime | None:
    return record.recent_attempts[-1].time if record.recent_attempts else None


def next_step(policy: ShutdownPolicy, record: ShutdownRecord, now: datetime) -> Step:
    deadline = effective_deadline(policy, record, now)
    if deadline != record.deadline:
        record = record.model_copy(update={"deadline": deadline})
    forcing = policy.mode is ShutdownMode.FORCE or policy.force_after_deadline
    if forcing and now >= deadline:
        # The record is left as it is, so the shell has no status to write before it forces: the deadline
        # was persisted long ago, and every millisecond here is overshoot. complete() notes the Force.
        return Step(StepKind.FORCE, record)
    # Past the deadline without forcing: overdue on every step from now on, re-sends included.
    overdue = now >= deadline
    methods = tuple(policy.methods)
    last = last_attempt_at(record)
    if record.attempts == 0 or last is None:
        return Step(StepKind.REQUEST, record, methods=methods, overdue=overdue)
    next_retry = last + timedelta(seconds=policy.retry_interval_seconds) if policy.retry_interval_seconds else None
    if next_retry is not None and forcing and max(now, next_retry) >= deadline - FORCE_LEAD:
        next_retry = None  # the force's last stretch (FORCE_LEAD): the first request is the only one sent in it
    if next_retry is not None and now >= next_retry:
        return Step(StepKind.REQUEST, record, methods=methods, overdue=overdue)
    wakes = [t for t in (next_retry, None if overdue else deadline) if t is not None]
    return Step(StepKind.WAIT, record, overdue=overdue, wake_at=min(wakes) if wakes else None)


def mark(record: ShutdownRecord | None, policy: ShutdownPolicy) -> ShutdownMark | None:
    """What the node keeps of a stop under way: enough to force at its deadline without the API server."""
    if record is None or record.outcome is not None or record.requested_at is None or record.deadline is None:
        return None
    forcing = policy.mode is ShutdownMode.FORCE or policy.force_after_deadline
    return ShutdownMark(record.purpose, record.requested_at, record.deadline, forcing)


def adopt(record: ShutdownRecord | None, mark: ShutdownMark | None) -> ShutdownRecord | None:
    """The status may lag the node: a stop begun while the status could not be written is the node's record.

    The status wins for the same stop or a later one; of the same stop, the earlier deadline holds, since
    a deadline may come forward but never goes back.
    """
    if mark is None:
        return record
    if record is not None and record.requested_at is not None and record.requested_at >= mark.requested_at:
        if record.requested_at == mark.requested_at and record.outcome is None and record.deadline is not None:
            return record.model_copy(update={"deadline": min(record.deadline, mark.deadline)})
        return record
    return ShutdownRecord(purpose=mark.purpose, requested_at=mark.requested_at, deadline=mark.deadline)


def record_attempt(record: ShutdownRecord, *, method: str | None, message: str, now: datetime) -> ShutdownRecord:
    attempt = ShutdownAttempt(time=now, method=method or "None", message=message)
    return record.model_copy(
        update={
            "attempts": record.attempts + 1,
            "method": method or record.method,
            "recent_attempts": [*record.recent_attempts, attempt][-RECENT_ATTEMPTS_KEPT:],
        }
    )


def complete(record: ShutdownRecord, outcome: ShutdownOutcome, now: datetime) -> ShutdownRecord:
    changes: dict[str, object] = {"outcome": outcome, "completed_at": now}
    if outcome is ShutdownOutcome.FORCED:
        changes["method"] = FORCE_METHOD
    return record.model_copy(update=changes)
