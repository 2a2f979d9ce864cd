"""The whole evidence path, end to end: decisions answered by real daemons
(``kynara-sidecar run`` child processes), their sealed audit segments
shipped through a real central store (a real nats-server; the outage test
runs on a dir:// store as well), and a real collector (``kynara-collector
run``, a child process too) verifying and archiving them; the archive read
back over the collector's HTTP query and compared, byte for byte, with the
daemon's own LMDB once the daemon has stopped.

The faults are the issue's: the store cut off for part of a run, a network
cut (the nats-server SIGKILLed) in the middle of a multi-message segment, a
daemon SIGKILLed in the middle of one, a log restored from a snapshot (a
fork), and two live daemons sharing one daemon id. A cut "in the middle of
a segment" is aimed with a plain NATS subscriber on the segment subjects:
at the first message of a multi-message segment it SIGKILLs its target at
once, and the test then checks, in the daemon's log, that the segment was
not acknowledged whole (``shipped_tree_size`` below it).

Every wait is on a condition, with a bound; nothing sleeps blindly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import grpc
import nats
import pytest
import yaml
from collector._logs import restore_copy
from fault_helpers import CALL_TIMEOUT, Answer, DaemonProcess, log_problems
from kynara.v1 import audit_pb2
from kynara.v1 import decision_pb2 as pb
from support import REPO_ROOT, small_refund

from kynara_sidecar.audit.keys import generate_key, save_public_key, save_signing_key
from kynara_sidecar.audit.store import AuditStore
from kynara_sidecar.server.decision_service import MAX_BATCH_ITEMS
from kynara_sidecar.sync import MAX_SEGMENT_MESSAGE_BYTES
from kynara_sidecar.sync.nats_store import SEGMENT_SUBJECT_PREFIX

from .test_fleet import _metrics_url
from .test_shipper import Central

pytestmark = pytest.mark.slow

# Bounds on waiting for a condition; met in seconds here, the bound only
# stops a broken run from hanging.
WAIT_SECONDS = 60.0
# A crashed nats-server may have lost the collector's last acknowledgement
# (or the message on its way): that message comes again after the
# consumer's ack wait, so waits after a SIGKILL of the server allow for it.
# Shorter than the default 30 s, so such a test waits seconds, not half a
# minute; still far longer than taking one message takes.
ACK_WAIT_SECONDS = 5
AFTER_CRASH_SECONDS = 90.0
COLLECTOR_START_SECONDS = 30.0
# Fast retries, so outages in these tests end quickly.
SYNC_SETTINGS = (
    "sync.ship_segments=true",
    "sync.poll_seconds=0.1",
    "sync.status_seconds=1",
    "sync.retry_min_seconds=0.05",
    "sync.retry_max_seconds=0.5",
    "sync.timeout_seconds=2",
)
# Decision records of about BIG_CONTEXT_BYTES: each fills one segment
# message on its own (two do not fit MAX_SEGMENT_MESSAGE_BYTES), so a
# segment of BIG_SEGMENT records goes as that many messages.
BIG_CONTEXT_BYTES = 300_000
BIG_SEGMENT = 12
BIG_REQUEST_BYTES = 1 << 20
assert 2 * BIG_CONTEXT_BYTES > MAX_SEGMENT_MESSAGE_BYTES > BIG_CONTEXT_BYTES


# ------------------------------------------------------------------ waiting


def wait_until(condition: Callable[[], object], what: str, seconds: float = 0):
    """Poll ``condition`` until it returns something true; return that."""
    deadline = time.monotonic() + (seconds or WAIT_SECONDS)
    while not (found := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds or WAIT_SECONDS} s: {what}")
        time.sleep(0.02)
    return found


def sample(text: str, name: str) -> float:
    """The value of the sample ``name`` (labels included, exactly as
    exposed) in a Prometheus text page; 0 when absent."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=CALL_TIMEOUT) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


