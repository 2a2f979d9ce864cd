"""Proofs from the audit log: what ``kynara-sidecar prove`` prints and the
admin listener's AuditService serves. Both call these functions, so both
give the same answer.

Theory of operation
-------------------
The log is one RFC 9162 Merkle tree over every record in sequence order
(record n is leaf n - 1), and a signed checkpoint fixes its root at the end
of each sealed segment (``merkle``, ``checkpoint``). Every proof here is
given against a checkpoint, never against an unsigned root: a verifier who
trusts the daemon's key then needs nothing from the daemon but the proof.

- **record**: the record's exact stored bytes, its leaf index and the
  inclusion proof against a checkpoint at or after it (the latest one by
  default). A record after the latest checkpoint has no proof yet; asking
  for one fails with ``not_checkpointed`` rather than proving against the
  unsigned head, which would prove only what the daemon says today.
- **consistency**: two checkpoints and the proof that the later tree only
  appended to the earlier one.
- **segments**: the sealed segments after a cursor, each its checkpoint and
  the tree size before it; ``read_records`` reads a run of their records.

Merkle nodes and checkpoints outlive pruning (the seam), so consistency
proofs reach across it; a pruned record, though, is gone and answers
``pruned``.

Every proof is checked with ``merkle.verify_inclusion`` /
``verify_consistency`` against its checkpoint's root before it is returned,
so a damaged store yields an error naming ``verify``, never a proof that
does not hold.

The ``*_json`` functions give the JSON ``prove`` prints: hashes as lowercase
hex, the record as its exact JSON text, checkpoints as their JSON objects
(re-encoding one with sorted keys and no spaces gives its stored bytes).
Check a record with::

    verify_inclusion(leaf_hash(out["record"].encode()), out["leaf_index"],
                     out["checkpoint"]["tree_size"],
                     [bytes.fromhex(h) for h in out["inclusion_proof"]],
                     bytes.fromhex(out["checkpoint"]["root"]))

This is a read-only shell over ``AuditStore``: it never writes, and works on
a store opened read-only beside a running daemon.
"""

from __future__ import annotations

from typing import Any

import msgspec

from kynara_sidecar.audit import merkle
from kynara_sidecar.audit.checkpoint import CheckpointV1, encode_checkpoint
from kynara_sidecar.audit.store import AuditStore
from kynara_sidecar.errors import (
    InvalidRequest,
    NotCheckpointed,
    NotFound,
    Pruned,
    ServiceError,
)

__all__ = [
    "HeadView",
    "ConsistencyProof",
    "RecordProof",
    "SegmentSpan",
    "consistency_json",
    "head_json",
    "prove_consistency",
    "prove_head",
    "prove_record",
    "read_records",
    "record_json",
    "sealed_segments",
]


class HeadView(msgspec.Struct, frozen=True, kw_only=True):
    """How far the log has grown and what of it is signed."""

    log_id: str
    # Records in the log now (the head's seq).
    tree_size: int
    # Records 1..seam were pruned (0: none).
    seam: int
    # The latest checkpoint; None before the first segment is sealed.
    checkpoint: CheckpointV1 | None


class RecordProof(msgspec.Struct, frozen=True, kw_only=True):
    """One record and its inclusion proof against a checkpoint."""

    seq: int
    # The record exactly as stored and hashed.
    record: bytes
    inclusion_proof: list[bytes]
    checkpoint: CheckpointV1

    @property
    def leaf_index(self) -> int:
        return self.seq - 1


class ConsistencyProof(msgspec.Struct, frozen=True, kw_only=True):
    """Two checkpoints and the proof the later tree extends the earlier."""

    old_checkpoint: CheckpointV1
    new_checkpoint: CheckpointV1
    proof: list[bytes]


class SegmentSpan(msgspec.Struct, frozen=True, kw_only=True):
    """A sealed segment: records (previous_tree_size, checkpoint.tree_size]."""

    checkpoint: CheckpointV1
    previous_tree_size: int


def _damaged(store: AuditStore, what: str) -> ServiceError:
    return ServiceError(
        f"audit log {store.path}: {what}: the log is damaged; run "
        f"`kynara-sidecar verify --audit {store.path}`"
    )


def prove_head(store: AuditStore) -> HeadView:
    """Return the log's size, seam and latest checkpoint."""
    return HeadView(
        log_id=store.log_id,
        tree_size=store.head().seq,
        seam=store.seam(),
        checkpoint=store.latest_checkpoint(),
    )


