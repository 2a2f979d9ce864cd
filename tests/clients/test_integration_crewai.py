"""CrewAI tools guarded by kynara_sdk.integrations.crewai, in .venvs/crewai
(crewai wants mcp below 2, so not in the daemon's venv), against a real
daemon over the fast path and over gRPC: a CrewAI agent on a scripted model
calls them, and what the model read, what the trace recorded and what the
audit log holds must agree. No network: the scenario refuses and reports
every connection that is not a Unix socket."""

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

SCENARIO = pathlib.Path(__file__).with_name("crewai_scenario.py")
TRANSPORTS = ["fast", "grpc"]


@pytest.fixture
def python():
    return venv_python("crewai")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_agent_runs_the_allowed_refund_and_not_the_denied_crm_read(
    python, running, transport
):
    seen = run_scenario(python, SCENARIO, "agent", running.target, transport)

    assert seen["network"] == []
    assert seen["transport"] == transport
    # Two agent loops, ReAct text and native tool calls: in each the refund
    # ran once and the CRM read never, and the model read why.
    assert seen["loop_bodies"] == {"issue_refund": 1}
    assert seen["native_bodies"] == {"issue_refund": 1}
    events = seen["on_decision"]
    for run, amount, refund_id, (allowed, denied) in (
        (seen["run"], 1200, "rf_1", events[0:2]),
        (seen["native"], 700, "rf_5", events[2:4]),
    ):
        assert run["answer"] == "done"
        refunded, refused = run["observations"]
        assert refunded == f"refunded {amount} on {refund_id}"
        assert refused.startswith(
            "Permission denied for read_contact (crm.contact.read): rule"
            " region-block/blocked-region denies"
        )
        assert refused.endswith(
            f"[rule_denied; decision {denied['decision_id']}]. The tool did not"
            " run. (code: permission_denied)"
        )
        # The trace (on_decision) has each call, allowed or not.
        assert (allowed["tool"], allowed["decision"], allowed["allowed"]) == (
            "issue_refund",
            "allow",
            True,
        )
        assert (denied["tool"], denied["decision"], denied["allowed"]) == (
            "read_contact",
            "deny",
            False,
        )
        # The refusal's metadata, as CrewAI records a failed tool call.
        [failure] = run["tool_failures"]
        assert (failure["tool"], failure["code"]) == (
            "read_contact",
            "permission_denied",
        )
        assert failure["kynara"]["decision_id"] == denied["decision_id"]
        assert failure["kynara"]["decision"] == "deny"
    failed = [e["kynara"]["decision_id"] for e in seen["failure_events"]]
    assert events[1]["decision_id"] in failed
    assert events[3]["decision_id"] in failed

    # The event bus (handlers in CrewAI's threads) saw the same decisions
    # and those of the calls below; the audit log holds each, for the same
    # action and decision.
    assert len(events) == 5  # the 5th: the CRM tool in the run that raises
    assert all(event in seen["events"] for event in events)
    assert len(seen["events"]) == 8
    assert_in_audit_log(audit_records(running), seen["events"])

    # tool_failure_policy="raise": CrewAI's exception carries the decision.
    raised = seen["raised"]
    assert raised["type"] == "ToolExecutionFailedError"
    assert raised["code"] == "permission_denied"
    assert raised["kynara"]["decision"] == "deny"
    assert raised["kynara"]["decision_id"] in audit_records(running)
    assert raised["kynara"]["decision_id"] == events[4]["decision_id"]
    assert raised["kynara"]["decision_id"] in raised["message"]

    # Awaited directly: the async client, and the async body on allow only.
    awaited = seen["awaited"]
    assert awaited["allowed"] == "refunded 300 on rf_2"
    assert awaited["refused"].startswith("Permission denied for read_contact")
    assert awaited["refused_kynara"]["reason_code"] == "rule_denied"
    assert awaited["ran"] == "contact ct_9"
    assert seen["bodies"] == {"issue_refund": 3, "aread_contact": 1}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_large_refund_waits_for_a_reviewer_then_runs_once(python, running, transport):
    refund_id = f"rf_big_{transport}"

    asked = run_scenario(
        python, SCENARIO, "approval", running.target, transport, refund_id
    )

    assert asked["network"] == []
    assert asked["bodies"] == {}
    [message] = asked["run"]["observations"]
    assert "issue_refund (payments.refund.issue) needs a reviewer's approval at " in (
        message
    )
    assert "once approved, call it again with the same arguments" in message
    [event] = asked["events"]
    assert (event["decision"], event["error"]) == (
        "require_approval",
        "approval_required",
    )
    [failure] = asked["run"]["tool_failures"]
    approval = failure["kynara"]["approval"]
    assert approval["url"] and approval["url"] in message
    assert f"approval {approval['id']}" in message

    approve(running, approval["id"])
    retried = run_scenario(
        python, SCENARIO, "approval", running.target, transport, refund_id
    )

    assert retried["bodies"] == {"issue_refund": 1}
    assert retried["run"]["observations"] == [f"refunded 60000 on {refund_id}"]
    assert retried["run"]["tool_failures"] == []
    [event] = retried["events"]
    assert (event["decision"], event["reason_code"]) == ("allow", "approval_granted")
    assert_in_audit_log(audit_records(running), [*asked["events"], *retried["events"]])


