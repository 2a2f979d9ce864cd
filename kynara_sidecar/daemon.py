"""The daemon: wires config, policies, the audit log and the listeners.

Start-up order (each step logged): load policies -> open the audit log
(exclusive) -> lock the agent socket -> start the writer and append a start
marker, then a policy_activated marker committed with the set's source files
-> bind listeners (TCP before the socket) -> report SERVING.

Shutdown order (SIGTERM/SIGINT, each step logged): report NOT_SERVING ->
refuse new requests with ``shutting_down`` -> wait for in-flight requests,
records committed, up to ``shutdown_grace_seconds`` -> close the listeners
-> append a stop marker -> flush and close the audit log.

SIGHUP reloads policies; a bad set is refused and the previous one stays
active. A good one is activated only once its policy_activated marker (and
its source files) are committed.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import pathlib
import signal
import socket
import time
import typing
from collections.abc import Callable

import grpc
import msgspec
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from kynara.v1 import decision_pb2

from kynara_sidecar import __version__
from kynara_sidecar.audit.record import AuditRecordV1, marker_record
from kynara_sidecar.audit.store import AuditStore, StateChange, policy_set_changes
from kynara_sidecar.audit.writer import AuditWriter
from kynara_sidecar.config import Config, IdentityMode
from kynara_sidecar.decision import Timestamp
from kynara_sidecar.errors import KynaraError, ListenerError, PolicyError
from kynara_sidecar.metrics import Metrics
from kynara_sidecar.pipeline import Pipeline
from kynara_sidecar.policy.loader import (
    LoadedPolicies,
    compile_documents,
    read_documents,
)
from kynara_sidecar.policy.model import PolicyDocument
from kynara_sidecar.server.decision_service import DecisionService, grpc_receive_limit
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
            # Multi-agent mode has no one agent id to name the log after.
            agent = config.identity.agent_id or "kynara"
            daemon_id = f"{agent}@{socket.gethostname()}"
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
        self._socket_lock: typing.IO[str] | None = None

    @property
    def pipeline(self) -> Pipeline:
        assert self._pipeline is not None, "daemon not started"
        return self._pipeline

    def _load_policies(self) -> tuple[LoadedPolicies, list[StateChange]]:
        """Load and compile the policies; also return the changes that keep
        their source files in the log (``policy_sets``), from the very bytes
        that were compiled."""
        root = self.config.policy.path
        documents = read_documents(root)
        policies = compile_documents(documents, root=str(root))
        identity = self.config.identity
        settings = {f"identity.agents.{agent}": agent for agent in identity.agents}
        settings = settings or {"identity.agent_id": identity.agent_id}
        for setting, agent_id in settings.items():
            if policies.directory.lookup(agent_id) is None:
                raise PolicyError(
                    f"{setting} {agent_id!r} is not in the directory, so every "
                    "decision would be denied; add the agent or fix the setting",
                    path=str(root),
                )
        policy_files = {
            source.name: source.content
            for source in documents
            if isinstance(source.document, PolicyDocument)
        }
        directory_files = {
            source.name: source.content
            for source in documents
            if source.name not in policy_files
        }
        changes = policy_set_changes(
            policies.policy_set.revision,
            policy_files,
            policies.directory.revision,
            directory_files,
        )
        return policies, changes

    async def _activate(
        self, policies: LoadedPolicies, changes: list[StateChange]
    ) -> None:
        """Keep the set in the log, then make it the active one.

        The ``policy_activated`` marker and the set's source files commit in
        one transaction before any decision can cite its revisions, so a
        record's policy set is always in its log.

        Raises:
            AuditUnavailable: the marker could not be committed; the
                previously active set (if any) stays active.
        """
        # TODO(#5): stored policy sets are kept forever; prune them with the
        # segments whose records cite them.
        marker = msgspec.structs.replace(
            self._marker("policy_activated"),
            policy_revision=policies.policy_set.revision,
            directory_revision=policies.directory.revision,
        )
        await self._writer.append(marker, changes)
        self.pipeline.activate(policies)
        self._log_policies(policies)

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
        policies, changes = self._load_policies()
        # The socket lock comes first, so a daemon refused for a live socket
        # never touches its own audit path.
        self._lock_socket()
        try:
            self._store = AuditStore.open(
                cfg.audit.path,
                map_size=cfg.audit.map_size,
                durability=str(cfg.audit.durability),
            )
            log.info(
                "audit log opened",
                extra=_fields(
                    path=cfg.audit.path, durability=str(cfg.audit.durability)
                ),
            )
            await self._start_after_store(policies, changes)
        except BaseException:
            await self.stop()
            raise

    async def _start_after_store(
        self, policies: LoadedPolicies, changes: list[StateChange]
    ) -> None:
        cfg = self.config
        self._writer = AuditWriter(
            self._store,
            max_batch=cfg.audit.max_batch,
            deferred_window=cfg.audit.deferred_window_ms / 1000,
            on_commit=self._on_commit,
        )
        self._writer.start()
        self._pipeline = Pipeline(cfg, self._writer, self.metrics, self.clock)
        await self._writer.append(self._marker("start"))
        await self._activate(policies, changes)
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

    def _on_commit(self, records: int, seconds: float) -> None:
        # Runs on the writer thread after each transaction; both are cheap.
        self.metrics.count_commit(records, seconds)
        self._update_usage()

    def _lock_socket(self) -> None:
        """Hold ``<socket>.lock`` so a second daemon cannot take the socket.

        grpc unlinks a socket file before binding, so without this a second
        daemon with another audit path would silently steal the live socket.
        """
        socket_path = self.config.agent.socket
        if not socket_path:
            return
        path = pathlib.Path(socket_path + ".lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise ListenerError(
                f"agent.socket {socket_path} is in use by another daemon; "
                "stop it or choose another agent.socket"
            ) from None
        self._socket_lock = handle

    def _bind(self, server: grpc.aio.Server, address: str, setting: str) -> int:
        try:
            return server.add_insecure_port(address)
        except RuntimeError as err:
            raise ListenerError(
                f"{setting}: cannot listen on {address}: {err}; "
                f"is another process using it? change {setting}"
            ) from err

    async def _start_agent_listener(self) -> None:
        cfg = self.config.agent
        limit = cfg.max_message_bytes
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", grpc_receive_limit(limit)),
                ("grpc.so_reuseport", 0),
            ]
        )
        self._servers.append(server)
        DecisionService(self._pipeline, limit).register(server)
        self._add_health(server)
        # TCP first: a port in use then fails before the socket is replaced.
        if cfg.port != -1:
            self.tcp_port = self._bind(server, f"{cfg.host}:{cfg.port}", "agent.port")
        if cfg.socket:
            pathlib.Path(cfg.socket).parent.mkdir(parents=True, exist_ok=True)
            address = f"unix://{os.path.abspath(cfg.socket)}"
            self._bind(server, address, "agent.socket")
            os.chmod(cfg.socket, cfg.socket_mode)
        await server.start()

    async def _start_health_listener(self) -> None:
        cfg = self.config.health
        if cfg.port == -1:
            return
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        self._servers.append(server)
        self._add_health(server)
        address = f"{cfg.host}:{cfg.port}"
        self.health_port = self._bind(server, address, "health.port")
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
        try:
            await site.start()
        except OSError as err:
            raise ListenerError(
                f"http.port: cannot listen on {cfg.host}:{cfg.port}: {err}; "
                "change http.port"
            ) from err
        self.http_port = self._http.addresses[0][1]

    async def reload(self) -> bool:
        """Load policies again; on any error keep the active set. Returns success."""
        try:
            # Compiling a large set takes a while; decisions go on meanwhile.
            policies, changes = await asyncio.to_thread(self._load_policies)
            await self._activate(policies, changes)
        except Exception as err:
            # Any failure, a loader bug included, keeps the active set.
            self.metrics.policy_reloads.labels("error").inc()
            log.error(
                "policy reload refused; previous policy stays active",
                extra=_fields(error=str(err), error_type=type(err).__name__),
            )
            return False
        self.metrics.policy_reloads.labels("ok").inc()
        return True

    async def stop(self) -> None:
        """Drain and shut down in the documented order. Safe to call twice.

        New requests get ``shutting_down`` from the moment health reports
        NOT_SERVING; requests already in the pipeline finish (their records
        committed) within ``shutdown_grace_seconds``; only then do the
        listeners close.
        """
        grace = self.config.shutdown_grace_seconds
        deadline = time.monotonic() + grace
        log.info("stopping", extra=_fields(grace_seconds=grace))
        for servicer in self._health:
            await servicer.enter_graceful_shutdown()
        if self._pipeline is not None:
            self._pipeline.close()
            left = await self._pipeline.drain(grace)
            log.info("drained", extra=_fields(in_flight_left=left))
        await self._stop_listeners(max(deadline - time.monotonic(), 0.0))
        await self._close_audit()
        if self._socket_lock is not None:
            self._socket_lock.close()
            self._socket_lock = None
        log.info("stopped", extra=_fields())

    async def _stop_listeners(self, grace: float) -> None:
        # The pipeline is drained, so what grpc still holds is a call that
        # is being refused with shutting_down; the grace lets it finish.
        await asyncio.gather(*(s.stop(grace) for s in self._servers))
        self._servers.clear()
        if self._http is not None:
            await self._http.cleanup()
            self._http = None
        log.info("listeners closed", extra=_fields())

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
            log.info("audit log closed", extra=_fields())

    async def run(self) -> None:
        """Start, then serve until SIGTERM or SIGINT; SIGHUP reloads.

        Handlers are installed before start-up so that an early signal is
        neither fatal nor lost: SIGTERM during start stops right after it,
        and SIGHUP during start reloads once serving.
        """
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        reload_wanted = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, reload_wanted.set)
        await self.start()
        while not stop.is_set():
            waiters = [asyncio.ensure_future(e.wait()) for e in (stop, reload_wanted)]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
            if reload_wanted.is_set() and not stop.is_set():
                reload_wanted.clear()
                await self.reload()
        await self.stop()
