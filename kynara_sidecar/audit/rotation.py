"""Audit key rotation: a record, signed by the old key, naming the new one.

Verifiers trust only the keys their configuration gives them. A rotation
extends that trust along the log: a ``key_rotation`` record whose signature
verifies under a key already trusted at that point makes the new key
trusted from that record on. A rotation signed by an unknown key extends
nothing, so a forger cannot introduce a key by writing such a record.

The signature covers canonical JSON (sorted keys, no whitespace, UTF-8) of::

    {"log_id", "new_key_id", "new_public_key", "old_key_id", "origin"}

binding the new key to this log, so a rotation cannot be replayed into
another daemon's log. Every value is printable ASCII, so
``json.dumps(obj, sort_keys=True, separators=(",", ":"))`` gives the same
bytes. This module is pure.
"""

from __future__ import annotations

import msgspec

from kynara_sidecar.audit.keys import (
    PublicKey,
    SigningKey,
    decode_base64url,
    encode_base64url,
    key_id_of,
)
from kynara_sidecar.audit.record import (
    RECORD_VERSION,
    AuditRecordV1,
    KeyRotationEntry,
    RecordKind,
)

__all__ = ["rotation_record", "signed_bytes", "trusted_after"]


def signed_bytes(entry: KeyRotationEntry, origin: str, log_id: str) -> bytes:
    """The bytes the old key signs for this rotation."""
    return msgspec.json.encode(
        {
            "log_id": log_id,
            "new_key_id": entry.new_key_id,
            "new_public_key": entry.new_public_key,
            "old_key_id": entry.old_key_id,
            "origin": origin,
        },
        order="sorted",
    )


def rotation_record(
    old_key: SigningKey,
    new_key: PublicKey,
    *,
    origin: str,
    log_id: str,
    time: str,
) -> AuditRecordV1:
    """Build the ``key_rotation`` record that hands the log to ``new_key``."""
    unsigned = KeyRotationEntry(
        old_key_id=old_key.key_id,
        new_key_id=new_key.key_id,
        new_public_key=new_key.to_base64url(),
        signature="",
    )
    signature = old_key.sign(signed_bytes(unsigned, origin, log_id))
    entry = msgspec.structs.replace(unsigned, signature=encode_base64url(signature))
    return AuditRecordV1(
        v=RECORD_VERSION,
        kind=RecordKind.KEY_ROTATION,
        time=time,
        daemon_id=origin,
        key_rotation=entry,
    )


def trusted_after(
    entry: KeyRotationEntry,
    trusted: dict[str, PublicKey],
    *,
    origin: str,
    log_id: str,
) -> tuple[dict[str, PublicKey], str | None]:
    """Apply a rotation to the trusted keys.

    Returns:
        ``(trusted, problem)``: the keys trusted after this record, and
        ``None`` or why the rotation extends no trust (an unknown old key, a
        bad signature, a new key that does not match its id). On a problem
        the trusted keys are returned unchanged.
    """
    old = trusted.get(entry.old_key_id)
    if old is None:
        return trusted, f"rotation signed by untrusted key {entry.old_key_id}"
    try:
        raw = decode_base64url(entry.new_public_key)
        signature = decode_base64url(entry.signature)
        new = PublicKey.from_raw(raw)
    except (TypeError, ValueError) as err:
        return trusted, f"rotation names a malformed key: {err}"
    if key_id_of(raw) != entry.new_key_id:
        return trusted, (
            f"rotation's new_key_id {entry.new_key_id} is not the id of its key "
            f"({key_id_of(raw)})"
        )
    if not old.verify(signed_bytes(entry, origin, log_id), signature):
        return trusted, f"rotation signature does not verify under {old.key_id}"
    return {**trusted, new.key_id: new}, None
