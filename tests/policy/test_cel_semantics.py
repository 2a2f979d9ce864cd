"""CEL conditions behave as the CEL specification says, through the engine.

Every test compiles real policy text and decides with ``engine.evaluate``:
no condition is evaluated on its own, so what is checked is what a caller
gets (decision, reason code, reason and condition errors).
"""

from __future__ import annotations

import json
import re
import shutil
import unicodedata

import pytest
from cases_loader import parse_instant
from kynara.v1 import decision_pb2 as pb
from support import SHIPPED_POLICIES, SettableClock, read_record

from kynara_sidecar.decision import (
    Decision,
    DecisionRequest,
    Effect,
    Env,
    Resource,
    UInt64,
)
from kynara_sidecar.engine import evaluate
from kynara_sidecar.errors import PolicyError, ReasonCode
from kynara_sidecar.policy.conditions import compile_condition
from kynara_sidecar.policy.loader import (
    LoadedPolicies,
    compile_documents,
    decode_document,
)

NOW = "2026-12-07T09:00:00Z"


def directory(attributes: str = "{}") -> str:
    # The user and the agent carry the same attributes, so that a test about
    # one condition is not decided by the other principal of the chain.
    return (
        "format_version: 1\nkind: directory\nprincipals:\n"
        f"  - {{id: u, kind: user, roles: [r], attributes: {attributes}}}\n"
        f"  - {{id: a, kind: agent, roles: [r], attributes: {attributes}}}\n"
    )


def rule(rule_id: str, effect: str, condition: str = "", **fields: str) -> str:
    actions = fields.get("actions", "[x.do]")
    text = (
        f"  - id: {rule_id}\n    effect: {effect}\n    actions: {actions}\n"
        "    resources: [x]\n    roles: [r]\n"
    )
    if condition:
        text += f"    condition: {json.dumps(condition)}\n"
    return text


def compile_set(*rules: str, attributes: str = "{}") -> LoadedPolicies:
    policy = "format_version: 1\nkind: policy\nname: p\nroles: {r: {}}\nrules:\n"
    sources = [
        decode_document("p.yaml", (policy + "".join(rules)).encode()),
        decode_document("dir.yaml", directory(attributes).encode()),
    ]
    return compile_documents(sources)


def decide(
    loaded: LoadedPolicies,
    *,
    action: str = "x.do",
    context: dict | None = None,
    now: str = NOW,
) -> Decision:
    request = DecisionRequest(
        chain=("u", "a"),
        action=action,
        resource=Resource(kind="x", id="1"),
        context=context or {},
    )
    return evaluate(
        loaded.policy_set, loaded.directory, request, Env(now=parse_instant(now))
    )


# --- errors inside || and && ---------------------------------------------------

EITHER = 'principal.attr.team == "ops" || principal.attr.clearance == "high"'
BOTH = 'principal.attr.team == "ops" && principal.attr.clearance == "high"'


def test_or_with_one_side_true_allows_though_the_other_side_errors():
    loaded = compile_set(rule("q", "allow", EITHER), attributes="{clearance: high}")

    decision = decide(loaded)

    assert (decision.effect, decision.reason_code) == (
        Effect.ALLOW,
        ReasonCode.RULE_ALLOWED,
    )
    assert decision.condition_errors == ()


def test_or_with_neither_attribute_denies_naming_the_missing_one():
    loaded = compile_set(rule("q", "allow", EITHER))

    decision = decide(loaded)

    assert (decision.effect, decision.reason_code) == (
        Effect.DENY,
        ReasonCode.CONDITION_ERROR,
    )
    assert [error.rule for error in decision.condition_errors] == ["q", "q"]
    assert '"team"' in decision.condition_errors[0].message
    assert "p/q" in decision.reason and '"team"' in decision.reason


@pytest.mark.parametrize(
    "attributes",
    ["{}", "{clearance: high}", "{team: ops}", "{team: dev, clearance: high}"],
)
def test_and_with_a_missing_or_false_side_never_allows(attributes):
    loaded = compile_set(rule("q", "allow", BOTH), attributes=attributes)

    assert decide(loaded).effect is Effect.DENY


