"""The daemon's one HTTP stack (aiohttp): ``/metrics`` and the review page.

Every page joins this one application, so one listener (``http.host`` and
``http.port``) serves Prometheus and reviewers alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kynara_sidecar.approvals.model import Inbox
from kynara_sidecar.metrics import Metrics
from kynara_sidecar.server.review_page import Authenticator, add_review_routes

__all__ = ["DEFAULT_SESSION_SECONDS", "REVIEW_TITLE", "build_http_app"]

# approvals.session_seconds' default: a working day.
DEFAULT_SESSION_SECONDS = 8 * 3600
REVIEW_TITLE = "Kynara sidecar"


def build_http_app(
    metrics: Metrics,
    inbox: Inbox | None = None,
    authenticate: Authenticator | None = None,
    *,
    title: str = REVIEW_TITLE,
    session_seconds: int = DEFAULT_SESSION_SECONDS,
    public_urls: Iterable[str] = (),
    clock: Callable[[], int] = time.time_ns,
) -> web.Application:
    """Return the application: ``/metrics``, and the review page under
    ``/approvals`` when both an inbox and an authenticator are given (see
    ``review_page.add_review_routes`` for the other arguments)."""

    async def serve_metrics(_request: web.Request) -> web.Response:
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
        )
    return app
