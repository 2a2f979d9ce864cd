"""Risk scores for a table of requests match the configured weights exactly."""

from __future__ import annotations

import datetime

import msgspec
import pytest

from kynara_sidecar.approvals.risk import score_risk
from kynara_sidecar.config import RISK_FACTORS, RiskConfig
from kynara_sidecar.decision import Effect, Resource, Timestamp
from kynara_sidecar.policy.compiler import CompiledRule
from kynara_sidecar.policy.model import ApprovalDocument

CONFIG = msgspec.convert(
    {
        "weights": {
            "rule": 40,
            "amount": 25,
            "sensitivity": 15,
            "off_hours": 5,
            "delegation_depth": 5,
            "unusual_action": 10,
        },
        "amount": {"attribute": "amount", "thresholds": [[50000, 0.5], [200000, 1.0]]},
        "sensitivity": {
            "attribute": "sensitivity",
            "levels": {"internal": 0.3, "restricted": 1.0},
        },
        "off_hours": {
            "time_zone": "Europe/Berlin",
            "start_hour": 9,
            "end_hour": 17,
            "weekdays": [1, 2, 3, 4, 5],
        },
        "full_delegation_depth": 4,
    },
    RiskConfig,
)

# 2026-12-07 is a Monday; Berlin is UTC+1 in December.
MONDAY_10_BERLIN = "2026-12-07T09:00:00Z"
MONDAY_0859_BERLIN = "2026-12-07T07:59:00Z"
MONDAY_17_BERLIN = "2026-12-07T16:00:00Z"
SATURDAY_11_BERLIN = "2026-12-05T10:00:00Z"
USER_AND_AGENT = ("alice", "support-bot")


def at(iso: str) -> Timestamp:
    return Timestamp.from_datetime(datetime.datetime.fromisoformat(iso))


def rule(risk: int | None, rule_id: str = "refund-large") -> CompiledRule:
    return CompiledRule(
        policy="payments",
        id=rule_id,
        effect=Effect.REQUIRE_APPROVAL,
        actions=("payments.refund.issue",),
        resources=("payments.refund",),
        roles=frozenset({"support"}),
        condition=None,
        shadow=False,
        order=0,
        approval=None if risk is None else ApprovalDocument(risk=risk),
    )


ASKING = (rule(50),)


def score(
    *,
    rules=ASKING,
    attributes=None,
    context=None,
    chain=USER_AND_AGENT,
    now=MONDAY_10_BERLIN,
    seen=True,
    config=CONFIG,
):
    return score_risk(
        config,
        rules=list(rules),
        resource=Resource(kind="payments.refund", id="R1", attributes=attributes or {}),
        context=context or {},
        chain=chain,
        now=at(now),
        action_seen=seen,
    )


