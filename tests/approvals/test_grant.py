"""The pipeline with approvals on real LMDB: opening, reusing and using a
grant, and every reason an approval cannot be used."""

from __future__ import annotations

import asyncio
import re
import shutil

import msgspec
import pytest
from core_support import CAROL, ERIN, core, refund, reviewer
from support import SHIPPED_POLICIES

from kynara_sidecar.approvals.book import APPROVALS_DB
from kynara_sidecar.approvals.model import (
    Approval,
    ApprovalState,
    InboxQuery,
    Verdict,
)
from kynara_sidecar.audit import RefusingSink
from kynara_sidecar.audit.record import RECORD_VERSION, ApprovalEntry, AuditRecordV1
from kynara_sidecar.audit.verify import verify_store
from kynara_sidecar.decision import Effect
from kynara_sidecar.errors import AuditUnavailable, ReasonCode

APPROVAL_ID = re.compile(r"^apr_[a-z2-7]{26}$")


def run(body):
    return asyncio.run(body())


def stored(c, approval_id: str) -> Approval:
    raw = c.store.get_state(APPROVALS_DB, approval_id.encode())
    assert raw is not None, f"no approval {approval_id} in LMDB"
    return msgspec.msgpack.decode(raw, type=Approval)


def policies_with(tmp_path, edit) -> object:
    """A copy of the shipped policies with payments.yaml edited."""
    root = tmp_path / "policies-edited"
    shutil.copytree(SHIPPED_POLICIES, root)
    payments = root / "payments.yaml"
    payments.write_text(edit(payments.read_text()))
    return root


ASK_TWICE = """
  - id: refund-audit
    effect: require_approval
    actions: [payments.refund.issue]
    resources: [payments.refund]
    roles: [support]
    condition: resource.attr.amount > 50000
"""
FREEZE = """
  - id: refunds-frozen
    effect: deny
    actions: [payments.refund.issue]
    resources: [payments.refund]
    roles: [support]
"""


def test_require_approval_opens_an_approval_with_its_records(tmp_path, clock):
    async def body():
        async with core(tmp_path, clock) as c:
            answer = await c.decide(refund())

            approval = answer.approval
            assert answer.decision.effect is Effect.REQUIRE_APPROVAL
            assert answer.decision.reason_code is ReasonCode.APPROVAL_REQUIRED
            assert APPROVAL_ID.match(approval.id)
            assert approval.state is ApprovalState.PENDING
            assert approval.url == f"http://inbox.test/approvals/{approval.id}"
            # payments/refund-large: expires_in_seconds 3600, risk 50.
            assert approval.created_at == "2026-12-07T09:00:00Z"
            assert approval.expires_at == "2026-12-07T10:00:00Z"
            assert [(r.policy, r.rule) for r in approval.rules] == [
                ("payments", "refund-large"),
                ("payments", "refund-large"),
            ]
            assert [r.principal for r in approval.rules] == ["alice", "support-bot"]
            assert approval.rules[0].condition == "resource.attr.amount > 50000"
            # Default weights: rule 40 * 0.5, unusual_action 10 (a first).
            assert approval.risk.score == 43
            assert approval.decision_id == answer.decision_id
            assert approval.attributes == {"amount": {"int": "60000"}}
            assert stored(c, approval.id) == approval

            decision, requested = c.records()[-2:]
            assert decision.seq == answer.audit_sequence
            assert decision.kind == "decision"
            assert decision.approval.id == approval.id
            assert decision.approval.state == "pending"
            assert decision.approval.digest == approval.digest
            assert decision.risk.score == 43
            assert decision.risk_factors == ["rule", "amount", "unusual_action"]
            assert requested.kind == "approval_requested"
            assert requested.decision_id == answer.decision_id
            assert requested.approval.approvals_needed == 1
            assert requested.approval.rules == [
                "payments/refund-large (alice)",
                "payments/refund-large (support-bot)",
            ]
            assert requested.resource == decision.resource

    run(body)