# ---------------------------------------------------------------- collector


class CollectorProcess:
    """``kynara-collector run`` as a child process, consuming ``store_url``
    with a dir:// archive; stderr goes to ``collector.log`` in ``root``.

    Args:
        root: where its config, state, archive and log go.
        store_url: the central store it consumes.
        keys: daemon id -> the public key files registered for it.
    """

    def __init__(
        self, root: pathlib.Path, store_url: str, keys: dict[str, list[pathlib.Path]]
    ):
        root.mkdir(parents=True, exist_ok=True)
        self.config = root / "collector.yaml"
        self.config.write_text(
            yaml.safe_dump(
                {
                    "store": {
                        "url": store_url,
                        "poll_seconds": 0.05,
                        "retry_seconds": 0.1,
                        "timeout_seconds": 2,
                        "ack_wait_seconds": ACK_WAIT_SECONDS,
                    },
                    "daemons": {
                        daemon_id: {"public_keys": [str(p) for p in files]}
                        for daemon_id, files in keys.items()
                    },
                    "archive": {"url": f"dir://{root / 'archive'}"},
                    "state": {"path": str(root / "state"), "map_size": 1 << 28},
                    "http": {"host": "127.0.0.1", "port": 0},
                }
            )
        )
        self.log_path = root / "collector.log"
        self._log = self.log_path.open("a")
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "kynara_sidecar.collector.cli",
                "--log-level", "debug", "run", "--config", str(self.config),
            ],
            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=self._log,
        )  # fmt: skip
        try:
            self.port = wait_until(
                self._http_port, "the collector to serve", COLLECTOR_START_SECONDS
            )
        except BaseException:
            self.stop()
            raise

    def _http_port(self) -> int | None:
        assert self.process.poll() is None, (
            f"collector exited {self.process.returncode}:\n{self.log_text()}"
        )
        for line in self.log_text().splitlines():
            if line.startswith("{") and '"collector started"' in line:
                return json.loads(line).get("http_port")
        return None

    def log_text(self) -> str:
        return self.log_path.read_text()

    def get(self, path: str) -> bytes:
        status, body = http_get(f"http://127.0.0.1:{self.port}{path}")
        assert status == 200, f"GET {path}: {status} {body[:500]!r}"
        return body

    def daemon(self, daemon_id: str) -> dict:
        daemons = json.loads(self.get("/daemons"))["daemons"]
        found = [d for d in daemons if d["daemon_id"] == daemon_id]
        assert found, f"collector knows no {daemon_id}: {daemons}"
        return found[0]

    def wait_for(
        self, daemon_id: str, condition: Callable[[dict], bool], what: str,
        seconds: float = 0,
    ) -> dict:  # fmt: skip
        def met() -> dict | None:
            found = self.daemon(daemon_id)
            return found if condition(found) else None

        try:
            return wait_until(met, what, seconds)
        except AssertionError as err:
            raise AssertionError(
                f"{err}; collector: {self.daemon(daemon_id)}; its log "
                f"({self.log_path}) ends:\n{self.log_text()[-3000:]}"
            ) from None

    def metrics(self) -> str:
        return self.get("/metrics").decode()

    def records(self, daemon_id: str, first: int, last: int) -> list[bytes]:
        """The archived records ``first..last``, as the query answers them."""
        body = self.get(f"/records?daemon={daemon_id}&from={first}&to={last}")
        return body.splitlines()

    def daemons_cli(self) -> dict[str, dict]:
        """``kynara-collector daemons``, as an operator runs it."""
        result = subprocess.run(
            [
                sys.executable, "-m", "kynara_sidecar.collector.cli",
                "daemons", "--config", str(self.config),
            ],
            capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return {d["daemon_id"]: d for d in json.loads(result.stdout)["daemons"]}

    def stop(self) -> None:
        """SIGTERM by PID and wait (SIGKILL past the bound); idempotent."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        self._log.close()


# ------------------------------------------------------------------ daemons


class Home:
    """One daemon's directory: socket, audit log, witness, key, log file."""

    def __init__(self, root: pathlib.Path, name: str, key_from: Home | None = None):
        self.path = root / name
        self.path.mkdir(parents=True)
        self.audit = self.path / "audit"
        self.witness = self.path / "witness"
        keys = self.path / "keys"
        keys.mkdir()
        if key_from is None:
            key = generate_key()
            save_signing_key(key, keys / "audit.pem")
            save_public_key(key.public(), keys / "audit.pub")
            self.key = keys / "audit.pem"
            self.public_key = keys / "audit.pub"
        else:
            # One secret deployed twice: the same signing key.
            self.key, self.public_key = key_from.key, key_from.public_key


class Daemons:
    """Starts daemon child processes; stops every one still running at
    teardown."""

    def __init__(self):
        self.started: list[DaemonProcess] = []

    def start(
        self, home: Home, daemon_id: str, store_url: str, *overrides: str
    ) -> DaemonProcess:
        daemon = DaemonProcess(
            home.path / "agent.sock",
            home.audit,
            home.path / "daemon.log",
            f"identity.daemon_id={daemon_id}",
            f"sync.store={store_url}",
            f"audit.signing_key={home.key}",
            f"audit.witness_path={home.witness}",
            *SYNC_SETTINGS,
            *overrides,
        )
        self.started.append(daemon)
        daemon.wait_serving()
        return daemon

    def close(self) -> None:
        for daemon in self.started:
            if daemon.process.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    daemon.terminate()
            daemon.close()


@pytest.fixture
def daemons() -> Iterator[Daemons]:
    started = Daemons()
    yield started
    started.close()


@pytest.fixture
def collectors() -> Iterator[list[CollectorProcess]]:
    started: list[CollectorProcess] = []
    yield started
    for collector in started:
        collector.stop()


def stop_cleanly(daemon: DaemonProcess) -> None:
    assert daemon.terminate() == 0, daemon.log_text()
    daemon.close()


def decide(
    daemon: DaemonProcess, count: int, prefix: str, *, context: dict | None = None
) -> list[Answer]:
    """``count`` allowed decisions, in DecideBatch calls of up to
    MAX_BATCH_ITEMS (one Decide call each when ``context`` is given: big
    requests go one at a time)."""
    stub = daemon.stub()
    answers: list[Answer] = []
    while len(answers) < count:
        step = 1 if context else min(MAX_BATCH_ITEMS, count - len(answers))
        ids = [f"{prefix}-{len(answers) + n}" for n in range(step)]
        requests = [small_refund(**(context or {})) for _ in ids]
        for request, request_id in zip(requests, ids, strict=True):
            request.request_id = request_id
        if context:
            replies = [stub.Decide(requests[0], timeout=CALL_TIMEOUT)]
        else:
            batch = stub.DecideBatch(
                pb.DecideBatchRequest(items=requests), timeout=CALL_TIMEOUT
            )
            assert all(i.WhichOneof("outcome") == "decision" for i in batch.items)
            replies = [item.decision for item in batch.items]
        answers += [
            Answer(rid, r.decision_id, r.audit_sequence, r.record_hash)
            for rid, r in zip(ids, replies, strict=True)
        ]
    return answers


def big_context(n: int) -> dict:
    return {"note": f"{n:08d}" + "x" * BIG_CONTEXT_BYTES}


class DaemonMetrics:
    """A running daemon's /metrics."""

    def __init__(self, daemon: DaemonProcess):
        self.url = _metrics_url(daemon)

    def __call__(self, name: str) -> float:
        status, body = http_get(self.url)
        assert status == 200, body
        return sample(body.decode(), name)


# --------------------------------------------------------------- the logs


class LogCopy:
    """What a stopped daemon's LMDB holds (opened read-only)."""

    def __init__(self, audit: pathlib.Path):
        store = AuditStore.open(audit, readonly=True)
        try:
            with store.reading():
                self.head = store.head().seq
                latest = store.latest_checkpoint()
                self.latest = latest.tree_size if latest else 0
                self.shipped = store.shipped()
                self.seam = store.seam()
                stored = [store.get(seq) for seq in range(1, self.head + 1)]
        finally:
            store.close()
        assert None not in stored, "the log misses records below its head"
        self.records = [s.record_bytes for s in stored]


def shipped_now(audit: pathlib.Path) -> int:
    """``shipped_tree_size`` of a log a daemon may be writing."""
    store = AuditStore.open(audit, readonly=True)
    try:
        return store.shipped()
    finally:
        store.close()


def assert_archived_exactly_once(
    collector: CollectorProcess, daemon_id: str, log: LogCopy, seconds: float = 0
) -> list[bytes]:
    """The collector took the whole stopped log, each record once, in order,
    byte for byte, and alerted on nothing. Returns the archived records."""
    assert log.shipped == log.latest == log.head, (
        f"a clean stop seals and ships everything: head {log.head}, latest "
        f"checkpoint {log.latest}, shipped {log.shipped}"
    )
    found = collector.wait_for(
        daemon_id, lambda d: d["tree_size"] >= log.latest,
        f"tree size {log.latest}", seconds,
    )  # fmt: skip

    archived = collector.records(daemon_id, 1, log.latest)
    assert found["tree_size"] == log.latest
    assert (found["alerts"], found["refused"]) == ([], "")
    assert len(archived) == log.latest
    assert archived == log.records
    metrics = collector.metrics()
    label = f'{{daemon="{daemon_id}"}}'
    # Counted as each segment is accepted: a segment taken twice counts twice.
    assert sample(metrics, f"kynara_collector_records_archived_total{label}") == (
        log.latest
    )
    assert "kynara_collector_alerts_total{" not in metrics
    return archived


def decision_ids(records: list[bytes]) -> set[str]:
    return {json.loads(r).get("decision_id", "") for r in records} - {""}


# ---------------------------------------------------------- a segment watch


class SegmentWatch:
    """A plain NATS subscriber on every daemon's segment subject, on a
    thread of its own: it sees each message the server takes. At the first
    message of a segment that goes as several, it runs ``cut`` at once
    (SIGKILL of the server or the daemon) and remembers that segment's tree
    size.

    Args:
        url: the nats-server.
        cut: what to do at the first message of a multi-message segment.
    """

    def __init__(self, url: str, cut: Callable[[], None]):
        self._url = url
        self._cut = cut
        self.cut_tree_size = 0
        self.fired = threading.Event()
        self.seen: list[tuple[int, int, int]] = []
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(WAIT_SECONDS), "the segment watch did not connect"
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._watch())

    async def _watch(self) -> None:
        try:
            client = await nats.connect(
                self._url, allow_reconnect=False, connect_timeout=5
            )
            await client.subscribe(SEGMENT_SUBJECT_PREFIX + ">", cb=self._on_message)
            await client.flush()
        except BaseException as err:
            self._error = err
            self._ready.set()
            return
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        with contextlib.suppress(Exception):
            await client.close()

    async def _on_message(self, msg) -> None:
        segment = audit_pb2.Segment.FromString(msg.data)
        tree_size = segment.checkpoint.tree_size
        last = segment.first_seq + len(segment.records) - 1
        if (
            not self.fired.is_set()
            and segment.first_seq == segment.previous_tree_size + 1
            and last < tree_size
        ):
            self._cut()
            self.cut_tree_size = tree_size
            self.fired.set()
        self.seen.append((tree_size, segment.first_seq, last))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        self._loop.close()


