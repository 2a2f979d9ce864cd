"""The collector's verifier on real signed logs: every verdict and every
refusal kind, against a real state in tmp_path."""

from __future__ import annotations

import shutil

import msgspec
from audit._evidence import sign
from audit._support import make_record

from kynara_sidecar.audit.checkpoint import decode_checkpoint, encode_checkpoint
from kynara_sidecar.audit.keys import generate_key
from kynara_sidecar.audit.record import (
    RECORD_VERSION,
    AuditRecordV1,
    ChainBreakEntry,
    RecordKind,
)
from kynara_sidecar.audit.rotation import rotation_record
from kynara_sidecar.audit.store import AuditStore
from kynara_sidecar.collector.verifier import (
    AlertKind,
    HeadStep,
    SegmentData,
    Verdict,
    verify_head,
    verify_segment,
)

from ._logs import ORIGIN, append_sealed, restore_copy, segments_of, write_log

T = "2026-12-04T10:00:00Z"


def feed(state, segments, registered, daemon=ORIGIN):
    outcomes = []
    for segment in segments:
        outcome = verify_segment(
            state.frontier(daemon), segment, registered, state.history(daemon)
        )
        state.commit(daemon, outcome, time=T, evidence=segment.checkpoint_json)
        outcomes.append(outcome)
    return outcomes


def verdicts(outcomes):
    return [(o.verdict, o.kind) for o in outcomes]


ACCEPTED = (Verdict.ACCEPTED, None)


def test_accepts_every_segment_of_a_log_in_order(tmp_path, state):
    log = write_log(tmp_path / "log", 12)

    outcomes = feed(state, segments_of(log.path), log.trusted)

    assert verdicts(outcomes) == [ACCEPTED] * 3
    frontier = state.frontier(ORIGIN)
    assert (frontier.log_id, frontier.tree_size) == (log.log_id, 12)
    assert [len(o.nodes) for o in outcomes] == [7, 8, 7]


def test_identical_segment_again_is_a_duplicate(tmp_path, state):
    log = write_log(tmp_path / "log", 12)
    segments = segments_of(log.path)
    feed(state, segments, log.trusted)

    outcomes = feed(state, [segments[1], segments[2]], log.trusted)

    assert verdicts(outcomes) == [(Verdict.DUPLICATE, None)] * 2
    assert state.frontier(ORIGIN).tree_size == 12


def test_segment_after_a_missing_one_is_a_gap(tmp_path, state):
    log = write_log(tmp_path / "log", 12)
    segments = segments_of(log.path)

    outcomes = feed(state, [segments[0], segments[2]], log.trusted)

    assert outcomes[1].kind == AlertKind.GAP
    assert "records 5..8 never arrived" in outcomes[1].message
    assert state.alerts(ORIGIN)[0].kind == "gap"


def test_first_segment_must_start_at_zero(tmp_path, state):
    log = write_log(tmp_path / "log", 8)

    (outcome,) = feed(state, segments_of(log.path, after=4), log.trusted)

    assert outcome.kind == AlertKind.GAP


def test_checkpoint_by_an_unregistered_key_is_a_bad_signature(tmp_path, state):
    log = write_log(tmp_path / "log", 4)
    other = generate_key()

    (outcome,) = feed(state, segments_of(log.path), {other.key_id: other.public()})

    assert outcome.kind == AlertKind.BAD_SIGNATURE
    assert "not among the trusted keys" in outcome.message


def test_tampered_signature_is_a_bad_signature(tmp_path, state):
    log = write_log(tmp_path / "log", 4)
    (segment,) = segments_of(log.path)
    cp = decode_checkpoint(segment.checkpoint_json)
    forged = msgspec.structs.replace(cp, time="2027-01-01T00:00:00Z")

    (outcome,) = feed(
        state,
        [segment._replace(checkpoint_json=encode_checkpoint(forged))],
        log.trusted,
    )

    assert outcome.kind == AlertKind.BAD_SIGNATURE
    assert "signature does not match" in outcome.message