def _checkpoint_at(store: AuditStore, tree_size: int, field: str) -> CheckpointV1:
    """The checkpoint of exactly ``tree_size``, or the error saying why not."""
    found = store.checkpoint(tree_size)
    if found is not None:
        return found
    latest = store.latest_checkpoint()
    if latest is None or tree_size > latest.tree_size:
        signed = f"the latest is at {latest.tree_size}" if latest else "none yet"
        raise NotCheckpointed(
            f"no checkpoint at tree size {tree_size} yet ({signed}); one is "
            "signed when a segment is sealed",
            field=field,
        )
    following = next(store.iter_checkpoints(after=tree_size), None)
    hint = f"; the next is at {following.tree_size}" if following else ""
    raise NotFound(
        f"expected the tree size of a checkpoint, got {tree_size}{hint}",
        field=field,
    )


def _find_seq(store: AuditStore, seq: int, decision_id: str) -> tuple[int, str]:
    """The record's seq and the request field that named it."""
    if decision_id:
        found = store.find_decision(decision_id)
        if found is None:
            seam = store.seam()
            pruned = f" (records 1..{seam} were pruned with their ids)" if seam else ""
            raise NotFound(
                f"no decision record has id {decision_id!r}{pruned}",
                field="decision_id",
            )
        return found, "decision_id"
    if seq < 1:
        raise InvalidRequest(
            f"expected a record by seq (from 1) or decision_id, got seq {seq}",
            field="seq",
        )
    return seq, "seq"


def prove_record(
    store: AuditStore, *, seq: int = 0, decision_id: str = "", tree_size: int = 0
) -> RecordProof:
    """Return a record and its inclusion proof against a checkpoint.

    Args:
        store: the audit log.
        seq: the record's sequence number; or
        decision_id: the id of its decision (takes precedence over ``seq``).
        tree_size: a checkpoint's tree size to prove against; 0 means the
            latest checkpoint.

    Raises:
        InvalidRequest: neither seq nor decision_id, or a tree size below
            the record.
        NotFound: no such record, decision id or checkpoint.
        Pruned: the record was pruned.
        NotCheckpointed: no checkpoint covers the record (or has that size)
            yet.
        ServiceError: the stored proof does not hold (a damaged log).
        AuditUnavailable: a Merkle node is missing.
    """
    seq, field = _find_seq(store, seq, decision_id)
    size = store.head().seq
    if seq > size:
        raise NotFound(f"no record {seq}: the log holds records 1..{size}", field=field)
    _check_not_pruned(store, seq, field)
    checkpoint = _covering_checkpoint(store, seq, tree_size, field)
    stored = store.get(seq)
    if stored is None:
        _check_not_pruned(store, seq, field)
        raise _damaged(store, f"record {seq} is missing though not pruned")
    proof = store.inclusion_proof(seq, checkpoint.tree_size)
    root = bytes.fromhex(checkpoint.root)
    leaf = merkle.leaf_hash(stored.record_bytes)
    if not merkle.verify_inclusion(leaf, seq - 1, checkpoint.tree_size, proof, root):
        raise _damaged(
            store,
            f"record {seq} does not prove against the checkpoint at tree size "
            f"{checkpoint.tree_size}",
        )
    return RecordProof(
        seq=seq,
        record=stored.record_bytes,
        inclusion_proof=proof,
        checkpoint=checkpoint,
    )


def _check_not_pruned(store: AuditStore, seq: int, field: str) -> None:
    seam = store.seam()
    if seq <= seam:
        raise Pruned(
            f"record {seq} was pruned: records 1..{seam} are gone (the seam); "
            "their checkpoints and consistency proofs remain",
            field=field,
        )


def _covering_checkpoint(
    store: AuditStore, seq: int, tree_size: int, field: str
) -> CheckpointV1:
    if tree_size:
        if tree_size < seq:
            raise InvalidRequest(
                f"expected a tree size of at least the record's seq {seq}, "
                f"got {tree_size}",
                field="tree_size",
            )
        return _checkpoint_at(store, tree_size, "tree_size")
    latest = store.latest_checkpoint()
    if latest is None or latest.tree_size < seq:
        signed = f"the latest is at {latest.tree_size}" if latest else "none yet"
        raise NotCheckpointed(
            f"record {seq} is after the latest checkpoint ({signed}): it has a "
            "proof once its segment is sealed (audit.segment_records, "
            "audit.segment_seconds)",
            field=field,
        )
    return latest


