"""A fast path server on a Unix socket that plays the daemon's side from a
script, for what a real daemon will not do on cue: answer out of order,
drop a connection mid-call, send a code the SDK has never seen.

``ScriptedFastDaemon`` speaks protos/fastpath.md's frames and hello on its
own thread and event loop. Every frame it reads after the hello is recorded
(``frames``: stream and decoded payload); ``on_request`` decides what to do
with each request: return a payload to answer at once, ``HOLD`` to keep it
until ``release`` (answers then go out in the order given), or ``DROP`` to
close the connection.
"""

from __future__ import annotations

import asyncio
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

HEADER = struct.Struct(">II")
HOLD = object()
DROP = object()

__all__ = ["DROP", "HOLD", "ScriptedFastDaemon", "decision"]


def decision(effect: str = "allow", **fields: Any) -> dict[str, Any]:
    """An ``ok`` answer holding a decision."""
    return {"ok": {"decision": effect, "decision_id": "dec-1", **fields}}


class ScriptedFastDaemon:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.target = f"fast://{path}"
        self.frames: list[tuple[int, dict[str, Any]]] = []
        self.hellos: list[dict[str, Any]] = []
        self.connections = 0
        self.on_request: Callable[[int, dict[str, Any]], Any] = lambda stream, msg: (
            decision(request_id=msg.get("request", {}).get("request_id", ""))
        )
        self._held: list[tuple[asyncio.StreamWriter, int]] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def start(self) -> ScriptedFastDaemon:
        self._thread.start()
        self._call(self._start())
        return self

    def stop(self) -> None:
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def ops(self) -> list[tuple[int, str]]:
        """(stream, op) of every frame read after the hellos."""
        return [(stream, msg.get("op")) for stream, msg in self.frames]

    def held(self) -> list[int]:
        return [stream for _, stream in self._held]

    def release(self, answers: dict[int, dict[str, Any]]) -> None:
        """Answer held streams, in the order of ``answers``."""
        self._call(self._release(answers))

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, str(self.path))

    async def _stop(self) -> None:
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _release(self, answers: dict[int, dict[str, Any]]) -> None:
        writers = {stream: writer for writer, stream in self._held}
        for stream, payload in answers.items():
            writers[stream].write(_frame(stream, payload))
        self._held = [(w, s) for w, s in self._held if s not in answers]

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            stream, hello = await _read(reader)
            self.hellos.append(hello)
            writer.write(_frame(0, {"ok": {"version": 1, "max_message_bytes": 65536}}))
            while True:
                stream, message = await _read(reader)
                self.frames.append((stream, message))
                if message.get("op") == "cancel":
                    continue
                reply = self.on_request(stream, message)
                if reply is DROP:
                    return
                if reply is HOLD:
                    self._held.append((writer, stream))
                    continue
                writer.write(_frame(stream, reply))
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()


async def _read(reader: asyncio.StreamReader) -> tuple[int, dict[str, Any]]:
    length, stream = HEADER.unpack(await reader.readexactly(HEADER.size))
    return stream, msgspec.msgpack.decode(await reader.readexactly(length))


def _frame(stream: int, payload: dict[str, Any]) -> bytes:
    body = msgspec.msgpack.encode(payload)
    return HEADER.pack(len(body), stream) + body