def test_a_retry_while_pending_returns_the_same_approval(tmp_path, clock):
    async def body():
        async with core(tmp_path, clock) as c:
            first = await c.decide(refund())
            again = await c.decide(refund(trace="t-2"))
            volatile_free = await c.decide(refund())

            assert again.approval.id != first.approval.id  # context differs
            assert volatile_free.approval.id == first.approval.id
            assert volatile_free.decision_id != first.decision_id
            kinds = [r.kind for r in c.records()]
            assert kinds == [
                "decision",
                "approval_requested",
                "decision",
                "approval_requested",
                "decision",
            ]

    run(body)


def test_volatile_context_may_differ_on_the_retry(tmp_path, clock):
    async def body():
        async with core(tmp_path, clock, "approvals.volatile_context=[trace]") as c:
            first = await c.decide(refund(trace="t-1"))
            await c.approve(first.approval.id)

            used = await c.decide(refund(trace="t-2", approval_id=first.approval.id))

            assert used.decision.effect is Effect.ALLOW
            assert used.decision.reason_code is ReasonCode.APPROVAL_GRANTED

    run(body)


def test_an_approved_grant_allows_the_same_request_once(tmp_path, clock):
    async def body():
        async with core(tmp_path, clock) as c:
            asked = await c.decide(refund())
            await c.approve(asked.approval.id)

            used = await c.decide(refund(approval_id=asked.approval.id))

            assert used.decision.effect is Effect.ALLOW
            assert used.decision.reason_code is ReasonCode.APPROVAL_GRANTED
            assert "approved by carol" in used.decision.reason
            assert used.approval.state is ApprovalState.USED
            assert used.approval.approvers == ("carol",)
            assert used.approval.used_by == used.decision_id
            assert stored(c, asked.approval.id).state is ApprovalState.USED
            record = c.records()[-1]
            assert record.seq == used.audit_sequence
            assert record.decision == "allow"
            assert record.reason_code == "approval_granted"
            assert record.approval.state == "used"
            assert record.approval.reviewers == ["carol"]
            assert record.approval.decision_id == asked.decision_id
            assert record.approval.used_by == used.decision_id
            assert c.book.get(asked.approval.id).state is ApprovalState.USED

    run(body)


@pytest.mark.parametrize(
    ("retry", "reason_code"),
    [
        (refund(refund_id="R2"), ReasonCode.APPROVAL_MISMATCH),
        (refund(amount=60001), ReasonCode.APPROVAL_MISMATCH),
        (refund(user="bob"), ReasonCode.APPROVAL_MISMATCH),
        (refund(reason="changed"), ReasonCode.APPROVAL_MISMATCH),
    ],
    ids=["another-refund", "another-amount", "another-user", "another-context"],
)
def test_a_grant_binds_only_the_request_approved(tmp_path, clock, retry, reason_code):
    async def body():
        async with core(tmp_path, clock) as c:
            asked = await c.decide(refund())
            await c.approve(asked.approval.id)

            other = await c.decide(
                msgspec.structs.replace(retry, approval_id=asked.approval.id)
            )
            then = await c.decide(refund(approval_id=asked.approval.id))

            assert other.decision.effect is Effect.DENY
            assert other.decision.reason_code is reason_code
            assert "another request" in other.decision.reason
            assert c.records()[-2].reason_code == str(reason_code)
            # The mismatch did not use the grant.
            assert then.decision.reason_code is ReasonCode.APPROVAL_GRANTED

    run(body)


def test_a_second_use_is_denied_approval_used(tmp_path, clock):
    async def body():
        async with core(tmp_path, clock) as c:
            asked = await c.decide(refund())
            await c.approve(asked.approval.id)
            await c.decide(refund(approval_id=asked.approval.id))

            second = await c.decide(refund(approval_id=asked.approval.id))

            assert second.decision.effect is Effect.DENY
            assert second.decision.reason_code is ReasonCode.APPROVAL_USED
            assert second.approval.state is ApprovalState.USED

    run(body)


def test_two_concurrent_retries_get_one_allow_and_one_approval_used(tmp_path, clock):
    async def body():
        async with core(tmp_path, clock) as c:
            asked = await c.decide(refund())
            await c.approve(asked.approval.id)
            retry = refund(approval_id=asked.approval.id)

            answers = await asyncio.gather(c.decide(retry), c.decide(retry))

            codes = sorted(str(a.decision.reason_code) for a in answers)
            assert codes == ["approval_granted", "approval_used"]
            granted = [r for r in c.records() if r.reason_code == "approval_granted"]
            assert len(granted) == 1

    run(body)


