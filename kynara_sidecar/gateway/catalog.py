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
  a call or a probe saw the connection closed) -> the upstream's tools are
  absent, ``on_change`` is called, and the task reconnects with capped
  exponential backoff. An upstream unreachable at ``start`` is logged and
  retried the same way; its tools appear, with ``on_change``, when it comes.
- ``stop`` asks each task to leave its context managers (which ends stdio
  children) and waits for it.

How a lost upstream is noticed without a call: a stdio child's pipe ends;
a 2026 HTTP upstream's listen stream ends. Two kinds of HTTP upstream have
no such stream, so the task probes them every ``min(timeout_seconds,
MAX_PING_SECONDS)``: a handshake-era (2025) one (the SDK transport retries
its standalone GET stream, then gives up, silently) with MCP ``ping``, and a
2026 one that does not advertise ``tools.listChanged`` (it has no listen
stream, and 2026 has no ``ping``) with ``server/discover``, which every 2026
server answers and which changes nothing. A probe that fails, is not
answered within ``timeout_seconds`` or is refused (a restarted server no
longer knows the session) ends the connection as a closed one does. An
upstream answering the probe with method-not-found has answered, so it is
alive.

A handshake-era HTTP upstream that restarted answers the gateway's session
id with HTTP 404 (JSON-RPC -32600 "Session not found"): the transport's
responses are watched for that, and a call, a probe or a re-list refused
so ends the connection (the call fails ``upstream_unavailable``), and the
task connects afresh with a new session. A -32600 without that 404 is the
upstream's own answer, passed on as any other error.

The task's events coalesce: each kind (tools changed, connection closed,
stop) is queued at most once until the task takes it, so however many
changes arrive while it re-lists, a "closed" or a "stop" behind them is
never dropped, and one pending re-list covers every change before it.

A handshake-era HTTP upstream sends ``list_changed`` on that standalone GET
stream, and one sent while the stream is not open (before the SDK opens it
after the handshake, or between its reconnects) is lost. So each time the
stream opens (the upstream answers the GET with an event stream) the task
lists the tools once more; a change made before that shows in the new list,
one made after arrives on the stream. A re-list that finds the same tools
calls no ``on_change``.

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
import math
import os
import shlex
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import anyio
import anyio.abc
import httpx2
import mcp_types
import msgspec
import pydantic
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.client.subscriptions import SubscriptionLost
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import CONNECTION_CLOSED, INVALID_REQUEST, METHOD_NOT_FOUND
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from kynara_sidecar.config import UpstreamConfig, UpstreamTransport
from kynara_sidecar.errors import ConfigError
from kynara_sidecar.gateway.names import ToolName, tool_name

