"""Structured logs: one JSON object a line, fixed field names.

Each component logs through its own named logger (``kynara.server``,
``kynara.audit``, ``kynara.policy``, ``kynara.daemon``) with short verb-phrase
messages; details go in ``extra={"fields": {...}}``, the error in an
``error`` field rather than in the message.
"""

from __future__ import annotations

import logging
import sys
import time

import msgspec

__all__ = ["LOG_LEVELS", "JsonFormatter", "configure_logging"]

LOG_LEVELS = ("debug", "info", "warning", "error")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return msgspec.json.encode(entry, enc_hook=str).decode()


def configure_logging(level: str = "info") -> None:
    """Send the ``kynara`` loggers to stderr as JSON lines at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("kynara")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
