"""Human approval of require_approval decisions.

A require_approval decision opens an approval bound to the exact request
(``binding``), scored for risk (``risk``), kept in LMDB beside the audit
log and resolved by reviewers through an inbox (``model.Inbox``): the
daemon's own review page and ``ApprovalService``, or the collector's fleet
inbox through the central store. An approved approval is a single-use
grant: the agent's retry with its id is allowed once, in the same
transaction as the allow record that uses it.
"""

from kynara_sidecar.approvals.model import (
    FINAL_STATES,
    Approval,
    ApprovalState,
    AskingRule,
    ChainPrincipal,
    Inbox,
    InboxQuery,
    Requirement,
    Review,
    Reviewer,
    Risk,
    RiskFactor,
    Verdict,
)

__all__ = [
    "FINAL_STATES",
    "Approval",
    "ApprovalState",
    "AskingRule",
    "ChainPrincipal",
    "Inbox",
    "InboxQuery",
    "Requirement",
    "Review",
    "Reviewer",
    "Risk",
    "RiskFactor",
    "Verdict",
]
