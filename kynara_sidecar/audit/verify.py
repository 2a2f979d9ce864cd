"""Verify an audit log: the check behind ``kynara-sidecar verify`` and the
daemon's start-up check.

Theory of operation
-------------------
A log on disk makes four kinds of claim, and none is taken on its own word;
each is checked against what the record bytes themselves give:

1. **The chain** (``chain``): each record's chain hash covers the one
   before, so an edit, a gap or a swap shows at the first record it
   touches (``edited``, ``missing``, ``reordered``).
2. **The Merkle nodes** (``merkle``): the tree is rebuilt from the record
   bytes as the walk goes, in a ``CompactRange``; every stored node a
   record completes (its leaf and the subtree roots above it) must equal
   the recomputed one, so the proofs served from stored nodes are proofs
   about these records (``edited``).
3. **The signed checkpoints** (``checkpoint``): each must be signed by a
   key trusted at that point, name this log's id (meta ``log_id``) and the
   root and chain hash the walk computed at its tree size (``unknown_key``,
   ``bad_signature``, ``edited``). Trust starts with the configured keys,
   never the log's; a ``key_rotation`` record that verifies under a trusted
   key adds its new key from that record on (``rotation.trusted_after``),
   and one that does not is itself a problem.
4. **The witness** (``witness``): statements kept outside the log's
   volume. Whoever can rewrite the LMDB file can cut its newest records
   together with their checkpoints, the stored head and even re-sign a
   head with a stolen key, and what is left verifies on its own; the
   witness still names the larger tree (``truncated_tail``), or another
   root at the same size (``edited``). The head signed at the last stop
   and stored in the log is checked the same way.

The log id binds the witness to the log. Witness files live under the id
the log's meta names; an id rewritten there points the check at a
directory that holds nothing. Every signed statement names the id it was
signed for, so the log's own checkpoints then disagree with its meta
(``edited``); and a witness statement copied in from another log is
refused the same way. A witness that holds nothing for a log that has
checkpoints (a mistyped ``--witness``, its files lost) is a note, or with
``require_witness`` (what ``verify`` asks when given a witness) a problem
(``missing``); the daemon's start check does not require it, since the
writer catches a newly configured witness up. A witness that cannot be
read at all (not a directory, no permission) is no evidence of anything:
``WitnessError`` is raised, naming the setting.

Evidence deleted from the log. The witness is also a list of what the log
must hold: every witnessed checkpoint within the log's size must be stored
in it, a witnessed head needs the log's own head checkpoint, and a head
(witnessed or stored) must have the checkpoint a clean stop seals at its
size (``missing``). Checkpoints came with the Merkle nodes, so a log with
checkpoints (stored or witnessed) but no ``nodes`` database lost them
(``missing``); only a log with neither predates the tree.

What a signature does not cover. Records after the last signed statement
are protected only by the chain until the next seal: whoever can write the
LMDB file can append well-chained records (with nodes and a new stored
head) before any daemon signs them. After a clean stop this is narrowed.
The signed head (stored, or witnessed) names the log's size n then, and a
restarting daemon appends, before any decision, only ``key_rotation``
records (one per restart that rotated the key, should the start have
failed after it) and then its ``start`` marker, sealed in the marker's own
transaction (``AuditWriter.append(..., seal=True)``): a stored checkpoint
at exactly the marker's tree size. So after a head at n, a record other
than a rotation or the start marker is ``edited``, and so is a start
marker with no stored checkpoint at its size: without the key, a forger
cannot sign one, and a marker forged to open records after the head shows
at once. What is left is a crashed daemon's tail: records after its last
checkpoint (and after a head, past the sealed start marker) are protected
only by the chain, until the next daemon seals them.

Where the walk starts. With nothing pruned, at record 1 with the genesis
hash and an empty tree. After ``AuditStore.prune`` the records 1..s are
gone and meta ``seam`` = s; the seam is the checkpoint at s (signed, its
root equal to the root of the stored nodes' compact range at s) and the
first kept record s+1, chained from that checkpoint's chain hash. A log
whose first record is not 1, or not s+1, or whose seam checkpoint or seam
nodes are gone, was cut at the front (``truncated_front``). Checkpoints
before the seam are checked against the stored nodes (their records are
gone), and a key that only a pruned rotation introduced must be
configured to be trusted there. A seam past the log's head, or one with
records still stored at or below it, was rewritten (``seam``, ``edited``):
a prune drops those records and moves the seam in one transaction.

``from_tree_size=t`` checks only the tail after the checkpoint at t, with
the configured keys: what the daemon does at start, so start-up time does
not grow with the log. The front is still checked, cheaply: the first
record must be seam+1, and the seam checkpoint and its nodes must be there.
``None`` checks everything the log still holds, and also that each stored
policy set cited by a record hashes to its revision (``policy set``,
``edited``), and the approvals' lifecycle, which catches a use appended
by someone who can write the LMDB file but holds no key, before the next
seal signs it:

- an ``approval_resolved`` record approving an approval must follow the
  ``approval_requested`` record that opened it (``approval_not_requested``);
- an allow with reason ``approval_granted`` must follow an
  ``approval_resolved`` record approving the same approval
  (``approval_not_approved``), and no approval is used by two allows
  (``approval_reused``);
- a resolution ``rejected`` or ``expired`` is the last word: no allow may
  use the approval after it (``approval_ended``);
- the allow's time must be before the approval's ``expires_at``, as the
  ``approval_requested`` record has it (``approval_expired``);
- the allow must be for the request approved (``approval_mismatch``): its
  chain ids, action, resource kind and id, and the binding digest it
  carries equal the ``approval_requested`` record's. Where neither record
  is redacted, the digest is also recomputed from the allow record
  (``approvals.binding``): the attributes must be equal, and the context,
  less the keys the ``approval_requested`` record names as left out of the
  digest (``volatile_context``), must hash to the approved digest.

The full walk also recomputes the limits (``check_limits``, with its own
theory below): the ``limits`` rows equal the counted entries of the kept
records, and each decision's seen ``count``/``sum`` equal what the records
before it counted in its window. A record whose seen values or entries are
wrong (a decision made on a wrong count) comes before any row that is
missing, added or changed: the first mismatch in that order is the problem
(``missing`` for a row not stored, else ``edited``), headed ``record N`` or
by the row's name, the next ones notes, with one note counting each kind;
a window reaching back past the latest pruned record is counted as not
checkable, in a note.

An approval opened before a pruning seam is not known to the walk, so an
allow citing it is not checked for approval, expiry or binding (its second
use still is), and neither is its resolution.

The walk stops at the first problem and names the record or tree size,
the kind (``chain.ProblemKind``) and why. What could not be checked at
all (no witness, no checkpoints yet) goes in the report's notes.

The log is opened read-only (no writer lock, LMDB's reader table), so this
works beside a running daemon: every read goes through one pinned read
transaction (``AuditStore.reading``), so the head, the records, the nodes
and the checkpoints are all of one snapshot.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal, NamedTuple

import lmdb
import msgspec

from kynara_sidecar.audit import merkle
from kynara_sidecar.audit.chain import (
    GENESIS_HASH,
    ChainProblem,
    ProblemKind,
    VerifyReport,
    check_record,
    decode_record,
)
from kynara_sidecar.audit.checkpoint import (
    CheckpointError,
    CheckpointProblem,
    CheckpointV1,
    verify_checkpoint,
)
from kynara_sidecar.audit.counters import (
    LIMITS_DB,
    counted_entries,
    decode_row,
    rows_of,
)
from kynara_sidecar.audit.keys import PublicKey
from kynara_sidecar.audit.lineage import lineage_problem
from kynara_sidecar.audit.record import (
    AuditRecordV1,
    KeyRotationEntry,
    LimitEntry,
    RecordKind,
    decode_value,
    document_digest,
    format_timestamp,
    parse_timestamp,
)
from kynara_sidecar.audit.rotation import trusted_after
from kynara_sidecar.audit.store import AuditStore, Head, StoredRecord
from kynara_sidecar.audit.verify_pack import (
    SeenAbove,
    SeenValues,
    compare_seen,
    exact_sum,
    seen_above_text,
)
from kynara_sidecar.audit.witness import HEAD_FILE, Witness, WitnessError
from kynara_sidecar.decision import Timestamp
from kynara_sidecar.errors import AuditUnavailable, PolicyError
from kynara_sidecar.policy.compiler import compute_revision
from kynara_sidecar.policy.loader import decode_document

__all__ = [
    "ChainProblem",
    "LimitMismatch",
    "LimitsReport",
    "ProblemKind",
    "VerifyReport",
    "WitnessError",
    "check_limits",
    "format_report",
    "recompute_totals",
    "verify_log",
    "verify_store",
]

NO_WITNESS_NOTE = (
    "no witness configured (audit.witness_path, --witness): a truncated tail "
    "cannot be detected"
)
_WITNESS_SETTING = "check audit.witness_path (or --witness)"

# Statement subjects, in the order they are checked at one tree size.
_CHECKPOINT = "checkpoint"
_HEAD = "head checkpoint"
_WITNESS = "witness checkpoint"
_WITNESS_HEAD = "witness head"
_ORDER = {_CHECKPOINT: 0, _HEAD: 1, _WITNESS: 2, _WITNESS_HEAD: 3}
# Subjects of problems that are not a record or a signed statement.
_SEAM = "seam"
_WITNESS_DIR = "witness"
_POLICY_SET = "policy set"
_PolicyPart = Literal["policy", "directory"]
_POLICY_PARTS: tuple[_PolicyPart, ...] = ("policy", "directory")

# What a restarting daemon appends first after the head it signed at its
# last clean stop: a key rotation (before the marker), or the start marker.
_START_EVENT = "start"
# The approval lifecycle check reads these record values.
_APPROVED = "approved"
_ENDINGS = frozenset({"rejected", "expired"})
_ALLOW = "allow"
_APPROVAL_GRANTED = "approval_granted"
_SIGNATURE_PROBLEMS = {
    CheckpointProblem.UNKNOWN_KEY: ProblemKind.UNKNOWN_KEY,
    CheckpointProblem.BAD_SIGNATURE: ProblemKind.BAD_SIGNATURE,
}
_WITNESS_FILE_RE = re.compile(r"checkpoint-(\d{20})\.json")


class _Statement(NamedTuple):
    """A signed statement of the log at one tree size, and where it was."""

    subject: str
    checkpoint: CheckpointV1

    @property
    def tree_size(self) -> int:
        return self.checkpoint.tree_size


class _Stop(Exception):
    # Carries the first problem out of the walk; never leaves this module.
    def __init__(self, problem: ChainProblem):
        super().__init__(problem.message)
        self.problem = problem


def _stop(at: int, kind: ProblemKind, message: str, subject: str = "record") -> _Stop:
    return _Stop(ChainProblem(at, kind, message, subject))


def verify_store(
    store: AuditStore,
    trusted: Mapping[str, PublicKey] | None,
    witness: Witness | None,
    *,
    from_tree_size: int | None = None,
    require_witness: bool = False,
) -> VerifyReport:
    """Check an open log against its checkpoints, the trusted keys and the
    witness; report the first problem.

    Every read is of one snapshot (``AuditStore.reading``), so a daemon
    appending beside the check cannot make it compare a head from one
    moment with records from another.

    Args:
        store: the log, open read-only or for writing (nothing is written).
        trusted: key id to public key, from configuration only; ``None``
            checks no signature (a note says so): for callers that only
            want the structure checked, never for ``verify`` itself.
        witness: the log's witness directory, or ``None`` when there is
            none (a note then says a cut tail cannot be detected).
        from_tree_size: check only the records after the checkpoint at this
            tree size (the daemon's start-up check), and the front cheaply;
            ``None`` checks all.
        require_witness: a witness that holds nothing for a log with
            checkpoints is a problem (``missing``), not a note: for
            ``verify`` given a witness. Ignored when ``witness`` is None.

    Returns:
        The report; ``report.ok`` when everything checks out.

    Raises:
        WitnessError: the witness cannot be read at all (its path is not a
            directory, or is not readable); names the setting.
        AuditUnavailable: the log cannot be read (LMDB reports damage).
    """
    # The witness first, then the log's snapshot: a daemon witnesses a
    # checkpoint only after committing it, so the snapshot taken second
    # holds everything the witness read first states.
    try:
        witnessed: list[_Statement] | _Stop = (
            [] if witness is None else _witnessed(witness)
        )
    except _Stop as stop:
        witnessed = stop
    try:
        with store.reading():
            report = _verify(
                store, trusted, witness, witnessed, from_tree_size, require_witness
            )
            if report.ok and witness is not None:
                report = _check_lineage(store, witness, trusted, report)
            return report
    except lmdb.Error as err:
        # NOTE: damage LMDB reports comes here; damage it does not expect
        # (zeroed pages inside the file) trips an assertion in LMDB itself
        # and aborts the process. A truncated file is refused before LMDB
        # maps it (store.check_data_file); `new-chain --force` moves a log
        # aside without walking it.
        raise AuditUnavailable(
            f"audit log {store.path} cannot be read ({err}): its data file is "
            "damaged; restore it, or run `kynara-sidecar new-chain` to start a "
            "new log that names the loss"
        ) from err


def _check_lineage(
    store: AuditStore,
    witness: Witness,
    trusted: Mapping[str, PublicKey] | None,
    report: VerifyReport,
) -> VerifyReport:
    problem = lineage_problem(store, witness, trusted)
    if problem is None:
        return report
    return msgspec.structs.replace(
        report, problem=ChainProblem(1, ProblemKind.MISSING, problem, "log")
    )


def _verify(
    store: AuditStore,
    trusted: Mapping[str, PublicKey] | None,
    witness: Witness | None,
    witnessed: list[_Statement] | _Stop,
    from_tree_size: int | None,
    require_witness: bool,
) -> VerifyReport:
    walk = _Walk(store, trusted, full=from_tree_size is None)
    stored_head = store.stored_head()
    head_seq, head_hash = stored_head or (0, GENESIS_HASH)
    try:
        if isinstance(witnessed, _Stop):
            raise witnessed
        statements = _statements(
            store, witness, witnessed, from_tree_size, stored_head, walk
        )
        walk.check_front(stored_head, statements)
        pending = walk.start(from_tree_size, statements)
        pending = walk.run(pending)
        walk.check_head(stored_head)
        walk.check_beyond(pending)
        walk.check_policy_sets()
        walk.check_limits()
        walk.check_witnessed(witness, require_witness)
    except _Stop as stop:
        problem: ChainProblem | None = stop.problem
    else:
        problem = None
        walk.add_summary_notes()
    return VerifyReport(
        walk.records,
        head_seq,
        head_hash,
        problem,
        checkpoints=walk.checkpoints,
        seam=walk.start_size,
        notes=tuple(walk.notes),
    )


def verify_log(
    path: str | os.PathLike[str],
    trusted: Mapping[str, PublicKey] | None = None,
    witness_root: str | os.PathLike[str] | None = None,
    *,
    origin: str | None = None,
    require_witness: bool = False,
) -> VerifyReport:
    """Open the log at ``path`` read-only and check all of it.

    Args:
        path: the log's directory (``audit.path``).
        trusted: key id to public key (``audit.trusted_keys`` and the public
            halves of the signing keys); ``None`` checks no signature (see
            ``verify_store``), while an empty mapping trusts no key, so any
            checkpoint fails as ``unknown_key``.
        witness_root: the witness location (``audit.witness_path``), or
            ``None`` for none.
        origin: the origin (``identity.daemon_id``) to find the witness
            directory by when the log names none itself (an empty log); a
            log's own checkpoints (or records) name its origin for life.
        require_witness: a witness holding nothing for a log with
            checkpoints is a problem, not a note (see ``verify_store``);
            ``kynara-sidecar verify`` asks for it when given a witness.

    Returns:
        The report; ``report.ok`` when every record, node, checkpoint and
        witnessed statement checks out.

    Raises:
        WitnessError: the witness cannot be read at all; names the setting.
        AuditUnavailable: there is no audit log at ``path``, or it cannot be
            opened (its format version is unknown, say).
    """
    store = AuditStore.open(path, readonly=True)
    try:
        witness, notes = None, []
        if witness_root:
            origin = _origin(store) or origin
            if origin:
                witness = Witness(witness_root, origin, store.log_id)
            else:
                notes.append("the log names no origin yet: no witness to check")
        report = verify_store(store, trusted, witness, require_witness=require_witness)
        if witness is None and witness_root:
            report = msgspec.structs.replace(
                report, notes=tuple(n for n in report.notes if n != NO_WITNESS_NOTE)
            )
        return msgspec.structs.replace(report, notes=(*notes, *report.notes))
    finally:
        store.close()


def format_report(report: VerifyReport) -> str:
    """Lines for people. The first is ``ok: 42 records, head 42 <hash>...``
    or ``record 7: edited: <why>``; each note follows as ``note: ...``."""
    if report.problem is None:
        first = (
            f"ok: {report.records} records, head {report.head_seq} "
            f"{report.head_hash.hex()}"
        )
        if report.checkpoints:
            first += f", {report.checkpoints} checkpoints"
        if report.seam:
            first += f", from tree size {report.seam}"
    else:
        problem = report.problem
        first = f"{_place(problem)}: {problem.kind}: {problem.message}"
    return "\n".join([first, *(f"note: {note}" for note in report.notes)])


def _place(problem: ChainProblem) -> str:
    # A limits row is named by what it holds (limit, time, decision), not
    # by a number: its record's seq is in the message.
    if problem.subject.startswith(_LIMITS_ROW + " "):
        return problem.subject
    return f"{problem.subject} {problem.seq}"


# ------------------------------------------------------------- statements


def _statements(
    store: AuditStore,
    witness: Witness | None,
    witnessed: list[_Statement],
    from_tree_size: int | None,
    stored_head: Head | None,
    walk: _Walk,
) -> list[_Statement]:
    """Every signed statement to check, by tree size, in check order."""
    after = 0 if from_tree_size is None else max(from_tree_size - 1, 0)
    limit = stored_head.seq if stored_head is not None else 0
    found = [
        _Statement(_CHECKPOINT, cp) for cp in _stored_checkpoints(store, after, limit)
    ]
    try:
        head = store.head_checkpoint()
    except CheckpointError as err:
        raise _stop(0, ProblemKind.EDITED, f"does not decode: {err}", _HEAD) from None
    if head is not None:
        found.append(_Statement(_HEAD, head))
    if witness is None:
        walk.notes.append(NO_WITNESS_NOTE)
    else:
        if not witnessed:
            walk.witness_empty = True
            walk.notes.append(
                f"the witness at {witness.path} holds nothing for this log "
                f"(origin {witness.origin}, log id {store.log_id}): its tail is "
                "not witnessed"
            )
        found += witnessed
    if from_tree_size is not None:
        found = [st for st in found if st.tree_size >= from_tree_size]
    walk.learn(found)
    return sorted(found, key=lambda st: (st.tree_size, _ORDER[st.subject]))


def _stored_checkpoints(
    store: AuditStore, after: int, limit: int
) -> list[CheckpointV1]:
    found: list[CheckpointV1] = []
    last = after
    try:
        for cp in store.iter_checkpoints(after):
            # Rows are keyed by tree size; a row under another key was moved.
            if cp.tree_size <= last or store.checkpoint(cp.tree_size) != cp:
                raise _stop(
                    cp.tree_size,
                    ProblemKind.EDITED,
                    f"stored after tree size {last} under another key than its "
                    f"tree size {cp.tree_size}",
                    _CHECKPOINT,
                )
            found.append(cp)
            last = cp.tree_size
    except CheckpointError as err:
        at = _undecodable_checkpoint(store, last, limit)
        if at is None:
            raise _stop(
                last,
                ProblemKind.EDITED,
                f"the stored checkpoint after this one does not decode: {err}",
                _CHECKPOINT,
            ) from None
        raise _stop(
            at, ProblemKind.EDITED, f"does not decode: {err}", _CHECKPOINT
        ) from None
    return found


def _undecodable_checkpoint(store: AuditStore, after: int, limit: int) -> int | None:
    # The iterator does not say which key failed; look each size up until
    # the head (only on this failure path: a segment's worth of lookups).
    for size in range(after + 1, limit + 1):
        try:
            store.checkpoint(size)
        except CheckpointError:
            return size
    return None


def _witnessed(witness: Witness) -> list[_Statement]:
    try:
        found = [_Statement(_WITNESS, cp) for cp in witness.checkpoints()]
        head = witness.head()
    except WitnessError as err:
        if isinstance(err.__cause__, CheckpointError):
            # A file there that is not a checkpoint: evidence was edited.
            match = _WITNESS_FILE_RE.search(str(err))
            at = int(match.group(1)) if match else 0
            subject = _WITNESS if match else _WITNESS_HEAD
            if not match and HEAD_FILE not in str(err):
                subject = _WITNESS_DIR
            raise _stop(at, ProblemKind.EDITED, str(err), subject) from None
        raise WitnessError(f"{err}: {_WITNESS_SETTING}") from err
    except OSError as err:
        raise WitnessError(
            f"cannot read the witness at {witness.path} "
            f"({err.strerror or err}): {_WITNESS_SETTING}"
        ) from err
    if head is not None:
        found.append(_Statement(_WITNESS_HEAD, head))
    return found


def _origin(store: AuditStore) -> str | None:
    with contextlib.suppress(CheckpointError):
        for cp in (store.latest_checkpoint(), store.head_checkpoint()):
            if cp is not None:
                return cp.origin
    with contextlib.suppress(AuditUnavailable):  # a garbage seam: named later
        with contextlib.closing(store.iter_records(store.seam() + 1)) as records:
            for stored in records:
                origin = _parse(stored.record_bytes).get("daemon_id")
                return origin if isinstance(origin, str) and origin else None
    return None


def _parse(data: bytes) -> dict[str, Any]:
    try:
        obj = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return {}
    return obj if isinstance(obj, dict) else {}


def _check_signature(
    statement: _Statement, trusted: Mapping[str, PublicKey] | None
) -> None:
    if trusted is None:
        return
    cp = statement.checkpoint
    try:
        verify_checkpoint(cp, dict(trusted))
    except CheckpointError as err:
        message = str(err).split(": ", 1)[-1]
        kind = _SIGNATURE_PROBLEMS.get(err.kind, ProblemKind.EDITED)
        if err.kind == CheckpointProblem.MALFORMED and message.startswith("signature"):
            kind = ProblemKind.BAD_SIGNATURE
        if kind == ProblemKind.UNKNOWN_KEY:
            message += " (trust a key with --trusted-key or audit.trusted_keys)"
        raise _stop(cp.tree_size, kind, message, statement.subject) from None


def _first_record(store: AuditStore) -> int | None:
    with contextlib.closing(store.iter_records(1)) as records:
        for stored in records:
            return stored.seq
    return None


def _policy_revision(files: Mapping[str, bytes], where: str) -> str:
    """The revision the policy loader gives these files.

    Raises:
        PolicyError: a file does not load.
    """
    documents = [
        decode_document(f"{where}/{name}", content, name=name)
        for name, content in files.items()
    ]
    return compute_revision(documents)


# ------------------------------------------------------------------ walk


class _Walk:
    """The walk's state: where it is, the tree so far, the keys trusted."""

    def __init__(
        self,
        store: AuditStore,
        trusted: Mapping[str, PublicKey] | None,
        *,
        full: bool,
    ):
        self.store = store
        self.trusted: dict[str, PublicKey] | None = (
            None if trusted is None else dict(trusted)
        )
        self.full = full
        self.seq = 0
        self.prev_hash = GENESIS_HASH
        self.tree = merkle.CompactRange()
        self.start_size = 0
        self.records = 0
        self.checkpoints = 0
        self.notes: list[str] = []
        self.has_nodes = _has_nodes(store)
        # Filled by learn(): what the statements say the log must hold.
        self.stored_sizes: set[int] = set()
        self.head_size: int | None = None
        self.head_sizes: set[int] = set()
        # After a head and a key rotation: where the start marker is due,
        # and the head it follows.
        self.start_due: int | None = None
        self.start_head = 0
        self.witness_empty = False
        # (part, revision) -> the first record citing it.
        self.cited: dict[tuple[_PolicyPart, str], int] = {}
        # Approval id -> what the walk has seen of it.
        self.approvals: dict[str, _ApprovalSeen] = {}
        # The limits rows and seen values, recomputed (full walks only).
        self.limits = _LimitsCheck(store) if full else None

    def learn(self, statements: list[_Statement]) -> None:
        """Note which sizes the log stores checkpoints at, and its heads."""
        for st in statements:
            if st.subject == _CHECKPOINT:
                self.stored_sizes.add(st.tree_size)
            elif st.subject == _HEAD:
                self.head_size = st.tree_size
            if st.subject in (_HEAD, _WITNESS_HEAD):
                self.head_sizes.add(st.tree_size)

    # -- the front: the seam, the first record, the nodes database

    def check_front(self, head: Head | None, statements: list[_Statement]) -> None:
        """Check what the start rests on, without walking the log."""
        try:
            seam = self.store.seam()
        except AuditUnavailable as err:
            raise _stop(
                0,
                ProblemKind.EDITED,
                f"{err}: the seam value is garbage, not one a prune writes",
                _SEAM,
            ) from None
        if head is not None and seam > head.seq:
            raise _stop(
                seam,
                ProblemKind.EDITED,
                f"meta seam names tree size {seam}, past the log's last record "
                f"{head.seq}: the seam value is garbage, not one a prune writes",
                _SEAM,
            )
        first = _first_record(self.store)
        if first is not None and first <= seam:
            raise _stop(
                seam,
                ProblemKind.EDITED,
                f"meta seam says records 1..{seam} were pruned, but record "
                f"{first} is stored: the seam was moved to skip records",
                _SEAM,
            )
        if first is not None and first > seam + 1:
            self._cut_front(seam, first)
        if not self.has_nodes and statements:
            size = statements[0].tree_size
            raise _stop(
                size,
                ProblemKind.MISSING,
                "the log has no Merkle nodes database, but a statement at this "
                "tree size was signed over them: the nodes were deleted",
                statements[0].subject,
            )

    def _cut_front(self, seam: int, first: int) -> None:
        gone = seam + 1
        what = (
            f"record {gone} is gone"
            if first == gone + 1
            else f"records {gone}..{first - 1} are gone"
        )
        where = f"the seam at {seam}" if seam else "no seam (nothing pruned)"
        raise _stop(
            gone,
            ProblemKind.TRUNCATED_FRONT,
            f"{what}, and the log records {where}: its first record is {first}",
        )

    # -- the start: genesis, the seam, or the checkpoint a tail check names

    def start(
        self, from_tree_size: int | None, statements: list[_Statement]
    ) -> list[_Statement]:
        """Set the walk at its start; check what lies at or before it.

        Returns:
            The statements after the start, still to check.
        """
        seam = self.store.seam()
        # A tail check never starts before the seam: those records are gone.
        tail = from_tree_size is not None and from_tree_size > seam
        start = from_tree_size if tail else seam
        if tail and seam:
            self._anchor(seam, tail=False)  # the front, cheaply
        if start:
            self._start_at(start, tail)
            self.notes.append(
                f"checked the tail after the checkpoint at tree size {start}"
                if tail
                else f"records 1..{start} were pruned; checked from the seam"
            )
        elif not self.has_nodes:
            self.notes.append(
                "the log has no Merkle nodes (written before the tree): open it "
                "once for writing to build them; only the chain was checked"
            )
        for st in statements:
            if st.tree_size <= start:
                self._check_before_start(st, start)
        return [st for st in statements if st.tree_size > start]

    def _stored_checkpoint(self, size: int) -> CheckpointV1 | None:
        try:
            return self.store.checkpoint(size)
        except CheckpointError as err:
            raise _stop(
                size, ProblemKind.EDITED, f"does not decode: {err}", _CHECKPOINT
            ) from None

    def _anchor(
        self, start: int, *, tail: bool
    ) -> tuple[CheckpointV1, merkle.CompactRange]:
        """The checkpoint at ``start`` and the stored nodes' tree there,
        checked against each other and the stored record at ``start``."""
        what = "tail check starts" if tail else f"seam (records 1..{start} pruned)"
        anchor = self._stored_checkpoint(start)
        if anchor is None:
            raise _stop(
                start,
                ProblemKind.MISSING if tail else ProblemKind.TRUNCATED_FRONT,
                f"the {what} at a checkpoint that is not stored",
                _CHECKPOINT,
            )
        self._check_signed(_Statement(_CHECKPOINT, anchor))
        try:
            _, edge = merkle.compact_range_from_nodes(self._node, start).state()
            tree = merkle.CompactRange.from_state(start, edge)
        except (_MissingNode, ValueError) as err:
            # Nodes are never pruned: gone at the seam, the front was cut;
            # gone anywhere else, they were deleted.
            raise _stop(
                start,
                ProblemKind.EDITED if tail else ProblemKind.TRUNCATED_FRONT,
                f"the {what} lacks its Merkle nodes: {err}",
                _CHECKPOINT,
            ) from None
        if tree.root().hex() != anchor.root:
            raise _stop(
                start,
                ProblemKind.EDITED,
                f"root {anchor.root} differs from the stored nodes' root "
                f"{tree.root().hex()}",
                _CHECKPOINT,
            )
        stored = self.store.get(start)
        if stored is not None and stored.chain_hash.hex() != anchor.chain_hash:
            raise _stop(
                start,
                ProblemKind.EDITED,
                f"chain hash {anchor.chain_hash} differs from record {start}'s "
                f"stored chain hash {stored.chain_hash.hex()}",
                _CHECKPOINT,
            )
        return anchor, tree

    def _start_at(self, start: int, tail: bool) -> None:
        anchor, tree = self._anchor(start, tail=tail)
        self.seq, self.prev_hash, self.tree = (
            start,
            bytes.fromhex(anchor.chain_hash),
            tree,
        )
        self.start_size = start
        self.checkpoints += 1

    def _check_before_start(self, st: _Statement, start: int) -> None:
        # Records up to the start are pruned (or not walked): the stored
        # nodes and the checkpoint at the same size are all there is.
        self._check_signed(st)
        size = st.tree_size
        try:
            root = merkle.root_from_nodes(self._node, size)
        except (_MissingNode, ValueError) as err:
            raise _stop(
                size, ProblemKind.TRUNCATED_FRONT, f"Merkle nodes missing: {err}",
                st.subject,
            ) from None  # fmt: skip
        stored = self._stored_checkpoint(size)
        chain = None if stored is None else stored.chain_hash
        if size == start == 0:
            chain = GENESIS_HASH.hex()
        self._compare(st, root.hex(), chain, f"the log's at tree size {size}")
        self._check_stored(st)
        if st.subject == _CHECKPOINT and size < start:
            self.checkpoints += 1

    # -- the records

    def run(self, pending: list[_Statement]) -> list[_Statement]:
        """Walk the records after the start; check statements as their tree
        size is reached. Returns the statements beyond the last record."""
        with contextlib.closing(self.store.iter_records(self.seq + 1)) as records:
            for stored in records:
                self._record(stored)
                while pending and pending[0].tree_size == self.seq:
                    self._check_statement(pending.pop(0))
        return pending

    def _record(self, stored: StoredRecord) -> None:
        seq, data = stored.seq, stored.record_bytes
        problem = check_record(self.seq, self.prev_hash, seq, data, stored.chain_hash)
        if problem is not None:
            raise _Stop(problem)
        leaf = merkle.leaf_hash(data)
        if self.has_nodes:
            self._check_nodes(seq, leaf)
        self.tree.append(leaf)
        record = _parse(data)
        if seq - 1 in self.head_sizes or seq == self.start_due:
            self._check_after_head(seq, record)
        if record.get("kind") == RecordKind.KEY_ROTATION:
            self._rotate(seq, record)
        if record.get("kind") == RecordKind.DECISION and record.get("decision_id"):
            self._check_index(seq, record["decision_id"])
        if self.full:
            self._cite(seq, record)
            self._check_approval(seq, record)
        if self.limits is not None:
            self.limits.record(seq, data, record)
        self.seq, self.prev_hash = seq, stored.chain_hash
        self.records += 1

    def _check_after_head(self, seq: int, record: dict[str, Any]) -> None:
        # From a head at n to the start marker: rotations, then the marker,
        # sealed at its own size.
        kind = record.get("kind")
        marker = record.get("marker")
        event = marker.get("event") if isinstance(marker, dict) else None
        head = self.start_head if seq == self.start_due else seq - 1
        self.start_due = None
        if kind == RecordKind.KEY_ROTATION:
            self.start_due, self.start_head = seq + 1, head
            return
        if kind == RecordKind.MARKER and event == _START_EVENT:
            # Every build that signs heads also seals its start marker, so an
            # unsealed one after a signed head was not written by a daemon.
            if seq in self.stored_sizes:
                return
            raise _stop(
                seq,
                ProblemKind.EDITED,
                f"is the start marker after the head signed at a clean stop at "
                f"tree size {head}, but is not sealed (no checkpoint is stored "
                f"at tree size {seq}): not written by the daemon, which seals "
                "its start marker in the transaction that commits it",
            )
        what = f"a {event!r} marker" if kind == RecordKind.MARKER else repr(kind)
        rotations = "" if head == seq - 1 else " and the key rotations after it"
        raise _stop(
            seq,
            ProblemKind.EDITED,
            f"follows the head signed at a clean stop at tree size {head}"
            f"{rotations}, but is {what}: a restarting daemon appends a key "
            "rotation or its start marker first, so this record was appended "
            "by someone else "
            "(records after the last signed statement are protected only by "
            "the chain)",
        )

    def _cite(self, seq: int, record: dict[str, Any]) -> None:
        for part in _POLICY_PARTS:
            revision = record.get(f"{part}_revision")
            if isinstance(revision, str) and revision:
                self.cited.setdefault((part, revision), seq)

    def _check_approval(self, seq: int, record: dict[str, Any]) -> None:
        approval = record.get("approval")
        if not isinstance(approval, dict):
            return
        approval_id = str(approval.get("id"))
        seen = self.approvals.setdefault(approval_id, _ApprovalSeen())
        kind = record.get("kind")
        if kind == RecordKind.APPROVAL_REQUESTED and not seen.requested:
            seen.requested, seen.asked = seq, _asked(seq, record, approval)
        elif kind == RecordKind.APPROVAL_RESOLVED:
            self._resolve(seq, approval_id, seen, approval.get("resolution"))
        elif (
            kind == RecordKind.DECISION
            and record.get("decision") == _ALLOW
            and record.get("reason_code") == _APPROVAL_GRANTED
        ):
            self._use(seq, approval_id, seen, record)

    def _resolve(
        self, seq: int, approval_id: str, seen: _ApprovalSeen, resolution: object
    ) -> None:
        if resolution == _APPROVED:
            if not seen.requested and self.start_size == 0:
                raise _stop(
                    seq,
                    ProblemKind.APPROVAL_NOT_REQUESTED,
                    f"approves approval {approval_id!r}, which no earlier "
                    "approval_requested record opened",
                )
            seen.approved = seen.approved or seq
        elif resolution in _ENDINGS and not seen.ended:
            seen.ended, seen.ending, seen.asked = seq, str(resolution), None

    def _use(
        self, seq: int, approval_id: str, seen: _ApprovalSeen, record: dict[str, Any]
    ) -> None:
        if seen.used:
            raise _stop(
                seq,
                ProblemKind.APPROVAL_REUSED,
                f"allows by approval {approval_id!r}, which record {seen.used} used "
                "already: a grant allows once",
            )
        if not seen.approved and self.start_size == 0:
            raise _stop(
                seq,
                ProblemKind.APPROVAL_NOT_APPROVED,
                f"allows by approval {approval_id!r}, which no earlier "
                "approval_resolved record approved",
            )
        if seen.ended:
            raise _stop(
                seq,
                ProblemKind.APPROVAL_ENDED,
                f"allows by approval {approval_id!r}, which record {seen.ended} "
                f"resolved {seen.ending} before: a final resolution is the last "
                "word",
            )
        asked, seen.used, seen.asked = seen.asked, seq, None
        if asked is None:
            return
        if not _before(record.get("time"), asked.expires_at):
            raise _stop(
                seq,
                ProblemKind.APPROVAL_EXPIRED,
                f"allows by approval {approval_id!r} at {record.get('time')!r}, "
                f"not before its expires_at {asked.expires_at!r} (record "
                f"{asked.seq})",
            )
        why = _mismatch(asked, record)
        if why:
            raise _stop(
                seq,
                ProblemKind.APPROVAL_MISMATCH,
                f"allows by approval {approval_id!r}, given for another request "
                f"(record {asked.seq}): {why}",
            )

    def _check_nodes(self, seq: int, leaf: bytes) -> None:
        # The nodes this leaf completes: the leaf, then each merge with the
        # right edge's subtrees, as CompactRange.append does.
        _, edge = self.tree.state()
        node = leaf
        for level, index in merkle.node_positions(seq):
            if level:
                node = merkle.node_hash(edge[-level], node)
            stored = self.store.node(level, index)
            if stored != node:
                what = "leaf" if level == 0 else f"node (level {level}, index {index})"
                got = stored.hex() if stored is not None else "nothing"
                raise _stop(
                    seq,
                    ProblemKind.EDITED,
                    f"Merkle {what} stored as {got}, recomputed from the records "
                    f"as {node.hex()}",
                )

    def _rotate(self, seq: int, record: dict[str, Any]) -> None:
        if self.trusted is None:
            return
        try:
            entry = msgspec.convert(record.get("key_rotation"), KeyRotationEntry)
        except msgspec.ValidationError as err:
            raise _stop(
                seq, ProblemKind.EDITED, f"key_rotation record is malformed: {err}"
            ) from None
        known = entry.old_key_id in self.trusted
        trusted, problem = trusted_after(
            entry,
            self.trusted,
            origin=str(record.get("daemon_id", "")),
            log_id=self.store.log_id,
        )
        if problem is not None:
            kind = ProblemKind.BAD_SIGNATURE if known else ProblemKind.UNKNOWN_KEY
            raise _stop(seq, kind, problem)
        self.trusted = trusted

    def _check_index(self, seq: int, decision_id: str) -> None:
        indexed = self.store.find_decision(decision_id)
        if indexed == seq:
            return
        if indexed is not None and indexed < seq:
            # Ids are unique, but if one repeats the first record keeps it.
            earlier = self.store.get(indexed)
            if earlier is not None and (
                _parse(earlier.record_bytes).get("decision_id") == decision_id
            ):
                return
        raise _stop(
            seq,
            ProblemKind.EDITED,
            f"the decisions index maps decision {decision_id!r} to "
            f"{'nothing' if indexed is None else f'record {indexed}'}",
        )

    # -- statements

    def _check_signed(self, st: _Statement) -> None:
        """The signature (when keys are given), then the log id it names."""
        _check_signature(st, self.trusted)
        cp, log_id = st.checkpoint, self.store.log_id
        if cp.log_id != log_id:
            raise _stop(
                cp.tree_size,
                ProblemKind.EDITED,
                f"signed for log id {cp.log_id}, but the log's meta log_id is "
                f"{log_id or '(none)'}: the meta or this statement was replaced",
                st.subject,
            )

    def _check_statement(self, st: _Statement) -> None:
        self._check_signed(st)
        self._compare(
            st,
            self.tree.root().hex(),
            self.prev_hash.hex(),
            f"the one recomputed from records 1..{self.seq}",
        )
        self._check_stored(st)
        if st.subject == _CHECKPOINT:
            self.checkpoints += 1

    def _check_stored(self, st: _Statement) -> None:
        """A witnessed checkpoint, and a head's sealed checkpoint, must be
        stored in the log: checkpoints are never pruned."""
        size = st.tree_size
        if st.subject == _WITNESS_HEAD and self.head_size is None:
            # The log keeps the head it signed at its last stop before the
            # witness gets it; only a later stop replaces it.
            raise _stop(
                size,
                ProblemKind.MISSING,
                f"the witness holds the head signed at a clean stop at tree "
                f"size {size}, but the log stores no head checkpoint: it was "
                "deleted",
                _HEAD,
            )
        if st.subject == _CHECKPOINT or size in self.stored_sizes or not size:
            return
        if st.subject == _WITNESS_HEAD and size == self.head_size:
            return
        if st.subject == _WITNESS:
            what = "the witness holds a checkpoint"
        else:
            # A clean stop seals the open segment before it signs the head.
            what = f"the {st.subject} (a clean stop) names a segment sealed"
        raise _stop(
            size,
            ProblemKind.MISSING,
            f"{what} at tree size {size}, signed by {st.checkpoint.key_id}, but "
            "the log stores no checkpoint there: it was deleted",
            _CHECKPOINT,
        )

    def _compare(
        self, st: _Statement, root: str, chain: str | None, source: str
    ) -> None:
        cp = st.checkpoint
        if cp.root != root:
            raise _stop(
                cp.tree_size,
                ProblemKind.EDITED,
                f"root {cp.root} differs from {source}, {root}",
                st.subject,
            )
        if chain is not None and cp.chain_hash != chain:
            raise _stop(
                cp.tree_size,
                ProblemKind.EDITED,
                f"chain hash {cp.chain_hash} differs from {source}, {chain}",
                st.subject,
            )

    # -- the end

    def check_head(self, head: Head | None) -> None:
        """The stored head must name the last record and its chain hash."""
        last = self.seq
        ends = f"ends at record {last}" if last else "is empty"
        if head is None:
            if last:
                raise _stop(
                    last,
                    ProblemKind.HEAD_MISMATCH,
                    f"no head is stored, but the log ends at record {last}",
                )
            return
        head_seq, head_hash = head
        if head_seq > last:
            raise _stop(
                head_seq,
                ProblemKind.TRUNCATED_TAIL,
                f"head names record {head_seq}, but the log {ends}",
            )
        if head_seq < last:
            raise _stop(
                head_seq,
                ProblemKind.HEAD_MISMATCH,
                f"head names record {head_seq}, but the log {ends}",
            )
        if head_hash != self.prev_hash:
            raise _stop(
                head_seq,
                ProblemKind.HEAD_MISMATCH,
                f"head hash {head_hash.hex()} differs from record {last}'s chain "
                f"hash {self.prev_hash.hex()}",
            )

    def check_beyond(self, pending: list[_Statement]) -> None:
        """A validly signed statement of a larger tree: the tail was cut."""
        for st in pending:
            self._check_signed(st)
            raise _stop(
                st.tree_size,
                ProblemKind.TRUNCATED_TAIL,
                f"signed by {st.checkpoint.key_id} for a tree of "
                f"{st.tree_size} records, but the log ends at record {self.seq}",
                st.subject,
            )

    def check_policy_sets(self) -> None:
        """Every stored policy set must hash to the revision it is kept under.

        A cited set that is not stored is left to ``replay`` and ``export``,
        which report it: logs written before the sets were kept lack them.
        """
        if not self.full:
            return
        for part, revision, _ in self.store.iter_policy_sources():
            seq = self.cited.get((part, revision), 0)
            where = f"{self.store.path} policy_sets/{part}/{revision}"
            try:
                source = self.store.get_policy_source(part, revision)
                got = _policy_revision(source.files, where) if source else ""
            except (AuditUnavailable, PolicyError) as err:
                got = f"files that do not load ({err})"
            if got != revision:
                cited = f"cited first by record {seq}" if seq else "cited by none"
                raise _stop(
                    seq,
                    ProblemKind.EDITED,
                    f"the stored {part} files of revision {revision} ({cited}) "
                    f"hash to {got}",
                    _POLICY_SET,
                )

    def check_limits(self) -> None:
        """The limits rows and every decision's seen count and sum must be
        what the records say (``check_limits``): the first mismatch is the
        problem, the next ones are notes."""
        if self.limits is None:
            return
        report = self.limits.finish()
        if report.counted or report.rows or report.seen_checked or report.not_checkable:
            self.notes.append(_limits_note(report, self.limits.unknown_pruned))
        if report.ok:
            return
        first, *more = report.mismatches
        self.notes.append(_kinds_note(report.mismatches))
        for mismatch in more[:_MAX_LIMIT_NOTES]:
            self.notes.append(f"limits: {_mismatch_line(mismatch)}")
        if len(more) > _MAX_LIMIT_NOTES:
            self.notes.append(
                f"limits: {len(more) - _MAX_LIMIT_NOTES} more mismatches not listed"
            )
        raise _stop(
            first.seq,
            _LIMIT_KINDS.get(first.kind, ProblemKind.EDITED),
            f"{first.kind}: {first.message}"
            + (f" ({len(report.mismatches)} limits mismatches in all)" if more else ""),
            first.row or "record",
        )

    def check_witnessed(self, witness: Witness | None, required: bool) -> None:
        """With ``required``, a witness that saw nothing of a signed log is
        a problem (a note already says so otherwise)."""
        if witness is None or not self.witness_empty or not required:
            return
        signed = max((*self.stored_sizes, self.head_size or 0), default=0)
        if signed:
            raise _stop(
                signed,
                ProblemKind.MISSING,
                f"the witness at {witness.path} holds nothing for this log "
                f"(origin {witness.origin}, log id {self.store.log_id}), but "
                f"the log holds checkpoints up to tree size {signed}: its files "
                f"are gone, or it is not this log's witness; {_WITNESS_SETTING}",
                _WITNESS_DIR,
            )

    def add_summary_notes(self) -> None:
        if self.trusted is None:
            self.notes.append("no trusted keys given: no signature was checked")
        if self.records and not self.checkpoints:
            self.notes.append(
                "no checkpoint covers these records yet: nothing in them is signed"
            )

    def _node(self, level: int, index: int) -> bytes:
        value = self.store.node(level, index)
        if value is None:
            raise _MissingNode(f"node (level {level}, index {index}) is not stored")
        return value


class _Asked(NamedTuple):
    """What an approval_requested record says its approval binds."""

    seq: int
    digest: str
    expires_at: str
    chain: list[Any]
    action: object
    kind: object
    id: object
    attributes: object
    context: dict[str, Any]
    redacted: bool
    # The context keys the digest leaves out.
    volatile: frozenset[str]


class _ApprovalSeen:
    """What the walk has seen of one approval: the record of each event
    (0: none yet), and what its approval_requested record binds (dropped
    once it is used or ended, to keep the walk's memory to open ones)."""

    __slots__ = ("approved", "asked", "ended", "ending", "requested", "used")

    def __init__(self) -> None:
        self.requested = 0
        self.asked: _Asked | None = None
        self.approved = 0
        self.ended = 0
        self.ending = ""
        self.used = 0


def _request_parts(record: dict[str, Any]) -> tuple[list[Any], Any, Any, Any, Any]:
    chain = record.get("chain")
    ids = [p.get("id") if isinstance(p, dict) else p for p in chain or ()]
    resource = record.get("resource")
    resource = resource if isinstance(resource, dict) else {}
    return (
        ids,
        record.get("action", ""),
        resource.get("kind", ""),
        resource.get("id", ""),
        resource.get("attributes", {}),
    )


def _asked(seq: int, record: dict[str, Any], approval: dict[str, Any]) -> _Asked:
    chain, action, kind, resource_id, attributes = _request_parts(record)
    context = record.get("context")
    return _Asked(
        seq=seq,
        digest=str(approval.get("digest", "")),
        expires_at=str(approval.get("expires_at", "")),
        chain=chain,
        action=action,
        kind=kind,
        id=resource_id,
        attributes=attributes,
        context=context if isinstance(context, dict) else {},
        redacted=bool(record.get("redactions")),
        volatile=frozenset(
            key
            for key in approval.get("volatile_context") or ()
            if isinstance(key, str)
        ),
    )


def _before(time: object, expires_at: str) -> bool:
    # An unreadable time on either side is no proof the use was in time.
    try:
        used = parse_timestamp(str(time))
        ends = parse_timestamp(expires_at)
    except ValueError:
        return False
    return (used.seconds, used.nanos) < (ends.seconds, ends.nanos)


def _mismatch(asked: _Asked, record: dict[str, Any]) -> str:
    """Why the allow ``record`` is for another request than ``asked``
    binds; "" when it is the same."""
    chain, action, kind, resource_id, attributes = _request_parts(record)
    approval = record.get("approval") or {}
    for what, theirs, ours in (
        ("chain", chain, asked.chain),
        ("action", action, asked.action),
        ("resource kind", kind, asked.kind),
        ("resource id", resource_id, asked.id),
        ("digest", approval.get("digest", ""), asked.digest),
    ):
        if theirs != ours:
            return f"its {what} is {theirs!r}, the approval's {ours!r}"
    if asked.redacted or record.get("redactions"):
        return ""
    if attributes != asked.attributes:
        return "it binds another request: the resource attributes differ"
    context = record.get("context")
    context = context if isinstance(context, dict) else {}
    document = {
        "chain": chain,
        "action": action,
        "resource": {"kind": kind, "id": resource_id, "attributes": attributes},
        "context": {k: v for k, v in context.items() if k not in asked.volatile},
    }
    if document_digest(document) != asked.digest:
        differ = sorted(
            key
            for key in context.keys() | asked.context.keys()
            if context.get(key) != asked.context.get(key)
        )
        return (
            "it binds another request: its context, less the keys left out of "
            f"the digest [{', '.join(sorted(asked.volatile))}], hashes to "
            f"another digest (differing [{', '.join(differ)}])"
        )
    return ""


class _MissingNode(Exception):
    pass


def _has_nodes(store: AuditStore) -> bool:
    # merkle_root(0) needs no node, only the database: it tells a log that
    # predates the tree from one whose nodes were deleted.
    try:
        store.merkle_root(0)
    except AuditUnavailable:
        return False
    return True


# ---------------------------------------------------------------- limits
#
# The limits rows and the counts decisions saw, recomputed from the records.
# A record's ``limits`` entries are the truth: each counted entry must have
# its row (``counters.rows_of``), no other row may be stored, and each
# entry's ``count``/``sum`` must be what the records before it (log order)
# counted for the same limit and key at or after its ``window_start``. An
# entry naming what its limit counts (``definition``, its digest)
# sees only the decisions counted under that same definition; records
# without it form their own group. A window opening at or before the
# latest pruned record's time may hold pruned decisions: such an entry is
# counted as not checkable, not failed.
# The history per (limit, definition, key), the exact sums (ints exactly;
# doubles the exactly rounded sum of their amounts, which is what
# ``math.fsum`` returns) and the comparison of seen values are
# ``verify_pack``'s (``SeenValues``, ``compare_seen``): the offline pack
# check and this one recompute alike.
#
# NOTE: an entry that saw more than the records before it hold is a note
# (``seen_above``, naming the first), never a mismatch: why is
# ``verify_pack``'s NOTE on seen values (a refused commit's counts).

# What a limits mismatch is.
MISSING_ROW = "missing_row"
EXTRA_ROW = "extra_row"
ROW_DIFFERS = "row_differs"
SEEN_COUNT = "seen_count"
SEEN_SUM = "seen_sum"
LIMIT_ENTRY = "limit_entry"
_LIMIT_KINDS = {MISSING_ROW: ProblemKind.MISSING}
# The order mismatches are reported in: a decision made on a wrong count
# (or a record whose limits do not read) first, then the rows, which only
# repeat the records and are rebuilt from them.
_MISMATCH_ORDER = (
    SEEN_COUNT,
    SEEN_SUM,
    LIMIT_ENTRY,
    MISSING_ROW,
    ROW_DIFFERS,
    EXTRA_ROW,
)
_RANK = {kind: rank for rank, kind in enumerate(_MISMATCH_ORDER)}
_ROW_LEVEL = frozenset({MISSING_ROW, ROW_DIFFERS, EXTRA_ROW})
_LIMITS_ROW = "limits row"
# Further mismatches listed as notes after the first (the problem).
_MAX_LIMIT_NOTES = 20
# Later than any instant: every window "reaches back" past it.
_ALWAYS = 1 << 63


class LimitMismatch(msgspec.Struct, frozen=True):
    """One way the limits rows or a record's seen values disagree with the
    records: ``kind`` (``missing_row``, ``extra_row``, ``row_differs``,
    ``seen_count``, ``seen_sum``, ``limit_entry``), the limit and key, the
    record (``seq`` 0 when no retained record holds it) and decision id.
    ``row`` names the row of a row-level mismatch (``missing_row``,
    ``extra_row``, ``row_differs``): ``limits row 'limit' <time> 'decision'``,
    empty for a record-level one."""

    kind: str
    limit: str
    key: str
    seq: int
    decision_id: str
    message: str
    row: str = ""


class LimitsReport(msgspec.Struct, frozen=True):
    """What ``check_limits`` found. ``rows`` are the rows stored,
    ``counted`` the counted entries of the retained records, ``seen_checked``
    the entries whose seen values were recomputed, ``not_checkable`` those
    whose window reaches back past what pruning kept. ``mismatches`` come
    record-level first (``seen_count``, ``seen_sum``, ``limit_entry``: a
    decision made on a wrong count), by seq; then row-level ones by kind
    (``missing_row``, ``row_differs``, ``extra_row``) and seq."""

    rows: int
    counted: int
    seen_checked: int
    not_checkable: int
    mismatches: tuple[LimitMismatch, ...] = ()
    # Entries that saw more than the records before them hold: a note, not
    # a mismatch (``verify_pack``'s NOTE on seen values says why).
    seen_above: int = 0
    # The first of them: its record's seq, the limit and key.
    first_above: SeenAbove | None = None

    @property
    def ok(self) -> bool:
        return not self.mismatches


def check_limits(store: AuditStore) -> LimitsReport:
    """Recompute the limits rows and every decision's seen counts and sums
    from the retained records of an open log; list every mismatch.

    One snapshot (``AuditStore.reading``). The chain is not checked here:
    ``verify_store`` does both, and reports the first limits mismatch as
    its problem when the chain is intact.

    Raises:
        AuditUnavailable: the log cannot be read.
    """
    with store.reading():
        check = _LimitsCheck(store)
        with contextlib.closing(store.iter_records(store.seam() + 1)) as records:
            for stored in records:
                check.record(
                    stored.seq, stored.record_bytes, _parse(stored.record_bytes)
                )
        return check.finish()


def recompute_totals(
    store_or_records: AuditStore | Iterable[AuditRecordV1 | bytes],
    since_nanos: int,
) -> dict[tuple[str, str, str], tuple[int, int | float]]:
    """What every ``(limit, definition, key)`` counted at or after
    ``since_nanos``, from the records alone: ``(count, sum)``, the sum an
    int when every amount is, else the exact sum of the amounts rounded once
    (``math.fsum``'s value; infinity where ``math.fsum`` would overflow).
    Grouped by definition as the book and ``check_limits`` group: a limit
    whose definition changed counts afresh (records without one form their
    own group, definition "").

    Args:
        store_or_records: an open log (its retained records, one snapshot),
            or records (``AuditRecordV1``, or stored bytes) in log order.
        since_nanos: the instant, inclusive, in nanoseconds since the epoch.

    Raises:
        ValueError: a record counted with a malformed time or amount.
        msgspec.DecodeError, msgspec.ValidationError: stored bytes are not
            a v1 record.
    """
    amounts: dict[tuple[str, str, str], list[int | float]] = {}
    for record in _records_of(store_or_records):
        if not record.limits:
            continue
        if parse_timestamp(record.time).to_nanos() < since_nanos:
            continue
        for name, entry in counted_entries(record):
            group = (name, entry.definition, entry.key)
            amounts.setdefault(group, []).append(_amount(name, entry))
    totals: dict[tuple[str, str, str], tuple[int, int | float]] = {}
    for where, values in amounts.items():
        totals[where] = (len(values), exact_sum(values))
    return totals


def _records_of(
    source: AuditStore | Iterable[AuditRecordV1 | bytes],
) -> Iterator[AuditRecordV1]:
    if isinstance(source, AuditStore):
        with source.reading():
            with contextlib.closing(source.iter_records(source.seam() + 1)) as rows:
                for stored in rows:
                    yield decode_record(stored.record_bytes)
        return
    for item in source:
        yield decode_record(item) if isinstance(item, bytes) else item


def _amount(name: str, entry: LimitEntry) -> int | float:
    """A counted entry's amount: a finite number of at least 0, as the book
    counts and ``verify_pack`` accepts (a negative one would lower a sum
    below what the decisions counted)."""
    if entry.amount is None:
        raise ValueError(f"limit {name!r} counted the decision with no amount")
    amount = decode_value(entry.amount)
    if (
        isinstance(amount, bool)
        or not isinstance(amount, int | float)
        or not math.isfinite(amount)
        or amount < 0
    ):
        raise ValueError(
            f"limit {name!r} counted amount {amount!r}; expected a finite number "
            "of at least 0"
        )
    return amount


class _Expected(NamedTuple):
    value: bytes
    seq: int
    limit: str
    key: str
    decision_id: str


class _LimitsCheck:
    """Fed every retained record in log order; ``finish`` compares rows."""

    def __init__(self, store: AuditStore):
        self.store = store
        try:
            seam = store.seam()
        except AuditUnavailable:
            # A garbage seam: the walk names it; no window is checkable.
            seam = _ALWAYS
        # Windows opening at or before this may hold pruned decisions.
        pruned = store.pruned_time() if seam else -1
        self.bound = pruned if pruned else _ALWAYS
        self.unknown_pruned = bool(seam) and not pruned
        self.expected: dict[bytes, _Expected] = {}
        # By (limit, definition, key): what the limit counted, under which
        # definition, for which key.
        self.seen = SeenValues()
        self.mismatches: list[LimitMismatch] = []
        self.counted = 0
        self.seen_checked = 0
        self.not_checkable = 0
        self.seen_above = 0
        self.first_above: SeenAbove | None = None

    def _mismatch(
        self,
        kind: str,
        limit: str,
        key: str,
        seq: int,
        decision_id: str,
        message: str,
        row: str = "",
    ) -> None:
        self.mismatches.append(
            LimitMismatch(kind, limit, key, seq, decision_id, message, row)
        )

    def record(self, seq: int, data: bytes, parsed: dict[str, Any]) -> None:
        if not parsed.get("limits"):
            return
        decision_id = str(parsed.get("decision_id", ""))
        try:
            record = decode_record(data)
            time = parse_timestamp(record.time).to_nanos()
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as err:
            self._mismatch(
                LIMIT_ENTRY,
                "",
                "",
                seq,
                decision_id,
                f"its limits cannot be read: {err}",
            )
            return
        for name, entry in record.limits.items():
            if not entry.error:
                self._check_seen(seq, record.decision_id, name, entry)
        try:
            rows = rows_of(record)
        except ValueError as err:
            self._mismatch(
                LIMIT_ENTRY,
                "",
                "",
                seq,
                decision_id,
                f"its limits rows cannot be derived: {err}",
            )
            return
        for (row_key, row_value), (name, entry) in zip(
            rows, counted_entries(record), strict=True
        ):
            self.counted += 1
            self.expected[row_key] = _Expected(
                row_value, seq, name, entry.key, record.decision_id
            )
            try:
                amount = _amount(name, entry)
            except ValueError as err:
                self._mismatch(LIMIT_ENTRY, name, entry.key, seq, decision_id, str(err))
                continue
            self.seen.add(name, entry.definition, entry.key, time, amount)

    def _check_seen(
        self, seq: int, decision_id: str, name: str, entry: LimitEntry
    ) -> None:
        where = f"limit {name!r} key {entry.key!r}"
        try:
            start = parse_timestamp(entry.window_start).to_nanos()
            seen_sum = None if entry.sum is None else decode_value(entry.sum)
        except ValueError as err:
            self._mismatch(
                LIMIT_ENTRY,
                name,
                entry.key,
                seq,
                decision_id,
                f"{where}: its entry does not read: {err}",
            )
            return
        if start <= self.bound:
            self.not_checkable += 1
            return
        self.seen_checked += 1
        held = self.seen.held(name, entry.definition, entry.key, start)
        found = compare_seen(entry.count, seen_sum, held)
        opened = f"since its window_start {entry.window_start}"
        if found.above:
            self.seen_above += 1
            if self.first_above is None:
                self.first_above = SeenAbove(seq, name, entry.key)
            return
        if found.count_differs:
            self._mismatch(
                SEEN_COUNT,
                name,
                entry.key,
                seq,
                decision_id,
                f"{where}: the decision saw count {entry.count}, but the records "
                f"before it counted {held.count} {opened}",
            )
        if found.sum_differs:
            self._mismatch(
                SEEN_SUM,
                name,
                entry.key,
                seq,
                decision_id,
                f"{where}: the decision saw sum {seen_sum!r}, but the records "
                f"before it sum to {found.total!r} {opened}",
            )

    def finish(self) -> LimitsReport:
        store, expected = self.store, dict(self.expected)
        stored = store.iter_state(LIMITS_DB) if LIMITS_DB in store.extra_dbs else []
        for raw_key, raw_value in stored:
            want = expected.pop(raw_key, None)
            if want is None:
                self._extra(raw_key, raw_value)
            elif raw_value != want.value and _row_meaning(
                raw_key, raw_value
            ) != _row_meaning(raw_key, want.value):
                self._mismatch(
                    ROW_DIFFERS,
                    want.limit,
                    want.key,
                    want.seq,
                    want.decision_id,
                    f"limit {want.limit!r} key {want.key!r}: its row holds "
                    f"{_row_text(raw_key, raw_value)}, record {want.seq} counted "
                    f"{_row_text(raw_key, want.value)}",
                    _row_name(raw_key, want.value),
                )
        absent = (
            "" if LIMITS_DB in store.extra_dbs else " (the log has no limits database)"
        )
        for raw_key, want in expected.items():
            self._mismatch(
                MISSING_ROW,
                want.limit,
                want.key,
                want.seq,
                want.decision_id,
                f"limit {want.limit!r} key {want.key!r}: record {want.seq} counted "
                f"decision {want.decision_id!r}, but its row is not stored{absent}",
                _row_name(raw_key, want.value),
            )
        return LimitsReport(
            rows=len(stored),
            counted=self.counted,
            seen_checked=self.seen_checked,
            not_checkable=self.not_checkable,
            mismatches=tuple(sorted(self.mismatches, key=_reported_order)),
            seen_above=self.seen_above,
            first_above=self.first_above,
        )

    def _extra(self, raw_key: bytes, raw_value: bytes) -> None:
        try:
            row = decode_row(raw_key, raw_value)
        except ValueError as err:
            self._mismatch(
                EXTRA_ROW,
                "",
                "",
                0,
                "",
                f"a stored row no record accounts for: {err}",
                _row_name(raw_key, raw_value),
            )
            return
        seq = self.store.find_decision(row.decision_id) or 0
        held = (
            f"record {seq} holds decision {row.decision_id!r} but did not count it so"
            if seq
            else f"no retained record holds decision {row.decision_id!r}"
        )
        self._mismatch(
            EXTRA_ROW,
            row.limit,
            row.key,
            seq,
            row.decision_id,
            f"limit {row.limit!r} key {row.key!r}: a stored row (amount "
            f"{row.amount!r}) that no record counted: {held}",
            _row_name(raw_key, raw_value),
        )


def _reported_order(mismatch: LimitMismatch) -> tuple[bool, int, int]:
    # Record-level ones by seq (the earliest wrong decision first), then
    # row-level ones by kind (a missing row would let a restarted daemon
    # count too few) and seq.
    rank = _RANK.get(mismatch.kind, 0)
    if mismatch.kind in _ROW_LEVEL:
        return True, rank, mismatch.seq
    return False, mismatch.seq, rank


def _row_meaning(raw_key: bytes, raw_value: bytes) -> tuple[Any, ...] | None:
    try:
        row = decode_row(raw_key, raw_value)
    except ValueError:
        return None
    return (row.key, type(row.amount), row.amount, row.definition)


def _row_text(raw_key: bytes, raw_value: bytes) -> str:
    try:
        row = decode_row(raw_key, raw_value)
    except ValueError:
        return f"{raw_value[:64]!r} (not a row)"
    definition = f" definition {row.definition!r}" if row.definition else ""
    return f"key {row.key!r} amount {row.amount!r}{definition}"


def _row_name(raw_key: bytes, raw_value: bytes) -> str:
    """A row as the headline names it: ``limits row 'limit' <time>
    'decision'`` (what its key holds), or its raw key when it does not read."""
    try:
        row = decode_row(raw_key, raw_value)
        when = format_timestamp(Timestamp.from_nanos(row.time_nanos))
    except ValueError:
        return f"{_LIMITS_ROW} {raw_key[:64]!r}"
    return f"{_LIMITS_ROW} {row.limit!r} {when} {row.decision_id!r}"


def _limits_note(report: LimitsReport, unknown_pruned: bool) -> str:
    note = (
        f"limits: {report.rows} rows stored for {report.counted} counted "
        f"decisions; {report.seen_checked} seen counts recomputed from the "
        f"records, {report.not_checkable} not checkable"
    )
    if report.not_checkable:
        note += (
            " (the log was pruned before it kept the latest pruned time)"
            if unknown_pruned
            else " (their window opens at or before a pruned record)"
        )
    if report.seen_above:
        note += "; " + seen_above_text(report.seen_above, report.first_above)
    return note


def _mismatch_line(mismatch: LimitMismatch) -> str:
    if mismatch.row:
        where = mismatch.row
    else:
        where = f"record {mismatch.seq}" if mismatch.seq else "no record"
    return f"{where}: {mismatch.kind}: {mismatch.message}"


def _kinds_note(mismatches: Iterable[LimitMismatch]) -> str:
    """How many mismatches of each kind, in the order they are reported."""
    counts: dict[str, int] = {}
    for mismatch in mismatches:
        counts[mismatch.kind] = counts.get(mismatch.kind, 0) + 1
    listed = sorted(counts.items(), key=lambda item: _RANK.get(item[0], 0))
    return "limits mismatches by kind: " + ", ".join(
        f"{kind} {count}" for kind, count in listed
    )
