"""Helpers for the review page's tests: an in-memory inbox, sample approvals,
reviewers, and the page served on 127.0.0.1 from its own loop thread.

``MemoryInbox`` is the other side of the page, not the code under test: it
keeps approvals in a dict and decides reviews with the real eligibility
rules (``approvals.eligibility``), as every inbox must.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import msgspec
from aiohttp import web

from kynara_sidecar.approvals.eligibility import check_review, outcome
from kynara_sidecar.approvals.model import (
    Approval,
    ApprovalState,
    AskingRule,
    ChainPrincipal,
    InboxQuery,
    Requirement,
    Review,
    Reviewer,
    Risk,
    RiskFactor,
    Verdict,
)
from kynara_sidecar.errors import IdentityInvalid, NotFound, RoleMissing
from kynara_sidecar.server.review_page import add_review_routes

__all__ = [
    "HOSTILE",
    "NOW_NS",
    "TOKENS",
    "MemoryInbox",
    "ServedPage",
    "authenticate",
    "disguised_approvals",
    "sample_approvals",
]

# 2026-12-07T09:00:00Z
NOW_NS = 1_796_634_000 * 1_000_000_000
HOSTILE = '<script>alert("x")</script>&"\'><img src=x onerror=alert(1)>'

ALICE = Reviewer(id="rita", roles=frozenset({"reviewer", "finance"}), credential="t")
TOKENS = {
    "rita-secret": ALICE,
    "sam-secret": Reviewer(id="sam", roles=frozenset({"reviewer"}), credential="t"),
    "alice-secret": Reviewer(
        id="alice", roles=frozenset({"reviewer", "finance"}), credential="t"
    ),
    "otto-secret": Reviewer(
        id="otto", roles=frozenset({"reviewer", "finance"}), credential="t"
    ),
}
AGENT_SECRET = "agent-secret"


def authenticate(token: str) -> Reviewer:
    """A ReviewerAuth stand-in: known tokens, an agent's refused."""
    if token == AGENT_SECRET:
        raise RoleMissing("an agent's credential cannot review", field="token")
    try:
        return TOKENS[token]
    except KeyError:
        raise IdentityInvalid("unknown token", field="token") from None


def _approval(
    n: int,
    *,
    action: str,
    agent: str,
    score: int,
    amount: str,
    state: ApprovalState = ApprovalState.PENDING,
    roles: tuple[tuple[str, ...], ...] = (),
    user: str = "alice",
) -> Approval:
    return Approval(
        id=f"apr_{n:026d}".replace("0", "a"),
        state=state,
        daemon_id="daemon-1",
        agent_id=agent,
        digest="sha256:" + "0" * 64,
        decision_id=f"dec_{n}",
        chain=(
            ChainPrincipal(id=user, kind="user", roles=("customer",)),
            ChainPrincipal(id=agent, kind="agent"),
        ),
        action=action,
        resource_kind="refund",
        resource_id=f"R{n}",
        attributes={
            "amount": {"int": amount},
            "currency": {"string": "EUR"},
            "lines": {"list": [{"string": "sku-1"}, {"int": "2"}]},
            "owner": {"map": {"email": {"redacted": "hmac-sha256:ab12:" + "f" * 64}}},
        },
        context={"reason": {"string": "damaged parcel"}},
        rules=(
            AskingRule(
                policy="refunds",
                rule="large-refund",
                principal=agent,
                description="Refunds over 1,000 EUR need a human.",
                condition="R.attr.amount > 1000",
            ),
        ),
        requirement=Requirement(approvers=1, reviewer_roles=roles),
        risk=Risk(
            score=score,
            factors=(
                RiskFactor("rule", 40.0, 0.5, 20.0, "rule risk 50"),
                RiskFactor("amount", 30.0, 1.0, 30.0, f"amount {amount} past 1000"),
                RiskFactor("off_hours", 10.0, 0.0, 0.0, "Monday 10:00"),
            ),
        ),
        policy_revision="rev-1",
        created_at=f"2026-12-07T08:{n:02d}:00Z",
        expires_at="2026-12-07T10:00:00Z",
    )


