"""The gRPC front door: ``kynara.v1.DecisionService`` over grpc.aio.

The service decodes requests itself rather than letting grpc do it, so that
bytes that are not a valid request (bad UTF-8, corrupt framing, nesting past
protobuf's limit) and requests over ``agent.max_message_bytes`` get the same
stable codes as every other bad request, and one undecodable batch item gets
its own error while the others are answered.

``WaitApproval`` lets an agent wait on one of its own approvals: the caller's
agent is established as for a decision (``Pipeline.agent_of``), an approval
of any other agent is ``not_found`` exactly as an unknown id is (so an agent
learns nothing of another's), and the stream sends the approval's state at
once and then each change, ending after approved, rejected, expired or used.
It only reads: a client that ends its wait leaves the approval as it was.
On shutdown open waits end with ``shutting_down`` rather than hold the
listener open for the whole grace period.

An answer to a request that asked ``explain`` also carries the limits the
decision read or counted (``DecideResponse.limits``, from its record's
entries); one that did not ask carries none, so the usual answer costs
nothing more.

On the agent listener's TLS port (``agent.tls``) every connection has a
client certificate the handshake verified; the service reads its URI SANs
from the call's auth context (grpc's ``peer_uri`` property, which grpc
fills from the verified peer certificate) and hands them to the pipeline,
where in multi-agent mode they name the calling agent. Nothing in the
request can stand in for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

import grpc
from google.protobuf.message import DecodeError
from kynara.v1 import decision_pb2 as pb

from kynara_sidecar.approvals.model import FINAL_STATES, Approval, ApprovalState
from kynara_sidecar.audit.record import LimitEntry, decode_value
from kynara_sidecar.errors import (
    InvalidRequest,
    KynaraError,
    NotFound,
    RequestTooLarge,
    ServiceError,
    ShuttingDown,
)
from kynara_sidecar.identity import PeerCertificate
from kynara_sidecar.pipeline import Answer, IncomingRequest, Pipeline
from kynara_sidecar.server.approval_service import timestamp_of
from kynara_sidecar.server.status import abort_with, error_to_proto
from kynara_sidecar.server.wire import answer_to_proto, request_from_proto

__all__ = [
    "WAIT_END_STATES",
    "ApprovalWatch",
    "DecisionService",
    "MAX_BATCH_ITEMS",
    "approval_update",
    "grpc_receive_limit",
    "limits_to_proto",
]

SERVICE_NAME = "kynara.v1.DecisionService"
# A batch shares one audit group commit; past the writer's batch size it
# only queues, so a larger batch buys nothing but latency for everyone.
MAX_BATCH_ITEMS = 256
# grpc refuses bytes past this itself, without our error code; below it the
# service answers request_too_large. Headroom lets the service see and name
# a request that is over the configured limit by a little.
RECEIVE_HEADROOM_BYTES = 64 * 1024

# A wait ends here: approved (the agent retries with the grant) or a state
# nothing leaves.
WAIT_END_STATES = FINAL_STATES | {ApprovalState.APPROVED}

log = logging.getLogger("kynara.server")


class ApprovalWatch(Protocol):
    """What WaitApproval needs of the daemon's approval book."""

    def get(self, approval_id: str) -> Approval | None:
        """The approval, or None when no approval has that id."""
        ...

    def watch(self, approval_id: str) -> AsyncIterator[Approval]:
        """The approval's states from now on, each change once."""
        ...


def approval_update(approval: Approval) -> pb.ApprovalUpdate:
    """The WaitApproval message for one state of an approval."""
    update = pb.ApprovalUpdate(
        approval_id=approval.id,
        state=str(approval.state),
        approvals=len(approval.approvers),
        approvals_needed=approval.requirement.approvers,
        reviewers=list(approval.approvers),
    )
    if approval.state is ApprovalState.REJECTED and approval.reviews:
        update.comment = approval.reviews[-1].comment
    expires_at = timestamp_of(approval.expires_at)
    if expires_at is not None:
        update.expires_at.CopyFrom(expires_at)
    return update


