"""Shipping sealed audit segments to a real central store (dir:// and a real
nats-server): in order, exactly once, marked shipped only on
acknowledgement, through outages, slow stores and restarts; the backlog
ceiling; retention that never prunes what was not shipped."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable

import grpc
import pytest
from kynara.v1 import audit_pb2 as pb
from support import error_of, small_refund

from kynara_sidecar.audit import prove
from kynara_sidecar.audit.keys import generate_key
from kynara_sidecar.audit.record import RECORD_VERSION, AuditRecordV1, RecordKind
from kynara_sidecar.audit.segments import segment_message
from kynara_sidecar.audit.store import AuditStore
from kynara_sidecar.audit.writer import AuditWriter, Sealing
from kynara_sidecar.config import BacklogPolicy, SyncConfig
from kynara_sidecar.errors import AuditUnavailable
from kynara_sidecar.metrics import Metrics
from kynara_sidecar.sync import open_store, retry_delay, segment_message_id
from kynara_sidecar.sync._session import StoreSession
from kynara_sidecar.sync.shipper import BacklogGate, SegmentShipper

ORIGIN = "daemon-a"
# 2026-12-04T09:00:00Z in nanoseconds.
T0 = 1_796_374_800 * 1_000_000_000
# Bounds on waiting for a condition; the conditions are met in well under
# a second here, the bound only stops a broken run from hanging.
WAIT_SECONDS = 20.0
# A fast retry schedule, so outages in tests end quickly.
FAST = {
    "poll_seconds": 0.05,
    "retry_min_seconds": 0.02,
    "retry_max_seconds": 0.1,
    "timeout_seconds": 2.0,
}
SENTINEL = "sentinel"


class Clock:
    def __init__(self, nanos: int = T0):
        self.nanos = nanos

    def __call__(self) -> int:
        return self.nanos


def record(n: int, clock: Clock) -> AuditRecordV1:
    seconds, nanos = divmod(clock(), 1_000_000_000)
    stamp = f"2026-12-04T09:{(seconds // 60) % 60:02d}:{seconds % 60:02d}"
    return AuditRecordV1(
        v=RECORD_VERSION,
        kind=RecordKind.DECISION,
        time=f"{stamp}.{nanos:09d}Z",
        daemon_id=ORIGIN,
        decision_id=f"dec-{n}",
        action="payments.refund.issue",
        decision="allow",
        reason=f"rule {n} allowed",
    )


async def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Wait until ``condition()`` holds, checking every few milliseconds."""

    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    try:
        await asyncio.wait_for(poll(), WAIT_SECONDS)
    except TimeoutError:
        raise AssertionError(f"not within {WAIT_SECONDS}s: {what}") from None


# ------------------------------------------------------------------ stores


class Central:
    """A real central store the test can take down and bring back."""

    def __init__(self, kind: str, tmp_path, request):
        self.kind = kind
        if kind == "dir":
            self.root = tmp_path / "central"
            self.root.mkdir()
            self.url = f"dir://{self.root}"
            self.nats = None
        else:
            self.nats = request.getfixturevalue("nats_server")
            self.url = self.nats.url

    def down(self) -> None:
        if self.nats is not None:
            self.nats.stop()
        else:
            self.root.rename(self.root.with_name("central-away"))

    def up(self) -> None:
        if self.nats is not None:
            self.nats.start()
        else:
            self.root.with_name("central-away").rename(self.root)

    def open(self):
        return open_store(self.url, timeout=FAST["timeout_seconds"], poll_seconds=0.05)


@pytest.fixture(params=["dir", "nats"])
def central(request, tmp_path) -> Central:
    return Central(request.param, tmp_path, request)


async def ship_sentinel(central: Central) -> None:
    """Ship a marker after everything else, under the same daemon: a
    consumer that reaches it has seen every earlier message."""
    store = central.open()
    await store.connect()
    await store.ship_segment(ORIGIN, SENTINEL, b"")
    await store.close()


async def consume_all(central: Central, consumer: str = "test") -> list[tuple]:
    """(msg_id, Segment) of every message before the sentinel, acknowledged."""
    await ship_sentinel(central)
    store = central.open()
    await store.connect()
    seen: list[tuple[str, pb.Segment]] = []

    async def read() -> None:
        async for delivery in store.segments(consumer):
            await delivery.ack()
            assert delivery.daemon_id == ORIGIN
            if delivery.msg_id == SENTINEL:
                return
            seen.append((delivery.msg_id, pb.Segment.FromString(delivery.data)))

    try:
        await asyncio.wait_for(read(), WAIT_SECONDS)
    finally:
        await store.close()
    return seen