def sample_approvals() -> list[Approval]:
    """Five approvals of two agents and two actions; #3 needs the finance
    role; #5 is already rejected."""
    return [
        _approval(1, action="payments.refund.issue", agent="bot-a", score=30,
                  amount="1500"),
        _approval(2, action="payments.refund.issue", agent="bot-b", score=55,
                  amount="5000"),
        _approval(3, action="payments.payout.send", agent="bot-a", score=80,
                  amount="9000", roles=(("finance",),)),
        _approval(4, action="payments.refund.issue", agent="bot-a", score=10,
                  amount="1200", user="sam"),
        _approval(5, action="payments.refund.issue", agent="bot-b", score=20,
                  amount="1100", state=ApprovalState.REJECTED),
    ]  # fmt: skip


def disguised_approvals() -> tuple[list[Approval], Approval]:
    """The sample approvals with #2 full of characters a reader cannot see
    (a right-to-left override in its resource id, zero-width characters in
    names, NUL and ESC in a value, ...); returns them and that one."""
    approvals = sample_approvals()
    base = approvals[1]
    approvals[1] = msgspec.structs.replace(
        base,
        resource_id="invoice-\u202efdp.exe",
        request_id="req\u2066-1",
        agent_id="bot-b\u200b",
        chain=(
            msgspec.structs.replace(base.chain[0], id="alice\u200d"),
            *base.chain[1:],
        ),
        attributes={
            "amount\u200b": {"int": "5000"},
            "note": {"string": "ok\x00\x1b[2J\ufeff\u00a0\U000e0041\u3164"},
        },
        context={"reason\u2066": {"string": "damaged\u202e parcel"}},
        rules=(
            AskingRule(
                policy="refunds",
                rule="large-refund",
                principal="bot-b",
                description="Refunds \u202eover\u202c 1,000 EUR need a human.",
                condition="R.attr.amount > 1000",
            ),
        ),
        reviews=(
            Review(
                reviewer="sam",
                roles=("reviewer",),
                verdict=Verdict.APPROVE,
                at="2026-12-07T08:30:00Z",
                comment="fine\u202e by me",
            ),
        ),
        requirement=msgspec.structs.replace(base.requirement, approvers=2),
    )
    return approvals, approvals[1]


class MemoryInbox:
    """An ``Inbox`` over a dict, deciding reviews with the real rules."""

    def __init__(self, approvals: Sequence[Approval]):
        self.approvals = {a.id: a for a in approvals}

    def list(self, query: InboxQuery) -> Sequence[Approval]:
        found = sorted(self.approvals.values(), key=lambda a: a.created_at)[::-1]
        found = [
            a
            for a in found
            if (query.state is None or a.state is query.state)
            and (not query.agent_id or a.agent_id == query.agent_id)
            and (not query.action or a.action == query.action)
            and a.risk.score >= query.min_risk
        ]
        if query.after:
            ids = [a.id for a in found]
            found = found[ids.index(query.after) + 1 :] if query.after in ids else []
        return found[: query.limit]

    def get(self, approval_id: str) -> Approval | None:
        return self.approvals.get(approval_id)

    async def review(
        self,
        approval_id: str,
        reviewer: Reviewer,
        verdict: Verdict,
        comment: str,
        *,
        view: str = "",
    ) -> Approval:
        approval = self.approvals.get(approval_id)
        if approval is None:
            raise NotFound(f"no approval {approval_id}", field="approval_id")
        check_review(approval, reviewer, comment)
        review = Review(
            reviewer=reviewer.id,
            roles=tuple(sorted(reviewer.roles)),
            verdict=verdict,
            at="2026-12-07T09:00:00Z",
            comment=comment,
        )
        after = msgspec.structs.replace(
            approval,
            state=outcome(approval, verdict),
            reviews=(*approval.reviews, review),
        )
        self.approvals[approval_id] = after
        return after


class ServedPage:
    """The review page on 127.0.0.1 (a free port), served from a loop in its
    own thread so a synchronous browser can drive it; ``stop()`` ends it."""

    def __init__(self, inbox: MemoryInbox, *, session_seconds: int = 3600):
        self.inbox = inbox
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        app = web.Application()
        self.sessions = add_review_routes(
            app,
            inbox,
            authenticate,
            title="Kynara test inbox",
            session_seconds=session_seconds,
            clock=lambda: NOW_NS,
        )
        self.runner = web.AppRunner(app, access_log=None)
        self._call(self._start())

    async def _start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._call(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
