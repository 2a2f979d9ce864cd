"""Client and AsyncClient against a real gRPC server playing the daemon."""

from __future__ import annotations

import asyncio
import datetime

import grpc
import kynara_sdk
import pytest
from google.protobuf import timestamp_pb2
from kynara.v1 import decision_pb2
from kynara_sdk import (
    AsyncClient,
    Client,
    Decision,
    DecisionRequest,
    KynaraError,
    KynaraUnavailable,
    UInt64,
    acting_for,
)
from sdk_scripted import HANG, Abort, answer

FULL_ANSWER = answer(
    "require_approval",
    decision_id="dec-42",
    reason_code="approval_required",
    reason="refund above 1000 needs a reviewer",
    matched_rules=[
        decision_pb2.MatchedRule(
            policy="payments",
            rule="big-refund",
            effect=decision_pb2.DECISION_REQUIRE_APPROVAL,
            principal="alice",
        ),
        decision_pb2.MatchedRule(
            policy="payments",
            rule="try-deny",
            effect=decision_pb2.DECISION_DENY,
            principal="refund-agent",
            shadow=True,
        ),
    ],
    policy_revision="pol-7",
    directory_revision="dir-3",
    audit_sequence=2**63 + 5,
    record_hash="ab" * 32,
    approval=decision_pb2.Approval(
        id="apr-1",
        url="http://127.0.0.1:8080/approvals/apr-1",
        expires_at=timestamp_pb2.Timestamp(seconds=1782889200, nanos=5000),
    ),
    condition_errors=[
        decision_pb2.ConditionError(
            policy="payments", rule="hours", principal="alice", message="no such key"
        )
    ],
    chain=["alice", "refund-agent"],
    request_id="req-9",
)


def test_decide_reads_every_field_of_the_answer(daemon, client):
    daemon.then(FULL_ANSWER)

    decision = client.decide("payments.refund.issue", resource_kind="payments.refund")

    assert decision == Decision(
        decision="require_approval",
        decision_id="dec-42",
        reason_code="approval_required",
        reason="refund above 1000 needs a reviewer",
        matched_rules=(
            kynara_sdk.MatchedRule(
                "payments", "big-refund", "require_approval", "alice", False
            ),
            kynara_sdk.MatchedRule(
                "payments", "try-deny", "deny", "refund-agent", True
            ),
        ),
        policy_revision="pol-7",
        directory_revision="dir-3",
        audit_sequence=2**63 + 5,
        record_hash="ab" * 32,
        approval=kynara_sdk.Approval(
            id="apr-1",
            url="http://127.0.0.1:8080/approvals/apr-1",
            expires_at=datetime.datetime(2026, 7, 1, 7, 0, 0, 5, tzinfo=datetime.UTC),
        ),
        chain=("alice", "refund-agent"),
        condition_errors=(
            kynara_sdk.ConditionError("payments", "hours", "alice", "no such key"),
        ),
        request_id="req-9",
    )
    assert decision.allowed is False


@pytest.mark.parametrize(
    ("decision", "allowed"),
    [("allow", True), ("deny", False), ("require_approval", False)],
)
def test_only_allow_is_allowed(daemon, client, decision, allowed):
    daemon.then(answer(decision))

    result = client.decide("crm.contact.read", resource_kind="crm.contact")

    assert result.decision == decision
    assert result.allowed is allowed
    assert result.approval is None


def test_decide_sends_action_resource_context_and_request_id(daemon, client):
    when = datetime.datetime(2026, 7, 1, 9, 0, tzinfo=datetime.UTC)

    client.decide(
        "payments.refund.issue",
        resource_kind="payments.refund",
        resource_id="rf_1",
        attributes={"amount": 2**53 + 1, "limit": UInt64(5)},
        context={"region": "DE", "at": when},
        request_id="req-1",
    )

    [sent] = daemon.requests
    assert sent.action == "payments.refund.issue"
    assert sent.request_id == "req-1"
    assert (sent.resource.kind, sent.resource.id) == ("payments.refund", "rf_1")
    assert sent.resource.attributes["amount"].int_value == 2**53 + 1
    assert sent.resource.attributes["limit"].WhichOneof("kind") == "uint_value"
    assert sent.context["region"].string_value == "DE"
    assert sent.context["at"].timestamp_value.ToDatetime(tzinfo=datetime.UTC) == when


