"""A decision record citing an approval: the same fields whether the
approval was cited before or not, and a changed approval cited anew."""

from __future__ import annotations

import msgspec
from service_support import make_approval

from kynara_sidecar.approvals.model import ApprovalState
from kynara_sidecar.approvals.records import (
    approval_entry,
    risk_entry,
    scored_factors,
    with_approval,
)
from kynara_sidecar.audit.chain import encode_record
from kynara_sidecar.audit.record import AuditRecordV1, RecordKind


def _record(decision_id: str) -> AuditRecordV1:
    return AuditRecordV1(
        v=1, kind=RecordKind.DECISION, time="2026-12-07T09:00:00Z",
        decision_id=decision_id,
    )  # fmt: skip


def _cited_alone(record: AuditRecordV1, approval) -> AuditRecordV1:
    return msgspec.structs.replace(
        record,
        approval=approval_entry(approval),
        risk=risk_entry(approval.risk),
        risk_factors=scored_factors(approval.risk),
    )


def test_citing_one_approval_again_gives_the_same_record_bytes():
    approval = make_approval(1)

    first = with_approval(_record("d1"), approval)
    second = with_approval(_record("d2"), approval)

    assert encode_record(first) == encode_record(_cited_alone(_record("d1"), approval))
    assert encode_record(second) == encode_record(_cited_alone(_record("d2"), approval))


def test_a_changed_approval_is_cited_as_it_is_now():
    pending = make_approval(2)
    approved = msgspec.structs.replace(pending, state=ApprovalState.APPROVED)

    before = with_approval(_record("d1"), pending)
    after = with_approval(_record("d2"), approved)
    without_risk = with_approval(_record("d3"), approved, risk=False)

    assert before.approval.state == "pending"
    assert after.approval.state == "approved"
    assert without_risk.risk is None and without_risk.approval.state == "approved"