def prove_consistency(
    store: AuditStore, old_size: int, new_size: int
) -> ConsistencyProof:
    """Return two checkpoints and the consistency proof between them.

    Args:
        store: the audit log.
        old_size: the earlier checkpoint's tree size.
        new_size: the later checkpoint's tree size, at least ``old_size``.

    Raises:
        InvalidRequest: a size is 0 or ``old_size > new_size``.
        NotFound: a size is not a checkpoint's.
        NotCheckpointed: a size is past the latest checkpoint.
        ServiceError: the stored proof does not hold (a damaged log).
        AuditUnavailable: a Merkle node is missing.
    """
    if old_size < 1:
        raise InvalidRequest(
            f"expected a checkpoint's tree size (from 1), got {old_size}",
            field="old_size",
        )
    if old_size > new_size:
        raise InvalidRequest(
            f"expected old_size <= new_size, got {old_size} > {new_size}",
            field="old_size",
        )
    new = _checkpoint_at(store, new_size, "new_size")
    old = _checkpoint_at(store, old_size, "old_size")
    proof = store.consistency_proof(old_size, new_size)
    old_root, new_root = bytes.fromhex(old.root), bytes.fromhex(new.root)
    if not merkle.verify_consistency(old_size, new_size, old_root, new_root, proof):
        raise _damaged(
            store,
            f"the checkpoints at tree sizes {old_size} and {new_size} do not "
            "prove consistent",
        )
    return ConsistencyProof(old_checkpoint=old, new_checkpoint=new, proof=proof)


def sealed_segments(store: AuditStore, after_tree_size: int) -> list[SegmentSpan]:
    """Return the sealed segments after a cursor, in order.

    Args:
        store: the audit log.
        after_tree_size: 0, or a checkpoint's tree size (the last one a
            previous pull delivered).

    Returns:
        One span per checkpoint after the cursor, as of this call.

    Raises:
        Pruned: records after the cursor were pruned; the message names the
            seam to resume from.
        NotFound, NotCheckpointed: the cursor is not a checkpoint's size.
    """
    field = "after_tree_size"
    seam = store.seam()
    if after_tree_size < seam:
        raise Pruned(
            f"records 1..{seam} were pruned (the seam): resume with "
            f"after_tree_size {seam} or later, got {after_tree_size}",
            field=field,
        )
    if after_tree_size:
        _checkpoint_at(store, after_tree_size, field)
    spans = []
    previous = after_tree_size
    for checkpoint in store.iter_checkpoints(after=after_tree_size):
        spans.append(SegmentSpan(checkpoint=checkpoint, previous_tree_size=previous))
        previous = checkpoint.tree_size
    return spans


def read_records(
    store: AuditStore, first: int, last: int, max_bytes: int
) -> list[bytes]:
    """Read records ``first..last`` in order, stopping past ``max_bytes``.

    Always returns at least one record, so a record larger than
    ``max_bytes`` still moves a reader forward.

    Raises:
        Pruned: a record in the range was pruned meanwhile.
        ServiceError: a record is missing though not pruned.
    """
    out: list[bytes] = []
    total = 0
    expected = first
    records = store.iter_records(first)
    try:
        for stored in records:
            if stored.seq != expected:
                break
            out.append(stored.record_bytes)
            total += len(stored.record_bytes)
            expected += 1
            if expected > last or total >= max_bytes:
                return out
    finally:
        records.close()
    _check_not_pruned(store, expected, "after_tree_size")
    raise _damaged(store, f"record {expected} is missing though not pruned")


# ------------------------------------------------------------------- JSON


def _checkpoint_json(checkpoint: CheckpointV1 | None) -> Any:
    if checkpoint is None:
        return None
    # The stored bytes decoded again: the very object that was signed.
    return msgspec.json.decode(encode_checkpoint(checkpoint))


def head_json(view: HeadView) -> dict[str, Any]:
    """The JSON ``prove head`` prints."""
    return {
        "log_id": view.log_id,
        "tree_size": view.tree_size,
        "seam": view.seam,
        "checkpoint": _checkpoint_json(view.checkpoint),
    }


def record_json(proof: RecordProof) -> dict[str, Any]:
    """The JSON ``prove record`` prints; see the module doc to check it."""
    return {
        "seq": proof.seq,
        "leaf_index": proof.leaf_index,
        "record": proof.record.decode("utf-8"),
        "leaf_hash": merkle.leaf_hash(proof.record).hex(),
        "inclusion_proof": [h.hex() for h in proof.inclusion_proof],
        "checkpoint": _checkpoint_json(proof.checkpoint),
    }


def consistency_json(proof: ConsistencyProof) -> dict[str, Any]:
    """The JSON ``prove consistency`` prints."""
    return {
        "old_checkpoint": _checkpoint_json(proof.old_checkpoint),
        "new_checkpoint": _checkpoint_json(proof.new_checkpoint),
        "consistency_proof": [h.hex() for h in proof.proof],
    }
