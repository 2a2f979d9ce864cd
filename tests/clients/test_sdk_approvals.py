"""Waiting on approvals from the SDK: ``wait_approval``, retrying with the
grant, and ``@permission_required(on_approval="wait")``.

The first part talks to a scripted daemon (a real gRPC server on a Unix
socket whose WaitApproval streams what the test scripts); the second to a
real daemon with its approval book, a reviewer approving over the admin
listener.
"""

from __future__ import annotations

import asyncio
import pickle
import threading

import grpc
import kynara_sdk
import pytest
from google.protobuf import timestamp_pb2
from kynara.v1 import decision_pb2
from kynara_sdk import (
    APPROVAL_EXPIRED,
    APPROVAL_REJECTED,
    APPROVAL_TIMEOUT,
    APPROVAL_USED,
    ApprovalError,
    ApprovalExpired,
    ApprovalRejected,
    ApprovalRequired,
    ApprovalTimeout,
    AsyncClient,
    Client,
    KynaraError,
    PermissionDenied,
    acting_for,
    permission_required,
)
from sdk_scripted import HANG, Abort, ScriptedDaemon, ScriptedServicer, answer

APPROVAL_ID = "apr_" + "a" * 26
PENDING = answer(
    "require_approval",
    "dec-asked",
    reason_code="approval_required",
    approval=decision_pb2.Approval(
        id=APPROVAL_ID,
        url=f"http://127.0.0.1:8080/approvals/{APPROVAL_ID}",
        expires_at=timestamp_pb2.Timestamp(seconds=1782889200),
        state="pending",
        risk_score=42,
    ),
)
GRANTED = answer(
    "allow",
    "dec-granted",
    reason_code="approval_granted",
    approval=decision_pb2.Approval(id=APPROVAL_ID, state="used", reviewers=["carol"]),
)


def update(state: str, **fields) -> decision_pb2.ApprovalUpdate:
    return decision_pb2.ApprovalUpdate(
        approval_id=APPROVAL_ID, state=state, approvals_needed=1, **fields
    )


class WaitingServicer(ScriptedServicer):
    """Also streams WaitApproval: the scripted updates, then HANG (never
    another) or the end of the stream."""

    def __init__(self) -> None:
        super().__init__()
        self.updates: list = []
        self.waits: list[decision_pb2.WaitApprovalRequest] = []
        self.wait_metadata: list[dict] = []
        self.wait_abort: Abort | None = None
        self.cancelled = 0

    async def WaitApproval(self, request, context):
        self.waits.append(request)
        self.wait_metadata.append(dict(context.invocation_metadata()))
        if self.wait_abort is not None:
            abort = self.wait_abort
            await context.abort(abort.status, abort.details, abort.metadata())
        try:
            for item in self.updates:
                if item is HANG:
                    await asyncio.Event().wait()
                yield item
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


@pytest.fixture
def daemon(socket_dir):
    scripted = ScriptedDaemon(socket_dir / "kynara.sock")
    scripted.servicer = WaitingServicer()
    scripted.start()
    yield scripted
    scripted.stop()


@pytest.fixture
def servicer(daemon) -> WaitingServicer:
    return daemon.servicer


def test_decide_sends_the_approval_id_of_a_retry(client, daemon):
    daemon.then(GRANTED)

    decision = client.decide(
        "payments.refund.issue",
        resource_kind="payments.refund",
        resource_id="rf_1",
        user="alice",
        approval_id=APPROVAL_ID,
    )

    assert daemon.requests[-1].approval_id == APPROVAL_ID
    assert decision.reason_code == "approval_granted"
    assert decision.approval.state == "used"
    assert decision.approval.reviewers == ("carol",)


def test_a_require_approval_answer_carries_the_risk_score(client, daemon):
    daemon.then(PENDING)

    decision = client.decide("a.b", resource_kind="k.k", user="alice")

    assert (decision.approval.state, decision.approval.risk_score) == ("pending", 42)


