"""Helpers for the collector tests: real signed logs and the segment
messages a daemon would ship or serve for them."""

from __future__ import annotations

import pathlib
import shutil

from audit._evidence import ORIGIN, SealedLog, sign, write_sealed_log
from audit._support import make_record
from kynara.v1 import audit_pb2 as pb

from kynara_sidecar.audit import prove
from kynara_sidecar.audit.keys import SigningKey
from kynara_sidecar.audit.segments import segment_message
from kynara_sidecar.audit.store import AuditStore
from kynara_sidecar.collector.verifier import SegmentData

__all__ = [
    "ORIGIN",
    "append_sealed",
    "messages_of",
    "restore_copy",
    "segment_data",
    "segments_of",
    "write_log",
    "write_log_of",
]


def write_log(
    path: pathlib.Path, count: int, *, segment: int = 4, key: SigningKey | None = None
) -> SealedLog:
    """A log of ``count`` records of ORIGIN, sealed every ``segment``
    records (batches of 2), no head: a daemon still running."""
    return write_sealed_log(path, count, segment=segment, key=key, head=False)


class _LogOf(SealedLog):
    """A SealedLog whose checkpoints name ``origin`` (not ORIGIN)."""

    def __init__(self, path: pathlib.Path, key: SigningKey, origin: str):
        super().__init__(path, key, None)
        self.origin = origin

    def append(self, records, *, store: AuditStore, seal: bool, key=None) -> None:
        def sealer(size: int, root: bytes, chain: bytes):
            cp = sign(
                key or self.key, size, root, chain, origin=self.origin,
                log_id=self.log_id,
            )  # fmt: skip
            self.checkpoints.append(cp.tree_size)
            return cp

        store.append_batch(records, seal=sealer if seal else None)


def write_log_of(
    path: pathlib.Path, origin: str, count: int, key: SigningKey, *, segment: int = 4
) -> SealedLog:
    """A log of ``count`` records whose checkpoints name ``origin``, sealed
    every ``segment`` records, signed with ``key`` (a daemon of a family
    sharing one key)."""
    log = _LogOf(path, key, origin)
    store = AuditStore.open(path)
    try:
        log.log_id = store.log_id
        for first in range(1, count + 1, segment):
            last = min(first + segment - 1, count)
            records = [make_record(n) for n in range(first, last + 1)]
            log.append(records, store=store, seal=True)
    finally:
        store.close()
    return log


def append_sealed(log: SealedLog, first: int, count: int, *, tag: str = "") -> None:
    """Append ``count`` records (content from ``first``, varied by ``tag``)
    and seal them as one segment."""
    store = AuditStore.open(log.path)
    try:
        records = [
            make_record(n, reason=f"{tag}rule {n}") for n in range(first, first + count)
        ]
        log.append(records, store=store, seal=True)
    finally:
        store.close()


def messages_of(
    path: pathlib.Path, after: int = 0, max_bytes: int = 1 << 20
) -> list[pb.Segment]:
    """The messages of every sealed segment after ``after``, as
    StreamSegments and the shipper send them (``audit.segments``)."""
    store = AuditStore.open(path, readonly=True)
    try:
        out = []
        for span in prove.sealed_segments(store, after):
            first = span.previous_tree_size + 1
            while first <= span.checkpoint.tree_size:
                message = segment_message(store, span, first, max_bytes)
                out.append(message)
                first += len(message.records)
        return out
    finally:
        store.close()


def segment_data(message: pb.Segment) -> SegmentData:
    return SegmentData(
        message.checkpoint.json,
        message.previous_tree_size,
        message.first_seq,
        list(message.records),
    )


def segments_of(path: pathlib.Path, after: int = 0) -> list[SegmentData]:
    """Each sealed segment after ``after`` whole."""
    return [segment_data(m) for m in messages_of(path, after)]


def restore_copy(copy: pathlib.Path, path: pathlib.Path) -> None:
    """Put an earlier copy of a log's LMDB directory back in place."""
    shutil.rmtree(path)
    shutil.copytree(copy, path)
