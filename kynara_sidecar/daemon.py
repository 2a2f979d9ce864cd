"""The daemon: wires config, policies, the audit log and the listeners.

Start-up order (each step logged): load policies and the audit keys -> lock
the agent socket -> open the audit log (exclusive) -> verify its tail
against the newest checkpoint and the witness -> start the writer, append a
key_rotation record if the signing key changed, append the start marker
and read it back -> append a policy_activated marker committed with the
set's source files -> bind listeners (TCP before the socket) -> start the
MCP gateway when ``gateway.servers`` is set (its upstreams, then its HTTP
listener and, for ``kynara-sidecar gateway``, stdio) -> report SERVING.
A log that cannot be opened, verified or written leaves the daemon up and
NOT_SERVING, answering ``audit_unavailable``.

Shutdown order (SIGTERM/SIGINT, each step logged): report NOT_SERVING ->
refuse new requests with ``shutting_down`` -> wait for in-flight requests,
records committed, up to ``shutdown_grace_seconds`` -> close the listeners
-> append a stop marker -> seal the open segment and sign a head, both
stored and witnessed -> give the last segment and status about a second to
reach the central store (``FINAL_SYNC_SECONDS``) -> flush and close the
audit log. The stop is bounded whatever the store does: the bundle
follower or a sync task still running once what is left of the grace (at
least ``MIN_SYNC_STOP_SECONDS``) is over is stuck in a store call; it is
logged, left behind, and the log closes without it. ``run_daemon`` then
exits without joining threads blocked in the store (a hung mount).

With a central store (``Config.store``), once the audit log is open the
daemon puts its status there (``sync.status``) and, with
``sync.ship_segments``, ships each sealed segment (``sync.shipper``);
retention then prunes only what the store acknowledged, and under
``sync.backlog_policy: fail_closed`` decisions go through the shipper's
``BacklogGate``. The admin ``SyncService.ShipNow`` seals the open segment
(a ``seal`` marker) and ships it on request, as a preStop hook asks.

SIGHUP reads the config file again (with the CLI's overrides) and applies
the keys in ``LIVE_SETTINGS`` (log level and format, the drain period);
keys that need a restart keep their running values, named in one warning.
A config that fails to read or validate is refused whole, policies
included. Then SIGHUP reloads policies; a bad set is refused and the
previous one stays active. A good one is activated only once its
policy_activated marker (and its source files) are committed.

Signed bundles (``policy.source`` a bundle file or a store): no policy
directory is read at start. Once the audit log is open, the bundle last
activated (kept in the log's ``bundles`` database) is verified again with
``policy.trusted_keys`` and activated at once, so a restart with the centre
down serves it; a bundle file is then read; then the ``BundleFollower``
follows a store in the background. Each bundle it activates commits with
its ``policy_activated`` marker, its source files and the ``active_bundle``
pointer in one transaction. With no bundle at all the daemon is up but
NOT_SERVING and Decide answers ``policy_not_ready``, until one activates.
SIGHUP and the admin ``SyncService.SyncNow`` fetch once.

The collector's signed directory (``directory.store``): a second
``BundleFollower`` follows the store's signed directory updates, verified
with ``directory.trusted_keys``. The active policies are then composed of
two parts, the policy set (from the files or the bundle) and the signed
directory compiled against it (roles the set does not define are kept,
with a WARNING); the directory in the files or the bundle is not used. A
new bundle is compiled with the current signed directory, a new directory
against the current set, under one lock, and each activation commits, with
its ``policy_activated`` marker naming both revisions, the directory's
file (``policy_sets``, ``directory/<revision>``) and the update's bytes
(the log's ``directories`` database, meta ``active_directory``). At start
the kept update is verified again and restored first, so a restart with
the store down decides at once. Until a signed directory is active the
daemon is NOT_SERVING and Decide answers ``policy_not_ready``. A directory
that lacks the daemon's agent is still activated (refusing it would also
hold back a deactivation), with an ERROR that every decision is denied.
SIGHUP and ``SyncNow`` sync the directory too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import functools
import logging
import os
import pathlib
import signal
import socket
import threading
import time
import typing
from collections.abc import Callable, Mapping, Sequence

import grpc
import msgspec
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from kynara.v1 import decision_pb2

from kynara_sidecar import __version__, logs
from kynara_sidecar.approvals.book import APPROVALS_DB, ApprovalBook
from kynara_sidecar.approvals.fleet import FleetLink
from kynara_sidecar.approvals.webhook import ApprovalWebhook
from kynara_sidecar.audit import AuditSink, RefusingSink
from kynara_sidecar.audit import verify as audit_verify
from kynara_sidecar.audit.checkpoint import CheckpointError, CheckpointV1
from kynara_sidecar.audit.counters import LIMITS_DB
from kynara_sidecar.audit.keys import PublicKey, load_trusted_keys
from kynara_sidecar.audit.record import AuditRecordV1, format_timestamp, marker_record
from kynara_sidecar.audit.startup import AuditKeys, load_audit_keys, rotation_for
from kynara_sidecar.audit.store import (
    AuditStore,
    StateChange,
    bundle_changes,
    directory_changes,
    policy_set_changes,
)
from kynara_sidecar.audit.witness import Witness
from kynara_sidecar.audit.writer import AuditWriter, Sealing
from kynara_sidecar.config import (
    METRICS_READERS,
    AdminListenerConfig,
    AgentListenerConfig,
    BacklogPolicy,
    Config,
    ExtAuthzConfig,
    IdentityMode,
    daemon_id_problem,
    host_port,
)
from kynara_sidecar.decision import Timestamp
from kynara_sidecar.errors import (
    AuditLogInUse,
    AuditUnavailable,
    ConfigError,
    KynaraError,
    ListenerError,
    PolicyError,
)
from kynara_sidecar.limits.book import Counted, LimitBook, Tally
from kynara_sidecar.limits.fleet import FleetLimits
from kynara_sidecar.metrics import Metrics
from kynara_sidecar.pipeline import Pipeline
from kynara_sidecar.policy.compiler import compile_directory
from kynara_sidecar.policy.limits import CompiledLimit, window_start
from kynara_sidecar.policy.loader import (
    LoadedPolicies,
    compile_documents,
    decode_document,
    read_documents,
    read_policy_documents,
)
from kynara_sidecar.policy.model import LimitScope, PolicyDocument
from kynara_sidecar.server.admin import AdminCredentials
from kynara_sidecar.server.approval_service import ApprovalService
from kynara_sidecar.server.audit_service import MAX_ADMIN_REQUEST_BYTES, AuditService
from kynara_sidecar.server.decision_service import DecisionService, grpc_receive_limit
from kynara_sidecar.server.ext_authz import ExtAuthzService
from kynara_sidecar.server.fastpath import FastPathServer
from kynara_sidecar.server.grpc_metrics import ServerMetrics
from kynara_sidecar.server.http import build_http_app
from kynara_sidecar.server.playground import PlaygroundSources
from kynara_sidecar.server.reviewers import ReviewerAuth, admin_reviewers
from kynara_sidecar.server.sync_service import SyncService
from kynara_sidecar.server.tls import ServingCertificate
from kynara_sidecar.sync import BundleEntry, Store, open_store
from kynara_sidecar.sync._session import StoreSession
from kynara_sidecar.sync.bundle import VerifiedBundle, verify_bundle
from kynara_sidecar.sync.directory import DIRECTORY_FILE, VerifiedDirectory
from kynara_sidecar.sync.follower import (
    BUNDLES,
    Activate,
    BundleFile,
    BundleFollower,
    BundleSource,
    DirectorySource,
    Followed,
    Followers,
    SyncOutcome,
    directory_updates,
)
from kynara_sidecar.sync.shipper import BacklogGate, SegmentShipper
from kynara_sidecar.sync.status import (
    DaemonStatusV1,
    StatusPublisher,
    daemon_status,
    directory_status,
    policy_status,
)

if typing.TYPE_CHECKING:
    from kynara_sidecar.gateway.catalog import Catalog
    from kynara_sidecar.gateway.http import GatewayHttp
    from kynara_sidecar.gateway.proxy import Gateway
    from kynara_sidecar.gateway.stdio import StdioWire

__all__ = ["Daemon", "run_daemon", "with_daemon_id"]

log = logging.getLogger("kynara.daemon")

DECISION_SERVICE = decision_pb2.DESCRIPTOR.services_by_name["DecisionService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# The health-only port's liveness service (kubelet's liveness and startup
# probes): SERVING from the moment that port is up until stop begins,
# whatever the log or the policies say, so a daemon that is up but
# NOT_SERVING (a log that is down, no bundle yet) is kept out of traffic by
# readiness ("" and DecisionService) instead of being restarted in a loop.
# A stuck event loop answers nothing, and the probe fails.
LIVENESS_SERVICE = "kynara.liveness"
# At stop, after the final seal: how long the last segment and status may
# take to reach the central store. About a second: enough for a live store,
# and a dead one delays shutdown no longer; what is left ships after the
# next start.
FINAL_SYNC_SECONDS = 1.0
# At stop, the least time the follower and the sync tasks get to end,
# however much of shutdown_grace_seconds the drain used: the final sync,
# the shipper's last look at its backlog (a second at most) and the
# store's close. A task still running then is stuck in the store (a call
# blocked on a hung mount cannot be interrupted): it is left behind and
# the audit log closes without it.
MIN_SYNC_STOP_SECONDS = 3 * FINAL_SYNC_SECONDS


def _fields(**fields: object) -> dict[str, dict[str, object]]:
    return {"fields": {"component": "daemon", **fields}}


# Config keys a SIGHUP applies at once. Policy files are read again on
# every reload whatever the config says, and so are the admin credentials'
# secret files while a listener checks them (rotation without a restart);
# any other key that changed needs a restart (listeners, sockets, the audit
# log, identity, sync...).
LIVE_SETTINGS = ("log.level", "log.format", "shutdown_grace_seconds")
# Live too while a listener checks admin credentials: entries added,
# removed or changed apply at once.
ADMIN_CREDENTIALS = "admin.credentials"
_ABSENT = object()


class _PolicyBase(typing.NamedTuple):
    """The policy part of what is active, as read from the files or
    verified in a bundle, with the directory that came with it (used when
    ``directory.store`` is not set)."""

    policies: LoadedPolicies
    policy_files: dict[str, bytes]
    directory_files: dict[str, bytes]
    # What else commits with each activation: a bundle's bundle_changes.
    extra: list[StateChange]


class _SignedDirectory(typing.NamedTuple):
    """The collector's signed directory update, verified."""

    verified: VerifiedDirectory
    entry: BundleEntry


