"""AuditRecordV1 and the exact JSON form of typed values."""

from __future__ import annotations

import math

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kynara_sidecar.audit.chain import decode_record, encode_record
from kynara_sidecar.audit.record import (
    RECORD_VERSION,
    AuditRecordV1,
    ChainEntry,
    decode_value,
    encode_value,
    format_duration,
    format_timestamp,
    marker_record,
    parse_duration,
    parse_timestamp,
    record_from_decision,
)
from kynara_sidecar.decision import (
    ConditionError,
    Decision,
    DecisionRequest,
    Duration,
    Effect,
    Env,
    MatchedRule,
    PrincipalRef,
    Resource,
    Timestamp,
    UInt64,
)
from kynara_sidecar.errors import ReasonCode

# ------------------------------------------------------------ typed values


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (9007199254740993, {"int": "9007199254740993"}),
        (-(2**63), {"int": "-9223372036854775808"}),
        (UInt64(2**64 - 1), {"uint": "18446744073709551615"}),
        (1.5, {"double": 1.5}),
        (math.inf, {"double": "Infinity"}),
        (-math.inf, {"double": "-Infinity"}),
        ("x", {"string": "x"}),
        (True, {"bool": True}),
        (b"\x00\xff", {"bytes": "AP8="}),
        (Timestamp(1796374800, 1), {"timestamp": "2026-12-04T09:00:00.000000001Z"}),
        (Timestamp(-62135596800), {"timestamp": "0001-01-01T00:00:00Z"}),
        (Duration(1, 500_000_000), {"duration": "1.5s"}),
        (Duration(0, -1), {"duration": "-0.000000001s"}),
        (Duration(0), {"duration": "0s"}),
        ((1, "a"), {"list": [{"int": "1"}, {"string": "a"}]}),
        ({"k": [False]}, {"map": {"k": {"list": [{"bool": False}]}}}),
    ],
    ids=lambda v: type(v).__name__,
)
def test_typed_value_has_its_exact_json_form(value, expected):
    encoded = encode_value(value)

    assert encoded == expected


def test_nan_is_written_as_a_string_and_read_back_as_nan():
    encoded = encode_value(math.nan)

    assert encoded == {"double": "NaN"}
    assert math.isnan(decode_value(encoded))


def test_large_integers_stay_exact_through_json_text():
    value = {"big": 2**63 - 1, "unsigned": UInt64(2**64 - 1)}

    text = msgspec.json.encode(encode_value(value))
    back = decode_value(msgspec.json.decode(text))

    assert back == value
    assert type(back["unsigned"]) is UInt64
    assert type(back["big"]) is int


_scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.integers(min_value=0, max_value=2**64 - 1).map(UInt64),
    st.floats(allow_nan=False),
    st.text(),
    st.booleans(),
    st.binary(),
    st.builds(
        Timestamp,
        st.integers(min_value=-62135596800, max_value=253402300799),
        st.integers(min_value=0, max_value=999_999_999),
    ),
    st.integers(min_value=-(10**12), max_value=10**12).flatmap(
        lambda s: st.builds(
            Duration,
            st.just(s),
            st.integers(
                min_value=-999_999_999 if s <= 0 else 0,
                max_value=999_999_999 if s >= 0 else 0,
            ),
        )
    ),
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _typed(value):
    # Equality that also tells int from UInt64 from bool, and -0.0 from 0.0.
    if isinstance(value, list):
        return ["list", [_typed(v) for v in value]]
    if isinstance(value, dict):
        return ["map", {k: _typed(v) for k, v in value.items()}]
    if isinstance(value, float):
        return ["float", math.copysign(1, value), value]
    return [type(value).__name__, value]


