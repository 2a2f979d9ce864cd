"""``kynara-sidecar sync ship`` (admin ``SyncService.ShipNow``), what the
Kubernetes preStop hook runs: a real daemon on its own loop, a real
``dir://`` store, the real CLI in a subprocess over the admin socket."""

from __future__ import annotations

import asyncio
import json
import subprocess

import grpc
import pytest
from kynara.v1 import audit_pb2, sync_pb2, sync_pb2_grpc
from support import error_of, operator_admin, operator_cli, small_refund

from kynara_sidecar.audit.chain import decode_record
from kynara_sidecar.sync.dir_store import DirStore

SECRET = "operator-secret-0123456789abcdef"
# Only bounds a broken run; nothing here waits this long when it works.
WAIT_SECONDS = 20.0


def shipping_overrides(tmp_path, store: str) -> list[str]:
    return [
        *([f"sync.store={store}"] if store else []),
        *operator_admin(tmp_path, SECRET),
        # Nothing seals or ships by itself during the test: only ShipNow does.
        "audit.segment_records=100000",
        "audit.segment_seconds=3600",
        "sync.poll_seconds=3600",
        "sync.retry_min_seconds=0.05",
        "sync.retry_max_seconds=0.2",
    ]


def sync_ship(tmp_path, *extra: str) -> subprocess.CompletedProcess[str]:
    return operator_cli(tmp_path, ("sync", "ship"), *extra)


async def shipped_records(url: str, through: int) -> list[bytes]:
    """Every record the store holds for the daemon, in order, read as the
    collector reads them, until a segment's checkpoint reaches ``through``."""
    store = DirStore(url, poll_seconds=0.05)
    await store.connect()
    records: list[bytes] = []

    async def read() -> None:
        async for delivery in store.segments("test"):
            await delivery.ack()
            message = audit_pb2.Segment.FromString(delivery.data)
            assert message.first_seq == len(records) + 1
            records.extend(message.records)
            if message.checkpoint.tree_size >= through:
                return

    try:
        await asyncio.wait_for(read(), WAIT_SECONDS)
    finally:
        await store.close()
    return records


def test_sync_ship_seals_and_the_store_holds_every_answered_record(
    tmp_path, start_daemon
):
    url = f"dir://{tmp_path / 'central'}"
    (tmp_path / "central").mkdir()
    running = start_daemon(*shipping_overrides(tmp_path, url))
    stub = running.stub()
    answered = [stub.Decide(small_refund(), timeout=10).decision_id for _ in range(5)]
    head = running.daemon._store.head().seq

    result = sync_ship(tmp_path, "--wait", "15")

    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    # The seal marker ends the segment: one record past the head.
    assert reply["sealed_tree_size"] == head + 1
    assert reply["shipped_segments"] >= 1
    assert reply["backlog_records"] == 0
    assert reply["shipped_tree_size"] == reply["sealed_tree_size"]
    records = asyncio.run(shipped_records(url, reply["sealed_tree_size"]))
    decoded = [decode_record(data) for data in records]
    shipped_ids = {r.decision_id for r in decoded if r.kind == "decision"}
    assert set(answered) <= shipped_ids
    assert decoded[-1].kind == "marker" and decoded[-1].marker.event == "seal"


def test_a_second_ship_with_nothing_new_seals_nothing_more(tmp_path, start_daemon):
    url = f"dir://{tmp_path / 'central'}"
    (tmp_path / "central").mkdir()
    running = start_daemon(*shipping_overrides(tmp_path, url))
    running.stub().Decide(small_refund(), timeout=10)
    first = json.loads(sync_ship(tmp_path, "--wait", "15").stdout)

    second = sync_ship(tmp_path, "--wait", "15")

    assert second.returncode == 0, second.stderr
    again = json.loads(second.stdout)
    assert again["sealed_tree_size"] == first["sealed_tree_size"]
    assert again["shipped_segments"] == 0
    assert running.daemon._store.head().seq == first["sealed_tree_size"]


def test_a_store_that_does_not_acknowledge_fails_naming_the_backlog(
    tmp_path, start_daemon
):
    # The directory is missing: the store is down.
    running = start_daemon(
        *shipping_overrides(tmp_path, f"dir://{tmp_path / 'central'}")
    )
    running.stub().Decide(small_refund(), timeout=10)

    result = sync_ship(tmp_path, "--wait", "0.5")

    assert result.returncode == 1
    assert "not all shipped" in result.stderr
    assert "kynara_audit_shipping_backlog_records" in result.stderr
    assert result.stdout == ""
    assert running.daemon._store.shipped() == 0


def test_a_daemon_without_a_store_says_there_is_nothing_to_ship(tmp_path, start_daemon):
    start_daemon(*shipping_overrides(tmp_path, ""))

    result = sync_ship(tmp_path, "--wait", "1")

    assert result.returncode == 1
    assert "FAILED_PRECONDITION" in result.stderr
    assert "no central store" in result.stderr


def test_ship_now_with_shipping_off_is_a_failed_precondition(tmp_path, start_daemon):
    url = f"dir://{tmp_path / 'central'}"
    running = start_daemon(
        *shipping_overrides(tmp_path, url), "sync.ship_segments=false"
    )
    with grpc.insecure_channel(f"unix://{tmp_path / 'admin.sock'}") as channel:
        stub = sync_pb2_grpc.SyncServiceStub(channel)
        status, metadata = error_of(
            lambda: stub.ShipNow(
                sync_pb2.ShipNowRequest(wait_seconds=1),
                metadata=[("authorization", f"Bearer {SECRET}")],
                timeout=10,
            )
        )
    assert status == grpc.StatusCode.FAILED_PRECONDITION
    assert "kynara-error-code" in metadata
    assert running.daemon._store.shipped() == 0


@pytest.mark.parametrize(
    ("wait", "credential", "expected"),
    [
        (1.0, "", grpc.StatusCode.UNAUTHENTICATED),
        (-1.0, SECRET, grpc.StatusCode.INVALID_ARGUMENT),
        (601.0, SECRET, grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_ship_now_needs_an_operator_and_a_bounded_wait(
    tmp_path, start_daemon, wait, credential, expected
):
    url = f"dir://{tmp_path / 'central'}"
    (tmp_path / "central").mkdir()
    running = start_daemon(*shipping_overrides(tmp_path, url))
    head = running.daemon._store.head().seq
    metadata = [("authorization", f"Bearer {credential}")] if credential else []
    with grpc.insecure_channel(f"unix://{tmp_path / 'admin.sock'}") as channel:
        stub = sync_pb2_grpc.SyncServiceStub(channel)
        status, _ = error_of(
            lambda: stub.ShipNow(
                sync_pb2.ShipNowRequest(wait_seconds=wait),
                metadata=metadata,
                timeout=10,
            )
        )
    assert status == expected
    # Refused before anything was sealed.
    assert running.daemon._store.head().seq == head
