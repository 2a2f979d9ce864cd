"""The intake against someone who can write to the central store but holds
no daemon key: every message they send is refused or recognised, logged
and counted, acknowledged (never sent round again), and never stops the
daemon's own segments from being accepted. Real signed logs, a real state
and archive in tmp_path; the messages are settled as a store's delivery
would be."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil

import pytest
from kynara.v1 import audit_pb2 as pb

from kynara_sidecar.audit.checkpoint import (
    decode_checkpoint,
    encode_checkpoint,
    signed_bytes,
)
from kynara_sidecar.audit.keys import encode_base64url
from kynara_sidecar.collector import intake as intake_module
from kynara_sidecar.collector.archive import open_archive, segment_key
from kynara_sidecar.collector.http import records_for
from kynara_sidecar.collector.intake import MAX_MESSAGE_BYTES, Intake
from kynara_sidecar.collector.metrics import CollectorMetrics
from kynara_sidecar.collector.query import ArchiveUnverified
from kynara_sidecar.collector.registry import DaemonRegistry
from kynara_sidecar.collector.state import (
    MAX_ALERTS_KEPT,
    MAX_EVIDENCE_BYTES,
    CollectorState,
)
from kynara_sidecar.collector.verifier import AlertKind, Verdict

from ._logs import ORIGIN, append_sealed, messages_of, restore_copy, write_log

# Small messages, so each segment of these logs comes in several.
CHUNK_BYTES = 600


class Delivery:
    """One message as a store hands it over; counts how it was settled."""

    def __init__(self, daemon_id: str, data: bytes | pb.Segment):
        self.daemon_id = daemon_id
        self.data = data if isinstance(data, bytes) else data.SerializeToString()
        self.acked = 0
        self.naked = 0

    async def ack(self) -> None:
        self.acked += 1

    async def nak(self) -> None:
        self.naked += 1


class Setup:
    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.log = write_log(tmp_path / "log", 12, segment=4)
        self.state = CollectorState.open(tmp_path / "state", map_size=1 << 26)
        self.archive = open_archive(f"dir://{tmp_path / 'archive'}")
        self.metrics = CollectorMetrics()
        self.registry = DaemonRegistry.exact({ORIGIN: self.log.trusted})
        self.intake = Intake(
            state=self.state,
            archive=self.archive,
            registry=self.registry,
            metrics=self.metrics,
        )
        self.loop = asyncio.new_event_loop()

    def send(self, data, daemon_id: str = ORIGIN) -> tuple[Delivery, object]:
        delivery = Delivery(daemon_id, data)
        outcome = self.loop.run_until_complete(self.intake.receive(delivery))
        return delivery, outcome

    def send_all(self, messages) -> list:
        return [self.send(m)[1] for m in messages]

    def messages(self, after: int = 0) -> list[pb.Segment]:
        return messages_of(self.log.path, after, CHUNK_BYTES)

    def of_segment(self, tree_size: int) -> list[pb.Segment]:
        return [m for m in self.messages() if m.checkpoint.tree_size == tree_size]

    def metric(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return value or 0.0

    def close(self) -> None:
        self.loop.close()
        self.state.close()


@pytest.fixture
def setup(tmp_path):
    opened = Setup(tmp_path)
    yield opened
    opened.close()


def _with_checkpoint(message: pb.Segment, **fields) -> pb.Segment:
    """The message with its checkpoint JSON edited (no longer signed)."""
    edited = pb.Segment()
    edited.CopyFrom(message)
    cp = json.loads(message.checkpoint.json)
    cp.update(fields)
    edited.checkpoint.json = json.dumps(
        cp, sort_keys=True, separators=(",", ":")
    ).encode()
    return edited


def _assert_collects_on(setup: Setup) -> None:
    """The daemon's own segments are all accepted after the attack."""
    setup.send_all(setup.messages())

    frontier = setup.state.frontier(ORIGIN)
    assert (frontier.tree_size, frontier.refused) == (12, "")
    assert setup.metric("kynara_collector_failures_total", what="archive_or_state") == 0


# --------------------------------------------------------- F2, F3: poison