def test_wait_returns_the_approved_state(client, servicer):
    servicer.updates = [
        update("pending"),
        update("approved", approvals=1, reviewers=["carol"]),
    ]

    approved = client.wait_approval(APPROVAL_ID, 5.0)

    assert (approved.state, approved.reviewers) == ("approved", ("carol",))
    assert servicer.waits[0].approval_id == APPROVAL_ID


@pytest.mark.parametrize(
    ("final", "error", "code"),
    [
        (
            update("rejected", comment="wrong customer"),
            ApprovalRejected,
            APPROVAL_REJECTED,
        ),
        (update("expired"), ApprovalExpired, APPROVAL_EXPIRED),
        (update("used"), ApprovalError, APPROVAL_USED),
    ],
    ids=["rejected", "expired", "used"],
)
def test_a_wait_ending_without_a_grant_raises_its_code(
    client, servicer, final, error, code
):
    servicer.updates = [update("pending"), final]

    with pytest.raises(error) as info:
        client.wait_approval(APPROVAL_ID, 5.0, decision_id="dec-asked")

    assert info.value.code == code
    assert (info.value.approval_id, info.value.decision_id) == (
        APPROVAL_ID,
        "dec-asked",
    )
    assert info.value.update.state == final.state


def test_a_rejection_carries_the_reviewers_comment(client, servicer):
    servicer.updates = [update("rejected", comment="wrong customer")]

    with pytest.raises(ApprovalRejected) as info:
        client.wait_approval(APPROVAL_ID, 5.0)

    assert "wrong customer" in str(info.value)
    assert info.value.update.comment == "wrong customer"


def test_a_timeout_is_not_a_rejection(client, servicer):
    servicer.updates = [update("pending"), HANG]

    with pytest.raises(ApprovalTimeout) as info:
        client.wait_approval(APPROVAL_ID, 0.3, decision_id="dec-asked")

    assert info.value.code == APPROVAL_TIMEOUT
    assert not isinstance(info.value, ApprovalRejected | PermissionDenied)
    assert info.value.update.state == "pending"
    assert info.value.decision_id == "dec-asked"


def test_approval_errors_pickle(client, servicer):
    servicer.updates = [update("rejected", comment="no")]
    with pytest.raises(ApprovalRejected) as info:
        client.wait_approval(APPROVAL_ID, 5.0, decision_id="dec-asked")

    copy = pickle.loads(pickle.dumps(info.value))

    assert (type(copy), copy.code, copy.decision_id) == (
        ApprovalRejected,
        APPROVAL_REJECTED,
        "dec-asked",
    )
    assert str(copy) == str(info.value)


def test_an_unknown_approval_is_the_daemons_not_found(client, servicer):
    servicer.wait_abort = Abort(
        grpc.StatusCode.NOT_FOUND, "no approval", "not_found", "approval_id"
    )

    with pytest.raises(KynaraError) as info:
        client.wait_approval(APPROVAL_ID, 5.0)

    assert (info.value.code, info.value.field) == ("not_found", "approval_id")


def test_a_refused_wait_carries_the_approval_id(client, servicer):
    servicer.wait_abort = Abort(
        grpc.StatusCode.NOT_FOUND, "no approval", "not_found", "approval_id"
    )

    with pytest.raises(ApprovalError) as info:
        client.wait_approval(APPROVAL_ID, 5.0, decision_id="dec-asked")
    copy = pickle.loads(pickle.dumps(info.value))

    assert (info.value.approval_id, info.value.decision_id) == (
        APPROVAL_ID,
        "dec-asked",
    )
    assert APPROVAL_ID in str(info.value)
    assert (type(copy), copy.code, copy.field, copy.approval_id) == (
        ApprovalError,
        "not_found",
        "approval_id",
        APPROVAL_ID,
    )
    assert str(copy) == str(info.value)


