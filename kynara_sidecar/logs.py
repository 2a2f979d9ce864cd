"""Structured logs: one line a record, fixed field names, JSON or text.

Each component logs through its own named logger (``kynara.server``,
``kynara.audit``, ``kynara.policy``, ``kynara.daemon``) with short verb-phrase
messages; details go in ``extra={"fields": {...}}``, the error in an
``error`` field rather than in the message.

Every line carries the fixed fields ``time``, ``level``, ``logger``,
``msg``, ``component`` (the second part of the logger's name, ``server`` for
``kynara.server``, unless the line names its own) and, once the daemon set
it, ``daemon_id``; lines of the ``policy`` component also carry the active
``policy_revision``. The same fields go out as a JSON object (the default)
or as text: ``time level logger msg key=value ...``, with a value quoted
(as a JSON string) when it is empty or holds a space, ``=`` or a quote.

Level and format can change while the daemon runs (``set_level``,
``set_format``: a SIGHUP that reloads ``log.level`` or ``log.format``).
"""

from __future__ import annotations

import logging
import re
import sys
import time
import typing

import msgspec

__all__ = [
    "LIBRARY_LOGGERS",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "JsonFormatter",
    "TextFormatter",
    "configure_logging",
    "set_context",
    "set_format",
    "set_level",
]

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "text")
# Libraries the daemon runs that log on their own: the MCP SDK (the
# gateway's upstream connections and agent sessions), uvicorn (the
# gateway's HTTP listener) and aiohttp (the daemon's and the collector's HTTP
# listeners), asyncio (the event loop's own complaints) and the NATS client
# (the central store). Their lines go out in the daemon's format too, at
# WARNING or the daemon's level if higher, or at debug with it: at INFO they
# narrate every request. Unrouted, a warning of theirs would reach stderr
# as a bare line through logging's last-resort handler.
LIBRARY_LOGGERS = ("mcp", "uvicorn", "aiohttp", "asyncio", "nats")
# What asyncio warns each time a peer closes a TLS connection whose
# protocol asks to stay half open, as the NATS client's does: nothing was
# lost, so the line goes out at debug only (_NoiseFilter).
_ASYNCIO_SSL_EOF = "returning true from eof_received() has no effect when using ssl"

# Fields every line of this process carries once known (daemon_id), and the
# active policy revision for lines of the policy component.
_context: dict[str, str] = {}
# The one handler the kynara and library loggers share (configure_logging).
_handler: logging.Handler | None = None
_BARE = re.compile(r'[^\s="\\]+')


def set_context(**fields: str) -> None:
    """Set process-wide fields: ``daemon_id`` (every line) and
    ``policy_revision`` (lines of the policy component); an empty value
    removes the field."""
    for key, value in fields.items():
        if value:
            _context[key] = value
        else:
            _context.pop(key, None)


def _component(logger: str) -> str:
    parts = logger.split(".")
    return parts[1] if parts[0] == "kynara" and len(parts) > 1 else parts[0]


def _time(record: logging.LogRecord) -> str:
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        + f".{int(record.msecs):03d}Z"
    )


class JsonFormatter(logging.Formatter):
    """One JSON object a line: the fixed fields, then the line's own."""

    def entry(self, record: logging.LogRecord) -> dict[str, typing.Any]:
        """The line's fields in order: fixed ones first, then the record's
        (which may replace ``component``), then the error of an exception."""
        fields = getattr(record, "fields", None) or {}
        entry: dict[str, typing.Any] = {
            "time": _time(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "component": fields.get("component") or _component(record.name),
        }
        if "daemon_id" in _context:
            entry["daemon_id"] = _context["daemon_id"]
        if entry["component"] == "policy" and "policy_revision" in _context:
            entry["policy_revision"] = _context["policy_revision"]
        entry.update(fields)
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return entry

    def format(self, record: logging.LogRecord) -> str:
        return msgspec.json.encode(self.entry(record), enc_hook=str).decode()


def _text_value(value: object) -> str:
    if isinstance(value, str):
        return value if _BARE.fullmatch(value) else msgspec.json.encode(value).decode()
    return msgspec.json.encode(value, enc_hook=str).decode()


class TextFormatter(JsonFormatter):
    """``time level logger msg key=value ...`` a line, the same fields as
    JSON; a value that needs it is quoted as a JSON string, so a traceback
    stays on its line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = self.entry(record)
        head = [entry.pop(key) for key in ("time", "level", "logger", "msg")]
        parts = [*head[:3], _text_value(head[3])]
        parts += [f"{key}={_text_value(value)}" for key, value in entry.items()]
        return " ".join(parts)


_FORMATTERS: dict[str, type[logging.Formatter]] = {
    "json": JsonFormatter,
    "text": TextFormatter,
}


def set_level(level: str) -> None:
    """The ``kynara`` loggers at ``level``; the ``LIBRARY_LOGGERS`` at
    WARNING or ``level``, whichever is higher (``level`` itself when it is
    debug)."""
    wanted = logging.getLevelName(str(level).upper())
    if not isinstance(wanted, int):
        raise ValueError(f"log level: expected one of {LOG_LEVELS}, got {level!r}")
    library_level = wanted if wanted == logging.DEBUG else max(wanted, logging.WARNING)
    logging.getLogger("kynara").setLevel(wanted)
    for library in LIBRARY_LOGGERS:
        logging.getLogger(library).setLevel(library_level)


def set_format(fmt: str) -> None:
    """Write the lines as ``json`` or ``text`` from now on."""
    try:
        formatter = _FORMATTERS[str(fmt)]()
    except KeyError:
        raise ValueError(
            f"log format: expected one of {LOG_FORMATS}, got {fmt!r}"
        ) from None
    if _handler is not None:
        _handler.setFormatter(formatter)


class _BadRequestFilter(logging.Filter):
    """Rewrite aiohttp's record of a request it could not parse into one
    short debug line: the error's type and the status answered.

    aiohttp logs each such request at error with the parser's exception,
    whose text quotes the request's bytes (a header line with a bearer
    secret, say) and a traceback. The 400 it answers is the whole story,
    and a peer that needs no credential to send one must not be able to
    fill the log at warning: the line is kept only when the library
    loggers are at debug.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if record.name != "aiohttp.server" or error is None:
            return True
        from aiohttp.http_exceptions import HttpProcessingError

        if not isinstance(error, HttpProcessingError):
            return True
        if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.msg, record.args = "HTTP request refused: not parsed", ()
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        record.fields = {
            "error_type": type(error).__name__,
            "status": error.code,
        }
        return True


class _NoiseFilter(logging.Filter):
    """Demote asyncio's warning about ``eof_received`` under TLS to debug
    (kept only when the library loggers are at debug): it comes whenever
    a TLS connection to the NATS server closes and asks nothing of the
    operator."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "asyncio" or record.msg != _ASYNCIO_SSL_EOF:
            return True
        if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    """Send the ``kynara`` and library loggers to stderr, one line a record
    in ``fmt`` (json or text), at ``level`` (see ``set_level``)."""
    global _handler
    _handler = logging.StreamHandler(sys.stderr)
    _handler.addFilter(_BadRequestFilter())
    _handler.addFilter(_NoiseFilter())
    set_format(fmt)
    for name in ("kynara", *LIBRARY_LOGGERS):
        logger = logging.getLogger(name)
        logger.handlers[:] = [_handler]
        logger.propagate = False
    set_level(level)
