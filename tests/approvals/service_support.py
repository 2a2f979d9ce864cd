"""An in-memory ``Inbox`` for the reviewer-side tests, and approvals to fill it.

``MemoryInbox`` keeps approvals in a dict and reviews them with the shared
eligibility check (``approvals.eligibility``), the one the daemon's book and
the fleet inbox use; so ``ApprovalService`` and ``WaitApproval`` can be tested
over a real gRPC server before, and apart from, the LMDB book.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator, Callable

import msgspec

from kynara_sidecar.approvals.eligibility import check_review, outcome
from kynara_sidecar.approvals.model import (
    Approval,
    ApprovalState,
    ChainPrincipal,
    InboxQuery,
    Requirement,
    Review,
    Reviewer,
    Risk,
    Verdict,
)
from kynara_sidecar.errors import NotFound

__all__ = ["MemoryInbox", "make_approval"]

ONE_APPROVER = Requirement()
CREATED = datetime.datetime(2026, 12, 7, 9, 0, tzinfo=datetime.UTC)


def _iso(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def make_approval(
    number: int = 1,
    *,
    agent: str = "support-bot",
    chain: tuple[str, ...] = ("alice",),
    requirement: Requirement = ONE_APPROVER,
    action: str = "payments.refund.issue",
    risk: int = 40,
    state: ApprovalState = ApprovalState.PENDING,
) -> Approval:
    """A pending approval; ``number`` orders them (higher is newer)."""
    created = CREATED + datetime.timedelta(minutes=number)
    approval_id = f"apr_{number:026d}"
    return Approval(
        id=approval_id,
        state=state,
        daemon_id="support-bot@test",
        agent_id=agent,
        digest="sha256:" + "0" * 64,
        decision_id=f"dec-{number}",
        chain=tuple(ChainPrincipal(id=p, kind="user") for p in chain)
        + (ChainPrincipal(id=agent, kind="agent"),),
        action=action,
        resource_kind="payments.refund",
        resource_id=f"rf_{number}",
        attributes={"amount": 60000 + number},
        requirement=requirement,
        risk=Risk(score=risk),
        created_at=_iso(created),
        expires_at=_iso(created + datetime.timedelta(hours=1)),
        url=f"http://127.0.0.1:8080/approvals/{approval_id}",
    )


class MemoryInbox:
    """Approvals in memory, reviewed with the shared eligibility check."""

    def __init__(self, *approvals: Approval):
        self._approvals = {a.id: a for a in approvals}
        self._watchers: dict[str, list[asyncio.Queue[Approval]]] = {}
        self._subscribers: list[Callable[[Approval], None]] = []
        self.reviews_seen = 0

    def add(self, approval: Approval) -> None:
        self._approvals[approval.id] = approval
        for callback in self._subscribers:
            callback(approval)

    def subscribe(self, callback: Callable[[Approval], None]) -> None:
        self._subscribers.append(callback)

    def list(self, query: InboxQuery) -> list[Approval]:
        newest = sorted(self._approvals.values(), key=lambda a: a.id, reverse=True)
        if query.after:
            newest = [a for a in newest if a.id < query.after]
        return [
            a
            for a in newest
            if (query.state is None or a.state is query.state)
            and (not query.agent_id or a.agent_id == query.agent_id)
            and (not query.action or a.action == query.action)
            and a.risk.score >= query.min_risk
        ][: query.limit]

    def get(self, approval_id: str) -> Approval | None:
        return self._approvals.get(approval_id)

    async def review(
        self, approval_id: str, reviewer: Reviewer, verdict: Verdict, comment: str
    ) -> Approval:
        approval = self._approvals.get(approval_id)
        if approval is None:
            raise NotFound(f"no approval {approval_id!r}", field="approval_id")
        check_review(approval, reviewer, comment)
        self.reviews_seen += 1
        state = outcome(approval, verdict)
        review = Review(
            reviewer=reviewer.id,
            roles=tuple(sorted(reviewer.roles)),
            verdict=verdict,
            at=_iso(CREATED),
            comment=comment,
        )
        changed = msgspec.structs.replace(
            approval,
            state=state,
            reviews=(*approval.reviews, review),
            resolved_at="" if state is ApprovalState.PENDING else _iso(CREATED),
        )
        self.set(changed)
        return changed

    def set(self, approval: Approval) -> None:
        """Store a changed approval and tell its watchers."""
        self._approvals[approval.id] = approval
        for queue in self._watchers.get(approval.id, []):
            queue.put_nowait(approval)

    def watching(self, approval_id: str) -> int:
        return len(self._watchers.get(approval_id, []))

    async def watch(self, approval_id: str) -> AsyncIterator[Approval]:
        queue: asyncio.Queue[Approval] = asyncio.Queue()
        self._watchers.setdefault(approval_id, []).append(queue)
        try:
            current = self._approvals.get(approval_id)
            if current is not None:
                yield current
            while True:
                yield await queue.get()
        finally:
            self._watchers[approval_id].remove(queue)


class LoopServer:
    """A grpc.aio server on a Unix socket, served from its own loop thread,
    so blocking test code can call it; ``stop()`` is idempotent."""

    def __init__(self, socket_path: str, *services) -> None:
        import threading

        self.target = f"unix://{socket_path}"
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._services = services
        self._server = None
        self.call(self._start())

    def call(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> None:
        import grpc

        self._server = grpc.aio.server()
        for service in self._services:
            service.register(self._server)
        self._server.add_insecure_port(self.target)
        await self._server.start()

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.call(self._server.stop(None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def socket_path(tmp_path, name: str) -> str:
    """A Unix socket path under tmp_path, or under a short temp dir when
    tmp_path is too long for sun_path (108 bytes); the caller removes it."""
    import tempfile

    path = f"{tmp_path}/{name}"
    if len(path) < 100:
        return path
    return f"{tempfile.mkdtemp(prefix='kyapr-')}/{name}"
