"""The MCP gateway over the daemon's own stdin and stdout, for one agent.

``kynara-sidecar gateway --config F`` is started by the agent as its MCP
server. The agent served is ``gateway.stdio.agent_id`` (else
``identity.agent_id``); in multi-agent mode its secret from
``identity.agents`` is presented as its credential. The user's delegation
token is read on every request (so a refreshed one is picked up) from the
environment variable ``gateway.stdio.token_env``, else the file
``gateway.stdio.token_file``; in development mode the asserted chain comes
from ``gateway.stdio.asserted_chain_env`` (comma-separated, user first).

A reader sits in front of the SDK: a line longer than
``gateway.max_message_bytes`` is answered with a JSON-RPC error (id null)
naming the limit and the rest of that line is skipped; a JSON-RPC batch (a
JSON array) is answered with one Invalid Request error and nothing of it is
forwarded. The wire is kept apart from everything else at start: fd 1 then
points at stderr, so nothing but MCP reaches the agent's stdout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc
import mcp_types as types
from anyio.streams.memory import MemoryObjectSendStream
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import NotificationOptions
from mcp.shared.message import SessionMessage

from kynara_sidecar.config import Config, IdentityMode
from kynara_sidecar.errors import ConfigError, RequestTooLarge
from kynara_sidecar.gateway.proxy import Caller, Gateway
from kynara_sidecar.pipeline import Pipeline

__all__ = ["StdioWire", "serve_stdio", "stdio_caller"]

log = logging.getLogger("kynara.gateway")

INVALID_REQUEST = -32600
READ_CHUNK_BYTES = 64 * 1024


class StdioWire:
    """The daemon's stdin and stdout, taken for MCP.

    ``claim`` duplicates both descriptors for the wire, then points fd 0 at
    the null device and fd 1 at stderr: a stray print or a child that
    inherits them can no longer corrupt the agent's stream.
    """

    def __init__(self, read_fd: int, write_fd: int):
        self.read_fd = read_fd
        self.write_fd = write_fd

    @classmethod
    def claim(cls) -> StdioWire:
        read_fd = os.dup(0)
        write_fd = os.dup(1)
        null = os.open(os.devnull, os.O_RDONLY)
        try:
            os.dup2(null, 0)
        finally:
            os.close(null)
        os.dup2(2, 1)
        return cls(read_fd, write_fd)


def _read_token_file(path: str) -> str:
    if not path:
        return ""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip()
    except OSError as err:
        log.warning(
            "delegation token file unreadable",
            extra={
                "fields": {
                    "component": "gateway",
                    "setting": "gateway.stdio.token_file",
                    "path": path,
                    "error": str(err),
                }
            },
        )
        return ""


def stdio_caller(config: Config) -> Callable[[ServerRequestContext[Any, Any]], Caller]:
    """Who is asking over stdio, read again for every request.

    Raises:
        ConfigError: multi-agent mode and ``gateway.stdio.agent_id`` names
            none of ``identity.agents``.
    """
    identity = config.identity
    stdio = config.gateway.stdio
    authorization = ""
    if identity.agents:
        agent = stdio.agent_id
        if agent not in identity.agents:
            raise ConfigError(
                "gateway.stdio.agent_id: expected one of identity.agents "
                f"({', '.join(sorted(identity.agents))}) in multi-agent mode, "
                f"got {agent!r}"
            )
        secret = identity.load_agent_secrets()[agent]
        authorization = f"Bearer {secret.decode()}"
    token_from = f"the environment variable {stdio.token_env}"
    if stdio.token_file:
        token_from += f" or the file {stdio.token_file} (gateway.stdio.token_file)"
    chain_from = f"the environment variable {stdio.asserted_chain_env}"
    development = identity.mode is IdentityMode.DEVELOPMENT

    def caller(_ctx: ServerRequestContext[Any, Any]) -> Caller:
        token = ""
        chain: tuple[str, ...] = ()
        if development:
            text = os.environ.get(stdio.asserted_chain_env, "")
            chain = tuple(p.strip() for p in text.split(",") if p.strip())
        else:
            token = os.environ.get(stdio.token_env, "").strip()
            token = token or _read_token_file(stdio.token_file)
        return Caller(
            authorization=authorization,
            delegation_token=token,
            asserted_chain=chain,
            peer="stdio",
            token_from=token_from,
            chain_from=chain_from,
        )

    return caller


def _error_line(message: str, data: dict[str, Any]) -> SessionMessage:
    error = types.JSONRPCError(
        jsonrpc="2.0",
        id=None,
        error=types.ErrorData(code=INVALID_REQUEST, message=message, data=data),
    )
    return SessionMessage(error)


class _Reader:
    """Splits the wire into lines, refusing oversized ones and batches."""

    def __init__(
        self,
        limit: int,
        to_server: MemoryObjectSendStream[SessionMessage | Exception],
        to_wire: MemoryObjectSendStream[SessionMessage],
        pipeline: Pipeline,
    ):
        self._limit = limit
        self._to_server = to_server
        self._to_wire = to_wire
        self._pipeline = pipeline

    async def run(self, read: Callable[[], Any]) -> None:
        buffer = bytearray()
        skipping = False
        async with self._to_server:
            while True:
                chunk = await read()
                if not chunk:
                    break
                while chunk:
                    end = chunk.find(b"\n")
                    part, chunk = (
                        (chunk, b"") if end < 0 else (chunk[:end], chunk[end + 1 :])
                    )
                    if skipping:
                        skipping = end < 0
                        continue
                    buffer += part
                    if len(buffer) > self._limit:
                        buffer.clear()
                        skipping = end < 0
                        await self._too_large()
                        continue
                    if end >= 0:
                        line = bytes(buffer)
                        buffer.clear()
                        await self._line(line)
            if buffer and not skipping:
                await self._line(bytes(buffer))

    async def _too_large(self) -> None:
        err = RequestTooLarge(
            f"message larger than gateway.max_message_bytes ({self._limit} bytes)",
            field="message",
        )
        self._pipeline.refuse(err)
        await self._to_wire.send(
            _error_line(
                f"message too large: more than gateway.max_message_bytes "
                f"({self._limit} bytes); it was skipped",
                {"code": "request_too_large", "limit": self._limit},
            )
        )

    async def _line(self, line: bytes) -> None:
        text = line.strip()
        if not text:
            return
        if text[:1] == b"[":
            await self._to_wire.send(
                _error_line(
                    "Invalid Request: JSON-RPC batches are not accepted; send one "
                    "message per line",
                    {"code": "invalid_request"},
                )
            )
            return
        try:
            message = types.jsonrpc_message_adapter.validate_json(text, by_name=False)
        except Exception as exc:
            # The SDK answers what it cannot parse, as over its own stdio.
            await self._to_server.send(exc)
            return
        await self._to_server.send(SessionMessage(message))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


async def _pipe_reader(fd: int) -> Callable[[], Any]:
    """A chunk reader for the wire: non-blocking on a pipe or socket, a
    worker thread for anything else (a regular file)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=READ_CHUNK_BYTES)
    try:
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader),
            os.fdopen(fd, "rb", buffering=0, closefd=False),
        )
    except ValueError:

        async def from_thread() -> bytes:
            return await anyio.to_thread.run_sync(os.read, fd, READ_CHUNK_BYTES)

        return from_thread
    return lambda: reader.read(READ_CHUNK_BYTES)


