"""The gateway's transports bound what a client can hold and answer what
they refuse: counted refusals, slow and oversized requests, repeated
identity headers, sessions per agent (HTTP); unparsable lines and the token
file (stdio, served in process over a pipe pair by the same daemon).

Timeouts are configured small (1 s) and every wait is bounded: a test
asserts that a connection ends or is answered, never how fast.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import socket
from concurrent.futures import Future
from typing import Any

import httpx2 as httpx
import pytest
from gateway_support import (
    LEGACY_VERSION,
    GatewayDaemon,
    GatewaySetup,
    initialize_message,
    post_tools_list,
    start_gateway,
    wait_for,
)
from upstream_support import stdio_upstream_config

from kynara_sidecar.gateway import http as gateway_http
from kynara_sidecar.gateway.proxy import REQUEST_ERROR_CODE
from kynara_sidecar.gateway.stdio import StdioWire, serve_stdio
from kynara_sidecar.identity import split_asserted_chain

# Longest any single wait may take before the test fails (a shared,
# loaded machine); the configured timeouts are 1 s.
WAIT_SECONDS = 20.0
ACCEPT = "application/json, text/event-stream"


@pytest.fixture(scope="module")
def limited(tmp_path_factory) -> Any:
    """A gateway with 1 s header, body and keep-alive timeouts, two
    sessions per agent, and a stdio agent (reader-bot) reading its token
    from a file."""
    root = tmp_path_factory.mktemp("gateway-limits")
    setup = GatewaySetup(root)
    token_file = root / "token"
    daemon = start_gateway(
        setup,
        {"files": stdio_upstream_config(root / "calls.jsonl")},
        "gateway.header_timeout_seconds=1",
        "gateway.body_timeout_seconds=1",
        "gateway.keep_alive_seconds=1",
        "gateway.max_sessions_per_agent=2",
        "gateway.stdio.agent_id=reader-bot",
        f"gateway.stdio.token_file={token_file}",
        "gateway.stdio.token_env=KYNARA_TEST_UNSET_TOKEN",
    )
    yield setup, daemon, token_file
    daemon.stop()
    setup.close()


def _connect(daemon: GatewayDaemon) -> socket.socket:
    sock = socket.create_connection(
        ("127.0.0.1", daemon.daemon.gateway_port), timeout=WAIT_SECONDS
    )
    return sock


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a reset,
    for data it never read, is a close too)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def _head(daemon: GatewayDaemon, setup: GatewaySetup, **extra: str) -> bytes:
    """A POST head for the endpoint, as reader-bot for alice."""
    headers = {
        "Host": f"127.0.0.1:{daemon.daemon.gateway_port}",
        "authorization": f"Bearer {setup.secret('reader-bot')}",
        "content-type": "application/json",
        "accept": ACCEPT,
        **extra,
    }
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"POST /mcp HTTP/1.1\r\n{lines}\r\n".encode()


def _rpc_error(raw: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)["error"]


# ---------------------------------------------------------------- counting


def test_http_refusals_are_counted_with_their_error(limited):
    setup, daemon, _ = limited
    invalid = daemon.request_errors("invalid_request")
    too_large = daemon.request_errors("request_too_large")
    identity = daemon.request_errors("identity_invalid")
    headers = {
        "authorization": f"Bearer {setup.secret('reader-bot')}",
        "accept": ACCEPT,
        "content-type": "application/json",
    }

    batch = httpx.post(daemon.gateway_url, content=b"[]", headers=headers)
    chunks = (b"x" * 1024 for _ in range(8))  # streamed: no content-length
    large = httpx.post(daemon.gateway_url, content=chunks, headers=headers)
    unknown = httpx.post(
        daemon.gateway_url,
        content=b"{}",
        headers={**headers, "authorization": "Bearer not-a-secret"},
    )

    assert (batch.status_code, large.status_code, unknown.status_code) == (
        400,
        413,
        401,
    )
    assert daemon.request_errors("invalid_request") == invalid + 1
    assert daemon.request_errors("request_too_large") == too_large + 1
    assert daemon.request_errors("identity_invalid") == identity + 1


# ---------------------------------------------------------------- slow clients


def test_incomplete_headers_are_cut_off(limited):
    setup, daemon, _ = limited
    with _connect(daemon) as sock:
        sock.sendall(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n")

        assert _read_all(sock) == b""


def test_trickled_headers_do_not_keep_a_connection(limited):
    setup, daemon, _ = limited
    with _connect(daemon) as sock:
        sock.sendall(b"POST /mcp HTTP/1.1\r\n")
        closed = False
        # One header byte every 0.2 s for up to 20 s: far past the 1 s limit.
        for _ in range(100):
            readable, _, _ = select.select([sock], [], [], 0.2)
            if readable and sock.recv(1024) == b"":
                closed = True
                break
            try:
                sock.sendall(b"x")
            except OSError:
                closed = True
                break

    assert closed


def test_a_body_not_sent_in_time_is_answered_408_and_the_connection_closed(
    limited,
):
    setup, daemon, _ = limited
    before = daemon.request_errors("invalid_request")
    with _connect(daemon) as sock:
        sock.sendall(_head(daemon, setup, **{"content-length": "2000"}))
        sock.sendall(b'{"jsonrpc"')

        status, error = _rpc_error(_read_all(sock))

    assert status == 408
    assert "gateway.body_timeout_seconds (1 s)" in error["message"]
    assert error["data"]["code"] == "invalid_request"
    assert daemon.request_errors("invalid_request") == before + 1


def test_a_declared_length_over_the_limit_is_refused_before_the_body(limited):
    setup, daemon, _ = limited
    with _connect(daemon) as sock:
        sock.sendall(_head(daemon, setup, **{"content-length": "999999999"}))

        status, error = _rpc_error(_read_all(sock))

    # Not the 408 of a body that never came: refused on the header alone.
    assert status == 413
    assert "gateway.max_message_bytes (4096 bytes)" in error["message"]
    assert error["data"] == {"code": "request_too_large", "limit": 4096}


def test_a_declared_length_over_the_limit_is_refused_for_any_method(limited):
    setup, daemon, _ = limited
    before = daemon.request_errors("request_too_large")
    head = _head(daemon, setup, **{"content-length": "999999999"})
    with _connect(daemon) as sock:
        sock.sendall(head.replace(b"POST ", b"GET ", 1))

        status, error = _rpc_error(_read_all(sock))

    assert status == 413
    assert error["data"] == {"code": "request_too_large", "limit": 4096}
    assert daemon.request_errors("request_too_large") == before + 1


def test_connections_past_max_connections_are_closed_at_once(tmp_path):
    setup = GatewaySetup(tmp_path)
    daemon = start_gateway(
        setup,
        {"files": stdio_upstream_config(tmp_path / "calls.jsonl")},
        "gateway.max_connections=3",
    )
    request = (
        "GET /other HTTP/1.1\r\nConnection: close\r\n"
        f"Host: 127.0.0.1:{daemon.daemon.gateway_port}\r\n\r\n"
    ).encode()
    try:
        held = [_connect(daemon) for _ in range(3)]
        with _connect(daemon) as extra:
            extra.sendall(request)
            refused = _read_all(extra)
        held.pop().close()
        answered = b""
        for _ in range(50):  # until the server has seen the close
            with _connect(daemon) as again:
                again.sendall(request)
                answered = _read_all(again)
            if answered:
                break
        for sock in held:
            sock.close()
    finally:
        daemon.stop()
        setup.close()

    assert refused == b""
    assert answered.startswith(b"HTTP/1.1 404")


# ---------------------------------------------------------------- identity


@pytest.mark.parametrize(
    "header", ["authorization", "kynara-delegation-token", "kynara-asserted-chain"]
)
def test_a_repeated_identity_header_is_refused_naming_it(limited, header):
    setup, daemon, _ = limited
    before = daemon.request_errors("invalid_request")
    value = {
        "authorization": f"Bearer {setup.secret('reader-bot')}",
        "kynara-delegation-token": setup.token("alice", "reader-bot"),
        "kynara-asserted-chain": "alice",
    }[header]
    headers = [
        ("authorization", f"Bearer {setup.secret('reader-bot')}"),
        ("accept", ACCEPT),
        ("content-type", "application/json"),
        (header, value),
        (header, value),
    ]
    if header == "authorization":
        headers = headers[1:]

    response = post_tools_list(daemon, headers)

    assert response.status_code == 400
    error = response.json()["error"]
    assert f"the {header!r} header was sent more than once" in error["message"]
    assert error["data"] == {"code": "invalid_request", "field": header}
    assert daemon.request_errors("invalid_request") == before + 1


def test_an_asserted_chain_with_an_empty_item_is_refused(limited):
    setup, daemon, _ = limited
    response = post_tools_list(
        daemon,
        {
            "authorization": f"Bearer {setup.secret('reader-bot')}",
            "kynara-asserted-chain": "alice,,reader-bot",
        },
    )

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == REQUEST_ERROR_CODE
    assert "item 1" in error["message"] and "is empty" in error["message"]


@pytest.mark.parametrize(
    ("text", "chain"),
    [("", ()), ("  ", ()), ("alice", ("alice",)), (" alice , bot ", ("alice", "bot"))],
)
def test_split_asserted_chain_strips_ids(text, chain):
    assert split_asserted_chain(text) == chain


@pytest.mark.parametrize(("text", "item"), [("a,,b", 1), ("a,", 1), (",a", 0)])
def test_split_asserted_chain_refuses_empty_items(text, item):
    with pytest.raises(ValueError, match=f"item {item} .* is empty"):
        split_asserted_chain(text)


# ---------------------------------------------------------------- sessions


def _open_session(daemon: GatewayDaemon, setup: GatewaySetup, agent: str):
    return httpx.post(
        daemon.gateway_url,
        headers={
            "authorization": f"Bearer {setup.secret(agent)}",
            "accept": ACCEPT,
            "content-type": "application/json",
        },
        json=initialize_message("limits"),
        timeout=WAIT_SECONDS,
    )


def test_one_agent_cannot_take_every_session(limited):
    setup, daemon, _ = limited
    first = _open_session(daemon, setup, "ops-bot")
    second = _open_session(daemon, setup, "ops-bot")
    before = daemon.request_errors("invalid_request")

    third = _open_session(daemon, setup, "ops-bot")
    other = _open_session(daemon, setup, "writer-bot")
    httpx.delete(
        daemon.gateway_url,
        headers={
            "authorization": f"Bearer {setup.secret('ops-bot')}",
            "mcp-session-id": first.headers["mcp-session-id"],
            "mcp-protocol-version": LEGACY_VERSION,
        },
    ).raise_for_status()
    after_delete = _open_session(daemon, setup, "ops-bot")

    assert first.status_code == second.status_code == 200
    assert third.status_code == 429
    error = third.json()["error"]
    assert "gateway.max_sessions_per_agent (2)" in error["message"]
    assert error["data"] == {"code": "invalid_request", "limit": 2}
    assert daemon.request_errors("invalid_request") == before + 1
    assert other.status_code == 200 and other.headers["mcp-session-id"]
    assert after_delete.status_code == 200


@pytest.fixture
def capped(tmp_path) -> Any:
    """A gateway of its own allowing one session per agent."""
    setup = GatewaySetup(tmp_path)
    daemon = start_gateway(
        setup,
        {"files": stdio_upstream_config(tmp_path / "calls.jsonl")},
        "gateway.max_sessions_per_agent=1",
    )
    yield setup, daemon
    daemon.stop()
    setup.close()


def test_repeated_session_headers_are_refused_and_the_cap_holds(capped):
    setup, daemon = capped
    first = _open_session(daemon, setup, "ops-bot")
    before = daemon.request_errors("invalid_request")
    base = [
        ("authorization", f"Bearer {setup.secret('ops-bot')}"),
        ("accept", ACCEPT),
        ("content-type", "application/json"),
    ]
    # The SDK reads the first copy (a handshake version: a session), a
    # guard reading the last would see a single exchange.
    versions = httpx.post(
        daemon.gateway_url,
        headers=[
            *base,
            ("mcp-protocol-version", LEGACY_VERSION),
            ("mcp-protocol-version", "2026-07-28"),
        ],
        json=initialize_message("limits"),
        timeout=WAIT_SECONDS,
    )
    sid = first.headers["mcp-session-id"]
    session_ids = httpx.post(
        daemon.gateway_url,
        headers=[*base, ("mcp-session-id", sid), ("mcp-session-id", "other")],
        json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        timeout=WAIT_SECONDS,
    )
    again = _open_session(daemon, setup, "ops-bot")

    assert first.status_code == 200
    assert versions.status_code == 400
    assert "mcp-session-id" not in versions.headers
    assert versions.json()["error"]["data"] == {
        "code": "invalid_request",
        "field": "mcp-protocol-version",
    }
    assert session_ids.status_code == 400
    assert (
        "'mcp-session-id' header was sent more than once"
        in (session_ids.json()["error"]["message"])
    )
    assert again.status_code == 429
    assert daemon.request_errors("invalid_request") == before + 3


def test_a_session_the_guard_did_not_expect_still_counts(capped, monkeypatch):
    setup, daemon = capped
    live = daemon.daemon._gateway_http._live
    # Whatever the guard predicts, the response handing out a session id
    # decides.
    monkeypatch.setattr(gateway_http, "_opens_session", lambda headers: False)
    first = _open_session(daemon, setup, "ops-bot")
    opened = set(live)

    refused = _open_session(daemon, setup, "ops-bot")
    other = _open_session(daemon, setup, "writer-bot")
    wait_for(
        lambda: set(live) == opened | {other.headers.get("mcp-session-id")},
        what="the refused session to end",
    )
    httpx.delete(
        daemon.gateway_url,
        headers={
            "authorization": f"Bearer {setup.secret('ops-bot')}",
            "mcp-session-id": first.headers["mcp-session-id"],
            "mcp-protocol-version": LEGACY_VERSION,
        },
    ).raise_for_status()
    after_delete = _open_session(daemon, setup, "ops-bot")

    assert first.status_code == 200
    assert opened == {first.headers["mcp-session-id"]}
    assert refused.status_code == 429
    assert "mcp-session-id" not in refused.headers
    assert "gateway.max_sessions_per_agent (1)" in refused.json()["error"]["message"]
    assert other.status_code == 200
    assert after_delete.status_code == 200


# ---------------------------------------------------------------- stdio


class _Pipes:
    """``serve_stdio`` of the daemon on a pipe pair, driven line by line."""

    def __init__(self, daemon: GatewayDaemon):
        to_gateway_r, self._to_gateway = os.pipe()
        self._from_gateway, from_gateway_w = os.pipe()
        self._fds = [to_gateway_r, from_gateway_w]
        wire = StdioWire(to_gateway_r, from_gateway_w)
        inner = daemon.daemon
        self.done: Future[None] = asyncio.run_coroutine_threadsafe(
            serve_stdio(inner.config, inner._gateway, inner.pipeline, wire),
            daemon.loop,
        )
        self._buffer = b""

    def send(self, data: bytes) -> None:
        os.write(self._to_gateway, data)

    def request(self, message: dict[str, Any]) -> None:
        self.send(json.dumps(message).encode() + b"\n")

    def read(self) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            readable, _, _ = select.select([self._from_gateway], [], [], WAIT_SECONDS)
            assert readable, "no answer from the stdio gateway"
            chunk = os.read(self._from_gateway, 65536)
            assert chunk, "the stdio gateway closed its output"
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def initialize(self) -> None:
        self.request(initialize_message("limits"))
        assert self.read()["id"] == "init"
        self.request({"jsonrpc": "2.0", "method": "notifications/initialized"})

    def end(self) -> None:
        """Close the input (EOF) and wait for the gateway to finish."""
        os.close(self._to_gateway)
        self.done.result(WAIT_SECONDS)

    def close(self) -> None:
        for fd in (*self._fds, self._from_gateway):
            os.close(fd)


@pytest.fixture
def pipes(limited):
    _, daemon, _ = limited
    pipes = _Pipes(daemon)
    yield pipes
    if not pipes.done.done():
        pipes.end()
    pipes.close()


@pytest.mark.parametrize(
    ("line", "what"),
    [
        (b'{"jsonrpc": "2.0", "id": 1, \n', "EOF while parsing"),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "a\x00b"}\n', "control character"),
        (b'\xff{"jsonrpc": "2.0"}\n', "not UTF-8: byte 0xff at offset 0"),
    ],
)
def test_stdio_answers_a_line_it_cannot_parse(limited, pipes, line, what):
    _, daemon, _ = limited
    before = daemon.request_errors("invalid_request")
    pipes.initialize()

    pipes.send(line)
    answer = pipes.read()
    pipes.request({"jsonrpc": "2.0", "id": 2, "method": "ping"})
    pong = pipes.read()

    assert answer["id"] is None
    assert answer["error"]["code"] == -32700
    assert answer["error"]["message"].startswith("Parse error: ")
    assert what in answer["error"]["message"]
    assert pong == {"jsonrpc": "2.0", "id": 2, "result": {}}
    assert daemon.request_errors("invalid_request") == before + 1


def test_stdio_answers_a_partial_last_line(pipes):
    pipes.initialize()

    pipes.send(b'{"jsonrpc": "2.0", "id": 3, "meth')
    os.close(pipes._to_gateway)
    answer = pipes.read()
    pipes.done.result(WAIT_SECONDS)

    assert answer["id"] is None and answer["error"]["code"] == -32700
    assert "the input ended before this line's newline" in answer["error"]["message"]


def test_stdio_refusals_are_counted(limited, pipes):
    _, daemon, _ = limited
    invalid = daemon.request_errors("invalid_request")
    too_large = daemon.request_errors("request_too_large")
    pipes.initialize()

    pipes.send(b"[]\n")
    batch = pipes.read()
    pipes.send(b'{"jsonrpc": "2.0", "id": 1}\n')
    not_rpc = pipes.read()
    pipes.send(b"x" * 5000 + b"\n")
    large = pipes.read()

    assert batch["error"]["code"] == -32600 and "batch" in batch["error"]["message"]
    assert not_rpc["error"]["code"] == -32600
    assert "not a JSON-RPC 2.0 message" in not_rpc["error"]["message"]
    assert large["error"]["data"]["code"] == "request_too_large"
    assert daemon.request_errors("invalid_request") == invalid + 2
    assert daemon.request_errors("request_too_large") == too_large + 1


@pytest.mark.parametrize(
    ("message", "what"),
    [
        ({"jsonrpc": "2.0", "id": 1}, 'neither "method" nor "result" nor "error"'),
        (
            {"jsonrpc": "2.0", "id": 1, "method": "ping", "params": []},
            "as a JSON-RPC request, field 'params': Input should be an object",
        ),
        (
            {"jsonrpc": "1.0", "method": "ping"},
            "as a JSON-RPC notification, field 'jsonrpc'",
        ),
        ("ping", "response object, got a JSON string"),
    ],
)
def test_stdio_says_in_one_line_why_json_is_no_message(pipes, message, what):
    pipes.initialize()

    pipes.request(message)
    answer = pipes.read()

    text = answer["error"]["message"]
    assert answer["error"]["code"] == -32600
    assert text.startswith("Invalid Request: not a JSON-RPC 2.0 message: ")
    assert what in text
    assert "validation error" not in text and "union[" not in text


def test_stdio_reads_a_rewritten_token_file_on_the_next_request(limited, pipes):
    setup, _, token_file = limited
    token_file.write_text("")
    pipes.initialize()
    list_tools = {"jsonrpc": "2.0", "method": "tools/list"}

    pipes.request({**list_tools, "id": 1})
    without = pipes.read()
    token_file.write_text(setup.token("alice", "reader-bot") + "\n")
    pipes.request({**list_tools, "id": 2})
    with_token = pipes.read()
    token_file.write_text("not-a-token")
    pipes.request({**list_tools, "id": 3})
    rewritten = pipes.read()

    assert without["error"]["data"]["code"] == "identity_invalid"
    assert "gateway.stdio.token_file" in without["error"]["message"]
    assert [t["name"] for t in with_token["result"]["tools"]] == [
        "files__add_tool",
        "files__read",
    ]
    assert rewritten["error"]["data"]["code"] == "identity_invalid"
