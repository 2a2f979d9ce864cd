"""A deploy only if a review of that change was approved within the hour:
a limit counting approved decisions of one action, read by another's rule,
over real gRPC with a reviewer approving through the daemon's book."""

from __future__ import annotations

import pytest
from kynara.v1 import decision_pb2 as pb
from limits_support import policy_dir
from support import read_record

from kynara_sidecar.approvals.model import Reviewer, Verdict

CHANGES = """\
format_version: 1
kind: policy
name: changes
limits:
  change_reviewed:
    description: reviews of this change that a reviewer approved, last hour
    actions: [changes.review]
    resources: [changes.change]
    decisions: [approved]
    key: [resource.id]
    window: {rolling: 1h}
    ceiling: 1
rules:
  - id: review-needs-approval
    effect: require_approval
    actions: [changes.review]
    resources: [changes.change]
    roles: [support, support_agent]
  - id: deploy
    effect: allow
    actions: [changes.deploy, changes.review]
    resources: [changes.change]
    roles: [support, support_agent]
  - id: deploy-only-after-review
    effect: deny
    actions: [changes.deploy]
    resources: [changes.change]
    roles: [support, support_agent]
    condition: limits.change_reviewed.count == 0
"""
CAROL = Reviewer(id="carol", roles=frozenset({"reviewer"}))


@pytest.fixture
def running(tmp_path, start_daemon):
    root = policy_dir(tmp_path / "policies", {"changes.yaml": CHANGES})
    return start_daemon(f"policy.source={root}")


def ask(stub, action: str, change: str, approval_id: str = "") -> pb.DecideResponse:
    return stub.Decide(
        pb.DecideRequest(
            asserted_chain=["alice"],
            action=action,
            resource=pb.Resource(kind="changes.change", id=change),
            approval_id=approval_id,
        ),
        timeout=10,
    )


def test_a_deploy_waits_for_an_approved_review_of_that_change_within_the_hour(
    running,
):
    stub = running.stub()
    before = ask(stub, "changes.deploy", "ch1")
    asked = ask(stub, "changes.review", "ch1")
    # Asking is not an approval: the deploy still waits.
    waiting = ask(stub, "changes.deploy", "ch1")
    book = running.daemon.pipeline.approvals
    running.call(book.review(asked.approval.id, CAROL, Verdict.APPROVE, "ok"))
    reviewed = ask(stub, "changes.review", "ch1", asked.approval.id)
    after = ask(stub, "changes.deploy", "ch1")
    other = ask(stub, "changes.deploy", "ch2")
    running.clock.set("2026-12-07T10:00:00.5Z")
    stale = ask(stub, "changes.deploy", "ch1")

    assert before.decision == pb.DECISION_DENY
    assert asked.decision == pb.DECISION_REQUIRE_APPROVAL
    assert waiting.decision == pb.DECISION_DENY
    assert (reviewed.decision, reviewed.reason_code) == (
        pb.DECISION_ALLOW,
        "approval_granted",
    )
    assert after.decision == pb.DECISION_ALLOW
    assert other.decision == pb.DECISION_DENY
    assert stale.decision == pb.DECISION_DENY
    granted = read_record(running, reviewed.audit_sequence).limits["change_reviewed"]
    assert (granted.counted, granted.key) == (True, '["ch1"]')
    seen = read_record(running, after.audit_sequence).limits["change_reviewed"]
    assert (seen.count, seen.counted) == (1, False)
