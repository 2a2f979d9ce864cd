"""Every door shows an explained decision's limits alike: the fast path's
answer carries what gRPC's DecideResponse.limits does, and both count into
the same limit."""

from __future__ import annotations

import socket
import struct

import msgspec
import pytest
from kynara.v1 import decision_pb2 as pb
from limits_support import policy_dir, refund_limits
from support import fast_refund, small_refund

HEADER = struct.Struct(">II")


@pytest.fixture
def running(tmp_path, start_daemon):
    """The shipped policies plus three refunds a Berlin day per user and a
    week's total the refunds here stay below."""
    limits = refund_limits(ceiling=3, total="refunded", total_ceiling=100_000)
    root = policy_dir(tmp_path / "policies", {"refund-limits.yaml": limits})
    return start_daemon(f"policy.source={root}")


def fast_decide(path: str, request: dict) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(path)
        buffer = b""
        answers = []
        for stream, message in (
            (0, {"op": "hello", "versions": [1]}),
            (1, {"op": "decide", "request": request}),
        ):
            payload = msgspec.msgpack.encode(message)
            sock.sendall(HEADER.pack(len(payload), stream) + payload)
            while True:
                if len(buffer) >= HEADER.size:
                    length, _ = HEADER.unpack(buffer[: HEADER.size])
                    if len(buffer) >= HEADER.size + length:
                        body = buffer[HEADER.size : HEADER.size + length]
                        buffer = buffer[HEADER.size + length :]
                        answers.append(msgspec.msgpack.decode(body))
                        break
                chunk = sock.recv(65536)
                assert chunk, "the daemon closed the connection"
                buffer += chunk
    return answers[1]["ok"]


def test_the_fast_path_shows_an_explained_decisions_limits_as_grpc_does(running):
    stub = running.stub()
    request = small_refund()
    request.explain = True
    first = stub.Decide(request, timeout=10)
    fast = fast_decide(
        running.config.agent.fast_socket, fast_refund() | {"explain": True}
    )
    plain = fast_decide(running.config.agent.fast_socket, fast_refund())
    third = stub.Decide(request, timeout=10)

    assert first.decision == pb.DECISION_ALLOW
    assert fast["decision"] == "allow"
    # Both doors count into one limit: the fast path saw the gRPC refund.
    assert fast["limits"]["refunds_today"]["count"] == 1
    assert "limits" not in plain
    assert third.limits["refunds_today"].count == 3
    assert third.decision == pb.DECISION_DENY
    seen = fast["limits"]["refunded"]
    grpc_seen = third.limits["refunded"]
    assert (seen["key"], seen["scope"], seen["ceiling"]) == (
        grpc_seen.key,
        grpc_seen.scope,
        grpc_seen.ceiling.int_value,
    )
    assert seen["sum"] == 1200 and grpc_seen.sum.int_value == 3600
    assert seen["counted"] is True and seen["amount"] == 1200
    assert seen["window_start"].tzinfo is not None
