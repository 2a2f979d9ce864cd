"""The fast path against hostile or unlucky clients, on a real daemon with
raw frames: cancels that race their request, timestamps in every extension
format, nesting msgspec cannot follow, idle sockets, large frames, unknown
keys, and the stream-0 rules of protos/fastpath.md."""

from __future__ import annotations

import random
import struct
import threading
from typing import Any

import kynara_sdk
import msgspec
import pytest
from support import daemon_config, read_record
from test_fastpath import (
    HEADER,
    READ_TIMEOUT,
    FastClient,
    refund,
    wait_until,
)

from kynara_sidecar.errors import ConfigError
from kynara_sidecar.server.fastpath import INITIAL_BUFFER_BYTES, _Connection

OPS = ("decide", "decide_batch", "wait_approval")


@pytest.fixture
def fast_to():
    """Connect ``FastClient``s to a running daemon's fast socket; closed at
    teardown, so a test that fails midway leaves no socket open."""
    clients: list[FastClient] = []

    def connect(running, **options) -> FastClient:
        client = FastClient(running.config.agent.fast_socket, **options)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.close()


@pytest.fixture
def fast(daemon, fast_to):
    """Connect ``FastClient``s to the daemon; closed at teardown."""
    return lambda **options: fast_to(daemon, **options)


def frame(stream: int, message: Any) -> bytes:
    payload = msgspec.msgpack.encode(message)
    return HEADER.pack(len(payload), stream) + payload


def in_flight(running) -> int:
    """Requests in flight on all the daemon's fast path connections."""
    return sum(len(c.streams) for c in list(running.daemon._fast_path._connections))


def ask_approval(client: FastClient) -> str:
    return client.decide(refund(amount=60000), stream=9999)["ok"]["approval"]["id"]


def op_request(op: str, approval_id: str) -> dict:
    if op == "decide":
        return refund()
    if op == "decide_batch":
        return {"items": [refund(), refund()]}
    return {"approval_id": approval_id}


