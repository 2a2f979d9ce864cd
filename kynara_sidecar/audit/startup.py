"""What the daemon checks and prepares before its first append to the log.

The audit key set: the signing key (``audit.signing_key``, generated on
first start when ``audit.create_signing_key`` allows it), the key it
replaces (``audit.previous_signing_key``) and the keys a verifier trusts.

Rotation: the log's key is the one its newest checkpoint or head was
signed with, or the one a later ``key_rotation`` record named. When the
configured signing key is another one, the daemon appends a rotation record
signed by the previous key before anything else; without the previous key
it refuses to start, since nothing could then link the new checkpoints to
the old ones.

The tail: before appending, the records after the newest checkpoint, that
checkpoint, the stored head and the witness's newest statement must agree
(``verify.verify_store`` from that checkpoint). A log that fails is not
appended to: appending would bury the break under new, valid records.
"""

from __future__ import annotations

import logging
import pathlib
from typing import NamedTuple

from kynara_sidecar.audit.chain import decode_record
from kynara_sidecar.audit.keys import (
    PublicKey,
    SigningKey,
    generate_key,
    load_signing_key,
    load_trusted_keys,
    save_public_key,
    save_signing_key,
)
from kynara_sidecar.audit.record import AuditRecordV1, RecordKind
from kynara_sidecar.audit.rotation import rotation_record
from kynara_sidecar.audit.store import AuditStore
from kynara_sidecar.config import AuditConfig
from kynara_sidecar.errors import ConfigError

__all__ = ["AuditKeys", "load_audit_keys", "log_key_id", "rotation_for"]

_log = logging.getLogger("kynara.audit")


class AuditKeys(NamedTuple):
    signing: SigningKey
    previous: SigningKey | None
    # Key id -> public key: the configured trusted keys and the public
    # halves of the signing and previous keys.
    trusted: dict[str, PublicKey]


def load_audit_keys(cfg: AuditConfig, section: str = "audit") -> AuditKeys:
    """Load (or, when allowed, create) the audit keys the config names.

    Raises:
        ConfigError: a key is not set, unreadable, or too widely readable.
    """
    if not cfg.signing_key:
        raise ConfigError(
            f"{section}.signing_key: expected the path of the audit signing key "
            "(`kynara-sidecar keygen --out DIR` writes DIR/audit-key.pem), got none"
        )
    path = pathlib.Path(cfg.signing_key)
    if not path.exists() and cfg.create_signing_key:
        _create_key(path, section)
    signing = load_signing_key(path)
    previous = (
        load_signing_key(cfg.previous_signing_key) if cfg.previous_signing_key else None
    )
    trusted = load_trusted_keys(cfg.trusted_keys)
    for key in (signing, previous):
        if key is not None:
            trusted[key.key_id] = key.public()
    return AuditKeys(signing, previous, trusted)


def _create_key(path: pathlib.Path, section: str) -> None:
    key = generate_key()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_signing_key(key, path)
        save_public_key(key.public(), f"{path}.pub")
    except OSError as err:
        raise ConfigError(
            f"{section}.signing_key: cannot create {path}: {err.strerror or err}"
        ) from None
    _log.warning(
        "audit signing key created",
        extra={
            "fields": {
                "component": "audit",
                "path": str(path),
                "key_id": key.key_id,
                "setting": f"{section}.create_signing_key",
            }
        },
    )


def log_key_id(store: AuditStore) -> str | None:
    """The key the log is signed with now, or ``None`` before its first
    checkpoint."""
    statements = [store.latest_checkpoint(), store.head_checkpoint()]
    signed = [cp for cp in statements if cp is not None]
    if not signed:
        key_id, after = None, store.seam()
    else:
        newest = max(signed, key=lambda cp: cp.tree_size)
        key_id, after = newest.key_id, newest.tree_size
    # A rotation after the newest checkpoint already handed the log over.
    for stored in store.iter_records(after + 1):
        if b'"key_rotation"' not in stored.record_bytes:
            continue
        record = decode_record(stored.record_bytes)
        if record.kind == RecordKind.KEY_ROTATION and record.key_rotation:
            key_id = record.key_rotation.new_key_id
    return key_id


def rotation_for(
    store: AuditStore, keys: AuditKeys, *, origin: str, time: str
) -> AuditRecordV1 | None:
    """The rotation record to append before anything else, if one is due.

    Raises:
        ConfigError: the log is signed with a key that is neither the
            signing key nor the previous one.
    """
    current = log_key_id(store)
    if current is None or current == keys.signing.key_id:
        return None
    previous = keys.previous
    if previous is None or previous.key_id != current:
        have = previous.key_id if previous else "none"
        raise ConfigError(
            f"audit.signing_key {keys.signing.key_id} is not the key the log at "
            f"{store.path} is signed with ({current}); to rotate, set "
            f"audit.previous_signing_key to that key (now: {have})"
        )
    return rotation_record(
        previous,
        keys.signing.public(),
        origin=origin,
        log_id=store.log_id,
        time=time,
    )
