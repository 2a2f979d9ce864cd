"""The one audit writer: a thread that group-commits records for the event loop.

Callers on the asyncio loop ``await writer.append(record)``. The thread takes
everything queued (up to ``max_batch``), writes it with
``AuditStore.append_batch`` in one transaction, and then resolves each
caller's future on its loop. Under load, records that arrive while a commit
is running share the next one, so a sync is paid per batch, not per record.
No timer holds a record back: the thread takes what is queued the moment
the previous commit returns, so a lone record is committed (and synced) at
once, and the batch grows only with the load.

Each record is encoded once, on its caller's side (``append_all``), so a
record that cannot be encoded fails its own caller and no batch; the store
completes those bytes with the sequence number (``chain.sequenced``). A
committed batch is handed back with one wakeup of each caller's loop,
however many callers it carries.

Durability
----------
``durable`` (the default): the store syncs each commit, and a caller's future
resolves only after the commit carrying its record has returned. A decision
is therefore never answered before its record is on disk.

``deferred``: commits are not synced; a caller's future resolves once the
commit returned (the record is in the OS page cache, and a record that
cannot be committed, such as on a full log, still fails its caller). The
writer syncs at most ``deferred_window`` seconds after the first unsynced
commit. What a crash loses:

- the daemon process dies: nothing; committed pages are in the page cache.
- the machine dies (power, kernel): the records committed in the last
  ``deferred_window`` seconds, whose decisions were already answered. On a
  filesystem that does not keep write order, LMDB may also come back
  damaged; use ``durable`` there.

Failure
-------
If a commit fails, every record of that batch fails with ``AuditUnavailable``
and no sequence number is consumed. A full log is survivable: later batches
are tried again. Any other storage error (and a failed sync) is fatal: the
writer refuses every later append with ``AuditUnavailable`` naming the first
error, since a log that failed once cannot be trusted to be complete.

Segments
--------
With ``sealing`` given, the writer seals a segment, in the same transaction
as the batch that ends it, once ``segment_records`` records are unsealed or
the oldest of them is ``segment_seconds`` old (a quiet log is sealed by the
timer, with no records). A sealed segment's checkpoint is signed with the
audit key and stored in the log; after the commit it is also written to the
witness. A witness that cannot be written is loud (``on_checkpoint`` gets
the error, and it is logged) but not fatal: decisions go on, and the
checkpoints it missed are written again at the next seal. At ``close()``
the open segment is sealed and a head is signed, stored and witnessed, so
a later truncation of the tail shows against it.

A caller may ask for its records to be sealed (``append(..., seal=True)``):
the transaction carrying them then ends with them, whatever the queue holds
behind (those records go to the next transaction), and seals a segment
there, whatever the segment's count or age. The checkpoint is then exactly
at the caller's last record. The daemon seals its start marker this way, so
a marker forged after a signed head (by someone who can write the LMDB file
but holds no key) shows: it has no checkpoint at its size
(``verify``'s rule after a signed head).

Handoff latency: with one request in flight, the wakeup of this thread
(``Condition.notify``) and the hop back (``call_soon_threadsafe``) cost
about 60 µs each on a small shared machine, next to a synced commit of
300-500 µs. TODO(#9): a decision answered at one request in flight pays
both; committing on the caller's thread when the writer is idle would save
them but stall the loop during the sync.

Ownership: the writer does not own the store. ``close()`` drains, syncs and
stops the thread; the caller closes the store afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import msgspec

from kynara_sidecar.audit.chain import encode_unsequenced
from kynara_sidecar.audit.checkpoint import (
    CheckpointError,
    CheckpointKind,
    CheckpointV1,
    sign_checkpoint,
)
from kynara_sidecar.audit.keys import SigningKey
from kynara_sidecar.audit.record import AuditRecordV1, parse_timestamp
from kynara_sidecar.audit.store import (
    Appended,
    AuditStore,
    Seal,
    StateChange,
    is_log_full,
)
from kynara_sidecar.audit.witness import Witness
from kynara_sidecar.decision import Timestamp
from kynara_sidecar.errors import AuditUnavailable

__all__ = [
    "DEFAULT_DEFERRED_WINDOW",
    "DEFAULT_MAX_BATCH",
    "AuditWriter",
    "OnCheckpoint",
    "OnCommit",
    "OnDone",
    "OnLatency",
    "Sealing",
    "make_seal",
]

# 256 records: a synced LMDB commit of 256 records costs about twice one of
# a single record (DESIGN.md measurements), and a batch that size keeps the
# loop's waiting callers well under a millisecond behind.
DEFAULT_MAX_BATCH = 256
# 50 ms: long enough to fold many commits into one sync under load, short
# enough that a machine crash loses only a few answered decisions.
DEFAULT_DEFERRED_WINDOW = 0.05

# on_commit(batch_size, commit_seconds), called on the writer thread after
# each successful commit. It must be quick and must not block.
OnCommit = Callable[[int, float], None]
# on_latency(seconds): per caller of a committed transaction, from its
# append (or submit) to the commit's return; on the writer thread, quick.
OnLatency = Callable[[list[float]], None]
# on_checkpoint(checkpoint, witness_error): after each checkpoint or head is
# committed; witness_error is None when the witness has it too.
OnCheckpoint = Callable[[CheckpointV1, "str | None"], None]
# on_done(appended, error): exactly one of them is None; called on the
# submitting loop once the transaction carrying the records returned.
OnDone = Callable[["list[Appended] | None", "Exception | None"], None]


class Sealing(NamedTuple):
    """How the writer seals segments and signs their checkpoints."""

    key: SigningKey
    # The log's origin, the daemon id.
    origin: str
    segment_records: int
    segment_seconds: float
    # Nanoseconds since the epoch, for the checkpoints' time.
    clock: Callable[[], int]
    witness: Witness | None = None
    on_checkpoint: OnCheckpoint | None = None
    # Sealed segments whose checkpoint is older than this are pruned (their
    # checkpoints and nodes stay); 0 keeps every record.
    retention_seconds: float = 0
    # on_prune(records_dropped), on the writer thread.
    on_prune: Callable[[int], None] | None = None
    # With a central store taking segments: prune only what it acknowledged
    # (AuditStore.shipped()), however old the rest is.
    retain_unshipped: bool = False
    # keep_from() -> nanoseconds since the epoch, on the writer thread: no
    # segment holding a record at or after it is pruned, however old its
    # checkpoint (the earliest open window of the active limits, whose
    # counts verify recomputes from the records); 0 sets no bound. A
    # keep_from that raises keeps every record for that round.
    keep_from: Callable[[], int] | None = None


_log = logging.getLogger("kynara.audit")

_NEW, _RUNNING, _CLOSING, _CLOSED = "new", "running", "closing", "closed"


class _Pending(NamedTuple):
    # One caller's records: committed in one transaction, never split.
    records: tuple[AuditRecordV1, ...]
    changes: tuple[StateChange, ...]
    # None for ``submit``, which gives ``on_done`` instead.
    future: asyncio.Future[list[Appended]] | None
    loop: asyncio.AbstractEventLoop
    # The transaction ends with these records and seals a segment there.
    seal: bool = False
    # Each record's chain.encode_unsequenced bytes.
    encoded: tuple[bytes, ...] = ()
    # Called on ``loop`` instead of resolving ``future`` (``submit``).
    on_done: OnDone | None = None
    # time.perf_counter() when it was queued, for ``on_latency``.
    queued: float = 0.0


class AuditWriter:
    """Group-commits audit records from the event loop on one thread.

    Args:
        store: an ``AuditStore`` opened for writing; not closed by the writer.
        max_batch: the most records one transaction carries.
        deferred_window: in "deferred" mode, the longest a commit stays
            unsynced (seconds).
        on_commit: optional hook, ``on_commit(batch_size, commit_seconds)``,
            for metrics. Errors it raises are logged and ignored.
        on_latency: optional hook, ``on_latency(seconds)``: each caller's
            wait, append to commit, for metrics; errors logged and ignored.

    Raises:
        ValueError: the store is read-only, or a limit is out of range.
    """

    def __init__(
        self,
        store: AuditStore,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        deferred_window: float = DEFAULT_DEFERRED_WINDOW,
        on_commit: OnCommit | None = None,
        sealing: Sealing | None = None,
        on_fatal: Callable[[AuditUnavailable], None] | None = None,
        on_latency: OnLatency | None = None,
    ):
        if store.readonly:
            raise ValueError(f"audit log {store.path} is open read-only")
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if not deferred_window > 0:
            raise ValueError(
                f"deferred_window must be above 0 seconds, got {deferred_window}"
            )
        self._store = store
        self._max_batch = max_batch
        self._window = deferred_window
        self._deferred = store.durability == "deferred"
        self._on_commit = on_commit
        self._on_latency = on_latency
        self._cond = threading.Condition()
        self._queue: deque[_Pending] = deque()
        self._state = _NEW
        self._error: AuditUnavailable | None = None
        self._sync_due: float | None = None
        self._thread: threading.Thread | None = None
        self._sealing = sealing
        self._size = store.head().seq
        latest = store.latest_checkpoint()
        self._sealed = max(latest.tree_size if latest else 0, store.seam())
        # Records left unsealed by an earlier run are sealed soon after start.
        self._unsealed_since = time.monotonic() if self._size > self._sealed else None
        self._unwitnessed: list[CheckpointV1] = []
        self._on_fatal = on_fatal
        # Whether the last commit failed for a full map (logged once per spell).
        self._full = False
        # Checkpoint tree size -> the latest record time in the segment it
        # ends (retention's keep_from bound); sealed segments never change.
        self._segment_latest: dict[int, int] = {}

    @property
    def error(self) -> AuditUnavailable | None:
        """The fatal error that stopped appends, or ``None``."""
        return self._error

    @property
    def size(self) -> int:
        """Records in the log's chain: the newest record's sequence number."""
        return self._size

    @property
    def pending(self) -> int:
        """Records queued and not yet taken into a transaction."""
        return sum(len(item.records) for item in self._queue)

    def start(self) -> None:
        """Start the writer thread.

        Raises:
            RuntimeError: the writer was already started or closed.
        """
        with self._cond:
            if self._state != _NEW:
                raise RuntimeError(f"AuditWriter.start() called when {self._state}")
            self._state = _RUNNING
        self._catch_up_witness()
        self._thread = threading.Thread(
            target=self._run, name="kynara-audit-writer", daemon=True
        )
        self._thread.start()

    async def append(
        self,
        record: AuditRecordV1,
        state_changes: Iterable[StateChange] = (),
        *,
        seal: bool = False,
    ) -> Appended:
        """Append one record (and the state it changes) to the log.

        Args:
            record: the record; its ``seq`` is assigned here.
            state_changes: ``(db, key, value)`` committed with the record.
            seal: end the transaction with this record and seal a segment
                there (a checkpoint at exactly its ``seq``), whatever the
                segment's size or age. Without ``sealing`` there is no key,
                and nothing is sealed.

        Returns:
            Where the record landed, once it is committed (and synced in
            "durable" mode).

        Raises:
            AuditUnavailable: the record could not be committed, the writer
                failed earlier, or it is closed. The record is not in the log.
            ValueError: a state change is malformed.
            msgspec.EncodeError: the record cannot be encoded.
            RuntimeError: ``start()`` was not called.
        """
        (appended,) = await self.append_all((record,), state_changes, seal=seal)
        return appended

    async def append_all(
        self,
        records: Iterable[AuditRecordV1],
        state_changes: Iterable[StateChange] = (),
        *,
        seal: bool = False,
    ) -> list[Appended]:
        """Append records (and the state they change) all together or none.

        The records are committed in one transaction, in order, whatever
        ``max_batch`` says: a DecideBatch's decisions are logged whole or
        not at all. With ``seal``, that transaction ends with the last of
        them and seals a segment there (see ``append``).

        Returns:
            Where each record landed, in order.

        Raises:
            Like ``append``; on any error none of the records is in the log.
        """
        records = tuple(records)
        changes = tuple(state_changes)
        self._store.check_state_changes(changes)
        # Encoding here (a few microseconds) makes a bad record fail its own
        # caller instead of the whole batch it would have joined; the store
        # keeps these bytes rather than encoding again.
        encoded = tuple(encode_unsequenced(record) for record in records)
        if not records:
            return []
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Appended]] = loop.create_future()
        self._enqueue(
            _Pending(
                records, changes, future, loop, seal, encoded, None, time.perf_counter()
            )
        )
        return await future

    def submit(
        self,
        records: Iterable[AuditRecordV1],
        state_changes: Iterable[StateChange],
        on_done: OnDone,
        *,
        encoded: Iterable[bytes] | None = None,
    ) -> None:
        """``append_all`` without a coroutine: queue the records (committed
        together or not at all) and return at once; ``on_done(appended,
        None)`` or ``on_done(None, error)`` is called on this loop when the
        transaction carrying them returned (synced in "durable" mode).

        A front door that decides many requests of one read calls this once
        for all of them: one queue entry, one wakeup back, no task.

        Args:
            records: the records, in order.
            state_changes: committed with them.
            on_done: the callback; errors it raises are logged.
            encoded: each record's ``chain.encode_unsequenced`` bytes, when
                the caller encoded them already (one bad record can then
                fail alone before it joins the others).

        Raises:
            Like ``append_all``, before anything is queued (and then
            ``on_done`` is never called).
        """
        records = tuple(records)
        changes = tuple(state_changes)
        self._store.check_state_changes(changes)
        if encoded is None:
            data = tuple(encode_unsequenced(record) for record in records)
        else:
            data = tuple(encoded)
            if len(data) != len(records):
                raise ValueError(
                    f"expected the bytes of {len(records)} records, got {len(data)}"
                )
        loop = asyncio.get_running_loop()
        if not records:
            loop.call_soon(_call, on_done, [], None)
            return
        self._enqueue(
            _Pending(
                records, changes, None, loop, False, data, on_done, time.perf_counter()
            )
        )

    def _enqueue(self, item: _Pending) -> None:
        with self._cond:
            self._check_accepting()
            self._queue.append(item)
            self._cond.notify()

    async def close(self) -> None:
        """Commit what is queued, sync, and stop the thread. Idempotent.

        Later appends raise ``AuditUnavailable``. The store stays open.

        Raises:
            AuditUnavailable: in "deferred" mode, when the writer failed: then
                records already answered may not be on disk.
        """
        with self._cond:
            if self._state in (_NEW, _RUNNING):
                self._state = _CLOSING if self._thread else _CLOSED
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self._state = _CLOSED
        if self._error is not None and self._deferred:
            raise AuditUnavailable(
                f"audit log {self._store.path} may have lost records: {self._error}"
            ) from self._error

    # ----------------------------------------------------------- the thread

    def _check_accepting(self) -> None:
        if self._error is not None:
            raise self._refusal()
        if self._state == _NEW:
            raise RuntimeError("AuditWriter.append() called before start()")
        if self._state != _RUNNING:
            raise AuditUnavailable(f"audit writer for {self._store.path} is closed")

    def _refusal(self) -> AuditUnavailable:
        refusal = AuditUnavailable(
            f"audit log {self._store.path} refuses appends after an earlier "
            f"failure: {self._error}"
        )
        refusal.__cause__ = self._error
        return refusal

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            if batch:
                self._commit(batch)
            elif self._seal_due(0):
                self._seal_quiet_log()
            if self._sync_due is not None and time.monotonic() >= self._sync_due:
                self._sync()
        self._finish()
        if self._sync_due is not None:
            self._sync()

    def _next_batch(self) -> list[_Pending] | None:
        # Returns [] when a sync or a seal is due, None when closing and
        # drained.
        with self._cond:
            while not self._queue and self._state == _RUNNING:
                due = self._next_due()
                if due is None:
                    self._cond.wait()
                    continue
                timeout = due - time.monotonic()
                if timeout <= 0:
                    return []
                self._cond.wait(timeout)
            if not self._queue:
                return None
            # Whole callers up to max_batch records; a caller with more
            # records than that goes alone, unsplit. A sealing caller ends
            # the batch, so its checkpoint is at its own last record.
            batch = [self._queue.popleft()]
            taken = len(batch[0].records)
            while (
                not batch[-1].seal
                and self._queue
                and taken + len(self._queue[0].records) <= self._max_batch
            ):
                taken += len(self._queue[0].records)
                batch.append(self._queue.popleft())
            return batch

    def _next_due(self) -> float | None:
        dues = [self._sync_due] if self._sync_due is not None else []
        if self._sealing is not None and self._unsealed_since is not None:
            dues.append(self._unsealed_since + self._sealing.segment_seconds)
        return min(dues, default=None)

    # ------------------------------------------------------------- sealing

    def _seal_due(self, adding: int) -> bool:
        sealing = self._sealing
        if sealing is None or self._error is not None:
            return False
        unsealed = self._size + adding - self._sealed
        if unsealed <= 0:
            return False
        if unsealed >= sealing.segment_records:
            return True
        since = self._unsealed_since
        return since is not None and time.monotonic() >= since + sealing.segment_seconds

    def _sealer(self, kind: CheckpointKind, made: list[CheckpointV1]) -> Seal:
        sealing = self._sealing
        assert sealing is not None
        return make_seal(
            kind=kind,
            origin=sealing.origin,
            log_id=self._store.log_id,
            key=sealing.key,
            clock=sealing.clock,
            made=made,
        )

    def _sealed_at(self, made: list[CheckpointV1]) -> None:
        # After a commit: adopt the checkpoint it stored and witness it.
        if made:
            self._sealed = made[-1].tree_size
            self._unsealed_since = None
            self._witness(made[-1])
            self._retain()
        elif self._size > self._sealed and self._unsealed_since is None:
            self._unsealed_since = time.monotonic()

    def _seal_quiet_log(self) -> None:
        made: list[CheckpointV1] = []
        try:
            self._store.append_batch(
                [], seal=self._sealer(CheckpointKind.CHECKPOINT, made)
            )
        except Exception as err:
            self._fail(_as_unavailable(err, self._store.path))
            return
        self._sealed_at(made)

    def _witness(self, checkpoint: CheckpointV1) -> None:
        sealing = self._sealing
        assert sealing is not None
        error = None
        if sealing.witness is not None:
            self._unwitnessed.append(checkpoint)
            error = self._write_witness(sealing.witness)
        if sealing.on_checkpoint is not None:
            try:
                sealing.on_checkpoint(checkpoint, error)
            except Exception:
                _log.exception(
                    "audit on_checkpoint hook failed",
                    extra={"fields": {"component": "audit"}},
                )

    def _write_witness(self, witness: Witness) -> str | None:
        # Writes the backlog oldest first; returns the error that stopped it.
        try:
            while self._unwitnessed:
                witness.write(self._unwitnessed[0])
                self._unwitnessed.pop(0)
        except AuditUnavailable as err:
            _log.error(
                "witness not written",
                extra={"fields": {"component": "audit", "error": str(err)}},
            )
            return str(err)
        return None

    def _catch_up_witness(self) -> None:
        # Checkpoints committed but never witnessed (a crash between a seal
        # and its witness write, or a witness that was full or away): write
        # them before anything else, oldest first.
        sealing = self._sealing
        if sealing is None or sealing.witness is None:
            return
        try:
            have = sealing.witness.sizes()
            store = self._store
            missing = [
                store.checkpoint(size)
                for size in store.checkpoint_sizes(store.seam())
                if size not in have
            ]
        except (AuditUnavailable, CheckpointError) as err:
            _log.error(
                "witness not caught up",
                extra={"fields": {"component": "audit", "error": str(err)}},
            )
            return
        self._unwitnessed = missing
        if missing:
            self._write_witness(sealing.witness)

    def _retain(self) -> None:
        # Prunes through min(the newest checkpoint past retention, what the
        # central store acknowledged when shipping, the last segment whose
        # records all precede keep_from); never an unshipped record, nor one
        # inside an open window of a limit.
        sealing = self._sealing
        assert sealing is not None
        if not sealing.retention_seconds:
            return
        cutoff = sealing.clock() - int(sealing.retention_seconds * 1e9)
        store = self._store
        through = 0
        try:
            keep_from = sealing.keep_from() if sealing.keep_from is not None else 0
            shipped = store.shipped() if sealing.retain_unshipped else None
            seam = store.seam()
            # A bounded step per seal keeps each prune transaction short.
            candidates = list(itertools.islice(store.iter_checkpoints(seam), 16))
            after = seam
            for checkpoint in candidates:
                if parse_timestamp(checkpoint.time).to_nanos() >= cutoff:
                    break
                if shipped is not None and checkpoint.tree_size > shipped:
                    break
                if keep_from and (
                    self._latest_time(after, checkpoint.tree_size) >= keep_from
                ):
                    break
                after = through = checkpoint.tree_size
            if not through:
                return
            dropped = store.prune(through)
            for size in [size for size in self._segment_latest if size <= through]:
                del self._segment_latest[size]
        except Exception as err:
            _log.error(
                "retention prune failed; records kept",
                extra={"fields": {"component": "audit", "error": str(err)}},
            )
            return
        if sealing.on_prune is not None:
            sealing.on_prune(dropped)

    def _latest_time(self, after: int, through: int) -> int:
        # The latest record time among records after..through (a segment):
        # times need not rise with seq (a clock stepped back), so all are
        # read, once per segment. A record whose time does not read keeps
        # its segment (it counts as the latest possible).
        latest = self._segment_latest.get(through)
        if latest is not None:
            return latest
        latest = 0
        with contextlib.closing(self._store.iter_records(after + 1)) as records:
            for stored in records:
                if stored.seq > through:
                    break
                try:
                    stamp = _TIME_DECODER.decode(stored.record_bytes).time
                    latest = max(latest, parse_timestamp(stamp).to_nanos())
                except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
                    latest = _LATEST
                    break
        self._segment_latest[through] = latest
        return latest

    def _finish(self) -> None:
        # At close: seal the open segment, then sign, keep and witness a head.
        if self._sealing is None or self._error is not None or self._size == 0:
            return
        if self._size > self._sealed:
            self._seal_quiet_log()
        made: list[CheckpointV1] = []
        store = self._store
        try:
            head = store.head()
            self._sealer(CheckpointKind.HEAD, made)(
                head.seq, store.merkle_root(head.seq), head.chain_hash
            )
            store.put_head_checkpoint(made[0])
        except Exception as err:
            _log.error(
                "head not signed at close",
                extra={"fields": {"component": "audit", "error": str(err)}},
            )
            return
        self._witness(made[0])

    def _commit(self, batch: list[_Pending]) -> None:
        if self._error is not None:
            self._reject(batch, self._refusal())
            return
        records = [record for item in batch for record in item.records]
        encoded = [data for item in batch for data in item.encoded]
        changes = [change for item in batch for change in item.changes]
        made: list[CheckpointV1] = []
        asked = batch[-1].seal and self._sealing is not None
        seal = (
            self._sealer(CheckpointKind.CHECKPOINT, made)
            if asked or self._seal_due(len(records))
            else None
        )
        started = time.perf_counter()
        try:
            appended = self._store.append_batch(
                records, changes, seal=seal, unsequenced=encoded
            )
        except AuditUnavailable as err:
            if is_log_full(err):
                self._report_full(err)
            else:
                self._fail(err)
            self._reject(batch, err)
            return
        except Exception as err:
            # A bug rather than storage, but the log is no longer known good.
            failure = _as_unavailable(err, self._store.path)
            self._fail(failure)
            self._reject(batch, failure)
            return
        ended = time.perf_counter()
        seconds = ended - started
        self._full = False
        self._size = appended[-1].seq
        self._sealed_at(made)
        if self._deferred and self._sync_due is None:
            self._sync_due = time.monotonic() + self._window
        results = []
        start = 0
        for item in batch:
            end = start + len(item.records)
            results.append((item, appended[start:end], None))
            start = end
        _settle(results)
        if self._on_commit is not None:
            _call_hook("on_commit", self._on_commit, len(records), seconds)
        if self._on_latency is not None:
            waits = [ended - item.queued for item in batch]
            _call_hook("on_latency", self._on_latency, waits)

    def _sync(self) -> None:
        self._sync_due = None
        try:
            self._store.sync()
        except AuditUnavailable as err:
            self._fail(err)

    def _report_full(self, err: AuditUnavailable) -> None:
        if self._full:
            return
        self._full = True
        _log.error(
            "audit log full: decisions refused until space is freed",
            extra={
                "fields": {
                    "component": "audit",
                    "error": str(err),
                    "setting": "audit.map_size",
                }
            },
        )

    def _fail(self, err: AuditUnavailable) -> None:
        with self._cond:
            first = self._error is None
            if first:
                self._error = err
                # Whatever failed (a full volume shows as ENOSPC, or as EIO
                # when LMDB's write came up short), the fix is at the volume
                # behind audit.path.
                _log.error(
                    "audit log failed",
                    extra={
                        "fields": {
                            "component": "audit",
                            "error": str(err),
                            "setting": "audit.path",
                        }
                    },
                )
            queued = list(self._queue)
            self._queue.clear()
        self._reject(queued, self._refusal())
        if first and self._on_fatal is not None:
            try:
                self._on_fatal(err)
            except Exception:
                _log.exception(
                    "audit on_fatal hook failed",
                    extra={"fields": {"component": "audit"}},
                )

    def _reject(self, batch: list[_Pending], err: AuditUnavailable) -> None:
        results = []
        for item in batch:
            # One exception instance per caller: each await sets its traceback.
            copy = AuditUnavailable(str(err))
            copy.__cause__ = err.__cause__ or err
            results.append((item, None, copy))
        _settle(results)


def _call_hook(name: str, hook: Callable[..., None], *args: object) -> None:
    """Call a metrics hook on the writer thread; a hook that raises is
    logged and ignored (telemetry never fails a commit)."""
    try:
        hook(*args)
    except Exception:
        _log.exception(
            f"audit {name} hook failed", extra={"fields": {"component": "audit"}}
        )


def make_seal(
    *,
    kind: CheckpointKind,
    origin: str,
    log_id: str,
    key: SigningKey,
    clock: Callable[[], int],
    made: list[CheckpointV1],
) -> Seal:
    """A seal for ``AuditStore.append_batch`` that signs a checkpoint of
    ``kind`` at the clock's time and appends it to ``made``, so the caller
    can witness it once the transaction committed."""

    def seal(tree_size: int, root: bytes, chain_hash: bytes) -> CheckpointV1:
        checkpoint = sign_checkpoint(
            kind=kind,
            origin=origin,
            log_id=log_id,
            tree_size=tree_size,
            root=root,
            chain_hash=chain_hash,
            time=Timestamp.from_nanos(clock()),
            key=key,
        )
        made.append(checkpoint)
        return checkpoint

    return seal


class _Time(msgspec.Struct):
    # A record's time alone: retention reads no more of it.
    time: str


_TIME_DECODER = msgspec.json.Decoder(_Time)
# Later than any record's time: a segment holding an undatable record.
_LATEST = 1 << 63


def _as_unavailable(err: Exception, path: str) -> AuditUnavailable:
    if isinstance(err, AuditUnavailable):
        return err
    failure = AuditUnavailable(f"audit log {path}: append failed unexpectedly: {err!r}")
    failure.__cause__ = err
    return failure


_Outcome = tuple[_Pending, "list[Appended] | None", "Exception | None"]


def _settle(outcomes: list[_Outcome]) -> None:
    # One call_soon_threadsafe per loop (one wakeup of it), not per caller.
    by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
    for outcome in outcomes:
        by_loop.setdefault(outcome[0].loop, []).append(outcome)
    for loop, mine in by_loop.items():
        try:
            loop.call_soon_threadsafe(_set_futures, mine)
        except RuntimeError:
            pass  # the caller's loop is closed: nobody is waiting any more


def _call(
    on_done: OnDone, result: list[Appended] | None, err: Exception | None
) -> None:
    try:
        on_done(result, err)
    except Exception:
        _log.exception(
            "audit on_done callback failed", extra={"fields": {"component": "audit"}}
        )


def _set_futures(outcomes: list[_Outcome]) -> None:
    for item, result, err in outcomes:
        if item.on_done is not None:
            _call(item.on_done, result, err)
            continue
        future: asyncio.Future[Any] | None = item.future
        assert future is not None
        # A caller cancelled while waiting still has its record committed.
        # NOTE: the pipeline records that with an outcome ("cancelled") if
        # needed.
        if future.done():
            continue
        if err is not None:
            future.set_exception(err)
        else:
            future.set_result(result)
