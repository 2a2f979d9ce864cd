"""The signed directory in the two central stores, dir:// and nats://:
publish, current, watch; NATS chunks and permissions on a real nats-server
on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib

import pytest
from nats_support import NatsServer

from kynara_sidecar.audit.keys import generate_key
from kynara_sidecar.decision import Timestamp
from kynara_sidecar.sync import BundleEntry, StoreUnavailable, open_store
from kynara_sidecar.sync.directory import (
    build_directory_update,
    directory_content,
    verify_directory_update,
)
from kynara_sidecar.sync.follower import bundle_digest
from kynara_sidecar.sync.nats_store import DIRECTORY_BUCKET, NatsStore

from .test_nats_auth import (  # noqa: F401 (fixtures)
    _store,
    fleet_server,
    run,
    site,
)

TIMEOUT = 2.0
POLL = 0.05
# A bound that only catches a hang.
BOUND = 30.0
KEY = generate_key()


@pytest.fixture(params=["dir", "nats"])
def url(request, tmp_path) -> str:
    if request.param == "dir":
        root = tmp_path / "store"
        root.mkdir()
        return f"dir://{root}"
    # A small max_payload, so a directory of a few hundred KiB goes in
    # many chunks, as a fleet's tens of MB do under the default 1 MiB.
    server = NatsServer(tmp_path, config="max_payload: 65536\n")
    request.addfinalizer(server.stop)
    return server.url


@contextlib.asynccontextmanager
async def opened(url: str):
    store = open_store(url, timeout=TIMEOUT, poll_seconds=POLL)
    await store.connect()
    try:
        yield store
    finally:
        await store.close()


def _update(count: int, created: int) -> bytes:
    content = directory_content(
        {"id": f"user-{i:05d}", "kind": "user", "roles": ["support"]}
        for i in range(count)
    )
    return build_directory_update(content, KEY, Timestamp(created))


def _blob(size: int, seed: int) -> bytes:
    """``size`` bytes that differ from one seed to the next everywhere."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}.{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def test_no_directory_until_published_then_the_latest(url):
    first, second = _update(3, 1_800_000_000), _update(4000, 1_800_000_001)

    async def scenario():
        async with opened(url) as store:
            before = await store.current_directory()
            await store.publish_directory(bundle_digest(first), first)
            one = await store.current_directory()
            await store.publish_directory(bundle_digest(second), second)
            two = await store.current_directory()
            bundle = await store.current_bundle()
        return before, one, two, bundle

    before, one, two, bundle = asyncio.run(scenario())

    assert before is None
    assert one == BundleEntry(digest=bundle_digest(first), data=first)
    assert two == BundleEntry(digest=bundle_digest(second), data=second)
    assert len(second) > 200_000  # several chunks of a 64 KiB max_payload
    trusted = {KEY.key_id: KEY.public()}
    assert verify_directory_update(two.data, trusted).created.startswith("2027")
    assert bundle is None  # a directory is no bundle


def test_a_digest_that_is_not_the_datas_is_refused(url):
    async def scenario():
        async with opened(url) as store:
            with pytest.raises(ValueError, match="expected digest"):
                await store.publish_directory("sha256:" + "0" * 64, b"data")
            return await store.current_directory()

    assert asyncio.run(scenario()) is None


def test_a_shorter_update_after_a_longer_one_reads_whole(url):
    sizes = [300_000, 70_000, 1, 140_000, 0]

    async def scenario():
        got = []
        async with opened(url) as store:
            for seed, size in enumerate(sizes):
                data = _blob(size, seed)
                await store.publish_directory(bundle_digest(data), data)
                got.append(await store.current_directory())
        return got

    got = asyncio.run(scenario())

    for seed, (size, entry) in enumerate(zip(sizes, got, strict=True)):
        assert entry.data == _blob(size, seed)
        assert entry.digest == bundle_digest(entry.data)


def test_watch_delivers_the_current_then_the_newer_update(url):
    first, second = _blob(150_000, 1), _blob(90_000, 2)

    async def scenario():
        async with opened(url) as publisher, opened(url) as reader:
            await publisher.publish_directory(bundle_digest(first), first)
            seen = []
            async with contextlib.aclosing(reader.watch_directory()) as updates:
                async for entry in updates:
                    seen.append(entry)
                    if len(seen) == 1:
                        await publisher.publish_directory(bundle_digest(second), second)
                    else:
                        break
            return seen

    seen = asyncio.run(asyncio.wait_for(scenario(), BOUND))

    assert [entry.data for entry in seen] == [first, second]
    assert [entry.digest for entry in seen] == [
        bundle_digest(first),
        bundle_digest(second),
    ]


