"""Decide and DecideBatch through a real gRPC server on a Unix socket."""

from __future__ import annotations

import grpc
import msgspec
import pytest
from cases_loader import load_cases
from kynara.v1 import decision_pb2 as pb
from support import error_of, read_record, small_refund, wire_request

from kynara_sidecar.decision import Timestamp, UInt64

CASES = load_cases()
DECISION_NAMES = {
    pb.DECISION_ALLOW: "allow",
    pb.DECISION_DENY: "deny",
    pb.DECISION_REQUIRE_APPROVAL: "require_approval",
}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case_over_grpc_matches_expectation_and_audit(case, start_daemon, clock):
    running = start_daemon(f"identity.agent_id={case.request.chain[-1]}")
    clock._nanos = case.now.seconds * 1_000_000_000 + case.now.nanos

    reply = running.stub().Decide(wire_request(case.request))

    assert DECISION_NAMES[reply.decision] == case.expect["decision"]
    assert reply.reason_code == case.expect["reason_code"]
    if "matched_rules" in case.expect:
        got = [
            {
                "policy": r.policy,
                "rule": r.rule,
                "effect": DECISION_NAMES[r.effect],
                "principal": r.principal,
                **({"shadow": True} if r.shadow else {}),
            }
            for r in reply.matched_rules
        ]
        want = [
            {k: v for k, v in rule.items() if not (k == "shadow" and not v)}
            for rule in case.expect["matched_rules"]
        ]
        assert got == want
    assert list(reply.chain) == list(case.request.chain)
    record = read_record(running, reply.audit_sequence)
    assert record.kind == "decision"
    assert record.decision_id == reply.decision_id
    assert record.decision == case.expect["decision"]
    assert record.reason_code == case.expect["reason_code"]
    assert record.action == case.request.action
    assert [p.id for p in record.chain] == list(case.request.chain)
    assert record.identity_mode == "development"
    assert record.policy_revision == reply.policy_revision


def test_answer_carries_revisions_sequence_and_hash(daemon):
    stub = daemon.stub()

    first = stub.Decide(small_refund())
    second = stub.Decide(small_refund())

    assert first.decision == pb.DECISION_ALLOW
    assert first.policy_revision.startswith("sha256:")
    assert first.directory_revision
    assert second.audit_sequence == first.audit_sequence + 1
    assert len(first.record_hash) == 64 and first.record_hash != second.record_hash
    assert first.decision_id != second.decision_id


def test_big_integer_and_timestamp_survive_the_wire_exactly(daemon):
    big = 2**53 + 1
    when = Timestamp(1_796_374_800, 123_456_789)
    request = small_refund(big=big, when=when, unsigned=UInt64(2**64 - 1))

    reply = daemon.stub().Decide(request)

    record = read_record(daemon, reply.audit_sequence)
    assert record.context["big"] == {"int": str(big)}
    assert record.context["when"] == {"timestamp": "2026-12-04T09:00:00.123456789Z"}
    assert record.context["unsigned"] == {"uint": str(2**64 - 1)}


def test_condition_sees_exact_big_integer(daemon):
    request = small_refund()
    request.resource.attributes["amount"].int_value = 2**53 + 1

    reply = daemon.stub().Decide(request)

    assert reply.decision == pb.DECISION_REQUIRE_APPROVAL


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: setattr(r, "action", ""), "action"),
        (lambda r: setattr(r, "action", "payments..refund"), "action"),
        (lambda r: r.resource.ClearField("kind"), "resource.kind"),
        (lambda r: r.context["x"].CopyFrom(pb.Value()), "context['x']"),
        (
            lambda r: r.context["t"].timestamp_value.MergeFrom(
                pb.Value(timestamp_value={"seconds": 1, "nanos": -1}).timestamp_value
            ),
            "context['t'].timestamp_value",
        ),
        (lambda r: r.asserted_chain.append(""), "asserted_chain[1]"),
        (lambda r: r.ClearField("asserted_chain"), "asserted_chain"),
        (
            lambda r: r.context["k"].map_value.entries["a\x00b"].int_value,
            "context['k']",
        ),
        (
            lambda r: r.context["deep"].CopyFrom(nested(17)),
            "context['deep']" + "[0]" * 16,
        ),
    ],
    ids=[
        "empty-action",
        "bad-action",
        "no-kind",
        "empty-value",
        "bad-nanos",
        "empty-principal",
        "empty-chain",
        "nul-in-key",
        "nested-17-deep",
    ],
)
def test_malformed_request_is_invalid_request_naming_field(daemon, mutate, field):
    request = small_refund()
    mutate(request)

    status, metadata = error_of(lambda: daemon.stub().Decide(request))

    assert status == grpc.StatusCode.INVALID_ARGUMENT
    assert metadata["kynara-error-code"] == "invalid_request"
    assert metadata["kynara-error-field"] == field


