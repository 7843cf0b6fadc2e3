"""Shutdown escalation with a fake clock: ask at once, re-ask at the interval, force exactly at the deadline."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from controller.api import (
    ShutdownMethod,
    ShutdownMode,
    ShutdownOutcome,
    ShutdownPolicy,
    ShutdownPurpose,
    ShutdownRecord,
)
from controller.shutdown import (
    FORCE_LEAD,
    RECENT_ATTEMPTS_KEPT,
    Step,
    StepKind,
    begin,
    complete,
    next_step,
    policy_for,
    record_attempt,
)
from tests.unit.clock import T0, US, s

REQUEST, FORCE, WAIT = StepKind.REQUEST, StepKind.FORCE, StepKind.WAIT


def policy(**changes: object) -> ShutdownPolicy:
    return ShutdownPolicy().model_copy(update=changes)


def send(step: Step, now: datetime) -> ShutdownRecord:
    """What the shell does after a Request step: the first method is accepted."""
    assert step.kind is REQUEST
    return record_attempt(step.record, method=step.methods[0].value, message="", now=now)


def run(pol: ShutdownPolicy, until: datetime, *, start: datetime = T0) -> tuple[list[tuple[StepKind, datetime]], Step]:
    """Drive one shutdown on a fake clock, waking exactly at wake_at; returns what was sent/forced and when."""
    record = begin(pol, ShutdownPurpose.STOP, start)
    now, log = start, []
    for _ in range(10_000):
        step = next_step(pol, record, now)
        record = step.record
        if step.kind is REQUEST:
            log.append((REQUEST, now))
            record = send(step, now)
            continue
        if step.kind is FORCE:
            log.append((FORCE, now))
            return log, step
        if step.wake_at is None or step.wake_at > until:
            return log, step
        assert step.wake_at > now, "a Wait must wake in the future"
        now = step.wake_at
    raise AssertionError("no progress")


def started(pol: ShutdownPolicy, at: datetime = T0) -> ShutdownRecord:
    """A shutdown begun at `at` whose first request was sent then."""
    record = begin(pol, ShutdownPurpose.STOP, at)
    return send(next_step(pol, record, at), at)


# --- the first request -------------------------------------------------------------------------------


def test_begin_writes_the_deadline_before_anything_is_sent() -> None:
    record = begin(policy(grace_period_seconds=120), ShutdownPurpose.STOP, T0 + US)
    assert record.requested_at == T0 + US
    assert record.deadline == T0 + US + s(120)
    assert record.attempts == 0
    assert record.recent_attempts == []
    assert record.outcome is None


def test_first_request_at_once_with_the_deadline_in_the_record() -> None:
    pol = policy(grace_period_seconds=60)
    step = next_step(pol, begin(pol, ShutdownPurpose.STOP, T0), T0)
    assert step.kind is REQUEST
    assert step.record.deadline == T0 + s(60)
    assert step.methods == (ShutdownMethod.ACPI,)


def test_an_unsent_first_request_is_sent_by_a_restarted_operator_with_the_old_deadline() -> None:
    pol = policy(grace_period_seconds=60)
    record = begin(pol, ShutdownPurpose.STOP, T0)
    step = next_step(pol, record, T0 + s(30))
    assert step.kind is REQUEST
    assert step.record.deadline == T0 + s(60)


# --- re-sending ----------------------------------------------------------------------------------------


def test_resends_exactly_at_each_interval_then_forces_exactly_at_the_deadline() -> None:
    log, _ = run(policy(grace_period_seconds=35, retry_interval_seconds=10), until=T0 + s(100))
    assert log == [
        (REQUEST, T0),
        (REQUEST, T0 + s(10)),
        (REQUEST, T0 + s(20)),
        (REQUEST, T0 + s(30)),
        (FORCE, T0 + s(35)),
    ]


@pytest.mark.parametrize("k", [1, 2, 5])
def test_resend_not_a_microsecond_early(k: int) -> None:
    pol = policy(grace_period_seconds=3600, retry_interval_seconds=10)
    record = started(pol)
    for i in range(1, k):
        record = send(next_step(pol, record, T0 + s(10 * i)), T0 + s(10 * i))
    due = T0 + s(10 * k)
    early = next_step(pol, record, due - US)
    assert early.kind is WAIT
    assert early.wake_at == due
    assert next_step(pol, record, due).kind is REQUEST


def test_retry_interval_zero_sends_once_and_waits_for_the_deadline() -> None:
    pol = policy(grace_period_seconds=30, retry_interval_seconds=0)
    log, _ = run(pol, until=T0 + s(100))
    assert log == [(REQUEST, T0), (FORCE, T0 + s(30))]
    step = next_step(pol, started(pol), T0 + s(29))
    assert step.kind is WAIT
    assert step.wake_at == T0 + s(30)


@pytest.mark.parametrize(
    ("grace", "interval", "now", "wake_at"),
    [
        (120, 10, T0 + s(1), T0 + s(10)),  # retry first
        (15, 10, T0 + s(1), T0 + s(10)),
        (5, 10, T0 + s(1), T0 + s(5)),  # deadline first
        (10, 10, T0 + s(1), T0 + s(10)),  # both at once
        (120, 0, T0 + s(1), T0 + s(120)),  # no retries: the deadline
    ],
)
def test_wake_at_is_the_next_retry_or_the_deadline_whichever_first(
    grace: int, interval: int, now: datetime, wake_at: datetime
) -> None:
    pol = policy(grace_period_seconds=grace, retry_interval_seconds=interval)
    step = next_step(pol, started(pol), now)
    assert step.kind is WAIT
    assert step.wake_at == wake_at


def test_no_resend_in_the_forces_last_second() -> None:
    """FORCE_LEAD before a force is the force's: the re-send due at 4 s of a 5 s grace is not sent."""
    log, _ = run(policy(grace_period_seconds=5, retry_interval_seconds=1), until=T0 + s(100))
    assert log == [(REQUEST, T0 + s(k)) for k in range(4)] + [(FORCE, T0 + s(5))]
    assert s(1) == FORCE_LEAD


