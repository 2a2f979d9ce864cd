"""The daemon's one HTTP stack (aiohttp): ``/metrics``, the review page and
the playground.

Every page joins this one application, so one listener (``http.host`` and
``http.port``) serves Prometheus and reviewers alike.

On loopback without TLS, ``/metrics`` is open: only the pod reaches it. With
``http.tls`` (which the listener needs to leave loopback) it asks for
``authorization: Bearer <secret>`` of an admin credential with the metrics
or operator role, checked as on the admin listener (``server/admin.py``).
No credential or an unknown one is answered 401 with ``WWW-Authenticate:
Bearer``, a credential without either role 403; each refusal is logged
(never with the secret) and counted in ``kynara_admin_refusals{code}``. The
review page keeps its own reviewer sign-in (refusals counted in
``kynara_review_page_refusals{why}``); the playground
(``server/playground.py``) signs in reviewers and operators (refusals in
``kynara_playground_refusals{why}``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kynara_sidecar.approvals.model import Inbox
from kynara_sidecar.config import METRICS_READERS
from kynara_sidecar.errors import IdentityInvalid, RoleMissing
from kynara_sidecar.metrics import Metrics
from kynara_sidecar.server.admin import AdminCredentials
from kynara_sidecar.server.playground import PlaygroundSources, add_playground_routes
from kynara_sidecar.server.review_page import Authenticator, add_review_routes

__all__ = ["DEFAULT_SESSION_SECONDS", "REVIEW_TITLE", "build_http_app"]

# approvals.session_seconds' default: a working day.
DEFAULT_SESSION_SECONDS = 8 * 3600
REVIEW_TITLE = "Kynara sidecar"
# What a refusal names as the call, in its log line.
METRICS_CALL = "GET /metrics"

log = logging.getLogger("kynara.server")


def build_http_app(
    metrics: Metrics,
    inbox: Inbox | None = None,
    authenticate: Authenticator | None = None,
    *,
    title: str = REVIEW_TITLE,
    session_seconds: int = DEFAULT_SESSION_SECONDS,
    public_urls: Iterable[str] = (),
    clock: Callable[[], int] = time.time_ns,
    metrics_credentials: AdminCredentials | None = None,
    playground: PlaygroundSources | None = None,
) -> web.Application:
    """Return the application: ``/metrics``, and the review page under
    ``/approvals`` when both an inbox and an authenticator are given (see
    ``review_page.add_review_routes`` for the other arguments).

    With ``metrics_credentials``, ``/metrics`` serves only a bearer secret
    of one of them that carries the metrics or operator role; without,
    it serves anyone. With ``playground``, the playground is served under
    ``/playground`` (see ``playground.add_playground_routes``).
    """

    async def serve_metrics(request: web.Request) -> web.Response:
        if metrics_credentials is not None:
            refusal = _metrics_refusal(metrics_credentials, request, metrics)
            if refusal is not None:
                return refusal
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", serve_metrics)
    if inbox is not None and authenticate is not None:
        add_review_routes(
            app,
            inbox,
            authenticate,
            title=title,
            session_seconds=session_seconds,
            public_urls=public_urls,
            clock=clock,
            on_refused=lambda why: metrics.review_page_refusals.labels(why).inc(),
        )
    if playground is not None:
        add_playground_routes(
            app,
            playground,
            title=title,
            session_seconds=session_seconds,
            public_urls=public_urls,
            clock=clock,
            on_refused=lambda why: metrics.playground_refusals.labels(why).inc(),
        )
    return app


def _metrics_refusal(
    credentials: AdminCredentials, request: web.Request, metrics: Metrics
) -> web.Response | None:
    """None when the request carries a credential that may read /metrics,
    else the refusal to send (logged and counted here)."""
    authorization = request.headers.get("authorization", "")
    try:
        caller = credentials.authenticate(authorization)
        if not caller.roles & METRICS_READERS:
            readers = " or ".join(sorted(METRICS_READERS))
            raise RoleMissing(
                f"expected a credential with the {readers} role for "
                f"{METRICS_CALL}, got {caller.name!r} with roles "
                f"[{', '.join(sorted(caller.roles))}]: add the metrics role in "
                f"admin.credentials.{caller.name}.roles",
                field="authorization",
            )
    except (IdentityInvalid, RoleMissing) as err:
        log.warning(
            "metrics request refused",
            extra={
                "fields": {
                    "component": "server",
                    "listener": "http",
                    "call": METRICS_CALL,
                    "code": str(err.code),
                    "error": str(err),
                }
            },
        )
        metrics.admin_refusals.labels(str(err.code)).inc()
        if isinstance(err, RoleMissing):
            return web.Response(status=403, text=f"{err.code}: {err}\n")
        # RFC 6750: a request without a credential gets the bare challenge.
        challenge = 'Bearer realm="kynara"'
        if authorization.strip():
            challenge += ', error="invalid_token"'
        return web.Response(
            status=401,
            text=f"{err.code}: {err}\n",
            headers={"WWW-Authenticate": challenge},
        )
    return None
