"""Logging: one JSON object a line, and a per-VM logger whose lines carry `vm`, `domain` and `reason`.

Fields passed as `extra` become fields of the JSON line, so `jq 'select(.vm=="default/web-1")'` follows one
VM. The per-VM logger is a LoggerAdapter that MERGES the call's `extra` over its own: on Python < 3.13 a
plain `logging.LoggerAdapter` replaces the call's `extra` with the adapter's, and a `reason` passed by the
caller would be lost.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

# Attributes every LogRecord has; anything else was passed as `extra` and belongs in the JSON line.
_RECORD_FIELDS = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object a line, with the extras (vm, domain, reason) as fields a log system can filter on."""

    def __init__(self) -> None:
        super().__init__()
        # The time field ends in Z: it must be UTC whoever installs the formatter.
        self.converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        # Scalars only: kopf passes whole objects (its settings) as extras, which are no use in a log line.
        extras = {
            k: v
            for k, v in record.__dict__.items()
            if k not in _RECORD_FIELDS and isinstance(v, str | int | float | bool) and not k.startswith("k8s_")
        }
        line.update(extras)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(log_format: str = "json", level: str | int = "INFO", stream: TextIO | None = None) -> None:
    """Send every logger's records to `stream` (stderr by default) as JSON lines, or as text for people."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    if log_format == "json":
        formatter: logging.Formatter = JsonFormatter()
    else:
        formatter = logging.Formatter(TEXT_FORMAT)
        formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # kopf logs "Handler ... succeeded." at INFO for every watch event it hands over: a line per status
    # write, four thousand for a thousand VMs starting, that say nothing the operator's own lines do not.
    # Its warnings and errors (a handler that failed) still come through, and at DEBUG everything does.
    numeric = logging.getLevelName(level) if isinstance(level, str) else level
    quiet = isinstance(numeric, int) and numeric > logging.DEBUG
    logging.getLogger("kopf.objects").setLevel(max(logging.WARNING, numeric) if quiet else logging.NOTSET)


class VmLogger(logging.LoggerAdapter[logging.Logger]):
    """A logger for one VM: every line carries the adapter's fields, and the call's `extra` on top of them."""

    def __init__(self, logger: logging.Logger, extra: Mapping[str, object]) -> None:
        super().__init__(logger, extra)

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        return msg, kwargs


def vm_logger(namespace: str, name: str, domain: str, logger: logging.Logger | None = None) -> VmLogger:
    """The logger of the VM namespace/name, whose libvirt domain is `domain`: its lines carry `vm` and `domain`.

    Log through it with `extra={"reason": ...}` (or any other field): the call's fields are added to the line.
    """
    return VmLogger(logger or logging.getLogger("vmop.operator"), {"vm": f"{namespace}/{name}", "domain": domain})
