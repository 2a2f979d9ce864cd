"""Who may review an approval, and what a review does to it.

One pure check, shared by the daemon's book (which records reviews) and the
collector's fleet inbox (which signs and forwards them), so that an inbox
never accepts a review the daemon would refuse:

1. The approval must be pending (``ApprovalClosed`` otherwise).
2. The reviewer must hold the ``reviewer`` role, and one role of every
   asking rule that names reviewer roles (``RoleMissing``).
3. A reviewer who is a principal of the request's chain (the user, or any
   agent acting for them) may not review it unless every asking rule
   allows self approval (``SelfApproval``).
4. A reviewer reviews once (``ApprovalClosed``).

``outcome`` then says what the review makes of the approval: a rejection
rejects at once; approvals approve once the distinct approvers reach the
requirement.
"""

from __future__ import annotations

from kynara_sidecar.approvals.model import (
    MAX_COMMENT_CHARS,
    Approval,
    ApprovalState,
    Reviewer,
    Verdict,
)
from kynara_sidecar.errors import (
    ApprovalClosed,
    InvalidRequest,
    RoleMissing,
    SelfApproval,
)

__all__ = ["REVIEWER_ROLE", "check_review", "outcome"]

REVIEWER_ROLE = "reviewer"


def check_review(approval: Approval, reviewer: Reviewer, comment: str = "") -> None:
    """Raise why ``reviewer`` may not review ``approval`` now, if they may not.

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
            raise RoleMissing(
                f"approval {approval.id} needs a reviewer with one of the roles "
                f"[{', '.join(roles)}]; {reviewer.id!r} has "
                f"[{', '.join(sorted(reviewer.roles))}]",
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
