"""The fast path (protos/fastpath.md) against a real daemon: the same
answers, records and error codes as gRPC, pipelining, limits, deadlines,
cancel, WaitApproval and shutdown."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import json
import os
import socket
import struct
import threading
import time
from typing import Any

import grpc
import msgspec
import pytest
from cases_loader import load_cases
from grpc_health.v1 import health_pb2
from identity_support import AUDIENCE, ISSUER, SigningKey, claims, jwks
from kynara.v1 import decision_pb2 as pb
from support import (
    daemon_config,
    error_of,
    fast_refund,
    hold_decisions,
    read_record,
    small_refund,
    wire_request,
)

from kynara_sidecar.approvals.model import Reviewer, Verdict
from kynara_sidecar.decision import Duration, Timestamp, UInt64
from kynara_sidecar.errors import ConfigError
from kynara_sidecar.server.decision_service import MAX_BATCH_ITEMS

CASES = load_cases()
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SECRET = "support-bot-secret-0123456789"
HEADER = struct.Struct(">II")
DECISION_NAMES = {
    pb.DECISION_ALLOW: "allow",
    pb.DECISION_DENY: "deny",
    pb.DECISION_REQUIRE_APPROVAL: "require_approval",
}
# A client's own bound on any one read: a daemon that does not answer
# fails the test rather than hang it.
READ_TIMEOUT = 30


class FastClient:
    """A blocking fast path client, frame by frame, for tests."""

    def __init__(self, path: str, *, hello: bool = True, authorization: str = ""):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(READ_TIMEOUT)
        self.sock.connect(path)
        self._pending = bytearray()
        self._early: dict[int, collections.deque] = collections.defaultdict(
            collections.deque
        )
        if hello:
            message = {"op": "hello", "versions": [1]}
            if authorization:
                message["authorization"] = authorization
            self.send(0, message)
            self.welcome = self.answer(0)

    def send_frame(self, stream: int, payload: bytes) -> None:
        self.sock.sendall(HEADER.pack(len(payload), stream) + payload)

    def send(self, stream: int, message: Any) -> None:
        self.send_frame(stream, msgspec.msgpack.encode(message))

    def request(self, stream: int, op: str, request: Any = None, **extra) -> None:
        message = {"op": op, **extra}
        if request is not None:
            message["request"] = request
        self.send(stream, message)

    def _read_exactly(self, n: int) -> bytes | None:
        while len(self._pending) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self._pending += chunk
        out = bytes(self._pending[:n])
        del self._pending[:n]
        return out

    def recv(self) -> tuple[int, dict] | None:
        """The next frame, or None when the daemon closed the connection."""
        header = self._read_exactly(HEADER.size)
        if header is None:
            return None
        length, stream = HEADER.unpack(header)
        payload = self._read_exactly(length)
        assert payload is not None, "the connection ended inside a frame"
        return stream, msgspec.msgpack.decode(payload)

    def answer(self, stream: int) -> dict:
        """The next message on ``stream`` (others are kept for later)."""
        while not self._early[stream]:
            frame = self.recv()
            assert frame is not None, f"closed before an answer on stream {stream}"
            self._early[frame[0]].append(frame[1])
        return self._early[stream].popleft()

    def decide(self, request: dict, stream: int = 1, **extra) -> dict:
        self.request(stream, "decide", request, **extra)
        return self.answer(stream)

    def closed(self) -> bool:
        """Whether the daemon closed the connection after what was read."""
        try:
            return self.recv() is None
        except ConnectionResetError:
            return True  # closed with frames of ours unread: a reset

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def fast(daemon):
    clients: list[FastClient] = []

    def connect(running=daemon, **options) -> FastClient:
        client = FastClient(running.config.agent.fast_socket, **options)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.close()


def value_to_fast(value: Any) -> Any:
    """A typed pipeline value as the fast path carries it."""
    if isinstance(value, UInt64):
        return msgspec.msgpack.Ext(1, int(value).to_bytes(8, "big"))
    if isinstance(value, Timestamp):
        return msgspec.msgpack.Ext(-1, struct.pack(">Iq", value.nanos, value.seconds))
    if isinstance(value, Duration):
        return msgspec.msgpack.Ext(2, struct.pack(">qi", value.seconds, value.nanos))
    if isinstance(value, list | tuple):
        return [value_to_fast(v) for v in value]
    if isinstance(value, dict):
        return {k: value_to_fast(v) for k, v in value.items()}
    return value


def fast_request(request, **overrides) -> dict:
    """A case's request as an agent sends it on the fast path."""
    message = {
        "asserted_chain": list(request.chain[:-1]),
        "action": request.action,
        "resource": {
            "kind": request.resource.kind,
            "id": request.resource.id,
            "attributes": value_to_fast(dict(request.resource.attributes)),
        },
        "context": value_to_fast(dict(request.context)),
        "request_id": request.request_id,
    }
    message.update(overrides)
    return message


