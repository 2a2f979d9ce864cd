"""Signed directory updates: the principals a collector publishes to a fleet.

A policy bundle carries policies signed offline by the policy publisher; a
directory update carries only the directory (who the principals are, their
roles and attributes, whether they are active), signed online by the
collector's directory key, so that a change made through SCIM reaches the
daemons without a new bundle. The two are signed by different keys, which
daemons trust through different settings, and neither form verifies as the
other.

The content is ``directory.json`` (``DIRECTORY_FILE``): the canonical JSON
(sorted keys, no whitespace, UTF-8, as ``bundle.canonical_json``) of
``{"format_version": 1, "kind": "directory", "principals": [...]}``, each
principal ``{"id", "kind", "roles", "attributes", "active"}`` with all five
fields, ids in Unicode NFC (``policy.names.canonical_name``) of at most
``MAX_NAME_LENGTH`` characters (the cap a request puts on the ids it names,
so that no principal is provisioned that no request could name), principals
sorted by id and roles sorted without repeats (``directory_content``). It
is a directory file as the policy loader reads one, and its revision is
``compute_revision`` of that one file, so the audit log stores and cites it
as ``directory/<revision>`` exactly as a bundle's directory.

An update is an uncompressed ustar tar in the bundle's deterministic packing
(``bundle.pack_members``: name order, zero mtime/uid/gid, mode 0644) of
three members:

- ``directory-update.json`` (``MANIFEST_NAME``): the manifest, canonical
  JSON ``{"v": 1, "kind": "directory", "revision", "created", "key_id",
  "sha256"}``; ``sha256`` is the hex SHA-256 of ``directory.json``,
  ``created`` an RFC 3339 UTC time as bundles write it;
- ``directory-update.sig`` (``SIGNATURE_NAME``): the Ed25519 signature of
  the exact manifest bytes, unpadded base64url, by the key ``key_id``;
- ``directory.json``: the content.

A bundle's manifest is ``bundle.json`` with other fields, so a bundle is no
update (refused as ``wrong_kind``) and an update is no bundle (it lacks
``bundle.json``); a manifest also says ``"kind": "directory"``, so one
signature never stands for both.

Verifying (``verify_directory_update``) checks, in this order, and stops
at the first problem (``DirectoryError.kind`` names it, a
``DirectoryProblem``): the update is at most ``MAX_DIRECTORY_BYTES``
(``too_large``); the tar reads and holds only safe regular files
(``malformed``, ``unsafe_path``); it is not a policy bundle
(``wrong_kind``); it holds exactly the three members (``missing_file``,
``extra_file``); the manifest is well-formed (``malformed``); its key is
trusted (``unknown_key``); the signature holds (``bad_signature``); the
content has the stated hash (``hash_mismatch``); the bytes are the
canonical packing, so no flipped header byte, padding or trailing byte
passes (``malformed``); the content decodes as a directory file in its
canonical form (``bad_content``); it has the stated revision
(``revision_mismatch``). Roles are not checked against any policy set: the
daemon compiles the directory against the policies it runs, keeping roles
they do not define (``compile_directory(..., unknown_roles="keep")``).

Size. ``MAX_DIRECTORY_BYTES`` is 64 MiB, as a bundle. A directory of
100,000 principals, each with two roles and three attributes (a
department, an email address and a display name, as SCIM provides them),
is about 21 MB (``tests/sync/test_directory_update.py`` builds one and
checks it is under a third of the cap), so the cap leaves room for richer
attributes. A ``nats://`` store carries an update in chunks
(``nats_store``), so the server's ``max_payload`` does not bound it.

Nothing here reads the clock, logs or does I/O: the caller passes
``created`` and ``now``; ``bundle.seconds_ahead`` measures how far an
update's ``created`` is ahead of a clock.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import msgspec

from kynara_sidecar.audit.keys import (
    PublicKey,
    SigningKey,
    encode_base64url,
)
from kynara_sidecar.audit.record import format_timestamp, parse_timestamp
from kynara_sidecar.decision import Timestamp
from kynara_sidecar.errors import KynaraError, PolicyError
from kynara_sidecar.policy.compiler import compute_revision
from kynara_sidecar.policy.loader import decode_document
from kynara_sidecar.policy.model import (
    DirectoryDocument,
    PrincipalKind,
    SourceDocument,
)
from kynara_sidecar.policy.names import MAX_NAME_LENGTH, canonical_name, is_valid_name
from kynara_sidecar.sync import MAX_DIRECTORY_BYTES
from kynara_sidecar.sync.bundle import (
    MANIFEST_NAME as BUNDLE_MANIFEST_NAME,
)
from kynara_sidecar.sync.bundle import (
    BundleError,
    canonical_json,
    check_canonical_manifest,
    check_packing,
    check_signature,
    pack_members,
    parse_manifest_fields,
    unpack_members,
)

__all__ = [
    "DIRECTORY_FILE",
    "DIRECTORY_VERSION",
    "MANIFEST_NAME",
    "MAX_DIRECTORY_BYTES",
    "SIGNATURE_NAME",
    "DirectoryError",
    "DirectoryProblem",
    "VerifiedDirectory",
    "build_directory_update",
    "directory_content",
    "canonical_principal_id",
    "directory_revision",
    "verify_directory_update",
]

DIRECTORY_FILE = "directory.json"
MANIFEST_NAME = "directory-update.json"
SIGNATURE_NAME = "directory-update.sig"
DIRECTORY_VERSION = 1

_MEMBERS = frozenset({MANIFEST_NAME, SIGNATURE_NAME, DIRECTORY_FILE})
_MANIFEST_FIELDS = frozenset({"v", "kind", "revision", "created", "key_id", "sha256"})
_PRINCIPAL_FIELDS = frozenset({"id", "kind", "roles", "attributes", "active"})
_KINDS = frozenset(kind.value for kind in PrincipalKind)
_SHA256_HEX_DIGITS = 64


class DirectoryProblem(enum.StrEnum):
    """What kind of problem made a directory update fail verification."""

    MALFORMED = "malformed"
    UNSAFE_PATH = "unsafe_path"
    # A policy bundle where a directory update was expected.
    WRONG_KIND = "wrong_kind"
    MISSING_FILE = "missing_file"
    EXTRA_FILE = "extra_file"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    HASH_MISMATCH = "hash_mismatch"
    # directory.json is no directory file in canonical form.
    BAD_CONTENT = "bad_content"
    REVISION_MISMATCH = "revision_mismatch"
    TOO_LARGE = "too_large"


class DirectoryError(KynaraError, ValueError):
    """A directory update (or its content) was refused; ``kind`` says why and
    ``path`` names the member or the place in ``directory.json`` to blame."""

    def __init__(self, kind: DirectoryProblem, message: str, *, path: str = ""):
        self.kind = kind
        self.path = path
        self.detail = message
        where = f" {path}:" if path else ""
        super().__init__(f"{kind.value}:{where} {message}")


class VerifiedDirectory(msgspec.Struct, frozen=True):
    """A directory update whose signature, hash and form checked out."""

    revision: str
    created: str
    key_id: str
    # directory.json, exactly as signed.
    content: bytes
    source: SourceDocument


# ---------------------------------------------------------------- content


def directory_content(principals: Iterable[Mapping[str, Any]]) -> bytes:
    """The canonical ``directory.json`` bytes for these principals.

    Args:
        principals: mappings with ``id`` and ``kind`` ("user" or "agent"),
            and optionally ``roles`` (role names), ``attributes`` (a mapping
            of string keys to JSON values) and ``active`` (default true).

    Returns:
        The bytes ``build_directory_update`` signs: ids in NFC, principals
        sorted by id, roles sorted without repeats.

    Raises:
        DirectoryError: ``bad_content``, naming the principal (by position)
            and what was wrong: an unknown field, an id refused by
            ``canonical_name`` or given twice, a bad kind, role name,
            attribute map or value (NaN or infinity are no JSON).
    """
    entries: dict[str, dict[str, Any]] = {}
    for index, principal in enumerate(principals):
        entry = _principal(principal, f"$.principals[{index}]")
        if entry["id"] in entries:
            raise _bad(
                f"expected unique principal ids, got {entry['id']!r} again",
                f"$.principals[{index}].id",
            )
        entries[entry["id"]] = entry
    document = {
        "format_version": 1,
        "kind": "directory",
        "principals": [entries[key] for key in sorted(entries)],
    }
    try:
        # The bundle's canonical JSON, refusing NaN and infinity, which
        # json.dumps would write but no JSON decoder reads.
        return json.dumps(
            document,
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
        ).encode()
    except (ValueError, TypeError) as err:
        raise _bad(f"expected JSON attribute values, got: {err}", "$") from None


def canonical_principal_id(value: str) -> str:
    """A principal id as a directory holds it: ``canonical_name`` (NFC,
    no deceiving characters) and at most ``MAX_NAME_LENGTH`` characters,
    the cap every request puts on the principal ids it names (``pipeline``),
    so that no principal is provisioned that no request could ever name.

    Raises:
        ValueError: ``canonical_name`` refuses it, or it is too long (the
            message names the cap).
    """
    name = canonical_name(value)
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(
            f"expected a principal id of 1..{MAX_NAME_LENGTH} characters (the "
            f"cap on the ids a request names), got {len(name)} characters"
        )
    return name


def _principal(principal: Mapping[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(principal, Mapping):
        raise _bad(f"expected a mapping, got {type(principal).__name__}", where)
    unknown = set(principal) - _PRINCIPAL_FIELDS
    if unknown:
        raise _bad(
            f"expected only fields {sorted(_PRINCIPAL_FIELDS)}, got {sorted(unknown)}",
            where,
        )
    principal_id = principal.get("id")
    if not isinstance(principal_id, str) or not principal_id:
        raise _bad(f"expected a non-empty string id, got {principal_id!r}", where)
    try:
        principal_id = canonical_principal_id(principal_id)
    except ValueError as err:
        raise _bad(
            f"principal id {principal_id[:80]!r}: {err}", f"{where}.id"
        ) from None
    kind = principal.get("kind")
    if kind not in _KINDS:
        raise _bad(f"expected kind 'agent' or 'user', got {kind!r}", f"{where}.kind")
    roles = principal.get("roles", [])
    if isinstance(roles, (str, bytes)) or not isinstance(roles, Iterable):
        raise _bad(f"expected a list of role names, got {roles!r}", f"{where}.roles")
    roles = list(roles)
    for role in roles:
        if not is_valid_name(role):
            raise _bad(
                f"expected role names of dot-separated [A-Za-z0-9_-] segments, "
                f"got {role!r}",
                f"{where}.roles",
            )
    attributes = principal.get("attributes", {})
    if not isinstance(attributes, Mapping) or not all(
        isinstance(key, str) for key in attributes
    ):
        raise _bad(
            "expected attributes as a mapping with string keys",
            f"{where}.attributes",
        )
    _check_value(attributes, f"{where}.attributes")
    active = principal.get("active", True)
    if not isinstance(active, bool):
        raise _bad(f"expected active true or false, got {active!r}", f"{where}.active")
    return {
        "id": principal_id,
        "kind": kind,
        "roles": sorted(set(roles)),
        "attributes": dict(attributes),
        "active": active,
    }


def _check_value(value: Any, where: str) -> None:
    """Refuse what the policy compiler would refuse in an attribute (so
    that no daemon is sent a directory it cannot compile): null, a map key
    that is no string or holds NUL, anything but JSON's types."""
    if isinstance(value, bool | int | float | str):
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str) or "\x00" in key:
                raise _bad(f"expected string map keys without NUL, got {key!r}", where)
            _check_value(item, f"{where}.{key}")
        return
    if isinstance(value, list | tuple):
        for position, item in enumerate(value):
            _check_value(item, f"{where}[{position}]")
        return
    raise _bad(
        "expected a string, number, bool, list or map (drop an attribute that "
        f"has no value), got {type(value).__name__}",
        where,
    )