def test_and_with_both_sides_true_allows():
    loaded = compile_set(
        rule("q", "allow", BOTH), attributes="{team: ops, clearance: high}"
    )

    assert decide(loaded).effect is Effect.ALLOW


# --- deny rules fail closed ----------------------------------------------------


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ("{}", 'Key not found in map : "level"'),
        ("{level: low}", "No matching overloads found : _<_(string, int64)"),
        ("{level: [1]}", "No matching overloads found : _<_(list, int64)"),
    ],
    ids=["absent", "string", "list"],
)
def test_deny_rule_reading_a_bad_attribute_still_denies(attributes, message):
    loaded = compile_set(
        rule("low-level", "deny", "principal.attr.level < 3"),
        rule("everyone", "allow"),
        attributes=attributes,
    )

    decision = decide(loaded)

    assert (decision.effect, decision.reason_code) == (
        Effect.DENY,
        ReasonCode.CONDITION_ERROR,
    )
    assert message in decision.condition_errors[0].message
    assert decision.reason.startswith(
        "condition of rule p/low-level failed for 'u', so it denies x.do on x: "
    )


def test_equality_across_types_is_false_not_an_error():
    # CEL defines == between different types as false; a deny rule on
    # equality therefore does not fire on a wrong-typed value. Write
    # type-guarded conditions (type(x) != string || ...) where that matters.
    loaded = compile_set(
        rule("ops-only", "deny", 'principal.attr.team == "ops"'),
        rule("everyone", "allow"),
        attributes="{team: 5}",
    )

    decision = decide(loaded)

    assert decision.effect is Effect.ALLOW
    assert decision.condition_errors == ()


# --- one number line -----------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "expected"),
    [
        (1500, Effect.ALLOW),
        (1500.0, Effect.ALLOW),
        (999.5, Effect.DENY),
        (1000.5, Effect.ALLOW),
        (1000, Effect.DENY),
        (UInt64(1500), Effect.ALLOW),
        (UInt64(999), Effect.DENY),
        (-1500, Effect.DENY),
    ],
    ids=repr,
)
@pytest.mark.parametrize(
    "condition", ["context.amount > 1000", "1000 < context.amount"]
)
def test_numbers_compare_on_one_line_in_either_order(condition, amount, expected):
    loaded = compile_set(rule("big", "allow", condition))

    decision = decide(loaded, context={"amount": amount})

    assert decision.effect is expected
    assert decision.condition_errors == ()


@pytest.mark.parametrize(
    ("condition", "amount"),
    [
        ("context.amount > 1000.0", 1001),
        ("1000.0 < context.amount", UInt64(1001)),
        ("context.amount > 1000u", 1001.5),
    ],
)
def test_double_and_uint_literals_compare_with_any_number(condition, amount):
    loaded = compile_set(rule("big", "allow", condition))

    assert decide(loaded, context={"amount": amount}).effect is Effect.ALLOW


def test_integers_past_two_to_the_53_stay_exact():
    loaded = compile_set(rule("exact", "allow", "context.n == 9007199254740993"))

    assert decide(loaded, context={"n": 2**53 + 1}).effect is Effect.ALLOW
    assert decide(loaded, context={"n": 2**53}).effect is Effect.DENY


@pytest.mark.parametrize(
    ("condition", "context"),
    [
        ("context.n + 1 > 0", {"n": 2**63 - 1}),
        ("context.n - 1 < 0", {"n": -(2**63)}),
        ("context.n * 2 > 0", {"n": 2**62}),
        ("context.n - 1u > 0u", {"n": UInt64(0)}),
    ],
)
def test_overflow_is_an_error_never_a_wrap(condition, context):
    loaded = compile_set(rule("big", "allow", condition))

    decision = decide(loaded, context=context)

    assert (decision.effect, decision.reason_code) == (
        Effect.DENY,
        ReasonCode.CONDITION_ERROR,
    )
    assert "overflow" in decision.condition_errors[0].message


# --- time ------------------------------------------------------------------