def refund(amount: int = 1200, **context) -> dict:
    """``support.small_refund`` on the fast path."""
    return {**fast_refund(amount), "context": value_to_fast(context)}


def comparable(record) -> dict:
    """A record without what differs between two decisions: ids and time."""
    return msgspec.structs.asdict(
        msgspec.structs.replace(record, decision_id="", seq=0, time="")
    )


def errors_counted(running, code: str) -> float:
    return running.daemon.metrics.request_errors.labels(code)._value.get()


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def hold_commits(running) -> threading.Event:
    """Hold the writer thread's commits (records already queued) until set:
    a slow disk."""
    gate = threading.Event()
    store = running.daemon._store
    original = store.append_batch

    def slow(*args, **kwargs):
        gate.wait(READ_TIMEOUT)
        return original(*args, **kwargs)

    store.append_batch = slow
    return gate


# ------------------------------------------------------------ same answers


@pytest.mark.parametrize("agent", sorted({case.request.chain[-1] for case in CASES}))
def test_every_case_gets_the_same_answer_and_record_on_both_doors(
    agent, start_daemon, clock
):
    running = start_daemon(f"identity.agent_id={agent}")
    client = FastClient(running.config.agent.fast_socket)
    stub = running.stub()
    cases = [case for case in CASES if case.request.chain[-1] == agent]

    for case in cases:
        clock._nanos = case.now.seconds * 1_000_000_000 + case.now.nanos
        by_grpc = stub.Decide(wire_request(case.request))
        by_fast = client.decide(fast_request(case.request))["ok"]

        assert by_fast["decision"] == DECISION_NAMES[by_grpc.decision], case.name
        assert by_fast["decision"] == case.expect["decision"], case.name
        assert by_fast["reason_code"] == by_grpc.reason_code, case.name
        assert by_fast["reason"] == by_grpc.reason, case.name
        assert by_fast["chain"] == list(by_grpc.chain), case.name
        assert by_fast["matched_rules"] == [
            {
                "policy": r.policy,
                "rule": r.rule,
                "effect": DECISION_NAMES[r.effect],
                "principal": r.principal,
                "shadow": r.shadow,
            }
            for r in by_grpc.matched_rules
        ], case.name
        assert by_fast["condition_errors"] == [
            {"policy": e.policy, "rule": e.rule, "principal": e.principal,
             "message": e.message}
            for e in by_grpc.condition_errors
        ], case.name  # fmt: skip
        assert by_fast["audit_sequence"] != by_grpc.audit_sequence
        grpc_record = read_record(running, by_grpc.audit_sequence)
        fast_record = read_record(running, by_fast["audit_sequence"])
        assert fast_record.decision_id == by_fast["decision_id"]
        assert comparable(fast_record) == comparable(grpc_record), case.name
        assert fast_record.env["peer"] == {"string": "unix:"}
    client.close()


def test_exact_values_reach_the_record_as_over_grpc(daemon, fast):
    values = {
        "big": 2**53 + 1,
        "when": Timestamp(1_796_374_800, 123_456_789),
        "unsigned": UInt64(2**64 - 1),
        "span": Duration(-90, -5),
        "nested": {"list": [1, 2.5, "x", b"\x00\x01", True]},
    }

    by_grpc = daemon.stub().Decide(small_refund(**values))
    by_fast = fast().decide(refund(**values))["ok"]

    grpc_record = read_record(daemon, by_grpc.audit_sequence)
    fast_record = read_record(daemon, by_fast["audit_sequence"])
    assert fast_record.context == grpc_record.context
    assert fast_record.context["when"] == {
        "timestamp": "2026-12-04T09:00:00.123456789Z"
    }


@pytest.mark.parametrize("form", ["32-bit", "64-bit", "96-bit"])
def test_every_timestamp_form_keeps_its_nanoseconds(daemon, fast, form):
    seconds, nanos = 1_796_374_800, 500_000_000 if form != "32-bit" else 0
    if form == "32-bit":
        when = msgspec.msgpack.Ext(-1, struct.pack(">I", seconds))
    elif form == "64-bit":
        when = msgspec.msgpack.Ext(-1, struct.pack(">Q", nanos << 34 | seconds))
    else:
        when = msgspec.msgpack.Ext(-1, struct.pack(">Iq", nanos, seconds))

    answer = fast().decide(refund(when=when))["ok"]

    record = read_record(daemon, answer["audit_sequence"])
    fraction = ".5" if nanos else ""
    assert record.context["when"] == {"timestamp": f"2026-12-04T09:00:00{fraction}Z"}


