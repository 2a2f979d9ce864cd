"""The daemon's side of the fleet inbox: approvals up, signed reviews down.

With a central store, reviewers may resolve a daemon's approvals in the
collector's fleet inbox instead of on the daemon's own page. This module
is the daemon's end of that:

- **publish**: every approval the book changes (a subscription), and at
  start every pending or approved one, is put in the store as JSON
  (``Store.put_approval``; the latest state wins), so the inbox lists it
  and sees it resolved. Changes are collected per approval id and put
  by one task; an approval changed twice while the store is away is put
  once, in its latest state, when it is back.
- **take reviews**: one task watches the store for this daemon's reviews
  (``Store.watch_reviews``). Each is checked (``signed_review``: the
  inbox's signature under ``approvals.inbox_keys``, this daemon, the
  approval and its request, within its life) and, when it passes,
  recorded by the book exactly as a review made on the daemon's own page,
  with ``via`` the inbox's name; the book re-checks the reviewer's
  eligibility. Then the review is dropped from the store. A review refused
  (by the signature checks or by the book) is dropped too, logged at WARN
  with the reason and counted: nothing is recorded for it, and the
  approval's current state is put again so the inbox stops showing a
  stale one. A review the log could not record (``AuditUnavailable``) is
  left in the store and taken again after a pause.

A store that is down is retried after ``sync.retry_delay`` (doubling from
``sync.retry_min_seconds`` to ``sync.retry_max_seconds``); decisions never
wait on it: the subscription only marks an approval to put and returns.
Every store failure is logged once per outage and counted
(``kynara_approval_fleet_failures``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Sequence
from typing import Protocol

import msgspec

from kynara_sidecar.approvals.model import (
    Approval,
    ApprovalState,
    InboxQuery,
    Reviewer,
    Verdict,
)
from kynara_sidecar.approvals.signed_review import (
    ReviewRefused,
    check_signed_review,
    decode_signed_review,
)
from kynara_sidecar.audit.keys import PublicKey
from kynara_sidecar.errors import KynaraError, RequestError
from kynara_sidecar.metrics import Metrics
from kynara_sidecar.sync import (
    MAX_APPROVAL_BYTES,
    PublishedReview,
    Store,
    StoreUnavailable,
    retry_delay,
)
from kynara_sidecar.sync._session import StoreSession

__all__ = ["FleetBook", "FleetLink", "encode_approval", "decode_approval"]

log = logging.getLogger("kynara.sync")

# The states worth putting at start: an approval still open, or approved and
# not yet used, may be shown (or be resolved) in the inbox.
_OPEN_STATES = (ApprovalState.PENDING, ApprovalState.APPROVED)
# Approvals listed per page when publishing at start.
_START_PAGE = 500
# Log lines name at most this much of a store entry's ids.
_MAX_LOGGED = 80


class FleetBook(Protocol):
    """What the link needs of the daemon's approval book."""

    def get(self, approval_id: str) -> Approval | None: ...

    def list(self, query: InboxQuery) -> Sequence[Approval]: ...

    def subscribe(self, callback: Callable[[Approval], None]) -> object:
        """Call ``callback`` with each approval after a change commits."""
        ...

    async def review(
        self,
        approval_id: str,
        reviewer: Reviewer,
        verdict: Verdict,
        comment: str,
        *,
        via: str = "daemon",
    ) -> Approval: ...


def encode_approval(approval: Approval) -> bytes:
    """An approval as the store holds it."""
    return msgspec.json.encode(approval)


_DECODER = msgspec.json.Decoder(Approval)


def decode_approval(data: bytes) -> Approval:
    """An approval from the store.

    Raises:
        msgspec.DecodeError, msgspec.ValidationError: not an approval.
    """
    return _DECODER.decode(data)


