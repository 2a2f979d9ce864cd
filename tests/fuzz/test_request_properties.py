"""Bad requests at volume: the front door answers or names the error.

The gRPC service decodes request bytes itself (``_decode``), translates them
(``request_from_proto``) and validates them (``validate_request``). Whatever
bytes come in, that ends in an ``IncomingRequest`` that validates or in
``InvalidRequest``; for a request that decodes, the error names the field at
fault. An independent oracle (``faults``) states the documented limits from
the outside, so acceptance is checked both ways: every malformed request is
refused and every well-formed one accepted.

A smaller set goes over a real daemon: the status is INVALID_ARGUMENT,
RESOURCE_EXHAUSTED or UNAUTHENTICATED with ``kynara-error-code``, or an
answer, and a malformed request is never answered, least of all with ALLOW.
"""

from __future__ import annotations

import grpc
import pytest
from cases_loader import load_cases
from fuzz_support import TEXT, fuzz_settings, mutated
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st
from kynara.v1 import decision_pb2 as pb
from support import (
    RunningDaemon,
    daemon_config,
    error_of,
    small_refund,
    wire_request,
)

from kynara_sidecar.errors import InvalidRequest
from kynara_sidecar.pipeline import IncomingRequest, validate_request
from kynara_sidecar.policy.names import NAME_PATTERN, canonical_name
from kynara_sidecar.server.decision_service import _decode
from kynara_sidecar.server.wire import request_from_proto

# Large inputs are the point here; hypothesis warns when it prints them.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

# The documented limits, restated here rather than imported, so that a
# changed limit in the product shows up as a failing property.
MAX_NAME = 256
MAX_RESOURCE_ID = 1024
MAX_REQUEST_ID = 128
MAX_CHAIN = 16
MAX_NESTING = 16
TIMESTAMP_SECONDS = (-62_135_596_800, 253_402_300_799)
MAX_DURATION_SECONDS = 315_576_000_000
MAX_NANOS = 999_999_999
INT64 = (-(1 << 63), (1 << 63) - 1)
INT32 = (-(1 << 31), (1 << 31) - 1)

SHIPPED_NAMES = (
    "payments.refund.issue",
    "payments.refund",
    "crm.contact.read",
    "crm.contact",
)
DIRECTORY_IDS = (
    "alice",
    "bob",
    "carol",
    "dave",
    "erin",
    "support-bot",
    "admin-bot",
    "readonly-bot",
)
DECISIONS = (pb.DECISION_ALLOW, pb.DECISION_DENY, pb.DECISION_REQUIRE_APPROVAL)


# --- the oracle ----------------------------------------------------------------


def _is_name(value: str) -> bool:
    return 0 < len(value) <= MAX_NAME and NAME_PATTERN.fullmatch(value) is not None


def _value_ok(value: pb.Value, containers: int) -> bool:
    kind = value.WhichOneof("kind")
    if kind is None:
        return False
    if kind == "timestamp_value":
        ts = value.timestamp_value
        low, high = TIMESTAMP_SECONDS
        return low <= ts.seconds <= high and 0 <= ts.nanos <= MAX_NANOS
    if kind == "duration_value":
        d = value.duration_value
        in_range = abs(d.seconds) <= MAX_DURATION_SECONDS and abs(d.nanos) <= MAX_NANOS
        return in_range and not (d.seconds * d.nanos < 0)
    if kind in ("list_value", "map_value") and containers >= MAX_NESTING:
        return False
    if kind == "list_value":
        return all(_value_ok(v, containers + 1) for v in value.list_value.values)
    if kind == "map_value":
        return _map_ok(value.map_value.entries, containers + 1)
    return True


def _map_ok(entries, containers: int) -> bool:
    keys_ok = all(key and "\x00" not in key for key in entries)
    return keys_ok and all(_value_ok(v, containers) for v in entries.values())


def _is_principal_id(text: str) -> bool:
    # The character rule is the product's one documented function (names);
    # tests/policy/test_name_rules.py checks it against examples.
    try:
        canonical_name(text)
    except ValueError:
        return False
    return True


def faults(request: pb.DecideRequest) -> set[str]:
    """The top-level fields of a decoded request that break a documented limit."""
    checks = {
        "action": _is_name(request.action),
        "resource.kind": _is_name(request.resource.kind),
        "resource.id": len(request.resource.id) <= MAX_RESOURCE_ID,
        "request_id": len(request.request_id) <= MAX_REQUEST_ID,
        "asserted_chain": len(request.asserted_chain) < MAX_CHAIN
        and all(
            0 < len(p) <= MAX_NAME and _is_principal_id(p)
            for p in request.asserted_chain
        ),
        "context": _map_ok(request.context, 0),
        "resource.attributes": _map_ok(request.resource.attributes, 0),
    }
    return {field for field, ok in checks.items() if not ok}


