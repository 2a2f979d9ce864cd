"""ApprovalService over a real gRPC server on a Unix socket, reviewing an
in-memory inbox with the shared eligibility check; the same service over the
daemon's own book is tested at the end of the file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import grpc
import pytest
from identity_support import AUDIENCE, ISSUER, SigningKey, claims, jwks
from kynara.v1 import approval_pb2 as pb
from kynara.v1 import approval_pb2_grpc, decision_pb2
from service_support import LoopServer, MemoryInbox, make_approval, socket_path
from support import REPO_ROOT, SHIPPED_CONFIG, small_refund

from kynara_sidecar.approvals.eligibility import check_review
from kynara_sidecar.approvals.model import ApprovalState, Requirement, Reviewer
from kynara_sidecar.errors import RoleMissing
from kynara_sidecar.metrics import Metrics
from kynara_sidecar.server.approval_service import ApprovalService
from kynara_sidecar.server.reviewers import AdminReviewer, ReviewerAuth

SECRETS = {
    "carol": b"carol-reviewer-secret-0123456789",
    "erin": b"erin-reviewer-secret-01234567890",
    "alice": b"alice-reviewer-secret-0123456789",
    "ops": b"operator-only-secret-0123456789",
}
AGENT_SECRET = b"support-bot-agent-secret-012345"
ROLES = {
    "carol": {"reviewer", "finance_lead"},
    "erin": {"reviewer"},
    "alice": {"reviewer", "finance_lead"},
    "ops": {"operator"},
}


def bearer(name: str) -> tuple[tuple[str, str], ...]:
    secret = AGENT_SECRET if name == "agent" else SECRETS[name]
    return (("authorization", f"Bearer {secret.decode()}"),)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def inbox() -> MemoryInbox:
    return MemoryInbox(
        make_approval(1),
        make_approval(2, requirement=Requirement(approvers=2)),
        make_approval(3, requirement=Requirement(reviewer_roles=(("finance_lead",),))),
        make_approval(4, requirement=Requirement(allow_self_approval=True)),
        make_approval(5, agent="ops-bot", action="crm.contact.read", risk=90),
    )


@pytest.fixture
def stub(tmp_path, inbox, metrics):
    auth = ReviewerAuth(
        {
            name: AdminReviewer(
                secret,
                frozenset({"reviewer"} & ROLES[name] or {"operator"}),
                principal=name,
                reviewer_roles=frozenset(ROLES[name] - {"reviewer", "operator"}),
            )
            for name, secret in SECRETS.items()
        },
        agent_secrets={"support-bot": AGENT_SECRET},
        metrics=metrics,
    )
    service = ApprovalService(inbox, auth)
    server = LoopServer(socket_path(tmp_path, "admin.sock"), service)
    channel = grpc.insecure_channel(server.target)
    yield approval_pb2_grpc.ApprovalServiceStub(channel)
    channel.close()
    server.stop()


def refusal(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    metadata = dict(info.value.trailing_metadata() or ())
    return info.value.code(), metadata.get("kynara-error-code", "")


def approve(stub, approval: int, who: str, comment: str = "") -> pb.ApprovalDetail:
    return stub.Approve(
        pb.ReviewRequest(approval_id=f"apr_{approval:026d}", comment=comment),
        metadata=bearer(who),
    )


def test_the_agents_credentials_get_permission_denied_on_approve(stub, inbox, metrics):
    status, code = refusal(lambda: approve(stub, 1, "agent"))

    assert (status, code) == (grpc.StatusCode.PERMISSION_DENIED, "role_missing")
    assert inbox.reviews_seen == 0
    assert metrics.admin_refusals.labels("role_missing")._value.get() == 1


@pytest.mark.parametrize(
    ("metadata", "status", "code"),
    [
        ((), grpc.StatusCode.UNAUTHENTICATED, "identity_invalid"),
        (
            (("authorization", "Bearer not-a-secret-0123456789"),),
            grpc.StatusCode.UNAUTHENTICATED,
            "identity_invalid",
        ),
        (bearer("ops"), grpc.StatusCode.PERMISSION_DENIED, "role_missing"),
    ],
    ids=["none", "unknown", "operator"],
)
def test_only_reviewers_may_list(stub, metadata, status, code):
    assert refusal(
        lambda: stub.ListApprovals(pb.ListApprovalsRequest(), metadata=metadata)
    ) == (status, code)


def test_a_reviewer_approves_and_the_detail_says_who(stub):
    detail = approve(stub, 1, "carol", comment="customer verified")

    assert detail.state == "approved"
    assert [(r.reviewer, r.verdict, r.comment) for r in detail.reviews] == [
        ("carol", "approve", "customer verified")
    ]
    assert detail.resolved_at.seconds > 0


def test_self_approval_is_refused_by_default(stub, inbox, metrics):
    status, code = refusal(lambda: approve(stub, 1, "alice"))

    assert (status, code) == (grpc.StatusCode.PERMISSION_DENIED, "self_approval")
    assert inbox.get(f"apr_{1:026d}").state is ApprovalState.PENDING
    assert metrics.admin_refusals.labels("self_approval")._value.get() == 1


def test_self_approval_is_allowed_when_the_rule_says_so(stub):
    assert approve(stub, 4, "alice").state == "approved"


def test_a_two_approver_rule_needs_two_distinct_reviewers(stub):
    first = approve(stub, 2, "carol")
    status, code = refusal(lambda: approve(stub, 2, "carol"))
    second = approve(stub, 2, "erin")

    assert (first.state, first.approvals_needed) == ("pending", 2)
    assert (status, code) == (grpc.StatusCode.FAILED_PRECONDITION, "approval_closed")
    assert second.state == "approved"
    assert [r.reviewer for r in second.reviews] == ["carol", "erin"]


def test_a_reviewer_role_rule_refuses_a_reviewer_without_it(stub):
    status, code = refusal(lambda: approve(stub, 3, "erin"))

    assert (status, code) == (grpc.StatusCode.PERMISSION_DENIED, "role_missing")
    assert approve(stub, 3, "carol").state == "approved"


def test_a_reviewer_without_a_required_role_is_told_which_roles_would_do():
    approval = make_approval(
        3, requirement=Requirement(reviewer_roles=(("finance_lead", "treasury"),))
    )
    erin = Reviewer(id="erin", roles=frozenset({"reviewer", "support_lead"}))

    with pytest.raises(RoleMissing) as refused:
        check_review(approval, erin)

    message = str(refused.value)
    # The reviewer role itself is no reviewer role a rule can require.
    assert "'erin' holds reviewer roles [support_lead]." in message
    assert "Any one of finance_lead or treasury would do" in message
    assert "admin.credentials.<name>.reviewer_roles" in message


def test_a_reject_rejects_at_once_even_with_two_approvers(stub):
    detail = stub.Reject(
        pb.ReviewRequest(approval_id=f"apr_{2:026d}", comment="wrong customer"),
        metadata=bearer("erin"),
    )

    assert detail.state == "rejected"
    assert refusal(lambda: approve(stub, 2, "carol")) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "approval_closed",
    )


def test_an_unknown_approval_is_not_found(stub):
    assert refusal(
        lambda: stub.GetApproval(
            pb.GetApprovalRequest(approval_id="apr_unknown"), metadata=bearer("erin")
        )
    ) == (grpc.StatusCode.NOT_FOUND, "not_found")
    assert refusal(lambda: approve(stub, 99, "erin")) == (
        grpc.StatusCode.NOT_FOUND,
        "not_found",
    )


def test_a_comment_too_long_is_an_invalid_request(stub):
    assert refusal(lambda: approve(stub, 1, "carol", comment="x" * 2001)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_request",
    )


def test_get_shows_the_request_the_rules_and_the_requirement(stub):
    detail = stub.GetApproval(
        pb.GetApprovalRequest(approval_id=f"apr_{3:026d}"), metadata=bearer("erin")
    )

    assert detail.agent_id == "support-bot"
    assert [p.id for p in detail.chain] == ["alice", "support-bot"]
    assert detail.attributes_json == '{"amount":60003}'
    assert list(detail.reviewer_roles) == ["finance_lead"]
    assert detail.binding_digest.startswith("sha256:")
    assert detail.expires_at.seconds - detail.created_at.seconds == 3600


def test_list_pages_newest_first_with_the_last_id_as_token(stub):
    def page(token: str = "") -> pb.ListApprovalsResponse:
        return stub.ListApprovals(
            pb.ListApprovalsRequest(page_size=2, page_token=token),
            metadata=bearer("erin"),
        )

    first = page()
    second = page(first.next_page_token)
    third = page(second.next_page_token)

    ids = [a.id for p in (first, second, third) for a in p.approvals]
    assert ids == [f"apr_{n:026d}" for n in (5, 4, 3, 2, 1)]
    assert first.next_page_token == f"apr_{4:026d}"
    assert third.next_page_token == ""


@pytest.mark.parametrize(
    ("request_", "numbers"),
    [
        (pb.ListApprovalsRequest(agent_id="ops-bot"), [5]),
        (pb.ListApprovalsRequest(action="payments.refund.issue"), [4, 3, 2, 1]),
        (pb.ListApprovalsRequest(min_risk=50), [5]),
        (pb.ListApprovalsRequest(state="approved"), []),
        (pb.ListApprovalsRequest(state="all"), [5, 4, 3, 2, 1]),
    ],
    ids=["agent", "action", "risk", "approved", "all"],
)
def test_list_filters(stub, request_, numbers):
    found = stub.ListApprovals(request_, metadata=bearer("erin"))

    assert [a.id for a in found.approvals] == [f"apr_{n:026d}" for n in numbers]


@pytest.mark.parametrize(
    "request_",
    [pb.ListApprovalsRequest(state="open"), pb.ListApprovalsRequest(page_size=501)],
    ids=["state", "page_size"],
)
def test_a_bad_list_request_names_its_field(stub, request_):
    assert refusal(lambda: stub.ListApprovals(request_, metadata=bearer("erin"))) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_request",
    )


# ------------------------------------------------- over a daemon's own book


def large_refund(amount: int = 60000, **fields) -> decision_pb2.DecideRequest:
    request = small_refund()
    request.resource.attributes["amount"].int_value = amount
    if fields.pop("verified", False):
        del request.asserted_chain[:]
    for key, value in fields.items():
        setattr(request, key, value)
    return request


@pytest.fixture
def admin_daemon(tmp_path, start_daemon):
    credentials = {}
    for name in ("carol", "alice", "ops"):
        path = tmp_path / f"{name}.secret"
        path.write_bytes(SECRETS[name])
        roles = ["operator"] if name == "ops" else ["reviewer"]
        credentials[name] = {"secret_file": str(path), "roles": roles}
    running = start_daemon(
        f"admin.socket={socket_path(tmp_path, 'admin.sock')}",
        f"admin.credentials={json.dumps(credentials)}",
    )
    channel = grpc.insecure_channel(f"unix://{running.config.admin.socket}")
    running.approvals = approval_pb2_grpc.ApprovalServiceStub(channel)
    yield running
    channel.close()


def test_a_daemon_serves_its_book_to_reviewers(admin_daemon):
    agent = admin_daemon.stub()
    asked = agent.Decide(large_refund())
    assert asked.decision == decision_pb2.DECISION_REQUIRE_APPROVAL
    approval_id = asked.approval.id
    stub = admin_daemon.approvals

    listed = stub.ListApprovals(pb.ListApprovalsRequest(), metadata=bearer("carol"))
    self_approval = refusal(
        lambda: stub.Approve(
            pb.ReviewRequest(approval_id=approval_id), metadata=bearer("alice")
        )
    )
    operator = refusal(
        lambda: stub.Approve(
            pb.ReviewRequest(approval_id=approval_id), metadata=bearer("ops")
        )
    )
    approved = stub.Approve(
        pb.ReviewRequest(approval_id=approval_id, comment="ok"),
        metadata=bearer("carol"),
    )
    granted = agent.Decide(large_refund(approval_id=approval_id))
    again = agent.Decide(large_refund(approval_id=approval_id))

    assert [a.id for a in listed.approvals] == [approval_id]
    assert listed.approvals[0].decision_id == asked.decision_id
    assert self_approval == (grpc.StatusCode.PERMISSION_DENIED, "self_approval")
    assert operator == (grpc.StatusCode.PERMISSION_DENIED, "role_missing")
    assert approved.state == "approved"
    assert (granted.decision, granted.reason_code) == (
        decision_pb2.DECISION_ALLOW,
        "approval_granted",
    )
    assert list(granted.approval.reviewers) == ["carol"]
    assert (again.decision, again.reason_code) == (
        decision_pb2.DECISION_DENY,
        "approval_used",
    )
    detail = stub.GetApproval(
        pb.GetApprovalRequest(approval_id=approval_id), metadata=bearer("carol")
    )
    assert (detail.state, detail.used_by_decision_id) == ("used", granted.decision_id)
    refused = admin_daemon.daemon.metrics.admin_refusals
    assert refused.labels("self_approval")._value.get() == 1


def test_with_reviewer_jwts_alone_the_admin_listener_serves_reviewers(
    tmp_path, start_daemon
):
    idp = SigningKey("ES256", "idp")
    secret = tmp_path / "support-bot.secret"
    secret.write_bytes(AGENT_SECRET)
    issuer = {"issuer": ISSUER, "jwks": jwks(idp), "algorithms": ["ES256"]}
    running = start_daemon(
        f"admin.socket={socket_path(tmp_path, 'admin.sock')}",
        "identity.mode=verified",
        "identity.agent_id=",
        f"identity.agents={json.dumps({'support-bot': str(secret)})}",
        f"identity.issuers={json.dumps([{**issuer, 'audience': AUDIENCE}])}",
        "approvals.reviewer_issuers="
        + json.dumps([{**issuer, "audience": "kynara:reviewers"}]),
    )
    delegation = idp.sign(claims("alice", "support-bot"))
    reviewer = idp.sign(claims("dana", aud="kynara:reviewers", roles=["reviewer"]))
    agent_call = (("authorization", f"Bearer {AGENT_SECRET.decode()}"),)
    asked = running.stub().Decide(
        large_refund(delegation_token=delegation, verified=True),
        metadata=agent_call,
    )
    review = pb.ReviewRequest(approval_id=asked.approval.id)

    with grpc.insecure_channel(f"unix://{running.config.admin.socket}") as channel:
        stub = approval_pb2_grpc.ApprovalServiceStub(channel)
        by_secret = refusal(lambda: stub.Approve(review, metadata=agent_call))
        by_token = refusal(
            lambda: stub.Approve(
                review, metadata=(("authorization", f"Bearer {delegation}"),)
            )
        )
        approved = stub.Approve(
            review, metadata=(("authorization", f"Bearer {reviewer}"),)
        )

    assert asked.decision == decision_pb2.DECISION_REQUIRE_APPROVAL
    assert by_secret == (grpc.StatusCode.PERMISSION_DENIED, "role_missing")
    assert by_token == (grpc.StatusCode.PERMISSION_DENIED, "role_missing")
    assert (approved.state, [r.reviewer for r in approved.reviews]) == (
        "approved",
        ["dana"],
    )


def cli(*args: str, token: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "KYNARA_ADMIN_SECRET": token}
    return subprocess.run(
        [sys.executable, "-m", "kynara_sidecar.cli", "approvals", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env=env,
    )


def test_the_cli_lists_shows_and_approves_as_a_reviewer(admin_daemon, tmp_path):
    asked = admin_daemon.stub().Decide(large_refund())
    approval_id = asked.approval.id
    where = ["--config", str(SHIPPED_CONFIG)]
    where += ["--set", f"admin.socket={admin_daemon.config.admin.socket}"]
    carol = tmp_path / "carol.token"
    carol.write_bytes(SECRETS["carol"])

    listed = cli("list", *where, token=SECRETS["carol"].decode())
    shown = cli("show", approval_id, *where, "--credential-file", str(carol))
    by_operator = cli("approve", approval_id, *where, token=SECRETS["ops"].decode())
    approved = cli(
        "approve",
        approval_id,
        *where,
        "--comment",
        "ok",
        token=SECRETS["carol"].decode(),
    )
    without = cli("list", *where)

    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()
    assert header.split()[:3] == ["ID", "STATE", "RISK"]
    assert row.split()[:2] == [approval_id, "pending"]
    assert json.loads(shown.stdout)["decision_id"] == asked.decision_id
    assert by_operator.returncode == 1
    assert "PERMISSION_DENIED [role_missing]" in by_operator.stderr
    assert approved.returncode == 0, approved.stderr
    assert json.loads(approved.stdout)["state"] == "approved"
    assert json.loads(approved.stdout)["reviews"][0]["comment"] == "ok"
    assert without.returncode == 2
    assert "KYNARA_ADMIN_SECRET" in without.stderr


def test_the_cli_shows_the_request_as_json_and_the_rejections_before_it(
    admin_daemon, tmp_path
):
    agent = admin_daemon.stub()
    first = agent.Decide(large_refund()).approval.id
    where = ["--config", str(SHIPPED_CONFIG)]
    where += ["--set", f"admin.socket={admin_daemon.config.admin.socket}"]
    carol = SECRETS["carol"].decode()
    rejected = cli("reject", first, *where, "--comment", "not today", token=carol)
    again = agent.Decide(large_refund()).approval.id

    shown = cli("show", again, *where, token=carol)

    assert rejected.returncode == 0, rejected.stderr
    assert again != first
    document = json.loads(shown.stdout)
    assert "attributes_json" not in document
    assert document["attributes"] == {"amount": {"int": "60000"}}
    assert isinstance(document["context"], dict)
    (before,) = document["previous"]
    assert (before["id"], before["state"]) == (first, "rejected")
    assert (before["reviewer"], before["comment"]) == ("carol", "not today")
    # The same approval prints the same way: keys sorted at every level.
    assert shown.stdout == json.dumps(document, indent=2, sort_keys=True) + "\n"


# Terminal escapes (ESC, BEL, CR, backspace) and the characters that hide or
# reorder text (a right-to-left override, zero-width space, NUL).
RAW_TERMINAL = ("\x1b", "\x07", "\r", "\x08", "\x00", "\u202e", "\u200b")


def test_the_cli_prints_an_agents_hidden_characters_escaped(admin_daemon, tmp_path):
    resource_id = "rf_1\x1b[2J\x1b]0;owned\x07\r\x08\x00\u202eexe.pdf\u200b"
    request = large_refund()
    request.resource.id = resource_id
    asked = admin_daemon.stub().Decide(request)
    where = ["--config", str(SHIPPED_CONFIG)]
    where += ["--set", f"admin.socket={admin_daemon.config.admin.socket}"]
    carol = SECRETS["carol"].decode()

    listed = cli("list", *where, token=carol)
    shown = cli("show", asked.approval.id, *where, token=carol)
    listed_json = cli("list", "--json", *where, token=carol)

    assert asked.decision == decision_pb2.DECISION_REQUIRE_APPROVAL
    for run in (listed, shown, listed_json):
        assert run.returncode == 0, run.stderr
        assert [c for c in RAW_TERMINAL if c in run.stdout + run.stderr] == []
    (row,) = listed.stdout.splitlines()[1:]
    assert (
        "payments.refund/rf_1\\u001B[2J\\u001B]0;owned\\u0007\\u000D\\u0008"
        "\\u0000\\u202Eexe.pdf\\u200B"
    ) in row
    assert json.loads(shown.stdout)["resource_id"] == resource_id
