"""The group-commit writer thread, driven from asyncio."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from kynara_sidecar.audit.keys import generate_key
from kynara_sidecar.audit.store import AuditStore
from kynara_sidecar.audit.verify import verify_log, verify_store
from kynara_sidecar.audit.writer import AuditWriter, Sealing
from kynara_sidecar.errors import AuditUnavailable

from ._support import make_record

APPROVALS = b"approvals"


class Commits:
    """An on_commit hook that records batch sizes. It can hold the writer
    thread after its first commit until ``hold_until(first_size)`` is true, so
    that the remaining appends are all queued before the next batch is taken."""

    def __init__(self, hold_until=None):
        self.sizes: list[int] = []
        self.seconds: list[float] = []
        self._hold_until = hold_until

    def __call__(self, size: int, seconds: float) -> None:
        if not self.sizes and self._hold_until is not None:
            deadline = time.monotonic() + 10
            while not self._hold_until(size) and time.monotonic() < deadline:
                time.sleep(0.001)
        self.sizes.append(size)
        self.seconds.append(seconds)


async def _append_all(writer, count):
    return await asyncio.gather(*(writer.append(make_record(n)) for n in range(count)))


@pytest.mark.parametrize("durability", ["durable", "deferred"])
def test_concurrent_appends_get_consecutive_seqs_and_share_commits(
    open_store, durability
):
    store = open_store(durability=durability)
    count = 64
    writer = None
    commits = Commits(hold_until=lambda size: writer.pending + size >= count)
    writer = AuditWriter(store, on_commit=commits)

    async def main():
        writer.start()
        results = await _append_all(writer, count)
        await writer.close()
        return results

    results = asyncio.run(main())

    assert sorted(r.seq for r in results) == list(range(1, count + 1))
    assert sum(commits.sizes) == count
    assert max(commits.sizes) > 1
    assert all(s >= 0 for s in commits.seconds)
    assert store.head().seq == count


def test_batches_never_exceed_max_batch(open_store):
    store = open_store()
    writer = None
    commits = Commits(hold_until=lambda size: writer.pending + size >= 20)
    writer = AuditWriter(store, max_batch=4, on_commit=commits)

    async def main():
        writer.start()
        await _append_all(writer, 20)
        await writer.close()

    asyncio.run(main())

    assert sum(commits.sizes) == 20
    assert max(commits.sizes) == 4


def test_durable_append_returns_after_the_record_is_committed(open_store):
    store = open_store()
    writer = AuditWriter(store)

    async def main():
        writer.start()
        appended = await writer.append(make_record(1))
        visible = store.get(appended.seq)
        await writer.close()
        return appended, visible

    appended, visible = asyncio.run(main())

    assert visible.record_bytes == appended.record_bytes
    assert visible.chain_hash == appended.chain_hash


@pytest.mark.parametrize("durability", ["durable", "deferred"])
def test_closed_writer_leaves_everything_on_disk(tmp_path, durability):
    store = AuditStore.open(tmp_path / "log", durability=durability)
    writer = AuditWriter(store, deferred_window=0.01)

    async def main():
        writer.start()
        await _append_all(writer, 30)
        await writer.close()

    asyncio.run(main())
    store.close()

    report = verify_log(tmp_path / "log")
    assert report.ok
    assert report.records == 30


def test_state_changes_commit_with_their_record(open_store):
    store = open_store(extra_dbs=[APPROVALS])
    writer = AuditWriter(store)

    async def main():
        writer.start()
        appended = await writer.append(make_record(1), [(APPROVALS, b"a1", b"used")])
        await writer.close()
        return appended

    appended = asyncio.run(main())

    assert appended.seq == 1
    assert store.get_state(APPROVALS, b"a1") == b"used"


def test_bad_state_change_fails_only_its_own_caller(open_store):
    store = open_store(extra_dbs=[APPROVALS])
    writer = AuditWriter(store)

    async def main():
        writer.start()
        results = await asyncio.gather(
            writer.append(make_record(1)),
            writer.append(make_record(2), [(b"nope", b"k", b"v")]),
            writer.append(make_record(3)),
            return_exceptions=True,
        )
        await writer.close()
        return results

    first, bad, third = asyncio.run(main())

    assert isinstance(bad, ValueError)
    assert "database must be one of the extra_dbs" in str(bad)
    assert (first.seq, third.seq) == (1, 2)


def test_full_log_fails_the_batch_consumes_no_seq_and_the_writer_survives(tmp_path):
    store = AuditStore.open(tmp_path / "log", map_size=256 * 1024)
    writer = AuditWriter(store)

    async def main():
        writer.start()
        done = []
        with pytest.raises(AuditUnavailable, match="is full") as caught:
            for n in range(1, 10_000):
                done.append(await writer.append(make_record(n, reason="x" * 40_000)))
        small = await writer.append(make_record(0, reason="small"))
        await writer.close()
        return done, small, caught.value

    done, small, error = asyncio.run(main())

    assert writer.error is None
    assert small.seq == done[-1].seq + 1
    assert "raise audit.map_size" in str(error)
    store.close()
    assert verify_log(tmp_path / "log").ok


def test_storage_failure_makes_the_writer_refuse_every_later_append(tmp_path):
    store = AuditStore.open(tmp_path / "log")
    writer = AuditWriter(store)

    async def main():
        writer.start()
        await writer.append(make_record(1))
        store.close()  # the environment disappears under the writer
        with pytest.raises(AuditUnavailable, match="write failed") as first:
            await writer.append(make_record(2))
        with pytest.raises(AuditUnavailable) as later:
            await writer.append(make_record(3))
        await writer.close()
        return first.value, later.value

    first, later = asyncio.run(main())

    assert str(later).endswith(
        f"refuses appends after an earlier failure: {writer.error}"
    )
    assert str(first) == str(writer.error)
    assert later.__cause__ is writer.error


def test_append_after_close_is_refused(open_store):
    writer = AuditWriter(open_store())

    async def main():
        writer.start()
        await writer.close()
        await writer.close()
        with pytest.raises(AuditUnavailable, match=r"audit writer for .* is closed"):
            await writer.append(make_record(1))

    asyncio.run(main())


def test_append_before_start_is_a_programming_error(open_store):
    writer = AuditWriter(open_store())

    async def main():
        with pytest.raises(RuntimeError, match=r"append\(\) called before start"):
            await writer.append(make_record(1))

    asyncio.run(main())


def test_failing_on_commit_hook_does_not_fail_appends(open_store, caplog):
    def broken_hook(size, seconds):
        raise RuntimeError("metrics are down")

    writer = AuditWriter(open_store(), on_commit=broken_hook)

    async def main():
        writer.start()
        appended = await writer.append(make_record(1))
        await writer.close()
        return appended

    assert asyncio.run(main()).seq == 1
    assert "audit on_commit hook failed" in caplog.text


def test_close_commits_what_is_still_queued(open_store):
    store = open_store()
    release = threading.Event()
    writer = AuditWriter(store, on_commit=lambda size, seconds: release.wait(10))

    async def main():
        writer.start()
        tasks = [asyncio.create_task(writer.append(make_record(n))) for n in range(10)]
        await asyncio.sleep(0)
        closing = asyncio.create_task(writer.close())
        await asyncio.sleep(0.01)
        release.set()
        await closing
        return [t.result().seq for t in tasks]

    seqs = asyncio.run(main())

    assert sorted(seqs) == list(range(1, 11))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_batch": 0}, "max_batch must be at least 1, got 0"),
        ({"deferred_window": 0}, "deferred_window must be above 0 seconds, got 0"),
    ],
)
def test_bad_writer_options_are_refused(open_store, options, message):
    with pytest.raises(ValueError, match=message):
        AuditWriter(open_store(), **options)


def _sealing(key) -> Sealing:
    # Segments far too large to seal on their own during a test.
    return Sealing(
        key=key,
        origin="daemon-a",
        segment_records=1000,
        segment_seconds=3600.0,
        clock=lambda: 1_796_374_800 * 10**9,
    )


def test_a_sealing_caller_ends_its_transaction_with_a_checkpoint_at_its_record(
    open_store,
):
    store = open_store()
    key = generate_key()
    writer = None
    commits = Commits(hold_until=lambda size: writer.pending >= 5)
    writer = AuditWriter(store, on_commit=commits, sealing=_sealing(key))

    async def main():
        writer.start()
        await writer.append(make_record(0))
        appended = await asyncio.gather(
            writer.append(make_record(1)),
            writer.append(make_record(2)),
            writer.append(make_record(3), seal=True),
            writer.append(make_record(4)),
            writer.append(make_record(5)),
        )
        sealed = [cp.tree_size for cp in store.iter_checkpoints()]
        await writer.close()
        return appended, sealed

    appended, sealed = asyncio.run(main())

    assert appended[2].seq == 4
    assert commits.sizes == [1, 3, 2]
    assert sealed == [4]
    assert [cp.tree_size for cp in store.iter_checkpoints()] == [4, 6]
    report = verify_store(store, {key.key_id: key.public()}, None)
    assert report.ok, report


def test_seal_without_sealing_seals_nothing(open_store):
    store = open_store()
    writer = AuditWriter(store)

    async def main():
        writer.start()
        appended = await writer.append(make_record(0), seal=True)
        await writer.close()
        return appended

    assert asyncio.run(main()).seq == 1
    assert store.latest_checkpoint() is None