def test_an_async_refused_wait_carries_the_approval_id(daemon, servicer):
    servicer.wait_abort = Abort(
        grpc.StatusCode.NOT_FOUND, "no approval", "not_found", "approval_id"
    )

    async def wait() -> None:
        async with AsyncClient(daemon.target) as client:
            await client.wait_approval(APPROVAL_ID, 5.0)

    with pytest.raises(ApprovalError) as info:
        asyncio.run(wait())

    assert (info.value.code, info.value.approval_id) == ("not_found", APPROVAL_ID)


def test_a_stream_ending_before_a_final_state_is_no_answer(client, servicer):
    servicer.updates = [update("pending")]

    with pytest.raises(kynara_sdk.KynaraUnavailable):
        client.wait_approval(APPROVAL_ID, 5.0)


@pytest.mark.parametrize("timeout", [0, -1, "5", True])
def test_wait_needs_a_positive_timeout(client, timeout):
    with pytest.raises((TypeError, ValueError), match="timeout"):
        client.wait_approval(APPROVAL_ID, timeout)


def test_the_agent_secret_travels_with_the_wait(daemon, servicer, tmp_path):
    secret = tmp_path / "agent.secret"
    secret.write_text("support-bot-secret-0123456789\n")
    servicer.updates = [update("approved")]

    with Client(daemon.target, secret_file=str(secret)) as client:
        client.wait_approval(APPROVAL_ID, 5.0)

    assert servicer.wait_metadata[0]["authorization"] == (
        "Bearer support-bot-secret-0123456789"
    )


# ------------------------------------------------------------------ decorator


class Refunds:
    """A refund tool in wait mode (sync and async), counting its runs."""

    def __init__(self, target: str, timeout: float = 5.0) -> None:
        self.ran: list[tuple[str, int]] = []
        self.client = Client(target)
        self.async_client = AsyncClient(target)

        @permission_required(
            "payments.refund.issue",
            resource_kind="payments.refund",
            resource_arg="refund_id",
            attrs=["amount"],
            client=self.client,
            on_approval="wait",
            approval_timeout=timeout,
        )
        def issue(refund_id: str, amount: int) -> str:
            self.ran.append((refund_id, amount))
            return kynara_sdk.current_decision().decision_id

        @permission_required(
            "payments.refund.issue",
            resource_kind="payments.refund",
            resource_arg="refund_id",
            attrs=["amount"],
            client=self.async_client,
            on_approval="wait",
            approval_timeout=timeout,
        )
        async def issue_async(refund_id: str, amount: int) -> str:
            self.ran.append((refund_id, amount))
            return kynara_sdk.current_decision().decision_id

        self.issue = issue
        self.issue_async = issue_async

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def refunds(daemon):
    tools = Refunds(daemon.target)
    yield tools
    tools.close()


def test_wait_mode_runs_the_body_once_on_the_grant(refunds, daemon, servicer):
    daemon.then(PENDING, GRANTED)
    servicer.updates = [update("pending"), update("approved", approvals=1)]

    with acting_for(user="alice"):
        decision_id = refunds.issue("rf_1", 60000)

    assert refunds.ran == [("rf_1", 60000)]
    assert decision_id == "dec-granted"
    first, retry = daemon.requests
    assert (first.approval_id, retry.approval_id) == ("", APPROVAL_ID)
    # The retry is the same request: the grant is bound to it.
    first.approval_id = APPROVAL_ID
    assert first == retry


def test_wait_mode_works_for_async_tools(refunds, daemon, servicer):
    daemon.then(PENDING, GRANTED)
    servicer.updates = [update("approved", approvals=1)]

    async def run() -> str:
        with acting_for(user="alice"):
            return await refunds.issue_async("rf_1", 60000)

    assert asyncio.run(run()) == "dec-granted"
    assert refunds.ran == [("rf_1", 60000)]
    assert daemon.requests[-1].approval_id == APPROVAL_ID


