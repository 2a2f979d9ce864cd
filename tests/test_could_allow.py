"""engine.could_allow: what a front door may show a caller (the MCP
gateway's tools/list), read from the same compiled rules ``evaluate`` uses."""

from __future__ import annotations

import hypothesis
from hypothesis import strategies as st
from test_engine import MONDAY_10_BERLIN, compile_yaml, decide, rule, rules

from kynara_sidecar.decision import Effect, Env
from kynara_sidecar.engine import could_allow

CHAIN = ("ulla", "ada")


def visible(loaded, chain=CHAIN, action="doc.read", kind="doc") -> bool:
    return could_allow(loaded.policy_set, loaded.directory, chain, kind, action)


def test_an_allow_for_every_principal_shows_it():
    assert visible(compile_yaml(rules(rule("allow"))))


def test_no_rule_hides_it():
    loaded = compile_yaml(rules(rule("allow")))

    assert not visible(loaded, action="doc.write")
    assert not visible(loaded, kind="invoice")


def test_a_rule_for_other_roles_hides_it():
    loaded = compile_yaml(rules(rule("allow", roles="[bot]")))

    # ulla (clerk) has no rule: non-escalation hides it from the chain.
    assert not visible(loaded)
    assert visible(compile_yaml(rules(rule("allow", roles="['*']"))))


def test_require_approval_shows_it():
    assert visible(compile_yaml(rules(rule("require_approval"))))


def test_an_unconditional_deny_hides_it():
    loaded = compile_yaml(rules(rule("allow"), rule("deny", "nope", roles="[bot]")))

    assert not visible(loaded)


def test_a_conditional_deny_or_allow_keeps_it_visible():
    conditional_deny = compile_yaml(
        rules(rule("allow"), rule("deny", "big", condition="'context.amount > 10'"))
    )
    conditional_allow = compile_yaml(
        rules(rule("allow", condition="'context.amount < 10'"))
    )

    assert visible(conditional_deny)
    assert visible(conditional_allow)


def test_shadow_rules_do_not_count():
    shadow_allow = compile_yaml(rules(rule("allow", mode="shadow")))
    shadow_deny = compile_yaml(rules(rule("allow"), rule("deny", "s", mode="shadow")))

    assert not visible(shadow_allow)
    assert visible(shadow_deny)


def test_patterns_match_as_in_evaluate():
    loaded = compile_yaml(
        "rules:\n"
        "  - {id: r, effect: allow, actions: ['mcp.files.*'], resources: [mcp.tool],"
        " roles: [clerk, bot]}\n"
    )

    assert visible(loaded, action="mcp.files.read", kind="mcp.tool")
    assert not visible(loaded, action="mcp.files", kind="mcp.tool")
    assert not visible(loaded, action="mcp.filesx.read", kind="mcp.tool")


def test_a_chain_evaluate_refuses_sees_nothing():
    loaded = compile_yaml(rules(rule("allow", roles="['*']")))

    assert not visible(loaded, chain=("nobody", "ada"))
    assert not visible(loaded, chain=("ada", "ulla"))  # an agent acting first
    assert not visible(loaded, chain=())


CONDITIONS = st.sampled_from(
    [
        None,
        "'context.x > 5'",
        "'context.x < 5'",
        "'context.x == 5'",
        "'1 / context.x > 0'",
    ]
)
EFFECTS = st.sampled_from(["allow", "deny", "require_approval"])
ROLES = st.sampled_from(["[clerk, bot]", "[clerk]", "[bot]", "['*']"])


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(
    st.lists(st.tuples(EFFECTS, ROLES, CONDITIONS), min_size=0, max_size=4),
    st.lists(st.integers(-3, 12), min_size=1, max_size=6),
)
def test_hidden_means_never_allowed_nor_approvable(spec, xs):
    """Soundness: whatever the context, a hidden target is always denied."""
    items = []
    for index, (effect, roles, condition) in enumerate(spec):
        extra = {"condition": condition} if condition else {}
        items.append(rule(effect, f"r{index}", roles=roles, **extra))
    loaded = compile_yaml(rules(*items) if items else "rules: []\n")

    if visible(loaded):
        return
    for x in xs:
        got = decide(loaded, context={"x": x}, env=Env(MONDAY_10_BERLIN))
        assert got.effect is Effect.DENY, (spec, x, got.reason)