def test_a_batch_using_one_grant_twice_gets_one_allow_in_one_transaction(
    tmp_path, clock
):
    async def body():
        async with core(tmp_path, clock) as c:
            asked = await c.decide(refund())
            await c.approve(asked.approval.id)
            retry = refund(approval_id=asked.approval.id)

            first, second = await c.pipeline.decide_all([retry, retry])

            assert first.decision.reason_code is ReasonCode.APPROVAL_GRANTED
            assert second.decision.reason_code is ReasonCode.APPROVAL_USED
            assert second.audit_sequence == first.audit_sequence + 1

    run(body)


def test_a_batch_opens_one_approval_for_two_identical_requests(tmp_path, clock):
    async def body():
        async with core(tmp_path, clock) as c:
            first, second = await c.pipeline.decide_all([refund(), refund()])

            assert first.approval.id == second.approval.id
            kinds = [r.kind for r in c.records()]
            assert kinds == ["decision", "approval_requested", "decision"]

    run(body)


def test_a_pending_approval_named_by_a_retry_still_requires_approval(tmp_path, clock):
    async def body():
        async with core(tmp_path, clock) as c:
            asked = await c.decide(refund())

            again = await c.decide(refund(approval_id=asked.approval.id))

            assert again.decision.effect is Effect.REQUIRE_APPROVAL
            assert again.decision.reason_code is ReasonCode.APPROVAL_REQUIRED
            assert again.approval.id == asked.approval.id
            assert c.records()[-1].kind == "decision"

    run(body)


def test_an_unknown_approval_id_is_approval_not_found(tmp_path, clock):
    async def body():
        async with core(tmp_path, clock) as c:
            answer = await c.decide(refund(approval_id="apr_" + "a" * 26))

            assert answer.decision.effect is Effect.DENY
            assert answer.decision.reason_code is ReasonCode.APPROVAL_NOT_FOUND
            assert answer.approval is None

    run(body)


def test_a_rejected_approval_is_approval_rejected(tmp_path, clock):
    async def body():
        async with core(tmp_path, clock) as c:
            asked = await c.decide(refund())
            await c.book.review(asked.approval.id, CAROL, Verdict.REJECT, "no")

            answer = await c.decide(refund(approval_id=asked.approval.id))

            assert answer.decision.effect is Effect.DENY
            assert answer.decision.reason_code is ReasonCode.APPROVAL_REJECTED

    run(body)


def test_a_use_after_expiry_is_approval_expired(tmp_path, clock):
    async def body():
        async with core(tmp_path, clock) as c:
            asked = await c.decide(refund())
            await c.approve(asked.approval.id)
            clock.set("2026-12-07T10:00:00Z")

            late = await c.decide(refund(approval_id=asked.approval.id))
            expired = await c.book.expire_due()

            assert late.decision.effect is Effect.DENY
            assert late.decision.reason_code is ReasonCode.APPROVAL_EXPIRED
            assert expired == 1
            assert c.book.get(asked.approval.id).state is ApprovalState.EXPIRED
            assert c.records()[-1].approval.resolution == "expired"

    run(body)


def test_an_approval_never_lifts_a_deny(tmp_path, clock):
    frozen = policies_with(tmp_path, lambda text: text + FREEZE)

    async def body():
        async with core(tmp_path, clock) as c:
            asked = await c.decide(refund())
            await c.approve(asked.approval.id)
            c.activate(frozen)

            denied = await c.decide(refund(approval_id=asked.approval.id))

            assert denied.decision.effect is Effect.DENY
            assert denied.decision.reason_code is ReasonCode.RULE_DENIED
            assert denied.approval is None
            assert c.book.get(asked.approval.id).state is ApprovalState.APPROVED
            c.activate()
            used = await c.decide(refund(approval_id=asked.approval.id))
            assert used.decision.reason_code is ReasonCode.APPROVAL_GRANTED

    run(body)


