"""Signed checkpoints: a daemon's signed statement of its log at one moment.

Theory of operation
-------------------
A checkpoint says "the log ``log_id`` of ``origin`` had ``tree_size``
records, with Merkle root ``root`` and last chain hash ``chain_hash``, at
``time``", signed with the audit key ``key_id``. A ``checkpoint`` is written
when a segment is sealed; a ``head`` is signed at shutdown so a later
truncation of the tail shows against it.

``log_id`` is the random id a log gets when it is created (meta ``log_id``,
32 lowercase hex digits); a daemon that starts a new chain after a break
gets a new one under the same origin. Signing it binds each statement to one
log: the witness files of a log live under its id, so an id rewritten in the
log's meta would otherwise point ``verify`` at an empty witness directory,
and an export pack's manifest would name a log that nothing signed.

The signature covers the canonical bytes of every other field: a JSON object
with keys sorted, no whitespace, UTF-8::

    signed = msgspec.json.encode({every field but "signature"}, order="sorted")
    signature = base64url(Ed25519-sign(key, signed))     (unpadded)

Every string field is restricted to printable ASCII without ``"`` or ``\\``
and every number is a non-negative integer, so any JSON encoder that sorts
keys and drops whitespace (``json.dumps(obj, sort_keys=True,
separators=(",", ":"))`` in Python) produces the same bytes. A verifier in
another language needs only Ed25519, SHA-256 (for the key id) and a JSON
parser. Unknown fields are refused rather than ignored: they would not be
covered by the signature; a new field means a new ``v``.

This module is pure: values in, values out, no clock and no IO.
"""

from __future__ import annotations

import enum
import re

import msgspec

from kynara_sidecar.audit.keys import (
    KEY_ID_HEX_DIGITS,
    KEY_ID_PREFIX,
    PublicKey,
    SigningKey,
    decode_base64url,
    encode_base64url,
)
from kynara_sidecar.audit.record import format_timestamp, parse_timestamp
from kynara_sidecar.decision import Timestamp
from kynara_sidecar.errors import KynaraError

__all__ = [
    "CHECKPOINT_VERSION",
    "LOG_ID_HEX_DIGITS",
    "MAX_ORIGIN_LENGTH",
    "CheckpointError",
    "CheckpointKind",
    "CheckpointProblem",
    "CheckpointV1",
    "decode_checkpoint",
    "encode_checkpoint",
    "sign_checkpoint",
    "signed_bytes",
    "verify_checkpoint",
]

CHECKPOINT_VERSION = 1
# A Kubernetes pod name is at most 253 characters; "<agent>@<host>" fits too.
MAX_ORIGIN_LENGTH = 253
HASH_HEX_DIGITS = 64
LOG_ID_HEX_DIGITS = 32
SIGNATURE_SIZE = 64

_ORIGIN_RE = re.compile(r"[\x20-\x7e]+")
_HASH_RE = re.compile(rf"^[0-9a-f]{{{HASH_HEX_DIGITS}}}$")
_LOG_ID_RE = re.compile(rf"^[0-9a-f]{{{LOG_ID_HEX_DIGITS}}}$")
_KEY_ID_RE = re.compile(rf"^{re.escape(KEY_ID_PREFIX)}[0-9a-f]{{{KEY_ID_HEX_DIGITS}}}$")


class CheckpointKind(enum.StrEnum):
    """Why a checkpoint was signed."""

    CHECKPOINT = "checkpoint"  # a segment was sealed
    HEAD = "head"  # the daemon shut down


class CheckpointV1(
    msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True
):
    """A signed statement of the log's size, Merkle root and chain head."""

    v: int
    kind: CheckpointKind
    # This daemon's log origin (its daemon id), e.g. "support-bot-7d9f".
    origin: str
    # The log's id (AuditStore.log_id), 32 lowercase hex digits.
    log_id: str
    # Records in the log when signed; the Merkle tree covers records 1..n.
    tree_size: int
    # Merkle tree root over the first tree_size records, lowercase hex.
    root: str
    # Chain hash of record tree_size, lowercase hex.
    chain_hash: str
    # RFC 3339 UTC with the "Z" suffix, as format_timestamp writes it.
    time: str
    # Id of the signing key, "ed25519:" and 16 hex digits.
    key_id: str
    # Ed25519 signature over signed_bytes(), unpadded base64url.
    signature: str


_KINDS = frozenset(kind.value for kind in CheckpointKind)


class CheckpointProblem(enum.StrEnum):
    """What is wrong with a checkpoint that does not verify."""

    MALFORMED = "malformed"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"


class CheckpointError(KynaraError):
    """A checkpoint failed to decode or verify; ``kind`` says how."""

    def __init__(self, kind: CheckpointProblem, message: str):
        self.kind = kind
        super().__init__(f"{kind}: {message}")


