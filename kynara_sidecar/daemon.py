"""The daemon: wires config, policies, the audit log and the listeners.

Start-up order: load policies -> open the audit log (exclusive) -> start the
writer and append a start marker -> bind listeners -> report SERVING.
Shutdown order (SIGTERM/SIGINT): report NOT_SERVING -> refuse new requests
-> drain in-flight ones within ``shutdown_grace_seconds`` -> append a stop
marker -> flush and close the audit log. SIGHUP reloads policies; a bad set
is refused and the previous one stays active.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import signal
import socket
import time
from collections.abc import Callable

import grpc
import msgspec
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from kynara.v1 import decision_pb2, decision_pb2_grpc

from kynara_sidecar import __version__
from kynara_sidecar.audit.record import AuditRecordV1, marker_record
from kynara_sidecar.audit.store import AuditStore
from kynara_sidecar.audit.writer import AuditWriter
from kynara_sidecar.config import Config, IdentityMode
from kynara_sidecar.decision import Timestamp
from kynara_sidecar.errors import KynaraError, PolicyError
from kynara_sidecar.metrics import Metrics
from kynara_sidecar.pipeline import Pipeline
from kynara_sidecar.policy.loader import LoadedPolicies, load_policies
from kynara_sidecar.server.decision_service import DecisionService
from kynara_sidecar.server.http import build_http_app

__all__ = ["Daemon"]

log = logging.getLogger("kynara.daemon")

DECISION_SERVICE = decision_pb2.DESCRIPTOR.services_by_name["DecisionService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _fields(**fields: object) -> dict[str, dict[str, object]]:
    return {"fields": {"component": "daemon", **fields}}


class Daemon:
    """One running Kynara sidecar.

    Args:
        config: the validated configuration.
        clock: nanoseconds since the epoch, read once per request (tests
            pass a fixed clock).
    """

    def __init__(self, config: Config, clock: Callable[[], int] = time.time_ns):
        if not config.identity.daemon_id:
            daemon_id = f"{config.identity.agent_id}@{socket.gethostname()}"
            identity = msgspec.structs.replace(config.identity, daemon_id=daemon_id)
            config = msgspec.structs.replace(config, identity=identity)
        self.config = config
        self.clock = clock
        self.metrics = Metrics()
        self.tcp_port: int | None = None
        self.health_port: int | None = None
        self.http_port: int | None = None
        self._store: AuditStore | None = None
        self._writer: AuditWriter | None = None
        self._pipeline: Pipeline | None = None
        self._servers: list[grpc.aio.Server] = []
        self._health: list[health.aio.HealthServicer] = []
        self._http: web.AppRunner | None = None
        self._stopped = asyncio.Event()

    @property
    def pipeline(self) -> Pipeline:
        assert self._pipeline is not None, "daemon not started"
        return self._pipeline

    def _load_policies(self) -> LoadedPolicies:
        return load_policies(self.config.policy.path)

    def _marker(self, event: str) -> AuditRecordV1:
        return marker_record(
            event,
            self.config.identity.daemon_id,
            Timestamp.from_nanos(self.clock()),
            __version__,
            identity_mode=str(self.config.identity.mode),
        )

    async def start(self) -> None:
        """Start everything; raise KynaraError (nothing left running) on failure."""
        cfg = self.config
        log.info(
            "starting",
            extra=_fields(version=__version__, daemon_id=cfg.identity.daemon_id),
        )
        if cfg.identity.mode is IdentityMode.DEVELOPMENT:
            log.warning(
                "development identity mode: asserted chains are trusted",
                extra=_fields(setting="identity.mode"),
            )
        log.warning(
            "policies from local files are unsigned",
            extra=_fields(source=cfg.policy.source, setting="policy.source"),
        )
        policies = self._load_policies()
        self._store = AuditStore.open(
            cfg.audit.path,
            map_size=cfg.audit.map_size,
            durability=str(cfg.audit.durability),
        )
        try:
            await self._start_after_store(policies)
        except BaseException:
            await self.stop()
            raise

    async def _start_after_store(self, policies: LoadedPolicies) -> None:
        cfg = self.config
        self._writer = AuditWriter(
            self._store,
            max_batch=cfg.audit.max_batch,
            deferred_window=cfg.audit.deferred_window_ms / 1000,
            on_commit=self.metrics.count_commit,
        )
        self._writer.start()
        self._pipeline = Pipeline(cfg, self._writer, self.metrics, self.clock)
        self._pipeline.activate(policies)
        self._log_policies(policies)
        await self._writer.append(self._marker("start"))
        self._update_usage()
        await self._start_agent_listener()
        await self._start_health_listener()
        await self._start_http()
        for servicer in self._health:
            await servicer.set("", SERVING)
            await servicer.set(DECISION_SERVICE, SERVING)
        log.info(
            "serving",
            extra=_fields(
                socket=cfg.agent.socket, port=self.tcp_port,
                health_port=self.health_port, http_port=self.http_port,
            ),
        )  # fmt: skip

    def _log_policies(self, policies: LoadedPolicies) -> None:
        log.info(
            "policy activated",
            extra=_fields(
                policy_revision=policies.policy_set.revision,
                directory_revision=policies.directory.revision,
            ),
        )

    def _update_usage(self) -> None:
        used, size = self._store.usage()
        self.metrics.audit_map_used.set(used)
        self.metrics.audit_map_size.set(size)

    async def _start_agent_listener(self) -> None:
        cfg = self.config.agent
        limit = cfg.max_message_bytes
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.so_reuseport", 0),
            ]
        )
        decision_pb2_grpc.add_DecisionServiceServicer_to_server(
            DecisionService(self._pipeline), server
        )
        self._add_health(server)
        if cfg.socket:
            pathlib.Path(cfg.socket).parent.mkdir(parents=True, exist_ok=True)
            server.add_insecure_port(f"unix://{os.path.abspath(cfg.socket)}")
        if cfg.port != -1:
            self.tcp_port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
        self._servers.append(server)
        await server.start()

    async def _start_health_listener(self) -> None:
        cfg = self.config.health
        if cfg.port == -1:
            return
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        self._add_health(server)
        self.health_port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
        self._servers.append(server)
        await server.start()

    def _add_health(self, server: grpc.aio.Server) -> None:
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        self._health.append(servicer)

    async def _start_http(self) -> None:
        cfg = self.config.http
        if cfg.port == -1:
            return
        self._http = web.AppRunner(build_http_app(self.metrics), access_log=None)
        await self._http.setup()
        site = web.TCPSite(self._http, cfg.host, cfg.port, reuse_port=False)
        await site.start()
        self.http_port = self._http.addresses[0][1]

    async def reload(self) -> bool:
        """Load policies again; on any error keep the active set. Returns success."""
        try:
            policies = self._load_policies()
        except PolicyError as err:
            self.metrics.policy_reloads.labels("error").inc()
            log.error(
                "policy reload refused; previous policy stays active",
                extra=_fields(error=str(err)),
            )
            return False
        self.pipeline.activate(policies)
        self.metrics.policy_reloads.labels("ok").inc()
        self._log_policies(policies)
        return True

    async def stop(self) -> None:
        """Drain and shut down in the documented order. Safe to call twice."""
        grace = self.config.shutdown_grace_seconds
        log.info("stopping", extra=_fields(grace_seconds=grace))
        for servicer in self._health:
            await servicer.enter_graceful_shutdown()
        if self._pipeline is not None:
            self._pipeline.close()
        await asyncio.gather(*(s.stop(grace) for s in self._servers))
        self._servers.clear()
        if self._http is not None:
            await self._http.cleanup()
            self._http = None
        await self._close_audit()
        self._stopped.set()
        log.info("stopped", extra=_fields())

    async def _close_audit(self) -> None:
        if self._writer is not None:
            try:
                await self._writer.append(self._marker("stop"))
            except KynaraError as err:
                log.error("stop marker not written", extra=_fields(error=str(err)))
            await self._writer.close()
            self._writer = None
        if self._store is not None:
            self._store.close()
            self._store = None

    async def run(self) -> None:
        """Start, then serve until SIGTERM or SIGINT; SIGHUP reloads."""
        loop = asyncio.get_running_loop()
        await self.start()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(
            signal.SIGHUP, lambda: asyncio.ensure_future(self.reload())
        )
        await stop.wait()
        await self.stop()
