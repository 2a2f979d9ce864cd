"""``ToolGuard``, under every framework adapter, against a real daemon (the
shipped policies, gRPC and the fast path on Unix sockets, real LMDB): what
it decides, what it tells a model, and that it fails closed unless failing
open is spelled out."""

from __future__ import annotations

import asyncio
import logging

import pytest
from integration_support import (
    approve,
    audit_records,
)
from kynara_sdk import (
    DAEMON_UNREACHABLE,
    INVALID_REQUEST,
    ApprovalRequired,
    AsyncClient,
    Client,
    PermissionDenied,
    ToolGuard,
    acting_for,
)

REFUND = dict(
    resource_kind="payments.refund", resource_arg="refund_id", attrs=["amount"]
)
CONTACT = dict(
    resource_kind="crm.contact", resource_arg="contact_id", context=["region"]
)


@pytest.fixture
def client(running):
    with Client(running.target) as made:
        yield made


def test_an_allow_carries_the_decision_id_of_its_audit_record(running, client):
    guard = ToolGuard("payments.refund.issue", client=client, **REFUND)

    with acting_for(user="alice"):
        verdict = guard.check("issue_refund", {"refund_id": "rf_1", "amount": 1200})

    record = audit_records(running)[verdict.decision_id]
    assert verdict.allowed and verdict.error is None
    assert verdict.message() == ""
    assert (record.action, record.decision) == ("payments.refund.issue", "allow")
    assert record.resource.id == "rf_1"
    assert verdict.metadata()["decision"] == "allow"


def test_a_deny_tells_the_model_why_and_names_its_decision(running, client):
    guard = ToolGuard("crm.contact.read", client=client, **CONTACT)

    with acting_for(user="alice"):
        verdict = guard.check("read_contact", {"contact_id": "ct_7", "region": "kp"})

    assert not verdict.allowed
    assert isinstance(verdict.error, PermissionDenied)
    assert verdict.error.decision_id == verdict.decision_id
    message = verdict.message()
    assert "read_contact (crm.contact.read)" in message
    assert f"decision {verdict.decision_id}" in message
    assert verdict.decision.reason in message
    assert "did not run" in message
    record = audit_records(running)[verdict.decision_id]
    assert record.decision == "deny"
    assert "blocked-region" in [r.rule for r in record.matched_rules]
    with pytest.raises(PermissionDenied):
        verdict.raise_if_refused()


def test_approval_is_refused_with_its_url_then_the_same_call_runs(running, client):
    guard = ToolGuard("payments.refund.issue", client=client, **REFUND)
    call = {"refund_id": "rf_2", "amount": 60000}

    with acting_for(user="alice"):
        pending = guard.check("issue_refund", call)
        assert isinstance(pending.error, ApprovalRequired)
        approve(running, pending.error.approval_id)
        granted = guard.check("issue_refund", call)
        used = guard.check("issue_refund", call)

    assert pending.error.approval_url in pending.message()
    assert "call it again with the same arguments" in pending.message()
    assert pending.metadata()["approval"]["state"] == "pending"
    assert granted.allowed
    assert granted.decision.reason_code == "approval_granted"
    assert granted.decision.approval.id == pending.error.approval_id
    # The grant is used once: the next call asks a reviewer afresh.
    assert isinstance(used.error, ApprovalRequired)
    assert used.error.approval_id != pending.error.approval_id


def test_no_daemon_fails_closed_with_the_reason(socket_dir):
    missing = f"unix://{socket_dir / 'absent.sock'}"
    with Client(missing, timeout=2) as client:
        guard = ToolGuard("payments.refund.issue", client=client, **REFUND)
        with acting_for(user="alice"):
            verdict = guard.check("issue_refund", {"refund_id": "rf_3", "amount": 1})

    assert not verdict.allowed and not verdict.failed_open
    assert verdict.error.code == DAEMON_UNREACHABLE
    assert verdict.decision is None and verdict.decision_id == ""
    assert "[daemon_unreachable]" in verdict.message()


def test_failing_open_is_spelled_out_and_logged(socket_dir, caplog):
    missing = f"unix://{socket_dir / 'absent.sock'}"
    with Client(missing, timeout=2) as client:
        guard = ToolGuard(
            "payments.refund.issue", client=client, fail_open=True, **REFUND
        )
        with acting_for(user="alice"), caplog.at_level(logging.WARNING):
            verdict = guard.check("issue_refund", {"refund_id": "rf_4", "amount": 1})

    assert verdict.allowed and verdict.failed_open
    assert verdict.metadata()["failed_open"] is True
    [warning] = [r for r in caplog.records if r.name == "kynara_sdk.guard"]
    assert warning.levelno == logging.WARNING
    assert "issue_refund (payments.refund.issue)" in warning.getMessage()
    assert warning.code == DAEMON_UNREACHABLE


def test_failing_open_never_covers_a_bad_request_or_a_deny(running, client, caplog):
    refunds = ToolGuard(
        "payments.refund.issue", client=client, fail_open=True, **REFUND
    )
    contacts = ToolGuard("crm.contact.read", client=client, fail_open=True, **CONTACT)

    with acting_for(user="alice"), caplog.at_level(logging.WARNING):
        # A resource id and a value the wire cannot carry, named before
        # anything is sent.
        bad = refunds.check("issue_refund", {"refund_id": 1.5, "amount": 1})
        odd = refunds.check("issue_refund", {"refund_id": "r", "amount": object()})
        denied = contacts.check("read_contact", {"contact_id": "c", "region": "kp"})

    for refused in (bad, odd):
        assert not refused.allowed and refused.error.code == INVALID_REQUEST
        assert refused.error.field == "arguments"
    assert "'refund_id'" in bad.message()
    assert "amount" in odd.message()
    assert not denied.allowed and isinstance(denied.error, PermissionDenied)
    assert [r for r in caplog.records if r.name == "kynara_sdk.guard"] == []