def test_a_wait_timing_out_raises_and_leaves_the_body_unrun(
    daemon, servicer, socket_dir
):
    tools = Refunds(daemon.target, timeout=0.3)
    daemon.then(PENDING)
    servicer.updates = [update("pending"), HANG]

    with acting_for(user="alice"), pytest.raises(ApprovalTimeout) as info:
        tools.issue("rf_1", 60000)
    tools.close()

    assert tools.ran == []
    assert len(daemon.requests) == 1  # no retry without a grant
    assert (info.value.decision_id, info.value.approval_id) == (
        "dec-asked",
        APPROVAL_ID,
    )


def test_a_rejected_wait_raises_and_leaves_the_body_unrun(refunds, daemon, servicer):
    daemon.then(PENDING)
    servicer.updates = [update("rejected", comment="no")]

    with acting_for(user="alice"), pytest.raises(ApprovalRejected):
        refunds.issue("rf_1", 60000)

    assert refunds.ran == []


def test_a_grant_used_elsewhere_is_a_deny(refunds, daemon, servicer):
    used = answer("deny", "dec-used", reason_code="approval_used")
    daemon.then(PENDING, used)
    servicer.updates = [update("approved")]

    with acting_for(user="alice"), pytest.raises(PermissionDenied) as info:
        refunds.issue("rf_1", 60000)

    assert (info.value.reason_code, info.value.decision_id) == (
        "approval_used",
        "dec-used",
    )
    assert refunds.ran == []


def test_raise_mode_stays_the_default(client, daemon, servicer):
    daemon.then(PENDING)

    @permission_required("a.b", resource_kind="k.k", client=client)
    def tool() -> None:
        raise AssertionError("the body must not run")

    with acting_for(user="alice"), pytest.raises(ApprovalRequired) as info:
        tool()

    assert info.value.approval_id == APPROVAL_ID
    assert servicer.waits == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"on_approval": "poll"}, "on_approval"),
        ({"on_approval": "wait", "approval_timeout": 0}, "approval_timeout"),
    ],
)
def test_bad_approval_settings_are_refused_at_decoration(kwargs, message):
    with pytest.raises(ValueError, match=message):
        permission_required("a.b", resource_kind="k.k", **kwargs)


def test_on_wait_is_told_of_the_approval_once_before_the_wait(client, daemon, servicer):
    daemon.then(PENDING, GRANTED)
    servicer.updates = [update("approved", approvals=1)]
    told: list[tuple[str, str, int]] = []

    def announce(asked) -> None:
        told.append((asked.decision_id, asked.approval.url, len(servicer.waits)))

    @permission_required(
        "a.b", resource_kind="k.k", client=client, on_approval="wait", on_wait=announce
    )
    def tool() -> str:
        return "ran"

    with acting_for(user="alice"):
        ran = tool()

    assert ran == "ran"
    assert told == [("dec-asked", f"http://127.0.0.1:8080/approvals/{APPROVAL_ID}", 0)]
    assert len(servicer.waits) == 1


# The daemon's answer to a request whose approval was approved meanwhile (a
# wait that timed out, then a reviewer approved): require_approval citing it.
ALREADY_APPROVED = answer(
    "require_approval",
    "dec-asked-again",
    reason_code="approval_required",
    approval=decision_pb2.Approval(
        id=APPROVAL_ID,
        url=f"http://127.0.0.1:8080/approvals/{APPROVAL_ID}",
        state="approved",
        reviewers=["carol"],
    ),
)


@pytest.mark.parametrize("mode", ["wait", "raise"])
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_an_approved_answer_is_retried_at_once_without_on_wait_or_a_wait(
    client, daemon, servicer, kind, mode
):
    # In either mode: an agent told to call again once approved just does.
    daemon.then(ALREADY_APPROVED, GRANTED)
    told: list[str] = []

    def announce(asked) -> None:
        told.append(asked.decision_id)

    wait = dict(on_approval="wait", on_wait=announce) if mode == "wait" else {}
    if kind == "sync":

        @permission_required("a.b", resource_kind="k.k", client=client, **wait)
        def tool() -> str:
            return kynara_sdk.current_decision().decision_id

        with acting_for(user="alice"):
            ran = tool()
    else:
        async_client = AsyncClient(daemon.target)

        @permission_required("a.b", resource_kind="k.k", client=async_client, **wait)
        async def async_tool() -> str:
            return kynara_sdk.current_decision().decision_id

        async def run() -> str:
            with acting_for(user="alice"):
                return await async_tool()

        ran = asyncio.run(run())

    assert ran == "dec-granted"
    assert told == []
    assert servicer.waits == []
    assert [r.approval_id for r in daemon.requests] == ["", APPROVAL_ID]


