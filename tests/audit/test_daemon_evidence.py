"""The daemon's evidence wiring: key rotation, the tail check at start, and
a new chain after a break, with a real daemon on a real log."""

from __future__ import annotations

import shutil

import grpc
import lmdb
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import small_refund

from kynara_sidecar.audit.chain import decode_record
from kynara_sidecar.audit.keys import generate_key, load_public_key, save_signing_key
from kynara_sidecar.audit.newchain import start_new_chain
from kynara_sidecar.audit.record import RecordKind
from kynara_sidecar.audit.startup import load_audit_keys
from kynara_sidecar.audit.store import AuditStore
from kynara_sidecar.audit.verify import verify_log
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

    config = broken.config
    done = start_new_chain(
        config.audit.path,
        load_audit_keys(config.audit),
        origin=config.identity.daemon_id,
        witness_root=config.audit.witness_path,
        now_nanos=1_796_374_800 * 10**9,
    )
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
    done = start_new_chain(
        config.audit.path,
        load_audit_keys(config.audit),
        origin=config.identity.daemon_id,
        witness_root=config.audit.witness_path,
        now_nanos=1_796_374_800 * 10**9,
    )
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
        start_new_chain(
            config.audit.path,
            load_audit_keys(config.audit),
            origin=config.identity.daemon_id,
            witness_root=config.audit.witness_path,
            now_nanos=1_796_374_800 * 10**9,
        )
