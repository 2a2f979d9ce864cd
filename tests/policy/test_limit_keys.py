"""Whose count a request is (``key_of``) and what it adds (``amount_of``)."""

from __future__ import annotations

import json
import math

import pytest

from kynara_sidecar.audit.record import encode_value
from kynara_sidecar.decision import (
    DecisionRequest,
    Duration,
    Effect,
    Resource,
    Timestamp,
    UInt64,
)
from kynara_sidecar.policy.limits import (
    MAX_KEY_LENGTH,
    CompiledLimit,
    KeyPart,
    LimitProblem,
    Window,
    amount_of,
    key_of,
)


def limit(*key: KeyPart, ceiling: float = 5, sum_source="", sum_field=""):
    return CompiledLimit(
        name="cap",
        policy="p",
        actions=("pay.refund",),
        resources=("*",),
        decisions=frozenset({Effect.ALLOW}),
        key=key,
        window=Window(rolling_nanos=10**9),
        ceiling=ceiling,
        sum_source=sum_source,
        sum_field=sum_field,
    )


def request(context=None, attributes=None, resource_id="r-1", chain=("ulla", "ada")):
    return DecisionRequest(
        chain=chain,
        action="pay.refund",
        resource=Resource("pay.order", resource_id, attributes or {}),
        context=context or {},
    )


ATTRIBUTES = {"user": {"team": "ops", "tags": ("a",)}, "agent": {"tier": 2}}


@pytest.mark.parametrize(
    ("part", "expected"),
    [
        (KeyPart("user"), '["ulla"]'),
        (KeyPart("agent"), '["ada"]'),
        (KeyPart("chain"), '[["ulla","mid","ada"]]'),
        (KeyPart("resource.id"), '["r-1"]'),
        (KeyPart("resource.kind"), '["pay.order"]'),
        (KeyPart("context", "shop"), '[{"string":"zürich"}]'),
        (KeyPart("resource.attr", "n"), '[{"number":"7"}]'),
        (KeyPart("user.attr", "team"), '[{"string":"ops"}]'),
        (KeyPart("agent.attr", "tier"), '[{"number":"2"}]'),
    ],
)
def test_each_key_source(part, expected):
    found = key_of(
        limit(part),
        request({"shop": "zürich"}, {"n": 7}, chain=("ulla", "mid", "ada")),
        ATTRIBUTES,
    )
    assert found == expected


def test_parts_are_kept_in_declared_order_in_compact_json():
    found = key_of(
        limit(KeyPart("agent"), KeyPart("user"), KeyPart("context", "n")),
        request({"n": UInt64(3)}),
        ATTRIBUTES,
    )
    assert found == '["ada","ulla",{"number":"3"}]'


def test_ids_compare_after_nfc_as_the_directory_does():
    composed = key_of(limit(KeyPart("user")), request(chain=("zo\u00eb", "a")), {})
    decomposed = key_of(limit(KeyPart("user")), request(chain=("zoe\u0308", "a")), {})
    assert composed == decomposed == '["zo\u00eb"]'


@pytest.mark.parametrize(
    "value",
    [True, "text", b"\x00\xff", Timestamp(1796634000, 500), Duration(-3, -5)],
)
def test_a_scalar_is_written_as_the_audit_log_writes_it(value):
    found = key_of(limit(KeyPart("context", "v")), request({"v": value}), {})
    assert json.loads(found) == [encode_value(value)]


@pytest.mark.parametrize(
    ("values", "text"),
    [
        ((7, UInt64(7), 7.0), '[{"number":"7"}]'),
        ((0, -0.0, 0.0, UInt64(0)), '[{"number":"0"}]'),
        ((-5, -5.0), '[{"number":"-5"}]'),
        ((UInt64(2**53), float(2**53), 2**53), '[{"number":"9007199254740992"}]'),
        ((1.5,), '[{"number":"1.5"}]'),
        (("caf\u00e9", "cafe\u0301"), '[{"string":"caf\u00e9"}]'),
    ],
)
def test_values_equal_as_cel_finds_them_make_one_key(values, text):
    found = {
        key_of(limit(KeyPart("context", "v")), request({"v": value}), {})
        for value in values
    }
    assert found == {text}


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_number_that_equals_nothing_is_no_key(value):
    found = key_of(limit(KeyPart("context", "v")), request({"v": value}), {})
    assert isinstance(found, LimitProblem)


def test_a_resource_id_compares_after_nfc():
    composed = key_of(
        limit(KeyPart("resource.id")), request(resource_id="caf\u00e9"), {}
    )
    decomposed = key_of(
        limit(KeyPart("resource.id")), request(resource_id="cafe\u0301"), {}
    )
    assert composed == decomposed


