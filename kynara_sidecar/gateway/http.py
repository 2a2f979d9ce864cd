"""The MCP gateway over Streamable HTTP, for agents on ``gateway.host:port``.

The SDK's Streamable HTTP app (sessions for the 2025-11-25 handshake
protocol, single exchanges for 2026-07-28) is served by uvicorn inside the
daemon's event loop, behind a guard that sees every request first:

- an identity header (``authorization``, ``gateway.token_header``,
  ``gateway.asserted_chain_header``) or a session header
  (``mcp-session-id``, ``mcp-protocol-version``) sent more than once is
  refused with 400 naming it: which copy counts is not the caller's guess
  to make (the guard and the SDK might pick different ones);
- multi-agent mode: ``authorization: Bearer <secret>`` must name an agent
  (``Pipeline.agent_of``), else 401 with a JSON-RPC error; a session stays
  bound to the agent that opened it;
- an asserted chain with an empty item is refused with 400;
- a new session past ``gateway.max_sessions_per_agent`` open sessions of
  the same agent is refused with 429; other agents are not affected. A
  request the guard expects to open a session is refused before it is
  served; any other response that hands out a session id the agent did
  not have is checked again when it starts, and past the cap that session
  is ended and the request answered 429 instead;
- a body declared (any method) or found (POST) larger than
  ``gateway.max_message_bytes`` is refused with 413 and a JSON-RPC error
  naming the limit; one not wholly received within
  ``gateway.body_timeout_seconds`` with 408;
- a JSON-RPC batch (a JSON array) is refused whole with Invalid Request
  (-32600); nothing of it reaches the SDK;
- the ``Caller`` (credential, delegation token or asserted chain from
  ``gateway.token_header`` / ``gateway.asserted_chain_header``, the peer
  address) rides on the request to the gateway's handlers.

Every refusal is counted (``Pipeline.refuse``). Below the guard, the
connection itself is bounded: at most ``gateway.max_connections`` are open
(one more is closed as soon as it is accepted), a connection that has not
sent a whole header block within ``gateway.header_timeout_seconds`` is
closed (uvicorn's keep-alive timer starts only after a first response, and
any trickled byte resets it), and an idle keep-alive connection is closed
after ``gateway.keep_alive_seconds``.

Only the bound address and ``localhost`` with the bound port are accepted
as Host (the SDK's DNS rebinding protection). Uvicorn installs no signal
handlers: the daemon owns them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

import h11
import uvicorn
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.context import ServerRequestContext
from mcp.server.streamable_http import (
    MCP_SESSION_ID_HEADER,
    StreamableHTTPServerTransport,
)
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.inbound import MCP_PROTOCOL_VERSION_HEADER
from mcp_types import INVALID_REQUEST
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from kynara_sidecar.config import GatewayConfig
from kynara_sidecar.errors import (
    IdentityInvalid,
    InvalidRequest,
    KynaraError,
    ListenerError,
    RequestError,
    RequestTooLarge,
)
from kynara_sidecar.gateway.proxy import REQUEST_ERROR_CODE, Caller, Gateway
from kynara_sidecar.identity import split_asserted_chain
from kynara_sidecar.pipeline import Pipeline

__all__ = ["GatewayHttp"]

log = logging.getLogger("kynara.gateway")

# Where the guard leaves the caller for the gateway's handlers.
CALLER_SCOPE_KEY = "kynara.caller"
# How long open streams get to end at stop before they are cut.
STOP_GRACE_SECONDS = 2.0
_SESSION_HEADER = MCP_SESSION_ID_HEADER.lower()
_VERSION_HEADER = MCP_PROTOCOL_VERSION_HEADER.lower()


def _rpc_error(code: int, message: str, data: dict[str, Any]) -> bytes:
    return json.dumps(
        {
            "jsonrpc": "2.0",
            "id": None,
            "error": {"code": code, "message": message, "data": data},
        }
    ).encode()


async def _respond(
    send: Send, status: int, body: bytes, *, close: bool = False
) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if close:
        # The rest of the request was not read: the connection cannot
        # carry another one.
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _Refusal(Exception):
    """A request the guard answers itself: the error counted, the HTTP
    status and the JSON-RPC error sent."""

    def __init__(
        self,
        error: RequestError,
        status: int,
        code: int,
        message: str,
        data: dict[str, Any],
        *,
        close: bool = False,
    ):
        super().__init__(message)
        self.error = error
        self.status = status
        self.body = _rpc_error(code, message, data)
        self.close = close


class _Guard:
    """The ASGI guard in front of the SDK app (see the module docstring).

    ``open_sessions`` is the SDK's live sessions by id, so that a session
    that ended (deleted, idle, crashed) no longer counts against its agent;
    ``end_session`` ends one of them (a session opened past the cap).

    NOTE: a second request with the JSON-RPC id of one still in flight on
    the same session is passed on, and the SDK then leaves the first
    unanswered (the client's own doing: ids must be unique among its
    requests in flight). Refusing it would need the session's in-flight
    ids, which only the SDK's dispatcher knows; the same holds over stdio.
    Each request is still authorized and audited on its own.
    """

    def __init__(
        self,
        app: ASGIApp,
        config: GatewayConfig,
        pipeline: Pipeline,
        open_sessions: Mapping[str, object],
        end_session: Callable[[str], Awaitable[None]],
        *,
        multi_agent: bool,
    ):
        self._app = app
        self._config = config
        self._pipeline = pipeline
        self._open_sessions = open_sessions
        self._end_session = end_session
        self._multi_agent = multi_agent
        # Per agent: the sessions it opened, and how many expected openings
        # are being served (counted too, so concurrent ones cannot
        # overshoot) until their response hands out the session id.
        self._sessions: dict[str, set[str]] = {}
        self._opening: dict[str, int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self._config.path:
            await self._app(scope, receive, send)
            return
        try:
            await self._guard(scope, receive, send)
        except _Refusal as refusal:
            self._pipeline.refuse(refusal.error)
            await _respond(send, refusal.status, refusal.body, close=refusal.close)

    async def _guard(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = self._headers(scope)
        authorization = headers.get("authorization", "")
        agent = self._agent(authorization)
        if agent is not None:
            # The SDK binds a session to the principal that opened it.
            scope["user"] = AuthenticatedUser(
                AccessToken(token="", client_id=agent, scopes=[])
            )
        scope[CALLER_SCOPE_KEY] = self._caller(scope, headers, authorization)
        declared = headers.get("content-length", "")
        # h11 has refused a content-length that is no number.
        if (
            declared.strip().isdigit()
            and int(declared) > self._config.max_message_bytes
        ):
            raise self._too_large()
        if scope["method"] != "POST":
            await self._serve(agent or "", scope, receive, send, reserved=False)
            return
        body = await self._read_body(receive)
        if body is None:
            return
        if body.lstrip()[:1] == b"[":
            raise _Refusal(
                InvalidRequest("JSON-RPC batch", field="body"),
                400,
                INVALID_REQUEST,
                "Invalid Request: JSON-RPC batches are not accepted; send "
                "one message per request",
                {"code": "invalid_request"},
            )
        replay = _replay(body, receive)
        opens = _SESSION_HEADER not in headers and _opens_session(headers)
        await self._serve(agent or "", scope, replay, send, reserved=opens)

    def _headers(self, scope: Scope) -> dict[str, str]:
        """The request's headers, lower-cased names; an identity or
        session header sent twice is refused rather than one copy picked."""
        cfg = self._config
        identity = {
            "authorization",
            cfg.token_header.lower(),
            cfg.asserted_chain_header.lower(),
            _SESSION_HEADER,
            _VERSION_HEADER,
        }
        headers: dict[str, str] = {}
        for raw_key, raw_value in scope["headers"]:
            key = raw_key.decode("latin-1").lower()
            if key in identity and key in headers:
                raise _Refusal(
                    InvalidRequest(f"header {key!r} sent more than once", field=key),
                    400,
                    INVALID_REQUEST,
                    f"Invalid Request: the {key!r} header was sent more than "
                    "once; send it once",
                    {"code": "invalid_request", "field": key},
                )
            headers[key] = raw_value.decode("latin-1")
        return headers

    def _agent(self, authorization: str) -> str | None:
        """The calling agent in multi-agent mode, else None."""
        if not self._multi_agent:
            return None
        try:
            return self._pipeline.agent_of(authorization)
        except KynaraError as err:
            raise _Refusal(
                err
                if isinstance(err, RequestError)
                else IdentityInvalid(str(err), field="authorization"),
                401,
                REQUEST_ERROR_CODE,
                f"{err}; send `authorization: Bearer <the agent's secret>`",
                {"code": "identity_invalid", "field": "authorization"},
            ) from None

    def _caller(
        self, scope: Scope, headers: dict[str, str], authorization: str
    ) -> Caller:
        client = scope.get("client")
        peer = f"{client[0]}:{client[1]}" if client else ""
        cfg = self._config
        name = cfg.asserted_chain_header.lower()
        try:
            chain = split_asserted_chain(headers.get(name, ""))
        except ValueError as err:
            raise _Refusal(
                InvalidRequest(str(err), field="asserted_chain"),
                400,
                REQUEST_ERROR_CODE,
                f"the {cfg.asserted_chain_header!r} header: {err}",
                {"code": "invalid_request", "field": "asserted_chain"},
            ) from None
        return Caller(
            authorization=authorization,
            delegation_token=headers.get(cfg.token_header.lower(), "").strip(),
            asserted_chain=chain,
            peer=peer,
            token_from=f"the {cfg.token_header!r} header",
            chain_from=f"the {cfg.asserted_chain_header!r} header",
        )

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or None when the client went away.

        Raises:
            _Refusal: found larger than the limit (413), or not received
                within ``body_timeout_seconds`` (408).
        """
        seconds = self._config.body_timeout_seconds
        try:
            async with asyncio.timeout(seconds):
                return await self._receive_body(receive)
        except TimeoutError:
            raise _Refusal(
                InvalidRequest(
                    f"body not received within gateway.body_timeout_seconds "
                    f"({seconds:g} s)",
                    field="body",
                ),
                408,
                INVALID_REQUEST,
                f"request timeout: the body was not received within "
                f"gateway.body_timeout_seconds ({seconds:g} s)",
                {"code": "invalid_request", "field": "body", "limit": seconds},
                close=True,
            ) from None

    async def _receive_body(self, receive: Receive) -> bytes | None:
        limit = self._config.max_message_bytes
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self) -> _Refusal:
        limit = self._config.max_message_bytes
        return _Refusal(
            RequestTooLarge(
                f"message larger than gateway.max_message_bytes ({limit} bytes)",
                field="body",
            ),
            413,
            INVALID_REQUEST,
            f"message too large: more than gateway.max_message_bytes ({limit} bytes)",
            {"code": "request_too_large", "limit": limit},
            close=True,
        )

    async def _serve(
        self,
        agent: str,
        scope: Scope,
        receive: Receive,
        send: Send,
        *,
        reserved: bool,
    ) -> None:
        """Pass the request on, keeping the agent within its session cap.

        ``reserved``: the request is expected to open a session; it is
        refused now if the agent has no room, else holds a place until its
        response hands out the session id. Whatever the expectation, a
        response handing out a session id the agent did not have counts
        then: past the cap it is not sent, the new session is ended and
        the request is refused with 429.
        """
        if reserved:
            if self._full(agent):
                raise self._too_many(agent)
            self._opening[agent] = self._opening.get(agent, 0) + 1
        refused: list[str] = []

        async def watch(message: Message) -> None:
            nonlocal reserved
            if refused:
                return  # the response of a session refused at its start
            if message["type"] == "http.response.start" and message["status"] < 400:
                known = self._sessions.get(agent, set())
                new = [sid for sid in _session_ids(message) if sid not in known]
                if new:
                    if reserved:
                        reserved = False
                        self._opening[agent] -= 1
                    if self._full(agent, adding=len(new)):
                        refused.extend(new)
                        return
                    self._sessions.setdefault(agent, set()).update(new)
            await send(message)

        try:
            await self._app(scope, receive, watch)
        finally:
            if reserved:
                self._opening[agent] -= 1
            for sid in refused:
                await self._end_session(sid)
        if refused:
            raise self._too_many(agent)

    def _full(self, agent: str, *, adding: int = 1) -> bool:
        """Whether ``adding`` more sessions would put the agent past
        ``gateway.max_sessions_per_agent`` (sessions that ended are
        forgotten here)."""
        live = self._open_sessions
        sessions = {sid for sid in self._sessions.get(agent, ()) if sid in live}
        self._sessions[agent] = sessions
        held = len(sessions) + self._opening.get(agent, 0)
        return held + adding > self._config.max_sessions_per_agent

    def _too_many(self, agent: str) -> _Refusal:
        limit = self._config.max_sessions_per_agent
        who = f"agent {agent!r}" if agent else "this agent"
        return _Refusal(
            InvalidRequest(
                f"{who} has gateway.max_sessions_per_agent ({limit}) sessions open",
                field=MCP_SESSION_ID_HEADER,
            ),
            429,
            REQUEST_ERROR_CODE,
            f"too many sessions: {who} has gateway.max_sessions_per_agent "
            f"({limit}) open; end one (DELETE) or reuse one",
            {"code": "invalid_request", "limit": limit},
        )