def parse(raw: bytes) -> pb.DecideRequest | None:
    """The request as protobuf reads it, or None when it does not decode."""
    try:
        return pb.DecideRequest.FromString(raw)
    except DecodeError:
        return None


# --- the code under test, as the service calls it -------------------------------


def translate(raw: bytes) -> IncomingRequest:
    """Decode, translate and validate, exactly the service's first steps."""
    incoming = request_from_proto(_decode(pb.DecideRequest, raw), peer="fuzz")
    validate_request(incoming)
    return incoming


def check_translation(raw: bytes) -> None:
    """The property: an accepted request or InvalidRequest, agreeing with faults."""
    message = parse(raw)
    try:
        translate(raw)
    except InvalidRequest as err:
        if message is None:
            return
        expected = faults(message)
        assert expected, f"well-formed request refused: {err} (field {err.field!r})"
        assert any(err.field.startswith(f) for f in expected), (
            f"field {err.field!r} named, but the faults are {sorted(expected)}"
        )
    else:
        assert message is not None, "undecodable bytes were accepted"
        assert not faults(message), f"malformed request accepted: {faults(message)}"


# --- strategies ------------------------------------------------------------------

huge_text = st.builds(
    lambda char, count: char * count,
    st.sampled_from(("a", "\x00", "é", "\U0001f600", ".")),
    st.integers(0, 3000),
)
odd_text = st.one_of(TEXT, huge_text, st.just(""), st.just("\x00"))
names = st.one_of(
    st.sampled_from(SHIPPED_NAMES),
    st.from_regex(NAME_PATTERN, fullmatch=True),
    odd_text,
)
keys = st.one_of(st.sampled_from(("amount", "region", "when")), odd_text)


def _timestamp(seconds: int, nanos: int) -> pb.Value:
    value = pb.Value()
    value.timestamp_value.seconds, value.timestamp_value.nanos = seconds, nanos
    return value


def _duration(seconds: int, nanos: int) -> pb.Value:
    value = pb.Value()
    value.duration_value.seconds, value.duration_value.nanos = seconds, nanos
    return value


def _near(bounds: tuple[int, int], limits: tuple[int, int]):
    """Integers anywhere in ``limits``, often right at the edges of ``bounds``."""
    edges = [b + d for b in bounds for d in (-1, 0, 1)]
    return st.one_of(st.sampled_from(edges), st.integers(*limits))


scalar_values = st.one_of(
    st.builds(lambda v: pb.Value(int_value=v), st.integers(*INT64)),
    st.builds(lambda v: pb.Value(uint_value=v), st.integers(0, (1 << 64) - 1)),
    st.builds(lambda v: pb.Value(double_value=v), st.floats()),
    st.builds(lambda v: pb.Value(string_value=v), odd_text),
    st.builds(lambda v: pb.Value(bool_value=v), st.booleans()),
    st.builds(lambda v: pb.Value(bytes_value=v), st.binary(max_size=64)),
    st.builds(
        _timestamp,
        _near(TIMESTAMP_SECONDS, INT64),
        _near((0, MAX_NANOS), INT32),
    ),
    st.builds(
        _duration,
        _near((-MAX_DURATION_SECONDS, MAX_DURATION_SECONDS), INT64),
        _near((-MAX_NANOS, MAX_NANOS), INT32),
    ),
    st.just(pb.Value()),
)


def _list(values: list[pb.Value]) -> pb.Value:
    return pb.Value(list_value=pb.ListValue(values=values))


def _map(entries: dict[str, pb.Value]) -> pb.Value:
    return pb.Value(map_value=pb.MapValue(entries=entries))


values = st.recursive(
    scalar_values,
    lambda children: st.one_of(
        st.builds(_list, st.lists(children, max_size=4)),
        st.builds(_map, st.dictionaries(keys, children, max_size=4)),
    ),
    max_leaves=12,
)


@st.composite
def deeply_nested(draw) -> pb.Value:
    """A value inside 0..60 lists and maps: past our limit, and past protobuf's."""
    root = pb.Value()
    node = root
    # Built from the outside in: upb copies a message set into a map by
    # encoding it, which stops at protobuf's own depth limit.
    for _ in range(draw(st.integers(0, 60))):
        if draw(st.booleans()):
            node = node.list_value.values.add()
        else:
            node = node.map_value.entries["k"]
    node.CopyFrom(draw(scalar_values))
    return root


value_maps = st.dictionaries(keys, st.one_of(values, deeply_nested()), max_size=4)