def test_an_engine_allow_leaves_the_grant_untouched(tmp_path, clock):
    raised = policies_with(tmp_path, lambda text: text.replace("50000", "100000"))

    async def body():
        async with core(tmp_path, clock) as c:
            asked = await c.decide(refund())
            await c.approve(asked.approval.id)
            c.activate(raised)

            allowed = await c.decide(refund(approval_id=asked.approval.id))

            assert allowed.decision.effect is Effect.ALLOW
            assert allowed.decision.reason_code is ReasonCode.RULE_ALLOWED
            assert c.book.get(asked.approval.id).state is ApprovalState.APPROVED

    run(body)


def test_a_rule_asking_now_that_did_not_ask_then_is_approval_insufficient(
    tmp_path, clock
):
    stricter = policies_with(tmp_path, lambda text: text + ASK_TWICE)

    async def body():
        async with core(tmp_path, clock) as c:
            asked = await c.decide(refund())
            await c.approve(asked.approval.id)
            c.activate(stricter)

            answer = await c.decide(refund(approval_id=asked.approval.id))

            assert answer.decision.effect is Effect.DENY
            assert answer.decision.reason_code is ReasonCode.APPROVAL_INSUFFICIENT
            assert "payments/refund-audit (alice)" in answer.decision.reason
            assert c.book.get(asked.approval.id).state is ApprovalState.APPROVED

    run(body)


def test_more_approvers_asked_now_is_approval_insufficient(tmp_path, clock):
    two = policies_with(
        tmp_path, lambda text: text.replace("risk: 50", "risk: 50\n      approvers: 2")
    )

    async def body():
        async with core(tmp_path, clock) as c:
            asked = await c.decide(refund())
            await c.approve(asked.approval.id)
            c.activate(two)

            answer = await c.decide(refund(approval_id=asked.approval.id))

            assert answer.decision.reason_code is ReasonCode.APPROVAL_INSUFFICIENT
            assert "2 approvers are needed, it has 1" in answer.decision.reason

    run(body)


def test_two_approvers_need_two_distinct_reviewers(tmp_path, clock):
    two = policies_with(
        tmp_path, lambda text: text.replace("risk: 50", "risk: 50\n      approvers: 2")
    )

    async def body():
        async with core(tmp_path, clock, policies=two) as c:
            asked = await c.decide(refund())
            once = await c.approve(asked.approval.id, CAROL)
            still = await c.decide(refund(approval_id=asked.approval.id))
            twice = await c.approve(asked.approval.id, ERIN)
            used = await c.decide(refund(approval_id=asked.approval.id))

            assert once.state is ApprovalState.PENDING
            assert still.decision.effect is Effect.REQUIRE_APPROVAL
            assert twice.state is ApprovalState.APPROVED
            assert used.decision.reason_code is ReasonCode.APPROVAL_GRANTED
            kinds = [r.kind for r in c.records()]
            assert "approval_reviewed" in kinds
            assert used.approval.approvers == ("carol", "erin")

    run(body)


def test_too_many_pending_is_approval_rate_limited(tmp_path, clock):
    async def body():
        async with core(tmp_path, clock, "approvals.max_pending_per_agent=2") as c:
            await c.decide(refund(refund_id="R1"))
            await c.decide(refund(refund_id="R2"))

            third = await c.decide(refund(refund_id="R3"))
            reused = await c.decide(refund(refund_id="R1"))

            assert third.decision.effect is Effect.DENY
            assert third.decision.reason_code is ReasonCode.APPROVAL_RATE_LIMITED
            assert "max_pending_per_agent" in third.decision.reason
            assert third.approval is None
            assert c.records()[-2].approval is None
            # A retry of a pending one is no new approval: not limited.
            assert reused.decision.effect is Effect.REQUIRE_APPROVAL
            assert len(c.book.list(InboxQuery())) == 2

    run(body)


def test_too_many_new_in_a_minute_is_approval_rate_limited(tmp_path, clock):
    async def body():
        async with core(
            tmp_path, clock, "approvals.max_new_per_agent_per_minute=2"
        ) as c:
            await c.decide(refund(refund_id="R1"))
            clock.set("2026-12-07T09:00:30Z")
            await c.decide(refund(refund_id="R2"))

            limited = await c.decide(refund(refund_id="R3"))
            clock.set("2026-12-07T09:01:00Z")
            again = await c.decide(refund(refund_id="R3"))

            assert limited.decision.reason_code is ReasonCode.APPROVAL_RATE_LIMITED
            assert "max_new_per_agent_per_minute" in limited.decision.reason
            assert again.decision.effect is Effect.REQUIRE_APPROVAL

    run(body)


