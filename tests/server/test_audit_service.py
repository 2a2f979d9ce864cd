"""AuditService on the admin listener: a real daemon, real gRPC on Unix sockets.

Segments are four records long, so a handful of decisions seals several;
the segment timer is an hour, so nothing is sealed behind a test's back.
"""

from __future__ import annotations

import json
import os
import stat

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from identity_support import SigningKey, jwks
from kynara.v1 import audit_pb2 as pb
from kynara.v1 import audit_pb2_grpc
from support import daemon_config, small_refund

from kynara_sidecar.audit import merkle
from kynara_sidecar.audit.checkpoint import (
    decode_checkpoint,
    encode_checkpoint,
    verify_checkpoint,
)
from kynara_sidecar.audit.keys import load_signing_key
from kynara_sidecar.errors import ConfigError, ListenerError

OPERATOR_SECRET = "operator-secret-0123456789"
REVIEWER_SECRET = "reviewer-secret-0123456789"
AGENT_SECRET = "support-secret-0123456789"
SEGMENT_RECORDS = 4
DECISIONS = 10


def bearer(secret: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {secret}"),)


def write_secret(tmp_path, name: str, secret: str) -> str:
    path = tmp_path / f"{name}.secret"
    path.write_text(secret + "\n")
    return str(path)


@pytest.fixture
def admin_overrides(tmp_path) -> list[str]:
    credentials = {
        "ops": {
            "secret_file": write_secret(tmp_path, "ops", OPERATOR_SECRET),
            "roles": ["operator"],
        },
        "review": {
            "secret_file": write_secret(tmp_path, "review", REVIEWER_SECRET),
            "roles": ["reviewer"],
        },
    }
    return [
        f"admin.socket={tmp_path / 'admin.sock'}",
        f"admin.credentials={json.dumps(credentials)}",
        f"audit.signing_key={tmp_path / 'keys' / 'audit-key.pem'}",
        "audit.create_signing_key=true",
        f"audit.segment_records={SEGMENT_RECORDS}",
        "audit.segment_seconds=3600",
    ]


@pytest.fixture
def channels():
    opened: list[grpc.Channel] = []

    def open_(socket: str) -> grpc.Channel:
        channel = grpc.insecure_channel(f"unix://{socket}")
        opened.append(channel)
        return channel

    yield open_
    for channel in opened:
        channel.close()


@pytest.fixture
def running(start_daemon, admin_overrides):
    running = start_daemon(*admin_overrides)
    stub = running.stub()
    for _ in range(DECISIONS):
        stub.Decide(small_refund())
    return running


@pytest.fixture
def audit(running, channels) -> audit_pb2_grpc.AuditServiceStub:
    return audit_pb2_grpc.AuditServiceStub(channels(running.config.admin.socket))


def trusted(running):
    key = load_signing_key(running.config.audit.signing_key)
    return {key.key_id: key.public()}


def signed(running, checkpoint: pb.Checkpoint):
    """The checkpoint's JSON, decoded and signature-checked; fields agree."""
    cp = decode_checkpoint(checkpoint.json)
    verify_checkpoint(cp, trusted(running))
    assert encode_checkpoint(cp) == checkpoint.json
    assert (checkpoint.tree_size, checkpoint.root.hex()) == (cp.tree_size, cp.root)
    assert (checkpoint.kind, checkpoint.origin) == (cp.kind, cp.origin)
    assert checkpoint.log_id == cp.log_id
    assert checkpoint.chain_hash.hex() == cp.chain_hash
    assert (checkpoint.time, checkpoint.key_id) == (cp.time, cp.key_id)
    return cp


def refusal(call) -> tuple[grpc.StatusCode, dict[str, str], str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    return err.code(), dict(err.trailing_metadata() or ()), err.details()


def stream(audit, after: int) -> list[pb.Segment]:
    request = pb.StreamSegmentsRequest(after_tree_size=after)
    return list(audit.StreamSegments(request, metadata=bearer(OPERATOR_SECRET)))


# --- reads -------------------------------------------------------------------


def test_head_is_the_latest_signed_checkpoint_and_the_log_size(running, audit):
    head = audit.GetHead(pb.GetHeadRequest(), metadata=bearer(OPERATOR_SECRET))

    store = running.daemon._store
    cp = signed(running, head.checkpoint)
    assert head.tree_size == store.head().seq
    assert cp.tree_size == store.latest_checkpoint().tree_size
    assert 0 < cp.tree_size <= head.tree_size
    assert cp.origin == running.config.identity.daemon_id
    assert head.log_id == store.log_id and head.seam == 0
    assert cp.log_id == store.log_id


def test_record_by_seq_proves_against_the_signed_checkpoint(running, audit):
    reply = audit.GetRecord(
        pb.GetRecordRequest(seq=3), metadata=bearer(OPERATOR_SECRET)
    )

    cp = signed(running, reply.checkpoint)
    assert reply.record == running.daemon._store.get(3).record_bytes
    assert (reply.seq, reply.leaf_index) == (3, 2)
    assert merkle.verify_inclusion(
        merkle.leaf_hash(reply.record),
        reply.leaf_index,
        cp.tree_size,
        list(reply.inclusion_proof),
        bytes.fromhex(cp.root),
    )


def test_record_by_decision_id_proves_against_an_earlier_checkpoint(running, audit):
    answer = running.stub().Decide(small_refund())
    first = stream(audit, 0)[0].checkpoint.tree_size
    latest = running.daemon._store.latest_checkpoint().tree_size
    seq = min(answer.audit_sequence, latest)
    decision_id = json.loads(running.daemon._store.get(seq).record_bytes)["decision_id"]
    later = next(
        cp.tree_size
        for cp in running.daemon._store.iter_checkpoints(after=first)
        if cp.tree_size >= seq
    )

    reply = audit.GetRecord(
        pb.GetRecordRequest(decision_id=decision_id, tree_size=later),
        metadata=bearer(OPERATOR_SECRET),
    )

    cp = signed(running, reply.checkpoint)
    assert reply.seq == seq and cp.tree_size == later
    assert merkle.verify_inclusion(
        merkle.leaf_hash(reply.record),
        reply.leaf_index,
        cp.tree_size,
        list(reply.inclusion_proof),
        bytes.fromhex(cp.root),
    )


def test_unsealed_record_is_failed_precondition(running, audit):
    store = running.daemon._store
    if store.head().seq == store.latest_checkpoint().tree_size:
        running.stub().Decide(small_refund())
    newest = store.head().seq

    status, metadata, details = refusal(
        lambda: audit.GetRecord(
            pb.GetRecordRequest(seq=newest), metadata=bearer(OPERATOR_SECRET)
        )
    )

    assert status == grpc.StatusCode.FAILED_PRECONDITION
    assert metadata["kynara-error-code"] == "not_checkpointed"
    assert f"record {newest} is after the latest checkpoint" in details


def test_unknown_record_is_not_found(audit):
    status, metadata, _ = refusal(
        lambda: audit.GetRecord(
            pb.GetRecordRequest(decision_id="nope"), metadata=bearer(OPERATOR_SECRET)
        )
    )

    assert status == grpc.StatusCode.NOT_FOUND
    assert metadata["kynara-error-code"] == "not_found"
    assert metadata["kynara-error-field"] == "decision_id"


def test_consistency_between_two_checkpoints_verifies(running, audit):
    sizes = [cp.tree_size for cp in running.daemon._store.iter_checkpoints()]
    assert len(sizes) >= 2

    reply = audit.GetConsistencyProof(
        pb.GetConsistencyProofRequest(old_size=sizes[0], new_size=sizes[-1]),
        metadata=bearer(OPERATOR_SECRET),
    )

    old, new = (
        signed(running, reply.old_checkpoint),
        signed(running, reply.new_checkpoint),
    )
    assert (old.tree_size, new.tree_size) == (sizes[0], sizes[-1])
    assert merkle.verify_consistency(
        old.tree_size,
        new.tree_size,
        bytes.fromhex(old.root),
        bytes.fromhex(new.root),
        list(reply.consistency_proof),
    )


def test_stream_after_a_cursor_returns_each_record_once_in_order(running, audit):
    store = running.daemon._store
    sizes = [cp.tree_size for cp in store.iter_checkpoints()]

    for after in (0, sizes[0]):
        segments = stream(audit, after)

        records, previous = [], after
        for segment in segments:
            cp = signed(running, segment.checkpoint)
            assert segment.previous_tree_size == previous
            assert segment.first_seq == previous + 1
            assert previous + len(segment.records) == cp.tree_size
            records.extend(segment.records)
            previous = cp.tree_size
        assert previous == sizes[-1]
        expected = [
            store.get(seq).record_bytes for seq in range(after + 1, previous + 1)
        ]
        assert records == expected


def test_a_segment_larger_than_a_message_comes_in_parts(running, audit):
    # One byte a message: every record travels in a message of its own.
    running.daemon._audit_service._max_bytes = 1
    store = running.daemon._store
    latest = store.latest_checkpoint().tree_size

    segments = stream(audit, 0)

    assert [s.first_seq for s in segments] == list(range(1, latest + 1))
    assert all(len(s.records) == 1 for s in segments)
    assert [s.records[0] for s in segments] == [
        store.get(seq).record_bytes for seq in range(1, latest + 1)
    ]
    ends = [s.checkpoint.tree_size for s in segments]
    assert ends == sorted(ends) and ends[-1] == latest


def test_stream_from_the_latest_checkpoint_is_empty(running, audit):
    latest = running.daemon._store.latest_checkpoint().tree_size

    assert stream(audit, latest) == []


def test_stream_cursor_that_is_no_checkpoint_is_refused(running, audit):
    sizes = [cp.tree_size for cp in running.daemon._store.iter_checkpoints()]
    between = sizes[0] + 1
    assert between not in sizes

    status, metadata, _ = refusal(lambda: stream(audit, between))

    assert status == grpc.StatusCode.NOT_FOUND
    assert metadata["kynara-error-field"] == "after_tree_size"


def test_admin_calls_are_not_audited(running, audit):
    before = running.daemon._store.head().seq

    audit.GetHead(pb.GetHeadRequest(), metadata=bearer(OPERATOR_SECRET))
    audit.GetRecord(pb.GetRecordRequest(seq=1), metadata=bearer(OPERATOR_SECRET))
    stream(audit, 0)
    refusal(lambda: audit.GetHead(pb.GetHeadRequest()))

    assert running.daemon._store.head().seq == before


# --- who may call ------------------------------------------------------------


@pytest.mark.parametrize(
    ("metadata", "status", "code"),
    [
        ((), grpc.StatusCode.UNAUTHENTICATED, "identity_invalid"),
        (
            bearer("wrong-secret-0123456789"),
            grpc.StatusCode.UNAUTHENTICATED,
            "identity_invalid",
        ),
        (
            (("authorization", OPERATOR_SECRET),),
            grpc.StatusCode.UNAUTHENTICATED,
            "identity_invalid",
        ),
        (bearer(REVIEWER_SECRET), grpc.StatusCode.PERMISSION_DENIED, "role_missing"),
    ],
    ids=["none", "wrong", "not-bearer", "reviewer"],
)
@pytest.mark.parametrize(
    "call",
    [
        lambda audit, md: audit.GetHead(pb.GetHeadRequest(), metadata=md),
        lambda audit, md: audit.GetRecord(pb.GetRecordRequest(seq=1), metadata=md),
        lambda audit, md: audit.GetConsistencyProof(
            pb.GetConsistencyProofRequest(old_size=4, new_size=8), metadata=md
        ),
        lambda audit, md: list(
            audit.StreamSegments(pb.StreamSegmentsRequest(), metadata=md)
        ),
    ],
    ids=["GetHead", "GetRecord", "GetConsistencyProof", "StreamSegments"],
)
def test_calls_without_an_operator_credential_are_refused(
    running, audit, call, metadata, status, code
):
    got, trailers, details = refusal(lambda: call(audit, metadata))

    assert got == status
    assert trailers["kynara-error-code"] == code
    assert trailers["kynara-error-field"] == "authorization"
    assert OPERATOR_SECRET not in details and REVIEWER_SECRET not in details


def test_refusals_are_counted_by_code(running, audit):
    refusal(lambda: audit.GetHead(pb.GetHeadRequest()))
    refusal(
        lambda: audit.GetHead(pb.GetHeadRequest(), metadata=bearer(REVIEWER_SECRET))
    )

    registry = running.daemon.metrics.registry
    sample = "kynara_admin_refusals_total"
    assert registry.get_sample_value(sample, {"code": "identity_invalid"}) == 1
    assert registry.get_sample_value(sample, {"code": "role_missing"}) == 1


def test_agent_socket_does_not_serve_audit_service(running, channels):
    agent = audit_pb2_grpc.AuditServiceStub(channels(running.socket))

    status, _, _ = refusal(
        lambda: agent.GetHead(pb.GetHeadRequest(), metadata=bearer(OPERATOR_SECRET))
    )

    assert status == grpc.StatusCode.UNIMPLEMENTED


def test_admin_socket_serves_health_and_is_owner_only(running, channels):
    socket = running.config.admin.socket
    health = health_pb2_grpc.HealthStub(channels(socket))

    reply = health.Check(health_pb2.HealthCheckRequest())

    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert stat.S_IMODE(os.stat(socket).st_mode) == 0o600


def test_admin_listener_is_off_without_a_credential(
    start_daemon, tmp_path, admin_overrides
):
    without = [o for o in admin_overrides if not o.startswith("admin.credentials=")]

    running = start_daemon(*without)

    assert running.daemon.admin_port is None
    assert not (tmp_path / "admin.sock").exists()


@pytest.fixture
def multi_agent(tmp_path) -> list[str]:
    """Verified mode with per-agent bearer secrets (support-bot only)."""
    key = SigningKey("ES256", "idp-1")
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(jwks(key)))
    issuer = {
        "issuer": "https://idp.example.test",
        "audience": "kynara:support-bot",
        "jwks_file": str(jwks_file),
    }
    agents = {"support-bot": write_secret(tmp_path, "agent", AGENT_SECRET)}
    return [
        "identity.mode=verified",
        f"identity.issuers=[{json.dumps(issuer)}]",
        "identity.agent_id=",
        f"identity.agents={json.dumps(agents)}",
    ]


def test_an_agent_secret_opens_nothing_on_the_admin_listener(
    start_daemon, admin_overrides, multi_agent, channels
):
    running = start_daemon(*admin_overrides, *multi_agent)
    audit = audit_pb2_grpc.AuditServiceStub(channels(running.config.admin.socket))

    status, trailers, _ = refusal(
        lambda: audit.GetHead(pb.GetHeadRequest(), metadata=bearer(AGENT_SECRET))
    )

    assert status == grpc.StatusCode.UNAUTHENTICATED
    assert trailers["kynara-error-code"] == "identity_invalid"


# --- configuration -----------------------------------------------------------


def test_config_refuses_an_admin_secret_an_agent_holds(
    tmp_path, admin_overrides, multi_agent
):
    shared = {
        "ops": {
            "secret_file": write_secret(tmp_path, "shared", AGENT_SECRET),
            "roles": ["operator"],
        }
    }

    with pytest.raises(
        ConfigError, match=r"admin.credentials.ops: expected a secret no agent holds"
    ):
        daemon_config(
            tmp_path,
            *admin_overrides,
            *multi_agent,
            f"admin.credentials={json.dumps(shared)}",
        )


def credential(secret_file: str, *roles: str) -> str:
    return json.dumps({"secret_file": secret_file, "roles": list(roles)})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["admin.port=50999"], None),
        (
            ["admin.port=50999", "admin.host=10.0.0.1"],
            r"admin.host: expected a loopback address .* no TLS",
        ),
        (["admin.socket={agent}"], r"admin.socket: expected a socket apart from agent"),
        (
            ['admin.credentials={{"x": {short_operator}}}'],
            r"admin.credentials.x.secret_file: expected a secret of at least 16",
        ),
        (
            ['admin.credentials={{"x": {root}}}'],
            r"admin.credentials.x.roles: expected each of operator, reviewer, "
            r"metrics, got 'root'",
        ),
        (
            ['admin.credentials={{"x": {nothing}}}'],
            r"admin.credentials.x.roles: expected at least one of operator",
        ),
        (
            ['admin.credentials={{"x": {operator}, "y": {reviewer}}}'],
            r"admin.credentials.y: expected its own secret, got a shared one",
        ),
    ],
    ids=[
        "port-ok",
        "off-loopback",
        "agent-socket",
        "short",
        "role",
        "no-role",
        "shared",
    ],
)
def test_admin_config_is_checked(tmp_path, admin_overrides, overrides, message):
    ops = write_secret(tmp_path, "ops2", OPERATOR_SECRET + "-other")
    values = {
        "agent": str(tmp_path / "agent.sock"),
        "short_operator": credential(
            write_secret(tmp_path, "short", "too-short"), "operator"
        ),
        "root": credential(ops, "root"),
        "nothing": credential(ops),
        "operator": credential(ops, "operator"),
        "reviewer": credential(ops, "reviewer"),
    }
    given = [*admin_overrides, *(o.format(**values) for o in overrides)]

    if message is None:
        assert daemon_config(tmp_path, *given).admin.port == 50999
        return
    with pytest.raises(ConfigError, match=message):
        daemon_config(tmp_path, *given)


def test_a_second_daemon_cannot_take_the_admin_socket(
    running, start_daemon, admin_overrides, tmp_path, audit
):
    other = tmp_path / "other"

    with pytest.raises(ListenerError, match="admin.socket .* in use by another"):
        start_daemon(*admin_overrides, path=other)

    # The first daemon's admin socket still answers.
    assert audit.GetHead(pb.GetHeadRequest(), metadata=bearer(OPERATOR_SECRET))
