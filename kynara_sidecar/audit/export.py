"""Evidence packs: the audit records of a time range, made checkable offline.

Theory of operation
-------------------
An auditor should be able to check what the log says without trusting the
daemon, the operator or the Kynara code. ``export_pack`` therefore writes a
directory holding the records, and everything needed to show that they are
the records the daemon signed for:

1. **Whole sealed segments.** The records whose ``time`` lies in [from, to]
   are found, and the range is widened to the segments that hold them: from
   the record after the checkpoint (or seam) before the first of them to the
   checkpoint that seals the last. Every exported record is then bound by a
   signed checkpoint. Records after the latest checkpoint have no signature
   yet and are left out; ``ExportSummary.unsealed`` counts those in range.
2. **Exact bytes.** ``records.jsonl`` and ``checkpoints.jsonl`` hold the
   stored bytes, a line each; canonical JSON never contains a newline, and
   that is checked rather than assumed.
3. **What a verifier needs to recompute.** The compact range at the base
   checkpoint (its tree's right edge) lets the Merkle root of every later
   checkpoint be rebuilt from the records alone; the base checkpoint's chain
   hash starts the chain walk; consistency proofs link successive
   checkpoints and the first to the last, for an auditor holding other
   checkpoints of the same log (from the witness, say).
4. **Keys, policy sets, approvals.** The public keys the operator trusts
   (``audit.trusted_keys``, the halves of ``audit.signing_key`` and
   ``audit.previous_signing_key``); the source files of every policy and
   directory revision the records cite (``store.get_policy_source``), which
   a verifier hashes back to the revision; approval records are ordinary
   records, listed in the manifest. For a cited revision that arrived
   signed, the signed bytes the log kept too (``directories``: the
   collector's directory update; ``bundles``: the policy bundle), so an
   auditor can check who signed the directory and policies a decision was
   made under (``signed/``, ``verify_pack``).
5. **A manifest and a script.** ``manifest.json`` states the pack's facts
   and the SHA-256 of every other file; ``verify_pack.py`` (this package's
   ``verify_pack`` module, copied) checks all of it with nothing but Python
   and ``cryptography``. Its docstring describes the format for auditors.

The pack is assembled in memory from one read-only store (which works
beside a running daemon) and then written; ``OUT`` must be empty or absent,
and its parent must exist: only ``OUT`` itself is created, so a mistyped
path fails instead of growing a directory tree somewhere unexpected.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import pathlib
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec

from kynara_sidecar.audit import verify_pack as pack_format
from kynara_sidecar.audit.checkpoint import CheckpointV1, encode_checkpoint
from kynara_sidecar.audit.keys import PublicKey
from kynara_sidecar.audit.record import parse_timestamp
from kynara_sidecar.audit.startup import configured_public_keys
from kynara_sidecar.audit.store import (
    BUNDLES_DB,
    DIRECTORIES_DB,
    AuditStore,
    StoredRecord,
)
from kynara_sidecar.decision import Timestamp
from kynara_sidecar.errors import KynaraError

if TYPE_CHECKING:
    from kynara_sidecar.config import AuditConfig

__all__ = [
    "ExportError",
    "ExportSummary",
    "build_pack",
    "config_keys",
    "export_pack",
    "parse_time",
    "write_pack",
]


class ExportError(KynaraError):
    """The pack cannot be made; the message says what to change."""


class ExportSummary(NamedTuple):
    """What a pack holds, and what in range it had to leave out."""

    first_seq: int
    last_seq: int
    checkpoints: int
    approvals: int
    # Records in [from, to] after the latest checkpoint: not yet signed.
    unsealed: int
    # The last checkpoint's tree size: the pack ends there.
    sealed_through: int


def parse_time(text: str, *, where: str = "time") -> Timestamp:
    """Parse an RFC 3339 time: ``Z`` or an offset, up to nanoseconds.

    Raises:
        ExportError: ``text`` is not an RFC 3339 date-time with a zone.
    """
    try:
        return parse_timestamp(text)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None or "T" not in text.upper():
        raise ExportError(
            f"{where}: expected an RFC 3339 time with a zone, such as "
            f"2026-12-04T09:00:00Z or 2026-12-04T10:00:00+01:00, got {text!r}"
        )
    return Timestamp.from_datetime(moment)


def config_keys(cfg: AuditConfig, section: str = "audit") -> list[PublicKey]:
    """The public keys a pack carries: ``trusted_keys`` and the public halves
    of ``signing_key`` and ``previous_signing_key``
    (``startup.configured_public_keys``: the ``.pub`` beside a private key
    this process may not read will do; keys are never created here).

    Raises:
        ConfigError: a configured key cannot be loaded; names the setting.
    """
    return list(configured_public_keys(cfg, section).values())


def _key(ts: Timestamp) -> tuple[int, int]:
    return ts.seconds, ts.nanos


def _record_time(record: StoredRecord) -> tuple[int, int]:
    try:
        obj = msgspec.json.decode(record.record_bytes)
        return _key(parse_timestamp(obj["time"]))
    except (msgspec.DecodeError, KeyError, TypeError, ValueError) as err:
        raise ExportError(
            f"record {record.seq} has no readable time ({err}): run "
            "`kynara-sidecar verify` on this log"
        ) from None


class _Span(NamedTuple):
    base: int  # the tree size before the pack's first record
    end: int  # the tree size of the checkpoint that seals its last record
    checkpoints: list[CheckpointV1]  # base (if > 0) through end
    unsealed: int
    sealed_through: int  # the latest checkpoint's tree size


def _span(store: AuditStore, start: Timestamp, stop: Timestamp) -> _Span:
    seam = store.seam()
    sealed = [cp for cp in store.iter_checkpoints() if cp.tree_size >= seam]
    if not sealed or sealed[-1].tree_size <= seam:
        raise ExportError(
            f"audit log {store.path} has no sealed segment to export: a "
            "checkpoint is signed every audit.segment_records records or "
            "audit.segment_seconds seconds, and at a clean stop"
        )
    last = sealed[-1].tree_size
    lo = hi = 0
    unsealed = 0
    window = (_key(start), _key(stop))
    for record in store.iter_records(seam + 1):
        if not window[0] <= _record_time(record) <= window[1]:
            continue
        if record.seq > last:
            unsealed += 1
        else:
            lo, hi = lo or record.seq, record.seq
    if not lo:
        raise ExportError(
            f"no sealed record of {store.path} has a time in the range "
            f"(records after tree size {last} are not sealed yet; "
            f"{unsealed} of them are in range)"
        )
    sizes = [seam] + [cp.tree_size for cp in sealed]
    base = max(size for size in sizes if size < lo)
    end = min(cp.tree_size for cp in sealed if cp.tree_size >= hi)
    cps = [cp for cp in sealed if base <= cp.tree_size <= end]
    return _Span(base, end, cps, unsealed, last)


def _records(store: AuditStore, span: _Span) -> list[bytes]:
    lines = []
    for record in store.iter_records(span.base + 1):
        if record.seq > span.end:
            break
        if b"\n" in record.record_bytes or b"\r" in record.record_bytes:
            raise ExportError(
                f"record {record.seq} contains a line break, so it is not "
                "canonical JSON: run `kynara-sidecar verify` on this log"
            )
        lines.append(record.record_bytes)
    expected = span.end - span.base
    if len(lines) != expected or (lines and _seq_of(lines[0]) != span.base + 1):
        raise ExportError(
            f"records {span.base + 1}..{span.end} of {store.path} are not all "
            "there: run `kynara-sidecar verify` on this log"
        )
    return lines


def _seq_of(data: bytes) -> int:
    obj = msgspec.json.decode(data)
    return obj.get("seq", 0) if isinstance(obj, dict) else 0


def _proofs(store: AuditStore, span: _Span) -> dict[str, Any]:
    sizes = [cp.tree_size for cp in span.checkpoints]
    pairs = list(zip(sizes, sizes[1:], strict=False))
    if len(sizes) > 2:
        pairs.append((sizes[0], sizes[-1]))
    return {
        "compact_range": {
            "tree_size": span.base,
            "hashes": [h.hex() for h in store.compact_range(span.base)],
        },
        "consistency": [
            {
                "old_size": old,
                "new_size": new,
                "proof": [h.hex() for h in store.consistency_proof(old, new)],
            }
            for old, new in pairs
        ],
    }


def _safe_relative(name: str, where: str) -> str:
    parts = pathlib.PurePosixPath(name).parts
    if not parts or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ExportError(f"{where}: file name {name!r} would leave its directory")
    return "/".join(parts)


def _policy_sets(
    store: AuditStore, cited: set[tuple[str, str]]
) -> tuple[dict[str, bytes], list[dict[str, str]], list[dict[str, str]]]:
    files: dict[str, bytes] = {}
    present, missing = [], []
    for part, revision in sorted(cited):
        source = store.get_policy_source(part, revision)  # type: ignore[arg-type]
        if source is None or not pack_format.REVISION_RE.fullmatch(revision):
            missing.append({"part": part, "revision": revision})
            continue
        directory = pack_format.revision_dir(part, revision)
        for name, content in source.files.items():
            name = _safe_relative(name, f"{part} revision {revision}")
            files[f"{directory}/{name}"] = content
        present.append({"part": part, "revision": revision})
    return files, present, missing


# ustar: a member's header is one 512-byte block, its size an octal field.
_TAR_BLOCK = 512
_TAR_SIZE = slice(124, 136)


def _first_member_revision(view: memoryview) -> str:
    """The ``revision`` in a signed update's manifest, its first tar member
    (members are packed in name order: ``bundle.json`` and
    ``directory-update.json`` come first); "" when it cannot be read."""
    try:
        size = int(bytes(view[_TAR_SIZE]).split(b"\0", 1)[0].strip() or b"0", 8)
        raw = bytes(view[_TAR_BLOCK : _TAR_BLOCK + size])
        revision = msgspec.json.decode(raw).get("revision", "")
    except (ValueError, AttributeError, msgspec.DecodeError):
        return ""
    return revision if isinstance(revision, str) else ""


def _signed_updates(
    store: AuditStore, present: list[dict[str, str]]
) -> tuple[dict[str, bytes], list[dict[str, str]]]:
    """The signed bytes the log kept for each cited revision in the pack:
    every stored directory update or bundle whose manifest names it."""
    files: dict[str, bytes] = {}
    entries: list[dict[str, str]] = []
    wanted = {(entry["part"], entry["revision"]) for entry in present}
    sources = (("directory", DIRECTORIES_DB), ("policy", BUNDLES_DB))
    for part, db in sources:
        if not any(p == part for p, _ in wanted):
            continue
        for digest, revision in store.scan_signed(db, _first_member_revision):
            if (part, revision) not in wanted or not digest.startswith("sha256:"):
                continue
            get = store.get_directory if part == "directory" else store.get_bundle
            data = get(digest)
            if data is None or _sha256(data) != digest.removeprefix("sha256:"):
                continue
            name = f"{pack_format.SIGNED_DIR}/{part}/sha256-{_sha256(data)}.tar"
            files[name] = data
            entries.append({"file": name, "part": part, "revision": revision})
    return files, sorted(entries, key=lambda e: (e["part"], e["file"]))


def build_pack(
    store: AuditStore,
    start: Timestamp,
    stop: Timestamp,
    keys: Mapping[str, PublicKey],
    *,
    request: Mapping[str, Any] | None = None,
) -> tuple[dict[str, bytes], ExportSummary]:
    """Assemble a pack in memory: relative path -> file bytes.

    Args:
        store: the audit log (read-only is enough).
        start: the range's first instant (inclusive).
        stop: the range's last instant (inclusive).
        keys: the public keys to put in the pack, by key id.
        request: what to record in ``export.json`` about the request.

    Returns:
        The files (``manifest.json`` included) and a summary.

    Raises:
        ExportError: no sealed record lies in the range, or the log is
            damaged (the message names ``verify``).
    """
    if _key(start) > _key(stop):
        raise ExportError("--from must not be after --to")
    span = _span(store, start, stop)
    lines = _records(store, span)
    records = [msgspec.json.decode(line) for line in lines]
    cited = {
        (part, record[f"{part}_revision"])
        for record in records
        for part in ("policy", "directory")
        if record.get(f"{part}_revision")
    }
    policy_files, present, missing = _policy_sets(store, cited)
    signed_files, signed = _signed_updates(store, present)
    key_entries = [
        {
            "file": f"{pack_format.KEYS_DIR}/{key_id.replace(':', '-')}.pem",
            "key_id": key_id,
        }
        for key_id in sorted(keys)
    ]
    key_files = {entry["file"]: keys[entry["key_id"]].to_pem() for entry in key_entries}
    export = {
        "from": (request or {}).get("from", ""),
        "to": (request or {}).get("to", ""),
        "unsealed_records_in_range": span.unsealed,
        "sealed_through": span.sealed_through,
        "note": "what the exporter asked for; not signed, not evidence",
        **{k: v for k, v in (request or {}).items() if k not in ("from", "to")},
    }
    files: dict[str, bytes] = {
        pack_format.RECORDS_FILE: b"".join(line + b"\n" for line in lines),
        pack_format.CHECKPOINTS_FILE: b"".join(
            encode_checkpoint(cp) + b"\n" for cp in span.checkpoints
        ),
        pack_format.PROOFS_FILE: _pretty(_proofs(store, span)),
        pack_format.EXPORT_FILE: _pretty(export),
        pack_format.SCRIPT_FILE: pathlib.Path(pack_format.__file__).read_bytes(),
        **key_files,
        **policy_files,
        **signed_files,
    }
    approvals = [
        {
            "approval_id": (r.get("approval") or {}).get("id", ""),
            "kind": r["kind"],
            "seq": r["seq"],
        }
        for r in records
        if r.get("kind") in pack_format.APPROVAL_KINDS
    ]
    manifest = {
        "approvals": approvals,
        "files": {name: _sha256(data) for name, data in sorted(files.items())},
        "format": pack_format.PACK_FORMAT,
        "keys": key_entries,
        "log_id": store.log_id,
        "origin": span.checkpoints[-1].origin,
        "policy_sets": present,
        "policy_sets_missing": missing,
        "records": {
            "count": len(lines),
            "first_seq": span.base + 1,
            "last_seq": span.end,
        },
        "time_range": pack_format.time_range(r.get("time") for r in records),
        "tree_sizes": {
            "checkpoints": [cp.tree_size for cp in span.checkpoints],
            "first": span.base,
            "last": span.end,
        },
        "version": pack_format.PACK_VERSION,
    }
    if signed:
        manifest["signed"] = signed
    files[pack_format.MANIFEST_FILE] = pack_format.encode_manifest(manifest)
    summary = ExportSummary(
        span.base + 1,
        span.end,
        len(span.checkpoints),
        len(approvals),
        span.unsealed,
        span.sealed_through,
    )
    return files, summary


def _pretty(value: Any) -> bytes:
    return pack_format.encode_manifest(value)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_out(out: pathlib.Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(
            f"{out}: expected an empty or new directory for the pack; "
            "it is never overwritten"
        )
    parent = out.absolute().parent
    if not parent.is_dir():
        raise ExportError(
            f"{out}: expected its parent directory {parent} to exist; export "
            "creates only the pack directory itself (create the parent first)"
        )


def write_pack(out: str | os.PathLike[str], files: Mapping[str, bytes]) -> None:
    """Write the files under ``out``, which must be empty or absent, in a
    parent directory that exists.

    Raises:
        ExportError: ``out`` is a file or a non-empty directory (it is left
            untouched), its parent does not exist (nothing is created), or
            it cannot be written.
    """
    out = pathlib.Path(out)
    _check_out(out)
    try:
        out.mkdir(exist_ok=True)
        for name, data in files.items():
            target = out / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "xb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
    except OSError as err:
        raise ExportError(f"{out}: cannot write the pack: {err}") from err


def export_pack(
    audit_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    start: Timestamp,
    stop: Timestamp,
    keys: Iterable[PublicKey] = (),
    *,
    request: Mapping[str, Any] | None = None,
) -> ExportSummary:
    """Export the sealed segments holding records of [start, stop] to ``out``.

    Args:
        audit_path: the log's directory (``audit.path``); opened read-only,
            so a running daemon may keep appending.
        out: the pack directory; must be empty or absent, in an existing
            parent directory.
        start: the range's first instant (inclusive).
        stop: the range's last instant (inclusive).
        keys: public keys to include (trusted keys, the signing key's half).
        request: what to note in ``export.json`` (the range as given).

    Returns:
        What was exported, and how many records in range were left out for
        want of a checkpoint.

    Raises:
        ExportError: see ``build_pack`` and ``write_pack``.
        AuditUnavailable: there is no audit log at ``audit_path``.
    """
    out = pathlib.Path(out)
    # Checked before the (possibly long) read, and again when writing.
    _check_out(out)
    store = AuditStore.open(audit_path, readonly=True)
    try:
        # One snapshot for the whole pack while a daemon appends beside it.
        with store.reading():
            files, summary = build_pack(
                store, start, stop, {key.key_id: key for key in keys}, request=request
            )
    finally:
        store.close()
    write_pack(out, files)
    return summary
