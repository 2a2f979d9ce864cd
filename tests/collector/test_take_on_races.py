"""Take-ons racing the collector, and replays of ended logs after one.

The collector judges a segment against the frontier it read and commits in
another transaction; ``daemons clear`` may change the frontier in between
(re-pointing a waiting take-on). The commit then writes nothing and the
segment is judged again. A segment of a log the daemon ended is alerted
each time but never sticks, so replaying old signed segments cannot lock a
daemon out after its take-on. On real signed logs and a real state in
tmp_path; the intake's path with a real Intake and archive."""

from __future__ import annotations

import asyncio

import pytest
from audit._support import make_record
from kynara.v1 import audit_pb2 as pb

from kynara_sidecar.audit.checkpoint import decode_checkpoint
from kynara_sidecar.audit.segments import checkpoint_to_proto
from kynara_sidecar.audit.store import AuditStore
from kynara_sidecar.collector.archive import open_archive
from kynara_sidecar.collector.intake import Intake
from kynara_sidecar.collector.metrics import CollectorMetrics
from kynara_sidecar.collector.registry import DaemonRegistry
from kynara_sidecar.collector.state import FrontierChanged, NotRefused
from kynara_sidecar.collector.verifier import (
    AlertKind,
    SegmentData,
    Verdict,
    verify_segment,
)

from ._logs import ORIGIN, append_sealed, segments_of, write_log
from .test_intake_attacks import Delivery
from .test_take_on import REASON, _replayed
from .test_verifier import T, _chain_break, feed, verdicts

ACCEPTED = (Verdict.ACCEPTED, None)
DUPLICATE_DAEMON = (Verdict.REFUSED, AlertKind.DUPLICATE_DAEMON)


def _judge(state, segment, trusted):
    return verify_segment(
        state.frontier(ORIGIN), segment, trusted, state.history(ORIGIN)
    )


def _message(segment: SegmentData) -> pb.Segment:
    """The whole segment as one store message."""
    message = pb.Segment(
        checkpoint=checkpoint_to_proto(decode_checkpoint(segment.checkpoint_json)),
        previous_tree_size=segment.previous_tree_size,
        first_seq=segment.first_seq,
        records=list(segment.records),
    )
    message.checkpoint.json = segment.checkpoint_json
    return message


def test_repoint_racing_a_sticky_refusal_keeps_the_clear(tmp_path, state):
    lineage = _replayed(tmp_path, state)
    l0, l1, l2 = lineage.ids
    trusted = lineage.log.trusted
    state.clear_refusal(ORIGIN, take_on_log=l1, reason="mistyped")
    # Another log under the daemon's key, no chain_break: sticky.
    other = segments_of(write_log(tmp_path / "other", 4, key=lineage.log.key).path)
    judged = _judge(state, other[0], trusted)
    assert (judged.kind, judged.frontier.refused) == (
        AlertKind.DUPLICATE_DAEMON,
        "duplicate_daemon",
    )

    state.clear_refusal(ORIGIN, take_on_log=l2, reason=REASON)
    with pytest.raises(FrontierChanged, match="changed since the segment was judged"):
        state.commit(ORIGIN, judged, time=T, evidence=other[0].checkpoint_json)

    frontier = state.frontier(ORIGIN)
    assert (frontier.take_on_log, frontier.refused) == (l2, "")
    assert len(state.alerts(ORIGIN)) == 1  # nothing of the racing commit
    # Judged again against the cleared frontier: refused, the re-point kept.
    assert verdicts(feed(state, other[:1], trusted)) == [DUPLICATE_DAEMON]
    frontier = state.frontier(ORIGIN)
    assert (frontier.take_on_log, frontier.refused) == (l2, "duplicate_daemon")
    state.clear_refusal(ORIGIN)
    assert verdicts(feed(state, lineage.segments[2], trusted)) == [ACCEPTED] * 2
    assert state.frontier(ORIGIN).log_id == l2


def test_repoint_racing_an_accept_keeps_the_clear(tmp_path, state):
    lineage = _replayed(tmp_path, state)
    l0, l1, l2 = lineage.ids
    trusted = lineage.log.trusted
    state.clear_refusal(ORIGIN, take_on_log=l1, reason="first")
    judged = _judge(state, lineage.segments[1][0], trusted)
    assert judged.taken_on is not None and judged.frontier.log_id == l1

    state.clear_refusal(ORIGIN, take_on_log=l2, reason=REASON)
    with pytest.raises(FrontierChanged):
        state.commit(ORIGIN, judged, time=T)

    frontier = state.frontier(ORIGIN)
    assert (frontier.log_id, frontier.take_on_log) == (l0, l2)
    assert state.history(ORIGIN).checkpoint(l1, 1) is None
    # The daemon's L2 is taken on from 0 as the operator said last.
    outcomes = feed(state, lineage.segments[2], trusted)
    assert verdicts(outcomes) == [ACCEPTED] * 2
    assert outcomes[0].taken_on is not None
    assert outcomes[0].taken_on.reason == REASON
    assert state.frontier(ORIGIN).log_id == l2


