"""Ed25519 audit signing keys: generation, key ids, and their files.

The daemon signs its checkpoints with one Ed25519 key; verifiers trust the
public keys they are given in configuration, never keys found in the log.
A key is named by its key id, ``ed25519:`` and the first 16 hex digits of
SHA-256 over the raw 32-byte public key, so anyone holding the public key can
recompute the id with nothing but SHA-256.

Files:

- the private key is unencrypted PKCS#8 PEM, created with mode 0600 and never
  overwritten; loading refuses a file that group or others may read, as ssh
  does, because a leaked signing key lets anyone forge checkpoints;
- a public key is SubjectPublicKeyInfo PEM, or the raw key in unpadded
  base64url (43 characters), the form that fits on one configuration line.

Key files are small and read whole; the errors are ``ConfigError`` naming
the file and what was expected.

The daemon loads its key from ``audit.signing_key``; rotation to a new key
is a record signed by the old one (``rotation``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import pathlib
import stat
from collections.abc import Iterable

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from kynara_sidecar.errors import ConfigError

__all__ = [
    "KEY_ID_HEX_DIGITS",
    "KEY_ID_PREFIX",
    "PRIVATE_KEY_MODE",
    "PUBLIC_KEY_MODE",
    "RAW_PUBLIC_KEY_SIZE",
    "PublicKey",
    "SigningKey",
    "decode_base64url",
    "encode_base64url",
    "generate_key",
    "key_id_of",
    "load_public_key",
    "load_signing_key",
    "load_trusted_keys",
    "parse_public_key",
    "save_public_key",
    "save_signing_key",
]

KEY_ID_PREFIX = "ed25519:"
# 16 hex digits = 64 bits: ample to tell apart the handful of keys one fleet
# rotates through, and short enough to read aloud; a collision among trusted
# keys is refused at load time rather than assumed away.
KEY_ID_HEX_DIGITS = 16
# Owner read/write only, like ssh's private keys.
PRIVATE_KEY_MODE = 0o600
PUBLIC_KEY_MODE = 0o644
# Bits that, if set on a private key file, let someone other than the owner
# read it (group and others, any permission).
_PRIVATE_FORBIDDEN_BITS = 0o077
RAW_PUBLIC_KEY_SIZE = 32
_PEM_MARKER = "-----BEGIN"


def encode_base64url(data: bytes) -> str:
    """Encode bytes as unpadded base64url (RFC 4648 section 5)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def decode_base64url(text: str) -> bytes:
    """Decode unpadded base64url, strictly.

    Raises:
        ValueError: ``text`` has characters outside the base64url alphabet,
            padding, or a length no encoding produces.
    """
    if not text.isascii() or "=" in text or len(text) % 4 == 1:
        raise ValueError(f"expected unpadded base64url, got {text!r}")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError(f"expected unpadded base64url, got {text!r}") from None
    # NOTE: urlsafe_b64decode silently drops characters outside its alphabet
    # ("+", "/", spaces), so a round trip is the only strict check.
    if encode_base64url(data) != text:
        raise ValueError(f"expected unpadded base64url, got {text!r}")
    return data


def key_id_of(raw_public_key: bytes) -> str:
    """Return the key id of a raw 32-byte Ed25519 public key.

    Returns:
        ``ed25519:`` followed by the first 16 hex digits of SHA-256 of the key.
    """
    digest = hashlib.sha256(raw_public_key).hexdigest()
    return KEY_ID_PREFIX + digest[:KEY_ID_HEX_DIGITS]


class PublicKey:
    """An Ed25519 public key that checks audit signatures."""

    __slots__ = ("_key", "key_id", "raw")

    def __init__(self, key: Ed25519PublicKey):
        self._key = key
        self.raw = key.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.key_id = key_id_of(self.raw)

    @classmethod
    def from_raw(cls, raw: bytes) -> PublicKey:
        """Build a key from its raw 32 bytes.

        Raises:
            ValueError: ``raw`` is not 32 bytes.
        """
        if len(raw) != RAW_PUBLIC_KEY_SIZE:
            raise ValueError(
                f"expected a {RAW_PUBLIC_KEY_SIZE}-byte Ed25519 public key, "
                f"got {len(raw)} bytes"
            )
        return cls(Ed25519PublicKey.from_public_bytes(raw))

    def verify(self, data: bytes, signature: bytes) -> bool:
        """Return whether ``signature`` is this key's signature of ``data``."""
        try:
            self._key.verify(signature, data)
        except InvalidSignature:
            return False
        return True

    def to_pem(self) -> bytes:
        """Return the key as SubjectPublicKeyInfo PEM."""
        return self._key.public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )

    def to_base64url(self) -> str:
        """Return the raw key as unpadded base64url (43 characters)."""
        return encode_base64url(self.raw)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"PublicKey({self.key_id!r})"


class SigningKey:
    """An Ed25519 private key that signs audit checkpoints."""

    __slots__ = ("_key", "_public")

    def __init__(self, key: Ed25519PrivateKey):
        self._key = key
        self._public = PublicKey(key.public_key())

    @property
    def key_id(self) -> str:
        """The key id of this key's public half."""
        return self._public.key_id

    def sign(self, data: bytes) -> bytes:
        """Return the 64-byte Ed25519 signature of ``data``."""
        return self._key.sign(data)

    def public(self) -> PublicKey:
        """Return the public half, to hand to verifiers."""
        return self._public

    def to_pem(self) -> bytes:
        """Return the key as unencrypted PKCS#8 PEM."""
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def __repr__(self) -> str:
        # Never the key material: reprs end up in logs and tracebacks.
        return f"SigningKey({self.key_id!r})"


