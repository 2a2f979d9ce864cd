"""The tamper-evident audit log: records, chain hashing, LMDB store, writer.

The contract the pipeline depends on is ``AuditSink``: append one record
(with the state it changes) and learn where it landed. ``AuditWriter`` over
an ``AuditStore`` is the one the daemon runs.

Modules: ``record`` (the record and typed values), ``chain`` (canonical
bytes, hashing, the verification walk), ``store`` (LMDB), ``writer`` (the
group-commit thread), ``verify`` (checking a log on disk).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

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
    "ProblemKind",
    "RecordKind",
    "RefusingSink",
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

    async def append_all(
        self,
        records: Iterable[AuditRecordV1],
        state_changes: Iterable[StateChange] = (),
    ) -> list[Appended]:
        """Commit all the records in one transaction, or raise
        ``AuditUnavailable`` with none of them committed."""
        ...

    async def close(self) -> None:
        """Commit what is pending; later appends raise ``AuditUnavailable``."""
        ...


class RefusingSink:
    """An ``AuditSink`` for a log that cannot be written: refuses every record.

    The daemon runs on it while the log is unavailable, so each request is
    answered ``audit_unavailable`` with the reason, never decided unlogged.
    """

    def __init__(self, reason: AuditUnavailable):
        self._reason = reason

    async def append(
        self, record: AuditRecordV1, state_changes: Iterable[StateChange] = ()
    ) -> Appended:
        raise AuditUnavailable(str(self._reason))

    async def append_all(
        self,
        records: Iterable[AuditRecordV1],
        state_changes: Iterable[StateChange] = (),
    ) -> list[Appended]:
        raise AuditUnavailable(str(self._reason))

    async def close(self) -> None:
        return None
