"""The admin listener's ``kynara.v1.ApprovalService``: reviewers list, read,
approve and reject approvals.

Every call is authenticated first (``ReviewerAuth``: an admin credential
with the reviewer role, or a reviewer JWT); an agent's credentials and
delegation tokens are refused with ``role_missing`` (PERMISSION_DENIED).
Then it is answered from an ``Inbox``: the daemon's own approval book, or
the collector's fleet inbox, so both serve the same service. Whether this
reviewer may review this approval (roles a rule requires, self approval,
one review each) is the inbox's check (``approvals.eligibility``), which
also records the review; this service only translates.

Refusals are logged and counted as every admin refusal is
(``kynara_admin_refusals``): a bad credential, a missing role, a
self-approval. Admin calls are not audited; the reviews they make are, by
the book, in the same transaction as the state they change.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence

import grpc
import msgspec
from google.protobuf import timestamp_pb2
from kynara.v1 import approval_pb2 as pb
from kynara.v1 import approval_pb2_grpc

from kynara_sidecar.approvals.model import (
    Approval,
    ApprovalState,
    EarlierApproval,
    Inbox,
    InboxQuery,
    Reviewer,
    Verdict,
    earlier_approvals,
)
from kynara_sidecar.audit.record import parse_timestamp
from kynara_sidecar.errors import (
    InvalidRequest,
    KynaraError,
    NotFound,
    RoleMissing,
    SelfApproval,
    ServiceError,
    ShuttingDown,
)
from kynara_sidecar.server.admin import authorization_of
from kynara_sidecar.server.reviewers import ReviewerAuth
from kynara_sidecar.server.status import abort_with

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "ApprovalService",
    "approval_to_proto",
    "timestamp_of",
]

SERVICE_NAME = "kynara.v1.ApprovalService"
# A screenful for a person; a script pages through more.
DEFAULT_PAGE_SIZE = 50
# Each detail carries the request's attributes and context: 500 of them is
# well under a client's 4 MiB default receive limit for ordinary requests.
MAX_PAGE_SIZE = 500
# "apr_" and 26 base32 characters; anything much longer is no approval id.
MAX_APPROVAL_ID_CHARS = 64
ALL_STATES = "all"

log = logging.getLogger("kynara.server")


def timestamp_of(text: str) -> timestamp_pb2.Timestamp | None:
    """An RFC 3339 time as a protobuf Timestamp; None for "". The daemon's
    own form (UTC, ``Z``) keeps its nanoseconds, as Decide's answers carry
    them; any other offset goes through datetime (microseconds)."""
    if not text:
        return None
    out = timestamp_pb2.Timestamp()
    try:
        exact = parse_timestamp(text)
    except ValueError:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
        out.FromDatetime(moment.astimezone(datetime.UTC))
        return out
    out.seconds, out.nanos = exact.seconds, exact.nanos
    return out


def _set_time(message: object, field: str, text: str) -> None:
    value = timestamp_of(text)
    if value is not None:
        getattr(message, field).CopyFrom(value)


def approval_to_proto(
    approval: Approval, earlier: Sequence[EarlierApproval] = ()
) -> pb.ApprovalDetail:
    """The wire form of an approval, for reviewers; ``earlier`` is what
    became of the approvals ``approval.previous`` names
    (``model.earlier_approvals``)."""
    requirement = approval.requirement
    detail = pb.ApprovalDetail(
        id=approval.id,
        state=str(approval.state),
        daemon_id=approval.daemon_id,
        agent_id=approval.agent_id,
        chain=[
            pb.ChainPrincipal(id=p.id, kind=p.kind, roles=list(p.roles))
            for p in approval.chain
        ],
        action=approval.action,
        resource_kind=approval.resource_kind,
        resource_id=approval.resource_id,
        attributes_json=msgspec.json.encode(approval.attributes).decode(),
        context_json=msgspec.json.encode(approval.context).decode(),
        rules=[
            pb.AskingRule(
                policy=r.policy,
                rule=r.rule,
                principal=r.principal,
                description=r.description,
                condition=r.condition,
            )
            for r in approval.rules
        ],
        risk=pb.Risk(
            score=approval.risk.score,
            factors=[
                pb.RiskFactor(
                    name=f.name,
                    weight=f.weight,
                    fraction=f.fraction,
                    points=f.points,
                    detail=f.detail,
                )
                for f in approval.risk.factors
            ],
        ),
        policy_revision=approval.policy_revision,
        directory_revision=approval.directory_revision,
        approvals_needed=requirement.approvers,
        # Any one of each rule's roles counts; the wire lists them all.
        reviewer_roles=sorted(
            {r for roles in requirement.reviewer_roles for r in roles}
        ),
        allow_self_approval=requirement.allow_self_approval,
        binding_digest=approval.digest,
        decision_id=approval.decision_id,
        used_by_decision_id=approval.used_by,
        url=approval.url,
    )
    for review in approval.reviews:
        message = detail.reviews.add(
            reviewer=review.reviewer,
            roles=list(review.roles),
            verdict=str(review.verdict),
            comment=review.comment,
            via=review.via,
        )
        _set_time(message, "at", review.at)
    for before in earlier:
        message = detail.previous.add(
            id=before.id,
            state=str(before.state) if before.state is not None else "",
            reviewer=before.reviewer,
            comment=before.comment,
            url=before.url,
        )
        _set_time(message, "resolved_at", before.resolved_at)
    _set_time(detail, "created_at", approval.created_at)
    _set_time(detail, "expires_at", approval.expires_at)
    _set_time(detail, "resolved_at", approval.resolved_at)
    return detail


def _query_of(request: pb.ListApprovalsRequest) -> InboxQuery:
    state: ApprovalState | None = ApprovalState.PENDING
    if request.state == ALL_STATES:
        state = None
    elif request.state:
        try:
            state = ApprovalState(request.state)
        except ValueError:
            choices = [s.value for s in ApprovalState] + [ALL_STATES]
            raise InvalidRequest(
                f"expected one of {', '.join(choices)}, got {request.state!r}",
                field="state",
            ) from None
    if request.page_size > MAX_PAGE_SIZE:
        raise InvalidRequest(
            f"expected at most {MAX_PAGE_SIZE}, got {request.page_size}",
            field="page_size",
        )
    _check_id(request.page_token, "page_token", required=False)
    return InboxQuery(
        state=state,
        agent_id=request.agent_id,
        action=request.action,
        min_risk=request.min_risk,
        # One more than the page: whether it exists says if a next page does.
        limit=(request.page_size or DEFAULT_PAGE_SIZE) + 1,
        after=request.page_token,
    )


def _check_id(approval_id: str, field: str, *, required: bool = True) -> None:
    if required and not approval_id:
        raise InvalidRequest("expected an approval id, got none", field=field)
    if len(approval_id) > MAX_APPROVAL_ID_CHARS or not approval_id.isprintable():
        raise InvalidRequest(
            f"expected an approval id (apr_...) of at most {MAX_APPROVAL_ID_CHARS} "
            "printable characters",
            field=field,
        )


class ApprovalService(approval_pb2_grpc.ApprovalServiceServicer):
    """Serves ApprovalService over an inbox to authenticated reviewers.

    Args:
        inbox: where approvals are read and reviewed.
        auth: who is reviewing; it counts and logs credential refusals.
    """

    def __init__(self, inbox: Inbox, auth: ReviewerAuth):
        self._inbox = inbox
        self._auth = auth
        self._closed = False

    def register(self, server: grpc.aio.Server) -> None:
        """Serve this service on ``server``."""
        approval_pb2_grpc.add_ApprovalServiceServicer_to_server(self, server)

    def close(self) -> None:
        """Refuse new calls with ``shutting_down``. Idempotent."""
        self._closed = True

    async def _fail(
        self, context: grpc.aio.ServicerContext, err: Exception, call: str
    ) -> None:
        if isinstance(err, KynaraError):
            await abort_with(context, err)
        log.exception(
            "admin call failed",
            extra={"fields": {"component": "server", "call": call}},
        )
        await abort_with(context, ServiceError("internal error; see the daemon's log"))

    def _reviewer(self, context: grpc.aio.ServicerContext, call: str) -> Reviewer:
        if self._closed:
            raise ShuttingDown("the daemon is shutting down; try again later")
        return self._auth.authorize(authorization_of(context), call)

    async def ListApprovals(  # noqa: N802 (gRPC method name)
        self, request: pb.ListApprovalsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListApprovalsResponse:
        call = "ApprovalService.ListApprovals"
        try:
            self._reviewer(context, call)
            query = _query_of(request)
            found = list(self._inbox.list(query))
        except Exception as err:
            await self._fail(context, err, call)
            raise AssertionError("unreachable: abort_with raises") from err
        page = found[: query.limit - 1]
        more = len(found) > len(page)
        return pb.ListApprovalsResponse(
            approvals=[self._detail(a) for a in page],
            next_page_token=page[-1].id if more and page else "",
        )

    async def GetApproval(  # noqa: N802 (gRPC method name)
        self, request: pb.GetApprovalRequest, context: grpc.aio.ServicerContext
    ) -> pb.ApprovalDetail:
        call = "ApprovalService.GetApproval"
        try:
            self._reviewer(context, call)
            _check_id(request.approval_id, "approval_id")
            approval = self._inbox.get(request.approval_id)
            if approval is None:
                raise NotFound(
                    f"no approval {request.approval_id!r} in this inbox",
                    field="approval_id",
                )
        except Exception as err:
            await self._fail(context, err, call)
            raise AssertionError("unreachable: abort_with raises") from err
        return self._detail(approval)

    def _detail(self, approval: Approval) -> pb.ApprovalDetail:
        return approval_to_proto(approval, earlier_approvals(approval, self._inbox.get))

    async def _review(
        self,
        request: pb.ReviewRequest,
        context: grpc.aio.ServicerContext,
        verdict: Verdict,
        call: str,
    ) -> pb.ApprovalDetail:
        try:
            reviewer = self._reviewer(context, call)
            _check_id(request.approval_id, "approval_id")
            try:
                approval = await self._inbox.review(
                    request.approval_id, reviewer, verdict, request.comment
                )
            except (RoleMissing, SelfApproval) as err:
                # The inbox's eligibility check refused this reviewer: a
                # refusal of the caller, counted as the credential ones are.
                self._auth.refused(err, call)
                raise
        except Exception as err:
            await self._fail(context, err, call)
            raise AssertionError("unreachable: abort_with raises") from err
        log.info(
            "approval reviewed",
            extra={
                "fields": {
                    "component": "server",
                    "approval_id": approval.id,
                    "decision_id": approval.decision_id,
                    "reviewer": reviewer.id,
                    "credential": reviewer.credential,
                    "verdict": str(verdict),
                    "state": str(approval.state),
                }
            },
        )
        return self._detail(approval)

    async def Approve(  # noqa: N802 (gRPC method name)
        self, request: pb.ReviewRequest, context: grpc.aio.ServicerContext
    ) -> pb.ApprovalDetail:
        return await self._review(
            request, context, Verdict.APPROVE, "ApprovalService.Approve"
        )

    async def Reject(  # noqa: N802 (gRPC method name)
        self, request: pb.ReviewRequest, context: grpc.aio.ServicerContext
    ) -> pb.ApprovalDetail:
        return await self._review(
            request, context, Verdict.REJECT, "ApprovalService.Reject"
        )
