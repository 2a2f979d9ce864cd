"""The upstream side of the MCP gateway: every upstream server's tools.

A ``Catalog`` keeps one connection per upstream (``gateway.servers``), made
with the MCP SDK's ``Client`` over stdio (the server runs as a child) or
Streamable HTTP, and the tools each upstream lists, named by
``names.tool_name``. The proxy reads ``tools()`` to answer agents and sends
allowed calls through ``call``.

How a connection is run:

- One asyncio task owns each upstream's connection: it enters the SDK's
  async context managers (anyio-based: transport, session, task groups),
  serves, and exits them, always from that task. Callers only send requests
  over the open session.
- After connecting, the task lists every tool, across pages, and installs
  them (``_install``). Two tools anywhere in the gateway with one exposed
  name or one resource id, or a tool without a name, are refused: at
  ``start`` as a ``ConfigError`` naming both tools and servers; later (a
  re-list, a reconnect) the upstream's previous tools stay (none, when it
  had none) and the refusal is logged at ERROR.
- It then waits for events: the upstream's tool list changed (a
  ``notifications/tools/list_changed`` on a handshake-era connection, an
  event on the ``subscriptions/listen`` stream on a 2026 one) -> re-list;
  the connection ended (the stdio child exited, the HTTP server went away,
  a call saw the connection closed) -> the upstream's tools are absent,
  ``on_change`` is called, and the task reconnects with capped exponential
  backoff. An upstream unreachable at ``start`` is logged and retried the
  same way; its tools appear, with ``on_change``, when it comes.
- ``stop`` asks each task to leave its context managers (which ends stdio
  children) and waits for it.

TODO(#8): a handshake-era (2025) Streamable HTTP upstream that goes away is
noticed only by the next call to it (its SDK transport keeps retrying the
standalone GET stream silently), and a list_changed it sends before that
stream is open is lost; 2026 upstreams and stdio children are noticed at
once (the listen stream or the pipe ends).

Every upstream request (connect, ``tools/list``, ``tools/call``) is bounded
by the server's ``timeout_seconds``. A caller's cancellation of ``call``
makes the SDK send the upstream ``notifications/cancelled`` for that request
(or, on a 2026 HTTP connection, abort the request's POST) before the
cancellation propagates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import anyio
import anyio.abc
import httpx2
import mcp_types
import msgspec
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.client.subscriptions import SubscriptionLost
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import CONNECTION_CLOSED
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from kynara_sidecar.config import UpstreamConfig, UpstreamTransport
from kynara_sidecar.errors import ConfigError
from kynara_sidecar.gateway.names import ToolName, tool_name

__all__ = [
    "MAX_LIST_PAGES",
    "MAX_RETRY_SECONDS",
    "MIN_RETRY_SECONDS",
    "Catalog",
    "CatalogTool",
    "UpstreamError",
]

log = logging.getLogger("kynara.gateway")

# Reconnect backoff: first retry soon (a server restarting is back within
# a second), doubling to a cap that keeps a long outage cheap yet noticed.
MIN_RETRY_SECONDS = 0.25
MAX_RETRY_SECONDS = 10.0
# tools/list pages followed per listing; an upstream whose cursors never end
# is refused rather than followed forever.
MAX_LIST_PAGES = 1000
# How long stop() waits for a connection's task to leave its context
# managers (the SDK bounds a stdio child's shutdown at about 6 s) before it
# cancels the task.
STOP_GRACE_SECONDS = 15.0
# Environment the stdio child inherits besides the SDK's default set (PATH,
# HOME, USER, ...): the locale's, so a child decodes text as the daemon does.
_LOCALE_ENV = ("LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "LC_MESSAGES")

_CHANGED = "changed"
_CLOSED = "closed"
_STOP = "stop"


class CatalogTool(msgspec.Struct, frozen=True):
    """One upstream tool as the gateway offers it."""

    name: ToolName
    # As the upstream listed it, except ``name`` = ``name.exposed``.
    definition: mcp_types.Tool


class UpstreamError(Exception):
    """An upstream could not answer: unreachable, timed out, or it answered
    a JSON-RPC error (``code``, ``message`` and ``data`` are then its own).

    ``str()`` says what went wrong and on which server.
    """

    def __init__(
        self,
        server: str,
        message: str,
        *,
        code: int | None = None,
        upstream_message: str = "",
        data: Any = None,
    ):
        self.server = server
        self.code = code
        self.message = upstream_message
        self.data = data
        super().__init__(f"upstream {server!r}: {message}")


def _cause(err: BaseException) -> str:
    """A one-line description of ``err``, looking inside exception groups."""
    while isinstance(err, BaseExceptionGroup) and len(err.exceptions) == 1:
        err = err.exceptions[0]
    if isinstance(err, MCPError):
        return f"error {err.code}: {err.error.message}"
    text = str(err)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class _WatchedReadStream:
    """A transport's read stream that reports its end (the peer is gone)."""

    def __init__(self, stream: Any, on_end: Callable[[], None]):
        self._stream = stream
        self._on_end = on_end

    def __getattr__(self, name: str) -> Any:
        # last_context and whatever else the dispatcher reads.
        return getattr(self._stream, name)

    async def receive(self) -> Any:
        try:
            return await self._stream.receive()
        except (
            anyio.EndOfStream,
            anyio.ClosedResourceError,
            anyio.BrokenResourceError,
        ):
            self._on_end()
            raise

    async def aclose(self) -> None:
        await self._stream.aclose()

    def __aiter__(self) -> _WatchedReadStream:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> _WatchedReadStream:
        await self._stream.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> bool | None:
        return await self._stream.__aexit__(*exc)