def test_a_failed_commit_opens_nothing_and_uses_nothing(tmp_path, clock):
    async def body():
        async with core(tmp_path, clock) as c:
            writer = c.pipeline._writer
            c.pipeline._writer = RefusingSink(AuditUnavailable("disk gone"))
            with pytest.raises(AuditUnavailable):
                await c.decide(refund(refund_id="R9"))
            assert c.book.list(InboxQuery()) == []
            assert c.store.iter_state(APPROVALS_DB) == []

            c.pipeline._writer = writer
            asked = await c.decide(refund())
            await c.approve(asked.approval.id)
            c.pipeline._writer = RefusingSink(AuditUnavailable("disk gone"))
            with pytest.raises(AuditUnavailable):
                await c.decide(refund(approval_id=asked.approval.id))
            assert c.book.get(asked.approval.id).state is ApprovalState.APPROVED
            assert stored(c, asked.approval.id).state is ApprovalState.APPROVED

            c.pipeline._writer = writer
            used = await c.decide(refund(approval_id=asked.approval.id))
            assert used.decision.reason_code is ReasonCode.APPROVAL_GRANTED

    run(body)


def forged_use(approval_id: str, decision_id: str) -> AuditRecordV1:
    """A second allow citing the grant, as someone who can write the LMDB
    file (but holds no key) would append it."""
    return msgspec.json.decode(
        msgspec.json.encode(
            {
                "v": RECORD_VERSION,
                "kind": "decision",
                "time": "2026-12-07T09:05:00Z",
                "decision_id": decision_id,
                "action": "payments.refund.issue",
                "decision": "allow",
                "reason_code": "approval_granted",
                "approval": {"id": approval_id, "state": "used"},
            }
        ),
        type=AuditRecordV1,
    )


def test_the_log_verifies_with_the_approval_lifecycle_and_a_forged_reuse_does_not(
    tmp_path, clock
):
    async def body():
        async with core(tmp_path, clock) as c:
            asked = await c.decide(refund())
            await c.approve(asked.approval.id)
            await c.decide(refund(approval_id=asked.approval.id))
            await c.writer.close()

            clean = verify_store(c.store, None, None)
            c.store.append_batch([forged_use(asked.approval.id, "forged-1")])
            reused = verify_store(c.store, None, None)

            assert clean.ok, clean.problem
            assert reused.problem.kind == "approval_reused"
            assert reused.problem.seq == c.store.head().seq

    run(body)


def test_a_forged_use_of_an_approval_never_approved_does_not_verify(tmp_path, clock):
    async def body():
        async with core(tmp_path, clock) as c:
            asked = await c.decide(refund())
            await c.writer.close()

            c.store.append_batch([forged_use(asked.approval.id, "forged-1")])
            report = verify_store(c.store, None, None)

            assert report.problem.kind == "approval_not_approved"

    run(body)


# ------------------------------------------ the requirement, rechecked at use


def approval_block(*lines: str):
    """Edit refund-large's approval block: add ``lines`` (YAML, one key
    each) after its risk, in place of its expires_in_seconds."""
    extra = "".join(f"\n      {line}" for line in lines)
    expiry = any(line.startswith("expires_in_seconds:") for line in lines)

    def edit(text: str) -> str:
        if expiry:
            text = text.replace("      expires_in_seconds: 3600\n", "")
        return text.replace("risk: 50", "risk: 50" + extra)

    return edit


ALICE_REVIEWS = reviewer("alice")
FINANCE_ERIN = reviewer("erin", "finance")