def directory_revision(content: bytes) -> str:
    """The revision of ``directory.json`` with this content, as the policy
    compiler computes it (from the name and the bytes alone, so without
    decoding them)."""
    source = SourceDocument(
        path=DIRECTORY_FILE,
        name=DIRECTORY_FILE,
        content=content,
        document=DirectoryDocument(format_version=1, kind="directory"),
    )
    return compute_revision([source])


def _bad(message: str, path: str) -> DirectoryError:
    return DirectoryError(DirectoryProblem.BAD_CONTENT, message, path=path)


# ------------------------------------------------------------------ build


def build_directory_update(
    content: bytes, key: SigningKey, created: Timestamp
) -> bytes:
    """Sign ``content`` (``directory_content``'s bytes) as a directory update.

    Args:
        content: the canonical ``directory.json``.
        key: the collector's directory key.
        created: the creation time written in the manifest; a daemon takes
            an update only when it is newer than the one it has.

    Returns:
        The update's bytes; the same content, key and time give the same
        bytes.

    Raises:
        DirectoryError: ``bad_content`` when ``content`` is not a directory
            in canonical form; ``too_large`` past ``MAX_DIRECTORY_BYTES``.
    """
    source = _decode_content(content)
    manifest = {
        "v": DIRECTORY_VERSION,
        "kind": "directory",
        "revision": compute_revision([source]),
        "created": format_timestamp(created),
        "key_id": key.key_id,
        "sha256": hashlib.sha256(content).hexdigest(),
    }
    manifest_bytes = canonical_json(manifest)
    signature = encode_base64url(key.sign(manifest_bytes)).encode("ascii")
    data = pack_members(
        {
            MANIFEST_NAME: manifest_bytes,
            SIGNATURE_NAME: signature,
            DIRECTORY_FILE: content,
        }
    )
    if len(data) > MAX_DIRECTORY_BYTES:
        raise DirectoryError(DirectoryProblem.TOO_LARGE, _too_large(len(data)))
    return data