# -------------------------------------------------------------------- tests

TOTAL_DECISIONS = 10_000
CUT_AT = 3_000
BACK_AT = 6_000
SEGMENT_RECORDS = 500


class Driver:
    """A client thread deciding in DecideBatch calls up to a target the test
    moves; it counts decisions, not calls."""

    def __init__(self, daemon: DaemonProcess, prefix: str):
        self._daemon = daemon
        self._prefix = prefix
        self._target = 0
        self._moved = threading.Condition()
        self.answers: list[Answer] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def run_to(self, target: int) -> None:
        with self._moved:
            self._target = target
            self._moved.notify()

    def wait_reached(self, target: int) -> None:
        wait_until(
            lambda: self.error is not None or len(self.answers) >= target,
            f"{target} decisions",
        )
        assert self.error is None, f"the client failed: {self.error!r}"

    def _run(self) -> None:
        try:
            while True:
                with self._moved:
                    while len(self.answers) >= self._target:
                        if self._target >= TOTAL_DECISIONS:
                            return
                        self._moved.wait()
                    step = min(MAX_BATCH_ITEMS, self._target - len(self.answers))
                prefix = f"{self._prefix}-{len(self.answers)}"
                self.answers += decide(self._daemon, step, prefix)
        except BaseException as err:
            self.error = err

    def join(self) -> None:
        self._thread.join(CALL_TIMEOUT + 5)
        assert not self._thread.is_alive(), "the client thread is stuck"