def test_explanation_and_approval_ride_on_the_answer_as_over_grpc(daemon, fast):
    client = fast()
    request = small_refund()
    request.explain = True

    by_grpc = daemon.stub().Decide(request).explanation
    explained = client.decide(refund() | {"explain": True})["ok"]
    asked = client.decide(refund(amount=60000), stream=2)["ok"]

    explanation = explained["explanation"]
    assert explanation["summary"] == by_grpc.summary
    assert [
        (p["principal"], p["roles"], p["decision"], p["reason_code"], p["decided_by"])
        for p in explanation["principals"]
    ] == [
        (p.principal, list(p.roles), DECISION_NAMES[p.decision], p.reason_code,
         p.decided_by)
        for p in by_grpc.principals
    ]  # fmt: skip
    assert [
        (r["policy"], r["rule"], r["verdict"], r["condition"])
        for p in explanation["principals"]
        for r in p["rules"]
    ] == [
        (r.policy, r.rule, pb.Verdict.Name(r.verdict).removeprefix("VERDICT_").lower(),
         r.condition)
        for p in by_grpc.principals
        for r in p.rules
    ]  # fmt: skip
    assert "approval" not in explained
    assert asked["decision"] == "require_approval"
    approval = asked["approval"]
    assert approval["id"].startswith("apr_") and approval["state"] == "pending"
    assert approval["expires_at"].tzinfo is not None
    assert "explanation" not in asked


# -------------------------------------------------------------- validation


def _nested_fast(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def _nested_grpc(depth: int) -> pb.Value:
    value = pb.Value(int_value=1)
    for _ in range(depth):
        value = pb.Value(list_value=pb.ListValue(values=[value]))
    return value


def _stamp(seconds: int, nanos: int) -> pb.Value:
    out = pb.Value()
    out.timestamp_value.seconds, out.timestamp_value.nanos = seconds, nanos
    return out


def _span(seconds: int, nanos: int) -> pb.Value:
    out = pb.Value()
    out.duration_value.seconds, out.duration_value.nanos = seconds, nanos
    return out


def _set_context(key: str, value: pb.Value):
    return lambda r: r.context[key].CopyFrom(value)


# (what the gRPC request changes, what the fast request changes)
BAD_REQUESTS = {
    "empty-action": (lambda r: setattr(r, "action", ""), {"action": ""}),
    "bad-action": (
        lambda r: setattr(r, "action", "payments..refund"),
        {"action": "payments..refund"},
    ),
    "no-kind": (
        lambda r: r.resource.ClearField("kind"),
        {"resource": {"id": "rf_1", "attributes": {"amount": 1200}}},
    ),
    "nil-value": (_set_context("x", pb.Value()), {"context": {"x": None}}),
    "nanos-out-of-range": (
        _set_context("t", _stamp(1, 1_000_000_000)),
        {"context": {"t": msgspec.msgpack.Ext(-1, struct.pack(">Iq", 10**9, 1))}},
    ),
    "year-10000": (
        _set_context("t", _stamp(253_402_300_800, 0)),
        {"context": {"t": value_to_fast(Timestamp(253_402_300_800))}},
    ),
    "duration-out-of-range": (
        _set_context("d", _span(315_576_000_001, 0)),
        {"context": {"d": value_to_fast(Duration(315_576_000_001))}},
    ),
    "duration-signs-differ": (
        _set_context("d", _span(1, -1)),
        {"context": {"d": value_to_fast(Duration(1, -1))}},
    ),
    "empty-principal": (
        lambda r: r.asserted_chain.append(""),
        {"asserted_chain": ["alice", ""]},
    ),
    "empty-chain": (lambda r: r.ClearField("asserted_chain"), {"asserted_chain": []}),
    "nul-in-key": (
        lambda r: r.context["k"].map_value.entries["a\x00b"].int_value,
        {"context": {"k": {"a\x00b": 0}}},
    ),
    "empty-key": (
        lambda r: r.resource.attributes[""].int_value,
        {"resource": {"kind": "payments.refund", "attributes": {"": 1}}},
    ),
    "nested-17-deep": (
        _set_context("deep", _nested_grpc(17)),
        {"context": {"deep": _nested_fast(17)}},
    ),
    "token-in-development": (
        lambda r: setattr(r, "delegation_token", "eyJhbGciOiJub25lIn0.e30."),
        {"delegation_token": "eyJhbGciOiJub25lIn0.e30."},
    ),
}


def _as_fast_field(field: str) -> str:
    for suffix in (".timestamp_value", ".duration_value"):
        field = field.removesuffix(suffix)
    return f"request.{field}" if field else ""


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_a_bad_request_gets_the_code_and_field_grpc_gives(daemon, fast, name):
    mutate, change = BAD_REQUESTS[name]
    grpc_request = small_refund()
    mutate(grpc_request)
    counted = errors_counted(daemon, "invalid_request")

    _, metadata = error_of(lambda: daemon.stub().Decide(grpc_request))
    error = fast().decide(refund() | change)["error"]

    assert error["code"] == metadata["kynara-error-code"]
    assert error["field"] == _as_fast_field(metadata["kynara-error-field"])
    if error["code"] == "invalid_request":
        assert errors_counted(daemon, "invalid_request") == counted + 2


def test_values_nested_sixteen_deep_are_accepted(daemon, fast):
    answer = fast().decide(refund(deep=_nested_fast(16)))

    assert answer["ok"]["decision"] == "allow"


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"action": 5}, "request.action", "Expected `str`, got `int`"),
        ({"asserted_chain": ["alice", 1]}, "request.asserted_chain[1]", "`str`"),
        ({"explain": "yes"}, "request.explain", "Expected `bool`"),
        ({"unknown": 1}, "request.unknown", "unknown field `unknown`"),
        (
            {"resource": {"kind": "payments.refund", "colour": "red"}},
            "request.resource.colour",
            "unknown field",
        ),
        ({"context": {"big": 2**63}}, "request.context['big']", "int64 range"),
        ({"context": [1]}, "request.context", "Expected `object`"),
        ({"context": {1: 1}}, "request.context", "`str`"),
        ({"context": {"m": {1: 1}}}, "request.context['m']", "string keys"),
        (
            {"context": {"l": [1, msgspec.msgpack.Ext(7, b"x")]}},
            "request.context['l'][1]",
            "extension type",
        ),
        (
            {"context": {"u": msgspec.msgpack.Ext(1, b"\x01")}},
            "request.context['u']",
            "8 bytes",
        ),
        (
            {"context": {"l": [value_to_fast(Timestamp(253_402_300_800))]}},
            "request.context['l'][0]",
            "years 0001..9999",
        ),
    ],
    ids=[
        "action-int", "chain-item-int", "explain-str", "unknown-field",
        "unknown-resource-field", "int-past-int64", "context-array",
        "context-int-key", "nested-int-key", "unknown-ext", "short-uint",
        "timestamp-in-list",
    ],
)  # fmt: skip
def test_wrong_messagepack_types_name_the_field(daemon, fast, change, field, message):
    error = fast().decide(refund() | change)["error"]

    assert error["code"] == "invalid_request"
    assert error["field"] == field
    assert message in error["message"]


