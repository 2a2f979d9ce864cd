"""The gRPC transport (the ``kynara-sdk[grpc]`` extra): ``DecisionService``
over grpcio with the ``kynara-protos`` stubs.

Imported only when a client first chooses gRPC, so that the fast path needs
neither grpcio nor protobuf.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import grpc
from kynara.v1 import decision_pb2, decision_pb2_grpc

from kynara_sdk._proto import (
    build_request,
    decision_from_proto,
    error_from_rpc,
    outcome_from_item,
    update_from_proto,
    wait_error,
)
from kynara_sdk._wire import ApprovalWait, batch_requests, batch_size_error
from kynara_sdk.decision import ApprovalUpdate, Decision, DecisionRequest
from kynara_sdk.errors import KynaraError

__all__ = ["AsyncGrpcTransport", "GrpcTransport"]


class _Channel:
    # What both transports hold: grpcio's blocking channel to ``target``,
    # the DecisionService stub on it, the call timeout and the metadata
    # (the agent's bearer credential) sent with every call. With ``tls``
    # (CA PEM or None for the system's roots, key PEM, certificate PEM) the
    # channel is TLS presenting that client certificate, the other
    # per-agent credential; else plaintext (a Unix socket or loopback).

    name = "grpc"

    def __init__(
        self,
        target: str,
        timeout: float,
        metadata: tuple[tuple[str, str], ...],
        tls: tuple[bytes | None, bytes, bytes] | None = None,
    ) -> None:
        self.target = target
        self._timeout = timeout
        self._metadata = metadata
        if tls is None:
            self._channel = grpc.insecure_channel(target)
        else:
            ca_pem, key_pem, cert_pem = tls
            self._channel = grpc.secure_channel(
                target,
                grpc.ssl_channel_credentials(
                    root_certificates=ca_pem,
                    private_key=key_pem,
                    certificate_chain=cert_pem,
                ),
            )
        self._stub = decision_pb2_grpc.DecisionServiceStub(self._channel)


class GrpcTransport(_Channel):
    """The blocking gRPC transport for ``Client``: one channel, thread-safe."""

    def decide(self, item: DecisionRequest) -> Decision:
        return decision_from_proto(self._call(self._stub.Decide, build_request(item)))

    def decide_batch(
        self, items: list[DecisionRequest]
    ) -> list[Decision | KynaraError]:
        batch = _build_batch(items)
        return _read_batch(batch, self._call(self._stub.DecideBatch, batch))

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

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise error_from_rpc(err, self.target) from err


class AsyncGrpcTransport(_Channel):
    """The asyncio gRPC transport for ``AsyncClient``: one channel for every
    event loop, shared by all tasks.

    The calls run on grpcio's blocking channel (its own threads) and their
    ends are handed to the caller's loop. Not grpc.aio: its completions go
    to the loop that started a call, so a call still in flight when that
    loop ended (a task left running at the end of ``asyncio.run``) later
    made whichever loop was running log "Event loop is closed". Here an end
    that finds its loop closed is dropped: nobody waits for it any more. A
    call cancelled by its caller is cancelled on the channel.
    """

    async def decide(self, item: DecisionRequest) -> Decision:
        response = await self._call(self._stub.Decide, build_request(item))
        return decision_from_proto(response)

    async def decide_batch(
        self, items: list[DecisionRequest]
    ) -> list[Decision | KynaraError]:
        batch = _build_batch(items)
        return _read_batch(batch, await self._call(self._stub.DecideBatch, batch))

    async def wait_approval(self, wait: ApprovalWait) -> ApprovalUpdate:
        request = decision_pb2.WaitApprovalRequest(approval_id=wait.approval_id)
        stream = self._stub.WaitApproval(
            request, timeout=wait.timeout, metadata=self._metadata
        )
        messages = _Relay(stream)
        try:
            while (message := await messages.next()) is not _END:
                resolved = wait.take(update_from_proto(message))
                if resolved is not None:
                    return resolved
        except grpc.RpcError as err:
            raise _wait_failed(err, wait) from err
        finally:
            stream.cancel()
        raise wait.ended_early()

    async def aclose(self) -> None:
        self._channel.close()

    def discard(self) -> None:
        self._channel.close()

    async def _call(self, method: Any, request: Any) -> Any:
        call = method.future(request, timeout=self._timeout, metadata=self._metadata)
        try:
            return await _ended(call)
        except grpc.RpcError as err:
            raise error_from_rpc(err, self.target) from err


_END = object()  # a stream's end, as _Relay hands it on


def _hand_over(loop: asyncio.AbstractEventLoop, callback: Any, *args: Any) -> None:
    # From a gRPC thread into the caller's loop; dropped when that loop has
    # ended (its caller is gone).
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the loop is closed
        pass


def _settle(future: asyncio.Future, call: grpc.Future) -> None:
    if not future.done():
        future.set_result(call)


async def _ended(call: grpc.Future) -> Any:
    """The response of a blocking-channel call, awaited without a thread.

    Raises:
        grpc.RpcError: the call failed.
    """
    loop = asyncio.get_running_loop()
    ended: asyncio.Future = loop.create_future()
    call.add_done_callback(lambda done: _hand_over(loop, _settle, ended, done))
    try:
        await ended
    except asyncio.CancelledError:
        call.cancel()
        raise
    return call.result()


class _Relay:
    """A server stream read on a thread of its own, its messages handed to
    the caller's loop one by one: ``next()`` gives a message, ``_END``, or
    raises the stream's ``grpc.RpcError``."""

    def __init__(self, stream: Any) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._stream = stream
        threading.Thread(target=self._read, name="kynara-wait", daemon=True).start()

    async def next(self) -> Any:
        kind, value = await self._queue.get()
        if kind == "error":
            raise value
        return value

    def _read(self) -> None:
        put = self._queue.put_nowait
        try:
            for message in self._stream:
                _hand_over(self._loop, put, ("message", message))
        except grpc.RpcError as err:
            _hand_over(self._loop, put, ("error", err))
            return
        _hand_over(self._loop, put, ("end", _END))


def _wait_failed(err: grpc.RpcError, wait: ApprovalWait) -> KynaraError:
    return wait_error(
        err, wait.target, wait.approval_id, wait.timeout, wait.decision_id, wait.last
    )


def _build_batch(items: list[DecisionRequest]) -> decision_pb2.DecideBatchRequest:
    return decision_pb2.DecideBatchRequest(items=batch_requests(items, build_request))


def _read_batch(
    batch: decision_pb2.DecideBatchRequest,
    response: decision_pb2.DecideBatchResponse,
) -> list[Decision | KynaraError]:
    if len(response.items) != len(batch.items):
        raise batch_size_error(len(batch.items), len(response.items))
    return [outcome_from_item(item) for item in response.items]
