"""DecisionService.WaitApproval: an agent waits on its own approvals only,
sees each change, and ending the wait changes nothing.

The service runs on a real gRPC server on a Unix socket, with a real
pipeline in multi-agent mode (so "another agent's approval" is a real
caller) over the in-memory inbox; the end-to-end path through a daemon's
own book is in test_approval_service.py and the SDK tests.
"""

from __future__ import annotations

import json
import queue
import threading

import grpc
import pytest
from identity_support import AUDIENCE, ISSUER, SigningKey, jwks
from kynara.v1 import decision_pb2 as pb
from kynara.v1 import decision_pb2_grpc
from service_support import LoopServer, MemoryInbox, make_approval, socket_path
from support import daemon_config

from kynara_sidecar.approvals.model import ApprovalState, Requirement, Reviewer, Verdict
from kynara_sidecar.audit import RefusingSink
from kynara_sidecar.errors import AuditUnavailable
from kynara_sidecar.metrics import Metrics
from kynara_sidecar.pipeline import Pipeline
from kynara_sidecar.server.decision_service import DecisionService

SUPPORT_SECRET = "support-bot-secret-0123456789"
OPS_SECRET = "ops-bot-secret-0123456789abcdef"
CAROL = Reviewer(id="carol", roles=frozenset({"reviewer"}))
ERIN = Reviewer(id="erin", roles=frozenset({"reviewer"}))


def apr(number: int) -> str:
    return f"apr_{number:026d}"


@pytest.fixture
def inbox() -> MemoryInbox:
    return MemoryInbox(
        make_approval(1),
        make_approval(2, agent="ops-bot"),
        make_approval(3, requirement=Requirement(approvers=2)),
        make_approval(4, state=ApprovalState.REJECTED),
    )


@pytest.fixture
def served(tmp_path, inbox):
    secrets = {}
    for agent, secret in [("support-bot", SUPPORT_SECRET), ("ops-bot", OPS_SECRET)]:
        path = tmp_path / f"{agent}.secret"
        path.write_text(secret)
        secrets[agent] = str(path)
    issuers = [
        {"issuer": ISSUER, "audience": AUDIENCE, "jwks": jwks(SigningKey("ES256", "k"))}
    ]
    config = daemon_config(
        tmp_path,
        "identity.mode=verified",
        "identity.agent_id=",
        f"identity.agents={json.dumps(secrets)}",
        f"identity.issuers={json.dumps(issuers)}",
    )
    metrics = Metrics()
    pipeline = Pipeline(config, RefusingSink(AuditUnavailable("unused")), metrics)
    service = DecisionService(pipeline, 1 << 20, approvals=inbox)
    server = LoopServer(socket_path(tmp_path, "agent.sock"), service)
    channel = grpc.insecure_channel(server.target)
    server.service = service
    server.metrics = metrics
    server.stub = decision_pb2_grpc.DecisionServiceStub(channel)
    yield server
    channel.close()
    server.stop()