def test_unknown_op_names_op_and_the_connection_goes_on(daemon, fast):
    client = fast()

    client.request(3, "shred", {})
    error = client.answer(3)["error"]
    answer = client.decide(refund(), stream=4)

    assert (error["code"], error["field"]) == ("invalid_request", "op")
    assert answer["ok"]["decision"] == "allow"


@pytest.mark.parametrize(
    "payload", [b"\xc1", b"\x91\x01", b"\x81\xa2op", b"", b"\x81\xa2op\xa6decide\x00"]
)
def test_garbage_payload_is_invalid_request_and_the_connection_goes_on(
    daemon, fast, payload
):
    client = fast()
    counted = errors_counted(daemon, "invalid_request")

    client.send_frame(5, payload)
    error = client.answer(5)["error"]
    answer = client.decide(refund(), stream=6)

    assert error["code"] == "invalid_request"
    assert answer["ok"]["decision"] == "allow"
    assert errors_counted(daemon, "invalid_request") == counted + 1


def test_oversized_payload_is_skipped_and_the_connection_goes_on(start_daemon):
    running = start_daemon("agent.max_message_bytes=4096")
    client = FastClient(running.config.agent.fast_socket)

    client.send_frame(7, msgspec.msgpack.encode(refund(note="x" * 8192)))
    client.send_frame(8, msgspec.msgpack.encode({"op": "decide", "request": refund()}))
    error = client.answer(7)["error"]
    answer = client.answer(8)

    assert client.welcome["ok"]["max_message_bytes"] == 4096
    assert error["code"] == "request_too_large"
    assert "4096" in error["message"]
    assert answer["ok"]["decision"] == "allow"
    assert errors_counted(running, "request_too_large") == 1
    client.close()


def test_frames_split_and_joined_arbitrarily_are_read_whole(daemon, fast):
    client = fast()
    frames = b"".join(
        HEADER.pack(len(payload), stream) + payload
        for stream in range(1, 6)
        for payload in [msgspec.msgpack.encode({"op": "decide", "request": refund()})]
    )

    for offset in range(0, len(frames), 7):
        client.sock.sendall(frames[offset : offset + 7])
    answers = [client.answer(stream) for stream in range(1, 6)]

    assert [a["ok"]["decision"] for a in answers] == ["allow"] * 5


