"""The gRPC front door: ``kynara.v1.DecisionService`` over grpc.aio.

The service decodes requests itself rather than letting grpc do it, so that
bytes that are not a valid request (bad UTF-8, corrupt framing, nesting past
protobuf's limit) and requests over ``agent.max_message_bytes`` get the same
stable codes as every other bad request, and one undecodable batch item gets
its own error while the others are answered.
"""

from __future__ import annotations

import logging

import grpc
import msgspec
from google.protobuf.message import DecodeError
from kynara.v1 import decision_pb2 as pb

from kynara_sidecar.errors import (
    InvalidRequest,
    KynaraError,
    RequestTooLarge,
    ServiceError,
)
from kynara_sidecar.pipeline import Answer, IncomingRequest, Pipeline
from kynara_sidecar.server.status import abort_with, error_to_proto
from kynara_sidecar.server.wire import answer_to_proto, request_from_proto

__all__ = ["DecisionService", "MAX_BATCH_ITEMS", "grpc_receive_limit"]

SERVICE_NAME = "kynara.v1.DecisionService"
# A batch shares one audit group commit; past the writer's batch size it
# only queues, so a larger batch buys nothing but latency for everyone.
MAX_BATCH_ITEMS = 256
# grpc refuses bytes past this itself, without our error code; below it the
# service answers request_too_large. Headroom lets the service see and name
# a request that is over the configured limit by a little.
RECEIVE_HEADROOM_BYTES = 64 * 1024

log = logging.getLogger("kynara.server")


def grpc_receive_limit(max_message_bytes: int) -> int:
    """The limit to give grpc for a configured ``agent.max_message_bytes``."""
    return max_message_bytes * 2 + RECEIVE_HEADROOM_BYTES


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
    """Answers Decide and DecideBatch through the pipeline.

    Args:
        pipeline: the decision pipeline.
        max_message_bytes: larger requests get ``request_too_large``.
    """

    def __init__(self, pipeline: Pipeline, max_message_bytes: int):
        self._pipeline = pipeline
        self._max_bytes = max_message_bytes

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

    def _incoming(
        self, raw: bytes, peer: str, authorization: str = ""
    ) -> IncomingRequest:
        try:
            self._check_size(raw)
            incoming = request_from_proto(_decode(pb.DecideRequest, raw), peer)
            if authorization:
                incoming = msgspec.structs.replace(
                    incoming, authorization=authorization
                )
        except KynaraError as err:
            self._pipeline.refuse(err)
            raise
        return incoming

    async def _answer(
        self, raw: bytes, peer: str, authorization: str = ""
    ) -> pb.DecideResponse:
        incoming = self._incoming(raw, peer, authorization)
        return answer_to_proto(await self._pipeline.decide(incoming))

    async def Decide(  # noqa: N802 (gRPC method name)
        self, raw: bytes, context: grpc.aio.ServicerContext
    ) -> pb.DecideResponse:
        try:
            return await self._answer(raw, context.peer(), _authorization(context))
        except KynaraError as err:
            await abort_with(context, err)
        except Exception:
            await abort_with(context, _internal_error())

    def _batch_item(
        self, index: int, outcome: Answer | KynaraError
    ) -> pb.DecideBatchItem:
        if not isinstance(outcome, KynaraError):
            return pb.DecideBatchItem(decision=answer_to_proto(outcome))
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
        # Items are translated and decided each on its own; the records of
        # all decided items commit in one transaction, or none does.
        requests: dict[int, IncomingRequest] = {}
        outcomes: list[Answer | KynaraError | None] = [None] * len(frames)
        for index, frame in enumerate(frames):
            try:
                requests[index] = self._incoming(frame, peer, authorization)
            except KynaraError as err:
                outcomes[index] = err
        try:
            decided = await self._pipeline.decide_all(list(requests.values()))
        except Exception:
            await abort_with(context, _internal_error())
        for index, outcome in zip(requests, decided, strict=True):
            outcomes[index] = outcome
        return pb.DecideBatchResponse(
            items=[self._batch_item(i, o) for i, o in enumerate(outcomes)]
        )
