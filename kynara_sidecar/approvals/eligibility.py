"""Who may review an approval, and what a review does to it.

One pure check, shared by the daemon's book (which records reviews) and the
collector's fleet inbox (which signs and forwards them), so that an inbox
never accepts a review the daemon would refuse:

0. The approval must exist and, when the reviewer's view is given, be the
   one they were shown (``check_current``: ``NotFound``, ``ApprovalClosed``).
1. The approval must be pending, and not past its ``expires_at`` when the
   review's time is given: its expiry may not be recorded yet
   (``ApprovalClosed`` otherwise).
2. The reviewer must hold the ``reviewer`` role, and one role of every
   asking rule that names reviewer roles (``RoleMissing``).
3. A reviewer who is a principal of the request's chain (the user, or any
   agent acting for them) may not review it unless every asking rule
   allows self approval (``SelfApproval``).
4. A reviewer reviews once (``ApprovalClosed``).

``outcome`` then says what the review makes of the approval: a rejection
rejects at once; approvals approve once the distinct approvers reach the
requirement.

``check_grant`` repeats the check when an approved approval is used: the
policies may have been reloaded since it was reviewed, and a grant counts
only if it satisfies the rules asking *now*. Every rule asking now must be
one it was given for; its expiry is recomputed from ``created_at`` under
the current requirement (never later than the stored ``expires_at``); and
the approving reviews are counted again with the roles each reviewer held
when they reviewed (``Review.roles``): a reviewer counts when they held the
``reviewer`` role and one role of each role-naming rule asking now, and
are no principal of the chain unless every rule asking now allows self
approval. A grant past the recomputed expiry is ``approval_expired`` (the
clock has ended it under today's rules, as it would have under
``expires_at``); one short of approvers is ``approval_insufficient``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from kynara_sidecar.approvals.model import (
    MAX_COMMENT_CHARS,
    Approval,
    ApprovalState,
    Requirement,
    Review,
    Reviewer,
    Verdict,
    nanos_of,
)
from kynara_sidecar.approvals.signed_review import view_digest
from kynara_sidecar.audit.record import format_timestamp
from kynara_sidecar.decision import NANOS_PER_SECOND, Timestamp
from kynara_sidecar.errors import (
    ApprovalClosed,
    InvalidRequest,
    NotFound,
    ReasonCode,
    RoleMissing,
    SelfApproval,
)

__all__ = [
    "REVIEWER_ROLE",
    "GrantRefusal",
    "check_current",
    "check_grant",
    "check_review",
    "grant_deadline",
    "outcome",
]

REVIEWER_ROLE = "reviewer"


def check_current(approval_id: str, approval: Approval | None, view: str) -> Approval:
    """The approval a review names, checked to be the one the reviewer saw.

    Args:
        approval_id: the id the review names.
        approval: what the inbox holds under that id, or None.
        view: ``signed_review.view_digest`` of the approval as the reviewer
            was shown it; "" checks nothing.

    Returns:
        ``approval``.

    Raises:
        NotFound: ``approval`` is None.
        ApprovalClosed: it differs from ``view``.
    """
    if approval is None:
        raise NotFound(f"no approval {approval_id!r}", field="approval_id")
    if view and view != view_digest(approval):
        raise ApprovalClosed(
            f"approval {approval_id} changed since you read it; reload",
            field="view",
        )
    return approval


def check_review(
    approval: Approval,
    reviewer: Reviewer,
    comment: str = "",
    *,
    now: int | None = None,
) -> None:
    """Raise why ``reviewer`` may not review ``approval`` now, if they may not.

    Args:
        now: the review's instant, nanoseconds since the epoch; when given,
            a pending approval past its ``expires_at`` is refused.

    Raises:
        ApprovalClosed, RoleMissing, SelfApproval, InvalidRequest: see the
            module doc; InvalidRequest for a comment that is too long.
    """
    if approval.state is not ApprovalState.PENDING:
        raise ApprovalClosed(
            f"approval {approval.id} is {approval.state}, not pending: "
            "nothing is left to review",
            field="approval_id",
        )
    if now is not None and now >= nanos_of(approval.expires_at):
        raise ApprovalClosed(
            f"approval {approval.id} expired at {approval.expires_at}",
            field="approval_id",
        )
    if len(comment) > MAX_COMMENT_CHARS:
        raise InvalidRequest(
            f"expected a comment of at most {MAX_COMMENT_CHARS} characters, "
            f"got {len(comment)}",
            field="comment",
        )
    if REVIEWER_ROLE not in reviewer.roles:
        raise RoleMissing(
            f"expected a credential with the {REVIEWER_ROLE} role, got "
            f"{reviewer.id!r} with roles [{', '.join(sorted(reviewer.roles))}]",
            field="authorization",
        )
    for roles in approval.requirement.reviewer_roles:
        if reviewer.roles.isdisjoint(roles):
            # The reviewer role itself is not what a rule asks for: name only
            # the roles rules can require, and which of them would do.
            held = sorted(reviewer.roles - {REVIEWER_ROLE})
            raise RoleMissing(
                f"approval {approval.id} needs a reviewer holding one of the "
                f"reviewer roles [{', '.join(roles)}]; {reviewer.id!r} holds "
                f"reviewer roles [{', '.join(held)}]. Any one of "
                f"{' or '.join(roles)} would do (admin.credentials.<name>."
                "reviewer_roles, or the roles claim of a reviewer JWT)",
                field="authorization",
            )
    if not approval.requirement.allow_self_approval and any(
        principal.id == reviewer.id for principal in approval.chain
    ):
        raise SelfApproval(
            f"{reviewer.id!r} is a principal of the request's chain "
            f"({' -> '.join(p.id for p in approval.chain)}) and no rule that "
            "asked allows self approval",
            field="authorization",
        )
    if any(review.reviewer == reviewer.id for review in approval.reviews):
        raise ApprovalClosed(
            f"{reviewer.id!r} has reviewed approval {approval.id} already; "
            "another reviewer must",
            field="approval_id",
        )


def outcome(approval: Approval, verdict: Verdict) -> ApprovalState:
    """The state after one more (checked) review with ``verdict``.

    ``approval`` holds the reviews before this one.
    """
    if verdict is Verdict.REJECT:
        return ApprovalState.REJECTED
    if len(approval.approvers) + 1 >= approval.requirement.approvers:
        return ApprovalState.APPROVED
    return ApprovalState.PENDING


class GrantRefusal(NamedTuple):
    """Why an approved approval grants nothing now: the deny's reason."""

    code: ReasonCode
    reason: str


