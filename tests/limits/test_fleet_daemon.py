"""Fleet-scope limits between two real daemons sharing a dir:// store, over
gRPC; and a fleet limit on a daemon with no central store, which fails
closed."""

from __future__ import annotations

import asyncio
import pathlib
import time

from kynara.v1 import decision_pb2 as pb
from limits_support import policy_dir, refund_request
from support import RunningDaemon, SettableClock, daemon_config, read_record

from kynara_sidecar.audit.record import decode_value

FLEET = """\
format_version: 1
kind: policy
name: fleet-refunds
limits:
  refunds_fleet:
    description: three refunds per user across every agent of the fleet
    actions: [payments.refund.issue]
    key: [user]
    window: {rolling: 1d}
    ceiling: 3
    scope: fleet
rules:
  - id: refunds-across-the-fleet
    effect: deny
    actions: [payments.refund.issue]
    resources: [payments.refund]
    roles: [support, support_agent]
    condition: limits.refunds_fleet.exceeded
"""
WAIT_SECONDS = 20.0


def policies(tmp_path: pathlib.Path) -> pathlib.Path:
    return policy_dir(tmp_path / "policies", {"fleet-refunds.yaml": FLEET})


def start(tmp_path: pathlib.Path, name: str, root, clock, *overrides: str):
    home = tmp_path / name
    home.mkdir()
    return RunningDaemon(
        daemon_config(
            home,
            f"policy.source={root}",
            f"identity.daemon_id={name}",
            *overrides,
        ),
        clock,
    )


def refund(stub, rid: str):
    return stub.Decide(refund_request(rid, 100), timeout=10)


def remote_count(running: RunningDaemon, clock: SettableClock) -> int | None:
    async def read():
        limit = running.daemon.pipeline.policies.policy_set.limits["refunds_fleet"]
        seen = running.daemon._fleet_tally(limit, '["alice"]', clock() - 86_400 * 10**9)
        return None if seen is None else seen.count

    return running.call(read())


def test_two_daemons_share_a_fleet_limit_through_the_store(tmp_path):
    clock = SettableClock("2026-12-07T09:00:00Z")
    root = policies(tmp_path)
    central = tmp_path / "central"
    central.mkdir()
    shared = (f"sync.store=dir://{central}", "sync.poll_seconds=0.05")
    first = start(tmp_path, "pod-a", root, clock, *shared)
    second = start(tmp_path, "pod-b", root, clock, *shared)
    try:
        a, b = first.stub(), second.stub()
        assert [refund(a, f"a{i}").decision for i in range(2)] == [
            pb.DECISION_ALLOW
        ] * 2
        deadline = time.monotonic() + WAIT_SECONDS
        while remote_count(second, clock) != 2:
            assert time.monotonic() < deadline, "pod-b never saw pod-a's two"
            time.sleep(0.05)
        stale = second.daemon.metrics.limit_fleet_stale.collect()[0].samples[0]
        assert stale.value == 0
        third = refund(b, "b1")
        fourth = refund(b, "b2")
        assert third.decision == pb.DECISION_ALLOW
        assert fourth.decision == pb.DECISION_DENY
        assert fourth.reason_code == "rule_denied"
        record = read_record(second, fourth.audit_sequence)
        entry = record.limits["refunds_fleet"]
        assert (entry.scope, entry.count, entry.remote_count) == ("fleet", 1, 2)
        assert decode_value(entry.ceiling) == 3
    finally:
        second.stop()
        first.stop()


def test_a_fleet_limit_without_a_central_store_fails_closed(tmp_path):
    clock = SettableClock("2026-12-07T09:00:00Z")
    running = start(tmp_path, "alone", policies(tmp_path), clock)
    try:
        answer = refund(running.stub(), "r1")
        assert answer.decision == pb.DECISION_DENY
        assert answer.reason_code == "condition_error"
        record = read_record(running, answer.audit_sequence)
        assert "central store" in record.limits["refunds_fleet"].error
    finally:
        running.stop()


def _streams(url: str) -> set[str]:
    async def names() -> set[str]:
        import nats

        client = await nats.connect(url)
        try:
            return {
                info.config.name for info in await client.jetstream().streams_info()
            }
        finally:
            await client.close()

    return asyncio.run(asyncio.wait_for(names(), 30))


def test_fleet_limits_connect_only_once_a_set_declares_one(tmp_path, nats_server):
    """A daemon whose policies declare no fleet-scope limit never touches
    the limits bucket (an open server would let it make one); a reload
    that declares one starts the sharing, which makes it."""
    clock = SettableClock("2026-12-07T09:00:00Z")
    root = policy_dir(tmp_path / "policies")
    running = start(tmp_path, "pod-a", root, clock, f"sync.store={nats_server.url}")
    try:
        deadline = time.monotonic() + WAIT_SECONDS
        while "KV_kynara_status" not in _streams(nats_server.url):
            assert time.monotonic() < deadline, "the daemon never connected"
            time.sleep(0.05)
        fleet = running.daemon._fleet_limits
        assert fleet is not None and not fleet.started
        assert "KV_kynara_limits" not in _streams(nats_server.url)

        (root / "fleet-refunds.yaml").write_text(FLEET)
        assert running.call(running.daemon.reload()) is True
        assert fleet.started
        while "KV_kynara_limits" not in _streams(nats_server.url):
            assert time.monotonic() < deadline, "fleet sharing never used the store"
            time.sleep(0.05)
    finally:
        running.stop()
