"""Tool arguments as typed attributes (gateway/arguments.py)."""

from __future__ import annotations

import hashlib
import math

import pytest

from kynara_sidecar.decision import UInt64
from kynara_sidecar.errors import InvalidRequest
from kynara_sidecar.gateway.arguments import (
    MAX_ARGUMENT_VALUES,
    arguments_digest,
    to_attributes,
)
from kynara_sidecar.server.wire import MAX_VALUE_DEPTH


def test_every_json_type_becomes_its_typed_value():
    document = {
        "count": 3,
        "negative": -(2**63),
        "big": 2**63,
        "largest": 2**64 - 1,
        "ratio": 0.5,
        "name": "a\x00b",
        "yes": True,
        "no": False,
        "items": [1, "two", [3.0]],
        "nested": {"inner": {"deep": "x"}},
    }

    attributes = to_attributes(document)

    # Every value kept as it was; its type is what the conversion decides.
    assert attributes == document
    assert type(attributes["count"]) is int
    assert type(attributes["negative"]) is int
    assert type(attributes["big"]) is UInt64
    assert type(attributes["largest"]) is UInt64
    assert type(attributes["yes"]) is bool
    assert type(attributes["ratio"]) is float


def test_null_entries_are_absent_attributes():
    assert to_attributes({"path": "/a", "mode": None, "opts": {"x": None}}) == {
        "path": "/a",
        "opts": {},
    }


def test_no_arguments_are_no_attributes():
    assert to_attributes(None) == {}
    assert to_attributes({}) == {}


def nest(depth: int) -> object:
    value: object = "leaf"
    for _ in range(depth):
        value = [value]
    return value


def test_nesting_up_to_the_grpc_doors_limit_is_accepted():
    assert to_attributes({"a": nest(MAX_VALUE_DEPTH)}) == {"a": nest(MAX_VALUE_DEPTH)}


@pytest.mark.parametrize(
    ("arguments", "field", "says"),
    [
        ({"items": [1, None]}, "arguments.items[1]", "null inside a list"),
        ({"x": math.nan}, "arguments.x", "nan"),
        ({"x": {"y": math.inf}}, "arguments.x.y", "inf"),
        ({"x": -math.inf}, "arguments.x", "-inf"),
        ({"n": 2**64}, "arguments.n", str(2**64)),
        ({"n": -(2**63) - 1}, "arguments.n", str(-(2**63) - 1)),
        (
            {"a": nest(MAX_VALUE_DEPTH + 1)},
            "arguments.a" + "[0]" * MAX_VALUE_DEPTH,
            f"at most {MAX_VALUE_DEPTH} deep",
        ),
        ({"m": {"": 1}}, "arguments.m", "non-empty key"),
        ({"m": {"a\x00b": 1}}, "arguments.m", "without NUL"),
        ({"odd key": [b"raw"]}, "arguments['odd key'][0]", "bytes"),
        ([1, 2], "arguments", "expected an object, got list"),
    ],
)
def test_untypable_values_are_refused_with_their_path(arguments, field, says):
    with pytest.raises(InvalidRequest) as refused:
        to_attributes(arguments)

    assert refused.value.field == field
    assert says in str(refused.value)


def test_more_values_than_the_limit_are_refused():
    at_limit = {"items": list(range(MAX_ARGUMENT_VALUES - 1))}
    over = {"items": list(range(MAX_ARGUMENT_VALUES))}

    assert len(to_attributes(at_limit)["items"]) == MAX_ARGUMENT_VALUES - 1
    with pytest.raises(InvalidRequest) as refused:
        to_attributes(over)
    assert refused.value.field == f"arguments.items[{MAX_ARGUMENT_VALUES - 1}]"
    assert str(MAX_ARGUMENT_VALUES) in str(refused.value)


def test_digest_is_the_sha256_of_canonical_json():
    arguments = {"path": "/é", "n": 1, "opts": {"b": None, "a": [True]}}

    expected = hashlib.sha256(
        '{"n":1,"opts":{"a":[true],"b":null},"path":"/é"}'.encode()
    ).hexdigest()
    assert arguments_digest(arguments) == expected


def test_digest_is_stable_across_key_order_and_differs_by_value():
    one = {"a": 1, "b": {"x": 1, "y": 2}}
    other = {"b": {"y": 2, "x": 1}, "a": 1}

    assert arguments_digest(one) == arguments_digest(other)
    assert arguments_digest(one) != arguments_digest({"a": 2, "b": {"x": 1, "y": 2}})


def test_no_arguments_digest_as_an_empty_object():
    empty = hashlib.sha256(b"{}").hexdigest()

    assert arguments_digest(None) == empty
    assert arguments_digest({}) == empty
