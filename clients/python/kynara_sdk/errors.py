"""The SDK's errors and the stable codes callers branch on.

Every error the SDK raises for a decision derives from ``KynaraError`` and
carries ``code``, a stable lower-snake-case string. Match on the code (or the
class), never on the message text: messages are for people and may change.

Codes from the daemon's catalogue (``ErrorCode`` in
``protos/kynara/v1/decision.proto``) arrive as the trailing metadata
``kynara-error-code``. Three codes are the SDK's own:

- ``daemon_unreachable``: no answer came back at all (no daemon listening,
  the connection broke, or the call's deadline passed). Raised as
  ``KynaraUnavailable``.
- ``permission_denied``: the daemon answered deny (``PermissionDenied``).
- ``approval_required``: the daemon answered require_approval
  (``ApprovalRequired``).
"""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kynara_sdk.decision import Decision

__all__ = [
    "APPROVAL_REQUIRED",
    "AUDIT_UNAVAILABLE",
    "DAEMON_UNREACHABLE",
    "IDENTITY_INVALID",
    "INTERNAL",
    "INVALID_REQUEST",
    "PERMISSION_DENIED",
    "POLICY_NOT_READY",
    "REQUEST_TOO_LARGE",
    "SHUTTING_DOWN",
    "ApprovalRequired",
    "KynaraError",
    "KynaraUnavailable",
    "PermissionDenied",
]

# From the daemon's ErrorCode catalogue: no answer was given.
INVALID_REQUEST = "invalid_request"
POLICY_NOT_READY = "policy_not_ready"
AUDIT_UNAVAILABLE = "audit_unavailable"
IDENTITY_INVALID = "identity_invalid"
REQUEST_TOO_LARGE = "request_too_large"
SHUTTING_DOWN = "shutting_down"
INTERNAL = "internal"

# The SDK's own codes.
DAEMON_UNREACHABLE = "daemon_unreachable"
PERMISSION_DENIED = "permission_denied"
APPROVAL_REQUIRED = "approval_required"


class KynaraError(Exception):
    """Base of every SDK error; ``code`` is the stable code to branch on.

    Args:
        code: a code string, e.g. ``INVALID_REQUEST``.
        message: a human-readable explanation; never branch on it.
        field: the request field at fault (e.g. ``resource.kind``), or "".
    """

    def __init__(self, code: str, message: str, field: str = "") -> None:
        self.code = code
        self.message = message
        self.field = field
        super().__init__(self._render())

    def _render(self) -> str:
        where = f" (field {self.field})" if self.field else ""
        return f"[{self.code}]{where} {self.message}"

    def __reduce__(self):  # keep pickling (multiprocessing, logging) working
        return (self.__class__, (self.code, self.message, self.field))


class KynaraUnavailable(KynaraError):
    """The daemon gave no answer: not listening, disconnected or too slow.

    ``code`` is always ``DAEMON_UNREACHABLE``. A decorated tool fails closed:
    its body does not run.
    """

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(DAEMON_UNREACHABLE, message, field)

    def __reduce__(self):
        return (self.__class__, (self.message, self.field))


class PermissionDenied(KynaraError):
    """The daemon answered deny; ``decision`` is the full answer.

    Args:
        decision: the deny ``Decision``.

    Attributes:
        decision, decision_id, reason_code: from the answer; branch on
            ``reason_code`` (e.g. ``"no_rule_allows"``), not on ``reason``.
    """

    def __init__(self, decision: Decision) -> None:
        self.decision = decision
        self.decision_id = decision.decision_id
        self.reason_code = decision.reason_code
        super().__init__(
            PERMISSION_DENIED,
            f"denied: {decision.reason_code}"
            + (f" ({decision.reason})" if decision.reason else "")
            + f"; decision {decision.decision_id}",
        )

    def __reduce__(self):
        return (self.__class__, (self.decision,))


class ApprovalRequired(KynaraError):
    """The daemon answered require_approval; a reviewer must approve first.

    Args:
        decision: the require_approval ``Decision``.

    Attributes:
        decision, decision_id: from the answer.
        approval_id, approval_url, expires_at: the approval to wait on, or
            "" / ``None`` while the daemon does not serve approvals yet.
    """

    def __init__(self, decision: Decision) -> None:
        self.decision = decision
        self.decision_id = decision.decision_id
        approval = decision.approval
        self.approval_id: str = approval.id if approval else ""
        self.approval_url: str = approval.url if approval else ""
        self.expires_at: datetime.datetime | None = (
            approval.expires_at if approval else None
        )
        where = f" at {self.approval_url}" if self.approval_url else ""
        super().__init__(
            APPROVAL_REQUIRED,
            f"approval required{where}; decision {decision.decision_id}",
        )

    def __reduce__(self):
        return (self.__class__, (self.decision,))
