"""One line per event: ``key=value`` text by default, JSON objects with ``--log-json``."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any


class _EventFormatter(logging.Formatter):
    def __init__(self, as_json: bool) -> None:
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        if self.as_json:
            obj = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                   "logger": record.name, "event": record.getMessage(), **fields}
            return json.dumps(obj, default=str, separators=(",", ":"))
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        kv = " ".join(f"{k}={_fmt(v)}" for k, v in fields.items())
        return f"{stamp} {record.levelname.lower():5} {record.name} {record.getMessage()}" + (f" {kv}" if kv else "")


def _fmt(v: Any) -> str:
    s = str(v)
    return json.dumps(s) if (" " in s or not s) else s


def setup_logging(as_json: bool = False, level: int = logging.INFO, stream: Any = None) -> None:
    """Configure the root logger for the daemons and the CLI."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_EventFormatter(as_json))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aio_pika").setLevel(logging.WARNING)
    logging.getLogger("aiormq").setLevel(logging.WARNING)


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event with structured fields."""
    logger.log(level, name, extra={"fields": fields})