class Reader:
    """Reads every frame of a connection on a thread of its own, so the
    test can write without waiting for answers."""

    def __init__(self, client: FastClient):
        self.client = client
        self.frames: list[tuple[int, dict]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                got = self.client.recv()
            except OSError:
                return
            if got is None:
                return
            with self._lock:
                self.frames.append(got)

    def ends(self) -> dict[int, int]:
        """Messages that end a request (``ok`` or ``error``), per stream."""
        counts: dict[int, int] = {}
        with self._lock:
            for stream, message in self.frames:
                if "ok" in message or "error" in message:
                    counts[stream] = counts.get(stream, 0) + 1
        return counts


# ------------------------------------------------------------------ cancel


@pytest.mark.parametrize("op", OPS)
def test_a_cancel_in_the_same_write_as_its_request_ends_it_once(daemon, fast, op):
    client = fast()
    approval_id = ask_approval(client)

    client.sock.sendall(
        frame(5, {"op": op, "request": op_request(op, approval_id)})
        + frame(5, {"op": "cancel"})
    )
    ended = client.answer(5)
    while "update" in ended:
        ended = client.answer(5)
    wait_until(lambda: in_flight(daemon) == 0)
    client.request(5, "health")  # the stream is free again
    health = client.answer(5)

    assert "ok" in ended or ended["error"]["code"] == "cancelled"
    assert health == {"ok": {"status": "SERVING"}}
    assert not client._early[5] and not client._early[0]


def test_requests_cancelled_0_to_2_ms_after_each_end_once(daemon, fast):
    seed = random.randrange(1 << 32)
    print(f"seed {seed}")
    chance = random.Random(seed)
    client = fast()
    approval_id = ask_approval(client)
    reader = Reader(client)
    streams = range(1, 601)

    for stream in streams:
        op = OPS[stream % 3]
        client.send(stream, {"op": op, "request": op_request(op, approval_id)})
        pause = chance.choice([0, 0, chance.uniform(0, 0.002)])
        if pause:
            threading.Event().wait(pause)
        client.send(stream, {"op": "cancel"})
    wait_until(lambda: len(reader.ends()) == len(streams), timeout=READ_TIMEOUT)
    wait_until(lambda: in_flight(daemon) == 0)
    first = reader.ends()
    # Every stream id is free again.
    client.sock.sendall(b"".join(frame(s, {"op": "health"}) for s in streams))
    wait_until(lambda: sum(reader.ends().values()) == 2 * len(streams))

    assert first == dict.fromkeys(streams, 1)
    assert reader.ends() == dict.fromkeys(streams, 2)
    assert all("update" in m or "ok" in m or m["error"]["code"] == "cancelled"
               for s, m in reader.frames if s in streams)  # fmt: skip


@pytest.mark.parametrize("op", ["decide_batch", "wait_approval"])
def test_deadlines_that_pass_before_the_work_starts_end_it_once(daemon, fast, op):
    client = fast()
    approval_id = ask_approval(client)
    reader = Reader(client)
    streams = range(1, 201)
    request = op_request(op, approval_id)

    client.sock.sendall(
        b"".join(
            frame(s, {"op": op, "request": request, "timeout_ms": 1}) for s in streams
        )
    )
    wait_until(lambda: len(reader.ends()) == len(streams), timeout=READ_TIMEOUT)
    wait_until(lambda: in_flight(daemon) == 0)

    assert reader.ends() == dict.fromkeys(streams, 1)


# -------------------------------------------------------------- timestamps


def _ext_forms(data: bytes) -> dict[str, bytes]:
    """The timestamp extension ``data`` in each extension format that can
    hold it (raw MessagePack)."""
    forms = {
        "ext8": b"\xc7" + bytes([len(data)]) + b"\xff" + data,
        "ext16": b"\xc8" + struct.pack(">H", len(data)) + b"\xff" + data,
        "ext32": b"\xc9" + struct.pack(">I", len(data)) + b"\xff" + data,
    }
    return forms


SECONDS, NANOS = 1_796_374_800, 500_000_000
TIMESTAMPS = {
    "32-bit": (struct.pack(">I", SECONDS), ""),
    "64-bit": (struct.pack(">Q", NANOS << 34 | SECONDS), ".5"),
    "96-bit": (struct.pack(">Iq", NANOS, SECONDS), ".5"),
}


@pytest.mark.parametrize(
    ("form", "container"),
    [(f, c) for f in TIMESTAMPS for c in ("ext8", "ext16", "ext32")],
)
def test_a_timestamp_in_any_extension_format_is_read_exactly(
    daemon, fast, form, container
):
    data, fraction = TIMESTAMPS[form]
    when = msgspec.Raw(_ext_forms(data)[container])

    answer = fast().decide(refund(when=when))["ok"]

    record = read_record(daemon, answer["audit_sequence"])
    assert record.context["when"] == {"timestamp": f"2026-12-04T09:00:00{fraction}Z"}


@pytest.mark.parametrize("size", [0, 5, 16])
def test_a_timestamp_of_another_size_is_refused_naming_it(daemon, fast, size):
    client = fast()
    when = msgspec.Raw(_ext_forms(bytes(size))["ext8"])

    error = client.decide(refund(when=when))["error"]
    after = client.decide(refund(), stream=2)

    assert (error["code"], error["field"]) == (
        "invalid_request",
        "request.context['when']",
    )
    assert "expected 4, 8 or 12 bytes" in error["message"]
    assert after["ok"]["decision"] == "allow"


# ----------------------------------------------------------------- nesting


DEEP_FIELD = "request.context['deep']" + "[0]" * 16


def _deep_list(depth: int) -> msgspec.Raw:
    return msgspec.Raw(b"\x91" * depth + b"\x01")


def _deep_maps(depth: int) -> msgspec.Raw:
    return msgspec.Raw(b"\x81\xa1k" * depth + b"\x01")


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (refund(deep=_deep_list(5000)), DEEP_FIELD),
        (
            refund() | {"resource": {"attributes": {"deep": _deep_maps(20000)}}},
            "request.resource.attributes['deep']" + "['k']" * 16,
        ),
        (refund(deep=_deep_list(900)), DEEP_FIELD),  # near msgspec's limit
    ],
    ids=["list-5000", "maps-20000", "list-900"],
)
def test_nesting_too_deep_to_decode_is_invalid_request_naming_it(
    daemon, fast, request_, field
):
    client = fast()

    error = client.decide(request_)["error"]
    after = client.decide(refund(), stream=2)

    assert (error["code"], error["field"]) == ("invalid_request", field)
    assert after["ok"]["decision"] == "allow"