def test_dir_store_keeps_only_the_current_update_and_the_one_before(tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    blobs = [_blob(1000, seed) for seed in range(4)]

    async def scenario():
        async with opened(f"dir://{root}") as store:
            for data in blobs:
                await store.publish_directory(bundle_digest(data), data)
            return await store.current_directory()

    current = asyncio.run(scenario())

    kept = sorted(path.name for path in (root / "directory").iterdir())
    expected = sorted(
        [".publish.lock", "current"]
        + [bundle_digest(data).replace(":", "-") for data in blobs[2:]]
    )
    assert kept == expected
    assert current.data == blobs[3]


def test_two_publishers_at_once_never_leave_current_naming_a_removed_update(
    tmp_path,
):
    # Two stores on one root, as a collector's stop beside the publish it
    # interrupted, or a hand publish beside a running collector: each
    # publish removes all but its own update and the one it read as
    # current, so unserialised, one removes what the other just named.
    root = tmp_path / "store"
    root.mkdir()
    rounds = 60
    blobs = [[_blob(20_000, 1000 * side + n) for n in range(rounds)] for side in (0, 1)]
    failures: list[str] = []

    async def scenario():
        async with opened(f"dir://{root}") as one, opened(f"dir://{root}") as two:

            async def publisher(store, mine) -> None:
                for data in mine:
                    await store.publish_directory(bundle_digest(data), data)

            async def reader() -> None:
                while not done.is_set():
                    try:
                        await one.current_directory()
                    except StoreUnavailable as err:
                        failures.append(str(err))
                    await asyncio.sleep(0)

            done = asyncio.Event()
            watching = asyncio.create_task(reader())
            for n in range(rounds):
                await asyncio.gather(
                    publisher(one, blobs[0][n : n + 1]),
                    publisher(two, blobs[1][n : n + 1]),
                )
                pointer = (root / "directory" / "current").read_text().strip()
                if not (root / "directory" / pointer.replace(":", "-")).is_file():
                    failures.append(f"round {n}: current names removed {pointer}")
            done.set()
            await watching
            return await two.current_directory()

    current = asyncio.run(scenario())

    assert failures == []
    assert current.data in (blobs[0][-1], blobs[1][-1])


def test_nats_has_no_directory_bucket_until_the_first_publish(nats_server):
    async def scenario():
        async with opened(nats_server.url) as store:
            current = await store.current_directory()
            js = store._js
            names = [info.config.name for info in await js.streams_info()]
        return current, names

    current, names = asyncio.run(scenario())

    assert current is None
    assert f"KV_{DIRECTORY_BUCKET}" not in names


class CountingNatsStore(NatsStore):
    """The real store, counting its looks for the directory bucket."""

    looks = 0

    async def _directory_bucket(self, *, create: bool):
        self.looks += 1
        return await super()._directory_bucket(create=create)


def test_a_watch_before_the_bucket_exists_waits_for_the_first_publish(nats_server):
    data = _blob(1000, 7)

    async def scenario():
        reader = CountingNatsStore(nats_server.url, timeout=TIMEOUT, poll_seconds=POLL)
        await reader.connect()
        try:
            async with (
                opened(nats_server.url) as publisher,
                contextlib.aclosing(reader.watch_directory()) as updates,
            ):
                first = asyncio.create_task(anext(updates))
                while reader.looks < 3:
                    await asyncio.sleep(POLL / 5)
                # Asked again and again without raising: it waits quietly.
                waiting = not first.done()
                await publisher.publish_directory(bundle_digest(data), data)
                return waiting, await first
        finally:
            await reader.close()

    waiting, entry = asyncio.run(asyncio.wait_for(scenario(), BOUND))

    assert waiting
    assert (entry.digest, entry.data) == (bundle_digest(data), data)


def test_a_daemon_reads_the_directory_and_cannot_publish_one(fleet_server, site):  # noqa: F811
    update = _update(5, 1_800_000_000)

    async def scenario():
        collector = _store(fleet_server, site.connection("collector"))
        daemon = _store(fleet_server, site.connection("a"))
        publisher = _store(fleet_server, site.connection("publisher"))
        try:
            await collector.connect()
            await daemon.connect()
            await publisher.connect()
            none_yet = await daemon.current_directory()
            await collector.publish_directory(bundle_digest(update), update)
            read = await daemon.current_directory()
            async with contextlib.aclosing(daemon.watch_directory()) as updates:
                watched = await asyncio.wait_for(anext(updates), BOUND)
            forged = _blob(100, 9)
            for writer in (daemon, publisher):
                with pytest.raises(StoreUnavailable, match="refused by the server"):
                    await writer.publish_directory(bundle_digest(forged), forged)
            after = await daemon.current_directory()
        finally:
            for store in (publisher, daemon, collector):
                await store.close()
        return none_yet, read, watched, after

    none_yet, read, watched, after = run(scenario())

    assert none_yet is None
    assert read.data == update and watched.data == update
    assert after.data == update
