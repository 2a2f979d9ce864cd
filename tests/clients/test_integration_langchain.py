"""LangChain tools guarded by kynara_sdk.integrations.langchain, in
.venvs/langchain (langchain-core beside the SDK and its gRPC extra), against
a real daemon: an agent loop driven by langchain-core's scripted fake chat
model, approvals, an unreachable daemon, and the README's example. The
decision ids the agent saw are checked against the audit log."""

from __future__ import annotations

import pathlib

import pytest
from integration_support import (
    approve,
    assert_in_audit_log,
    audit_records,
    readme_example,
    reviewer_settings,
    run_scenario,
    venv_python,
)

SCENARIO = pathlib.Path(__file__).with_name("langchain_scenario.py")
REFUND = "payments.refund.issue"
CRM = "crm.contact.read"


@pytest.fixture
def python() -> pathlib.Path:
    return venv_python("langchain")


def guarded_records(records: list[dict]) -> list[dict]:
    assert all(r["guarded"] for r in records), records
    return records


@pytest.mark.parametrize("transport", ["fast", "grpc"])
def test_an_agent_loop_runs_the_allowed_tool_and_tells_the_model_why_not(
    python, start_daemon, socket_dir, transport
):
    running = start_daemon(path=socket_dir)

    seen = run_scenario(python, SCENARIO, "agent", running.target, transport)

    assert seen["transport"] == transport
    audit = audit_records(running)
    for mode, refund, contact in (
        ("sync", "issue_refund", "read_contact"),
        ("async", "aissue_refund", "aread_contact"),
    ):
        loop = seen[mode]
        allowed, denied = loop["tool_messages"]
        assert allowed["name"] == refund
        assert allowed["status"] == "success"
        assert allowed["content"] == "refunded 1200 on rf_1"
        assert allowed["kynara"]["decision"] == "allow"
        assert denied["name"] == contact
        assert denied["status"] == "error"
        assert denied["content"].startswith(f"Permission denied for {contact} ({CRM}):")
        assert f"[{denied['kynara']['reason_code']}; decision " in denied["content"]
        assert "blocked-region" in denied["content"]
        assert denied["kynara"]["decision"] == "deny"
        assert denied["kynara"]["decision_id"] in denied["content"]
        assert "The tool did not run." in denied["content"]
        assert loop["final"] == "done"
        # One callback record per tool start, joined to its decision, and
        # the same decision ids as the tool messages and the audit log.
        records = guarded_records(loop["records"])
        assert [
            (r["tool"], r["tool_call_id"], r["decision"], r["status"]) for r in records
        ] == [
            (refund, "c1", "allow", "success"),
            (contact, "c2", "deny", "error"),
        ]
        assert [r["decision_id"] for r in records] == [
            allowed["kynara"]["decision_id"],
            denied["kynara"]["decision_id"],
        ]
        assert_in_audit_log(audit, records)
        assert audit[records[1]["decision_id"]].reason_code == records[1]["reason_code"]
    # Other kinds of tool keep their schema, artifact and single input.
    shapes = seen["shapes"]
    assert shapes["same_schema"] == [True] * 3
    # A single-input Tool is shown as one string argument either way (the
    # guarded one's JSON schema loses the property's title on the way).
    for parameters in shapes["single_input"]:
        assert parameters["required"] == ["__arg1"]
        assert parameters["properties"]["__arg1"]["type"] == "string"
    assert shapes["message"]["content"] == "refunded 100"
    assert shapes["message"]["kynara"]["decision"] == "allow"
    assert shapes["artifact"] == {"amount": 100, "run": True}
    assert shapes["lookup"] == "contact ct_5"
    assert_in_audit_log(audit, [{"action": REFUND, **shapes["message"]["kynara"]}])
    # The denied bodies never ran; the allowed ones once each.
    assert seen["bodies"] == {
        "issue_refund": 1,
        "aissue_refund": 1,
        "refund_by_class": 1,
        "lookup_contact": 1,
    }
    # Without a tool call the refusal is the exception, with its decision id.
    direct = seen["direct"]
    assert direct["type"] == "PermissionDenied"
    assert direct["code"] == "permission_denied"
    (record,) = direct["records"]
    assert record["decision_id"] == direct["decision_id"]
    assert record["status"] == "error"
    assert_in_audit_log(audit, [record])


