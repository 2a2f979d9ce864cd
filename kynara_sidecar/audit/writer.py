"""The one audit writer: a thread that group-commits records for the event loop.

Callers on the asyncio loop ``await writer.append(record)``. The thread takes
everything queued (up to ``max_batch``), writes it with
``AuditStore.append_batch`` in one transaction, and then resolves each
caller's future on its loop. Under load, records that arrive while a commit
is running share the next one, so a sync is paid per batch, not per record.

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

Ownership: the writer does not own the store. ``close()`` drains, syncs and
stops the thread; the caller closes the store afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from kynara_sidecar.audit.chain import encode_record
from kynara_sidecar.audit.record import AuditRecordV1
from kynara_sidecar.audit.store import Appended, AuditStore, StateChange, is_log_full
from kynara_sidecar.errors import AuditUnavailable

__all__ = [
    "DEFAULT_DEFERRED_WINDOW",
    "DEFAULT_MAX_BATCH",
    "AuditWriter",
    "OnCommit",
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

_log = logging.getLogger("kynara.audit")

_NEW, _RUNNING, _CLOSING, _CLOSED = "new", "running", "closing", "closed"


class _Pending(NamedTuple):
    record: AuditRecordV1
    changes: tuple[StateChange, ...]
    future: asyncio.Future[Appended]
    loop: asyncio.AbstractEventLoop


class AuditWriter:
    """Group-commits audit records from the event loop on one thread.

    Args:
        store: an ``AuditStore`` opened for writing; not closed by the writer.
        max_batch: the most records one transaction carries.
        deferred_window: in "deferred" mode, the longest a commit stays
            unsynced (seconds).
        on_commit: optional hook, ``on_commit(batch_size, commit_seconds)``,
            for metrics. Errors it raises are logged and ignored.

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
        self._cond = threading.Condition()
        self._queue: deque[_Pending] = deque()
        self._state = _NEW
        self._error: AuditUnavailable | None = None
        self._sync_due: float | None = None
        self._thread: threading.Thread | None = None

    @property
    def error(self) -> AuditUnavailable | None:
        """The fatal error that stopped appends, or ``None``."""
        return self._error

    @property
    def pending(self) -> int:
        """Records queued and not yet taken into a transaction."""
        return len(self._queue)

    def start(self) -> None:
        """Start the writer thread.

        Raises:
            RuntimeError: the writer was already started or closed.
        """
        with self._cond:
            if self._state != _NEW:
                raise RuntimeError(f"AuditWriter.start() called when {self._state}")
            self._state = _RUNNING
        self._thread = threading.Thread(
            target=self._run, name="kynara-audit-writer", daemon=True
        )
        self._thread.start()

    async def append(
        self, record: AuditRecordV1, state_changes: Iterable[StateChange] = ()
    ) -> Appended:
        """Append one record (and the state it changes) to the log.

        Args:
            record: the record; its ``seq`` is assigned here.
            state_changes: ``(db, key, value)`` committed with the record.

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
        changes = tuple(state_changes)
        self._store.check_state_changes(changes)
        # Encoding here (about a microsecond) makes a bad record fail its own
        # caller instead of the whole batch it would have joined.
        encode_record(record)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Appended] = loop.create_future()
        with self._cond:
            self._check_accepting()
            self._queue.append(_Pending(record, changes, future, loop))
            self._cond.notify()
        return await future

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
            if self._sync_due is not None and time.monotonic() >= self._sync_due:
                self._sync()
        if self._sync_due is not None:
            self._sync()

    def _next_batch(self) -> list[_Pending] | None:
        # Returns [] when a deferred sync is due, None when closing and drained.
        with self._cond:
            while not self._queue and self._state == _RUNNING:
                if self._sync_due is None:
                    self._cond.wait()
                    continue
                timeout = self._sync_due - time.monotonic()
                if timeout <= 0:
                    return []
                self._cond.wait(timeout)
            if not self._queue:
                return None
            count = min(len(self._queue), self._max_batch)
            return [self._queue.popleft() for _ in range(count)]

    def _commit(self, batch: list[_Pending]) -> None:
        if self._error is not None:
            self._reject(batch, self._refusal())
            return
        records = [item.record for item in batch]
        changes = [change for item in batch for change in item.changes]
        started = time.perf_counter()
        try:
            appended = self._store.append_batch(records, changes)
        except AuditUnavailable as err:
            if not is_log_full(err):
                self._fail(err)
            self._reject(batch, err)
            return
        except Exception as err:
            # A bug rather than storage, but the log is no longer known good.
            failure = AuditUnavailable(
                f"audit log {self._store.path}: append failed unexpectedly: {err!r}"
            )
            failure.__cause__ = err
            self._fail(failure)
            self._reject(batch, failure)
            return
        seconds = time.perf_counter() - started
        if self._deferred and self._sync_due is None:
            self._sync_due = time.monotonic() + self._window
        for item, result in zip(batch, appended, strict=True):
            _settle(item, result, None)
        self._report(len(batch), seconds)

    def _sync(self) -> None:
        self._sync_due = None
        try:
            self._store.sync()
        except AuditUnavailable as err:
            self._fail(err)

    def _fail(self, err: AuditUnavailable) -> None:
        with self._cond:
            if self._error is None:
                self._error = err
                _log.error(
                    "audit log failed",
                    extra={"fields": {"component": "audit", "error": str(err)}},
                )
            queued = list(self._queue)
            self._queue.clear()
        self._reject(queued, self._refusal())

    def _reject(self, batch: list[_Pending], err: AuditUnavailable) -> None:
        for item in batch:
            # One exception instance per caller: each await sets its traceback.
            copy = AuditUnavailable(str(err))
            copy.__cause__ = err.__cause__ or err
            _settle(item, None, copy)

    def _report(self, size: int, seconds: float) -> None:
        if self._on_commit is None:
            return
        try:
            self._on_commit(size, seconds)
        except Exception:
            _log.exception(
                "audit on_commit hook failed", extra={"fields": {"component": "audit"}}
            )


def _settle(item: _Pending, result: Appended | None, err: Exception | None) -> None:
    try:
        item.loop.call_soon_threadsafe(_set_future, item.future, result, err)
    except RuntimeError:
        pass  # the caller's loop is closed: nobody is waiting any more


def _set_future(future: asyncio.Future[Any], result: Any, err: Any) -> None:
    # A caller cancelled while waiting still has its record committed.
    # NOTE: the pipeline records that with an outcome ("cancelled") if needed.
    if future.done():
        return
    if err is not None:
        future.set_exception(err)
    else:
        future.set_result(result)