def assert_exactly_once_in_order(seen: list[tuple], audit: AuditStore) -> None:
    """The messages carry records 1..latest checkpoint, each once, in order,
    each under its own message id and its segment's checkpoint."""
    ids = [msg_id for msg_id, _ in seen]
    assert len(ids) == len(set(ids)), f"duplicates: {ids}"
    records: list[bytes] = []
    for msg_id, message in seen:
        checkpoint = message.checkpoint
        assert message.first_seq == len(records) + 1
        assert msg_id == segment_message_id(message)
        assert audit.checkpoint(checkpoint.tree_size).root == checkpoint.root.hex()
        records.extend(message.records)
    latest = audit.latest_checkpoint().tree_size
    assert records == [audit.get(seq).record_bytes for seq in range(1, latest + 1)]


# ----------------------------------------------------------------- harness


class Harness:
    """A real audit log, writer and shipper; one per test, on its loop."""

    def __init__(self, tmp_path, central: Central, **sync):
        self.tmp_path = tmp_path
        self.central = central
        self.clock = Clock()
        self.key = generate_key()
        self.metrics = Metrics()
        self.config = SyncConfig(store=central.url, **{**FAST, **sync})
        self.audit: AuditStore | None = None
        self.writer: AuditWriter | None = None
        self.shipper: SegmentShipper | None = None
        self.session: StoreSession | None = None
        self.count = 0

    async def start(
        self,
        *,
        segment_records: int = 4,
        max_message_bytes: int = 1 << 20,
        retention_seconds: float = 0,
        gate_limit: int | None = None,
    ) -> None:
        self.audit = AuditStore.open(self.tmp_path / "audit")
        sealing = Sealing(
            key=self.key,
            origin=ORIGIN,
            segment_records=segment_records,
            segment_seconds=3600,
            clock=self.clock,
            on_checkpoint=lambda cp, err: self.shipper and self.shipper.wake(),
            retention_seconds=retention_seconds,
            retain_unshipped=True,
        )
        self.writer = AuditWriter(self.audit, sealing=sealing)
        self.writer.start()
        self.gate = None
        if gate_limit is not None:
            self.gate = BacklogGate(
                self.writer,
                gate_limit,
                self.central.url,
                head=self.audit.head().seq,
                shipped=self.audit.shipped(),
            )
        self.session = StoreSession(self.central.open(), FAST["timeout_seconds"])
        self.shipper = SegmentShipper(
            self.audit,
            self.session,
            self.config,
            self.metrics,
            self.clock,
            gate=self.gate,
            max_message_bytes=max_message_bytes,
        )
        await self.shipper.start()

    async def append(self, count: int) -> None:
        sink = self.gate or self.writer
        for _ in range(count):
            self.count += 1
            await sink.append(record(self.count, self.clock))

    def sealed(self) -> int:
        latest = self.audit.latest_checkpoint()
        return latest.tree_size if latest else 0

    async def all_shipped(self) -> None:
        await wait_for(
            lambda: self.audit.shipped() == self.sealed() > 0,
            f"shipped through {self.sealed()}",
        )

    async def stop(self, grace: float = 5.0) -> None:
        """Close the writer (the final seal), give the shipper ``grace`` to
        ship it, and close the log: a clean daemon stop."""
        await self.writer.close()
        await self.shipper.stop(grace)
        await self.session.close()
        self.audit.close()

    def metric(self, name: str) -> float:
        return self.metrics.registry.get_sample_value(name) or 0.0


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())


# ------------------------------------------------------------------- tests


def test_segments_arrive_in_order_exactly_once(tmp_path, central):
    harness = Harness(tmp_path, central)

    async def scenario():
        # Two records' worth of bytes a message: each segment of four goes
        # as two messages or more.
        one = len(record(1, harness.clock).reason) + 200
        await harness.start(segment_records=4, max_message_bytes=2 * one)
        await harness.append(22)
        await harness.all_shipped()
        await harness.stop()
        audit = AuditStore.open(tmp_path / "audit", readonly=True)
        try:
            seen = await consume_all(central)
            assert_exactly_once_in_order(seen, audit)
            assert audit.latest_checkpoint().tree_size == 22
            assert audit.shipped() == 22
            assert len(seen) > len(list(audit.iter_checkpoints()))
        finally:
            audit.close()

    run(scenario)
    assert harness.metric("kynara_audit_shipped_segments_total") == 6
    assert harness.metric("kynara_audit_shipping_failures_total") == 0
    assert harness.metric("kynara_audit_shipping_backlog_records") == 0


