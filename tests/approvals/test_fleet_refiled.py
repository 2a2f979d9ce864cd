"""Reviews a store writer re-files cannot grow what the daemon publishes.

A writer of the central store that holds one review the inbox signed (one
it saw in the store) can file copies of it under any number of review ids,
or file a review signed for another daemon under this one. No inbox counts
those for this daemon's approval: each is dropped at once, neither named
in ``taken`` nor put again. Reviews an inbox did sign for this approval and
id, refused by the daemon, are named, the latest ``MAX_TAKEN_PER_APPROVAL``
of them, so the approval stays small enough to publish.

Real parts: the approval book on LMDB in tmp_path, the directory store,
the fleet link on one event loop.
"""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import Callable

import msgspec
from core_support import CAROL, core, refund

from kynara_sidecar.approvals.fleet import (
    MAX_TAKEN_PER_APPROVAL,
    FleetLink,
    decode_approval,
)
from kynara_sidecar.approvals.model import ApprovalState, Verdict
from kynara_sidecar.approvals.signed_review import (
    encode_signed_review,
    new_review_id,
    sign_review,
)
from kynara_sidecar.audit.keys import generate_key
from kynara_sidecar.audit.record import format_timestamp, parse_timestamp
from kynara_sidecar.decision import Timestamp
from kynara_sidecar.metrics import Metrics
from kynara_sidecar.sync import open_store

# Generous: a condition that should hold soon, waited for at most this.
BOUND = 60.0
COPIES = 300


async def wait_until(condition: Callable[[], object], what: str) -> None:
    async def reached() -> None:
        while not condition():
            await asyncio.sleep(0.02)

    try:
        await asyncio.wait_for(reached(), BOUND)
    except TimeoutError:
        raise AssertionError(f"gave up waiting for {what}") from None


def _store_url(tmp_path: pathlib.Path) -> str:
    root = tmp_path / "store"
    root.mkdir()
    return f"dir://{root}"


def _earlier(rfc3339: str, seconds: int) -> str:
    moment = parse_timestamp(rfc3339)
    return format_timestamp(Timestamp(moment.seconds - seconds, moment.nanos))


async def _put_all(url: str, daemon_id: str, approval_id: str, filed) -> None:
    store = open_store(url, timeout=5)
    await store.connect()
    try:
        for review_id, data in filed:
            await store.put_review(daemon_id, approval_id, review_id, data)
    finally:
        await store.close()


async def _read(url: str, daemon_id: str):
    """The daemon's reviews left in the store and its published approvals."""
    store = open_store(url, timeout=5)
    await store.connect()
    try:
        return await store.reviews(daemon_id), await store.approvals()
    finally:
        await store.close()


class Linked:
    """A fleet link over the test's book and directory store."""

    def __init__(self, book, url: str, daemon_id: str):
        self.inbox = generate_key()
        self.daemon_key = generate_key()
        self.metrics = Metrics()
        self.link = FleetLink(
            book,
            open_store(url, timeout=5, poll_seconds=0.05),
            daemon_id=daemon_id,
            signing_key=self.daemon_key,
            trusted={self.inbox.key_id: self.inbox.public()},
            timeout=5,
            retry_min_seconds=0.05,
            retry_max_seconds=0.2,
            metrics=self.metrics,
        )

    def counted(self, outcome: str) -> float:
        return self.metrics.approval_fleet_reviews.labels(outcome)._value.get()

    def published(self, entries, approval_id: str):
        [entry] = [e for e in entries if e.approval_id == approval_id]
        return decode_approval(
            entry.data, {self.daemon_key.key_id: self.daemon_key.public()}
        )