@given(_values)
def test_typed_values_round_trip_exactly_through_json_text(value):
    text = msgspec.json.encode(encode_value(value), order="sorted")

    back = decode_value(msgspec.json.decode(text))

    assert _typed(back) == _typed(value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({1, 2}, r"cannot encode the value at \$: expected int, .*, got set"),
        ({"a": [1, None]}, r"cannot encode the value at \$\.a\[1\]: .* got NoneType"),
        (
            {"a": {2: "x"}},
            r"cannot encode the map at \$\.a: expected str keys, got int 2",
        ),
    ],
)
def test_unencodable_value_is_refused_with_its_path(value, message):
    with pytest.raises(TypeError, match=message):
        encode_value(value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (Timestamp(0, 10**9), r"timestamp nanos must be in \[0, 999999999\], got"),
        (Timestamp(253402300800), r"timestamp must lie in years 0001\.\.9999"),
        (Duration(1, -1), r"duration nanos must be in .* with the sign of seconds"),
    ],
)
def test_out_of_range_time_value_is_refused(value, message):
    with pytest.raises(ValueError, match=message):
        encode_value(value)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"int": 5}, r"bad int at \$: expected a decimal string, got 5"),
        ({"int": "1.5"}, r"bad int at \$: expected a decimal string, got '1\.5'"),
        ({"uint": "-1"}, r"bad uint at \$: expected a string of decimal digits"),
        ({"double": "1.5"}, r"bad double at \$: expected a number, 'NaN'"),
        ({"string": 1}, r"bad string at \$: expected a JSON string, got 1"),
        ({"bool": "true"}, r"bad bool at \$: expected a JSON boolean"),
        ({"bytes": "***"}, r"bad bytes at \$: "),
        ({"timestamp": "2026-12-04"}, r"bad timestamp at \$: expected an RFC 3339"),
        ({"timestamp": "2026-02-30T00:00:00Z"}, r"invalid timestamp '2026-02-30"),
        ({"duration": "5m"}, r"bad duration at \$: expected a duration such as"),
        ({"list": {}}, r"bad list at \$: expected a JSON array, got \{\}"),
        ({"map": {"a": {"int": "x"}}}, r"bad int at \$\.a: expected a decimal"),
        ({"list": [{"str": "x"}]}, r"unknown value type 'str' at \$\[0\]"),
        ({"int": "1", "uint": "1"}, r"expected a one-key object naming the type"),
        ("x", r"expected a one-key object naming the type at \$, got 'x'"),
    ],
)
def test_malformed_json_value_is_refused_with_its_path(data, message):
    with pytest.raises(ValueError, match=message):
        decode_value(data)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Timestamp(0), "1970-01-01T00:00:00Z"),
        (Timestamp(0, 500_000_000), "1970-01-01T00:00:00.5Z"),
        (Timestamp(-1, 999_999_999), "1969-12-31T23:59:59.999999999Z"),
        (Timestamp(-59011459200), "0100-01-01T00:00:00Z"),
    ],
)
def test_timestamp_text_round_trips(value, text):
    assert format_timestamp(value) == text
    assert parse_timestamp(text) == value


def test_duration_text_round_trips():
    assert parse_duration(format_duration(Duration(-3, -250_000_000))) == Duration(
        -3, -250_000_000
    )
    assert format_duration(Duration(-3, -250_000_000)) == "-3.25s"


# ------------------------------------------------------------------ records


def _decision_inputs():
    request = DecisionRequest(
        chain=("alice", "agent-7"),
        action="payments.refund.issue",
        resource=Resource("refund", "r-1", {"amount": 120, "tags": ["vip"]}),
        context={"ticket": "T-9", "limit": UInt64(500)},
        request_id="req-1",
    )
    env = Env(
        now=Timestamp(1796374800, 1),
        daemon_id="daemon-a",
        agent_id="agent-7",
        labels={"team": "pay"},
    )
    decision = Decision(
        effect=Effect.DENY,
        reason_code=ReasonCode.CONDITION_ERROR,
        reason="condition failed",
        chain=(
            PrincipalRef("alice", "user", ("support",)),
            PrincipalRef("agent-7", "agent", (), active=False),
        ),
        matched_rules=(MatchedRule("refunds", "cap", Effect.DENY, "alice"),),
        condition_errors=(ConditionError("refunds", "cap", "alice", "no such key"),),
        policy_revision="p-3",
        directory_revision="d-2",
        shadow_effect=Effect.ALLOW,
    )
    return request, env, decision


