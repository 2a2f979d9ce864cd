"""Canonical record bytes, the hash chain over them, and the walk that checks it.

Theory of operation
-------------------
A record is encoded exactly once, when it is appended: canonical JSON
(object keys sorted, UTF-8, no insignificant whitespace, fields equal to
their defaults left out). Those bytes are what is stored and what is hashed;
nothing ever decodes a record and re-encodes it to check it, so a reader
that does not know a later field still verifies the record byte for byte.

Each record's chain hash covers the previous record's chain hash and its own
bytes::

    hash(1) = SHA-256(GENESIS_HASH || bytes(1))      GENESIS_HASH = 32 zeros
    hash(n) = SHA-256(hash(n-1)    || bytes(n))

so the hash of the last record (the head) commits to every record before it:
changing, dropping or reordering any record changes every hash after it.
The store keeps, per sequence number, the record bytes and the chain hash,
and separately the head (last sequence number and its chain hash).

Verification walks the records in key order with the previous hash in hand
and stops at the first problem:

1. The key must be the next sequence number (1, 2, 3, ...); a gap means a
   record is ``missing``.
2. The bytes must parse as a JSON object whose ``seq`` equals the key;
   otherwise the record was ``edited`` (unparseable) or ``reordered`` (it
   belongs elsewhere).
3. SHA-256(previous hash || bytes) must equal the stored chain hash;
   otherwise the record (or its stored hash) was ``edited``.
4. After the last record, the stored head must name it and its hash;
   otherwise ``head_mismatch`` (a truncated tail or a rewritten head).

The walk needs only SHA-256 and a JSON parser, so a verifier in another
language can repeat it. This module is pure: bytes in, values out.

``verify.verify_store`` builds on ``check_record``: it starts the walk at
the seam after pruning, rebuilds the Merkle tree from the record bytes,
and checks the signed checkpoints and the witness; the problem kinds it
adds (a truncated tail or front, a bad signature, an unknown key) are
listed in ``ProblemKind``.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable

import msgspec

from kynara_sidecar.audit.record import AuditRecordV1

__all__ = [
    "GENESIS_HASH",
    "HASH_SIZE",
    "ChainProblem",
    "ProblemKind",
    "VerifyReport",
    "chain_hash",
    "check_record",
    "decode_record",
    "encode_record",
    "encode_unsequenced",
    "sequenced",
    "verify_chain",
]

HASH_SIZE = 32
# The "previous hash" of record 1: no record comes before it.
GENESIS_HASH = bytes(HASH_SIZE)

_DECODER = msgspec.json.Decoder(AuditRecordV1)


def encode_record(record: AuditRecordV1) -> bytes:
    """Encode a record into its canonical bytes, the bytes that are hashed.

    Raises:
        msgspec.EncodeError: a field holds something JSON cannot hold.
    """
    return msgspec.json.encode(record, order="sorted")


# The record's fields that sort after ``seq``, with what each defaults to
# (a field equal to its default is left out of the bytes).
_AFTER_SEQ = tuple(
    (field.encode_name, field.default, field.default_factory)
    for field in sorted(
        msgspec.structs.fields(AuditRecordV1), key=lambda field: field.encode_name
    )
    if field.encode_name > "seq"
)


def encode_unsequenced(record: AuditRecordV1) -> bytes:
    """The record's canonical bytes without a ``seq`` (as if it were 0),
    for ``sequenced`` to complete once the sequence number is known.

    Raises:
        msgspec.EncodeError: as ``encode_record``.
    """
    if record.seq:
        record = msgspec.structs.replace(record, seq=0)
    return encode_record(record)


def sequenced(unsequenced: bytes, record: AuditRecordV1, seq: int) -> bytes:
    """``encode_record`` of ``record`` numbered ``seq``, from its
    ``encode_unsequenced`` bytes: ``"seq":<n>`` is put in before the fields
    that sort after it, so the record is not encoded a second time.

    The fields after ``seq`` (``shadow_effect``, ``time``, ``v`` today) are
    encoded alone to find the place; should the bytes not end with them,
    the record is encoded again whole, which gives the same bytes.

    Args:
        unsequenced: ``encode_unsequenced(record)``.
        record: the record those bytes encode.
        seq: its sequence number, 1 or more.
    """
    tail = {}
    for name, default, factory in _AFTER_SEQ:
        value = getattr(record, name)
        if default is msgspec.NODEFAULT and factory is msgspec.NODEFAULT:
            tail[name] = value
        elif value != (factory() if default is msgspec.NODEFAULT else default):
            tail[name] = value
    # "{...}" of the trailing fields; its items end the record's bytes.
    items = msgspec.json.encode(tail, order="sorted")[1:]
    cut = len(unsequenced) - len(items)
    if seq < 1 or cut < 1 or not unsequenced.endswith(items):
        return encode_record(msgspec.structs.replace(record, seq=seq))
    if unsequenced[cut - 1] not in b",{":
        return encode_record(msgspec.structs.replace(record, seq=seq))
    return b'%s"seq":%d,%s' % (unsequenced[:cut], seq, items)


def decode_record(data: bytes) -> AuditRecordV1:
    """Decode stored record bytes; keys this version does not know are ignored.

    Raises:
        msgspec.ValidationError: the bytes are not a v1 record (the message
            gives the path, such as ``$.chain[0].id``).
        msgspec.DecodeError: the bytes are not JSON.
    """
    return _DECODER.decode(data)


def chain_hash(prev_hash: bytes, record_bytes: bytes) -> bytes:
    """Return SHA-256(prev_hash || record_bytes), the record's chain hash.

    Raises:
        ValueError: ``prev_hash`` is not 32 bytes.
    """
    if len(prev_hash) != HASH_SIZE:
        raise ValueError(
            f"previous chain hash must be {HASH_SIZE} bytes, got {len(prev_hash)}"
        )
    return hashlib.sha256(prev_hash + record_bytes).digest()


class ProblemKind(enum.StrEnum):
    """What is wrong with the first bad record (or checkpoint) of a log."""

    # Bytes, a chain hash, a Merkle node, a checkpoint's root or chain hash,
    # the decisions index, the seam or a stored policy set differ from what
    # the records say; or a record other than a restart's first follows the
    # head signed at a clean stop.
    EDITED = "edited"
    # A gap in the record keys inside the log; or evidence the log must hold
    # is gone: a checkpoint the witness or a signed head names, the Merkle
    # nodes database, or (when required) everything the witness held.
    MISSING = "missing"
    # A record sits at another sequence number than its own.
    REORDERED = "reordered"
    # The stored head names an earlier record, or another hash.
    HEAD_MISMATCH = "head_mismatch"
    # The newest records are gone: the stored head, a checkpoint or the
    # witness names a tree larger than the log holds.
    TRUNCATED_TAIL = "truncated_tail"
    # The oldest records are gone without the seam that accounts for them.
    TRUNCATED_FRONT = "truncated_front"
    # A checkpoint or key rotation is not signed by the key it names.
    BAD_SIGNATURE = "bad_signature"
    # A checkpoint or key rotation names a key not trusted at that point.
    UNKNOWN_KEY = "unknown_key"
    # An allow cites an approval as used (approval_granted) that was used
    # by an earlier allow already: a grant allows once.
    APPROVAL_REUSED = "approval_reused"
    # An allow cites an approval as used that no earlier approval_resolved
    # record approved.
    APPROVAL_NOT_APPROVED = "approval_not_approved"
    # An approval_resolved record approves an approval that no earlier
    # approval_requested record opened.
    APPROVAL_NOT_REQUESTED = "approval_not_requested"
    # An allow cites an approval an earlier approval_resolved record ended
    # (rejected or expired): a final resolution is the last word.
    APPROVAL_ENDED = "approval_ended"
    # An allow is dated at or past the approval's expires_at (as its
    # approval_requested record says).
    APPROVAL_EXPIRED = "approval_expired"
    # An allow uses an approval for another request than it was given for:
    # another chain, action, resource, digest, or (unredacted) another
    # binding of attributes and context.
    APPROVAL_MISMATCH = "approval_mismatch"


class ChainProblem(msgspec.Struct, frozen=True):
    """The first problem found: where it is, its kind, and why.

    ``seq`` is a record's sequence number, or the tree size of the
    statement ``subject`` names ("checkpoint", "witness checkpoint", ...).
    """

    seq: int
    kind: ProblemKind
    message: str
    subject: str = "record"


class VerifyReport(msgspec.Struct, frozen=True):
    """The outcome of a verification walk.

    ``records`` counts the records that verified before the first problem
    (all of them when ``ok``). ``head_seq`` and ``head_hash`` are the stored
    head (0 and ``GENESIS_HASH`` when none is stored). ``checkpoints``
    counts the stored checkpoints that verified, ``seam`` is where the walk
    started (the pruned tree size, or the checkpoint a tail check started
    from), and ``notes`` say what could not be checked.
    """

    records: int
    head_seq: int
    head_hash: bytes
    problem: ChainProblem | None = None
    checkpoints: int = 0
    seam: int = 0
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.problem is None


def verify_chain(
    entries: Iterable[tuple[int, bytes, bytes]],
    head: tuple[int, bytes] | None,
) -> VerifyReport:
    """Walk a log in key order and report its first problem, if any.

    Args:
        entries: ``(key_seq, record_bytes, stored_chain_hash)`` in ascending
            key order; an absent chain hash is passed as ``b""``.
        head: the stored ``(seq, chain_hash)`` head, or ``None`` if absent.

    Returns:
        A report; ``problem`` names the first bad record and what is wrong.
    """
    head_seq, head_hash = head if head is not None else (0, GENESIS_HASH)
    prev_seq, prev_hash = 0, GENESIS_HASH
    for key_seq, data, stored in entries:
        problem = check_record(prev_seq, prev_hash, key_seq, data, stored)
        if problem is not None:
            return VerifyReport(prev_seq, head_seq, head_hash, problem)
        prev_seq, prev_hash = key_seq, stored
    problem = _check_head(prev_seq, prev_hash, head)
    return VerifyReport(prev_seq, head_seq, head_hash, problem)


def check_record(
    prev_seq: int, prev_hash: bytes, key_seq: int, data: bytes, stored: bytes
) -> ChainProblem | None:
    """Check one link of the chain: steps 1 to 3 of the walk above.

    Args:
        prev_seq: the sequence number of the record before (0 at genesis).
        prev_hash: its chain hash (``GENESIS_HASH`` at genesis).
        key_seq: the key this record is stored under.
        data: the stored record bytes.
        stored: the stored chain hash (``b""`` when absent).

    Returns:
        ``None``, or the problem at this record.
    """
    expected = prev_seq + 1
    if key_seq > expected:
        gap = f"{expected}" if key_seq == expected + 1 else f"{expected}..{key_seq - 1}"
        return ChainProblem(
            expected,
            ProblemKind.MISSING,
            f"record {gap} missing: after record {prev_seq} comes {key_seq}",
        )
    if key_seq < expected:
        return ChainProblem(
            expected,
            ProblemKind.REORDERED,
            f"record keys out of order: after record {prev_seq} comes {key_seq}",
        )
    own_seq = _own_seq(data)
    if own_seq is None:
        return ChainProblem(
            key_seq,
            ProblemKind.EDITED,
            "stored bytes do not parse as a JSON record with an integer seq",
        )
    if own_seq != key_seq:
        return ChainProblem(
            key_seq,
            ProblemKind.REORDERED,
            f"record stored at {key_seq} says it is record {own_seq}",
        )
    computed = hashlib.sha256(prev_hash + data).digest()
    if computed != stored:
        return ChainProblem(
            key_seq,
            ProblemKind.EDITED,
            f"chain hash mismatch: stored {stored.hex() or '<none>'}, "
            f"recomputed {computed.hex()}",
        )
    return None


def _own_seq(data: bytes) -> int | None:
    # A generic parse, as a verifier in another language would do it: the
    # typed decoder would also reject records written by a later version.
    try:
        obj = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return None
    seq = obj.get("seq") if isinstance(obj, dict) else None
    return seq if type(seq) is int else None


def _check_head(
    last_seq: int, last_hash: bytes, head: tuple[int, bytes] | None
) -> ChainProblem | None:
    if head is None:
        if last_seq == 0:
            return None
        return ChainProblem(
            last_seq,
            ProblemKind.HEAD_MISMATCH,
            f"no head is stored, but the log ends at record {last_seq}",
        )
    head_seq, head_hash = head
    if (head_seq, head_hash) == (last_seq, last_hash):
        return None
    if head_seq != last_seq:
        ends = f"ends at record {last_seq}" if last_seq else "is empty"
        return ChainProblem(
            head_seq,
            ProblemKind.HEAD_MISMATCH,
            f"head names record {head_seq}, but the log {ends}",
        )
    return ChainProblem(
        head_seq,
        ProblemKind.HEAD_MISMATCH,
        f"head hash {head_hash.hex()} differs from record {last_seq}'s chain "
        f"hash {last_hash.hex()}",
    )