@pytest.mark.parametrize(
    ("then", "now", "who", "at", "reason_code", "why"),
    [
        (
            (),
            ("reviewer_roles: [finance]",),
            CAROL,
            "2026-12-07T09:05:00Z",
            ReasonCode.APPROVAL_INSUFFICIENT,
            "carol held none of [finance]",
        ),
        (
            ("allow_self_approval: true",),
            (),
            ALICE_REVIEWS,
            "2026-12-07T09:05:00Z",
            ReasonCode.APPROVAL_INSUFFICIENT,
            "alice is a principal of the chain and self approval is not allowed",
        ),
        (
            (),
            ("expires_in_seconds: 600",),
            CAROL,
            "2026-12-07T09:10:00Z",
            ReasonCode.APPROVAL_EXPIRED,
            "expired at 2026-12-07T09:10:00Z: the rules asking now allow 600 "
            "seconds from its creation at 2026-12-07T09:00:00Z",
        ),
    ],
    ids=["roles-now-required", "self-approval-now-disallowed", "expiry-now-shorter"],
)
def test_a_reload_rechecks_the_grant_against_the_rules_asking_now(
    tmp_path, clock, then, now, who, at, reason_code, why
):
    before = policies_with(tmp_path / "then", approval_block(*then))
    after = policies_with(tmp_path / "now", approval_block(*now))

    async def body():
        async with core(tmp_path, clock, policies=before) as c:
            asked = await c.decide(refund())
            await c.approve(asked.approval.id, who)
            c.activate(after)
            clock.set(at)

            refused = await c.decide(refund(approval_id=asked.approval.id))
            c.activate(before)
            used = await c.decide(refund(approval_id=asked.approval.id))

            assert refused.decision.effect is Effect.DENY
            assert refused.decision.reason_code is reason_code
            assert why in refused.decision.reason
            assert refused.approval.state is ApprovalState.APPROVED
            assert c.records()[-2].reason_code == str(reason_code)
            # The refusal used nothing: under the old rules it still grants.
            assert used.decision.reason_code is ReasonCode.APPROVAL_GRANTED

    run(body)


def test_a_reviewer_holding_a_role_now_required_still_counts(tmp_path, clock):
    after = policies_with(tmp_path, approval_block("reviewer_roles: [finance]"))

    async def body():
        async with core(tmp_path, clock) as c:
            asked = await c.decide(refund())
            await c.approve(asked.approval.id, FINANCE_ERIN)
            c.activate(after)

            used = await c.decide(refund(approval_id=asked.approval.id))

            assert used.decision.reason_code is ReasonCode.APPROVAL_GRANTED

    run(body)


def test_a_longer_expiry_now_never_extends_the_stored_one(tmp_path, clock):
    after = policies_with(tmp_path, lambda text: text.replace("3600", "7200"))

    async def body():
        async with core(tmp_path, clock) as c:
            asked = await c.decide(refund())
            await c.approve(asked.approval.id)
            c.activate(after)
            clock.set("2026-12-07T10:30:00Z")

            late = await c.decide(refund(approval_id=asked.approval.id))

            assert late.decision.reason_code is ReasonCode.APPROVAL_EXPIRED

    run(body)


# ------------------------------- asking again without the id: the grant back


def test_asking_again_without_the_id_answers_with_the_approved_grant(tmp_path, clock):
    async def body():
        async with core(tmp_path, clock) as c:
            asked = await c.decide(refund())
            await c.approve(asked.approval.id)

            again = await c.decide(refund())
            used = await c.decide(refund(approval_id=again.approval.id))

            assert again.decision.effect is Effect.REQUIRE_APPROVAL
            assert again.approval.id == asked.approval.id
            assert again.approval.state is ApprovalState.APPROVED
            record = c.records()[again.audit_sequence - 1]
            assert record.seq == again.audit_sequence
            assert record.approval.state == "approved"
            kinds = [r.kind for r in c.records()]
            assert kinds.count("approval_requested") == 1
            assert used.decision.reason_code is ReasonCode.APPROVAL_GRANTED
            assert verify_store(c.store, None, None).ok

    run(body)


@pytest.mark.parametrize(
    "setup",
    ["used", "expired", "rules-now-stricter", "another-request"],
)
def test_asking_again_opens_a_new_approval_when_the_grant_cannot_serve(
    tmp_path, clock, setup
):
    stricter = policies_with(tmp_path, approval_block("reviewer_roles: [finance]"))

    async def body():
        async with core(tmp_path, clock) as c:
            asked = await c.decide(refund())
            await c.approve(asked.approval.id)
            request = refund()
            if setup == "used":
                await c.decide(refund(approval_id=asked.approval.id))
            elif setup == "expired":
                clock.set("2026-12-07T10:00:00Z")
            elif setup == "rules-now-stricter":
                c.activate(stricter)
            else:
                request = refund(amount=60001)

            again = await c.decide(request)

            assert again.decision.effect is Effect.REQUIRE_APPROVAL
            assert again.approval.id != asked.approval.id
            assert again.approval.state is ApprovalState.PENDING

    run(body)