def test_edited_record_is_a_bad_chain(tmp_path, state):
    log = write_log(tmp_path / "log", 4)
    (segment,) = segments_of(log.path)
    records = list(segment.records)
    records[1] = records[1].replace(b"allowed", b"ALLOWED")

    (outcome,) = feed(state, [segment._replace(records=records)], log.trusted)

    assert outcome.kind == AlertKind.BAD_CHAIN
    assert "chained from the accepted chain hash" in outcome.message


def test_missing_record_is_a_bad_chain(tmp_path, state):
    log = write_log(tmp_path / "log", 4)
    (segment,) = segments_of(log.path)

    (outcome,) = feed(
        state, [segment._replace(records=segment.records[:3])], log.trusted
    )

    assert outcome.kind == AlertKind.BAD_CHAIN
    assert "must carry records 1..4" in outcome.message


def test_signed_root_that_the_records_do_not_give_is_a_bad_root(tmp_path, state):
    log = write_log(tmp_path / "log", 4)
    (segment,) = segments_of(log.path)
    cp = decode_checkpoint(segment.checkpoint_json)
    wrong = sign(log.key, 4, bytes(32), bytes.fromhex(cp.chain_hash), log_id=log.log_id)

    (outcome,) = feed(
        state, [segment._replace(checkpoint_json=encode_checkpoint(wrong))], log.trusted
    )

    assert outcome.kind == AlertKind.BAD_ROOT


def test_unregistered_daemon_is_refused_without_state(tmp_path, state):
    log = write_log(tmp_path / "log", 4)

    (outcome,) = feed(state, segments_of(log.path), None)

    assert outcome.kind == AlertKind.UNKNOWN_DAEMON
    assert state.frontier(ORIGIN).refused == ""
    assert [a.kind for a in state.alerts(ORIGIN)] == ["unknown_daemon"]


def test_checkpoint_of_another_origin_is_an_unknown_daemon(tmp_path, state):
    log = write_log(tmp_path / "log", 4)

    (outcome,) = feed(state, segments_of(log.path), log.trusted, daemon="daemon-b")

    assert outcome.kind == AlertKind.UNKNOWN_DAEMON
    assert "origin 'daemon-a'" in outcome.message


def test_restored_copy_with_new_records_is_a_fork(tmp_path, state):
    log = write_log(tmp_path / "log", 8)
    shutil.copytree(log.path, tmp_path / "copy")
    append_sealed(log, 9, 4)
    feed(state, segments_of(log.path), log.trusted)
    restore_copy(tmp_path / "copy", log.path)
    append_sealed(log, 9, 2, tag="rewritten ")

    outcomes = feed(state, segments_of(log.path, after=8), log.trusted)

    assert outcomes[0].kind == AlertKind.FORK
    assert "records diverge" in outcomes[0].message
    assert state.frontier(ORIGIN).refused == "fork"
    assert state.frontier(ORIGIN).tree_size == 12


def test_restored_copy_grown_past_the_accepted_size_is_a_fork(tmp_path, state):
    log = write_log(tmp_path / "log", 8)
    shutil.copytree(log.path, tmp_path / "copy")
    append_sealed(log, 9, 4)
    feed(state, segments_of(log.path), log.trusted)
    restore_copy(tmp_path / "copy", log.path)
    append_sealed(log, 9, 6, tag="rewritten ")

    (outcome,) = feed(state, segments_of(log.path, after=8), log.trusted)

    assert outcome.kind == AlertKind.FORK
    assert "its records 1..12 differ" in outcome.message


def test_other_checkpoint_at_an_accepted_size_is_a_fork(tmp_path, state):
    log = write_log(tmp_path / "log", 8)
    segments = segments_of(log.path)
    feed(state, segments, log.trusted)
    resigned = _resign(log, decode_checkpoint(segments[1].checkpoint_json))

    (outcome,) = feed(
        state,
        [segments[1]._replace(checkpoint_json=encode_checkpoint(resigned))],
        log.trusted,
    )

    assert outcome.kind == AlertKind.FORK
    assert "different checkpoint at tree size 8" in outcome.message