class FleetLink:
    """Publishes the book's approvals and applies signed reviews from the
    store; see the module doc.

    Args:
        book: the daemon's approval book.
        store: the central store (its own connection: a slow watch here
            never holds up shipping).
        daemon_id: this daemon's id (the log's origin).
        trusted: the inbox keys by key id (``approvals.inbox_keys``).
        timeout: seconds one store call may take (``sync.timeout_seconds``).
        retry_min_seconds, retry_max_seconds: the pause after a failure,
            doubling between them (``sync.retry_*``).
        metrics: counters for reviews and failures, when given.
    """

    def __init__(
        self,
        book: FleetBook,
        store: Store,
        *,
        daemon_id: str,
        trusted: dict[str, PublicKey],
        timeout: float,
        retry_min_seconds: float,
        retry_max_seconds: float,
        metrics: Metrics | None = None,
    ):
        self._book = book
        self._session = StoreSession(store, timeout)
        self._daemon_id = daemon_id
        self._trusted = trusted
        self._retry = (retry_min_seconds, retry_max_seconds)
        self._metrics = metrics
        self._dirty: dict[str, Approval] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failing: set[str] = set()
        self._stopping = False
        # How many approval states reached the store, and reviews recorded
        # or refused: for tests and the operator's eye.
        self.published = 0
        self.taken = 0

    @property
    def url(self) -> str:
        return self._session.url

    async def start(self) -> None:
        """Subscribe to the book, mark the open approvals to put, and start
        the two tasks. Waits for nothing in the store."""
        self._loop = asyncio.get_running_loop()
        self._book.subscribe(self._changed)
        for state in _OPEN_STATES:
            after = ""
            while True:
                page = self._book.list(
                    InboxQuery(state=state, limit=_START_PAGE, after=after)
                )
                for approval in page:
                    self._dirty.setdefault(approval.id, approval)
                if len(page) < _START_PAGE:
                    break
                after = page[-1].id
        self._wake.set()
        self._tasks = [
            self._loop.create_task(self._publish_loop(), name="fleet publish"),
            self._loop.create_task(self._review_loop(), name="fleet reviews"),
        ]
        log.info(
            "fleet inbox link started",
            extra=_fields(backend=self.url, pending_to_publish=len(self._dirty)),
        )

    def _changed(self, approval: Approval) -> None:
        # Called by the book, maybe from its writer thread: hand over to
        # the loop and return at once.
        loop = self._loop
        if loop is None or self._stopping:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed
            loop.call_soon_threadsafe(self._mark, approval)

    def _mark(self, approval: Approval) -> None:
        self._dirty[approval.id] = approval
        self._wake.set()

    # -- publish

    async def _publish_loop(self) -> None:
        failures = 0
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._publish_dirty()
            except StoreUnavailable as err:
                failures += 1
                self._failed("publish", err)
                await asyncio.sleep(self._delay(failures))
                self._wake.set()
                continue
            failures = 0
            self._recovered("publish")

    async def _publish_dirty(self) -> None:
        for approval_id, approval in list(self._dirty.items()):
            data = encode_approval(approval)
            if len(data) > MAX_APPROVAL_BYTES:
                # TODO(#13): bound what a request may carry so that every
                # approval fits; until then one this large stays off the
                # fleet inbox (the daemon's own page still has it).
                log.warning(
                    "approval too large for the central store; not published",
                    extra=_fields(approval_id=approval_id, bytes=len(data)),
                )
                self._dirty.pop(approval_id, None)
                continue
            await self._session.call(
                lambda a=approval, d=data: self._session.store.put_approval(
                    a.daemon_id, a.id, d
                ),
                f"put approval {approval_id}",
            )
            # A change that came in meanwhile stays marked for the next put.
            if self._dirty.get(approval_id) is approval:
                del self._dirty[approval_id]
            self.published += 1

    # -- reviews

    async def _review_loop(self) -> None:
        failures = 0
        while not self._stopping:
            try:
                await self._session.call(self._session.store.connect, "connect")
                watch = self._session.store.watch_reviews(self._daemon_id)
                # aclosing: a watch left on an exception stops at once
                # rather than when the collector gets to it.
                async with contextlib.aclosing(watch):
                    async for published in watch:
                        failures = 0
                        self._recovered("reviews")
                        await self._take(published)
            except StoreUnavailable as err:
                failures += 1
                self._failed("reviews", err)
            except _TakeAgain:
                failures += 1
            await asyncio.sleep(self._delay(failures))

    async def _take(self, published: PublishedReview) -> None:
        """Check, record and drop one review from the store.

        Raises:
            StoreUnavailable: the drop failed (the review comes again; the
                book then refuses it as reviewed already, and it is
                dropped).
            _TakeAgain: the log could not record it; it stays in the store.
        """
        approval_id, review_id = published.approval_id, published.review_id
        approval = self._book.get(approval_id)
        outcome = "recorded"
        try:
            review = decode_signed_review(published.data)
            reviewer = check_signed_review(
                review,
                trusted=self._trusted,
                daemon_id=self._daemon_id,
                approval_id=approval_id,
                review_id=review_id,
                approval=approval,
            )
            await self._book.review(
                approval_id, reviewer, review.verdict, review.comment, via=review.inbox
            )
        except ReviewRefused as err:
            outcome = f"refused_{err.reason}"
            self._refused(published, err.reason, str(err))
        except RequestError as err:
            outcome = f"refused_{err.code}"
            self._refused(published, str(err.code), str(err))
            if approval is not None:
                # The inbox showed it reviewable; show it as it is.
                current = self._book.get(approval_id) or approval
                self._mark(current)
        except KynaraError as err:
            self._count(_review_outcome("retried"))
            log.error(
                "review from the fleet inbox not recorded; taken again later",
                extra=_fields(
                    approval_id=approval_id,
                    review_id=review_id,
                    error=str(err),
                ),
            )
            raise _TakeAgain from err
        else:
            log.info(
                "review from the fleet inbox recorded",
                extra=_fields(
                    approval_id=approval_id,
                    review_id=review_id,
                    reviewer=reviewer.id,
                    verdict=str(review.verdict),
                    via=review.inbox,
                ),
            )
        self._count(_review_outcome(outcome))
        self.taken += 1
        await self._session.call(
            lambda: self._session.store.drop_review(
                self._daemon_id, approval_id, review_id
            ),
            f"drop review {review_id}",
        )

    def _refused(self, published: PublishedReview, reason: str, message: str) -> None:
        log.warning(
            "review from the store refused; dropped, nothing recorded",
            extra=_fields(
                approval_id=published.approval_id[:_MAX_LOGGED],
                review_id=published.review_id[:_MAX_LOGGED],
                reason=reason,
                error=message,
                setting="approvals.inbox_keys",
            ),
        )

    # -- shared

    def _delay(self, failures: int) -> float:
        low, high = self._retry
        return retry_delay(max(failures, 1), low, high, random.random())

    def _count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.approval_fleet_reviews.labels(outcome).inc()

    def _failed(self, what: str, err: Exception) -> None:
        if self._metrics is not None:
            self._metrics.approval_fleet_failures.labels(what).inc()
        if what in self._failing:
            return
        self._failing.add(what)
        log.warning(
            "fleet inbox link: store unavailable; retrying",
            extra=_fields(backend=self.url, what=what, error=str(err)),
        )

    def _recovered(self, what: str) -> None:
        if what in self._failing:
            self._failing.discard(what)
            log.info(
                "fleet inbox link: store reachable again",
                extra=_fields(backend=self.url, what=what),
            )

    async def stop(self, seconds: float) -> bool:
        """Stop both tasks and close the store, within ``seconds``; whether
        everything stopped in time. Approvals not yet put are let go: the
        next start puts every open one again."""
        self._stopping = True
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        stopped = True
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=seconds)
            stopped = not pending
        await self._session.close(max(seconds / 2, 0.1))
        log.info("fleet inbox link stopped", extra=_fields(backend=self.url))
        return stopped


class _TakeAgain(Exception):
    """A review the log could not record: leave it, watch again later."""


def _review_outcome(outcome: str) -> str:
    # The label set stays bounded: reasons and codes are fixed vocabularies.
    return outcome[:_MAX_LOGGED]


def _fields(**fields: object) -> dict[str, dict[str, object]]:
    return {"fields": {"component": "sync", **fields}}
