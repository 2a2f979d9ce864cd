"""Signed policy bundles: one file that carries a policy directory.

A bundle is an uncompressed POSIX (ustar) tar holding, in name order:

- ``bundle.json``: the manifest, as canonical JSON (sorted keys, no
  whitespace, UTF-8): ``{"v": 1, "revision", "directory_revision",
  "created", "files": {name: sha256 hex}, "key_id"}``. ``revision`` and
  ``directory_revision`` are what the policy compiler computes for the
  files (``compute_revision``), so a daemon's audit records cite the same
  revision whether it read the directory or the bundle;
- ``bundle.sig``: the Ed25519 signature of the exact bytes of
  ``bundle.json``, in unpadded base64url, by the key ``key_id`` names;
- ``policies/NAME``: each file ``read_documents`` reads from the policy
  directory (so no policy tests and no dot files), under its path below
  the root. The prefix keeps a policy file called ``bundle.json`` apart
  from the manifest.

A policy directory without a directory file makes a bundle without one:
its manifest states ``directory_revision: ""`` (``loader.NO_DIRECTORY``).
Such a bundle is for a fleet whose daemons follow the collector's signed
directory (``directory.store``); a daemon without one refuses it, as it
refuses a policy directory without a directory file. Such daemons do not
compile a bundle's directory either (``verify_bundle(...,
directory="ignored")``): its revision is still checked, from its bytes.

Packing is deterministic: members in name order, every header with mtime
0, uid and gid 0, no user or group names, mode 0644. The same files, key
and creation time give the same bytes, and verifying exploits it: after
the signature and the hashes check out, the bundle is packed again from
what was read and must equal the input byte for byte. A flipped byte in a
header, in padding or past the end is thus refused as ``malformed`` even
though tar itself would not notice, and a verified bundle has exactly one
form.

Verifying checks, in this order, and stops at the first problem (its
``BundleProblem`` names the kind): the bundle is at most
``MAX_BUNDLE_BYTES``; the tar reads and holds only regular files with safe
relative names (no absolute path, ``..``, link or device); the manifest is
well-formed; its key is trusted; the signature holds; each listed file is
there with its hash and nothing else is; the bytes are the canonical
packing; the files compile, to the revisions the manifest states. A bundle
that passes is safe to activate whole. ``inspect_bundle`` runs every check
but the key and signature, for a tool that holds no trusted key (``bundle
publish`` without ``--trusted-key``): it still refuses what is not a bundle.

How far a bundle's ``created`` may be ahead of a daemon's clock is the
daemon's rule (``sync.max_clock_skew_seconds``); ``seconds_ahead`` measures
it, for the daemon and for the tools that warn about it.

The two functions at the edges, ``read_bundle`` and ``write_bundle``, are
the only I/O; ``build_bundle`` reads the policy directory through the
loader. Nothing here logs or reads the clock: the caller passes ``now``.

The daemon takes bundles through ``follower`` (from a bundle file or a
store), which caps a bundle file at ``MAX_BUNDLE_FILE_BYTES`` before reading
it, as a ``dir://`` store does (``MAX_BUNDLE_BYTES``); a NATS store refuses
one larger than the server's ``max_payload``.
"""

from __future__ import annotations

import enum
import hashlib
import io
import json
import os
import pathlib
import tarfile
import tempfile
from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from kynara_sidecar.audit.keys import (
    PublicKey,
    SigningKey,
    decode_base64url,
    encode_base64url,
)
from kynara_sidecar.audit.record import format_timestamp, parse_timestamp
from kynara_sidecar.decision import Timestamp
from kynara_sidecar.errors import ConfigError, KynaraError, PolicyError
from kynara_sidecar.policy.compiler import compute_revision
from kynara_sidecar.policy.loader import (
    LoadedPolicies,
    compile_documents,
    decode_document,
    read_documents,
)
from kynara_sidecar.sync import MAX_BUNDLE_BYTES, BundleTooLarge