def test_intake_does_not_acknowledge_a_segment_judged_before_a_clear(tmp_path, state):
    lineage = _replayed(tmp_path, state)
    _, l1, l2 = lineage.ids
    trusted = lineage.log.trusted
    state.clear_refusal(ORIGIN, take_on_log=l1, reason="mistyped")
    intake = Intake(
        state=state,
        archive=open_archive(f"dir://{tmp_path / 'archive'}"),
        registry=DaemonRegistry.exact({ORIGIN: trusted}),
        metrics=CollectorMetrics(),
    )
    commit = state.commit
    raced = []

    def clear_then_commit(*args, **kwargs):
        # The operator re-points the take-on while the collector judges.
        if not raced:
            raced.append(state.clear_refusal(ORIGIN, take_on_log=l2, reason=REASON))
        return commit(*args, **kwargs)

    state.commit = clear_then_commit
    other = segments_of(write_log(tmp_path / "other", 4, key=lineage.log.key).path)
    loop = asyncio.new_event_loop()
    try:
        first = Delivery(ORIGIN, _message(other[0]))
        assert loop.run_until_complete(intake.receive(first)) is None
        assert (first.acked, first.naked) == (0, 1)
        assert state.frontier(ORIGIN).take_on_log == l2

        again = Delivery(ORIGIN, _message(other[0]))
        outcome = loop.run_until_complete(intake.receive(again))
    finally:
        loop.close()
        del state.commit

    assert (again.acked, again.naked) == (1, 0)
    assert outcome.kind == AlertKind.DUPLICATE_DAEMON
    frontier = state.frontier(ORIGIN)
    assert (frontier.take_on_log, frontier.refused) == (l2, "duplicate_daemon")


def test_replays_of_ended_logs_after_a_take_on_never_stick(tmp_path, state):
    lineage = _replayed(tmp_path, state)
    l0, l1, l2 = lineage.ids
    trusted = lineage.log.trusted
    append_sealed(lineage.log, 10, 2, tag="L2 more ")
    l2_segments = segments_of(lineage.log.path)
    assert len(l2_segments) == 3
    alerts_before = len(state.alerts(ORIGIN))
    state.clear_refusal(ORIGIN, take_on_log=l2, reason=REASON)

    got = []
    for segment in (
        l2_segments[0],
        lineage.segments[0][1],  # L0, never accepted
        lineage.segments[1][0],  # L1, never accepted
        l2_segments[1],
        lineage.segments[0][1],  # L0 again
        l2_segments[2],
    ):
        (outcome,) = feed(state, [segment], trusted)
        got.append(outcome)

    assert verdicts(got) == [ACCEPTED, DUPLICATE_DAEMON, DUPLICATE_DAEMON] + [
        ACCEPTED,
        DUPLICATE_DAEMON,
        ACCEPTED,
    ]
    assert not any(o.sticky for o in got)
    assert f"log {l0}, ended by an operator's take-on, while log {l2}" in got[1].message
    assert f"log {l1}, ended by a chain break, while log {l2}" in got[2].message
    frontier = state.frontier(ORIGIN)
    assert (frontier.log_id, frontier.refused) == (l2, "")
    assert frontier.tree_size == l2_segments[2].first_seq + 1
    assert [a.kind for a in state.alerts(ORIGIN)[alerts_before:]] == [
        "duplicate_daemon"
    ] * 3
    with pytest.raises(NotRefused):
        state.clear_refusal(ORIGIN)


def test_two_writers_of_the_current_log_still_stick(tmp_path, state):
    lineage = _replayed(tmp_path, state)
    trusted = lineage.log.trusted
    state.clear_refusal(ORIGIN, take_on_log=lineage.ids[2], reason=REASON)
    feed(state, lineage.segments[2], trusted)
    other = segments_of(write_log(tmp_path / "other", 4, key=lineage.log.key).path)

    (outcome,) = feed(state, other, trusted)

    assert verdicts([outcome]) == [DUPLICATE_DAEMON]
    assert state.frontier(ORIGIN).refused == "duplicate_daemon"
    append_sealed(lineage.log, 10, 2, tag="L2 more ")
    (after,) = feed(state, segments_of(lineage.log.path, 5), trusted)
    assert (after.verdict, after.sticky) == (Verdict.REFUSED, True)


def test_taken_on_log_naming_itself_does_not_end_itself(tmp_path, state):
    lineage = _replayed(tmp_path, state)
    l0 = lineage.ids[0]
    trusted = lineage.log.trusted
    own = write_log(tmp_path / "own", 0, key=lineage.log.key)
    store = AuditStore.open(own.path)
    try:
        own.log_id = store.log_id
        own.append([_chain_break(own.log_id), make_record(2)], store=store, seal=True)
        own.append([make_record(3), make_record(4)], store=store, seal=True)
    finally:
        store.close()
    state.clear_refusal(ORIGIN, take_on_log=own.log_id, reason=REASON)

    outcomes = feed(state, segments_of(own.path), trusted)

    assert verdicts(outcomes) == [ACCEPTED, ACCEPTED]
    assert outcomes[0].taken_on.names == own.log_id
    frontier = state.frontier(ORIGIN)
    assert (frontier.log_id, frontier.tree_size) == (own.log_id, 4)
    assert frontier.previous_logs == [l0]
