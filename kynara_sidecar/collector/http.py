"""The collector's HTTP: ``/metrics`` and the query API.

- ``GET /daemons``: every daemon registered by its exact id, and every
  daemon with state or alerts (a family's members as the collector saw
  them), each with the ``daemons`` entry that registers it (``entry``),
  its accepted log id and tree size, whether it is refused and why, and
  its alerts.
- ``GET /records?daemon=ID&from=N&to=M[&log=LOG_ID]``: the records with
  seq in ``[N, M]`` of the daemon's current log (or ``log``), from the
  archive, verified (``query``), one JSON record a line
  (``application/x-ndjson``). A bad request answers 400, an archive
  that does not verify 500 and one that cannot be read 503, each with
  ``{"error": ...}``; ``from`` and ``to`` are ASCII digits, ``log`` 32
  lowercase hex digits, and an error body never names a path (the
  collector's log does).
- ``/approvals...``: with ``inbox.enabled``, the fleet inbox's review page
  (``server.review_page`` over ``collector.inbox.FleetInbox``): reviewers
  sign in with their own credentials (``inbox.credentials``,
  ``inbox.reviewer_issuers``), never the query API's.
- ``/scim/v2/...``: with ``scim.enabled``, the SCIM 2.0 service provider
  (``collector.scim``, mounted by ``add_scim_routes``); its callers hold
  ``scim.credentials``, never the query API's, and it answers SCIM errors.

With ``http.credentials`` (which the listener needs, with ``http.tls``, to
leave loopback) the query API and ``/metrics`` serve only a bearer secret
of one of them, checked as the daemon's admin listener checks its own
(``server.admin.AdminCredentials``): the query API needs the operator role,
``/metrics`` the metrics or operator role. No credential or an unknown one
is answered 401 with ``WWW-Authenticate: Bearer``, one without the role
403, each with ``{"error": ...}`` and a WARNING line naming the call and
the credential (never its secret).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kynara_sidecar.approvals.model import Inbox
from kynara_sidecar.audit.checkpoint import LOG_ID_HEX_DIGITS
from kynara_sidecar.collector.archive import Archive, ArchiveError
from kynara_sidecar.collector.config import InboxConfig
from kynara_sidecar.collector.metrics import CollectorMetrics
from kynara_sidecar.collector.query import (
    ArchiveUnverified,
    QueryError,
    query_records,
)
from kynara_sidecar.collector.registry import DaemonRegistry
from kynara_sidecar.collector.state import CollectorState
from kynara_sidecar.collector.verifier import trusted_keys
from kynara_sidecar.config import AdminRole
from kynara_sidecar.errors import IdentityInvalid
from kynara_sidecar.server.admin import AdminCredentials
from kynara_sidecar.server.review_page import Authenticator, add_review_routes

__all__ = ["add_inbox_routes", "build_http_app", "daemons_json", "records_for"]

log = logging.getLogger("kynara.collector")

# Sequence numbers fit in 19 digits; ASCII only (str.isdigit takes "²").
_MAX_DIGITS = 19
_INTEGER = re.compile(rf"[0-9]{{1,{_MAX_DIGITS}}}", re.ASCII)
_LOG_ID = re.compile(rf"[0-9a-f]{{{LOG_ID_HEX_DIGITS}}}", re.ASCII)
# Request values are cut to this in error bodies.
_MAX_SHOWN = 80
# Who may call what when http.credentials are set.
QUERY_ROLES = frozenset({AdminRole.OPERATOR})
METRICS_ROLES = frozenset({AdminRole.METRICS, AdminRole.OPERATOR})

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def daemons_json(state: CollectorState, registry: DaemonRegistry) -> dict[str, Any]:
    """What ``GET /daemons`` answers."""
    frontiers = state.frontiers()
    out = []
    for daemon_id in sorted(
        set(registry.exact_ids) | set(frontiers) | set(state.alerted_daemons())
    ):
        frontier = state.frontier(daemon_id)
        entry = registry.entry_for(daemon_id)
        out.append(
            {
                "daemon_id": daemon_id,
                "registered": entry is not None,
                "entry": entry.name if entry is not None else "",
                "log_id": frontier.log_id,
                "tree_size": frontier.tree_size,
                "previous_logs": frontier.previous_logs,
                "take_on_log": frontier.take_on_log,
                "refused": frontier.refused,
                "refused_reason": frontier.refused_reason,
                "alerts": [msgspec.to_builtins(a) for a in state.alerts(daemon_id)],
            }
        )
    return {"daemons": out}


def records_for(
    state: CollectorState,
    archive: Archive,
    registry: DaemonRegistry,
    daemon_id: str,
    first: int,
    last: int,
    log_id: str = "",
) -> list[bytes]:
    """The verified records of a query, as a list (blocking).

    Raises:
        QueryError: an unregistered daemon, a bad range, a failed check.
        ArchiveError: the archive cannot be read.
    """
    keys = registry.keys_for(daemon_id)
    if keys is None:
        raise QueryError(f"daemon {daemon_id[:_MAX_SHOWN]!r} is not registered")
    frontier = state.frontier(daemon_id)
    log_id = log_id or frontier.log_id
    if not log_id:
        return []
    if not _LOG_ID.fullmatch(log_id):
        raise QueryError(
            f"log: expected {LOG_ID_HEX_DIGITS} lowercase hex digits, got "
            f"{log_id[:_MAX_SHOWN]!r}"
        )
    trusted = trusted_keys(keys, frontier)
    history = state.history(daemon_id)
    records = query_records(
        archive,
        daemon_id,
        log_id,
        first,
        last,
        trusted,
        lambda size: history.checkpoint(log_id, size),
    )
    return [record for _, record in records]


def _int_param(request: web.Request, name: str) -> int:
    text = request.query.get(name, "")
    if not _INTEGER.fullmatch(text):
        raise QueryError(
            f"query parameter {name}: expected an integer of 1 to "
            f"{_MAX_DIGITS} digits 0-9, got {text[:_MAX_SHOWN]!r}"
        )
    return int(text)


def build_http_app(
    *,
    metrics: CollectorMetrics,
    state: CollectorState,
    archive: Archive,
    registry: DaemonRegistry,
    credentials: AdminCredentials | None = None,
) -> web.Application:
    """The application serving /metrics, /daemons and /records; with
    ``credentials``, only to callers holding one with the call's role."""

    async def serve_metrics(_request: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def serve_daemons(_request: web.Request) -> web.Response:
        body = await asyncio.to_thread(daemons_json, state, registry)
        return web.json_response(body, dumps=_dumps)

    async def serve_records(request: web.Request) -> web.Response:
        try:
            daemon_id = request.query.get("daemon", "")
            work: Callable[[], list[bytes]] = lambda: records_for(  # noqa: E731
                state,
                archive,
                registry,
                daemon_id,
                _int_param(request, "from"),
                _int_param(request, "to"),
                request.query.get("log", ""),
            )
            records = await asyncio.to_thread(work)
        except ArchiveUnverified as err:
            return web.json_response({"error": str(err)}, status=500)
        except QueryError as err:
            return web.json_response({"error": str(err)}, status=400)
        except ArchiveError as err:
            # The message names paths and URLs: for the log, not the caller.
            log.error(
                "archive unavailable for a query",
                extra={"fields": {"component": "collector", "error": str(err)}},
            )
            return web.json_response(
                {"error": "the archive cannot be read; see the collector's log"},
                status=503,
            )
        body = b"".join(record + b"\n" for record in records)
        return web.Response(body=body, content_type="application/x-ndjson")

    app = web.Application()
    for path, handler, roles in (
        ("/metrics", serve_metrics, METRICS_ROLES),
        ("/daemons", serve_daemons, QUERY_ROLES),
        ("/records", serve_records, QUERY_ROLES),
    ):
        if credentials is not None:
            handler = _guarded(handler, credentials, roles, f"GET {path}")
        app.router.add_get(path, handler)
    return app


def _guarded(
    handler: _Handler,
    credentials: AdminCredentials,
    roles: Collection[AdminRole],
    call: str,
) -> _Handler:
    """``handler``, served only to a bearer credential with one of ``roles``."""
    wanted = " or ".join(sorted(roles))

    async def serve(request: web.Request) -> web.StreamResponse:
        authorization = request.headers.get("authorization", "")
        try:
            caller = credentials.authenticate(authorization)
        except IdentityInvalid:
            given = "an unknown one" if authorization.strip() else "none"
            # RFC 6750: a request without a credential gets the bare challenge.
            challenge = 'Bearer realm="kynara-collector"'
            if authorization.strip():
                challenge += ', error="invalid_token"'
            return _refuse(
                request,
                call,
                401,
                f"expected 'authorization: Bearer <secret>' of a credential in "
                f"http.credentials, got {given}",
                headers={"WWW-Authenticate": challenge},
            )
        if not caller.roles & frozenset(roles):
            return _refuse(
                request,
                call,
                403,
                f"expected a credential with the {wanted} role for {call}, got "
                f"{caller.name!r} with roles [{', '.join(sorted(caller.roles))}]",
                caller=caller.name,
            )
        return await handler(request)

    return serve


def _refuse(
    request: web.Request,
    call: str,
    status: int,
    message: str,
    *,
    caller: str = "",
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    log.warning(
        "http request refused",
        extra={
            "fields": {
                "component": "collector",
                "call": call,
                "status": status,
                "credential": caller,
                "peer": request.remote or "",
                "error": message,
            }
        },
    )
    return web.json_response({"error": message}, status=status, headers=headers)


def add_inbox_routes(
    app: web.Application,
    inbox: Inbox,
    authenticate: Authenticator,
    config: InboxConfig,
    clock: Callable[[], int],
    metrics: CollectorMetrics,
) -> None:
    """Mount the review page over the fleet inbox on ``app``."""
    add_review_routes(
        app,
        inbox,
        authenticate,
        title="Kynara fleet inbox",
        session_seconds=config.session_seconds,
        secure_cookie=config.secure_cookie,
        public_urls=[config.url] if config.url else [],
        clock=clock,
        on_refused=lambda why: metrics.inbox_page_refusals.labels(why).inc(),
    )


def _dumps(value: Any) -> str:
    return msgspec.json.encode(value).decode()
