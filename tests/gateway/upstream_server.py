"""A real MCP upstream server for the gateway's tests.

Tests run it as a program, the way operators run their MCP servers behind the
gateway: ``python tests/gateway/upstream_server.py --stdio`` (the gateway or a
test starts it as a stdio child) or ``... --http --port P`` (Streamable HTTP
on 127.0.0.1 only; ``tests/gateway/upstream_support.py`` starts and stops it).
It is built with the MCP SDK's low-level ``Server`` and speaks both protocol
eras (the initialize handshake and the 2026 per-request envelope).

Tools:

- ``read`` {path} -> text ``contents of <path>``
- ``write`` {path, content} -> text ``wrote <n> bytes to <path>``
- ``deploy`` {service, version, replicas} -> text ``deployed ...``
- ``slow`` {seconds} -> sleeps; when cancelled, logs ``{"tool": "slow",
  "cancelled": true}``
- ``add_tool`` {} -> adds the tool ``late`` and tells its clients that the
  tool list changed (``notifications/tools/list_changed``)

Every ``tools/call`` received is appended, before it runs, as one JSON line
``{"tool": name, "arguments": {...}}`` (and ``"progress_token"`` when the
request's ``_meta`` carries one) to the file named by the environment
variable ``UPSTREAM_CALL_LOG`` (when set), so a test can count what reached
the upstream even when the server is a stdio child of the gateway.

Flags: ``--extra-tools N`` adds ``extra_000``.. tools; ``--page-size K``
makes ``tools/list`` answer K tools per page (clients must follow cursors);
``--dotted`` adds ``get.file``; ``--collide`` adds both ``get.file`` and
``get_2Efile``, which the gateway's escape rule maps to one name;
``--handshake-only`` refuses ``server/discover`` as a server from before the
2026 protocol does, so clients fall back to the initialize handshake;
``--empty-name`` adds a tool whose name is empty (which the gateway refuses);
``--no-listen`` serves no ``subscriptions/listen``, so a 2026 client sees no
``tools.listChanged`` and has no stream that would end with the server;
``--no-get-stream`` (over HTTP) answers a session's standalone GET stream
with 405, as a server that offers none does, so a handshake-era client
neither hears list_changed nor re-lists when that stream opens;
``--announce-early`` (over HTTP) adds ``late`` and announces it to the
client while answering its first ``tools/list`` (the answer itself lacks
``late``), and answers a client's standalone GET stream (a GET carrying a
session id: where a handshake-era client hears list_changed) only after
that, so the announcement finds no stream open and is lost, as one sent
before a client opens its stream is;
``--faulty`` adds tools that misbehave: ``fail`` answers the JSON-RPC error
``FAIL_CODE`` "failed on purpose" with data ``{"asked": true}``,
``malformed`` answers ``{"content": "notalist", "isError": "yes"}`` (no
valid tool result; over stdio only), and ``garbage`` first writes the bytes
``\xff\xfe garbage`` and a newline on stdout (not UTF-8, so not a JSON-RPC
line), then answers ``garbage`` as text.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
from typing import Any

import anyio
import mcp_types as types
from mcp.server import Server
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import NotificationOptions
from mcp.server.models import InitializationOptions
from mcp.server.session import ServerSession
from mcp.server.subscriptions import InMemorySubscriptionBus, ListenHandler
from mcp.shared.exceptions import MCPError
from mcp.shared.subscriptions import ToolsListChanged
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

logger = logging.getLogger("upstream")

# The code of the error the --faulty tool ``fail`` answers.
FAIL_CODE = -32050
# Where --faulty tools write around the SDK: over stdio the wire (which
# serve_stdio then leaves in place), over HTTP the process's log.
WIRE_FD = 1
# On SIGTERM over HTTP, how long open requests and streams (a 2026 client's
# subscriptions/listen, a session's GET stream) may run before the server
# closes them and exits. A listen stream never ends by itself, so without a
# bound the server outlives its test's stop() and is SIGKILLed 10 s later;
# either way the client sees the server gone, this way at once.
SHUTDOWN_GRACE_SECONDS = 0.5


def _string(description: str) -> dict[str, Any]:
    return {"type": "string", "description": description}


def _schema(properties: dict[str, Any], *required: str) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required)}


def _text(text: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)])


def _log_call(entry: dict[str, Any]) -> None:
    """Append ``entry`` as one JSON line to ``$UPSTREAM_CALL_LOG``, flushed."""
    path = os.environ.get("UPSTREAM_CALL_LOG")
    if not path:
        return
    with open(path, "a", encoding="utf-8") as log:
        log.write(json.dumps(entry, sort_keys=True) + "\n")
        log.flush()


class Upstream:
    """The tools, their handlers, and the clients to tell about changes."""

    def __init__(
        self,
        *,
        extra_tools: int,
        page_size: int,
        dotted: bool,
        collide: bool,
        empty_name: bool = False,
        faulty: bool = False,
        announce_early: bool = False,
    ) -> None:
        self.page_size = page_size
        self.announce_early = announce_early
        # Set once --announce-early announced (made at first use: it needs
        # the server's event loop).
        self._announced: anyio.Event | None = None
        self.tools: list[types.Tool] = [
            types.Tool(
                name="read",
                description="Read a file.",
                input_schema=_schema({"path": _string("file to read")}, "path"),
            ),
            types.Tool(
                name="write",
                description="Write a file.",
                input_schema=_schema(
                    {"path": _string("file to write"), "content": _string("text")},
                    "path",
                    "content",
                ),
            ),
            types.Tool(
                name="deploy",
                description="Deploy a service.",
                input_schema=_schema(
                    {
                        "service": _string("service name"),
                        "version": _string("version to deploy"),
                        "replicas": {"type": "integer"},
                    },
                    "service",
                    "version",
                    "replicas",
                ),
            ),
            types.Tool(
                name="slow",
                description="Sleep for a while.",
                input_schema=_schema({"seconds": {"type": "number"}}, "seconds"),
            ),
            types.Tool(
                name="add_tool",
                description="Add the tool 'late' and announce the change.",
                input_schema=_schema({}),
            ),
        ]
        for index in range(extra_tools):
            self.tools.append(
                types.Tool(
                    name=f"extra_{index:03d}",
                    description=f"Extra tool {index}.",
                    input_schema=_schema({}),
                )
            )
        if dotted or collide:
            self.tools.append(
                types.Tool(
                    name="get.file",
                    description="Get a file (dotted name).",
                    input_schema=_schema({"path": _string("file")}),
                )
            )
        if collide:
            self.tools.append(
                types.Tool(
                    name="get_2Efile",
                    description="Get a file (a name the escape rule also makes).",
                    input_schema=_schema({"path": _string("file")}),
                )
            )
        if faulty:
            for name, description in (
                ("fail", "Answer a JSON-RPC error."),
                ("malformed", "Answer a result that is no tool result."),
                ("garbage", "Write bytes that are not UTF-8 on stdout, then answer."),
            ):
                self.tools.append(
                    types.Tool(
                        name=name, description=description, input_schema=_schema({})
                    )
                )
        if empty_name:
            self.tools.append(
                types.Tool(name="", description="No name.", input_schema=_schema({}))
            )
        # Handshake-era connections, by a key per connection: their
        # standalone channel carries list_changed. 2026-era clients listen on
        # `subscriptions/listen` streams fed by the bus instead.
        self.sessions: dict[str, ServerSession] = {}
        self.bus = InMemorySubscriptionBus()
        self.listen = ListenHandler(self.bus)

    def _remember(self, ctx: ServerRequestContext[Any, Any]) -> None:
        if ctx.session.protocol_version in MODERN_PROTOCOL_VERSIONS:
            return
        request = ctx.request
        key = "stdio"
        if request is not None:
            headers = getattr(request, "headers", None)
            key = (headers or {}).get("mcp-session-id", "") or "http"
        self.sessions[key] = ctx.session

    def announced(self) -> anyio.Event:
        """Set once ``--announce-early`` made its announcement."""
        if self._announced is None:
            self._announced = anyio.Event()
        return self._announced

    async def list_tools(
        self,
        ctx: ServerRequestContext[Any, Any],
        params: types.PaginatedRequestParams | None,
    ) -> types.ListToolsResult:
        self._remember(ctx)
        result = self._page(params)
        if self.announce_early and not self.announced().is_set():
            await self.add_late_tool()
            self.announced().set()
        return result

    def _page(
        self, params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        """The page of tools ``params``' cursor asks for (all, unpaged)."""
        start = 0
        cursor = params.cursor if params is not None else None
        if cursor is not None:
            try:
                start = int(cursor)
            except ValueError:
                raise MCPError(types.INVALID_PARAMS, f"bad cursor {cursor!r}") from None
            if not 0 <= start <= len(self.tools):
                raise MCPError(types.INVALID_PARAMS, f"bad cursor {cursor!r}")
        if self.page_size <= 0:
            return types.ListToolsResult(tools=list(self.tools))
        end = start + self.page_size
        return types.ListToolsResult(
            tools=self.tools[start:end],
            next_cursor=str(end) if end < len(self.tools) else None,
        )

    async def call_tool(
        self,
        ctx: ServerRequestContext[Any, Any],
        params: types.CallToolRequestParams,
    ) -> types.CallToolResult:
        self._remember(ctx)
        arguments = dict(params.arguments or {})
        entry: dict[str, Any] = {"tool": params.name, "arguments": arguments}
        token = (ctx.meta or {}).get("progress_token")
        if token is not None:
            entry["progress_token"] = token
        _log_call(entry)
        name = params.name
        if name == "read":
            return _text(f"contents of {arguments.get('path')}")
        if name == "write":
            content = str(arguments.get("content", ""))
            return _text(
                f"wrote {len(content.encode('utf-8'))} bytes to {arguments.get('path')}"
            )
        if name == "deploy":
            return _text(
                f"deployed {arguments.get('service')} {arguments.get('version')} "
                f"x{arguments.get('replicas')}"
            )
        if name == "slow":
            try:
                await anyio.sleep(float(arguments.get("seconds", 0)))
            except anyio.get_cancelled_exc_class():
                _log_call({"tool": "slow", "cancelled": True})
                raise
            return _text(f"slept {arguments.get('seconds')}")
        if name == "add_tool":
            await self.add_late_tool()
            return _text("added late")
        if name == "fail":
            raise MCPError(FAIL_CODE, "failed on purpose", {"asked": True})
        if name == "malformed":
            # The SDK refuses to send an invalid result, so the response goes
            # straight to the pipe; the SDK's own (valid) response follows
            # and the client, already answered, drops it.
            response = {
                "jsonrpc": "2.0",
                "id": ctx.request_id,
                "result": {"content": "notalist", "isError": "yes"},
            }
            os.write(WIRE_FD, json.dumps(response).encode() + b"\n")
            return _text("malformed sent")
        if name == "garbage":
            # Straight to the pipe: the SDK's stdout writer flushes after
            # every message, so this line lands between two of them.
            os.write(WIRE_FD, b"\xff\xfe garbage\n")
            return _text("garbage")
        if any(tool.name == name for tool in self.tools):
            return _text(name)
        raise MCPError(types.INVALID_PARAMS, f"unknown tool {name!r}")

    async def add_late_tool(self) -> None:
        """Add ``late`` (once) and tell every client the list changed."""
        if not any(tool.name == "late" for tool in self.tools):
            self.tools.append(
                types.Tool(
                    name="late", description="Added later.", input_schema=_schema({})
                )
            )
        for key, session in list(self.sessions.items()):
            try:
                await session.send_tool_list_changed()
            except Exception as err:  # a client gone away: forget it
                logger.info("dropping client %s: %s", key, err)
                self.sessions.pop(key, None)
        await self.bus.publish(ToolsListChanged())