__all__ = [
    "BUNDLE_VERSION",
    "MANIFEST_NAME",
    "POLICY_PREFIX",
    "SIGNATURE_NAME",
    "BundleError",
    "BundleProblem",
    "VerifiedBundle",
    "build_bundle",
    "build_manifest",
    "canonical_json",
    "check_canonical_manifest",
    "check_packing",
    "check_signature",
    "inspect_bundle",
    "pack_bundle",
    "pack_members",
    "parse_manifest_fields",
    "read_bundle",
    "seconds_ahead",
    "unpack_members",
    "verify_bundle",
    "write_bundle",
]

BUNDLE_VERSION = 1
MANIFEST_NAME = "bundle.json"
SIGNATURE_NAME = "bundle.sig"
POLICY_PREFIX = "policies/"
_MEMBER_MODE = 0o644
_MANIFEST_FIELDS = frozenset(
    {"v", "revision", "directory_revision", "created", "files", "key_id"}
)
_SHA256_HEX_DIGITS = 64
# How verifying treats a bundle's directory file (``verify_bundle``).
DirectoryUse = Literal["optional", "required", "ignored"]


class BundleProblem(enum.StrEnum):
    """What kind of problem made a bundle fail verification."""

    MALFORMED = "malformed"
    UNSAFE_PATH = "unsafe_path"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    MISSING_FILE = "missing_file"
    EXTRA_FILE = "extra_file"
    HASH_MISMATCH = "hash_mismatch"
    DOES_NOT_COMPILE = "does_not_compile"
    REVISION_MISMATCH = "revision_mismatch"
    # Larger than MAX_BUNDLE_BYTES: every daemon would refuse it.
    TOO_LARGE = "too_large"


class BundleError(KynaraError):
    """A bundle was refused; ``kind`` says why and ``path`` names the member
    (a policy file's name below the root, or a bundle member) when one is to
    blame."""

    def __init__(self, kind: BundleProblem, message: str, *, path: str = ""):
        self.kind = kind
        self.path = path
        # The message without the kind and path, for a caller adding a hint.
        self.detail = message
        where = f" {path}:" if path else ""
        super().__init__(f"{kind.value}:{where} {message}")


class VerifiedBundle(msgspec.Struct, frozen=True):
    """A bundle that verified and compiled whole."""

    revision: str
    directory_revision: str
    created: str
    key_id: str
    # Name below the policy root -> content.
    files: Mapping[str, bytes]
    policies: LoadedPolicies


# ------------------------------------------------------------------ build


def build_bundle(policy_dir: pathlib.Path, key: SigningKey, now: Timestamp) -> bytes:
    """Pack and sign the policy directory as a bundle.

    Args:
        policy_dir: the policy root, as ``load_policies`` takes it.
        key: the bundle signing key.
        now: the creation time written in the manifest.

    Returns:
        The bundle's bytes; the same directory, key and time give the same
        bytes.

    Raises:
        PolicyError: a file does not load, the set does not compile (a
            bundle that cannot be activated is never built) or there is
            more than one directory file (none makes a bundle without a
            directory, module docstring).
        BundleTooLarge: the bundle would be larger than ``MAX_BUNDLE_BYTES``,
            which every daemon refuses.
    """
    documents = read_documents(policy_dir)
    total = sum(len(document.content) for document in documents)
    if total > MAX_BUNDLE_BYTES:
        raise BundleTooLarge(_too_large(f"the files of {policy_dir}", total))
    loaded = compile_documents(documents, root=str(policy_dir), directory="optional")
    files = {document.name: document.content for document in documents}
    manifest = build_manifest(
        files,
        revision=loaded.policy_set.revision,
        directory_revision=loaded.directory.revision,
        created=format_timestamp(now),
        key_id=key.key_id,
    )
    data = pack_bundle(files, manifest, key)
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleTooLarge(_too_large(f"the bundle of {policy_dir}", len(data)))
    return data