@pytest.fixture(params=["nats", "dir"])
def central(request, tmp_path) -> Central:
    """A real central store the test takes down and brings back: a
    nats-server stopped and started, or a dir:// store moved away and
    back."""
    return Central(request.param, tmp_path, request)


def test_ten_thousand_decisions_through_an_outage_arrive_exactly_once(
    tmp_path, central, daemons, collectors
):
    home = Home(tmp_path, "d")
    collector = CollectorProcess(
        tmp_path / "collector", central.url, {"pipe-a": [home.public_key]}
    )
    collectors.append(collector)
    daemon = daemons.start(
        home, "pipe-a", central.url,
        f"audit.segment_records={SEGMENT_RECORDS}",
        "audit.segment_seconds=3600",
        "audit.retention_days=1",
    )  # fmt: skip
    metric = DaemonMetrics(daemon)
    driver = Driver(daemon, "load")

    driver.run_to(CUT_AT)
    driver.wait_reached(CUT_AT)
    driver.run_to(BACK_AT)
    central.down()
    driver.wait_reached(BACK_AT)
    wait_until(
        lambda: (
            metric("kynara_audit_shipping_failures_total") >= 1
            and metric("kynara_audit_shipping_backlog_segments") >= 5
        ),
        "the daemon to fail shipping and hold a backlog",
    )
    during = shipped_now(home.audit)
    driver.run_to(TOTAL_DECISIONS)
    shipped_in_outage = shipped_now(home.audit) - during
    central.up()
    driver.wait_reached(TOTAL_DECISIONS)
    driver.join()
    wait_until(
        lambda: metric("kynara_audit_shipping_backlog_segments") == 0,
        "the backlog to drain",
    )
    stop_cleanly(daemon)
    log = LogCopy(home.audit)

    assert shipped_in_outage == 0, "marked shipped with the store down"
    assert len(driver.answers) == TOTAL_DECISIONS
    assert log_problems(home.audit, driver.answers) == []
    archived = assert_archived_exactly_once(collector, "pipe-a", log)
    assert {a.decision_id for a in driver.answers} <= decision_ids(archived)
    # Nothing pruned before acknowledgement: the whole log is still there.
    assert log.seam <= log.shipped == log.latest
    assert log.seam == 0
    assert len(log.records) > TOTAL_DECISIONS
    assert collector.daemons_cli()["pipe-a"]["alerts"] == []