@pytest.mark.parametrize("transport", ["fast", "grpc"])
def test_a_refund_held_for_approval_runs_once_when_called_again_after_approval(
    python, start_daemon, socket_dir, transport
):
    running = start_daemon(*reviewer_settings(socket_dir), path=socket_dir)

    asked = run_scenario(python, SCENARIO, "approval", running.target, transport)

    held = asked["message"]
    assert held["status"] == "error"
    assert held["kynara"]["decision"] == "require_approval"
    approval = held["kynara"]["approval"]
    assert approval["url"] and approval["url"] in held["content"]
    assert approval["id"] in held["content"]
    assert "call it again with the same arguments" in held["content"]
    assert asked["bodies"] == {}

    approve(running, approval["id"])
    again = run_scenario(python, SCENARIO, "approval", running.target, transport)

    ran = again["message"]
    assert ran["status"] == "success"
    assert ran["content"] == "refunded 60000 on rf_9"
    assert ran["kynara"]["decision"] == "allow"
    assert ran["kynara"]["reason_code"] == "approval_granted"
    assert again["bodies"] == {"issue_refund": 1}
    audit = audit_records(running)
    records = guarded_records(asked["records"] + again["records"])
    assert [r["decision_id"] for r in records] == [
        held["kynara"]["decision_id"],
        ran["kynara"]["decision_id"],
    ]
    assert_in_audit_log(audit, records)
    assert audit[ran["kynara"]["decision_id"]].reason_code == "approval_granted"


def test_an_unreachable_daemon_fails_closed_unless_fail_open_is_spelled_out(
    python, socket_dir
):
    target = f"unix://{socket_dir / 'nowhere' / 'agent.sock'}"

    seen = run_scenario(python, SCENARIO, "unreachable", target)

    closed = seen["closed"]
    for message in (closed["message"], closed["async_message"]):
        assert message["status"] == "error"
        assert "[daemon_unreachable]" in message["content"]
        assert "The tool did not run." in message["content"]
        assert message["kynara"]["error"] == "daemon_unreachable"
        assert message["kynara"]["decision_id"] == ""
    assert closed["bodies"] == {}
    assert closed["log"] == []
    assert [r["error"] for r in closed["records"]] == ["daemon_unreachable"] * 2

    opened = seen["open"]
    for message in (opened["message"], opened["async_message"]):
        assert message["status"] == "success"
        assert message["content"] == "refunded 1200 on rf_1"
        assert message["kynara"]["failed_open"] is True
        assert message["kynara"]["error"] == "daemon_unreachable"
    assert opened["bodies"] == {"issue_refund": 1, "aissue_refund": 1}
    assert [(line["logger"], line["level"]) for line in opened["log"]] == [
        ("kynara_sdk.guard", "WARNING")
    ] * 2
    assert (
        "failing open: issue_refund (payments.refund.issue)"
        in (opened["log"][0]["message"])
    )
    assert "aissue_refund" in opened["log"][1]["message"]
    assert [r["failed_open"] for r in opened["records"]] == [True, True]


def test_the_readme_example_runs_as_printed(python, start_daemon, socket_dir):
    running = start_daemon(path=socket_dir)
    example = socket_dir / "langchain_example.py"
    example.write_text(readme_example("LangChain"), encoding="utf-8")

    seen = run_scenario(
        python, SCENARIO, "readme", str(example), KYNARA_TARGET=running.target
    )

    allowed, held = seen["stdout"].splitlines()
    assert allowed == "success allow refunded 1200"
    assert held.startswith(
        "error require_approval issue_refund (payments.refund.issue) needs a"
        " reviewer's approval at "
    )