def test_delegation_token_in_development_mode_is_identity_invalid(daemon):
    request = small_refund()
    request.delegation_token = "eyJhbGciOiJub25lIn0.e30."

    status, metadata = error_of(lambda: daemon.stub().Decide(request))

    assert status == grpc.StatusCode.UNAUTHENTICATED
    assert metadata["kynara-error-code"] == "identity_invalid"
    assert metadata["kynara-error-field"] == "delegation_token"


def nested(depth: int) -> pb.Value:
    """A list holding a list ... ``depth`` lists deep around one integer."""
    value = pb.Value(int_value=1)
    for _ in range(depth):
        value = pb.Value(list_value=pb.ListValue(values=[value]))
    return value


def test_values_nested_sixteen_deep_are_accepted(daemon):
    request = small_refund()
    request.context["deep"].CopyFrom(nested(16))

    reply = daemon.stub().Decide(request)

    assert reply.decision == pb.DECISION_ALLOW


def test_oversized_request_is_request_too_large(start_daemon):
    running = start_daemon("agent.max_message_bytes=4096")
    request = small_refund(note="x" * 8192)

    status, metadata = error_of(lambda: running.stub().Decide(request))

    assert status == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert metadata["kynara-error-code"] == "request_too_large"


def raw_call(running, method: str):
    """A call that sends bytes as they are, as a broken client might."""
    channel = grpc.insecure_channel(running.target)
    running._channels.append(channel)
    return channel.unary_unary(
        f"/kynara.v1.DecisionService/{method}",
        request_serializer=None,
        response_deserializer=(
            pb.DecideResponse.FromString
            if method == "Decide"
            else pb.DecideBatchResponse.FromString
        ),
    )


def bad_utf8_request() -> bytes:
    good = small_refund().SerializeToString()
    # asserted_chain[0] "alice" -> "al\xffce": no longer UTF-8.
    return good.replace(b"alice", b"al\xffce")


@pytest.mark.parametrize(
    "raw",
    [bad_utf8_request(), b"\xff\xff\xff", b"\x0a\x05ab"],
    ids=["bad-utf8", "garbage", "truncated"],
)
def test_undecodable_request_is_invalid_request(daemon, raw):
    status, metadata = error_of(lambda: raw_call(daemon, "Decide")(raw))

    assert status == grpc.StatusCode.INVALID_ARGUMENT
    assert metadata["kynara-error-code"] == "invalid_request"


def test_batch_answers_around_an_undecodable_item(daemon):
    good = small_refund().SerializeToString()
    frames = pb.DecideBatchRequestFrames(items=[good, bad_utf8_request(), good])

    reply = raw_call(daemon, "DecideBatch")(frames.SerializeToString())

    outcomes = [item.WhichOneof("outcome") for item in reply.items]
    assert outcomes == ["decision", "error", "decision"]
    assert reply.items[1].error.code == "invalid_request"
    assert reply.items[1].error.field == "items[1]"


def test_full_audit_log_fails_closed_with_audit_unavailable(start_daemon):
    running = start_daemon("audit.map_size=262144")
    stub = running.stub()
    padding = "p" * 2048

    with pytest.raises(grpc.RpcError) as info:
        for _ in range(2000):
            stub.Decide(small_refund(padding=padding))

    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    metadata = dict(info.value.trailing_metadata())
    assert metadata["kynara-error-code"] == "audit_unavailable"
    assert "audit.map_size" in info.value.details()


