"""The two central stores, dir:// and nats://, held to one contract.

Every test in the first part runs against both: a directory in tmp_path
and a real nats-server with JetStream on loopback. An "outage" moves the
directory away or stops the server; "restore" brings it back unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import pathlib
import re
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable

import pytest
from store_support import POLL, TIMEOUT, Backend

from kynara_sidecar.errors import ConfigError
from kynara_sidecar.sync import (
    BundleEntry,
    BundleTooLarge,
    Delivery,
    Store,
    StoreUnavailable,
    daemon_token,
    open_store,
)
from kynara_sidecar.sync.dir_store import MAX_OUTSTANDING_CALLS, DirStore
from kynara_sidecar.sync.nats_store import SEGMENTS_STREAM

# The bounds below only catch a hang.
# Generous: a condition that should hold at once, waited for at most this.
BOUND = 15.0


@contextlib.asynccontextmanager
async def opened(backend: Backend, **kwargs) -> AsyncIterator[Store]:
    store = backend.open(**kwargs)
    await store.connect()
    try:
        yield store
    finally:
        await store.close()


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def take(store: Store, consumer: str, count: int) -> list[Delivery]:
    """The next ``count`` deliveries for ``consumer``, each acknowledged."""
    got: list[Delivery] = []

    async def collect() -> None:
        async with contextlib.aclosing(store.segments(consumer)) as deliveries:
            async for delivery in deliveries:
                await delivery.ack()
                got.append(delivery)
                if len(got) == count:
                    return

    await asyncio.wait_for(collect(), BOUND)
    return got


def ids(deliveries: list[Delivery]) -> list[tuple[str, str, bytes]]:
    return [(d.daemon_id, d.msg_id, d.data) for d in deliveries]


# -- bundles


def test_no_bundle_until_one_is_published_then_the_latest(backend):
    async def scenario():
        async with opened(backend) as store:
            before = await store.current_bundle()
            first = await store.publish_bundle(b"revision one")
            second = await store.publish_bundle(b"revision two")
            return before, first, second, await store.current_bundle()

    before, first, second, current = asyncio.run(scenario())

    assert before is None
    assert first == digest_of(b"revision one")
    assert second == digest_of(b"revision two")
    assert current.digest == second
    assert current.data == b"revision two"


def test_watch_yields_the_current_bundle_then_each_publish(backend):
    async def scenario():
        async with opened(backend) as store, opened(backend) as publisher:
            await publisher.publish_bundle(b"r1")
            seen = []
            async with contextlib.aclosing(store.watch_bundles()) as watch:
                async for entry in watch:
                    seen.append(entry.data)
                    if entry.data == b"r1":
                        await publisher.publish_bundle(b"r2")
                    if entry.data == b"r2":
                        break
            return seen

    seen = asyncio.run(asyncio.wait_for(scenario(), BOUND))

    assert seen == [b"r1", b"r2"]


def test_a_watch_on_an_empty_store_waits_for_the_first_publish(backend):
    async def scenario():
        async with opened(backend) as store, opened(backend) as publisher:
            watch = store.watch_bundles()
            first = asyncio.ensure_future(anext(watch))
            await asyncio.sleep(POLL * 4)
            pending = not first.done()
            await publisher.publish_bundle(b"r1")
            entry = await asyncio.wait_for(first, BOUND)
            await watch.aclose()
            return pending, entry

    pending, entry = asyncio.run(scenario())

    assert pending
    assert entry.data == b"r1"


# -- segments


def test_a_resent_message_is_recognised_and_delivered_once(backend):
    async def scenario():
        async with opened(backend) as store:
            stored = [
                await store.ship_segment("d1", "log.4.1", b"one"),
                await store.ship_segment("d1", "log.4.1", b"one"),
                await store.ship_segment("d1", "log.8.5", b"two"),
            ]
            return stored, await take(store, "collector", 2)

    stored, got = asyncio.run(scenario())

    assert stored == [True, False, True]
    assert ids(got) == [("d1", "log.4.1", b"one"), ("d1", "log.8.5", b"two")]


def test_each_daemons_messages_arrive_in_ship_order(backend):
    daemons = ["pod-a", "pod-b/agent ä", "pod-c"]
    shipped = [(d, f"{d}.log.{n}.{n}", f"{d}-{n}".encode()) for n in range(1, 6)
               for d in daemons]  # fmt: skip

    async def scenario():
        async with opened(backend) as store:
            for daemon, msg_id, data in shipped:
                assert await store.ship_segment(daemon, msg_id, data)
            return await take(store, "collector", len(shipped))

    got = asyncio.run(scenario())

    for daemon in daemons:
        assert [g for g in ids(got) if g[0] == daemon] == [
            s for s in shipped if s[0] == daemon
        ]


def test_a_durable_consumer_resumes_after_its_last_ack(backend):
    async def scenario():
        async with opened(backend) as store:
            for n in range(1, 4):
                await store.ship_segment("d1", f"log.{n}.{n}", b"%d" % n)
            first = await take(store, "collector", 2)
        # A new process, as after a restart of the collector.
        async with opened(backend) as store:
            resumed = await take(store, "collector", 1)
            await store.ship_segment("d1", "log.4.4", b"4")
            later = await take(store, "collector", 1)
            other = await take(store, "auditor", 4)
        return first, resumed, later, other

    first, resumed, later, other = asyncio.run(scenario())

    assert [d.msg_id for d in first] == ["log.1.1", "log.2.2"]
    assert [d.msg_id for d in resumed] == ["log.3.3"]
    assert [d.msg_id for d in later] == ["log.4.4"]
    assert [d.msg_id for d in other] == ["log.1.1", "log.2.2", "log.3.3", "log.4.4"]


def test_a_nakd_message_comes_again_before_the_next_of_its_daemon(backend):
    async def scenario():
        async with opened(backend) as store:
            await store.ship_segment("d1", "log.1.1", b"1")
            await store.ship_segment("d1", "log.2.2", b"2")
            seen = []

            async def collect() -> None:
                async with contextlib.aclosing(store.segments("c")) as deliveries:
                    async for delivery in deliveries:
                        seen.append(delivery.msg_id)
                        if len(seen) == 1:
                            await delivery.nak()
                            continue
                        await delivery.ack()
                        if len(seen) == 3:
                            return

            await asyncio.wait_for(collect(), BOUND)
            return seen

    assert asyncio.run(scenario()) == ["log.1.1", "log.1.1", "log.2.2"]


def test_a_consumer_name_that_is_not_a_plain_token_is_refused(backend):
    async def scenario():
        async with opened(backend) as store:
            await anext(store.segments("col.lector"))

    with pytest.raises(ConfigError, match=r"consumer name 'col.lector': expected"):
        asyncio.run(scenario())


# -- status


def test_status_is_one_document_per_daemon_replaced_on_put(backend):
    async def scenario():
        async with opened(backend) as store:
            empty = await store.statuses()
            await store.put_status("pod-a", b'{"v": 1}')
            await store.put_status("pod-b/agent ä", b'{"v": 2}')
            await store.put_status("pod-a", b'{"v": 3}')
            return empty, await store.statuses()

    empty, statuses = asyncio.run(scenario())

    assert empty == {}
    assert statuses == {"pod-a": b'{"v": 3}', "pod-b/agent ä": b'{"v": 2}'}


# -- connecting and outages


def test_two_stores_connecting_at_once_both_succeed(backend):
    async def scenario():
        first, second = backend.open(), backend.open()
        await asyncio.gather(first.connect(), second.connect())
        await first.publish_bundle(b"r1")
        current = await second.current_bundle()
        await asyncio.gather(first.close(), second.close())
        return current

    assert asyncio.run(scenario()).data == b"r1"


def test_store_away_fails_every_call_within_timeout_then_works_again(backend):
    calls: dict[str, Callable[[Store], object]] = {
        "current": lambda s: s.current_bundle(),
        "publish": lambda s: s.publish_bundle(b"r2"),
        "ship": lambda s: s.ship_segment("d1", "log.2.2", b"2"),
        "put status": lambda s: s.put_status("d1", b"{}"),
        "statuses": lambda s: s.statuses(),
    }

    async def scenario():
        async with opened(backend) as store:
            await store.publish_bundle(b"r1")
            await store.ship_segment("d1", "log.1.1", b"1")
            backend.outage()
            failures = {}
            for name, call in calls.items():
                with pytest.raises(StoreUnavailable) as caught:
                    # The bound only catches a hang; the store's own
                    # timeout must have fired long before it.
                    await asyncio.wait_for(call(store), BOUND)
                failures[name] = str(caught.value)
            backend.restore()
            current = await store.current_bundle()
            stored = await store.ship_segment("d1", "log.2.2", b"2")
            got = await take(store, "collector", 2)
            return failures, current, stored, got

    failures, current, stored, got = asyncio.run(scenario())

    for name, message in failures.items():
        assert message.startswith(backend.url + ":"), (name, message)
    assert current.data == b"r1"
    assert stored is True
    assert [d.msg_id for d in got] == ["log.1.1", "log.2.2"]


def test_a_watch_ends_with_store_unavailable_when_the_store_goes(backend):
    async def scenario():
        async with opened(backend) as store:
            await store.publish_bundle(b"r1")
            watch = store.watch_bundles()
            first = await asyncio.wait_for(anext(watch), BOUND)
            backend.outage()
            with pytest.raises(StoreUnavailable) as caught:
                await asyncio.wait_for(anext(watch), BOUND)
            await watch.aclose()
            backend.restore()
            await store.connect()
            again = store.watch_bundles()
            resumed = await asyncio.wait_for(anext(again), BOUND)
            await again.aclose()
            return first, str(caught.value), resumed

    first, message, resumed = asyncio.run(scenario())

    assert first.data == b"r1"
    assert message.startswith(backend.url + ":")
    assert resumed.data == b"r1"


def test_a_consumer_ends_with_store_unavailable_when_the_store_goes(backend):
    async def scenario():
        async with opened(backend) as store:
            await store.ship_segment("d1", "log.1.1", b"1")
            deliveries = store.segments("collector")
            first = await asyncio.wait_for(anext(deliveries), BOUND)
            await first.ack()
            backend.outage()
            with pytest.raises(StoreUnavailable) as caught:
                await asyncio.wait_for(anext(deliveries), BOUND)
            await deliveries.aclose()
            return str(caught.value)

    assert asyncio.run(scenario()).startswith(backend.url + ":")


# -- dir:// only


def dir_store(root: pathlib.Path) -> DirStore:
    return DirStore(f"dir://{root}", timeout=TIMEOUT, poll_seconds=POLL)


def test_dir_store_with_no_directory_is_unavailable_naming_the_path(tmp_path):
    missing = tmp_path / "not-mounted"

    with pytest.raises(StoreUnavailable, match=re.escape(f"{missing} is not a dir")):
        asyncio.run(dir_store(missing).connect())
    assert not missing.exists()


def test_dir_store_on_a_file_is_unavailable_naming_the_path(tmp_path):
    file = tmp_path / "a-file"
    file.write_text("")

    with pytest.raises(StoreUnavailable, match=re.escape(f"{file} is not a dir")):
        asyncio.run(dir_store(file).connect())


def test_dir_store_url_may_be_relative_to_the_working_directory():
    assert DirStore("dir://var/store").root == pathlib.Path("var/store")
    assert DirStore("dir:///srv/store").root == pathlib.Path("/srv/store")


def test_dir_store_never_reads_a_temp_file_a_crash_left_behind(tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    store = dir_store(root)

    async def scenario():
        await store.connect()
        await store.publish_bundle(b"r1")
        await store.ship_segment("d1", "log.1.1", b"1")
        await store.put_status("d1", b'{"v": 1}')
        # What a crash before the rename leaves: half-written temp files.
        segments = root / "segments" / daemon_token("d1")
        for directory in (root / "bundles", segments, root / "status"):
            (directory / ".tmp-crash").write_bytes(b"log.2.2\nhalf")
        (root / "bundles" / ".tmp-current").write_bytes(b"sha256:")
        (root / "status" / ".tmp-x.json").write_bytes(b'{"v":')
        current = await store.current_bundle()
        statuses = await store.statuses()
        resend = await store.ship_segment("d1", "log.2.2", b"2")
        got = await take(store, "collector", 2)
        return current, statuses, resend, got

    current, statuses, resend, got = asyncio.run(scenario())

    assert current.data == b"r1"
    assert statuses == {"d1": b'{"v": 1}'}
    assert resend is True
    assert ids(got) == [("d1", "log.1.1", b"1"), ("d1", "log.2.2", b"2")]


def test_dir_store_resend_after_a_crash_before_the_id_marker_is_a_duplicate(
    tmp_path,
):
    root = tmp_path / "store"
    root.mkdir()

    async def scenario():
        store = dir_store(root)
        await store.connect()
        await store.ship_segment("d1", "log.1.1", b"1")
        for marker in (root / "segments" / daemon_token("d1") / "ids").iterdir():
            marker.unlink()
        # A new process: nothing cached.
        again = dir_store(root)
        resend = await again.ship_segment("d1", "log.1.1", b"1")
        after = await again.ship_segment("d1", "log.1.1", b"1")
        await again.ship_segment("d1", "log.2.2", b"2")
        return resend, after, await take(again, "collector", 2)

    resend, after, got = asyncio.run(scenario())

    assert (resend, after) == (False, False)
    assert [d.msg_id for d in got] == ["log.1.1", "log.2.2"]


SHIP_SCRIPT = """
import asyncio, sys
from kynara_sidecar.sync.dir_store import MAX_OUTSTANDING_CALLS, DirStore