def _too_large(what: str, size: int) -> str:
    return (
        f"{what}: {size} bytes, over the {MAX_BUNDLE_BYTES}-byte cap on a bundle "
        "(MAX_BUNDLE_BYTES; every daemon refuses a larger one); split the "
        "policies or trim them (a NATS store takes at most its server's "
        "max_payload, 1 MiB by default)"
    )


def build_manifest(
    files: Mapping[str, bytes],
    *,
    revision: str,
    directory_revision: str,
    created: str,
    key_id: str,
) -> dict[str, Any]:
    """The manifest (``bundle.json``) for these files, as a dict."""
    return {
        "v": BUNDLE_VERSION,
        "revision": revision,
        "directory_revision": directory_revision,
        "created": created,
        "files": {name: _sha256(content) for name, content in sorted(files.items())},
        "key_id": key_id,
    }


def pack_bundle(
    files: Mapping[str, bytes], manifest: Mapping[str, Any], key: SigningKey
) -> bytes:
    """Sign ``manifest`` and pack it with ``files`` into the bundle's bytes.

    Checks nothing about the files: ``build_bundle`` is the safe way in;
    this is the step after it (and lets tests build the bundles a broken
    or hostile builder would).
    """
    manifest_bytes = canonical_json(manifest)
    signature = encode_base64url(key.sign(manifest_bytes)).encode("ascii")
    members = {MANIFEST_NAME: manifest_bytes, SIGNATURE_NAME: signature}
    members.update({POLICY_PREFIX + name: content for name, content in files.items()})
    return pack_members(members)


def pack_members(members: Mapping[str, bytes]) -> bytes:
    """Pack ``members`` (name -> content) in the deterministic tar form
    described above; shared with signed directory updates (``directory``)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(members):
            content = members[name]
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mode = _MEMBER_MODE
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            try:
                tar.addfile(info, io.BytesIO(content))
            except ValueError as err:
                # ustar's limits: a path of at most 255 bytes.
                raise PolicyError(
                    f"expected a file name that fits a tar header: {err}", path=name
                ) from err
    return buffer.getvalue()


def canonical_json(value: Mapping[str, Any]) -> bytes:
    """``value`` as canonical JSON: sorted keys, no whitespace, UTF-8."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode()


def _sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


# ----------------------------------------------------------------- verify


def verify_bundle(
    data: bytes,
    trusted: Mapping[str, PublicKey],
    *,
    directory: DirectoryUse = "optional",
) -> VerifiedBundle:
    """Check a bundle whole and compile it.

    Args:
        data: the bundle's bytes.
        trusted: key id -> public key, as ``load_trusted_keys`` returns.
        directory: "optional" (a bundle without a directory file verifies,
            its directory ``NO_DIRECTORY``), "required" (such a bundle is
            refused as ``does_not_compile``: a daemon that takes its
            directory from the bundle) or "ignored" (its directory file is
            not compiled: a daemon that follows a signed directory).

    Returns:
        The verified bundle with its compiled policies.

    Raises:
        BundleError: the first problem found, its ``kind`` one of
            ``BundleProblem``; nothing is returned then.
    """
    return _verify(data, trusted, directory)


def inspect_bundle(data: bytes) -> VerifiedBundle:
    """Every check ``verify_bundle`` makes except the key's and the
    signature's: the size, the tar, the manifest, the files and their
    hashes, the canonical packing, the compile and the revisions.

    For a tool that holds no trusted key; the result's ``key_id`` is the one
    the manifest names, unchecked, so nothing may activate it.

    Raises:
        BundleError: the first problem found, as ``verify_bundle`` would.
    """
    return _verify(data, None, "optional")


