"""The engine's EvaluationCache and the pipeline's use of it: the same
decisions with or without a cache, a condition reading ``principal`` never
reused across the chain, and a policy or directory change that takes effect
on the very next decision."""

from __future__ import annotations

import shutil

import msgspec
import pytest
from cases_loader import POLICIES_DIR, load_cases
from support import SHIPPED_POLICIES, run_pipeline
from test_engine import MONDAY_10_BERLIN, compile_yaml, decide, rule, rules

from kynara_sidecar.decision import DecisionRequest, Effect, Env, Resource
from kynara_sidecar.engine import EvaluationCache, evaluate
from kynara_sidecar.errors import ReasonCode
from kynara_sidecar.pipeline import IncomingRequest, new_decision_id
from kynara_sidecar.policy import load_policies

SHIPPED = load_policies(POLICIES_DIR)
CASES = load_cases()

REFUND = IncomingRequest(
    action="payments.refund.issue",
    resource=Resource(kind="payments.refund", id="rf_1", attributes={"amount": 1200}),
    asserted_chain=("alice",),
)


def test_one_cache_for_every_case_gives_each_case_its_decision():
    cache = EvaluationCache(SHIPPED.policy_set, SHIPPED.directory, max_entries=3)

    for case in CASES + CASES:
        cached = evaluate(
            SHIPPED.policy_set,
            SHIPPED.directory,
            case.request,
            Env(case.now),
            cache=cache,
        )
        fresh = evaluate(
            SHIPPED.policy_set, SHIPPED.directory, case.request, Env(case.now)
        )

        assert cached == fresh, case.name
        assert cached.effect == case.expect["decision"], case.name


def test_a_cache_made_for_another_policy_set_is_ignored():
    allowing = compile_yaml(rules(rule("allow")))
    denying = compile_yaml(rules(rule("deny")))
    stale = EvaluationCache(allowing.policy_set, allowing.directory)

    decision = decide(denying, cache=stale)

    assert decision.effect is Effect.DENY
    assert decision.reason_code is ReasonCode.RULE_DENIED


def test_a_condition_reading_principal_is_evaluated_for_each_principal():
    loaded = compile_yaml(rules(rule("allow", condition='principal.kind == "user"')))
    cache = EvaluationCache(loaded.policy_set, loaded.directory)

    decision = decide(loaded, cache=cache)

    # ulla (a user) is allowed, ada (an agent) is not: no reuse of ulla's verdict.
    assert [m.principal for m in decision.matched_rules] == ["ulla"]
    assert decision.effect is Effect.DENY
    assert decision.reason_code is ReasonCode.NO_RULE_ALLOWS


def test_a_condition_without_principal_is_evaluated_once_and_reported_for_each():
    loaded = compile_yaml(
        rules(
            rule("allow", "reads"),
            rule("deny", "bad-level", condition="resource.attr.level > 2"),
        )
    )

    decision = decide(loaded, attributes={"level": 3})

    assert decision.effect is Effect.DENY
    assert [(m.rule, m.principal) for m in decision.matched_rules] == [
        ("reads", "ulla"),
        ("bad-level", "ulla"),
        ("reads", "ada"),
        ("bad-level", "ada"),
    ]


def test_an_erroring_shared_condition_is_an_error_for_each_principal():
    loaded = compile_yaml(rules(rule("allow", condition="context.missing > 1")))

    decision = decide(loaded)

    assert decision.reason_code is ReasonCode.CONDITION_ERROR
    assert [e.principal for e in decision.condition_errors] == ["ulla", "ada"]


def test_env_values_follow_a_changed_env():
    loaded = compile_yaml(rules(rule("allow", condition='env.region == "eu"')))
    cache = EvaluationCache(loaded.policy_set, loaded.directory)

    def effect(region: str) -> Effect:
        env = Env(MONDAY_10_BERLIN, region=region)
        return decide(loaded, env=env, cache=cache).effect

    assert [effect("eu"), effect("us"), effect("eu")] == [
        Effect.ALLOW,
        Effect.DENY,
        Effect.ALLOW,
    ]


