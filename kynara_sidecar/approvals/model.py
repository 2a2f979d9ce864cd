"""The approval and what is said about it: the values every part shares.

An approval is created by a require_approval decision and lives until it is
used (``used``) or ends without use (``rejected``, ``expired``):

    pending --(enough distinct approvals)--> approved --(the allow)--> used
    pending --(a rejection)--> rejected
    pending or approved --(its expiry passes)--> expired

The daemon's ``ApprovalBook`` holds them (LMDB, beside the log); the
review page, ``ApprovalService`` and the collector's fleet inbox read them
through the ``Inbox`` protocol, so every inbox shows and resolves the same
thing. Values here are plain msgspec structs: they are stored (msgpack),
published to the central store (JSON) and shown, all from one shape.
"""

from __future__ import annotations

import base64
import enum
import secrets
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import msgspec

from kynara_sidecar.audit.record import parse_timestamp
from kynara_sidecar.errors import InvalidRequest

__all__ = [
    "FINAL_STATES",
    "MAX_COMMENT_CHARS",
    "MAX_PREVIOUS",
    "Approval",
    "ApprovalState",
    "AskingRule",
    "ChainPrincipal",
    "EarlierApproval",
    "Inbox",
    "InboxQuery",
    "Requirement",
    "Review",
    "Reviewer",
    "Risk",
    "RiskFactor",
    "Verdict",
    "earlier_approvals",
    "nanos_of",
    "random_id",
]

# A comment is for a human; it is kept in the audit record.
MAX_COMMENT_CHARS = 2000
# How many earlier rejected or expired approvals of the same request a new
# one names (``Approval.previous``): enough to show a reviewer that an agent
# keeps asking, few enough to keep the approval and its record small.
MAX_PREVIOUS = 5