def _resign(log, cp):
    """The same tree, signed again at another time."""
    from kynara_sidecar.audit.checkpoint import sign_checkpoint
    from kynara_sidecar.decision import Timestamp

    return sign_checkpoint(
        kind=cp.kind,
        origin=cp.origin,
        log_id=cp.log_id,
        tree_size=cp.tree_size,
        root=bytes.fromhex(cp.root),
        chain_hash=bytes.fromhex(cp.chain_hash),
        time=Timestamp.from_nanos(1_900_000_000 * 10**9),
        key=log.key,
    )


def test_new_checkpoint_below_the_accepted_size_is_a_rollback(tmp_path, state):
    log = write_log(tmp_path / "log", 8)
    segments = segments_of(log.path)
    feed(state, segments, log.trusted)
    store = AuditStore.open(log.path, readonly=True)
    try:
        cp = sign(
            log.key, 6, store.merkle_root(6), store.get(6).chain_hash,
            log_id=log.log_id,
        )  # fmt: skip
    finally:
        store.close()
    second = segments[1]
    rewound = SegmentData(encode_checkpoint(cp), 4, 5, second.records[:2])

    (outcome,) = feed(state, [rewound], log.trusted)

    assert outcome.kind == AlertKind.ROLLBACK


def test_second_log_under_one_daemon_id_is_a_duplicate_daemon(tmp_path, state):
    first = write_log(tmp_path / "one", 4)
    second = write_log(tmp_path / "two", 4, key=first.key)
    feed(state, segments_of(first.path), first.trusted)

    (outcome,) = feed(state, segments_of(second.path), first.trusted)

    assert outcome.kind == AlertKind.DUPLICATE_DAEMON
    assert "two daemons write under one daemon id" in outcome.message


def test_new_chain_naming_the_accepted_log_is_accepted(tmp_path, state):
    first = write_log(tmp_path / "one", 4)
    feed(state, segments_of(first.path), first.trusted)
    second = write_log(tmp_path / "two", 0, key=first.key)
    store = AuditStore.open(second.path)
    try:
        second.log_id = store.log_id
        second.append(
            [_chain_break(first.log_id), make_record(2)], store=store, seal=True
        )
    finally:
        store.close()

    (outcome,) = feed(state, segments_of(second.path), first.trusted)

    assert outcome.verdict == Verdict.ACCEPTED
    frontier = state.frontier(ORIGIN)
    assert (frontier.log_id, frontier.previous_logs) == (second.log_id, [first.log_id])


def _chain_break(previous: str) -> AuditRecordV1:
    return AuditRecordV1(
        v=RECORD_VERSION,
        kind=RecordKind.CHAIN_BREAK,
        time=T,
        daemon_id=ORIGIN,
        chain_break=ChainBreakEntry(previous_log_id=previous, problem="forced"),
    )


def test_refusal_is_sticky_for_the_daemons_later_segments(tmp_path, state):
    log = write_log(tmp_path / "log", 12)
    segments = segments_of(log.path)

    outcomes = feed(state, [segments[0], segments[2], segments[1]], log.trusted)

    assert verdicts(outcomes)[1:] == [
        (Verdict.REFUSED, AlertKind.GAP),
        (Verdict.REFUSED, AlertKind.GAP),
    ]
    assert outcomes[2].sticky
    assert len(state.alerts(ORIGIN)) == 1


