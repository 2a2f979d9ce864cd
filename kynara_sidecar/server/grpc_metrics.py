"""gRPC server metrics: every call counted by service, method and status.

``ServerMetrics`` is a grpc.aio server interceptor, one per server (a
method's handler belongs to its server). The first call of a method asks
the server for its handler and keeps a wrapped copy, so later calls of it
cost a dictionary look-up, two counter increments and one histogram
observation; nothing per call builds a label key.

Labels are bounded by what the server registered: a method it has a
handler for is labelled with its service and method name; any other
(grpc answers it UNIMPLEMENTED) is counted as ``other``/``other``. The
status is grpc's code name (``OK``, ``INVALID_ARGUMENT``, ...): what the
handler set or aborted with, ``UNKNOWN`` for an exception grpc turns into
UNKNOWN, ``CANCELLED`` when the call was cancelled under it.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from kynara_sidecar.metrics import OTHER, Metrics

__all__ = ["ServerMetrics", "split_method"]

# A handler's code when it neither set one nor raised.
_OK = "OK"


def split_method(path: str) -> tuple[str, str]:
    """``/package.Service/Method`` as ``(package.Service, Method)``; a path
    of any other shape as ``(other, other)``."""
    _, _, rest = path.partition("/")
    service, slash, method = rest.partition("/")
    if not path.startswith("/") or not slash or not service or not method:
        return OTHER, OTHER
    return service, method


class ServerMetrics(grpc.aio.ServerInterceptor):
    """Counts the calls of one grpc.aio server into ``metrics``
    (``kynara_grpc_server_*``).

    Args:
        metrics: the daemon's metrics.
    """

    def __init__(self, metrics: Metrics):
        self._metrics = metrics
        # Method path -> its handler, wrapped; only paths the server has a
        # handler for, so the table is as bounded as the labels.
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        path = handler_call_details.method
        wrapped = self._handlers.get(path)
        if wrapped is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        if handler is None:
            self._metrics.grpc_started_child(OTHER, OTHER).inc()
            self._metrics.count_grpc_handled(OTHER, OTHER, "UNIMPLEMENTED", 0.0)
            return handler
        service, method = split_method(path)
        wrapped = self._handlers[path] = _wrap(handler, service, method, self._metrics)
        return wrapped


def _wrap(
    handler: Any, service: str, method: str, metrics: Metrics
) -> grpc.RpcMethodHandler:
    """``handler`` with its behaviour counted; a behaviour that is not a
    coroutine or async generator function (grpc.aio runs such in a thread
    pool) is left as it is, uncounted."""
    started = metrics.grpc_started_child(service, method)

    def finished(context: grpc.aio.ServicerContext, began: float, error: Any) -> None:
        seconds = time.perf_counter() - began
        metrics.count_grpc_handled(service, method, _code(context, error), seconds)

    for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        behaviour = getattr(handler, kind)
        if behaviour is None:
            continue
        if inspect.isasyncgenfunction(behaviour):
            return handler._replace(**{kind: _streamed(behaviour, started, finished)})
        if inspect.iscoroutinefunction(behaviour):
            return handler._replace(**{kind: _awaited(behaviour, started, finished)})
    return handler


def _awaited(
    behaviour: Callable[..., Awaitable[Any]], started: Any, finished: Any
) -> Callable[..., Awaitable[Any]]:
    async def counted(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started.inc()
        began = time.perf_counter()
        try:
            response = await behaviour(request, context)
        except BaseException as err:
            finished(context, began, err)
            raise
        finished(context, began, None)
        return response

    return counted


def _streamed(
    behaviour: Callable[..., AsyncIterator[Any]], started: Any, finished: Any
) -> Callable[..., AsyncIterator[Any]]:
    async def counted(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started.inc()
        began = time.perf_counter()
        try:
            async for response in behaviour(request, context):
                yield response
        except BaseException as err:
            finished(context, began, err)
            raise
        finished(context, began, None)

    return counted


def _code(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if error is None:
        return _OK
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED.name
    return grpc.StatusCode.UNKNOWN.name