@pytest.mark.parametrize(
    ("last", "now"),
    [
        (s(3) + US, s(3) + US),  # drifted: the next re-send would fall a microsecond into the last second
        (s(3.2), s(4.1)),  # a re-send due before the last second, but looked at only inside it
        (s(3), s(4)),  # due exactly as the last second begins
    ],
)
def test_a_resend_that_would_land_in_the_last_second_waits_for_the_force(last: timedelta, now: timedelta) -> None:
    pol = policy(grace_period_seconds=5, retry_interval_seconds=1)
    record = send(next_step(pol, started(pol), T0 + last), T0 + last)
    step = next_step(pol, record, T0 + now)
    assert step.kind is WAIT
    assert step.wake_at == T0 + s(5), "the force is next"


def test_the_last_resend_before_the_forces_last_second_is_still_sent() -> None:
    pol = policy(grace_period_seconds=5, retry_interval_seconds=1)
    record = send(next_step(pol, started(pol), T0 + s(2.9)), T0 + s(2.9))
    assert next_step(pol, record, T0 + s(3.9)).kind is REQUEST


def test_the_first_request_is_sent_even_inside_the_last_second() -> None:
    pol = policy(grace_period_seconds=1, retry_interval_seconds=1)
    log, _ = run(pol, until=T0 + s(10))
    assert log == [(REQUEST, T0), (FORCE, T0 + s(1))]


def test_without_a_force_the_last_second_before_the_deadline_is_no_different() -> None:
    pol = policy(grace_period_seconds=5, retry_interval_seconds=1, force_after_deadline=False)
    log, _ = run(pol, until=T0 + s(6))
    assert [t for _, t in log] == [T0 + s(k) for k in range(7)]


# --- forcing -------------------------------------------------------------------------------------------


def test_force_exactly_at_the_deadline_and_not_a_microsecond_before() -> None:
    pol = policy(grace_period_seconds=30, retry_interval_seconds=0)
    record = started(pol)
    before = next_step(pol, record, T0 + s(30) - US)
    assert before.kind is WAIT
    at = next_step(pol, record, T0 + s(30))
    assert at.kind is FORCE
    assert at.record == record, "nothing to write before forcing: the deadline is already in status"
    assert next_step(pol, record, T0 + s(31)).kind is FORCE
    done = complete(at.record, ShutdownOutcome.FORCED, T0 + s(30))
    assert done.method == "Force"


