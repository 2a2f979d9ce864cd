"""Shadow mode: evaluated, recorded and counted, never deciding."""

from __future__ import annotations

import pathlib
import shutil
import urllib.request

import pytest
from cases_loader import POLICIES_DIR, load_cases
from kynara.v1 import decision_pb2 as pb
from support import read_record, small_refund

from kynara_sidecar.decision import (
    DecisionRequest,
    Effect,
    Env,
    MatchedRule,
    Resource,
)
from kynara_sidecar.engine import evaluate
from kynara_sidecar.policy import LoadedPolicies, load_policies

CASES = load_cases()
SHIPPED = load_policies(POLICIES_DIR)

SHADOW_POLICY = """\
format_version: 1
kind: policy
name: shadow-all
mode: shadow
rules:
  - {id: everything, effect: %s, actions: ["*"], resources: ["*"], roles: ["*"]}
"""
# An enforced policy with one rule in shadow: a refund cap being tried out.
SHADOW_RULE = """\
format_version: 1
kind: policy
name: refund-cap
rules:
  - id: cap
    mode: shadow
    effect: deny
    actions: [payments.refund.issue]
    resources: [payments.refund]
    roles: ["*"]
    condition: resource.attr.amount > 1000
"""


def with_policy(tmp_path: pathlib.Path, text: str) -> pathlib.Path:
    root = tmp_path / "policies"
    shutil.copytree(POLICIES_DIR, root)
    (root / "extra.yaml").write_text(text)
    return root


def refund(amount: int) -> DecisionRequest:
    return DecisionRequest(
        chain=("alice", "support-bot"),
        action="payments.refund.issue",
        resource=Resource("payments.refund", "rf-1", {"amount": amount}),
        context={"region": "DE"},
    )


def decide(policies: LoadedPolicies, request: DecisionRequest, now):
    return evaluate(policies.policy_set, policies.directory, request, Env(now))


def scrape(running) -> str:
    url = f"http://127.0.0.1:{running.daemon.http_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        return reply.read().decode()


@pytest.mark.parametrize("shadow", [Effect.DENY, Effect.ALLOW])
def test_a_shadow_policy_never_changes_any_case(tmp_path, shadow):
    policies = load_policies(with_policy(tmp_path, SHADOW_POLICY % shadow))

    for case in CASES:
        baseline = decide(SHIPPED, case.request, case.now)
        shadowed = decide(policies, case.request, case.now)

        assert (shadowed.effect, shadowed.reason_code, shadowed.reason) == (
            baseline.effect,
            baseline.reason_code,
            baseline.reason,
        ), case.name
        enforced = tuple(rule for rule in shadowed.matched_rules if not rule.shadow)
        assert enforced == baseline.matched_rules, case.name


def test_a_shadow_deny_everything_would_deny_every_evaluated_chain(tmp_path):
    policies = load_policies(with_policy(tmp_path, SHADOW_POLICY % "deny"))

    shadows = {
        case.name: decide(policies, case.request, case.now).shadow_effect
        for case in CASES
    }

    refused = {"chain_with_agent_first_invalid_chain", "refund_inactive_dave_denied"}
    refused.add("refund_unknown_principal_denied")
    assert {name for name, effect in shadows.items() if effect is None} == refused
    assert {effect for name, effect in shadows.items() if name not in refused} == {
        Effect.DENY
    }


def test_a_shadow_rule_in_an_enforced_policy_reports_but_does_not_decide(tmp_path):
    policies = load_policies(with_policy(tmp_path, SHADOW_RULE))
    now = CASES[0].now

    capped = decide(policies, refund(1200), now)
    under = decide(policies, refund(900), now)

    assert (capped.effect, capped.shadow_effect) == (Effect.ALLOW, Effect.DENY)
    assert MatchedRule("refund-cap", "cap", Effect.DENY, "alice", True) in (
        capped.matched_rules
    )
    assert (under.effect, under.shadow_effect) == (Effect.ALLOW, Effect.ALLOW)
    assert not [rule for rule in under.matched_rules if rule.shadow]


def test_shadow_outcome_is_recorded_and_counted_over_grpc(start_daemon, tmp_path):
    root = with_policy(tmp_path, SHADOW_RULE)
    running = start_daemon(f"policy.source={root}")
    stub = running.stub()
    counter = 'kynara_shadow_decisions_total{decision="allow",shadow_decision="deny"}'

    capped = stub.Decide(small_refund())
    small = small_refund()
    small.resource.attributes["amount"].int_value = 900
    under = stub.Decide(small)

    assert capped.decision == pb.DECISION_ALLOW
    assert [(r.rule, r.shadow) for r in capped.matched_rules if r.shadow] == [
        ("cap", True),
        ("cap", True),
    ]
    record = read_record(running, capped.audit_sequence)
    assert (record.decision, record.shadow_effect) == ("allow", "deny")
    assert read_record(running, under.audit_sequence).shadow_effect == "allow"
    # The counter moves only when shadow rules would have decided otherwise.
    assert f"{counter} 1.0" in scrape(running)