def _too_large(size: int) -> str:
    return (
        f"{size} bytes, over the {MAX_DIRECTORY_BYTES}-byte cap on a directory "
        "update (MAX_DIRECTORY_BYTES; every daemon refuses a larger one)"
    )


def _decode_content(content: bytes) -> SourceDocument:
    try:
        source = decode_document(DIRECTORY_FILE, content)
    except PolicyError as err:
        raise _bad(f"expected a directory file: {err}", DIRECTORY_FILE) from None
    if source.document.kind != "directory":
        raise _bad(
            f"expected kind 'directory', got {source.document.kind!r}", DIRECTORY_FILE
        )
    try:
        raw = json.loads(content)
        canonical = directory_content(raw.get("principals", []))
    except DirectoryError as err:
        raise _bad(err.detail, f"{DIRECTORY_FILE} {err.path}") from None
    if canonical != content:
        raise _bad(
            "expected the canonical form (directory_content: sorted keys and "
            "principals, NFC ids, sorted roles, all five fields, no whitespace)",
            DIRECTORY_FILE,
        )
    return source


# ----------------------------------------------------------------- verify


def verify_directory_update(
    data: bytes, trusted: Mapping[str, PublicKey]
) -> VerifiedDirectory:
    """Check a directory update whole.

    Args:
        data: the update's bytes.
        trusted: key id -> public key of the collectors' directory keys (a
            setting of its own, never the bundle keys).

    Returns:
        The verified directory, its content decoded (not compiled: the
        daemon compiles it against the policies it runs).

    Raises:
        DirectoryError: the first problem found (module docstring).
    """
    if len(data) > MAX_DIRECTORY_BYTES:
        raise DirectoryError(DirectoryProblem.TOO_LARGE, _too_large(len(data)))
    with _as_directory_error():
        members = unpack_members(data)
    if BUNDLE_MANIFEST_NAME in members:
        raise DirectoryError(
            DirectoryProblem.WRONG_KIND,
            "expected a directory update, got a policy bundle (it holds "
            f"{BUNDLE_MANIFEST_NAME}); publish bundles as bundles",
        )
    for name in sorted(_MEMBERS - set(members)):
        raise DirectoryError(
            DirectoryProblem.MISSING_FILE, "expected this member, got none", path=name
        )
    for name in sorted(set(members) - _MEMBERS):
        raise DirectoryError(
            DirectoryProblem.EXTRA_FILE,
            f"expected only {', '.join(sorted(_MEMBERS))}, got this one too",
            path=name,
        )
    manifest_bytes = members[MANIFEST_NAME]
    manifest = _parse_manifest(manifest_bytes)
    with _as_directory_error():
        check_signature(
            manifest_bytes,
            members[SIGNATURE_NAME],
            manifest["key_id"],
            trusted,
            names=(MANIFEST_NAME, SIGNATURE_NAME),
            keys="trusted directory keys",
        )
    content = members[DIRECTORY_FILE]
    digest = hashlib.sha256(content).hexdigest()
    if digest != manifest["sha256"]:
        raise DirectoryError(
            DirectoryProblem.HASH_MISMATCH,
            f"expected SHA-256 {manifest['sha256']}, got {digest}",
            path=DIRECTORY_FILE,
        )
    with _as_directory_error():
        check_packing(members, data)
    source = _decode_content(content)
    revision = compute_revision([source])
    if revision != manifest["revision"]:
        raise DirectoryError(
            DirectoryProblem.REVISION_MISMATCH,
            f"the manifest states {manifest['revision']}; the content is {revision}",
            path=MANIFEST_NAME,
        )
    return VerifiedDirectory(
        revision=revision,
        created=manifest["created"],
        key_id=manifest["key_id"],
        content=content,
        source=source,
    )