def _field_problem(cp: CheckpointV1) -> str | None:
    """Return what is wrong with the fields (signature bytes aside), or None."""
    if type(cp.v) is not int or cp.v != CHECKPOINT_VERSION:
        return f"v: expected {CHECKPOINT_VERSION}, got {cp.v!r}"
    if cp.kind not in _KINDS:
        return f"kind: expected one of {sorted(_KINDS)}, got {cp.kind!r}"
    origin = cp.origin
    if (
        not isinstance(origin, str)
        or not 0 < len(origin) <= MAX_ORIGIN_LENGTH
        or not _ORIGIN_RE.fullmatch(origin)
        or '"' in origin
        or "\\" in origin
    ):
        return (
            f"origin: expected 1..{MAX_ORIGIN_LENGTH} printable ASCII characters "
            f"without '\"' or '\\', got {origin!r}"
        )
    if not isinstance(cp.log_id, str) or not _LOG_ID_RE.fullmatch(cp.log_id):
        return (
            f"log_id: expected {LOG_ID_HEX_DIGITS} lowercase hex digits, got "
            f"{cp.log_id!r}"
        )
    if type(cp.tree_size) is not int or cp.tree_size < 0:
        return f"tree_size: expected an integer >= 0, got {cp.tree_size!r}"
    for name in ("root", "chain_hash"):
        value = getattr(cp, name)
        if not isinstance(value, str) or not _HASH_RE.fullmatch(value):
            expected = f"{HASH_HEX_DIGITS} lowercase hex digits"
            return f"{name}: expected {expected}, got {value!r}"
    try:
        canonical_time = format_timestamp(parse_timestamp(cp.time))
    except (TypeError, ValueError) as err:
        return f"time: {err}"
    if canonical_time != cp.time:
        return f"time: expected the canonical form {canonical_time!r}, got {cp.time!r}"
    if not isinstance(cp.key_id, str) or not _KEY_ID_RE.fullmatch(cp.key_id):
        return (
            f"key_id: expected {KEY_ID_PREFIX!r} and {KEY_ID_HEX_DIGITS} lowercase "
            f"hex digits, got {cp.key_id!r}"
        )
    return None


def signed_bytes(cp: CheckpointV1) -> bytes:
    """Return the canonical bytes the signature covers (every other field)."""
    fields = msgspec.structs.asdict(cp)
    del fields["signature"]
    return msgspec.json.encode(fields, order="sorted")


def encode_checkpoint(cp: CheckpointV1) -> bytes:
    """Return the whole checkpoint as canonical JSON, for witness files."""
    return msgspec.json.encode(cp, order="sorted")


def decode_checkpoint(data: bytes | str) -> CheckpointV1:
    """Decode a checkpoint from JSON; the signature is not checked here.

    Raises:
        CheckpointError: ``malformed``: not JSON, a field missing, unknown,
            or of the wrong type.
    """
    try:
        return msgspec.json.decode(data, type=CheckpointV1)
    except msgspec.DecodeError as err:
        raise CheckpointError(CheckpointProblem.MALFORMED, str(err)) from None


def sign_checkpoint(
    *,
    kind: CheckpointKind,
    origin: str,
    log_id: str,
    tree_size: int,
    root: bytes,
    chain_hash: bytes,
    time: Timestamp,
    key: SigningKey,
) -> CheckpointV1:
    """Build and sign a checkpoint.

    Args:
        kind: a sealed segment, or the head at shutdown.
        origin: the daemon id.
        log_id: the log's id (``AuditStore.log_id``).
        tree_size: records in the log.
        root: the 32-byte Merkle root over those records.
        chain_hash: the 32-byte chain hash of the last of them.
        time: when it was signed (the caller reads the clock).
        key: the daemon's audit signing key.

    Returns:
        The signed checkpoint.

    Raises:
        ValueError: a field is out of range; the message names it.
    """
    unsigned = CheckpointV1(
        v=CHECKPOINT_VERSION,
        kind=CheckpointKind(kind),
        origin=origin,
        log_id=log_id,
        tree_size=tree_size,
        root=bytes(root).hex(),
        chain_hash=bytes(chain_hash).hex(),
        time=format_timestamp(time),
        key_id=key.key_id,
        signature="",
    )
    problem = _field_problem(unsigned)
    if problem is not None:
        raise ValueError(f"cannot sign checkpoint: {problem}")
    signature = encode_base64url(key.sign(signed_bytes(unsigned)))
    return msgspec.structs.replace(unsigned, signature=signature)


def verify_checkpoint(cp: CheckpointV1, trusted: dict[str, PublicKey]) -> None:
    """Check a checkpoint's fields and its signature by a trusted key.

    Args:
        cp: the checkpoint, as decoded (never re-signed or normalised).
        trusted: key id to public key, from configuration only.

    Raises:
        CheckpointError: ``malformed`` (a field or the signature encoding is
            invalid), ``unknown_key`` (``key_id`` is not trusted) or
            ``bad_signature`` (the trusted key did not sign these bytes).
    """
    problem = _field_problem(cp)
    if problem is None:
        try:
            signature = decode_base64url(cp.signature)
        except (TypeError, ValueError, AttributeError) as err:
            problem = f"signature: {err}"
        else:
            if len(signature) != SIGNATURE_SIZE:
                problem = (
                    f"signature: expected {SIGNATURE_SIZE} bytes, got {len(signature)}"
                )
    if problem is not None:
        raise CheckpointError(CheckpointProblem.MALFORMED, problem)
    key = trusted.get(cp.key_id)
    if key is None:
        raise CheckpointError(
            CheckpointProblem.UNKNOWN_KEY,
            f"key_id {cp.key_id} is not among the trusted keys "
            f"{sorted(trusted) or '(none)'}",
        )
    if not key.verify(signed_bytes(cp), signature):
        raise CheckpointError(
            CheckpointProblem.BAD_SIGNATURE,
            f"signature does not match key {cp.key_id} over the checkpoint of "
            f"{cp.origin} log {cp.log_id} at tree_size {cp.tree_size}",
        )
