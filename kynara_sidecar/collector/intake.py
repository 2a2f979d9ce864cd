"""The collector's intake: segment messages in, verdicts, archive and state
out, and only then the acknowledgement.

Both doors feed it: deliveries from the store's durable consumer, and
messages pulled from a daemon's ``AuditService.StreamSegments``. Per
daemon, messages arrive in ship order. A segment may come as several
messages with the same checkpoint and successive ``first_seq``; the intake
keeps each in the state (``state.hold``) and then acknowledges it, until
the message whose last record is the checkpoint's tree size, then verifies
the whole segment (``verifier``). Keeping rather than holding messages
unacknowledged matters: a NATS consumer has one message in flight, so the
next message of a segment would never come while the first waited.

Whoever can write to the central store can send anything under any name,
so each message is screened before anything of it is kept or looked up,
and a message that can never succeed is refused and acknowledged, never
sent round again:

1. an unregistered daemon id: logged, counted under the fixed label
   ``unregistered``, acknowledged; nothing is kept for it;
2. larger than ``MAX_MESSAGE_BYTES``, or no ``kynara.v1.Segment``:
   ``malformed``;
3. ``verifier.screen_message``: the checkpoint's fields, its signature
   (a key not trusted yet is let through, unverified: a rotation later in
   the segment may add it), its origin, and sizes that fit it;
4. a checkpoint the collector accepted: a ``duplicate`` (its records are
   the accepted leaves) or a ``tampered_duplicate``; either way any
   segment being assembled is left alone;
5. a daemon already refused: refused again (sticky), nothing kept.

Then the message joins the daemon's one segment in assembly: the next
message of it, a message of it again (a redelivery: acknowledged), or the
start of a segment, which replaces the assembly only when none is kept,
or when its checkpoint verifies and is newer (or the kept one is
unverified). Anything else is a stray: logged at ERROR, counted
(``failures{what="stray_message"}``) and acknowledged.

A whole segment is then

- accepted: written to the archive as one message, the state commits the
  new frontier, and then its last message is acknowledged;
- a duplicate: acknowledged, not archived again;
- refused: the alert is committed to the state, logged at ERROR and
  counted (``kynara_collector_alerts_total``), and the last message is
  acknowledged: refused evidence stays in the state's alert, and a later
  delivery would be refused the same way.

A failure to archive or commit (the collector's own trouble, never the
daemon's) does not acknowledge the last message: it is negatively
acknowledged and comes again, completing the kept segment again; since the
state was not committed, the segment then extends the same frontier and is
accepted again, and the archive's put of it is idempotent. Nor does a
commit that finds the frontier changed since the segment was judged (a
``daemons clear`` in between: ``state.FrontierChanged``, logged at
WARNING): the message comes again and is judged against the cleared
frontier. The clear dropped the kept messages, so only a segment of one
message completes again (a pull fetches the rest again from the frontier);
the archive may keep the put of a segment not accepted then. Any other
exception while handling a message is logged at ERROR with its traceback,
counted (``failures{what="message"}``) and the message acknowledged: one
message that trips the collector must not stop every daemon's collection.

Families. A daemon registered through a ``daemons`` entry's ``id_prefix``
(``collector.registry``) is one of any number of ids a store writer may
name, so nothing of such a member is kept, and no alert is committed for
it, until it is taken on: until the state holds something of it, a
message of it must decode and its checkpoint verify under the entry's
keys (or a key rotation in that message signed by one of them). Any other
message of a member not taken on is logged, counted under the entry's name
(``alerts{daemon=<entry>,kind}``) and acknowledged, as for an unregistered
daemon. A member whose first segment's checkpoint is signed by a key that
only a later message of the segment introduces is not taken on: register
that key on the entry. Metrics of members carry the entry's name; the
state, alerts, archive and queries are per member id.

Trust boundary. Segments are signed, so no writer can forge one: what a
writer can do is lose a daemon's segment for it. It may send an
unverified start (a segment whose key rotation is not in its first
message is assembled unverified) that takes the assembly's place, so the
daemon's segment is a stray; or a forged next message of the segment in
assembly (its records are only checked once the segment is whole, a
``bad_root``). The daemon's next segment is then a ``gap``, which is
sticky: alerted, never silent, but the daemon is blamed. On a NATS server
with a user per daemon (``config/nats-server.conf``,
``nats_store.daemon_permissions``) the only writers of a daemon's segment
subject are that daemon's own credentials and the server's operator: no
daemon may publish under another's token, the publisher and the collector
may publish no segment, and the collector may not delete, purge or change
the stream (``collector_permissions``), only acknowledge what it read.
The operator can always delete or rewrite messages, and so stop
collection: availability, not forgery.
Where writers are not so kept apart, they are one trust domain for
availability, and the collector says so rather than guessing who: every
writer of a ``dir://`` store's directory, every user of a NATS server
without per-daemon users, and the replicas of one Kubernetes Deployment,
which share one NATS user and one audit signing key anyway
(config/kubernetes/README.md "Limits"). A gap is never waited out: it is
alerted at once, against the daemon it names; the operator investigates,
and ``kynara-collector daemons clear`` lets a ``pull`` entry fetch the
missing segments from the daemon's admin listener, if the daemon still
holds them (retention prunes what the store acknowledged), or a
``--take-on-new-log`` clear takes the daemon on from a new chain.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from google.protobuf.message import DecodeError
from kynara.v1 import audit_pb2 as pb

from kynara_sidecar.audit.keys import PublicKey
from kynara_sidecar.audit.record import format_timestamp
from kynara_sidecar.audit.segments import checkpoint_to_proto
from kynara_sidecar.collector.archive import Archive, ArchiveError, segment_key
from kynara_sidecar.collector.metrics import UNREGISTERED, CollectorMetrics
from kynara_sidecar.collector.registry import DaemonEntry, DaemonRegistry
from kynara_sidecar.collector.state import (
    CollectorState,
    FrontierChanged,
    HeldSegment,
    StateError,
)
from kynara_sidecar.collector.verifier import (
    AlertKind,
    Frontier,
    HistoryError,
    Outcome,
    Screened,
    SegmentData,
    Verdict,
    check_duplicate,
    refusal,
    screen_message,
    still_refused,
    verify_segment,
)
from kynara_sidecar.decision import Timestamp
from kynara_sidecar.sync import StoreUnavailable

__all__ = [
    "MAX_MESSAGE_BYTES",
    "MAX_UNVERIFIED_HELD_BYTES",
    "Intake",
    "Message",
]

log = logging.getLogger("kynara.collector")

# A daemon ships at most 512 KiB of records a message (one record more when
# a single record is larger); 4 MiB leaves room and refuses the rest.
MAX_MESSAGE_BYTES = 4 << 20
# Records kept for a segment whose checkpoint's key is not trusted yet;
# past this it is refused rather than kept on a stranger's word.
MAX_UNVERIFIED_HELD_BYTES = 16 << 20
# Attacker-chosen ids are cut to this in log lines.
MAX_LOGGED_ID_CHARS = 128
# What failed in the collector's own archive or state: retried.
_OWN_FAILURES = (ArchiveError, StateError, HistoryError)


class Message(Protocol):
    """A segment message and how to settle it (``sync.Delivery``)."""

    daemon_id: str
    data: bytes

    async def ack(self) -> None: ...

    async def nak(self) -> None: ...


def _held_from(segment: pb.Segment, tree_size: int, verified: bool) -> HeldSegment:
    return HeldSegment(
        checkpoint_json=segment.checkpoint.json,
        previous_tree_size=segment.previous_tree_size,
        first_seq=segment.first_seq,
        tree_size=tree_size,
        verified=verified,
    )


def _next_seq(held: HeldSegment) -> int:
    return held.first_seq + len(held.records)


def _same_segment(held: HeldSegment | None, segment: pb.Segment) -> bool:
    return (
        held is not None
        and segment.checkpoint.json == held.checkpoint_json
        and segment.previous_tree_size == held.previous_tree_size
    )


def _repeats(held: HeldSegment, segment: pb.Segment) -> bool:
    start = segment.first_seq - held.first_seq
    kept = held.records[start : start + len(segment.records)]
    return start >= 0 and kept == list(segment.records)


def _shown(daemon_id: str) -> str:
    if len(daemon_id) <= MAX_LOGGED_ID_CHARS:
        return daemon_id
    return daemon_id[:MAX_LOGGED_ID_CHARS] + f"... ({len(daemon_id)} characters)"


class Intake:
    """Assembles, verifies, archives, commits, then settles messages.

    Args:
        state: the collector's state.
        archive: where accepted segments go.
        registry: the registered daemons and families (``daemons``).
        metrics: the collector's instruments.
        clock: nanoseconds since the epoch, for alert times.
        keys_added: called with a daemon id when a segment accepted from it
            added keys (a verified key rotation), after the state commits
            them and before the acknowledgement (the fleet inbox verifies
            the approvals it kept for such a key again); what it raises is
            logged, never fails the segment.
    """

    def __init__(
        self,
        *,
        state: CollectorState,
        archive: Archive,
        registry: DaemonRegistry,
        metrics: CollectorMetrics,
        clock: Callable[[], int] = time.time_ns,
        keys_added: Callable[[str], None] | None = None,
    ):
        self._state = state
        self._keys_added = keys_added
        self._archive = archive
        self._registry = registry
        self._metrics = metrics
        self._clock = clock
        self._lock = asyncio.Lock()

    @property
    def state(self) -> CollectorState:
        return self._state

    @property
    def registry(self) -> DaemonRegistry:
        return self._registry

    def label(self, daemon_id: str) -> str:
        """The metric label for a daemon id (bounded): its entry's name."""
        return self._registry.label_for(daemon_id)

    def keys_for(self, daemon_id: str) -> Mapping[str, PublicKey] | None:
        """The daemon's registered keys by key id; None when unregistered."""
        return self._registry.keys_for(daemon_id)

    async def receive(self, message: Message) -> Outcome | None:
        """Take one message; settle it (and its segment's) when decided.

        Returns:
            The outcome once decided (a refusal of the message alone, or
            its whole segment's); None while its segment is incomplete,
            when the message was sent again later (negatively
            acknowledged), or when it could not be handled (logged and
            counted).

        Raises:
            StoreUnavailable: the store lost the acknowledgement; the
                message comes again.
        """
        async with self._lock:
            try:
                return await self._receive(message)
            except StoreUnavailable:
                raise
            except _OWN_FAILURES:
                # Reading the state failed: the collector's trouble, retried.
                self._metrics.failures.labels("archive_or_state").inc()
                log.exception(
                    "segment message not settled; it comes again",
                    extra={"fields": _fields(message.daemon_id, None)},
                )
                await message.nak()
                return None
            except Exception as err:
                self._metrics.failures.labels("message").inc()
                log.error(
                    "segment message not handled; acknowledged and dropped",
                    exc_info=True,
                    extra={
                        "fields": {
                            "component": "collector",
                            "daemon": _shown(message.daemon_id),
                            "error": f"{type(err).__name__}: {err}",
                        }
                    },
                )
                await message.ack()
                return None

    async def _receive(self, message: Message) -> Outcome | None:
        daemon = message.daemon_id
        entry = self._registry.entry_for(daemon)
        if entry is None:
            return await self._unregistered(message)
        registered = entry.keys
        # A family member is taken on once the state holds something of it.
        stranger = entry.is_family and not await asyncio.to_thread(
            self._taken_on, daemon
        )
        if len(message.data) > MAX_MESSAGE_BYTES:
            return await self._refuse_message(
                message,
                f"a message of {len(message.data)} bytes; expected at most "
                f"{MAX_MESSAGE_BYTES}",
                entry if stranger else None,
            )
        try:
            segment = pb.Segment.FromString(message.data)
        except DecodeError as err:
            return await self._refuse_message(
                message,
                f"message is not a kynara.v1.Segment: {err}",
                entry if stranger else None,
            )
        if not segment.HasField("checkpoint") or not segment.records:
            return await self._refuse_message(
                message,
                "a kynara.v1.Segment without a checkpoint or records",
                entry if stranger else None,
            )
        frontier, held = await asyncio.to_thread(self._lookup, daemon)
        data = SegmentData(
            segment.checkpoint.json,
            segment.previous_tree_size,
            segment.first_seq,
            segment.records,
        )
        earlier = held.records if _same_segment(held, segment) else ()
        screened = screen_message(frontier, data, registered, earlier)
        if stranger and isinstance(screened, Outcome):
            return await self._not_taken_on(
                message,
                entry,
                screened.kind or AlertKind.MALFORMED,
                screened.message,
            )
        if stranger and not screened.verified:
            return await self._not_taken_on(
                message,
                entry,
                AlertKind.BAD_SIGNATURE,
                f"checkpoint key {screened.checkpoint.key_id} is not one of "
                f"daemons.{entry.name}'s; a member of a family is taken on only "
                "from a checkpoint signed by one of its entry's keys",
            )
        if isinstance(screened, Outcome):
            return await self._finish(
                message, screened, data.checkpoint_json, keep_held=True
            )
        outcome = await asyncio.to_thread(self._judge, frontier, screened, data)
        if outcome is not None:
            return await self._finish(
                message, outcome, data.checkpoint_json, keep_held=True
            )
        whole = await self._assemble(message, segment, held, screened)
        if whole is None:
            return None
        try:
            outcome = await asyncio.to_thread(self._settle, daemon, whole)
        except FrontierChanged as err:
            # A ``daemons clear`` came between judging and committing: not
            # acknowledged, so the segment comes again and is judged
            # against the cleared frontier.
            log.warning(
                "segment judged against a frontier cleared since; it comes again",
                extra={"fields": {**_fields(daemon, whole), "error": str(err)}},
            )
            await message.nak()
            return None
        except _OWN_FAILURES:
            self._metrics.failures.labels("archive_or_state").inc()
            log.exception(
                "segment not settled; it comes again",
                extra={"fields": _fields(daemon, whole)},
            )
            await message.nak()
            return None
        self._report(daemon, outcome, whole)
        if outcome.frontier.rotated_keys.keys() - frontier.rotated_keys.keys():
            self._tell_keys_added(daemon)
        await message.ack()
        return outcome

    def _tell_keys_added(self, daemon_id: str) -> None:
        if self._keys_added is None:
            return
        try:
            self._keys_added(daemon_id)
        except Exception as err:
            # The segment is committed: it is accepted whatever a listener
            # of new keys does.
            log.error(
                "new keys of a daemon not passed on",
                exc_info=True,
                extra={
                    "fields": {
                        **_fields(daemon_id, None),
                        "error": f"{type(err).__name__}: {err}",
                    }
                },
            )

    def _lookup(self, daemon_id: str) -> tuple[Frontier, HeldSegment | None]:
        return self._state.frontier(daemon_id), self._state.held(daemon_id)

    def _taken_on(self, daemon_id: str) -> bool:
        """Whether the state holds anything of the daemon: a frontier, a
        segment in assembly, or an alert."""
        frontier = self._state.frontier(daemon_id)
        return bool(
            frontier.log_id
            or frontier.refused
            or frontier.previous_logs
            or self._state.held(daemon_id) is not None
            or self._state.alert_total(daemon_id)
        )

    def _judge(
        self, frontier: Frontier, screened: Screened, data: SegmentData
    ) -> Outcome | None:
        """A duplicate, a tampered one, or a sticky refusal; None when the
        message is for assembly."""
        cp = screened.checkpoint
        history = self._state.history(frontier.daemon_id)
        if history.checkpoint(cp.log_id, cp.tree_size) == bytes(data.checkpoint_json):
            return check_duplicate(frontier, cp, data, history)
        if frontier.refused:
            return still_refused(frontier, cp)
        return None

    async def _unregistered(self, message: Message) -> Outcome:
        # No state and no per-id label: anyone may send under any name.
        daemon = message.daemon_id
        self._metrics.alerts.labels(UNREGISTERED, str(AlertKind.UNKNOWN_DAEMON)).inc()
        reason = f"daemon {_shown(daemon)!r} is not registered (collector daemons)"
        log.error(
            "segment message of an unregistered daemon dropped",
            extra={
                "fields": {
                    "component": "collector",
                    "daemon": _shown(daemon),
                    "kind": str(AlertKind.UNKNOWN_DAEMON),
                }
            },
        )
        await message.ack()
        return Outcome(
            Verdict.REFUSED,
            Frontier(daemon_id=daemon),
            AlertKind.UNKNOWN_DAEMON,
            reason,
        )

    async def _not_taken_on(
        self, message: Message, entry: DaemonEntry, kind: AlertKind, reason: str
    ) -> Outcome:
        """Refuse a message of a family member not taken on: logged and
        counted under the entry's name, acknowledged, nothing kept."""
        daemon = message.daemon_id
        self._metrics.alerts.labels(entry.name, str(kind)).inc()
        log.error(
            "segment message of a family member not taken on dropped",
            extra={
                "fields": {
                    "component": "collector",
                    "daemon": _shown(daemon),
                    "entry": entry.name,
                    "kind": str(kind),
                    "error": reason,
                }
            },
        )
        await message.ack()
        return Outcome(Verdict.REFUSED, Frontier(daemon_id=daemon), kind, reason)

    async def _refuse_message(
        self, message: Message, reason: str, stranger_of: DaemonEntry | None = None
    ) -> Outcome | None:
        if stranger_of is not None:
            return await self._not_taken_on(
                message, stranger_of, AlertKind.MALFORMED, reason
            )
        frontier = await asyncio.to_thread(self._state.frontier, message.daemon_id)
        outcome = refusal(frontier, AlertKind.MALFORMED, reason)
        return await self._finish(message, outcome, b"", keep_held=True)

    async def _assemble(
        self,
        message: Message,
        segment: pb.Segment,
        held: HeldSegment | None,
        screened: Screened,
    ) -> HeldSegment | None:
        """Add the message to the daemon's segment in assembly; the whole
        segment once complete. A message that does not complete it is kept
        in the state, then acknowledged."""
        daemon = message.daemon_id
        cp = screened.checkpoint
        starts = segment.first_seq == segment.previous_tree_size + 1
        if held is not None and _same_segment(held, segment):
            if segment.first_seq < _next_seq(held) and _repeats(held, segment):
                log.debug(
                    "segment message again; acknowledged",
                    extra={"fields": _fields(daemon, held)},
                )
                await message.ack()
                return None
            if segment.first_seq != _next_seq(held):
                await self._stray(message, cp.tree_size, segment.first_seq)
                return None
            held.verified = held.verified or screened.verified
        elif starts and (
            held is None
            or (
                screened.verified
                and (not held.verified or cp.tree_size > held.tree_size)
            )
        ):
            if held is not None:
                self._metrics.failures.labels("incomplete_segment").inc()
                log.error(
                    "incomplete segment dropped for a newer one",
                    extra={
                        "fields": {
                            **_fields(daemon, held),
                            "new_tree_size": cp.tree_size,
                        }
                    },
                )
            held = _held_from(segment, cp.tree_size, screened.verified)
        else:
            await self._stray(message, cp.tree_size, segment.first_seq)
            return None
        held.records.extend(segment.records)
        if _next_seq(held) > held.tree_size:
            return held
        if not held.verified and _size(held) > MAX_UNVERIFIED_HELD_BYTES:
            outcome = refusal(
                self._state.frontier(daemon),
                AlertKind.BAD_SIGNATURE,
                f"more than {MAX_UNVERIFIED_HELD_BYTES} bytes of a segment whose "
                f"checkpoint key {cp.key_id} is not trusted",
                cp,
            )
            await self._finish(message, outcome, held.checkpoint_json, keep_held=False)
            return None
        try:
            await asyncio.to_thread(self._state.hold, daemon, held)
        except StateError:
            self._metrics.failures.labels("archive_or_state").inc()
            log.exception(
                "segment message not kept; it comes again",
                extra={"fields": _fields(daemon, held)},
            )
            await message.nak()
            return None
        await message.ack()
        return None

    async def _stray(self, message: Message, tree_size: int, first_seq: int) -> None:
        # Its segment's earlier messages are not held (acknowledged, so they
        # never come again), or another segment is being assembled: it can
        # never complete, and if it was the daemon's, the next segment shows
        # the loss as a gap.
        self._metrics.failures.labels("stray_message").inc()
        log.error(
            "segment message without its segment's start dropped",
            extra={
                "fields": {
                    "component": "collector",
                    "daemon": message.daemon_id,
                    "tree_size": tree_size,
                    "first_seq": first_seq,
                }
            },
        )
        await message.ack()

    def _settle(self, daemon_id: str, held: HeldSegment) -> Outcome:
        """Verify, archive, commit (blocking; in a worker thread)."""
        frontier = self._state.frontier(daemon_id)
        history = self._state.history(daemon_id)
        data = SegmentData(
            held.checkpoint_json, held.previous_tree_size, held.first_seq, held.records
        )
        outcome = verify_segment(frontier, data, self.keys_for(daemon_id), history)
        if outcome.verdict == Verdict.ACCEPTED:
            assert outcome.checkpoint is not None
            whole = pb.Segment(
                checkpoint=checkpoint_to_proto(outcome.checkpoint),
                previous_tree_size=held.previous_tree_size,
                first_seq=held.first_seq,
                records=held.records,
            )
            whole.checkpoint.json = held.checkpoint_json
            key = segment_key(
                daemon_id, outcome.frontier.log_id, outcome.frontier.tree_size
            )
            self._archive.put(key, whole.SerializeToString())
        self._state.commit(
            daemon_id, outcome, time=self._now(), evidence=held.checkpoint_json
        )
        return outcome

    async def refuse(self, daemon_id: str, outcome: Outcome, evidence: bytes) -> None:
        """Record a refusal found outside a segment (a pulled head). One
        judged against a frontier a ``daemons clear`` changed since is
        dropped: the next poll checks the head against the new one.

        Raises:
            StateError: the state cannot be written.
        """
        async with self._lock:
            try:
                await asyncio.to_thread(
                    self._state.commit,
                    daemon_id,
                    outcome,
                    time=self._now(),
                    evidence=evidence,
                )
            except FrontierChanged as err:
                log.warning(
                    "daemon head judged against a frontier cleared since; "
                    "checked again at the next poll",
                    extra={"fields": {**_fields(daemon_id, None), "error": str(err)}},
                )
                return
            self._report(daemon_id, outcome, None)

    async def _finish(
        self, message: Message, outcome: Outcome, evidence: bytes, *, keep_held: bool
    ) -> Outcome | None:
        """Commit a message's refusal or duplicate, report it, acknowledge;
        when the state cannot be written, nak it (it comes again)."""
        daemon = message.daemon_id
        try:
            await asyncio.to_thread(
                self._state.commit,
                daemon,
                outcome,
                time=self._now(),
                evidence=evidence,
                keep_held=keep_held,
            )
        except StateError:
            self._metrics.failures.labels("archive_or_state").inc()
            log.exception(
                "segment message not settled; it comes again",
                extra={"fields": _fields(daemon, None)},
            )
            await message.nak()
            return None
        self._report(daemon, outcome, None)
        await message.ack()
        return outcome

    def _now(self) -> str:
        return format_timestamp(Timestamp.from_nanos(self._clock()))

    def _report(self, daemon_id: str, outcome: Outcome, held: HeldSegment | None):
        label = self.label(daemon_id)
        self._metrics.segments.labels(label, str(outcome.verdict)).inc()
        fields = {**_fields(daemon_id, held), "outcome": str(outcome.verdict)}
        if outcome.verdict == Verdict.ACCEPTED:
            self._metrics.records.labels(label).inc(len(held.records) if held else 0)
            if not self._registry.is_family_member(daemon_id):
                # A family's members share its label: no one size is its own.
                self._metrics.tree_size.labels(label).set(outcome.frontier.tree_size)
            log.debug("segment accepted", extra={"fields": fields})
        elif outcome.verdict == Verdict.DUPLICATE:
            log.debug("duplicate segment acknowledged", extra={"fields": fields})
        elif outcome.sticky:
            log.warning(
                "segment refused: daemon already refused",
                extra={"fields": {**fields, "kind": str(outcome.kind)}},
            )
        else:
            self._metrics.alerts.labels(label, str(outcome.kind)).inc()
            log.error(
                "segment refused",
                extra={
                    "fields": {
                        **fields,
                        "kind": str(outcome.kind),
                        "error": outcome.message,
                    }
                },
            )


def _size(held: HeldSegment) -> int:
    return sum(len(record) for record in held.records)


def _fields(daemon_id: str, held: HeldSegment | None) -> dict[str, object]:
    fields: dict[str, object] = {"component": "collector", "daemon": daemon_id}
    if held is not None:
        fields["tree_size"] = held.tree_size
        fields["first_seq"] = held.first_seq
    return fields
