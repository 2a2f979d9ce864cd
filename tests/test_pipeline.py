"""The decision pipeline on its own: real LMDB, no server."""

from __future__ import annotations

import asyncio

import pytest
from support import SHIPPED_POLICIES, SettableClock, daemon_config

from kynara_sidecar.audit.store import AuditStore
from kynara_sidecar.audit.writer import AuditWriter
from kynara_sidecar.decision import Effect, Resource
from kynara_sidecar.errors import PolicyNotReady
from kynara_sidecar.metrics import Metrics
from kynara_sidecar.pipeline import IncomingRequest, Pipeline
from kynara_sidecar.policy.loader import load_policies

REFUND = IncomingRequest(
    action="payments.refund.issue",
    resource=Resource(kind="payments.refund", id="rf_1", attributes={"amount": 1200}),
    asserted_chain=("alice",),
)


def decide(tmp_path, request: IncomingRequest, *, activate: bool):
    config = daemon_config(tmp_path)
    store = AuditStore.open(config.audit.path, map_size=config.audit.map_size)

    async def run():
        writer = AuditWriter(store)
        writer.start()
        pipeline = Pipeline(config, writer, Metrics(), SettableClock())
        if activate:
            pipeline.activate(load_policies(SHIPPED_POLICIES))
        try:
            return await pipeline.decide(request)
        finally:
            await writer.close()

    try:
        return asyncio.run(run()), store.head()
    finally:
        store.close()


def test_no_active_policy_is_policy_not_ready_and_logs_nothing(tmp_path):
    with pytest.raises(PolicyNotReady, match="no policy set is active yet"):
        decide(tmp_path, REFUND, activate=False)

    store = AuditStore.open(tmp_path / "audit", readonly=True)
    assert list(store.iter_records()) == []
    store.close()


def test_daemon_agent_is_appended_to_the_asserted_chain(tmp_path):
    answer, head = decide(tmp_path, REFUND, activate=True)

    assert answer.decision.effect is Effect.ALLOW
    assert [p.id for p in answer.decision.chain] == ["alice", "support-bot"]
    assert answer.audit_sequence == head.seq