class UpstreamServer(Server[Any]):
    """The SDK server, advertising ``tools.listChanged`` on every transport."""

    def create_initialization_options(
        self,
        notification_options: NotificationOptions | None = None,
        experimental_capabilities: dict[str, dict[str, Any]] | None = None,
        extensions: dict[str, dict[str, Any]] | None = None,
    ) -> InitializationOptions:
        return super().create_initialization_options(
            notification_options or NotificationOptions(tools_changed=True),
            experimental_capabilities,
            extensions,
        )


async def _no_discover(
    ctx: ServerRequestContext[Any, Any], params: types.RequestParams
) -> types.DiscoverResult:
    raise MCPError(types.METHOD_NOT_FOUND, "Method not found")


def build(
    upstream: Upstream, *, handshake_only: bool = False, no_listen: bool = False
) -> UpstreamServer:
    server = UpstreamServer(
        "kynara-test-upstream",
        version="1.0",
        on_list_tools=upstream.list_tools,
        on_call_tool=upstream.call_tool,
        on_subscriptions_listen=None if no_listen else upstream.listen,
    )
    if handshake_only:
        server.add_request_handler("server/discover", types.RequestParams, _no_discover)
    return server


async def serve_stdio(
    server: UpstreamServer, handshake_only: bool, faulty: bool = False
) -> None:
    from mcp.server.runner import serve_loop
    from mcp.server.stdio import stdio_server

    options = server.create_initialization_options()
    stdout = None
    if faulty:
        # The SDK would move fd 1 off the wire while it serves (stray output
        # then misses it); the --faulty tools write to the wire on purpose.
        wire = os.fdopen(WIRE_FD, "wb", closefd=False)
        stdout = anyio.wrap_file(io.TextIOWrapper(wire, encoding="utf-8"))
    async with stdio_server(stdout=stdout) as (read_stream, write_stream):
        if not handshake_only:
            await server.run(read_stream, write_stream, options)
            return
        # The handshake-era loop alone, as a server from before 2026 runs.
        async with server.lifespan(server) as state:
            await serve_loop(
                server,
                read_stream,
                write_stream,
                lifespan_state=state,
                init_options=options,
            )