def test_a_bad_value_is_refused_before_anything_is_sent(daemon, client):
    with pytest.raises(TypeError, match=r"^resource\.attributes\.amount: .* got set$"):
        client.decide(
            "payments.refund.issue",
            resource_kind="payments.refund",
            attributes={"amount": {1}},
        )

    assert daemon.requests == []


def test_decide_without_a_subject_sends_an_empty_chain(daemon, client):
    client.decide("crm.contact.read", resource_kind="crm.contact")

    [sent] = daemon.requests
    assert list(sent.asserted_chain) == []
    assert sent.delegation_token == ""


@pytest.mark.parametrize(
    ("override", "chain", "token"),
    [
        ({"user": "bob"}, ["bob"], ""),
        ({"chain": ["bob", "planner"]}, ["bob", "planner"], ""),
        ({"token": "eyJ.x.y"}, [], "eyJ.x.y"),
        ({}, ["alice"], ""),
    ],
    ids=["user", "chain", "token", "none"],
)
def test_per_call_subject_overrides_acting_for(daemon, client, override, chain, token):
    with acting_for(user="alice"):
        client.decide("crm.contact.read", resource_kind="crm.contact", **override)

    [sent] = daemon.requests
    assert list(sent.asserted_chain) == chain
    assert sent.delegation_token == token


def test_two_subjects_in_one_call_are_refused(daemon, client):
    with pytest.raises(
        ValueError, match=r"^decide: expected at most one of user=, chain=, token=,"
    ):
        client.decide("a.b", resource_kind="k", user="bob", token="t")

    assert daemon.requests == []


@pytest.mark.parametrize(
    ("abort", "error_type", "code", "field"),
    [
        (
            Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "bad kind",
                "invalid_request",
                "resource.kind",
            ),
            KynaraError,
            "invalid_request",
            "resource.kind",
        ),
        (
            Abort(grpc.StatusCode.UNAVAILABLE, "no policy", "policy_not_ready"),
            KynaraError,
            "policy_not_ready",
            "",
        ),
        (
            Abort(grpc.StatusCode.UNAVAILABLE, "disk full", "audit_unavailable"),
            KynaraError,
            "audit_unavailable",
            "",
        ),
        (
            Abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "bad token",
                "identity_invalid",
                "delegation_token",
            ),
            KynaraError,
            "identity_invalid",
            "delegation_token",
        ),
        (
            Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too big", "request_too_large"),
            KynaraError,
            "request_too_large",
            "",
        ),
        (
            Abort(grpc.StatusCode.UNAVAILABLE, "draining", "shutting_down"),
            KynaraError,
            "shutting_down",
            "",
        ),
        (
            Abort(grpc.StatusCode.INTERNAL, "oops", "internal"),
            KynaraError,
            "internal",
            "",
        ),
        (
            Abort(grpc.StatusCode.UNAVAILABLE, "gone"),
            KynaraUnavailable,
            "daemon_unreachable",
            "",
        ),
        (
            Abort(grpc.StatusCode.DEADLINE_EXCEEDED, "late"),
            KynaraUnavailable,
            "daemon_unreachable",
            "",
        ),
        (
            Abort(grpc.StatusCode.CANCELLED, "shutting down"),
            KynaraUnavailable,
            "daemon_unreachable",
            "",
        ),
        (
            Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "limit"),
            KynaraError,
            "request_too_large",
            "",
        ),
        (
            Abort(grpc.StatusCode.PERMISSION_DENIED, "proxy says no"),
            KynaraError,
            "internal",
            "",
        ),
        (
            Abort(grpc.StatusCode.UNIMPLEMENTED, "old daemon"),
            KynaraError,
            "internal",
            "",
        ),
    ],
    ids=[
        "invalid_request",
        "policy_not_ready",
        "audit_unavailable",
        "identity_invalid",
        "request_too_large",
        "shutting_down",
        "internal",
        "bare-unavailable",
        "bare-deadline",
        "bare-cancelled",
        "bare-resource-exhausted",
        "bare-permission-denied",
        "bare-unimplemented",
    ],
)
def test_failed_call_maps_to_a_stable_code(
    daemon, client, abort, error_type, code, field
):
    daemon.then(abort)

    with pytest.raises(error_type) as caught:
        client.decide("a.b", resource_kind="k")

    assert type(caught.value) is error_type
    assert caught.value.code == code
    assert caught.value.field == field
    assert isinstance(caught.value.__cause__, grpc.RpcError)


