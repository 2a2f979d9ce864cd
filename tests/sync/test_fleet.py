"""A fleet of eight daemons on one real nats-server: they converge on each
published revision, keep deciding through an outage, and every one of them
refuses a broken bundle while keeping the revision it has.

Each daemon is a ``kynara-sidecar run`` child process with its own socket,
audit log, daemon id and metrics port. Every wait is on a condition, with a
bound; nothing sleeps blindly.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request

import pytest
from fault_helpers import CALL_TIMEOUT, DaemonProcess
from nats_support import NatsServer
from support import REPO_ROOT, SHIPPED_CONFIG, small_refund

from kynara_sidecar.sync import open_store
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

pytestmark = pytest.mark.slow

FLEET_SIZE = 8
# The bound for a published revision to reach every daemon.
CONVERGE_SECONDS = 10.0
SECRET = "operator-secret-0123456789abcdef"
CLI = [sys.executable, "-m", "kynara_sidecar.cli"]


class Fleet:
    """``FLEET_SIZE`` daemons following one nats-server."""

    def __init__(self, root, nats: NatsServer):
        self.root = root
        self.nats = nats
        secret = root / "operator.secret"
        secret.write_text(SECRET)
        self.daemons: list[DaemonProcess] = []
        for n in range(FLEET_SIZE):
            home = root / f"daemon-{n}"
            home.mkdir()
            self.daemons.append(
                DaemonProcess(
                    home / "agent.sock",
                    home / "audit",
                    home / "daemon.log",
                    f"identity.daemon_id=fleet-{n}",
                    f"policy.source={nats.url}",
                    f"policy.trusted_keys=[{public_key_file(root)}]",
                    "audit.create_signing_key=true",
                    f"admin.socket={home / 'admin.sock'}",
                    f"admin.credentials={{ops: {{secret_file: {secret}, "
                    "roles: [operator]}}",
                    "http.port=0",
                    "sync.poll_seconds=0.5",
                    "sync.status_seconds=0.2",
                    "sync.retry_min_seconds=0.05",
                    "sync.retry_max_seconds=0.5",
                    "sync.timeout_seconds=2",
                )
            )
        try:
            for daemon in self.daemons:
                daemon.wait_serving()
            self.metrics_urls = [_metrics_url(d) for d in self.daemons]
        except BaseException:
            self.close()
            raise

    def publish(self, bundle: bytes) -> None:
        publish(self.nats.url, bundle)

    def revisions(self) -> list[str]:
        return [
            d.stub().Decide(small_refund(), timeout=CALL_TIMEOUT).policy_revision
            for d in self.daemons
        ]

    def wait_all_on(self, revision: str, seconds: float = CONVERGE_SECONDS) -> None:
        deadline = time.monotonic() + seconds
        while (seen := self.revisions()) != [revision] * FLEET_SIZE:
            assert time.monotonic() < deadline, (
                f"not every daemon answered with {revision} within {seconds} s: {seen}"
            )
            time.sleep(0.05)

    def synced(self, n: int, outcome: str) -> float:
        return _sample(self.metrics_urls[n], "kynara_policy_sync_total", outcome)

    def close(self) -> None:
        for daemon in self.daemons:
            if daemon.process.poll() is None:
                daemon.terminate()
            daemon.close()


def publish(url: str, bundle: bytes) -> None:
    """Publish as the policy publisher does: its own connection."""

    async def go() -> None:
        store = open_store(url)
        try:
            await store.connect()
            await store.publish_bundle(bundle)
        finally:
            await store.close()

    asyncio.run(go())


def _metrics_url(daemon: DaemonProcess) -> str:
    for line in daemon.log_text().splitlines():
        if line.startswith("{") and '"http_port"' in line:
            port = json.loads(line).get("http_port")
            if port:
                return f"http://127.0.0.1:{port}/metrics"
    raise AssertionError(f"no http_port in the log:\n{daemon.log_text()}")


def _sample(url: str, name: str, outcome: str) -> float:
    with urllib.request.urlopen(url, timeout=CALL_TIMEOUT) as reply:
        text = reply.read().decode()
    wanted = f'{name}{{outcome="{outcome}"}} '
    for line in text.splitlines():
        if line.startswith(wanted):
            return float(line[len(wanted) :])
    return 0.0


def _wait(condition, what: str, seconds: float = CONVERGE_SECONDS) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    nats = NatsServer(root)
    try:
        publish(nats.url, signed(root, "r1", seconds=0))
        running = Fleet(root, nats)
        try:
            yield running
        finally:
            running.close()
    finally:
        nats.stop()


def test_every_daemon_converges_and_keeps_deciding_through_an_outage(fleet):
    root = fleet.root
    fleet.wait_all_on(revision_of(policy_dir(root, "r1")))

    fleet.publish(signed(root, "r2", seconds=10))
    fleet.wait_all_on(revision_of(policy_dir(root, "r2")))
    fleet.nats.stop()
    during_outage = fleet.revisions()
    fleet.nats.start()
    fleet.publish(signed(root, "r3", seconds=20))

    assert during_outage == [revision_of(policy_dir(root, "r2"))] * FLEET_SIZE
    fleet.wait_all_on(revision_of(policy_dir(root, "r3")))


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (bad_signature, "signature"),
        (broken_compile, BROKEN_RULE),
        (truncated, "truncated"),
    ],
    ids=["bad_signature", "does_not_compile", "truncated"],
)
def test_a_broken_bundle_leaves_every_daemon_on_its_revision(fleet, make, reason):
    root = fleet.root
    good = signed(root, f"good-before-{make.__name__}", seconds=100 + _step(make))
    fleet.publish(good)
    active = revision_of(policy_dir(root, f"good-before-{make.__name__}"))
    fleet.wait_all_on(active)
    activated = [fleet.synced(n, "activated") for n in range(FLEET_SIZE)]
    refused = [fleet.synced(n, "refused") for n in range(FLEET_SIZE)]

    fleet.publish(make(root, seconds=101 + _step(make)))
    for n in range(FLEET_SIZE):
        _wait(
            lambda n=n: fleet.synced(n, "refused") > refused[n],
            f"daemon {n} to refuse the {make.__name__} bundle",
        )
    code, outcome = _sync_now(fleet, 0)

    assert fleet.revisions() == [active] * FLEET_SIZE
    assert [fleet.synced(n, "activated") for n in range(FLEET_SIZE)] == activated
    assert code == 1
    assert outcome["outcome"] == str(SyncOutcome.REFUSED)
    assert reason in outcome["error"]
    assert outcome["revision"] == active
    status = _fleet_status(fleet)
    assert len(status) == FLEET_SIZE
    for row in status:
        policy = row["status"]["policy"]
        assert policy["revision"] == active, row
        assert reason in policy["last_sync"]["error"], row


def _step(make) -> int:
    # Each case publishes later than the one before: creation times grow.
    return 10 * [bad_signature, broken_compile, truncated].index(make)


def _sync_now(fleet: Fleet, n: int) -> tuple[int, dict]:
    home = fleet.root / f"daemon-{n}"
    result = subprocess.run(
        [
            *CLI, "sync", "now", "--config", str(SHIPPED_CONFIG),
            "--set", f"admin.socket={home / 'admin.sock'}",
            "--credential-file", str(fleet.root / "operator.secret"),
        ],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
    )  # fmt: skip
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


def _fleet_status(fleet: Fleet) -> list[dict]:
    def refreshed() -> list[dict] | None:
        result = subprocess.run(
            [*CLI, "fleet", "status", "--store", fleet.nats.url, "--json"],
            capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    rows: list[dict] = []

    def all_refused() -> bool:
        nonlocal rows
        rows = refreshed()
        return len(rows) == FLEET_SIZE and all(
            r["status"]["policy"]["last_sync"]["outcome"] == str(SyncOutcome.REFUSED)
            for r in rows
        )

    _wait(all_refused, "every daemon's status to report the refusal")
    return rows