def serve_http(
    server: UpstreamServer, port: int, upstream: Upstream, no_get_stream: bool = False
) -> None:
    import uvicorn

    app = server.streamable_http_app(host="127.0.0.1")
    if upstream.announce_early:
        app = _streams_after_announcing(app, upstream)
    if no_get_stream:
        app = _without_get_stream(app)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS,
    )


def _streams_after_announcing(app: Any, upstream: Upstream) -> Any:
    """``app``, answering a session's standalone GET stream only once
    ``upstream`` announced (``--announce-early``)."""

    async def held(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            headers = dict(scope.get("headers") or [])
            if b"mcp-session-id" in headers:
                await upstream.announced().wait()
                # Let the transport route (and drop) the announcement before
                # the stream it would have gone to is opened.
                for _ in range(20):
                    await anyio.sleep(0)
        await app(scope, receive, send)

    return held


def _without_get_stream(app: Any) -> Any:
    """``app``, answering a session's standalone GET stream with 405
    (``--no-get-stream``)."""
    from starlette.responses import Response

    async def refused(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            headers = dict(scope.get("headers") or [])
            if b"mcp-session-id" in headers:
                response = Response(status_code=405, headers={"Allow": "POST"})
                await response(scope, receive, send)
                return
        await app(scope, receive, send)

    return refused


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--stdio", action="store_true")
    mode.add_argument("--http", action="store_true")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--extra-tools", type=int, default=0)
    parser.add_argument("--page-size", type=int, default=0)
    parser.add_argument("--dotted", action="store_true")
    parser.add_argument("--collide", action="store_true")
    parser.add_argument("--handshake-only", action="store_true")
    parser.add_argument("--empty-name", action="store_true")
    parser.add_argument("--faulty", action="store_true")
    parser.add_argument("--announce-early", action="store_true")
    parser.add_argument("--no-listen", action="store_true")
    parser.add_argument("--no-get-stream", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    upstream = Upstream(
        extra_tools=args.extra_tools,
        page_size=args.page_size,
        dotted=args.dotted,
        collide=args.collide,
        empty_name=args.empty_name,
        faulty=args.faulty,
        announce_early=args.announce_early,
    )
    server = build(
        upstream, handshake_only=args.handshake_only, no_listen=args.no_listen
    )
    if args.stdio:
        anyio.run(serve_stdio, server, args.handshake_only, args.faulty)
    else:
        serve_http(server, args.port, upstream, args.no_get_stream)


if __name__ == "__main__":
    main()