# ------------------------------------ verify: forged approval lifecycles


def asking_record(c, approval_id: str) -> AuditRecordV1:
    """The require_approval decision record that opened ``approval_id``."""
    return next(
        r
        for r in c.records()
        if r.kind == "decision" and r.approval and r.approval.id == approval_id
    )


def forged_allow(
    asking: AuditRecordV1, time: str = "2026-12-07T09:05:00Z", **fields
) -> AuditRecordV1:
    """An allow using the approval ``asking`` opened, copied from that
    record as someone who can write the LMDB file (but holds no key) would,
    with ``fields`` changed."""
    approval = msgspec.structs.replace(
        asking.approval, state="used", used_by="forged-1"
    )
    allow = {
        "seq": 0,
        "time": time,
        "decision_id": "forged-1",
        "decision": "allow",
        "reason_code": "approval_granted",
        "reason": "allowed once",
        "approval": approval,
    }
    return msgspec.structs.replace(asking, **{**allow, **fields})


def forged_resolution(asking: AuditRecordV1, approval_id: str) -> AuditRecordV1:
    return AuditRecordV1(
        v=RECORD_VERSION,
        kind="approval_resolved",
        time="2026-12-07T09:04:00Z",
        decision_id=asking.decision_id if asking else "forged-0",
        approval=ApprovalEntry(id=approval_id, resolution="approved", state="approved"),
    )


def test_an_approval_resolved_that_was_never_requested_does_not_verify(tmp_path, clock):
    async def body():
        async with core(tmp_path, clock) as c:
            asked = await c.decide(refund())
            await c.writer.close()
            ghost = "apr_" + "b" * 26

            c.store.append_batch([forged_resolution(None, ghost)])
            report = verify_store(c.store, None, None)

            assert report.problem.kind == "approval_not_requested"
            assert report.problem.seq == c.store.head().seq
            assert ghost in report.problem.message
            assert asked.approval.id != ghost

    run(body)


@pytest.mark.parametrize("ending", ["rejected", "expired"])
def test_an_allow_after_a_final_resolution_does_not_verify(tmp_path, clock, ending):
    async def body():
        async with core(tmp_path, clock) as c:
            asked = await c.decide(refund())
            if ending == "rejected":
                await c.book.review(asked.approval.id, CAROL, Verdict.REJECT, "no")
            else:
                await c.approve(asked.approval.id)
                clock.set("2026-12-07T10:00:00Z")
                await c.book.expire_due()
            await c.writer.close()
            asking = asking_record(c, asked.approval.id)
            clean = verify_store(c.store, None, None)

            # A forger "approves" a rejected one first; an expired one was
            # approved already. The allow is dated before expires_at.
            forged = [forged_allow(asking)]
            if ending == "rejected":
                forged.insert(0, forged_resolution(asking, asked.approval.id))
            c.store.append_batch(forged)
            report = verify_store(c.store, None, None)

            assert clean.ok, clean.problem
            assert report.problem.kind == "approval_ended"
            assert report.problem.seq == c.store.head().seq
            assert f"resolved {ending}" in report.problem.message

    run(body)


def test_an_allow_past_the_approvals_expiry_does_not_verify(tmp_path, clock):
    async def body():
        async with core(tmp_path, clock) as c:
            asked = await c.decide(refund())
            await c.approve(asked.approval.id)
            await c.writer.close()
            asking = asking_record(c, asked.approval.id)

            # The daemon stopped before its expiry task recorded "expired".
            c.store.append_batch([forged_allow(asking, time="2026-12-07T10:00:00Z")])
            report = verify_store(c.store, None, None)

            assert report.problem.kind == "approval_expired"
            assert "2026-12-07T10:00:00Z" in report.problem.message

    run(body)


