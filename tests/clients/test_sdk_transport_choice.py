"""How ``auto`` picks a transport against real daemons: the fast socket is
named after the target (never another daemon's), a stale fast socket hands
calls to gRPC, a client called before its daemon started still finds the
fast path; and what the fast path says when the peer is not a daemon's
fast socket, or breaks the framing."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import threading
import types

import kynara_sdk
import msgspec
import pytest
from fast_scripted import ScriptedFastDaemon
from kynara_sdk import AsyncClient, Client, KynaraError, KynaraUnavailable, _fast
from kynara_sdk import client as client_module
from kynara_sdk._target import FAST_RETRY_SECONDS, fast_socket_for, route
from support import read_record

REFUND = {"action": "payments.refund.issue", "resource_kind": "payments.refund"}
SMALL = {**REFUND, "user": "alice", "attributes": {"amount": 1200}}


def run(asynchronous: bool, client_kind, target: str, calls):
    """Make a client and run ``calls(client, decide)`` with it, where
    ``decide()`` asks for a small refund; sync or async alike."""
    if not asynchronous:
        with client_kind[0](target) as client:
            return calls(client, lambda: client.decide(**SMALL))
    # The async client runs on a loop of its own thread; the test drives it
    # from here, one call at a time, as the sync one.
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        client = client_kind[1](target)
        try:
            return calls(
                client,
                lambda: asyncio.run_coroutine_threadsafe(
                    client.decide(**SMALL), loop
                ).result(10),
            )
        finally:
            asyncio.run_coroutine_threadsafe(client.aclose(), loop).result(10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def stale_socket(path) -> None:
    """Leave a socket file at ``path`` that nobody listens on, as a daemon
    killed without cleanup does."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.close()