__all__ = [
    "UPSTREAM_ERROR",
    "UPSTREAM_INVALID",
    "UPSTREAM_UNAVAILABLE",
    "MAX_LIST_PAGES",
    "MAX_PING_SECONDS",
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
# An HTTP upstream without a stream that ends with it (handshake-era, or 2026
# without tools.listChanged) is probed every min(timeout_seconds, this): one
# that went away is noticed within about that, at one small POST each.
MAX_PING_SECONDS = 10.0
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

# UpstreamError.reason values.
UPSTREAM_ERROR = "upstream_error"
UPSTREAM_UNAVAILABLE = "upstream_unavailable"
UPSTREAM_INVALID = "upstream_invalid"

_CHANGED = "changed"
_CLOSED = "closed"
_STOP = "stop"
_EVENTS = (_CHANGED, _CLOSED, _STOP)
# The header a handshake-era Streamable HTTP request carries its session in.
_SESSION_HEADER = "mcp-session-id"


class CatalogTool(msgspec.Struct, frozen=True):
    """One upstream tool as the gateway offers it."""

    name: ToolName
    # As the upstream listed it, except ``name`` = ``name.exposed``.
    definition: mcp_types.Tool


class UpstreamError(Exception):
    """An upstream did not give a tool's result.

    ``reason`` is the stable code: ``upstream_error`` (it answered a
    JSON-RPC error, which ``error`` holds unchanged), ``upstream_unavailable``
    (not connected, unreachable, timed out, or the connection closed) or
    ``upstream_invalid`` (its answer is not a valid tool result). ``detail``
    says what happened; ``str()`` adds the server.
    """

    def __init__(
        self,
        server: str,
        reason: str,
        detail: str,
        *,
        error: mcp_types.ErrorData | None = None,
    ):
        self.server = server
        self.reason = reason
        self.detail = detail
        self.error = error
        super().__init__(f"upstream {server!r}: {detail}")


def _closed(err: MCPError) -> bool:
    """Whether ``err`` is the SDK saying the connection closed (its own
    ``CONNECTION_CLOSED`` error), not an upstream's answer with that code."""
    return (
        err.code == CONNECTION_CLOSED
        and err.error.message == "Connection closed"
        and err.error.data is None
    )


def _session_refused(err: MCPError, upstream: _Upstream) -> bool:
    """Whether ``err`` is the SDK's -32600 for an HTTP 404 to the current
    session id (the upstream no longer knows the session), not an
    upstream's own -32600 answer."""
    return err.code == INVALID_REQUEST and upstream.session_lost


def _brief(err: BaseException) -> str:
    """One line saying what was wrong with an upstream's answer: for a
    validation error, each field and what it expected (at most three)."""
    if isinstance(err, pydantic.ValidationError):
        found = [
            f"{'.'.join(str(part) for part in item['loc']) or '(result)'}: "
            f"{item['msg']}"
            for item in err.errors(include_url=False)
        ]
        more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
        return "; ".join(found[:3]) + more
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _cause(err: BaseException) -> str:
    """A one-line description of ``err``, looking inside exception groups."""
    while isinstance(err, BaseExceptionGroup) and len(err.exceptions) == 1:
        err = err.exceptions[0]
    if isinstance(err, MCPError):
        return f"error {err.code}: {err.error.message}"
    text = str(err)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class _WatchedReadStream:
    """A transport's read stream that reports its end (the peer is gone)
    and logs what the upstream sent that is not JSON-RPC (the transport
    hands it on as an exception, which the SDK drops)."""

    def __init__(self, stream: Any, server: str, on_end: Callable[[], None]):
        self._stream = stream
        self._server = server
        self._on_end = on_end

    def __getattr__(self, name: str) -> Any:
        # last_context and whatever else the dispatcher reads.
        return getattr(self._stream, name)

    async def receive(self) -> Any:
        try:
            item = await self._stream.receive()
        except (
            anyio.EndOfStream,
            anyio.ClosedResourceError,
            anyio.BrokenResourceError,
        ):
            self._on_end()
            raise
        if isinstance(item, Exception):
            log.warning(
                "upstream sent a message that is not JSON-RPC; ignored",
                extra={"fields": {"server": self._server, "error": _brief(item)}},
            )
        return item

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
        # Why the current connection ended, when the gateway itself saw it (a
        # failed probe, a call refused for a lost session); "" otherwise.
        self.ended = ""
        # Whether the upstream answered HTTP 404 to a request carrying the
        # current connection's session id: it no longer knows the session.
        self.session_lost = False
        # The last failure logged at ERROR; the same one again is logged at
        # DEBUG, so an upstream that stays down does not flood the log.
        self.last_failure = ""
        # Coalescing: each kind is queued at most once (``pending``) until
        # ``next_event`` takes it, so the queue never fills and no kind is
        # dropped behind another; one pending "changed" is as good as many.
        self.pending: set[str] = set()
        self.send, self.receive = anyio.create_memory_object_stream[str](len(_EVENTS))

    def signal(self, event: str) -> None:
        """Queue ``event`` for the task, unless it is already queued."""
        if event in self.pending:
            return
        try:
            self.send.send_nowait(event)
        except (anyio.WouldBlock, anyio.ClosedResourceError):
            return  # closed: the task is gone; full cannot happen
        self.pending.add(event)

    async def next_event(self) -> str:
        """The next queued event; the same kind may be queued again."""
        event = await self.receive.receive()
        self.pending.discard(event)
        return event

    def close_events(self) -> None:
        self.send.close()
        self.receive.close()

    @property
    def target(self) -> str:
        """What the gateway starts or reaches: the command line or the URL."""
        if self.config.transport is UpstreamTransport.STDIO:
            return shlex.join(self.config.command)
        return self.config.url


class Catalog:
    """Every upstream's tools, kept current, and the way to call them.

    Args:
        servers: ``gateway.servers``: upstream name -> its config.
        on_change: called with the server's name whenever its tools change
            (appear, differ on a re-list, or go absent); runs on the event
            loop, must not block.
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

    def present(self, server: str) -> bool:
        """Whether ``server`` is connected and its tools are listed."""
        upstream = self._upstreams.get(server)
        return upstream is not None and upstream.tools is not None

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
        self, tool: CatalogTool, arguments: dict[str, Any] | None
    ) -> mcp_types.CallToolResult:
        """Call ``tool`` on its upstream, by the upstream's own tool name.

        The arguments go unchanged and the upstream's result comes back
        unchanged. Cancelling the caller cancels the upstream request (the
        upstream is told) and the cancellation propagates. The agent's
        request ``_meta`` (a progress token, say) is not passed on: the
        gateway relays no progress.

        NOTE: an upstream's answer is read whole, however large;
        ``gateway.max_message_bytes`` bounds only what agents send. The MCP
        SDK reads it before the gateway sees it: over stdio its reader
        joins chunks until a newline, with no bound; over streamable HTTP
        a JSON answer is read whole (``response.aread()``), and an answer
        sent as server-sent events is bounded per event only, by the
        SDK's ``max_sse_event_size`` (1 MiB by default). Bounding the
        rest needs a transport of the gateway's own in place of the SDK's.

        Raises:
            UpstreamError: the upstream answered a JSON-RPC error
                (``upstream_error``); is not connected, did not answer within
                its ``timeout_seconds`` or the connection closed
                (``upstream_unavailable``); or answered something that is
                not a valid tool result (``upstream_invalid``).
        """
        server = tool.name.server
        upstream = self._upstreams.get(server)
        client = upstream.client if upstream is not None else None
        if upstream is None or client is None:
            raise UpstreamError(server, UPSTREAM_UNAVAILABLE, "not connected")
        timeout = upstream.config.timeout_seconds
        what = f"tools/call {tool.name.tool!r}"
        try:
            # The gateway's own deadline rather than the SDK's, whose
            # timeout error could not be told from an upstream's own
            # -32001; cancelling the request tells the upstream.
            with anyio.fail_after(timeout):
                return await client.call_tool(
                    tool.name.tool, arguments, read_timeout_seconds=math.inf
                )
        except TimeoutError:
            raise UpstreamError(
                server, UPSTREAM_UNAVAILABLE, f"{what} timed out after {timeout:g} s"
            ) from None
        except MCPError as err:
            if _closed(err):
                upstream.signal(_CLOSED)
                raise UpstreamError(
                    server, UPSTREAM_UNAVAILABLE, f"{what}: connection closed"
                ) from err
            if _session_refused(err, upstream):
                detail = (
                    f"{what}: the upstream no longer knows the session "
                    f"(error {err.code}: {err.error.message}); reconnecting"
                )
                upstream.ended = upstream.ended or detail
                upstream.signal(_CLOSED)
                raise UpstreamError(server, UPSTREAM_UNAVAILABLE, detail) from err
            raise UpstreamError(
                server,
                UPSTREAM_ERROR,
                f"{what} failed: error {err.code}: {err.error.message}",
                error=err.error,
            ) from err
        except (OSError, httpx2.HTTPError, anyio.BrokenResourceError) as err:
            upstream.signal(_CLOSED)
            raise UpstreamError(
                server, UPSTREAM_UNAVAILABLE, f"{what} failed: {_cause(err)}"
            ) from err
        except anyio.ClosedResourceError as err:
            upstream.signal(_CLOSED)
            raise UpstreamError(
                server, UPSTREAM_UNAVAILABLE, f"{what}: connection closed"
            ) from err
        except (pydantic.ValidationError, RuntimeError) as err:
            # The SDK's checks of the answer: not a CallToolResult, structured
            # content against the tool's outputSchema, a shape it cannot use.
            raise UpstreamError(
                server,
                UPSTREAM_INVALID,
                f"{what} answered an invalid result: {_brief(err)}",
            ) from err

    # -- the connection's task -------------------------------------------

    async def _own(
        self, upstream: _Upstream, first: asyncio.Future[ConfigError | None]
    ) -> None:
        """Connect, serve and reconnect ``upstream`` until ``stop``."""
        delay = MIN_RETRY_SECONDS
        while not upstream.stopping:
            connected_at: float | None = None
            refused: ConfigError | None = None
            try:
                upstream.ended = ""
                upstream.session_lost = False
                async with self._connect(upstream) as client:
                    connected_at = time.monotonic()
                    upstream.last_failure = ""
                    # Returned, not raised: raised through the SDK's task
                    # groups it would come out wrapped in an exception group.
                    refused = await self._serve(upstream, client, first)
            except Exception as err:  # an upstream failing must not end the task
                if not upstream.stopping:
                    what = (
                        "upstream unreachable"
                        if connected_at is None
                        else ("upstream lost")
                    )
                    cause = _cause(err)
                    repeated = f"{what}: {cause}" == upstream.last_failure
                    upstream.last_failure = f"{what}: {cause}"
                    log.log(
                        logging.DEBUG if repeated else logging.ERROR,
                        what,
                        extra={
                            "fields": {
                                "server": upstream.server,
                                "target": upstream.target,
                                "error": cause,
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
            # Only a connection that lasted starts the backoff over: one
            # that dies at once (a crashing program) keeps backing off.
            if connected_at is not None and (
                time.monotonic() - connected_at >= MAX_RETRY_SECONDS
            ):
                delay = MIN_RETRY_SECONDS
            await self._wait_retry(upstream, delay)
            delay = min(delay * 2, MAX_RETRY_SECONDS)

    async def _wait_retry(self, upstream: _Upstream, delay: float) -> None:
        """Sleep ``delay`` seconds, or until stop; drop stale events."""
        with anyio.move_on_after(delay):
            while True:
                event = await upstream.next_event()
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
                    # A line that is not UTF-8 is then a line that is not
                    # JSON-RPC, dropped and logged; strict decoding would
                    # end the SDK's reader and leave the connection open
                    # but deaf, every later call timing out.
                    encoding_error_handler="replace",
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

                async def answered(response: httpx2.Response) -> None:
                    # HTTP 404 to a request carrying the session id: the
                    # upstream no longer knows the session (it restarted).
                    # The -32600 the SDK makes of it is then no answer of
                    # the upstream's, and ends the connection.
                    if (
                        response.status_code == 404
                        and _SESSION_HEADER in response.request.headers
                    ):
                        upstream.session_lost = True
                    # A GET answered with an event stream: on a handshake-era
                    # connection, the standalone stream for the upstream's
                    # own messages is open (again). A list_changed sent
                    # while it was not is lost, so list once more.
                    content_type = response.headers.get("content-type", "")
                    if (
                        response.request.method == "GET"
                        and response.status_code == 200
                        and content_type.startswith("text/event-stream")
                    ):
                        upstream.signal(_CHANGED)

                http.event_hooks = {"response": [answered]}
                transport = streamable_http_client(config.url, http_client=http)

            async def handle(message: Any) -> None:
                if isinstance(message, mcp_types.ToolListChangedNotification):
                    upstream.signal(_CHANGED)

            client = Client(
                _watched(transport, upstream.server, lambda: upstream.signal(_CLOSED)),
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
        modern = client.protocol_version in MODERN_PROTOCOL_VERSIONS
        capabilities = client.server_capabilities.tools
        listens = (
            modern and capabilities is not None and bool(capabilities.list_changed)
        )
        async with anyio.create_task_group() as group:
            if listens:
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
            if upstream.config.transport is UpstreamTransport.HTTP and not listens:
                group.start_soon(self._probe, upstream, client, modern)
            while True:
                event = await upstream.next_event()
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
                    if _session_refused(err, upstream):
                        upstream.ended = upstream.ended or (
                            f"tools/list refused: {_cause(err)}"
                        )
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
            raise ConnectionError(upstream.ended or "connection ended")
        return None

    async def _probe(self, upstream: _Upstream, client: Client, modern: bool) -> None:
        """On an HTTP connection without a stream that ends with the
        upstream: every ``min(timeout_seconds, MAX_PING_SECONDS)``, ping it
        (handshake-era) or send it ``server/discover`` (2026, which has no
        ping); the first probe that fails ends the connection (``_CLOSED``),
        saying why in ``ended``."""
        timeout = upstream.config.timeout_seconds
        interval = min(timeout, MAX_PING_SECONDS)
        what = "server/discover" if modern else "ping"
        while True:
            await anyio.sleep(interval)
            try:
                # Both bounded by the client's read timeout, timeout_seconds.
                if modern:
                    # Through the session's request path, stamped for the
                    # negotiated version; the answer is not adopted.
                    await client.session.send_request(
                        mcp_types.DiscoverRequest(), mcp_types.DiscoverResult
                    )
                else:
                    # The session's own ping: the Client's is deprecated for
                    # 2026, which has none; this connection is handshake-era.
                    await client.session.send_ping()
            except MCPError as err:
                if err.code == METHOD_NOT_FOUND:
                    continue  # it answered: alive, just without the method
                upstream.ended = f"{what} failed: {_cause(err)}"
            except Exception as err:  # whatever broke, the upstream is gone
                upstream.ended = f"{what} failed: {_cause(err)}"
            else:
                continue
            upstream.signal(_CLOSED)
            return

    async def _listen(
        self,
        upstream: _Upstream,
        client: Client,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """On a 2026 connection whose upstream advertises
        ``tools.listChanged``: turn tools list-changed events into re-lists;
        the stream's end is the connection's. Started once the upstream
        acknowledged the subscription."""
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
        if tools == upstream.tools:
            return  # the same tools again (a re-list): no change
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
async def _watched(
    transport: Any, server: str, on_end: Callable[[], None]
) -> AsyncIterator[Any]:
    """``transport`` (of upstream ``server``) with a read stream that calls
    ``on_end`` at its end."""
    async with transport as (read_stream, write_stream):
        yield _WatchedReadStream(read_stream, server, on_end), write_stream