# --------------------------------------------------------------- handshake


def test_hello_answers_the_version_and_limits(daemon, fast):
    client = fast()

    assert client.welcome == {
        "ok": {"version": 1, "max_message_bytes": 65536, "max_in_flight": 1024}
    }


@pytest.mark.parametrize(
    ("stream", "first", "code", "field"),
    [
        (0, {"op": "hello", "versions": [2, 3]}, "unsupported_version", "versions"),
        (0, {"op": "hello", "versions": []}, "unsupported_version", "versions"),
        (1, {"op": "decide", "request": {}}, "invalid_request", "op"),
        (0, {"op": "health"}, "invalid_request", "op"),
        (4, {"op": "hello", "versions": [1]}, "invalid_request", "stream"),
        (0, {"versions": [1]}, "invalid_request", "op"),
    ],
    ids=["newer-only", "none", "decide-first", "health-first", "stream-4", "no-op"],
)
def test_a_failed_handshake_is_answered_on_stream_0_then_closed(
    daemon, fast, stream, first, code, field
):
    client = fast(hello=False)

    client.send(stream, first)
    with contextlib.suppress(OSError):  # the daemon may have closed already
        client.send(1, {"op": "health"})
    answered_on, message = client.recv()

    assert answered_on == 0
    assert (message["error"]["code"], message["error"]["field"]) == (code, field)
    assert client.closed()


def test_a_second_hello_is_refused_and_the_connection_goes_on(daemon, fast):
    client = fast()

    client.send(2, {"op": "hello", "versions": [1]})
    error = client.answer(2)["error"]
    answer = client.decide(refund(), stream=3)

    assert (error["code"], error["field"]) == ("invalid_request", "op")
    assert answer["ok"]["decision"] == "allow"


def test_health_reports_the_daemons_health(daemon, fast):
    client = fast()

    client.request(1, "health")
    serving = client.answer(1)
    daemon.call(daemon.daemon._set_health(NOT_SERVING))
    client.request(2, "health", {})
    not_serving = client.answer(2)

    assert serving == {"ok": {"status": "SERVING"}}
    assert not_serving == {"ok": {"status": "NOT_SERVING"}}


def test_the_hello_credential_names_the_agent_of_every_request(start_daemon, tmp_path):
    key = SigningKey("ES256", "idp-1")
    (tmp_path / "jwks.json").write_text(json.dumps(jwks(key)))
    secret = tmp_path / "support-bot.secret"
    secret.write_text(SECRET)
    issuer = {
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "jwks_file": str(tmp_path / "jwks.json"),
    }
    running = start_daemon(
        "identity.mode=verified",
        f"identity.issuers={json.dumps([issuer])}",
        "identity.agent_id=",
        f"identity.agents={json.dumps({'support-bot': str(secret)})}",
    )
    path = running.config.agent.fast_socket
    token = key.sign(claims("alice", "support-bot"))
    request = refund() | {"asserted_chain": [], "delegation_token": token}

    known = FastClient(path, authorization=f"Bearer {SECRET}")
    unknown = FastClient(path, authorization="Bearer nobody-knows-this-secret")
    allowed = known.decide(request)["ok"]
    refused = unknown.decide(request)["error"]

    assert allowed["chain"] == ["alice", "support-bot"]
    assert refused["code"] == "identity_invalid"
    known.close()
    unknown.close()


# --------------------------------------------------------------- pipelining


def test_pipelined_requests_are_decided_together_and_matched_by_stream(daemon, fast):
    client = fast()
    release = hold_decisions(daemon)
    streams = [11, 3, 7, 42, 5, 9, 1000, 2]

    for stream in streams:
        client.request(stream, "decide", refund() | {"request_id": f"req-{stream}"})
    wait_until(lambda: daemon.daemon.pipeline._in_flight == len(streams))
    release()
    answers = {stream: client.answer(stream)["ok"] for stream in streams}

    assert {s: a["request_id"] for s, a in answers.items()} == {
        s: f"req-{s}" for s in streams
    }
    sequences = sorted(a["audit_sequence"] for a in answers.values())
    assert sequences == list(range(sequences[0], sequences[0] + len(streams)))


