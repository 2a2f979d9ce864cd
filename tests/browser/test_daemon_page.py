"""The daemon's own review page, end to end, in headless Chromium.

A real daemon (shipped config and policies, LMDB in tmp_path, gRPC on a
Unix socket, HTTP on 127.0.0.1) answers a refund over the limit with
require_approval and a URL; the browser opens that URL, the reviewer signs
in with an admin credential that has the reviewer role, approves, and the
agent's retry with the approval id is allowed once.
"""

from __future__ import annotations

import json

import pytest
from kynara.v1 import decision_pb2 as pb
from support import small_refund
from test_review_browser import by, check_page, submit_and_wait

from kynara_sidecar.approvals.model import ApprovalState

pytestmark = pytest.mark.usefixtures("browser_tools")

CALL_TIMEOUT = 30
SECRETS = {
    "carol": "carol-reviewer-secret-0123456789",
    "alice": "alice-reviewer-secret-012345678",
}


@pytest.fixture
def reviewed_daemon(tmp_path, start_daemon):
    credentials = {}
    for name, secret in SECRETS.items():
        path = tmp_path / f"{name}.secret"
        path.write_text(secret)
        credentials[name] = {"secret_file": str(path), "roles": ["reviewer"]}
    return start_daemon(
        f"admin.socket={tmp_path / 'admin.sock'}",
        f"admin.credentials={json.dumps(credentials)}",
    )


def large_refund(approval_id: str = "") -> pb.DecideRequest:
    request = small_refund()
    request.resource.attributes["amount"].int_value = 60000
    request.approval_id = approval_id
    return request


def test_a_reviewer_approves_in_the_browser_and_the_retry_is_allowed_once(
    chromium, reviewed_daemon, axe, screenshot
):
    stub = reviewed_daemon.stub()
    asked = stub.Decide(large_refund(), timeout=CALL_TIMEOUT)
    assert asked.decision == pb.DECISION_REQUIRE_APPROVAL
    url = asked.approval.url

    chromium.get(url)
    assert "/approvals/login" in chromium.current_url
    check_page(chromium, axe, screenshot, "daemon-login")
    chromium.find_element(by("ID"), "token").send_keys(SECRETS["carol"])
    submit_and_wait(chromium, chromium.find_element(by("CSS_SELECTOR"), "form button"))

    assert chromium.current_url == url
    main = chromium.find_element(by("TAG_NAME"), "main").text
    assert "payments.refund.issue" in main
    assert "60000" in main
    assert "alice" in main
    check_page(chromium, axe, screenshot, "daemon-approval")
    chromium.find_element(by("ID"), "comment").send_keys("Customer verified.")
    approve = chromium.find_element(by("CSS_SELECTOR"), "button.approve")
    submit_and_wait(chromium, approve)

    notice = chromium.find_element(by("CSS_SELECTOR"), "[role=status]").text
    assert notice == "Your approval was recorded."
    check_page(chromium, axe, screenshot, "daemon-approved")
    used = stub.Decide(large_refund(asked.approval.id), timeout=CALL_TIMEOUT)
    again = stub.Decide(large_refund(asked.approval.id), timeout=CALL_TIMEOUT)
    assert used.decision == pb.DECISION_ALLOW
    assert used.reason_code == "approval_granted"
    assert list(used.approval.reviewers) == ["carol"]
    assert again.reason_code == "approval_used"
    book = reviewed_daemon.daemon.pipeline.approvals
    approval = book.get(asked.approval.id)
    assert approval.state is ApprovalState.USED
    assert approval.reviews[0].comment == "Customer verified."


def test_the_user_cannot_approve_their_own_refund_in_the_browser(
    chromium, reviewed_daemon
):
    stub = reviewed_daemon.stub()
    asked = stub.Decide(large_refund(), timeout=CALL_TIMEOUT)
    chromium.get(asked.approval.url)
    chromium.find_element(by("ID"), "token").send_keys(SECRETS["alice"])
    submit_and_wait(chromium, chromium.find_element(by("CSS_SELECTOR"), "form button"))

    approve = chromium.find_element(by("CSS_SELECTOR"), "button.approve")
    submit_and_wait(chromium, approve)

    alert = chromium.find_element(by("CSS_SELECTOR"), "[role=alert]").text
    assert alert.startswith("You may not review your own request")
    book = reviewed_daemon.daemon.pipeline.approvals
    assert book.get(asked.approval.id).state is ApprovalState.PENDING
