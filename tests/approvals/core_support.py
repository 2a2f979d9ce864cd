"""The approval core on real parts: LMDB in tmp_path, the audit writer, the
book and the pipeline on one event loop (no server).

``core(tmp_path, clock)`` is an async context manager giving a ``Core``;
tests run their body with ``asyncio.run``.
"""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import AsyncIterator

from support import SHIPPED_POLICIES, SettableClock, daemon_config

from kynara_sidecar.approvals.book import APPROVALS_DB, ApprovalBook
from kynara_sidecar.approvals.model import Reviewer, Verdict
from kynara_sidecar.audit.chain import decode_record
from kynara_sidecar.audit.record import AuditRecordV1
from kynara_sidecar.audit.store import AuditStore
from kynara_sidecar.audit.writer import AuditWriter
from kynara_sidecar.config import Config
from kynara_sidecar.decision import Resource
from kynara_sidecar.metrics import Metrics
from kynara_sidecar.pipeline import Answer, IncomingRequest, Pipeline
from kynara_sidecar.policy.loader import load_policies

__all__ = ["CAROL", "ERIN", "Core", "core", "refund", "reviewer"]


def reviewer(name: str, *roles: str) -> Reviewer:
    return Reviewer(id=name, roles=frozenset({"reviewer", *roles}))


CAROL = reviewer("carol")
ERIN = reviewer("erin")


def refund(
    amount: int = 60000,
    refund_id: str = "R1",
    user: str = "alice",
    approval_id: str = "",
    **context,
) -> IncomingRequest:
    """A refund support-bot issues for ``user``; amounts are cents, so the
    shipped policies ask for approval past 50000."""
    return IncomingRequest(
        action="payments.refund.issue",
        resource=Resource(
            kind="payments.refund", id=refund_id, attributes={"amount": amount}
        ),
        context=context,
        asserted_chain=(user,),
        approval_id=approval_id,
    )


class Core:
    """The store, writer, book and pipeline of one test."""

    def __init__(self, config: Config, store: AuditStore, clock: SettableClock):
        self.config = config
        self.store = store
        self.clock = clock
        self.writer = AuditWriter(store)
        self.writer.start()
        self.book = ApprovalBook(
            store,
            self.writer,
            config.approvals,
            daemon_id=config.identity.daemon_id,
            clock=clock,
            url_for=lambda approval_id: f"http://inbox.test/approvals/{approval_id}",
        )
        self.book.load()
        self.pipeline = Pipeline(config, self.writer, Metrics(), clock, book=self.book)

    def activate(self, policies: pathlib.Path = SHIPPED_POLICIES) -> None:
        self.pipeline.activate(load_policies(policies))

    async def decide(self, request: IncomingRequest) -> Answer:
        return await self.pipeline.decide(request)

    async def approve(self, approval_id: str, who: Reviewer = CAROL):
        return await self.book.review(approval_id, who, Verdict.APPROVE, "ok")

    def records(self) -> list[AuditRecordV1]:
        return [decode_record(r.record_bytes) for r in self.store.iter_records()]


@contextlib.asynccontextmanager
async def core(
    tmp_path: pathlib.Path,
    clock: SettableClock,
    *overrides: str,
    policies: pathlib.Path | None = SHIPPED_POLICIES,
) -> AsyncIterator[Core]:
    """A Core over LMDB in ``tmp_path`` (reopened by a second call on the
    same path: a restart), closed on exit."""
    config = daemon_config(tmp_path, *overrides)
    store = AuditStore.open(
        config.audit.path, map_size=config.audit.map_size, extra_dbs=(APPROVALS_DB,)
    )
    made = Core(config, store, clock)
    if policies is not None:
        made.activate(policies)
    try:
        yield made
    finally:
        await made.book.close()
        await made.writer.close()
        store.close()