async def main(url, daemon, prefix, count):
    store = DirStore(url, timeout=30)
    await store.connect()
    for n in range(count):
        assert await store.ship_segment(daemon, f"{prefix}.{n}.{n}", b"%d" % n)

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
"""


@pytest.mark.parametrize("same_daemon", [False, True], ids=["two", "one"])
def test_dir_store_two_processes_shipping_at_once_lose_nothing(tmp_path, same_daemon):
    root = tmp_path / "store"
    root.mkdir()
    count = 40
    shippers = [("d1", "p1"), ("d1" if same_daemon else "d2", "p2")]

    processes = [
        subprocess.Popen(
            [sys.executable, "-c", SHIP_SCRIPT, f"dir://{root}", d, p, str(count)]
        )
        for d, p in shippers
    ]
    codes = [process.wait(timeout=120) for process in processes]
    got = asyncio.run(take(dir_store(root), "collector", 2 * count))

    assert codes == [0, 0]
    for daemon, prefix in shippers:
        mine = [d.msg_id for d in got if d.msg_id.startswith(prefix + ".")]
        assert mine == [f"{prefix}.{n}.{n}" for n in range(count)]
        assert {d.daemon_id for d in got if d.msg_id.startswith(prefix)} == {daemon}


def test_dir_store_files_are_readable_by_other_users(tmp_path):
    root = tmp_path / "store"
    root.mkdir()

    async def scenario():
        store = dir_store(root)
        await store.connect()
        await store.publish_bundle(b"r1")
        await store.put_status("d1", b"{}")

    asyncio.run(scenario())

    for path in [*root.glob("bundles/*"), *root.glob("status/*")]:
        assert os.stat(path).st_mode & 0o777 == 0o644, path


# -- nats:// only


def test_nats_bundle_past_max_payload_is_refused_and_current_kept(nats_server):
    async def scenario():
        store = open_store(nats_server.url, timeout=TIMEOUT)
        await store.connect()
        await store.publish_bundle(b"r1")
        with pytest.raises(BundleTooLarge, match=r"exceeds the server's max_payload"):
            await store.publish_bundle(b"x" * (2 * 1024 * 1024))
        current = await store.current_bundle()
        await store.close()
        return current

    assert asyncio.run(scenario()).data == b"r1"


def test_nats_unreachable_at_connect_is_unavailable_naming_the_url(nats_server):
    url = nats_server.url
    nats_server.stop()

    async def scenario():
        store = open_store(url, timeout=TIMEOUT)
        await asyncio.wait_for(store.connect(), BOUND)

    with pytest.raises(StoreUnavailable, match=re.escape(f"{url}: connect: ")):
        asyncio.run(scenario())


@pytest.mark.parametrize("end", ["stop", "kill"])
def test_nats_shipped_segments_and_duplicates_survive_a_server_restart(
    nats_server, end
):
    async def scenario():
        store = open_store(nats_server.url, timeout=TIMEOUT)
        await store.connect()
        for n in range(1, 4):
            await store.ship_segment("d1", f"log.{n}.{n}", b"%d" % n)
        # In a thread, so the client sees the connection drop as it happens
        # rather than on its first call after the restart.
        await asyncio.to_thread(getattr(nats_server, end))
        await asyncio.to_thread(nats_server.start)
        resend = await store.ship_segment("d1", "log.3.3", b"3")
        got = await take(store, "collector", 3)
        await store.close()
        return resend, got

    resend, got = asyncio.run(scenario())

    assert resend is False
    assert [d.msg_id for d in got] == ["log.1.1", "log.2.2", "log.3.3"]


def test_nats_consumer_position_survives_a_clean_server_restart(nats_server):
    async def scenario():
        store = open_store(nats_server.url, timeout=TIMEOUT)
        await store.connect()
        for n in range(1, 4):
            await store.ship_segment("d1", f"log.{n}.{n}", b"%d" % n)
        first = await take(store, "collector", 1)
        await asyncio.to_thread(nats_server.stop)
        await asyncio.to_thread(nats_server.start)
        rest = await take(store, "collector", 2)
        await store.close()
        return first, rest

    first, rest = asyncio.run(scenario())

    assert [d.msg_id for d in first] == ["log.1.1"]
    assert [d.msg_id for d in rest] == ["log.2.2", "log.3.3"]


def test_nats_consumer_takes_the_ack_wait_it_is_opened_with(nats_server):
    # A delivery lost with its connection comes again only after the ack
    # wait, so it is the collector's setting; the server keeps what a
    # consumer was made with, so opening with another wait updates it.
    async def ack_wait(store) -> float:
        info = await store._js.consumer_info(SEGMENTS_STREAM, "collector")
        return info.config.ack_wait

    async def scenario():
        quick = open_store(nats_server.url, timeout=TIMEOUT, ack_wait_seconds=1)
        await quick.connect()
        await quick.ship_segment("d1", "log.1.1", b"1")
        async with contextlib.aclosing(quick.segments("collector")) as deliveries:
            unacknowledged = await asyncio.wait_for(anext(deliveries), BOUND)
        made = await ack_wait(quick)
        # Never acknowledged: it comes again once the second has passed.
        again = await take(quick, "collector", 1)
        await quick.close()
        slow = open_store(nats_server.url, timeout=TIMEOUT, ack_wait_seconds=45)
        await slow.connect()
        await slow.ship_segment("d1", "log.2.2", b"2")
        rest = await take(slow, "collector", 1)
        updated = await ack_wait(slow)
        await slow.close()
        return unacknowledged, made, again, rest, updated

    unacknowledged, made, again, rest, updated = asyncio.run(scenario())

    assert unacknowledged.msg_id == "log.1.1"
    assert made == 1
    assert [d.msg_id for d in again] == ["log.1.1"]
    assert [d.msg_id for d in rest] == ["log.2.2"]
    assert updated == 45


# -- entries a store writer without a daemon key can make (F1, F6)


def _seq_name(seq: int) -> str:
    return f"{seq:020d}.msg"


@pytest.mark.parametrize(
    "token",
    ["_w", "A", "YR"],
    ids=["not-utf8", "not-base64", "not-canonical"],
)
def test_dir_store_delivers_a_bad_daemon_token_as_no_daemon_and_reads_on(
    tmp_path, token
):
    root = tmp_path / "store"
    root.mkdir()
    store = dir_store(root)

    async def scenario():
        await store.connect()
        poisoned = root / "segments" / token
        poisoned.mkdir()
        (poisoned / _seq_name(1)).write_bytes(b"x\njunk")
        await store.ship_segment("d1", "log.1.1", b"1")
        first = await take(store, "collector", 2)
        await store.ship_segment("d1", "log.2.2", b"2")
        second = await take(store, "collector", 1)
        return first, second

    first, second = asyncio.run(scenario())

    assert sorted(ids(first)) == [("", "x", b"junk"), ("d1", "log.1.1", b"1")]
    assert ids(second) == [("d1", "log.2.2", b"2")]


@pytest.mark.parametrize("entry", ["no-id-line", "not-utf8-id", "directory"])
def test_dir_store_delivers_a_malformed_message_file_and_reads_on(tmp_path, entry):
    root = tmp_path / "store"
    root.mkdir()
    store = dir_store(root)
    expected = {
        "no-id-line": ("d1", "", b"junk-without-newline"),
        "not-utf8-id": ("d1", "\ufffd\ufffd", b"junk"),
        "directory": ("d1", "", b""),
    }[entry]

    async def scenario():
        await store.connect()
        await store.ship_segment("d1", "log.1.1", b"1")
        path = root / "segments" / daemon_token("d1") / _seq_name(2)
        if entry == "directory":
            path.mkdir()
        else:
            path.write_bytes(
                b"junk-without-newline" if entry == "no-id-line" else b"\xff\xfe\njunk"
            )
        # The daemon's shipper, reading its tail anew, takes the next number.
        shipper = dir_store(root)
        await shipper.connect()
        stored = await shipper.ship_segment("d1", "log.2.2", b"2")
        return stored, await take(store, "collector", 3)

    stored, got = asyncio.run(scenario())

    assert stored is True
    assert ids(got) == [("d1", "log.1.1", b"1"), expected, ("d1", "log.2.2", b"2")]


def test_dir_store_skips_a_file_where_a_daemon_directory_should_be(tmp_path, caplog):
    root = tmp_path / "store"
    root.mkdir()
    store = dir_store(root)

    async def scenario():
        await store.connect()
        (root / "segments" / daemon_token("d0")).write_bytes(b"not a directory")
        await store.ship_segment("d1", "log.1.1", b"1")
        await store.ship_segment("d2", "log.1.1", b"2")
        return await take(store, "collector", 2)

    got = asyncio.run(scenario())

    assert sorted(ids(got)) == [("d1", "log.1.1", b"1"), ("d2", "log.1.1", b"2")]
    (logged,) = [r for r in caplog.records if r.name == "kynara.sync"]
    assert logged.levelname == "ERROR"
    assert "not a daemon's directory" in logged.fields["error"]


def test_dir_store_cuts_a_huge_message_file_at_the_read_bound(tmp_path):
    from kynara_sidecar.sync.dir_store import MAX_MESSAGE_FILE_BYTES

    root = tmp_path / "store"
    root.mkdir()
    store = dir_store(root)

    async def scenario():
        await store.connect()
        await store.ship_segment("d1", "huge", b"z" * (MAX_MESSAGE_FILE_BYTES + 100))
        return await take(store, "collector", 1)

    (got,) = asyncio.run(scenario())

    assert got.msg_id == "huge"
    assert len(got.data) == MAX_MESSAGE_FILE_BYTES - len(b"huge\n")


@pytest.mark.parametrize(
    "token", ["_w", "A", "YR"], ids=["not-utf8", "not-base64", "not-canonical"]
)
def test_nats_delivers_a_bad_subject_token_as_no_daemon_and_reads_on(
    nats_server, token
):
    import nats

    async def scenario():
        async with opened(
            Backend("nats", nats_server.url, lambda: None, lambda: None)
        ) as store:
            client = await nats.connect(nats_server.url)
            try:
                await client.jetstream().publish(f"kynara.segments.{token}", b"junk")
            finally:
                await client.close()
            await store.ship_segment("d1", "log.1.1", b"1")
            return await take(store, "collector", 2)

    got = asyncio.run(scenario())

    assert ids(got) == [("", "", b"junk"), ("d1", "log.1.1", b"1")]


def test_dir_store_calls_stuck_in_the_kernel_hold_no_shared_worker(tmp_path):
    # A call into a hung mount never returns; an Event stands in for it.
    root = tmp_path / "store"
    root.mkdir()
    store = DirStore(f"dir://{root}", timeout=0.2, poll_seconds=POLL)
    mount_back = threading.Event()

    async def scenario() -> None:
        await store.connect()
        digest = await store.publish_bundle(b"a bundle")

        for _ in range(3):
            with pytest.raises(StoreUnavailable, match="took longer than"):
                await store._call("read a hung file", mount_back.wait)
        # Three calls are stuck; other calls go on, and the loop's shared
        # executor is untouched.
        assert (await store.current_bundle()).digest == digest
        assert await asyncio.to_thread(lambda: "free") == "free"
        for _ in range(MAX_OUTSTANDING_CALLS - 3):
            with pytest.raises(StoreUnavailable, match="took longer than"):
                await store._call("read a hung file", mount_back.wait)
        with pytest.raises(StoreUnavailable, match="have not returned"):
            await store.current_bundle()
        # A new store object on the same root (a consumer reconnecting) is
        # held to the same bound: no more threads into the hung mount.
        again = DirStore(f"dir://{root}", timeout=0.2, poll_seconds=POLL)
        with pytest.raises(StoreUnavailable, match="have not returned"):
            await again.current_bundle()
        mount_back.set()
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            try:
                entry = await store.current_bundle()
                break
            except StoreUnavailable:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.02)

        assert entry == BundleEntry(digest=digest, data=b"a bundle")

    asyncio.run(scenario())


@pytest.mark.parametrize("entry", ["fifo", "symlink_to_dev_zero", "directory"])
def test_dir_store_reads_only_regular_files_and_never_blocks_on_one(tmp_path, entry):
    root = tmp_path / "store"
    root.mkdir()
    store = DirStore(f"dir://{root}", timeout=5, poll_seconds=POLL)

    def plant(path: pathlib.Path) -> None:
        path.unlink(missing_ok=True)
        if entry == "fifo":
            os.mkfifo(path)
        elif entry == "symlink_to_dev_zero":
            path.symlink_to("/dev/zero")
        else:
            path.mkdir()

    async def scenario() -> None:
        await store.connect()
        await store.publish_bundle(b"a bundle")
        await store.put_status("daemon-a", b'{"daemon_id": "daemon-a"}')
        await store.put_status("daemon-b", b'{"daemon_id": "daemon-b"}')
        plant(root / "status" / f"{daemon_token('daemon-b')}.json")
        plant(root / "bundles" / "current")

        statuses = await store.statuses()
        with pytest.raises(StoreUnavailable, match="current") as refused:
            await store.current_bundle()

        assert statuses == {"daemon-a": b'{"daemon_id": "daemon-a"}'}
        assert "took longer" not in str(refused.value)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("setting", "fix"),
    [
        ("directory.store", "fix directory.store)"),
        ("store.url", "fix store.url)"),
        ("", "fix the setting that names it)"),
    ],
    ids=["directory-store", "collector", "unnamed"],
)
def test_dir_store_missing_names_the_setting_it_came_from(tmp_path, setting, fix):
    missing = tmp_path / "not-mounted"
    store = open_store(f"dir://{missing}", timeout=TIMEOUT, setting=setting)

    with pytest.raises(StoreUnavailable) as caught:
        asyncio.run(store.connect())

    assert str(caught.value) == (
        f"dir://{missing}: {missing} is not a directory (create it or mount the "
        f"volume, or {fix}"
    )
