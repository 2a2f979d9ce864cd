"""The audit log on disk: an LMDB environment holding records and chain hashes.

Layout (named databases of one LMDB environment in the ``audit.path``
directory; sequence numbers are 8-byte big-endian, starting at 1):

    records    seq -> canonical record bytes, exactly as hashed
    chain      seq -> 32-byte chain hash
    decisions  decision_id (UTF-8) -> seq of its decision record
    nodes      1-byte level + 8-byte index -> 32-byte Merkle node hash
    checkpoints  8-byte tree size -> a signed checkpoint (canonical JSON)
    meta       b"format_version" -> b"1"
               b"head" -> 8-byte seq + 32-byte chain hash of the last record
               b"log_id" -> 32 hex digits naming this log (its witness files)
               b"seam" -> 8-byte tree size s: records 1..s were pruned
               b"head_checkpoint" -> the head signed at the last clean stop
               b"shipped_tree_size" -> 8-byte tree size: the central store
               acknowledged every segment through it (``mark_shipped``)
               b"active_bundle" -> the digest of the bundle last activated
               b"active_directory" -> the digest of the signed directory
               update last activated
               b"pruned_time" -> 8-byte nanoseconds since the epoch: the
               latest time of any record pruned so far (``pruned_time``)
    policy_sets  b"policy/<revision>" or b"directory/<revision>" -> the
               source files of that revision (``PolicySource``, msgpack)
    bundles    digest (``sha256:`` + 64 hex, ASCII) -> a signed policy
               bundle's bytes, exactly as verified
    directories  digest (as bundles) -> a signed directory update's bytes
               (``directory.store``), exactly as verified

Merkle tree (``merkle``): node (0, i) is the leaf hash of record i + 1 and
node (l, i) the root of the perfect subtree over leaves [i*2^l, (i+1)*2^l).
Each append writes the nodes its leaf completes (about two per record), in
the same transaction as the record, so any inclusion or consistency proof
is O(log^2 n) lookups. Nodes and checkpoints are never pruned: they are the
seam that lets a pruned log still prove and verify what it kept.

plus the caller's ``extra_dbs`` (approval state, say), which change in the
same write transaction as the records that account for them.

``limits`` (``audit.counters``) holds one row per decision a declared limit
counted, derived from its record. It is an extra database the daemon names,
and it is also opened whenever the file has it, named or not: a prune by
any writer then deletes the rows of the records it drops (in the same
transaction), and a read-only open (``verify``) can compare the rows with
the records.

``policy_sets`` is content-addressed and write-once: a revision is the hash
of its files, so a put never replaces a key that is already there. The
daemon commits each activated set with the ``policy_activated`` marker that
names it, so every decision record's revisions can be looked up later
(``kynara_sidecar.replay``). Logs written before it existed lack the
database; read-only opens then find no policy sets rather than failing.

``bundles`` is content-addressed and write-once in the same way: a daemon
that follows signed bundles commits each one it activates, and the meta
``active_bundle`` naming it, with its ``policy_activated`` marker
(``bundle_changes``), so a restart with the central store down serves the
last good bundle at once, verified again, and an export can show the very
bytes the publisher signed. ``directories`` does the same for the signed
directory updates a daemon with ``directory.store`` activates
(``directory_changes``, meta ``active_directory``); the directory's file is
kept in ``policy_sets`` under ``directory/<revision>`` as any other.

One process writes: opening for writing takes an exclusive ``flock`` on
``writer.lock`` in the directory, so a second daemon on the same path is
refused instead of interleaving its chain. Read-only opens (``verify``) take
no such lock and use LMDB's reader table, so they see a consistent snapshot
of a log that a running daemon is appending to.

This is the IO shell around ``chain``: every LMDB failure on the write path
becomes ``AuditUnavailable`` naming the problem and the setting to change,
with the transaction aborted, so nothing is ever half-written.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import lmdb
import msgspec

from kynara_sidecar.audit import merkle
from kynara_sidecar.audit.chain import (
    GENESIS_HASH,
    chain_hash,
    decode_record,
    encode_record,
    sequenced,
)
from kynara_sidecar.audit.checkpoint import (
    CheckpointV1,
    decode_checkpoint,
    encode_checkpoint,
)
from kynara_sidecar.audit.counters import LIMITS_DB, rows_of
from kynara_sidecar.audit.record import AuditRecordV1, RecordKind, parse_timestamp
from kynara_sidecar.errors import AuditLogInUse, AuditUnavailable

__all__ = [
    "DEFAULT_MAP_SIZE",
    "FORMAT_VERSION",
    "LOCK_FILE",
    "POLICY_SETS_DB",
    "Appended",
    "BUNDLES_DB",
    "DIRECTORIES_DB",
    "AuditStore",
    "Durability",
    "Head",
    "PolicySource",
    "Seal",
    "StateChange",
    "StoredRecord",
    "bundle_changes",
    "directory_changes",
    "is_log_full",
    "lock_directory",
    "policy_set_changes",
]

# The on-disk layout this code reads and writes (meta "format_version").
FORMAT_VERSION = b"1"
# 1 GiB: about half a million decision records (about 1.5 KiB each, with
# the chain hash and index). LMDB maps the file sparsely, so an unused map
# costs address space, not disk.
DEFAULT_MAP_SIZE = 1 << 30
LOCK_FILE = "writer.lock"

_SEQ_SIZE = 8
_CORE_DBS = (b"records", b"chain", b"decisions", b"meta")
_KEY_FORMAT = b"format_version"
_KEY_HEAD = b"head"
POLICY_SETS_DB = b"policy_sets"
# Evidence databases, absent from logs written before the Merkle tree; a
# writable open creates them and fills nodes from the records it holds.
_NODES_DB = b"nodes"
_CHECKPOINTS_DB = b"checkpoints"
BUNDLES_DB = b"bundles"
DIRECTORIES_DB = b"directories"
_OPTIONAL_DBS = (
    POLICY_SETS_DB,
    _NODES_DB,
    _CHECKPOINTS_DB,
    BUNDLES_DB,
    DIRECTORIES_DB,
)
_KEY_LOG_ID = b"log_id"
_KEY_SEAM = b"seam"
_KEY_HEAD_CHECKPOINT = b"head_checkpoint"
_KEY_SHIPPED = b"shipped_tree_size"
_KEY_ACTIVE_BUNDLE = b"active_bundle"
_KEY_ACTIVE_DIRECTORY = b"active_directory"
_KEY_PRUNED_TIME = b"pruned_time"
# Opened when the file has them, whether or not extra_dbs names them: see
# the module doc (a prune must delete the rows of what it drops).
_IF_PRESENT_DBS = (LIMITS_DB,)
# Written only if absent: see the module doc.
_WRITE_ONCE_DBS = frozenset({POLICY_SETS_DB, BUNDLES_DB, DIRECTORIES_DB})
# Internal databases state changes may write besides the caller's extra_dbs;
# of meta only these keys: the head, log id and seam are the log's own.
_STATE_DBS = frozenset({POLICY_SETS_DB, BUNDLES_DB, DIRECTORIES_DB})
_STATE_META_KEYS = frozenset({_KEY_ACTIVE_BUNDLE, _KEY_ACTIVE_DIRECTORY})
_POLICY_KEY_PREFIXES = {"policy": b"policy/", "directory": b"directory/"}

Durability = Literal["durable", "deferred"]
# (db name, key, value); a value of None deletes the key.
StateChange = tuple[bytes, bytes, bytes | None]
# seal(tree_size, root, chain_hash): called inside the append transaction
# after its records; a checkpoint it returns is stored in that transaction.
Seal = Callable[[int, bytes, bytes], CheckpointV1 | None]


class Head(NamedTuple):
    """The last record's sequence number and chain hash (0 and genesis when
    the log is empty)."""

    seq: int
    chain_hash: bytes


class Appended(NamedTuple):
    """Where a record landed: its seq, its chain hash and its stored bytes."""

    seq: int
    chain_hash: bytes
    record_bytes: bytes


class StoredRecord(NamedTuple):
    """A record as read back; the shape ``chain.verify_chain`` walks.

    ``chain_hash`` is ``b""`` when the chain database has no entry for it.
    """

    seq: int
    record_bytes: bytes
    chain_hash: bytes


class PolicySource(msgspec.Struct, frozen=True):
    """The source files of one revision: path below the policy root -> bytes.

    Kept as the daemon read them, so that loading them again compiles to
    the same revision.
    """

    files: dict[str, bytes]


_POLICY_SOURCE_ENCODER = msgspec.msgpack.Encoder()
_POLICY_SOURCE_DECODER = msgspec.msgpack.Decoder(PolicySource)


def _policy_key(part: str, revision: str) -> bytes:
    return _POLICY_KEY_PREFIXES[part] + revision.encode()


def policy_set_changes(
    policy_revision: str,
    policy_files: Mapping[str, bytes],
    directory_revision: str,
    directory_files: Mapping[str, bytes],
) -> list[StateChange]:
    """The state changes that keep an activated policy set in the log.

    Append them with the record that activates the set; the store writes
    each only if its revision is not stored yet.

    Args:
        policy_revision: the policy set's revision, e.g. ``sha256:...``.
        policy_files: the policy files it was compiled from (name -> bytes).
        directory_revision: the directory's revision.
        directory_files: the directory file it was compiled from.

    Returns:
        Two ``(b"policy_sets", key, value)`` changes.
    """
    return [
        (
            POLICY_SETS_DB,
            _policy_key(part, revision),
            _POLICY_SOURCE_ENCODER.encode(PolicySource(dict(files))),
        )
        for part, revision, files in (
            ("policy", policy_revision, policy_files),
            ("directory", directory_revision, directory_files),
        )
    ]


def bundle_changes(digest: str, data: bytes) -> list[StateChange]:
    """The state changes that keep an activated bundle in the log and name
    it the active one.

    Append them with the ``policy_activated`` marker of the bundle's
    revision; the bundle itself is written only if its digest is not stored
    yet.

    Args:
        digest: ``sha256:`` and 64 hex digits of SHA-256 over ``data``.
        data: the bundle's bytes, as verified.
    """
    key = digest.encode("ascii")
    return [(BUNDLES_DB, key, data), (b"meta", _KEY_ACTIVE_BUNDLE, key)]


def directory_changes(digest: str, data: bytes) -> list[StateChange]:
    """The state changes that keep an activated signed directory update in
    the log and name it the active one (as ``bundle_changes`` for bundles).

    Args:
        digest: ``sha256:`` and 64 hex digits of SHA-256 over ``data``.
        data: the update's bytes, as verified.
    """
    key = digest.encode("ascii")
    return [(DIRECTORIES_DB, key, data), (b"meta", _KEY_ACTIVE_DIRECTORY, key)]


def _seq_key(seq: int) -> bytes:
    return seq.to_bytes(_SEQ_SIZE, "big")


def _time_key(nanos: int) -> bytes:
    """A time (nanoseconds since the epoch) as the meta values hold it:
    eight bytes big-endian, as a sequence number (``_pruned_time`` reads it)."""
    return _seq_key(nanos)


def _node_key(level: int, index: int) -> bytes:
    return bytes((level,)) + index.to_bytes(_SEQ_SIZE, "big")


def _decode_head(raw: bytes) -> Head:
    # A malformed head keeps its wrong length, so verification reports it
    # as a head mismatch rather than failing here.
    return Head(int.from_bytes(raw[:_SEQ_SIZE], "big"), bytes(raw[_SEQ_SIZE:]))


def is_log_full(error: BaseException) -> bool:
    """Tell whether an ``AuditUnavailable`` came from a full map.

    A full log is the one storage failure the writer survives: the failed
    batch is refused, and later batches may fit once space is freed.
    """
    return isinstance(error.__cause__, lmdb.MapFullError)


class AuditStore:
    """The LMDB audit log. Create with ``AuditStore.open``.

    All methods may be called from any thread, but only one thread may
    append at a time (the writer thread, in the daemon).
    """

    def __init__(
        self,
        path: str,
        env: lmdb.Environment,
        dbs: dict[bytes, lmdb._Database],
        *,
        durability: Durability,
        readonly: bool,
        lock_fd: int | None,
    ):
        self._path = path
        self._env = env
        self._dbs = dbs
        self._durability: Durability = durability
        self._readonly = readonly
        self._lock_fd = lock_fd
        self._extra = frozenset(dbs) - frozenset(_CORE_DBS) - set(_OPTIONAL_DBS)
        self._max_key = env.max_key_size()
        self._pinned = threading.local()
        self._head = self.head()
        self._log_id = self._meta(_KEY_LOG_ID, b"").decode("ascii", "replace")
        # The tree's right edge, kept in step with the head: appends extend
        # a copy and adopt it only once their transaction committed.
        # Only appends need it: a read-only open must not fail on a damaged
        # tree before a verifier gets to name the damage.
        self._range = (
            None
            if readonly or _NODES_DB not in dbs
            else self._load_range(self._head.seq)
        )

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        map_size: int = DEFAULT_MAP_SIZE,
        durability: Durability = "durable",
        readonly: bool = False,
        extra_dbs: Iterable[bytes] = (),
    ) -> AuditStore:
        """Open (or create) the audit log in the directory ``path``.

        Args:
            path: the log's directory; created when opening for writing.
            map_size: the most bytes the log may hold (``audit.map_size``).
            durability: "durable" syncs every commit; "deferred" leaves
                syncing to ``sync()``, which the writer calls within a window.
            readonly: open for reading only (``verify``); takes no writer
                lock, creates nothing, and works beside a running daemon.
            extra_dbs: names of state databases ``append_batch`` may change.

        Returns:
            The open store; call ``close()`` when done.

        Raises:
            AuditUnavailable: another process holds the log, the directory
                cannot be created or written, it is not an audit log, or its
                format version is unknown. Nothing is left open.
            ValueError: ``durability`` is not "durable" or "deferred", or an
                extra database name is reserved.
        """
        path = os.fspath(path)
        extra = tuple(extra_dbs)
        _check_options(durability, extra)
        lock_fd = None if readonly else lock_directory(path)
        try:
            env = _open_env(path, map_size, durability, readonly, len(extra))
            try:
                dbs = _open_dbs(env, path, readonly, extra)
                return cls(
                    path,
                    env,
                    dbs,
                    durability=durability,
                    readonly=readonly,
                    lock_fd=lock_fd,
                )
            except BaseException:
                env.close()
                raise
        except BaseException:
            if lock_fd is not None:
                os.close(lock_fd)
            raise

    # ------------------------------------------------------------- properties

    @property
    def path(self) -> str:
        return self._path

    @property
    def durability(self) -> Durability:
        return self._durability

    @property
    def readonly(self) -> bool:
        return self._readonly

    @property
    def extra_dbs(self) -> frozenset[bytes]:
        return self._extra

    @property
    def log_id(self) -> str:
        """32 hex digits naming this log; its witness files live under it."""
        return self._log_id

    # ----------------------------------------------------------------- writes

    def check_state_changes(self, changes: Iterable[StateChange]) -> None:
        """Check state changes without writing them.

        The writer calls this before queueing, so that a bad change fails
        only its own caller rather than a whole batch.

        Raises:
            ValueError: a database is not among ``extra_dbs``, a key is empty
                or longer than LMDB allows, or a value is not bytes or None.
        """
        max_key = self._max_key
        for index, (db, key, value) in enumerate(changes):
            where = f"state change {index} ({db!r}, {key[:32]!r})"
            if db == b"meta":
                if key not in _STATE_META_KEYS or value is None:
                    allowed = ", ".join(repr(k) for k in sorted(_STATE_META_KEYS))
                    raise ValueError(
                        f"{where}: a state change may only put meta {allowed}"
                    )
            elif db in _STATE_DBS:
                if db not in self._dbs:
                    raise ValueError(f"{where}: this log has no {db!r} database")
            elif db not in self._extra:
                known = ", ".join(repr(name) for name in sorted(self._extra))
                raise ValueError(
                    f"{where}: database must be one of the extra_dbs "
                    f"({known or 'none opened'}), got {db!r}"
                )
            if not isinstance(key, bytes) or not 0 < len(key) <= max_key:
                raise ValueError(
                    f"{where}: key must be 1..{max_key} bytes, got {len(key)}"
                )
            if value is not None and not isinstance(value, bytes):
                raise ValueError(
                    f"{where}: value must be bytes or None, got {type(value).__name__}"
                )

    def append_batch(
        self,
        records: Sequence[AuditRecordV1],
        state_changes: Iterable[StateChange] = (),
        *,
        seal: Seal | None = None,
        unsequenced: Sequence[bytes] | None = None,
    ) -> list[Appended]:
        """Append records and apply state changes in one write transaction.

        Each record gets the next sequence number (its ``seq`` field is
        replaced), is encoded once, chained, and indexed by ``decision_id``
        when it is a decision record; its leaf and the Merkle nodes it
        completes are written with it. In "durable" mode the commit is
        synced before this returns.

        Args:
            records: the records, in the order they are to be chained.
            state_changes: ``(db, key, value)``; ``value=None`` deletes.
            seal: called with the new tree size, Merkle root and chain hash
                once the records are written; the checkpoint it returns (if
                any) is stored in the same transaction. An exception it
                raises aborts the whole batch. With no records, it seals
                the log as it stands.
            unsequenced: each record's ``chain.encode_unsequenced`` bytes,
                when the caller has them already (the writer encodes each
                record on its caller's side, to fail a bad one alone): the
                stored bytes are completed from them (``chain.sequenced``)
                rather than encoded again. The bytes are the same.

        Returns:
            Where each record landed, in order.

        Raises:
            AuditUnavailable: the log is full, read-only, or LMDB failed;
                nothing was written and the head is unchanged.
            ValueError: a state change is malformed (see
                ``check_state_changes``); nothing was written.
            msgspec.EncodeError: a record cannot be encoded; nothing was
                written.
        """
        if self._readonly:
            raise AuditUnavailable(
                f"audit log {self._path} is open read-only: cannot append"
            )
        changes = list(state_changes)
        self.check_state_changes(changes)
        try:
            txn = self._env.begin(write=True)
        except lmdb.Error as err:
            raise self._write_error(err) from err
        tree = self._writable_range()
        if unsequenced is not None and len(unsequenced) != len(records):
            raise ValueError(
                f"expected the bytes of {len(records)} records, got {len(unsequenced)}"
            )
        try:
            appended = self._write(txn, records, changes, tree, unsequenced)
            if seal is not None:
                last = appended[-1] if appended else Appended(*self._head, b"")
                if last.seq:
                    self._seal(txn, tree, last, seal)
            txn.commit()
        except BaseException as err:
            txn.abort()
            if isinstance(err, lmdb.Error):
                raise self._write_error(err) from err
            raise
        if appended:
            self._head = Head(appended[-1].seq, appended[-1].chain_hash)
            self._range = tree
        return appended

    def _writable_range(self) -> merkle.CompactRange:
        assert self._range is not None  # writable opens load it
        size, hashes = self._range.state()
        return merkle.CompactRange.from_state(size, hashes)

    def _seal(
        self,
        txn: lmdb.Transaction,
        tree: merkle.CompactRange,
        last: Appended,
        seal: Seal,
    ) -> None:
        checkpoint = seal(last.seq, tree.root(), last.chain_hash)
        if checkpoint is not None:
            txn.put(
                _seq_key(checkpoint.tree_size),
                encode_checkpoint(checkpoint),
                db=self._dbs[_CHECKPOINTS_DB],
            )

    def _write(
        self,
        txn: lmdb.Transaction,
        records: Sequence[AuditRecordV1],
        changes: list[StateChange],
        tree: merkle.CompactRange,
        unsequenced: Sequence[bytes] | None = None,
    ) -> list[Appended]:
        # Appends trust the stored head; the daemon checks the tail against
        # the chain and the witness before its first append (see tail.py).
        #
        # One pass works out every record's bytes, chain hash, leaf and the
        # Merkle nodes it completes; then each database gets one putmulti
        # call. py-lmdb gives up the GIL around each put, and a busy event
        # loop makes every one of those wait to get it back, so the fewer
        # calls the better; the Python work per record shrinks too.
        # TODO(#9): putmulti still gives the GIL up around each item, and
        # under load waiting to get it back is most of a commit (profiled:
        # ~45% of the writer thread, the disk ~30%, Python ~10%); puts made
        # without the GIL round trip (a small C helper, or a writer
        # process) would shorten commits under load.
        seq, prev = self._head
        decision = RecordKind.DECISION
        node_positions, leaf_hash = merkle.node_positions, merkle.leaf_hash
        rows: list[tuple[bytes, bytes]] = []
        links: list[tuple[bytes, bytes]] = []
        nodes: list[tuple[bytes, bytes]] = []
        ids: list[tuple[bytes, bytes]] = []
        out = []
        for i, record in enumerate(records):
            seq += 1
            if unsequenced is not None:
                data = sequenced(unsequenced[i], record, seq)
            else:
                data = encode_record(msgspec.structs.replace(record, seq=seq))
            prev = chain_hash(prev, data)
            key = seq.to_bytes(_SEQ_SIZE, "big")
            rows.append((key, data))
            links.append((key, prev))
            completed = tree.append(leaf_hash(data))
            for (level, index), node in zip(
                node_positions(tree.size), completed, strict=True
            ):
                nodes.append((_node_key(level, index), node))
            if record.kind == decision and record.decision_id:
                ids.append((record.decision_id.encode(), key))
            out.append(Appended(seq, prev, data))
        if out:
            dbs = self._dbs
            # append=True fills each page before starting the next (records
            # arrive in key order); it refuses a key at or below the last one,
            # which here means a record already lies beyond the stored head.
            _, added = txn.cursor(dbs[b"records"]).putmulti(rows, append=True)
            if added != len(rows):
                raise AuditUnavailable(
                    f"audit log {self._path} already holds records beyond "
                    f"its head {self._head.seq}: run "
                    f"`kynara-sidecar verify {self._path}`"
                )
            txn.cursor(dbs[b"chain"]).putmulti(links, append=True)
            txn.cursor(dbs[_NODES_DB]).putmulti(nodes)
            if ids:
                # The first record of a decision id wins; ids are unique.
                txn.cursor(dbs[b"decisions"]).putmulti(ids, overwrite=False)
            txn.put(_KEY_HEAD, _seq_key(seq) + prev, db=dbs[b"meta"])
        for db, key, value in changes:
            if value is None:
                txn.delete(key, db=self._dbs[db])
            else:
                overwrite = db not in _WRITE_ONCE_DBS
                txn.put(key, value, db=self._dbs[db], overwrite=overwrite)
        return out

    def _write_error(self, err: lmdb.Error) -> AuditUnavailable:
        if isinstance(err, lmdb.MapFullError):
            map_size = self._env.info()["map_size"]
            return AuditUnavailable(
                f"audit log {self._path} is full (map_size={map_size} bytes): "
                "raise audit.map_size"
            )
        if isinstance(err, lmdb.ReadonlyError | lmdb.DiskError):
            return AuditUnavailable(
                f"audit log {self._path} cannot be written ({err}): check the "
                "volume behind audit.path"
            )
        return AuditUnavailable(f"audit log {self._path}: write failed: {err}")

    def sync(self) -> None:
        """Flush committed transactions to disk (for "deferred" mode).

        Raises:
            AuditUnavailable: the flush failed; what was committed since the
                last sync may not survive a system crash.
        """
        if self._readonly:
            return
        try:
            self._env.sync(True)
        except lmdb.Error as err:
            raise AuditUnavailable(
                f"audit log {self._path}: sync failed: {err}"
            ) from err

    # ------------------------------------------------------------------ reads

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Pin one read transaction for this thread's reads inside the block.

        Every read in the block (records, head, checkpoints, nodes) then sees
        the same snapshot, even while a daemon commits beside it: a
        verifier must not compare a head from one moment with records from
        another. Blocks nest; other threads are unaffected.
        """
        if getattr(self._pinned, "txn", None) is not None:
            yield
            return
        with self._env.begin() as txn:
            self._pinned.txn = txn
            try:
                yield
            finally:
                self._pinned.txn = None

    @contextlib.contextmanager
    def _read(self) -> Iterator[lmdb.Transaction]:
        pinned = getattr(self._pinned, "txn", None)
        if pinned is not None:
            yield pinned
            return
        with self._env.begin() as txn:
            yield txn

    def _meta(self, key: bytes, default: bytes | None = None) -> bytes | None:
        with self._read() as txn:
            value = txn.get(key, db=self._dbs[b"meta"])
        return default if value is None else bytes(value)

    def seam(self) -> int:
        """The tree size up to which records were pruned (0 when none were).

        Raises:
            AuditUnavailable: the stored seam is not an 8-byte tree size.
        """
        raw = self._meta(_KEY_SEAM)
        if raw is None:
            return 0
        if len(raw) != _SEQ_SIZE:
            raise AuditUnavailable(
                f"audit log {self._path}: meta seam is {len(raw)} bytes, not "
                f"{_SEQ_SIZE}: run `kynara-sidecar verify {self._path}`"
            )
        return int.from_bytes(raw, "big")

    def _node(self, txn: lmdb.Transaction, level: int, index: int) -> bytes:
        value = txn.get(_node_key(level, index), db=self._dbs[_NODES_DB])
        if value is None:
            raise AuditUnavailable(
                f"audit log {self._path}: Merkle node (level {level}, index "
                f"{index}) is missing: run `kynara-sidecar verify {self._path}`"
            )
        return bytes(value)

    def node(self, level: int, index: int) -> bytes | None:
        """The stored Merkle node ``(level, index)``, or ``None``."""
        db = self._dbs.get(_NODES_DB)
        if db is None:
            return None
        with self._read() as txn:
            value = txn.get(_node_key(level, index), db=db)
        return None if value is None else bytes(value)

    def _with_nodes(self, tree_size: int, use: Callable[..., Any]) -> Any:
        if _NODES_DB not in self._dbs:
            raise AuditUnavailable(
                f"audit log {self._path} has no Merkle nodes: it was written "
                "before the tree; open it once for writing to build them"
            )
        head = self.head().seq
        if not 0 <= tree_size <= head:
            raise ValueError(
                f"tree size must be in [0, {head}] (the log's size), got {tree_size}"
            )
        with self._read() as txn:
            return use(lambda level, index: self._node(txn, level, index))

    def merkle_root(self, tree_size: int) -> bytes:
        """The Merkle root over records ``1..tree_size``.

        Raises:
            ValueError: ``tree_size`` is beyond the log.
            AuditUnavailable: a node is missing (the log is damaged).
        """
        return self._with_nodes(
            tree_size, lambda get: merkle.root_from_nodes(get, tree_size)
        )

    def inclusion_proof(self, seq: int, tree_size: int) -> list[bytes]:
        """The inclusion proof of record ``seq`` (leaf ``seq - 1``) in the
        tree of ``tree_size`` records.

        Raises:
            ValueError: ``seq`` is not in ``1..tree_size`` or ``tree_size`` is
                beyond the log.
        """
        return self._with_nodes(
            tree_size,
            lambda get: merkle.inclusion_proof_from_nodes(get, seq - 1, tree_size),
        )

    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        """The consistency proof from the tree of ``old_size`` records to the
        tree of ``new_size``.

        Raises:
            ValueError: not ``0 <= old_size <= new_size <= head``.
        """
        return self._with_nodes(
            new_size,
            lambda get: merkle.consistency_proof_from_nodes(get, old_size, new_size),
        )

    def compact_range(self, tree_size: int) -> list[bytes]:
        """The right edge of the tree of ``tree_size`` records: one subtree
        root per set bit of ``tree_size``, largest first."""
        return list(
            self._with_nodes(
                tree_size,
                lambda get: merkle.compact_range_from_nodes(get, tree_size),
            ).state()[1]
        )

    def _load_range(self, size: int) -> merkle.CompactRange:
        with self._read() as txn:
            return merkle.compact_range_from_nodes(
                lambda level, index: self._node(txn, level, index), size
            )

    def checkpoint(self, tree_size: int) -> CheckpointV1 | None:
        """The checkpoint sealed at ``tree_size``, or ``None``."""
        db = self._dbs.get(_CHECKPOINTS_DB)
        if db is None:
            return None
        with self._read() as txn:
            raw = txn.get(_seq_key(tree_size), db=db)
            return None if raw is None else decode_checkpoint(bytes(raw))

    def iter_checkpoints(self, after: int = 0) -> Iterator[CheckpointV1]:
        """Yield the sealed checkpoints with ``tree_size > after``, ascending.

        Raises:
            CheckpointError: a stored checkpoint does not decode.
        """
        db = self._dbs.get(_CHECKPOINTS_DB)
        if db is None:
            return
        with self._read() as txn:
            cursor = txn.cursor(db=db)
            if not cursor.set_range(_seq_key(after + 1)):
                return
            for _, raw in cursor:
                yield decode_checkpoint(bytes(raw))

    def checkpoint_sizes(self, after: int = 0) -> list[int]:
        """The tree sizes of the sealed checkpoints past ``after``, ascending,
        read from the keys alone (nothing is decoded)."""
        db = self._dbs.get(_CHECKPOINTS_DB)
        if db is None:
            return []
        with self._read() as txn:
            cursor = txn.cursor(db=db)
            if not cursor.set_range(_seq_key(after + 1)):
                return []
            return [int.from_bytes(key, "big") for key in cursor.iternext(values=False)]

    def latest_checkpoint(self) -> CheckpointV1 | None:
        """The last sealed checkpoint, or ``None`` before the first seal."""
        db = self._dbs.get(_CHECKPOINTS_DB)
        if db is None:
            return None
        with self._read() as txn:
            cursor = txn.cursor(db=db)
            if not cursor.last():
                return None
            return decode_checkpoint(bytes(cursor.value()))

    def previous_checkpoint(self) -> CheckpointV1 | None:
        """The checkpoint sealed before the latest one, or ``None``."""
        db = self._dbs.get(_CHECKPOINTS_DB)
        if db is None:
            return None
        with self._read() as txn:
            cursor = txn.cursor(db=db)
            if not cursor.last() or not cursor.prev():
                return None
            return decode_checkpoint(bytes(cursor.value()))

    def head_checkpoint(self) -> CheckpointV1 | None:
        """The head signed at the last clean stop, or ``None``."""
        raw = self._meta(_KEY_HEAD_CHECKPOINT)
        return None if raw is None else decode_checkpoint(raw)

    def put_head_checkpoint(self, checkpoint: CheckpointV1) -> None:
        """Keep the head signed at a clean stop (replacing the last one).

        Raises:
            AuditUnavailable: the write failed.
        """
        self._put_meta(_KEY_HEAD_CHECKPOINT, encode_checkpoint(checkpoint))

    def _put_meta(self, key: bytes, value: bytes) -> None:
        try:
            with self._env.begin(write=True) as txn:
                txn.put(key, value, db=self._dbs[b"meta"])
        except lmdb.Error as err:
            raise self._write_error(err) from err

    def shipped(self) -> int:
        """The tree size through which the central store acknowledged every
        segment (0 before the first acknowledgement).

        Raises:
            AuditUnavailable: the stored value is not an 8-byte tree size.
        """
        raw = self._meta(_KEY_SHIPPED)
        if raw is None:
            return 0
        if len(raw) != _SEQ_SIZE:
            raise AuditUnavailable(
                f"audit log {self._path}: meta shipped_tree_size is {len(raw)} "
                f"bytes, not {_SEQ_SIZE}: run `kynara-sidecar verify {self._path}`"
            )
        return int.from_bytes(raw, "big")

    def mark_shipped(self, tree_size: int) -> None:
        """Record that the central store acknowledged every segment through
        the checkpoint at ``tree_size``.

        Safe beside the writer thread: LMDB runs one write transaction at a
        time per environment (its writer mutex; a second ``begin(write=True)``
        waits, with the GIL released), and this one touches only its own meta
        key, which appends never read. The writer waits at most one small
        commit.

        Raises:
            ValueError: ``tree_size`` is not a checkpoint's, or is below the
                size already marked (shipping only moves forward).
            AuditUnavailable: the log is read-only or the write failed;
                nothing changed.
        """
        if self._readonly:
            raise AuditUnavailable(f"audit log {self._path} is open read-only")
        if self.checkpoint(tree_size) is None:
            raise ValueError(
                f"can mark shipped only a checkpoint's tree size, got {tree_size}"
            )
        try:
            with self._env.begin(write=True) as txn:
                raw = txn.get(_KEY_SHIPPED, db=self._dbs[b"meta"])
                marked = 0 if raw is None else int.from_bytes(raw, "big")
                if tree_size < marked:
                    raise ValueError(
                        f"shipped_tree_size is already {marked}; it cannot move "
                        f"back to {tree_size}"
                    )
                txn.put(_KEY_SHIPPED, _seq_key(tree_size), db=self._dbs[b"meta"])
        except lmdb.Error as err:
            raise self._write_error(err) from err

    def prune(self, through: int) -> int:
        """Drop records ``seam+1..through``, keeping nodes and checkpoints.

        ``through`` must be the tree size of a sealed checkpoint: that
        checkpoint (its root and chain hash) and the stored nodes are the
        seam from which the records kept still verify and prove.

        In the same transaction, the ``limits`` rows of the dropped decision
        records are deleted (when the log has that database), and meta
        ``pruned_time`` moves to the latest time among the dropped records,
        so ``verify`` knows which windows the kept records still cover.

        Returns:
            The number of records dropped.

        Raises:
            ValueError: ``through`` is not a checkpoint's tree size, or is
                below the current seam.
            AuditUnavailable: the write failed; nothing was dropped.
        """
        if self._readonly:
            raise AuditUnavailable(f"audit log {self._path} is open read-only")
        seam = self.seam()
        if through < seam or self.checkpoint(through) is None:
            raise ValueError(
                f"can prune only through a checkpoint at or past the seam {seam}, "
                f"got tree size {through}"
            )
        dbs = self._dbs
        limits = dbs.get(LIMITS_DB)
        try:
            with self._env.begin(write=True) as txn:
                latest = _pruned_time(txn.get(_KEY_PRUNED_TIME, db=dbs[b"meta"]))
                for seq in range(seam + 1, through + 1):
                    key = _seq_key(seq)
                    data = txn.pop(key, db=dbs[b"records"])
                    txn.delete(key, db=dbs[b"chain"])
                    record = _decoded(data)
                    if record is None:
                        continue
                    latest = max(latest, _record_nanos(record))
                    decision_id = record.decision_id.encode()
                    index = dbs[b"decisions"]
                    if decision_id and txn.get(decision_id, db=index) == key:
                        txn.delete(decision_id, db=index)
                    if limits is not None:
                        for row_key, _ in _rows(record):
                            txn.delete(row_key, db=limits)
                txn.put(_KEY_SEAM, _seq_key(through), db=dbs[b"meta"])
                if latest:
                    txn.put(_KEY_PRUNED_TIME, _time_key(latest), db=dbs[b"meta"])
        except lmdb.Error as err:
            raise self._write_error(err) from err
        return through - seam

    def pruned_time(self) -> int:
        """The latest time (nanoseconds since the epoch) of any record pruned
        so far; 0 when none was (or the log was pruned before it was kept).
        A window opening after it is covered whole by the records kept."""
        return _pruned_time(self._meta(_KEY_PRUNED_TIME))

    def head(self) -> Head:
        """The last record's seq and chain hash; ``Head(0, GENESIS_HASH)``
        when the log is empty."""
        return self.stored_head() or Head(0, GENESIS_HASH)

    def stored_head(self) -> Head | None:
        """The head exactly as stored, or ``None`` when none is stored."""
        with self._read() as txn:
            raw = txn.get(_KEY_HEAD, db=self._dbs[b"meta"])
        return None if raw is None else _decode_head(raw)

    def get(self, seq: int) -> StoredRecord | None:
        """The record ``seq``, or ``None`` if there is none."""
        key = _seq_key(seq)
        with self._read() as txn:
            data = txn.get(key, db=self._dbs[b"records"])
            if data is None:
                return None
            stored = txn.get(key, default=b"", db=self._dbs[b"chain"])
        return StoredRecord(seq, bytes(data), bytes(stored))

    def find_decision(self, decision_id: str) -> int | None:
        """The seq of the decision record with this id, or ``None``."""
        with self._read() as txn:
            raw = txn.get(decision_id.encode(), db=self._dbs[b"decisions"])
        return None if raw is None else int.from_bytes(raw, "big")

    def get_state(self, db: bytes, key: bytes) -> bytes | None:
        """The value of ``key`` in the extra database ``db``, or ``None``.

        Raises:
            ValueError: ``db`` is not among ``extra_dbs``.
        """
        if db not in self._extra:
            raise ValueError(f"expected one of the extra_dbs, got {db!r}")
        with self._read() as txn:
            value = txn.get(key, db=self._dbs[db])
        return None if value is None else bytes(value)

    def iter_state(self, db: bytes) -> list[tuple[bytes, bytes]]:
        """Every ``(key, value)`` of the extra database ``db``, in key order,
        from one snapshot (for loading state at start).

        Raises:
            ValueError: ``db`` is not among ``extra_dbs``.
        """
        if db not in self._extra:
            raise ValueError(f"expected one of the extra_dbs, got {db!r}")
        with self._read() as txn:
            return [
                (bytes(key), bytes(value))
                for key, value in txn.cursor(db=self._dbs[db])
            ]

    def iter_state_from(
        self, db: bytes, start: bytes, prefix: bytes = b""
    ) -> Iterator[tuple[bytes, bytes]]:
        """``(key, value)`` of the extra database ``db`` from ``start`` on,
        in key order, while keys begin with ``prefix``: one range of it
        (a limit's rows of one window), not the whole database.

        Reads one snapshot (the one ``reading()`` pinned, else its own),
        held until the iterator is exhausted or closed: consume it on the
        thread that started it, and close it (``contextlib.closing``) when
        stopping early.

        Raises:
            ValueError: ``db`` is not among ``extra_dbs``, or ``start``
                does not begin with ``prefix``.
        """
        if db not in self._extra:
            raise ValueError(f"expected one of the extra_dbs, got {db!r}")
        if not start.startswith(prefix):
            raise ValueError(
                f"range start {start[:48]!r} does not begin with its prefix "
                f"{prefix[:48]!r}"
            )
        with self._read() as txn:
            cursor = txn.cursor(db=self._dbs[db])
            if not cursor.set_range(start):
                return
            for key, value in cursor:
                key = bytes(key)
                if not key.startswith(prefix):
                    return
                yield key, bytes(value)

    def get_policy_source(
        self, part: Literal["policy", "directory"], revision: str
    ) -> PolicySource | None:
        """The source files stored for a policy or directory revision.

        Args:
            part: "policy" for a policy set's files, "directory" for the
                directory file.
            revision: the revision a record or marker names.

        Returns:
            The files, or ``None`` when that revision is not stored (or the
            log predates the ``policy_sets`` database).

        Raises:
            ValueError: ``part`` is neither "policy" nor "directory".
            AuditUnavailable: the stored value is not a ``PolicySource``.
        """
        if part not in _POLICY_KEY_PREFIXES:
            raise ValueError(f"expected part 'policy' or 'directory', got {part!r}")
        db = self._dbs.get(POLICY_SETS_DB)
        if db is None or not revision:
            return None
        key = _policy_key(part, revision)
        with self._read() as txn:
            raw = txn.get(key, db=db)
            if raw is None:
                return None
            raw = bytes(raw)
        try:
            return _POLICY_SOURCE_DECODER.decode(raw)
        except msgspec.DecodeError as err:
            raise AuditUnavailable(
                f"audit log {self._path}: policy_sets entry {key.decode()!r} is "
                f"not a stored policy source: {err}"
            ) from err

    def iter_policy_sources(
        self,
    ) -> Iterator[tuple[Literal["policy", "directory"], str, bytes]]:
        """Yield every stored ``(part, revision, raw PolicySource bytes)``.

        The bytes are as stored; ``get_policy_source`` decodes one.
        """
        db = self._dbs.get(POLICY_SETS_DB)
        if db is None:
            return
        prefixes = {prefix: part for part, prefix in _POLICY_KEY_PREFIXES.items()}
        with self._read() as txn:
            for key, value in txn.cursor(db=db):
                key = bytes(key)
                for prefix, part in prefixes.items():
                    if key.startswith(prefix):
                        revision = key[len(prefix) :].decode("utf-8", "replace")
                        yield part, revision, bytes(value)

    def active_bundle(self) -> tuple[str, bytes] | None:
        """The digest and bytes of the bundle last activated, or ``None``
        when this log never activated one.

        Raises:
            AuditUnavailable: meta names a bundle the log does not hold.
        """
        return self._active(BUNDLES_DB, _KEY_ACTIVE_BUNDLE)

    def active_directory(self) -> tuple[str, bytes] | None:
        """The digest and bytes of the signed directory update last
        activated, or ``None`` when this log never activated one.

        Raises:
            AuditUnavailable: meta names an update the log does not hold.
        """
        return self._active(DIRECTORIES_DB, _KEY_ACTIVE_DIRECTORY)

    def _active(self, name: bytes, meta_key: bytes) -> tuple[str, bytes] | None:
        db = self._dbs.get(name)
        with self._read() as txn:
            digest = txn.get(meta_key, db=self._dbs[b"meta"])
            if digest is None:
                return None
            data = None if db is None else txn.get(bytes(digest), db=db)
            digest = bytes(digest).decode("ascii", "replace")
            if data is None:
                raise AuditUnavailable(
                    f"audit log {self._path}: meta {meta_key.decode()} names "
                    f"{digest}, which the {name.decode()} database does not hold"
                )
            return digest, bytes(data)

    def get_directory(self, digest: str) -> bytes | None:
        """The stored signed directory update with this digest, or ``None``."""
        db = self._dbs.get(DIRECTORIES_DB)
        if db is None:
            return None
        with self._read() as txn:
            data = txn.get(digest.encode("ascii"), db=db)
        return None if data is None else bytes(data)

    def scan_signed(
        self, name: bytes, look: Callable[[memoryview], Any]
    ) -> list[tuple[str, Any]]:
        """``(digest, look(value))`` for every entry of ``bundles`` or
        ``directories`` (``name``), in digest order, from one snapshot:
        the one ``reading()`` pinned when called inside it (so an export
        sees the entries of the same moment as its records), else its own.

        ``look`` sees each value in place (a memoryview valid only during
        the call), so a caller reading a manifest at the front of each
        update does not copy every update whole.

        Raises:
            ValueError: ``name`` is neither ``BUNDLES_DB`` nor
                ``DIRECTORIES_DB``.
        """
        if name not in (BUNDLES_DB, DIRECTORIES_DB):
            raise ValueError(f"expected bundles or directories, got {name!r}")
        db = self._dbs.get(name)
        if db is None:
            return []
        found = []
        pinned = getattr(self._pinned, "txn", None)
        if pinned is not None:
            # The pinned snapshot hands out copies; look still gets a view.
            for key, value in pinned.cursor(db=db):
                found.append((key.decode("ascii", "replace"), look(memoryview(value))))
            return found
        with self._env.begin(buffers=True) as txn:
            for key, value in txn.cursor(db=db):
                found.append((bytes(key).decode("ascii", "replace"), look(value)))
        return found

    def get_bundle(self, digest: str) -> bytes | None:
        """The stored bundle with this digest, or ``None``."""
        db = self._dbs.get(BUNDLES_DB)
        if db is None:
            return None
        with self._read() as txn:
            data = txn.get(digest.encode("ascii"), db=db)
        return None if data is None else bytes(data)

    def iter_records(self, start: int = 1) -> Iterator[StoredRecord]:
        """Yield records from ``start`` on, in seq order, from one snapshot.

        The read transaction stays open until the iterator is exhausted or
        closed; a long-lived one keeps LMDB from reusing freed pages.
        """
        records, chain = self._dbs[b"records"], self._dbs[b"chain"]
        with self._read() as txn:
            cursor = txn.cursor(db=records)
            if not cursor.set_range(_seq_key(start)):
                return
            for key, data in cursor:
                stored = txn.get(key, default=b"", db=chain)
                yield StoredRecord(
                    int.from_bytes(key, "big"), bytes(data), bytes(stored)
                )

    def usage(self) -> tuple[int, int]:
        """Return ``(used_bytes, map_size)``: pages in use and the map limit."""
        info = self._env.info()
        page_size = self._env.stat()["psize"]
        return (info["last_pgno"] + 1) * page_size, info["map_size"]

    def close(self) -> None:
        """Close the environment and release the writer lock. Idempotent."""
        self._env.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _decoded(data: bytes | None) -> AuditRecordV1 | None:
    if data is None:
        return None
    try:
        return decode_record(bytes(data))
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def _record_nanos(record: AuditRecordV1) -> int:
    try:
        return parse_timestamp(record.time).to_nanos()
    except ValueError:
        return 0


def _rows(record: AuditRecordV1) -> list[tuple[bytes, bytes]]:
    # A record whose rows cannot be derived never had any written: the
    # append that carried it derived them the same way.
    try:
        return rows_of(record)
    except ValueError:
        return []


def _pruned_time(raw: bytes | None) -> int:
    # A malformed value counts as none: verify then treats every window as
    # reaching past the seam (not checkable) rather than trusting it.
    if raw is None or len(raw) != _SEQ_SIZE:
        return 0
    return int.from_bytes(raw, "big")


# ----------------------------------------------------------------- opening


def _check_options(durability: str, extra: tuple[bytes, ...]) -> None:
    if durability not in ("durable", "deferred"):
        raise ValueError(
            f"audit.durability must be 'durable' or 'deferred', got {durability!r}"
        )
    for name in extra:
        if name in _CORE_DBS or name in _OPTIONAL_DBS:
            raise ValueError(f"extra database name {name!r} is reserved")


def lock_directory(path: str) -> int:
    """Take the log's exclusive writer lock; return its fd (close to release).

    Raises:
        AuditUnavailable: another process holds it, or it cannot be created.
    """
    try:
        os.makedirs(path, exist_ok=True)
        fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as err:
        raise AuditUnavailable(
            f"cannot open audit log {path} for writing ({err.strerror}): "
            "check audit.path and its permissions"
        ) from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AuditLogInUse(f"audit log {path} is in use by another process") from None
    return fd


# LMDB's data file starts with two meta pages; each holds, after a 16-byte
# page header: magic, version, map address, map size, two 48-byte database
# records (the first one's first field is the page size), the last page
# number and the transaction id. The newer of the two is the live one.
_LMDB_MAGIC = 0xBEEFC0DE
_META = struct.Struct("=II8x8x")
_META_DBS = 16 + _META.size
_META_TAIL = struct.Struct("=QQ")


def check_data_file(path: str) -> None:
    """Refuse a data.mdb shorter than its own header says it is.

    LMDB maps the file and trusts its header, so reading a page past the
    end of a truncated file kills the process with SIGBUS: no error, no log
    line. This reads the two meta pages instead and checks the size first.

    Raises:
        AuditUnavailable: the file is empty or truncated.
    """
    data_path = os.path.join(path, "data.mdb")
    try:
        with open(data_path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            first = handle.read(_META_DBS + 4)
            if size == 0:
                raise AuditUnavailable(
                    f"audit log {path}: data.mdb is empty, so the log it held is "
                    "gone: restore it, or run `kynara-sidecar new-chain` to start "
                    "a new log that names the loss"
                )
            if len(first) < _META_DBS + 4:
                return  # too short to be LMDB's: let LMDB say what it is
            magic, _ = _META.unpack_from(first, 16)
            (page_size,) = struct.unpack_from("=I", first, _META_DBS)
            if magic != _LMDB_MAGIC or not 512 <= page_size <= 1 << 16:
                return
            metas = []
            for page in (0, 1):
                handle.seek(page * page_size + _META_DBS + 96)
                tail = handle.read(_META_TAIL.size)
                if len(tail) == _META_TAIL.size:
                    metas.append(_META_TAIL.unpack(tail))
    except FileNotFoundError:
        return
    except OSError as err:
        raise AuditUnavailable(
            f"cannot read audit log {data_path}: {err.strerror or err}: check "
            "audit.path and its permissions"
        ) from err
    last_page, _ = max(metas, key=lambda meta: meta[1])
    needed = (last_page + 1) * page_size
    if size < needed:
        raise AuditUnavailable(
            f"audit log {path}: data.mdb is truncated: its header needs "
            f"{needed} bytes, the file holds {size}: restore it, or run "
            "`kynara-sidecar new-chain` to start a new log that names the loss"
        )


def _open_env(
    path: str, map_size: int, durability: str, readonly: bool, extra: int
) -> lmdb.Environment:
    if readonly and not os.path.exists(os.path.join(path, "data.mdb")):
        raise AuditUnavailable(f"no audit log at {path}: data.mdb not found")
    check_data_file(path)
    try:
        return lmdb.open(
            path,
            map_size=map_size,
            max_dbs=(
                len(_CORE_DBS) + len(_OPTIONAL_DBS) + len(_IF_PRESENT_DBS) + extra
            ),
            readonly=readonly,
            # Read-only opens still use the reader table in lock.mdb: with
            # lock=False a running writer could reuse pages being read.
            lock=True,
            create=not readonly,
            sync=durability == "durable",
            subdir=True,
        )
    except lmdb.Error as err:
        if "already open in this process" in str(err):
            # LMDB forbids a second environment on one file per process: its
            # locks are per process, and closing one would drop the other's.
            raise AuditUnavailable(
                f"audit log {path} is already open in this process: read "
                "through that AuditStore instead of opening another"
            ) from err
        raise AuditUnavailable(
            f"cannot open audit log {path}: {err}: check audit.path"
        ) from err


def _open_dbs(
    env: lmdb.Environment, path: str, readonly: bool, extra: tuple[bytes, ...]
) -> dict[bytes, lmdb._Database]:
    try:
        dbs = {name: env.open_db(name, create=not readonly) for name in _CORE_DBS}
        dbs.update({name: env.open_db(name, create=True) for name in extra})
        _check_format(env, dbs, path, readonly)
        # Checked after the format, so that a foreign directory is reported
        # as such rather than as missing its evidence databases.
        for name in _OPTIONAL_DBS:
            try:
                dbs[name] = env.open_db(name, create=not readonly)
            except lmdb.NotFoundError:
                pass
        for name in _IF_PRESENT_DBS:
            if name not in dbs:
                try:
                    dbs[name] = env.open_db(name, create=False)
                except lmdb.NotFoundError:
                    pass
        if not readonly:
            _complete_evidence(env, dbs)
    except lmdb.NotFoundError as err:
        raise AuditUnavailable(
            f"{path} is not a Kynara audit log (a database is missing)"
        ) from err
    except lmdb.Error as err:
        raise AuditUnavailable(f"cannot open audit log {path}: {err}") from err
    return dbs


def _complete_evidence(env: lmdb.Environment, dbs: dict[bytes, lmdb._Database]) -> None:
    """Give the log its id, and its Merkle nodes if it predates the tree."""
    meta, nodes = dbs[b"meta"], dbs[_NODES_DB]
    with env.begin(write=True) as txn:
        signed = txn.stat(dbs[_CHECKPOINTS_DB])["entries"] > 0
        # A log whose checkpoints name an id it no longer holds was tampered
        # with: leave the id missing for verification to report, never mint
        # a new one that would send the witness lookup elsewhere.
        if txn.get(_KEY_LOG_ID, db=meta) is None and not signed:
            txn.put(_KEY_LOG_ID, os.urandom(16).hex().encode(), db=meta)
        # Nodes are built only for a log that predates the tree; a signed log
        # without them lost them, and verification must say so.
        if txn.stat(nodes)["entries"] or signed:
            return
        tree = merkle.CompactRange()
        for _, data in txn.cursor(db=dbs[b"records"]):
            completed = tree.append(merkle.leaf_hash(bytes(data)))
            positions = merkle.node_positions(tree.size)
            for (level, index), node in zip(positions, completed, strict=True):
                txn.put(_node_key(level, index), node, db=nodes)


def _check_format(
    env: lmdb.Environment, dbs: dict[bytes, lmdb._Database], path: str, readonly: bool
) -> None:
    meta, records = dbs[b"meta"], dbs[b"records"]
    with env.begin(write=not readonly) as txn:
        version = txn.get(_KEY_FORMAT, db=meta)
        if version is None and txn.stat(records)["entries"] == 0 and not readonly:
            txn.put(_KEY_FORMAT, FORMAT_VERSION, db=meta)
            return
    if version is None:
        raise AuditUnavailable(
            f"{path} is not a Kynara audit log (no format_version) "
            + ("or is empty" if readonly else "but holds records")
        )
    if bytes(version) != FORMAT_VERSION:
        raise AuditUnavailable(
            f"audit log {path} has format version {bytes(version)!r}, this "
            f"daemon reads {FORMAT_VERSION!r}: point audit.path elsewhere or "
            "upgrade the daemon"
        )
