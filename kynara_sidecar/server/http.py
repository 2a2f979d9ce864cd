"""The daemon's one HTTP stack (aiohttp): ``/metrics`` now, pages later."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kynara_sidecar.metrics import Metrics

__all__ = ["build_http_app"]


def build_http_app(metrics: Metrics) -> web.Application:
    """Return the application; later pages add their routes to it."""

    async def serve_metrics(_request: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", serve_metrics)
    return app