def _session_ids(message: Message) -> list[str]:
    """The session ids a response start hands out."""
    return [
        value.decode("latin-1")
        for key, value in message.get("headers", [])
        if key.decode("latin-1").lower() == _SESSION_HEADER
    ]


def _opens_session(headers: dict[str, str]) -> bool:
    """A request without a session id that the SDK would serve by opening
    a session: one of the handshake era (a later protocol version in the
    header gets a single exchange and no session)."""
    version = headers.get(_VERSION_HEADER)
    return version is None or version in HANDSHAKE_PROTOCOL_VERSIONS


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the body read already, then the real stream
    (for the disconnect the SDK watches for)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _live_sessions(
    manager: StreamableHTTPSessionManager,
) -> Mapping[str, StreamableHTTPServerTransport]:
    """The sessions the SDK has open, by id.

    NOTE: the SDK (mcp 2.3) keeps them in ``_server_instances`` and offers
    no public view; it drops a session there however it ends (DELETE,
    idle timeout, crash), which is exactly when it stops counting against
    its agent. Checked at start so an SDK without it fails loudly rather
    than leaving sessions uncapped.
    """
    live = getattr(manager, "_server_instances", None)
    if not isinstance(live, dict):
        raise ListenerError(
            "gateway: this MCP SDK version does not expose its open sessions "
            "(StreamableHTTPSessionManager._server_instances); "
            "gateway.max_sessions_per_agent cannot be enforced"
        )
    return live