def _resigned(setup: Setup, message: pb.Segment, **fields) -> pb.Segment:
    """The message with checkpoint fields changed and signed again with
    the daemon's own key (what only the daemon could send)."""
    cp = decode_checkpoint(message.checkpoint.json)
    import msgspec

    cp = msgspec.structs.replace(cp, **fields)
    signature = encode_base64url(setup.log.key.sign(signed_bytes(cp)))
    cp = msgspec.structs.replace(cp, signature=signature)
    edited = pb.Segment()
    edited.CopyFrom(message)
    edited.checkpoint.json = encode_checkpoint(cp)
    return edited


@pytest.mark.parametrize(
    ("fields", "kind"),
    [
        ({"tree_size": -1}, AlertKind.BAD_SIGNATURE),
        ({"tree_size": 2**64}, AlertKind.BAD_SIGNATURE),
        ({"log_id": "a" * 600}, AlertKind.BAD_SIGNATURE),
        ({"tree_size": None}, AlertKind.BAD_SIGNATURE),
        ({"origin": "someone-else"}, AlertKind.BAD_SIGNATURE),
    ],
    ids=["negative-size", "size-past-64-bits", "long-log-id", "null-size", "origin"],
)
def test_poison_checkpoint_is_refused_once_and_acknowledged(setup, fields, kind):
    poison = _with_checkpoint(setup.messages()[0], **fields)

    delivery, outcome = setup.send(poison)

    assert (outcome.verdict, outcome.kind) == (Verdict.REFUSED, kind)
    assert (delivery.acked, delivery.naked) == (1, 0)
    assert [a.kind for a in setup.state.alerts(ORIGIN)] == [str(kind)]
    assert setup.state.held(ORIGIN) is None
    _assert_collects_on(setup)


def test_signed_checkpoint_past_the_largest_tree_size_is_malformed(setup):
    poison = _resigned(setup, setup.messages()[0], tree_size=2**64)

    delivery, outcome = setup.send(poison)

    assert outcome.kind == AlertKind.MALFORMED
    assert (delivery.acked, delivery.naked) == (1, 0)
    _assert_collects_on(setup)


def test_message_whose_sizes_do_not_fit_its_checkpoint_is_malformed(setup):
    stray = pb.Segment()
    stray.CopyFrom(setup.messages()[0])
    stray.checkpoint.log_id = "b" * 600  # the parsed field is never used
    stray.first_seq = 3

    delivery, outcome = setup.send(stray)

    assert outcome.kind == AlertKind.MALFORMED
    assert delivery.acked == 1
    _assert_collects_on(setup)


def test_message_that_is_no_segment_is_refused_without_stopping_the_daemon(setup):
    delivery, outcome = setup.send(b"\xff\xff not protobuf")

    assert outcome.kind == AlertKind.MALFORMED
    assert setup.state.frontier(ORIGIN).refused == ""
    assert delivery.acked == 1
    _assert_collects_on(setup)


def test_message_larger_than_the_cap_is_refused_unread(setup):
    huge = pb.Segment()
    huge.CopyFrom(setup.messages()[0])
    huge.records.append(b"z" * MAX_MESSAGE_BYTES)

    delivery, outcome = setup.send(huge)

    assert outcome.kind == AlertKind.MALFORMED
    assert f"at most {MAX_MESSAGE_BYTES}" in outcome.message
    assert setup.state.held(ORIGIN) is None
    assert delivery.acked == 1
    _assert_collects_on(setup)


# ------------------------------------------------- F2, F4: unregistered ids


@pytest.mark.parametrize("daemon_id", ["x" * 400, "ghost", "é" * 300, ""])
def test_unregistered_sender_is_counted_and_leaves_no_state(setup, daemon_id):
    message = setup.messages()[0]

    delivery, outcome = setup.send(message, daemon_id=daemon_id)

    assert (outcome.verdict, outcome.kind) == (
        Verdict.REFUSED,
        AlertKind.UNKNOWN_DAEMON,
    )
    assert delivery.acked == 1
    assert setup.state.alerted_daemons() == []
    assert setup.state.frontiers() == {}
    assert (
        setup.metric(
            "kynara_collector_alerts_total",
            daemon="unregistered",
            kind="unknown_daemon",
        )
        == 1
    )


def test_partial_segments_of_unregistered_ids_are_not_held(setup):
    first = setup.of_segment(4)[0]
    for n in range(50):
        setup.send(first, daemon_id=f"ghost-{n}")

    assert all(setup.state.held(f"ghost-{n}") is None for n in range(50))
    assert setup.state.alerted_daemons() == []


