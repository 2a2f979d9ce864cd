"""A real gRPC server on a Unix socket, playing the daemon's side.

``ScriptedDaemon`` runs a grpc.aio server in its own thread and event loop,
so both the blocking and the asyncio client can talk to it from a test. Its
servicer records every request and answers from a script: a
``DecideResponse`` to return, an ``Abort`` to fail the call with a status and
trailing metadata, or ``HANG`` to never answer (for deadlines).
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections import deque
from pathlib import Path

import grpc
import grpc.aio
from kynara.v1 import decision_pb2, decision_pb2_grpc

# Small enough that a test can exceed it cheaply with one attribute.
SERVER_MAX_RECEIVE = 64 * 1024
HANG = object()

__all__ = ["HANG", "Abort", "ScriptedDaemon", "ScriptedServicer", "answer"]


@dataclasses.dataclass(frozen=True)
class Abort:
    status: grpc.StatusCode
    details: str = ""
    code: str = ""
    field: str = ""

    def metadata(self) -> tuple[tuple[str, str], ...]:
        pairs = [("kynara-error-code", self.code), ("kynara-error-field", self.field)]
        return tuple((key, value) for key, value in pairs if value)


def answer(decision: str = "allow", decision_id: str = "dec-1", **fields):
    """A DecideResponse with the given decision ("allow", ...) and fields."""
    effect = getattr(decision_pb2, f"DECISION_{decision.upper()}")
    return decision_pb2.DecideResponse(
        decision=effect, decision_id=decision_id, **fields
    )


class ScriptedServicer(decision_pb2_grpc.DecisionServiceServicer):
    def __init__(self) -> None:
        self.requests: list[decision_pb2.DecideRequest] = []
        self.batches: list[decision_pb2.DecideBatchRequest] = []
        self.script: deque = deque()
        self.default = answer("allow")
        self.release: asyncio.Event | None = None

    async def _reply(self, context):
        reply = self.script.popleft() if self.script else self.default
        if reply is HANG:
            await self.release.wait()
            reply = self.default
        if isinstance(reply, Abort):
            await context.abort(reply.status, reply.details, reply.metadata())
        return reply

    async def Decide(self, request, context):
        self.requests.append(request)
        return await self._reply(context)

    async def DecideBatch(self, request, context):
        self.batches.append(request)
        return await self._reply(context)


class ScriptedDaemon:
    def __init__(self, socket_path: Path) -> None:
        self.target = f"unix://{socket_path}"
        self.servicer = ScriptedServicer()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: grpc.aio.Server | None = None

    @property
    def requests(self) -> list[decision_pb2.DecideRequest]:
        return self.servicer.requests

    def then(self, *replies) -> ScriptedDaemon:
        """Queue replies, answered in order; after them, the default."""
        self.servicer.script.extend(replies)
        return self

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    async def _start(self) -> None:
        self.servicer.release = asyncio.Event()
        self._server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", SERVER_MAX_RECEIVE)]
        )
        decision_pb2_grpc.add_DecisionServiceServicer_to_server(
            self.servicer, self._server
        )
        self._server.add_insecure_port(self.target)
        await self._server.start()

    async def _stop(self) -> None:
        self.servicer.release.set()
        await self._server.stop(None)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
