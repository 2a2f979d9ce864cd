"""CEL conditions: load-time checks with exact messages, and evaluation."""

from __future__ import annotations

import re

import pytest
from google.protobuf import duration_pb2, timestamp_pb2, wrappers_pb2
from hypothesis import given
from hypothesis import strategies as st

from kynara_sidecar.decision import Duration, Timestamp, UInt64
from kynara_sidecar.errors import PolicyError
from kynara_sidecar.policy.conditions import (
    ConditionFailure,
    compile_condition,
    to_cel_value,
)

WHERE = "p.yaml:$.rules[0].condition: rule 'r1' condition: "
NOW = to_cel_value(Timestamp(1796634000))  # Monday 2026-12-07 10:00 Berlin


def compile_r1(source: str):
    return compile_condition(
        source, path="p.yaml", location="$.rules[0].condition", rule="r1"
    )


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            "context.a >",
            "expected a valid CEL expression, got Syntax error: mismatched input "
            "'<EOF>' expecting",
        ),
        (
            "1 == 1.0",
            "expected a valid CEL expression, got found no matching overload for "
            "'_==_' applied to '(int, double)' at line 1 column 3",
        ),
        (
            "context.a == 1 &&\n  action + 1 == 2",
            "expected a valid CEL expression, got found no matching overload for "
            "'_+_' applied to '(string, int)' at line 2 column 10",
        ),
        (
            "request.amount > 5",
            "expected a valid CEL expression, got undeclared reference to "
            "'request.amount' (in container '') at line 1 column 8",
        ),
        ('action.lowerAscii() + "x"', "expected a bool result, got string"),
        ("principal.roles.size()", "expected a bool result, got int"),
        (
            'timestamp("2023-07-01") < env.now',
            "expected a timestamp literal such as '2026-12-07T09:00:00Z', got "
            "'2023-07-01' at line 1 column 11",
        ),
        (
            'env.now - timestamp("2026-01-01T00:00:00Z") > duration("one day")',
            "expected a duration literal such as '1h30m', got 'one day' at line 1 "
            "column 56",
        ),
        (
            'env.now.getHours("Mars/Base") > 1',
            "expected an IANA time zone such as 'Europe/Berlin' or a fixed offset "
            "such as '+02:00', got 'Mars/Base' at line 1 column 18",
        ),
        (
            'env.now.getHours("localtime") > 1',
            "expected an IANA time zone such as 'Europe/Berlin' or a fixed offset "
            "such as '+02:00', got 'localtime' at line 1 column 18",
        ),
        (
            'env.now.getHours("Factory") > 1',
            "expected an IANA time zone such as 'Europe/Berlin' or a fixed offset "
            "such as '+02:00', got 'Factory' at line 1 column 18",
        ),
        (
            "context.ok &&\n"
            '  [1, 2].exists(h, env.now.getMinutes("europe/berlin") == h)',
            "expected an IANA time zone such as 'Europe/Berlin' or a fixed offset "
            "such as '+02:00', got 'europe/berlin' at line 2 column 39",
        ),
        (
            'context.ok && env.now.getDayOfWeek("+2:00") == 1',
            "expected an IANA time zone such as 'Europe/Berlin' or a fixed offset "
            "such as '+02:00', got '+2:00' at line 1 column 36",
        ),
    ],
)
def test_bad_condition_is_refused_with_position(source, message):
    with pytest.raises(PolicyError, match=re.escape(WHERE + message)) as caught:
        compile_r1(source)

    assert caught.value.path == "p.yaml"
    assert caught.value.location == "$.rules[0].condition"


@pytest.mark.parametrize(
    "source",
    [
        "true",
        "context.flag",
        'env.now.getHours("Europe/Berlin") >= 9',
        'env.now.getHours("+02:00") >= 9 && env.now.getHours("UTC") < 23',
        'env.now > timestamp("2026-01-01T00:00:00+01:00")',
        'duration("1h30m") > duration("90s")',
        'has(context.region) && context.region.lowerAscii() in ["kp"]',
        'context.name.trim().upperAscii().startsWith("A")',
        "resource.attr.amount <= 50000 && principal.kind == 'user'",
        "timestamp(context.at) < env.now",
    ],
)
def test_good_condition_compiles(source):
    assert compile_r1(source).source == source