def test_a_stream_id_in_flight_is_refused_and_the_first_request_goes_on(daemon, fast):
    client = fast()
    release = hold_decisions(daemon)

    client.request(9, "decide", refund() | {"request_id": "first"})
    wait_until(lambda: daemon.daemon.pipeline._in_flight == 1)
    client.request(9, "decide", refund() | {"request_id": "second"})
    refused = client.answer(0)  # stream 9 carries only its request's end
    client.request(9, "shred")  # so does any other refusal of a frame there
    garbled = client.answer(0)
    release()
    first = client.answer(9)
    client.request(10, "health")
    client.answer(10)

    assert (refused["error"]["code"], refused["error"]["field"]) == (
        "invalid_request",
        "stream",
    )
    assert "stream 9, which is in flight" in refused["error"]["message"]
    assert (garbled["error"]["field"], garbled["error"]["code"]) == (
        "op",
        "invalid_request",
    )
    assert "stream 9, which is in flight" in garbled["error"]["message"]
    assert first["ok"]["request_id"] == "first"
    assert not client._early[9]  # one message on stream 9: its answer


def test_requests_past_the_in_flight_limit_get_a_clear_error(daemon, fast):
    daemon.daemon._fast_path.max_in_flight = 2
    client = fast()
    release = hold_decisions(daemon)

    for stream in (1, 2, 3):
        client.request(stream, "decide", refund())
    refused = client.answer(3)
    release()
    answered = [client.answer(1), client.answer(2)]
    again = client.decide(refund(), stream=3)

    assert refused["error"]["code"] == "invalid_request"
    assert refused["error"]["field"] == "stream"
    assert "at most 2 requests in flight" in refused["error"]["message"]
    assert [a["ok"]["decision"] for a in answered] == ["allow", "allow"]
    assert again["ok"]["decision"] == "allow"


def test_connections_past_the_limit_are_refused_and_closed(daemon, fast):
    daemon.daemon._fast_path._max_connections = 1
    first = fast()

    second = fast(hello=False)
    stream, message = second.recv()

    assert stream == 0 and message["error"]["code"] == "internal"
    assert "fast path connections (1)" in message["error"]["message"]
    assert second.closed()
    assert first.decide(refund())["ok"]["decision"] == "allow"


# ---------------------------------------------------------------- batches


def test_batch_items_get_their_own_errors(daemon, fast):
    client = fast()
    items = [
        refund() | {"request_id": "good"},
        refund() | {"colour": "red"},
        refund() | {"action": "payments..refund"},
        refund() | {"context": {"x": None}},
        refund(amount=60000),
    ]

    client.request(4, "decide_batch", {"items": items})
    answer = client.answer(4)["ok"]["items"]

    assert answer[0]["decision"]["request_id"] == "good"
    assert [item.get("error", {}).get("field") for item in answer[1:4]] == [
        "items[1].colour",
        "items[2].action",
        "items[3].context['x']",
    ]
    assert answer[4]["decision"]["decision"] == "require_approval"


def test_batch_items_fail_as_grpc_batch_items_do(daemon, fast):
    bad = small_refund()
    bad.action = "payments..refund"
    frames = pb.DecideBatchRequestFrames(
        items=[small_refund().SerializeToString(), bad.SerializeToString()]
    )
    channel = grpc.insecure_channel(daemon.target)
    by_grpc = channel.unary_unary(
        "/kynara.v1.DecisionService/DecideBatch",
        response_deserializer=pb.DecideBatchResponse.FromString,
    )(frames.SerializeToString())
    channel.close()
    client = fast()

    items = [refund(), refund() | {"action": "payments..refund"}]
    client.request(1, "decide_batch", {"items": items})
    by_fast = client.answer(1)["ok"]["items"]

    assert by_fast[1]["error"] == {
        "code": by_grpc.items[1].error.code,
        "message": by_grpc.items[1].error.message,
        "field": by_grpc.items[1].error.field,
    }
    assert by_fast[0]["decision"]["decision"] == "allow"


def test_batch_over_the_item_limit_is_invalid_request(daemon, fast):
    client = fast()

    client.request(2, "decide_batch", {"items": [refund()] * (MAX_BATCH_ITEMS + 1)})
    error = client.answer(2)["error"]

    assert (error["code"], error["field"]) == ("invalid_request", "request.items")


# ------------------------------------------------------- deadlines, cancel


def test_a_deadline_cancels_the_work_as_a_grpc_deadline_does(daemon, fast):
    client = fast()
    gate = hold_commits(daemon)
    late_grpc = small_refund()
    late_grpc.request_id = "late-grpc"

    try:
        status, _ = error_of(lambda: daemon.stub().Decide(late_grpc, timeout=0.5))
        wait_until(lambda: daemon.daemon.pipeline._in_flight == 0)
        error = client.decide(refund() | {"request_id": "late-fast"}, timeout_ms=500)
    finally:
        gate.set()
    # The fast path answered at the deadline; its record was with the
    # writer already and commits once the disk lets it.
    wait_until(lambda: daemon.daemon.pipeline._in_flight == 0)
    after = client.decide(refund() | {"request_id": "after"}, stream=2)["ok"]

    assert status == grpc.StatusCode.DEADLINE_EXCEEDED
    assert error["error"]["code"] == "deadline_exceeded"
    assert "500 ms" in error["error"]["message"]
    # The writer had the records already: each door's stays in the log,
    # just before the next answer's.
    records = [read_record(daemon, s) for s in range(1, after["audit_sequence"])]
    late = [r.request_id for r in records if r.request_id.startswith("late-")]
    assert late == ["late-grpc", "late-fast"]


