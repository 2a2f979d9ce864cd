"""The new-approval webhook against a real aiohttp server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging

import msgspec
import pytest
from aiohttp import web
from service_support import make_approval
from support import free_port

from kynara_sidecar.approvals.model import ApprovalState, Review, Verdict
from kynara_sidecar.approvals.webhook import (
    SIGNATURE_HEADER,
    ApprovalWebhook,
    summary_of,
)
from kynara_sidecar.config import WebhookConfig
from kynara_sidecar.metrics import Metrics

SECRET = b"webhook-secret-0123456789abcdef"


class Receiver:
    """An HTTP endpoint answering a scripted status per post (then 200)."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.posts: list[tuple[bytes, dict[str, str]]] = []
        self.seen = asyncio.Event()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.posts.append((await request.read(), dict(request.headers)))
        self.seen.set()
        status = self.statuses.pop(0) if self.statuses else 200
        return web.Response(status=status)

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/hook"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


def webhook(url: str, metrics: Metrics, attempts: int = 5, **kw) -> ApprovalWebhook:
    config = WebhookConfig(url=url, attempts=attempts, timeout_seconds=5)
    return ApprovalWebhook(
        config,
        metrics,
        retry_min_seconds=0.001,
        retry_max_seconds=0.01,
        draw=lambda: 0.5,
        **kw,
    )


def delivered(metrics: Metrics, outcome: str) -> float:
    return metrics.approval_webhook_deliveries.labels(outcome)._value.get()


def test_a_failing_endpoint_is_retried_until_it_takes_the_summary():
    metrics = Metrics()
    approval = make_approval(7, risk=72)

    async def run() -> Receiver:
        async with Receiver(503, 500) as receiver:
            hook = webhook(receiver.url, metrics, secret=SECRET)
            await hook.start()
            hook.notify(approval)
            await hook.drain()
            await hook.close()
        return receiver

    with recorded_lines() as lines:
        receiver = asyncio.run(run())

    assert len(receiver.posts) == 3
    about = [r.fields for r in lines if "approval webhook" in r.getMessage()]
    assert len(about) == 3  # two failed attempts, one delivery
    assert all(f["decision_id"] == approval.decision_id for f in about)
    body, headers = receiver.posts[-1]
    assert json.loads(body) == {
        "event": "approval_requested",
        "id": approval.id,
        "url": approval.url,
        "daemon_id": "support-bot@test",
        "agent_id": "support-bot",
        "user_id": "alice",
        "action": "payments.refund.issue",
        "resource_kind": "payments.refund",
        "resource_id": "rf_7",
        "risk_score": 72,
        "expires_at": approval.expires_at,
    }
    assert b" " not in body  # compact
    expected = hmac.new(SECRET, body, hashlib.sha256).hexdigest()
    assert headers[SIGNATURE_HEADER] == f"sha256={expected}"
    assert delivered(metrics, "delivered") == 1
    assert metrics.approval_webhook_failed_attempts._value.get() == 2


def test_the_summary_holds_no_attributes_or_context():
    approval = make_approval(1)

    body = msgspec.json.decode(msgspec.json.encode(summary_of(approval)))

    assert "attributes" not in body and "context" not in body
    assert "60001" not in json.dumps(body)


def test_after_the_last_attempt_the_summary_is_dropped_and_counted():
    metrics = Metrics()

    async def run() -> Receiver:
        async with Receiver(503, 503, 503, 503) as receiver:
            hook = webhook(receiver.url, metrics, attempts=3)
            await hook.start()
            hook.notify(make_approval(1))
            await hook.drain()
            await hook.close()
        return receiver

    receiver = asyncio.run(run())

    assert len(receiver.posts) == 3
    assert delivered(metrics, "failed") == 1
    assert delivered(metrics, "delivered") == 0