def _verify(
    data: bytes, trusted: Mapping[str, PublicKey] | None, directory: DirectoryUse
) -> VerifiedBundle:
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleError(BundleProblem.TOO_LARGE, _too_large("bundle", len(data)))
    members = unpack_members(data)
    manifest_bytes = _member(members, MANIFEST_NAME)
    signature_text = _member(members, SIGNATURE_NAME)
    manifest = _parse_manifest(manifest_bytes)
    if trusted is not None:
        check_signature(manifest_bytes, signature_text, manifest["key_id"], trusted)
    files = _check_files(members, manifest["files"])
    check_packing(members, data)
    policies, directory_revision = _compile(files, directory)
    _check_revisions(manifest, policies.policy_set.revision, directory_revision)
    return VerifiedBundle(
        revision=manifest["revision"],
        directory_revision=manifest["directory_revision"],
        created=manifest["created"],
        key_id=manifest["key_id"],
        files=files,
        policies=policies,
    )


def seconds_ahead(created: str, now: Timestamp) -> float:
    """How many seconds a bundle's ``created`` is ahead of ``now`` (negative
    when it is behind).

    Raises:
        ValueError: ``created`` is not an RFC 3339 UTC timestamp.
    """
    moment = parse_timestamp(created)
    return (moment.seconds - now.seconds) + (moment.nanos - now.nanos) / 1e9


# Two zero blocks close a tar archive.
_END_OF_ARCHIVE = 2 * tarfile.BLOCKSIZE


def unpack_members(data: bytes) -> dict[str, bytes]:
    """The members of a tar in the form ``pack_members`` writes, checked for
    safe names and a whole archive (the packing itself is checked by
    packing again).

    Raises:
        BundleError: ``malformed`` or ``unsafe_path``.
    """
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                _check_member(info)
                if info.name in members:
                    raise BundleError(
                        BundleProblem.MALFORMED,
                        "expected each member once, got it twice",
                        path=info.name,
                    )
                extracted = tar.extractfile(info)
                assert extracted is not None  # a regular file, checked above
                members[info.name] = extracted.read()
            end = tar.offset
    except (tarfile.TarError, EOFError, OSError) as err:
        raise BundleError(
            BundleProblem.MALFORMED, f"expected a tar archive, got: {err}"
        ) from err
    # tar stops quietly where the bytes stop: a bundle cut on a member
    # boundary reads as a shorter archive. Its end-of-archive blocks say
    # it was not.
    if data[end : end + _END_OF_ARCHIVE] != bytes(_END_OF_ARCHIVE):
        raise BundleError(
            BundleProblem.MALFORMED,
            f"truncated: expected the end-of-archive blocks at byte {end}, "
            f"got {len(data)} bytes in all",
        )
    return members


def _check_member(info: tarfile.TarInfo) -> None:
    if not info.isreg():
        raise BundleError(
            BundleProblem.UNSAFE_PATH,
            "expected only regular files, got a link, device or directory",
            path=info.name,
        )
    _check_name(info.name)