def test_nesting_too_deep_in_a_batch_item_is_named_within_the_batch(daemon, fast):
    client = fast()

    client.request(
        1, "decide_batch", {"items": [refund(), refund(deep=_deep_list(5000))]}
    )
    error = client.answer(1)["error"]
    client.request(2, "health")

    assert (error["code"], error["field"]) == (
        "invalid_request",
        "request.items[1].context['deep']" + "[0]" * 16,
    )
    assert client.answer(2) == {"ok": {"status": "SERVING"}}


def test_nesting_too_deep_in_a_hello_is_refused_on_stream_0(daemon, fast):
    client = fast(hello=False)

    client.send(0, {"op": "hello", "versions": [1], "extra": _deep_list(5000)})
    answered_on, message = client.recv()

    assert answered_on == 0
    assert message["error"]["code"] == "invalid_request"
    assert message["error"]["field"].startswith("extra[0]")
    assert client.closed()


# ------------------------------------------------------------- connections


def test_connections_without_a_hello_are_closed_and_free_their_slot(daemon, fast):
    daemon.daemon._fast_path._max_connections = 3
    daemon.daemon._fast_path.hello_timeout = 0.2
    idle = [fast(hello=False) for _ in range(3)]
    idle[1].sock.sendall(HEADER.pack(40, 0)[:5])  # half a header
    idle[2].sock.sendall(frame(0, {"op": "hello", "versions": [1]})[:12])

    ends = [client.recv() for client in idle]
    wait_until(lambda: not daemon.daemon._fast_path._connections)
    client = fast()

    assert [(s, m["error"]["code"]) for s, m in ends] == [(0, "invalid_request")] * 3
    assert "expected a hello within" in ends[0][1]["error"]["message"]
    assert all(c.closed() for c in idle)
    assert client.decide(refund())["ok"]["decision"] == "allow"


def test_an_idle_connection_is_closed_after_its_hello_and_frees_its_slot(daemon, fast):
    server = daemon.daemon._fast_path
    server._max_connections = 1
    server.idle_seconds = 0.2
    idle = fast()
    answered = idle.decide(refund())

    end = idle.recv()  # nothing comes before the close
    wait_until(lambda: not server._connections)
    client = fast()

    assert answered["ok"]["decision"] == "allow"
    assert end is None
    assert client.decide(refund())["ok"]["decision"] == "allow"


def test_the_sdk_dials_again_after_an_idle_close(daemon):
    server = daemon.daemon._fast_path
    server.idle_seconds = 0.2
    refund_call = {
        "action": "payments.refund.issue",
        "resource_kind": "payments.refund",
        "user": "alice",
        "attributes": {"amount": 1},
    }

    with kynara_sdk.Client(daemon.target, transport="fast") as client:
        before = client.decide(**refund_call)
        wait_until(lambda: not server._connections)
        after = client.decide(**refund_call)

    assert before.decision == after.decision == "allow"
    assert after.audit_sequence > before.audit_sequence


