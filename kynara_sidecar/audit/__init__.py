"""The tamper-evident audit log: records, chain hashing, LMDB store, writer.

The contract the pipeline depends on is ``AuditSink``: append one record
(with the state it changes) and learn where it landed. ``AuditWriter`` over
an ``AuditStore`` is the real one; ``MemoryAuditSink`` keeps the same chain
in memory for tests and tools that need no disk.

Modules: ``record`` (the record and typed values), ``chain`` (canonical
bytes, hashing, the verification walk), ``store`` (LMDB), ``writer`` (the
group-commit thread), ``verify`` (checking a log on disk).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import msgspec

from kynara_sidecar.audit.chain import (
    GENESIS_HASH,
    ChainProblem,
    ProblemKind,
    VerifyReport,
    chain_hash,
    decode_record,
    encode_record,
    verify_chain,
)
from kynara_sidecar.audit.record import (
    RECORD_VERSION,
    AuditRecordV1,
    RecordKind,
    decode_value,
    encode_value,
    marker_record,
    record_from_decision,
)
from kynara_sidecar.audit.store import Appended, AuditStore, StateChange
from kynara_sidecar.audit.verify import format_report, verify_log
from kynara_sidecar.audit.writer import AuditWriter
from kynara_sidecar.errors import AuditUnavailable

__all__ = [
    "GENESIS_HASH",
    "RECORD_VERSION",
    "Appended",
    "AuditRecordV1",
    "AuditSink",
    "AuditStore",
    "AuditWriter",
    "ChainProblem",
    "MemoryAuditSink",
    "ProblemKind",
    "RecordKind",
    "StateChange",
    "VerifyReport",
    "chain_hash",
    "decode_record",
    "decode_value",
    "encode_record",
    "encode_value",
    "format_report",
    "marker_record",
    "record_from_decision",
    "verify_chain",
    "verify_log",
]


class AuditSink(Protocol):
    """Where the pipeline appends audit records."""

    async def append(
        self, record: AuditRecordV1, state_changes: Iterable[StateChange] = ()
    ) -> Appended:
        """Commit the record and its state changes together, or raise
        ``AuditUnavailable`` with neither committed."""
        ...

    async def close(self) -> None:
        """Commit what is pending; later appends raise ``AuditUnavailable``."""
        ...


class MemoryAuditSink:
    """An ``AuditSink`` that chains records in memory; nothing survives it.

    ``appended`` holds every record as stored; ``state`` the extra databases
    as ``{(db, key): value}``.
    """

    def __init__(self) -> None:
        self.appended: list[Appended] = []
        self.state: dict[tuple[bytes, bytes], bytes] = {}
        self._closed = False

    async def append(
        self, record: AuditRecordV1, state_changes: Iterable[StateChange] = ()
    ) -> Appended:
        if self._closed:
            raise AuditUnavailable("memory audit sink is closed")
        seq = len(self.appended) + 1
        prev = self.appended[-1].chain_hash if self.appended else GENESIS_HASH
        data = encode_record(msgspec.structs.replace(record, seq=seq))
        result = Appended(seq, chain_hash(prev, data), data)
        self.appended.append(result)
        for db, key, value in state_changes:
            if value is None:
                self.state.pop((db, key), None)
            else:
                self.state[(db, key)] = value
        return result

    async def close(self) -> None:
        self._closed = True