def test_batch_answers_good_items_around_a_bad_one(daemon):
    bad = small_refund()
    bad.action = "not a name"
    batch = pb.DecideBatchRequest(items=[small_refund(), bad, small_refund()])

    reply = daemon.stub().DecideBatch(batch)

    outcomes = [item.WhichOneof("outcome") for item in reply.items]
    assert outcomes == ["decision", "error", "decision"]
    assert reply.items[1].error.code == "invalid_request"
    assert reply.items[1].error.field == "items[1].action"
    assert reply.items[0].decision.decision == pb.DECISION_ALLOW
    seqs = {
        reply.items[0].decision.audit_sequence,
        reply.items[2].decision.audit_sequence,
    }
    assert len(seqs) == 2


def test_batch_over_the_item_limit_is_invalid_request(daemon):
    batch = pb.DecideBatchRequest(items=[small_refund()] * 257)

    status, metadata = error_of(lambda: daemon.stub().DecideBatch(batch))

    assert status == grpc.StatusCode.INVALID_ARGUMENT
    assert metadata["kynara-error-field"] == "items"


def test_decide_over_loopback_tcp_gets_the_same_answer(daemon):
    channel = grpc.insecure_channel(f"127.0.0.1:{daemon.daemon.tcp_port}")
    from kynara.v1 import decision_pb2_grpc

    reply = decision_pb2_grpc.DecisionServiceStub(channel).Decide(small_refund())
    channel.close()

    assert reply.decision == pb.DECISION_ALLOW
    assert reply.reason_code == "rule_allowed"


def test_record_of_development_mode_lists_resolved_chain_roles(daemon):
    reply = daemon.stub().Decide(small_refund())

    record = read_record(daemon, reply.audit_sequence)

    encoded = msgspec.json.decode(msgspec.json.encode(record))
    assert encoded["identity_mode"] == "development"
    assert [p["id"] for p in encoded["chain"]] == ["alice", "support-bot"]
    assert all(p["roles"] for p in encoded["chain"])


def test_error_for_a_huge_key_keeps_its_code_and_a_bounded_field(daemon):
    request = small_refund()
    request.context["k" * 20_000].CopyFrom(pb.Value())

    status, metadata = error_of(lambda: daemon.stub().Decide(request))

    assert status == grpc.StatusCode.INVALID_ARGUMENT
    assert metadata["kynara-error-code"] == "invalid_request"
    assert len(metadata["kynara-error-field"]) <= 1024
    assert metadata["kynara-error-field"].startswith("context['kkk")


@pytest.mark.parametrize("shape", ["items", "frames"])
def test_a_batch_is_logged_whole_or_not_at_all_when_the_log_fills(start_daemon, shape):
    # max_batch below the batch size: a batch must still not be split.
    running = start_daemon("audit.map_size=262144", "audit.max_batch=4")
    padding = "p" * 2048
    outcomes = []

    for _ in range(60):
        requests = [small_refund(padding=padding) for _ in range(8)]
        if shape == "items":
            reply = running.stub().DecideBatch(pb.DecideBatchRequest(items=requests))
        else:
            frames = pb.DecideBatchRequestFrames(
                items=[r.SerializeToString() for r in requests]
            )
            reply = raw_call(running, "DecideBatch")(frames.SerializeToString())
        kinds = {item.WhichOneof("outcome") for item in reply.items}
        outcomes.append(kinds)
        if kinds == {"error"}:
            break
        seqs = [item.decision.audit_sequence for item in reply.items]

        assert kinds == {"decision"}, "a batch was logged in part"
        assert seqs == list(range(seqs[0], seqs[0] + 8)), "not one transaction"

    assert outcomes[-1] == {"error"}, "the log never filled"
    assert {item.error.code for item in reply.items} == {"audit_unavailable"}
