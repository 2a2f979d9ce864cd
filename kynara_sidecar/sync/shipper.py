"""Segments out: every sealed audit segment reaches the central store, in
order, exactly once as far as the store can tell.

Theory of operation
-------------------
The audit log keeps one number for shipping, meta ``shipped_tree_size``
(``AuditStore.shipped``): the store acknowledged every segment through that
checkpoint. A round of ``SegmentShipper.ship_pending``:

1. reads the sealed segments past it (``prove.sealed_segments``, LMDB read
   transactions, which never wait on the writer thread);
2. for each segment, oldest first, builds its ``kynara.v1.Segment``
   messages (``audit.segments``, the very messages the admin
   ``StreamSegments`` sends; several when the records exceed
   ``MAX_SEGMENT_MESSAGE_BYTES``) and sends them one by one with
   ``Store.ship_segment``, each under ``segment_message_id``;
3. once the store acknowledged every message of a segment, and only then,
   moves ``shipped_tree_size`` to its checkpoint (``mark_shipped``).

A crash or a failure anywhere in 2 leaves ``shipped_tree_size`` where it
was, so the segment is sent again, whole, by the next round or the next
start. The store recognises a resent message by its id and answers
"duplicate" (``ship_segment`` returns False), which is success here: the
store holds each message once. (A NATS stream remembers ids for its
duplicate window, at least an hour; a resend after a longer outage is
stored again, with the same id and bytes, and the collector drops it by
its checkpoint and first record.)

A message id names the run of records a message carries and its
checkpoint's root (``segment_message_id``), so a changed byte budget, or
records rewritten and sealed at the same size, never pass as a resend.

Rounds run on the event loop (store calls are async; LMDB work runs on one
thread of the shipper's own, so ``stop`` can wait for it before the log is
closed). A round starts when the writer seals a checkpoint (``wake``, safe
from the writer thread), every ``sync.poll_seconds``, and, after a failure,
after a pause that doubles from ``sync.retry_min_seconds`` up to
``sync.retry_max_seconds``, with jitter so a fleet coming back does not
call in step. Every store call is bounded by ``sync.timeout_seconds``: a
slow store is a failed one (``StoreSession``).

Backlog: the records the store has not acknowledged (sealed or not), the
sealed segments among them, and the age of the oldest. They are metrics and
status fields; past ``sync.backlog_max_records``, ``sync.backlog_policy``
applies: ``keep_deciding`` logs a warning once per spell and goes on;
``fail_closed`` refuses decisions with ``audit_unavailable`` through
``BacklogGate`` until the backlog is back under the ceiling.

Retention (``audit.retention_days``) prunes only what the store
acknowledged when shipping is on (``Sealing.retain_unshipped``): the
shipper never finds a gap of its own making. A gap it does find (records
pruned before shipping was turned on) is logged, and shipping resumes at
the seam.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import random
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import msgspec

from kynara_sidecar.audit import prove
from kynara_sidecar.audit.record import AuditRecordV1, parse_timestamp
from kynara_sidecar.audit.segments import checkpoint_to_proto, segment_message
from kynara_sidecar.audit.store import Appended, AuditStore, StateChange
from kynara_sidecar.audit.writer import AuditWriter
from kynara_sidecar.config import BacklogPolicy, SyncConfig
from kynara_sidecar.errors import AuditUnavailable
from kynara_sidecar.metrics import Metrics
from kynara_sidecar.sync import (
    MAX_SEGMENT_MESSAGE_BYTES,
    StoreUnavailable,
    retry_delay,
    segment_message_id,
)
from kynara_sidecar.sync._session import StoreSession, error_text
from kynara_sidecar.sync.status import ShippingStatusV1

__all__ = ["BacklogGate", "SegmentShipper"]

log = logging.getLogger("kynara.sync")

T = TypeVar("T")
# At stop, reading the backlog one last time is local and quick; a stop's
# grace spent on a slow store must not skip it.
MIN_REFRESH_SECONDS = 1.0


class _RecordTime(msgspec.Struct):
    # Only the field the backlog's age needs; the rest of a record is skipped.
    time: str


_RECORD_TIME = msgspec.json.Decoder(_RecordTime)


class _Backlog(msgspec.Struct, frozen=True):
    head: int
    # max(shipped_tree_size, seam): nothing at or below it can still ship.
    shipped: int
    segments: int
    oldest_nanos: int | None


def _read_backlog(audit: AuditStore) -> _Backlog:
    with audit.reading():
        shipped = max(audit.shipped(), audit.seam())
        head = audit.head().seq
        segments = len(audit.checkpoint_sizes(shipped))
        oldest = audit.get(shipped + 1) if head > shipped else None
    nanos = None
    if oldest is not None:
        try:
            stamp = parse_timestamp(_RECORD_TIME.decode(oldest.record_bytes).time)
            nanos = stamp.seconds * 1_000_000_000 + stamp.nanos
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
            nanos = None  # damage is verify's to name; the age is unknown
    return _Backlog(head, shipped, segments, nanos)


def _backlog_refusal(backlog: int, limit: int, url: str) -> AuditUnavailable:
    return AuditUnavailable(
        f"{backlog} audit records are not yet acknowledged by the central "
        f"store {url}, past sync.backlog_max_records ({limit}); with "
        "sync.backlog_policy fail_closed, decisions are refused until shipping "
        "catches up: bring the store back, or raise sync.backlog_max_records"
    )


class BacklogGate:
    """The pipeline's audit sink under ``sync.backlog_policy: fail_closed``.

    Passes records to the writer while the unshipped backlog is within
    ``sync.backlog_max_records``, and refuses them with ``AuditUnavailable``
    (naming the backlog and the setting) once past it, until the shipper
    reports enough acknowledged. The check is two integer compares per
    batch: the head comes back with each append, the shipped size from the
    shipper.

    Args:
        sink: the audit writer.
        limit: ``sync.backlog_max_records``.
        url: the store, for the refusal's message.
        head: the log's size now.
        shipped: what the store acknowledged so far (``shipped_tree_size``,
            or the seam when past it).
    """

    def __init__(
        self, sink: AuditWriter, limit: int, url: str, head: int, shipped: int
    ):
        self._sink = sink
        self._limit = limit
        self._url = url
        self._head = head
        self._shipped = shipped
        self.on_over: Callable[[], None] | None = None

    @property
    def backlog(self) -> int:
        return self._head - self._shipped

    @property
    def over(self) -> bool:
        return self.backlog > self._limit

    def observe(self, *, head: int = 0, shipped: int = 0) -> None:
        """Take the shipper's latest view of the log (on the loop); both
        only ever grow."""
        self._head = max(self._head, head)
        self._shipped = max(self._shipped, shipped)

    def _check(self) -> None:
        if self.over:
            raise _backlog_refusal(self.backlog, self._limit, self._url)

    def _landed(self, appended: list[Appended]) -> None:
        if not appended:
            return
        was_over = self.over
        self._head = max(self._head, appended[-1].seq)
        if self.over and not was_over and self.on_over is not None:
            self.on_over()

    async def append(
        self,
        record: AuditRecordV1,
        state_changes: Iterable[StateChange] = (),
        **options: Any,
    ) -> Appended:
        self._check()
        appended = await self._sink.append(record, state_changes, **options)
        self._landed([appended])
        return appended

    async def append_all(
        self,
        records: Iterable[AuditRecordV1],
        state_changes: Iterable[StateChange] = (),
        **options: Any,
    ) -> list[Appended]:
        self._check()
        appended = await self._sink.append_all(records, state_changes, **options)
        self._landed(appended)
        return appended

    async def close(self) -> None:
        await self._sink.close()


class SegmentShipper:
    """Ships sealed audit segments to the central store; see the module doc.

    Args:
        audit: the daemon's audit log, open for writing (``mark_shipped``).
        session: the central store.
        config: the ``sync`` section.
        metrics: the daemon's metrics (the shipping gauges and counters).
        clock: nanoseconds since the epoch, for the backlog's age.
        gate: the fail_closed gate, when ``sync.backlog_policy`` is
            fail_closed; kept up to date with what is shipped.
        on_change: called on the loop after a segment shipped and when
            shipping starts or stops failing (the status publisher's cue).
        max_message_bytes: the records' byte budget of one message.
        rng: the jitter's source (tests seed one).
    """

    def __init__(
        self,
        audit: AuditStore,
        session: StoreSession,
        config: SyncConfig,
        metrics: Metrics,
        clock: Callable[[], int],
        *,
        gate: BacklogGate | None = None,
        on_change: Callable[[], None] | None = None,
        max_message_bytes: int = MAX_SEGMENT_MESSAGE_BYTES,
        rng: random.Random | None = None,
    ):
        self._audit = audit
        self._session = session
        self._config = config
        self._metrics = metrics
        self._clock = clock
        self._gate = gate
        self._on_change = on_change
        self._max_bytes = max_message_bytes
        self._rng = rng or random.Random()
        # One thread for LMDB work: stop() waits for it before the log closes.
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="kynara-shipper"
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._round = asyncio.Lock()
        self._failures = 0
        self._last_error = ""
        self._over = False
        self._gap_logged = False
        self._stopping = False
        self._status = ShippingStatusV1()
        if gate is not None:
            gate.on_over = self.wake

    @property
    def status(self) -> ShippingStatusV1:
        """The shipping part of the daemon's status, as of the last look."""
        return self._status

    @property
    def failures(self) -> int:
        """Failed rounds in a row (0 after a success)."""
        return self._failures

    # ------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Read the backlog and start shipping in the background."""
        self._loop = asyncio.get_running_loop()
        await self.refresh()
        self._task = self._loop.create_task(self._run())

    def wake(self) -> None:
        """Ship soon. Safe from any thread (the writer calls it after each
        checkpoint); does nothing once the daemon's loop is closed."""
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._wake.set)
        except RuntimeError:
            pass  # the loop is closed: the daemon is gone

    def on_checkpoint(self, checkpoint: object, witness_error: str | None) -> None:
        """The writer's ``on_checkpoint`` hook (writer thread): ship soon."""
        self.wake()

    async def stop(self, grace: float) -> None:
        """Stop the background rounds, then try to ship what is sealed for at
        most ``grace`` seconds (a dead store costs no more); what is left
        ships after the next start. Waits for the shipper's LMDB work, so
        the caller may close the log afterwards. Idempotent."""
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            await self._final_round(grace)
        await asyncio.to_thread(self._pool.shutdown, wait=True)

    async def _final_round(self, grace: float) -> None:
        try:
            async with asyncio.timeout(grace):
                await self.ship_pending()
        except TimeoutError:
            self._failed(
                StoreUnavailable(
                    f"{self._session.url}: not all shipped within the {grace:g}s "
                    "a stop allows"
                )
            )
        except Exception as err:
            self._failed(err)
        try:
            async with asyncio.timeout(max(grace, MIN_REFRESH_SECONDS)):
                await self.refresh()
        except Exception:  # the log's own failure is the writer's to report
            return
        if self._status.backlog_segments:
            log.warning(
                "segments left unshipped at stop; shipped after the next start",
                extra=self._fields(backlog_segments=self._status.backlog_segments),
            )

    # ----------------------------------------------------------------- rounds

    async def _run(self) -> None:
        # The flag as well as the cancel: a cancel that lands as a store call
        # completes must not leave the loop running.
        while not self._stopping:
            try:
                await self.ship_pending()
            except Exception as err:
                self._failed(err)
            else:
                self._succeeded()
            await self._pause()

    async def _pause(self) -> None:
        cfg = self._config
        if not self._failures:
            await self._wait(cfg.poll_seconds)
            return
        # During a failure spell a new checkpoint does not cut the pause
        # short (the store would be hammered under load); it refreshes the
        # backlog, so metrics and the ceiling stay current.
        delay = retry_delay(
            self._failures, cfg.retry_min_seconds, cfg.retry_max_seconds,
            self._rng.random(),
        )  # fmt: skip
        deadline = asyncio.get_running_loop().time() + delay
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            if await self._wait(left):
                await self._refresh_quietly()

    async def _wait(self, seconds: float) -> bool:
        # True when woken, False when the time ran out.
        try:
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        except TimeoutError:
            return False
        finally:
            self._wake.clear()
        return True

    async def ship_pending(self) -> int:
        """Ship every sealed segment not yet acknowledged, oldest first.

        Returns:
            How many segments the store acknowledged in this round.

        Raises:
            StoreUnavailable: the store failed or timed out; what was
                acknowledged before stays marked shipped, the rest is sent
                again by a later round.
            AuditUnavailable, KynaraError: the log could not be read or
                marked.
        """
        async with self._round:
            shipped = 0
            try:
                spans = await self._in_pool(self._pending_spans)
                if spans and self._audit.durability == "deferred":
                    # Never let the centre hold records a machine crash
                    # could take back from the local log.
                    await self._in_pool(self._audit.sync)
                for span in spans:
                    await self._ship_span(span)
                    shipped += 1
            finally:
                await self._refresh_quietly()
            return shipped

    async def acknowledged(self) -> int:
        """The size through which the store acknowledged every record (or
        the seam, past which nothing can ship)."""
        return await self._in_pool(self._acknowledged)

    def _acknowledged(self) -> int:
        return max(self._audit.shipped(), self._audit.seam())

    async def ship_through(self, tree_size: int, seconds: float, since: int) -> int:
        """Ship until the store acknowledged every record through
        ``tree_size`` (sealed by the caller), for at most ``seconds``: the
        admin ``ShipNow`` a preStop hook calls. Rounds are the background
        ones' (``ship_pending``, one at a time); a failed one is counted
        alike and tried again after a pause that doubles from
        ``sync.retry_min_seconds``, within the time.

        Args:
            tree_size: the sealed size to reach.
            seconds: the bound on the whole call.
            since: what ``acknowledged`` said before the caller sealed.

        Returns:
            How many segments past ``since`` the store has acknowledged (by
            this call or a background round while it ran).

        Raises:
            StoreUnavailable: not all acknowledged in time; the message names
                the last store error, and the backlog is in ``status``.
            AuditUnavailable, KynaraError: the log could not be read.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        tries = 0
        while (done := await self.acknowledged()) < tree_size:
            if tries:
                # After a failure, or a round that found nothing to ship
                # (the seal not committed yet): never a busy loop.
                cfg = self._config
                pause = retry_delay(
                    tries, cfg.retry_min_seconds, cfg.retry_max_seconds,
                    self._rng.random(),
                )  # fmt: skip
                await asyncio.sleep(max(0.0, min(pause, deadline - loop.time())))
            left = deadline - loop.time()
            try:
                if left <= 0:
                    raise TimeoutError
                async with asyncio.timeout(left):
                    shipped = await self.ship_pending()
            except TimeoutError:
                last = f"; last error: {self._last_error}" if self._last_error else ""
                raise StoreUnavailable(
                    f"{self._session.url}: records through {tree_size} not "
                    f"acknowledged within {seconds:g}s{last}"
                ) from None
            except StoreUnavailable as err:
                self._failed(err)
                tries += 1
            else:
                self._succeeded()
                tries = 0 if shipped else tries + 1
        sizes = await self._in_pool(self._audit.checkpoint_sizes, since)
        return sum(1 for size in sizes if size <= done)

    def _pending_spans(self) -> list[prove.SegmentSpan]:
        shipped, seam = self._audit.shipped(), self._audit.seam()
        if shipped < seam and not self._gap_logged:
            # Pruned before they were shipped: shipping was off, or turned
            # on for an old log. The collector sees the gap, and so do we.
            self._gap_logged = True
            log.error(
                "audit records pruned before shipping; resuming at the seam",
                extra=self._fields(shipped_tree_size=shipped, seam=seam),
            )
        return prove.sealed_segments(self._audit, max(shipped, seam))

    async def _ship_span(self, span: prove.SegmentSpan) -> None:
        checkpoint = span.checkpoint
        proto = checkpoint_to_proto(checkpoint)
        first = span.previous_tree_size + 1
        while first <= checkpoint.tree_size:
            message = await self._in_pool(
                segment_message,
                self._audit,
                span,
                first,
                self._max_bytes,
                checkpoint=proto,
            )
            msg_id = segment_message_id(message)
            data = message.SerializeToString()
            stored = await self._session.call(
                functools.partial(
                    self._session.store.ship_segment, checkpoint.origin, msg_id, data
                ),
                f"ship segment message {msg_id}",
            )
            if not stored:
                log.debug(
                    "segment message already in the store", extra=self._fields(
                        msg_id=msg_id
                    )
                )  # fmt: skip
            first += len(message.records)
        await self._in_pool(self._mark_shipped, checkpoint.tree_size)
        log.debug(
            "segment shipped",
            extra=self._fields(
                tree_size=checkpoint.tree_size,
                records=checkpoint.tree_size - span.previous_tree_size,
            ),
        )
        if self._gate is not None:
            self._gate.observe(shipped=checkpoint.tree_size)
        self._changed()

    def _mark_shipped(self, tree_size: int) -> None:
        # Marked and counted together on the pool's thread: a stop that
        # cancels the round while it runs loses neither.
        self._audit.mark_shipped(tree_size)
        self._metrics.audit_shipped_segments.inc()

    async def _in_pool(self, work: Callable[..., T], *args: Any, **kw: Any) -> T:
        loop = asyncio.get_running_loop()
        return await asyncio.wrap_future(
            self._pool.submit(work, *args, **kw), loop=loop
        )

    # ---------------------------------------------------------------- backlog

    async def refresh(self) -> ShippingStatusV1:
        """Read the backlog again; update metrics, the gate and the status.

        Raises:
            AuditUnavailable: the log could not be read.
        """
        backlog = await self._in_pool(_read_backlog, self._audit)
        records = backlog.head - backlog.shipped
        age = 0.0
        if backlog.oldest_nanos is not None:
            age = max(0.0, (self._clock() - backlog.oldest_nanos) / 1e9)
        if self._gate is not None:
            self._gate.observe(head=backlog.head, shipped=backlog.shipped)
        over = records > self._config.backlog_max_records
        self._status = ShippingStatusV1(
            shipped_tree_size=backlog.shipped,
            backlog_segments=backlog.segments,
            backlog_records=records,
            oldest_unshipped_seconds=age,
            last_error=self._last_error,
            over_ceiling=over,
        )
        metrics = self._metrics
        metrics.audit_shipping_backlog_segments.set(backlog.segments)
        metrics.audit_shipping_backlog_records.set(records)
        metrics.audit_oldest_unshipped_seconds.set(age)
        self._ceiling(over, records)
        return self._status

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh()
        except Exception as err:
            log.error(
                "audit backlog not read",
                extra=self._fields(
                    error=error_text(err), error_type=type(err).__name__
                ),
            )

    def _ceiling(self, over: bool, records: int) -> None:
        if over == self._over:
            return
        self._over = over
        cfg = self._config
        fields = self._fields(
            backlog_records=records,
            backlog_max_records=cfg.backlog_max_records,
            policy=str(cfg.backlog_policy),
            setting="sync.backlog_max_records",
        )
        if not over:
            log.info("audit backlog back under its ceiling", extra=fields)
        elif cfg.backlog_policy is BacklogPolicy.FAIL_CLOSED:
            log.error(
                "audit backlog past its ceiling: refusing decisions", extra=fields
            )
        else:
            log.warning("audit backlog past its ceiling: still deciding", extra=fields)
        self._changed()

    # ------------------------------------------------------------- outcomes

    def _failed(self, err: Exception) -> None:
        self._failures += 1
        self._metrics.audit_shipping_failures.inc()
        first = not self._last_error
        text = error_text(err)
        self._last_error = text
        self._status = msgspec.structs.replace(self._status, last_error=text)
        fields = self._fields(
            error=text, error_type=type(err).__name__, failures=self._failures
        )
        if not isinstance(err, StoreUnavailable):
            log.error("audit segments not shipped", extra=fields)
        elif first:
            log.warning("audit segments not shipped; retrying", extra=fields)
        else:
            log.debug("audit segments not shipped; retrying", extra=fields)
        if first:
            self._changed()

    def _succeeded(self) -> None:
        if self._last_error:
            log.info("audit segments shipping again", extra=self._fields())
            self._last_error = ""
            self._status = msgspec.structs.replace(self._status, last_error="")
            self._changed()
        self._failures = 0

    def _changed(self) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change()
        except Exception:
            log.exception("status hook failed", extra=self._fields())

    def _fields(self, **fields: object) -> dict[str, dict[str, object]]:
        return {"fields": {"component": "sync", "backend": self._session.url, **fields}}