def test_a_log_restored_from_a_snapshot_is_reported_as_a_fork(
    tmp_path, nats_server, daemons, collectors
):
    home = Home(tmp_path, "d")
    collector = CollectorProcess(
        tmp_path / "collector", nats_server.url, {"pipe-b": [home.public_key]}
    )
    collectors.append(collector)
    settings = ("audit.segment_records=10", "audit.segment_seconds=3600")

    def run(count: int, prefix: str) -> LogCopy:
        daemon = daemons.start(home, "pipe-b", nats_server.url, *settings)
        for n in range(count):  # one Decide at a time: seals at fixed sizes
            daemon.decide(f"{prefix}-{n}")
        stop_cleanly(daemon)
        log = LogCopy(home.audit)
        assert log.shipped == log.latest == log.head
        collector.wait_for(
            "pipe-b", lambda d: d["tree_size"] == log.latest, f"tree size {log.latest}"
        )
        return log

    first = run(25, "first")
    shutil.copytree(home.audit, tmp_path / "audit-snapshot")
    shutil.copytree(home.witness, tmp_path / "witness-snapshot")
    second = run(25, "second")
    accepted = set(_checkpoint_sizes(home.audit, first.latest))
    restore_copy(tmp_path / "audit-snapshot", home.audit)
    restore_copy(tmp_path / "witness-snapshot", home.witness)
    daemon = daemons.start(home, "pipe-b", nats_server.url, *settings)
    for n in range(17):
        daemon.decide(f"rewritten-{n}")
    stop_cleanly(daemon)
    rewritten = LogCopy(home.audit)
    found = collector.wait_for("pipe-b", lambda d: d["refused"], "a refusal")

    assert rewritten.records[: first.head] == first.records
    assert accepted & set(_checkpoint_sizes(home.audit, first.latest)), (
        "the restored log sealed at a size the collector accepted"
    )
    assert found["refused"] == "fork"
    assert [a["kind"] for a in found["alerts"]] == ["fork"]
    assert found["tree_size"] == second.latest
    assert collector.daemons_cli()["pipe-b"]["refused"] == "fork"
    assert (
        sample(
            collector.metrics(),
            'kynara_collector_alerts_total{daemon="pipe-b",kind="fork"}',
        )
        == 1
    )
    assert collector.records("pipe-b", 1, second.latest) == second.records
    assert (
        collector.records("pipe-b", first.latest + 1, second.latest)
        == (second.records[first.latest :])
    )


