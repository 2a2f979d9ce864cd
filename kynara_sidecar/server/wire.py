"""Translation between the gRPC wire messages and the pipeline's values.

A front door translates and nothing more: it never decides, logs or counts.
Every malformed value becomes ``InvalidRequest`` naming the field path, such
as ``context["when"].timestamp_value``.
"""

from __future__ import annotations

from typing import Any

from kynara.v1 import decision_pb2 as pb

from kynara_sidecar.approvals.model import Approval
from kynara_sidecar.audit.record import parse_timestamp
from kynara_sidecar.decision import (
    Duration,
    Effect,
    Explanation,
    Resource,
    Timestamp,
    UInt64,
    Verdict,
)
from kynara_sidecar.errors import InvalidRequest
from kynara_sidecar.identity import PeerCertificate
from kynara_sidecar.pipeline import Answer, IncomingRequest

__all__ = [
    "MAX_VALUE_DEPTH",
    "answer_to_proto",
    "approval_to_proto",
    "check_key",
    "check_nesting",
    "duration_from_parts",
    "explanation_to_proto",
    "request_from_proto",
    "timestamp_from_parts",
    "value_from_proto",
]

# Lists and maps nested deeper than this are no real context; refusing them
# bounds recursion. protobuf's own decoder stops near 30 nested maps anyway.
MAX_VALUE_DEPTH = 16
# RFC 3339 years 0001..9999, as google.protobuf.Timestamp defines its range.
MIN_TIMESTAMP_SECONDS = -62_135_596_800
MAX_TIMESTAMP_SECONDS = 253_402_300_799
# google.protobuf.Duration's documented range: about +-10,000 years.
MAX_DURATION_SECONDS = 315_576_000_000
MAX_NANOS = 999_999_999

EFFECT_TO_PROTO = {
    Effect.ALLOW: pb.DECISION_ALLOW,
    Effect.DENY: pb.DECISION_DENY,
    Effect.REQUIRE_APPROVAL: pb.DECISION_REQUIRE_APPROVAL,
}

VERDICT_TO_PROTO = {
    Verdict.HELD: pb.VERDICT_HELD,
    Verdict.NOT_HELD: pb.VERDICT_NOT_HELD,
    Verdict.ERRORED: pb.VERDICT_ERRORED,
    Verdict.NOT_EVALUATED: pb.VERDICT_NOT_EVALUATED,
}


def timestamp_from_parts(msg: Any, path: str) -> Timestamp:
    """A ``Timestamp`` from anything with ``seconds`` and ``nanos`` (every
    front door's rule); ``InvalidRequest`` naming ``path`` when out of range."""
    if not MIN_TIMESTAMP_SECONDS <= msg.seconds <= MAX_TIMESTAMP_SECONDS:
        raise InvalidRequest(
            f"expected a timestamp in years 0001..9999, got seconds={msg.seconds}",
            field=path,
        )
    if not 0 <= msg.nanos <= MAX_NANOS:
        raise InvalidRequest(
            f"expected nanos in 0..{MAX_NANOS}, got {msg.nanos}", field=path
        )
    return Timestamp(msg.seconds, msg.nanos)


def duration_from_parts(msg: Any, path: str) -> Duration:
    """A ``Duration`` from anything with ``seconds`` and ``nanos`` (every
    front door's rule); ``InvalidRequest`` naming ``path`` when out of range."""
    if abs(msg.seconds) > MAX_DURATION_SECONDS or abs(msg.nanos) > MAX_NANOS:
        raise InvalidRequest("duration out of range", field=path)
    if msg.seconds and msg.nanos and (msg.seconds > 0) != (msg.nanos > 0):
        raise InvalidRequest("duration seconds and nanos differ in sign", field=path)
    return Duration(msg.seconds, msg.nanos)


def check_key(key: str, path: str) -> None:
    """Refuse a map key every front door refuses: empty, or holding NUL."""
    # The CEL runtime cuts strings at NUL, so "a" and "a\x00b" would
    # collide in a policy's view of the map.
    if not key or "\x00" in key:
        raise InvalidRequest(
            f"expected a non-empty key without NUL, got {key!r}", field=path
        )


def check_nesting(depth: int, path: str) -> None:
    """Refuse a list or map at ``depth`` (lists and maps enclosing it within
    its request field) past ``MAX_VALUE_DEPTH``."""
    if depth >= MAX_VALUE_DEPTH:
        raise InvalidRequest(
            f"expected lists and maps nested at most {MAX_VALUE_DEPTH} deep",
            field=path,
        )


def _map(entries: Any, path: str, depth: int) -> dict[str, Any]:
    for key in entries:
        check_key(key, path)
    out = {}
    for key, value in entries.items():
        # Scalars directly: the common case, without building the path that
        # only an error message needs.
        kind = value.WhichOneof("kind")
        convert = _SCALARS.get(kind)
        if convert is not None:
            out[key] = convert(getattr(value, kind))
        else:
            out[key] = value_from_proto(value, f"{path}[{key!r}]", depth)
    return out