def test_force_wins_over_a_retry_due_at_the_deadline() -> None:
    pol = policy(grace_period_seconds=20, retry_interval_seconds=10)
    record = send(next_step(pol, started(pol), T0 + s(10)), T0 + s(10))
    assert next_step(pol, record, T0 + s(20)).kind is FORCE


def test_mode_force_forces_at_once() -> None:
    pol = policy(mode=ShutdownMode.FORCE, grace_period_seconds=120)
    record = begin(pol, ShutdownPurpose.STOP, T0)
    assert record.deadline == T0
    step = next_step(pol, record, T0)
    assert step.kind is FORCE
    assert step.record.attempts == 0


def test_grace_period_zero_forces_at_once() -> None:
    pol = policy(grace_period_seconds=0)
    assert next_step(pol, begin(pol, ShutdownPurpose.STOP, T0), T0).kind is FORCE


def test_switching_to_force_mid_shutdown_forces_at_once_and_brings_the_deadline_forward() -> None:
    graceful = policy(grace_period_seconds=120)
    record = started(graceful)
    now = T0 + s(7) + US
    step = next_step(graceful.model_copy(update={"mode": ShutdownMode.FORCE}), record, now)
    assert step.kind is FORCE
    assert step.record.deadline == now


def test_lowering_the_grace_period_brings_the_deadline_forward() -> None:
    record = started(policy(grace_period_seconds=120, retry_interval_seconds=0))
    lowered = policy(grace_period_seconds=30, retry_interval_seconds=0)
    step = next_step(lowered, record, T0 + s(10))
    assert step.kind is WAIT
    assert step.record.deadline == T0 + s(30)
    assert step.wake_at == T0 + s(30)
    assert next_step(lowered, step.record, T0 + s(30) - US).kind is WAIT
    assert next_step(lowered, step.record, T0 + s(30)).kind is FORCE


def test_lowering_the_grace_period_below_the_elapsed_time_forces_now() -> None:
    record = started(policy(grace_period_seconds=120))
    step = next_step(policy(grace_period_seconds=5), record, T0 + s(9))
    assert step.kind is FORCE
    assert step.record.deadline == T0 + s(5)


def test_raising_the_grace_period_never_pushes_the_deadline_back() -> None:
    pol = policy(grace_period_seconds=30, retry_interval_seconds=0)
    record = started(pol)
    raised = policy(grace_period_seconds=3600, retry_interval_seconds=0)
    step = next_step(raised, record, T0 + s(10))
    assert step.record.deadline == T0 + s(30)
    assert step.wake_at == T0 + s(30)
    assert next_step(raised, record, T0 + s(30)).kind is FORCE
    # Lowered, then raised again: the earliest deadline stays.
    lowered = next_step(policy(grace_period_seconds=20, retry_interval_seconds=0), record, T0 + s(10)).record
    assert next_step(raised, lowered, T0 + s(20)).kind is FORCE


def test_a_restarted_operator_keeps_the_original_deadline() -> None:
    pol = policy(grace_period_seconds=60, retry_interval_seconds=0)
    record = started(pol)
    # Much later, a new process reads the same record (from the status) under the same policy.
    restarted = ShutdownRecord.model_validate(record.model_dump(by_alias=True, mode="json"))
    assert next_step(pol, restarted, T0 + s(59)).wake_at == T0 + s(60)
    assert next_step(pol, restarted, T0 + s(60)).kind is FORCE


# --- forceAfterDeadline: false -------------------------------------------------------------------------


def test_never_forces_without_force_after_deadline_and_keeps_resending() -> None:
    pol = policy(grace_period_seconds=20, retry_interval_seconds=10, force_after_deadline=False)
    log, last = run(pol, until=T0 + s(60))
    assert [kind for kind, _ in log] == [REQUEST] * 7
    assert [t for _, t in log] == [T0 + s(10 * i) for i in range(7)]
    assert last.kind is WAIT
    assert last.overdue


def test_overdue_only_from_the_deadline_on() -> None:
    pol = policy(grace_period_seconds=30, retry_interval_seconds=0, force_after_deadline=False)
    record = started(pol)
    before = next_step(pol, record, T0 + s(30) - US)
    assert before.kind is WAIT
    assert not before.overdue
    assert before.wake_at == T0 + s(30)
    at = next_step(pol, record, T0 + s(30))
    assert at.kind is WAIT
    assert at.overdue
    assert at.wake_at is None  # nothing left to do on a timer: no retries, no force
    assert next_step(pol, record, T0 + s(86400)).kind is WAIT