def test_get_hours_without_a_zone_is_utc_whatever_the_written_offset():
    loaded = compile_set(
        rule(
            "ten",
            "allow",
            'timestamp("2024-03-04T08:30:00-02:00").getHours() == 10',
        )
    )

    assert decide(loaded).effect is Effect.ALLOW


@pytest.mark.parametrize(
    "written", ["2024-03-04T08:30:00-02:00", "2024-03-04T10:30:00Z"]
)
def test_one_instant_with_an_offset_or_in_utc_gets_one_decision(written):
    condition = (
        "timestamp(context.at).getHours() == 10 && env.now > timestamp(context.at)"
    )
    loaded = compile_set(rule("at-ten", "allow", condition))

    decision = decide(loaded, context={"at": written}, now="2024-03-04T10:31:00Z")

    assert decision.effect is Effect.ALLOW


@pytest.mark.parametrize("now", ["2024-03-04T08:30:00-02:00", "2024-03-04T10:30:00Z"])
def test_env_now_with_an_offset_or_in_utc_gets_one_decision(now):
    loaded = compile_set(
        rule("ten-utc", "allow", "env.now.getHours() == 10"),
        rule("ten-berlin", "deny", 'env.now.getHours("Europe/Berlin") != 11'),
    )

    assert decide(loaded, now=now).effect is Effect.ALLOW


@pytest.mark.parametrize(
    "now",
    [
        "2026-12-07T09:59:59.999999999Z",
        "2026-12-07T10:00:00Z",
        "2026-12-07T10:00:00.000000001Z",
        "2026-12-07T12:00:00+02:00",
        "2026-12-07T08:00:00-02:00",
    ],
)
def test_allow_before_and_deny_from_an_instant_never_both_or_neither(now):
    loaded = compile_set(
        rule("before", "allow", "env.now < principal.attr.until"),
        rule("from", "deny", "env.now >= principal.attr.until"),
        attributes="{until: 2026-12-07T10:00:00Z}",
    )

    decision = decide(loaded, now=now)

    assert [rule.rule for rule in decision.matched_rules] in (
        ["before", "before"],
        ["from", "from"],
    )


def test_a_malformed_timestamp_literal_is_a_load_error():
    with pytest.raises(
        PolicyError,
        match=re.escape(
            "p.yaml:$.rules[0].condition: rule 'q' condition: expected a timestamp "
            "literal such as '2026-12-07T09:00:00Z', got '2023-07-01' at line 1 "
            "column 21"
        ),
    ):
        compile_set(rule("q", "allow", 'env.now > timestamp("2023-07-01")'))


@pytest.mark.parametrize(
    ("condition", "message"),
    [
        (
            "env.now > principal.attr.since",
            "No matching overloads found : _>_(timestamp, string)",
        ),
        (
            "env.now > timestamp(principal.attr.since)",
            "String to Timestamp conversion failed",
        ),
    ],
)
def test_a_string_where_a_timestamp_is_expected_denies_with_reason(condition, message):
    loaded = compile_set(
        rule("q", "allow", condition), attributes="{since: 'last tuesday'}"
    )

    decision = decide(loaded)

    assert (decision.effect, decision.reason_code) == (
        Effect.DENY,
        ReasonCode.CONDITION_ERROR,
    )
    assert message in decision.reason


# --- extensions ------------------------------------------------------------


@pytest.mark.parametrize(
    "condition",
    [
        'context.s.lowerAscii() == "ops"',
        'context.s.upperAscii() == "OPS"',
        'context.s.trim() == "Ops"',
        'context.s.replace("O", "o") == "ops"',
        'context.s.indexOf("p") == 1',
        'context.s.substring(0, 1) == "O"',
        'context.s.split("p") == ["O", "s"]',
        '["a", "b"].join("-") == "a-b"',
        '"%s!".format([context.s]) == "Ops!"',
        'context.s.startsWith("O") && context.s.matches("^O[a-z]+$")',
    ],
)
def test_documented_string_functions_are_available(condition):
    loaded = compile_set(rule("q", "allow", condition))

    assert decide(loaded, context={"s": "Ops"}).effect is Effect.ALLOW


