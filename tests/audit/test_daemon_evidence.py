"""The daemon's evidence wiring: key rotation, the tail check at start, and
a new chain after a break, with a real daemon on a real log."""

from __future__ import annotations

import shutil

import grpc
import lmdb
import msgspec
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import small_refund

from kynara_sidecar.audit.chain import decode_record
from kynara_sidecar.audit.checkpoint import CheckpointKind, sign_checkpoint
from kynara_sidecar.audit.keys import generate_key, load_public_key, save_signing_key
from kynara_sidecar.audit.newchain import start_new_chain
from kynara_sidecar.audit.record import RecordKind
from kynara_sidecar.audit.startup import load_audit_keys
from kynara_sidecar.audit.store import AuditStore
from kynara_sidecar.audit.verify import verify_log
from kynara_sidecar.audit.witness import Witness
from kynara_sidecar.decision import Timestamp
from kynara_sidecar.errors import AuditUnavailable

SEGMENTS = "audit.segment_records=3"


def _decide(running, count):
    stub = running.stub()
    return [stub.Decide(small_refund()) for _ in range(count)]


def _health(running) -> int:
    with grpc.insecure_channel(running.target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    return reply.status


def _records(path):
    store = AuditStore.open(path, readonly=True)
    try:
        return [decode_record(r.record_bytes) for r in store.iter_records()]
    finally:
        store.close()


def test_a_rotated_key_is_vouched_for_by_the_old_one(start_daemon, tmp_path):
    first = start_daemon(SEGMENTS)
    _decide(first, 4)
    first.stop()
    old_pub = tmp_path / "keys" / "audit.pub"
    new_key = tmp_path / "keys" / "new.pem"
    save_signing_key(generate_key(), new_key)

    second = start_daemon(
        SEGMENTS,
        f"audit.signing_key={new_key}",
        f"audit.previous_signing_key={tmp_path / 'keys' / 'audit.pem'}",
        "audit.create_signing_key=false",
    )
    _decide(second, 4)
    second.stop()
    records = _records(tmp_path / "audit")
    rotations = [r for r in records if r.kind == RecordKind.KEY_ROTATION]
    old = load_public_key(old_pub)

    assert len(rotations) == 1
    assert rotations[0].key_rotation.old_key_id == old.key_id
    # Only the old public key is configured: the rotation extends the trust.
    report = verify_log(
        tmp_path / "audit", {old.key_id: old}, witness_root=tmp_path / "witness"
    )
    assert report.ok, report


def _new_chain(config, **options):
    """``kynara-sidecar new-chain`` on a daemon's config, as an operator runs it."""
    return start_new_chain(
        config.audit.path,
        load_audit_keys(config.audit),
        origin=config.identity.daemon_id,
        witness_root=config.audit.witness_path,
        now_nanos=1_796_374_800 * 10**9,
        **options,
    )


def _refused(running) -> tuple[int, str]:
    """The health status and the refusal of a Decide on a daemon that is up."""
    with pytest.raises(grpc.RpcError) as refused:
        running.stub().Decide(small_refund())
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    return _health(running), refused.value.details()


def test_a_key_that_is_not_the_logs_is_not_served(start_daemon, tmp_path):
    start_daemon(SEGMENTS).stop()
    other = tmp_path / "other.pem"
    save_signing_key(generate_key(), other)

    status, details = _refused(start_daemon(SEGMENTS, f"audit.signing_key={other}"))

    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert "audit.previous_signing_key" in details
    assert "re-signed by someone else" in details


def test_a_changed_last_record_after_a_clean_stop_is_not_served(start_daemon, tmp_path):
    first = start_daemon(SEGMENTS)
    _decide(first, 5)
    first.stop()
    env = lmdb.open(str(tmp_path / "audit"), max_dbs=16)
    records = env.open_db(b"records")
    with env.begin(write=True) as txn:
        cursor = txn.cursor(db=records)
        cursor.last()
        key, data = cursor.key(), bytearray(cursor.value())
        data[data.index(b'"stop"') + 1] ^= 0x01
        txn.put(key, bytes(data), db=records)
    env.close()

    status, details = _refused(start_daemon(SEGMENTS))

    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert "edited" in details


def test_a_deleted_log_is_not_silently_replaced(start_daemon, tmp_path):
    first = start_daemon(SEGMENTS)
    _decide(first, 4)
    first.stop()
    old = AuditStore.open(tmp_path / "audit", readonly=True)
    old_id = old.log_id
    old.close()
    shutil.rmtree(tmp_path / "audit")

    broken = start_daemon(SEGMENTS)
    status, details = _refused(broken)
    broken.stop()

    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert old_id in details and "deleted or replaced" in details
    keys = load_audit_keys(broken.config.audit)
    report = verify_log(
        tmp_path / "audit",
        keys.trusted,
        tmp_path / "witness",
        origin=broken.config.identity.daemon_id,
    )
    assert (report.problem.subject, report.problem.kind) == ("log", "missing")

    config = broken.config
    done = _new_chain(config)
    restarted = start_daemon(SEGMENTS)
    _decide(restarted, 1)
    restarted.stop()
    first_record = _records(tmp_path / "audit")[0]

    assert done.old_log_id == old_id
    assert first_record.kind == RecordKind.CHAIN_BREAK
    assert first_record.chain_break.previous_log_id == old_id
    assert first_record.chain_break.problem == "missing"
    assert first_record.chain_break.last_good_seq > 4


def test_new_chain_with_no_log_and_nothing_witnessed_creates_nothing(
    start_daemon, tmp_path
):
    config = start_daemon(SEGMENTS).config
    missing = tmp_path / "never"

    with pytest.raises(AuditUnavailable, match="no break to record"):
        start_new_chain(
            missing,
            load_audit_keys(config.audit),
            origin="someone-else",
            witness_root=config.audit.witness_path,
            now_nanos=1_796_374_800 * 10**9,
        )
    assert not missing.exists()


def _cut_tail(path, keep: int) -> None:
    """Delete records after ``keep`` with their checkpoints, rewrite the head."""
    env = lmdb.open(str(path), max_dbs=16)
    names = (b"records", b"chain", b"meta", b"checkpoints")
    dbs = {name: env.open_db(name) for name in names}
    with env.begin(write=True) as txn:
        last = bytes(txn.get(keep.to_bytes(8, "big"), db=dbs[b"chain"]))
        for db in (b"records", b"chain", b"checkpoints"):
            cursor = txn.cursor(db=dbs[db])
            if cursor.set_range((keep + 1).to_bytes(8, "big")):
                while cursor.delete():
                    pass
        txn.put(b"head", keep.to_bytes(8, "big") + last, db=dbs[b"meta"])
        txn.delete(b"head_checkpoint", db=dbs[b"meta"])
    env.close()


def test_a_cut_tail_stops_appends_until_a_new_chain_names_the_break(
    start_daemon, tmp_path
):
    first = start_daemon(SEGMENTS)
    _decide(first, 7)
    first.stop()
    _cut_tail(tmp_path / "audit", keep=3)

    broken = start_daemon(SEGMENTS)
    with pytest.raises(grpc.RpcError) as refused:
        broken.stub().Decide(small_refund())
    status = _health(broken)
    broken.stop()

    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "truncated_tail" in refused.value.details()
    assert "new-chain" in refused.value.details()
    assert len(_records(tmp_path / "audit")) == 3

    config = broken.config
    done = _new_chain(config)
    restarted = start_daemon(SEGMENTS)
    answered = _decide(restarted, 2)
    restarted.stop()
    records = _records(tmp_path / "audit")

    assert answered[-1].audit_sequence > 1
    assert records[0].kind == RecordKind.CHAIN_BREAK
    assert records[0].chain_break.previous_log_id == done.old_log_id
    assert records[0].chain_break.problem == "truncated_tail"
    assert records[0].chain_break.last_good_seq == 3
    assert (done.kept_at / "data.mdb").exists()
    keys = load_audit_keys(config.audit)
    report = verify_log(tmp_path / "audit", keys.trusted, tmp_path / "witness")
    assert report.ok, report


def test_new_chain_refuses_a_log_that_verifies(start_daemon, tmp_path):
    running = start_daemon(SEGMENTS)
    _decide(running, 2)
    running.stop()
    config = running.config

    with pytest.raises(AuditUnavailable, match="no break to record"):
        _new_chain(config)


def test_a_new_daemon_id_does_not_hide_a_cut_tail(start_daemon, tmp_path):
    first = start_daemon(SEGMENTS)
    _decide(first, 7)
    first.stop()
    _cut_tail(tmp_path / "audit", keep=3)

    renamed = start_daemon(SEGMENTS, "identity.daemon_id=support-bot@elsewhere")
    status, details = _refused(renamed)

    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert "truncated_tail" in details


def test_a_log_replaced_by_another_with_records_is_not_served(start_daemon, tmp_path):
    first = start_daemon(SEGMENTS)
    _decide(first, 4)
    first.stop()
    # Another daemon's log, with records but no checkpoints, put in its place.
    stranger = start_daemon(
        SEGMENTS, "audit.witness_path=", f"audit.path={tmp_path / 'other'}"
    )
    _decide(stranger, 2)
    stranger.daemon._writer._sealing = None  # as if killed before any seal
    stranger.stop()
    shutil.rmtree(tmp_path / "audit")
    (tmp_path / "other").rename(tmp_path / "audit")

    status, details = _refused(start_daemon(SEGMENTS))

    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert "does not begin with a chain_break naming it" in details


def test_new_chain_force_does_not_walk_the_old_log(start_daemon, tmp_path):
    running = start_daemon(SEGMENTS)
    _decide(running, 2)
    running.stop()
    config = running.config

    done = _new_chain(config, force=True)
    first = _records(tmp_path / "audit")[0]

    assert "not verified" in done.problem
    assert first.chain_break.problem == "forced"
    assert first.chain_break.previous_log_id == done.old_log_id


# ------------------------------------------- the start marker, sealed alone


def _sealed_sizes(path) -> set[int]:
    store = AuditStore.open(path, readonly=True)
    try:
        return {cp.tree_size for cp in store.iter_checkpoints()}
    finally:
        store.close()


@pytest.mark.parametrize("rotate", [False, True], ids=["same-key", "rotated"])
def test_each_start_marker_is_sealed_and_stop_start_cycles_verify(
    start_daemon, tmp_path, rotate
):
    keys = tmp_path / "keys"
    first = start_daemon(SEGMENTS)
    _decide(first, 4)
    first.stop()
    options = []
    if rotate:
        save_signing_key(generate_key(), keys / "new.pem")
        options = [
            f"audit.signing_key={keys / 'new.pem'}",
            f"audit.previous_signing_key={keys / 'audit.pem'}",
            "audit.create_signing_key=false",
        ]
    second = start_daemon(SEGMENTS, *options)
    _decide(second, 2)
    second.stop()

    records = _records(tmp_path / "audit")
    starts = [
        r.seq
        for r in records
        if r.kind == RecordKind.MARKER and r.marker.event == "start"
    ]
    old = load_public_key(keys / "audit.pub")
    report = verify_log(
        tmp_path / "audit", {old.key_id: old}, witness_root=tmp_path / "witness"
    )

    assert len(starts) == 2
    assert set(starts) <= _sealed_sizes(tmp_path / "audit")
    assert records[starts[1] - 2].kind == (
        RecordKind.KEY_ROTATION if rotate else RecordKind.MARKER
    )
    assert report.ok, report
    third = start_daemon(SEGMENTS, *options)
    assert _health(third) == health_pb2.HealthCheckResponse.SERVING


def test_a_start_marker_forged_after_a_clean_stop_is_not_served(start_daemon, tmp_path):
    # The breaker's attack: write access to the LMDB file, no key. A copy
    # of the daemon's start marker and an allow appended after the signed
    # head, with the chain, nodes, decisions index and head consistent.
    first = start_daemon(SEGMENTS)
    _decide(first, 2)
    first.stop()
    records = _records(tmp_path / "audit")
    marker = next(r for r in records if r.kind == RecordKind.MARKER)
    decision = next(r for r in records if r.kind == RecordKind.DECISION)
    store = AuditStore.open(tmp_path / "audit")
    try:
        head = store.head().seq
        store.append_batch([marker])
        store.append_batch(
            [msgspec.structs.replace(decision, decision_id="forged-after-marker")]
        )
    finally:
        store.close()

    report = verify_log(tmp_path / "audit", witness_root=tmp_path / "witness")
    status, details = _refused(start_daemon(SEGMENTS))

    assert (report.problem.seq, report.problem.kind) == (head + 1, "edited")
    assert "not written by the daemon" in report.problem.message
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert f"record {head + 1}: edited: is the start marker after" in details
    assert "but is not sealed" in details


def test_a_log_planted_in_the_witness_without_a_key_counts_for_nothing(
    start_daemon, tmp_path
):
    first = start_daemon(SEGMENTS)
    origin = first.config.identity.daemon_id
    first.stop()
    planted = sign_checkpoint(
        kind=CheckpointKind.CHECKPOINT, origin=origin, log_id="f" * 32,
        tree_size=9, root=bytes(32), chain_hash=bytes(32),
        time=Timestamp.from_nanos(2_000_000_000 * 10**9), key=generate_key(),
    )  # fmt: skip
    Witness(tmp_path / "witness", origin, "f" * 32).write(planted)

    running = start_daemon(SEGMENTS)
    answered = _decide(running, 1)

    assert _health(running) == health_pb2.HealthCheckResponse.SERVING
    assert answered[0].audit_sequence > 0