def _changed_settings(old: object, new: object, key: str = "") -> list[str]:
    """The dotted keys whose values differ between two configs as plain
    data (``msgspec.to_builtins``); maps are compared key by key."""
    if isinstance(old, dict) and isinstance(new, dict):
        changed: list[str] = []
        for name in sorted({*old, *new}, key=str):
            path = f"{key}.{name}" if key else str(name)
            changed += _changed_settings(
                old.get(name, _ABSENT), new.get(name, _ABSENT), path
            )
        return changed
    return [] if old == new else [key]


# What an operator does about a log that cannot be trusted.
_AFTER_BREAK = (
    "Appends stopped: run `kynara-sidecar verify --config ...` to see the "
    "damage, keep the evidence, and run `kynara-sidecar new-chain --config "
    "...` to continue on a new log that names the break"
)


def with_daemon_id(config: Config) -> Config:
    """The config with ``identity.daemon_id`` filled in: "<agent>@<host>"
    when not set (the log's origin must be stable across restarts)."""
    if config.identity.daemon_id:
        return config
    # Multi-agent mode has no one agent id to name the log after.
    agent = config.identity.agent_id or "kynara"
    daemon_id = f"{agent}@{socket.gethostname()}"
    if problem := daemon_id_problem(daemon_id):
        raise ConfigError(
            f"identity.daemon_id: not set, and the default {daemon_id!r} "
            f"(agent@host) cannot be one: {problem}; set identity.daemon_id"
        )
    identity = msgspec.structs.replace(config.identity, daemon_id=daemon_id)
    return msgspec.structs.replace(config, identity=identity)


# A task left behind at stop gets this long to take its cancellation.
_LAST_CANCEL_SECONDS = 0.1
# Once the daemon stopped: how long tasks it left behind and the worker
# threads get to end before the process exits without them.
_LOOP_CLOSE_SECONDS = 1.0
# Retention's keep_from that keeps every record (each is stamped at or after
# it); 0 would set no bound at all.
_KEEP_EVERY_RECORD = 1
_WORKER_PREFIX = "kynara-worker"


async def _within(stop: typing.Awaitable[None], seconds: float) -> bool:
    """Await ``stop`` for at most ``seconds``; returns whether it ended. One
    that did not is cancelled and left behind; one that failed is logged:
    either way the daemon goes on stopping."""
    task = asyncio.ensure_future(stop)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        task.cancel()
        return False
    if not task.cancelled() and task.exception() is not None:
        log.error("stop step failed", extra=_fields(error=repr(task.exception())))
    return True


def _trusted_keys(setting: str, paths: list[str]) -> dict[str, PublicKey]:
    """The public keys a follower trusts, from the files ``setting`` lists.

    Raises:
        ConfigError: naming ``setting``: a key file cannot be loaded.
    """
    try:
        return load_trusted_keys(paths)
    except ConfigError as err:
        raise ConfigError(f"{setting}: {err}") from err


def _left_behind(what: str, seconds: float) -> None:
    log.error(
        "did not stop in time; left behind",
        extra=_fields(
            task=what,
            seconds=round(seconds, 3),
            hint="a store call is stuck (a hung mount?); the audit log closes "
            "without it",
            setting="shutdown_grace_seconds",
        ),
    )