def _check_name(name: str) -> None:
    parts = name.split("/")
    if (
        name.startswith("/")
        or "\\" in name
        or "\x00" in name
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise BundleError(
            BundleProblem.UNSAFE_PATH,
            "expected a relative path without '.', '..', empty parts or backslashes",
            path=name,
        )


def _member(members: Mapping[str, bytes], name: str) -> bytes:
    if name not in members:
        raise BundleError(
            BundleProblem.MALFORMED, "expected this member, got none", path=name
        )
    return members[name]


def _parse_manifest(data: bytes) -> dict[str, Any]:
    manifest = parse_manifest_fields(
        data,
        name=MANIFEST_NAME,
        fields=_MANIFEST_FIELDS,
        version=BUNDLE_VERSION,
        not_strings=frozenset({"files"}),
    )
    files = manifest["files"]
    if not isinstance(files, dict) or not all(
        isinstance(digest, str) and len(digest) == _SHA256_HEX_DIGITS
        for digest in files.values()
    ):
        raise BundleError(
            BundleProblem.MALFORMED,
            "expected files as a map of name to SHA-256 hex",
            path=MANIFEST_NAME,
        )
    check_canonical_manifest(manifest, data, name=MANIFEST_NAME)
    return manifest


# The steps signed directory updates (``directory``) verify with too; each
# refusal is a BundleError, which ``directory`` names as its own problem.


def parse_manifest_fields(
    data: bytes,
    *,
    name: str,
    fields: frozenset[str],
    version: int,
    not_strings: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """The first checks of a signed manifest: it is a JSON object with
    exactly ``fields``, ``v`` is ``version``, and every field but ``v`` and
    ``not_strings`` is a string. The caller checks the rest, then
    ``check_canonical_manifest``.

    Raises:
        BundleError: ``malformed``, at ``name``, saying which check failed.
    """

    def malformed(message: str) -> BundleError:
        return BundleError(BundleProblem.MALFORMED, message, path=name)

    try:
        manifest = json.loads(data)
    except (ValueError, RecursionError) as err:
        raise malformed(f"expected JSON, got: {err}") from None
    if not isinstance(manifest, dict) or set(manifest) != fields:
        got = sorted(manifest) if isinstance(manifest, dict) else type(manifest)
        raise malformed(f"expected fields {sorted(fields)}, got {got}")
    if manifest["v"] != version or isinstance(manifest["v"], bool):
        raise malformed(f"expected v {version}, got {manifest['v']!r}")
    for field in sorted(fields - {"v"} - not_strings):
        if not isinstance(manifest[field], str):
            raise malformed(f"expected {field} as a string, got {manifest[field]!r}")
    return manifest


def check_canonical_manifest(
    manifest: Mapping[str, Any], data: bytes, *, name: str
) -> None:
    """Refuse manifest bytes ``data`` that are not ``manifest``'s canonical
    JSON, so that one signature stands for one byte string only.

    Raises:
        BundleError: ``malformed``, at ``name``.
    """
    if canonical_json(manifest) != data:
        raise BundleError(
            BundleProblem.MALFORMED,
            "expected canonical JSON (sorted keys, no whitespace)",
            path=name,
        )


def check_signature(
    manifest: bytes,
    signature_text: bytes,
    key_id: str,
    trusted: Mapping[str, PublicKey],
    *,
    names: tuple[str, str] = (MANIFEST_NAME, SIGNATURE_NAME),
    keys: str = "trusted keys",
) -> None:
    """Check that ``signature_text`` (unpadded base64url) is ``key_id``'s
    Ed25519 signature of the exact ``manifest`` bytes, ``key_id`` being one
    of ``trusted``.

    Args:
        names: the manifest's and the signature's member names, for errors.
        keys: what ``trusted`` are, for the ``unknown_key`` error.

    Raises:
        BundleError: ``unknown_key``, ``malformed`` (no base64url) or
            ``bad_signature``.
    """
    manifest_name, signature_name = names
    key = trusted.get(key_id)
    if key is None:
        known = ", ".join(sorted(trusted)) or "none"
        raise BundleError(
            BundleProblem.UNKNOWN_KEY,
            f"signed by {key_id}, expected one of the {keys} ({known})",
        )
    try:
        signature = decode_base64url(signature_text.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as err:
        raise BundleError(
            BundleProblem.MALFORMED,
            f"expected an unpadded base64url signature: {err}",
            path=signature_name,
        ) from None
    if not key.verify(manifest, signature):
        raise BundleError(
            BundleProblem.BAD_SIGNATURE,
            f"expected a signature of {manifest_name} by {key_id}, got one that "
            "does not verify",
            path=signature_name,
        )


def check_packing(members: Mapping[str, bytes], data: bytes) -> None:
    """Refuse ``data`` unless it is exactly ``pack_members(members)``: no
    flipped header byte, padding or trailing byte around the signed content.

    Raises:
        BundleError: ``malformed``.
    """
    if pack_members(members) != data:
        raise BundleError(
            BundleProblem.MALFORMED,
            "expected the canonical tar form (name order, zero mtime/uid/gid, "
            "mode 0644, no trailing bytes), got other bytes around the signed "
            "content",
        )


def _check_files(
    members: Mapping[str, bytes], listed: Mapping[str, str]
) -> dict[str, bytes]:
    files = {
        name.removeprefix(POLICY_PREFIX): content
        for name, content in members.items()
        if name.startswith(POLICY_PREFIX)
    }
    for name in sorted(set(members) - set(files)):
        if name not in (MANIFEST_NAME, SIGNATURE_NAME) and not name.startswith(
            POLICY_PREFIX
        ):
            raise BundleError(
                BundleProblem.EXTRA_FILE, "expected no such member", path=name
            )
    for name in sorted(listed):
        _check_name(name)
        if name not in files:
            raise BundleError(
                BundleProblem.MISSING_FILE,
                "listed in the manifest, expected in the bundle, got nothing",
                path=name,
            )
        if _sha256(files[name]) != listed[name]:
            raise BundleError(
                BundleProblem.HASH_MISMATCH,
                f"expected SHA-256 {listed[name]}, got {_sha256(files[name])}",
                path=name,
            )
    for name in sorted(set(files) - set(listed)):
        raise BundleError(
            BundleProblem.EXTRA_FILE,
            "expected only files the manifest lists, got this one too",
            path=name,
        )
    return dict(sorted(files.items()))


def _compile(
    files: Mapping[str, bytes], directory: DirectoryUse
) -> tuple[LoadedPolicies, str]:
    """The compiled files and the revision of their directory file ("" for
    none), computed from its bytes when it is not compiled."""
    try:
        documents = [decode_document(name, content) for name, content in files.items()]
        loaded = compile_documents(documents, root="bundle", directory=directory)
        if directory != "ignored":
            return loaded, loaded.directory.revision
        directories = [item for item in documents if item.document.kind == "directory"]
        if len(directories) > 1:
            raise PolicyError(
                "expected at most one directory file, got "
                + ", ".join(item.path for item in directories),
                path="bundle",
            )
        return loaded, compute_revision(directories) if directories else ""
    except PolicyError as err:
        # The policy error already names the file and the location in it.
        problem = BundleError(BundleProblem.DOES_NOT_COMPILE, str(err))
        problem.path = err.path
        raise problem from err


def _check_revisions(
    manifest: Mapping[str, Any], policy_revision: str, directory_revision: str
) -> None:
    got = (policy_revision, directory_revision)
    stated = (manifest["revision"], manifest["directory_revision"])
    if got != stated:
        raise BundleError(
            BundleProblem.REVISION_MISMATCH,
            f"the manifest states policy {stated[0]}, directory {stated[1]}; "
            f"the files compile to policy {got[0]}, directory {got[1]}",
            path=MANIFEST_NAME,
        )


# ------------------------------------------------------------------ files


def read_bundle(path: str | os.PathLike[str]) -> bytes:
    """Read a bundle file whole.

    Raises:
        ConfigError: the file cannot be read.
    """
    try:
        return pathlib.Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read bundle file: {err}") from err


def write_bundle(path: str | os.PathLike[str], data: bytes) -> None:
    """Write a bundle to a new file, whole or not at all.

    The bytes go to a temporary file beside ``path``, are synced, then
    hard-linked into place: a reader never sees half a bundle, and an
    existing file is never overwritten.

    Raises:
        ConfigError: ``path`` exists (left untouched) or cannot be written.
    """
    target = pathlib.Path(path)
    try:
        fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=".bundle-")
    except OSError as err:
        raise ConfigError(f"{target}: cannot create bundle file: {err}") from err
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, _MEMBER_MODE)
        os.link(temporary, target)
    except FileExistsError:
        raise ConfigError(
            f"{target}: already exists; expected a new path (a bundle is never "
            "overwritten; move the old one away or pick another --out)"
        ) from None
    except OSError as err:
        raise ConfigError(f"{target}: cannot write bundle file: {err}") from err
    finally:
        os.unlink(temporary)
