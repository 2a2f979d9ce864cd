"""A real daemon following signed bundles: a bundle file or a dir:// store.

The daemon runs in-process on its own loop (``RunningDaemon``); ``sync now``
is the real CLI, in a subprocess, calling the real admin listener over its
Unix socket.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kynara.v1 import sync_pb2, sync_pb2_grpc
from support import (
    REPO_ROOT,
    SHIPPED_CONFIG,
    SHIPPED_POLICIES,
    daemon_config,
    error_of,
    operator_admin,
    operator_cli,
    small_refund,
)

from kynara_sidecar.errors import ConfigError
from kynara_sidecar.sync.follower import SyncOutcome

from ._bundles import (
    BROKEN_RULE,
    bad_signature,
    broken_compile,
    policy_dir,
    public_key_file,
    revision_of,
    signed,
    truncated,
)

SECRET = "operator-secret-0123456789abcdef"
# Conditions are waited on, never slept for; this only bounds a broken run.
WAIT_SECONDS = 10.0
CLI = [sys.executable, "-m", "kynara_sidecar.cli"]


def bundle_overrides(tmp_path, source: str) -> list[str]:
    return [
        f"policy.source={source}",
        f"policy.trusted_keys=[{public_key_file(tmp_path)}]",
        *operator_admin(tmp_path, SECRET),
        "sync.poll_seconds=0.05",
        "sync.retry_min_seconds=0.01",
        "sync.retry_max_seconds=0.05",
        # These tests are about policies; segments are the shipper's tests.
        "sync.ship_segments=false",
    ]


def sync_now(tmp_path, *extra: str) -> tuple[int, dict]:
    """``kynara-sidecar sync now`` as an operator runs it, in a subprocess."""
    result = operator_cli(tmp_path, ("sync", "now"), *extra)
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


def health(running) -> int:
    with grpc.insecure_channel(running.target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    return reply.status


def synced(running, outcome: str) -> float:
    value = running.daemon.metrics.registry.get_sample_value(
        "kynara_policy_sync_total", {"outcome": outcome}
    )
    return value or 0.0


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def answered_revision(running) -> str:
    return running.stub().Decide(small_refund(), timeout=5).policy_revision


@pytest.fixture
def bundle_file(tmp_path):
    path = tmp_path / "policies.bundle"
    path.write_bytes(signed(tmp_path, "r1", seconds=0))
    return path


def test_a_bundle_file_source_activates_and_the_log_keeps_it(
    tmp_path, start_daemon, bundle_file
):
    running = start_daemon(*bundle_overrides(tmp_path, bundle_file))

    revision = answered_revision(running)

    assert revision == revision_of(policy_dir(tmp_path, "r1"))
    assert health(running) == health_pb2.HealthCheckResponse.SERVING
    digest, data = running.daemon._store.active_bundle()
    assert data == bundle_file.read_bytes()
    assert running.daemon._store.get_policy_source("policy", revision) is not None
    assert synced(running, "activated") == 1


BROKEN = {
    "bad_signature": (bad_signature, ["bad_signature"]),
    "does_not_compile": (
        broken_compile,
        ["does_not_compile", "payments.yaml", BROKEN_RULE],
    ),
    "truncated": (truncated, ["malformed", "truncated"]),
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_a_broken_bundle_leaves_the_previous_revision_and_sync_now_says_why(
    tmp_path, start_daemon, bundle_file, kind
):
    make, reasons = BROKEN[kind]
    running = start_daemon(*bundle_overrides(tmp_path, bundle_file))
    r1 = answered_revision(running)
    bundle_file.write_bytes(make(tmp_path, seconds=60))

    code, reply = sync_now(tmp_path)

    assert code == 1
    assert reply["outcome"] == "refused"
    for reason in reasons:
        assert reason in reply["error"]
    assert reply["revision"] == reply["previous_revision"] == r1
    assert answered_revision(running) == r1
    assert synced(running, "refused") == 1
    assert synced(running, "activated") == 1
    last = running.daemon._follower.last_sync
    assert last.outcome is SyncOutcome.REFUSED and last.error == reply["error"]


def test_an_older_bundle_is_refused_and_force_takes_it(
    tmp_path, start_daemon, bundle_file
):
    bundle_file.unlink()
    bundle_file.write_bytes(signed(tmp_path, "new", seconds=30))
    running = start_daemon(*bundle_overrides(tmp_path, bundle_file))
    bundle_file.write_bytes(signed(tmp_path, "old", seconds=0))

    refused_code, refused = sync_now(tmp_path)
    forced_code, forced = sync_now(tmp_path, "--force")

    assert (refused_code, refused["outcome"]) == (1, "refused")
    assert "older than the active revision" in refused["error"]
    assert (forced_code, forced["outcome"]) == (0, "activated")
    assert forced["revision"] == revision_of(policy_dir(tmp_path, "old"))
    assert answered_revision(running) == forced["revision"]


def test_sighup_rereads_the_bundle_file(tmp_path, start_daemon, bundle_file):
    running = start_daemon(*bundle_overrides(tmp_path, bundle_file))
    bundle_file.write_bytes(signed(tmp_path, "r2", seconds=60))

    reloaded = running.call(running.daemon.reload())

    assert reloaded is True
    assert answered_revision(running) == revision_of(policy_dir(tmp_path, "r2"))


def test_no_bundle_at_all_is_not_serving_until_one_is_published(tmp_path, start_daemon):
    store = tmp_path / "store"
    store.mkdir()
    running = start_daemon(*bundle_overrides(tmp_path, f"dir://{store}"))

    status = health(running)
    code, metadata = error_of(lambda: answered_revision(running))

    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert code == grpc.StatusCode.UNAVAILABLE
    assert metadata["kynara-error-code"] == "policy_not_ready"

    (store / "bundles").mkdir(exist_ok=True)
    running.call(_publish(store, signed(tmp_path, "r1")))
    wait_until(
        lambda: health(running) == health_pb2.HealthCheckResponse.SERVING,
        "SERVING after the publish",
    )
    assert answered_revision(running) == revision_of(policy_dir(tmp_path, "r1"))


async def _publish(root, data: bytes) -> str:
    from kynara_sidecar.sync.dir_store import DirStore

    store = DirStore(f"dir://{root}")
    await store.connect()
    return await store.publish_bundle(data)


def test_a_first_start_takes_the_store_s_bundle_before_it_reports(
    tmp_path, start_daemon
):
    store = tmp_path / "store"
    store.mkdir()
    asyncio.run(_publish(store, signed(tmp_path, "r1")))

    running = start_daemon(*bundle_overrides(tmp_path, f"dir://{store}"))

    assert health(running) == health_pb2.HealthCheckResponse.SERVING
    assert answered_revision(running) == revision_of(policy_dir(tmp_path, "r1"))


def test_a_restart_with_the_store_gone_serves_the_stored_bundle_at_once(
    tmp_path, start_daemon
):
    store = tmp_path / "store"
    store.mkdir()
    overrides = bundle_overrides(tmp_path, f"dir://{store}")
    first = start_daemon(*overrides)
    first.call(_publish(store, signed(tmp_path, "r1")))
    r1 = revision_of(policy_dir(tmp_path, "r1"))
    wait_until(lambda: first.daemon._follower.active is not None, "r1 active")
    first.stop()
    shutil.rmtree(store)

    second = start_daemon(*overrides)

    assert health(second) == health_pb2.HealthCheckResponse.SERVING
    assert answered_revision(second) == r1
    wait_until(lambda: synced(second, "unreachable") >= 1, "the store to be missed")
    assert second.daemon._follower.last_sync.outcome is SyncOutcome.UNREACHABLE


def test_sync_now_needs_an_operator_credential(tmp_path, start_daemon, bundle_file):
    running = start_daemon(*bundle_overrides(tmp_path, bundle_file))

    with grpc.insecure_channel(f"unix://{tmp_path / 'admin.sock'}") as channel:
        stub = sync_pb2_grpc.SyncServiceStub(channel)
        code, metadata = error_of(
            lambda: stub.SyncNow(sync_pb2.SyncNowRequest(), timeout=5)
        )

    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert metadata["kynara-error-code"] == "identity_invalid"
    assert synced(running, "unchanged") == 0


@pytest.mark.parametrize("source", ["bundle", "dir://store"])
def test_a_signed_source_without_trusted_keys_is_refused(tmp_path, source):
    if source == "bundle":
        path = tmp_path / "policies.bundle"
        path.write_bytes(signed(tmp_path, "r1"))
        source = str(path)

    with pytest.raises(ConfigError, match=r"policy\.trusted_keys: expected the bundle"):
        daemon_config(tmp_path, f"policy.source={source}")


def test_sync_now_on_a_directory_source_says_there_is_nothing_to_follow(
    tmp_path, start_daemon
):
    overrides = bundle_overrides(tmp_path, str(SHIPPED_POLICIES))
    start_daemon(*[o for o in overrides if not o.startswith("policy.trusted_keys")])

    result = operator_cli(tmp_path, ("sync", "now"))

    assert result.returncode == 1
    assert "follows no bundles" in result.stderr


def test_sync_now_without_a_credential_is_a_usage_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "KYNARA_ADMIN_SECRET"}

    result = subprocess.run(
        [
            *CLI, "sync", "now", "--config", str(SHIPPED_CONFIG),
            "--set", f"admin.socket={tmp_path / 'admin.sock'}",
        ],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, env=env,
    )  # fmt: skip

    assert result.returncode == 2
    assert "--credential-file FILE or $KYNARA_ADMIN_SECRET" in result.stderr


def test_with_the_log_down_a_bundle_daemon_says_the_log_is_the_obstacle(
    tmp_path, start_daemon, bundle_file
):
    overrides = bundle_overrides(tmp_path, bundle_file)
    first = start_daemon(*overrides)
    first.stop()
    # The witness remembers a log that is gone: the daemon must not serve.
    shutil.rmtree(tmp_path / "audit")

    broken = start_daemon(*overrides)
    code, metadata = error_of(lambda: answered_revision(broken))

    assert health(broken) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert code == grpc.StatusCode.UNAVAILABLE
    assert metadata["kynara-error-code"] == "audit_unavailable"