class Daemon:
    """One running Kynara sidecar.

    Args:
        config: the validated configuration.
        clock: nanoseconds since the epoch, read once per request (tests
            pass a fixed clock).
        reload_config: reads the config again on SIGHUP (the CLI's: the
            same file with the same overrides); None reloads policies only.
    """

    def __init__(
        self,
        config: Config,
        clock: Callable[[], int] = time.time_ns,
        *,
        stdio: StdioWire | None = None,
        reload_config: Callable[[], Config] | None = None,
    ):
        self.config = with_daemon_id(config)
        self._reload_config = reload_config
        # Whether this daemon is the process's (``run``): then its id goes
        # on every log line, and a reload sets the log level and format.
        self._owns_logs = False
        self.clock = clock
        self.metrics = Metrics()
        self.metrics.add_process_collectors()
        self.tcp_port: int | None = None
        self.health_port: int | None = None
        self.admin_port: int | None = None
        self.http_port: int | None = None
        # ext_authz.port as bound (Envoy's listener of its own).
        self.ext_authz_port: int | None = None
        self._store: AuditStore | None = None
        self._writer: AuditWriter | None = None
        self._pipeline: Pipeline | None = None
        self._audit_service: AuditService | None = None
        self._decision_service: DecisionService | None = None
        self._approval_service: ApprovalService | None = None
        self._reviewer_auth: ReviewerAuth | None = None
        # Every table of admin secrets a listener checks; a reload swaps
        # each in place.
        self._admin_tables: list[AdminCredentials] = []
        # approvals.webhook.url: told of each new approval.
        self._webhook: ApprovalWebhook | None = None
        self._servers: list[grpc.aio.Server] = []
        # agent.fast_socket: the fast path, beside the agent's gRPC listener.
        self._fast_path: FastPathServer | None = None
        self._health: list[health.aio.HealthServicer] = []
        self._http: web.AppRunner | None = None
        self._socket_locks: list[typing.IO[str]] = []
        # Why the audit log cannot be appended to, when it cannot.
        self._audit_problem: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # The log's origin: its checkpoints' (see _log_origin).
        self._origin = self.config.identity.daemon_id
        # Signed bundles only: what follows policy.source.
        self._follower: BundleFollower | None = None
        # directory.store only: what follows it, and the signed directory
        # the active policies are composed with (see _activate_parts).
        self._directory_follower: BundleFollower | None = None
        self._signed: _SignedDirectory | None = None
        # The policy part the active policies are composed of.
        self._base: _PolicyBase | None = None
        # One composition at a time: a bundle and a directory arriving
        # together must not each compose with the other's predecessor.
        self._activation_lock = asyncio.Lock()
        # Health follows policy activation only once start decided it, and
        # never again once stop began.
        self._serving_reported = False
        self._serving_logged = False
        self._stopping = False
        # While start restores the kept parts: a kept signed directory that
        # does not compile with the policies is dropped, not fatal.
        self._restoring = False
        # With a central store (Config.store): status up, segments out.
        self._session: StoreSession | None = None
        self._shipper: SegmentShipper | None = None
        self._status_publisher: StatusPublisher | None = None
        # With a central store: approvals up, the fleet inbox's reviews down.
        self._fleet: FleetLink | None = None
        # sync.backlog_policy fail_closed: the pipeline's sink.
        self._gate: BacklogGate | None = None
        # The approvals, kept in the audit log's LMDB environment.
        self._book: ApprovalBook | None = None
        # The counted decisions of the declared limits, over the log.
        self._limits: LimitBook | None = None
        # Fleet-scope limits shared through the central store.
        self._fleet_limits: FleetLimits | None = None
        # The MCP gateway (gateway.servers): its upstreams, the agent-facing
        # server, its HTTP listener and (`kynara-sidecar gateway`) stdio.
        self.gateway_port: int | None = None
        self._catalog: Catalog | None = None
        self._gateway: Gateway | None = None
        self._gateway_http: GatewayHttp | None = None
        self._stdio_wire = stdio
        self._stdio_task: asyncio.Task[None] | None = None

    @property
    def pipeline(self) -> Pipeline:
        assert self._pipeline is not None, "daemon not started"
        return self._pipeline

    def _approval_url(self, approval_id: str) -> str:
        """The review page of an approval: under ``approvals.inbox_url``,
        else this daemon's HTTP listener (asked when an approval is opened,
        once the listener is up); empty with neither."""
        base = self.config.approvals.inbox_url.rstrip("/")
        if not base and self.http_port is not None:
            http = self.config.http
            scheme = "https" if http.tls.enabled else "http"
            base = f"{scheme}://{host_port(http.host, self.http_port)}"
        return f"{base}/approvals/{approval_id}" if base else ""

    def _read_base(self) -> _PolicyBase:
        """Load and compile the policy files, keeping the very bytes that
        were compiled for the log (``policy_sets``).

        With ``directory.store`` the files' directory file is not theirs to
        give: it is left aside, parsed only to learn its kind, neither
        validated nor compiled (absent is fine, a typo in it holds no reload
        back), and each read says so in one INFO line."""
        root = self.config.policy.path
        if self._directory_follower is None:
            documents = read_documents(root)
            policies = compile_documents(documents, root=str(root))
            self._check_agents(policies, str(root))
        else:
            documents, ignored = read_policy_documents(root)
            policies = compile_documents(documents, root=str(root), directory="ignored")
            if ignored:
                log.info(
                    "directory file in the policies ignored: the directory is "
                    "the signed one from directory.store",
                    extra=_fields(
                        component="policy",
                        files=ignored,
                        setting="directory.store",
                    ),
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
        return _PolicyBase(policies, policy_files, directory_files, [])

    def _missing_agents(self, policies: LoadedPolicies) -> dict[str, str]:
        """The configured agents the directory lacks: setting -> agent id."""
        identity = self.config.identity
        settings = {f"identity.agents.{agent}": agent for agent in identity.agents}
        settings = settings or {"identity.agent_id": identity.agent_id}
        return {
            setting: agent_id
            for setting, agent_id in settings.items()
            if policies.directory.lookup(agent_id) is None
        }

    def _check_agents(self, policies: LoadedPolicies, where: str) -> None:
        for setting, agent_id in self._missing_agents(policies).items():
            raise PolicyError(
                f"{setting} {agent_id!r} is not in the directory, so every "
                "decision would be denied; add the agent or fix the setting",
                path=where,
            )

    def _bundle_follower(self) -> BundleFollower:
        """The follower of ``policy.source`` (a bundle file or a store).

        Raises:
            ConfigError: a trusted key cannot be loaded, or the store URL is
                malformed.
        """
        cfg = self.config
        trusted = _trusted_keys("policy.trusted_keys", cfg.policy.trusted_keys)
        if cfg.policy.store:
            source = self._open_store(cfg.policy.store, "policy.source")
        else:
            source = BundleFile(cfg.policy.path)
        # With directory.store a bundle's directory is not used, so it is
        # not compiled and may be absent; without, the bundle must hold one.
        use = "ignored" if cfg.directory.store else "required"
        return self._new_follower(
            source,
            trusted,
            self._activate_bundle,
            dataclasses.replace(
                BUNDLES,
                verify=functools.partial(verify_bundle, directory=use),
            ),
        )

    def _directory_follower_of(self) -> BundleFollower | None:
        """The follower of ``directory.store``; None when it is not set.

        Raises:
            ConfigError: a trusted key cannot be loaded, or the store URL is
                malformed.
        """
        cfg = self.config
        if not cfg.directory.store:
            return None
        trusted = _trusted_keys("directory.trusted_keys", cfg.directory.trusted_keys)
        return self._new_follower(
            DirectorySource(self._open_store(cfg.directory.store, "directory.store")),
            trusted,
            self._activate_directory,
            directory_updates(),
        )

    def _central_store(self) -> Store:
        """A connection of its own to ``Config.store`` (sync.store, else a
        store policy.source names)."""
        sync = self.config.sync
        return self._open_store(
            self.config.store, "sync.store" if sync.store else "policy.source"
        )

    def _open_store(self, url: str, setting: str) -> Store:
        """A store of bundles or directory updates, with the ``sync``
        section's timeout, poll interval and NATS settings; ``setting``
        names where ``url`` came from, for the store's errors.

        Raises:
            ConfigError: the store URL is malformed.
        """
        sync = self.config.sync
        return open_store(
            url,
            timeout=sync.timeout_seconds,
            poll_seconds=sync.poll_seconds,
            nats=sync.nats.load("sync.nats"),
            setting=setting,
        )

    def _new_follower(
        self,
        source: BundleSource,
        trusted: Mapping[str, PublicKey],
        activate: Activate,
        followed: Followed,
    ) -> BundleFollower:
        """A follower of ``source`` on the ``sync`` section's schedule and
        clock-skew bound, whose every outcome updates the daemon's status."""
        sync = self.config.sync
        return BundleFollower(
            source,
            trusted,
            activate,
            self.metrics,
            clock=self.clock,
            poll_seconds=sync.poll_seconds,
            retry_min_seconds=sync.retry_min_seconds,
            retry_max_seconds=sync.retry_max_seconds,
            on_outcome=lambda _: self._status_changed(),
            max_clock_skew_seconds=sync.max_clock_skew_seconds,
            followed=followed,
        )

    async def _activate_bundle(
        self, verified: VerifiedBundle, entry: BundleEntry
    ) -> None:
        """The bundle follower's ``activate``: compose the bundle's set with
        the directory (its own, or the signed one) and activate it.

        Raises:
            PolicyError: the bundle's directory lacks a configured agent
                (when it is the one used).
            AuditUnavailable: the marker could not be committed.
        """
        if self._directory_follower is None:
            self._check_agents(verified.policies, f"bundle {verified.revision}")
        policy_files: dict[str, bytes] = {}
        directory_files: dict[str, bytes] = {}
        for name, content in verified.files.items():
            # Decoded again only to sort the files: the bundle compiled.
            document = decode_document(name, content).document
            is_policy = isinstance(document, PolicyDocument)
            (policy_files if is_policy else directory_files)[name] = content
        base = _PolicyBase(
            verified.policies,
            policy_files,
            directory_files,
            bundle_changes(entry.digest, entry.data),
        )
        await self._activate_parts(base=base)

    async def _activate_directory(
        self, verified: VerifiedDirectory, entry: BundleEntry
    ) -> None:
        """The directory follower's ``activate``: compile the signed
        directory against the active policy set and activate the two.

        Raises:
            PolicyError: it does not compile (an attribute value that is no
                typed value, say).
            AuditUnavailable: the marker could not be committed.
        """
        await self._activate_parts(signed=_SignedDirectory(verified, entry))

    async def _activate_parts(
        self,
        *,
        base: _PolicyBase | None = None,
        signed: _SignedDirectory | None = None,
    ) -> None:
        """Compose a new policy part or signed directory with the current
        other part, commit the result with its marker and serve it.

        A part that has nothing to be composed with yet (a bundle before the
        first signed directory, or the other way round) is kept until the
        other comes, and nothing is activated.

        While start restores, a kept signed directory that does not compile
        against the policies is dropped (logged at ERROR) and the policies
        wait for a new one; later, a new policy part that the active signed
        directory does not compile against is refused naming the directory.

        Raises:
            PolicyError: the signed directory does not compile against the
                set; nothing changed.
            AuditUnavailable: the marker could not be committed; nothing
                changed.
        """
        async with self._activation_lock:
            base_given = base is not None
            base = base or self._base
            signed = signed or self._signed
            waiting = base is None or (
                self._directory_follower is not None and signed is None
            )
            if waiting:
                self._base, self._signed = base, signed
                log.info(
                    "policy part kept; waiting for the other",
                    extra=_fields(
                        component="policy",
                        waiting_for="policies" if base is None else "directory",
                        setting="policy.source" if base is None else "directory.store",
                    ),
                )
                return
            assert base is not None
            try:
                policies, changes = await asyncio.to_thread(self._compose, base, signed)
            except PolicyError as err:
                if signed is None or signed is not self._signed or not base_given:
                    raise
                # The kept signed directory is what no longer compiles.
                if self._restoring:
                    self._drop_kept_directory(base, signed, err)
                    return
                raise PolicyError(
                    f"the active signed directory {signed.verified.revision} "
                    f"does not compile against policy set "
                    f"{base.policies.policy_set.revision}: {err}"
                ) from err
            await self._activate(policies, changes)
            self._base, self._signed = base, signed
            revision = policies.policy_set.revision
        if self._serving_reported and not self._stopping:
            status = self._health_status()
            if status == SERVING and not self._serving_logged:
                log.info("serving", extra=_fields(policy_revision=revision))
            self._serving_logged = status == SERVING
            await self._set_health(status)

    def _drop_kept_directory(
        self, base: _PolicyBase, signed: _SignedDirectory, err: PolicyError
    ) -> None:
        """At start: the signed directory kept from an earlier run does not
        compile against the policies. Drop it, keep the policies, and wait
        (not serving) for a new directory from ``directory.store``."""
        log.error(
            "kept signed directory does not compile against the policies; "
            "dropped, waiting for a new one from the collector",
            extra=_fields(
                component="policy",
                part="directory",
                directory_revision=signed.verified.revision,
                policy_revision=base.policies.policy_set.revision,
                setting="directory.store",
                error=str(err),
            ),
        )
        self._base, self._signed = base, None
        if self._directory_follower is not None:
            self._directory_follower.forget()

    def _compose(
        self, base: _PolicyBase, signed: _SignedDirectory | None
    ) -> tuple[LoadedPolicies, list[StateChange]]:
        """The policies to activate and the changes that keep them in the
        log: the base as it came, or its set with the signed directory."""
        if signed is None:
            policies = base.policies
            directory_files = base.directory_files
            extra = base.extra
        else:
            directory = compile_directory(
                signed.verified.source,
                base.policies.policy_set,
                unknown_roles="keep",
            )
            policies = LoadedPolicies(base.policies.policy_set, directory)
            directory_files = {DIRECTORY_FILE: signed.verified.content}
            extra = base.extra + directory_changes(
                signed.entry.digest, signed.entry.data
            )
            self._warn_directory(policies)
        changes = policy_set_changes(
            policies.policy_set.revision,
            base.policy_files,
            policies.directory.revision,
            directory_files,
        )
        return policies, changes + extra

    def _warn_directory(self, policies: LoadedPolicies) -> None:
        """Say what a signed directory will do that its publisher may not
        mean: roles the policies do not define, a configured agent missing."""
        fields = {
            "component": "policy",
            "policy_revision": policies.policy_set.revision,
            "directory_revision": policies.directory.revision,
        }
        unknown = sorted(policies.directory.unknown_roles)
        if unknown:
            log.warning(
                "signed directory names roles the policies do not define; "
                "each counts as itself only",
                extra={"fields": {**fields, "roles": unknown}},
            )
        for setting, agent_id in self._missing_agents(policies).items():
            log.error(
                "agent not in the signed directory: every decision is denied",
                extra={
                    "fields": {
                        **fields,
                        "agent_id": agent_id,
                        "setting": setting,
                        "hint": "provision the agent on the collector, or fix "
                        "the setting",
                    }
                },
            )

    async def _restore_directory(self) -> None:
        """Take the signed directory this log last activated, verified
        again with ``directory.trusted_keys`` (composed once the policies
        are there).

        Raises:
            AuditUnavailable: it could not be read or committed.
        """
        follower = self._directory_follower
        if follower is None:
            return
        assert self._store is not None
        stored = await asyncio.to_thread(self._store.active_directory)
        if stored is not None:
            digest, data = stored
            await follower.restore(BundleEntry(digest=digest, data=data))

    async def _first_directory(self) -> None:
        """Ask ``directory.store`` once when no directory was kept, so a
        first start with the collector up serves at once (bounded by
        ``sync.timeout_seconds`` when it is down)."""
        follower = self._directory_follower
        if follower is not None and follower.active is None:
            await follower.sync_now()

    def _followers(self) -> Followers | None:
        """The followers as one, for SyncNow; None when there is none."""
        if self._follower is None and self._directory_follower is None:
            return None
        return Followers(self._follower, self._directory_follower)

    async def _restore_bundle(self) -> None:
        """Serve the bundle this log last activated, then read a bundle file.

        Raises:
            AuditUnavailable: the stored bundle could not be read or its
                marker could not be committed.
        """
        assert self._follower is not None and self._store is not None
        stored = await asyncio.to_thread(self._store.active_bundle)
        if stored is not None:
            digest, data = stored
            await self._follower.restore(BundleEntry(digest=digest, data=data))
        # A bundle file is read now; a store is asked once when the log has
        # none yet, so a first start with the centre up serves at once
        # (bounded by sync.timeout_seconds when it is down).
        if isinstance(self._follower.source, BundleFile) or stored is None:
            await self._follower.sync_now()

    def _health_status(self) -> int:
        ready = self._pipeline is not None and self._pipeline.policies is not None
        return SERVING if self._audit_problem is None and ready else NOT_SERVING

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
        # NOTE: stored policy sets, bundles and directory updates are kept
        # for the life of the log; retention prunes records only. They are
        # content-addressed (``policy_sets``, one entry per distinct
        # revision), so they grow with the revisions activated, never with
        # decisions, and replay or export of any record kept still finds
        # the set it cites.
        marker = msgspec.structs.replace(
            self._marker("policy_activated"),
            policy_revision=policies.policy_set.revision,
            directory_revision=policies.directory.revision,
        )
        if self._writer is None:
            raise AuditUnavailable(
                f"policy not activated: the audit log is unavailable "
                f"({self._audit_problem})"
            )
        await self._writer.append(marker, changes)
        active = self.pipeline.policies
        if active is not None and _revisions(active) == _revisions(policies):
            # A reload that found the same set: the marker records the
            # reload; the active set (its warm cache, and the activation
            # time /metrics shows) stays.
            log.debug(
                "policy unchanged; still active",
                extra=_fields(
                    component="policy",
                    policy_revision=policies.policy_set.revision,
                    directory_revision=policies.directory.revision,
                ),
            )
        else:
            self.pipeline.activate(policies)
            self._log_policies(policies)
        self._status_changed()

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
        self._loop = asyncio.get_running_loop()
        base: _PolicyBase | None = None
        self._directory_follower = self._directory_follower_of()
        if cfg.policy.signed:
            self._follower = self._bundle_follower()
        else:
            log.warning(
                "policies from local files are unsigned",
                extra=_fields(source=cfg.policy.source, setting="policy.source"),
            )
            if cfg.policy.trusted_keys:
                log.warning(
                    "policy.trusted_keys unused: policy.source is a policy "
                    "directory, read unsigned",
                    extra=_fields(
                        source=cfg.policy.source,
                        setting="policy.trusted_keys",
                        hint="set policy.source to a bundle file or a store URL "
                        "(dir:///path, nats://host:port) to verify bundles",
                    ),
                )
            base = self._read_base()
        keys = load_audit_keys(cfg.audit, create=True)
        # The socket lock comes first, so a daemon refused for a live socket
        # never touches its own audit path.
        try:
            self._lock_sockets()
            await self._open_audit(base, keys)
            await self._start_sync()
            await self._start_webhook()
            await self._start_agent_listener()
            await self._start_ext_authz_listener()
            await self._start_admin_listener()
            await self._start_health_listener()
            await self._start_http()
            await self._start_gateway()
            await self._report_serving()
            self._start_following()
        except BaseException:
            await self.stop()
            raise

    def _start_following(self) -> None:
        # A bundle file is read at start and on SIGHUP; a store is followed.
        # With the log down no bundle could be activated: nothing to follow.
        if self._audit_problem is not None:
            return
        for follower in (self._follower, self._directory_follower):
            if follower is not None and not isinstance(follower.source, BundleFile):
                follower.start()

    async def _open_audit(self, base: _PolicyBase | None, keys: AuditKeys) -> None:
        """Open the log, check its tail, start the writer and self-check.

        A log that cannot be opened, fails its tail check or its start-up
        self-check leaves the daemon up but NOT_SERVING: every Decide
        answers ``audit_unavailable``, and the log line says why and which
        setting to change. Configuration errors still stop the start.
        """
        cfg = self.config.audit
        try:
            self._store = AuditStore.open(
                cfg.path,
                map_size=cfg.map_size,
                durability=str(cfg.durability),
                extra_dbs=(APPROVALS_DB, LIMITS_DB),
            )
            log.info(
                "audit log opened",
                extra=_fields(
                    path=cfg.path,
                    durability=str(cfg.durability),
                    log_id=self._store.log_id,
                ),
            )
            self._origin = self._log_origin(self._store)
            # The key check first: a log signed with an unconfigured key is a
            # configuration error, not damage.
            rotation = self._rotation(keys)
            witness = self._witness(self._store)
            self._check_tail(self._store, keys, witness)
            self._start_writer(keys, witness)
            self._book = ApprovalBook(
                self._store,
                self._writer,
                self.config.approvals,
                daemon_id=self.config.identity.daemon_id,
                clock=self.clock,
                url_for=self._approval_url,
                metrics=self.metrics,
            )
            await asyncio.to_thread(self._book.load)
            self._limits = LimitBook(self._store)
            self.metrics.watch_limits(self._limits.size)
            self._pipeline = Pipeline(
                self.config,
                self._decision_sink(),
                self.metrics,
                self.clock,
                book=self._book,
                limits=self._limits,
                fleet=self._fleet_tally if self.config.store else None,
                on_counted=self._counted,
            )
            if rotation is not None:
                await self._writer.append(rotation)
                log.warning(
                    "audit signing key rotated",
                    extra=_fields(
                        old_key_id=rotation.key_rotation.old_key_id,
                        new_key_id=rotation.key_rotation.new_key_id,
                    ),
                )
            await self._self_check()
            # After the start marker: what the restart finds past its expiry
            # is recorded expired now, after the marker (verify's rule).
            self._book.start()
            # The kept signed directory first: the policies are then
            # composed with it as soon as they are there.
            self._restoring = True
            try:
                await self._restore_directory()
                if base is not None:
                    await self._activate_parts(base=base)
                else:
                    await self._restore_bundle()
            finally:
                self._restoring = False
            await self._first_directory()
            self._update_usage()
        except AuditLogInUse:
            raise  # a second daemon on one log: configuration, not damage
        except AuditUnavailable as err:
            # With directory.store the files' directory is not the one to
            # use: nothing is active, and every decision learns why.
            plain = base is not None and self._directory_follower is None
            await self._audit_down(err, base.policies if plain else None)

    def _log_origin(self, store: AuditStore) -> str:
        """The origin this log's checkpoints name; the configured daemon id
        for a log with none yet.

        A log keeps its origin for life: its witness files live under it,
        and a daemon that signed under another name would check its tail
        against another daemon's witness.
        """
        configured = self.config.identity.daemon_id
        try:
            signed = [store.latest_checkpoint(), store.head_checkpoint()]
        except CheckpointError:
            return configured  # damage: the tail check names it
        signed = [cp for cp in signed if cp is not None]
        if not signed:
            return configured
        origin = max(signed, key=lambda cp: cp.tree_size).origin
        if origin != configured:
            log.warning(
                "the audit log keeps its origin; identity.daemon_id differs",
                extra=_fields(
                    log_origin=origin,
                    daemon_id=configured,
                    setting="identity.daemon_id",
                ),
            )
        return origin

    def _rotation(self, keys: AuditKeys) -> AuditRecordV1 | None:
        try:
            return rotation_for(
                self._store,
                keys,
                origin=self._origin,
                time=format_timestamp(Timestamp.from_nanos(self.clock())),
            )
        except ConfigError as err:
            # A key mix-up or a log re-signed by someone else: the daemon
            # cannot tell which, so it serves nothing until an operator does.
            raise AuditUnavailable(
                f"{err}. If no key was rotated, the log may have been re-signed "
                f"by someone else. {_AFTER_BREAK}"
            ) from err

    def _witness(self, store: AuditStore) -> Witness | None:
        root = self.config.audit.witness_path
        if not root:
            log.warning(
                "no witness: a truncated tail of the audit log cannot be detected",
                extra=_fields(setting="audit.witness_path"),
            )
            return None
        return Witness(root, self._origin, store.log_id)

    def _check_tail(
        self, store: AuditStore, keys: AuditKeys, witness: Witness | None
    ) -> None:
        """Refuse a log that lost its id, was replaced (verify_store checks
        its lineage against the witness), or whose last sealed segment and
        tail do not verify against its checkpoints and the witness."""
        if not store.log_id:
            raise AuditUnavailable(
                f"audit log {store.path} holds checkpoints but no log id: its "
                f"meta was rewritten. {_AFTER_BREAK}"
            )
        # From the checkpoint before the latest: the last sealed segment is
        # checked again, since a clean stop seals everything.
        anchor = store.previous_checkpoint()
        report = audit_verify.verify_store(
            store,
            keys.trusted,
            witness,
            from_tree_size=anchor.tree_size if anchor else None,
        )
        if not report.ok:
            raise AuditUnavailable(
                f"audit log {store.path} failed verification at start: "
                f"{audit_verify.format_report(report)}. {_AFTER_BREAK}"
            )

    def _start_writer(self, keys: AuditKeys, witness: Witness | None) -> None:
        cfg = self.config.audit
        sealing = Sealing(
            key=keys.signing,
            origin=self._origin,
            segment_records=cfg.segment_records,
            segment_seconds=cfg.segment_seconds,
            clock=self.clock,
            witness=witness,
            on_checkpoint=self._on_checkpoint,
            retention_seconds=cfg.retention_days * 86_400,
            keep_from=self._limits_keep_from,
            on_prune=self.metrics.audit_pruned_records.inc,
            retain_unshipped=self._ships_segments(),
        )
        self._writer = AuditWriter(
            self._store,
            max_batch=cfg.max_batch,
            deferred_window=cfg.deferred_window_ms / 1000,
            on_commit=self._on_commit,
            sealing=sealing,
            on_fatal=self._on_audit_fatal,
            on_latency=self.metrics.observe_append_latency,
        )
        self.metrics.watch_chain_head(lambda writer=self._writer: writer.size)
        self._writer.start()

    def _limits_keep_from(self) -> int:
        """Where retention must stop: the earliest instant an open window of
        an active limit reaches back to (``verify`` recomputes counters from
        the records there). Read on the writer thread."""
        pipeline = self._pipeline
        policies = pipeline.policies if pipeline is not None else None
        if policies is None:
            # Nothing active yet: the set about to be may declare limits.
            return _KEEP_EVERY_RECORD
        limits = policies.policy_set.limits
        if not limits:
            return 0
        now = self.clock()
        return min(window_start(limit.window, now) for limit in limits.values())

    async def _seal_now(self) -> int:
        """Seal the open segment now (admin ``ShipNow``): a ``seal`` marker
        ends it, unless every record is sealed already. Returns the log's
        sealed size.

        Raises:
            AuditUnavailable: the log is down or refused the marker.
        """
        writer, store = self._writer, self._store
        if writer is None or store is None or self._audit_problem is not None:
            raise AuditUnavailable(
                f"audit log unavailable, nothing sealed: {self._audit_problem}"
            )

        def sizes() -> tuple[int, int]:
            latest = store.latest_checkpoint()
            return store.head().seq, latest.tree_size if latest else 0

        head, sealed = await asyncio.to_thread(sizes)
        if head <= sealed:
            return sealed
        appended = await writer.append(self._marker("seal"), seal=True)
        return appended.seq

    async def _self_check(self) -> None:
        """Append the start marker and read it back before serving."""
        # Sealed in its own transaction: a start marker forged after a signed
        # head has no checkpoint at its size, and verify says so.
        appended = await self._writer.append(self._marker("start"), seal=True)
        stored = await asyncio.to_thread(self._store.get, appended.seq)
        if stored is None or stored.record_bytes != appended.record_bytes:
            raise AuditUnavailable(
                f"audit log {self._store.path}: the start marker (record "
                f"{appended.seq}) did not read back as written: check the volume "
                "behind audit.path"
            )

    async def _audit_down(
        self, err: AuditUnavailable, policies: LoadedPolicies | None
    ) -> None:
        self._audit_problem = str(err)
        self.metrics.audit_failures.inc()
        log.error(
            "audit log unavailable: not serving",
            extra=_fields(error=str(err), setting="audit.path"),
        )
        if self._book is not None:
            await self._book.close()
            self._book = None
        if self._writer is not None:
            await self._writer.close()
        self._writer = None
        # Decisions are still computed, so a caller learns the log is the
        # obstacle: every one is refused when its record cannot be written.
        self._pipeline = Pipeline(
            self.config, RefusingSink(err), self.metrics, self.clock
        )
        # With signed bundles no set is active: the stored one is in the log
        # that is down. The caller learns the log is the obstacle either way.
        self._pipeline.refuse_while_unready(err)
        if policies is not None:
            self._pipeline.activate(policies)

    async def _report_serving(self) -> None:
        status = self._health_status()
        await self._set_health(status)
        self._serving_reported = True
        if self._audit_problem is None and status != SERVING:
            if self._base is not None:
                log.error(
                    "no signed directory active: answering policy_not_ready",
                    extra=_fields(
                        source=self.config.directory.store,
                        setting="directory.store",
                    ),
                )
            else:
                log.error(
                    "no policy bundle active: answering policy_not_ready",
                    extra=_fields(
                        source=self.config.policy.source, setting="policy.source"
                    ),
                )
        cfg = self.config
        self._serving_logged = status == SERVING
        log.info(
            "serving" if status == SERVING else "up, not serving",
            extra=_fields(
                socket=cfg.agent.socket, port=self.tcp_port,
                fast_socket=cfg.agent.fast_socket,
                health_port=self.health_port, http_port=self.http_port,
                gateway_port=self.gateway_port,
                ext_authz_port=self.ext_authz_port,
            ),
        )  # fmt: skip

    def _on_audit_fatal(self, err: AuditUnavailable) -> None:
        # Runs on the writer thread: every later append is refused, so the
        # daemon stops reporting SERVING until an operator restarts it.
        self._audit_problem = str(err)
        self._loop.call_soon_threadsafe(
            lambda: asyncio.ensure_future(self._set_health(NOT_SERVING))
        )

    async def _set_health(self, status: int) -> None:
        if self._fast_path is not None:
            self._fast_path.set_serving(status == SERVING)
        for servicer in self._health:
            await servicer.set("", status)
            await servicer.set(DECISION_SERVICE, status)

    def _on_checkpoint(
        self, checkpoint: CheckpointV1, witness_error: str | None
    ) -> None:
        # Runs on the writer thread.
        self.metrics.audit_checkpoints.labels(str(checkpoint.kind)).inc()
        if witness_error is not None:
            self.metrics.audit_witness_failures.inc()
        shipper = self._shipper
        if shipper is not None:
            shipper.wake()

    def _log_policies(self, policies: LoadedPolicies) -> None:
        if self._owns_logs:
            logs.set_context(policy_revision=policies.policy_set.revision)
        log.info(
            "policy activated",
            extra=_fields(
                component="policy",
                policy_revision=policies.policy_set.revision,
                directory_revision=policies.directory.revision,
            ),
        )
        limits = policies.policy_set.limits
        self.metrics.set_limits((name, limit.scope) for name, limit in limits.items())
        for name, limit in sorted(limits.items()):
            log.info(
                "limit active",
                extra=_fields(
                    component="policy",
                    limit=name,
                    scope=limit.scope,
                    policy=limit.policy,
                ),
            )
            if limit.scope == LimitScope.FLEET and not self.config.store:
                log.warning(
                    "fleet limit without a central store: its conditions fail closed",
                    extra=_fields(
                        component="policy",
                        limit=name,
                        policy=limit.policy,
                        setting="sync.store",
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

    def _lock_sockets(self) -> None:
        """Hold ``<socket>.lock`` for the agent, admin and ext_authz sockets,
        so a second daemon cannot take them.

        grpc unlinks a socket file before binding, so without this a second
        daemon with another audit path would silently steal the live socket.
        """
        admin = self.config.admin
        sockets = {
            "agent.socket": self.config.agent.socket,
            "agent.fast_socket": self.config.agent.fast_socket,
        }
        if self._admin_enabled():
            sockets["admin.socket"] = admin.socket
        if self.config.ext_authz.enabled:
            sockets["ext_authz.socket"] = self.config.ext_authz.socket
        for setting, socket_path in sockets.items():
            if socket_path:
                self._socket_locks.append(self._lock_socket(setting, socket_path))

    def _lock_socket(self, setting: str, socket_path: str) -> typing.IO[str]:
        path = pathlib.Path(socket_path + ".lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise ListenerError(
                f"{setting} {socket_path} is in use by another daemon; "
                f"stop it or choose another {setting}"
            ) from None
        return handle

    def _bind(
        self,
        server: grpc.aio.Server,
        address: str,
        setting: str,
        tls: grpc.ServerCredentials | None = None,
    ) -> int:
        try:
            if tls is not None:
                return server.add_secure_port(address, tls)
            return server.add_insecure_port(address)
        except RuntimeError as err:
            raise ListenerError(
                f"{setting}: cannot listen on {address}: {err}; "
                f"is another process using it? change {setting}"
            ) from err

    def _bind_unix(
        self, server: grpc.aio.Server, path: str, mode: int, setting: str
    ) -> None:
        pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._bind(server, f"unix://{os.path.abspath(path)}", setting)
        os.chmod(path, mode)

    def _bind_listener(
        self,
        server: grpc.aio.Server,
        cfg: AgentListenerConfig | ExtAuthzConfig | AdminListenerConfig,
        section: str,
        tls: grpc.ServerCredentials | None = None,
    ) -> int | None:
        """Bind ``server`` to the TCP port and the Unix socket of the config
        section ``section`` (``cfg``), each when it is on; returns the TCP
        port bound, None when TCP is off. With ``tls`` the TCP port serves
        TLS; the Unix socket stays plaintext (its file mode guards it).

        TCP first: a port in use then fails before the socket is replaced.
        """
        port = None
        if cfg.port != -1:
            address = host_port(cfg.host, cfg.port)
            port = self._bind(server, address, f"{section}.port", tls)
        if cfg.socket:
            self._bind_unix(server, cfg.socket, cfg.socket_mode, f"{section}.socket")
        return port

    def _new_server(self, *options: tuple[str, typing.Any]) -> grpc.aio.Server:
        """A gRPC server with ``options``, stopped with the daemon; never
        sharing its port with another process (no SO_REUSEPORT); its calls
        counted (``kynara_grpc_server_*``)."""
        server = grpc.aio.server(
            options=[*options, ("grpc.so_reuseport", 0)],
            interceptors=[ServerMetrics(self.metrics)],
        )
        self._servers.append(server)
        return server

    async def _start_agent_listener(self) -> None:
        cfg = self.config.agent
        limit = cfg.max_message_bytes
        server = self._new_server(
            ("grpc.max_receive_message_length", grpc_receive_limit(limit))
        )
        tls = None
        if cfg.tls.enabled and cfg.port != -1:
            # Mutual TLS: a client certificate the CA signed, or no
            # handshake; all three files re-read when they change.
            tls = ServingCertificate(
                cfg.tls.cert_file,
                cfg.tls.key_file,
                "agent.tls",
                client_ca_file=cfg.tls.client_ca_file,
            ).credentials()
        self._decision_service = DecisionService(
            self._pipeline, limit, client_certificates=tls is not None
        )
        self._decision_service.register(server)
        await self._add_health(server)
        self.tcp_port = self._bind_listener(server, cfg, "agent", tls)
        # The fast path listens before gRPC serves, so an agent that saw
        # SERVING on health finds the fast socket too (and does not settle
        # on gRPC for want of it).
        if cfg.fast_socket:
            fast_path = FastPathServer(
                self._pipeline,
                self._decision_service,
                cfg.fast_socket,
                cfg.socket_mode,
                limit,
                idle_seconds=cfg.fast_idle_seconds,
            )
            try:
                await fast_path.start()
            except OSError as err:
                raise ListenerError(
                    f"agent.fast_socket: cannot listen on {cfg.fast_socket}: "
                    f"{err}; change agent.fast_socket"
                ) from err
            self._fast_path = fast_path
        await server.start()

    async def _start_ext_authz_listener(self) -> None:
        """Serve Envoy's Check and health on a listener of its own
        (``ext_authz.socket``, ``ext_authz.port``), when ext_authz is on.

        Never on the agent listener: a CheckRequest states the peer, which
        policies trust as the daemon's own knowledge.
        """
        cfg = self.config.ext_authz
        if not cfg.enabled:
            return
        limit = cfg.max_message_bytes
        server = self._new_server(
            ("grpc.max_receive_message_length", grpc_receive_limit(limit))
        )
        ExtAuthzService(self._pipeline, cfg, limit, self.config.gateway).register(
            server
        )
        await self._add_health(server)
        self.ext_authz_port = self._bind_listener(server, cfg, "ext_authz")
        await server.start()
        log.info(
            "ext_authz listener started",
            extra=_fields(socket=cfg.socket, port=self.ext_authz_port),
        )

    def _admin_enabled(self) -> bool:
        """Whether the admin listener starts: an address, and someone who
        could call it (an admin credential, or a reviewer issuer whose
        reviewers sign in with JWTs alone)."""
        cfg = self.config.admin
        has_address = bool(cfg.socket or cfg.port != -1)
        return cfg.enabled or (
            has_address and bool(self.config.approvals.reviewer_issuers)
        )

    async def _start_webhook(self) -> None:
        """Post each new approval to ``approvals.webhook.url``, when set."""
        if self._book is None:
            return
        self._webhook = ApprovalWebhook.from_config(
            self.config.approvals.webhook, self.metrics
        )
        if self._webhook is None:
            return
        await self._webhook.start()
        self._book.subscribe(self._webhook.notify)
        # Summaries queued before the last stop died with it: announce what
        # still waits for a reviewer (a receiver may see one twice).
        self._webhook.announce_pending(self._book, self.clock())

    def _reviewers(self) -> ReviewerAuth:
        """Who may review, read from the config once for the admin listener
        and the review page alike."""
        if self._reviewer_auth is None:
            self._reviewer_auth = ReviewerAuth.from_config(
                self.config, clock=self.clock, metrics=self.metrics
            )
        return self._reviewer_auth

    async def _start_admin_listener(self) -> None:
        """Serve AuditService, ApprovalService and health to admin
        credentials (``admin``) and reviewers (``approvals.reviewer_issuers``).

        Off until one of them names someone: without, it could only refuse.
        """
        cfg = self.config.admin
        if not self._admin_enabled():
            if cfg.socket or cfg.port != -1:
                log.warning(
                    "admin listener off: no admin credential",
                    extra=_fields(
                        setting="admin.credentials",
                        hint="or approvals.reviewer_issuers, for reviewers",
                    ),
                )
            return
        server = self._new_server(
            ("grpc.max_receive_message_length", MAX_ADMIN_REQUEST_BYTES)
        )
        credentials = AdminCredentials.from_config(cfg, self.metrics)
        self._admin_tables.append(credentials)
        self._audit_service = AuditService(self._store, credentials)
        self._audit_service.register(server)
        # SyncNow with bundles to follow; ShipNow with segments to ship.
        SyncService(
            self._followers(),
            credentials,
            store=self.config.store,
            shipper=lambda: self._shipper,
            seal=self._seal_now if self._ships_segments() else None,
            default_wait=self.config.sync.timeout_seconds,
        ).register(server)
        if self._book is not None:
            self._approval_service = ApprovalService(self._book, self._reviewers())
            self._approval_service.register(server)
        await self._add_health(server)
        tls = None
        if cfg.tls.enabled and cfg.port != -1:
            # Re-read at each handshake when the files change: a renewed
            # certificate is served without a restart.
            certificate = ServingCertificate(cfg.tls.cert_file, cfg.tls.key_file)
            tls = certificate.credentials()
        self.admin_port = self._bind_listener(server, cfg, "admin", tls)
        await server.start()
        log.info(
            "admin listener started",
            extra=_fields(socket=cfg.socket, port=self.admin_port, tls=tls is not None),
        )

    async def _start_health_listener(self) -> None:
        cfg = self.config.health
        if cfg.port == -1:
            return
        server = self._new_server()
        await self._add_health(server, liveness=True)
        address = host_port(cfg.host, cfg.port)
        self.health_port = self._bind(server, address, "health.port")
        await server.start()

    async def _add_health(
        self, server: grpc.aio.Server, *, liveness: bool = False
    ) -> None:
        servicer = health.aio.HealthServicer()
        # grpc's servicer starts out SERVING; until _report_serving decides,
        # a daemon whose audit log is down must not say so, even briefly.
        await servicer.set("", NOT_SERVING)
        if liveness:
            # The process is up and its loop answers; stop() turns every
            # service NOT_SERVING (enter_graceful_shutdown).
            await servicer.set(LIVENESS_SERVICE, SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        self._health.append(servicer)

    async def _start_gateway(self) -> None:
        """The MCP gateway, when ``gateway.servers`` names upstreams: the
        catalog of their tools, then the agent-facing HTTP listener
        (``gateway.port``) and, for ``kynara-sidecar gateway``, stdio.

        Raises:
            ConfigError: two upstream tools get one name (the catalog
                refuses to start), or stdio was asked for without upstreams.
        """
        from kynara_sidecar.config import GatewayConfig

        cfg = self.config.gateway
        if not cfg.enabled:
            if self._stdio_wire is not None:
                raise ConfigError(
                    "gateway.servers: expected at least one upstream MCP server "
                    "for `kynara-sidecar gateway`, got none"
                )
            if cfg.port != -1 or cfg.host != GatewayConfig().host:
                log.warning(
                    "gateway off: gateway.servers names no upstream MCP server",
                    extra=_fields(
                        setting="gateway.servers",
                        port=cfg.port,
                        host=cfg.host,
                        hint="gateway.port and gateway.host serve nothing until "
                        "gateway.servers names an upstream",
                    ),
                )
            return
        # Imported here: the MCP SDK and uvicorn cost start-up time that a
        # daemon without a gateway need not pay.
        from kynara_sidecar.gateway.catalog import Catalog
        from kynara_sidecar.gateway.names import RESOURCE_KIND
        from kynara_sidecar.gateway.proxy import Gateway

        loop = asyncio.get_running_loop()
        named: set[str] = set()

        def name_tools() -> None:
            """Log each tool not named before (an upstream may come later):
            the names policies see it by, and a warning when no enforced
            rule's action and kind patterns match it (nobody may use it)."""
            policies = self.pipeline.policies
            for tool in self._catalog.tools() if self._catalog else ():
                name = tool.name
                if name.exposed in named:
                    continue
                named.add(name.exposed)
                log.info(
                    "gateway tool named",
                    extra=_fields(
                        server=name.server,
                        tool=name.tool,
                        exposed=name.exposed,
                        action=name.action,
                        resource_kind=RESOURCE_KIND,
                        resource_id=name.resource_id,
                    ),
                )
                if policies is None:
                    continue  # no policy set yet: nothing to check against
                candidates = policies.policy_set.candidate_rules(
                    RESOURCE_KIND, name.action
                )
                if not any(not rule.shadow for rule in candidates):
                    log.warning(
                        "no rule names this gateway tool: every agent is denied it",
                        extra=_fields(
                            exposed=name.exposed,
                            action=name.action,
                            resource_kind=RESOURCE_KIND,
                            policy_revision=policies.policy_set.revision,
                            setting=f"gateway.servers.{name.server}.actions",
                            hint=f"allow {name.action} on {RESOURCE_KIND} in a "
                            "policy, or map the tool to an action one allows",
                        ),
                    )

        def changed(server: str) -> None:
            if self._gateway is not None:
                loop.call_soon_threadsafe(self._gateway.changed, server)
            loop.call_soon_threadsafe(name_tools)

        self._catalog = Catalog(cfg.servers, on_change=changed)
        await self._catalog.start()
        name_tools()
        development = self.config.identity.mode is IdentityMode.DEVELOPMENT
        self._gateway = Gateway(
            cfg, self.pipeline, self._catalog, development=development
        )
        if cfg.port != -1:
            from kynara_sidecar.gateway.http import GatewayHttp

            self._gateway_http = GatewayHttp(
                cfg,
                self._gateway,
                self.pipeline,
                multi_agent=bool(self.config.identity.agents),
            )
            await self._gateway_http.start()
            self.gateway_port = self._gateway_http.port
        if self._stdio_wire is not None:
            from kynara_sidecar.gateway.stdio import serve_stdio, stdio_caller

            stdio_caller(self.config)  # a misconfigured agent refuses the start
            self._stdio_task = loop.create_task(
                serve_stdio(self.config, self._gateway, self.pipeline, self._stdio_wire)
            )
        log.info(
            "gateway started",
            extra=_fields(
                servers=sorted(cfg.servers),
                tools=len(self._catalog.tools()),
                port=self.gateway_port,
                stdio=self._stdio_wire is not None,
            ),
        )

    async def _stop_gateway(self) -> None:
        """Close the gateway's listeners, then its upstream connections."""
        if self._gateway_http is not None:
            await self._gateway_http.stop()
            self._gateway_http = None
        task, self._stdio_task = self._stdio_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if task is not None and task.done() and not task.cancelled():
            if task.exception() is not None:
                log.error(
                    "stdio gateway failed",
                    extra=_fields(error=repr(task.exception())),
                )
        if self._gateway is not None:
            await self._gateway.close()
            self._gateway = None
        if self._catalog is not None:
            await self._catalog.stop()
            self._catalog = None
            log.info("gateway stopped", extra=_fields())

    def _warn_unreadable_metrics(self) -> None:
        """With http.tls, /metrics asks for a credential with the metrics or
        operator role: without one in admin.credentials every scrape gets
        401, which a start that logs nothing would leave to be found from
        the scraper's side."""
        wanted = {role.value for role in METRICS_READERS}
        credentials = self.config.admin.credentials
        if any(wanted & set(entry.roles) for entry in credentials.values()):
            return
        log.warning(
            "/metrics refuses every scrape: no admin credential may read it",
            extra=_fields(
                setting="admin.credentials",
                hint="http.tls asks /metrics for a bearer secret of an "
                "admin.credentials entry with the metrics or operator role; "
                "add one (roles: [metrics]) for the scraper",
            ),
        )

    async def _start_http(self) -> None:
        cfg = self.config.http
        if cfg.port == -1:
            return
        reviewers = self._reviewers().authenticate if self._book is not None else None
        tls, readers = None, None
        if cfg.needs_credentials:
            # Re-read at each handshake when the files change: a renewed
            # certificate is served without a restart.
            tls = ServingCertificate(
                cfg.tls.cert_file, cfg.tls.key_file, "http.tls"
            ).ssl_context()
            readers = AdminCredentials.from_config(self.config.admin, self.metrics)
            self._admin_tables.append(readers)
            self._warn_unreadable_metrics()
        # The playground: what-if runs on the engine alone, for reviewers
        # and operators; the pipeline is only read for its active policies.
        operators = readers
        if operators is None:
            operators = AdminCredentials.from_config(self.config.admin, self.metrics)
            self._admin_tables.append(operators)
        playground = PlaygroundSources(
            policies=lambda: self._pipeline.policies if self._pipeline else None,
            store=lambda: self._store,
            authenticate=self._reviewers().authenticate,
            operators=operators,
            # What-if runs are decided in the env a live Decide gets.
            env=self.config.env,
            daemon_id=self.config.identity.daemon_id,
            limits=self.config.playground,
            signed_directory=bool(self.config.directory.store),
        )
        app = build_http_app(
            self.metrics,
            self._book,
            reviewers,
            session_seconds=self.config.approvals.session_seconds,
            public_urls=[self.config.approvals.inbox_url],
            clock=self.clock,
            metrics_credentials=readers,
            playground=playground,
        )
        self._http = web.AppRunner(app, access_log=None)
        await self._http.setup()
        site = web.TCPSite(
            self._http, cfg.host, cfg.port, ssl_context=tls, reuse_port=False
        )
        try:
            await site.start()
        except OSError as err:
            raise ListenerError(
                f"http.port: cannot listen on {cfg.host}:{cfg.port}: {err}; "
                "change http.port"
            ) from err
        self.http_port = self._http.addresses[0][1]
        log.info(
            "http listener started",
            extra=_fields(host=cfg.host, port=self.http_port, tls=tls is not None),
        )

    async def reload(self) -> bool:
        """Read the config again (with ``reload_config``), then load
        policies again; on any error keep what is active. Returns success.

        A config that fails to read or validate keeps the whole previous
        config and policy set. Of a good one, the keys in
        ``LIVE_SETTINGS`` apply at once; any other key that changed needs a
        restart: one warning names them all, and the daemon keeps their
        previous values. With signed bundles, fetch the source's current
        bundle once. With ``directory.store``, sync the signed directory
        first; with policy files its failure is logged and counted in
        ``kynara_directory_sync_total`` only, not as a failed reload.
        """
        if self._reload_config is not None and not await self._reload_settings():
            return False
        synced = True
        if self._directory_follower is not None:
            result = await self._directory_follower.sync_now()
            synced = result.outcome in (SyncOutcome.ACTIVATED, SyncOutcome.UNCHANGED)
            if not synced:
                # Counted in kynara_directory_sync_total by the follower.
                log.warning(
                    "reload: the signed directory was not synced; the policies "
                    "reload on their own",
                    extra=_fields(
                        component="policy",
                        part="directory",
                        outcome=str(result.outcome),
                        error=result.error,
                        source=self.config.directory.store,
                    ),
                )
        if self._follower is not None:
            result = await self._follower.sync_now()
            ok = result.outcome in (SyncOutcome.ACTIVATED, SyncOutcome.UNCHANGED)
            ok = ok and synced
            self.metrics.policy_reloads.labels("ok" if ok else "error").inc()
            return ok
        try:
            # Compiling a large set takes a while; decisions go on meanwhile.
            base = await asyncio.to_thread(self._read_base)
            await self._activate_parts(base=base)
        except Exception as err:
            # Any failure, a loader bug included, keeps the active set.
            self.metrics.policy_reloads.labels("error").inc()
            log.error(
                "policy reload refused; previous policy stays active",
                extra=_fields(
                    component="policy",
                    error=str(err),
                    error_type=type(err).__name__,
                    source=self.config.policy.source,
                ),
            )
            return False
        # The files activated: the directory's outcome is its own metric's.
        self.metrics.policy_reloads.labels("ok").inc()
        return True

    async def _reload_settings(self) -> bool:
        """Read the config again and apply what can change live; False
        (nothing changed) when it cannot be read or is invalid."""
        assert self._reload_config is not None
        checks_admin = bool(self._admin_tables) or self._reviewer_auth is not None
        admin = self.config.admin
        try:
            fresh = with_daemon_id(await asyncio.to_thread(self._reload_config))
            if checks_admin:
                admin = msgspec.structs.replace(
                    admin, credentials=fresh.admin.credentials
                )
                table, reviewers = await asyncio.to_thread(
                    self._read_admin_credentials, admin
                )
        except Exception as err:
            # A ConfigError names the file, the key and what was expected (a
            # secret file that cannot be read or is too short included: the
            # secrets in use stay); anything else is a loader bug, which must
            # not stop the daemon.
            self.metrics.config_reloads.labels("error").inc()
            log.error(
                "config reload refused; previous config and policies stay active",
                extra=_fields(error=str(err), error_type=type(err).__name__),
            )
            return False
        if checks_admin:
            for credentials in self._admin_tables:
                credentials.adopt(table)
            if reviewers is not None and self._reviewer_auth is not None:
                self._reviewer_auth.adopt_credentials(reviewers)
        changed = _changed_settings(
            msgspec.to_builtins(self.config), msgspec.to_builtins(fresh)
        )

        def is_live(key: str) -> bool:
            admin_key = key == ADMIN_CREDENTIALS or key.startswith(
                f"{ADMIN_CREDENTIALS}."
            )
            return key in LIVE_SETTINGS or (checks_admin and admin_key)

        live = [key for key in changed if is_live(key)]
        later = [key for key in changed if not is_live(key)]
        self.config = msgspec.structs.replace(
            self.config,
            log=fresh.log,
            shutdown_grace_seconds=fresh.shutdown_grace_seconds,
            admin=admin,
        )
        if self._owns_logs:
            logs.set_level(self.config.log.level)
            logs.set_format(self.config.log.format)
        self.metrics.config_reloads.labels("ok").inc()
        # Secret files are re-read on every reload: a rotated secret changes
        # no setting, so `applied` alone would say nothing happened.
        reread = (
            {"admin_secrets_reread": len(admin.credentials)} if checks_admin else {}
        )
        log.info("config reloaded", extra=_fields(applied=live, **reread))
        if later:
            log.warning(
                "config changes not applied: restart to apply",
                extra=_fields(settings=later, live=list(LIVE_SETTINGS)),
            )
        return True

    def _read_admin_credentials(
        self, admin: AdminListenerConfig
    ) -> tuple[AdminCredentials, ReviewerAuth | None]:
        """Read ``admin``'s secret files into the tables the listeners check
        (the review page's too, when it is served).

        Raises:
            ConfigError: a secret file cannot be read, is too short, or is
                shared (among them, or with an agent).
        """
        # A reloaded config's files are not read (load_config's read_files):
        # this is where the admin secrets are, and kept apart from agents'.
        admin.check_apart(self.config.agent, self.config.identity)
        loaded = admin.load_credentials()
        table = AdminCredentials(loaded)
        if self._reviewer_auth is None:
            return table, None
        # Only its admin credentials are adopted: its issuers and agents,
        # restart-only, are not read again.
        return table, ReviewerAuth(admin_reviewers(admin, loaded), clock=self.clock)

    async def stop(self) -> None:
        """Drain and shut down in the documented order. Safe to call twice.

        New requests get ``shutting_down`` from the moment health reports
        NOT_SERVING; requests already in the pipeline finish (their records
        committed) within ``shutdown_grace_seconds``; only then do the
        listeners close.
        """
        grace = self.config.shutdown_grace_seconds
        deadline = time.monotonic() + grace
        self._stopping = True
        log.info("stopping", extra=_fields(grace_seconds=grace))
        for servicer in self._health:
            await servicer.enter_graceful_shutdown()
        if self._fast_path is not None:
            self._fast_path.close()
        if self._pipeline is not None:
            self._pipeline.close()
            left = await self._pipeline.drain(grace)
            log.info("drained", extra=_fields(in_flight_left=left))
        # Open waits and reviews end now rather than hold the listeners for
        # the whole grace period.
        if self._decision_service is not None:
            self._decision_service.close()
        if self._approval_service is not None:
            self._approval_service.close()
        await self._stop_listeners(max(deadline - time.monotonic(), 0.0))
        if self._webhook is not None:
            # Summaries still queued get what is left of the grace.
            await self._webhook.close(
                min(
                    max(deadline - time.monotonic(), 0.0),
                    self.config.approvals.webhook.timeout_seconds,
                )
            )
            self._webhook = None
        if self._audit_service is not None:
            # Its reads run on threads of their own; the store outlives them.
            await self._audit_service.close()
        for follower in (self._follower, self._directory_follower):
            if follower is None:
                continue
            # Before the log closes: an activation appends to it.
            seconds = self._sync_stop_seconds(deadline)
            name = f"{follower.followed.noun} follower"
            if await follower.close(seconds):
                log.info(f"{name} stopped", extra=_fields())
            else:
                _left_behind(name, seconds)
        await self._close_audit(self._sync_stop_seconds(deadline))
        for handle in self._socket_locks:
            handle.close()
        self._socket_locks.clear()
        log.info("stopped", extra=_fields())

    async def _stop_listeners(self, grace: float) -> None:
        # The pipeline is drained, so what grpc still holds is a call that
        # is being refused with shutting_down; the grace lets it finish.
        fast_path, self._fast_path = self._fast_path, None
        await asyncio.gather(
            *(s.stop(grace) for s in self._servers),
            *([fast_path.stop(grace)] if fast_path is not None else []),
        )
        self._servers.clear()
        if self._http is not None:
            await self._http.cleanup()
            self._http = None
        await self._stop_gateway()
        log.info("listeners closed", extra=_fields())

    # ------------------------------------------------------------------ sync

    def _ships_segments(self) -> bool:
        return bool(self.config.store) and self.config.sync.ship_segments

    def _decision_sink(self) -> AuditSink:
        """The writer; behind the backlog gate when shipping fails closed."""
        assert self._writer is not None and self._store is not None
        sync = self.config.sync
        if (
            not self._ships_segments()
            or sync.backlog_policy is not BacklogPolicy.FAIL_CLOSED
        ):
            return self._writer
        store = self._store
        self._gate = BacklogGate(
            self._writer,
            sync.backlog_max_records,
            self.config.store,
            head=store.head().seq,
            shipped=max(store.shipped(), store.seam()),
        )
        return self._gate

    async def _start_sync(self) -> None:
        """Status up and, with ``sync.ship_segments``, segments out to
        ``Config.store``, once the audit log is open. Neither waits for the
        store: a store down at start is retried in the background."""
        cfg = self.config
        if not cfg.store or self._store is None or self._audit_problem is not None:
            return
        sync = cfg.sync
        store = self._central_store()
        self._session = StoreSession(store, sync.timeout_seconds)
        if sync.ship_segments:
            self._shipper = SegmentShipper(
                self._store,
                self._session,
                sync,
                self.metrics,
                self.clock,
                gate=self._gate,
                on_change=self._status_changed,
            )
            await self._shipper.start()
        self._status_publisher = StatusPublisher(
            self._session, self._origin, sync.status_seconds, self._status_document
        )
        self._status_publisher.start()
        await self._start_fleet()
        await self._start_fleet_limits()
        log.info(
            "sync started",
            extra=_fields(store=cfg.store, ship_segments=sync.ship_segments),
        )

    async def _start_fleet(self) -> None:
        """Publish approvals to the store and take the fleet inbox's signed
        reviews from it (``approvals.fleet``), on a connection of its own."""
        cfg = self.config
        if self._book is None:
            return
        sync = cfg.sync
        trusted = cfg.approvals.load_inbox_keys()
        if cfg.approvals.inbox_url and not trusted:
            log.warning(
                "approvals.inbox_url is set but approvals.inbox_keys is empty: "
                "every review made in the fleet inbox will be refused",
                extra=_fields(
                    setting="approvals.inbox_keys",
                    inbox_url=cfg.approvals.inbox_url,
                    hint="list the inbox's public key (the collector's "
                    "inbox.signing_key, public half)",
                ),
            )
        store = self._central_store()
        self._fleet = FleetLink(
            self._book,
            store,
            daemon_id=cfg.identity.daemon_id,
            # The audit key signs each published approval; the collector
            # checks it against the daemon's registered keys.
            signing_key=load_audit_keys(cfg.audit).signing,
            trusted=trusted,
            timeout=sync.timeout_seconds,
            retry_min_seconds=sync.retry_min_seconds,
            retry_max_seconds=sync.retry_max_seconds,
            metrics=self.metrics,
        )
        await self._fleet.start()

    async def _start_fleet_limits(self) -> None:
        """Share fleet-scope limits' counts through the central store, on a
        connection of its own: this daemon's counted decisions out, the
        others' in (``limits.fleet``). Nothing connects until an active
        set declares a fleet-scope limit (``_share_limits``): a daemon
        without one needs no store permission for them."""
        cfg = self.config
        if self._limits is None:
            return
        store = self._central_store()
        fleet = FleetLimits(
            store,
            cfg.identity.daemon_id,
            max_staleness_seconds=cfg.limits.fleet_max_staleness_seconds,
            publish_interval=cfg.limits.fleet_publish_interval_seconds,
            clock=self.clock,
        )
        self._fleet_limits = fleet
        # Stale only once sharing runs: a set with no fleet limit needs none.
        self.metrics.watch_fleet_limits(lambda: fleet.started and fleet.stale())
        policies = self.pipeline.policies
        if policies is not None:
            self._share_limits(policies)
        self.pipeline.watch_policies(self._share_limits)

    def _share_limits(self, policies: LoadedPolicies) -> None:
        """A newly active set's fleet limits, with this daemon's counts of
        them as the book holds them (read from the log); the first set
        that declares one starts the sharing (on the event loop)."""
        fleet, book = self._fleet_limits, self._limits
        if fleet is None or book is None:
            return
        shared = fleet.activate(policies.policy_set.limits)
        if shared:
            fleet.seed(book.held(shared))
            fleet.launch()

    def _fleet_tally(self, limit: CompiledLimit, key: str, start: int) -> Tally | None:
        """The other daemons' part of a fleet limit; None (the limit fails
        closed) while fleet sharing is not running, the store is stale, or
        the limit is not an active fleet limit or is defined otherwise than
        the active one of its name (``FleetLimits.remote``'s KeyError)."""
        fleet = self._fleet_limits
        if fleet is None:
            return None
        try:
            return fleet.remote(limit, key, start)
        except KeyError:
            return None

    def _counted(self, counted: Sequence[Counted]) -> None:
        if self._fleet_limits is not None:
            self._fleet_limits.published(counted)

    async def _stop_fleet_limits(self, seconds: float) -> None:
        fleet, self._fleet_limits = self._fleet_limits, None
        if fleet is not None and not await fleet.close(seconds):
            _left_behind("fleet limits (tallies publisher and watch)", seconds)

    async def _stop_fleet(self, seconds: float) -> None:
        fleet, self._fleet = self._fleet, None
        if fleet is not None and not await fleet.stop(seconds):
            _left_behind("fleet inbox link", seconds)

    def _status_document(self) -> DaemonStatusV1:
        assert self._store is not None
        policies = self._pipeline.policies if self._pipeline else None
        return daemon_status(
            daemon_id=self._origin,
            now_nanos=self.clock(),
            status_seconds=self.config.sync.status_seconds,
            policy=policy_status(self.config.policy.source, policies, self._follower),
            directory=directory_status(
                self.config.directory.store, self._directory_follower
            ),
            audit=self._store,
            shipping=self._shipper.status if self._shipper else None,
        )

    def _status_changed(self) -> None:
        if self._status_publisher is not None:
            self._status_publisher.changed()

    def _sync_stop_seconds(self, deadline: float) -> float:
        """How long a sync task may take to stop: what is left of the grace,
        and at least MIN_SYNC_STOP_SECONDS."""
        return max(deadline - time.monotonic(), MIN_SYNC_STOP_SECONDS)

    async def _stop_sync(self, seconds: float) -> None:
        """Stop the shipper and the status publisher, waiting ``seconds`` at
        most; past that they are left behind (see MIN_SYNC_STOP_SECONDS)."""
        session, shipper, publisher = (
            self._session, self._shipper, self._status_publisher,
        )  # fmt: skip
        if session is None:
            return
        # The publisher's last status still reads the shipper's.
        stopped = await _within(
            self._stop_sync_tasks(session, shipper, publisher), seconds
        )
        self._session = self._shipper = self._status_publisher = None
        self._gate = None
        if not stopped:
            _left_behind("sync (shipper, status publisher)", seconds)
            # Whatever held the stop up, the publisher must not build
            # another status from a closed log.
            if publisher is not None:
                await _within(publisher.stop(), _LAST_CANCEL_SECONDS)

    async def _stop_sync_tasks(
        self,
        session: StoreSession,
        shipper: SegmentShipper | None,
        publisher: StatusPublisher | None,
    ) -> None:
        """Give the last segment and status FINAL_SYNC_SECONDS to reach the
        store, then let it go; a dead store delays shutdown no longer."""
        deadline = time.monotonic() + FINAL_SYNC_SECONDS
        if shipper is not None:
            await shipper.stop(FINAL_SYNC_SECONDS)
        if publisher is not None:
            await publisher.stop(max(deadline - time.monotonic(), 0.1))
        await session.close(max(deadline - time.monotonic(), 0.1))
        log.info("sync stopped", extra=_fields())

    async def _close_audit(self, sync_seconds: float = MIN_SYNC_STOP_SECONDS) -> None:
        # Before the book and the writer: it records reviews through them.
        await self._stop_fleet(sync_seconds)
        await self._stop_fleet_limits(sync_seconds)
        if self._book is not None:
            # Before the writer: the expiry task appends to it.
            await self._book.close()
            log.info("approvals closed", extra=_fields())
        if self._writer is not None:
            try:
                await self._writer.append(self._marker("stop"))
            except KynaraError as err:
                log.error("stop marker not written", extra=_fields(error=str(err)))
            await self._writer.close()
            self._writer = None
        # After the final seal, before the log closes: the shipper reads it.
        await self._stop_sync(sync_seconds)
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
        self._owns_logs = True
        logs.set_context(daemon_id=self.config.identity.daemon_id)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, reload_wanted.set)
        await self.start()
        if self._stdio_task is not None:
            # The agent closed its end of stdin: its gateway session is over.
            self._stdio_task.add_done_callback(lambda _: stop.set())
        while not stop.is_set():
            waiters = [asyncio.ensure_future(e.wait()) for e in (stop, reload_wanted)]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
            if reload_wanted.is_set() and not stop.is_set():
                reload_wanted.clear()
                await self.reload()
        await self.stop()


def _revisions(policies: LoadedPolicies) -> tuple[str, str]:
    return policies.policy_set.revision, policies.directory.revision


def run_daemon(
    config: Config,
    *,
    stdio: StdioWire | None = None,
    reload_config: Callable[[], Config] | None = None,
) -> bool:
    """Run a daemon on its own uvloop loop until SIGTERM or SIGINT.

    Unlike ``asyncio.run``, closing the loop waits a bounded time for what
    the stop left behind: a worker thread blocked in a store call (a hung
    mount) can be neither cancelled nor joined.

    Returns:
        Whether every worker thread ended. False means some are stuck; the
        caller should exit the process without joining them (``os._exit``
        once logs are flushed), since the interpreter's exit would wait on
        them forever.
    """
    import uvloop

    loop = uvloop.new_event_loop()
    executor = concurrent.futures.ThreadPoolExecutor(thread_name_prefix=_WORKER_PREFIX)
    loop.set_default_executor(executor)
    asyncio.set_event_loop(loop)
    try:
        daemon = Daemon(config, stdio=stdio, reload_config=reload_config)
        loop.run_until_complete(daemon.run())
    finally:
        try:
            loop.run_until_complete(_settle_leftovers(loop))
        finally:
            asyncio.set_event_loop(None)
            # Closing the loop would give SIGHUP its default action back,
            # which ends the process: from here to the exit it is ignored
            # (only the moment between these two calls is left uncovered).
            loop.remove_signal_handler(signal.SIGHUP)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            # Shuts the current default executor down without waiting.
            loop.close()
            executor.shutdown(wait=False, cancel_futures=True)
    return _join_workers()


async def _settle_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    tasks = asyncio.all_tasks() - {asyncio.current_task()}
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=_LOOP_CLOSE_SECONDS)
    # Not loop.shutdown_default_executor(): it joins the threads unbounded.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(_LOOP_CLOSE_SECONDS):
            await loop.shutdown_asyncgens()


def _join_workers() -> bool:
    deadline = time.monotonic() + _LOOP_CLOSE_SECONDS
    threads = [
        thread
        for thread in threading.enumerate()
        if not thread.daemon and thread is not threading.current_thread()
    ]
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0.0))
    stuck = [thread.name for thread in threads if thread.is_alive()]
    if stuck:
        log.error(
            "exiting without threads stuck in store calls",
            extra=_fields(threads=stuck, setting="sync.store"),
        )
    return not stuck
