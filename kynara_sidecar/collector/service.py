"""The running collector: its doors in, the intake, HTTP, and a clean stop.

``Collector.start`` opens the state and the archive, loads the registered
keys, serves HTTP (over TLS with ``http.tls``, the certificate re-read when
its files change; with ``http.credentials`` only to their holders), and
starts one task per door: the store's durable consumer (``store.url``) and
a ``Puller`` per ``pull`` entry. A lost store
is logged, counted and reconnected after ``store.retry_seconds``. With
``inbox.enabled`` it also keeps the fleet inbox (``inbox``) up to date from
the store, on a connection of its own, and serves its review page; the
inbox lists the approvals of registered daemons only, checked against the
same keys as their segments, and verifies again those it kept for a key
not known yet once the intake accepts the rotation that adds it. With
``scim.enabled`` it serves the SCIM service provider (``collector.scim``)
on the HTTP listener, over its own LMDB store (``scim.path``), and a task
publishes each change as a directory signed with ``directory.signing_key``
to the store (``DirectoryPublisher``), retrying after
``store.retry_seconds`` while the store is down; at start only when a
committed change may not have been published (``ScimStore.unpublished``).

``stop`` (SIGTERM or SIGINT under ``run``) goes in a fixed, logged order:
stop taking messages (the door tasks are cancelled; a segment being
settled finishes or, if cut short before its acknowledgement, comes again
and is then a duplicate), stop HTTP, close the store connection, the
state and the SCIM store. A door that ends before ``stop`` (it never
should) is logged at ERROR and counted (``failures{what="door"}``), and
``stop`` logs it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from aiohttp import web

from kynara_sidecar.audit.keys import PublicKey
from kynara_sidecar.collector.archive import open_archive
from kynara_sidecar.collector.config import (
    CollectorConfig,
    InboxConfig,
    load_directory_key,
)
from kynara_sidecar.collector.directory import DirectoryPublisher
from kynara_sidecar.collector.http import add_inbox_routes, build_http_app
from kynara_sidecar.collector.inbox import FleetInbox
from kynara_sidecar.collector.intake import Intake
from kynara_sidecar.collector.metrics import CollectorMetrics
from kynara_sidecar.collector.pull import Puller
from kynara_sidecar.collector.scim import (
    AsyncScimStore,
    DirectoryPublishing,
    ScimEndpoint,
    ScimStore,
    add_scim_routes,
    build_provider,
)
from kynara_sidecar.collector.state import CollectorState
from kynara_sidecar.collector.verifier import trusted_keys
from kynara_sidecar.config import AdminListenerConfig
from kynara_sidecar.server.admin import AdminCredentials
from kynara_sidecar.server.reviewers import (
    AdminReviewer,
    ReviewerAuth,
    ReviewerIssuer,
)
from kynara_sidecar.server.tls import ServingCertificate
from kynara_sidecar.sync import StoreUnavailable
from kynara_sidecar.sync.directory import directory_content

__all__ = ["Collector"]

log = logging.getLogger("kynara.collector")

# A door settles at most one segment after its cancellation (an archive
# put and a commit); past this it is left behind, and what it did not
# acknowledge comes again.
DOOR_STOP_SECONDS = 10.0


class Collector:
    """The collector process's parts, wired from its configuration."""

    def __init__(
        self, config: CollectorConfig, clock: Callable[[], int] = time.time_ns
    ):
        self.config = config
        self.clock = clock
        self.metrics = CollectorMetrics()
        self.registry = config.registry()
        self._secrets = [
            pull.load_secret(f"pull[{i}]") for i, pull in enumerate(config.pull)
        ]
        self._roots = [
            pull.load_roots(f"pull[{i}]") for i, pull in enumerate(config.pull)
        ]
        self.archive = open_archive(
            config.archive.url,
            endpoint_url=config.archive.s3.endpoint_url,
            region=config.archive.s3.region,
        )
        self.state: CollectorState | None = None
        self.intake: Intake | None = None
        self.inbox: FleetInbox | None = None
        self._reviewers: ReviewerAuth | None = None
        # Read now, so a bad secret or certificate stops the start.
        self._http_credentials = (
            AdminCredentials(config.http.load_credentials())
            if config.http.credentials and config.http.port != -1
            else None
        )
        self._certificate = (
            ServingCertificate(
                config.http.tls.cert_file,
                config.http.tls.key_file,
                "http.tls",
                listener="collector",
            )
            if config.http.tls.enabled and config.http.port != -1
            else None
        )
        if config.inbox.enabled:
            self.inbox, self._reviewers = self._fleet_inbox()
        self.scim_store: ScimStore | None = None
        self.directory_publishing: DirectoryPublishing | None = None
        self._scim: ScimEndpoint | None = None
        self._directory_store: Any = None
        self._directory_publisher: DirectoryPublisher | None = None
        self._directory_connected = False
        if config.scim.enabled:
            http_secrets = (
                [secret for secret, _ in config.http.load_credentials().values()]
                if config.http.credentials
                else []
            )
            self._scim_credentials = AdminCredentials(
                config.scim.load_credentials(others=http_secrets)
            )
            self._directory_key = load_directory_key(config)
        self.http_port: int | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Open the state, serve HTTP, start the doors.

        Raises:
            StateError: the state cannot be opened.
            OSError: the HTTP port cannot be bound.
        """
        config = self.config
        self.state = CollectorState.open(
            config.state.path, map_size=config.state.map_size
        )
        self.intake = Intake(
            state=self.state,
            archive=self.archive,
            registry=self.registry,
            metrics=self.metrics,
            keys_added=self.inbox.keys_added if self.inbox is not None else None,
        )
        self._restore_gauges()
        if config.scim.enabled:
            await self._open_scim()
        if config.http.port != -1:
            await self._serve_http()
        if config.store.url:
            self._start_task(self._consume(), "store")
        if self.inbox is not None:
            self._start_task(self.inbox.run(self._stop), "inbox")
        if self.directory_publishing is not None:
            publishing = self.directory_publishing.run(self._stop)
            self._start_task(publishing, "scim directory")
        for pull, secret, roots in zip(
            config.pull, self._secrets, self._roots, strict=True
        ):
            puller = Puller(pull, secret, self.intake, self.metrics, roots=roots)
            self._start_task(puller.run(self._stop), f"pull {pull.daemon_id}")
        log.info(
            "collector started",
            extra={
                "fields": {
                    "component": "collector",
                    "store": config.store.url,
                    "pull": [p.daemon_id for p in config.pull],
                    "archive": config.archive.url,
                    "http_port": self.http_port,
                    "http_tls": self._certificate is not None,
                    "http_credentials": sorted(self.config.http.credentials),
                    "inbox": self.inbox.name if self.inbox else "",
                    "scim": sorted(config.scim.credentials) if self._scim else [],
                }
            },
        )

    async def _open_scim(self) -> None:
        """Open the SCIM store and build the endpoint and its publishing.

        Raises:
            ScimStoreError: the store cannot be opened or read.
        """
        scim = self.config.scim
        provider = build_provider(scim.max_results)
        store = await asyncio.to_thread(ScimStore, scim.path, provider, scim.map_size)
        self.scim_store = store
        group_roles = {name: tuple(roles) for name, roles in scim.group_roles.items()}
        publishing = DirectoryPublishing(
            lambda: directory_content(store.principals(group_roles)),
            self._publish_directory,
            retry_seconds=self.config.store.retry_seconds,
            on_published=lambda _revision: self.metrics.directory_revisions.inc(),
            on_failure=self.metrics.directory_publish_failures.inc,
            # Never an empty (or old) directory over one published by hand
            # when nothing changed in SCIM since its last publish.
            publish_at_start=store.unpublished,
            commits=lambda: store.commits,
            mark_published=store.mark_published,
            interval_seconds=self.config.scim.publish_interval_seconds,
        )
        self.directory_publishing = publishing
        # One store and one publisher for the collector's life: `created`
        # then strictly increases across every revision it publishes.
        self._directory_store = self.config.store.open_store()
        self._directory_publisher = DirectoryPublisher(
            self._directory_store, self._directory_key, clock=self.clock
        )
        self._scim = ScimEndpoint(
            AsyncScimStore(store, publishing.changed),
            provider,
            self._scim_credentials,
            base_url=scim.base_url,
            on_refused=self.metrics.scim_refusals.inc,
            max_filter_terms=scim.max_filter_terms,
        )

    async def _publish_directory(self, content: bytes) -> str:
        """Publish directory content to the store, connecting first until a
        connect succeeds (a ``nats://`` store reconnects by itself after)."""
        assert self._directory_store is not None
        assert self._directory_publisher is not None
        if not self._directory_connected:
            await self._directory_store.connect()
            self._directory_connected = True
        return await self._directory_publisher.publish(content)

    async def _flush_directory(self, fields: dict[str, Any]) -> None:
        """Publish a SCIM change not yet published (waiting out the publish
        interval, or answered during the stop) once, within
        ``store.timeout_seconds``, so it reaches daemons now rather than at
        the next start."""
        publishing = self.directory_publishing
        if publishing is None or self._directory_store is None:
            return
        log.info("stopping: directory", extra={"fields": fields})
        try:
            await asyncio.wait_for(
                publishing.flush(), self.config.store.timeout_seconds
            )
        except TimeoutError:
            publishing.abandon()
            log.warning(
                "stopping: directory not published in time; the next start "
                "publishes it",
                extra={
                    "fields": {
                        **fields,
                        "timeout_seconds": self.config.store.timeout_seconds,
                    }
                },
            )

    async def _close_directory_store(self) -> None:
        store, self._directory_store = self._directory_store, None
        self._directory_publisher = None
        if store is not None:
            with contextlib.suppress(Exception):
                await store.close()

    def _fleet_inbox(self) -> tuple[FleetInbox, ReviewerAuth]:
        """The fleet inbox and who may sign in to it.

        Raises:
            ConfigError: a key, secret or JWKS cannot be read.
        """
        config = self.config.inbox
        credentials = {
            name: AdminReviewer(
                secret=secret,
                roles=frozenset(str(role) for role in roles),
                principal=config.credentials[name].principal or name,
                reviewer_roles=frozenset(config.credentials[name].reviewer_roles),
            )
            for name, (secret, roles) in _load_credentials(config).items()
        }
        issuers = [
            ReviewerIssuer(
                issuer.load(f"inbox.reviewer_issuers[{i}]"), issuer.roles_claim
            )
            for i, issuer in enumerate(config.reviewer_issuers)
        ]
        auth = ReviewerAuth(
            credentials,
            issuers,
            max_clock_skew_seconds=config.max_clock_skew_seconds,
            clock=self.clock,
        )
        store = self.config.store.open_store()
        inbox = FleetInbox(
            store,
            name=config.name,
            signing_key=config.load_signing_key(),
            keys_of=self._daemon_keys,
            may_keep=self._may_keep,
            timeout=self.config.store.timeout_seconds,
            retry_seconds=self.config.store.retry_seconds,
            clock=self.clock,
            on_entry=lambda outcome: self.metrics.inbox_entries.labels(outcome).inc(),
            retention_seconds=config.retention_seconds,
        )
        return inbox, auth

    def _daemon_keys(self, daemon_id: str) -> Mapping[str, PublicKey] | None:
        """A registered daemon's keys: those in ``daemons`` and those its
        verified key rotations added (as its segments are checked); None
        for a daemon not registered."""
        registered = self.registry.keys_for(daemon_id)
        if registered is None:
            return None
        if self.state is None:
            return registered
        return trusted_keys(registered, self.state.frontier(daemon_id))

    def _may_keep(self, daemon_id: str) -> bool:
        """Whether the inbox may keep approvals of ``daemon_id`` signed with
        a key not known yet: a daemon registered by its exact id, or a
        family member the collector accepted a segment of (any number of
        member ids can be named, so a stranger's are not kept)."""
        if not self.registry.is_family_member(daemon_id):
            return True
        return self.state is not None and bool(self.state.frontier(daemon_id).log_id)

    def _start_task(self, door: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(door, name=name)
        task.add_done_callback(self._door_ended)
        self._tasks.append(task)

    def _door_ended(self, task: asyncio.Task[None]) -> None:
        # A door runs until stop(); one that ends before is a collector
        # that quietly stopped collecting, so it is never silent.
        error = None if task.cancelled() else task.exception()
        if self._stop.is_set() and error is None:
            return
        self.metrics.failures.labels("door").inc()
        log.error(
            "door stopped taking segments",
            exc_info=error,
            extra={
                "fields": {
                    "component": "collector",
                    "door": task.get_name(),
                    "error": repr(error) if error else "ended",
                }
            },
        )

    def _restore_gauges(self) -> None:
        assert self.state is not None and self.intake is not None
        for daemon_id, frontier in self.state.frontiers().items():
            if self.registry.is_family_member(daemon_id):
                # One label for many members: no member's size is the family's.
                continue
            label = self.intake.label(daemon_id)
            self.metrics.tree_size.labels(label).set(frontier.tree_size)

    async def _serve_http(self) -> None:
        assert self.state is not None
        app = build_http_app(
            metrics=self.metrics,
            state=self.state,
            archive=self.archive,
            registry=self.registry,
            credentials=self._http_credentials,
        )
        if self.inbox is not None and self._reviewers is not None:
            add_inbox_routes(
                app,
                self.inbox,
                self._reviewers.authenticate,
                self.config.inbox,
                self.clock,
                self.metrics,
            )
        if self._scim is not None:
            add_scim_routes(app, self._scim)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        tls = self._certificate.ssl_context() if self._certificate else None
        site = web.TCPSite(
            self._runner, self.config.http.host, self.config.http.port, ssl_context=tls
        )
        await site.start()
        sockets = site._server.sockets if site._server else ()  # type: ignore[union-attr]
        self.http_port = sockets[0].getsockname()[1] if sockets else None

    async def _consume(self) -> None:
        store_config = self.config.store
        fields = {"component": "collector", "store": store_config.url}
        assert self.intake is not None
        while not self._stop.is_set():
            store = store_config.open_store()
            try:
                await store.connect()
                async for delivery in store.segments(store_config.consumer):
                    await self.intake.receive(delivery)
            except StoreUnavailable as err:
                self.metrics.failures.labels("store").inc()
                log.warning(
                    "store unavailable; reconnecting",
                    extra={"fields": {**fields, "error": str(err)}},
                )
            except Exception as err:
                # The store's reader tripped on something (the intake
                # handles its own): start it again rather than stop
                # collecting for every daemon.
                self.metrics.failures.labels("store").inc()
                log.error(
                    "store consumer failed; reconnecting",
                    exc_info=True,
                    extra={
                        "fields": {**fields, "error": f"{type(err).__name__}: {err}"}
                    },
                )
            finally:
                with contextlib.suppress(Exception):
                    await store.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), store_config.retry_seconds)

    async def stop(self) -> None:
        """Stop in order; idempotent."""
        self._stop.set()
        fields = {"component": "collector"}
        # HTTP first: no write is answered after the last publish below.
        if self._runner is not None:
            log.info("stopping: http", extra={"fields": fields})
            await self._runner.cleanup()
            self._runner = None
        log.info("stopping: doors", extra={"fields": fields})
        for task in self._tasks:
            task.cancel()
        pending: set[asyncio.Task[None]] = set()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=DOOR_STOP_SECONDS)
        for task in self._tasks:
            if task in pending:
                # A client library that swallowed the cancellation: let it
                # go rather than hang the stop.
                log.error(
                    "stopping: door did not stop in time; left behind",
                    extra={"fields": {**fields, "door": task.get_name()}},
                )
            elif not task.cancelled() and task.exception() is not None:
                log.error(
                    "stopping: door had died",
                    extra={
                        "fields": {
                            **fields,
                            "door": task.get_name(),
                            "error": repr(task.exception()),
                        }
                    },
                )
        self._tasks.clear()
        await self._flush_directory(fields)
        await self._close_directory_store()
        if self.scim_store is not None:
            log.info("stopping: scim store", extra={"fields": fields})
            self.scim_store.close()
            self.scim_store = None
        if self.state is not None:
            log.info("stopping: state", extra={"fields": fields})
            self.state.close()
            self.state = None
        log.info("collector stopped", extra={"fields": fields})

    async def run(self) -> None:
        """Start, serve until SIGTERM or SIGINT, stop.

        The collector reads its config only at start: a SIGHUP is logged
        and otherwise ignored, to the exit (see kynara_sidecar.entry).
        """
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, _hangup_ignored)
        try:
            await self.start()
            await stop.wait()
        finally:
            await self.stop()
            # Closing the loop would give SIGHUP its default action back,
            # which ends the process.
            loop.remove_signal_handler(signal.SIGHUP)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _hangup_ignored() -> None:
    log.warning(
        "SIGHUP ignored: the collector reads its config only at start; "
        "restart it to apply a change",
        extra={"fields": {"component": "collector"}},
    )


def _load_credentials(config: InboxConfig) -> dict[str, tuple[bytes, frozenset[str]]]:
    """The reviewers' secrets, read and checked as the daemon's admin
    credentials are (at least 16 bytes, none shared)."""
    listener = AdminListenerConfig(credentials=config.credentials)
    loaded = listener.load_credentials("inbox")
    return {
        name: (secret, frozenset(roles)) for name, (secret, roles) in loaded.items()
    }