def test_a_connection_waiting_on_an_approval_is_not_idle(daemon, fast, monkeypatch):
    server = daemon.daemon._fast_path
    server.idle_seconds = 0.2
    checks: list[bool] = []
    real_check = _Connection._idle_check

    def counted(connection: _Connection) -> None:
        real_check(connection)
        checks.append(connection._closed)

    monkeypatch.setattr(_Connection, "_idle_check", counted)
    client = fast()
    approval_id = ask_approval(client)
    client.request(3, "wait_approval", {"approval_id": approval_id})
    first = client.answer(3)  # pending

    wait_until(lambda: len(checks) >= 4)
    (connection,) = server._connections
    still_waiting = 3 in connection.streams
    client.request(3, "cancel")
    ended = client.answer(3)

    assert first["update"]["state"] == "pending"
    assert not any(checks)
    assert still_waiting
    assert ended["error"]["code"] == "cancelled"


def test_fast_idle_seconds_of_0_arms_no_idle_check(start_daemon, fast_to):
    running = start_daemon("agent.fast_idle_seconds=0")
    client = fast_to(running)
    client.decide(refund())
    (connection,) = running.daemon._fast_path._connections

    assert running.daemon._fast_path.idle_seconds == 0
    assert connection._idle_timer is None


def test_the_configured_idle_timeout_reaches_the_fast_path(start_daemon, fast_to):
    running = start_daemon("agent.fast_idle_seconds=42")
    client = fast_to(running)
    client.decide(refund())
    (connection,) = running.daemon._fast_path._connections

    assert running.daemon._fast_path.idle_seconds == 42
    assert connection._idle_timer is not None


@pytest.mark.parametrize("seconds", ["-1", "0.5", "86401", ".nan", ".inf"])
def test_fast_idle_seconds_is_bounded(tmp_path, seconds):
    with pytest.raises(
        ConfigError,
        match=r"agent.fast_idle_seconds: expected 0 \(never\) or 1\.\.86400 seconds",
    ):
        daemon_config(tmp_path, f"agent.fast_idle_seconds={seconds}")


def test_a_large_frame_grows_the_buffer_for_itself_only(start_daemon, fast_to):
    running = start_daemon(f"agent.max_message_bytes={8 * 1024 * 1024}")
    client = fast_to(running)
    (connection,) = running.daemon._fast_path._connections
    idle_size = len(connection._buffer)
    blob = b"x" * (2 * 1024 * 1024)

    large = client.decide(refund(blob=blob))
    after_large = len(connection._buffer)
    small = client.decide(refund(), stream=2)

    assert idle_size == INITIAL_BUFFER_BYTES
    assert "ok" in large or large["error"]["code"] != "request_too_large"
    assert after_large == INITIAL_BUFFER_BYTES
    assert small["ok"]["decision"] == "allow"


def test_a_header_alone_does_not_make_the_daemon_hold_the_frame(start_daemon, fast_to):
    # A few bytes announcing the largest frame: the buffer grows with the
    # bytes that came, not with what the header announced.
    limit = 64 * 1024 * 1024
    running = start_daemon(f"agent.max_message_bytes={limit}")
    client = fast_to(running)
    (connection,) = running.daemon._fast_path._connections

    client.sock.sendall(HEADER.pack(limit - 1, 1) + b"\x81")
    client.sock.sendall(b"\x00" * (256 * 1024))
    client.request(1, "health", {})  # read once the bytes above have been
    size = len(connection._buffer)

    assert size < 2 * 1024 * 1024


def test_a_hello_longer_than_16_kib_is_refused_before_it_is_read(start_daemon, fast_to):
    running = start_daemon(f"agent.max_message_bytes={8 * 1024 * 1024}")
    client = fast_to(running, hello=False)

    client.sock.sendall(HEADER.pack(8 * 1024 * 1024, 0) + b"\x81")
    stream, answer = client.recv()

    assert stream == 0
    assert answer["error"]["code"] == "request_too_large"
    assert client.closed()


