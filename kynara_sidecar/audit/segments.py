"""Sealed segments on the wire: ``kynara.v1.Segment`` messages.

One encoding, two doors: the admin ``AuditService.StreamSegments`` (pulled
by an operator or the collector) and the shipper (``sync.shipper``, pushed
to the central store) both send what ``segment_message`` builds, so the
collector reads either alike.

A sealed segment is the records ``(previous_tree_size, tree_size]`` of one
checkpoint. It travels as one message, or as several when its records are
too many bytes for one: each message carries the segment's checkpoint (its
stored JSON bytes and the fields parsed alongside), ``previous_tree_size``,
its own ``first_seq`` and as many records as fit the byte budget (always at
least one, so a record larger than the budget still moves a reader on). The
segment is complete with the message whose last record is the checkpoint's
tree size.

NOTE: the budget is checked after each record (``prove.read_records``), so
a message may carry up to one record past it; the callers' budgets leave
room for the largest record the agent listener accepts.
"""

from __future__ import annotations

from kynara.v1 import audit_pb2 as pb

from kynara_sidecar.audit import prove
from kynara_sidecar.audit.checkpoint import CheckpointV1, encode_checkpoint
from kynara_sidecar.audit.store import AuditStore

__all__ = ["checkpoint_to_proto", "segment_message"]


def checkpoint_to_proto(checkpoint: CheckpointV1) -> pb.Checkpoint:
    """The checkpoint's stored JSON bytes, with its fields parsed alongside."""
    return pb.Checkpoint(
        json=encode_checkpoint(checkpoint),
        kind=str(checkpoint.kind),
        origin=checkpoint.origin,
        log_id=checkpoint.log_id,
        tree_size=checkpoint.tree_size,
        root=bytes.fromhex(checkpoint.root),
        chain_hash=bytes.fromhex(checkpoint.chain_hash),
        time=checkpoint.time,
        key_id=checkpoint.key_id,
    )


def segment_message(
    store: AuditStore,
    span: prove.SegmentSpan,
    first_seq: int,
    max_bytes: int,
    *,
    checkpoint: pb.Checkpoint | None = None,
) -> pb.Segment:
    """The message of ``span`` that starts at record ``first_seq``.

    Reads the store (blocking: call it off the event loop). The next
    message starts at ``first_seq + len(message.records)``; the segment is
    done once that is past ``span.checkpoint.tree_size``.

    Args:
        store: the audit log.
        span: the sealed segment (``prove.sealed_segments``).
        first_seq: the first record this message carries, in
            ``span.previous_tree_size + 1 .. span.checkpoint.tree_size``.
        max_bytes: the records' byte budget for this message.
        checkpoint: ``checkpoint_to_proto(span.checkpoint)``, when the caller
            already built it for an earlier message of the span.

    Raises:
        ValueError: ``first_seq`` is outside the span.
        Pruned: a record of the span was pruned meanwhile.
        ServiceError: a record is missing though not pruned (damage).
    """
    last = span.checkpoint.tree_size
    if not span.previous_tree_size < first_seq <= last:
        raise ValueError(
            f"first_seq must be in {span.previous_tree_size + 1}..{last} (the "
            f"segment's records), got {first_seq}"
        )
    records = prove.read_records(store, first_seq, last, max_bytes)
    return pb.Segment(
        checkpoint=checkpoint or checkpoint_to_proto(span.checkpoint),
        previous_tree_size=span.previous_tree_size,
        first_seq=first_seq,
        records=records,
    )
