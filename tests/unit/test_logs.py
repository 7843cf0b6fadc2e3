"""JSON log lines carry vm, domain and reason: the per-VM logger merges the call's extra over its own."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from controller.logs import JsonFormatter, VmLogger, configure_logging, vm_logger


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, given back as it was: configure_logging replaces its handlers."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield root
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.fixture
def stream(root_logger: logging.Logger) -> io.StringIO:
    out = io.StringIO()
    configure_logging("json", "DEBUG", stream=out)
    return out


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_vm_line_carries_vm_domain_and_the_calls_reason(stream: io.StringIO) -> None:
    log = vm_logger("default", "web-1", "default_web-1")
    log.info("%s: %s", "StopRequested", "asking the guest", extra={"reason": "StopRequested"})
    (line,) = lines(stream)
    assert line["vm"] == "default/web-1"
    assert line["domain"] == "default_web-1"
    assert line["reason"] == "StopRequested"
    assert line["message"] == "StopRequested: asking the guest"
    assert line["level"] == "INFO"
    assert line["logger"] == "vmop.operator"


def test_the_calls_extra_neither_sticks_nor_is_needed(stream: io.StringIO) -> None:
    log = vm_logger("ns", "vm", "ns_vm", logging.getLogger("vmop.test"))
    log.warning("first", extra={"reason": "A", "attempt": 3})
    log.warning("second")
    log.error("third", extra={"domain": "renamed"})
    first, second, third = lines(stream)
    assert (first["reason"], first["attempt"], first["vm"]) == ("A", 3, "ns/vm")
    assert "reason" not in second, "one call's extra leaked into the next"
    assert "attempt" not in second
    assert second["vm"] == "ns/vm"
    assert third["domain"] == "renamed", "the call's field wins over the adapter's"
    assert third["logger"] == "vmop.test"
    assert isinstance(log, VmLogger)
    assert isinstance(log, logging.LoggerAdapter)


def test_a_plain_logger_adapter_would_lose_the_reason(stream: io.StringIO) -> None:
    """Why VmLogger exists: LoggerAdapter replaces the call's extra with its own (Python < 3.13 always)."""
    plain = logging.LoggerAdapter(logging.getLogger("vmop.test"), {"vm": "ns/vm"})
    plain.info("x", extra={"reason": "Lost"})
    (line,) = lines(stream)
    assert line["vm"] == "ns/vm"
    assert "reason" not in line


def test_exceptions_and_times_in_json(stream: io.StringIO) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        vm_logger("ns", "vm", "ns_vm").exception("failed", extra={"reason": "Unexpected"})
    (line,) = lines(stream)
    assert line["reason"] == "Unexpected"
    assert "RuntimeError: boom" in line["exception"]
    assert line["time"].endswith("Z")
    logged = datetime.fromisoformat(line["time"].replace("Z", "+00:00"))
    assert before <= logged <= datetime.now(UTC), "the time is UTC, as its Z says"


def test_only_scalar_extras_are_fields() -> None:
    record = logging.LogRecord("kopf", logging.INFO, __file__, 1, "m", (), None)
    record.settings = object()
    record.k8s_skip = "x"
    record.vm = "ns/vm"
    line = json.loads(JsonFormatter().format(record))
    assert line["vm"] == "ns/vm"
    assert "settings" not in line
    assert "k8s_skip" not in line


def test_text_format_for_people(root_logger: logging.Logger) -> None:
    out = io.StringIO()
    configure_logging("text", "INFO", stream=out)
    vm_logger("ns", "vm", "ns_vm").debug("hidden")
    vm_logger("ns", "vm", "ns_vm").info("shown")
    (text,) = out.getvalue().splitlines()
    assert text.endswith(" INFO vmop.operator shown")


def kopf_levels(out: io.StringIO) -> list[str]:
    """Of kopf's lines only: threads other tests left behind may log meanwhile."""
    return [line["level"] for line in lines(out) if line["logger"] == "kopf.objects"]


def test_kopfs_line_per_handled_event_is_left_out_at_info(root_logger: logging.Logger) -> None:
    """kopf says "Handler ... succeeded." at INFO for every watch event: a line per status write of every VM.
    Its warnings still come through, and at DEBUG everything does."""
    out = io.StringIO()
    kopf_objects = logging.getLogger("kopf.objects")
    try:
        configure_logging("json", "INFO", stream=out)
        kopf_objects.info("Handler 'register.<locals>.virtual_machine' succeeded.")
        kopf_objects.warning("Handler 'register.<locals>.virtual_machine' failed temporarily.")
        assert kopf_levels(out) == ["WARNING"]
        configure_logging("json", "DEBUG", stream=out)
        kopf_objects.info("Handler 'register.<locals>.virtual_machine' succeeded.")
        assert kopf_levels(out) == ["WARNING", "INFO"]
    finally:
        kopf_objects.setLevel(logging.NOTSET)