def as_agent(secret: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {secret}"),)


class Wait:
    """One WaitApproval stream read on a thread, its updates on a queue."""

    def __init__(self, served, approval_id: str, secret: str = SUPPORT_SECRET):
        self.call = served.stub.WaitApproval(
            pb.WaitApprovalRequest(approval_id=approval_id),
            metadata=as_agent(secret),
            timeout=60,
        )
        self.updates: queue.Queue = queue.Queue()
        self.error: grpc.RpcError | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for update in self.call:
                self.updates.put(update)
        except grpc.RpcError as err:
            self.error = err
        self.updates.put(None)

    def next(self) -> pb.ApprovalUpdate | None:
        return self.updates.get(timeout=30)

    def rest(self) -> list[pb.ApprovalUpdate]:
        self._thread.join(30)
        out = []
        while (item := self.updates.get_nowait()) is not None:
            out.append(item)
        return out


def review(served, inbox, number: int, reviewer, verdict, comment: str = ""):
    return served.call(inbox.review(apr(number), reviewer, verdict, comment))


def wait_until_watching(served, inbox, number: int) -> None:
    # The first update is sent before the watch begins; a review made
    # before it would still be seen (the watch starts with the state), but
    # the test means "a change while waiting".
    while not served.call(_watching(inbox, apr(number))):
        pass


async def _watching(inbox: MemoryInbox, approval_id: str) -> int:
    import asyncio

    await asyncio.sleep(0.01)
    return inbox.watching(approval_id)


def test_the_wait_sends_the_state_then_each_change_and_ends_when_approved(
    served, inbox
):
    wait = Wait(served, apr(3))
    first = wait.next()
    wait_until_watching(served, inbox, 3)

    review(served, inbox, 3, CAROL, Verdict.APPROVE)
    second = wait.next()
    review(served, inbox, 3, ERIN, Verdict.APPROVE)
    rest = wait.rest()

    assert (first.state, first.approvals, first.approvals_needed) == ("pending", 0, 2)
    assert first.expires_at.seconds > 0
    assert (second.state, second.approvals) == ("pending", 1)
    assert [(u.state, list(u.reviewers)) for u in rest] == [
        ("approved", ["carol", "erin"])
    ]
    assert wait.error is None


def test_a_rejection_ends_the_wait_with_the_comment(served, inbox):
    wait = Wait(served, apr(1))
    wait.next()
    wait_until_watching(served, inbox, 1)

    review(served, inbox, 1, CAROL, Verdict.REJECT, "not this customer")

    (last,) = wait.rest()
    assert (last.state, last.comment) == ("rejected", "not this customer")


def test_a_resolved_approval_is_sent_once_and_the_wait_ends(served):
    wait = Wait(served, apr(4))

    assert [u.state for u in wait.rest()] == ["rejected"]
    assert wait.error is None


@pytest.mark.parametrize("number", [2, 99], ids=["another-agents", "unknown"])
def test_another_agents_approval_is_not_found_as_an_unknown_one_is(served, number):
    wait = Wait(served, apr(number))
    wait.rest()

    metadata = dict(wait.error.trailing_metadata())
    assert wait.error.code() == grpc.StatusCode.NOT_FOUND
    assert metadata["kynara-error-code"] == "not_found"
    assert "of agent 'support-bot'" in wait.error.details()


def test_the_other_agent_may_wait_on_its_own(served):
    wait = Wait(served, apr(2), secret=OPS_SECRET)

    assert wait.next().state == "pending"
    wait.call.cancel()


@pytest.mark.parametrize("secret", ["", "not-an-agent-secret-012345"])
def test_a_caller_without_an_agents_credential_is_unauthenticated(served, secret):
    wait = Wait(served, apr(1), secret=secret)
    wait.rest()

    assert wait.error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert served.metrics.request_errors.labels("identity_invalid")._value.get() == 1


def test_ending_the_wait_leaves_the_approval_untouched(served, inbox):
    before = inbox.get(apr(1))
    wait = Wait(served, apr(1))
    wait.next()
    wait_until_watching(served, inbox, 1)

    wait.call.cancel()
    wait.rest()
    while served.call(_watching(inbox, apr(1))):
        pass

    assert wait.error.code() == grpc.StatusCode.CANCELLED
    assert inbox.get(apr(1)) == before
    assert inbox.reviews_seen == 0


def test_shutdown_ends_open_waits_with_shutting_down(served, inbox):
    wait = Wait(served, apr(1))
    wait.next()
    wait_until_watching(served, inbox, 1)

    served.loop.call_soon_threadsafe(served.service.close)
    wait.rest()

    assert wait.error.code() == grpc.StatusCode.UNAVAILABLE
    assert dict(wait.error.trailing_metadata())["kynara-error-code"] == "shutting_down"
    assert inbox.get(apr(1)).state is ApprovalState.PENDING


def test_no_approval_id_is_an_invalid_request(served):
    wait = Wait(served, "")
    wait.rest()

    assert wait.error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(wait.error.trailing_metadata())["kynara-error-field"] == "approval_id"


def test_an_update_keeps_the_expiry_to_the_nanosecond_as_decide_does():
    from google.protobuf import timestamp_pb2

    from kynara_sidecar.server.approval_service import timestamp_of

    exact = timestamp_of("2026-12-05T12:00:00.925235745Z")
    offset = timestamp_of("2026-12-05T13:00:00.5+01:00")

    assert exact == timestamp_pb2.Timestamp(seconds=1796472000, nanos=925235745)
    assert offset == timestamp_pb2.Timestamp(seconds=1796472000, nanos=500000000)
    assert timestamp_of("") is None