def test_on_wait_may_be_a_coroutine_for_an_async_tool(daemon, servicer):
    daemon.then(PENDING, GRANTED)
    servicer.updates = [update("approved", approvals=1)]
    told: list[str] = []

    async def announce(asked) -> None:
        told.append(asked.approval.id)

    async def run() -> str:
        async with AsyncClient(daemon.target) as client:

            @permission_required(
                "a.b",
                resource_kind="k.k",
                client=client,
                on_approval="wait",
                on_wait=announce,
            )
            async def tool() -> str:
                return "ran"

            with acting_for(user="alice"):
                return await tool()

    assert asyncio.run(run()) == "ran"
    assert told == [APPROVAL_ID]


def test_an_on_wait_that_raises_leaves_the_body_unrun(client, daemon, servicer):
    daemon.then(PENDING)

    def announce(asked) -> None:
        raise RuntimeError("no reviewer reachable")

    @permission_required(
        "a.b", resource_kind="k.k", client=client, on_approval="wait", on_wait=announce
    )
    def tool() -> None:
        raise AssertionError("the body must not run")

    with acting_for(user="alice"), pytest.raises(RuntimeError, match="no reviewer"):
        tool()

    assert servicer.waits == []


def test_on_wait_needs_wait_mode_and_a_callable():
    with pytest.raises(ValueError, match="on_wait: expected on_approval='wait'"):
        permission_required("a.b", resource_kind="k.k", on_wait=print)
    with pytest.raises(TypeError, match="on_wait: expected a callable"):
        permission_required(
            "a.b", resource_kind="k.k", on_approval="wait", on_wait="print"
        )


# ------------------------------------------------------- against a real daemon

REVIEWER_SECRET = "carol-reviewer-secret-0123456789"


@pytest.fixture
def real(tmp_path, start_daemon):
    """A daemon with its approval book, and carol reviewing on its admin
    listener; yields (running daemon, ApprovalService stub)."""
    import json

    from kynara.v1 import approval_pb2_grpc

    secret = tmp_path / "carol.secret"
    secret.write_text(REVIEWER_SECRET)
    credentials = {"carol": {"secret_file": str(secret), "roles": ["reviewer"]}}
    running = start_daemon(
        f"admin.socket={tmp_path / 'admin.sock'}",
        f"admin.credentials={json.dumps(credentials)}",
    )
    channel = grpc.insecure_channel(f"unix://{running.config.admin.socket}")
    yield running, approval_pb2_grpc.ApprovalServiceStub(channel)
    channel.close()


def as_carol():
    return (("authorization", f"Bearer {REVIEWER_SECRET}"),)


def carol_approves(admin, approval_id: str):
    from kynara.v1 import approval_pb2

    return admin.Approve(
        approval_pb2.ReviewRequest(approval_id=approval_id), metadata=as_carol()
    )


def first_pending(admin) -> str:
    """Wait until an approval is pending; return its id."""
    from kynara.v1 import approval_pb2

    while True:
        listed = admin.ListApprovals(
            approval_pb2.ListApprovalsRequest(), metadata=as_carol()
        )
        if listed.approvals:
            return listed.approvals[0].id


def refund_tool(client: Client, ran: list, timeout: float):
    @permission_required(
        "payments.refund.issue",
        resource_kind="payments.refund",
        resource_arg="refund_id",
        attrs=["amount"],
        client=client,
        on_approval="wait",
        approval_timeout=timeout,
    )
    def issue(refund_id: str, amount: int) -> kynara_sdk.Decision:
        ran.append(refund_id)
        return kynara_sdk.current_decision()

    return issue


