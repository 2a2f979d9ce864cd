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
import re
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
    data = _read(path, "private key")
    # A public key (mode 0644 by design) named where the private key goes
    # is the likelier mistake than an open private key: say so first.
    if _looks_public(data):
        raise ConfigError(
            f"{path}: this is a public key; expected the private key (made by "
            f"keygen as NAME.pem beside NAME.pub){_private_beside(path)}"
        )
    if mode & _PRIVATE_FORBIDDEN_BITS:
        raise ConfigError(
            f"{path}: private key permissions {mode:04o} are too open; expected "
            f"{PRIVATE_KEY_MODE:04o} (owner only), e.g. chmod 600 {path}"
        )
    expected = "expected an unencrypted PKCS#8 PEM Ed25519 private key"
    try:
        key = serialization.load_pem_private_key(data, None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise ConfigError(f"{path}: {expected}: {err}") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: {expected}, got a {type(key).__name__}")
    return SigningKey(key)


def _looks_public(data: bytes) -> bool:
    """Whether a private key file's ``data`` is a public key instead: PEM
    labelled ``PUBLIC KEY``, or unpadded base64url of 32 bytes."""
    if not data.isascii():
        return False
    text = data.decode("ascii").strip()
    if text.startswith(_PEM_MARKER):
        return _pem_label(text) == "PUBLIC KEY"
    raw = _base64url_or_none(text)
    return raw is not None and len(raw) == RAW_PUBLIC_KEY_SIZE


def _private_beside(path: pathlib.Path) -> str:
    """``"; e.g. DIR/NAME.pem"`` when ``path`` is named like keygen's
    ``NAME.pub`` and that private key file exists, else ``""``."""
    if path.suffix != ".pub":
        return ""
    private = path.with_suffix(".pem")
    return f"; e.g. {private}" if private.is_file() else ""


def parse_public_key(text: str, *, where: str = "public key") -> PublicKey:
    """Parse a public key given as PEM or as raw unpadded base64url.

    Args:
        text: the PEM text, or the 43-character base64url of the raw key;
            surrounding whitespace is ignored.
        where: names the source in error messages (a file, a config key).

    Raises:
        ConfigError: ``text`` is neither form of an Ed25519 public key. The
            message describes what was found (its length, a PEM label) but
            never quotes it: a key setting pointed at the wrong file (a
            password, a private key) must not print that file in a log.
    """
    return _parse_public_key(text, where, f"{len(text)} characters")


def _parse_public_key(text: str, where: str, size: str) -> PublicKey:
    """``parse_public_key``; ``size`` says how large the source is in the
    error (``"120 characters"``, ``"a file of 120 bytes"``)."""
    text = text.strip()
    if text.startswith(_PEM_MARKER):
        label = _pem_label(text)
        if label is not None and "PRIVATE KEY" in label:
            raise ConfigError(
                f"{where}: expected an Ed25519 public key, got a private key "
                f"({size}, PEM {label!r}; content not shown): list the public "
                "key (made by keygen as NAME.pub beside NAME.pem) and keep the "
                "private key with its signer"
            )
        key = _pem_public_key(text)
        if not isinstance(key, Ed25519PublicKey):
            if key is not None:
                got = f"a {type(key).__name__}"
            elif label:
                got = f"PEM {label!r} that holds no readable key"
            else:
                got = "PEM without a readable header"
            raise ConfigError(
                f"{where}: expected an Ed25519 public key, {_PUBLIC_FORMS}; got "
                f"{got} ({size}; content not shown)"
            )
        return PublicKey(key)
    # Decoded apart from the raise, so the error carries no exception (whose
    # text quotes the input) as its context either.
    raw = _base64url_or_none(text)
    if raw is None:
        raise ConfigError(
            f"{where}: expected an Ed25519 public key, {_PUBLIC_FORMS}; got "
            f"{size} in neither form (content not shown)"
        )
    if len(raw) != RAW_PUBLIC_KEY_SIZE:
        raise ConfigError(
            f"{where}: expected an Ed25519 public key, {_PUBLIC_FORMS}; got "
            f"base64url of {len(raw)} bytes ({size}; content not shown)"
        )
    return PublicKey.from_raw(raw)


# The forms a public key may take, for the errors of a malformed one.
_PUBLIC_FORMS = (
    "as PEM ('-----BEGIN PUBLIC KEY-----') or as unpadded base64url of "
    f"{RAW_PUBLIC_KEY_SIZE} bytes (43 characters)"
)
# The label of a PEM block's first line; a label is no secret, and one
# that is no label is not shown.
_PEM_LABEL = re.compile(r"-----BEGIN ([A-Z0-9 ]{1,40})-----")


def _pem_public_key(text: str) -> object | None:
    """The public key PEM ``text`` holds, of any algorithm, or None."""
    try:
        return serialization.load_pem_public_key(text.encode("ascii"))
    except (ValueError, UnicodeEncodeError, UnsupportedAlgorithm):
        return None


def _base64url_or_none(text: str) -> bytes | None:
    """``decode_base64url(text)``, or None when it is no base64url."""
    try:
        return decode_base64url(text)
    except ValueError:
        return None


def _pem_label(text: str) -> str | None:
    """The label of the first PEM block in ``text`` (``"PUBLIC KEY"``), or
    None when its first line is no PEM header."""
    found = _PEM_LABEL.match(text)
    return found.group(1) if found else None


def load_public_key(path: str | os.PathLike[str]) -> PublicKey:
    """Load a public key file (PEM or raw base64url).

    Raises:
        ConfigError: the file cannot be read or holds no Ed25519 public key;
            the message names the file, its size and the forms expected,
            never its content.
    """
    path = pathlib.Path(path)
    data = _read(path, "public key")
    size = f"a file of {len(data)} bytes"
    if not data.isascii():
        raise ConfigError(
            f"{path}: expected an Ed25519 public key, {_PUBLIC_FORMS}; got "
            f"{size} that is not ASCII text (content not shown)"
        )
    return _parse_public_key(data.decode("ascii"), str(path), size)


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
