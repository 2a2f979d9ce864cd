"""Approvals and reviews in the central store: dir:// and nats:// held to
one contract (``sync.Store``).

Each test runs against a directory in tmp_path and a real nats-server with
JetStream on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
from collections.abc import AsyncIterator

import pytest
from store_support import POLL, TIMEOUT, Backend

from kynara_sidecar.sync import (
    MAX_APPROVAL_BYTES,
    MAX_REVIEW_BYTES,
    PublishedApproval,
    PublishedReview,
    Store,
    StoreUnavailable,
    daemon_token,
    open_store,
)

# Generous: a condition that should hold at once, waited for at most this.
BOUND = 15.0

APR_1 = "apr_" + "a" * 26
APR_2 = "apr_" + "b" * 26
REV_1 = "rev_" + "c" * 26
REV_2 = "rev_" + "d" * 26


@contextlib.asynccontextmanager
async def opened(backend: Backend) -> AsyncIterator[Store]:
    store = backend.open()
    await store.connect()
    try:
        yield store
    finally:
        await store.close()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, BOUND))


def test_latest_approval_state_wins_and_every_daemon_is_listed(backend):
    async def scenario():
        async with opened(backend) as store:
            await store.put_approval("bot-1", APR_1, b'{"state":"pending"}')
            await store.put_approval("bot-1", APR_1, b'{"state":"approved"}')
            await store.put_approval("bot/2 x", APR_2, b'{"state":"pending"}')
            return await store.approvals()

    found = run(scenario())

    assert sorted(found, key=lambda a: a.approval_id) == [
        PublishedApproval("bot-1", APR_1, b'{"state":"approved"}'),
        PublishedApproval("bot/2 x", APR_2, b'{"state":"pending"}'),
    ]


def test_watch_approvals_gives_what_is_there_then_each_put(backend):
    async def scenario():
        async with opened(backend) as store:
            await store.put_approval("bot-1", APR_1, b"first")
            seen: list[PublishedApproval] = []
            watch = store.watch_approvals()
            seen.append(await anext(watch))
            await store.put_approval("bot-1", APR_2, b"second")
            seen.append(await anext(watch))
            await store.put_approval("bot-1", APR_1, b"first, resolved")
            seen.append(await anext(watch))
            await watch.aclose()
            return seen

    seen = run(scenario())

    assert [(a.approval_id, a.data) for a in seen] == [
        (APR_1, b"first"),
        (APR_2, b"second"),
        (APR_1, b"first, resolved"),
    ]


def test_reviews_are_per_daemon_until_dropped(backend):
    async def scenario():
        async with opened(backend) as store:
            await store.put_review("bot-1", APR_1, REV_1, b"one")
            await store.put_review("bot-1", APR_1, REV_2, b"two")
            await store.put_review("bot-2", APR_2, REV_1, b"other daemon's")
            before = await store.reviews("bot-1")
            await store.drop_review("bot-1", APR_1, REV_1)
            await store.drop_review("bot-1", APR_1, REV_1)  # gone: no error
            return before, await store.reviews("bot-1"), await store.reviews("bot-2")

    before, after, other = run(scenario())

    assert sorted(before, key=lambda r: r.review_id) == [
        PublishedReview("bot-1", APR_1, REV_1, b"one"),
        PublishedReview("bot-1", APR_1, REV_2, b"two"),
    ]
    assert after == [PublishedReview("bot-1", APR_1, REV_2, b"two")]
    assert other == [PublishedReview("bot-2", APR_2, REV_1, b"other daemon's")]


def test_watch_reviews_gives_each_new_review_once(backend):
    async def scenario():
        async with opened(backend) as store:
            await store.put_review("bot-1", APR_1, REV_1, b"one")
            watch = store.watch_reviews("bot-1")
            first = await anext(watch)
            await store.put_review("bot-2", APR_1, REV_2, b"not ours")
            await store.put_review("bot-1", APR_2, REV_2, b"two")
            second = await anext(watch)
            await watch.aclose()
            return first, second

    first, second = run(scenario())

    assert first == [PublishedReview("bot-1", APR_1, REV_1, b"one")]
    assert second == [PublishedReview("bot-1", APR_2, REV_2, b"two")]


def test_watch_reviews_gives_the_reviews_present_as_one_batch(backend):
    # The daemon orders a batch by when each review was signed, so what
    # the store lists together comes together, whatever its listing order.
    async def scenario():
        async with opened(backend) as store:
            await store.put_review("bot-1", APR_1, REV_2, b"two")
            await store.put_review("bot-1", APR_1, REV_1, b"one")
            watch = store.watch_reviews("bot-1")
            first = await anext(watch)
            await watch.aclose()
            return first

    first = run(scenario())

    assert sorted(first, key=lambda r: r.review_id) == [
        PublishedReview("bot-1", APR_1, REV_1, b"one"),
        PublishedReview("bot-1", APR_1, REV_2, b"two"),
    ]


async def _remove_approval(backend: Backend, store: Store, daemon_id: str, key: str):
    """Remove an approval entry as another writer of the store would."""
    if backend.kind == "dir":
        root = backend.url.removeprefix("dir://")
        path = f"{root}/approvals/{daemon_token(daemon_id)}/{key}.json"
        await asyncio.to_thread(os.unlink, path)
    else:
        await store._approvals.delete(f"{daemon_token(daemon_id)}.{key}")


def test_watch_approvals_reports_an_entry_removed(backend):
    async def scenario():
        async with opened(backend) as store:
            await store.put_approval("bot-1", APR_1, b"first")
            watch = store.watch_approvals()
            first = await anext(watch)
            await _remove_approval(backend, store, "bot-1", APR_1)
            gone = await anext(watch)
            await watch.aclose()
            return first, gone

    first, gone = run(scenario())

    assert first == PublishedApproval("bot-1", APR_1, b"first")
    assert gone == PublishedApproval("bot-1", APR_1, b"", deleted=True)


def test_entries_that_can_be_no_review_are_dropped_from_the_store(backend):
    # Logged once and removed, rather than logged again on every watch.
    token = daemon_token("bot-1")

    async def plant(store: Store) -> None:
        if backend.kind == "dir":
            folder = pathlib.Path(backend.url.removeprefix("dir://"), "reviews", token)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "not-a-pair.json").write_bytes(b"x")
            (folder / f"{APR_1}.{REV_2}.json").write_bytes(bytes(MAX_REVIEW_BYTES + 1))
        else:
            await store._reviews.put(f"{token}.not-a-pair", b"x")
            await store._reviews.put(
                f"{token}.{APR_1}.{REV_2}", bytes(MAX_REVIEW_BYTES + 1)
            )

    async def scenario():
        async with opened(backend) as store:
            await plant(store)
            await store.put_review("bot-1", APR_1, REV_1, b"good")
            watch = store.watch_reviews("bot-1")
            batch = await anext(watch)
            await watch.aclose()
            left = await _review_entries(backend, store, token)
            return batch, left

    batch, left = run(scenario())

    assert batch == [PublishedReview("bot-1", APR_1, REV_1, b"good")]
    assert left == [f"{APR_1}.{REV_1}"]


async def _review_entries(backend: Backend, store: Store, token: str) -> list[str]:
    if backend.kind == "dir":
        folder = pathlib.Path(backend.url.removeprefix("dir://"), "reviews", token)
        return sorted(p.name.removesuffix(".json") for p in folder.iterdir())
    keys = await store._reviews.keys()
    return sorted(k.removeprefix(f"{token}.") for k in keys)


@pytest.mark.parametrize(
    "approval_id, review_id",
    [("apr.x", REV_1), (APR_1, "rev>"), ("", REV_1), (APR_1, "a" * 65)],
)
def test_ids_that_are_no_store_keys_are_refused(backend, approval_id, review_id):
    async def scenario():
        async with opened(backend) as store:
            await store.put_review("bot-1", approval_id, review_id, b"x")

    with pytest.raises(ValueError, match="expected 1 to 64 letters"):
        run(scenario())


def test_oversized_entries_are_refused_on_put(backend):
    async def scenario():
        async with opened(backend) as store:
            with pytest.raises(ValueError, match="expected at most"):
                await store.put_approval("bot-1", APR_1, bytes(MAX_APPROVAL_BYTES + 1))
            with pytest.raises(ValueError, match="expected at most"):
                await store.put_review(
                    "bot-1", APR_1, REV_1, bytes(MAX_REVIEW_BYTES + 1)
                )
            return await store.approvals(), await store.reviews("bot-1")

    assert run(scenario()) == ([], [])


def test_a_store_down_fails_calls_and_works_again_once_back(backend):
    async def scenario():
        async with opened(backend) as store:
            await store.put_approval("bot-1", APR_1, b"before")
            backend.outage()
            try:
                with pytest.raises(StoreUnavailable):
                    await store.put_review("bot-1", APR_1, REV_1, b"during")
            finally:
                backend.restore()
            await store.connect()
            await store.put_review("bot-1", APR_1, REV_1, b"after")
            return await store.approvals(), await store.reviews("bot-1")

    approvals, reviews = run(scenario())

    assert approvals == [PublishedApproval("bot-1", APR_1, b"before")]
    assert reviews == [PublishedReview("bot-1", APR_1, REV_1, b"after")]


def test_dir_store_skips_foreign_entries(tmp_path):
    root = tmp_path / "store"
    root.mkdir()

    async def scenario():
        store = open_store(f"dir://{root}", timeout=TIMEOUT, poll_seconds=POLL)
        await store.connect()
        await store.put_approval("bot-1", APR_1, b"good")
        token = root / "approvals" / daemon_token("bot-1")
        (token / "not.a.key.json").write_bytes(b"x")
        (token / f"{APR_2}.json").mkdir()
        (token / "apr_big.json").write_bytes(bytes(MAX_APPROVAL_BYTES + 1))
        (root / "approvals" / "not=a=token").mkdir()
        (root / "approvals" / "stray-file").write_bytes(b"x")
        return await store.approvals()

    assert run(scenario()) == [PublishedApproval("bot-1", APR_1, b"good")]
