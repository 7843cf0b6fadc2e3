"""Force overshoot under each fault of the reliability work, as one table (issue 13): to be written."""

from __future__ import annotations

from typing import Any

from bench.bed import Bed


def run(bed: Bed, *, quick: bool) -> dict[str, Any]:
    raise NotImplementedError("faults: not written yet")


def rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The section's lines of the printed table: (benchmark, result, target)."""
    return []