def grant_deadline(approval: Approval, requirement: Requirement) -> int:
    """When ``approval`` stops granting under ``requirement`` (nanoseconds
    since the epoch): ``created_at`` plus the requirement's expiry, and
    never later than the stored ``expires_at``."""
    created = nanos_of(approval.created_at)
    recomputed = created + requirement.expires_in_seconds * NANOS_PER_SECOND
    return min(recomputed, nanos_of(approval.expires_at))


def _discounted(approval: Approval, review: Review, requirement: Requirement) -> str:
    # Why this approving review does not count now ("" when it does).
    roles = frozenset(review.roles)
    if REVIEWER_ROLE not in roles:
        return f"lacked the {REVIEWER_ROLE} role"
    for wanted in requirement.reviewer_roles:
        if roles.isdisjoint(wanted):
            return f"held none of [{', '.join(wanted)}]"
    chain = {principal.id for principal in approval.chain}
    if not requirement.allow_self_approval and review.reviewer in chain:
        return "is a principal of the chain and self approval is not allowed"
    return ""


def check_grant(
    approval: Approval,
    requirement: Requirement,
    asking: Iterable[tuple[str, str, str]],
    *,
    now: int,
) -> GrantRefusal | None:
    """Whether the approved ``approval`` grants the request now.

    Args:
        approval: an approved approval, bound to this request already.
        requirement: the combined requirement of the rules asking now
            (``book.requirement_for``).
        asking: (policy, rule, principal) of each rule asking now.
        now: the request's instant, nanoseconds since the epoch.

    Returns:
        None when it grants; else the refusal (``approval_insufficient``
        for a rule it was not given for or too few approvers counting now,
        ``approval_expired`` past the recomputed expiry).
    """
    granted = {(r.policy, r.rule, r.principal) for r in approval.rules}
    missing = sorted(set(asking) - granted)
    if missing:
        asked = ", ".join(f"{p}/{r} ({who})" for p, r, who in missing)
        return GrantRefusal(
            ReasonCode.APPROVAL_INSUFFICIENT,
            f"approval {approval.id} does not cover what the policies ask now: "
            f"rules {asked} were not part of it",
        )
    deadline = grant_deadline(approval, requirement)
    if now >= deadline:
        return GrantRefusal(
            ReasonCode.APPROVAL_EXPIRED,
            f"approval {approval.id} expired at "
            f"{format_timestamp(Timestamp.from_nanos(deadline))}: the rules "
            f"asking now allow {requirement.expires_in_seconds} seconds from "
            f"its creation at {approval.created_at}",
        )
    counted: list[str] = []
    discounted: list[str] = []
    for review in approval.reviews:
        if review.verdict is not Verdict.APPROVE or review.reviewer in counted:
            continue
        why = _discounted(approval, review, requirement)
        if why:
            discounted.append(f"{review.reviewer} {why}")
        else:
            counted.append(review.reviewer)
    if len(counted) >= requirement.approvers:
        return None
    reason = (
        f"approval {approval.id} does not cover what the policies ask now: "
        f"{requirement.approvers} approvers are needed, it has {len(counted)}"
    )
    if discounted:
        reason += f" (not counted: {'; '.join(discounted)})"
    return GrantRefusal(ReasonCode.APPROVAL_INSUFFICIENT, reason)