def test_a_deadline_in_time_changes_nothing(daemon, fast):
    answer = fast().decide(refund(), timeout_ms=30_000)

    assert answer["ok"]["decision"] == "allow"


@pytest.mark.parametrize("timeout_ms", [0, -5])
def test_a_deadline_that_is_not_positive_is_invalid_request(daemon, fast, timeout_ms):
    error = fast().decide(refund(), timeout_ms=timeout_ms)["error"]

    assert (error["code"], error["field"]) == ("invalid_request", "timeout_ms")


def test_cancel_ends_the_request_with_cancelled(daemon, fast):
    client = fast()
    release = hold_decisions(daemon)

    client.request(5, "decide", refund())
    wait_until(lambda: daemon.daemon.pipeline._in_flight == 1)
    client.request(5, "cancel")
    cancelled = client.answer(5)
    release()
    # Answered at the cancel; its record, with the writer already, commits.
    wait_until(lambda: daemon.daemon.pipeline._in_flight == 0)
    client.request(99, "cancel")  # nothing in flight there: ignored
    client.request(6, "health")
    next_stream, _ = client.recv()

    assert cancelled["error"]["code"] == "cancelled"
    assert next_stream == 6


def test_a_cancelled_request_of_a_pipelined_group_leaves_the_others(daemon, fast):
    client = fast()
    gate = hold_commits(daemon)
    frames = b"".join(
        HEADER.pack(len(payload), stream) + payload
        for stream, payload in (
            (s, msgspec.msgpack.encode({"op": "decide", "request": r}))
            for s, r in (
                (1, refund() | {"request_id": "one"}),
                (2, refund() | {"request_id": "two"}),
                (3, refund() | {"request_id": "three"}),
            )
        )
    )

    try:
        client.sock.sendall(frames)  # one write: decided as one group
        wait_until(lambda: daemon.daemon.pipeline._in_flight == 3)
        client.request(2, "cancel")
        cancelled = client.answer(2)
    finally:
        gate.set()
    one, three = client.answer(1)["ok"], client.answer(3)["ok"]

    assert cancelled["error"]["code"] == "cancelled"
    assert (one["request_id"], three["request_id"]) == ("one", "three")
    # The cancelled request's record was with the writer: it stays.
    between = range(one["audit_sequence"] + 1, three["audit_sequence"])
    assert [read_record(daemon, s).request_id for s in between] == ["two"]
    wait_until(lambda: daemon.daemon.pipeline._in_flight == 0)


def test_a_closed_connection_cancels_its_requests(daemon, fast):
    client = fast()
    release = hold_decisions(daemon)

    client.request(1, "decide", refund())
    client.request(2, "decide_batch", {"items": [refund()]})
    wait_until(lambda: daemon.daemon.pipeline._in_flight == 2)
    client.close()
    # The batch's task is cancelled at once; the decide's record, with
    # the writer already, commits once the writer lets it, unanswered.
    wait_until(lambda: daemon.daemon.pipeline._in_flight == 1)
    release()

    wait_until(lambda: daemon.daemon.pipeline._in_flight == 0)
    wait_until(lambda: not daemon.daemon._fast_path._connections)


# ------------------------------------------------------------ WaitApproval


def _review(running, approval_id: str, verdict: Verdict):
    book = running.daemon._book
    carol = Reviewer(id="carol", roles=frozenset({"reviewer"}))
    return running.call(book.review(approval_id, carol, verdict, "looked at it"))


def test_wait_approval_sends_each_state_until_approved(daemon, fast):
    client = fast()
    asked = client.decide(refund(amount=60000))["ok"]["approval"]

    client.request(3, "wait_approval", {"approval_id": asked["id"]})
    first = client.answer(3)
    _review(daemon, asked["id"], Verdict.APPROVE)
    approved = client.answer(3)
    end = client.answer(3)

    assert first["update"]["state"] == "pending"
    assert first["update"]["approvals_needed"] == 1
    assert approved["update"]["state"] == "approved"
    assert approved["update"]["reviewers"] == ["carol"]
    assert end == {"ok": {}}