@st.composite
def decide_requests(draw) -> pb.DecideRequest:
    """Requests built field by field, mostly near well-formed, often not."""
    request = pb.DecideRequest(
        request_id=draw(st.one_of(st.just(""), odd_text)),
        delegation_token=draw(st.one_of(st.just(""), st.just(""), TEXT)),
        asserted_chain=draw(
            st.lists(
                st.one_of(st.sampled_from(DIRECTORY_IDS), odd_text),
                max_size=MAX_CHAIN + 2,
            )
        ),
        action=draw(names),
        resource=pb.Resource(
            kind=draw(names), id=draw(st.one_of(odd_text, st.just("rf_1")))
        ),
    )
    # Set in place: upb copies a message given to a constructor or merged by
    # encoding it, which stops at protobuf's depth limit before ours is seen.
    for entries in (request.resource.attributes, request.context):
        for key, value in draw(value_maps).items():
            entries[key].CopyFrom(value)
    return request


good_keys = st.one_of(
    st.sampled_from(("amount", "region", "when")),
    TEXT.filter(lambda key: key and "\x00" not in key),
)
good_scalars = st.one_of(
    st.builds(lambda v: pb.Value(int_value=v), st.integers(*INT64)),
    st.builds(lambda v: pb.Value(uint_value=v), st.integers(0, (1 << 64) - 1)),
    st.builds(lambda v: pb.Value(double_value=v), st.floats()),
    st.builds(lambda v: pb.Value(string_value=v), odd_text),
    st.builds(lambda v: pb.Value(bytes_value=v), st.binary(max_size=64)),
    st.builds(_timestamp, st.integers(*TIMESTAMP_SECONDS), st.integers(0, MAX_NANOS)),
    st.builds(
        lambda seconds, nanos: _duration(seconds, nanos if seconds >= 0 else -nanos),
        st.integers(-MAX_DURATION_SECONDS, MAX_DURATION_SECONDS),
        st.integers(0, MAX_NANOS),
    ),
)
good_values = st.recursive(
    good_scalars,
    lambda children: st.one_of(
        st.builds(_list, st.lists(children, max_size=3)),
        st.builds(_map, st.dictionaries(good_keys, children, max_size=3)),
    ),
    max_leaves=8,
)


@st.composite
def well_formed_requests(draw) -> pb.DecideRequest:
    """Requests inside every documented limit, with odd but valid values."""
    return pb.DecideRequest(
        request_id=draw(TEXT),
        asserted_chain=draw(
            st.lists(st.sampled_from(DIRECTORY_IDS), min_size=1, max_size=3)
        ),
        action=draw(st.sampled_from(SHIPPED_NAMES)),
        resource=pb.Resource(
            kind=draw(st.sampled_from(SHIPPED_NAMES)),
            id=draw(TEXT),
            attributes=draw(st.dictionaries(good_keys, good_values, max_size=3)),
        ),
        context=draw(st.dictionaries(good_keys, good_values, max_size=3)),
    )


GOOD_REQUESTS = tuple(
    [small_refund().SerializeToString()]
    + [wire_request(c.request).SerializeToString() for c in load_cases()]
)
mutated_requests = mutated(st.sampled_from(GOOD_REQUESTS))
any_request_bytes = st.one_of(
    st.binary(max_size=512),
    mutated_requests,
    decide_requests().map(lambda r: r.SerializeToString()),
    well_formed_requests().map(lambda r: r.SerializeToString()),
)


# --- in-process properties ----------------------------------------------------------


@fuzz_settings(300)
@given(raw=st.binary(max_size=2048))
def test_arbitrary_bytes_translate_or_are_invalid_request(raw):
    check_translation(raw)


@fuzz_settings(400)
@given(raw=mutated_requests)
def test_mutated_good_requests_translate_or_name_the_field(raw):
    check_translation(raw)


@fuzz_settings(400)
@given(request=decide_requests())
def test_generated_requests_are_accepted_exactly_when_well_formed(request):
    check_translation(request.SerializeToString())


@fuzz_settings(200)
@given(request=well_formed_requests())
def test_well_formed_requests_with_odd_values_are_accepted(request):
    incoming = translate(request.SerializeToString())

    assert set(incoming.context) == set(request.context)
    assert set(incoming.resource.attributes) == set(request.resource.attributes)


@fuzz_settings(100)
@given(request=decide_requests())
def test_refusal_of_a_decodable_request_always_names_a_field(request):
    raw = request.SerializeToString()
    try:
        translate(raw)
    except InvalidRequest as err:
        assert err.field or parse(raw) is None, f"no field named for {err}"


# --- over a real daemon ------------------------------------------------------


def raw_stub(running, method: str):
    """A call that sends bytes as they are, as a broken client might."""
    channel = grpc.insecure_channel(running.target)
    running._channels.append(channel)
    return channel.unary_unary(
        f"/kynara.v1.DecisionService/{method}",
        request_serializer=None,
        response_deserializer=None,
    )