def test_record_from_decision_holds_the_request_env_and_answer():
    request, env, decision = _decision_inputs()

    record = record_from_decision(
        request=request,
        env=env,
        decision=decision,
        decision_id="dec-1",
        identity_mode="development",
        redactions=["$.context.card"],
    )

    assert record.kind == "decision"
    assert record.time == "2026-12-04T09:00:00.000000001Z"
    assert record.daemon_id == "daemon-a"
    assert record.identity_mode == "development"
    assert record.chain[1] == ChainEntry(
        id="agent-7", kind="agent", roles=[], known=True, active=False
    )
    assert record.resource.attributes["amount"] == {"int": "120"}
    assert record.context["limit"] == {"uint": "500"}
    assert record.env["now"] == {"timestamp": "2026-12-04T09:00:00.000000001Z"}
    assert record.env["labels"] == {"map": {"team": {"string": "pay"}}}
    assert record.matched_rules[0].effect == "deny"
    assert record.condition_errors[0].message == "no such key"
    assert (record.decision, record.reason_code) == ("deny", "condition_error")
    assert record.shadow_effect == "allow"
    assert record.redactions == ["$.context.card"]


def test_record_from_decision_replays_the_exact_context_and_env():
    request, env, decision = _decision_inputs()
    record = record_from_decision(
        request=request, env=env, decision=decision, decision_id="d", identity_mode=""
    )

    back = decode_record(encode_record(record))

    assert decode_value({"map": back.context}) == request.context
    assert decode_value({"map": back.resource.attributes}) == {
        "amount": 120,
        "tags": ["vip"],
    }
    assert decode_value(back.env["now"]) == env.now


def test_record_omits_fields_left_at_their_defaults():
    record = marker_record("start", "d", Timestamp(1767225600))

    data = encode_record(record)

    assert data == (
        b'{"daemon_id":"d","kind":"marker","marker":{"event":"start"},'
        b'"time":"2026-01-01T00:00:00Z","v":1}'
    )


def test_reader_ignores_keys_it_does_not_know():
    data = b'{"v":1,"kind":"future_kind","time":"t","seq":4,"new_field":{"x":1}}'

    record = decode_record(data)

    assert record == AuditRecordV1(
        v=RECORD_VERSION, kind="future_kind", time="t", seq=4
    )


def test_reader_refuses_a_record_without_its_version_with_the_path():
    with pytest.raises(msgspec.ValidationError, match=r"missing required field `v`"):
        decode_record(b'{"kind":"marker","time":"t"}')


def test_records_of_one_decision_hash_as_records_built_each_alone():
    request, env, decision = _decision_inputs()
    first = record_from_decision(
        request=request, env=env, decision=decision, decision_id="d1"
    )
    # Another decision equal to the first, built apart: nothing kept for it.
    copy = msgspec.structs.replace(decision)
    again = record_from_decision(
        request=request, env=env, decision=decision, decision_id="d1"
    )

    alone = record_from_decision(
        request=request, env=env, decision=copy, decision_id="d1"
    )

    assert encode_record(first) == encode_record(again) == encode_record(alone)


def test_record_env_follows_changed_labels_peer_and_agent():
    request, env, decision = _decision_inputs()
    labels = {"team": "pay"}

    def env_of(**fields):
        record = record_from_decision(
            request=request,
            env=msgspec.structs.replace(env, **fields),
            decision=decision,
            decision_id="d",
        )
        return record.env

    before = env_of(labels=labels)
    labels["team"] = "ops"  # the same mapping, changed in place
    changed = env_of(labels=labels)
    peer = env_of(labels=labels, peer="unix:")
    agent = env_of(labels=labels, peer="unix:", agent_id="agent-8")

    assert before["labels"] == {"map": {"team": {"string": "pay"}}}
    assert changed["labels"] == {"map": {"team": {"string": "ops"}}}
    assert peer["peer"] == {"string": "unix:"}
    assert agent["agent_id"] == {"string": "agent-8"}
    assert agent["now"] == {"timestamp": "2026-12-04T09:00:00.000000001Z"}
