"""The fast path's MessagePack translation on its own: typed values arrive
exactly, and any payload ends in a request or in ``InvalidRequest``."""

from __future__ import annotations

import struct

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kynara_sidecar.decision import Duration, Timestamp, UInt64
from kynara_sidecar.errors import InvalidRequest
from kynara_sidecar.pipeline import validate_request
from kynara_sidecar.server.fastpath_wire import (
    Decide,
    DecideBatch,
    decode_batch_item,
    decode_frame,
    encode_message,
    request_from_payload,
)
from kynara_sidecar.server.wire import MAX_VALUE_DEPTH

INT64 = (-(1 << 63), (1 << 63) - 1)
TIMESTAMP_SECONDS = (-62_135_596_800, 253_402_300_799)
MAX_DURATION_SECONDS = 315_576_000_000
# Wall-clock deadlines flake on a shared machine: speed is for benchmarks.
PROPERTY = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
KEYS = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters="\x00"),
    min_size=1,
    max_size=12,
)


def _to_fast(value):
    if isinstance(value, UInt64):
        return msgspec.msgpack.Ext(1, int(value).to_bytes(8, "big"))
    if isinstance(value, Timestamp):
        return msgspec.msgpack.Ext(-1, struct.pack(">Iq", value.nanos, value.seconds))
    if isinstance(value, Duration):
        return msgspec.msgpack.Ext(2, struct.pack(">qi", value.seconds, value.nanos))
    if isinstance(value, list):
        return [_to_fast(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_fast(v) for k, v in value.items()}
    return value


def _durations():
    positive = st.builds(
        Duration,
        st.integers(0, MAX_DURATION_SECONDS),
        st.integers(0, 999_999_999),
    )
    return st.one_of(positive, positive.map(lambda d: Duration(-d.seconds, -d.nanos)))


SCALARS = st.one_of(
    st.integers(*INT64),
    st.integers(0, (1 << 64) - 1).map(UInt64),
    st.floats(allow_nan=False),
    TEXT,
    st.binary(max_size=20),
    st.booleans(),
    st.builds(Timestamp, st.integers(*TIMESTAMP_SECONDS), st.integers(0, 999_999_999)),
    _durations(),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=4)
    ),
    max_leaves=20,
)


def _decide(context) -> bytes:
    return msgspec.msgpack.encode(
        {
            "op": "decide",
            "request": {
                "asserted_chain": ["alice"],
                "action": "payments.refund.issue",
                "resource": {"kind": "payments.refund", "attributes": {}},
                "context": context,
            },
        }
    )


@PROPERTY
@given(st.dictionaries(KEYS, VALUES, max_size=5))
def test_typed_values_arrive_exactly(context):
    frame = decode_frame(_decide(_to_fast(context)))

    incoming = request_from_payload(frame.request, "unix:", "", "request.")

    assert incoming.context == context
    assert all(
        type(a) is type(b)
        for a, b in zip(incoming.context.values(), context.values(), strict=True)
    )


SEEDS = [
    _decide({"when": _to_fast(Timestamp(1_796_374_800, 5)), "l": [1, "x", b"y"]}),
    msgspec.msgpack.encode(
        {"op": "decide_batch", "request": {"items": [{"action": "a"}, {}]}}
    ),
]


@st.composite
def mutated(draw, seeds) -> bytes:
    """A seed with a few bytes overwritten, cut short or doubled."""
    data = bytearray(draw(seeds))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        step = draw(st.sampled_from(("set", "cut", "dup")))
        if step == "set" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif step == "cut":
            del data[at:]
        else:
            data[at:at] = data[at : at + draw(st.integers(1, 8))]
    return bytes(data)


@PROPERTY
@given(mutated(st.sampled_from(SEEDS)))
def test_any_payload_ends_in_a_request_or_a_named_error(payload):
    try:
        frame = decode_frame(payload)
    except InvalidRequest as err:
        assert str(err)
        return
    requests = [frame.request] if isinstance(frame, Decide) else []
    if isinstance(frame, DecideBatch):
        for raw in frame.request.items:
            try:
                requests.append(decode_batch_item(raw))
            except InvalidRequest as err:
                assert str(err)
    for request in requests:
        try:
            validate_request(request_from_payload(request, "unix:", "", ""))
        except InvalidRequest as err:
            assert err.field, f"no field named for a decodable request: {err}"


def _nested(depth: int):
    value = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("depth", [MAX_VALUE_DEPTH, MAX_VALUE_DEPTH + 1])
def test_nesting_is_limited_as_on_grpc(depth):
    frame = decode_frame(_decide({"deep": _nested(depth)}))

    if depth <= MAX_VALUE_DEPTH:
        request_from_payload(frame.request, "unix:", "", "request.")
        return
    with pytest.raises(InvalidRequest, match="nested at most 16 deep") as info:
        request_from_payload(frame.request, "unix:", "", "request.")
    assert info.value.field == "request.context['deep']" + "[0]" * 16


def test_a_frame_is_its_length_stream_and_payload():
    frame = encode_message(7, {"ok": {"status": "SERVING"}})

    length, stream = struct.unpack_from(">II", frame)

    assert (length, stream) == (len(frame) - 8, 7)
    assert msgspec.msgpack.decode(frame[8:]) == {"ok": {"status": "SERVING"}}


def test_decoding_needs_no_copy_of_the_read_buffer():
    buffer = bytearray(b"\x00" * 3 + _decide({"a": 1}))

    frame = decode_frame(memoryview(buffer)[3:])

    assert isinstance(frame, Decide)
