"""Polling with a deadline, so that no test or bed step waits on a bare sleep."""

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """Raised when a condition did not hold in time; an AssertionError so that pytest reports it as a failure."""


def wait_until(
    probe: Callable[[], T | None],
    *,
    timeout: float,
    message: str | Callable[[], str],
    interval: float = 0.05,
) -> T:
    """Call probe until it returns something truthy and return that; fail with message after timeout.

    message may be a callable so that the failure can describe the last state seen, which is what a
    person reading a failed run needs.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise WaitTimeout(f"{text} (waited {timeout:.1f}s)")
        time.sleep(interval)


def holds_until(
    probe: Callable[[], object], *, seconds: float, message: str | Callable[[], str], interval: float = 0.05
) -> None:
    """Assert that probe stays truthy for the given time: the check that something did not happen too early."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not probe():
            text = message() if callable(message) else message
            raise AssertionError(f"{text} ({seconds - (deadline - time.monotonic()):.2f}s into the {seconds:.2f}s)")
        time.sleep(interval)