def test_a_store_down_grows_the_backlog_and_back_drains_it(tmp_path, central):
    harness = Harness(tmp_path, central)
    backlog = "kynara_audit_shipping_backlog_segments"

    async def scenario():
        await harness.start(segment_records=4)
        await harness.append(8)
        await harness.all_shipped()
        central.down()
        await harness.append(12)
        await wait_for(
            lambda: (
                harness.metric(backlog) == 3
                and harness.metric("kynara_audit_shipping_failures_total") >= 1
            ),
            "a backlog of three segments, and a failure",
        )

        assert harness.audit.shipped() == 8
        assert harness.metric("kynara_audit_shipping_backlog_records") == 12
        assert harness.shipper.status.last_error

        central.up()
        await harness.all_shipped()
        await wait_for(lambda: harness.metric(backlog) == 0, "backlog drained")
        assert harness.shipper.status.last_error == ""
        await harness.stop()
        audit = AuditStore.open(tmp_path / "audit", readonly=True)
        try:
            assert_exactly_once_in_order(await consume_all(central), audit)
        finally:
            audit.close()

    run(scenario)


def test_a_store_that_never_answers_marks_nothing_shipped(tmp_path, request):
    central = Central("nats", tmp_path, request)
    harness = Harness(tmp_path, central, timeout_seconds=0.3)
    failures = "kynara_audit_shipping_failures_total"

    async def scenario():
        await harness.start(segment_records=4)
        await harness.session.call(harness.session.store.connect, "connect")
        # Stopped, not gone: the connection stays open and nothing answers.
        os.kill(central.nats.process.pid, signal.SIGSTOP)
        try:
            await harness.append(8)
            await wait_for(lambda: harness.metric(failures) >= 2, "two timeouts")
            assert harness.audit.shipped() == 0
            assert "sync.timeout_seconds" in harness.shipper.status.last_error
        finally:
            os.kill(central.nats.process.pid, signal.SIGCONT)
        await harness.all_shipped()
        await harness.stop()
        audit = AuditStore.open(tmp_path / "audit", readonly=True)
        try:
            assert_exactly_once_in_order(await consume_all(central), audit)
        finally:
            audit.close()

    run(scenario)


def test_a_restart_mid_segment_resends_as_duplicates_without_loss(tmp_path, central):
    harness = Harness(tmp_path, central)
    one = len(record(1, harness.clock).reason) + 200

    async def first_run():
        await harness.start(segment_records=4, max_message_bytes=2 * one)
        await harness.append(8)
        await harness.all_shipped()
        central.down()
        await harness.append(4)
        await wait_for(
            lambda: harness.shipper.status.backlog_segments == 1, "one unshipped"
        )
        # Stopped with the store down: the last segment stays unshipped.
        await harness.stop(grace=0.2)

    async def crash_mid_segment():
        # What a shipper killed after the store took the first message of
        # the segment, and before it took the rest, left in the store.
        central.up()
        audit = AuditStore.open(tmp_path / "audit", readonly=True)
        try:
            (span, *_) = prove.sealed_segments(audit, audit.shipped())
            # The same byte budget: a message id always names the same bytes.
            first = span.previous_tree_size + 1
            message = segment_message(audit, span, first, 2 * one)
        finally:
            audit.close()
        store = central.open()
        await store.connect()
        msg_id = segment_message_id(message)
        assert await store.ship_segment(ORIGIN, msg_id, message.SerializeToString())
        await store.close()

    async def second_run():
        await harness.start(segment_records=4, max_message_bytes=2 * one)
        await harness.append(4)
        await harness.all_shipped()
        await harness.stop()
        audit = AuditStore.open(tmp_path / "audit", readonly=True)
        try:
            assert_exactly_once_in_order(await consume_all(central), audit)
            assert audit.shipped() == audit.latest_checkpoint().tree_size
        finally:
            audit.close()

    run(first_run)
    assert harness.metric("kynara_audit_shipping_failures_total") >= 1
    run(crash_mid_segment)
    harness.metrics = Metrics()
    run(second_run)
    assert harness.metric("kynara_audit_shipping_failures_total") == 0
    # The close of the first run sealed the segment it stopped in; the
    # second run ships it (a duplicate first message) and its own.
    assert harness.metric("kynara_audit_shipped_segments_total") >= 2


