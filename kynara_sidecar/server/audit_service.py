"""The admin listener's ``kynara.v1.AuditService``: checkpoints, proofs and
sealed segments for an operator, from the daemon's own audit store.

Each call is authorized first (an ``operator`` credential, see ``admin``),
then answered by ``audit.prove``, the same code ``kynara-sidecar prove``
runs, so both give the same answer. Store reads run on a small thread pool
of this service's own: one lookup is quick, but a segment pull walks many
records, and the event loop keeps answering decisions meanwhile. A pull
sends a large segment as several messages of at most
``max_segment_message_bytes`` of records each (a client's default receive
limit is 4 MiB).

``close()`` refuses new calls and waits for reads in flight, so the daemon
closes the store only once no thread reads it. Admin calls are not audited.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import grpc
from kynara.v1 import audit_pb2 as pb
from kynara.v1 import audit_pb2_grpc

from kynara_sidecar.audit import prove
from kynara_sidecar.audit.segments import checkpoint_to_proto, segment_message
from kynara_sidecar.audit.store import AuditStore
from kynara_sidecar.config import AdminRole
from kynara_sidecar.errors import (
    AuditUnavailable,
    KynaraError,
    ServiceError,
    ShuttingDown,
)
from kynara_sidecar.server.admin import AdminCredentials, authorization_of
from kynara_sidecar.server.status import abort_with

__all__ = [
    "DEFAULT_SEGMENT_MESSAGE_BYTES",
    "MAX_ADMIN_REQUEST_BYTES",
    "AuditService",
    "checkpoint_to_proto",
]

SERVICE_NAME = "kynara.v1.AuditService"
# 1 MiB of records a message: a quarter of a gRPC client's default receive
# limit, so a message with a large record on top still arrives.
DEFAULT_SEGMENT_MESSAGE_BYTES = 1 << 20
# Admin requests are a few numbers or an id; anything larger is not one.
MAX_ADMIN_REQUEST_BYTES = 64 * 1024
# Admin reads are rare; a few threads serve several operators at once
# without taking the threads the daemon's other work uses.
READ_THREADS = 4

T = TypeVar("T")

log = logging.getLogger("kynara.server")


def _internal_error(call: str) -> ServiceError:
    log.exception(
        "admin call failed", extra={"fields": {"component": "server", "call": call}}
    )
    return ServiceError("internal error in the daemon; see its log")


class AuditService(audit_pb2_grpc.AuditServiceServicer):
    """Serves AuditService over an audit store to operator credentials.

    Args:
        store: the daemon's audit store (read only here); ``None`` when it
            could not be opened, and every call answers ``audit_unavailable``.
        credentials: the admin credentials.
        max_segment_message_bytes: records per StreamSegments message, in
            bytes (at least one record a message).
    """

    def __init__(
        self,
        store: AuditStore | None,
        credentials: AdminCredentials,
        *,
        max_segment_message_bytes: int = DEFAULT_SEGMENT_MESSAGE_BYTES,
    ):
        self._store = store
        self._credentials = credentials
        self._max_bytes = max_segment_message_bytes
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=READ_THREADS, thread_name_prefix="kynara-admin-read"
        )
        self._closed = False

    def register(self, server: grpc.aio.Server) -> None:
        """Serve this service on ``server``."""
        audit_pb2_grpc.add_AuditServiceServicer_to_server(self, server)

    async def close(self) -> None:
        """Refuse new calls and wait for store reads in flight. Idempotent."""
        self._closed = True
        await asyncio.to_thread(self._pool.shutdown, wait=True)

    async def _read(self, work: Callable[..., T], *args: object, **kw: object) -> T:
        if self._closed:
            raise ShuttingDown("the daemon is shutting down; try again later")
        if self._store is None:
            raise AuditUnavailable(
                "the audit log could not be opened; the daemon's log says why "
                "(check audit.path)"
            )
        loop = asyncio.get_running_loop()
        try:
            future = self._pool.submit(work, *args, **kw)
        except RuntimeError:  # the pool shut down since the check above
            raise ShuttingDown("the daemon is shutting down; try again later") from None
        return await asyncio.wrap_future(future, loop=loop)

    def _authorize(self, context: grpc.aio.ServicerContext, call: str) -> None:
        self._credentials.authorize(
            authorization_of(context), AdminRole.OPERATOR, f"AuditService.{call}"
        )

    async def _serve(
        self,
        context: grpc.aio.ServicerContext,
        call: str,
        work: Callable[..., T],
        **kw: object,
    ) -> T:
        try:
            self._authorize(context, call)
            return await self._read(work, self._store, **kw)
        except KynaraError as err:
            await abort_with(context, err)
        except Exception:
            await abort_with(context, _internal_error(call))
        raise AssertionError("unreachable: abort_with raises")

    async def GetHead(  # noqa: N802 (gRPC method name)
        self, request: pb.GetHeadRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetHeadResponse:
        view = await self._serve(context, "GetHead", prove.prove_head)
        reply = pb.GetHeadResponse(
            tree_size=view.tree_size, log_id=view.log_id, seam=view.seam
        )
        if view.checkpoint is not None:
            reply.checkpoint.CopyFrom(checkpoint_to_proto(view.checkpoint))
        return reply

    async def GetRecord(  # noqa: N802 (gRPC method name)
        self, request: pb.GetRecordRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetRecordResponse:
        proof = await self._serve(
            context,
            "GetRecord",
            prove.prove_record,
            seq=request.seq,
            decision_id=request.decision_id,
            tree_size=request.tree_size,
        )
        return pb.GetRecordResponse(
            record=proof.record,
            seq=proof.seq,
            leaf_index=proof.leaf_index,
            inclusion_proof=proof.inclusion_proof,
            checkpoint=checkpoint_to_proto(proof.checkpoint),
        )

    async def GetConsistencyProof(  # noqa: N802 (gRPC method name)
        self,
        request: pb.GetConsistencyProofRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.GetConsistencyProofResponse:
        proof = await self._serve(
            context,
            "GetConsistencyProof",
            prove.prove_consistency,
            old_size=request.old_size,
            new_size=request.new_size,
        )
        return pb.GetConsistencyProofResponse(
            old_checkpoint=checkpoint_to_proto(proof.old_checkpoint),
            new_checkpoint=checkpoint_to_proto(proof.new_checkpoint),
            consistency_proof=proof.proof,
        )

    async def StreamSegments(  # noqa: N802 (gRPC method name)
        self, request: pb.StreamSegmentsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Segment]:
        spans = await self._serve(
            context,
            "StreamSegments",
            prove.sealed_segments,
            after_tree_size=request.after_tree_size,
        )
        for span in spans:
            async for message in self._segment_messages(span, context):
                yield message

    async def _segment_messages(
        self, span: prove.SegmentSpan, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Segment]:
        # The same messages the shipper sends (``audit.segments``).
        checkpoint = checkpoint_to_proto(span.checkpoint)
        first, last = span.previous_tree_size + 1, span.checkpoint.tree_size
        while first <= last:
            try:
                message = await self._read(
                    segment_message,
                    self._store,
                    span,
                    first,
                    self._max_bytes,
                    checkpoint=checkpoint,
                )
            except KynaraError as err:
                await abort_with(context, err)
            except Exception:
                await abort_with(context, _internal_error("StreamSegments"))
            yield message
            first += len(message.records)