def generate_key() -> SigningKey:
    """Return a new random Ed25519 signing key."""
    return SigningKey(Ed25519PrivateKey.generate())


def _write_new(path: pathlib.Path, data: bytes, mode: int, what: str) -> None:
    # O_EXCL makes "refuse to overwrite" atomic, and the mode is set at
    # creation so the key is never readable by others, not even briefly.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise ConfigError(
            f"{path}: {what} file already exists; expected a new path "
            "(a key file is never overwritten; move the old one away first)"
        ) from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot create {what} file: {err}") from err
    with os.fdopen(fd, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def save_signing_key(key: SigningKey, path: str | os.PathLike[str]) -> None:
    """Write ``key`` as PKCS#8 PEM to a new file with mode 0600.

    Raises:
        ConfigError: the file exists (it is left untouched) or cannot be
            created.
    """
    _write_new(pathlib.Path(path), key.to_pem(), PRIVATE_KEY_MODE, "private key")


def save_public_key(key: PublicKey, path: str | os.PathLike[str]) -> None:
    """Write ``key`` as PEM to a new file with mode 0644.

    Raises:
        ConfigError: the file exists (it is left untouched) or cannot be
            created.
    """
    _write_new(pathlib.Path(path), key.to_pem(), PUBLIC_KEY_MODE, "public key")


def _read(path: pathlib.Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read {what} file: {err}") from err


def load_signing_key(path: str | os.PathLike[str]) -> SigningKey:
    """Load the private key ``save_signing_key`` wrote.

    Raises:
        ConfigError: the file is missing, readable by group or others, or
            not an unencrypted PKCS#8 PEM Ed25519 private key.
    """
    path = pathlib.Path(path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read private key file: {err}") from err
    if mode & _PRIVATE_FORBIDDEN_BITS:
        raise ConfigError(
            f"{path}: private key permissions {mode:04o} are too open; expected "
            f"{PRIVATE_KEY_MODE:04o} (owner only), e.g. chmod 600 {path}"
        )
    expected = "expected an unencrypted PKCS#8 PEM Ed25519 private key"
    try:
        key = serialization.load_pem_private_key(_read(path, "private key"), None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise ConfigError(f"{path}: {expected}: {err}") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: {expected}, got a {type(key).__name__}")
    return SigningKey(key)


def parse_public_key(text: str, *, where: str = "public key") -> PublicKey:
    """Parse a public key given as PEM or as raw unpadded base64url.

    Args:
        text: the PEM text, or the 43-character base64url of the raw key;
            surrounding whitespace is ignored.
        where: names the source in error messages (a file, a config key).

    Raises:
        ConfigError: ``text`` is neither form of an Ed25519 public key.
    """
    text = text.strip()
    if text.startswith(_PEM_MARKER):
        expected = "expected an Ed25519 public key PEM"
        try:
            key = serialization.load_pem_public_key(text.encode("ascii"))
        except (ValueError, UnicodeEncodeError, UnsupportedAlgorithm) as err:
            raise ConfigError(f"{where}: {expected}: {err}") from err
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(f"{where}: {expected}, got a {type(key).__name__}")
        return PublicKey(key)
    try:
        return PublicKey.from_raw(decode_base64url(text))
    except ValueError as err:
        raise ConfigError(
            f"{where}: expected an Ed25519 public key as PEM or as 43 characters "
            f"of unpadded base64url: {err}"
        ) from None


def load_public_key(path: str | os.PathLike[str]) -> PublicKey:
    """Load a public key file (PEM or raw base64url).

    Raises:
        ConfigError: the file cannot be read or holds no Ed25519 public key.
    """
    path = pathlib.Path(path)
    data = _read(path, "public key")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigError(
            f"{path}: expected an Ed25519 public key as PEM or base64url text, "
            "got non-ASCII bytes"
        ) from None
    return parse_public_key(text, where=str(path))


def load_trusted_keys(
    paths: Iterable[str | os.PathLike[str]] = (), *, inline: Iterable[str] = ()
) -> dict[str, PublicKey]:
    """Collect the public keys a verifier trusts, by key id.

    Args:
        paths: public key files.
        inline: public keys written in configuration (PEM or base64url).

    Returns:
        Key id to public key. The same key given twice counts once.

    Raises:
        ConfigError: a key cannot be loaded, or two different keys share a
            key id (the id could not tell their signatures apart).
    """
    sources = [(str(path), load_public_key(path)) for path in paths]
    sources += [
        (f"inline key {index}", parse_public_key(text, where=f"inline key {index}"))
        for index, text in enumerate(inline)
    ]
    trusted: dict[str, PublicKey] = {}
    seen_at: dict[str, str] = {}
    for where, key in sources:
        known = trusted.get(key.key_id)
        if known is not None and known != key:
            raise ConfigError(
                f"{where}: key id {key.key_id} is already used by a different "
                f"key from {seen_at[key.key_id]}; expected distinct key ids"
            )
        trusted[key.key_id] = key
        seen_at.setdefault(key.key_id, where)
    return trusted
