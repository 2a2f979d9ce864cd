"""The one error hierarchy of the daemon, and the stable codes clients see.

Every error the daemon raises derives from ``KynaraError``. Errors a request
can cause carry a stable ``code`` from the ``ErrorCode`` catalogue in
``protos/kynara/v1/decision.proto`` and a hint for the gRPC status; the
server maps them to statuses in one place (``kynara_sidecar.server.status``).
The two sides are kept apart: ``RequestError`` means the caller sent
something bad, ``ServiceError`` means the daemon could not do its part.
"""

from __future__ import annotations

import enum

import grpc

__all__ = [
    "ApprovalClosed",
    "AuditLogInUse",
    "AuditUnavailable",
    "ConfigError",
    "ErrorCode",
    "IdentityInvalid",
    "InvalidRequest",
    "KynaraError",
    "ListenerError",
    "NotCheckpointed",
    "NotFound",
    "PolicyError",
    "PolicyNotReady",
    "Pruned",
    "ReasonCode",
    "SelfApproval",
    "RequestError",
    "RequestTooLarge",
    "RoleMissing",
    "ServiceError",
    "ShuttingDown",
]


class ErrorCode(enum.StrEnum):
    """Why no answer was given; mirrors ``ErrorCode`` in the protos."""

    INVALID_REQUEST = "invalid_request"
    POLICY_NOT_READY = "policy_not_ready"
    AUDIT_UNAVAILABLE = "audit_unavailable"
    IDENTITY_INVALID = "identity_invalid"
    REQUEST_TOO_LARGE = "request_too_large"
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal"
    ROLE_MISSING = "role_missing"
    NOT_FOUND = "not_found"
    NOT_CHECKPOINTED = "not_checkpointed"
    PRUNED = "pruned"
    SELF_APPROVAL = "self_approval"
    APPROVAL_CLOSED = "approval_closed"


class ReasonCode(enum.StrEnum):
    """Why an answer is what it is; mirrors ``ReasonCode`` in the protos."""

    RULE_ALLOWED = "rule_allowed"
    APPROVAL_REQUIRED = "approval_required"
    NO_RULE_ALLOWS = "no_rule_allows"
    RULE_DENIED = "rule_denied"
    CONDITION_ERROR = "condition_error"
    UNKNOWN_PRINCIPAL = "unknown_principal"
    INACTIVE_PRINCIPAL = "inactive_principal"
    INVALID_CHAIN = "invalid_chain"
    APPROVAL_GRANTED = "approval_granted"
    APPROVAL_NOT_FOUND = "approval_not_found"
    APPROVAL_REJECTED = "approval_rejected"
    APPROVAL_EXPIRED = "approval_expired"
    APPROVAL_USED = "approval_used"
    APPROVAL_MISMATCH = "approval_mismatch"
    APPROVAL_INSUFFICIENT = "approval_insufficient"
    APPROVAL_RATE_LIMITED = "approval_rate_limited"


class KynaraError(Exception):
    """Base of every error the daemon raises."""


class ConfigError(KynaraError):
    """The daemon configuration is invalid; the message names the key."""


class PolicyError(KynaraError):
    """A policy or directory file was refused.

    ``path`` is the file, ``location`` the path into the document (such as
    ``$.rules[2].condition``) and the message says what was expected. The
    previously active policy set stays active.
    """

    def __init__(self, message: str, *, path: str = "", location: str = ""):
        self.path = path
        self.location = location
        where = ":".join(part for part in (path, location) if part)
        super().__init__(f"{where}: {message}" if where else message)


class RequestError(KynaraError):
    """The caller sent something the daemon cannot answer."""

    code: ErrorCode = ErrorCode.INVALID_REQUEST
    status: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, *, field: str = ""):
        self.field = field
        super().__init__(message)


class InvalidRequest(RequestError):
    """A request field is missing or malformed; ``field`` names it."""


class RequestTooLarge(RequestError):
    """The request is larger than ``agent.max_message_bytes``."""

    code = ErrorCode.REQUEST_TOO_LARGE
    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class IdentityInvalid(RequestError):
    """The subject's identity could not be established."""

    code = ErrorCode.IDENTITY_INVALID
    status = grpc.StatusCode.UNAUTHENTICATED


class RoleMissing(RequestError):
    """An admin credential is valid but lacks the role the call needs."""

    code = ErrorCode.ROLE_MISSING
    status = grpc.StatusCode.PERMISSION_DENIED


class NotFound(RequestError):
    """No record, decision id or checkpoint matches what was asked for."""

    code = ErrorCode.NOT_FOUND
    status = grpc.StatusCode.NOT_FOUND


class NotCheckpointed(RequestError):
    """A record or tree size is not covered by a checkpoint yet.

    It is once its segment is sealed; asking again later can succeed.
    """

    code = ErrorCode.NOT_CHECKPOINTED
    status = grpc.StatusCode.FAILED_PRECONDITION


class Pruned(RequestError):
    """The records asked for were pruned; the message names the seam."""

    code = ErrorCode.PRUNED
    status = grpc.StatusCode.OUT_OF_RANGE


class SelfApproval(RequestError):
    """A reviewer tried to approve a request made on their own behalf, and
    no rule that asked allows it."""

    code = ErrorCode.SELF_APPROVAL
    status = grpc.StatusCode.PERMISSION_DENIED


class ApprovalClosed(RequestError):
    """The approval is no longer open (resolved, expired, used), or this
    reviewer has reviewed it already."""

    code = ErrorCode.APPROVAL_CLOSED
    status = grpc.StatusCode.FAILED_PRECONDITION


class ServiceError(KynaraError):
    """The daemon could not do its part; the request may succeed later."""

    code: ErrorCode = ErrorCode.INTERNAL
    status: grpc.StatusCode = grpc.StatusCode.INTERNAL
    field = ""


class ListenerError(ServiceError):
    """A listener could not be bound; the message names the setting."""


class PolicyNotReady(ServiceError):
    """No policy set is active yet."""

    code = ErrorCode.POLICY_NOT_READY
    status = grpc.StatusCode.UNAVAILABLE


class AuditUnavailable(ServiceError):
    """The audit record could not be committed, so no answer is given.

    After a fatal storage error the log refuses every later append with this
    error too, rather than limp on.
    """

    code = ErrorCode.AUDIT_UNAVAILABLE
    status = grpc.StatusCode.UNAVAILABLE


class AuditLogInUse(AuditUnavailable):
    """Another process holds the audit log's writer lock: a second daemon was
    given the same ``audit.path``. The daemon refuses to start."""


class ShuttingDown(ServiceError):
    """The daemon is draining and takes no new requests."""

    code = ErrorCode.SHUTTING_DOWN
    status = grpc.StatusCode.UNAVAILABLE
