"""The collector's HTTP: ``/metrics`` and the query API.

- ``GET /daemons``: every registered daemon (and any with state or
  alerts), each with its accepted log id and tree size, whether it is
  refused and why, and its alerts.
- ``GET /records?daemon=ID&from=N&to=M[&log=LOG_ID]``: the records with
  seq in ``[N, M]`` of the daemon's current log (or ``log``), from the
  archive, verified (``query``), one JSON record a line
  (``application/x-ndjson``). A bad request answers 400 and an archive
  that does not verify 500, each with ``{"error": ...}``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kynara_sidecar.audit.keys import PublicKey
from kynara_sidecar.collector.archive import Archive, ArchiveError
from kynara_sidecar.collector.metrics import CollectorMetrics
from kynara_sidecar.collector.query import (
    ArchiveUnverified,
    QueryError,
    query_records,
)
from kynara_sidecar.collector.state import CollectorState
from kynara_sidecar.collector.verifier import trusted_keys

__all__ = ["build_http_app", "daemons_json", "records_for"]


def daemons_json(
    state: CollectorState, registered: Mapping[str, Mapping[str, PublicKey]]
) -> dict[str, Any]:
    """What ``GET /daemons`` answers."""
    frontiers = state.frontiers()
    out = []
    for daemon_id in sorted(
        set(registered) | set(frontiers) | set(state.alerted_daemons())
    ):
        frontier = state.frontier(daemon_id)
        out.append(
            {
                "daemon_id": daemon_id,
                "registered": daemon_id in registered,
                "log_id": frontier.log_id,
                "tree_size": frontier.tree_size,
                "previous_logs": frontier.previous_logs,
                "refused": frontier.refused,
                "refused_reason": frontier.refused_reason,
                "alerts": [msgspec.to_builtins(a) for a in state.alerts(daemon_id)],
            }
        )
    return {"daemons": out}


def records_for(
    state: CollectorState,
    archive: Archive,
    registered: Mapping[str, Mapping[str, PublicKey]],
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
    keys = registered.get(daemon_id)
    if keys is None:
        raise QueryError(f"daemon {daemon_id!r} is not registered")
    frontier = state.frontier(daemon_id)
    log_id = log_id or frontier.log_id
    if not log_id:
        return []
    trusted = trusted_keys(keys, frontier)
    return [
        record
        for _, record in query_records(archive, daemon_id, log_id, first, last, trusted)
    ]


def _int_param(request: web.Request, name: str) -> int:
    text = request.query.get(name, "")
    if not text.isdigit():
        raise QueryError(f"query parameter {name}: expected an integer, got {text!r}")
    return int(text)


def build_http_app(
    *,
    metrics: CollectorMetrics,
    state: CollectorState,
    archive: Archive,
    registered: Mapping[str, Mapping[str, PublicKey]],
) -> web.Application:
    """The application serving /metrics, /daemons and /records."""

    async def serve_metrics(_request: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def serve_daemons(_request: web.Request) -> web.Response:
        body = await asyncio.to_thread(daemons_json, state, registered)
        return web.json_response(body, dumps=_dumps)

    async def serve_records(request: web.Request) -> web.Response:
        try:
            daemon_id = request.query.get("daemon", "")
            work: Callable[[], list[bytes]] = lambda: records_for(  # noqa: E731
                state,
                archive,
                registered,
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
            return web.json_response({"error": str(err)}, status=503)
        body = b"".join(record + b"\n" for record in records)
        return web.Response(body=body, content_type="application/x-ndjson")

    app = web.Application()
    app.router.add_get("/metrics", serve_metrics)
    app.router.add_get("/daemons", serve_daemons)
    app.router.add_get("/records", serve_records)
    return app


def _dumps(value: Any) -> str:
    return msgspec.json.encode(value).decode()
