"""The rows of the log's ``limits`` database: one per decision a limit
counted, derived from the decision record alone.

A decision record's ``limits`` entries that say ``counted`` are the whole
truth about what limits counted; a row repeats one of them in a form that
can be read by (limit, time) without decoding records: the pipeline writes
the rows of a record in the transaction that appends it (``rows_of``), the
limit book reads them back at start, retention deletes them with their
record, and ``verify`` recomputes them from the records and compares.

A row's key is the limit name, NUL, the decision's instant (8 bytes,
big-endian nanoseconds since the epoch), the first 16 bytes of SHA-256 of
the key text, and the decision id, so a window is one range read and the
key stays within LMDB's 511 bytes whatever the key text's length. The
value is canonical JSON: ``{"amount": <encode_value form>, "definition":
<the limit's definition digest>, "key": text}``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any, NamedTuple

import msgspec

from kynara_sidecar.audit.record import (
    AuditRecordV1,
    LimitEntry,
    decode_value,
    encode_value,
    parse_timestamp,
)

__all__ = [
    "LIMITS_DB",
    "Row",
    "counted_entries",
    "decode_row",
    "row_key",
    "row_prefix",
    "row_value",
    "rows_of",
]

LIMITS_DB = b"limits"

_TIME_SIZE = 8
_KEY_DIGEST_SIZE = 16


class Row(NamedTuple):
    """One counted decision as its row holds it."""

    limit: str
    time_nanos: int
    key: str
    amount: int | float
    decision_id: str
    # The limit's definition digest when it counted (LimitEntry.definition).
    definition: str = ""


class _Value(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True
):
    amount: dict[str, Any]
    key: str
    definition: str = ""


_ENCODER = msgspec.json.Encoder(order="sorted")
_DECODER = msgspec.json.Decoder(_Value)


def row_prefix(limit: str, time_nanos: int = 0) -> bytes:
    """Where the rows of ``limit`` at or after ``time_nanos`` begin."""
    return limit.encode() + b"\x00" + max(time_nanos, 0).to_bytes(_TIME_SIZE, "big")


def row_key(limit: str, time_nanos: int, key: str, decision_id: str) -> bytes:
    """The LMDB key of the row of ``decision_id`` counted by ``limit`` for
    ``key`` at ``time_nanos``: rows of one limit sort by time, and the key
    text is only digested, so any key text fits (see the module's note)."""
    digest = hashlib.sha256(key.encode()).digest()[:_KEY_DIGEST_SIZE]
    return row_prefix(limit, time_nanos) + digest + decision_id.encode()


def row_value(key: str, amount: int | float, definition: str = "") -> bytes:
    """The row's value: canonical JSON of the key text (which its key holds
    only as a digest), the amount counted and the limit's definition
    digest, so a row reads back whole (``decode_row``)."""
    return _ENCODER.encode(
        _Value(amount=encode_value(amount), key=key, definition=definition)
    )


def decode_row(raw_key: bytes, raw_value: bytes) -> Row:
    """A row read back.

    Raises:
        ValueError: the key or value is not a row's.
    """
    name, sep, rest = raw_key.partition(b"\x00")
    if not sep or len(rest) < _TIME_SIZE + _KEY_DIGEST_SIZE:
        raise ValueError(f"expected a limits row key, got {raw_key[:48]!r}")
    try:
        value = _DECODER.decode(raw_value)
        amount = decode_value(value.amount)
    except (msgspec.DecodeError, TypeError, ValueError) as err:
        raise ValueError(f"limits row {raw_key[:48]!r}: {err}") from None
    if isinstance(amount, bool) or not isinstance(amount, int | float):
        raise ValueError(f"limits row {raw_key[:48]!r}: amount is not a number")
    return Row(
        limit=name.decode(),
        time_nanos=int.from_bytes(rest[:_TIME_SIZE], "big"),
        key=value.key,
        amount=amount,
        decision_id=rest[_TIME_SIZE + _KEY_DIGEST_SIZE :].decode(),
        definition=value.definition,
    )


def counted_entries(record: AuditRecordV1) -> Iterator[tuple[str, LimitEntry]]:
    """``(name, entry)`` of every limit that counted this record's decision."""
    for name, entry in record.limits.items():
        if entry.counted:
            yield name, entry


def rows_of(record: AuditRecordV1) -> list[tuple[bytes, bytes]]:
    """The ``(key, value)`` rows a decision record's counted limits make.

    Raises:
        ValueError: the record's time or an amount is malformed.
    """
    if not record.limits:
        return []
    nanos = parse_timestamp(record.time).to_nanos()
    rows = []
    for name, entry in counted_entries(record):
        if entry.amount is None:
            raise ValueError(f"limit {name!r} counted the decision with no amount")
        amount = decode_value(entry.amount)
        rows.append(
            (
                row_key(name, nanos, entry.key, record.decision_id),
                row_value(entry.key, amount, entry.definition),
            )
        )
    return rows
