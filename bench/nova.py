"""Nova's _clean_shutdown as a baseline beside vmop (issue 13): to be written."""

from __future__ import annotations

from typing import Any

from bench.bed import Bed


def run(bed: Bed, *, quick: bool) -> dict[str, Any]:
    raise NotImplementedError("nova: not written yet")


def rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The section's lines of the printed table: (benchmark, result, target)."""
    return []
