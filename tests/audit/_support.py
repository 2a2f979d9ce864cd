"""Helpers for the audit tests: records, and raw access to tamper with a log."""

from __future__ import annotations

import lmdb

from kynara_sidecar.audit.record import RECORD_VERSION, AuditRecordV1, RecordKind

__all__ = ["RawLog", "make_record", "seq_key"]


def make_record(n: int, *, reason: str = "") -> AuditRecordV1:
    """A small decision record whose content depends on ``n``."""
    return AuditRecordV1(
        v=RECORD_VERSION,
        kind=RecordKind.DECISION,
        time=f"2026-12-04T09:00:{n % 60:02d}.{n:09d}Z",
        daemon_id="daemon-a",
        decision_id=f"dec-{n}",
        action="payments.refund.issue",
        context={"amount": {"int": str(n)}},
        decision="allow",
        reason=reason or f"rule {n} allowed",
    )


class RawLog:
    """Direct LMDB access to a closed log, to tamper with it as an attacker."""

    NAMES = (b"records", b"chain", b"decisions", b"meta", b"nodes", b"checkpoints")

    def __init__(self, path):
        self.env = lmdb.open(str(path), max_dbs=10)
        self.dbs = {name: self.env.open_db(name) for name in self.NAMES}

    def get(self, db: bytes, key: bytes) -> bytes | None:
        with self.env.begin() as txn:
            value = txn.get(key, db=self.dbs[db])
        return None if value is None else bytes(value)

    def put(self, db: bytes, key: bytes, value: bytes) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(key, value, db=self.dbs[db])

    def delete(self, db: bytes, key: bytes) -> None:
        with self.env.begin(write=True) as txn:
            assert txn.delete(key, db=self.dbs[db]), (db, key)

    def close(self) -> None:
        self.env.close()


def seq_key(seq: int) -> bytes:
    return seq.to_bytes(8, "big")
