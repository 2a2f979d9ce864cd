"""The engine and limits: conditions read the values the caller passes as
``limits``, per request; an absent limit fails closed; ``limits_for``
names what a decision reads and what counts it."""

from __future__ import annotations

import textwrap

from kynara_sidecar.decision import DecisionRequest, Effect, Env, Resource, Timestamp
from kynara_sidecar.engine import EvaluationCache, LimitsFor, evaluate
from kynara_sidecar.errors import ReasonCode
from kynara_sidecar.policy.conditions import to_cel_value
from kynara_sidecar.policy.loader import compile_documents, decode_document

DIRECTORY = """
format_version: 1
kind: directory
principals:
  - {id: ulla, kind: user, roles: [clerk]}
  - {id: ada, kind: agent, roles: [bot]}
"""

POLICY = """
format_version: 1
kind: policy
name: pay
roles: {clerk: {}, bot: {}}
limits:
  refunds_today:
    actions: [pay.refund]
    key: [user]
    window: {calendar: day, time_zone: Europe/Berlin}
    ceiling: 5
  total:
    actions: [pay.*]
    resources: [pay.order]
    sum: context.amount
    key: [agent]
    window: {rolling: 7d}
    ceiling: 100
  unread:
    actions: [crm.read]
    key: [user]
    window: {rolling: 1h}
    ceiling: 1
rules:
  - id: allow-refunds
    effect: allow
    actions: [pay.refund, pay.charge]
    resources: [pay.order]
    roles: [clerk, bot]
  - id: refunds-cap
    effect: deny
    actions: [pay.refund]
    resources: [pay.order]
    roles: ["*"]
    condition: limits.refunds_today.exceeded
  - id: charge-past-total
    effect: deny
    actions: [pay.charge]
    resources: [pay.order]
    roles: [clerk, bot]
    condition: limits.total.remaining < 0
    mode: shadow
"""

# An allow that depends on a limit, for the fail-closed case.
ALLOW_POLICY = """
format_version: 1
kind: policy
name: other
roles: {clerk: {}, bot: {}}
rules:
  - id: allow-within
    effect: allow
    actions: [crm.read]
    resources: [crm.contact]
    roles: [clerk, bot]
    condition: "!limits.unread.exceeded"
"""

NOW = Timestamp(1796634000)


def loaded():
    sources = [
        decode_document("directory.yaml", DIRECTORY.encode()),
        decode_document("pay.yaml", textwrap.dedent(POLICY).encode()),
        decode_document("other.yaml", textwrap.dedent(ALLOW_POLICY).encode()),
    ]
    return compile_documents(sources)


LOADED = loaded()


def values(count: int, ceiling: int = 5, contribution: int = 1):
    return to_cel_value(
        {
            "count": count,
            "ceiling": ceiling,
            "remaining": ceiling - count,
            "exceeded": count + contribution > ceiling,
            "window_start": Timestamp(1796598000),
        }
    )


def decide(action, kind, limits, cache=None, explain=False):
    request = DecisionRequest(("ulla", "ada"), action, Resource(kind, "o-1"))
    return evaluate(
        LOADED.policy_set,
        LOADED.directory,
        request,
        Env(now=NOW),
        cache=cache,
        limits=limits,
        explain=explain,
    )


def test_a_deny_rule_reading_exceeded_fires_past_the_ceiling():
    under = decide("pay.refund", "pay.order", {"refunds_today": values(4)})
    assert under.effect is Effect.ALLOW
    over = decide("pay.refund", "pay.order", {"refunds_today": values(5)})
    assert over.effect is Effect.DENY
    assert over.reason_code is ReasonCode.RULE_DENIED
    denied = {(rule.rule, rule.principal) for rule in over.matched_rules}
    assert {("refunds-cap", "ulla"), ("refunds-cap", "ada")} <= denied


def test_a_deny_rule_reading_an_absent_limit_fires():
    decision = decide("pay.refund", "pay.order", {})
    assert decision.effect is Effect.DENY
    assert decision.reason_code is ReasonCode.CONDITION_ERROR
    assert "refunds_today" in decision.condition_errors[0].message


def test_an_allow_reading_an_absent_limit_fails_closed():
    for limits in (None, {}, {"refunds_today": values(0)}):
        decision = decide("crm.read", "crm.contact", limits)
        assert decision.effect is Effect.DENY
        assert decision.reason_code is ReasonCode.CONDITION_ERROR
    allowed = decide("crm.read", "crm.contact", {"unread": values(0, 1)})
    assert allowed.effect is Effect.ALLOW


def test_values_are_per_request_never_cached_across_requests():
    cache = EvaluationCache(LOADED.policy_set, LOADED.directory)
    effects = [
        decide(
            "pay.refund", "pay.order", {"refunds_today": values(count)}, cache
        ).effect
        for count in (0, 5, 4, 6, 1, 5)
    ]
    assert effects == [
        Effect.ALLOW,
        Effect.DENY,
        Effect.ALLOW,
        Effect.DENY,
        Effect.ALLOW,
        Effect.DENY,
    ]
    # Explained decisions see the same values.
    explained = decide(
        "pay.refund", "pay.order", {"refunds_today": values(9)}, cache, explain=True
    )
    assert explained.effect is Effect.DENY and explained.explanation is not None


def test_a_shadow_rule_reads_limits_too():
    over = decide("pay.charge", "pay.order", {"total": values(120, 100, 0)})
    assert over.effect is Effect.ALLOW
    assert over.shadow_effect is Effect.DENY
    under = decide("pay.charge", "pay.order", {"total": values(20, 100, 0)})
    assert under.shadow_effect is Effect.ALLOW


def test_limits_for_names_what_is_read_and_what_counts():
    cache = EvaluationCache(LOADED.policy_set, LOADED.directory)
    limits = LOADED.policy_set.limits
    found = cache.limits_for("pay.order", "pay.refund")
    assert isinstance(found, LimitsFor)
    assert found.read == (limits["refunds_today"],)
    assert found.counted == (limits["refunds_today"], limits["total"])
    # Read by a shadow rule, counted by the pattern pay.*.
    charge = cache.limits_for("pay.order", "pay.charge")
    assert charge == LimitsFor((limits["total"],), (limits["total"],))
    # Another kind: total's resources do not match, no rule reads any.
    assert cache.limits_for("pay.invoice", "pay.charge") == LimitsFor((), ())
    assert cache.limits_for("crm.contact", "crm.read") == LimitsFor(
        (limits["unread"],), (limits["unread"],)
    )
    assert cache.limits_for("pay.order", "pay.refund") is found


def test_limits_for_stays_bounded():
    cache = EvaluationCache(LOADED.policy_set, LOADED.directory, max_entries=4)
    for index in range(20):
        cache.limits_for("pay.order", f"pay.a{index}")
    assert len(cache._limits) <= 4
    assert cache.limits_for("pay.order", "pay.refund").read