class Clock:
    """Stands in for the client module's ``time``: monotonic() is moved by
    the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def retry_clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(
        client_module, "time", types.SimpleNamespace(monotonic=fake.monotonic)
    )
    return fake  # fmt: skip


@pytest.fixture
def fast_dials(monkeypatch) -> list[str]:
    """The paths the blocking fast path dials, in order."""
    dialled: list[str] = []
    dial = _fast._Connection.open.__func__

    def counted(cls, route, deadline):
        dialled.append(route.path)
        return dial(cls, route, deadline)

    monkeypatch.setattr(_fast._Connection, "open", classmethod(counted))
    return dialled


@pytest.fixture
def real(start_daemon, socket_dir):
    """A real daemon with both agent sockets in a short directory."""
    return start_daemon(path=socket_dir)


# -- 1. the fast socket is the target's own -----------------------------------


def test_the_fast_socket_is_named_after_the_target():
    assert route("unix:///run/kynara/agent.sock", None).fast_socket == (
        "/run/kynara/agent.fast.sock"
    )
    assert route("unix:///run/x/y.sock", None).fast_socket == "/run/x/y.fast.sock"
    assert route("unix:rel/y.sock", "fast").fast_socket == "rel/y.fast.sock"
    assert fast_socket_for("/run/x/.sock") is None


def test_a_target_not_ending_in_sock_has_no_fast_path_guess():
    chosen = route("unix:///run/x/agent", None)

    assert (chosen.transport, chosen.fast_socket) == ("grpc", None)
    with pytest.raises(ValueError, match=r"give it as fast:///"):
        Client("unix:///run/x/agent", transport="fast")


def test_auto_is_answered_by_the_target_s_own_daemon(
    start_daemon, socket_dir, tmp_path
):
    # Two daemons share one directory: the shipped names (agent.sock,
    # agent.fast.sock) and y.sock / y.fast.sock. Asking y.sock must reach
    # the y daemon over its own fast socket, never agent.fast.sock's.
    start_daemon(path=socket_dir)
    other = start_daemon(
        f"agent.socket={socket_dir / 'y.sock'}",
        f"agent.fast_socket={socket_dir / 'y.fast.sock'}",
        path=tmp_path / "y",
    )

    with Client(f"unix://{socket_dir / 'y.sock'}") as client:
        answer = client.decide(**SMALL)
        transport = client.transport

    assert transport == "fast"
    assert read_record(other, answer.audit_sequence).decision_id == answer.decision_id


# -- 2. a stale fast socket ---------------------------------------------------


@pytest.fixture
def without_fast_path(start_daemon, socket_dir):
    """A real daemon serving gRPC only, with a stale agent.fast.sock beside
    its agent.sock."""
    running = start_daemon("agent.fast_socket=", path=socket_dir)
    stale_socket(socket_dir / "agent.fast.sock")
    return running


def test_auto_passes_a_stale_fast_socket_over_for_grpc(
    without_fast_path, socket_dir, retry_clock, fast_dials
):
    clock = retry_clock
    fast_socket = str(socket_dir / "agent.fast.sock")
    with Client(without_fast_path.target) as client:
        first = client.decide(**SMALL)
        clock.now += FAST_RETRY_SECONDS / 2
        second = client.decide(**SMALL)
        dials_within_a_second = len(fast_dials)
        clock.now += FAST_RETRY_SECONDS
        third = client.decide(**SMALL)
        dials_after = len(fast_dials)
        # The fast path comes up: the next try after a second takes it.
        (socket_dir / "agent.fast.sock").unlink()
        scripted = ScriptedFastDaemon(socket_dir / "agent.fast.sock").start()
        try:
            clock.now += FAST_RETRY_SECONDS
            fourth = client.decide(**SMALL)
            settled = client.transport
        finally:
            scripted.stop()

    assert [a.decision for a in (first, second, third)] == ["allow"] * 3
    assert fast_dials[0] == fast_socket
    assert (dials_within_a_second, dials_after) == (1, 2)
    assert fourth.decision_id == "dec-1"  # the scripted fast path answered
    assert settled == "fast"


def test_async_auto_passes_a_stale_fast_socket_over_for_grpc(without_fast_path):
    async def main():
        async with AsyncClient(without_fast_path.target) as client:
            return await client.decide(**SMALL), client.transport

    answer, transport = asyncio.run(main())

    assert answer.decision == "allow"
    assert transport == "auto"  # not settled: the fast path is tried again


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_explicit_fast_on_a_stale_socket_names_path_and_errno(
    without_fast_path, socket_dir, asynchronous
):
    target = without_fast_path.target

    async def ask_async():
        async with AsyncClient(target, transport="fast") as client:
            await client.decide(**SMALL)

    with pytest.raises(KynaraUnavailable) as caught:
        if asynchronous:
            asyncio.run(ask_async())
        else:
            with Client(target, transport="fast") as client:
                client.decide(**SMALL)

    message = str(caught.value)
    assert f"fast://{socket_dir / 'agent.fast.sock'}" in message
    assert "[Errno 111]" in message
    assert "nothing listens on it" in message


def test_auto_without_grpc_still_reports_the_refusal(
    without_fast_path, socket_dir, monkeypatch
):
    monkeypatch.setattr(client_module, "grpc_installed", lambda: False)

    with (
        Client(without_fast_path.target) as client,
        pytest.raises(KynaraUnavailable, match=r"\[Errno 111\]"),
    ):
        client.decide(**SMALL)


# -- 3. a call before the daemon is up ---------------------------------------


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_call_before_the_daemon_started_does_not_pin_grpc(
    start_daemon, socket_dir, asynchronous
):
    target = f"unix://{socket_dir / 'agent.sock'}"

    def calls(client, decide):
        with pytest.raises(KynaraUnavailable):
            decide()
        before = client.transport
        start_daemon(path=socket_dir)
        answer = decide()
        return before, answer, client.transport

    before, answer, after = run(asynchronous, (Client, AsyncClient), target, calls)

    assert before == "auto"
    assert answer.decision == "allow"
    assert after == "fast"


def test_grpc_settles_where_there_is_no_fast_socket(start_daemon, socket_dir):
    running = start_daemon("agent.fast_socket=", path=socket_dir)

    with Client(running.target) as client:
        client.decide(**SMALL)
        transport = client.transport

    assert transport == "grpc"


# -- 5. the async gRPC client across event loops -------------------------------


def test_async_grpc_across_loops_logs_nothing_for_calls_left_running(real, caplog):
    # A wait left running when asyncio.run ends is cancelled there; its
    # channel must not later hand an end to the closed loop ("Event loop is
    # closed", logged by whichever loop ran next).
    client = AsyncClient(real.target, transport="grpc")

    async def leave_a_wait_running(index: int) -> None:
        asked = await client.decide(
            **REFUND, user="alice", resource_id=f"L{index}",
            attributes={"amount": 60_000},
        )  # fmt: skip
        asyncio.ensure_future(client.wait_approval(asked.approval.id, 30))
        await asyncio.sleep(0.02)

    with caplog.at_level(logging.ERROR):
        for index in range(5):
            asyncio.run(leave_a_wait_running(index))
        last = asyncio.run(client.decide(**SMALL))
        asyncio.run(client.aclose())
    for thread in threading.enumerate():
        if thread.name == "kynara-wait":
            thread.join(5)

    assert last.decision == "allow"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert not [t for t in threading.enumerate() if t.name == "kynara-wait"]


# -- 6. what the fast path says about a peer that is not one ------------------


class RawPeer:
    """A Unix socket server on its own thread that answers the hello as
    told, then, to the first request, sends ``after_request`` bytes."""

    def __init__(self, path, hello: bytes, after_request: bytes = b"") -> None:
        self.path = path
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen()
        self._hello = hello
        self._after = after_request
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self._listener.accept()
        with conn:
            conn.recv(65536)  # the hello
            conn.sendall(self._hello)
            if self._after:
                conn.recv(65536)  # the request
                conn.sendall(self._after)
            conn.recv(65536)  # until the client hangs up

    def close(self) -> None:
        self._listener.close()
        self._thread.join(5)


def frame(stream: int, payload: dict) -> bytes:
    body = msgspec.msgpack.encode(payload)
    return struct.pack(">II", len(body), stream) + body


HELLO_OK = frame(0, {"ok": {"version": 1, "max_message_bytes": 65536}})


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_an_answer_frame_too_long_is_refused_naming_the_socket(
    socket_dir, asynchronous
):
    path = socket_dir / "garbage.sock"
    peer = RawPeer(path, HELLO_OK, struct.pack(">II", 2**32 - 1, 1) + b"x" * 64)

    async def ask_async():
        async with AsyncClient(f"fast://{path}", timeout=30) as client:
            await client.decide(**SMALL)

    try:
        with pytest.raises(KynaraError) as caught:
            if asynchronous:
                asyncio.run(ask_async())
            else:
                with Client(f"fast://{path}", timeout=30) as client:
                    client.decide(**SMALL)
    finally:
        peer.close()

    assert caught.value.code == kynara_sdk.INTERNAL
    assert f"fast://{path}" in str(caught.value)
    assert f"a frame of {2**32 - 1} bytes" in str(caught.value)


def test_a_hello_answer_too_long_is_a_protocol_mismatch(socket_dir):
    path = socket_dir / "garbage.sock"
    peer = RawPeer(path, struct.pack(">II", 2**31, 0))
    try:
        with Client(f"fast://{path}", timeout=30) as client:
            with pytest.raises(KynaraUnavailable) as caught:
                client.decide(**SMALL)
    finally:
        peer.close()

    assert "protocol mismatch" in str(caught.value)
    assert f"fast://{path}" in str(caught.value)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_fast_at_a_grpc_socket_says_so(real, asynchronous):
    target = f"fast://{real.socket}"

    async def ask_async():
        async with AsyncClient(target) as client:
            await client.decide(**SMALL)

    with pytest.raises(KynaraUnavailable) as caught:
        if asynchronous:
            asyncio.run(ask_async())
        else:
            with Client(target) as client:
                client.decide(**SMALL)

    message = str(caught.value)
    assert "HTTP/2: a gRPC socket?" in message
    assert "protocol mismatch" in message


def test_fast_at_a_directory_says_so(socket_dir):
    with Client(f"fast://{socket_dir}", transport="fast") as client:
        with pytest.raises(KynaraUnavailable) as caught:
            client.decide(**SMALL)

    assert f"fast://{socket_dir}" in str(caught.value)
    assert "is a directory, not a daemon's fast socket" in str(caught.value)


def test_the_transport_in_the_environment_is_case_insensitive(monkeypatch):
    monkeypatch.setenv(kynara_sdk.TRANSPORT_ENV, " GRPC ")

    assert route("unix:///run/kynara/agent.sock", None).transport == "grpc"
