"""Approvals through a real daemon: gRPC on a Unix socket, LMDB on disk,
restarts, and a SIGKILL between the use of a grant and the next try.

Reviews go through the daemon's own book (``Daemon.pipeline.approvals``):
the reviewer-side services are tested on their own.
"""

from __future__ import annotations

import concurrent.futures
import time

import pytest
from fault_helpers import CALL_TIMEOUT, DaemonProcess, verify_cli
from kynara.v1 import decision_pb2 as pb
from support import RunningDaemon, daemon_config, value_to_proto

from kynara_sidecar.approvals.model import (
    ApprovalState,
    InboxQuery,
    Reviewer,
    Verdict,
)
from kynara_sidecar.audit.record import parse_timestamp

CAROL = Reviewer(id="carol", roles=frozenset({"reviewer"}))


def refund(
    refund_id: str = "R1", amount: int = 60000, user: str = "alice", approval_id=""
) -> pb.DecideRequest:
    return pb.DecideRequest(
        asserted_chain=[user],
        action="payments.refund.issue",
        resource=pb.Resource(
            kind="payments.refund",
            id=refund_id,
            attributes={"amount": value_to_proto(amount)},
        ),
        approval_id=approval_id,
    )


def approve(running: RunningDaemon, approval_id: str):
    book = running.daemon.pipeline.approvals
    return running.call(book.review(approval_id, CAROL, Verdict.APPROVE, "ok"))


def test_a_refund_over_the_limit_pauses_and_its_grant_allows_it_once(daemon):
    stub = daemon.stub()

    asked = stub.Decide(refund(), timeout=CALL_TIMEOUT)
    approve(daemon, asked.approval.id)
    denied = {
        name: stub.Decide(request, timeout=CALL_TIMEOUT)
        for name, request in {
            "R2": refund("R2", approval_id=asked.approval.id),
            "60001": refund(amount=60001, approval_id=asked.approval.id),
            "bob": refund(user="bob", approval_id=asked.approval.id),
        }.items()
    }
    used = stub.Decide(refund(approval_id=asked.approval.id), timeout=CALL_TIMEOUT)
    second = stub.Decide(refund(approval_id=asked.approval.id), timeout=CALL_TIMEOUT)

    assert asked.decision == pb.DECISION_REQUIRE_APPROVAL
    assert asked.reason_code == "approval_required"
    assert asked.approval.state == "pending"
    assert asked.approval.url == (
        f"http://127.0.0.1:{daemon.daemon.http_port}/approvals/{asked.approval.id}"
    )
    expires = parse_timestamp("2026-12-07T10:00:00Z")
    assert asked.approval.expires_at.seconds == expires.seconds
    # rule 20, amount 12.5 (the shipped config), unusual action 10.
    assert asked.approval.risk_score == 43
    for name, answer in denied.items():
        assert answer.decision == pb.DECISION_DENY, name
        assert answer.reason_code == "approval_mismatch", name
    assert used.decision == pb.DECISION_ALLOW
    assert used.reason_code == "approval_granted"
    assert list(used.approval.reviewers) == ["carol"]
    assert used.approval.state == "used"
    assert second.decision == pb.DECISION_DENY
    assert second.reason_code == "approval_used"
    changes = daemon.daemon.metrics.registry.get_sample_value
    assert [
        changes("kynara_approval_changes_total", {"state": state})
        for state in ("pending", "approved", "used")
    ] == [1, 1, 1]


def test_asking_again_without_the_id_gets_the_approved_grant_over_grpc(daemon):
    # What an SDK whose wait timed out does: it asks again without the id.
    stub = daemon.stub()
    asked = stub.Decide(refund(), timeout=CALL_TIMEOUT)
    approve(daemon, asked.approval.id)

    again = stub.Decide(refund(), timeout=CALL_TIMEOUT)
    used = stub.Decide(refund(approval_id=again.approval.id), timeout=CALL_TIMEOUT)

    assert again.decision == pb.DECISION_REQUIRE_APPROVAL
    assert again.approval.id == asked.approval.id
    assert again.approval.state == "approved"
    assert list(again.approval.reviewers) == ["carol"]
    assert used.decision == pb.DECISION_ALLOW
    assert used.reason_code == "approval_granted"


def test_two_concurrent_retries_over_grpc_get_one_allow(daemon):
    stub = daemon.stub()
    asked = stub.Decide(refund(), timeout=CALL_TIMEOUT)
    approve(daemon, asked.approval.id)
    retry = refund(approval_id=asked.approval.id)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(
            pool.map(lambda _: stub.Decide(retry, timeout=CALL_TIMEOUT), range(2))
        )

    assert sorted(a.reason_code for a in answers) == [
        "approval_granted",
        "approval_used",
    ]


def test_decide_batch_uses_a_grant_once(daemon):
    stub = daemon.stub()
    asked = stub.Decide(refund(), timeout=CALL_TIMEOUT)
    approve(daemon, asked.approval.id)
    retry = refund(approval_id=asked.approval.id)

    reply = stub.DecideBatch(
        pb.DecideBatchRequest(items=[retry, retry]), timeout=CALL_TIMEOUT
    )

    assert [item.decision.reason_code for item in reply.items] == [
        "approval_granted",
        "approval_used",
    ]


def test_a_restart_keeps_pending_approvals_pending_listed_and_expiring(
    tmp_path, start_daemon, clock
):
    first = start_daemon()
    asked = first.stub().Decide(refund(), timeout=CALL_TIMEOUT)
    first.stop()

    second = start_daemon()
    book = second.daemon.pipeline.approvals
    listed = book.list(InboxQuery())
    retried = second.stub().Decide(refund(), timeout=CALL_TIMEOUT)
    clock.set("2026-12-07T10:00:00Z")
    second.loop.call_soon_threadsafe(book.wake)
    deadline = time.monotonic() + 10
    while book.get(asked.approval.id).state is ApprovalState.PENDING:
        assert time.monotonic() < deadline, "the approval did not expire"
        time.sleep(0.01)

    assert [a.id for a in listed] == [asked.approval.id]
    assert retried.approval.id == asked.approval.id
    assert book.get(asked.approval.id).state is ApprovalState.EXPIRED
    second.stop()
    assert verify_cli(tmp_path / "audit").returncode == 0


@pytest.mark.slow
def test_sigkill_after_the_allow_cannot_let_the_grant_be_used_twice(tmp_path):
    # Real time: the daemon processes read the system clock.
    config = daemon_config(tmp_path)
    opened = RunningDaemon(config, clock=time.time_ns)
    try:
        asked = opened.stub().Decide(refund(), timeout=CALL_TIMEOUT)
        approve(opened, asked.approval.id)
    finally:
        opened.stop()
    retry = refund(approval_id=asked.approval.id)
    socket, audit = tmp_path / "agent.sock", tmp_path / "audit"
    log_path = tmp_path / "daemon.log"

    killed = DaemonProcess(socket, audit, log_path)
    try:
        killed.wait_serving()
        used = killed.stub().Decide(retry, timeout=CALL_TIMEOUT)
        killed.kill()
    finally:
        killed.close()
    restarted = DaemonProcess(socket, audit, log_path)
    try:
        restarted.wait_serving()
        again = restarted.stub().Decide(retry, timeout=CALL_TIMEOUT)
        assert restarted.terminate() == 0
    finally:
        restarted.close()

    assert used.reason_code == "approval_granted"
    assert again.decision == pb.DECISION_DENY
    assert again.reason_code == "approval_used"
    checked = verify_cli(audit)
    assert checked.returncode == 0, checked.stdout + checked.stderr
