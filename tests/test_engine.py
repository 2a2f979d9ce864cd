"""The decision engine: the shared cases, then combining, shadow mode and
the variables conditions see, on small in-memory policy sets."""

from __future__ import annotations

import json
import textwrap

import hypothesis
import msgspec
import pytest
from cases_loader import POLICIES_DIR, Case, load_cases
from hypothesis import strategies as st

from kynara_sidecar.decision import (
    Decision,
    DecisionRequest,
    Duration,
    Effect,
    Env,
    PrincipalRef,
    Resource,
    Timestamp,
    UInt64,
)
from kynara_sidecar.engine import EvaluationCache, evaluate
from kynara_sidecar.errors import ReasonCode
from kynara_sidecar.policy import LoadedPolicies, load_policies
from kynara_sidecar.policy.loader import compile_documents, decode_document

SHIPPED = load_policies(POLICIES_DIR)
CASES = load_cases()
MONDAY_10_BERLIN = Timestamp(1796634000)  # 2026-12-07T10:00:00+01:00

DIRECTORY = """
format_version: 1
kind: directory
principals:
  - {id: ulla, kind: user, roles: [clerk], attributes: {team: ops, level: 3}}
  - {id: ada, kind: agent, roles: [bot]}
  - {id: bert, kind: user, roles: [clerk]}
"""


def compile_yaml(*policies: str) -> LoadedPolicies:
    """Compile policy YAML texts plus DIRECTORY; the first policy defines
    the roles clerk and bot."""
    sources = [decode_document("directory.yaml", DIRECTORY.encode())]
    for index, text in enumerate(policies):
        text = textwrap.dedent(text)
        header = f"format_version: 1\nkind: policy\nname: p{index}\n"
        if index == 0:
            header += "roles: {clerk: {}, bot: {}}\n"
        sources.append(decode_document(f"p{index}.yaml", (header + text).encode()))
    return compile_documents(sources)


def decide(
    loaded: LoadedPolicies,
    chain: tuple[str, ...] = ("ulla", "ada"),
    *,
    action: str = "doc.read",
    kind: str = "doc",
    attributes: dict | None = None,
    context: dict | None = None,
    env: Env | None = None,
    cache: EvaluationCache | None = None,
) -> Decision:
    """Evaluate a request for resource d-1 on ``loaded`` (with ``cache``
    when given), on a Monday at 10:00 in Berlin unless ``env`` says else."""
    request = DecisionRequest(
        chain, action, Resource(kind, "d-1", attributes or {}), context or {}
    )
    env = env or Env(MONDAY_10_BERLIN)
    return evaluate(loaded.policy_set, loaded.directory, request, env, cache=cache)


