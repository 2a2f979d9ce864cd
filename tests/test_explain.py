"""Explain: the trace of every rule, from the engine, the CLI and Decide."""

from __future__ import annotations

import subprocess
import sys

import msgspec
import pytest
from cases_loader import POLICIES_DIR, load_cases
from kynara.v1 import decision_pb2 as pb
from support import REPO_ROOT, read_record, small_refund, value_to_proto

from kynara_sidecar.decision import (
    DecisionRequest,
    Effect,
    Env,
    Resource,
    Verdict,
)
from kynara_sidecar.engine import evaluate
from kynara_sidecar.errors import ReasonCode
from kynara_sidecar.policy import load_policies
from kynara_sidecar.policy_tests import decide, format_explanation, load_request

SHIPPED = load_policies(POLICIES_DIR)
CASES = load_cases()
SHIPPED_REQUEST = REPO_ROOT / "config" / "requests" / "refund-over-limit.yaml"
CLI = [sys.executable, "-m", "kynara_sidecar.cli"]


def refund(amount, *chain: str) -> DecisionRequest:
    return DecisionRequest(
        chain=chain or ("alice", "support-bot"),
        action="payments.refund.issue",
        resource=Resource("payments.refund", "rf-1", {"amount": amount}),
        context={"region": "DE"},
    )


def explained(request: DecisionRequest):
    now = CASES[0].now
    return evaluate(
        SHIPPED.policy_set, SHIPPED.directory, request, Env(now), explain=True
    )


def traces_of(decision, principal: str) -> dict[str, object]:
    (found,) = [
        item for item in decision.explanation.principals if item.principal == principal
    ]
    return {f"{trace.policy}/{trace.rule}": trace for trace in found.rules}


# --- the engine ---------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_explaining_never_changes_the_decision(case):
    plain = evaluate(SHIPPED.policy_set, SHIPPED.directory, case.request, Env(case.now))

    traced = evaluate(
        SHIPPED.policy_set,
        SHIPPED.directory,
        case.request,
        Env(case.now),
        explain=True,
    )

    assert plain.explanation is None
    assert traced.explanation is not None
    assert msgspec.structs.replace(traced, explanation=None) == plain


def test_trace_lists_every_candidate_with_its_verdict():
    decision = explained(refund(50001))

    traces = traces_of(decision, "alice")
    assert {name: trace.verdict for name, trace in traces.items()} == {
        "admin/admin-everything": Verdict.NOT_EVALUATED,
        "crm/read-contacts-business-hours": Verdict.NOT_EVALUATED,
        "payments/refund-not-negative": Verdict.NOT_HELD,
        "payments/refund-small": Verdict.NOT_HELD,
        "payments/refund-large": Verdict.HELD,
        "region-block/blocked-region": Verdict.NOT_HELD,
    }
    assert traces["payments/refund-large"].condition == "resource.attr.amount > 50000"


def test_near_misses_say_which_part_did_not_match():
    decision = explained(refund(100))

    traces = traces_of(decision, "alice")
    admin, crm = (
        traces["admin/admin-everything"],
        traces["crm/read-contacts-business-hours"],
    )
    assert (admin.action_matched, admin.resource_matched, admin.roles_matched) == (
        True,
        True,
        False,
    )
    assert (crm.action_matched, crm.resource_matched, crm.roles_matched) == (
        False,
        False,
        True,
    )


def test_a_rule_matching_neither_patterns_nor_roles_is_left_out():
    decision = explained(refund(100, "erin", "readonly-bot"))

    assert "crm/read-contacts-business-hours" not in traces_of(decision, "erin")
    assert "crm/read-contacts-business-hours" in traces_of(decision, "readonly-bot")


def test_trace_carries_the_condition_error():
    decision = explained(refund("50000"))

    trace = traces_of(decision, "alice")["payments/refund-small"]
    assert trace.verdict is Verdict.ERRORED
    assert trace.error
    assert trace.error in {e.message for e in decision.condition_errors}


