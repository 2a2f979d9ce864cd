"""The MCP gateway over Streamable HTTP, for agents on ``gateway.host:port``.

The SDK's Streamable HTTP app (sessions for the 2025-11-25 handshake
protocol, single exchanges for 2026-07-28) is served by uvicorn inside the
daemon's event loop, behind a guard that sees every request first:

- multi-agent mode: ``authorization: Bearer <secret>`` must name an agent
  (``Pipeline.agent_of``), else 401 with a JSON-RPC error; a session stays
  bound to the agent that opened it;
- a body over ``gateway.max_message_bytes`` is refused with 413 and a
  JSON-RPC error naming the limit;
- a JSON-RPC batch (a JSON array) is refused whole with Invalid Request
  (-32600); nothing of it reaches the SDK;
- the ``Caller`` (credential, delegation token or asserted chain from
  ``gateway.token_header`` / ``gateway.asserted_chain_header``, the peer
  address) rides on the request to the gateway's handlers.

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
from collections.abc import Iterator
from typing import Any

import uvicorn
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.context import ServerRequestContext
from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kynara_sidecar.config import GatewayConfig
from kynara_sidecar.errors import KynaraError, ListenerError, RequestTooLarge
from kynara_sidecar.gateway.proxy import REQUEST_ERROR_CODE, Caller, Gateway
from kynara_sidecar.pipeline import Pipeline

__all__ = ["GatewayHttp"]

log = logging.getLogger("kynara.gateway")

# Where the guard leaves the caller for the gateway's handlers.
CALLER_SCOPE_KEY = "kynara.caller"
INVALID_REQUEST = -32600
# How long open streams get to end at stop before they are cut.
STOP_GRACE_SECONDS = 2.0


def _rpc_error(code: int, message: str, data: dict[str, Any]) -> bytes:
    return json.dumps(
        {
            "jsonrpc": "2.0",
            "id": None,
            "error": {"code": code, "message": message, "data": data},
        }
    ).encode()


async def _respond(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _Guard:
    """The ASGI guard in front of the SDK app (see the module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        config: GatewayConfig,
        pipeline: Pipeline,
        *,
        multi_agent: bool,
    ):
        self._app = app
        self._config = config
        self._pipeline = pipeline
        self._multi_agent = multi_agent

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self._config.path:
            await self._app(scope, receive, send)
            return
        headers = _headers(scope)
        authorization = headers.get("authorization", "")
        if self._multi_agent:
            try:
                agent = self._pipeline.agent_of(authorization)
            except KynaraError as err:
                self._pipeline.refuse(err)
                await _respond(
                    send,
                    401,
                    _rpc_error(
                        REQUEST_ERROR_CODE,
                        f"{err}; send `authorization: Bearer <the agent's secret>`",
                        {"code": "identity_invalid", "field": "authorization"},
                    ),
                )
                return
            # The SDK binds a session to the principal that opened it.
            scope["user"] = AuthenticatedUser(
                AccessToken(token="", client_id=agent, scopes=[])
            )
        scope[CALLER_SCOPE_KEY] = self._caller(scope, headers, authorization)
        if scope["method"] != "POST":
            await self._app(scope, receive, send)
            return
        body = await self._read_body(receive, send)
        if body is None:
            return
        if body.lstrip()[:1] == b"[":
            await _respond(
                send,
                400,
                _rpc_error(
                    INVALID_REQUEST,
                    "Invalid Request: JSON-RPC batches are not accepted; send "
                    "one message per request",
                    {"code": "invalid_request"},
                ),
            )
            return
        await self._app(scope, _replay(body, receive), send)

    def _caller(
        self, scope: Scope, headers: dict[str, str], authorization: str
    ) -> Caller:
        client = scope.get("client")
        peer = f"{client[0]}:{client[1]}" if client else ""
        cfg = self._config
        chain_text = headers.get(cfg.asserted_chain_header.lower(), "")
        chain = tuple(p.strip() for p in chain_text.split(",") if p.strip())
        return Caller(
            authorization=authorization,
            delegation_token=headers.get(cfg.token_header.lower(), "").strip(),
            asserted_chain=chain,
            peer=peer,
            token_from=f"the {cfg.token_header!r} header",
            chain_from=f"the {cfg.asserted_chain_header!r} header",
        )

    async def _read_body(self, receive: Receive, send: Send) -> bytes | None:
        """The whole body, or None when it was refused as too large."""
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
                err = RequestTooLarge(
                    f"message larger than gateway.max_message_bytes ({limit} bytes)",
                    field="body",
                )
                self._pipeline.refuse(err)
                await _respond(
                    send,
                    413,
                    _rpc_error(
                        INVALID_REQUEST,
                        f"message too large: more than gateway.max_message_bytes "
                        f"({limit} bytes)",
                        {"code": "request_too_large", "limit": limit},
                    ),
                )
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _headers(scope: Scope) -> dict[str, str]:
    return {
        key.decode("latin-1").lower(): value.decode("latin-1")
        for key, value in scope["headers"]
    }


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


def caller_of(ctx: ServerRequestContext[Any, Any]) -> Caller:
    """The caller the guard found for this request."""
    request = ctx.request
    scope = getattr(request, "scope", None) or {}
    caller = scope.get(CALLER_SCOPE_KEY)
    return caller if isinstance(caller, Caller) else Caller()


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
        self.port: int | None = None

    async def start(self) -> None:
        """Bind ``gateway.host:port`` and serve.

        Raises:
            ListenerError: the address cannot be bound.
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
        mcp_app = self._gateway.server(caller_of).streamable_http_app(
            streamable_http_path=cfg.path,
            host=cfg.host,
            # The guard refuses past max_message_bytes with a JSON-RPC
            # error first; this is the SDK's own backstop.
            max_request_body_size=cfg.max_message_bytes,
            transport_security=TransportSecuritySettings(
                enable_dns_rebinding_protection=True,
                allowed_hosts=hosts,
                allowed_origins=[f"http://{h}" for h in hosts],
            ),
        )
        app = _Guard(
            mcp_app,
            cfg,
            self._pipeline,
            multi_agent=self._multi_agent,
        )
        server = _QuietServer(
            uvicorn.Config(
                app,
                lifespan="on",
                log_config=None,
                access_log=False,
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