def test_partial_segment_with_an_unsigned_checkpoint_is_not_held(setup):
    first = _with_checkpoint(setup.of_segment(4)[0], tree_size=1000)

    delivery, outcome = setup.send(first)

    assert outcome.kind == AlertKind.BAD_SIGNATURE
    assert setup.state.held(ORIGIN) is None
    assert delivery.acked == 1


def test_alerts_per_daemon_are_bounded_and_their_evidence_cut(setup):
    junk = _with_checkpoint(setup.messages()[0], log_id="L" * 20_000)
    sent = MAX_ALERTS_KEPT + 7

    for _ in range(sent):
        setup.send(junk)

    alerts = setup.state.alerts(ORIGIN)
    assert len(alerts) == MAX_ALERTS_KEPT
    assert setup.state.alert_total(ORIGIN) == sent
    assert all(len(a.checkpoint.encode()) <= MAX_EVIDENCE_BYTES for a in alerts)
    assert (
        setup.metric(
            "kynara_collector_alerts_total", daemon=ORIGIN, kind="bad_signature"
        )
        == sent
    )
    _assert_collects_on(setup)


# ------------------------------------------------ F5, F9: replays, resends


def test_replayed_accepted_message_leaves_the_assembly_alone(setup):
    first_segment, second = setup.of_segment(4), setup.of_segment(8)
    assert len(second) > 1, "the test needs a segment in several messages"
    setup.send_all(first_segment)
    setup.send(second[0])

    delivery, outcome = setup.send(first_segment[0])

    assert outcome.verdict == Verdict.DUPLICATE
    assert delivery.acked == 1
    assert setup.state.held(ORIGIN).tree_size == 8
    setup.send_all(second[1:] + setup.of_segment(12))
    frontier = setup.state.frontier(ORIGIN)
    assert (frontier.tree_size, frontier.refused) == (12, "")
    assert setup.state.alerts(ORIGIN) == []
    assert setup.metric("kynara_collector_failures_total", what="stray_message") == 0


def test_older_signed_message_that_was_never_accepted_is_a_stray(setup):
    # A segment start the daemon signed but the collector never took, sent
    # while a newer segment is assembled: it may not replace the assembly.
    first_segment, second = setup.of_segment(4), setup.of_segment(8)
    setup.send_all(first_segment)
    setup.send(second[0])
    older = _resigned(setup, first_segment[0], root="ab" * 32)

    delivery, _ = setup.send(older)

    assert delivery.acked == 1
    assert setup.state.held(ORIGIN).tree_size == 8
    setup.send_all(second[1:])
    assert setup.state.frontier(ORIGIN).tree_size == 8


def test_middle_message_of_an_accepted_segment_again_is_a_duplicate(setup, caplog):
    segment = setup.of_segment(4)
    assert len(segment) > 1
    setup.send_all(segment)

    with caplog.at_level(logging.ERROR, logger="kynara.collector"):
        delivery, outcome = setup.send(segment[1])

    assert outcome.verdict == Verdict.DUPLICATE
    assert delivery.acked == 1
    assert caplog.records == []
    assert setup.metric("kynara_collector_failures_total", what="stray_message") == 0


def test_message_delivered_again_during_assembly_is_not_a_stray(setup):
    # One record a message: four messages.
    segment = [
        m for m in messages_of(setup.log.path, 0, 1) if m.checkpoint.tree_size == 4
    ]
    assert len(segment) == 4
    setup.send_all(segment[:2])

    delivery, outcome = setup.send(segment[1])

    assert (outcome, delivery.acked) == (None, 1)
    setup.send_all(segment[2:])
    assert setup.state.frontier(ORIGIN).tree_size == 4
    assert setup.metric("kynara_collector_failures_total", what="stray_message") == 0


# ----------------------------------------------------- F8: tampered resend


def test_accepted_segment_resent_with_a_tampered_record_is_alerted(setup):
    segment = setup.of_segment(4)
    setup.send_all(segment)
    tampered = pb.Segment()
    tampered.CopyFrom(segment[0])
    tampered.records[0] = tampered.records[0].replace(b"rule", b"ruse")

    delivery, outcome = setup.send(tampered)

    assert (outcome.verdict, outcome.kind) == (
        Verdict.REFUSED,
        AlertKind.TAMPERED_DUPLICATE,
    )
    assert delivery.acked == 1
    assert (
        setup.metric(
            "kynara_collector_segments_total", daemon=ORIGIN, outcome="duplicate"
        )
        == 0
    )
    assert [a.kind for a in setup.state.alerts(ORIGIN)] == ["tampered_duplicate"]
    _assert_collects_on(setup)