def test_each_principal_says_what_decided_it_and_the_summary_combines():
    decision = explained(refund(100, "carol", "readonly-bot"))

    alice, bot = decision.explanation.principals
    assert (alice.principal, alice.effect, alice.decided_by) == (
        "carol",
        Effect.ALLOW,
        "admin/admin-everything",
    )
    assert (bot.principal, bot.effect, bot.reason_code, bot.decided_by) == (
        "readonly-bot",
        Effect.DENY,
        ReasonCode.NO_RULE_ALLOWS,
        "",
    )
    assert decision.explanation.summary.endswith(
        "the chain takes the strictest, deny from 'readonly-bot'"
    )


def test_a_refused_chain_is_explained_without_rules():
    decision = explained(refund(100, "zed", "support-bot"))

    assert decision.explanation.principals == ()
    assert decision.explanation.summary == (
        "refused before any rule ran: principal 'zed' is not in the directory"
    )


# --- the CLI ------------------------------------------------------------------


def test_cli_explains_the_shipped_request():
    result = subprocess.run(
        [
            *CLI,
            "explain",
            "--request",
            str(SHIPPED_REQUEST),
            "--policies",
            str(POLICIES_DIR),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "decision: require_approval (approval_required)"
    assert (
        "principal alice (roles: employee, support): require_approval "
        "(approval_required) by payments/refund-large"
    ) in lines
    assert "  admin/admin-everything [allow]: near miss, roles did not match" in lines
    assert (
        "  payments/refund-large [require_approval]: patterns and roles match, "
        "condition true"
    ) in lines
    assert "      when resource.attr.amount > 50000" in lines
    assert lines[-1].startswith("combined: each principal is decided alone")


def test_cli_explain_names_a_bad_request_file(tmp_path):
    path = tmp_path / "req.yaml"
    path.write_text("request: {now: '2026-12-07T10:00:00Z', chain: [alice]}\n")

    result = subprocess.run(
        [*CLI, "explain", "--request", str(path), "--policies", str(POLICIES_DIR)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )

    assert result.returncode == 1
    assert f"{path}:$.request: expected field 'action', got nothing" in result.stderr


def test_shipped_request_explains_both_principals_of_its_chain():
    decision = decide(SHIPPED, load_request(SHIPPED_REQUEST), explain=True)

    lines = format_explanation(decision).splitlines()

    headers = [line.split(" (")[0] for line in lines if line.startswith("principal ")]
    assert headers == ["principal alice", "principal support-bot"]


# --- Decide over gRPC ---------------------------------------------------------


def test_decide_with_explain_returns_the_trace(daemon):
    request = small_refund()
    request.explain = True

    reply = daemon.stub().Decide(request)

    assert reply.decision == pb.DECISION_ALLOW
    alice, bot = reply.explanation.principals
    assert (alice.principal, bot.principal) == ("alice", "support-bot")
    assert alice.decision == pb.DECISION_ALLOW
    assert alice.decided_by == "payments/refund-small"
    rules = {f"{t.policy}/{t.rule}": t for t in alice.rules}
    assert rules["payments/refund-small"].verdict == pb.VERDICT_HELD
    assert rules["payments/refund-large"].verdict == pb.VERDICT_NOT_HELD
    assert rules["admin/admin-everything"].roles_matched is False
    assert rules["admin/admin-everything"].verdict == pb.VERDICT_NOT_EVALUATED
    assert reply.explanation.summary.startswith("each principal is decided alone")


def test_decide_without_explain_has_no_trace(daemon):
    reply = daemon.stub().Decide(small_refund())

    assert not reply.HasField("explanation")


def test_explanation_is_not_in_the_audit_record(daemon):
    stub = daemon.stub()
    request = small_refund()
    request.resource.attributes["amount"].CopyFrom(value_to_proto("oops"))
    plain = stub.Decide(request)
    request.explain = True

    traced = stub.Decide(request)

    assert traced.explanation.principals
    assert (traced.decision, traced.reason) == (plain.decision, plain.reason)
    volatile = {"seq", "decision_id", "time"}
    records = [
        {
            key: value
            for key, value in msgspec.to_builtins(read_record(daemon, seq)).items()
            if key not in volatile
        }
        for seq in (plain.audit_sequence, traced.audit_sequence)
    ]
    assert records[0] == records[1]
    stored = daemon.daemon._store.get(traced.audit_sequence).record_bytes
    assert b"explanation" not in stored
    assert b"not_evaluated" not in stored


# --- limits -------------------------------------------------------------------


def explain_cli(tmp_path, limits: str) -> subprocess.CompletedProcess:
    from limits_support import limits_policies, request_with

    policies = limits_policies(tmp_path / "policies")
    path = tmp_path / "req.yaml"
    path.write_text(request_with(limits))
    return subprocess.run(
        [*CLI, "explain", "--request", str(path), "--policies", str(policies)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )


@pytest.mark.parametrize(
    ("count", "first", "exceeded"),
    [(4, "decision: allow (rule_allowed)", "false"), (5, "decision: deny", "true")],
)
def test_cli_explain_decides_with_the_given_count_and_lists_it(
    tmp_path, count, first, exceeded
):
    result = explain_cli(tmp_path, f"{{refunds_today: {{count: {count}}}}}")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(first)
    assert (
        f"  refunds_today: count {count}, ceiling 5, remaining {5 - count}, "
        f"exceeded {exceeded}; window start 2026-12-06T23:00:00Z, "
        'key ["alice"], scope daemon (given)'
    ) in lines


def test_cli_explain_says_a_limit_not_given_is_an_empty_window(tmp_path):
    result = explain_cli(tmp_path, "{refund_total_week: {sum: 9600}}")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "decision: deny (rule_denied)"
    assert (
        "  refund_total_week: count 0, sum 9600, ceiling 10000, remaining 400, "
        "exceeded true; window start 2026-11-30T09:00:00Z, "
        'key ["support-bot"], scope daemon (given)'
    ) in lines
    assert any(
        line.startswith("  refunds_today: count 0, ceiling 5, remaining 5")
        and line.endswith("(not given: as an empty window, count 0)")
        for line in lines
    ), lines


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        (
            "{refund_today: {count: 5}}",
            "$.request.limits.refund_today: expected a limit the policies "
            "declare (refund_total_week, refunds_today), got 'refund_today'",
        ),
        (
            "{refunds_today: {total: 5}}",
            "$.request.limits.refunds_today: expected only known fields, got "
            "unknown field 'total'",
        ),
        (
            "{refunds_today: {sum: 5}}",
            "$.request.limits.refunds_today.sum: limit 'refunds_today' counts "
            "decisions and has no sum",
        ),
    ],
)
def test_cli_explain_names_a_bad_limit_with_file_and_location(
    tmp_path, limits, message
):
    result = explain_cli(tmp_path, limits)

    assert result.returncode == 1
    assert f"{tmp_path / 'req.yaml'}:{message}" in result.stderr


def limited_refund(explain: bool) -> pb.DecideRequest:
    return pb.DecideRequest(
        asserted_chain=["alice"],
        action="payments.refund.issue",
        resource=pb.Resource(kind="payments.refund", id="rf-1"),
        context={"amount": value_to_proto(500)},
        explain=explain,
    )


def test_decide_with_explain_carries_the_limits_it_saw(start_daemon, tmp_path):
    from limits_support import limits_policies

    policies = limits_policies(tmp_path / "limited")
    stub = start_daemon(f"policy.source={policies}").stub()
    plain = [stub.Decide(limited_refund(False)) for _ in range(5)]

    sixth = stub.Decide(limited_refund(True))

    assert [reply.decision for reply in plain] == [pb.DECISION_ALLOW] * 5
    assert all(not reply.limits for reply in plain)
    assert sixth.decision == pb.DECISION_DENY
    today = sixth.limits["refunds_today"]
    assert (today.count, today.ceiling.int_value, today.key) == (5, 5, '["alice"]')
    assert (today.scope, today.counted, today.error) == ("daemon", False, "")
    assert not today.HasField("sum")
    assert today.HasField("window_start")
    week = sixth.limits["refund_total_week"]
    assert (week.count, week.sum.int_value, week.ceiling.int_value) == (5, 2500, 10000)