def test_lists_that_would_join_alike_stay_distinct():
    two = key_of(
        limit(KeyPart("context", "a"), KeyPart("context", "b")),
        request({"a": "a", "b": "b"}),
        {},
    )
    one = key_of(limit(KeyPart("context", "a")), request({"a": 'a","b'}), {})
    assert two != one
    assert json.loads(one) == [{"string": 'a","b'}]
    ids = key_of(limit(KeyPart("chain")), request(chain=("a", "b")), {})
    joined = key_of(limit(KeyPart("chain")), request(chain=('a","b',)), {})
    assert ids == '[["a","b"]]' and joined != ids


@pytest.mark.parametrize(
    ("part", "req", "message"),
    [
        (
            KeyPart("context", "shop"),
            request(),
            "context.shop: the request has no such value",
        ),
        (
            KeyPart("resource.attr", "n"),
            request(),
            "resource.attr.n: the request has no such",
        ),
        (
            KeyPart("user.attr", "level"),
            request(),
            "user.attr.level: the request has no such",
        ),
        (
            KeyPart("agent.attr", "tier"),
            request(),
            "agent.attr.tier: the request has no such",
        ),
        (KeyPart("resource.id"), request(resource_id=""), "names no resource id"),
        (KeyPart("user"), request(chain=()), "the chain is empty"),
        (
            KeyPart("context", "l"),
            request({"l": [1, 2]}),
            "expected a scalar value, got a list",
        ),
        (
            KeyPart("context", "m"),
            request({"m": {"a": 1}}),
            "expected a scalar value, got a map",
        ),
        (
            KeyPart("user.attr", "tags"),
            request(),
            "expected a scalar value, got a list",
        ),
    ],
)
def test_a_missing_or_non_scalar_part_is_a_problem(part, req, message):
    found = key_of(limit(part), req, {"user": ATTRIBUTES["user"]})
    assert isinstance(found, LimitProblem)
    assert message in found.message


def test_a_key_past_the_longest_is_a_problem_never_cut():
    fits = "x" * (MAX_KEY_LENGTH - len('[{"string":""}]'))
    assert len(key_of(limit(KeyPart("context", "v")), request({"v": fits}), {})) == (
        MAX_KEY_LENGTH
    )
    found = key_of(limit(KeyPart("context", "v")), request({"v": fits + "x"}), {})
    assert isinstance(found, LimitProblem) and "at most 1024 bytes" in found.message
    # Counted in UTF-8 bytes, not characters.
    wide = key_of(limit(KeyPart("context", "v")), request({"v": "é" * 600}), {})
    assert isinstance(wide, LimitProblem)


def test_a_counting_limit_adds_one():
    assert amount_of(limit(KeyPart("user")), request()) == 1


def summing(ceiling: float, source="context"):
    return limit(
        KeyPart("user"), ceiling=ceiling, sum_source=source, sum_field="amount"
    )


@pytest.mark.parametrize(
    ("ceiling", "value", "expected"),
    [
        (100, 7, 7),
        (100, 0, 0),
        (100, UInt64(9), 9),
        (100, UInt64(2**63 - 1), 2**63 - 1),
        (100.0, 7, 7.0),
        (100.0, 2.5, 2.5),
        (100.0, UInt64(3), 3.0),
        (100.0, -0.0, 0.0),
    ],
)
def test_a_summing_limit_adds_the_value(ceiling, value, expected):
    found = amount_of(summing(ceiling), request({"amount": value}))
    assert found == expected and type(found) is type(expected)
    assert not math.copysign(1, found) < 0


@pytest.mark.parametrize(
    ("ceiling", "value", "message"),
    [
        (100, -1, "expected an int at least 0, got -1"),
        (100.0, -0.5, "expected a number at least 0"),
        (100.0, math.nan, "expected a finite number"),
        (100.0, math.inf, "expected a finite number"),
        (100, True, "expected a number, got bool"),
        (100.0, False, "expected a number, got bool"),
        (100, "7", "expected a number, got str"),
        (100, [1], "expected a number, got a list"),
        (100, 7.0, "expected an int (the ceiling is an int), got double 7.0"),
        (100, UInt64(2**63), "expected an int of at most 2**63-1"),
    ],
)
def test_a_bad_amount_is_a_problem(ceiling, value, message):
    found = amount_of(summing(ceiling), request({"amount": value}))
    assert isinstance(found, LimitProblem)
    assert message in found.message and "context.amount" in found.message


def test_a_missing_amount_is_a_problem_and_resource_attr_is_read():
    found = amount_of(summing(10, "resource.attr"), request({"amount": 3}))
    assert found == LimitProblem(
        "sum resource.attr.amount: the request has no such value"
    )
    assert (
        amount_of(summing(10, "resource.attr"), request(attributes={"amount": 3})) == 3
    )