def test_an_endpoint_refusing_the_body_is_not_retried():
    metrics = Metrics()

    async def run() -> Receiver:
        async with Receiver(400) as receiver:
            hook = webhook(receiver.url, metrics)
            await hook.start()
            hook.notify(make_approval(1))
            await hook.drain()
            await hook.close()
        return receiver

    receiver = asyncio.run(run())

    assert len(receiver.posts) == 1
    assert delivered(metrics, "failed") == 1


def test_an_endpoint_nobody_listens_on_is_retried_then_given_up():
    metrics = Metrics()

    async def run() -> None:
        hook = webhook(f"http://127.0.0.1:{free_port()}/hook", metrics, attempts=2)
        await hook.start()
        hook.notify(make_approval(1))
        await hook.drain()
        await hook.close()

    asyncio.run(run())

    assert metrics.approval_webhook_failed_attempts._value.get() == 2
    assert delivered(metrics, "failed") == 1


def test_only_new_approvals_are_posted_and_each_once():
    metrics = Metrics()
    new = make_approval(1)
    reviewed = make_approval(2)
    vote = Review("carol", ("reviewer",), Verdict.APPROVE, "2026-12-07T09:00:00Z")
    reviewed = msgspec.structs.replace(reviewed, reviews=(vote,))
    approved = make_approval(3, state=ApprovalState.APPROVED)

    async def run() -> Receiver:
        async with Receiver() as receiver:
            hook = webhook(receiver.url, metrics, secret=None)
            await hook.start()
            for approval in (new, reviewed, approved, new):
                hook.notify(approval)
            await hook.drain()
            await hook.close()
        return receiver

    receiver = asyncio.run(run())

    assert [json.loads(body)["id"] for body, _ in receiver.posts] == [new.id]
    assert SIGNATURE_HEADER not in receiver.posts[0][1]


def test_a_full_queue_drops_without_blocking_and_close_drops_the_rest():
    metrics = Metrics()

    async def run() -> int:
        async with Receiver() as receiver:
            hook = webhook(receiver.url, metrics, queue_size=2)
            await hook.start()
            # No await between the notifies: the workers cannot take any yet.
            for number in range(1, 6):
                hook.notify(make_approval(number))
            await hook.close()
            return len(receiver.posts)

    with recorded_lines() as lines:
        posted = asyncio.run(run())

    assert posted == 0
    # Three found the queue full; two were queued and dropped at close.
    assert delivered(metrics, "dropped") == 5
    dropped = [r.fields for r in lines if r.getMessage() == "approval webhook dropped"]
    assert sorted((f["approval_id"], f["decision_id"]) for f in dropped) == sorted(
        (make_approval(n).id, f"dec-{n}") for n in range(1, 6)
    )


