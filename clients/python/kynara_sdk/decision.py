"""The answer from the daemon, and a request to put in a batch.

Plain frozen dataclasses, independent of the wire: ``Decision`` mirrors
``DecideResponse`` with Python types (a ``datetime`` for the approval's
expiry, tuples for repeated fields), so it can be logged, compared and
pickled.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping, Sequence
from typing import Any, Literal

__all__ = [
    "ALLOW",
    "DENY",
    "REQUIRE_APPROVAL",
    "Approval",
    "ApprovalUpdate",
    "ConditionError",
    "Decision",
    "DecisionRequest",
    "MatchedRule",
]

ALLOW = "allow"
DENY = "deny"
REQUIRE_APPROVAL = "require_approval"

DecisionValue = Literal["allow", "deny", "require_approval"]


@dataclasses.dataclass(frozen=True, slots=True)
class MatchedRule:
    """A rule that matched, for which principal of the chain, with what effect."""

    policy: str
    rule: str
    effect: str
    principal: str
    shadow: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class ConditionError:
    """A condition that failed to evaluate; it failed closed."""

    policy: str
    rule: str
    principal: str
    message: str


@dataclasses.dataclass(frozen=True, slots=True)
class Approval:
    """The approval an answer asked for or used: id, review URL and expiry;
    for an allow that used it, who approved it."""

    id: str
    url: str = ""
    expires_at: datetime.datetime | None = None
    # "pending", "approved", "rejected", "expired" or "used".
    state: str = ""
    reviewers: tuple[str, ...] = ()
    risk_score: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class ApprovalUpdate:
    """One state of an approval, as ``wait_approval`` sees it.

    ``state`` is ``"pending"``, ``"approved"``, ``"rejected"``,
    ``"expired"`` or ``"used"``; ``approvals`` counts the distinct approvals
    so far, out of ``approvals_needed``; ``comment`` is a rejecting
    reviewer's.
    """

    approval_id: str
    state: str
    approvals: int = 0
    approvals_needed: int = 1
    expires_at: datetime.datetime | None = None
    reviewers: tuple[str, ...] = ()
    comment: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    """The daemon's answer to one request.

    ``decision`` is ``"allow"``, ``"deny"`` or ``"require_approval"``; branch
    on it or on ``reason_code``, never on ``reason``. ``chain`` is the
    resolved delegation chain, user first and the daemon's agent last.
    ``approval`` is ``None`` unless the daemon filled one in.
    """

    decision: DecisionValue
    decision_id: str
    reason_code: str = ""
    reason: str = ""
    matched_rules: tuple[MatchedRule, ...] = ()
    policy_revision: str = ""
    directory_revision: str = ""
    audit_sequence: int = 0
    record_hash: str = ""
    approval: Approval | None = None
    chain: tuple[str, ...] = ()
    condition_errors: tuple[ConditionError, ...] = ()
    request_id: str = ""

    @property
    def allowed(self) -> bool:
        """True only for an allow; deny and require_approval are both False."""
        return self.decision == ALLOW


@dataclasses.dataclass(frozen=True, slots=True)
class DecisionRequest:
    """One request; the fields are ``decide``'s arguments.

    The subject comes from ``user``, ``chain`` or ``token`` when one is set,
    and otherwise from the ``acting_for`` block current when the batch is
    sent.
    """

    action: str
    resource_kind: str
    resource_id: str = ""
    attributes: Mapping[str, Any] | None = None
    context: Mapping[str, Any] | None = None
    user: str | None = None
    chain: Sequence[str] | None = None
    token: str | None = None
    request_id: str | None = None
    # Retry with an approved approval's grant: ``ApprovalRequired.approval_id``.
    approval_id: str | None = None