def _checkpoint_sizes(audit: pathlib.Path, after: int) -> list[int]:
    store = AuditStore.open(audit, readonly=True)
    try:
        return list(store.checkpoint_sizes(after))
    finally:
        store.close()


def test_two_live_daemons_with_one_daemon_id_are_refused(
    tmp_path, nats_server, daemons, collectors
):
    first_home = Home(tmp_path, "a")
    second_home = Home(tmp_path, "b", key_from=first_home)
    collector = CollectorProcess(
        tmp_path / "collector", nats_server.url, {"twin": [first_home.public_key]}
    )
    collectors.append(collector)
    settings = ("audit.segment_records=5", "audit.segment_seconds=3600")
    first = daemons.start(first_home, "twin", nats_server.url, *settings)
    decide(first, 12, "first")
    accepted = collector.wait_for(
        "twin", lambda d: d["tree_size"] >= 10, "the first daemon's segments"
    )

    second = daemons.start(second_home, "twin", nats_server.url, *settings)
    decide(second, 12, "second")
    found = collector.wait_for("twin", lambda d: d["refused"], "a refusal")

    assert found["refused"] == "duplicate_daemon"
    assert [a["kind"] for a in found["alerts"]] == ["duplicate_daemon"]
    assert found["log_id"] == accepted["log_id"]
    assert (
        sample(
            collector.metrics(),
            'kynara_collector_alerts_total{daemon="twin",kind="duplicate_daemon"}',
        )
        == 1
    )
    # Both kept deciding: the collector refuses evidence, not decisions.
    assert first.decide("after").decision_id and second.decide("after").decision_id
    archived = collector.records("twin", 1, found["tree_size"])
    assert archived == LogCopy(first_home.audit).records[: found["tree_size"]]


