"""Verify an audit log on disk: the check behind ``kynara-sidecar verify``.

Opens the log read-only (no writer lock, LMDB's reader table), so it works
on a log a running daemon is appending to: it checks the snapshot it sees.
"""

from __future__ import annotations

import contextlib
import os

from kynara_sidecar.audit.chain import ChainProblem, VerifyReport, verify_chain
from kynara_sidecar.audit.store import AuditStore

__all__ = ["ChainProblem", "VerifyReport", "format_report", "verify_log"]


def verify_log(path: str | os.PathLike[str]) -> VerifyReport:
    """Walk the whole log at ``path`` and report its first problem.

    Args:
        path: the log's directory (``audit.path``).

    Returns:
        The report; ``report.ok`` is true when every record and the head
        check out.

    Raises:
        AuditUnavailable: there is no audit log at ``path``, or it cannot be
            opened (its format version is unknown, say).
    """
    store = AuditStore.open(path, readonly=True)
    try:
        # TODO(#5): also check the decisions index and the Merkle checkpoints
        # against the witness copy; a log cannot vouch for its own tail.
        with contextlib.closing(store.iter_records()) as records:
            return verify_chain(records, store.stored_head())
    finally:
        store.close()


def format_report(report: VerifyReport) -> str:
    """One line for people: ``ok: 42 records, head 42 <hash>`` or
    ``record 7: edited: <why>``."""
    if report.problem is None:
        return (
            f"ok: {report.records} records, head {report.head_seq} "
            f"{report.head_hash.hex()}"
        )
    problem = report.problem
    return f"record {problem.seq}: {problem.kind}: {problem.message}"
