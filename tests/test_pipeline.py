"""The decision pipeline on its own: real LMDB, no server."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from support import SHIPPED_POLICIES, SettableClock, daemon_config, run_pipeline

from kynara_sidecar.audit.record import AuditRecordV1, GatewayEntry
from kynara_sidecar.audit.store import AuditStore
from kynara_sidecar.audit.writer import AuditWriter
from kynara_sidecar.decision import Effect, Resource
from kynara_sidecar.errors import InvalidRequest, PolicyNotReady
from kynara_sidecar.metrics import Metrics
from kynara_sidecar.pipeline import IncomingRequest, Pipeline
from kynara_sidecar.policy.loader import load_policies

REFUND = IncomingRequest(
    action="payments.refund.issue",
    resource=Resource(kind="payments.refund", id="rf_1", attributes={"amount": 1200}),
    asserted_chain=("alice",),
)


def decide(tmp_path, request: IncomingRequest, *, activate: bool):
    """Decide ``request`` on a fresh pipeline; its answer and the records."""

    async def steps(pipeline):
        return await pipeline.decide(request)

    return run_pipeline(tmp_path, steps, activate=activate)


def test_no_active_policy_is_policy_not_ready_and_logs_nothing(tmp_path):
    with pytest.raises(PolicyNotReady, match="no policy set is active yet"):
        decide(tmp_path, REFUND, activate=False)

    store = AuditStore.open(tmp_path / "audit", readonly=True)
    assert list(store.iter_records()) == []
    store.close()


def test_daemon_agent_is_appended_to_the_asserted_chain(tmp_path):
    answer, records = decide(tmp_path, REFUND, activate=True)

    assert answer.decision.effect is Effect.ALLOW
    assert [p.id for p in answer.decision.chain] == ["alice", "support-bot"]
    assert answer.audit_sequence == records[-1].seq


def test_a_front_doors_gateway_entry_lands_in_the_decision_record(tmp_path):
    entry = GatewayEntry(server="files", tool="read", args_digest="ab" * 32)

    async def steps(pipeline):
        return await pipeline.decide(msgspec.structs.replace(REFUND, gateway=entry))

    answer, records = run_pipeline(tmp_path, steps)

    (record,) = [r for r in records if r.decision_id == answer.decision_id]
    assert record.kind == "decision"
    assert record.gateway == entry


def test_record_outcome_appends_an_outcome_record_naming_the_decision(tmp_path):
    entry = GatewayEntry(server="files", tool="read", args_digest="cd" * 32)

    async def steps(pipeline):
        answer = await pipeline.decide(REFUND)
        await pipeline.record_outcome(answer, "cancelled", gateway=entry)
        return answer

    answer, records = run_pipeline(tmp_path, steps)

    decision, outcome = [r for r in records if r.decision_id == answer.decision_id]
    assert (decision.kind, decision.decision, decision.outcome) == (
        "decision",
        "allow",
        "",
    )
    assert (outcome.kind, outcome.outcome, outcome.gateway) == (
        "outcome",
        "cancelled",
        entry,
    )
    assert outcome.seq == decision.seq + 1


def test_chain_of_establishes_the_chain_without_deciding(tmp_path):
    async def steps(pipeline):
        chain = pipeline.chain_of(REFUND)
        shown = pipeline.could_allow(
            chain,
            [
                ("payments.refund", "payments.refund.issue"),
                ("payments.refund", "payments.refund.delete"),
            ],
        )
        with pytest.raises(InvalidRequest, match="empty chain"):
            pipeline.chain_of(msgspec.structs.replace(REFUND, asserted_chain=()))
        return chain, shown

    (chain, shown), records = run_pipeline(tmp_path, steps)

    assert chain == ("alice", "support-bot")
    assert shown == [True, False]
    assert not [r for r in records if r.kind == "decision"]


def test_policy_watchers_see_each_activation_until_they_unsubscribe(tmp_path):
    seen = []

    async def steps(pipeline):
        stop = pipeline.watch_policies(lambda p: seen.append(p.policy_set.revision))
        policies = load_policies(SHIPPED_POLICIES)
        pipeline.activate(policies)
        stop()
        pipeline.activate(policies)
        return policies.policy_set.revision

    revision, _ = run_pipeline(tmp_path, steps)

    assert seen == [revision]


def test_a_redacted_arguments_digest_is_sealed_with_the_redaction_key(tmp_path):
    key_file = tmp_path / "redaction.key"
    key_file.write_text("k" * 40)
    config = daemon_config(
        tmp_path,
        "audit.redact={resource_attributes: {amount: hash}}",
        f"audit.redaction_key={key_file}",
    )
    plain = "ab" * 32
    entry = GatewayEntry(server="pay", tool="refund", args_digest=plain)
    store = AuditStore.open(config.audit.path, map_size=config.audit.map_size)

    async def run():
        writer = AuditWriter(store)
        writer.start()
        pipeline = Pipeline(config, writer, Metrics(), SettableClock())
        pipeline.activate(load_policies(SHIPPED_POLICIES))
        try:
            return await pipeline.decide(msgspec.structs.replace(REFUND, gateway=entry))
        finally:
            await writer.close()

    try:
        answer = asyncio.run(run())
        (stored,) = [
            s
            for s in store.iter_records()
            if answer.decision_id.encode() in s.record_bytes
        ]
    finally:
        store.close()
    record = msgspec.json.decode(stored.record_bytes, type=AuditRecordV1)

    assert "$.resource.attributes.amount" in record.redactions
    assert record.gateway.args_digest.startswith("hmac-sha256:")
    assert plain not in stored.record_bytes.decode()
    redactor = config.audit.load_redactor()
    assert record.gateway.args_digest == redactor.seal_digest(plain)