async def serve_stdio(
    config: Config, gateway: Gateway, pipeline: Pipeline, wire: StdioWire
) -> None:
    """Serve one agent over ``wire`` until it closes its end (EOF).

    Raises:
        ConfigError: the stdio agent is not configured (see ``stdio_caller``).
    """
    caller = stdio_caller(config)
    server = gateway.server(caller)
    options = server.create_initialization_options(
        NotificationOptions(tools_changed=True)
    )
    to_server, from_wire = anyio.create_memory_object_stream[
        SessionMessage | Exception
    ](16)
    to_wire, from_server = anyio.create_memory_object_stream[SessionMessage](16)
    refusals = to_wire.clone()
    reader = _Reader(config.gateway.max_message_bytes, to_server, refusals, pipeline)
    read = await _pipe_reader(wire.read_fd)

    async def write_out() -> None:
        async with from_server:
            async for message in from_server:
                line = message.message.model_dump_json(
                    by_alias=True, exclude_unset=True
                )
                await anyio.to_thread.run_sync(
                    _write_all, wire.write_fd, line.encode() + b"\n"
                )

    async def read_in() -> None:
        try:
            await reader.run(read)
        finally:
            await refusals.aclose()

    async with anyio.create_task_group() as group:
        group.start_soon(write_out)
        group.start_soon(read_in)
        try:
            await server.run(from_wire, to_wire, options)
        finally:
            with contextlib.suppress(Exception):
                await to_wire.aclose()
    log.info(
        "stdio gateway closed by the agent",
        extra={"fields": {"component": "gateway"}},
    )