def expected_refusal(raw: bytes, max_bytes: int) -> str:
    """The error code a request must get, or "" when it must be answered."""
    message = parse(raw)
    if len(raw) > max_bytes:
        return "request_too_large"
    if message is None or faults(message):
        return "invalid_request"
    if message.delegation_token:
        return "identity_invalid"
    if not message.asserted_chain:
        return "invalid_request"
    return ""


STATUS_OF = {
    "invalid_request": grpc.StatusCode.INVALID_ARGUMENT,
    "request_too_large": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "identity_invalid": grpc.StatusCode.UNAUTHENTICATED,
}


def test_daemon_answers_or_refuses_bad_requests_with_a_code(daemon):
    decide = raw_stub(daemon, "Decide")
    max_bytes = daemon.config.agent.max_message_bytes
    seen: dict[str, int] = {}

    @fuzz_settings(120)
    @given(raw=any_request_bytes)
    def check(raw):
        want = expected_refusal(raw, max_bytes)
        try:
            reply = pb.DecideResponse.FromString(decide(raw, timeout=30))
        except grpc.RpcError as err:
            metadata = dict(err.trailing_metadata() or ())
            code = metadata.get("kynara-error-code")
            seen[code] = seen.get(code, 0) + 1
            assert (err.code(), code) == (STATUS_OF.get(want), want), err.details()
            if code == "invalid_request" and parse(raw) is not None:
                assert metadata.get("kynara-error-field"), err.details()
        else:
            seen["answered"] = seen.get("answered", 0) + 1
            assert not want, f"expected {want}, got {pb.Decision.Name(reply.decision)}"
            assert reply.decision in DECISIONS
            assert reply.audit_sequence > 0

    check()

    assert daemon.stub().Decide(small_refund()).decision == pb.DECISION_ALLOW
    assert seen.get("invalid_request"), f"no refusals exercised: {seen}"
    assert seen.get("answered"), f"no answers exercised: {seen}"


def test_daemon_batch_answers_or_refuses_each_item_on_its_own(daemon):
    batch = raw_stub(daemon, "DecideBatch")
    max_bytes = daemon.config.agent.max_message_bytes

    @fuzz_settings(25)
    @given(frames=st.lists(any_request_bytes, max_size=6))
    def check(frames):
        raw = pb.DecideBatchRequestFrames(items=frames).SerializeToString()
        if len(raw) > max_bytes:
            return
        reply = pb.DecideBatchResponse.FromString(batch(raw, timeout=30))

        assert len(reply.items) == len(frames)
        for index, (frame, item) in enumerate(zip(frames, reply.items, strict=True)):
            want = expected_refusal(frame, max_bytes)
            if item.WhichOneof("outcome") == "decision":
                assert not want, f"items[{index}]: expected {want}, got an answer"
                assert item.decision.decision in DECISIONS
            else:
                assert item.error.code == want, item.error.message
                assert item.error.field.startswith(f"items[{index}]")

    check()

    assert daemon.stub().Decide(small_refund()).decision == pb.DECISION_ALLOW


@pytest.mark.parametrize("depth", [16, 17, 40, 49, 50, 51, 120])
def test_nesting_at_and_past_the_limits_is_refused_with_a_code(daemon, depth):
    request = small_refund()
    node = request.context["deep"]
    for _ in range(depth):
        node = node.list_value.values.add()
    node.int_value = 1
    raw = request.SerializeToString()

    try:
        reply = raw_stub(daemon, "Decide")(raw, timeout=30)
    except grpc.RpcError as err:
        metadata = dict(err.trailing_metadata() or ())
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert metadata["kynara-error-code"] == "invalid_request"
    else:
        assert depth <= MAX_NESTING
        assert pb.DecideResponse.FromString(reply).decision == pb.DECISION_ALLOW


@pytest.mark.parametrize("key", ["région", "金额", "ключ"])
def test_field_with_a_non_ascii_key_keeps_the_error_code(tmp_path, clock, key):
    request = small_refund()
    request.context[key].CopyFrom(pb.Value())
    # Stopped before asserting: twice, pytest's report of this expected
    # failure hit CPython 3.11's "AST constructor recursion depth mismatch"
    # (python/cpython#106905) while the daemon's threads were still running.
    running = RunningDaemon(daemon_config(tmp_path), clock)
    try:
        status, metadata = error_of(lambda: running.stub().Decide(request))
    finally:
        running.stop()

    assert status == grpc.StatusCode.INVALID_ARGUMENT
    assert metadata["kynara-error-code"] == "invalid_request"
    assert metadata["kynara-error-field"]
