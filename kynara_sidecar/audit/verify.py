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
directory that holds nothing, which alone is only a note (a witness set up
after the log was started holds nothing for it either: the daemon does not
back-fill one). Every signed statement names the id it was signed for, so
the log's own checkpoints then disagree with its meta (``edited``); and a
witness statement copied in from another log is refused the same way.

Where the walk starts. With nothing pruned, at record 1 with the genesis
hash and an empty tree. After ``AuditStore.prune`` the records 1..s are
gone and meta ``seam`` = s; the seam is the checkpoint at s (signed, its
root equal to the root of the stored nodes' compact range at s) and the
first kept record s+1, chained from that checkpoint's chain hash. A log
whose first record is not 1, or not s+1, or whose seam checkpoint or seam
nodes are gone, was cut at the front (``truncated_front``). Checkpoints
before the seam are checked against the stored nodes (their records are
gone), and a key that only a pruned rotation introduced must be
configured to be trusted there.

``from_tree_size=t`` checks only the tail after the checkpoint at t, with
the configured keys: what the daemon does at start, so start-up time does
not grow with the log. ``None`` checks everything the log still holds.

The walk stops at the first problem and names the record or tree size,
the kind (``chain.ProblemKind``) and why. What could not be checked at
all (no witness, no checkpoints yet) goes in the report's notes.

The log is opened read-only (no writer lock, LMDB's reader table), so this
works beside a running daemon: the record walk reads one snapshot; the
nodes, checkpoints and index it consults are append-only, so later reads
still hold what that snapshot needs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import msgspec

from kynara_sidecar.audit import merkle
from kynara_sidecar.audit.chain import (
    GENESIS_HASH,
    ChainProblem,
    ProblemKind,
    VerifyReport,
    check_record,
)
from kynara_sidecar.audit.checkpoint import (
    CheckpointError,
    CheckpointProblem,
    CheckpointV1,
    verify_checkpoint,
)
from kynara_sidecar.audit.keys import PublicKey
from kynara_sidecar.audit.record import KeyRotationEntry, RecordKind
from kynara_sidecar.audit.rotation import trusted_after
from kynara_sidecar.audit.store import AuditStore, StoredRecord
from kynara_sidecar.audit.witness import Witness, WitnessError
from kynara_sidecar.errors import AuditUnavailable

__all__ = [
    "ChainProblem",
    "ProblemKind",
    "VerifyReport",
    "format_report",
    "verify_log",
    "verify_store",
]

NO_WITNESS_NOTE = (
    "no witness configured (audit.witness_path, --witness): a truncated tail "
    "cannot be detected"
)

# Statement subjects, in the order they are checked at one tree size.
_CHECKPOINT = "checkpoint"
_HEAD = "head checkpoint"
_WITNESS = "witness checkpoint"
_WITNESS_HEAD = "witness head"
_ORDER = {_CHECKPOINT: 0, _HEAD: 1, _WITNESS: 2, _WITNESS_HEAD: 3}

_SIGNATURE_PROBLEMS = {
    CheckpointProblem.UNKNOWN_KEY: ProblemKind.UNKNOWN_KEY,
    CheckpointProblem.BAD_SIGNATURE: ProblemKind.BAD_SIGNATURE,
}


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
) -> VerifyReport:
    """Check an open log against its checkpoints, the trusted keys and the
    witness; report the first problem.

    Args:
        store: the log, open read-only or for writing (nothing is written).
        trusted: key id to public key, from configuration only; ``None``
            checks no signature (a note says so): for callers that only
            want the structure checked, never for ``verify`` itself.
        witness: the log's witness directory, or ``None`` when there is
            none (a note then says a cut tail cannot be detected).
        from_tree_size: check only the records after the checkpoint at this
            tree size (the daemon's start-up check); ``None`` checks all.

    Returns:
        The report; ``report.ok`` when everything checks out.

    Raises:
        AuditUnavailable: the log cannot be read.
    """
    walk = _Walk(store, trusted)
    stored_head = store.stored_head()
    head_seq, head_hash = stored_head or (0, GENESIS_HASH)
    try:
        statements = _statements(store, witness, from_tree_size, walk.notes)
        pending = walk.start(from_tree_size, statements)
        pending = walk.run(pending)
        walk.check_head(stored_head)
        walk.check_beyond(pending)
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
        origin: the log's origin (``identity.daemon_id``) to find its
            witness directory; by default the one its checkpoints (or its
            records) name.

    Returns:
        The report; ``report.ok`` when every record, node, checkpoint and
        witnessed statement checks out.

    Raises:
        AuditUnavailable: there is no audit log at ``path``, or it cannot be
            opened (its format version is unknown, say).
    """
    store = AuditStore.open(path, readonly=True)
    try:
        witness, notes = None, []
        if witness_root:
            origin = origin or _origin(store)
            if origin:
                witness = Witness(witness_root, origin, store.log_id)
            else:
                notes.append("the log names no origin yet: no witness to check")
        report = verify_store(store, trusted, witness)
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
        first = f"{problem.subject} {problem.seq}: {problem.kind}: {problem.message}"
    return "\n".join([first, *(f"note: {note}" for note in report.notes)])


# ------------------------------------------------------------- statements


def _statements(
    store: AuditStore,
    witness: Witness | None,
    from_tree_size: int | None,
    notes: list[str],
) -> list[_Statement]:
    """Every signed statement to check, by tree size, in check order."""
    after = 0 if from_tree_size is None else max(from_tree_size - 1, 0)
    found = [_Statement(_CHECKPOINT, cp) for cp in _stored_checkpoints(store, after)]
    try:
        head = store.head_checkpoint()
    except CheckpointError as err:
        raise _stop(0, ProblemKind.EDITED, f"does not decode: {err}", _HEAD) from None
    if head is not None:
        found.append(_Statement(_HEAD, head))
    if witness is None:
        notes.append(NO_WITNESS_NOTE)
    else:
        found += _witnessed(witness, store, notes)
    if from_tree_size is not None:
        found = [st for st in found if st.tree_size >= from_tree_size]
    return sorted(found, key=lambda st: (st.tree_size, _ORDER[st.subject]))


def _stored_checkpoints(store: AuditStore, after: int) -> list[CheckpointV1]:
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
        raise _stop(
            last,
            ProblemKind.EDITED,
            f"the stored checkpoint after this one does not decode: {err}",
            _CHECKPOINT,
        ) from None
    return found


def _witnessed(
    witness: Witness, store: AuditStore, notes: list[str]
) -> list[_Statement]:
    try:
        found = [_Statement(_WITNESS, cp) for cp in witness.checkpoints()]
        head = witness.head()
    except WitnessError as err:
        raise _stop(0, ProblemKind.EDITED, str(err), "witness") from None
    if head is not None:
        found.append(_Statement(_WITNESS_HEAD, head))
    if not found:
        # A rewritten meta log_id also lands here, but then the stored
        # checkpoints name another id and the walk stops on them.
        # TODO(#5): a witness that never saw this log cannot vouch for its
        # tail (its files lost, or --origin naming another daemon). Fail
        # when the log has checkpoints but its witness has none, once the
        # daemon back-fills a witness configured after the log was started;
        # until then such a log would fail for a setting added later.
        notes.append(
            f"the witness at {witness.path} holds nothing for this log (origin "
            f"{witness.origin}, log id {store.log_id}): its tail is not witnessed"
        )
    return found


def _origin(store: AuditStore) -> str | None:
    with contextlib.suppress(CheckpointError):
        for cp in (store.latest_checkpoint(), store.head_checkpoint()):
            if cp is not None:
                return cp.origin
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


# ------------------------------------------------------------------ walk


class _Walk:
    """The walk's state: where it is, the tree so far, the keys trusted."""

    def __init__(self, store: AuditStore, trusted: Mapping[str, PublicKey] | None):
        self.store = store
        self.trusted: dict[str, PublicKey] | None = (
            None if trusted is None else dict(trusted)
        )
        self.seq = 0
        self.prev_hash = GENESIS_HASH
        self.tree = merkle.CompactRange()
        self.start_size = 0
        self.tail = False
        self.records = 0
        self.checkpoints = 0
        self.notes: list[str] = []
        self.has_nodes = _has_nodes(store)

    # -- the start: genesis, the seam, or the checkpoint a tail check names

    def start(
        self, from_tree_size: int | None, statements: list[_Statement]
    ) -> list[_Statement]:
        """Set the walk at its start; check what lies at or before it.

        Returns:
            The statements after the start, still to check.
        """
        tail = self.tail = bool(from_tree_size)
        start = from_tree_size if tail else self.store.seam()
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

    def _start_at(self, start: int, tail: bool) -> None:
        cut = ProblemKind.MISSING if tail else ProblemKind.TRUNCATED_FRONT
        what = "tail check starts" if tail else f"seam (records 1..{start} pruned)"
        anchor = self.store.checkpoint(start)
        if anchor is None:
            raise _stop(
                start,
                cut,
                f"the {what} at a checkpoint that is not stored",
                _CHECKPOINT,
            )
        self._check_signed(_Statement(_CHECKPOINT, anchor))
        try:
            _, edge = merkle.compact_range_from_nodes(self._node, start).state()
            tree = merkle.CompactRange.from_state(start, edge)
        except (_MissingNode, ValueError) as err:
            raise _stop(
                start, cut, f"the {what} lacks its Merkle nodes: {err}", _CHECKPOINT
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
        stored = self.store.checkpoint(size)
        chain = None if stored is None else stored.chain_hash
        if size == start == 0:
            chain = GENESIS_HASH.hex()
        self._compare(st, root.hex(), chain, f"the log's at tree size {size}")
        if st.subject == _CHECKPOINT and size < start:
            self.checkpoints += 1

    # -- the records

    def run(self, pending: list[_Statement]) -> list[_Statement]:
        """Walk the records after the start; check statements as their tree
        size is reached. Returns the statements beyond the last record."""
        first = True
        with contextlib.closing(self.store.iter_records(self.seq + 1)) as records:
            for stored in records:
                if first and stored.seq > self.seq + 1 and not self.tail:
                    # A gap before the first record kept: the front was cut
                    # past the seam (or with none recorded).
                    self._cut_front(stored.seq)
                first = False
                self._record(stored)
                while pending and pending[0].tree_size == self.seq:
                    self._check_statement(pending.pop(0))
        return pending

    def _cut_front(self, first: int) -> None:
        gone = self.seq + 1
        what = (
            f"record {gone} is gone"
            if first == gone + 1
            else f"records {gone}..{first - 1} are gone"
        )
        where = f"the seam at {self.seq}" if self.seq else "no seam (nothing pruned)"
        raise _stop(
            gone,
            ProblemKind.TRUNCATED_FRONT,
            f"{what}, and the log records {where}: its first record is {first}",
        )

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
        if record.get("kind") == RecordKind.KEY_ROTATION:
            self._rotate(seq, record)
        if record.get("kind") == RecordKind.DECISION and record.get("decision_id"):
            self._check_index(seq, record["decision_id"])
        self.seq, self.prev_hash = seq, stored.chain_hash
        self.records += 1

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
        if st.subject == _CHECKPOINT:
            self.checkpoints += 1

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

    def check_head(self, head: tuple[int, bytes] | None) -> None:
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
