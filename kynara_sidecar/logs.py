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

__all__ = ["LIBRARY_LOGGERS", "LOG_LEVELS", "JsonFormatter", "configure_logging"]

LOG_LEVELS = ("debug", "info", "warning", "error")
# Libraries the daemon runs that log on their own: the MCP SDK (the
# gateway's upstream connections and agent sessions) and uvicorn (the
# gateway's HTTP listener). Their lines go out as JSON too, at WARNING or
# the daemon's level if higher, or at debug with it: at INFO they narrate
# every request.
LIBRARY_LOGGERS = ("mcp", "uvicorn")


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
    """Send the ``kynara`` loggers to stderr as JSON lines at ``level``, and
    the ``LIBRARY_LOGGERS`` at WARNING or ``level``, whichever is higher
    (``level`` itself when it is debug)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    wanted = logging.getLevelName(level.upper())
    library_level = wanted if wanted == logging.DEBUG else max(wanted, logging.WARNING)
    for name, at in [("kynara", wanted)] + [
        (library, library_level) for library in LIBRARY_LOGGERS
    ]:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(at)
        logger.propagate = False