def test_an_unreachable_daemon_keeps_the_tool_closed_unless_fail_open(
    python, socket_dir
):
    nowhere = f"unix://{socket_dir / 'nowhere' / 'agent.sock'}"

    seen = run_scenario(python, SCENARIO, "unreachable", nowhere)

    assert seen["network"] == []
    assert seen["closed_bodies"] == {}
    [message] = seen["closed"]["observations"]
    assert message.startswith("Kynara could not decide on issue_refund")
    assert "[daemon_unreachable]" in message
    assert seen["closed"]["tool_failures"][0]["code"] == "daemon_unreachable"
    # fail_open=True: the body ran, and a warning says so.
    assert seen["bodies"] == {"issue_refund": 1}
    assert seen["open"]["observations"] == ["refunded 20 on rf_4"]
    [warning] = seen["warnings"]
    assert warning.startswith("WARNING failing open: issue_refund")
    assert "daemon_unreachable" in warning
    assert [(e["allowed"], e["failed_open"]) for e in seen["events"]] == [
        (False, False),
        (True, True),
    ]
    # Mistakes in wrapping are told at once.
    assert seen["mistakes"] == {
        "not_a_tool": "TypeError: guard_tool: expected a CrewAI BaseTool, got"
        " builtin_function_or_method (make a function a tool with"
        " crewai.tools.tool first)",
        "unknown_argument": "ValueError: guard_tool: 'amout' not among tool"
        " 'issue_refund''s arguments (amount, refund_id)",
    }


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_guarded_tool_comes_back_from_a_checkpoint_still_guarded(
    python, running, transport, tmp_path
):
    directory = str(tmp_path / "checkpoints")

    before = run_scenario(
        python, SCENARIO, "checkpoint", running.target, transport, directory
    )
    # A new process, as after a crash: only the checkpoint is left.
    after = run_scenario(python, SCENARIO, "restore", directory)

    assert before["network"] == after["network"] == []
    assert before["crashed"] == "ScriptedLLM: asked for more replies than scripted"
    assert before["bodies"] == {"issue_refund": 1}
    assert before["checkpoints"] == 1
    assert after["types"] == [
        "issue_refund GuardedTool",
        "lookup_contact GuardedTool",
        "read_contact GuardedTool",
    ]
    assert after["guarded"]
    # Without CrewAI's consent to restore callbacks, the refund (whose
    # on_decision the checkpoint keeps by name) refuses to run.
    refused = after["without_consent"]
    assert refused["code"] == "guard_not_restored"
    assert refused["message"].startswith(
        "Kynara could not decide on issue_refund (payments.refund.issue): tool"
        " 'issue_refund' came back from a checkpoint without its guard"
    )
    assert "CREWAI_DESERIALIZE_CALLBACKS=1" in refused["message"]
    # The lookup (an @tool made inside a function) cannot come back: closed
    # when awaited too, and it says so when asked for the tool it guards.
    assert after["awaited_code"] == "guard_not_restored"
    assert after["unwrapped"].startswith(
        "tool 'lookup_contact' came back from a checkpoint without its guard"
    )
    # With it, the crew resumes at the second task: the daemon denies the
    # CRM read and allows the refund, as before the checkpoint; the lookup
    # made inside a function cannot come back guarded, so it stays closed.
    assert after["tasks"] == ["done", "done"]
    denied, refunded, closed = after["observations"]
    assert denied.startswith(
        "Permission denied for read_contact (crm.contact.read): rule"
        " region-block/blocked-region denies"
    )
    assert refunded == "refunded 700 on rf_c3"
    assert closed.startswith(
        "Kynara could not decide on lookup_contact (crm.contact.read): tool"
        " 'lookup_contact' came back from a checkpoint without its guard"
        " (ValueError: the tool guarded is a @tool function that is not a"
        " module's attribute, so a checkpoint does not keep it); guard the"
        " tool again [guard_not_restored]. The tool did not run."
    )
    assert after["bodies"] == {"issue_refund": 1}
    assert [(f["tool"], f["code"]) for f in after["tool_failures"]] == [
        ("read_contact", "permission_denied"),
        ("lookup_contact", "guard_not_restored"),
    ]
    # The restored on_decision (in the caller's thread, in order) and the
    # event bus saw the same decisions; the audit log holds them.
    decided = after["noted"]
    assert [(e["tool"], e["decision"]) for e in decided] == [
        ("read_contact", "deny"),
        ("issue_refund", "allow"),
    ]
    assert sorted(map(str, decided)) == sorted(
        str(e) for e in after["events"] if e["decision_id"]
    )
    assert sum(e["error"] == "guard_not_restored" for e in after["events"]) == 3
    assert_in_audit_log(audit_records(running), [*before["events"], *decided])


def test_the_readme_example_runs(python, running, tmp_path):
    example = tmp_path / "example.py"
    example.write_text(readme_example("CrewAI"))

    seen = run_scenario(
        python, SCENARIO, "readme", str(example), KYNARA_TARGET=running.target
    )

    assert seen["network"] == []
    refunded, held, decision_id = seen["printed"]
    assert refunded == "refunded 1200 on rf_1"
    assert held.startswith("issue_refund (payments.refund.issue) needs a reviewer's")
    assert held.endswith(f"decision {decision_id}). The tool did not run; once"
                         " approved, call it again with the same arguments."
                         " (code: approval_required)")  # fmt: skip
    assert audit_records(running)[decision_id].decision == "require_approval"


def test_a_used_up_tool_is_refused_without_asking(python, running):
    seen = run_scenario(python, SCENARIO, "usage", running.target)

    assert seen["first"] == "refunded 100 on rf_u1"
    assert seen["second"]["reason"] == "usage_limit"
    assert "usage limit of 1" in seen["second"]["message"]
    assert seen["bodies"] == {"once": 1}
    # Only the call that ran was decided and audited.
    [event] = seen["events"]
    assert (event["decision"], event["allowed"]) == ("allow", True)
    records = audit_records(running)
    assert [r.resource.id for r in records.values()] == ["rf_u1"]