def test_timeout_is_not_rejection_and_the_grant_still_works(real):
    from kynara.v1 import approval_pb2

    running, admin = real
    ran: list[str] = []
    with Client(running.target) as client:
        issue = refund_tool(client, ran, timeout=0.5)

        with acting_for(user="alice"), pytest.raises(ApprovalTimeout) as info:
            issue("rf_9", 60000)
        pending = admin.GetApproval(
            approval_pb2.GetApprovalRequest(approval_id=info.value.approval_id),
            metadata=as_carol(),
        )
        carol_approves(admin, info.value.approval_id)
        approved = client.wait_approval(info.value.approval_id, 5.0)
        granted = client.decide(
            "payments.refund.issue",
            resource_kind="payments.refund",
            resource_id="rf_9",
            attributes={"amount": 60000},
            user="alice",
            approval_id=info.value.approval_id,
        )

    assert ran == []
    assert info.value.decision_id == pending.decision_id
    assert pending.state == "pending"
    assert approved.state == "approved"
    assert (granted.decision, granted.reason_code) == ("allow", "approval_granted")


def test_after_a_timeout_calling_the_tool_again_uses_the_grant(real):
    # The daemon answers the same request with its approved approval, so the
    # tool's next call picks up the grant: no second review, one run.
    running, admin = real
    ran: list[str] = []
    with Client(running.target) as client:
        issue = refund_tool(client, ran, timeout=0.5)
        with acting_for(user="alice"), pytest.raises(ApprovalTimeout) as info:
            issue("rf_8", 60000)
        carol_approves(admin, info.value.approval_id)

        with acting_for(user="alice"):
            decision = issue("rf_8", 60000)
            with pytest.raises(ApprovalTimeout) as again:
                issue("rf_8", 60000)

    assert ran == ["rf_8"]
    assert (decision.decision, decision.reason_code) == ("allow", "approval_granted")
    assert decision.approval.id == info.value.approval_id
    # Used once: the next call opens a new approval and waits for it.
    assert again.value.approval_id != info.value.approval_id


def test_wait_mode_runs_the_body_exactly_once_when_a_reviewer_approves(real):
    from kynara.v1 import approval_pb2

    running, admin = real
    ran: list[str] = []
    outcome: list = []
    with Client(running.target) as client:
        issue = refund_tool(client, ran, timeout=60)

        def agent() -> None:
            with acting_for(user="alice"):
                try:
                    outcome.append(issue("rf_7", 70000))
                except Exception as err:  # reported by the assertion below
                    outcome.append(err)

        thread = threading.Thread(target=agent)
        thread.start()
        approval_id = first_pending(admin)
        carol_approves(admin, approval_id)
        thread.join(60)

    (decision,) = outcome
    assert ran == ["rf_7"]
    assert (decision.decision, decision.reason_code) == ("allow", "approval_granted")
    assert decision.approval.reviewers == ("carol",)
    used = admin.GetApproval(
        approval_pb2.GetApprovalRequest(approval_id=approval_id), metadata=as_carol()
    )
    assert (used.state, used.used_by_decision_id) == ("used", decision.decision_id)


def test_a_rejection_reaches_the_waiting_tool(real):
    from kynara.v1 import approval_pb2

    running, admin = real
    ran: list[str] = []
    outcome: list = []
    with Client(running.target) as client:
        issue = refund_tool(client, ran, timeout=60)

        def agent() -> None:
            with acting_for(user="alice"):
                try:
                    outcome.append(issue("rf_8", 80000))
                except ApprovalRejected as err:
                    outcome.append(err)

        thread = threading.Thread(target=agent)
        thread.start()
        approval_id = first_pending(admin)
        admin.Reject(
            approval_pb2.ReviewRequest(approval_id=approval_id, comment="duplicate"),
            metadata=as_carol(),
        )
        thread.join(60)

    (error,) = outcome
    assert isinstance(error, ApprovalRejected)
    assert error.update.comment == "duplicate"
    assert ran == []
