"""The Python SDK against the real daemon: decorator, clients, error codes."""

from __future__ import annotations

import asyncio
import datetime

import kynara_sdk
import pytest
from kynara_sdk import (
    ApprovalRequired,
    AsyncClient,
    Client,
    KynaraError,
    PermissionDenied,
    acting_for,
    permission_required,
)


def refund_tool(client: Client, ran: list[int]):
    @permission_required(
        "payments.refund.issue",
        resource_kind="payments.refund",
        resource_arg="refund_id",
        attrs=["amount"],
        context=["region"],
        client=client,
    )
    def issue_refund(refund_id: str, amount: int, region: str = "DE") -> str:
        ran.append(amount)
        return f"refunded {refund_id}"

    return issue_refund


@pytest.fixture
def client(daemon):
    with Client(daemon.target) as sync_client:
        yield sync_client


def test_decorator_runs_body_only_when_daemon_allows(client):
    ran: list[int] = []
    issue_refund = refund_tool(client, ran)

    with acting_for(user="alice"):
        assert issue_refund("rf_1", 1200) == "refunded rf_1"
        with pytest.raises(ApprovalRequired) as approval:
            issue_refund("rf_2", 250_000)
        with pytest.raises(PermissionDenied) as denied:
            issue_refund("rf_3", 1200, region="Kp")

    assert ran == [1200]
    assert approval.value.decision.reason_code == "approval_required"
    assert approval.value.decision.decision_id
    assert denied.value.decision.reason_code == "rule_denied"


def test_decorator_denies_a_user_the_directory_lacks(client):
    ran: list[int] = []
    issue_refund = refund_tool(client, ran)

    with acting_for(user="mallory"), pytest.raises(PermissionDenied) as denied:
        issue_refund("rf_1", 10)

    assert ran == []
    assert denied.value.decision.reason_code == "unknown_principal"


def test_async_client_gets_the_same_answer_as_sync(daemon, client):
    async def ask():
        async with AsyncClient(daemon.target) as async_client:
            return await async_client.decide(
                "payments.refund.issue",
                resource_kind="payments.refund",
                resource_id="rf_1",
                attributes={"amount": 50_000},
                user="alice",
            )

    async_answer = asyncio.run(ask())
    sync_answer = client.decide(
        "payments.refund.issue",
        resource_kind="payments.refund",
        resource_id="rf_1",
        attributes={"amount": 50_000},
        user="alice",
    )

    assert async_answer.decision == sync_answer.decision == "allow"
    assert async_answer.policy_revision == sync_answer.policy_revision
    assert sync_answer.audit_sequence == async_answer.audit_sequence + 1


def test_sdk_values_reach_the_audit_record_exactly(daemon, client):
    when = datetime.datetime(2026, 12, 4, 9, 0, 0, 123456, tzinfo=datetime.UTC)

    answer = client.decide(
        "payments.refund.issue",
        resource_kind="payments.refund",
        attributes={"amount": 2**53 + 1},
        context={"when": when, "count": kynara_sdk.UInt64(7)},
        user="alice",
    )

    from support import read_record

    record = read_record(daemon, answer.audit_sequence)
    assert answer.decision == "require_approval"
    assert record.resource.attributes["amount"] == {"int": str(2**53 + 1)}
    assert record.context["when"] == {"timestamp": "2026-12-04T09:00:00.123456Z"}
    assert record.context["count"] == {"uint": "7"}


@pytest.mark.parametrize(
    ("overrides", "call", "code"),
    [
        ((), {"user": "alice", "resource_kind": "payments..refund"}, "invalid_request"),
        ((), {"token": "a.b.c"}, "identity_invalid"),
        (
            ("agent.max_message_bytes=2048",),
            {"user": "alice", "context": {"blob": "x" * 4096}},
            "request_too_large",
        ),
    ],
    ids=["invalid_request", "identity_invalid", "request_too_large"],
)
def test_sdk_exposes_the_daemon_error_code(start_daemon, overrides, call, code):
    running = start_daemon(*overrides)
    arguments = {"resource_kind": "payments.refund", **call}

    with Client(running.target) as sdk, pytest.raises(KynaraError) as error:
        sdk.decide("payments.refund.issue", **arguments)

    assert error.value.code == code
