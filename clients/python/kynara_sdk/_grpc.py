"""The gRPC transport (the ``kynara-sdk[grpc]`` extra): ``DecisionService``
over grpcio with the ``kynara-protos`` stubs.

Imported only when a client settles on gRPC, so that the fast path needs
neither grpcio nor protobuf.
"""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
from kynara.v1 import decision_pb2, decision_pb2_grpc

from kynara_sdk._proto import (
    build_request,
    decision_from_proto,
    error_from_rpc,
    outcome_from_item,
    update_from_proto,
    wait_error,
)
from kynara_sdk._wire import ApprovalWait, batch_size_error
from kynara_sdk.decision import ApprovalUpdate, Decision, DecisionRequest
from kynara_sdk.errors import KynaraError

__all__ = ["AsyncGrpcTransport", "GrpcTransport"]


class GrpcTransport:
    """The blocking gRPC transport for ``Client``: one channel, thread-safe."""

    name = "grpc"

    def __init__(
        self, target: str, timeout: float, metadata: tuple[tuple[str, str], ...]
    ) -> None:
        self.target = target
        self._timeout = timeout
        self._metadata = metadata
        # TODO(#11): client certificates as the other per-agent credential;
        # only local insecure channels (Unix socket, loopback) are dialled.
        self._channel = grpc.insecure_channel(target)
        self._stub = decision_pb2_grpc.DecisionServiceStub(self._channel)

    def decide(self, item: DecisionRequest) -> Decision:
        request = build_request(item)
        try:
            response = self._stub.Decide(
                request, timeout=self._timeout, metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err, self.target) from err
        return decision_from_proto(response)

    def decide_batch(
        self, items: list[DecisionRequest]
    ) -> list[Decision | KynaraError]:
        batch = _build_batch(items)
        try:
            response = self._stub.DecideBatch(
                batch, timeout=self._timeout, metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err, self.target) from err
        return _read_batch(batch, response)

    def wait_approval(self, wait: ApprovalWait) -> ApprovalUpdate:
        request = decision_pb2.WaitApprovalRequest(approval_id=wait.approval_id)
        stream = self._stub.WaitApproval(
            request, timeout=wait.timeout, metadata=self._metadata
        )
        try:
            for message in stream:
                resolved = wait.take(update_from_proto(message))
                if resolved is not None:
                    return resolved
        except grpc.RpcError as err:
            raise _wait_failed(err, wait) from err
        finally:
            stream.cancel()
        raise wait.ended_early()

    def close(self) -> None:
        self._channel.close()


class AsyncGrpcTransport:
    """The asyncio gRPC transport for ``AsyncClient``.

    A grpc.aio channel belongs to the loop that made it; used from another
    loop later (a second ``asyncio.run``), a new channel is opened there.
    """

    name = "grpc"

    def __init__(
        self, target: str, timeout: float, metadata: tuple[tuple[str, str], ...]
    ) -> None:
        self.target = target
        self._timeout = timeout
        self._metadata = metadata
        self._channel: grpc.aio.Channel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stub: decision_pb2_grpc.DecisionServiceStub | None = None

    async def decide(self, item: DecisionRequest) -> Decision:
        request = build_request(item)
        try:
            response = await self._stub_here().Decide(
                request, timeout=self._timeout, metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err, self.target) from err
        return decision_from_proto(response)

    async def decide_batch(
        self, items: list[DecisionRequest]
    ) -> list[Decision | KynaraError]:
        batch = _build_batch(items)
        try:
            response = await self._stub_here().DecideBatch(
                batch, timeout=self._timeout, metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err, self.target) from err
        return _read_batch(batch, response)

    async def wait_approval(self, wait: ApprovalWait) -> ApprovalUpdate:
        request = decision_pb2.WaitApprovalRequest(approval_id=wait.approval_id)
        stream = self._stub_here().WaitApproval(
            request, timeout=wait.timeout, metadata=self._metadata
        )
        try:
            async for message in stream:
                resolved = wait.take(update_from_proto(message))
                if resolved is not None:
                    return resolved
        except grpc.RpcError as err:
            raise _wait_failed(err, wait) from err
        finally:
            stream.cancel()
        raise wait.ended_early()

    async def aclose(self) -> None:
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None and self._loop is asyncio.get_running_loop():
            await channel.close()

    def discard(self) -> None:
        # NOTE: the channel is dropped, not closed: its loop may be gone (or
        # not ours to run), and closing it from here would block on it.
        self._channel, self._stub = None, None

    def _stub_here(self) -> decision_pb2_grpc.DecisionServiceStub:
        loop = asyncio.get_running_loop()
        if self._stub is None or self._loop is not loop:
            self._channel = grpc.aio.insecure_channel(self.target)
            self._stub = decision_pb2_grpc.DecisionServiceStub(self._channel)
            self._loop = loop
        return self._stub


def _wait_failed(err: grpc.RpcError, wait: ApprovalWait) -> KynaraError:
    return wait_error(
        err, wait.target, wait.approval_id, wait.timeout, wait.decision_id, wait.last
    )


def _build_batch(items: list[DecisionRequest]) -> decision_pb2.DecideBatchRequest:
    requests = []
    for index, item in enumerate(items):
        try:
            requests.append(build_request(item))
        except (TypeError, ValueError) as err:
            raise type(err)(f"requests[{index}]: {err}") from err
    return decision_pb2.DecideBatchRequest(items=requests)


def _read_batch(
    batch: decision_pb2.DecideBatchRequest,
    response: decision_pb2.DecideBatchResponse,
) -> list[Decision | KynaraError]:
    if len(response.items) != len(batch.items):
        raise batch_size_error(len(batch.items), len(response.items))
    return [outcome_from_item(item) for item in response.items]
