"""The SDK's two transports: the fast path and gRPC give the same answers,
errors and deadlines against a real daemon; the fast path pipelines,
cancels and reconnects; the transport rule picks as documented."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import datetime
import time

import kynara_sdk
import pytest
from fast_scripted import DROP, HOLD, ScriptedFastDaemon, decision
from kynara_sdk import (
    AsyncClient,
    Client,
    KynaraError,
    KynaraUnavailable,
    UInt64,
    _fast,
)
from kynara_sdk import client as client_module
from kynara_sdk._target import FAST_SOCKET_NAME, route

from kynara_sidecar.approvals.model import Reviewer, Verdict

TRANSPORTS = ["fast", "grpc"]
CAROL = Reviewer(id="carol", roles=frozenset({"reviewer"}))
REFUND = {"action": "payments.refund.issue", "resource_kind": "payments.refund"}


@pytest.fixture
def real(start_daemon, socket_dir):
    """A real daemon with both agent sockets in a short directory."""
    return start_daemon(path=socket_dir)


def ask(client: Client, **overrides):
    return client.decide(**{**REFUND, "user": "alice", **overrides})


def comparable(answer: kynara_sdk.Decision) -> kynara_sdk.Decision:
    # What differs between two decisions of the same request: which one it
    # was (id, place in the log).
    return dataclasses.replace(answer, decision_id="", audit_sequence=0, record_hash="")


# -- the rule -------------------------------------------------------------


def test_a_unix_target_has_the_fast_socket_beside_it():
    chosen = route("unix:///run/kynara/agent.sock", None)

    assert chosen.transport == "auto"
    assert chosen.fast_socket == f"/run/kynara/{FAST_SOCKET_NAME}"
    assert chosen.grpc_target == "unix:///run/kynara/agent.sock"


def test_a_fast_target_is_the_fast_path_only():
    chosen = route("fast:///srv/k/agent.fast.sock", None)

    assert (chosen.transport, chosen.fast_socket, chosen.grpc_target) == (
        "fast",
        "/srv/k/agent.fast.sock",
        None,
    )
    with pytest.raises(ValueError, match="grpc cannot speak to the fast path"):
        route("fast:///srv/k/agent.fast.sock", "grpc")


def test_a_tcp_target_is_grpc_only():
    assert route("127.0.0.1:50151", None).transport == "grpc"
    with pytest.raises(ValueError, match="TCP targets are gRPC only"):
        Client("127.0.0.1:50151", transport="fast")


def test_an_unknown_transport_in_the_environment_is_named(monkeypatch):
    monkeypatch.setenv(kynara_sdk.TRANSPORT_ENV, "quic")

    with pytest.raises(ValueError, match=r"\$KYNARA_TRANSPORT: expected one of"):
        Client("unix:///run/kynara/agent.sock")


def test_auto_takes_the_fast_path_when_its_socket_exists(real):
    with Client(real.target) as client:
        assert client.transport == "auto"
        answer = ask(client, attributes={"amount": 1200})
        assert client.transport == "fast"

    assert answer.decision == "allow"


def test_the_environment_can_insist_on_grpc(real, monkeypatch):
    monkeypatch.setenv(kynara_sdk.TRANSPORT_ENV, "grpc")

    with Client(real.target) as client:
        ask(client, attributes={"amount": 1200})
        assert client.transport == "grpc"


def test_auto_without_fast_socket_nor_grpc_names_both(socket_dir, monkeypatch):
    monkeypatch.setattr(client_module, "grpc_installed", lambda: False)
    target = f"unix://{socket_dir / 'agent.sock'}"

    with Client(target) as client, pytest.raises(KynaraUnavailable) as caught:
        ask(client)

    message = str(caught.value)
    assert str(socket_dir / FAST_SOCKET_NAME) in message
    assert "pip install 'kynara-sdk[grpc]'" in message
    assert caught.value.code == kynara_sdk.DAEMON_UNREACHABLE


# -- parity against a real daemon -------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        {"attributes": {"amount": 1200}, "request_id": "small"},
        {"attributes": {"amount": 250_000}},
        {"attributes": {"amount": 1200}, "context": {"region": "Kp"}},
        {"user": "mallory", "attributes": {"amount": 5}},
        {
            "attributes": {"amount": UInt64(70)},
            "context": {
                "when": datetime.datetime(2026, 12, 7, 9, tzinfo=datetime.UTC),
                "hold": datetime.timedelta(seconds=-1, microseconds=5),
                "tags": ["a", b"\x00", 1.5, True, {"n": 2**63}],
            },
        },
    ],
    ids=["allow", "require_approval", "deny", "unknown_principal", "every_value"],
)
def test_both_transports_give_the_same_decision(real, call):
    with Client(real.target, transport="fast") as fast:
        by_fast = ask(fast, **call)
    with Client(real.target, transport="grpc") as grpc_client:
        by_grpc = ask(grpc_client, **call)

    assert comparable(by_fast) == comparable(by_grpc)
    assert by_fast.audit_sequence < by_grpc.audit_sequence


@pytest.mark.parametrize(
    ("overrides", "call", "code", "field"),
    [
        (
            (),
            {"resource_kind": "payments..refund"},
            "invalid_request",
            "resource.kind",
        ),
        (
            (),
            {"user": None, "token": "a.b.c"},
            "identity_invalid",
            "delegation_token",
        ),
        (
            ("agent.max_message_bytes=2048",),
            {"context": {"blob": "x" * 4096}},
            "request_too_large",
            None,
        ),
    ],
    ids=["invalid_request", "identity_invalid", "request_too_large"],
)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_both_transports_give_the_same_error_code(
    start_daemon, socket_dir, transport, overrides, call, code, field
):
    running = start_daemon(*overrides, path=socket_dir)

    with Client(running.target, transport=transport) as client:
        with pytest.raises(KynaraError) as caught:
            ask(client, **call)
        after = ask(client, attributes={"amount": 1200})

    assert type(caught.value) is KynaraError
    assert caught.value.code == code
    if field is not None:
        assert caught.value.field == field
    assert after.decision == "allow"  # the connection goes on


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_stalled_daemon_is_unreachable_on_both(real, transport):
    with Client(real.target, transport=transport, timeout=0.3) as client:
        ask(client, attributes={"amount": 1200})  # connected
        real.loop.call_soon_threadsafe(time.sleep, 1.0)
        with pytest.raises(KynaraUnavailable) as caught:
            ask(client, attributes={"amount": 1200})
        time.sleep(1.0)
        again = ask(client, attributes={"amount": 1200})

    assert caught.value.code == kynara_sdk.DAEMON_UNREACHABLE
    assert again.decision == "allow"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_no_daemon_is_unreachable_on_both(socket_dir, transport):
    target = f"unix://{socket_dir / 'agent.sock'}"

    with Client(target, transport=transport, timeout=0.5) as client:
        with pytest.raises(KynaraUnavailable) as caught:
            ask(client)

    assert caught.value.code == kynara_sdk.DAEMON_UNREACHABLE


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_decide_batch_answers_each_item_alike(real, transport):
    with Client(real.target, transport=transport) as client:
        answers = client.decide_batch(
            [
                {**REFUND, "user": "alice", "attributes": {"amount": 1200}},
                {**REFUND, "user": "alice", "resource_kind": "payments..refund"},
                kynara_sdk.DecisionRequest(**REFUND, user="bob", attributes={}),
            ]
        )

    assert answers[0].decision == "allow"
    assert isinstance(answers[1], KynaraError)
    assert (answers[1].code, answers[1].field) == (
        "invalid_request",
        "items[1].resource.kind",
    )
    assert isinstance(answers[2], kynara_sdk.Decision)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_wait_ends_approved_and_the_grant_allows_once(real, transport):
    with Client(real.target, transport=transport) as client:
        asked = ask(client, resource_id="R7", attributes={"amount": 60_000})
        approval_id = asked.approval.id
        book = real.daemon.pipeline.approvals
        timer = threading_timer(
            0.2, lambda: real.call(book.review(approval_id, CAROL, Verdict.APPROVE, ""))
        )
        update = client.wait_approval(approval_id, 10)
        timer.join()
        used = ask(
            client,
            resource_id="R7",
            attributes={"amount": 60_000},
            approval_id=approval_id,
        )

    assert asked.decision == "require_approval"
    assert update.state == "approved"
    assert update.approval_id == approval_id
    assert used.decision == "allow"
    assert used.reason_code == "approval_granted"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_wait_that_times_out_or_names_nothing_fails_alike(real, transport):
    with Client(real.target, transport=transport) as client:
        asked = ask(client, resource_id="R8", attributes={"amount": 60_000})
        with pytest.raises(kynara_sdk.ApprovalTimeout) as timed_out:
            client.wait_approval(asked.approval.id, 0.3)
        with pytest.raises(kynara_sdk.ApprovalError) as missing:
            client.wait_approval("apr_nothing", 2)

    assert timed_out.value.update.state == "pending"
    assert missing.value.code == "not_found"
    assert missing.value.approval_id == "apr_nothing"


def threading_timer(delay: float, action):
    import threading

    timer = threading.Timer(delay, action)
    timer.start()
    return timer


# -- the fast path: pipelining, cancel, reconnect ---------------------------


# Who asks in the pipelining tests: alice is allowed small refunds, mallory
# is not in the directory (deny).
ASKERS = [("mallory" if index % 3 == 0 else "alice", index) for index in range(200)]
EXPECTED = [
    (f"t{index}", "deny" if user == "mallory" else "allow") for user, index in ASKERS
]


def test_many_tasks_share_one_connection_and_get_their_own_answers(real):
    async def main():
        async with AsyncClient(real.target, transport="fast") as client:
            answers = await asyncio.gather(
                *(
                    client.decide(
                        **REFUND,
                        user=user,
                        attributes={"amount": index},
                        request_id=f"t{index}",
                    )
                    for user, index in ASKERS
                )
            )
            return answers, client._impl._conn

    answers, conn = asyncio.run(main())

    assert [(a.request_id, a.decision) for a in answers] == EXPECTED
    assert conn is not None


def test_threads_share_one_sync_client(real, monkeypatch):
    dialled = []
    dial = _fast._Connection.open
    monkeypatch.setattr(
        _fast._Connection,
        "open",
        classmethod(lambda cls, *args: dialled.append(1) or dial(*args)),
    )
    with Client(real.target, transport="fast") as client:

        def one(asker: tuple[str, int]) -> tuple[str, str]:
            user, index = asker
            answer = ask(
                client, user=user, attributes={"amount": index}, request_id=f"t{index}"
            )
            return answer.request_id, answer.decision

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, ASKERS))

    assert results == EXPECTED
    assert dialled == [1]


def test_answers_out_of_order_reach_their_callers(socket_dir):
    scripted = ScriptedFastDaemon(socket_dir / "s.sock").start()
    scripted.on_request = lambda stream, message: HOLD
    try:

        async def main():
            async with AsyncClient(scripted.target) as client:
                calls = [
                    asyncio.ensure_future(client.decide(**REFUND, request_id=f"q{i}"))
                    for i in range(3)
                ]
                while len(scripted.held()) < 3:
                    await asyncio.sleep(0.01)
                first, second, third = scripted.held()
                scripted.release(
                    {
                        third: decision("deny", request_id="q2"),
                        first: decision("allow", request_id="q0"),
                        second: {"error": {"code": "brand_new", "message": "?"}},
                    }
                )
                return await asyncio.gather(*calls, return_exceptions=True)

        results = asyncio.run(main())
    finally:
        scripted.stop()

    assert (results[0].decision, results[0].request_id) == ("allow", "q0")
    assert type(results[1]) is KynaraError and results[1].code == "brand_new"
    assert (results[2].decision, results[2].request_id) == ("deny", "q2")


def test_a_cancelled_async_call_sends_cancel_on_its_stream(socket_dir):
    scripted = ScriptedFastDaemon(socket_dir / "s.sock").start()
    scripted.on_request = lambda stream, message: (
        HOLD
        if message["op"] == "decide"
        else {"ok": {"items": [{"decision": decision()["ok"]}]}}
    )
    try:

        async def main():
            async with AsyncClient(scripted.target) as client:
                call = asyncio.ensure_future(client.decide(**REFUND))
                while not scripted.held():
                    await asyncio.sleep(0.01)
                call.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await call
                await client.decide_batch([REFUND])  # the connection goes on
                await asyncio.sleep(0.05)

        asyncio.run(main())
    finally:
        scripted.stop()

    held = scripted.frames[0][0]
    assert scripted.ops()[:2] == [(held, "decide"), (held, "cancel")]
    assert scripted.ops()[2][1] == "decide_batch"


def test_a_deadline_sends_cancel_and_says_daemon_unreachable(socket_dir):
    scripted = ScriptedFastDaemon(socket_dir / "s.sock").start()
    scripted.on_request = lambda stream, message: HOLD
    try:
        with Client(scripted.target, timeout=0.2) as client:
            with pytest.raises(KynaraUnavailable):
                client.decide(**REFUND)
            deadline = time.monotonic() + 5
            while len(scripted.frames) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
    finally:
        scripted.stop()

    (stream, sent), (cancelled, cancel) = scripted.frames
    assert sent["op"] == "decide"
    assert 0 < sent["timeout_ms"] <= 200
    assert (cancelled, cancel["op"]) == (stream, "cancel")


def test_a_dropped_connection_fails_the_call_and_the_next_reconnects(socket_dir):
    scripted = ScriptedFastDaemon(socket_dir / "s.sock").start()
    drops = [True]
    scripted.on_request = lambda stream, message: DROP if drops.pop() else decision()
    drops.insert(0, False)
    try:
        with Client(scripted.target) as client:
            with pytest.raises(KynaraUnavailable) as caught:
                client.decide(**REFUND)
            answer = client.decide(**REFUND)
    finally:
        scripted.stop()

    assert caught.value.code == kynara_sdk.DAEMON_UNREACHABLE
    assert answer.decision == "allow"
    assert scripted.connections == 2


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_the_client_reconnects_after_the_daemon_restarts(
    start_daemon, socket_dir, asynchronous
):
    first = start_daemon(path=socket_dir)

    async def twice(client: AsyncClient):
        before = await client.decide(**REFUND, user="alice", attributes={"amount": 1})
        first.stop()
        start_daemon(path=socket_dir)
        await asyncio.sleep(0.05)  # a running loop sees the old connection end
        after = await client.decide(**REFUND, user="alice", attributes={"amount": 1})
        return before, after

    if asynchronous:

        async def main():
            async with AsyncClient(first.target, transport="fast") as client:
                return await twice(client)

        before, after = asyncio.run(main())
    else:
        with Client(first.target, transport="fast") as client:
            before = ask(client, attributes={"amount": 1})
            first.stop()
            start_daemon(path=socket_dir)
            after = ask(client, attributes={"amount": 1})

    assert before.decision == after.decision == "allow"
    assert after.audit_sequence > before.audit_sequence


def test_the_hello_carries_the_agent_secret(socket_dir, tmp_path):
    scripted = ScriptedFastDaemon(socket_dir / "s.sock").start()
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    try:
        with Client(scripted.target, secret_file=str(secret)) as client:
            client.decide(**REFUND)
    finally:
        scripted.stop()

    assert scripted.hellos == [
        {"op": "hello", "versions": [1], "authorization": "Bearer s3cret"}
    ]


def test_a_forgotten_async_client_leaves_no_socket_open(real, monkeypatch):
    async def use():
        client = kynara_sdk.decorator.default_async_client()
        await client.decide(**REFUND, user="alice", attributes={"amount": 1})
        return client

    monkeypatch.setenv(kynara_sdk.TARGET_ENV, real.target)
    client = asyncio.run(use())
    conn = client._impl._conn
    kynara_sdk.close_default_clients()

    assert conn.sock.fileno() == -1
