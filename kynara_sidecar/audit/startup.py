"""What the daemon checks and prepares before its first append to the log.

The audit key set: the signing key (``audit.signing_key``, generated on
first start when ``audit.create_signing_key`` allows it), the key it
replaces (``audit.previous_signing_key``) and the keys a verifier trusts.
Only the daemon's start creates a key: an operator command that found no
key and made one would sign with, or trust, a key nobody else holds. A
signing key's public half lives beside it, ``audit-key.pem`` and
``audit-key.pub`` (``public_key_path``), wherever it was made; a verifier
that may not read the private key (or holds none) reads that file instead.
Every key error starts with the setting that names the file.

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
    load_public_key,
    load_signing_key,
    save_public_key,
    save_signing_key,
)
from kynara_sidecar.audit.record import AuditRecordV1, RecordKind
from kynara_sidecar.audit.rotation import rotation_record
from kynara_sidecar.audit.store import AuditStore
from kynara_sidecar.config import AuditConfig
from kynara_sidecar.errors import ConfigError

__all__ = [
    "AuditKeys",
    "configured_public_keys",
    "load_audit_keys",
    "log_key_id",
    "public_key_path",
    "rotation_for",
]

_log = logging.getLogger("kynara.audit")


class AuditKeys(NamedTuple):
    signing: SigningKey
    previous: SigningKey | None
    # Key id -> public key: the configured trusted keys and the public
    # halves of the signing and previous keys.
    trusted: dict[str, PublicKey]


def public_key_path(private: str | pathlib.Path) -> pathlib.Path:
    """Where the public half of the private key file ``private`` is kept:
    the same name with the suffix ``.pub`` (``audit-key.pem`` beside
    ``audit-key.pub``), as ``keygen`` and ``audit.create_signing_key`` write
    it."""
    path = pathlib.Path(private)
    # A path with no name ("/", ".") has no suffix to change; callers then
    # find the public half equal to the private path and refuse it.
    return path.with_suffix(".pub") if path.name else path


def load_audit_keys(
    cfg: AuditConfig, section: str = "audit", *, create: bool = False
) -> AuditKeys:
    """Load (or, when allowed, create) the audit keys the config names.

    Args:
        cfg: the audit section.
        section: its name, for error messages.
        create: whether a missing signing key may be generated here (when
            ``create_signing_key`` is set too). Only the daemon's start
            passes ``True``; commands such as ``new-chain`` pass ``False``.

    Raises:
        ConfigError: a key is not set, missing, unreadable, too widely
            readable, or two trusted keys share a key id; the message starts
            with the setting (``audit.trusted_keys[1]: /path: ...``). Nothing
            is created when it is raised, except a key made before a later
            key failed to load.
    """
    if not cfg.signing_key:
        raise ConfigError(
            f"{section}.signing_key: expected the path of the audit signing key "
            "(`kynara-sidecar keygen --out DIR` writes DIR/audit-key.pem), got none"
        )
    path = pathlib.Path(cfg.signing_key)
    if not path.exists() and cfg.create_signing_key:
        if not create:
            raise ConfigError(
                f"{section}.signing_key: {path}: no such file, and only "
                f"`kynara-sidecar run` creates it ({section}.create_signing_key); "
                "expected an existing key: start the daemon once, or make one "
                "with `kynara-sidecar keygen --out DIR`"
            )
        _create_key(path, section)
    signing = _private_key(path, f"{section}.signing_key")
    previous = None
    if cfg.previous_signing_key:
        previous = _private_key(
            cfg.previous_signing_key, f"{section}.previous_signing_key"
        )
    trusted = _trusted_key_files(cfg.trusted_keys, f"{section}.trusted_keys")
    for key in (signing, previous):
        if key is not None:
            trusted[key.key_id] = key.public()
    return AuditKeys(signing, previous, trusted)


def configured_public_keys(
    cfg: AuditConfig, section: str = "audit"
) -> dict[str, PublicKey]:
    """The keys a config trusts, as a verifier or exporter reads them.

    ``trusted_keys``, and the public halves of ``signing_key`` and
    ``previous_signing_key``: read from the private key when this process
    may read it, else from ``public_key_path`` beside it (a verifier may
    hold no private key at all). Never creates a key.

    Returns:
        Key id to public key.

    Raises:
        ConfigError: a configured key can be read neither way; the message
            starts with the setting.
    """
    trusted = _trusted_key_files(cfg.trusted_keys, f"{section}.trusted_keys")
    for name in ("signing_key", "previous_signing_key"):
        private = getattr(cfg, name)
        if private:
            key = _public_half(pathlib.Path(private), f"{section}.{name}")
            trusted[key.key_id] = key
    return trusted


def _private_key(path: str | pathlib.Path, setting: str) -> SigningKey:
    try:
        return load_signing_key(path)
    except ConfigError as err:
        raise ConfigError(f"{setting}: {err}") from err


def _public_half(private: pathlib.Path, setting: str) -> PublicKey:
    try:
        return load_signing_key(private).public()
    except ConfigError as err:
        problem = err
    public = public_key_path(private)
    if public == private or not public.is_file():
        raise ConfigError(
            f"{setting}: {problem}; expected the private key or its public "
            f"half in {public}"
        )
    try:
        return load_public_key(public)
    except ConfigError as err:
        raise ConfigError(f"{setting}: {err}") from err


def _trusted_key_files(paths: list[str], setting: str) -> dict[str, PublicKey]:
    trusted: dict[str, PublicKey] = {}
    seen_at: dict[str, str] = {}
    for index, path in enumerate(paths):
        where = f"{setting}[{index}]"
        try:
            key = load_public_key(path)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from err
        known = trusted.get(key.key_id)
        if known is not None and known != key:
            raise ConfigError(
                f"{where}: {path}: key id {key.key_id} is already used by a "
                f"different key from {seen_at[key.key_id]}; expected distinct "
                "key ids"
            )
        trusted[key.key_id] = key
        seen_at.setdefault(key.key_id, f"{where} ({path})")
    return trusted


def _create_key(path: pathlib.Path, section: str) -> None:
    public = public_key_path(path)
    # Checked before writing either file, as keygen does: a stale public
    # half beside a new private key would be trusted for the wrong key.
    if public == path or public.exists():
        raise ConfigError(
            f"{section}.signing_key: {path}: cannot create it beside {public}"
            + (
                ": expected a private key path not ending in .pub"
                if public == path
                else ", which already exists without its private key; move "
                "that file away or point the setting at the key it belongs to"
            )
        )
    key = generate_key()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_signing_key(key, path)
        save_public_key(key.public(), public)
    except OSError as err:
        raise ConfigError(
            f"{section}.signing_key: cannot create {path}: {err.strerror or err}"
        ) from None
    except ConfigError as err:
        raise ConfigError(f"{section}.signing_key: {err}") from err
    _log.warning(
        "audit signing key created",
        extra={
            "fields": {
                "component": "audit",
                "path": str(path),
                "public_path": str(public),
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