_SCALARS = {
    "int_value": int,
    "uint_value": UInt64,
    "double_value": float,
    "string_value": str,
    "bool_value": bool,
    "bytes_value": bytes,
}


def value_from_proto(value: pb.Value, path: str, depth: int = 0) -> Any:
    """Convert a wire ``Value`` to a typed pipeline value.

    Args:
        value: the wire value.
        path: where it sits in the request, for error messages.
        depth: how many lists and maps enclose it within its request field.

    Raises:
        InvalidRequest: the value is unset, too deep or out of range.
    """
    kind = value.WhichOneof("kind")
    if kind in ("list_value", "map_value"):
        check_nesting(depth, path)
    if kind is None:
        raise InvalidRequest("expected a value, got an empty Value", field=path)
    if kind in _SCALARS:
        return _SCALARS[kind](getattr(value, kind))
    if kind == "timestamp_value":
        return timestamp_from_parts(value.timestamp_value, f"{path}.timestamp_value")
    if kind == "duration_value":
        return duration_from_parts(value.duration_value, f"{path}.duration_value")
    if kind == "list_value":
        return [
            value_from_proto(item, f"{path}[{i}]", depth + 1)
            for i, item in enumerate(value.list_value.values)
        ]
    return _map(value.map_value.entries, path, depth + 1)


def request_from_proto(
    request: pb.DecideRequest,
    peer: str = "",
    authorization: str = "",
    certificate: PeerCertificate | None = None,
) -> IncomingRequest:
    """Translate a ``DecideRequest`` into the pipeline's ``IncomingRequest``;
    ``authorization`` is the call's credential (its metadata), and
    ``certificate`` its connection's verified client certificate.

    Raises:
        InvalidRequest: naming the field path of the first malformed value.
    """
    resource = request.resource
    return IncomingRequest(
        action=request.action,
        resource=Resource(
            kind=resource.kind,
            id=resource.id,
            attributes=_map(resource.attributes, "resource.attributes", 0),
        ),
        context=_map(request.context, "context", 0),
        asserted_chain=tuple(request.asserted_chain),
        delegation_token=request.delegation_token,
        request_id=request.request_id,
        peer=peer,
        authorization=authorization,
        certificate=certificate,
        explain=request.explain,
        approval_id=request.approval_id,
    )


def answer_to_proto(answer: Answer) -> pb.DecideResponse:
    """Translate the pipeline's ``Answer`` into a ``DecideResponse``."""
    decision = answer.decision
    return pb.DecideResponse(
        decision=EFFECT_TO_PROTO[decision.effect],
        decision_id=answer.decision_id,
        matched_rules=[
            pb.MatchedRule(
                policy=rule.policy,
                rule=rule.rule,
                effect=EFFECT_TO_PROTO[rule.effect],
                principal=rule.principal,
                shadow=rule.shadow,
            )
            for rule in decision.matched_rules
        ],
        reason_code=str(decision.reason_code),
        reason=decision.reason,
        policy_revision=decision.policy_revision,
        directory_revision=decision.directory_revision,
        audit_sequence=answer.audit_sequence,
        record_hash=answer.record_hash,
        condition_errors=[
            pb.ConditionError(
                policy=e.policy, rule=e.rule, principal=e.principal, message=e.message
            )
            for e in decision.condition_errors
        ],
        chain=[p.id for p in decision.chain],
        request_id=answer.request_id,
        explanation=explanation_to_proto(decision.explanation),
        approval=approval_to_proto(answer.approval),
    )


def approval_to_proto(approval: Approval | None) -> pb.Approval | None:
    """Translate the approval an answer cites; None stays unset."""
    if approval is None:
        return None
    message = pb.Approval(
        id=approval.id,
        url=approval.url,
        state=str(approval.state),
        reviewers=list(approval.approvers),
        risk_score=approval.risk.score,
    )
    expires = parse_timestamp(approval.expires_at)
    message.expires_at.seconds, message.expires_at.nanos = (
        expires.seconds,
        expires.nanos,
    )
    return message


def explanation_to_proto(explanation: Explanation | None) -> pb.Explanation | None:
    """Translate the engine's ``Explanation``; None stays unset on the wire."""
    if explanation is None:
        return None
    return pb.Explanation(
        summary=explanation.summary,
        principals=[
            pb.PrincipalExplanation(
                principal=item.principal,
                roles=item.roles,
                decision=EFFECT_TO_PROTO[item.effect],
                reason_code=str(item.reason_code),
                decided_by=item.decided_by,
                rules=[
                    pb.RuleTrace(
                        policy=trace.policy,
                        rule=trace.rule,
                        effect=EFFECT_TO_PROTO[trace.effect],
                        action_matched=trace.action_matched,
                        resource_matched=trace.resource_matched,
                        roles_matched=trace.roles_matched,
                        verdict=VERDICT_TO_PROTO[trace.verdict],
                        shadow=trace.shadow,
                        condition=trace.condition,
                        error=trace.error,
                    )
                    for trace in item.rules
                ],
            )
            for item in explanation.principals
        ],
    )