@contextlib.contextmanager
def recorded_lines():
    """The records the ``kynara`` loggers emit meanwhile (whether or not a
    test before configured them not to propagate)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("kynara")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_notify_from_another_thread_reaches_the_loop():
    metrics = Metrics()

    async def run() -> Receiver:
        async with Receiver() as receiver:
            hook = webhook(receiver.url, metrics)
            await hook.start()
            await asyncio.to_thread(hook.notify, make_approval(1))
            await receiver.seen.wait()
            await hook.drain()
            await hook.close()
        return receiver

    assert len(asyncio.run(run()).posts) == 1
    assert delivered(metrics, "delivered") == 1


def test_from_config_reads_the_secret_and_needs_a_url(tmp_path):
    secret = tmp_path / "hook.secret"
    secret.write_bytes(SECRET + b"\n")

    assert ApprovalWebhook.from_config(WebhookConfig(), Metrics()) is None
    hook = ApprovalWebhook.from_config(
        WebhookConfig(url="http://127.0.0.1:9/hook", secret_file=str(secret)),
        Metrics(),
    )
    assert hook is not None and hook._secret == SECRET


@pytest.mark.parametrize("url", ["", "ftp://x"])
def test_the_config_refuses_a_url_that_is_no_http_url(url):
    from kynara_sidecar.errors import ConfigError

    if url:
        with pytest.raises(ConfigError, match="approvals.webhook.url"):
            WebhookConfig(url=url).validate("approvals.webhook")
    else:
        with pytest.raises(ConfigError, match="approvals.webhook.url"):
            ApprovalWebhook(WebhookConfig(), Metrics())


def test_a_daemon_posts_each_new_approval_once(start_daemon, tmp_path):
    import threading

    from support import small_refund

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def on_loop(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(30)

    receiver = on_loop(Receiver(503).__aenter__())
    secret = tmp_path / "hook.secret"
    secret.write_bytes(SECRET)
    try:
        running = start_daemon(
            f"approvals.webhook.url={receiver.url}",
            f"approvals.webhook.secret_file={secret}",
        )
        request = small_refund()
        request.resource.attributes["amount"].int_value = 60000
        asked = running.stub().Decide(request)
        running.stub().Decide(request)  # the same request: the same approval
        running.call(running.daemon._webhook.drain())
        metrics = running.daemon.metrics
    finally:
        on_loop(receiver.__aexit__(None, None, None))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()

    assert [json.loads(body)["id"] for body, _ in receiver.posts] == [
        asked.approval.id,
        asked.approval.id,
    ]  # one failed attempt, one delivery
    assert json.loads(receiver.posts[-1][0])["url"] == asked.approval.url
    assert delivered(metrics, "delivered") == 1


def test_at_start_every_approval_still_waiting_is_announced():
    from service_support import CREATED, MemoryInbox

    metrics = Metrics()
    # More than a page of the inbox (50), so announcing pages through it.
    waiting = [make_approval(n) for n in range(1, 61)]
    rejected = make_approval(61, state=ApprovalState.REJECTED)
    reviewed = msgspec.structs.replace(
        make_approval(62),
        reviews=(Review("carol", (), Verdict.APPROVE, "2026-12-07T09:01:00Z"),),
    )
    past_expiry = msgspec.structs.replace(
        make_approval(63), expires_at="2026-12-07T08:00:00Z"
    )
    inbox = MemoryInbox(*waiting, rejected, reviewed, past_expiry)
    now_ns = int(CREATED.timestamp()) * 1_000_000_000

    async def run() -> tuple[Receiver, int, int]:
        async with Receiver() as receiver:
            hook = webhook(receiver.url, metrics)
            await hook.start()
            queued = hook.announce_pending(inbox, now_ns)
            again = hook.announce_pending(inbox, now_ns)
            await hook.drain()
            await hook.close()
        return receiver, queued, again

    receiver, queued, again = asyncio.run(run())

    announced = sorted(json.loads(body)["id"] for body, _ in receiver.posts)
    assert announced == sorted(a.id for a in waiting)
    assert (queued, again) == (60, 0)  # each once within a run
    assert delivered(metrics, "delivered") == 60


def test_a_restarted_daemon_announces_what_it_never_delivered(start_daemon, tmp_path):
    import threading

    from support import small_refund

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def on_loop(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(30)

    receiver = on_loop(Receiver().__aenter__())
    nobody = f"http://127.0.0.1:{free_port()}/hook"
    try:
        first = start_daemon(
            f"approvals.webhook.url={nobody}", "approvals.webhook.attempts=1"
        )
        asked = []
        for amount in (60000, 70000):
            request = small_refund()
            request.resource.attributes["amount"].int_value = amount
            asked.append(first.stub().Decide(request).approval.id)
        first.stop()
        lost = delivered(first.daemon.metrics, "delivered")

        second = start_daemon(f"approvals.webhook.url={receiver.url}")
        second.call(second.daemon._webhook.drain())
    finally:
        on_loop(receiver.__aexit__(None, None, None))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()

    assert lost == 0
    assert sorted(json.loads(body)["id"] for body, _ in receiver.posts) == sorted(asked)
