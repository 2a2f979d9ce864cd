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

- accepted: the segment is written to the archive as one message, the
  state commits the new frontier, and then its last message is
  acknowledged;
- duplicate: acknowledged, not archived again;
- refused: the alert is committed to the state, logged at ERROR and
  counted (``kynara_collector_alerts_total``), and the last message is
  acknowledged: refused evidence stays in the state's alert, and a later
  delivery would be refused the same way.

A failure to archive or commit (the collector's own trouble, never the
daemon's) does not acknowledge the last message: it is negatively
acknowledged and comes again, completing the kept segment again; since the state was not
committed, the segment then extends the same frontier and is accepted
again, and the archive's put of it is idempotent.

A message continuing a segment whose earlier messages are not kept is a
duplicate when its checkpoint was accepted; otherwise its segment can
never be completed (the earlier messages were acknowledged), so it is
dropped with an ERROR, and the next segment shows the loss as a ``gap``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from google.protobuf.message import DecodeError
from kynara.v1 import audit_pb2 as pb

from kynara_sidecar.audit.checkpoint import CheckpointError, decode_checkpoint
from kynara_sidecar.audit.keys import PublicKey
from kynara_sidecar.audit.record import format_timestamp
from kynara_sidecar.audit.segments import checkpoint_to_proto
from kynara_sidecar.collector.archive import Archive, segment_key
from kynara_sidecar.collector.metrics import UNREGISTERED, CollectorMetrics
from kynara_sidecar.collector.state import CollectorState, HeldSegment, StateError
from kynara_sidecar.collector.verifier import (
    AlertKind,
    Outcome,
    SegmentData,
    Verdict,
    refusal,
    verify_segment,
)
from kynara_sidecar.decision import Timestamp

__all__ = ["Intake", "Message"]

log = logging.getLogger("kynara.collector")


class Message(Protocol):
    """A segment message and how to settle it (``sync.Delivery``)."""

    daemon_id: str
    data: bytes

    async def ack(self) -> None: ...

    async def nak(self) -> None: ...


def _held_from(segment: pb.Segment) -> HeldSegment:
    return HeldSegment(
        checkpoint_json=segment.checkpoint.json,
        previous_tree_size=segment.previous_tree_size,
        first_seq=segment.first_seq,
        tree_size=_tree_size(segment),
    )


def _next_seq(held: HeldSegment) -> int:
    return held.first_seq + len(held.records)


def _takes(held: HeldSegment, segment: pb.Segment) -> bool:
    return (
        segment.checkpoint.json == held.checkpoint_json
        and segment.previous_tree_size == held.previous_tree_size
        and segment.first_seq == _next_seq(held)
    )


def _tree_size(segment: pb.Segment) -> int:
    # From the signed JSON, not the parsed convenience field; a checkpoint
    # that does not decode completes its segment at once and is refused.
    try:
        return decode_checkpoint(segment.checkpoint.json).tree_size
    except CheckpointError:
        return 0


class Intake:
    """Assembles, verifies, archives, commits, then settles messages.

    Args:
        state: the collector's state.
        archive: where accepted segments go.
        registered: daemon id -> its registered public keys by key id.
        metrics: the collector's instruments.
        clock: nanoseconds since the epoch, for alert times.
    """

    def __init__(
        self,
        *,
        state: CollectorState,
        archive: Archive,
        registered: Mapping[str, Mapping[str, PublicKey]],
        metrics: CollectorMetrics,
        clock: Callable[[], int] = time.time_ns,
    ):
        self._state = state
        self._archive = archive
        self._registered = registered
        self._metrics = metrics
        self._clock = clock
        self._lock = asyncio.Lock()

    @property
    def state(self) -> CollectorState:
        return self._state

    def label(self, daemon_id: str) -> str:
        """The metric label for a daemon id (bounded)."""
        return daemon_id if daemon_id in self._registered else UNREGISTERED

    def registered(self, daemon_id: str) -> Mapping[str, PublicKey] | None:
        return self._registered.get(daemon_id)

    async def receive(self, message: Message) -> Outcome | None:
        """Take one message; settle it (and its segment's) when decided.

        Returns:
            The segment's outcome once it was decided; None while its
            segment is incomplete, or when the message was sent again later
            (negatively acknowledged).
        """
        async with self._lock:
            try:
                segment = pb.Segment.FromString(message.data)
            except DecodeError as err:
                outcome = refusal(
                    self._state.frontier(message.daemon_id),
                    AlertKind.BAD_CHAIN,
                    f"message is not a kynara.v1.Segment: {err}",
                )
                await self._record(message.daemon_id, outcome, b"")
                await message.ack()
                return outcome
            held = await self._hold(message, segment)
            if held is None:
                return None
            try:
                outcome = await asyncio.to_thread(self._settle, message.daemon_id, held)
            except Exception:
                self._metrics.failures.labels("archive_or_state").inc()
                log.exception(
                    "segment not settled; it comes again",
                    extra={"fields": _fields(message.daemon_id, held)},
                )
                await message.nak()
                return None
            self._report(message.daemon_id, outcome, held)
            await message.ack()
            return outcome

    async def _hold(self, message: Message, segment: pb.Segment) -> HeldSegment | None:
        """Add the message to its segment; the whole segment once complete.

        A message that does not complete its segment is kept in the state,
        then acknowledged.
        """
        daemon = message.daemon_id
        held = await asyncio.to_thread(self._state.held, daemon)
        if segment.first_seq == segment.previous_tree_size + 1:
            if held is not None and held.checkpoint_json != segment.checkpoint.json:
                log.error(
                    "incomplete segment dropped for a new one",
                    extra={"fields": _fields(daemon, held)},
                )
            held = _held_from(segment)
        elif held is None or not _takes(held, segment):
            await self._stray(message, segment)
            return None
        held.records.extend(segment.records)
        if _next_seq(held) > held.tree_size:
            return held
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

    async def _stray(self, message: Message, segment: pb.Segment) -> None:
        # Its segment's earlier messages are not held (acknowledged, so they
        # never come again): a duplicate of an accepted segment, or one that
        # can never complete, whose loss the next segment shows as a gap.
        cp = segment.checkpoint
        history = self._state.history(message.daemon_id)
        if history.checkpoint(cp.log_id, cp.tree_size) != cp.json:
            self._metrics.failures.labels("stray_message").inc()
            log.error(
                "segment message without its segment's start dropped",
                extra={
                    "fields": {
                        "component": "collector",
                        "daemon": message.daemon_id,
                        "tree_size": cp.tree_size,
                        "first_seq": segment.first_seq,
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
        outcome = verify_segment(frontier, data, self.registered(daemon_id), history)
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
        """Record a refusal found outside a segment (a pulled head)."""
        async with self._lock:
            await self._record(daemon_id, outcome, evidence)

    async def _record(self, daemon_id: str, outcome: Outcome, evidence: bytes) -> None:
        await asyncio.to_thread(
            self._state.commit, daemon_id, outcome, time=self._now(), evidence=evidence
        )
        self._report(daemon_id, outcome, None)

    def _now(self) -> str:
        return format_timestamp(Timestamp.from_nanos(self._clock()))

    def _report(self, daemon_id: str, outcome: Outcome, held: HeldSegment | None):
        label = self.label(daemon_id)
        self._metrics.segments.labels(label, str(outcome.verdict)).inc()
        fields = {**_fields(daemon_id, held), "outcome": str(outcome.verdict)}
        if outcome.verdict == Verdict.ACCEPTED:
            self._metrics.records.labels(label).inc(len(held.records) if held else 0)
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


def _fields(daemon_id: str, held: HeldSegment | None) -> dict[str, object]:
    fields: dict[str, object] = {"component": "collector", "daemon": daemon_id}
    if held is not None:
        fields["tree_size"] = held.tree_size
        fields["first_seq"] = held.first_seq
    return fields