def test_daemon_error_keeps_the_daemons_message(daemon, client):
    daemon.then(
        Abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            "kind must be dotted",
            "invalid_request",
            "resource.kind",
        )
    )

    with pytest.raises(
        KynaraError,
        match=r"^\[invalid_request\] \(field resource\.kind\) kind must be dotted$",
    ):
        client.decide("a.b", resource_kind="k")


def test_request_over_grpcs_size_limit_is_request_too_large(daemon, client):
    with pytest.raises(KynaraError) as caught:
        client.decide("a.b", resource_kind="k", attributes={"blob": b"x" * 100_000})

    assert caught.value.code == kynara_sdk.REQUEST_TOO_LARGE
    assert daemon.requests == []


def test_deadline_passing_is_daemon_unreachable(daemon):
    daemon.then(HANG)

    with Client(daemon.target, timeout=0.2) as impatient:
        with pytest.raises(KynaraUnavailable) as caught:
            impatient.decide("a.b", resource_kind="k")

    assert caught.value.code == kynara_sdk.DAEMON_UNREACHABLE


def test_no_daemon_listening_is_daemon_unreachable(absent_target):
    with Client(absent_target) as lonely:
        with pytest.raises(KynaraUnavailable) as caught:
            lonely.decide("a.b", resource_kind="k")

    assert caught.value.code == "daemon_unreachable"
    assert absent_target in caught.value.message


def test_answer_without_a_decision_is_an_error_not_a_deny(daemon, client):
    daemon.then(decision_pb2.DecideResponse(decision_id="dec-0"))

    with pytest.raises(
        KynaraError,
        match=r"^\[internal\] \(field decision\) expected a decision of allow, deny"
        r" or require_approval, got DECISION_UNSPECIFIED$",
    ):
        client.decide("a.b", resource_kind="k")


def test_batch_answers_each_item_on_its_own_in_order(daemon, client):
    daemon.then(
        decision_pb2.DecideBatchResponse(
            items=[
                decision_pb2.DecideBatchItem(decision=answer("allow", "d-1")),
                decision_pb2.DecideBatchItem(
                    error=decision_pb2.Error(
                        code="invalid_request", message="no kind", field="resource.kind"
                    )
                ),
                decision_pb2.DecideBatchItem(decision=answer("deny", "d-3")),
            ]
        )
    )

    with acting_for(user="alice"):
        results = client.decide_batch(
            [
                DecisionRequest("crm.contact.read", "crm.contact", "c-1"),
                {"action": "crm.contact.read", "resource_kind": ""},
                DecisionRequest("crm.contact.delete", "crm.contact", user="bob"),
            ]
        )

    allowed, failed, denied = results
    assert (allowed.decision, allowed.decision_id) == ("allow", "d-1")
    assert isinstance(failed, KynaraError)
    assert (failed.code, failed.field) == ("invalid_request", "resource.kind")
    assert (denied.decision, denied.decision_id) == ("deny", "d-3")
    [batch] = daemon.servicer.batches
    assert [list(item.asserted_chain) for item in batch.items] == [
        ["alice"],
        ["alice"],
        ["bob"],
    ]
    assert batch.items[0].resource.id == "c-1"


def test_batch_with_a_missing_answer_is_an_error(daemon, client):
    daemon.then(decision_pb2.DecideBatchResponse(items=[]))

    with pytest.raises(
        KynaraError, match=r"expected one answer per request \(1\), got 0"
    ):
        client.decide_batch([DecisionRequest("a.b", "k")])


@pytest.mark.parametrize(
    ("item", "error", "message"),
    [
        (
            42,
            TypeError,
            r"^requests\[0\]: expected a DecisionRequest or a dict, got int$",
        ),
        ({"action": "a.b"}, TypeError, r"^requests\[0\]: .*resource_kind"),
        (
            {"action": "a.b", "resource_kind": "k", "context": {"x": object()}},
            TypeError,
            r"^requests\[0\]: context\.x: expected bool, .* got object$",
        ),
    ],
    ids=["not-a-request", "missing-kind", "bad-value"],
)
def test_malformed_batch_item_is_refused_naming_its_index(
    daemon, client, item, error, message
):
    with pytest.raises(error, match=message):
        client.decide_batch([item])

    assert daemon.servicer.batches == []