def test_frames_split_at_every_byte_around_a_large_one_are_read_whole(
    start_daemon, fast_to
):
    running = start_daemon(f"agent.max_message_bytes={1024 * 1024}")
    client = fast_to(running)
    stream_of = {1: "small", 2: "large", 3: "small-after"}
    data = b"".join(
        frame(s, {"op": "decide", "request": refund(blob=b"y" * 300_000)})
        if name == "large"
        else frame(s, {"op": "decide", "request": refund()})
        for s, name in stream_of.items()
    )

    for start in range(0, len(data), 65_521):  # odd chunks: headers split too
        client.sock.sendall(data[start : start + 65_521])
    answers = {s: client.answer(s) for s in stream_of}

    assert all("ok" in a for a in answers.values()), answers


@pytest.mark.parametrize("size", [64 * 1024 * 1024 + 1, 2**31])
def test_max_message_bytes_is_bounded(tmp_path, size):
    with pytest.raises(
        ConfigError, match=r"agent.max_message_bytes: expected 1024\.\.67108864"
    ):
        daemon_config(tmp_path, f"agent.max_message_bytes={size}")


def test_max_message_bytes_of_64_mib_is_accepted(tmp_path):
    config = daemon_config(tmp_path, f"agent.max_message_bytes={64 * 1024 * 1024}")

    assert config.agent.max_message_bytes == 64 * 1024 * 1024


# ---------------------------------------------------------------- envelope


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ({"op": "decide", "timeout": 1, "request": refund()}, "timeout"),
        ({"op": "health", "request": {"x": 1}}, "request.x"),
        ({"op": "health", "deadline": 5}, "deadline"),
        ({"op": "wait_approval", "request": {"approval_id": "a", "y": 1}}, "request.y"),
        ({"op": "decide_batch", "extra": True}, "extra"),
    ],
    ids=["timeout-typo", "health-request-key", "health-key", "wait-key", "batch-key"],
)
def test_unknown_keys_are_refused_naming_them(daemon, fast, message, field):
    client = fast()

    client.send(3, message)
    error = client.answer(3)["error"]
    after = client.decide(refund(), stream=4)

    assert (error["code"], error["field"]) == ("invalid_request", field)
    assert after["ok"]["decision"] == "allow"


def test_a_cancel_with_an_unknown_key_is_refused_on_stream_0(daemon, fast):
    client = fast()
    approval_id = ask_approval(client)
    client.request(3, "wait_approval", {"approval_id": approval_id})
    client.answer(3)  # pending

    client.send(3, {"op": "cancel", "reason": "bored"})
    refused = client.answer(0)
    client.request(3, "cancel")
    ended = client.answer(3)

    assert (refused["error"]["code"], refused["error"]["field"]) == (
        "invalid_request",
        "reason",
    )
    assert ended["error"]["code"] == "cancelled"


def test_a_hello_with_a_key_of_a_newer_client_still_negotiates(daemon, fast):
    client = fast(hello=False)

    client.send(0, {"op": "hello", "versions": [2, 1], "compression": "none"})

    assert client.answer(0)["ok"]["version"] == 1


@pytest.mark.parametrize(
    ("message", "got"), [({"request": {}}, "got none"), ({"op": "shred"}, "'shred'")]
)
def test_a_missing_or_unknown_op_names_op_and_lists_the_ops(daemon, fast, message, got):
    client = fast()

    client.send(3, message)
    error = client.answer(3)["error"]

    assert (error["code"], error["field"]) == ("invalid_request", "op")
    assert "decide, decide_batch, wait_approval, health, cancel" in error["message"]
    assert got in error["message"]


def test_an_oversized_first_frame_is_refused_on_stream_0(start_daemon, fast_to):
    running = start_daemon("agent.max_message_bytes=4096")
    client = fast_to(running, hello=False)

    client.send_frame(7, b"\x80" * 5000)
    answered_on, message = client.recv()

    assert answered_on == 0
    assert message["error"]["code"] == "request_too_large"
    assert client.closed()