def test_wait_approval_of_a_rejected_one_carries_the_comment(daemon, fast):
    client = fast()
    asked = client.decide(refund(amount=60000))["ok"]["approval"]
    _review(daemon, asked["id"], Verdict.REJECT)

    client.request(3, "wait_approval", {"approval_id": asked["id"]})
    update = client.answer(3)["update"]

    assert (update["state"], update["comment"]) == ("rejected", "looked at it")
    assert client.answer(3) == {"ok": {}}


@pytest.mark.parametrize(
    ("approval_id", "code"),
    [("apr_" + "0" * 26, "not_found"), ("", "invalid_request")],
)
def test_wait_approval_for_no_approval_of_ours_is_refused(
    daemon, fast, approval_id, code
):
    client = fast()

    client.request(1, "wait_approval", {"approval_id": approval_id})
    error = client.answer(1)["error"]

    assert (error["code"], error["field"]) == (code, "request.approval_id")


def test_cancel_ends_a_wait_and_leaves_the_approval(daemon, fast):
    client = fast()
    asked = client.decide(refund(amount=60000))["ok"]["approval"]

    client.request(3, "wait_approval", {"approval_id": asked["id"]})
    client.answer(3)
    client.request(3, "cancel")
    ended = client.answer(3)

    assert ended["error"]["code"] == "cancelled"
    assert daemon.daemon._book.get(asked["id"]).state == "pending"


# ----------------------------------------------------------------- shutdown


def test_stop_refuses_new_requests_finishes_in_flight_and_ends_waits(start_daemon):
    running = start_daemon("shutdown_grace_seconds=10")
    path = running.config.agent.fast_socket
    client = FastClient(path)
    asked = client.decide(refund(amount=60000))["ok"]["approval"]
    client.request(2, "wait_approval", {"approval_id": asked["id"]})
    client.answer(2)
    release = hold_decisions(running)
    client.request(3, "decide", refund() | {"request_id": "in-flight"})
    wait_until(lambda: running.daemon.pipeline._in_flight == 1)

    stopping = asyncio.run_coroutine_threadsafe(running.daemon.stop(), running.loop)
    wait_until(lambda: running.daemon.pipeline._closing)
    client.request(4, "health")
    health = client.answer(4)
    client.request(5, "decide", refund())
    refused = client.answer(5)
    release()
    in_flight = client.answer(3)
    wait_ended = client.answer(2)
    stopping.result(15)

    assert health == {"ok": {"status": "NOT_SERVING"}}
    assert refused["error"]["code"] == "shutting_down"
    assert in_flight["ok"]["request_id"] == "in-flight"
    assert wait_ended["error"]["code"] == "shutting_down"
    assert client.closed()
    assert not os.path.exists(path)
    client.close()


def test_a_stale_socket_file_is_replaced_at_start(start_daemon, tmp_path):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "agent.fast.sock"))
    stale.close()  # the file stays, as after a crash

    running = start_daemon()
    client = FastClient(running.config.agent.fast_socket)

    assert client.decide(refund())["ok"]["decision"] == "allow"
    client.close()


def test_fast_socket_takes_the_agent_socket_mode(start_daemon):
    running = start_daemon("agent.socket_mode=0640")

    mode = os.stat(running.config.agent.fast_socket).st_mode & 0o777

    assert mode == 0o640


def test_an_empty_fast_socket_serves_no_fast_path(start_daemon, tmp_path):
    running = start_daemon("agent.fast_socket=")

    assert running.daemon._fast_path is None
    assert not (tmp_path / "agent.fast.sock").exists()
    assert running.stub().Decide(small_refund()).decision == pb.DECISION_ALLOW


def test_many_clients_at_once_each_get_their_own_answers(daemon, fast):
    clients = [fast() for _ in range(4)]

    def ask(index: int) -> list[str]:
        client = clients[index]
        for stream in range(1, 9):
            request = refund() | {"request_id": f"{index}-{stream}"}
            client.request(stream, "decide", request)
        return [client.answer(stream)["ok"]["request_id"] for stream in range(1, 9)]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(ask, range(4)))

    assert results == [[f"{i}-{s}" for s in range(1, 9)] for i in range(4)]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["agent.fast_socket=" + "s" * 200], r"agent.fast_socket: expected at most"),
        (
            ["agent.socket=/tmp/x.sock", "agent.fast_socket=/tmp/x.sock"],
            r"agent.fast_socket: expected a socket apart from agent.socket",
        ),
        (
            ["agent.fast_socket=/tmp/y.sock", "admin.socket=/tmp/y.sock"],
            r"admin.socket: expected a socket apart from agent.fast_socket",
        ),
    ],
    ids=["too-long", "same-as-grpc", "same-as-admin"],
)
def test_fast_socket_is_validated_like_the_agent_socket(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        daemon_config(tmp_path, *overrides)
