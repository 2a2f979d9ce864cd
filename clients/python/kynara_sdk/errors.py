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
- ``approval_timeout``: a wait on an approval ended before any reviewer
  resolved it (``ApprovalTimeout``). The approval stays pending: a timeout
  is never a rejection, and a reviewer may still approve it.

A wait the daemon refuses (``not_found`` for an id that names no approval of
this agent) raises ``ApprovalError`` with the daemon's code, so it carries
the ``approval_id`` waited on like every other end of a wait.

A wait that ends with the approval rejected or expired raises
``ApprovalRejected`` (``approval_rejected``) or ``ApprovalExpired``
(``approval_expired``), the same codes a retry with that approval would get
as its deny reason.
"""

from __future__ import annotations

import datetime
import functools
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from kynara_sdk.decision import ApprovalUpdate, Decision

__all__ = [
    "APPROVAL_EXPIRED",
    "APPROVAL_REJECTED",
    "APPROVAL_REQUIRED",
    "APPROVAL_TIMEOUT",
    "APPROVAL_USED",
    "AUDIT_UNAVAILABLE",
    "DAEMON_UNREACHABLE",
    "IDENTITY_INVALID",
    "INTERNAL",
    "INVALID_REQUEST",
    "PERMISSION_DENIED",
    "POLICY_NOT_READY",
    "REQUEST_TOO_LARGE",
    "SHUTTING_DOWN",
    "ApprovalError",
    "ApprovalExpired",
    "ApprovalRejected",
    "ApprovalRequired",
    "ApprovalTimeout",
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
APPROVAL_TIMEOUT = "approval_timeout"

# The daemon's reason codes for an approval that cannot be used.
APPROVAL_REJECTED = "approval_rejected"
APPROVAL_EXPIRED = "approval_expired"
APPROVAL_USED = "approval_used"


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
    its body does not run. ``not_a_daemon`` is True when something answered
    at the target but does not speak Kynara (a gRPC socket given as the fast
    path's, say): a wrong target, which a guard never fails open on.
    """

    def __init__(
        self, message: str, field: str = "", *, not_a_daemon: bool = False
    ) -> None:
        self.not_a_daemon = not_a_daemon
        super().__init__(DAEMON_UNREACHABLE, message, field)

    def __reduce__(self):
        return (
            functools.partial(type(self), not_a_daemon=self.not_a_daemon),
            (self.message, self.field),
        )


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


class ApprovalError(KynaraError):
    """A wait on an approval ended without a grant to use.

    Args:
        code: the stable code (``APPROVAL_TIMEOUT``, ``APPROVAL_REJECTED``,
            ``APPROVAL_EXPIRED``, ``APPROVAL_USED``; or the daemon's code when
            it refused the wait, e.g. ``not_found``).
        approval_id: the approval waited on.
        message: for people; never branch on it.
        decision_id: the require_approval decision that asked for it, when
            known.
        update: the approval's last state seen, when one was.
        field: the request field at fault, as the daemon named it, or "".

    Attributes:
        approval_id, decision_id, update: as given.
    """

    def __init__(
        self,
        code: str,
        approval_id: str,
        message: str,
        decision_id: str = "",
        update: ApprovalUpdate | None = None,
        *,
        field: str = "",
    ) -> None:
        self.approval_id = approval_id
        self.decision_id = decision_id
        self.update = update
        self._detail = message
        where = f"; decision {decision_id}" if decision_id else ""
        super().__init__(code, f"approval {approval_id}: {message}{where}", field)

    def __reduce__(self):
        args = (self.approval_id, self._detail, self.decision_id, self.update)
        if type(self) is not ApprovalError:
            return (self.__class__, args)
        return (_approval_error, (self.code, *args, self.field))


def _approval_error(
    code: str,
    approval_id: str,
    message: str,
    decision_id: str,
    update: ApprovalUpdate | None,
    field: str,
) -> ApprovalError:
    # Unpickles an ApprovalError: its field is keyword-only.
    return ApprovalError(code, approval_id, message, decision_id, update, field=field)


class _FixedCodeApprovalError(ApprovalError):
    # An ApprovalError whose class decides its code (_CODE).
    _CODE: ClassVar[str]

    def __init__(
        self,
        approval_id: str,
        message: str,
        decision_id: str = "",
        update: ApprovalUpdate | None = None,
    ) -> None:
        super().__init__(self._CODE, approval_id, message, decision_id, update)


class ApprovalTimeout(_FixedCodeApprovalError):
    """The wait ended before any reviewer resolved the approval.

    The approval is still pending: a reviewer may approve it later, and a
    retry with its id then succeeds. Never a rejection.
    """

    _CODE = APPROVAL_TIMEOUT


class ApprovalRejected(_FixedCodeApprovalError):
    """A reviewer rejected the approval; ``update.comment`` says why."""

    _CODE = APPROVAL_REJECTED


class ApprovalExpired(_FixedCodeApprovalError):
    """The approval expired before it was approved (or before its use)."""

    _CODE = APPROVAL_EXPIRED