def test_a_status_from_something_other_than_the_daemon_never_fails_open(
    running, caplog
):
    # The admin socket speaks gRPC but not the decision service: UNIMPLEMENTED,
    # with no daemon error code, reads as internal and stays closed.
    with Client(f"unix://{running.config.admin.socket}", transport="grpc") as wrong:
        guard = ToolGuard(
            "payments.refund.issue", client=wrong, fail_open=True, **REFUND
        )
        with acting_for(user="alice"), caplog.at_level(logging.WARNING):
            verdict = guard.check("issue_refund", {"refund_id": "r", "amount": -5})

    assert not verdict.allowed and not verdict.failed_open
    assert verdict.error.code == "internal"
    assert "UNIMPLEMENTED" in verdict.message()
    assert [r for r in caplog.records if r.name == "kynara_sdk.guard"] == []


def test_a_fast_path_target_that_is_not_a_daemon_never_fails_open(running, caplog):
    # The daemon's gRPC socket given as the fast path's: it answers in HTTP/2.
    with Client(f"fast://{running.socket}", timeout=2) as wrong:
        guard = ToolGuard(
            "payments.refund.issue", client=wrong, fail_open=True, **REFUND
        )
        with acting_for(user="alice"), caplog.at_level(logging.WARNING):
            verdict = guard.check("issue_refund", {"refund_id": "r", "amount": -5})

    assert not verdict.allowed and not verdict.failed_open
    assert verdict.error.code == DAEMON_UNREACHABLE
    assert verdict.error.not_a_daemon is True
    assert "protocol mismatch" in verdict.message()
    assert [r for r in caplog.records if r.name == "kynara_sdk.guard"] == []


def test_acheck_decides_alike_with_the_async_client(running):
    async def run():
        async with AsyncClient(running.target) as asker:
            guard = ToolGuard("crm.contact.read", async_client=asker, **CONTACT)
            with acting_for(user="alice"):
                allowed = await guard.acheck("read_contact", {"contact_id": "c1"})
                denied = await guard.acheck(
                    "read_contact", {"contact_id": "c1", "region": "KP"}
                )
            return allowed, denied

    allowed, denied = asyncio.run(run())

    records = audit_records(running)
    assert allowed.allowed and records[allowed.decision_id].decision == "allow"
    assert not denied.allowed and records[denied.decision_id].decision == "deny"


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"fail_open": "yes"}, TypeError),
        ({"action": 5}, TypeError),
        ({"action": ""}, TypeError),
        ({"resource_kind": None}, TypeError),
        ({"resource_arg": 3}, TypeError),
        ({"client": object()}, TypeError),
        ({"async_client": object()}, TypeError),
        ({"on_approval": "later"}, ValueError),
        ({"attrs": "amount"}, TypeError),
    ],
)
def test_bad_settings_are_refused_when_the_guard_is_made(kwargs, error):
    settings = {"action": "a.b", "resource_kind": "k.k", **kwargs}
    with pytest.raises(error) as caught:
        ToolGuard(**settings)

    assert str(caught.value).startswith(next(iter(kwargs)))


def test_a_misspelled_mapping_is_found_when_the_tool_is_guarded():
    guard = ToolGuard(
        "payments.refund.issue",
        resource_kind="payments.refund",
        resource_arg="refundId",
        attrs={"amount": "amout"},
    )

    guard.check_arguments("ok", {"refundId", "amout"})
    with pytest.raises(ValueError) as caught:
        guard.check_arguments("issue_refund", {"refund_id", "amount"})

    assert str(caught.value) == (
        "guard_tool: 'refundId', 'amout' not among tool 'issue_refund''s"
        " arguments (amount, refund_id)"
    )


def test_a_nested_model_argument_is_sent_as_the_map_of_its_fields(running, client):
    # pydantic comes with the daemon's own dependencies (mcp).
    import pydantic

    class Money(pydantic.BaseModel):
        amount: int
        currency: str

    guard = ToolGuard(
        "payments.refund.issue",
        client=client,
        resource_kind="payments.refund",
        resource_arg="refund_id",
        attrs={"money": "money", "lines": "lines"},
    )
    call = {"refund_id": "rf_m", "money": Money(amount=5, currency="EUR")}
    call["lines"] = [Money(amount=2, currency="EUR")]

    with acting_for(user="alice"):
        verdict = guard.check("issue_refund", call)

    record = audit_records(running)[verdict.decision_id]
    money = {"map": {"amount": {"int": "5"}, "currency": {"string": "EUR"}}}
    line = {"map": {"amount": {"int": "2"}, "currency": {"string": "EUR"}}}
    assert record.resource.attributes == {"money": money, "lines": {"list": [line]}}


def test_settings_rebuild_the_same_guard():
    guard = ToolGuard(
        "payments.refund.issue",
        on_approval="wait",
        approval_timeout=30,
        fail_open=True,
        context=["region"],
        **{k: v for k, v in REFUND.items() if k != "attrs"},
        attrs={"sum": "amount"},
    )

    settings = guard.settings()

    assert settings == {
        "action": "payments.refund.issue",
        "resource_kind": "payments.refund",
        "resource_arg": "refund_id",
        "attrs": {"sum": "amount"},
        "context": {"region": "region"},
        "on_approval": "wait",
        "approval_timeout": 30.0,
        "fail_open": True,
    }
    assert ToolGuard(**settings).settings() == settings