def rule(effect: str, rule_id: str = "r", roles: str = "[clerk, bot]", **extra) -> str:
    lines = [
        f"  - id: {rule_id}",
        f"    effect: {effect}",
        "    actions: [doc.read]",
        "    resources: [doc]",
        f"    roles: {roles}",
    ]
    lines += [f"    {key}: {value}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


def rules(*items: str) -> str:
    return "rules:\n" + "".join(items)


# --- the shared cases against config/policies ----------------------------------


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_case(case: Case):
    decision = evaluate(
        SHIPPED.policy_set, SHIPPED.directory, case.request, Env(case.now)
    )

    assert decision.effect == case.expect["decision"], decision.reason
    assert decision.reason_code == case.expect["reason_code"], decision.reason
    if "matched_rules" in case.expect:
        assert list(msgspec.to_builtins(decision.matched_rules)) == [
            {"shadow": False, **item} for item in case.expect["matched_rules"]
        ]
    if "condition_errors" in case.expect:
        got = [
            {"policy": e.policy, "rule": e.rule, "principal": e.principal}
            for e in decision.condition_errors
        ]
        assert got == case.expect["condition_errors"]


# The pipeline gives these, from an approval's state, never the engine;
# tests/approvals/test_grant.py covers each.
PIPELINE_REASON_CODES = frozenset(
    {
        ReasonCode.APPROVAL_GRANTED,
        ReasonCode.APPROVAL_NOT_FOUND,
        ReasonCode.APPROVAL_REJECTED,
        ReasonCode.APPROVAL_EXPIRED,
        ReasonCode.APPROVAL_USED,
        ReasonCode.APPROVAL_MISMATCH,
        ReasonCode.APPROVAL_INSUFFICIENT,
        ReasonCode.APPROVAL_RATE_LIMITED,
    }
)


def test_cases_cover_every_decision_and_reason_code():
    decisions = {case.expect["decision"] for case in CASES}
    reason_codes = {case.expect["reason_code"] for case in CASES}

    assert decisions == set(Effect)
    assert reason_codes == set(ReasonCode) - PIPELINE_REASON_CODES


def test_decision_carries_both_revisions():
    decision = evaluate(
        SHIPPED.policy_set, SHIPPED.directory, CASES[0].request, Env(CASES[0].now)
    )

    assert decision.policy_revision == SHIPPED.policy_set.revision
    assert decision.directory_revision == SHIPPED.directory.revision
    assert decision.policy_revision.startswith("sha256:")


def test_resolved_chain_lists_effective_roles_and_flags():
    request = DecisionRequest(
        ("alice", "mallory"), "crm.contact.read", Resource("crm.contact")
    )

    decision = evaluate(
        SHIPPED.policy_set, SHIPPED.directory, request, Env(MONDAY_10_BERLIN)
    )

    assert decision.chain == (
        PrincipalRef("alice", "user", ("employee", "support")),
        PrincipalRef("mallory", known=False, active=False),
    )
    assert decision.reason == "principal 'mallory' is not in the directory"


def test_inactive_principal_reason_names_it():
    request = DecisionRequest(("dave",), "crm.contact.read", Resource("crm.contact"))

    decision = evaluate(
        SHIPPED.policy_set, SHIPPED.directory, request, Env(MONDAY_10_BERLIN)
    )

    assert decision.reason == "principal 'dave' is inactive"
    assert decision.chain[0].active is False


def test_empty_chain_is_denied():
    loaded = compile_yaml(rules(rule("allow")))

    decision = decide(loaded, ())

    assert (decision.effect, decision.reason_code) == (
        Effect.DENY,
        ReasonCode.UNKNOWN_PRINCIPAL,
    )


# --- combining -------------------------------------------------------------------


def test_deny_overrides_allow():
    loaded = compile_yaml(rules(rule("allow", "a"), rule("deny", "d")))

    decision = decide(loaded)

    assert decision.effect is Effect.DENY
    assert decision.reason_code is ReasonCode.RULE_DENIED
    assert decision.reason == "rule p0/d denies doc.read on doc for 'ulla'"
    assert [(m.rule, m.principal) for m in decision.matched_rules] == [
        ("a", "ulla"),
        ("d", "ulla"),
        ("a", "ada"),
        ("d", "ada"),
    ]


def test_require_approval_overrides_allow():
    loaded = compile_yaml(rules(rule("allow", "a"), rule("require_approval", "q")))

    decision = decide(loaded)

    assert decision.effect is Effect.REQUIRE_APPROVAL
    assert decision.reason_code is ReasonCode.APPROVAL_REQUIRED
    assert decision.reason == (
        "rule p0/q requires approval of doc.read on doc for 'ulla'"
    )


def test_allow_reason_names_every_principal_and_rule():
    loaded = compile_yaml(rules(rule("allow", "a")))

    decision = decide(loaded)

    assert decision.effect is Effect.ALLOW
    assert decision.reason == (
        "doc.read on doc allowed for every principal: 'ulla' by p0/a, 'ada' by p0/a"
    )


def test_no_candidate_rule_denies_with_no_rule_allows():
    loaded = compile_yaml(rules(rule("allow")))

    decision = decide(loaded, action="doc.write")

    assert decision.reason_code is ReasonCode.NO_RULE_ALLOWS
    assert decision.reason == "no rule allows doc.write on doc for 'ulla'"


def test_erroring_allow_denies_with_condition_error_and_is_not_matched():
    loaded = compile_yaml(rules(rule("allow", condition="resource.attr.missing")))

    decision = decide(loaded)

    assert decision.reason_code is ReasonCode.CONDITION_ERROR
    assert decision.matched_rules == ()
    assert [(e.rule, e.principal) for e in decision.condition_errors] == [
        ("r", "ulla"),
        ("r", "ada"),
    ]
    assert decision.reason.startswith(
        "condition of rule p0/r failed for 'ulla', so it cannot allow doc.read"
    )
    assert "missing" in decision.condition_errors[0].message


def test_erroring_deny_triggers_and_beats_a_holding_allow():
    loaded = compile_yaml(
        rules(rule("allow", "a"), rule("deny", "d", condition="context.n > 1"))
    )

    decision = decide(loaded, context={"n": "x"})

    assert decision.effect is Effect.DENY
    assert decision.reason_code is ReasonCode.CONDITION_ERROR
    assert decision.reason.startswith(
        "condition of rule p0/d failed for 'ulla', so it denies"
    )


def test_holding_deny_reports_rule_denied_even_when_another_deny_errors():
    loaded = compile_yaml(
        rules(rule("deny", "bad", condition="context.n > 1"), rule("deny", "good"))
    )

    decision = decide(loaded, context={"n": "x"})

    assert decision.reason_code is ReasonCode.RULE_DENIED
    assert decision.reason == "rule p0/good denies doc.read on doc for 'ulla'"


def test_erroring_require_approval_requires_approval():
    loaded = compile_yaml(
        rules(
            rule("allow", "a"), rule("require_approval", "q", condition="context.n > 1")
        )
    )

    decision = decide(loaded, context={"n": "x"})

    assert decision.effect is Effect.REQUIRE_APPROVAL
    assert decision.reason_code is ReasonCode.APPROVAL_REQUIRED
    assert "so it requires approval" in decision.reason


def test_non_bool_dyn_result_is_a_condition_error():
    loaded = compile_yaml(rules(rule("allow", condition="context.n")))

    decision = decide(loaded, context={"n": 3})

    assert decision.reason_code is ReasonCode.CONDITION_ERROR
    assert decision.condition_errors[0].message == "expected a bool result, got int"


def test_rule_roles_are_met_through_inheritance():
    loaded = compile_yaml(
        rules(rule("allow", roles="[senior]")), "roles: {senior: {inherits: [clerk]}}"
    )
    # ulla is a clerk; a rule for seniors does not reach down to clerks.
    decision = decide(loaded, ("ulla",))

    assert decision.reason_code is ReasonCode.NO_RULE_ALLOWS


def test_wildcard_role_applies_to_every_directory_principal():
    loaded = compile_yaml(rules(rule("allow", roles='["*"]')))

    decision = decide(loaded, ("bert", "ada"))

    assert decision.effect is Effect.ALLOW


@pytest.mark.parametrize(
    ("chain", "misplaced"),
    [(("ada", "ulla"), "ada"), (("ulla", "bert"), "bert"), (("ada",), "ada")],
    ids=["agent-first", "user-after-first", "agent-alone"],
)
def test_chain_must_be_a_user_then_agents(chain, misplaced):
    loaded = compile_yaml(rules(rule("allow", roles='["*"]')))

    decision = decide(loaded, chain)

    assert decision.effect is Effect.DENY
    assert decision.reason_code is ReasonCode.INVALID_CHAIN
    assert decision.reason.startswith(f"principal {misplaced!r} is a")
    assert decision.matched_rules == ()


# --- shadow mode ---------------------------------------------------------------------


def test_shadow_rule_is_listed_but_never_decides():
    loaded = compile_yaml(rules(rule("allow", "a"), rule("deny", "s", mode="shadow")))

    decision = decide(loaded)

    assert decision.effect is Effect.ALLOW
    assert decision.shadow_effect is Effect.DENY
    shadowed = [(m.rule, m.principal) for m in decision.matched_rules if m.shadow]
    assert shadowed == [("s", "ulla"), ("s", "ada")]


def test_shadow_policy_makes_every_rule_shadow():
    loaded = compile_yaml(
        rules(rule("allow", "a")),
        "mode: shadow\n" + rules(rule("require_approval", "q")),
    )

    decision = decide(loaded)

    assert decision.effect is Effect.ALLOW
    assert decision.shadow_effect is Effect.REQUIRE_APPROVAL


def test_shadow_allow_shows_what_enforcing_it_would_allow():
    loaded = compile_yaml(rules(rule("allow", "s", mode="shadow")))

    decision = decide(loaded)

    assert decision.effect is Effect.DENY
    assert decision.reason_code is ReasonCode.NO_RULE_ALLOWS
    assert decision.shadow_effect is Effect.ALLOW


def test_shadow_effect_is_none_without_shadow_candidates():
    loaded = compile_yaml(
        rules(
            rule("allow", "a"),
            rule("deny", "s", roles="[bot]", mode="shadow").replace(
                "[doc.read]", "[doc.write]"
            ),
        )
    )

    decision = decide(loaded)

    assert decision.shadow_effect is None


# --- what conditions see ---------------------------------------------------------


@pytest.mark.parametrize(
    "condition",
    [
        'principal.id == "ulla" || principal.id == "ada"',
        'user.id == "ulla" && agent.id == "ada" && user.kind == "user"',
        'agent.kind == "agent" && chain.ids == ["ulla", "ada"] && chain.depth == 2',
        '"clerk" in user.roles && user.attr.level == 3 && user.attr.team == "ops"',
        'action == "doc.read" && resource.kind == "doc" && resource.id == "d-1"',
        "resource.attr.size == 7u && context.at < env.now",
        'context.wait > duration("1s") && context.blob == b"\\x00\\x01"',
        'env.daemon_id == "d-7" && env.region == "eu" && env.labels.tier == "gold"',
        'env.agent_id == "ada" && env.environment == "prod" && env.peer == "uds"',
        'env.now == timestamp("2026-12-07T09:00:00Z")',
        'env.now.getHours("Europe/Berlin") == 10',
        "context.big == 9223372036854775807 && context.ratio == 0.5",
        'context.items[1].name.upperAscii() == "B"',
    ],
)
def test_condition_sees_request_env_and_directory(condition: str):
    loaded = compile_yaml(rules(rule("allow", condition=json.dumps(condition))))
    env = Env(
        MONDAY_10_BERLIN,
        daemon_id="d-7",
        agent_id="ada",
        environment="prod",
        region="eu",
        labels={"tier": "gold"},
        peer="uds",
    )
    context = {
        "at": Timestamp(1_700_000_000, 5),
        "wait": Duration(2),
        "blob": b"\x00\x01",
        "big": 2**63 - 1,
        "ratio": 0.5,
        "items": ({"name": "a"}, {"name": "b"}),
    }

    decision = decide(loaded, attributes={"size": UInt64(7)}, context=context, env=env)

    assert decision.condition_errors == ()
    assert decision.effect is Effect.ALLOW, decision.reason


def test_each_principal_is_evaluated_as_itself():
    loaded = compile_yaml(
        rules(rule("allow", condition="'principal.kind == \"user\"'"))
    )

    decision = decide(loaded)

    assert decision.effect is Effect.DENY
    assert decision.reason == "no rule allows doc.read on doc for 'ada'"


# --- non-escalation, as a property -------------------------------------------------

USERS = ["alice", "bob", "carol", "erin"]
AGENTS = ["support-bot", "admin-bot", "readonly-bot"]
ACTIONS = [
    ("crm.contact.read", "crm.contact", {}),
    ("payments.refund.issue", "payments.refund", {"amount": 100}),
    ("payments.refund.issue", "payments.refund", {"amount": 60000}),
    ("payments.refund.issue", "payments.refund", {"amount": "1"}),
    ("tool.process.cancel", "tool.process", {}),
]
STRICTNESS = {Effect.ALLOW: 0, Effect.REQUIRE_APPROVAL: 1, Effect.DENY: 2}


@hypothesis.given(
    user=st.sampled_from(USERS),
    agents=st.lists(st.sampled_from(AGENTS), min_size=1, max_size=3),
    target=st.sampled_from(ACTIONS),
    region=st.sampled_from([None, "de", "KP"]),
    instant=st.integers(1_767_225_600, 1_798_761_600),  # 2026
)
def test_chain_decision_is_the_strictest_of_its_agents_with_the_user(
    user, agents, target, region, instant
):
    action, kind, attributes = target
    context = {} if region is None else {"region": region}

    def effect_of(principals):
        request = DecisionRequest(
            tuple(principals), action, Resource(kind, "x", attributes), context
        )
        return evaluate(
            SHIPPED.policy_set, SHIPPED.directory, request, Env(Timestamp(instant))
        ).effect

    pairs = [effect_of([user, agent]) for agent in agents]

    chain = [user, *agents]
    assert effect_of(chain) == max(pairs, key=STRICTNESS.__getitem__)
    assert effect_of([user, *reversed(agents)]) == effect_of(chain)


# --- values the CEL binding would mangle ------------------------------------------


@pytest.mark.parametrize(
    ("condition", "context"),
    [
        ('context.blob == b"\\x00\\x01"', {"blob": b"\x00\x01"}),
        ('context.text == "a\\u0000b" && size(context.text) == 3', {"text": "a\x00b"}),
        ("size(context.blob) == 3", {"blob": b"a\x00b"}),
    ],
)
def test_nul_characters_reach_conditions_whole(condition, context):
    loaded = compile_yaml(rules(rule("allow", condition=json.dumps(condition))))

    decision = decide(loaded, context=context)

    assert decision.effect is Effect.ALLOW, decision.reason


def test_nul_in_a_context_key_fails_every_condition_closed():
    loaded = compile_yaml(
        rules(
            rule("allow", "plain"),
            rule("deny", "guard", condition="has(context.region)"),
        )
    )

    decision = decide(loaded, context={"region\x00x": "KP"})

    assert decision.effect is Effect.DENY
    assert decision.reason_code is ReasonCode.CONDITION_ERROR
    assert decision.condition_errors[0].message == (
        "could not pass the request to CEL: expected map keys without NUL "
        "characters, got 'region\\x00x'"
    )