def grpc_receive_limit(max_message_bytes: int) -> int:
    """The limit to give grpc for a configured ``agent.max_message_bytes``."""
    return max_message_bytes * 2 + RECEIVE_HEADROOM_BYTES


def _number(encoded: Mapping[str, Any] | None) -> pb.Value | None:
    """A limit's int or double (``encode_value`` form) as a typed Value."""
    if encoded is None:
        return None
    value = decode_value(encoded)
    if isinstance(value, float):
        return pb.Value(double_value=value)
    if -(2**63) <= value < 2**63:
        return pb.Value(int_value=value)
    if 0 <= value < 2**64:
        return pb.Value(uint_value=value)
    # A sum past both (the log keeps it exact): the nearest double.
    return pb.Value(double_value=float(value))


def limits_to_proto(entries: Mapping[str, LimitEntry]) -> dict[str, pb.LimitSeen]:
    """A decision record's limit entries as ``DecideResponse.limits``."""
    return {
        name: pb.LimitSeen(
            count=entry.count,
            sum=_number(entry.sum),
            ceiling=_number(entry.ceiling),
            remote_count=entry.remote_count,
            remote_sum=_number(entry.remote_sum),
            counted=entry.counted,
            amount=_number(entry.amount),
            window_start=timestamp_of(entry.window_start),
            key=entry.key,
            scope=entry.scope,
            error=entry.error,
        )
        for name, entry in entries.items()
    }


def _response(answer: Answer) -> pb.DecideResponse:
    response = answer_to_proto(answer)
    # Explained answers only: the limits are part of the why.
    if answer.limits and answer.decision.explanation is not None:
        for name, seen in limits_to_proto(answer.limits).items():
            response.limits[name].CopyFrom(seen)
    return response


def _internal_error() -> ServiceError:
    """Log the exception being handled and return the error the caller sees."""
    log.exception("decide failed", extra={"fields": {"component": "server"}})
    return ServiceError("internal error in the daemon; see its log")