def _session_ender(
    live: Mapping[str, StreamableHTTPServerTransport],
) -> Callable[[str], Awaitable[None]]:
    """Ends an open session as a DELETE would: its transport is terminated
    (it answers 404 from then on) and the SDK then forgets it."""

    async def end(session_id: str) -> None:
        transport = live.get(session_id)
        if transport is not None:
            await transport.terminate()

    return end


def caller_of(ctx: ServerRequestContext[Any, Any]) -> Caller:
    """The caller the guard found for this request."""
    request = ctx.request
    scope = getattr(request, "scope", None) or {}
    caller = scope.get(CALLER_SCOPE_KEY)
    return caller if isinstance(caller, Caller) else Caller()


def _bounded_protocol(config: GatewayConfig) -> type[H11Protocol]:
    """Uvicorn's h11 protocol with a header deadline and a connection cap.

    Uvicorn (0.55) arms its keep-alive timer only once a response is
    complete, and any received byte cancels it: a client that connects and
    never finishes its headers, or trickles them, would hold its connection
    for ever. The deadline here starts when the connection waits for a
    request's headers and is not moved by data; it ends when they are
    complete.
    """
    header_seconds = config.header_timeout_seconds
    max_connections = config.max_connections

    full = False

    class _Bounded(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            nonlocal full
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                if not full:
                    # Once per episode at the cap: a flood of connections
                    # would otherwise be a flood of log lines.
                    log.warning(
                        "gateway connection refused",
                        extra={
                            "fields": {
                                "component": "gateway",
                                "setting": "gateway.max_connections",
                                "limit": max_connections,
                            }
                        },
                    )
                full = True
                transport.close()
                return
            full = False
            self._await_headers()

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:
                self._headers_done()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._await_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            self._headers_done()
            super().connection_lost(exc)

        def _await_headers(self) -> None:
            self._headers_done()
            self._header_timer = self.loop.call_later(header_seconds, self._expired)

        def _headers_done(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return _Bounded


class _QuietServer(uvicorn.Server):
    """Uvicorn without its own signal handlers: the daemon has them."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class GatewayHttp:
    """The gateway's HTTP listener.

    Args:
        config: the ``gateway`` section (host, port, path, limits, headers).
        gateway: the gateway whose server is served.
        pipeline: for the credential check and counting refusals.
        multi_agent: identity.agents is set: callers authenticate.
    """

    def __init__(
        self,
        config: GatewayConfig,
        gateway: Gateway,
        pipeline: Pipeline,
        *,
        multi_agent: bool,
    ):
        self._config = config
        self._gateway = gateway
        self._pipeline = pipeline
        self._multi_agent = multi_agent
        self._server: _QuietServer | None = None
        self._task: asyncio.Task[None] | None = None
        # The SDK's open sessions by id, once started.
        self._live: Mapping[str, StreamableHTTPServerTransport] = {}
        self.port: int | None = None

    async def start(self) -> None:
        """Bind ``gateway.host:port`` and serve.

        Raises:
            ListenerError: the address cannot be bound, or the MCP SDK does
                not show its open sessions (see ``_live_sessions``).
        """
        cfg = self._config
        family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((cfg.host, cfg.port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError as err:
            sock.close()
            raise ListenerError(
                f"gateway.port: cannot listen on {cfg.host}:{cfg.port}: {err}; "
                "change gateway.port"
            ) from err
        self.port = sock.getsockname()[1]
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        hosts = [f"{host}:{self.port}", f"localhost:{self.port}"]
        server_app = self._gateway.server(caller_of)
        mcp_app = server_app.streamable_http_app(
            streamable_http_path=cfg.path,
            host=cfg.host,
            session_idle_timeout=cfg.session_idle_seconds,
            # The guard refuses past max_message_bytes with a JSON-RPC
            # error first; this is the SDK's own backstop.
            max_request_body_size=cfg.max_message_bytes,
            transport_security=TransportSecuritySettings(
                enable_dns_rebinding_protection=True,
                allowed_hosts=hosts,
                allowed_origins=[f"http://{h}" for h in hosts],
            ),
        )
        try:
            live = _live_sessions(server_app.session_manager)
        except ListenerError:
            sock.close()
            raise
        self._live = live
        app = _Guard(
            mcp_app,
            cfg,
            self._pipeline,
            live,
            _session_ender(live),
            multi_agent=self._multi_agent,
        )
        server = _QuietServer(
            uvicorn.Config(
                app,
                http=_bounded_protocol(cfg),
                lifespan="on",
                log_config=None,
                access_log=False,
                timeout_keep_alive=cfg.keep_alive_seconds,
                timeout_graceful_shutdown=STOP_GRACE_SECONDS,
            )
        )
        self._server = server
        self._task = asyncio.get_running_loop().create_task(server.serve([sock]))
        while not server.started:
            if self._task.done():
                # Raises what stopped it.
                self._task.result()
                raise ListenerError(
                    f"gateway.port: the HTTP listener on {cfg.host}:{self.port} "
                    "did not start"
                )
            await asyncio.sleep(0.01)
        log.info(
            "gateway listening",
            extra={
                "fields": {
                    "component": "gateway",
                    "host": cfg.host,
                    "port": self.port,
                    "path": cfg.path,
                }
            },
        )

    async def stop(self) -> None:
        """Stop accepting, let open requests end (briefly), then cut them."""
        server, task = self._server, self._task
        self._server = self._task = None
        if server is None or task is None:
            return
        server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(task), STOP_GRACE_SECONDS * 2)
        except TimeoutError:
            server.force_exit = True
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        except Exception as err:
            log.error(
                "gateway listener stopped with an error",
                extra={"fields": {"component": "gateway", "error": repr(err)}},
            )
