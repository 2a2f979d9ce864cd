"""The audit records of approvals, and the approval part of decision records.

Every state change of an approval is one record, committed in the same
transaction as the approval's new state in LMDB:

=====================  =====================================================
record kind            when
=====================  =====================================================
``decision``           the require_approval decision that opened or reused
                       it (``approval``: the approval, ``risk``), and the
                       allow that used it (reason ``approval_granted``,
                       state ``used``) or a deny naming why it could not be
``approval_requested`` the approval opened: what it binds, the asking rules,
                       the requirement, the risk, the earlier rejected or
                       expired approvals of the same request
                       (``previous``); same transaction as the decision
                       record that asked
``approval_reviewed``  a review that did not resolve it (one approver of
                       several)
``approval_resolved``  approved, rejected (by a review) or expired (by the
                       clock); ``approval.resolution`` says which
=====================  =====================================================

The approval records name the asking decision as ``decision_id`` (at the top,
and in ``approval.decision_id``), so a reader joins them to it. Pure: values
in, records out.
"""

from __future__ import annotations

import msgspec

from kynara_sidecar.approvals.model import Approval, Review, Risk
from kynara_sidecar.audit.record import (
    RECORD_VERSION,
    ApprovalEntry,
    AuditRecordV1,
    ChainEntry,
    RecordKind,
    RiskEntry,
    RiskFactorEntry,
)

__all__ = [
    "approval_entry",
    "requested_record",
    "resolved_record",
    "reviewed_record",
    "risk_entry",
    "scored_factors",
    "with_approval",
]


def approval_entry(approval: Approval, **fields: object) -> ApprovalEntry:
    """The record's view of ``approval``; ``fields`` set review details."""
    requirement = approval.requirement
    entry = ApprovalEntry(
        id=approval.id,
        url=approval.url,
        expires_at=approval.expires_at,
        reviewers=list(approval.approvers),
        resolved_at=approval.resolved_at,
        state=str(approval.state),
        digest=approval.digest,
        created_at=approval.created_at,
        approvals_needed=requirement.approvers,
        reviewer_roles=[list(roles) for roles in requirement.reviewer_roles],
        allow_self_approval=requirement.allow_self_approval,
        rules=[f"{r.policy}/{r.rule} ({r.principal})" for r in approval.rules],
        decision_id=approval.decision_id,
        used_by=approval.used_by,
        volatile_context=list(approval.volatile_context),
    )
    return msgspec.structs.replace(entry, **fields) if fields else entry


def risk_entry(risk: Risk) -> RiskEntry:
    return RiskEntry(
        score=risk.score,
        factors=[
            RiskFactorEntry(
                name=f.name,
                weight=f.weight,
                fraction=f.fraction,
                points=f.points,
                detail=f.detail,
            )
            for f in risk.factors
        ],
    )


def scored_factors(risk: Risk) -> list[str]:
    """The names of the factors that scored points (``risk_factors``)."""
    return [factor.name for factor in risk.factors if factor.points > 0]


# Per approval object (approvals are frozen: a changed one is a new
# object), the record fields that cite it with its risk; a pending approval
# reused by many retries is converted once. Records share these entries,
# which nothing changes once a record is built.
_cited: dict[int, tuple[Approval, dict[str, object]]] = {}
_MAX_CITED = 1024


def with_approval(
    record: AuditRecordV1, approval: Approval, *, risk: bool = True
) -> AuditRecordV1:
    """A decision record that cites ``approval`` (and, with ``risk``, its
    score), as asked for, reused, used or refused."""
    if not risk:
        return msgspec.structs.replace(record, approval=approval_entry(approval))
    found = _cited.get(id(approval))
    # The entry holds the approval, so its id is not reused while kept.
    if found is None or found[0] is not approval:
        fields: dict[str, object] = {
            "approval": approval_entry(approval),
            "risk": risk_entry(approval.risk),
            "risk_factors": scored_factors(approval.risk),
        }
        if len(_cited) >= _MAX_CITED:
            _cited.clear()
        found = _cited[id(approval)] = (approval, fields)
    return msgspec.structs.replace(record, **found[1])


def requested_record(approval: Approval, decision: AuditRecordV1) -> AuditRecordV1:
    """The ``approval_requested`` record of a new approval.

    ``decision`` is the record of the decision that asked; the request's
    parts are copied from it (already redacted).
    """
    return AuditRecordV1(
        v=RECORD_VERSION,
        kind=RecordKind.APPROVAL_REQUESTED,
        time=decision.time,
        daemon_id=decision.daemon_id,
        decision_id=approval.decision_id,
        request_id=decision.request_id,
        identity_mode=decision.identity_mode,
        chain=list(decision.chain),
        action=decision.action,
        resource=decision.resource,
        context=dict(decision.context),
        policy_revision=decision.policy_revision,
        directory_revision=decision.directory_revision,
        redactions=list(decision.redactions),
        approval=approval_entry(approval, previous=list(approval.previous)),
        risk=risk_entry(approval.risk),
        risk_factors=scored_factors(approval.risk),
    )


def _change_record(
    kind: RecordKind, approval: Approval, time: str, entry: ApprovalEntry
) -> AuditRecordV1:
    return AuditRecordV1(
        v=RECORD_VERSION,
        kind=kind,
        time=time,
        daemon_id=approval.daemon_id,
        decision_id=approval.decision_id,
        request_id=approval.request_id,
        chain=[
            ChainEntry(id=p.id, kind=p.kind, roles=list(p.roles))
            for p in approval.chain
        ],
        action=approval.action,
        approval=entry,
    )


def reviewed_record(approval: Approval, review: Review) -> AuditRecordV1:
    """``approval_reviewed``: ``review`` did not resolve ``approval`` (the
    approval after it, still pending)."""
    entry = approval_entry(
        approval,
        reviewer=review.reviewer,
        verdict=str(review.verdict),
        via=review.via,
        comment=review.comment,
    )
    return _change_record(RecordKind.APPROVAL_REVIEWED, approval, review.at, entry)


def resolved_record(approval: Approval, review: Review | None = None) -> AuditRecordV1:
    """``approval_resolved``: ``approval`` (after the change) was approved
    or rejected by ``review``, or expired (no review)."""
    fields: dict[str, object] = {"resolution": str(approval.state)}
    if review is not None:
        fields.update(
            reviewer=review.reviewer,
            verdict=str(review.verdict),
            via=review.via,
            comment=review.comment,
        )
    entry = approval_entry(approval, **fields)
    return _change_record(
        RecordKind.APPROVAL_RESOLVED, approval, approval.resolved_at, entry
    )