@contextlib.contextmanager
def _as_directory_error() -> Iterator[None]:
    """Name a refusal of the steps shared with bundles (``bundle``) as the
    same problem of a directory update."""
    try:
        yield
    except BundleError as err:
        raise DirectoryError(
            DirectoryProblem(err.kind.value), err.detail, path=err.path
        ) from None


def _parse_manifest(data: bytes) -> dict[str, Any]:
    def malformed(message: str) -> DirectoryError:
        return DirectoryError(DirectoryProblem.MALFORMED, message, path=MANIFEST_NAME)

    with _as_directory_error():
        manifest = parse_manifest_fields(
            data, name=MANIFEST_NAME, fields=_MANIFEST_FIELDS, version=DIRECTORY_VERSION
        )
    if manifest["kind"] != "directory":
        raise malformed(f"expected kind 'directory', got {manifest['kind']!r}")
    digest = manifest["sha256"]
    if len(digest) != _SHA256_HEX_DIGITS or digest.strip("0123456789abcdef"):
        raise malformed(f"expected sha256 as 64 lowercase hex digits, got {digest!r}")
    try:
        created = parse_timestamp(manifest["created"])
    except ValueError as err:
        raise malformed(f"created: {err}") from None
    if format_timestamp(created) != manifest["created"]:
        raise malformed(
            "expected created as format_timestamp writes it, got "
            f"{manifest['created']!r}"
        )
    with _as_directory_error():
        check_canonical_manifest(manifest, data, name=MANIFEST_NAME)
    return manifest