def _other_resource(record, **changes):
    return {"resource": msgspec.structs.replace(record.resource, **changes)}


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda r: _other_resource(r, id="R2"), "resource"),
        (
            lambda r: _other_resource(r, attributes={"amount": {"int": "6000000"}}),
            "binds another request",
        ),
        (
            lambda r: {"context": {**r.context, "note": {"string": "x"}}},
            "differing [note]",
        ),
        (
            lambda r: {"context": {k: v for k, v in r.context.items() if k != "note"}},
            "differing [note]",
        ),
        (lambda r: {"action": "payments.refund.void"}, "action"),
        (
            lambda r: {"chain": [msgspec.structs.replace(r.chain[0], id="bob")]},
            "chain",
        ),
        (
            lambda r: {
                "approval": msgspec.structs.replace(
                    r.approval, digest="sha256:" + "0" * 64, state="used"
                )
            },
            "digest",
        ),
    ],
    ids=[
        "resource-id",
        "attributes",
        "context-changed",
        "context-dropped",
        "action",
        "user",
        "digest",
    ],
)
def test_an_allow_for_another_request_than_approved_does_not_verify(
    tmp_path, clock, change, why
):
    async def body():
        async with core(tmp_path, clock, "approvals.volatile_context=[trace]") as c:
            asked = await c.decide(refund(trace="t-1", note="n"))
            await c.approve(asked.approval.id)
            await c.writer.close()
            asking = asking_record(c, asked.approval.id)
            fields = change(asking)

            c.store.append_batch([forged_allow(asking, **fields)])
            report = verify_store(c.store, None, None)

            assert report.problem.kind == "approval_mismatch"
            assert report.problem.seq == c.store.head().seq
            assert why in report.problem.message

    run(body)


def test_a_use_differing_only_in_volatile_context_verifies(tmp_path, clock):
    async def body():
        async with core(
            tmp_path, clock, "approvals.volatile_context=[trace, attempt]"
        ) as c:
            asked = await c.decide(refund(trace="t-1", attempt=1, note="n"))
            await c.approve(asked.approval.id)
            used = await c.decide(
                refund(trace="t-2", attempt=1, note="n", approval_id=asked.approval.id)
            )
            await c.writer.close()

            report = verify_store(c.store, None, None)

            assert used.decision.reason_code is ReasonCode.APPROVAL_GRANTED
            assert report.ok, report.problem
            assert not [note for note in report.notes if "approval" in note]

    run(body)


@pytest.mark.parametrize(
    ("key", "ok"), [("trace", True), ("extra", False)], ids=["volatile", "bound"]
)
def test_a_context_key_only_the_use_has_is_judged_by_the_recorded_volatile_keys(
    tmp_path, clock, key, ok
):
    # The approval_requested record names the keys the digest left out, so
    # a key only the use carries is told apart without guessing.
    async def body():
        async with core(tmp_path, clock, "approvals.volatile_context=[trace]") as c:
            asked = await c.decide(refund())
            await c.approve(asked.approval.id)
            await c.writer.close()
            asking = asking_record(c, asked.approval.id)
            added = {**asking.context, key: {"string": "x"}}

            c.store.append_batch([forged_allow(asking, context=added)])
            report = verify_store(c.store, None, None)

            assert asking.approval.volatile_context == ["trace"]
            assert report.ok is ok, report.problem
            if not ok:
                assert report.problem.kind == "approval_mismatch"
                assert f"differing [{key}]" in report.problem.message

    run(body)


def test_a_redacted_use_verifies_on_its_ids_and_digest(tmp_path, clock):
    # Redacted values cannot be hashed again: the ids and digest still bind.
    async def body():
        async with core(
            tmp_path,
            clock,
            "audit.redact={context: {email: drop}}",
            "approvals.volatile_context=[trace]",
        ) as c:
            mail = "a@example.com"
            asked = await c.decide(refund(email=mail, trace="t-1"))
            other = await c.decide(refund(refund_id="R2", email=mail))
            for approval in (asked.approval, other.approval):
                await c.approve(approval.id)
            await c.decide(
                refund(email=mail, trace="t-2", approval_id=asked.approval.id)
            )
            await c.writer.close()
            asking = asking_record(c, other.approval.id)
            clean = verify_store(c.store, None, None)

            c.store.append_batch([forged_allow(asking, action="payments.refund.void")])
            forged = verify_store(c.store, None, None)

            assert asking.redactions == ["$.context.email"]
            assert clean.ok, clean.problem
            assert forged.problem.kind == "approval_mismatch"
            assert "action" in forged.problem.message

    run(body)