def _authorization(context: grpc.aio.ServicerContext) -> str:
    """The caller's ``authorization`` metadata (a per-agent credential)."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            return value
    return ""


def _certificate(context: grpc.aio.ServicerContext) -> PeerCertificate | None:
    """The client certificate the call's TLS handshake verified, or None on
    a connection without one (the Unix socket)."""
    properties = context.auth_context()
    if not properties.get("x509_pem_cert"):
        return None
    return PeerCertificate(
        tuple(uri.decode("utf-8", "replace") for uri in properties.get("peer_uri", ()))
    )


def _decode(message_type, raw: bytes, field: str = ""):
    try:
        return message_type.FromString(raw)
    except DecodeError as err:
        raise InvalidRequest(
            f"expected a {message_type.DESCRIPTOR.name} in protobuf encoding, "
            f"could not decode it: {err}",
            field=field,
        ) from None


class DecisionService:
    """Answers Decide and DecideBatch through the pipeline, and WaitApproval
    from the approval book.

    Args:
        pipeline: the decision pipeline.
        max_message_bytes: larger requests get ``request_too_large``.
        approvals: where WaitApproval watches approvals; default the
            pipeline's book (``Pipeline.approvals``).
        client_certificates: the server serves TLS with client
            certificates (``agent.tls``): read each call's certificate.
            Without, no call's auth context is read.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        max_message_bytes: int,
        approvals: ApprovalWatch | None = None,
        *,
        client_certificates: bool = False,
    ):
        self._pipeline = pipeline
        self._client_certificates = client_certificates
        self._max_bytes = max_message_bytes
        self._approvals = approvals
        self._closing = asyncio.Event()

    def close(self) -> None:
        """End open waits with ``shutting_down`` and refuse new ones."""
        self._closing.set()

    def register(self, server: grpc.aio.Server) -> None:
        """Serve this service on ``server``, reading requests as raw bytes."""
        handlers = {
            "Decide": grpc.unary_unary_rpc_method_handler(
                self.Decide,
                response_serializer=pb.DecideResponse.SerializeToString,
            ),
            "DecideBatch": grpc.unary_unary_rpc_method_handler(
                self.DecideBatch,
                response_serializer=pb.DecideBatchResponse.SerializeToString,
            ),
            "WaitApproval": grpc.unary_stream_rpc_method_handler(
                self.WaitApproval,
                response_serializer=pb.ApprovalUpdate.SerializeToString,
            ),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
        )
        server.add_registered_method_handlers(SERVICE_NAME, handlers)

    def _check_size(self, raw: bytes) -> None:
        if len(raw) > self._max_bytes:
            raise RequestTooLarge(
                f"expected at most {self._max_bytes} bytes "
                f"(agent.max_message_bytes), got {len(raw)}"
            )

    def _certificate(self, context: grpc.aio.ServicerContext) -> PeerCertificate | None:
        if not self._client_certificates:
            return None
        return _certificate(context)

    def _incoming(
        self,
        raw: bytes,
        peer: str,
        authorization: str = "",
        certificate: PeerCertificate | None = None,
    ) -> IncomingRequest:
        try:
            self._check_size(raw)
            incoming = request_from_proto(
                _decode(pb.DecideRequest, raw), peer, authorization, certificate
            )
        except KynaraError as err:
            self._pipeline.refuse(err)
            raise
        return incoming

    async def _answer(
        self,
        raw: bytes,
        peer: str,
        authorization: str = "",
        certificate: PeerCertificate | None = None,
    ) -> pb.DecideResponse:
        incoming = self._incoming(raw, peer, authorization, certificate)
        return _response(await self._pipeline.decide(incoming))

    async def Decide(  # noqa: N802 (gRPC method name)
        self, raw: bytes, context: grpc.aio.ServicerContext
    ) -> pb.DecideResponse:
        try:
            return await self._answer(
                raw,
                context.peer(),
                _authorization(context),
                self._certificate(context),
            )
        except KynaraError as err:
            await abort_with(context, err)
        except Exception:
            await abort_with(context, _internal_error())

    def _batch_item(
        self, index: int, outcome: Answer | KynaraError
    ) -> pb.DecideBatchItem:
        if not isinstance(outcome, KynaraError):
            return pb.DecideBatchItem(decision=_response(outcome))
        error = error_to_proto(outcome)
        error.field = f"items[{index}]" + (f".{error.field}" if error.field else "")
        return pb.DecideBatchItem(error=error)

    async def DecideBatch(  # noqa: N802 (gRPC method name)
        self, raw: bytes, context: grpc.aio.ServicerContext
    ) -> pb.DecideBatchResponse:
        try:
            self._check_size(raw)
            frames = _decode(pb.DecideBatchRequestFrames, raw).items
            if len(frames) > MAX_BATCH_ITEMS:
                raise InvalidRequest(
                    f"expected at most {MAX_BATCH_ITEMS} items, got {len(frames)}",
                    field="items",
                )
        except KynaraError as err:
            self._pipeline.refuse(err)
            await abort_with(context, err)
        peer, authorization = context.peer(), _authorization(context)
        certificate = self._certificate(context)
        # Items are translated and decided each on its own; the records of
        # all decided items commit in one transaction, or none does.
        requests: dict[int, IncomingRequest] = {}
        outcomes: list[Answer | KynaraError | None] = [None] * len(frames)
        for index, frame in enumerate(frames):
            try:
                requests[index] = self._incoming(
                    frame, peer, authorization, certificate
                )
            except KynaraError as err:
                outcomes[index] = err
        try:
            decided = await self._pipeline.decide_all(list(requests.values()))
        except Exception:
            await abort_with(context, _internal_error())
        for index, outcome in zip(requests, decided, strict=True):
            outcomes[index] = outcome
        try:
            return pb.DecideBatchResponse(
                items=[self._batch_item(i, o) for i, o in enumerate(outcomes)]
            )
        except Exception:
            await abort_with(context, _internal_error())

    def _book(self) -> ApprovalWatch:
        if self._approvals is not None:
            return self._approvals
        return self._pipeline.approvals

    def _own_approval(
        self,
        raw: bytes,
        authorization: str,
        certificate: PeerCertificate | None = None,
    ) -> Approval:
        if self._closing.is_set():
            raise ShuttingDown("the daemon is shutting down; wait on another replica")
        self._check_size(raw)
        request = _decode(pb.WaitApprovalRequest, raw)
        return self.own_approval(request.approval_id, authorization, certificate)

    def own_approval(
        self,
        approval_id: str,
        authorization: str,
        certificate: PeerCertificate | None = None,
    ) -> Approval:
        """The approval ``approval_id`` of the agent ``authorization`` (or
        the connection's client ``certificate``) names, as it is now: what a
        wait begins with (every door's rule).

        Raises:
            ShuttingDown: the daemon is stopping (``close``).
            InvalidRequest: no approval id.
            IdentityInvalid: as ``Pipeline.agent_of``.
            NotFound: no such approval, or another agent's.
        """
        if self._closing.is_set():
            raise ShuttingDown("the daemon is shutting down; wait on another replica")
        if not approval_id:
            raise InvalidRequest(
                "expected an approval id, got none", field="approval_id"
            )
        # The caller's agent first: an unauthenticated caller learns nothing
        # of which ids exist.
        agent = self._pipeline.agent_of(authorization, certificate)
        approval = self._book().get(approval_id)
        if approval is None or approval.agent_id != agent:
            raise NotFound(
                f"no approval {approval_id[:80]!r} of agent {agent!r}",
                field="approval_id",
            )
        return approval

    async def WaitApproval(  # noqa: N802 (gRPC method name)
        self, raw: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ApprovalUpdate]:
        try:
            approval = self._own_approval(
                raw, _authorization(context), self._certificate(context)
            )
        except KynaraError as err:
            self._pipeline.refuse(err)
            await abort_with(context, err)
        except Exception:
            await abort_with(context, _internal_error())
        try:
            async for state in self.states(approval):
                yield approval_update(state)
        except KynaraError as err:
            await abort_with(context, err)
        except Exception:
            await abort_with(context, _internal_error())

    async def states(self, first: Approval) -> AsyncIterator[Approval]:
        """The approval now, then each change, until a state ending the wait
        or shutdown (``ShuttingDown``); what every door's wait sends."""
        yield first
        if first.state in WAIT_END_STATES:
            return
        seen = (first.state, len(first.reviews))
        changes = aiter(self._book().watch(first.id))
        closing = asyncio.ensure_future(self._closing.wait())
        step: asyncio.Future[Approval] | None = None
        try:
            while True:
                step = asyncio.ensure_future(anext(changes))
                await asyncio.wait({step, closing}, return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    raise ShuttingDown(
                        "the daemon is shutting down; wait again on another "
                        "replica (the approval is unchanged)"
                    )
                try:
                    state = step.result()
                except StopAsyncIteration:
                    # The book stopped watching before a final state: it
                    # is closing.
                    raise ShuttingDown(
                        "the daemon is shutting down; wait again on another "
                        "replica (the approval is unchanged)"
                    ) from None
                if (state.state, len(state.reviews)) == seen:
                    continue  # the state the wait began with, sent already
                seen = (state.state, len(state.reviews))
                yield state
                if state.state in WAIT_END_STATES:
                    return
        finally:
            # The wait ended (its end, shutdown, or the client went away):
            # stop watching; nothing here changes the approval.
            closing.cancel()
            if step is not None and not step.done():
                step.cancel()
                await asyncio.wait({step})
            aclose = getattr(changes, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