def test_fail_closed_refuses_past_the_ceiling_and_recovers(tmp_path):
    central = Central("dir", tmp_path, None)
    harness = Harness(
        tmp_path,
        central,
        backlog_max_records=6,
        backlog_policy=BacklogPolicy.FAIL_CLOSED,
    )

    async def scenario():
        await harness.start(segment_records=2, gate_limit=6)
        central.down()
        await harness.append(6)
        await harness.append(1)  # the seventh: the backlog passes the ceiling

        with pytest.raises(AuditUnavailable, match="sync.backlog_max_records"):
            await harness.append(1)
        assert harness.audit.head().seq == 7

        central.up()
        await harness.writer.append(record(99, harness.clock), seal=True)
        await harness.all_shipped()
        await wait_for(lambda: not harness.gate.over, "back under the ceiling")
        await harness.append(1)
        assert harness.audit.head().seq == 9
        await harness.stop()

    run(scenario)


def test_keep_deciding_goes_on_past_the_ceiling_and_says_so(tmp_path, caplog):
    central = Central("dir", tmp_path, None)
    harness = Harness(tmp_path, central, backlog_max_records=3)

    async def scenario():
        await harness.start(segment_records=2)
        central.down()
        await harness.append(6)
        await wait_for(lambda: harness.shipper.status.over_ceiling, "over ceiling")
        await harness.append(4)
        await wait_for(
            lambda: harness.shipper.status.backlog_records == 10, "ten behind"
        )
        central.up()
        await harness.all_shipped()
        await wait_for(
            lambda: not harness.shipper.status.over_ceiling, "under the ceiling"
        )
        await harness.stop()

    with caplog.at_level("INFO", logger="kynara.sync"):
        run(scenario)

    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("audit backlog past its ceiling: still deciding") == 1
    assert messages.count("audit backlog back under its ceiling") == 1


def test_retention_never_prunes_what_was_not_shipped(tmp_path):
    central = Central("dir", tmp_path, None)
    harness = Harness(tmp_path, central)

    async def scenario():
        await harness.start(segment_records=2, retention_seconds=60)
        await harness.append(4)
        await harness.all_shipped()
        central.down()
        await harness.append(4)
        harness.clock.nanos += 3600 * 1_000_000_000
        await harness.append(4)  # seals: every segment is past retention

        assert harness.audit.seam() == 4
        assert harness.audit.shipped() == 4
        assert harness.audit.get(5) is not None

        central.up()
        await harness.all_shipped()
        harness.clock.nanos += 3600 * 1_000_000_000
        await harness.append(2)  # the next seal prunes what was shipped
        assert harness.audit.seam() == 12
        await harness.stop()

    run(scenario)


@pytest.mark.parametrize(
    ("failures", "draw", "expected"),
    [(1, 0.0, 0.2), (1, 0.999, 0.2), (3, 0.0, 0.4), (3, 1.0, 0.8), (40, 0.5, 22.5)],
)
def test_retry_delay_doubles_with_jitter_within_its_bounds(failures, draw, expected):
    assert retry_delay(failures, 0.2, 30.0, draw) == pytest.approx(expected)


def test_a_fail_closed_daemon_refuses_decisions_past_the_ceiling(
    tmp_path, start_daemon
):
    central = tmp_path / "central"  # missing: the store is down
    running = start_daemon(
        f"sync.store=dir://{central}",
        "sync.backlog_max_records=3",
        "sync.backlog_policy=fail_closed",
        "sync.retry_min_seconds=0.02",
        "sync.retry_max_seconds=0.1",
        "sync.poll_seconds=0.05",
        "audit.segment_records=2",
    )
    stub = running.stub()

    answered = 0
    while answered < 10 and _decides(stub):
        answered += 1
    status, metadata = error_of(lambda: stub.Decide(small_refund()))

    assert 0 < answered < 10
    assert status == grpc.StatusCode.UNAVAILABLE
    assert metadata["kynara-error-code"] == "audit_unavailable"

    central.mkdir()
    wait_until(lambda: _decides(stub), "decisions answered again")
    # Reopened once under the ceiling; the rest of the backlog follows.
    wait_until(
        lambda: running.daemon._store.shipped() >= answered, "the backlog shipped"
    )


def _decides(stub) -> bool:
    try:
        stub.Decide(small_refund())
    except grpc.RpcError as err:
        assert "sync.backlog_max_records" in err.details()
        return False
    return True


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """``wait_for`` for a test thread (the daemon runs on a loop of its own)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT_SECONDS}s: {what}")
        time.sleep(0.01)
