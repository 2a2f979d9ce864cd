"""The gRPC front door: ``kynara.v1.DecisionService`` over grpc.aio."""

from __future__ import annotations

import asyncio
import logging

import grpc
from kynara.v1 import decision_pb2 as pb
from kynara.v1 import decision_pb2_grpc as pb_grpc

from kynara_sidecar.errors import InvalidRequest, KynaraError, ServiceError
from kynara_sidecar.pipeline import Pipeline
from kynara_sidecar.server.status import abort_with, error_to_proto
from kynara_sidecar.server.wire import answer_to_proto, request_from_proto

__all__ = ["DecisionService", "MAX_BATCH_ITEMS"]

# A batch shares one audit group commit; past the writer's batch size it
# only queues, so a larger batch buys nothing but latency for everyone.
MAX_BATCH_ITEMS = 256

log = logging.getLogger("kynara.server")


def _internal_error() -> ServiceError:
    """Log the exception being handled and return the error the caller sees."""
    log.exception("decide failed", extra={"fields": {"component": "server"}})
    return ServiceError("internal error in the daemon; see its log")


class DecisionService(pb_grpc.DecisionServiceServicer):
    """Answers Decide and DecideBatch through the pipeline."""

    def __init__(self, pipeline: Pipeline):
        self._pipeline = pipeline

    async def _answer(self, request: pb.DecideRequest, peer: str) -> pb.DecideResponse:
        incoming = request_from_proto(request, peer)
        return answer_to_proto(await self._pipeline.decide(incoming))

    async def Decide(  # noqa: N802 (gRPC method name)
        self, request: pb.DecideRequest, context: grpc.aio.ServicerContext
    ) -> pb.DecideResponse:
        try:
            return await self._answer(request, context.peer())
        except KynaraError as err:
            await abort_with(context, err)
        except Exception:
            await abort_with(context, _internal_error())

    async def _batch_item(
        self, index: int, request: pb.DecideRequest, peer: str
    ) -> pb.DecideBatchItem:
        try:
            answer = await self._answer(request, peer)
        except KynaraError as err:
            error = error_to_proto(err)
        except Exception:
            error = error_to_proto(_internal_error())
        else:
            return pb.DecideBatchItem(decision=answer)
        if error.field:
            error.field = f"items[{index}].{error.field}"
        return pb.DecideBatchItem(error=error)

    async def DecideBatch(  # noqa: N802 (gRPC method name)
        self, request: pb.DecideBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.DecideBatchResponse:
        if len(request.items) > MAX_BATCH_ITEMS:
            await abort_with(
                context,
                InvalidRequest(
                    f"expected at most {MAX_BATCH_ITEMS} items, "
                    f"got {len(request.items)}",
                    field="items",
                ),
            )
        peer = context.peer()
        items = await asyncio.gather(
            *(self._batch_item(i, item, peer) for i, item in enumerate(request.items))
        )
        return pb.DecideBatchResponse(items=items)
