"""Translation between the SDK's values and the ``kynara.v1`` messages.

Pure functions for the gRPC transport, shared by its sync and async forms:
building a request, reading an answer, and turning a failed call into a
``KynaraError`` with a stable code. Imported only when gRPC is used.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from typing import Any

import grpc
from kynara.v1 import decision_pb2

from kynara_sdk._values import to_value_map
from kynara_sdk._wire import approval_timeout, request_subject
from kynara_sdk.decision import (
    Approval,
    ApprovalUpdate,
    ConditionError,
    Decision,
    DecisionRequest,
    MatchedRule,
)
from kynara_sdk.errors import (
    INTERNAL,
    REQUEST_TOO_LARGE,
    ApprovalError,
    KynaraError,
    KynaraUnavailable,
)

__all__ = [
    "ERROR_CODE_KEY",
    "ERROR_FIELD_KEY",
    "build_request",
    "update_from_proto",
    "wait_error",
    "decision_from_proto",
    "error_from_rpc",
    "outcome_from_item",
]

ERROR_CODE_KEY = "kynara-error-code"
ERROR_FIELD_KEY = "kynara-error-field"

_EFFECTS = {
    decision_pb2.DECISION_ALLOW: "allow",
    decision_pb2.DECISION_DENY: "deny",
    decision_pb2.DECISION_REQUIRE_APPROVAL: "require_approval",
}

# Statuses a call ends with when no daemon answered it at all. A deadline
# counts: from the caller's side a daemon too slow to answer is unreachable.
# CANCELLED without our metadata is a daemon that shut down before it took
# the call (grpc cancels calls it has not yet handed to the service).
_UNREACHABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
    }
)


def build_request(item: DecisionRequest) -> decision_pb2.DecideRequest:
    """Build a ``DecideRequest``, taking the subject from ``acting_for`` when
    the item names none.

    Raises:
        TypeError, ValueError: a value has no wire form, or the subject is
            malformed; the message names the key path or argument.
    """
    subject = request_subject(item)
    request = decision_pb2.DecideRequest(
        request_id=item.request_id or "",
        action=item.action,
        resource=decision_pb2.Resource(
            kind=item.resource_kind,
            id=item.resource_id,
            attributes=to_value_map(item.attributes, "resource.attributes"),
        ),
        context=to_value_map(item.context, "context"),
        approval_id=item.approval_id or "",
    )
    if subject is not None:
        request.asserted_chain.extend(subject.chain)
        request.delegation_token = subject.token
    return request


def decision_from_proto(response: decision_pb2.DecideResponse) -> Decision:
    """Read a ``DecideResponse``.

    Raises:
        KynaraError: code ``INTERNAL`` when the answer carries no decision; a
            caller must never read a missing decision as allow or deny.
    """
    effect = _EFFECTS.get(response.decision)
    if effect is None:
        raise KynaraError(
            INTERNAL,
            "expected a decision of allow, deny or require_approval,"
            f" got {_enum_name(response.decision)}",
            "decision",
        )
    return Decision(
        decision=effect,
        decision_id=response.decision_id,
        reason_code=response.reason_code,
        reason=response.reason,
        matched_rules=tuple(_matched_rule(rule) for rule in response.matched_rules),
        policy_revision=response.policy_revision,
        directory_revision=response.directory_revision,
        audit_sequence=response.audit_sequence,
        record_hash=response.record_hash,
        approval=_approval(response) if response.HasField("approval") else None,
        chain=tuple(response.chain),
        condition_errors=tuple(
            ConditionError(e.policy, e.rule, e.principal, e.message)
            for e in response.condition_errors
        ),
        request_id=response.request_id,
    )


def outcome_from_item(item: decision_pb2.DecideBatchItem) -> Decision | KynaraError:
    """Read one batch item: its decision, or its error as a ``KynaraError``."""
    which = item.WhichOneof("outcome")
    if which == "decision":
        try:
            return decision_from_proto(item.decision)
        except KynaraError as err:
            return err
    if which == "error":
        return KynaraError(
            item.error.code or INTERNAL, item.error.message, item.error.field
        )
    return KynaraError(INTERNAL, "expected a decision or an error, got neither", "")


def error_from_rpc(err: grpc.RpcError, target: str) -> KynaraError:
    """Map a failed call to a ``KynaraError`` with a stable code.

    The daemon's ``kynara-error-code`` metadata wins. Without it the status
    decides: UNAVAILABLE, DEADLINE_EXCEEDED or CANCELLED is ``KynaraUnavailable``
    (``daemon_unreachable``), RESOURCE_EXHAUSTED (gRPC's own message size
    limit) is ``request_too_large``, anything else ``internal``.
    """
    status = err.code() if callable(getattr(err, "code", None)) else None
    details = (err.details() if callable(getattr(err, "details", None)) else "") or ""
    metadata = _metadata(err)
    code = metadata.get(ERROR_CODE_KEY, "")
    field = metadata.get(ERROR_FIELD_KEY, "")
    status_name = status.name if status is not None else "UNKNOWN"
    if code:
        return KynaraError(code, details or f"daemon answered {status_name}", field)
    if status in _UNREACHABLE:
        return KynaraUnavailable(
            f"no answer from the Kynara daemon at {target} ({status_name}: {details})"
        )
    if status is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return KynaraError(REQUEST_TOO_LARGE, details or status_name, field)
    return KynaraError(INTERNAL, f"{status_name}: {details}", field)


def _metadata(err: grpc.RpcError) -> Mapping[str, str]:
    trailing = getattr(err, "trailing_metadata", None)
    pairs: Iterable[tuple[str, Any]] = (
        trailing() if callable(trailing) else None
    ) or ()
    out: dict[str, str] = {}
    for key, value in pairs:
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        out.setdefault(key, value)
    return out


def _enum_name(value: int) -> str:
    if value in decision_pb2.Decision.values():
        return decision_pb2.Decision.Name(value)
    return f"enum value {value}"


def _matched_rule(rule: decision_pb2.MatchedRule) -> MatchedRule:
    return MatchedRule(
        policy=rule.policy,
        rule=rule.rule,
        effect=_EFFECTS.get(rule.effect, "unspecified"),
        principal=rule.principal,
        shadow=rule.shadow,
    )


def _approval(response: decision_pb2.DecideResponse) -> Approval:
    approval = response.approval
    return Approval(
        id=approval.id,
        url=approval.url,
        expires_at=_expires_at(approval),
        state=approval.state,
        reviewers=tuple(approval.reviewers),
        risk_score=approval.risk_score,
    )


def _expires_at(
    message: decision_pb2.Approval | decision_pb2.ApprovalUpdate,
) -> datetime.datetime | None:
    if not message.HasField("expires_at"):
        return None
    return message.expires_at.ToDatetime(tzinfo=datetime.UTC)


def update_from_proto(update: decision_pb2.ApprovalUpdate) -> ApprovalUpdate:
    """Read one ``ApprovalUpdate`` of a WaitApproval stream."""
    return ApprovalUpdate(
        approval_id=update.approval_id,
        state=update.state,
        approvals=update.approvals,
        approvals_needed=update.approvals_needed,
        expires_at=_expires_at(update),
        reviewers=tuple(update.reviewers),
        comment=update.comment,
    )


def wait_error(
    err: grpc.RpcError,
    target: str,
    approval_id: str,
    timeout: float,
    decision_id: str,
    last: ApprovalUpdate | None,
) -> KynaraError:
    """A failed WaitApproval call as an SDK error: its deadline passing is
    ``ApprovalTimeout`` (the approval stays pending); the daemon's refusal
    (``not_found``, ``identity_invalid``, ...) an ``ApprovalError`` with that
    code that carries ``approval_id``, ``decision_id`` and the last update;
    no answer at all as ``error_from_rpc``."""
    status = err.code() if callable(getattr(err, "code", None)) else None
    if status is grpc.StatusCode.DEADLINE_EXCEEDED and not _metadata(err):
        return approval_timeout(approval_id, timeout, decision_id, last)
    error = error_from_rpc(err, target)
    if not _metadata(err).get(ERROR_CODE_KEY):
        return error
    return ApprovalError(
        error.code, approval_id, error.message, decision_id, last, field=error.field
    )