def test_a_resend_after_the_deadline_is_still_overdue() -> None:
    pol = policy(grace_period_seconds=20, retry_interval_seconds=10, force_after_deadline=False)
    record = started(pol)
    record = send(next_step(pol, record, T0 + s(10)), T0 + s(10))
    step = next_step(pol, record, T0 + s(20))
    assert step.kind is REQUEST
    assert step.overdue


def test_switching_to_force_when_overdue_forces_at_once() -> None:
    pol = policy(grace_period_seconds=20, retry_interval_seconds=0, force_after_deadline=False)
    record = started(pol)
    assert next_step(pol, record, T0 + s(50)).overdue
    step = next_step(pol.model_copy(update={"mode": ShutdownMode.FORCE}), record, T0 + s(50))
    assert step.kind is FORCE


# --- methods and attempts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "methods",
    [
        [ShutdownMethod.ACPI],
        [ShutdownMethod.AGENT],
        [ShutdownMethod.AGENT, ShutdownMethod.ACPI],
        [ShutdownMethod.ACPI, ShutdownMethod.AGENT],
    ],
)
def test_methods_are_passed_through_in_order(methods: list[ShutdownMethod]) -> None:
    pol = policy(methods=methods)
    assert next_step(pol, begin(pol, ShutdownPurpose.STOP, T0), T0).methods == tuple(methods)
    record = started(pol)
    assert next_step(pol, record, T0 + s(10)).methods == tuple(methods)


def test_attempts_count_all_and_keep_the_last_ten_with_their_methods() -> None:
    pol = policy(
        grace_period_seconds=3600, retry_interval_seconds=1, methods=[ShutdownMethod.AGENT, ShutdownMethod.ACPI]
    )
    record = begin(pol, ShutdownPurpose.STOP, T0)
    for i in range(13):
        now = T0 + s(i)
        step = next_step(pol, record, now)
        assert step.kind is REQUEST
        # The agent is missing on even attempts: ACPI is what the hypervisor accepted.
        method, message = ("Agent", "") if i % 2 else ("ACPI", "Agent: no guest agent")
        record = record_attempt(step.record, method=method, message=message, now=now)
    assert record.attempts == 13
    assert len(record.recent_attempts) == RECENT_ATTEMPTS_KEPT == 10
    assert [a.time for a in record.recent_attempts] == [T0 + s(i) for i in range(3, 13)]
    assert [a.method for a in record.recent_attempts] == ["Agent" if i % 2 else "ACPI" for i in range(3, 13)]
    assert record.recent_attempts[-1].message == "Agent: no guest agent"
    assert record.method == "ACPI"
    assert record.deadline == T0 + s(3600)


def test_an_attempt_no_method_accepted_is_recorded_and_keeps_the_last_method() -> None:
    pol = policy()
    record = started(pol)
    record = record_attempt(record, method=None, message="ACPI: domain is not running", now=T0 + s(10))
    assert record.attempts == 2
    assert record.method == "ACPI"
    assert record.recent_attempts[-1].method == "None"
    assert record.recent_attempts[-1].message == "ACPI: domain is not running"


# --- purpose and completion ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("on_delete", "purpose", "expected"),
    [
        (ShutdownMode.FORCE, ShutdownPurpose.DELETE, ShutdownMode.FORCE),
        (ShutdownMode.GRACEFUL, ShutdownPurpose.DELETE, ShutdownMode.GRACEFUL),
        (ShutdownMode.FORCE, ShutdownPurpose.STOP, ShutdownMode.GRACEFUL),
        (ShutdownMode.FORCE, ShutdownPurpose.RESTART, ShutdownMode.GRACEFUL),
    ],
)
def test_on_delete_applies_only_to_deletion(
    on_delete: ShutdownMode, purpose: ShutdownPurpose, expected: ShutdownMode
) -> None:
    assert policy_for(policy(on_delete=on_delete), purpose).mode is expected


def test_complete_records_outcome_and_time() -> None:
    record = complete(started(policy()), ShutdownOutcome.GRACEFUL, T0 + s(3) + US)
    assert record.outcome is ShutdownOutcome.GRACEFUL
    assert record.completed_at == T0 + s(3) + US
    assert record.deadline == T0 + s(120)
