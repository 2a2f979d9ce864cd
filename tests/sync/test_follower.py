"""The bundle follower against a real dir:// store and a real LMDB audit log.

The activate callback commits a marker with the bundle's state changes, as
the daemon does, so what the log keeps is checked too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import pathlib
import shutil
import time

import pytest

from kynara_sidecar.audit.record import marker_record
from kynara_sidecar.audit.store import AuditStore, bundle_changes
from kynara_sidecar.metrics import Metrics
from kynara_sidecar.sync import MAX_BUNDLE_BYTES, BundleEntry
from kynara_sidecar.sync.bundle import verify_bundle
from kynara_sidecar.sync.dir_store import DirStore
from kynara_sidecar.sync.follower import (
    BUNDLES,
    BundleFile,
    BundleFollower,
    Followers,
    SyncOutcome,
    bundle_digest,
)
from kynara_sidecar.sync.nats_store import NatsStore

from ._bundles import (
    BROKEN_RULE,
    KEY,
    OTHER_KEY,
    bad_signature,
    broken_compile,
    policy_dir,
    revision_of,
    signed,
    truncated,
)

TRUSTED = {KEY.key_id: KEY.public()}
# Conditions are waited on, never slept for; this only bounds a broken run.
WAIT_SECONDS = 10.0


class Harness:
    """A follower, its store, its audit log and its metrics."""

    def __init__(
        self, tmp_path: pathlib.Path, *, trusted=TRUSTED, store=None, followed=None
    ):
        self.root = tmp_path / "store"
        self.root.mkdir(parents=True, exist_ok=True)
        self.store = store or CountingStore(f"dir://{self.root}", poll_seconds=0.05)
        self.audit = AuditStore.open(tmp_path / "audit", map_size=1 << 24)
        self.metrics = Metrics()
        self.activated: list[str] = []
        self.outcomes: list[str] = []
        self.follower = BundleFollower(
            self.store,
            trusted,
            self.activate,
            self.metrics,
            poll_seconds=0.05,
            retry_min_seconds=0.01,
            retry_max_seconds=0.05,
            on_outcome=lambda result: self.outcomes.append(str(result.outcome)),
            **({} if followed is None else {"followed": followed}),
        )

    async def activate(self, verified, entry: BundleEntry) -> None:
        marker = marker_record("policy_activated", "test", "2026-12-07T09:00:00Z")
        changes = bundle_changes(entry.digest, entry.data)
        await asyncio.to_thread(self.audit.append_batch, [marker], changes)
        self.activated.append(verified.revision)

    def count(self, outcome: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "kynara_policy_sync_total", {"outcome": outcome}
        )
        return value or 0.0

    async def close(self) -> None:
        await self.follower.close()
        self.audit.close()


class CountingStore(DirStore):
    """The real dir store, counting reads of the current bundle so a test
    can wait for the loop to have polled again."""

    reads = 0

    async def current_bundle(self):
        self.reads += 1
        return await super().current_bundle()


async def wait_until(condition, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_SECONDS
    while not condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def run(tmp_path, scenario, **harness):
    async def main():
        h = Harness(tmp_path, **harness)
        try:
            await h.store.connect()
            await scenario(h)
        finally:
            await h.close()

    asyncio.run(main())


def test_sync_now_activates_a_published_bundle_and_the_log_keeps_it(tmp_path):
    data = signed(tmp_path, "r1")

    async def scenario(h: Harness):
        digest = await h.store.publish_bundle(data)

        result = await h.follower.sync_now()

        assert result.outcome is SyncOutcome.ACTIVATED
        assert result.revision == revision_of(policy_dir(tmp_path, "r1"))
        assert result.previous_revision == ""
        assert result.digest == digest
        assert h.follower.active.digest == digest
        assert h.audit.active_bundle() == (digest, data)
        assert h.count("activated") == 1
        assert h.follower.last_sync == result
        info = h.metrics.registry.get_sample_value(
            "kynara_policy_bundle_revision_info", {"revision": result.revision}
        )
        assert info == 1

    run(tmp_path, scenario)


def test_the_same_digest_is_unchanged(tmp_path):
    async def scenario(h: Harness):
        await h.store.publish_bundle(signed(tmp_path, "r1"))
        first = await h.follower.sync_now()

        again = await h.follower.sync_now()

        assert again.outcome is SyncOutcome.UNCHANGED
        assert again.revision == again.previous_revision == first.revision
        assert h.activated == [first.revision]
        assert h.count("unchanged") == 1

    run(tmp_path, scenario)


def test_an_empty_store_is_unchanged_and_says_so(tmp_path):
    async def scenario(h: Harness):
        result = await h.follower.sync_now()

        assert result.outcome is SyncOutcome.UNCHANGED
        assert "holds no bundle yet" in result.error
        assert h.follower.active is None

    run(tmp_path, scenario)


BROKEN = {
    "bad_signature": (bad_signature, ["bad_signature", "bundle.sig"]),
    "does_not_compile": (
        broken_compile,
        ["does_not_compile", "payments.yaml", BROKEN_RULE],
    ),
    "truncated": (truncated, ["malformed", "truncated"]),
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_a_broken_bundle_is_refused_and_the_previous_revision_stays(tmp_path, kind):
    make, reasons = BROKEN[kind]
    good = signed(tmp_path, "r1")

    async def scenario(h: Harness):
        good_digest = await h.store.publish_bundle(good)
        first = await h.follower.sync_now()
        bad_digest = await h.store.publish_bundle(make(tmp_path, seconds=60))

        result = await h.follower.sync_now()

        assert result.outcome is SyncOutcome.REFUSED
        for reason in reasons:
            assert reason in result.error
        assert bad_digest in result.error
        assert result.revision == result.previous_revision == first.revision
        assert h.follower.active.digest == good_digest
        assert h.audit.active_bundle() == (good_digest, good)
        assert h.audit.get_bundle(bad_digest) is None
        assert h.count("refused") == 1
        assert h.count("activated") == 1

    run(tmp_path, scenario)


def test_an_older_bundle_is_refused_unless_forced(tmp_path):
    older = signed(tmp_path, "old", seconds=0)
    newer = signed(tmp_path, "new", seconds=30)

    async def scenario(h: Harness):
        await h.store.publish_bundle(newer)
        await h.follower.sync_now()
        await h.store.publish_bundle(older)

        refused = await h.follower.sync_now()
        forced = await h.follower.sync_now(force=True)

        assert refused.outcome is SyncOutcome.REFUSED
        assert "older than the active revision" in refused.error
        assert "--force" in refused.error
        assert forced.outcome is SyncOutcome.ACTIVATED
        assert forced.revision == revision_of(policy_dir(tmp_path, "old"))
        assert forced.previous_revision == revision_of(policy_dir(tmp_path, "new"))
        assert h.audit.active_bundle()[1] == older

    run(tmp_path, scenario)


def test_a_store_that_is_gone_is_unreachable(tmp_path):
    async def scenario(h: Harness):
        await h.store.publish_bundle(signed(tmp_path, "r1"))
        await h.follower.sync_now()
        shutil.rmtree(h.root)

        result = await h.follower.sync_now()

        assert result.outcome is SyncOutcome.UNREACHABLE
        assert str(h.root) in result.error
        assert result.revision == revision_of(policy_dir(tmp_path, "r1"))
        assert h.count("unreachable") == 1

    run(tmp_path, scenario)


def test_the_loop_follows_publishes_and_does_not_retry_a_refused_digest(tmp_path):
    async def scenario(h: Harness):
        h.follower.start()
        await h.store.publish_bundle(signed(tmp_path, "r1"))
        r1 = revision_of(policy_dir(tmp_path, "r1"))
        await wait_until(lambda: h.activated == [r1], "r1 to activate")

        await h.store.publish_bundle(bad_signature(tmp_path, seconds=60))
        await wait_until(lambda: h.count("refused") == 1, "the refusal")
        reads = h.store.reads
        await wait_until(lambda: h.store.reads >= reads + 3, "three more polls")

        assert h.count("refused") == 1
        assert h.follower.last_sync.outcome is SyncOutcome.REFUSED
        assert h.activated == [r1]

    run(tmp_path, scenario)


def test_the_loop_reconnects_once_the_store_is_back(tmp_path):
    async def scenario(h: Harness):
        shutil.rmtree(h.root)
        h.follower.start()
        await wait_until(lambda: h.count("unreachable") >= 2, "failed attempts")

        h.root.mkdir()
        await h.store.connect()
        await h.store.publish_bundle(signed(tmp_path, "r1"))
        r1 = revision_of(policy_dir(tmp_path, "r1"))
        await wait_until(lambda: h.activated == [r1], "r1 to activate")

        assert h.follower.active.revision == r1
        assert h.audit.active_bundle() is not None

    run(tmp_path, scenario)


def test_restore_verifies_the_stored_bundle_again(tmp_path):
    data = signed(tmp_path, "r1")
    entry = BundleEntry(digest=bundle_digest(data), data=data)

    async def scenario_trusted(h: Harness):
        assert await h.follower.restore(entry) is True
        assert h.follower.active.digest == entry.digest
        assert h.follower.last_sync is None

    async def scenario_untrusted(h: Harness):
        assert await h.follower.restore(entry) is False
        assert h.follower.active is None
        assert h.activated == []

    run(tmp_path / "a", scenario_trusted)
    run(
        tmp_path / "b",
        scenario_untrusted,
        trusted={OTHER_KEY.key_id: OTHER_KEY.public()},
    )


def test_a_bundle_file_source_reads_the_file_each_sync(tmp_path):
    path = tmp_path / "policies.bundle"

    async def scenario(h: Harness):
        follower = BundleFollower(BundleFile(path), TRUSTED, h.activate, h.metrics)
        missing = await follower.sync_now()
        path.write_bytes(signed(tmp_path, "r1"))
        activated = await follower.sync_now()

        assert missing.outcome is SyncOutcome.UNREACHABLE
        assert str(path) in missing.error
        assert activated.outcome is SyncOutcome.ACTIVATED

    run(tmp_path, scenario)


def test_the_loop_follows_a_nats_store_across_an_outage(tmp_path, nats_server):
    r1 = revision_of(policy_dir(tmp_path, "r1"))
    r2 = revision_of(policy_dir(tmp_path, "r2"))

    async def publish(data: bytes) -> None:
        publisher = NatsStore(nats_server.url, timeout=2.0)
        try:
            await publisher.connect()
            await publisher.publish_bundle(data)
        finally:
            await publisher.close()

    async def scenario(h: Harness):
        h.follower.start()
        await publish(signed(tmp_path, "r1", seconds=0))
        await wait_until(lambda: h.activated == [r1], "r1 to activate")

        await asyncio.to_thread(nats_server.stop)
        await wait_until(lambda: h.count("unreachable") >= 1, "the outage")
        await asyncio.to_thread(nats_server.start)
        await publish(signed(tmp_path, "r2", seconds=60))
        await wait_until(lambda: h.activated == [r1, r2], "r2 after the outage")

        assert h.follower.active.revision == r2
        assert h.count("refused") == 0

    run(tmp_path, scenario, store=NatsStore(nats_server.url, timeout=0.5))


def test_the_outcome_hook_fires_on_each_change_not_on_each_poll(tmp_path):
    async def scenario(h: Harness):
        await h.store.publish_bundle(signed(tmp_path, "r1"))
        h.follower.start()
        await wait_until(lambda: h.count("unchanged") >= 1, "a poll to find r1")
        reads = h.store.reads
        await wait_until(lambda: h.store.reads >= reads + 5, "five more polls")
        await h.store.publish_bundle(bad_signature(tmp_path, seconds=10))
        await wait_until(lambda: h.count("refused") >= 1, "the refusal")
        reads = h.store.reads
        await wait_until(lambda: h.store.reads >= reads + 5, "five more polls")

        assert h.outcomes == ["activated", "unchanged", "refused"]
        assert h.count("unchanged") >= 5

    run(tmp_path, scenario)


def _future_bundle(tmp_path, variant: str, ahead_seconds: int) -> bytes:
    """A good bundle created ``ahead_seconds`` past the real clock (the
    harness's follower reads the real clock)."""
    from kynara_sidecar.decision import Timestamp
    from kynara_sidecar.sync.bundle import build_bundle

    now = time.time_ns() // 1_000_000_000
    return build_bundle(
        policy_dir(tmp_path, variant), KEY, Timestamp(now + ahead_seconds, 0)
    )


def test_a_bundle_from_the_future_is_refused_and_does_not_block_later_ones(
    tmp_path, caplog
):
    future = _future_bundle(tmp_path, "future", ahead_seconds=3600)
    later = signed(tmp_path, "later")

    async def scenario(h: Harness):
        await h.store.publish_bundle(future)
        refused = await h.follower.sync_now()
        forced = await h.follower.sync_now(force=True)
        await h.store.publish_bundle(later)
        activated = await h.follower.sync_now()

        assert refused.outcome is SyncOutcome.REFUSED
        assert refused.kind == "future"
        assert "created in the future" in refused.error
        assert "sync.max_clock_skew_seconds (300)" in refused.error
        # Forcing takes an older bundle, never one from the future.
        assert forced.outcome is SyncOutcome.REFUSED
        assert activated.outcome is SyncOutcome.ACTIVATED
        assert h.activated == [revision_of(policy_dir(tmp_path, "later"))]

    with caplog.at_level("ERROR", logger="kynara.sync"):
        run(tmp_path, scenario)
    kinds = [getattr(r, "fields", {}).get("kind") for r in caplog.records]
    assert "future" in kinds


def test_a_bundle_within_the_clock_skew_is_taken(tmp_path):
    near = _future_bundle(tmp_path, "near", ahead_seconds=60)

    async def scenario(h: Harness):
        await h.store.publish_bundle(near)

        result = await h.follower.sync_now()

        assert result.outcome is SyncOutcome.ACTIVATED

    run(tmp_path, scenario)


def test_a_bundle_file_over_the_cap_is_refused_as_too_large_and_logged_once(
    tmp_path, caplog
):
    path = tmp_path / "policies.bundle"
    with path.open("wb") as file:
        file.truncate(MAX_BUNDLE_BYTES + 1)

    async def scenario(h: Harness):
        follower = BundleFollower(BundleFile(path), TRUSTED, h.activate, h.metrics)
        first = await follower.sync_now()
        second = await follower.sync_now()

        assert first.outcome is SyncOutcome.REFUSED
        assert first.kind == "too_large"
        assert f"{MAX_BUNDLE_BYTES}-byte cap" in first.error
        assert second.outcome is SyncOutcome.REFUSED
        assert h.count("refused") == 2
        assert h.count("unreachable") == 0

    with caplog.at_level("ERROR", logger="kynara.sync"):
        run(tmp_path, scenario)
    refusals = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(refusals) == 1, [r.getMessage() for r in refusals]


def test_an_unknown_key_refusal_names_the_setting_to_change(tmp_path):
    data = signed(tmp_path, "r1")

    async def scenario(h: Harness):
        await h.store.publish_bundle(data)

        result = await h.follower.sync_now()

        assert result.kind == "unknown_key"
        assert "add its public key to policy.trusted_keys" in result.error
        assert "--trusted-key" not in result.error

    run(tmp_path, scenario, trusted={OTHER_KEY.key_id: OTHER_KEY.public()})


def test_a_kept_bundle_refused_at_restart_names_the_audit_log(tmp_path, caplog):
    data = signed(tmp_path, "r1")
    entry = BundleEntry(digest=bundle_digest(data), data=data)

    async def scenario(h: Harness):
        assert await h.follower.restore(entry) is False

    with caplog.at_level("ERROR", logger="kynara.sync"):
        run(tmp_path, scenario, trusted={OTHER_KEY.key_id: OTHER_KEY.public()})
    (record,) = [r for r in caplog.records if r.levelname == "ERROR"]
    error = record.fields["error"]
    assert "kept in the audit log (audit.path)" in error
    assert "dir://" not in error


class HangingStore(DirStore):
    """A store whose bundle reads never end and swallow cancellation, as a
    call stuck where a cancel cannot reach would."""

    entered = False
    # Set by the test once done, so the loop can end and asyncio.run return.
    released = False

    async def current_bundle(self):
        self.entered = True
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if self.released:
                    raise

    async def watch_bundles(self):
        yield await self.current_bundle()


def test_close_gives_up_on_a_loop_that_will_not_end(tmp_path):
    root = tmp_path / "hanging"
    root.mkdir()
    store = HangingStore(f"dir://{root}")

    async def scenario(h: Harness):
        follower = BundleFollower(store, TRUSTED, h.activate, h.metrics)
        follower.start()
        await wait_until(lambda: store.entered, "the loop to enter the store call")

        stopped = await follower.close(timeout=0.3)
        store.released = True

        assert stopped is False

    run(tmp_path, scenario)


def test_a_bundle_from_the_future_is_logged_once_while_the_loop_retries(
    tmp_path, caplog
):
    future = _future_bundle(tmp_path, "future-loop", ahead_seconds=3600)

    async def scenario(h: Harness):
        await h.store.publish_bundle(future)
        h.follower.start()
        await wait_until(lambda: h.count("refused") >= 1, "the refusal")
        refused = h.count("refused")
        reads = h.store.reads
        await wait_until(lambda: h.store.reads >= reads + 5, "five more polls")

        assert h.count("refused") > refused  # retried: time may make it good
        assert h.outcomes == ["refused"]

    with caplog.at_level("ERROR", logger="kynara.sync"):
        run(tmp_path, scenario)
    kinds = [getattr(r, "fields", {}).get("kind") for r in caplog.records]
    assert kinds.count("future") == 1


def test_a_copy_of_bundles_logs_its_revision_as_the_policy_revision(tmp_path, caplog):
    # The daemon follows a copy of BUNDLES with its own verify, never
    # BUNDLES itself: the log must still name the policy revision.
    followed = dataclasses.replace(
        BUNDLES, verify=functools.partial(verify_bundle, directory="required")
    )
    data = signed(tmp_path, "copy")

    async def scenario(h: Harness):
        await h.store.publish_bundle(data)
        result = await h.follower.sync_now()
        assert result.outcome is SyncOutcome.ACTIVATED

    caplog.set_level(logging.INFO, logger="kynara")
    run(tmp_path, scenario, followed=followed)
    (record,) = [r for r in caplog.records if r.getMessage() == "bundle activated"]
    fields = record.fields
    assert fields["policy_revision"] == revision_of(policy_dir(tmp_path, "copy"))
    assert "directory_revision" not in fields


def test_followers_without_any_follower_is_a_value_error():
    with pytest.raises(ValueError, match="at least one follower"):
        Followers(None, None)
