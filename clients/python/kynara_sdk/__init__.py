"""Kynara SDK: ask the Kynara daemon before an agent acts.

Quick start::

    from kynara_sdk import acting_for, permission_required

    @permission_required(
        "payments.refund.issue", resource_kind="payments.refund",
        resource_arg="refund_id", attrs=["amount"],
    )
    def issue_refund(refund_id: str, amount: int) -> None: ...

    with acting_for(user="alice"):
        issue_refund("rf_1", 1200)  # runs only when the daemon allows it

Errors carry a stable ``code`` (``kynara_sdk.INVALID_REQUEST``, ...,
``DAEMON_UNREACHABLE``); match on it, never on message text.

The client speaks the daemon's fast path (MessagePack on its own Unix socket)
when that socket is there, else gRPC (``pip install 'kynara-sdk[grpc]'``);
``transport=`` or ``$KYNARA_TRANSPORT`` says otherwise.

A tool that should wait for a reviewer rather than raise ``ApprovalRequired``
says so: ``@permission_required(..., on_approval="wait",
approval_timeout=600)``.
"""

from kynara_sdk._values import UInt64
from kynara_sdk.client import (
    DEFAULT_TARGET,
    FAST_SOCKET_NAME,
    TARGET_ENV,
    TRANSPORT_ENV,
    AsyncClient,
    Client,
)
from kynara_sdk.decision import (
    ALLOW,
    DENY,
    REQUIRE_APPROVAL,
    Approval,
    ApprovalUpdate,
    ConditionError,
    Decision,
    DecisionRequest,
    MatchedRule,
)
from kynara_sdk.decorator import (
    close_default_clients,
    current_decision,
    permission_required,
)
from kynara_sdk.errors import (
    APPROVAL_EXPIRED,
    APPROVAL_REJECTED,
    APPROVAL_REQUIRED,
    APPROVAL_TIMEOUT,
    APPROVAL_USED,
    AUDIT_UNAVAILABLE,
    DAEMON_UNREACHABLE,
    IDENTITY_INVALID,
    INTERNAL,
    INVALID_REQUEST,
    PERMISSION_DENIED,
    POLICY_NOT_READY,
    REQUEST_TOO_LARGE,
    SHUTTING_DOWN,
    ApprovalError,
    ApprovalExpired,
    ApprovalRejected,
    ApprovalRequired,
    ApprovalTimeout,
    KynaraError,
    KynaraUnavailable,
    PermissionDenied,
)
from kynara_sdk.guard import ToolGuard, Verdict
from kynara_sdk.subject import Subject, acting_for, current_subject

__all__ = [
    "ALLOW",
    "APPROVAL_EXPIRED",
    "APPROVAL_REJECTED",
    "APPROVAL_REQUIRED",
    "APPROVAL_TIMEOUT",
    "APPROVAL_USED",
    "AUDIT_UNAVAILABLE",
    "DAEMON_UNREACHABLE",
    "DEFAULT_TARGET",
    "DENY",
    "FAST_SOCKET_NAME",
    "IDENTITY_INVALID",
    "INTERNAL",
    "INVALID_REQUEST",
    "PERMISSION_DENIED",
    "POLICY_NOT_READY",
    "REQUEST_TOO_LARGE",
    "REQUIRE_APPROVAL",
    "SHUTTING_DOWN",
    "TARGET_ENV",
    "TRANSPORT_ENV",
    "Approval",
    "ApprovalError",
    "ApprovalExpired",
    "ApprovalRejected",
    "ApprovalRequired",
    "ApprovalTimeout",
    "ApprovalUpdate",
    "AsyncClient",
    "Client",
    "ConditionError",
    "Decision",
    "DecisionRequest",
    "KynaraError",
    "KynaraUnavailable",
    "MatchedRule",
    "PermissionDenied",
    "Subject",
    "ToolGuard",
    "UInt64",
    "Verdict",
    "acting_for",
    "close_default_clients",
    "current_decision",
    "current_subject",
    "permission_required",
]