@pytest.mark.parametrize(
    ("source", "data", "expected"),
    [
        ("context.n > 2", {"context": {"n": 3}}, True),
        ("context.n > 2", {"context": {"n": 2}}, False),
        ('env.now.getHours("Europe/Berlin") == 10', {"env": {"now": NOW}}, True),
        ('env.now.getHours("UTC") == 9', {"env": {"now": NOW}}, True),
        ("context.u == 5u", {"context": {"u": to_cel_value(UInt64(5))}}, True),
        (
            "context.n == 9223372036854775807",
            {"context": {"n": 9223372036854775807}},
            True,
        ),
    ],
)
def test_condition_evaluates_to_bool(source, data, expected):
    assert compile_r1(source).evaluate(data) is expected


@pytest.mark.parametrize(
    ("source", "data", "message"),
    [
        (
            "context.n > 2",
            {"context": {"n": "x"}},
            "UNKNOWN: No matching overloads found : _>_(string, int64)",
        ),
        (
            "context.n > 2",
            {"context": {}},
            'NOT_FOUND: Key not found in map : "n"',
        ),
        ("context.n", {"context": {"n": 1}}, "expected a bool result, got int"),
        (
            "context.n + 1 > 0",
            {"context": {"n": 9223372036854775807}},
            "OUT_OF_RANGE: integer overflow",
        ),
    ],
)
def test_evaluation_error_is_returned_not_raised(source, data, message):
    assert compile_r1(source).evaluate(data) == ConditionFailure(message)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (UInt64(7), wrappers_pb2.UInt64Value(value=7)),
        (Timestamp(5, 6), timestamp_pb2.Timestamp(seconds=5, nanos=6)),
        (Duration(-5, -6), duration_pb2.Duration(seconds=-5, nanos=-6)),
        (b"\x00", wrappers_pb2.BytesValue(value=b"\x00")),
        ("a\x00", wrappers_pb2.StringValue(value="a\x00")),
        ("plain", "plain"),
        (True, True),
        (3, 3),
        (1.5, 1.5),
        ((1, (2,)), [1, [2]]),
        ({"k": (UInt64(1),)}, {"k": [wrappers_pb2.UInt64Value(value=1)]}),
    ],
)
def test_to_cel_value(value, expected):
    assert to_cel_value(value) == expected


def test_to_cel_value_refuses_nul_in_map_keys():
    with pytest.raises(
        ValueError,
        match=re.escape("expected map keys without NUL characters, got 'a\\x00'"),
    ):
        to_cel_value({"a\x00": 1})


@given(st.integers(0, 2**64 - 1))
def test_uint64_values_stay_exact(number):
    condition = compile_r1(f"context.u == {number}u && type(context.u) == uint")

    assert condition.evaluate({"context": {"u": to_cel_value(UInt64(number))}})


@given(st.integers(-(2**63) + 1, 2**63 - 1))
def test_int64_values_stay_exact(number):
    condition = compile_r1(f"context.n == {number}")

    assert condition.evaluate({"context": {"n": number}}) is True


@pytest.mark.parametrize(
    ("source", "variables"),
    [
        ("principal.attr.team == resource.attr.team", {"principal", "resource"}),
        ("has(principal.attr.x)", {"principal"}),
        ('resource.attr.tags.exists(t, t == "public")', {"resource"}),
        ('context.note == "principal"', {"context"}),
        ('{"a": env.now}["a"] == env.now && action == "x"', {"action", "env"}),
        ("chain.depth <= 3 || user.id in agent.roles", {"agent", "chain", "user"}),
        # A comprehension variable spelt like a declared one counts as it.
        ("[1, 2].exists(principal, principal == 1)", {"principal"}),
        ("true", set()),
    ],
)
def test_variables_are_the_declared_ones_the_expression_names(source, variables):
    assert compile_r1(source).variables == frozenset(variables)