class ApprovalState(enum.StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    EXPIRED = "expired"
    USED = "used"


# No change leaves these.
FINAL_STATES = frozenset(
    {ApprovalState.REJECTED, ApprovalState.EXPIRED, ApprovalState.USED}
)


class Verdict(enum.StrEnum):
    APPROVE = "approve"
    REJECT = "reject"


class Reviewer(msgspec.Struct, frozen=True):
    """An authenticated reviewer.

    ``id`` is compared with the chain's principal ids for self-approval, so
    it is the reviewer's principal id (a JWT's ``sub``, or the configured
    ``principal`` of an admin credential). ``roles`` always holds
    ``reviewer``, plus the reviewer roles that rules may require.
    ``credential`` names how they proved it, for the log line: an admin
    credential's name or a JWT issuer.
    """

    id: str
    roles: frozenset[str]
    credential: str = ""


class ChainPrincipal(msgspec.Struct, frozen=True):
    id: str
    kind: str = ""
    roles: tuple[str, ...] = ()


class AskingRule(msgspec.Struct, frozen=True):
    """A require_approval rule that held (or errored) for ``principal``."""

    policy: str
    rule: str
    principal: str
    description: str = ""
    condition: str = ""


class Requirement(msgspec.Struct, frozen=True):
    """What the asking rules need from reviewers, combined: the most
    approvers any asks for, the roles of every rule that names some (a
    reviewer counts when they hold one of each such rule's roles), self
    approval only when every asking rule allows it, and the earliest
    expiry."""

    approvers: int = 1
    # One tuple of acceptable roles per rule that names roles.
    reviewer_roles: tuple[tuple[str, ...], ...] = ()
    allow_self_approval: bool = False
    expires_in_seconds: int = 3600


class RiskFactor(msgspec.Struct, frozen=True):
    """One named part of the score: ``points = weight * fraction``."""

    name: str
    weight: float
    fraction: float
    points: float
    detail: str = ""


class Risk(msgspec.Struct, frozen=True):
    """0..100: the factors' points summed, rounded half up, capped at 100."""

    score: int
    factors: tuple[RiskFactor, ...] = ()


class Review(msgspec.Struct, frozen=True):
    reviewer: str
    roles: tuple[str, ...]
    verdict: Verdict
    # RFC 3339, UTC.
    at: str
    comment: str = ""
    # "daemon", or the name of the fleet inbox it came through.
    via: str = "daemon"


class Approval(msgspec.Struct, frozen=True, kw_only=True):
    """One approval: what was asked, by whom, why, and what became of it.

    ``resource`` and ``context`` are the audit record's typed JSON form
    after redaction (``audit.record.encode_value``), exactly what the
    ``decision`` record that asked holds; ``digest`` binds the unredacted
    request (``approvals.binding``). Times are RFC 3339, UTC.
    """

    id: str
    state: ApprovalState
    daemon_id: str
    agent_id: str
    digest: str
    decision_id: str
    chain: tuple[ChainPrincipal, ...]
    action: str
    resource_kind: str
    resource_id: str = ""
    attributes: dict[str, Any] = {}
    context: dict[str, Any] = {}
    request_id: str = ""
    rules: tuple[AskingRule, ...] = ()
    requirement: Requirement = Requirement()
    risk: Risk = Risk(score=0)
    policy_revision: str = ""
    directory_revision: str = ""
    created_at: str
    expires_at: str
    reviews: tuple[Review, ...] = ()
    # The top-level context keys the digest leaves out
    # (approvals.volatile_context when it was opened), so that a verifier
    # can recompute the digest of a use from the log alone.
    volatile_context: tuple[str, ...] = ()
    resolved_at: str = ""
    used_by: str = ""
    url: str = ""
    # The ids of this agent's earlier approvals of the same digest that
    # ended rejected or expired, most recent first (at most MAX_PREVIOUS),
    # as the book held them when this one was opened: the request was
    # asked again after a reviewer said no, or after nobody answered.
    previous: tuple[str, ...] = ()

    @property
    def user_id(self) -> str:
        return self.chain[0].id if self.chain else ""

    @property
    def approvers(self) -> tuple[str, ...]:
        """Distinct reviewers who approved, in review order."""
        seen: list[str] = []
        for review in self.reviews:
            if review.verdict is Verdict.APPROVE and review.reviewer not in seen:
                seen.append(review.reviewer)
        return tuple(seen)


class EarlierApproval(msgspec.Struct, frozen=True):
    """What became of an approval ``Approval.previous`` names, for display.

    ``state`` is None when the inbox no longer holds it; ``reviewer`` and
    ``comment`` are the rejecting review's (empty for an expiry).
    """

    id: str
    state: ApprovalState | None = None
    reviewer: str = ""
    comment: str = ""
    resolved_at: str = ""
    url: str = ""


def earlier_approvals(
    approval: Approval, get: Callable[[str], Approval | None]
) -> list[EarlierApproval]:
    """The approvals ``approval.previous`` names, looked up with ``get``
    (``Inbox.get``), in that order (most recent first)."""
    found: list[EarlierApproval] = []
    for earlier_id in approval.previous:
        earlier = get(earlier_id)
        if earlier is None:
            found.append(EarlierApproval(id=earlier_id))
            continue
        rejection = next(
            (r for r in reversed(earlier.reviews) if r.verdict is Verdict.REJECT),
            None,
        )
        found.append(
            EarlierApproval(
                id=earlier.id,
                state=earlier.state,
                reviewer=rejection.reviewer if rejection else "",
                comment=rejection.comment if rejection else "",
                resolved_at=earlier.resolved_at,
                url=earlier.url,
            )
        )
    return found


class InboxQuery(msgspec.Struct, frozen=True):
    """A filter over approvals; an empty field does not filter."""

    # None: every state.
    state: ApprovalState | None = ApprovalState.PENDING
    agent_id: str = ""
    action: str = ""
    min_risk: int = 0
    limit: int = 50
    # The id of the last approval of the previous page, newest first.
    after: str = ""

    def matches(self, approval: Approval) -> bool:
        """Whether ``approval`` passes every filter of this query."""
        return (
            (self.state is None or approval.state is self.state)
            and (not self.agent_id or approval.agent_id == self.agent_id)
            and (not self.action or approval.action == self.action)
            and approval.risk.score >= self.min_risk
        )

    def page(
        self,
        approvals: Iterable[Approval],
        find: Callable[[str], Approval | None],
        created: Callable[[Approval], int] | None = None,
    ) -> list[Approval]:
        """The page of ``approvals`` this query lists, as ``Inbox.list``.

        Newest first: by ``created_at``, then by id, both descending; only
        those matching, only those older than the approval ``after`` names,
        at most ``limit``.

        Args:
            approvals: every approval of the inbox, in any order.
            find: the inbox's lookup of the approval ``after`` names.
            created: an approval's ``created_at`` in nanoseconds since the
                epoch, for an inbox that keeps it parsed; default
                ``nanos_of(approval.created_at)``.

        Raises:
            InvalidRequest: ``after`` names no approval ``find`` knows.
        """
        key = created or _created_nanos
        items = sorted(
            (a for a in approvals if self.matches(a)),
            key=lambda a: (key(a), a.id),
            reverse=True,
        )
        if self.after:
            anchor = find(self.after)
            if anchor is None:
                raise InvalidRequest(
                    f"no approval {self.after!r} to page after", field="after"
                )
            last = (_created_nanos(anchor), anchor.id)
            items = [a for a in items if (key(a), a.id) < last]
        return items[: max(self.limit, 0)]


def random_id(prefix: str, size: int = 16) -> str:
    """``prefix`` and the lowercase base32 of ``size`` random bytes (26
    characters for 16): unguessable, and safe in URLs and as store keys."""
    raw = base64.b32encode(secrets.token_bytes(size)).decode("ascii")
    return prefix + raw.rstrip("=").lower()


def nanos_of(rfc3339: str) -> int:
    """An approval's RFC 3339 time (``created_at``, ``expires_at``, ...) as
    nanoseconds since the epoch.

    Raises:
        ValueError: not the form ``audit.record.format_timestamp`` writes.
    """
    stamp = parse_timestamp(rfc3339)
    return stamp.to_nanos()


def _created_nanos(approval: Approval) -> int:
    return nanos_of(approval.created_at)


class Inbox(Protocol):
    """Where reviewers read and resolve approvals: a daemon's own book, or
    the collector's view of the fleet's through the central store."""

    def list(self, query: InboxQuery) -> Sequence[Approval]:
        """Approvals matching ``query``, newest first."""
        ...

    def get(self, approval_id: str) -> Approval | None:
        """One approval, or None when no approval has that id."""
        ...

    async def review(
        self,
        approval_id: str,
        reviewer: Reviewer,
        verdict: Verdict,
        comment: str,
        *,
        view: str = "",
    ) -> Approval:
        """Approve or reject as ``reviewer``; return the approval after it.

        ``view`` is ``signed_review.view_digest`` of the approval as the
        reviewer was shown it (the review page's form carries it); when
        given, the review binds exactly that, and a differing approval is
        refused. Empty: the approval as the inbox holds it.

        Raises:
            NotFound: no approval has that id.
            ApprovalClosed: it is not pending, or this reviewer reviewed it,
                or it differs from ``view`` ("changed since you read it;
                reload").
            SelfApproval: the reviewer is a principal of its chain and not
                every asking rule allows self approval.
            RoleMissing: the reviewer lacks a role an asking rule requires.
            InvalidRequest: the comment is too long.
            AuditUnavailable: the review could not be recorded; nothing
                changed.
        """
        ...