def test_decision_ids_are_version_4_uuids_and_differ():
    import uuid

    ids = [new_decision_id() for _ in range(200)]

    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)
        assert str(parsed) == text


# --- the pipeline: a change takes effect on the very next decision -------------


def _changed_policies(tmp_path, old: str, new: str, file: str):
    root = tmp_path / "policies"
    shutil.copytree(SHIPPED_POLICIES, root)
    path = root / file
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    return load_policies(root)


@pytest.mark.parametrize(
    ("old", "new", "file", "reason_code"),
    [
        # The directory: alice loses her role.
        (
            "roles: [support]\n    attributes: {team: support, email: alice",
            "roles: [employee]\n    attributes: {team: support, email: alice",
            "directory.yaml",
            ReasonCode.NO_RULE_ALLOWS,
        ),
        # A policy: the small-refund limit drops below the amount.
        (
            "resource.attr.amount <= 50000",
            "resource.attr.amount <= 1000",
            "payments.yaml",
            ReasonCode.NO_RULE_ALLOWS,
        ),
    ],
    ids=["directory", "policy"],
)
def test_an_activation_takes_effect_on_the_next_decision(
    tmp_path, old, new, file, reason_code
):
    changed = _changed_policies(tmp_path, old, new, file)

    async def steps(pipeline):
        before = [await pipeline.decide(REFUND) for _ in range(2)]
        pipeline.activate(changed)
        return before, await pipeline.decide(REFUND)

    (before, after), _ = run_pipeline(tmp_path, steps)

    assert [a.decision.effect for a in before] == [Effect.ALLOW, Effect.ALLOW]
    assert after.decision.effect is Effect.DENY
    assert after.decision.reason_code is reason_code
    assert after.decision.directory_revision == changed.directory.revision
    assert after.decision.policy_revision == changed.policy_set.revision


# --- decisions kept per verdict combination ----------------------------------


def test_a_repeated_verdict_combination_gives_the_decision_made_for_it():
    loaded = compile_yaml(
        rules(
            rule("deny", "too-big", condition="resource.attr.level > 2"),
            rule("allow", "reads"),
        )
    )
    cache = EvaluationCache(loaded.policy_set, loaded.directory)

    low = [decide(loaded, attributes={"level": n}, cache=cache) for n in (1, 2)]
    high = [decide(loaded, attributes={"level": n}, cache=cache) for n in (3, 4)]

    assert low[0] is low[1]
    assert high[0] is high[1]
    assert low[0].effect is Effect.ALLOW
    assert high[0].effect is Effect.DENY
    assert low[0] == decide(loaded, attributes={"level": 1})
    assert high[0] == decide(loaded, attributes={"level": 3})


def test_errors_with_other_messages_are_not_answered_with_a_kept_decision():
    loaded = compile_yaml(
        rules(rule("deny", "bad-level", condition="resource.attr.level > 2"))
    )
    cache = EvaluationCache(loaded.policy_set, loaded.directory)

    decisions = [
        decide(loaded, attributes=attributes, cache=cache)
        for attributes in ({}, {"level": "high"}, {})
    ]

    fresh = [
        decide(loaded, attributes={}),
        decide(loaded, attributes={"level": "high"}),
    ]
    assert decisions == [fresh[0], fresh[1], fresh[0]]
    # Both errored, for different reasons, and each reason says its own.
    assert decisions[0].condition_errors[0].message != (
        decisions[1].condition_errors[0].message
    )
    assert decisions[0].reason != decisions[1].reason


def test_an_explained_decision_is_never_the_kept_one():
    loaded = compile_yaml(rules(rule("allow", "reads")))
    cache = EvaluationCache(loaded.policy_set, loaded.directory)
    plain = decide(loaded, cache=cache)
    request = DecisionRequest(("ulla", "ada"), "doc.read", Resource("doc", "d-1"))

    explained = evaluate(
        loaded.policy_set,
        loaded.directory,
        request,
        Env(MONDAY_10_BERLIN),
        explain=True,
        cache=cache,
    )

    assert explained.explanation is not None
    assert plain.explanation is None
    assert decide(loaded, cache=cache).explanation is None
    assert msgspec.structs.replace(explained, explanation=None) == plain
