"""Python values to wire Values: exact, typed, and refused with a key path."""

from __future__ import annotations

import datetime
import math
import zoneinfo

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kynara.v1 import decision_pb2
from kynara_sdk import UInt64
from kynara_sdk._proto import build_request
from kynara_sdk._values import MAX_DEPTH, to_value, to_value_map
from kynara_sdk.decision import DecisionRequest

BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")


def wire_roundtrip(value) -> decision_pb2.Value:
    """Serialize and parse, as the daemon would see the value."""
    return decision_pb2.Value.FromString(to_value(value).SerializeToString())


@pytest.mark.parametrize(
    ("value", "kind", "expected"),
    [
        (True, "bool_value", True),
        (False, "bool_value", False),
        (0, "int_value", 0),
        (-7, "int_value", -7),
        (2**53 + 1, "int_value", 2**53 + 1),
        (2**63 - 1, "int_value", 2**63 - 1),
        (-(2**63), "int_value", -(2**63)),
        (2**63, "uint_value", 2**63),
        (2**64 - 1, "uint_value", 2**64 - 1),
        (UInt64(0), "uint_value", 0),
        (UInt64(7), "uint_value", 7),
        (UInt64(2**64 - 1), "uint_value", 2**64 - 1),
        (1.5, "double_value", 1.5),
        ("refund", "string_value", "refund"),
        ("", "string_value", ""),
        (b"\x00\xff", "bytes_value", b"\x00\xff"),
        (bytearray(b"ab"), "bytes_value", b"ab"),
    ],
    ids=repr,
)
def test_scalar_travels_as_its_own_kind_exactly(value, kind, expected):
    wire = wire_roundtrip(value)

    assert wire.WhichOneof("kind") == kind
    assert getattr(wire, kind) == expected
    assert type(getattr(wire, kind)) is type(expected)


def test_two_to_the_53_plus_one_survives_exactly_not_as_a_double():
    wire = wire_roundtrip({"amount": 2**53 + 1})

    assert wire.map_value.entries["amount"].int_value == 9007199254740993


def test_float_special_values_are_doubles():
    assert math.isnan(wire_roundtrip(math.nan).double_value)
    assert wire_roundtrip(-math.inf).double_value == -math.inf


@pytest.mark.parametrize(
    ("when", "seconds", "nanos"),
    [
        (datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC), 0, 0),
        (
            datetime.datetime(2026, 3, 29, 2, 30, 0, 250_001, tzinfo=datetime.UTC),
            1774751400,
            250_001_000,
        ),
        # Berlin in summer is UTC+2: the instant, not the wall clock, travels.
        (datetime.datetime(2026, 7, 1, 9, 0, tzinfo=BERLIN), 1782889200, 0),
        (
            datetime.datetime(1969, 12, 31, 23, 59, 59, 500_000, tzinfo=datetime.UTC),
            -1,
            500_000_000,
        ),
    ],
)
def test_aware_datetime_is_a_timestamp_of_the_same_instant(when, seconds, nanos):
    wire = wire_roundtrip(when)

    assert wire.WhichOneof("kind") == "timestamp_value"
    assert (wire.timestamp_value.seconds, wire.timestamp_value.nanos) == (
        seconds,
        nanos,
    )
    assert wire.timestamp_value.ToDatetime(tzinfo=datetime.UTC) == when


@pytest.mark.parametrize(
    ("span", "seconds", "nanos"),
    [
        (datetime.timedelta(0), 0, 0),
        (datetime.timedelta(hours=1, microseconds=5), 3600, 5_000),
        (datetime.timedelta(microseconds=-1_500_000), -1, -500_000_000),
        (datetime.timedelta(days=-1), -86_400, 0),
    ],
)
def test_timedelta_is_a_duration_with_one_sign(span, seconds, nanos):
    wire = wire_roundtrip(span)

    assert wire.WhichOneof("kind") == "duration_value"
    assert (wire.duration_value.seconds, wire.duration_value.nanos) == (
        seconds,
        nanos,
    )
    assert wire.duration_value.ToTimedelta() == span


