"""Tell a chat room or a ticket queue about each new approval.

When ``approvals.webhook.url`` is set, every new approval is posted there as
one compact JSON object::

    {"event": "approval_requested", "id": "apr_...", "url": "https://...",
     "daemon_id": "...", "agent_id": "support-bot", "user_id": "alice",
     "action": "payments.refund.issue", "resource_kind": "payments.refund",
     "resource_id": "rf_1", "risk_score": 72,
     "expires_at": "2026-12-07T10:00:00Z"}

It holds no request attributes or context: whoever reads the hook follows
the URL to the review page, which asks them to sign in.

Theory of operation. The book calls ``notify`` after an approval's creation
has committed; ``notify`` only puts the summary on a bounded queue and
returns, so a slow or dead endpoint never delays a decision. A few workers
post from the queue with aiohttp. A post that fails (no connection, a
timeout, a 5xx, 408 or 429) is tried again after a backoff
(``sync.retry_delay``: doubling, with jitter) up to
``approvals.webhook.attempts`` times; any other 4xx is the endpoint refusing
the body and is not retried. A summary that cannot be delivered, or finds
the queue full, is dropped: logged and counted
(``kynara_approval_webhook_deliveries{outcome}``). The approval itself
never depends on the hook.

Restarts. The queue lives in memory: summaries still queued when the daemon
stops are dropped with it (counted, ``outcome="dropped"``). So at start the
daemon announces again every approval that is still pending, unreviewed and
not past its expiry (``announce_pending``), whether or not its summary was
delivered before the restart. A receiver may therefore see one approval
twice; the summary's ``id`` is the approval's, so a receiver that keys on it
is idempotent. NOTE: marking each delivered summary in LMDB would spare the
duplicate, but costs a write per delivery and a state the audit log does
not need; an approval is announced so that a person looks at it, and a
second message about one still waiting does no harm.

With ``approvals.webhook.secret_file`` each post carries
``kynara-signature: sha256=<hex HMAC-SHA256 of the body>`` so the receiver
can tell the daemon's posts from anyone else's.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import hmac
import logging
import pathlib
import random
import typing
from collections.abc import Callable

import aiohttp
import msgspec

from kynara_sidecar.approvals.model import (
    Approval,
    ApprovalState,
    Inbox,
    InboxQuery,
    nanos_of,
)
from kynara_sidecar.config import WebhookConfig
from kynara_sidecar.errors import ConfigError
from kynara_sidecar.metrics import Metrics
from kynara_sidecar.sync import retry_delay

__all__ = [
    "DEFAULT_QUEUE_SIZE",
    "SIGNATURE_HEADER",
    "ApprovalWebhook",
    "WebhookSummaryV1",
    "sign",
    "summary_of",
]

SIGNATURE_HEADER = "kynara-signature"
# Summaries are a few hundred bytes; a thousand waiting is an endpoint down
# for a while under a burst of approvals, and bounds the memory it can take.
DEFAULT_QUEUE_SIZE = 1000
# Posts in flight at once: enough that one slow retry does not hold up the
# rest, few enough not to flood a struggling endpoint.
WORKERS = 2
# Backoff between attempts: from a second, doubling, to half a minute.
DEFAULT_RETRY_MIN_SECONDS = 1.0
DEFAULT_RETRY_MAX_SECONDS = 30.0
# The same approval notified twice (a subscriber called again after a
# restart, say) is posted once; remembering this many ids covers that.
RECENT_IDS = 4096
# 408 Request Timeout and 429 Too Many Requests ask to try again later.
RETRY_STATUSES = frozenset({408, 429})

log = logging.getLogger("kynara.approvals")


class WebhookSummaryV1(msgspec.Struct, frozen=True, kw_only=True):
    """What a webhook receives about a new approval."""

    event: str = "approval_requested"
    id: str
    url: str
    daemon_id: str
    agent_id: str
    user_id: str
    action: str
    resource_kind: str
    resource_id: str
    risk_score: int
    expires_at: str


class _Queued(typing.NamedTuple):
    """A summary waiting to be posted, with the decision its approval holds
    (for the log lines about it; the summary does not carry it)."""

    summary: WebhookSummaryV1
    decision_id: str


def summary_of(approval: Approval) -> WebhookSummaryV1:
    """The summary posted for ``approval``."""
    return WebhookSummaryV1(
        id=approval.id,
        url=approval.url,
        daemon_id=approval.daemon_id,
        agent_id=approval.agent_id,
        user_id=approval.user_id,
        action=approval.action,
        resource_kind=approval.resource_kind,
        resource_id=approval.resource_id,
        risk_score=approval.risk.score,
        expires_at=approval.expires_at,
    )


def sign(secret: bytes, body: bytes) -> str:
    """The ``kynara-signature`` header value for ``body``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def _expires_ns(approval: Approval) -> int:
    # RFC 3339 as the book writes it; one that does not parse has no known
    # expiry and is announced (the book's expiry task decides, not the hook).
    try:
        return nanos_of(approval.expires_at)
    except ValueError:
        return 2**63