def test_closed_client_refuses_further_use(daemon):
    client = Client(daemon.target)
    client.close()
    client.close()

    with pytest.raises(RuntimeError, match=r"^Client for unix://.* is closed$"):
        client.decide("a.b", resource_kind="k")


@pytest.mark.parametrize(
    ("timeout", "error", "message"),
    [
        (0, ValueError, r"^timeout: expected seconds > 0, got 0$"),
        (-1.5, ValueError, r"^timeout: expected seconds > 0, got -1\.5$"),
        ("5", TypeError, r"^timeout: expected seconds as a number, got str$"),
    ],
)
def test_timeout_must_be_positive_seconds(timeout, error, message):
    with pytest.raises(error, match=message):
        Client("127.0.0.1:1", timeout=timeout)


def test_target_comes_from_the_environment_then_the_default(monkeypatch):
    assert Client().target == kynara_sdk.DEFAULT_TARGET

    monkeypatch.setenv("KYNARA_TARGET", "unix:///tmp/elsewhere.sock")

    assert Client().target == "unix:///tmp/elsewhere.sock"
    assert Client("127.0.0.1:50151").target == "127.0.0.1:50151"


def test_async_client_decides_and_batches(daemon):
    daemon.then(
        answer("deny", "d-1", reason_code="no_rule_allows"),
        decision_pb2.DecideBatchResponse(
            items=[decision_pb2.DecideBatchItem(decision=answer("allow", "d-2"))]
        ),
    )

    async def session():
        async with AsyncClient(daemon.target) as client:
            with acting_for(chain=["alice", "planner"]):
                one = await client.decide(
                    "crm.contact.read",
                    resource_kind="crm.contact",
                    context={"n": 2**53 + 1},
                )
                many = await client.decide_batch([DecisionRequest("a.b", "k")])
        return one, many

    one, many = asyncio.run(session())

    assert (one.decision, one.reason_code, one.decision_id) == (
        "deny",
        "no_rule_allows",
        "d-1",
    )
    assert [d.decision_id for d in many] == ["d-2"]
    [sent] = daemon.requests
    assert list(sent.asserted_chain) == ["alice", "planner"]
    assert sent.context["n"].int_value == 2**53 + 1


def test_async_client_maps_errors_like_the_sync_one(daemon):
    daemon.then(
        Abort(grpc.StatusCode.UNAVAILABLE, "no policy", "policy_not_ready", "x")
    )

    async def ask():
        async with AsyncClient(daemon.target) as client:
            await client.decide("a.b", resource_kind="k")

    with pytest.raises(KynaraError) as caught:
        asyncio.run(ask())

    assert (caught.value.code, caught.value.field) == ("policy_not_ready", "x")


def test_async_client_without_daemon_is_unreachable(absent_target):
    async def ask():
        async with AsyncClient(absent_target) as client:
            await client.decide("a.b", resource_kind="k")

    with pytest.raises(KynaraUnavailable) as caught:
        asyncio.run(ask())

    assert caught.value.code == "daemon_unreachable"


def test_async_client_survives_a_second_event_loop(daemon):
    client = AsyncClient(daemon.target)

    async def ask(decision_id):
        daemon.then(answer("allow", decision_id))
        return (await client.decide("a.b", resource_kind="k")).decision_id

    first = asyncio.run(ask("d-1"))
    second = asyncio.run(ask("d-2"))
    asyncio.run(client.aclose())

    assert (first, second) == ("d-1", "d-2")
    with pytest.raises(RuntimeError, match=r"^AsyncClient for .* is closed$"):
        asyncio.run(client.decide("a.b", resource_kind="k"))


def test_errors_pickle_with_their_code():
    import pickle

    original = KynaraError("invalid_request", "bad", "resource.kind")
    unreachable = KynaraUnavailable("no daemon")

    copy = pickle.loads(pickle.dumps(original))
    copy_unreachable = pickle.loads(pickle.dumps(unreachable))

    assert (copy.code, copy.message, copy.field) == (
        "invalid_request",
        "bad",
        "resource.kind",
    )
    assert copy_unreachable.code == "daemon_unreachable"