def test_copies_of_one_signed_review_refiled_are_dropped_unnamed(tmp_path, clock):
    url = _store_url(tmp_path)

    async def body():
        async with core(tmp_path, clock) as c:
            daemon_id = c.config.identity.daemon_id
            approval = c.book.get((await c.decide(refund())).approval.id)
            linked = Linked(c.book, url, daemon_id)
            link = linked.link
            await link.start()
            try:
                await wait_until(lambda: link.published >= 1, "the first put")
                before = link.published
                # Valid where it was signed to be: the writer files copies
                # under ids of its own (wrong_key) ...
                seen = sign_review(
                    linked.inbox,
                    inbox="fleet",
                    approval=approval,
                    reviewer=CAROL,
                    verdict=Verdict.REJECT,
                    comment="",
                    at=approval.created_at,
                )
                # ... and a review signed for another daemon (wrong_daemon).
                elsewhere = sign_review(
                    linked.inbox,
                    inbox="fleet",
                    approval=msgspec.structs.replace(approval, daemon_id="other-1"),
                    reviewer=CAROL,
                    verdict=Verdict.APPROVE,
                    comment="",
                    at=approval.created_at,
                )
                filed = [
                    (new_review_id(), encode_signed_review(seen)) for _ in range(COPIES)
                ]
                filed.append((elsewhere.review_id, encode_signed_review(elsewhere)))
                filed += [
                    (new_review_id(), encode_signed_review(elsewhere))
                    for _ in range(20)
                ]
                await _put_all(url, daemon_id, approval.id, filed)
                await wait_until(
                    lambda: (
                        linked.counted("refused_wrong_key") == COPIES
                        and linked.counted("refused_wrong_daemon") == 21
                    ),
                    "every copy refused",
                )
                # Dropped at once: nothing waits on a put.
                await wait_until(lambda: not link._undropped, "the drops")
                left, entries = await _read(url, daemon_id)
                taken = dict(link._taken)
                held = dict(link._held)
                published = link.published
            finally:
                assert await link.stop(5)

            assert left == []
            assert taken.get(approval.id, []) == []
            assert held == {}
            # No copy made the approval be put (and signed) again.
            assert published == before
            state = linked.published(entries, approval.id)
            assert state.taken == frozenset()
            assert state.approval.state is ApprovalState.PENDING
            assert c.book.get(approval.id).reviews == ()

    asyncio.run(body())


def test_signed_refusals_of_one_approval_name_only_the_latest(tmp_path, clock):
    # Reviews the inbox did sign for this approval, each under its own id,
    # but made before the approval existed (a collector clock behind): all
    # refused (stale) and dropped; the published state names the latest
    # MAX_TAKEN_PER_APPROVAL, and the whole batch is put once.
    url = _store_url(tmp_path)
    count = MAX_TAKEN_PER_APPROVAL * 3

    async def body():
        async with core(tmp_path, clock) as c:
            daemon_id = c.config.identity.daemon_id
            approval = c.book.get((await c.decide(refund())).approval.id)
            linked = Linked(c.book, url, daemon_id)
            link = linked.link
            stale = [
                sign_review(
                    linked.inbox,
                    inbox="fleet",
                    approval=approval,
                    reviewer=CAROL,
                    verdict=Verdict.REJECT,
                    comment="",
                    at=_earlier(approval.created_at, 60),
                )
                for _ in range(count)
            ]
            # In the store before the link starts: its first scan gives
            # them as one batch.
            await _put_all(
                url,
                daemon_id,
                approval.id,
                [(r.review_id, encode_signed_review(r)) for r in stale],
            )
            await link.start()
            try:
                await wait_until(
                    lambda: linked.counted("refused_stale") == count, "the refusals"
                )
                await wait_until(
                    lambda: not link._held and not link._dirty and not link._undropped,
                    "the batch put and dropped",
                )
                left, entries = await _read(url, daemon_id)
                taken = list(link._taken[approval.id])
                published = link.published
            finally:
                assert await link.stop(5)

            # Taken in signed order: one `at`, then review id.
            latest = sorted(r.review_id for r in stale)[-MAX_TAKEN_PER_APPROVAL:]
            assert left == []
            assert taken == latest
            assert linked.published(entries, approval.id).taken == frozenset(latest)
            # The first state, then the batch's refusals at most once more.
            assert published <= 2

    asyncio.run(body())