class _Refused(Exception):
    """The endpoint answered with a status not worth trying again."""


class ApprovalWebhook:
    """Posts a summary of each new approval to ``approvals.webhook.url``.

    Args:
        config: the webhook settings; ``url`` must be set.
        metrics: where deliveries are counted.
        secret: the HMAC key, or None to post unsigned.
        queue_size: summaries waiting at most; more are dropped.
        retry_min_seconds, retry_max_seconds: the backoff's bounds.
        draw: uniform in [0, 1), for the backoff's jitter.

    Call ``start`` on the event loop before ``notify``, ``close`` at stop.
    """

    def __init__(
        self,
        config: WebhookConfig,
        metrics: Metrics,
        *,
        secret: bytes | None = None,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        retry_min_seconds: float = DEFAULT_RETRY_MIN_SECONDS,
        retry_max_seconds: float = DEFAULT_RETRY_MAX_SECONDS,
        draw: Callable[[], float] = random.random,
    ):
        if not config.url:
            raise ConfigError("approvals.webhook.url: expected a URL, got none")
        self._config = config
        self._metrics = metrics
        self._secret = secret
        self._retry = (retry_min_seconds, retry_max_seconds)
        self._draw = draw
        self._queue: asyncio.Queue[_Queued] = asyncio.Queue(queue_size)
        self._recent: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: aiohttp.ClientSession | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._closed = False

    @classmethod
    def from_config(
        cls, config: WebhookConfig, metrics: Metrics
    ) -> ApprovalWebhook | None:
        """The webhook ``config`` describes, or None when it has no URL.

        Raises:
            ConfigError: the secret file cannot be read.
        """
        if not config.url:
            return None
        secret = None
        if config.secret_file:
            try:
                secret = pathlib.Path(config.secret_file).read_bytes().strip()
            except OSError as err:
                raise ConfigError(
                    f"approvals.webhook.secret_file: cannot read the secret: {err}"
                ) from None
        return cls(config, metrics, secret=secret)

    async def start(self) -> None:
        """Start posting, on the running loop."""
        self._loop = asyncio.get_running_loop()
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._config.timeout_seconds)
        )
        self._workers = [
            asyncio.create_task(self._work(), name=f"kynara-webhook-{i}")
            for i in range(WORKERS)
        ]

    def notify(self, approval: Approval) -> None:
        """Queue a summary of a new approval; never blocks, never raises.

        Safe to call from any thread. Approvals that are not new (not
        pending, reviewed already, or notified before) are ignored.
        """
        if approval.state is not ApprovalState.PENDING or approval.reviews:
            return
        loop = self._loop
        if loop is None or loop.is_closed():
            self._count_drop("not_started", approval.id, approval.decision_id)
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._enqueue(approval)
        else:
            loop.call_soon_threadsafe(self._enqueue, approval)

    def announce_pending(self, inbox: Inbox, now_ns: int) -> int:
        """Queue a summary of every approval of ``inbox`` still waiting for
        a reviewer: pending, unreviewed, and not past its expiry at
        ``now_ns`` (nanoseconds since the epoch). Call once at start, after
        ``start``: summaries queued before a stop were lost with it.

        Returns:
            How many summaries were queued (the rest found the queue full
            and were dropped and counted, or were announced already).
        """
        queued = 0
        query = InboxQuery(state=ApprovalState.PENDING)
        while True:
            page = inbox.list(query)
            for approval in page:
                if not approval.reviews and _expires_ns(approval) > now_ns:
                    queued += self._enqueue(approval)
            if len(page) < query.limit:
                break
            query = msgspec.structs.replace(query, after=page[-1].id)
        log.info(
            "approval webhook announced pending approvals",
            extra={"fields": {"component": "approvals", "approvals": queued}},
        )
        return queued

    def _enqueue(self, approval: Approval) -> bool:
        if self._closed:
            self._count_drop("closed", approval.id, approval.decision_id)
            return False
        if approval.id in self._recent:
            return False
        self._recent[approval.id] = None
        if len(self._recent) > RECENT_IDS:
            self._recent.popitem(last=False)
        try:
            self._queue.put_nowait(_Queued(summary_of(approval), approval.decision_id))
        except asyncio.QueueFull:
            self._count_drop("queue_full", approval.id, approval.decision_id)
            return False
        return True

    def _count_drop(self, why: str, approval_id: str, decision_id: str) -> None:
        self._metrics.approval_webhook_deliveries.labels("dropped").inc()
        log.warning(
            "approval webhook dropped",
            extra={
                "fields": {
                    "component": "approvals",
                    "approval_id": approval_id,
                    "decision_id": decision_id,
                    "why": why,
                    "setting": "approvals.webhook.url",
                }
            },
        )

    async def _work(self) -> None:
        while True:
            queued = await self._queue.get()
            try:
                await self._deliver(queued)
            except asyncio.CancelledError:
                self._count_drop("closed", queued.summary.id, queued.decision_id)
                raise
            finally:
                self._queue.task_done()

    async def _deliver(self, queued: _Queued) -> None:
        body = msgspec.json.encode(queued.summary)
        headers = {"content-type": "application/json"}
        if self._secret is not None:
            headers[SIGNATURE_HEADER] = sign(self._secret, body)
        attempts = self._config.attempts
        for attempt in range(1, attempts + 1):
            try:
                await self._post(body, headers)
            except _Refused as err:
                self._failed(queued, attempt, str(err), final=True)
                return
            except (aiohttp.ClientError, TimeoutError) as err:
                final = attempt == attempts
                self._failed(queued, attempt, str(err) or type(err).__name__, final)
                if final:
                    return
                await asyncio.sleep(retry_delay(attempt, *self._retry, self._draw()))
                continue
            self._metrics.approval_webhook_deliveries.labels("delivered").inc()
            log.debug(
                "approval webhook delivered",
                extra={
                    "fields": {
                        "component": "approvals",
                        "approval_id": queued.summary.id,
                        "decision_id": queued.decision_id,
                        "attempt": attempt,
                    }
                },
            )
            return

    async def _post(self, body: bytes, headers: dict[str, str]) -> None:
        assert self._session is not None
        # No redirects: they could carry the signed body somewhere else.
        async with self._session.post(
            self._config.url, data=body, headers=headers, allow_redirects=False
        ) as response:
            status = response.status
            if 200 <= status < 300:
                return
            if status >= 500 or status in RETRY_STATUSES:
                raise aiohttp.ClientResponseError(
                    response.request_info, (), status=status, message=response.reason
                )
            raise _Refused(f"the endpoint answered {status} {response.reason}")

    def _failed(self, queued: _Queued, attempt: int, error: str, final: bool) -> None:
        self._metrics.approval_webhook_failed_attempts.inc()
        if final:
            self._metrics.approval_webhook_deliveries.labels("failed").inc()
        log.log(
            logging.WARNING if final else logging.DEBUG,
            "approval webhook gave up" if final else "approval webhook attempt failed",
            extra={
                "fields": {
                    "component": "approvals",
                    "approval_id": queued.summary.id,
                    "decision_id": queued.decision_id,
                    "attempt": attempt,
                    "attempts": self._config.attempts,
                    "error": error,
                    "setting": "approvals.webhook.url",
                }
            },
        )

    async def drain(self) -> None:
        """Wait until every queued summary is delivered or given up (tests,
        and a stop that can afford it)."""
        await self._queue.join()

    async def close(self, timeout: float = 0.0) -> None:
        """Stop posting: wait up to ``timeout`` seconds for queued summaries,
        then drop (and count) what is left. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if timeout > 0 and self._workers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), timeout)
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()
        while not self._queue.empty():
            queued = self._queue.get_nowait()
            self._count_drop("closed", queued.summary.id, queued.decision_id)
        if self._session is not None:
            await self._session.close()
            self._session = None