def test_a_function_outside_the_documented_set_is_a_load_error():
    with pytest.raises(
        PolicyError,
        match=re.escape(
            "p.yaml:$.rules[0].condition: rule 'q' condition: expected a valid CEL "
            "expression, got undeclared reference to 'math' (in container '') at "
            "line 1 column 1; undeclared reference to 'greatest' (in container '') "
            "at line 1 column 14"
        ),
    ):
        compile_set(rule("q", "allow", "math.greatest(1, 2) == 2"))


# --- action patterns -------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        ("tool.process", Effect.ALLOW),
        ("tool.process.cancel", Effect.ALLOW),
        ("tool.process.approve", Effect.DENY),
        ("tool.processx", Effect.DENY),
        ("tool.process.cancel.now", Effect.DENY),
        ("tool", Effect.DENY),
    ],
)
def test_exact_action_patterns_allow_only_those_actions(action, expected):
    loaded = compile_set(
        rule("process", "allow", actions="[tool.process]"),
        rule("cancel", "allow", actions="[tool.process.cancel]"),
    )

    assert decide(loaded, action=action).effect is expected


# --- env.now is one instant per request, through a daemon ----------------------


class StepClock(SettableClock):
    """Moves one second forward on every read: a second read would show."""

    def __call__(self) -> int:
        now = self._nanos
        self._nanos += 1_000_000_000
        return now


@pytest.fixture
def clock() -> StepClock:
    # Overrides conftest's clock for the daemons this module starts.
    return StepClock()


CLOCK_POLICY = """format_version: 1
kind: policy
name: clock
rules:
  - id: before-ten
    effect: allow
    actions: [clock.check]
    resources: [clock]
    roles: ["*"]
    condition: env.now < timestamp("2026-12-07T10:00:00Z")
  - id: from-ten
    effect: deny
    actions: [clock.check]
    resources: [clock]
    roles: ["*"]
    condition: env.now >= timestamp("2026-12-07T10:00:00Z")
"""


def test_env_now_is_read_once_per_request_and_replays_alike(start_daemon, tmp_path):
    policies = tmp_path / "policies"
    shutil.copytree(SHIPPED_POLICIES, policies)
    (policies / "clock.yaml").write_text(CLOCK_POLICY)
    running = start_daemon(f"policy.source={policies}")
    running.clock.set("2026-12-07T09:59:58Z")
    request = pb.DecideRequest(
        asserted_chain=["alice"],
        action="clock.check",
        resource=pb.Resource(kind="clock", id="c"),
    )

    answers = [running.stub().Decide(request) for _ in range(6)]

    for answer in answers:
        rules = {rule.rule for rule in answer.matched_rules}
        assert rules in ({"before-ten"}, {"from-ten"})
        record = read_record(running, answer.audit_sequence)
        env = Env(now=parse_instant(record.env["now"]["timestamp"]))
        replayed = evaluate(
            running.daemon.pipeline.policies.policy_set,
            running.daemon.pipeline.policies.directory,
            DecisionRequest(
                chain=tuple(entry.id for entry in record.chain),
                action=record.action,
                resource=Resource(kind="clock", id="c"),
            ),
            env,
        )
        assert str(replayed.effect) == record.decision
    assert {rule.rule for answer in answers for rule in answer.matched_rules} == {
        "before-ten",
        "from-ten",
    }


def test_reload_with_a_malformed_timestamp_literal_keeps_previous_set(
    start_daemon, tmp_path
):
    policies = tmp_path / "policies"
    shutil.copytree(SHIPPED_POLICIES, policies)
    running = start_daemon(f"policy.source={policies}")
    before = running.daemon.pipeline.policies
    (policies / "clock.yaml").write_text(
        CLOCK_POLICY.replace("2026-12-07T10:00:00Z", "2023-07-01")
    )

    reloaded = running.call(running.daemon.reload())

    assert reloaded is False
    assert running.daemon.pipeline.policies is before


def test_a_decomposed_literal_is_a_load_error():
    decomposed = unicodedata.normalize("NFD", "zoë")

    with pytest.raises(PolicyError, match="expected text in Unicode NFC"):
        compile_condition(f'principal.id == "{decomposed}"', path="p.yaml")
