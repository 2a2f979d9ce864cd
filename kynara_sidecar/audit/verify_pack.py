#!/usr/bin/env python3
"""Verify a Kynara evidence pack offline: ``python verify_pack.py PACK``.

This one file needs Python 3.11+ and the ``cryptography`` package, nothing
else: it is copied into every pack that ``kynara-sidecar export`` writes, so
an auditor can check the pack without the Kynara sidecar. Prefer giving the
key you obtained from the operator yourself (``--trusted-key FILE``, PEM or
the raw key as 43 characters of unpadded base64url, repeatable) over the
keys the pack carries: a pack's own keys prove only that someone signed it.
The keys of whoever signed the policy bundles and directory updates are
given apart (``--publisher-key FILE``, same forms, repeatable): they are
never trusted for checkpoints, and audit keys never for signed updates.
It prints ``ok: ...`` (exit 0) or the first problem found (exit 1).

What a pack holds
-----------------
``records.jsonl``
    The audit records of whole sealed segments, seq ``first_seq`` through
    ``last_seq``, one per line: the exact bytes the daemon hashed (canonical
    JSON: sorted keys, UTF-8, no insignificant whitespace, so no newline).
``checkpoints.jsonl``
    The signed checkpoints from the pack's base (the checkpoint just before
    its first record; absent when the pack starts at record 1) through the
    checkpoint that seals its last record, one canonical JSON object a line.
    A checkpoint signs ``origin``, ``log_id``, ``tree_size``, the Merkle
    ``root`` over records 1..tree_size, the ``chain_hash`` of record
    tree_size, ``time`` and ``key_id``: the Ed25519 ``signature`` (unpadded
    base64url) covers
    ``json.dumps({every other field}, sort_keys=True, separators=(",", ":"))``.
``proofs.json``
    ``compact_range``: the Merkle tree's right edge at the base (one subtree
    root per set bit of the base tree size, largest first), so the roots of
    later checkpoints can be rebuilt from the records alone; ``consistency``:
    RFC 9162 consistency proofs between each pair of successive checkpoints
    and from the first to the last.
``keys/``
    Public keys (PEM), named by key id; ``key_rotation`` records in the
    records extend trust from a trusted key to its successor.
``policy_sets/<part>/<revision>/``
    The policy and directory source files the records cite; their revision
    (``sha256:`` over the sorted, length-prefixed names and contents) is
    recomputed here, so they are bound to the signed records that name it.
``signed/<part>/sha256-<hex>.tar``
    The signed bytes a cited revision arrived in, as the daemon kept them:
    for ``directory``, the collector's signed directory update (members
    ``directory-update.json``, its manifest; ``directory-update.sig``, the
    Ed25519 signature of the manifest's exact bytes, unpadded base64url;
    ``directory.json``); for ``policy``, the signed policy bundle
    (``bundle.json``, ``bundle.sig``, ``policies/NAME``). The file name is
    the SHA-256 of the bytes. Each is checked here: the hashes its manifest
    states, that it carries exactly the cited revision's files, and its
    signature under the ``--publisher-key`` keys only (the collector's
    directory key, the bundle key), never under the audit keys, so a
    publisher's key cannot vouch for checkpoints nor an audit key for
    policies. Without any ``--publisher-key`` they are reported as not
    checked, not failed; once publisher keys are given, one signed under a
    key id not among them fails the pack.
``export.json``
    What the operator asked for (the time range, the records left out
    because no checkpoint sealed them yet). A claim of the exporter, not
    evidence: nothing signs it.
``manifest.json``
    The origin, log id, tree sizes, record count and time span, the approval
    records, keys and policy sets, and the SHA-256 of every other file; it
    is written as ``json.dumps(manifest, sort_keys=True, indent=2) + "\\n"``
    and each of its facts is recomputed here from the files.

The checks, in order (the first failure is reported): the manifest's form
and every file's hash; checkpoint and record form, and that every checkpoint
names the manifest's origin and log id; the hash chain, from the
base checkpoint's ``chain_hash`` (32 zero bytes at record 1), against each
checkpoint; each checkpoint's Merkle root, recomputed from the compact range
and the records (RFC 9162: leaf ``SHA-256(0x00 || record)``, node
``SHA-256(0x01 || left || right)``); each signature under the keys trusted
at its tree size; the consistency proofs; the policy set revisions; the
manifest's facts; and the limits: each decision's seen ``count`` and ``sum``
of a limit, recomputed from the pack's earlier records of the same limit,
definition and key in its window (see the limits section below for which
windows a pack can check). Record times come from the daemon host's clock.

NOTE: nothing signs the manifest or ``export.json``; the signed checkpoints
are the trust anchor, and every manifest fact, the origin and log id among
them, is recomputed from files they bind.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import datetime
import hashlib
import io
import json
import math
import pathlib
import re
import sys
import tarfile
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

__all__ = [
    "CHECKPOINTS_FILE",
    "DOUBLE_SHIFT",
    "EXPORT_FILE",
    "Held",
    "KEYS_DIR",
    "LimitsChecked",
    "MANIFEST_FILE",
    "PACK_FORMAT",
    "PACK_VERSION",
    "POLICY_SETS_DIR",
    "PROOFS_FILE",
    "RECORDS_FILE",
    "SCRIPT_FILE",
    "SIGNED_DIR",
    "SIGNED_MEMBERS",
    "PackError",
    "PackReport",
    "REVISION_RE",
    "SeenAbove",
    "SeenCompared",
    "SeenHistory",
    "SeenValues",
    "canonical_json",
    "compare_seen",
    "compute_revision",
    "double_units",
    "encode_manifest",
    "exact_parts",
    "exact_sum",
    "key_id_of",
    "main",
    "public_key_pem",
    "revision_dir",
    "rounded_sum",
    "seen_above_text",
    "time_range",
    "verify_pack",
]

PACK_FORMAT = "kynara-evidence-pack"
PACK_VERSION = 1
MANIFEST_FILE = "manifest.json"
RECORDS_FILE = "records.jsonl"
CHECKPOINTS_FILE = "checkpoints.jsonl"
PROOFS_FILE = "proofs.json"
EXPORT_FILE = "export.json"
SCRIPT_FILE = "verify_pack.py"
KEYS_DIR = "keys"
POLICY_SETS_DIR = "policy_sets"
SIGNED_DIR = "signed"
# The manifest and signature members of a signed update, by part.
SIGNED_MEMBERS = {
    "directory": ("directory-update.json", "directory-update.sig"),
    "policy": ("bundle.json", "bundle.sig"),
}
DIRECTORY_CONTENT = "directory.json"
BUNDLE_FILES_PREFIX = "policies/"

HASH_SIZE = 32
GENESIS_HASH = bytes(HASH_SIZE)
SIGNATURE_SIZE = 64
RAW_KEY_SIZE = 32
KEY_ID_PREFIX = "ed25519:"
KEY_ID_HEX_DIGITS = 16
APPROVAL_KINDS = ("approval_requested", "approval_reviewed", "approval_resolved")
CHECKPOINT_FIELDS = frozenset(
    {"v", "kind", "origin", "log_id", "tree_size", "root", "chain_hash", "time"}
    | {"key_id", "signature"}
)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_LOG_ID = re.compile(r"^[0-9a-f]{32}$")
_KEY_ID = re.compile(rf"^{KEY_ID_PREFIX}[0-9a-f]{{{KEY_ID_HEX_DIGITS}}}$")
_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$")
REVISION_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


class PackError(Exception):
    """The first problem found in a pack: ``kind`` names the check."""

    def __init__(self, kind: str, message: str):
        self.kind = kind
        super().__init__(f"{kind}: {message}")


class PackReport:
    """A pack that verified: what it holds and which keys vouched for it."""

    def __init__(
        self,
        manifest: dict[str, Any],
        keys_from: str,
        signers: list[str],
        unchecked: list[str] | None = None,
        limits: LimitsChecked | None = None,
    ):
        self.manifest = manifest
        self.keys_from = keys_from
        self.signers = signers
        # Signed updates whose signer is not among the --publisher-key keys.
        self.unchecked = unchecked or []
        # The decisions' seen limit values recomputed from the records.
        self.limits = limits or LimitsChecked()

    def summary(self) -> str:
        m = self.manifest
        records, sizes = m["records"], m["tree_sizes"]
        return (
            f"ok: {m['origin']} log {m['log_id']}: {records['count']} records "
            f"(seq {records['first_seq']}..{records['last_seq']}), "
            f"{len(sizes['checkpoints'])} checkpoints (tree size {sizes['first']} "
            f"to {sizes['last']}), signed by {', '.join(self.signers)}; "
            f"trusted keys from {self.keys_from}"
            + self._signed_summary()
            + self.limits.summary()
        )

    def _signed_summary(self) -> str:
        signed = self.manifest.get("signed") or []
        if not signed:
            return ""
        checked = len(signed) - len(self.unchecked)
        text = f"; signed updates: {checked} of {len(signed)} checked"
        if self.unchecked:
            text += (
                " (not checked, signer not given: "
                + ", ".join(self.unchecked)
                + "; pass its key with --publisher-key)"
            )
        return text


# ------------------------------------------------------------ shared forms


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the form that is signed."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode()


def encode_manifest(manifest: dict[str, Any]) -> bytes:
    """The exact bytes of ``manifest.json``."""
    return (json.dumps(manifest, sort_keys=True, indent=2) + "\n").encode()


def key_id_of(raw: bytes) -> str:
    """``ed25519:`` and the first 16 hex digits of SHA-256 of the raw key."""
    return KEY_ID_PREFIX + hashlib.sha256(raw).hexdigest()[:KEY_ID_HEX_DIGITS]


def public_key_pem(raw: bytes) -> bytes:
    """The SubjectPublicKeyInfo PEM of a raw Ed25519 public key."""
    return Ed25519PublicKey.from_public_bytes(raw).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def compute_revision(files: dict[str, bytes]) -> str:
    """``sha256:<hex>`` over the sorted, length-prefixed names and contents
    (the policy loader's revision of a set of source files)."""
    digest = hashlib.sha256()
    for name in sorted(files):
        for part in (name.encode(), files[name]):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
    return "sha256:" + digest.hexdigest()


def time_range(times: Iterable[Any]) -> dict[str, str]:
    """The earliest and latest of the record times in RFC 3339 UTC form
    (compared as instants: ``09:00:00.5Z`` is after ``09:00:00Z``)."""
    valid = [t for t in times if isinstance(t, str) and _TIME.fullmatch(t)]

    def instant(t: str) -> tuple[str, str]:
        return t[:19], t[19:-1].lstrip(".").ljust(9, "0")

    return {
        "first": min(valid, key=instant, default=""),
        "last": max(valid, key=instant, default=""),
    }


def revision_dir(part: str, revision: str) -> str:
    """Where a revision's files live in a pack (no ``:`` in file names)."""
    return f"{POLICY_SETS_DIR}/{part}/{revision.replace(':', '-')}"


def _b64url(text: str) -> bytes:
    if not isinstance(text, str) or not text.isascii() or "=" in text:
        raise ValueError(f"expected unpadded base64url, got {text!r}")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        raise ValueError(f"expected unpadded base64url, got {text!r}") from None
    if base64.urlsafe_b64encode(data).rstrip(b"=").decode() != text:
        raise ValueError(f"expected unpadded base64url, got {text!r}")
    return data


# ------------------------------------------------------------------- Merkle


def _leaf(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


class _Edge:
    """The tree's right edge: one perfect subtree root per set bit of size."""

    def __init__(self, size: int, hashes: list[bytes]):
        self.size, self.hashes = size, hashes

    def append(self, leaf: bytes) -> None:
        node, carry = leaf, self.size
        while carry & 1:
            node = _node(self.hashes.pop(), node)
            carry >>= 1
        self.hashes.append(node)
        self.size += 1

    def root(self) -> bytes:
        if not self.hashes:
            return hashlib.sha256(b"").digest()
        result = self.hashes[-1]
        for left in reversed(self.hashes[:-1]):
            result = _node(left, result)
        return result


def _verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: list
) -> bool:
    # RFC 9162 section 2.1.4.2, with its edges (equal sizes) decided here.
    if old_size == new_size:
        return not proof and old_root == new_root
    if not 0 < old_size < new_size or not proof:
        return False
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr, sr = _node(c, fr), _node(c, sr)
            while fn and not fn & 1:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = _node(sr, c)
        fn, sn = fn >> 1, sn >> 1
    return fr == old_root and sr == new_root and sn == 0


# ----------------------------------------------------------------- reading


def _read(pack: pathlib.Path, name: str) -> bytes:
    try:
        return (pack / name).read_bytes()
    except OSError as err:
        raise PackError("missing", f"cannot read {name}: {err}") from None


def _json(data: bytes, where: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise PackError("malformed", f"{where} is not JSON: {err}") from None


def _lines(data: bytes, where: str) -> list[bytes]:
    if data and not data.endswith(b"\n"):
        raise PackError("malformed", f"{where} does not end with a newline")
    return data.split(b"\n")[:-1] if data else []


def _hex(value: Any, where: str) -> bytes:
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise PackError("malformed", f"{where}: expected 64 lowercase hex digits")
    return bytes.fromhex(value)


def _check_manifest(pack: pathlib.Path) -> dict[str, Any]:
    raw = _read(pack, MANIFEST_FILE)
    manifest = _json(raw, MANIFEST_FILE)
    if not isinstance(manifest, dict) or encode_manifest(manifest) != raw:
        raise PackError(
            "manifest",
            f"{MANIFEST_FILE} is not in its canonical form "
            "(json.dumps(sort_keys=True, indent=2) and a newline)",
        )
    if (manifest.get("format"), manifest.get("version")) != (
        PACK_FORMAT,
        PACK_VERSION,
    ):
        raise PackError(
            "manifest",
            f"expected format {PACK_FORMAT!r} version {PACK_VERSION}, got "
            f"{manifest.get('format')!r} version {manifest.get('version')!r}",
        )
    for key in ("origin", "log_id", "files", "records", "tree_sizes"):
        if key not in manifest:
            raise PackError("manifest", f"{MANIFEST_FILE} lacks {key!r}")
    for key in ("records", "tree_sizes"):
        if not isinstance(manifest[key], dict):
            raise PackError("manifest", f"{key}: expected an object")
    if not isinstance(manifest["log_id"], str) or not _LOG_ID.fullmatch(
        manifest["log_id"]
    ):
        raise PackError("manifest", "log_id: expected 32 lowercase hex digits")
    return manifest


def _check_files(pack: pathlib.Path, listed: Any) -> None:
    if not isinstance(listed, dict):
        raise PackError("manifest", "files: expected an object of path -> sha256")
    present = {
        path.relative_to(pack).as_posix()
        for path in pack.rglob("*")
        if path.is_file() or path.is_symlink()
    } - {MANIFEST_FILE}
    extra = sorted(present - set(listed))
    if extra:
        raise PackError("extra_file", f"{extra[0]} is in the pack, not the manifest")
    for name in sorted(listed):
        if name not in present:
            raise PackError("missing", f"{name} is in the manifest but not the pack")
        if (pack / name).is_symlink():
            raise PackError("malformed", f"{name} is a symbolic link")
        digest = hashlib.sha256(_read(pack, name)).hexdigest()
        if digest != listed[name]:
            raise PackError(
                "file_hash",
                f"{name}: SHA-256 is {digest}, the manifest says {listed[name]}",
            )


def _checkpoint(line: bytes, index: int) -> dict[str, Any]:
    where = f"{CHECKPOINTS_FILE} line {index + 1}"
    cp = _json(line, where)
    if not isinstance(cp, dict) or set(cp) != CHECKPOINT_FIELDS:
        raise PackError("malformed", f"{where}: expected the fields of CheckpointV1")
    if canonical_json(cp) != line:
        raise PackError("malformed", f"{where}: not canonical JSON")
    if cp["v"] != 1 or cp["kind"] != "checkpoint":
        raise PackError("malformed", f"{where}: expected v 1 and kind 'checkpoint'")
    if not isinstance(cp["log_id"], str) or not _LOG_ID.fullmatch(cp["log_id"]):
        raise PackError("malformed", f"{where}: log_id is not 32 lowercase hex")
    if type(cp["tree_size"]) is not int or cp["tree_size"] < 1:
        raise PackError("malformed", f"{where}: tree_size must be an integer >= 1")
    _hex(cp["root"], f"{where}: root")
    _hex(cp["chain_hash"], f"{where}: chain_hash")
    if not isinstance(cp["time"], str) or not _TIME.fullmatch(cp["time"]):
        raise PackError("malformed", f"{where}: time is not RFC 3339 UTC")
    if not isinstance(cp["key_id"], str) or not _KEY_ID.fullmatch(cp["key_id"]):
        raise PackError("malformed", f"{where}: key_id is not 'ed25519:<16 hex>'")
    return cp


def _checkpoints(pack: pathlib.Path, origin: str, log_id: str) -> list[dict[str, Any]]:
    lines = _lines(_read(pack, CHECKPOINTS_FILE), CHECKPOINTS_FILE)
    cps = [_checkpoint(line, index) for index, line in enumerate(lines)]
    if not cps:
        raise PackError("malformed", f"{CHECKPOINTS_FILE} holds no checkpoint")
    for before, after in zip(cps, cps[1:], strict=False):
        if after["tree_size"] <= before["tree_size"]:
            raise PackError(
                "malformed",
                f"checkpoint at tree size {after['tree_size']} follows "
                f"{before['tree_size']}: expected ascending tree sizes",
            )
    for cp in cps:
        if cp["origin"] != origin:
            raise PackError(
                "origin",
                f"checkpoint at tree size {cp['tree_size']} is of origin "
                f"{cp['origin']!r}, the manifest says {origin!r}",
            )
        if cp["log_id"] != log_id:
            raise PackError(
                "log_id",
                f"checkpoint at tree size {cp['tree_size']} is of log "
                f"{cp['log_id']}, the manifest says {log_id}",
            )
    return cps


def _records(pack: pathlib.Path, first_seq: int) -> list[tuple[bytes, dict]]:
    lines = _lines(_read(pack, RECORDS_FILE), RECORDS_FILE)
    out = []
    for offset, line in enumerate(lines):
        seq = first_seq + offset
        record = _json(line, f"{RECORDS_FILE} line {offset + 1}")
        if not isinstance(record, dict) or record.get("seq") != seq:
            raise PackError(
                "reordered",
                f"{RECORDS_FILE} line {offset + 1}: expected record {seq}, got "
                f"{record.get('seq') if isinstance(record, dict) else record!r}",
            )
        out.append((line, record))
    return out


# ---------------------------------------------------------------- the walk


def _base(manifest: dict, cps: list[dict]) -> tuple[int, dict | None, list[dict]]:
    first = manifest["tree_sizes"].get("first")
    if type(first) is not int or first < 0:
        raise PackError("manifest", "tree_sizes.first: expected an integer >= 0")
    if first == 0:
        return 0, None, cps
    if cps[0]["tree_size"] != first:
        raise PackError(
            "missing",
            f"the pack starts after tree size {first} but its first checkpoint "
            f"is at {cps[0]['tree_size']}",
        )
    return first, cps[0], cps[1:]


def _walk(
    records: list[tuple[bytes, dict]],
    base: int,
    base_cp: dict | None,
    sealing: list[dict],
    compact: Any,
) -> None:
    """Chain hashes and Merkle roots, checked against every checkpoint."""
    if not sealing or sealing[-1]["tree_size"] != base + len(records):
        raise PackError(
            "truncated",
            f"records end at {base + len(records)}, but the last checkpoint "
            f"seals {sealing[-1]['tree_size'] if sealing else 'nothing'}",
        )
    prev = GENESIS_HASH if base_cp is None else bytes.fromhex(base_cp["chain_hash"])
    edge = _edge(compact, base, base_cp)
    due = {cp["tree_size"]: cp for cp in sealing}
    for offset, (line, _) in enumerate(records):
        seq = base + offset + 1
        prev = hashlib.sha256(prev + line).digest()
        edge.append(_leaf(line))
        cp = due.get(seq)
        if cp is None:
            continue
        if prev.hex() != cp["chain_hash"]:
            raise PackError(
                "chain",
                f"chain hash of record {seq} is {prev.hex()}, its checkpoint "
                f"says {cp['chain_hash']}: a record up to {seq} was edited",
            )
        if edge.root().hex() != cp["root"]:
            raise PackError(
                "root",
                f"Merkle root at tree size {seq} is {edge.root().hex()}, the "
                f"checkpoint says {cp['root']}",
            )


def _edge(compact: Any, base: int, base_cp: dict | None) -> _Edge:
    if not isinstance(compact, dict) or compact.get("tree_size") != base:
        raise PackError(
            "proof", f"compact_range: expected one at tree size {base} (the base)"
        )
    hashes = compact.get("hashes")
    if not isinstance(hashes, list) or len(hashes) != base.bit_count():
        raise PackError(
            "proof",
            f"compact_range: expected {base.bit_count()} hashes for tree size {base}",
        )
    edge = _Edge(base, [_hex(h, "compact_range hash") for h in hashes])
    if base_cp is not None and edge.root().hex() != base_cp["root"]:
        raise PackError(
            "proof",
            f"compact range at tree size {base} folds to {edge.root().hex()}, "
            f"not the base checkpoint's root {base_cp['root']}",
        )
    return edge


def _load_key(text: str, where: str) -> tuple[str, Ed25519PublicKey]:
    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.encode("ascii"))
        else:
            key = Ed25519PublicKey.from_public_bytes(_b64url(text))
    except (ValueError, UnicodeEncodeError, UnsupportedAlgorithm) as err:
        raise PackError("key", f"{where}: not an Ed25519 public key: {err}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise PackError("key", f"{where}: expected an Ed25519 public key")
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return key_id_of(raw), key


def _pack_keys(pack: pathlib.Path) -> tuple[dict[str, Ed25519PublicKey], list]:
    """The keys in keys/, and their manifest entries (file and key id)."""
    keys, entries = {}, []
    directory = pack / KEYS_DIR
    paths = sorted(directory.iterdir()) if directory.is_dir() else []
    for path in paths:
        name = f"{KEYS_DIR}/{path.name}"
        key_id, key = _load_key(path.read_bytes().decode("ascii", "replace"), name)
        keys[key_id] = key
        entries.append({"file": name, "key_id": key_id})
    return keys, entries


def _verify_signature(cp: dict, trusted: dict[str, Ed25519PublicKey]) -> None:
    where = f"checkpoint at tree size {cp['tree_size']}"
    key = trusted.get(cp["key_id"])
    if key is None:
        raise PackError(
            "unknown_key",
            f"{where} is signed by {cp['key_id']}, which is not trusted "
            f"(trusted: {', '.join(sorted(trusted)) or 'none'})",
        )
    try:
        signature = _b64url(cp["signature"])
    except ValueError as err:
        raise PackError("malformed", f"{where}: signature: {err}") from None
    signed = canonical_json({k: v for k, v in cp.items() if k != "signature"})
    try:
        if len(signature) != SIGNATURE_SIZE:
            raise InvalidSignature
        key.verify(signature, signed)
    except InvalidSignature:
        raise PackError(
            "bad_signature", f"{where}: signature does not verify under {cp['key_id']}"
        ) from None


def _rotate(
    record: dict, trusted: dict[str, Ed25519PublicKey], origin: str, log_id: str
) -> dict[str, Ed25519PublicKey]:
    # A rotation signed by a key trusted at this point extends trust to the
    # key it names; any other rotation extends nothing.
    entry = record.get("key_rotation")
    if not isinstance(entry, dict):
        return trusted
    old = trusted.get(entry.get("old_key_id"))
    if old is None:
        return trusted
    try:
        raw = _b64url(entry["new_public_key"])
        new = Ed25519PublicKey.from_public_bytes(raw)
        signature = _b64url(entry["signature"])
        signed = canonical_json(
            {
                "log_id": log_id,
                "new_key_id": entry["new_key_id"],
                "new_public_key": entry["new_public_key"],
                "old_key_id": entry["old_key_id"],
                "origin": origin,
            }
        )
        old.verify(signature, signed)
    except (KeyError, ValueError, InvalidSignature):
        return trusted
    if key_id_of(raw) != entry["new_key_id"]:
        return trusted
    return {**trusted, entry["new_key_id"]: new}


def _verify_signatures(
    cps: list[dict],
    records: list[tuple[bytes, dict]],
    base: int,
    trusted: dict[str, Ed25519PublicKey],
    manifest: dict,
) -> list[str]:
    rotations = {
        base + offset + 1: record
        for offset, (_, record) in enumerate(records)
        if record.get("kind") == "key_rotation"
    }
    signers: list[str] = []
    seq = base
    for cp in cps:
        for at in range(seq + 1, cp["tree_size"] + 1):
            if at in rotations:
                origin, log_id = manifest["origin"], manifest["log_id"]
                trusted = _rotate(rotations[at], trusted, origin, log_id)
        seq = max(seq, cp["tree_size"])
        _verify_signature(cp, trusted)
        if cp["key_id"] not in signers:
            signers.append(cp["key_id"])
    return signers


def _verify_proofs(proofs: dict, cps: list[dict]) -> None:
    listed = proofs.get("consistency")
    if not isinstance(listed, list):
        raise PackError("proof", "consistency: expected a list of proofs")
    by_pair = {}
    for entry in listed:
        if not isinstance(entry, dict) or not isinstance(entry.get("proof"), list):
            raise PackError("proof", f"consistency: malformed entry {entry!r}")
        pair = (entry.get("old_size"), entry.get("new_size"))
        by_pair[pair] = [_hex(h, f"consistency {pair}") for h in entry["proof"]]
    roots = {cp["tree_size"]: bytes.fromhex(cp["root"]) for cp in cps}
    for old, new in _expected_pairs([cp["tree_size"] for cp in cps]):
        proof = by_pair.pop((old, new), None)
        if proof is None:
            raise PackError("proof", f"no consistency proof from {old} to {new}")
        if not _verify_consistency(old, new, roots[old], roots[new], proof):
            raise PackError(
                "consistency",
                f"consistency proof from tree size {old} to {new} does not hold",
            )
    if by_pair:
        raise PackError("proof", f"unexpected consistency proofs {sorted(by_pair)}")


def _expected_pairs(sizes: Sequence[int]) -> list[tuple[int, int]]:
    pairs = list(zip(sizes, sizes[1:], strict=False))
    if len(sizes) > 2:
        pairs.append((sizes[0], sizes[-1]))
    return pairs


def _policy_files(pack: pathlib.Path, directory: str) -> dict[str, bytes]:
    root = pack / directory
    if not root.is_dir():
        raise PackError("policy_set", f"{directory} is missing")
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in root.rglob("*")
        if path.is_file()
    }


def _verify_policy_sets(pack: pathlib.Path) -> list[dict]:
    """Recompute each stored revision from its files; return what is there."""
    found = []
    for part in ("directory", "policy"):
        directory = pack / POLICY_SETS_DIR / part
        for path in sorted(directory.iterdir()) if directory.is_dir() else []:
            revision = path.name.replace("-", ":", 1)
            where = f"{POLICY_SETS_DIR}/{part}/{path.name}"
            if not REVISION_RE.fullmatch(revision) or not path.is_dir():
                raise PackError("policy_set", f"{where}: not a revision directory")
            got = compute_revision(_policy_files(pack, where))
            if got != revision:
                raise PackError(
                    "policy_set", f"{where}: its files hash to {got}, not {revision}"
                )
            found.append({"part": part, "revision": revision})
    return found


def _tar_members(data: bytes, where: str) -> dict[str, bytes]:
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                extracted = tar.extractfile(info) if info.isreg() else None
                if extracted is None or info.name in members:
                    raise PackError(
                        "signed", f"{where}: unexpected member {info.name!r}"
                    )
                members[info.name] = extracted.read()
    except (tarfile.TarError, EOFError, OSError) as err:
        raise PackError("signed", f"{where}: not a tar archive: {err}") from None
    return members


def _signed_files(
    part: str, members: dict[str, bytes], manifest: dict, where: str
) -> dict[str, bytes]:
    """The source files a signed update carries, checked against the
    hashes its manifest states."""
    name, signature = SIGNED_MEMBERS[part]
    if part == "directory":
        if set(members) != {name, signature, DIRECTORY_CONTENT}:
            raise PackError("signed", f"{where}: members {sorted(members)}")
        content = members[DIRECTORY_CONTENT]
        if manifest.get("kind") != "directory" or manifest.get("sha256") != (
            hashlib.sha256(content).hexdigest()
        ):
            raise PackError("signed", f"{where}: {DIRECTORY_CONTENT} hash mismatch")
        return {DIRECTORY_CONTENT: content}
    files = {
        member[len(BUNDLE_FILES_PREFIX) :]: content
        for member, content in members.items()
        if member.startswith(BUNDLE_FILES_PREFIX)
    }
    listed = manifest.get("files")
    others = set(members) - {BUNDLE_FILES_PREFIX + n for n in files}
    if others != {name, signature} or not isinstance(listed, dict):
        raise PackError("signed", f"{where}: members {sorted(members)}")
    got = {n: hashlib.sha256(c).hexdigest() for n, c in files.items()}
    if got != listed:
        raise PackError("signed", f"{where}: files do not match bundle.json")
    return files


def _verify_signed(
    pack: pathlib.Path, trusted: dict[str, Ed25519PublicKey]
) -> tuple[list[dict], list[str]]:
    """Check each signed update under signed/: its hashes, that it carries
    the files of the revision it is filed for, and its signature when its
    key is among the publisher keys given. Once any publisher key is given,
    an update signed under another key id fails (``unknown_key``); with none
    given, every update is reported as not checked. Returns the entries and
    the updates not checked."""
    found, unchecked = [], []
    for part in ("directory", "policy"):
        directory = pack / SIGNED_DIR / part
        for path in sorted(directory.iterdir()) if directory.is_dir() else []:
            where = f"{SIGNED_DIR}/{part}/{path.name}"
            data = path.read_bytes()
            if path.name != f"sha256-{hashlib.sha256(data).hexdigest()}.tar":
                raise PackError("signed", f"{where}: name is not its SHA-256")
            members = _tar_members(data, where)
            name, signature_name = SIGNED_MEMBERS[part]
            if name not in members or signature_name not in members:
                raise PackError("signed", f"{where}: no {name} or {signature_name}")
            manifest = _json(members[name], f"{where} {name}")
            if (
                not isinstance(manifest, dict)
                or canonical_json(manifest) != (members[name])
            ):
                raise PackError("signed", f"{where}: {name} is not canonical JSON")
            files = _signed_files(part, members, manifest, where)
            revision = manifest.get("revision")
            if not isinstance(revision, str) or not REVISION_RE.fullmatch(revision):
                raise PackError("signed", f"{where}: revision {revision!r}")
            kept = _policy_files(pack, revision_dir(part, revision))
            carried = files if part == "directory" else {n: files.get(n) for n in kept}
            if carried != kept:
                raise PackError(
                    "signed",
                    f"{where}: does not carry the files of {part} {revision}",
                )
            key = trusted.get(manifest.get("key_id"))
            if key is None and trusted:
                # Publisher keys were given: a signer outside them is a
                # forgery until shown otherwise, not a gap in the evidence.
                raise PackError(
                    "unknown_key",
                    f"{where} is signed by {manifest.get('key_id')}, which is "
                    f"not among the --publisher-key keys "
                    f"({', '.join(sorted(trusted))})",
                )
            if key is None:
                unchecked.append(f"{where} ({manifest.get('key_id')})")
            else:
                try:
                    signature = _b64url(members[signature_name].decode("ascii"))
                    if len(signature) != SIGNATURE_SIZE:
                        raise InvalidSignature
                    key.verify(signature, members[name])
                except (ValueError, InvalidSignature):
                    raise PackError(
                        "bad_signature",
                        f"{where}: signature does not verify under "
                        f"{manifest.get('key_id')}",
                    ) from None
            found.append({"file": where, "part": part, "revision": revision})
    return found, unchecked


# ------------------------------------------------------------------ limits
#
# A decision record's ``limits`` entries say what each limit held before the
# decision (``count``, ``sum``: this daemon's decisions counted at or after
# ``window_start``; a fleet limit's remote part is not in them) and whether
# it counted this one (``counted``, ``amount``). They are recomputed here
# from the pack's own records, earlier ones in log order, grouped by limit,
# definition digest (``definition``; an entry without one is in the group of
# those without) and key. That is possible only where the pack reaches back
# to the window's opening: it starts at record 1, or its first record is
# earlier than ``window_start`` (the records before the pack are no later
# than its first). Other entries are "not checkable". Ints sum exactly;
# doubles are summed exactly as integers in units of 2**-1074 and rounded
# once, as the daemon rounds them.
#
# NOTE: a seen value higher than the records hold is a note, not a failure
# (the summary names the first such record and limit): the daemon counts a
# decision the moment it is decided and takes it back when its commit is
# refused (a full log), so a decision in between saw it. A lower one means
# a decision was made on a count missing what it should have held. Nor is
# an excess that persists at later records of the same limit, definition
# and key a failure: every decision made while the refused commit ran saw
# it, and they share the writer's next commit (it tries again after a full
# log), so any number of later records may show the same excess; the
# records do not say when the refused count was taken back.
#
# NOTE: "no later than its first" assumes the daemon's clock did not step
# back across the pack's first record; a record before the pack stamped
# later than it, inside a window, would show as a lower seen count.

# Doubles are summed as integers in units of the smallest subnormal
# (2**-1074), which holds any finite double exactly: ``exact_parts`` splits
# an amount into an int part and such units, both summed as Python ints,
# and ``rounded_sum`` rounds the exact total once. The daemon's book
# (``kynara_sidecar.limits.book``) and ``kynara-sidecar verify`` use these
# same helpers, so the three cannot round differently.
DOUBLE_SHIFT = 1074
_DOUBLE_ONE = 1 << DOUBLE_SHIFT
_NANOS_PER_SECOND = 1_000_000_000
_EPOCH = datetime.datetime(1970, 1, 1)
_INT = re.compile(r"^-?[0-9]+$")
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def double_units(value: float) -> int:
    """A finite double as the exact integer count of 2**-1074 it is.

    Raises:
        OverflowError, ValueError: ``value`` is infinite or NaN.
    """
    numerator, denominator = value.as_integer_ratio()
    # The denominator is a power of two no larger than 2**1074.
    return numerator << (DOUBLE_SHIFT - denominator.bit_length() + 1)


def exact_parts(amount: int | float) -> tuple[int, int]:
    """``(int part, double part in units of 2**-1074)`` of a finite amount:
    an int is all int part, a double all units; both sum exactly."""
    if isinstance(amount, float):
        return 0, double_units(amount)
    return amount, 0


def rounded_sum(whole: int, units: int) -> float:
    """The exact ``whole + units * 2**-1074`` rounded once to the nearest
    double (ties to even), as ``math.fsum`` rounds; past the largest double
    it is infinity of the sum's sign (where ``math.fsum`` raises)."""
    if not units:
        try:
            return float(whole)  # correctly rounded, as below, and cheaper
        except OverflowError:
            return math.inf if whole > 0 else -math.inf
    numerator = (whole << DOUBLE_SHIFT) + units if whole else units
    try:
        # int / int is correctly rounded: one rounding of the exact sum.
        return numerator / _DOUBLE_ONE
    except OverflowError:
        return math.inf if numerator > 0 else -math.inf


def exact_sum(amounts: Iterable[int | float]) -> int | float:
    """The sum of finite amounts: an int when every amount is an int (and
    for none), else the exact sum rounded once (``rounded_sum``)."""
    whole = units = doubles = 0
    for amount in amounts:
        if isinstance(amount, float):
            units += double_units(amount)
            doubles += 1
        else:
            whole += amount
    return rounded_sum(whole, units) if doubles else whole


class Held(NamedTuple):
    """What earlier records counted in a window: ``count``, the int amounts'
    sum ``whole``, the double amounts' exact sum in ``units`` of 2**-1074,
    and how many amounts were ``doubles``."""

    count: int = 0
    whole: int = 0
    units: int = 0
    doubles: int = 0

    def total(self, as_double: bool = False) -> int | float:
        """The sum: an int while every amount was an int and ``as_double``
        is not asked, else the exact sum rounded once."""
        if self.doubles or as_double:
            return rounded_sum(self.whole, self.units)
        return self.whole


class SeenCompared(NamedTuple):
    """How a decision's seen count and sum compare with what the records
    before it hold (``compare_seen``). ``above``: it saw a higher count and
    a sum no lower (a note, see the limits section); otherwise
    ``count_differs``/``sum_differs`` say what does not match. ``total``
    is what the records sum to, in the kind the seen sum has (a double
    when it is one, or when any amount was)."""

    above: bool
    count_differs: bool
    sum_differs: bool
    total: int | float


def compare_seen(seen_count: int, seen_sum: Any, held: Held) -> SeenCompared:
    """Compare what a decision saw (``seen_sum`` None for a counting limit)
    with ``held``. A sum must be of the same kind (int or double) and equal;
    a bool or a value of another type is never equal."""
    total = held.total(isinstance(seen_sum, float))
    # An int subclass (a uint) is an int; a bool is no number.
    kind = (
        None
        if isinstance(seen_sum, bool)
        else float
        if isinstance(seen_sum, float)
        else int
        if isinstance(seen_sum, int)
        else None
    )
    if seen_count > held.count and (
        seen_sum is None or (kind is not None and seen_sum >= total)
    ):
        return SeenCompared(True, False, False, total)
    sum_differs = seen_sum is not None and not (
        kind is type(total) and seen_sum == total
    )
    return SeenCompared(False, seen_count != held.count, sum_differs, total)


class SeenHistory:
    """The counted decisions of one (limit, definition, key) so far, sorted
    by time, with prefix sums (count, int sum, double units, doubles), so a
    window's ``Held`` is two bisections. Events come in log order, mostly
    in time order: one from a clock that stepped back is inserted in its
    place and moves the prefixes after it."""

    __slots__ = ("doubles", "ints", "times", "units")

    def __init__(self) -> None:
        self.times: list[int] = []
        self.ints = [0]
        self.units = [0]
        self.doubles = [0]

    def add(self, time: int, amount: int | float) -> None:
        """Count a finite amount at ``time`` (nanoseconds)."""
        whole, units = exact_parts(amount)
        double = int(isinstance(amount, float))
        at = bisect.bisect_right(self.times, time)
        self.times.insert(at, time)
        prefixes = ((self.ints, whole), (self.units, units), (self.doubles, double))
        if at == len(self.times) - 1:
            for prefix, part in prefixes:
                prefix.append(prefix[-1] + part)
            return
        for prefix, part in prefixes:
            prefix.insert(at + 1, prefix[at] + part)
            for i in range(at + 2, len(prefix)):
                prefix[i] += part

    def since(self, start: int) -> Held:
        """What was counted at or after ``start`` (inclusive)."""
        at, end = bisect.bisect_left(self.times, start), len(self.times)
        return Held(
            end - at,
            self.ints[end] - self.ints[at],
            self.units[end] - self.units[at],
            self.doubles[end] - self.doubles[at],
        )


class SeenValues:
    """Every (limit, definition, key)'s ``SeenHistory``: what ``verify``
    and this script recompute a decision's seen values from."""

    __slots__ = ("groups",)

    def __init__(self) -> None:
        self.groups: dict[tuple[str, str, str], SeenHistory] = {}

    def held(self, limit: str, definition: str, key: str, start: int) -> Held:
        """What the group counted at or after ``start``."""
        history = self.groups.get((limit, definition, key))
        return history.since(start) if history is not None else Held()

    def add(
        self, limit: str, definition: str, key: str, time: int, amount: int | float
    ) -> None:
        """Count a decision of the group, once its record has been checked
        (a record never sees its own count)."""
        group = (limit, definition, key)
        history = self.groups.get(group)
        if history is None:
            history = self.groups[group] = SeenHistory()
        history.add(time, amount)


class SeenAbove(NamedTuple):
    """The first entry that saw more than the records before it hold:
    its record's ``seq``, the ``limit`` and the ``key``."""

    seq: int
    limit: str
    key: str

    def text(self) -> str:
        return f"the first at record {self.seq}, limit {self.limit!r} key {self.key!r}"


def seen_above_text(count: int, first: SeenAbove | None) -> str:
    """How many entries saw more than the records before them hold, and the
    first of them, as both verifiers' notes say it (why that is a note and
    not a failure: the NOTE above the limits check)."""
    text = (
        f"{count} saw more than the records before them hold (counts of a "
        "decision whose commit was refused, then taken back)"
    )
    return text + (f"; {first.text()}" if first else "")


class LimitsChecked(NamedTuple):
    """What the limits check found in a pack that verified: ``checked``
    seen values recomputed, ``not_checkable`` entries whose window opens
    before the pack's first record, ``seen_above`` entries that saw more
    than the records before them hold (a note, not a failure: see the NOTE
    above), the first of them ``first_above``."""

    checked: int = 0
    not_checkable: int = 0
    seen_above: int = 0
    first_above: SeenAbove | None = None

    def summary(self) -> str:
        """``; limits: ...`` for the ok line, or "" when no record has limits."""
        if not self.checked and not self.not_checkable:
            return ""
        text = (
            f"; limits: {self.checked} seen counts recomputed from the pack's "
            f"records, {self.not_checkable} not checkable"
        )
        if self.not_checkable:
            text += " (their window opens before the pack's first record)"
        if self.seen_above:
            text += ", " + seen_above_text(self.seen_above, self.first_above)
        return text


def _nanos(text: Any, where: str) -> int:
    """Nanoseconds since the epoch of an RFC 3339 UTC time as records hold it."""
    if not isinstance(text, str) or not _TIME.fullmatch(text):
        raise PackError(
            "limits", f"{where}: expected an RFC 3339 UTC time, got {text!r}"
        )
    try:
        moment = datetime.datetime.strptime(text[:19], "%Y-%m-%dT%H:%M:%S")
    except ValueError as err:
        raise PackError("limits", f"{where}: {text!r}: {err}") from None
    seconds = (moment - _EPOCH) // datetime.timedelta(seconds=1)
    fraction = text[20:-1] if text[19] == "." else ""
    return seconds * _NANOS_PER_SECOND + int(fraction.ljust(9, "0"))


def _number(value: Any, where: str) -> int | float:
    """An int or double in the records' typed form (``{"int": "5"}``,
    ``{"double": 2.5}``)."""
    if isinstance(value, dict) and len(value) == 1:
        ((tag, raw),) = value.items()
        if tag in ("int", "uint") and isinstance(raw, str) and _INT.fullmatch(raw):
            return int(raw)
        if tag == "double" and isinstance(raw, str) and raw in _NONFINITE:
            return _NONFINITE[raw]
        if tag == "double" and isinstance(raw, int | float) and type(raw) is not bool:
            return float(raw)
    raise PackError("limits", f"{where}: expected an int or double, got {value!r}")


def _entry_field(entry: dict, name: str, kind: type, default: Any, where: str) -> Any:
    value = entry.get(name, default)
    if type(value) is not kind:
        raise PackError(
            "limits", f"{where}: {name} must be a {kind.__name__}, got {value!r}"
        )
    return value


def _check_limits(records: list[tuple[bytes, dict]], base: int) -> LimitsChecked:
    """Recompute each decision's seen count and sum from the records before
    it in the pack (see the section's note); raise at the first lower one.

    Raises:
        PackError: ``limits``: an entry that does not read, or a decision
            that saw less than the pack's records before it counted.
    """
    first = None
    if base and records:
        first = _nanos(records[0][1].get("time"), f"record {base + 1}: time")
    seen = SeenValues()
    checked = not_checkable = above = 0
    first_above: SeenAbove | None = None
    for offset, (_, record) in enumerate(records):
        limits = record.get("limits")
        if not limits:
            continue
        seq = base + offset + 1
        if not isinstance(limits, dict):
            raise PackError("limits", f"record {seq}: limits must be an object")
        time = _nanos(record.get("time"), f"record {seq}: time")
        counted = []
        for name in sorted(limits):
            where = f"record {seq}: limit {name!r}"
            entry = limits[name]
            if not isinstance(entry, dict):
                raise PackError("limits", f"{where}: expected an object")
            key = _entry_field(entry, "key", str, "", where)
            group = (name, _entry_field(entry, "definition", str, "", where), key)
            where += f" key {key!r}"
            # An entry with an error had no value, so there is nothing to
            # compare; it may still have been counted (its store out of
            # touch, its rows damaged), and later decisions saw that.
            if not entry.get("error"):
                start = _nanos(entry.get("window_start"), f"{where}: window_start")
                if first is not None and start <= first:
                    not_checkable += 1
                else:
                    checked += 1
                    if _compare_seen(entry, seen, group, start, where):
                        above += 1
                        first_above = first_above or SeenAbove(seq, name, key)
            if _entry_field(entry, "counted", bool, False, where):
                amount = _number(entry.get("amount"), f"{where}: amount")
                if not math.isfinite(amount) or amount < 0:
                    raise PackError(
                        "limits",
                        f"{where}: counted amount {amount!r}; expected a finite "
                        "number of at least 0",
                    )
                counted.append((group, amount))
        for group, amount in counted:
            seen.add(*group, time, amount)
    return LimitsChecked(checked, not_checkable, above, first_above)


def _compare_seen(
    entry: dict,
    seen: SeenValues,
    group: tuple[str, str, str],
    start: int,
    where: str,
) -> bool:
    """True when the entry saw more than its group holds (a note), False
    when the same.

    Raises:
        PackError: ``limits``: it saw less, or a sum of another kind.
    """
    seen_count = _entry_field(entry, "count", int, 0, where)
    raw_sum = entry.get("sum")
    seen_sum = None if raw_sum is None else _number(raw_sum, f"{where}: sum")
    held = seen.held(*group, start)
    found = compare_seen(seen_count, seen_sum, held)
    opened = f"since its window_start {entry['window_start']}"
    if found.above:
        return True
    if found.count_differs:
        raise PackError(
            "limits",
            f"{where}: the decision saw count {seen_count}, but the pack's records "
            f"before it counted {held.count} {opened}",
        )
    if found.sum_differs:
        raise PackError(
            "limits",
            f"{where}: the decision saw sum {seen_sum!r}, but the pack's records "
            f"before it sum to {found.total!r} {opened}",
        )
    return False


def _facts(
    records: list[tuple[bytes, dict]],
    cps: list[dict],
    base: int,
    keys: list,
    policy_sets: list[dict],
) -> dict[str, Any]:
    """Every manifest fact, recomputed from the pack's files."""
    cited = {
        (part, r.get(f"{part}_revision"))
        for _, r in records
        for part in ("policy", "directory")
        if r.get(f"{part}_revision")
    }
    present = {(e["part"], e["revision"]) for e in policy_sets}
    return {
        "approvals": [
            {
                "approval_id": (r.get("approval") or {}).get("id", ""),
                "kind": r["kind"],
                "seq": r["seq"],
            }
            for _, r in records
            if r.get("kind") in APPROVAL_KINDS
        ],
        "format": PACK_FORMAT,
        "keys": keys,
        "log_id": cps[0]["log_id"],
        "origin": cps[0]["origin"],
        "policy_sets": policy_sets,
        "policy_sets_missing": [
            {"part": part, "revision": revision}
            for part, revision in sorted(cited - present)
        ],
        "records": {
            "count": len(records),
            "first_seq": base + 1,
            "last_seq": base + len(records),
        },
        "time_range": time_range(r.get("time") for _, r in records),
        "tree_sizes": {
            "checkpoints": [cp["tree_size"] for cp in cps],
            "first": base,
            "last": cps[-1]["tree_size"],
        },
        "version": PACK_VERSION,
    }


def _check_facts(manifest: dict, facts: dict[str, Any]) -> None:
    for key, value in facts.items():
        if manifest.get(key) != value:
            raise PackError(
                "manifest",
                f"{key}: the manifest says {manifest.get(key)!r}, the pack's "
                f"files say {value!r}",
            )
    allowed = set(facts) | {"files"}
    extra = set(manifest) - allowed
    if extra:
        raise PackError("manifest", f"unexpected manifest keys {sorted(extra)}")


def verify_pack(
    pack: str | pathlib.Path,
    trusted_keys: Iterable[str | pathlib.Path] = (),
    publisher_keys: Iterable[str | pathlib.Path] = (),
) -> PackReport:
    """Check a pack and return what verified, or raise at the first problem.

    Args:
        pack: the pack's directory.
        trusted_keys: public key files (PEM or raw base64url) to trust for
            the checkpoints instead of the keys in the pack.
        publisher_keys: public key files of the signers of policy bundles and
            directory updates; only these check ``signed/`` (kept apart from
            ``trusted_keys`` so neither kind of key vouches for the other's
            objects). With none given, signed updates are not checked;
            with some given, one signed under another key id fails.

    Returns:
        The report of a pack that verified.

    Raises:
        PackError: the first problem; ``kind`` names the check that failed.
    """
    pack = pathlib.Path(pack)
    manifest = _check_manifest(pack)
    _check_files(pack, manifest["files"])
    cps = _checkpoints(pack, manifest["origin"], manifest["log_id"])
    base, base_cp, sealing = _base(manifest, cps)
    records = _records(pack, base + 1)
    proofs = _json(_read(pack, PROOFS_FILE), PROOFS_FILE)
    if not isinstance(proofs, dict):
        raise PackError("proof", f"{PROOFS_FILE}: expected an object")
    _walk(records, base, base_cp, sealing, proofs.get("compact_range"))
    pack_keys, key_entries = _pack_keys(pack)
    given = [pathlib.Path(path) for path in trusted_keys]
    if given:
        trusted = dict(_given_key(path, "--trusted-key") for path in given)
        keys_from = "--trusted-key: " + ", ".join(sorted(trusted))
    else:
        trusted = pack_keys
        keys_from = "the pack (prefer --trusted-key): " + (
            ", ".join(sorted(trusted)) or "none"
        )
    publishers = dict(
        _given_key(pathlib.Path(path), "--publisher-key") for path in publisher_keys
    )
    signers = _verify_signatures(cps, records, base, trusted, manifest)
    _verify_proofs(proofs, cps)
    policy_sets = _verify_policy_sets(pack)
    signed, unchecked = _verify_signed(pack, publishers)
    facts = _facts(records, cps, base, key_entries, policy_sets)
    if signed:
        # Only when there are any, so packs made before them still verify.
        facts["signed"] = signed
    _check_facts(manifest, facts)
    limits = _check_limits(records, base)
    return PackReport(manifest, keys_from, signers, unchecked, limits)


def _given_key(path: pathlib.Path, option: str) -> tuple[str, Ed25519PublicKey]:
    try:
        text = path.read_text("ascii")
    except (OSError, UnicodeDecodeError) as err:
        raise PackError("key", f"{option} {path}: cannot read: {err}") from None
    return _load_key(text, f"{option} {path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Verify the pack named on the command line; print ok or the problem."""
    parser = argparse.ArgumentParser(
        prog="verify_pack.py", description="Verify a Kynara evidence pack offline."
    )
    parser.add_argument(
        "pack",
        nargs="?",
        default=str(pathlib.Path(__file__).resolve().parent),
        help="the pack directory (default: the directory of this script)",
    )
    parser.add_argument(
        "--trusted-key",
        metavar="FILE",
        action="append",
        default=[],
        help="an audit public key you trust for the checkpoints (PEM or "
        "base64url); repeatable; when given, the pack's own keys are not trusted",
    )
    parser.add_argument(
        "--publisher-key",
        metavar="FILE",
        action="append",
        default=[],
        help="a public key of a policy bundle or directory update signer "
        "(PEM or base64url); repeatable; checks only the signed updates",
    )
    args = parser.parse_args(argv)
    try:
        report = verify_pack(args.pack, args.trusted_key, args.publisher_key)
    except PackError as err:
        print(f"FAILED: {err}")
        return 1
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