# (id, request, {factor: points}, score); factors not named score 0 points.
TABLE = [
    ("rule-only", {}, {"rule": 20}, 20),
    (
        "amount-past-first-threshold",
        {"attributes": {"amount": 60000}},
        {"rule": 20, "amount": 12.5},
        # 32.5 rounds half up.
        33,
    ),
    (
        "amount-at-threshold-is-not-past-it",
        {"attributes": {"amount": 50000}},
        {"rule": 20},
        20,
    ),
    (
        "amount-past-the-highest-threshold",
        {"attributes": {"amount": 200001}},
        {"rule": 20, "amount": 25},
        45,
    ),
    (
        "amount-from-context-when-not-an-attribute",
        {"context": {"amount": 60000.5}},
        {"rule": 20, "amount": 12.5},
        33,
    ),
    (
        "amount-not-a-number",
        {"attributes": {"amount": "60000"}},
        {"rule": 20},
        20,
    ),
    ("amount-a-bool", {"attributes": {"amount": True}}, {"rule": 20}, 20),
    (
        "sensitivity-internal",
        {"context": {"sensitivity": "internal"}},
        {"rule": 20, "sensitivity": 4.5},
        # 24.5 rounds half up.
        25,
    ),
    (
        "sensitivity-unknown-level",
        {"attributes": {"sensitivity": "secret"}},
        {"rule": 20},
        20,
    ),
    ("saturday", {"now": SATURDAY_11_BERLIN}, {"rule": 20, "off_hours": 5}, 25),
    ("before-nine", {"now": MONDAY_0859_BERLIN}, {"rule": 20, "off_hours": 5}, 25),
    ("at-seventeen", {"now": MONDAY_17_BERLIN}, {"rule": 20, "off_hours": 5}, 25),
    (
        "one-hop-past-the-first-agent",
        {"chain": ("alice", "orchestrator", "support-bot")},
        {"rule": 20, "delegation_depth": 2.5},
        # 22.5 rounds half up.
        23,
    ),
    (
        "delegation-full-and-clamped",
        {"chain": ("alice", "a", "b", "c", "support-bot")},
        {"rule": 20, "delegation_depth": 5},
        25,
    ),
    ("unusual-action", {"seen": False}, {"rule": 20, "unusual_action": 10}, 30),
    (
        "highest-rule-risk-of-several",
        {"rules": (rule(30, "a"), rule(None, "b"), rule(80, "c"))},
        {"rule": 32},
        32,
    ),
    ("rule-without-an-approval-block", {"rules": (rule(None),)}, {}, 0),
    (
        "everything",
        {
            "rules": (rule(100),),
            "attributes": {"amount": 250000, "sensitivity": "restricted"},
            "chain": ("alice", "a", "support-bot", "x"),
            "now": SATURDAY_11_BERLIN,
            "seen": False,
        },
        {
            "rule": 40,
            "amount": 25,
            "sensitivity": 15,
            "off_hours": 5,
            "delegation_depth": 5,
            "unusual_action": 10,
        },
        100,
    ),
]


@pytest.mark.parametrize(
    ("request_", "points", "expected"),
    [row[1:] for row in TABLE],
    ids=[row[0] for row in TABLE],
)
def test_score_matches_the_configured_weights(request_, points, expected):
    risk = score(**request_)

    assert risk.score == expected
    assert [f.name for f in risk.factors] == list(RISK_FACTORS)
    got = {f.name: f.points for f in risk.factors if f.points}
    assert got == points
    for factor in risk.factors:
        assert factor.weight == CONFIG.weights[factor.name]
        assert factor.points == factor.weight * factor.fraction


def test_score_is_capped_at_100():
    heavy = msgspec.structs.replace(
        CONFIG, weights={name: 100.0 for name in RISK_FACTORS}
    )

    risk = score(config=heavy, attributes={"amount": 60000}, seen=False)

    assert risk.score == 100
    assert sum(f.points for f in risk.factors) == 100 * 0.5 + 100 * 0.5 + 100


def test_a_factor_without_a_weight_is_listed_with_no_points():
    only_rule = msgspec.structs.replace(CONFIG, weights={"rule": 40.0})

    risk = score(config=only_rule, attributes={"amount": 250000}, seen=False)

    assert risk.score == 20
    by_name = {f.name: f for f in risk.factors}
    assert list(by_name) == list(RISK_FACTORS)
    assert by_name["amount"].weight == 0
    assert by_name["amount"].fraction == 1.0
    assert by_name["amount"].points == 0
    assert by_name["unusual_action"].points == 0


@pytest.mark.parametrize(
    ("request_", "factor", "detail"),
    [
        (
            {"attributes": {"amount": 60000}},
            "amount",
            "resource.attr.amount 60000 is past 50000",
        ),
        ({}, "amount", "no amount in the resource or context"),
        (
            {"context": {"sensitivity": "internal"}},
            "sensitivity",
            "context.sensitivity 'internal'",
        ),
        (
            {"now": SATURDAY_11_BERLIN},
            "off_hours",
            "Sat 11:00 Europe/Berlin: not a working day",
        ),
        ({}, "off_hours", "Mon 10:00 Europe/Berlin: within working hours"),
        ({}, "rule", "payments/refund-large sets risk 50"),
        ({}, "delegation_depth", "chain of 2 principals (full at 4)"),
        (
            {"seen": False},
            "unusual_action",
            "the agent did not do this action in its recent decisions",
        ),
    ],
)
def test_each_factor_says_what_it_saw(request_, factor, detail):
    risk = score(**request_)

    assert {f.name: f.detail for f in risk.factors}[factor] == detail
