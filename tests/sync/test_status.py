"""Status up: a daemon's status document in the central store, and
``kynara-sidecar fleet status`` reading every daemon's."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable

import msgspec
import pytest
from support import REPO_ROOT, small_refund

from kynara_sidecar.audit.record import format_timestamp
from kynara_sidecar.decision import Timestamp
from kynara_sidecar.sync import open_store
from kynara_sidecar.sync._session import StoreSession
from kynara_sidecar.sync.dir_store import DirStore
from kynara_sidecar.sync.status import (
    AuditStatusV1,
    DaemonStatusV1,
    PolicyStatusV1,
    ShippingStatusV1,
    StatusPublisher,
    decode_status,
    encode_status,
)

WAIT_SECONDS = 20.0
CLI_TIMEOUT = 60.0


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT_SECONDS}s: {what}")
        time.sleep(0.02)


def statuses(url: str) -> dict[str, DaemonStatusV1]:
    async def read() -> dict[str, bytes]:
        store = open_store(url)
        await store.connect()
        try:
            return await store.statuses()
        finally:
            await store.close()

    return {key: decode_status(data) for key, data in asyncio.run(read()).items()}


def fleet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kynara_sidecar.cli", "fleet", "status", *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        cwd=REPO_ROOT,
        check=False,
    )


def now_minus(seconds: float) -> str:
    return format_timestamp(Timestamp.from_nanos(time.time_ns() - int(seconds * 1e9)))


def document(daemon_id: str, *, age: float, interval: float = 5.0) -> bytes:
    return encode_status(
        DaemonStatusV1(
            daemon_id=daemon_id,
            log_id="ab" * 16,
            time=now_minus(age),
            status_seconds=interval,
            policy=PolicyStatusV1(source="nats://x", revision="sha256:" + "c" * 64),
            audit=AuditStatusV1(head=42),
            shipping=ShippingStatusV1(backlog_segments=2, backlog_records=17),
        )
    )


# ------------------------------------------------------------------ daemon


def test_a_daemon_publishes_its_status_as_it_ships(tmp_path, start_daemon):
    central = tmp_path / "central"
    central.mkdir()
    url = f"dir://{central}"
    running = start_daemon(
        f"sync.store={url}",
        "sync.status_seconds=0.1",
        "sync.poll_seconds=0.05",
        "audit.segment_records=2",
    )
    stub = running.stub()
    for _ in range(4):
        stub.Decide(small_refund())
    audit = running.daemon._store
    origin = running.daemon._origin

    def caught_up() -> bool:
        status = statuses(url).get(origin)
        latest = audit.latest_checkpoint().tree_size
        return (
            status is not None
            and status.shipping is not None
            and status.shipping.shipped_tree_size == latest
            and status.audit.latest_checkpoint is not None
            and status.audit.latest_checkpoint.tree_size == latest
        )

    wait_until(caught_up, "a status with every sealed segment shipped")
    status = statuses(url)[origin]
    policies = running.daemon.pipeline.policies

    assert status.daemon_id == origin
    assert status.log_id == audit.log_id
    assert status.status_seconds == 0.1
    assert status.policy.source == running.config.policy.source
    assert status.policy.revision == policies.policy_set.revision
    assert status.policy.directory_revision == policies.directory.revision
    # Start marker (sealed alone), policy marker, four decisions, by twos.
    assert status.audit.head == 6
    assert status.audit.latest_checkpoint.tree_size == 5
    checkpoint = audit.checkpoint(status.audit.latest_checkpoint.tree_size)
    assert status.audit.latest_checkpoint.root == checkpoint.root
    assert status.shipping.last_error == ""
    assert status.shipping.over_ceiling is False


def test_a_policy_activation_is_published_without_waiting(tmp_path, start_daemon):
    central = tmp_path / "central"
    central.mkdir()
    running = start_daemon(
        f"sync.store=dir://{central}",
        "sync.ship_segments=false",
        "sync.status_seconds=3600",
    )
    publisher = running.daemon._status_publisher
    wait_until(lambda: publisher.puts == 1, "the first status")

    assert running.call(running.daemon.reload())
    wait_until(lambda: publisher.puts == 2, "a status after the reload")

    status = statuses(f"dir://{central}")[running.daemon._origin]
    assert status.shipping is None
    assert status.status_seconds == 3600


def test_a_stopped_daemon_leaves_its_last_head(tmp_path, start_daemon):
    central = tmp_path / "central"
    central.mkdir()
    running = start_daemon(f"sync.store=dir://{central}", "sync.status_seconds=3600")
    running.stub().Decide(small_refund())
    origin = running.daemon._origin

    running.stop()
    status = statuses(f"dir://{central}")[origin]

    # The stop marker and the final seal are in it, all shipped.
    assert status.audit.head == status.audit.latest_checkpoint.tree_size
    assert status.shipping.shipped_tree_size == status.audit.head
    assert status.shipping.backlog_records == 0


# ------------------------------------------------------------- fleet status


def put_statuses(url: str, documents: dict[str, bytes]) -> None:
    async def put() -> None:
        store = open_store(url)
        await store.connect()
        for daemon_id, data in documents.items():
            await store.put_status(daemon_id, data)
        await store.close()

    asyncio.run(put())


def test_fleet_status_prints_a_row_per_daemon_and_marks_the_stale(tmp_path):
    central = tmp_path / "central"
    central.mkdir()
    url = f"dir://{central}"
    put_statuses(
        url,
        {
            "bot-a@host-1": document("bot-a@host-1", age=1),
            # 100 s old, at a 5 s interval: past 3 intervals.
            "bot-b@host-2": document("bot-b@host-2", age=100),
            "bot-c@host-3": b"{not json",
        },
    )

    table = fleet("--store", url)

    # An unreadable row fails the command, naming the daemon.
    assert table.returncode == 1, table.stderr
    assert table.stderr.startswith("kynara-sidecar fleet: bot-c@host-3: unreadable")
    header, *rows = table.stdout.splitlines()
    assert header.split()[:3] == ["DAEMON", "REVISION", "LAST"]
    assert [row.split()[0] for row in rows] == [
        "bot-a@host-1",
        "bot-b@host-2",
        "bot-c@host-3",
    ]
    assert "sha256:cccccccccccc " in rows[0]
    assert "2 seg / 17 rec" in rows[0]
    assert "STALE" not in rows[0]
    assert rows[1].rstrip().endswith("STALE")
    assert "unreadable status" in rows[2]


def test_fleet_status_json_gives_each_daemon_in_full(tmp_path):
    central = tmp_path / "central"
    central.mkdir()
    url = f"dir://{central}"
    put_statuses(
        url,
        {
            "bot-a@host-1": document("bot-a@host-1", age=1),
            "bot-b@host-2": document("bot-b@host-2", age=20, interval=5),
        },
    )

    out = fleet("--store", url, "--json")

    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [(row["daemon_id"], row["stale"]) for row in rows] == [
        ("bot-a@host-1", False),
        ("bot-b@host-2", True),
    ]
    assert rows[0]["status"]["audit"]["head"] == 42
    assert rows[0]["status"]["shipping"]["backlog_records"] == 17


def test_fleet_status_names_a_store_it_cannot_reach(tmp_path):
    out = fleet("--store", f"dir://{tmp_path / 'missing'}")

    assert out.returncode == 1
    assert "is not a directory" in out.stderr


def test_status_published_to_nats_is_read_by_fleet_status(tmp_path, nats_server):
    built: list[DaemonStatusV1] = []

    def build() -> DaemonStatusV1:
        built.append(decode_status(document("bot-n@host-9", age=0)))
        return built[-1]

    async def publish_twice() -> None:
        store = open_store(nats_server.url, timeout=5)
        session = StoreSession(store, 5.0)
        publisher = StatusPublisher(session, "bot-n@host-9", 3600, build)
        publisher.start()
        while publisher.puts < 1:
            await asyncio.sleep(0.01)
        publisher.changed()
        while publisher.puts < 2:
            await asyncio.sleep(0.01)
        await publisher.stop(final_seconds=5)
        await session.close()

    asyncio.run(asyncio.wait_for(publish_twice(), WAIT_SECONDS))
    out = fleet("--store", nats_server.url, "--json")

    assert len(built) == 3  # the first, the changed one, the final one
    assert out.returncode == 0, out.stderr
    (row,) = json.loads(out.stdout)
    assert row["daemon_id"] == "bot-n@host-9"
    assert row["stale"] is False
    assert msgspec.convert(row["status"], DaemonStatusV1) == built[-1]


@pytest.mark.parametrize("store", ["ftp://x", "dir://"])
def test_fleet_status_refuses_a_url_that_is_not_a_store(store):
    out = fleet("--store", store)

    assert out.returncode == 1
    assert "store URL" in out.stderr


def test_fleet_status_names_a_daemon_by_its_document_and_flags_a_mismatch(tmp_path):
    central = tmp_path / "central"
    central.mkdir()
    url = f"dir://{central}"
    put_statuses(
        url,
        {
            "bot-a@host-1": document("bot-a@host-1", age=1),
            # bot-b's key, bot-x's document: a misconfigured or forged daemon.
            "bot-b@host-2": document("bot-x@host-9", age=1),
        },
    )

    table = fleet("--store", url)
    as_json = json.loads(fleet("--store", url, "--json").stdout)

    assert table.returncode == 1
    _, *rows = table.stdout.splitlines()
    assert rows[0].split()[0] == "bot-a@host-1"
    assert rows[1].startswith("bot-x@host-9 (MISMATCH: stored under 'bot-b@host-2')")
    assert table.stderr == (
        "kynara-sidecar fleet: bot-x@host-9: status stored under the key of "
        "daemon bot-b@host-2\n"
    )
    assert [(row["daemon_id"], row["mismatch"]) for row in as_json] == [
        ("bot-a@host-1", False),
        ("bot-x@host-9", True),
    ]


class _SilentStatusStore(DirStore):
    """A dir store whose status puts never answer (a store gone quiet)."""

    async def put_status(self, daemon_id: str, data: bytes) -> None:
        await asyncio.Event().wait()


def test_a_status_put_that_times_out_at_stop_is_logged_with_a_reason(tmp_path, caplog):
    (tmp_path / "central").mkdir()
    store = _SilentStatusStore(f"dir://{tmp_path / 'central'}")
    status = decode_status(document("d-1", age=0))

    async def run() -> None:
        # The session's own bound is far away: only the stop's runs out.
        session = StoreSession(store, 3600)
        publisher = StatusPublisher(session, "d-1", 3600, lambda: status)
        publisher.start()
        await asyncio.sleep(0)
        await publisher.stop(final_seconds=0.2)

    with caplog.at_level("WARNING", logger="kynara.sync"):
        asyncio.run(run())

    (line,) = [r for r in caplog.records if r.getMessage() == "status not published"]
    assert line.fields["error_type"] == "StoreUnavailable"
    assert "no answer within the 0.2s a stop allows" in line.fields["error"]
    assert str(tmp_path / "central") in line.fields["error"]


def test_fleet_status_of_an_empty_store_says_when_a_daemon_publishes(tmp_path):
    url = f"dir://{tmp_path}"

    out = fleet("--store", url)

    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        f"no daemon has published a status to {url} yet",
        "hint: a daemon publishes its status only when its sync.store (or a store "
        "as its policy.source) names this store and its audit log is open; its log "
        "says 'sync started' once it does",
    ]