def test_nested_lists_and_maps_keep_their_shape_and_kinds():
    wire = wire_roundtrip({"items": [1, "a", (True, 2.5)], "empty": {}, "none": []})

    entries = wire.map_value.entries
    items = entries["items"].list_value.values
    assert [item.WhichOneof("kind") for item in items] == [
        "int_value",
        "string_value",
        "list_value",
    ]
    assert items[2].list_value.values[0].bool_value is True
    assert entries["empty"].WhichOneof("kind") == "map_value"
    assert entries["none"].WhichOneof("kind") == "list_value"


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (
            {"amount": 2**64},
            ValueError,
            r"^ctx\.amount: expected an integer within int64 or uint64"
            r" \[-2\*\*63, 2\*\*64-1\], got 18446744073709551616$",
        ),
        (
            {"amount": -(2**63) - 1},
            ValueError,
            r"^ctx\.amount: expected an integer within int64 or uint64 .*"
            r"got -9223372036854775809$",
        ),
        (
            {"n": UInt64(-1)},
            ValueError,
            r"^ctx\.n: expected a UInt64 within \[0, 2\*\*64-1\], got -1$",
        ),
        (
            {"n": UInt64(2**64)},
            ValueError,
            r"^ctx\.n: expected a UInt64 within \[0, 2\*\*64-1\],"
            r" got 18446744073709551616$",
        ),
        (
            {"at": [datetime.datetime(2026, 1, 1, 9, 0)]},
            ValueError,
            r"^ctx\.at\[0\]: expected an aware datetime, got a naive one"
            r" \(2026-01-01 09:00:00\); a naive datetime is an ambiguous instant",
        ),
        (
            {"a": {"b": [1, {2, 3}]}},
            TypeError,
            r"^ctx\.a\.b\[1\]: expected bool, int, float, str, bytes, datetime,"
            r" timedelta, list or dict, got set$",
        ),
        (
            {"when": datetime.date(2026, 1, 1)},
            TypeError,
            r"^ctx\.when: expected bool, .* got date$",
        ),
        ({"v": None}, TypeError, r"^ctx\.v: expected bool, .* got NoneType$"),
        (
            {"m": {1: "x"}},
            TypeError,
            r"^ctx\.m: expected str keys, got int key 1$",
        ),
    ],
    ids=[
        "above-uint64",
        "below-int64",
        "negative-uint",
        "uint-overflow",
        "naive-datetime",
        "set-in-list",
        "date",
        "none",
        "int-key",
    ],
)
def test_unconvertible_value_is_refused_naming_its_key_path(value, error, message):
    with pytest.raises(error, match=message):
        to_value_map(value, "ctx")


def test_top_level_key_that_is_not_a_str_is_refused():
    with pytest.raises(TypeError, match=r"^context: expected str keys, got int key 3$"):
        to_value_map({3: 1}, "context")


def test_mapping_that_is_not_a_dict_is_refused():
    with pytest.raises(
        TypeError, match=r"^context: expected a dict of str to values, got list$"
    ):
        to_value_map([("a", 1)], "context")


@given(st.integers(min_value=-(2**63), max_value=2**64 - 1))
def test_every_int64_or_uint64_integer_survives_exactly(number):
    wire = wire_roundtrip(number)

    kind = wire.WhichOneof("kind")
    assert getattr(wire, kind) == number
    assert kind == ("int_value" if number < 2**63 else "uint_value")


json_like = st.recursive(
    st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False)
    | st.binary(max_size=4)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=12,
)


def from_wire(wire: decision_pb2.Value):
    kind = wire.WhichOneof("kind")
    if kind == "list_value":
        return [from_wire(item) for item in wire.list_value.values]
    if kind == "map_value":
        return {key: from_wire(item) for key, item in wire.map_value.entries.items()}
    return getattr(wire, kind)


@given(json_like)
def test_nested_values_come_back_equal_and_typed(value):
    back = from_wire(wire_roundtrip(value))

    assert tagged(back) == tagged(value)


def tagged(value):
    """The value with every leaf paired with its type: True is not 1."""
    if isinstance(value, list):
        return [tagged(item) for item in value]
    if isinstance(value, dict):
        return {key: tagged(item) for key, item in value.items()}
    return (type(value).__name__, value)


def nested(depth: int, kind: str):
    value: object = 1
    for _ in range(depth):
        value = [value] if kind == "list" else {"k": value}
    return value


@pytest.mark.parametrize("kind", ["list", "map"])
def test_values_nested_as_deep_as_the_daemon_reads_are_sent(kind):
    wire = to_value(nested(MAX_DEPTH, kind))

    assert wire.WhichOneof("kind") == f"{kind}_value"
    assert MAX_DEPTH == 16  # the daemon's server.wire.MAX_VALUE_DEPTH


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 50, 400, 5000])
@pytest.mark.parametrize("kind", ["list", "map"])
def test_values_nested_deeper_are_refused_with_the_limit_named(kind, depth):
    request = DecisionRequest(
        action="a.b",
        resource_kind="k.k",
        user="alice",
        attributes={"deep": nested(depth, kind)},
    )

    with pytest.raises(ValueError, match="nested at most 16 deep") as info:
        build_request(request)

    assert str(info.value).startswith("resource.attributes.deep")


def test_a_list_that_contains_itself_is_refused():
    loop: list = []
    loop.append(loop)

    with pytest.raises(ValueError, match="contains itself"):
        to_value_map({"loop": loop}, "context")