class _Upstream:
    """One upstream's connection state, owned by its task."""

    def __init__(self, server: str, config: UpstreamConfig):
        self.server = server
        self.config = config
        # None while the upstream is absent (not connected, or refused).
        self.tools: tuple[CatalogTool, ...] | None = None
        self.client: Client | None = None
        self.task: asyncio.Task[None] | None = None
        self.stopping = False
        # Coalescing: one pending "changed" is as good as many.
        self.send, self.receive = anyio.create_memory_object_stream[str](16)

    def signal(self, event: str) -> None:
        with contextlib.suppress(anyio.WouldBlock, anyio.ClosedResourceError):
            self.send.send_nowait(event)

    def close_events(self) -> None:
        self.send.close()
        self.receive.close()


class Catalog:
    """Every upstream's tools, kept current, and the way to call them.

    Args:
        servers: ``gateway.servers``: upstream name -> its config.
        on_change: called with the server's name whenever its tools change
            (appear, are re-listed, or go absent); runs on the event loop,
            must not block.
    """

    def __init__(
        self,
        servers: Mapping[str, UpstreamConfig],
        *,
        on_change: Callable[[str], None] | None = None,
    ):
        self._upstreams = {
            server: _Upstream(server, config) for server, config in servers.items()
        }
        self._on_change = on_change
        self._tools: tuple[CatalogTool, ...] = ()
        self._by_exposed: dict[str, CatalogTool] = {}
        self._started = False

    # -- reading ---------------------------------------------------------

    def tools(self) -> tuple[CatalogTool, ...]:
        """Every present tool, sorted by exposed name."""
        return self._tools

    def get(self, exposed: str) -> CatalogTool | None:
        """The present tool agents call ``exposed``, or None."""
        return self._by_exposed.get(exposed)

    # -- lifecycle -------------------------------------------------------

    async def start(self) -> None:
        """Connect every upstream and list its tools.

        Returns once each upstream was tried once; those that could not be
        reached are logged at ERROR and retried in the background.

        Raises:
            ConfigError: two tools map to one exposed name or resource id, or
                an upstream lists a tool without a name; nothing is left
                running.
        """
        if self._started:
            raise RuntimeError("Catalog.start called twice")
        self._started = True
        loop = asyncio.get_running_loop()
        firsts: list[asyncio.Future[ConfigError | None]] = []
        for upstream in self._upstreams.values():
            first: asyncio.Future[ConfigError | None] = loop.create_future()
            firsts.append(first)
            upstream.task = loop.create_task(
                self._own(upstream, first), name=f"kynara-upstream-{upstream.server}"
            )
        refusals = [err for err in await asyncio.gather(*firsts) if err is not None]
        if refusals:
            await self.stop()
            raise refusals[0]

    async def stop(self) -> None:
        """Close every connection (ending stdio children) and its task."""
        for upstream in self._upstreams.values():
            upstream.stopping = True
            upstream.signal(_STOP)
        for upstream in self._upstreams.values():
            task = upstream.task
            if task is None:
                continue
            done, _ = await asyncio.wait({task}, timeout=STOP_GRACE_SECONDS)
            if not done:
                log.error(
                    "upstream connection did not close in time; cancelling it",
                    extra={"fields": {"server": upstream.server}},
                )
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            upstream.task = None
            upstream.close_events()

    # -- calling ---------------------------------------------------------

    async def call(
        self,
        tool: CatalogTool,
        arguments: dict[str, Any] | None,
        *,
        meta: dict[str, Any] | None = None,
    ) -> mcp_types.CallToolResult:
        """Call ``tool`` on its upstream, by the upstream's own tool name.

        The arguments go unchanged and the upstream's result comes back
        unchanged. Cancelling the caller cancels the upstream request (the
        upstream is told) and the cancellation propagates.

        Raises:
            UpstreamError: the upstream is not connected, did not answer
                within its ``timeout_seconds``, or answered a JSON-RPC error.
        """
        server = tool.name.server
        upstream = self._upstreams.get(server)
        client = upstream.client if upstream is not None else None
        if upstream is None or client is None:
            raise UpstreamError(server, "not connected")
        try:
            return await client.call_tool(
                tool.name.tool,
                arguments,
                read_timeout_seconds=upstream.config.timeout_seconds,
                meta=meta,
            )
        except MCPError as err:
            if err.code == CONNECTION_CLOSED:
                upstream.signal(_CLOSED)
            raise UpstreamError(
                server,
                f"tools/call {tool.name.tool!r} failed: error {err.code}: "
                f"{err.error.message}",
                code=err.code,
                upstream_message=err.error.message,
                data=err.error.data,
            ) from err
        except (OSError, httpx2.HTTPError, anyio.BrokenResourceError) as err:
            upstream.signal(_CLOSED)
            raise UpstreamError(
                server, f"tools/call {tool.name.tool!r} failed: {_cause(err)}"
            ) from err
        except anyio.ClosedResourceError as err:
            upstream.signal(_CLOSED)
            raise UpstreamError(server, "connection closed") from err

    # -- the connection's task -------------------------------------------

    async def _own(
        self, upstream: _Upstream, first: asyncio.Future[ConfigError | None]
    ) -> None:
        """Connect, serve and reconnect ``upstream`` until ``stop``."""
        delay = MIN_RETRY_SECONDS
        while not upstream.stopping:
            connected = False
            refused: ConfigError | None = None
            try:
                async with self._connect(upstream) as client:
                    connected = True
                    delay = MIN_RETRY_SECONDS
                    # Returned, not raised: raised through the SDK's task
                    # groups it would come out wrapped in an exception group.
                    refused = await self._serve(upstream, client, first)
            except Exception as err:  # an upstream failing must not end the task
                if not upstream.stopping:
                    log.error(
                        "upstream unreachable" if not connected else "upstream lost",
                        extra={
                            "fields": {
                                "server": upstream.server,
                                "error": _cause(err),
                                "retry_seconds": delay,
                            }
                        },
                    )
            finally:
                upstream.client = None
                self._set_tools(upstream, None)
            if refused is not None:
                if not first.done():
                    first.set_result(refused)
                    return
                log.error(
                    "upstream tools refused",
                    extra={
                        "fields": {"server": upstream.server, "error": str(refused)}
                    },
                )
            if not first.done():
                first.set_result(None)
            if upstream.stopping:
                return
            await self._wait_retry(upstream, delay)
            delay = min(delay * 2, MAX_RETRY_SECONDS)

    async def _wait_retry(self, upstream: _Upstream, delay: float) -> None:
        """Sleep ``delay`` seconds, or until stop; drop stale events."""
        with anyio.move_on_after(delay):
            while True:
                event = await upstream.receive.receive()
                if event == _STOP:
                    return

    @contextlib.asynccontextmanager
    async def _connect(self, upstream: _Upstream) -> AsyncIterator[Client]:
        """The SDK client for ``upstream``, connected, until the block ends."""
        config = upstream.config
        async with contextlib.AsyncExitStack() as stack:
            if config.transport is UpstreamTransport.STDIO:
                env = {k: os.environ[k] for k in _LOCALE_ENV if k in os.environ}
                params = StdioServerParameters(
                    command=config.command[0],
                    args=list(config.command[1:]),
                    env=env | dict(config.env),
                    cwd=config.cwd or None,
                )
                transport: Any = stdio_client(params, errlog=sys.stderr)
            else:
                http = create_mcp_http_client(
                    headers=dict(config.headers),
                    # Per request, the SDK's read timeout applies; the HTTP
                    # read itself may idle (a listen stream waits for events).
                    timeout=httpx2.Timeout(config.timeout_seconds, read=None),
                )
                await stack.enter_async_context(http)
                transport = streamable_http_client(config.url, http_client=http)

            async def handle(message: Any) -> None:
                if isinstance(message, mcp_types.ToolListChangedNotification):
                    upstream.signal(_CHANGED)

            client = Client(
                _watched(transport, lambda: upstream.signal(_CLOSED)),
                mode="auto",
                cache=None,
                read_timeout_seconds=config.timeout_seconds,
                message_handler=handle,
            )
            await stack.enter_async_context(client)
            yield client

    async def _serve(
        self,
        upstream: _Upstream,
        client: Client,
        first: asyncio.Future[ConfigError | None],
    ) -> ConfigError | None:
        """List and install ``upstream``'s tools, then follow its changes
        until the connection ends or ``stop``.

        Returns:
            Why its tools were refused (then at once), else None at ``stop``.

        Raises:
            ConnectionError: the connection ended.
        """
        async with anyio.create_task_group() as group:
            if client.protocol_version in MODERN_PROTOCOL_VERSIONS:
                # Listening before listing: a change made in between is seen.
                await group.start(self._listen, upstream, client)
            tools = await self._list(upstream, client)
            upstream.client = client
            try:
                self._install(upstream, tools)
            except ConfigError as err:
                group.cancel_scope.cancel()
                return err
            if not first.done():
                first.set_result(None)
            async for event in upstream.receive:
                if event in (_STOP, _CLOSED):
                    break
                try:
                    tools = await self._list(upstream, client)
                except MCPError as err:
                    log.error(
                        "upstream tools could not be re-listed",
                        extra={
                            "fields": {"server": upstream.server, "error": _cause(err)}
                        },
                    )
                    if err.code == CONNECTION_CLOSED:
                        break
                    continue
                try:
                    self._install(upstream, tools)
                except ConfigError as err:
                    log.error(
                        "upstream tools refused; keeping the previous list",
                        extra={
                            "fields": {"server": upstream.server, "error": str(err)}
                        },
                    )
            group.cancel_scope.cancel()
        if not upstream.stopping:
            raise ConnectionError("connection ended")
        return None

    async def _listen(
        self,
        upstream: _Upstream,
        client: Client,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """On a 2026 connection: turn tools list-changed events into
        re-lists; the stream's end is the connection's. Started once the
        upstream acknowledged the subscription."""
        capabilities = client.server_capabilities.tools
        if capabilities is None or not capabilities.list_changed:
            task_status.started()
            return
        async with client.listen(tools_list_changed=True) as subscription:
            task_status.started()
            try:
                async for _event in subscription:
                    upstream.signal(_CHANGED)
            except (SubscriptionLost, MCPError, OSError, httpx2.HTTPError) as err:
                log.debug(
                    "upstream listen stream ended",
                    extra={"fields": {"server": upstream.server, "error": _cause(err)}},
                )
        upstream.signal(_CLOSED)

    async def _list(self, upstream: _Upstream, client: Client) -> list[mcp_types.Tool]:
        """Every tool ``upstream`` lists, following cursors."""
        tools: list[mcp_types.Tool] = []
        cursor: str | None = None
        for _ in range(MAX_LIST_PAGES):
            page = await client.list_tools(cursor=cursor)
            tools.extend(page.tools)
            cursor = page.next_cursor
            if cursor is None:
                return tools
        raise MCPError(
            mcp_types.INTERNAL_ERROR,
            f"tools/list did not end within {MAX_LIST_PAGES} pages",
        )

    # -- naming and collisions -------------------------------------------

    def _install(self, upstream: _Upstream, listed: list[mcp_types.Tool]) -> None:
        """Name ``listed`` and make it ``upstream``'s tools.

        Raises:
            ConfigError: a tool has no name, or two tools (of this upstream,
                or of it and another) get one exposed name or resource id;
                nothing changes.
        """
        section = f"gateway.servers.{upstream.server}"
        named: list[CatalogTool] = []
        for tool in listed:
            if not tool.name:
                raise ConfigError(
                    f"{section}: the upstream lists a tool without a name"
                )
            name = tool_name(upstream.server, tool.name, upstream.config.actions)
            definition = tool.model_copy(update={"name": name.exposed})
            named.append(CatalogTool(name=name, definition=definition))
        others = [
            tool
            for other in self._upstreams.values()
            if other is not upstream
            for tool in (other.tools or ())
        ]
        _check_collisions(others + named)
        self._set_tools(upstream, tuple(named))

    def _set_tools(
        self, upstream: _Upstream, tools: tuple[CatalogTool, ...] | None
    ) -> None:
        if upstream.tools is None and tools is None:
            return
        upstream.tools = tools
        every = sorted(
            (tool for each in self._upstreams.values() for tool in (each.tools or ())),
            key=lambda tool: tool.name.exposed,
        )
        self._tools = tuple(every)
        self._by_exposed = {tool.name.exposed: tool for tool in every}
        # Tools going away because the gateway stops are no change to announce.
        if self._on_change is not None and not upstream.stopping:
            try:
                self._on_change(upstream.server)
            except Exception:
                log.exception(
                    "gateway on_change failed",
                    extra={"fields": {"server": upstream.server}},
                )


def _check_collisions(tools: list[CatalogTool]) -> None:
    """Raise ``ConfigError`` naming the first two tools sharing a name."""
    exposed: dict[str, CatalogTool] = {}
    resources: dict[str, CatalogTool] = {}
    for tool in tools:
        for seen, key, what in (
            (exposed, tool.name.exposed, "tool name"),
            (resources, tool.name.resource_id, "resource id"),
        ):
            other = seen.setdefault(key, tool)
            if other is not tool:
                raise ConfigError(
                    f"gateway.servers: tool {other.name.tool!r} of server "
                    f"{other.name.server!r} and tool {tool.name.tool!r} of server "
                    f"{tool.name.server!r} both come out as {what} {key!r} "
                    "(names are escaped, see gateway/names.py); rename one "
                    "upstream tool or server"
                )


@contextlib.asynccontextmanager
async def _watched(transport: Any, on_end: Callable[[], None]) -> AsyncIterator[Any]:
    """``transport`` with a read stream that calls ``on_end`` at its end."""
    async with transport as (read_stream, write_stream):
        yield _WatchedReadStream(read_stream, on_end), write_stream
