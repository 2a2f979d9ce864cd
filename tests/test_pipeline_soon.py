"""Pipeline.decide_soon: many independent requests decided at once, their
records committed in one transaction, answered through one callback."""

from __future__ import annotations

import asyncio

import msgspec
from support import SHIPPED_POLICIES, SettableClock, daemon_config

from kynara_sidecar.audit.record import AuditRecordV1
from kynara_sidecar.audit.store import AuditStore
from kynara_sidecar.audit.writer import AuditWriter
from kynara_sidecar.decision import Effect, Resource
from kynara_sidecar.errors import AuditUnavailable, InvalidRequest
from kynara_sidecar.metrics import Metrics
from kynara_sidecar.pipeline import Answer, IncomingRequest, Pipeline
from kynara_sidecar.policy.loader import load_policies


def refund(amount: int, request_id: str) -> IncomingRequest:
    return IncomingRequest(
        action="payments.refund.issue",
        resource=Resource(
            kind="payments.refund", id="rf_1", attributes={"amount": amount}
        ),
        asserted_chain=("alice",),
        request_id=request_id,
    )


def decide_soon(tmp_path, requests, *, break_store: bool = False):
    """decide_soon on an activated pipeline over real LMDB: what ``done``
    got, the commit sizes, and every record committed."""
    config = daemon_config(tmp_path)
    store = AuditStore.open(config.audit.path, map_size=config.audit.map_size)
    sizes: list[int] = []

    async def run():
        writer = AuditWriter(store, on_commit=lambda size, _: sizes.append(size))
        writer.start()
        pipeline = Pipeline(config, writer, Metrics(), SettableClock())
        pipeline.activate(load_policies(SHIPPED_POLICIES))
        if break_store:

            def failing(*args, **kwargs):
                raise AuditUnavailable("audit log: the disk said no")

            store.append_batch = failing
        landed = asyncio.get_running_loop().create_future()
        try:
            pipeline.decide_soon(requests, landed.set_result)
            outcomes = await landed
            return outcomes, pipeline._in_flight
        finally:
            await writer.close()

    try:
        (outcomes, in_flight) = asyncio.run(run())
        records = [
            msgspec.json.decode(stored.record_bytes, type=AuditRecordV1)
            for stored in store.iter_records()
        ]
        return outcomes, in_flight, sizes, records
    finally:
        store.close()


def test_each_request_gets_its_own_answer_and_all_share_one_commit(tmp_path):
    requests = [refund(100, "a"), refund(60_000, "b"), refund(200, "c")]

    outcomes, in_flight, sizes, records = decide_soon(tmp_path, requests)

    assert [type(o) for o in outcomes] == [Answer, Answer, Answer]
    assert [o.request_id for o in outcomes] == ["a", "b", "c"]
    assert [o.decision.effect for o in outcomes] == [
        Effect.ALLOW,
        Effect.REQUIRE_APPROVAL,
        Effect.ALLOW,
    ]
    # Three records, one transaction.
    assert sizes == [3]
    by_seq = {r.seq: r for r in records}
    for outcome in outcomes:
        assert by_seq[outcome.audit_sequence].decision_id == outcome.decision_id
    assert in_flight == 0


def test_a_bad_request_gets_its_error_and_the_others_are_decided(tmp_path):
    bad = msgspec.structs.replace(refund(100, "bad"), action="no such action!")

    outcomes, _, sizes, records = decide_soon(
        tmp_path, [refund(100, "a"), bad, refund(100, "c")]
    )

    assert isinstance(outcomes[1], InvalidRequest)
    assert outcomes[1].field == "action"
    assert [outcomes[0].request_id, outcomes[2].request_id] == ["a", "c"]
    assert sizes == [2]
    assert [r.request_id for r in records if r.kind == "decision"] == ["a", "c"]


def test_a_failed_commit_fails_every_decided_request_and_logs_none(tmp_path):
    outcomes, in_flight, sizes, _ = decide_soon(
        tmp_path, [refund(100, "a"), refund(100, "b")], break_store=True
    )

    assert all(isinstance(o, AuditUnavailable) for o in outcomes)
    assert sizes == []
    assert in_flight == 0
