"""AutoGen tools guarded by kynara_sdk.integrations.autogen, in .venvs/autogen
(autogen-core pins protobuf 5.29, so not in the daemon's venv), against a
real daemon over the fast path and over gRPC: an AssistantAgent on a
scripted model calls them, and what the model read, what the trace and the
callback recorded and what the audit log holds must agree."""

from __future__ import annotations

import pathlib

import pytest
from integration_support import (
    approve,
    assert_in_audit_log,
    audit_records,
    readme_example,
    run_scenario,
    venv_python,
)

SCENARIO = pathlib.Path(__file__).with_name("autogen_scenario.py")
TRANSPORTS = ["fast", "grpc"]


@pytest.fixture
def python():
    return venv_python("autogen")


def scenario(python, target: str, transport: str, part: str) -> dict:
    return run_scenario(python, SCENARIO, target, transport, part, transport)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_agent_runs_the_allowed_refund_and_not_the_denied_crm_read(
    python, running, transport
):
    seen = scenario(python, running.target, transport, "loop")

    assert seen["transport"] == transport
    assert seen["runs"] == {"issue_refund": 1, "read_contact": 0}
    refund, crm = (
        seen["turn"]["model_saw"]["call_0"],
        seen["turn"]["model_saw"]["call_1"],
    )
    assert refund == {
        "name": "issue_refund",
        "content": f"refunded 1200 on rf_{transport}",
        "is_error": False,
    }
    assert crm["is_error"] is True
    assert crm["content"].startswith("Permission denied for read_contact")
    assert "region-block/blocked-region" in crm["content"]
    assert "[rule_denied; decision" in crm["content"]
    assert "The tool did not run." in crm["content"]
    # The agent runs the two calls concurrently: either may come first.
    events = sorted(seen["events"], key=lambda e: e["call_id"])
    assert [(e["tool"], e["decision"], e["call_id"]) for e in events] == [
        ("issue_refund", "allow", "call_0"),
        ("read_contact", "deny", "call_1"),
    ]
    assert sorted(seen["callback"], key=lambda e: e["call_id"]) == events
    assert events[1]["decision_id"] in crm["content"]
    assert_in_audit_log(audit_records(running), events)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_refusal_raises_with_the_decision_id_and_bad_arguments_ask_nothing(
    python, running, transport
):
    seen = scenario(python, running.target, transport, "exception")

    raised = seen["raised"]
    assert seen["same_face"] is True  # name, description and schema
    assert seen["bad_arguments"] == "amount"  # refused before any check
    assert seen["wrong_settings"] == [
        "guard_tool: AutoGen runs tools as coroutines; pass"
        " async_client=AsyncClient(...), not client=",
        "guard_tool: 'amout' not among tool 'issue_refund''s arguments"
        " (amount, refund_id)",
    ]
    assert len(seen["events"]) == 1
    assert seen["runs"] == {"issue_refund": 0, "read_contact": 0}
    assert raised["code"] == "permission_denied"
    assert raised["cause"] == "PermissionDenied"
    assert raised["decision_id"] == seen["events"][0]["decision_id"] != ""
    assert raised["text"].startswith("Permission denied for read_contact")
    assert_in_audit_log(audit_records(running), seen["events"])


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_large_refund_runs_once_after_a_reviewer_approves(python, running, transport):
    asked = scenario(python, running.target, transport, "approval")

    said = asked["turn"]["model_saw"]["call_0"]
    [event] = asked["events"]
    approval = event["approval"]
    assert asked["runs"]["issue_refund"] == 0
    assert event["decision"] == "require_approval"
    assert said["is_error"] is True
    assert approval["url"] and approval["url"] in said["content"]
    assert "needs a reviewer's approval" in said["content"]

    approve(running, approval["id"])
    again = scenario(python, running.target, transport, "retry")

    [granted] = again["events"]
    assert again["runs"]["issue_refund"] == 1
    assert again["turn"]["model_saw"]["call_0"]["content"] == (
        f"refunded 60000 on rf_{transport}_big"
    )
    assert (granted["decision"], granted["reason_code"]) == (
        "allow",
        "approval_granted",
    )
    assert_in_audit_log(audit_records(running), [event, granted])


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_unreachable_daemon_fails_closed_unless_fail_open_says_so(
    python, socket_dir, transport
):
    nowhere = f"unix://{socket_dir / 'nowhere' / 'agent.sock'}"

    seen = scenario(python, nowhere, transport, "unreachable")

    assert seen["runs"]["issue_refund"] == 0
    assert seen["closed"]["is_error"] is True
    assert "[daemon_unreachable]" in seen["closed"]["text"]
    assert "The tool did not run." in seen["closed"]["text"]
    assert seen["open_runs"]["issue_refund"] == 1
    assert seen["opened"] == {
        "text": f"refunded 1200 on rf_{transport}",
        "is_error": False,
    }
    assert [e["failed_open"] for e in seen["events"]] == [False, True]
    assert [e["error"] for e in seen["events"]] == ["daemon_unreachable"] * 2
    [warning] = seen["warnings"]
    assert warning["level"] == "WARNING"
    assert warning["text"].startswith(
        "failing open: issue_refund (payments.refund.issue)"
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_guarded_stream_tool_streams_after_the_check_and_not_when_refused(
    python, running, transport
):
    seen = scenario(python, running.target, transport, "stream")

    tag = transport
    assert (seen["kind"], seen["streams"], seen["plain_streams"]) == (
        "GuardedStreamTool",
        True,
        False,
    )
    # Each step reaches the caller before the tool makes the next one, and
    # only after the decision; a refusal comes before any step.
    assert seen["log"] == [
        "decision allow",
        f"made reserved rf_{tag}_s1",
        f"got reserved rf_{tag}_s1",
        f"made sent rf_{tag}_s1",
        f"got sent rf_{tag}_s1",
        f"made final rf_{tag}_s1",
        f"got refunded 1200 on rf_{tag}_s1 in steps",
        "decision require_approval",
    ]
    assert seen["refused"]["code"] == "approval_required"
    [bench] = seen["bench"]  # the workbench yields the refusal alone
    assert "needs a reviewer's approval" in bench
    assert "The tool did not run;" in bench
    # In an agent: the allowed call's steps stream before its result; the
    # refused one streams nothing and the model reads why.
    turn = seen["turn"]
    assert turn["order"] == [
        f"refund_in_steps: reserved rf_{tag}_s3",
        f"refund_in_steps: sent rf_{tag}_s3",
        "executed",
        "support: Done.",
    ]
    assert turn["model_saw"]["call_0"] == {
        "name": "refund_in_steps",
        "content": f"refunded 1300 on rf_{tag}_s3 in steps",
        "is_error": False,
    }
    refused = turn["model_saw"]["call_1"]
    assert refused["is_error"] is True
    assert "needs a reviewer's approval" in refused["content"]
    assert seen["module_runs"]["refund_in_steps"] == 2
    events = seen["events"]
    assert [e["decision"] for e in events if e["call_id"] in ("s1", "s2")] == [
        "allow",
        "require_approval",
    ]
    assert seen["refused"]["decision_id"] == events[1]["decision_id"] != ""
    assert_in_audit_log(audit_records(running), events)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_agent_with_guarded_tools_is_saved_and_loaded_still_guarded(
    python, running, transport
):
    seen = scenario(python, running.target, transport, "saved")

    guarded = "kynara_sdk.integrations.autogen.GuardedTool"
    refund = {"resource_kind": "payments.refund", "resource_arg": "refund_id"}
    # The guard's settings and the wrapped tool; no client, no callback.
    assert seen["saved_tools"] == [
        {
            "provider": guarded,
            "tool": "autogen_core.tools.FunctionTool",
            "action": "payments.refund.issue",
            **refund,
            "attrs": {"amount": "amount"},
            "context": {},
            "on_approval": "wait",
            "approval_timeout": 5.0,
            "fail_open": False,
        },
        {
            "provider": guarded,
            "tool": "autogen_core.tools.FunctionTool",
            "action": "crm.contact.read",
            "resource_kind": "crm.contact",
            "resource_arg": "contact_id",
            "attrs": {},
            "context": {"region": "region"},
            "on_approval": "raise",
            "approval_timeout": 300.0,
            "fail_open": True,
        },
        {
            "provider": guarded,
            "tool": "__main__.RefundSteps",
            "action": "payments.refund.issue",
            **refund,
            "attrs": {"amount": "amount"},
            "context": {},
            "on_approval": "raise",
            "approval_timeout": 300.0,
            "fail_open": False,
        },
    ]
    assert seen["load_warnings"] == []
    # The loaded agent: the denied read did not run, the others did, and
    # the loaded stream tool still streams.
    assert seen["module_runs"] == {
        "issue_refund": 1,
        "read_contact": 0,
        "refund_in_steps": 1,
    }
    saw = seen["turn"]["model_saw"]
    assert saw["call_0"]["content"] == f"refunded 1200 on rf_{transport}_saved"
    assert saw["call_1"]["is_error"] is True
    assert "region-block/blocked-region" in saw["call_1"]["content"]
    assert saw["call_2"]["content"] == (
        f"refunded 1300 on rf_{transport}_steps in steps"
    )
    assert seen["turn"]["order"][:3] == [
        f"refund_in_steps: reserved rf_{transport}_steps",
        f"refund_in_steps: sent rf_{transport}_steps",
        "executed",
    ]
    # Asked through the shared client for $KYNARA_TARGET; the callback was
    # not saved, the event logger still records each decision.
    assert seen["loaded_transport"] == transport
    assert seen["told"] == []
    events = sorted(seen["events"], key=lambda e: e["call_id"])
    assert [(e["tool"], e["decision"], e["call_id"]) for e in events] == [
        ("issue_refund", "allow", "call_0"),
        ("read_contact", "deny", "call_1"),
        ("refund_in_steps", "allow", "call_2"),
    ]
    assert_in_audit_log(audit_records(running), events)


def test_the_readme_example_runs(python, running, tmp_path):
    # The example prints; the wrapper hands its lines back as JSON.
    example = readme_example("AutoGen")
    script = tmp_path / "readme_autogen.py"
    script.write_text(
        "import contextlib, io, json\n"
        "printed = io.StringIO()\n"
        "with contextlib.redirect_stdout(printed):\n"
        f"    exec(compile({example!r}, 'README', 'exec'), {{}})\n"
        "print(json.dumps(printed.getvalue().splitlines()))\n"
    )

    allowed, refused = run_scenario(python, script, KYNARA_TARGET=running.target)

    assert allowed == "refunded 1200 on rf_1"
    code, url, decision_id = refused.split(" ")
    assert code == "approval_required"
    assert url.startswith("http")
    record = audit_records(running)[decision_id]
    assert (record.action, record.decision) == (
        "payments.refund.issue",
        "require_approval",
    )