def test_rotated_key_is_trusted_from_its_rotation_on(tmp_path, state):
    log = write_log(tmp_path / "log", 4)
    new_key = generate_key()
    store = AuditStore.open(log.path)
    try:
        rotation = rotation_record(
            log.key, new_key.public(), origin=ORIGIN, log_id=log.log_id, time=T
        )
        log.append([rotation, make_record(6)], store=store, seal=True, key=new_key)
        log.append([make_record(7)], store=store, seal=True, key=new_key)
    finally:
        store.close()

    outcomes = feed(state, segments_of(log.path), log.trusted)

    assert verdicts(outcomes) == [ACCEPTED] * 3
    assert set(state.frontier(ORIGIN).rotated_keys) == {new_key.key_id}


def test_rotation_signed_by_an_unknown_key_is_a_bad_signature(tmp_path, state):
    log = write_log(tmp_path / "log", 4)
    stranger, new_key = generate_key(), generate_key()
    store = AuditStore.open(log.path)
    try:
        rotation = rotation_record(
            stranger, new_key.public(), origin=ORIGIN, log_id=log.log_id, time=T
        )
        log.append([rotation], store=store, seal=True, key=new_key)
    finally:
        store.close()

    outcomes = feed(state, segments_of(log.path), log.trusted)

    assert outcomes[1].kind == AlertKind.BAD_SIGNATURE
    assert "untrusted key" in outcomes[1].message


# ----------------------------------------------------------------- heads


def _head(path):
    store = AuditStore.open(path, readonly=True)
    try:
        return encode_checkpoint(store.latest_checkpoint())
    finally:
        store.close()


def test_head_at_the_accepted_checkpoint_is_current(tmp_path, state):
    log = write_log(tmp_path / "log", 8)
    feed(state, segments_of(log.path), log.trusted)
    head = _head(log.path)

    verdict = verify_head(
        state.frontier(ORIGIN), head, log.trusted, state.history(ORIGIN)
    )

    assert verdict.step == HeadStep.CURRENT


def test_head_ahead_with_a_valid_consistency_proof_is_pulled(tmp_path, state):
    log = write_log(tmp_path / "log", 8)
    feed(state, segments_of(log.path), log.trusted)
    append_sealed(log, 9, 4)
    store = AuditStore.open(log.path, readonly=True)
    try:
        head = encode_checkpoint(store.latest_checkpoint())
        proof = (encode_checkpoint(store.checkpoint(8)), store.consistency_proof(8, 12))
    finally:
        store.close()

    verdict = verify_head(
        state.frontier(ORIGIN), head, log.trusted, state.history(ORIGIN), proof
    )

    assert (verdict.step, verdict.after_tree_size) == (HeadStep.PULL, 8)


def test_head_ahead_of_a_forked_history_fails_its_proof(tmp_path, state):
    log = write_log(tmp_path / "log", 4)
    shutil.copytree(log.path, tmp_path / "copy")
    append_sealed(log, 5, 4)
    feed(state, segments_of(log.path), log.trusted)
    restore_copy(tmp_path / "copy", log.path)
    append_sealed(log, 5, 2, tag="other ")
    append_sealed(log, 7, 6, tag="other ")
    store = AuditStore.open(log.path, readonly=True)
    try:
        head = encode_checkpoint(store.latest_checkpoint())
        proof = (encode_checkpoint(store.checkpoint(6)), store.consistency_proof(6, 12))
    finally:
        store.close()

    verdict = verify_head(
        state.frontier(ORIGIN), head, log.trusted, state.history(ORIGIN), proof
    )

    assert verdict.step == HeadStep.REFUSED
    assert verdict.outcome.kind == AlertKind.FORK


def test_head_below_the_accepted_size_is_a_rollback(tmp_path, state):
    log = write_log(tmp_path / "log", 8)
    shutil.copytree(log.path, tmp_path / "copy")
    append_sealed(log, 9, 4)
    feed(state, segments_of(log.path), log.trusted)
    restore_copy(tmp_path / "copy", log.path)
    head = _head(log.path)

    verdict = verify_head(
        state.frontier(ORIGIN), head, log.trusted, state.history(ORIGIN)
    )

    assert verdict.step == HeadStep.REFUSED
    assert verdict.outcome.kind == AlertKind.ROLLBACK