BIG_SETTINGS = (
    f"audit.segment_records={BIG_SEGMENT}",
    "audit.segment_seconds=3600",
    "audit.map_size=268435456",
    f"agent.max_message_bytes={BIG_REQUEST_BYTES}",
)


def test_a_network_cut_mid_upload_loses_and_duplicates_nothing(
    tmp_path, nats_server, daemons, collectors
):
    home = Home(tmp_path, "d")
    collector = CollectorProcess(
        tmp_path / "collector", nats_server.url, {"pipe-c": [home.public_key]}
    )
    collectors.append(collector)
    daemon = daemons.start(home, "pipe-c", nats_server.url, *BIG_SETTINGS)
    metric = DaemonMetrics(daemon)
    decide(daemon, 3, "small")
    watch = SegmentWatch(nats_server.url, nats_server.kill)
    try:
        decide(daemon, BIG_SEGMENT, "big", context=big_context(0))
        assert watch.fired.wait(WAIT_SECONDS), f"no multi-message segment: {watch.seen}"
    finally:
        watch.close()
    cut = watch.cut_tree_size
    shipped_at_cut = shipped_now(home.audit)

    decide(daemon, 5, "during")  # the daemon keeps deciding through the cut
    # Down until the daemon tried the rest of the segment and failed.
    wait_until(
        lambda: metric("kynara_audit_shipping_failures_total") >= 1,
        "the daemon to fail shipping the rest of the segment",
    )
    unshipped = shipped_now(home.audit)
    nats_server.start()
    decide(daemon, BIG_SEGMENT, "after", context=big_context(1))
    wait_until(
        lambda: metric("kynara_audit_shipping_backlog_segments") == 0,
        "the backlog to drain",
        AFTER_CRASH_SECONDS,
    )
    stop_cleanly(daemon)
    log = LogCopy(home.audit)

    assert shipped_at_cut < cut, (
        f"the cut came after segment {cut} was acknowledged whole"
    )
    assert unshipped == shipped_at_cut, "marked shipped with the store down"
    assert_archived_exactly_once(collector, "pipe-c", log, AFTER_CRASH_SECONDS)


def test_a_daemon_killed_mid_shipping_loses_and_duplicates_nothing(
    tmp_path, nats_server, daemons, collectors
):
    home = Home(tmp_path, "d")
    collector = CollectorProcess(
        tmp_path / "collector", nats_server.url, {"pipe-d": [home.public_key]}
    )
    collectors.append(collector)
    daemon = daemons.start(home, "pipe-d", nats_server.url, *BIG_SETTINGS)
    decide(daemon, 3, "small")
    watch = SegmentWatch(nats_server.url, daemon.kill)
    answered: list[Answer] = []
    try:
        with contextlib.suppress(grpc.RpcError):
            for n in range(BIG_SEGMENT):
                answered += decide(daemon, 1, f"big-{n}", context=big_context(n))
        assert watch.fired.wait(WAIT_SECONDS), f"no multi-message segment: {watch.seen}"
    finally:
        watch.close()
    daemon.close()
    cut = watch.cut_tree_size
    shipped_at_cut = shipped_now(home.audit)

    daemon = daemons.start(home, "pipe-d", nats_server.url, *BIG_SETTINGS)
    decide(daemon, 4, "after")
    stop_cleanly(daemon)
    log = LogCopy(home.audit)

    assert shipped_at_cut < cut, (
        f"the kill came after segment {cut} was acknowledged whole"
    )
    assert log_problems(home.audit, answered) == []
    archived = assert_archived_exactly_once(collector, "pipe-d", log)
    assert {a.decision_id for a in answered} <= decision_ids(archived)
