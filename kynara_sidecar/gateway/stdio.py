"""The MCP gateway over the daemon's own stdin and stdout, for one agent.

``kynara-sidecar gateway --config F`` is started by the agent as its MCP
server. The agent served is ``gateway.stdio.agent_id`` (else
``identity.agent_id``); in multi-agent mode its secret from
``identity.agents`` is presented as its credential. The user's delegation
token is looked up on every request: the environment variable
``gateway.stdio.token_env`` when it is set and not blank, else the file
``gateway.stdio.token_file``. The environment is the one the process was
started with, so a token given there stays the same for the process's life
and the file is then never read; a token rewritten in the file is used from
the next request on. In development mode the asserted chain comes from
``gateway.stdio.asserted_chain_env`` (comma-separated, user first).

A reader sits in front of the SDK, and answers itself (id null, counted
with ``Pipeline.refuse``): a line longer than ``gateway.max_message_bytes``
(the limit is named and the rest of that line is skipped); a JSON-RPC batch
(a JSON array: one Invalid Request error, nothing of it is forwarded); a
line that is not JSON (Parse error, -32700, saying what is wrong: not
UTF-8, or where the JSON breaks), a last line cut off by the end of input
included; and JSON that is no JSON-RPC message (Invalid Request). The wire
is kept apart from everything else at start: fd 1 then points at stderr,
so nothing but MCP reaches the agent's stdout.
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
import pydantic
import pydantic_core
from anyio.streams.memory import MemoryObjectSendStream
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import NotificationOptions
from mcp.shared.exceptions import MCPError
from mcp.shared.message import SessionMessage

from kynara_sidecar.config import Config, IdentityMode
from kynara_sidecar.errors import ConfigError, InvalidRequest, RequestTooLarge
from kynara_sidecar.gateway.proxy import REQUEST_ERROR_CODE, Caller, Gateway
from kynara_sidecar.identity import split_asserted_chain
from kynara_sidecar.pipeline import Pipeline

__all__ = ["StdioWire", "serve_stdio", "stdio_caller"]

log = logging.getLogger("kynara.gateway")

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
            none of ``identity.agents``, or one without a bearer secret.
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
        secret = identity.load_agent_secrets().get(agent)
        if secret is None:
            # Config validation refuses this (``_check_stdio_agent``); kept
            # for a config built without it.
            raise ConfigError(
                "gateway.stdio.agent_id: expected an agent with a bearer secret "
                f"(the stdio gateway presents it), got {agent!r}, which has a "
                "client certificate (identity.agents.<id>.certificate_uri)"
            )
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
            try:
                chain = split_asserted_chain(text)
            except ValueError as err:
                raise MCPError(
                    REQUEST_ERROR_CODE,
                    f"{chain_from}: {err}",
                    {"code": "invalid_request", "field": "asserted_chain"},
                ) from None
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


def _error_line(code: int, message: str, data: dict[str, Any]) -> SessionMessage:
    error = types.JSONRPCError(
        jsonrpc="2.0",
        id=None,
        error=types.ErrorData(code=code, message=message, data=data),
    )
    return SessionMessage(error)


# How much of a parser's complaint goes into an answer: where and what,
# not an echo of the whole input.
MAX_COMPLAINT_CHARS = 300


class _Reader:
    """Splits the wire into lines, answering those the SDK must not see."""

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
                await self._line(bytes(buffer), last=True)

    async def _refuse(
        self,
        error: InvalidRequest | RequestTooLarge,
        code: int,
        message: str,
        data: dict[str, Any],
    ) -> None:
        self._pipeline.refuse(error)
        await self._to_wire.send(_error_line(code, message, data))

    async def _too_large(self) -> None:
        await self._refuse(
            RequestTooLarge(
                f"message larger than gateway.max_message_bytes ({self._limit} bytes)",
                field="message",
            ),
            types.INVALID_REQUEST,
            f"message too large: more than gateway.max_message_bytes "
            f"({self._limit} bytes); it was skipped",
            {"code": "request_too_large", "limit": self._limit},
        )

    async def _line(self, line: bytes, *, last: bool = False) -> None:
        text = line.strip()
        if not text:
            return
        if text[:1] == b"[":
            await self._refuse(
                InvalidRequest("JSON-RPC batch", field="message"),
                types.INVALID_REQUEST,
                "Invalid Request: JSON-RPC batches are not accepted; send one "
                "message per line",
                {"code": "invalid_request"},
            )
            return
        problem = _parse_problem(text)
        if problem is not None:
            if last:
                problem += " (the input ended before this line's newline)"
            await self._refuse(
                InvalidRequest(problem, field="message"),
                types.PARSE_ERROR,
                f"Parse error: {problem}",
                {"code": "invalid_request"},
            )
            return
        try:
            message = types.jsonrpc_message_adapter.validate_json(text, by_name=False)
        except pydantic.ValidationError as err:
            complaint = _shape_problem(text, err)
            await self._refuse(
                InvalidRequest(f"not a JSON-RPC message: {complaint}", field="message"),
                types.INVALID_REQUEST,
                f"Invalid Request: not a JSON-RPC 2.0 message: {complaint}",
                {"code": "invalid_request"},
            )
            return
        await self._to_server.send(SessionMessage(message))


def _parse_problem(text: bytes) -> str | None:
    """What keeps ``text`` from being JSON, or None when it is."""
    try:
        text.decode("utf-8")
    except UnicodeDecodeError as err:
        return (
            f"not UTF-8: byte 0x{text[err.start]:02x} at offset {err.start} "
            f"({err.reason})"
        )
    try:
        pydantic_core.from_json(text)
    except ValueError as err:
        return f"not JSON: {_complaint(err)}"
    return None


# The SDK's message models, as the reader names them in a complaint.
_MESSAGE_KINDS = {
    "JSONRPCRequest": "request",
    "JSONRPCNotification": "notification",
    "JSONRPCResponse": "response",
    "JSONRPCError": "error response",
}


def _shape_problem(text: bytes, err: pydantic.ValidationError) -> str:
    """One line on why JSON ``text`` is no JSON-RPC message: which kind of
    message it looks like and its first field that does not fit (the SDK's
    error lists every field of every kind)."""
    expected = "expected a JSON-RPC request, notification or response object"
    value = pydantic_core.from_json(text)
    if not isinstance(value, dict):
        kind = "an array" if isinstance(value, list) else f"a JSON {_json_kind(value)}"
        return f"{expected}, got {kind}"
    if "method" in value:
        model = "JSONRPCRequest" if "id" in value else "JSONRPCNotification"
    elif "error" in value:
        model = "JSONRPCError"
    elif "result" in value:
        model = "JSONRPCResponse"
    else:
        return f'{expected}; it has neither "method" nor "result" nor "error"'
    for item in err.errors(include_url=False):
        loc = item["loc"]
        if loc and loc[0] == model:
            field = ".".join(str(part) for part in loc[1:])
            where = f"field {field!r}" if field else "the message"
            return _complaint(
                f"as a JSON-RPC {_MESSAGE_KINDS[model]}, {where}: {item['msg']}"
            )
    return expected


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, str):
        return "string"
    return "number"


def _complaint(err: Exception | str) -> str:
    text = " ".join(str(err).split())
    if len(text) > MAX_COMPLAINT_CHARS:
        text = text[:MAX_COMPLAINT_CHARS] + "..."
    return text


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


async def _pipe_reader(
    fd: int,
) -> tuple[Callable[[], Any], Callable[[], None]]:
    """A chunk reader for the wire and what closes it: non-blocking on a
    pipe or socket, a worker thread for anything else (a regular file).
    Closing leaves ``fd`` itself open (the wire owns it)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=READ_CHUNK_BYTES)
    # The transport gets a descriptor of its own to close: uvloop's closes
    # the descriptor whatever the file object says.
    pipe = os.fdopen(os.dup(fd), "rb", buffering=0)
    try:
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe
        )
    except ValueError:
        pipe.close()

        async def from_thread() -> bytes:
            return await anyio.to_thread.run_sync(os.read, fd, READ_CHUNK_BYTES)

        return from_thread, lambda: None
    return lambda: reader.read(READ_CHUNK_BYTES), transport.close


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
    read, close_read = await _pipe_reader(wire.read_fd)

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
            close_read()
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