# ------------------------------------------ F1: one message trips the intake


def test_unexpected_error_on_one_message_is_logged_counted_and_acked(
    setup, monkeypatch, caplog
):
    calls = []
    real = intake_module.verify_segment

    def failing_once(*args):
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("a bug the message tripped")
        return real(*args)

    monkeypatch.setattr(intake_module, "verify_segment", failing_once)
    whole = messages_of(setup.log.path)  # one message a segment

    with caplog.at_level(logging.ERROR, logger="kynara.collector"):
        delivery, outcome = setup.send(whole[0])

    assert (outcome, delivery.acked, delivery.naked) == (None, 1, 0)
    assert setup.metric("kynara_collector_failures_total", what="message") == 1
    assert "a bug the message tripped" in caplog.text
    assert setup.state.held(ORIGIN) is None
    setup.send_all(whole)
    assert setup.state.frontier(ORIGIN).tree_size == 12


# ---------------------------------------------- F7: the archive is checked


def test_archived_segment_swapped_for_a_refused_fork_is_not_served(setup):
    tmp_path, log = setup.tmp_path, setup.log
    shutil.copytree(log.path, tmp_path / "copy")
    append_sealed(log, 13, 4)
    setup.send_all(messages_of(log.path))
    restore_copy(tmp_path / "copy", log.path)
    append_sealed(log, 13, 4, tag="rewritten ")
    fork = messages_of(log.path, 12)[0].SerializeToString()
    setup.send(fork)
    frontier = setup.state.frontier(ORIGIN)
    assert (frontier.tree_size, frontier.refused) == (16, "fork")

    # Signed by the daemon but refused: someone who can write the archive
    # puts it past the accepted history, then over the accepted segment.
    setup.archive.put(segment_key(ORIGIN, frontier.log_id, 20), fork)
    passed_over = records_for(setup.state, setup.archive, setup.registry, ORIGIN, 1, 20)
    setup.archive.put(segment_key(ORIGIN, frontier.log_id, 16), fork)

    assert [json.loads(r)["seq"] for r in passed_over] == list(range(1, 17))
    with pytest.raises(ArchiveUnverified, match="accepted at its tree size"):
        records_for(setup.state, setup.archive, setup.registry, ORIGIN, 13, 16)


# ------------------------------------- what the screen must still let through


def test_rotation_in_a_later_message_of_its_segment_is_accepted(setup):
    from audit._support import make_record

    from kynara_sidecar.audit.keys import generate_key
    from kynara_sidecar.audit.rotation import rotation_record
    from kynara_sidecar.audit.store import AuditStore

    log, new_key = setup.log, generate_key()
    store = AuditStore.open(log.path)
    try:
        rotation = rotation_record(
            log.key,
            new_key.public(),
            origin=ORIGIN,
            log_id=log.log_id,
            time="2026-12-04T10:00:00Z",
        )
        records = [make_record(13), rotation, make_record(15)]
        log.append(records, store=store, seal=True, key=new_key)
    finally:
        store.close()
    # One record a message: the first, signed by the new key, comes before
    # the rotation that introduces it.
    messages = messages_of(log.path, 0, 1)
    assert messages[-3].first_seq == 13

    outcomes = setup.send_all(messages)

    assert outcomes[-1].verdict == Verdict.ACCEPTED
    frontier = setup.state.frontier(ORIGIN)
    assert (frontier.tree_size, frontier.refused) == (15, "")
    assert set(frontier.rotated_keys) == {new_key.key_id}


def test_signed_refusal_stays_sticky_and_junk_after_it_only_alerts(setup):
    first, third = setup.of_segment(4), setup.of_segment(12)
    setup.send_all(first + third)  # the segment at 8 never came: a gap
    assert setup.state.frontier(ORIGIN).refused == "gap"

    _, later = setup.send(setup.of_segment(8)[0])
    _, junk = setup.send(b"junk")

    assert later.sticky and later.kind == AlertKind.GAP
    assert (junk.kind, junk.sticky) == (AlertKind.MALFORMED, False)
    assert setup.state.frontier(ORIGIN).refused == "gap"
