"""The collector's configuration: one YAML file, one typed section each.

Like the daemon's (``kynara_sidecar.config``): every section is a
``msgspec.Struct`` with its defaults in the type, unknown keys refused, and
a ``validate()`` that names the key, what was expected and what was found.
The path comes from ``--config`` or ``$KYNARA_COLLECTOR_CONFIG``; ``--set
section.key=value`` overrides a key (the value parsed as YAML). Relative
paths are taken from the working directory.

Example::

    store:
      url: nats://127.0.0.1:4222
      nats: {user: collector, password_file: /run/secrets/kynara-collector-nats}
    pull:
      - daemon_id: support-bot-7d9f
        target: unix:///run/kynara/admin.sock
        credential_file: /run/secrets/kynara-collector
    daemons:
      support-bot-7d9f:
        public_keys: [/etc/kynara/keys/support-bot-7d9f.pub]
      kynara-agent:                      # a family: a Deployment's pods
        id_prefix: "kynara-agent-"
        public_keys: [/etc/kynara/keys/kynara-agent.pub]
    archive:
      url: s3://kynara-audit/fleet
      s3: {endpoint_url: "https://s3.eu-central-1.amazonaws.com", region: eu-central-1}
    state:
      path: /var/lib/kynara-collector/state
    http:
      port: 9465
    inbox:
      enabled: true
      signing_key: /etc/kynara-collector/inbox.pem
      url: https://kynara.example.com
      credentials:
        carol: {secret_file: /run/secrets/carol, roles: [reviewer]}
    scim:
      enabled: true
      credentials:
        okta: {secret_file: /run/secrets/kynara-scim-okta}
      group_roles:
        Support Engineers: [support]
    directory:
      signing_key: /etc/kynara-collector/directory.pem
      pull:                              # `kynara-collector directory sync`
        url: https://idp.example.com/scim/v2
        token_file: /run/secrets/kynara-idp-scim
        target_token_file: /run/secrets/kynara-scim-pull
"""

from __future__ import annotations

import os
import pathlib
import urllib.parse
from collections.abc import Collection

import msgspec

from kynara_sidecar.audit.keys import (
    PublicKey,
    SigningKey,
    load_signing_key,
    load_trusted_keys,
)
from kynara_sidecar.collector.metrics import UNREGISTERED
from kynara_sidecar.collector.registry import DaemonEntry, DaemonRegistry
from kynara_sidecar.config import (
    MAX_DAEMON_ID_CHARS,
    AdminCredentialConfig,
    AdminListenerConfig,
    AdminRole,
    NatsConnectionConfig,
    ReviewerIssuerConfig,
    TlsConfig,
    daemon_id_problem,
    is_loopback,
    read_credential_secrets,
    read_raw_config,
    read_secret,
    store_url_problem,
)
from kynara_sidecar.errors import ConfigError
from kynara_sidecar.policy.names import is_valid_name
from kynara_sidecar.sync import (
    ACK_WAIT_SECONDS,
    Store,
    check_consumer_name,
    is_store_url,
    open_store,
)

__all__ = [
    "ArchiveConfig",
    "CollectorConfig",
    "DEFAULT_CONFIG_ENV",
    "DaemonConfig",
    "DirectoryConfig",
    "DirectoryPullConfig",
    "HttpConfig",
    "InboxConfig",
    "PullConfig",
    "S3Config",
    "ScimConfig",
    "ScimCredentialConfig",
    "StateConfig",
    "StoreConfig",
    "load_collector_config",
    "load_directory_key",
]

DEFAULT_CONFIG_ENV = "KYNARA_COLLECTOR_CONFIG"
DEFAULT_CONSUMER = "kynara-collector"
# The state holds a frontier per daemon and 64 bytes of Merkle nodes per
# record: 1 GiB of address space covers some ten million records.
DEFAULT_STATE_MAP_SIZE = 1 << 30
# The SCIM store holds every User and Group (a few KiB each).
DEFAULT_SCIM_MAP_SIZE = 1 << 30
MIN_MAP_SIZE = 1 << 20
# The roles an http.credentials entry may carry to be of use there.
HTTP_ROLES = frozenset({AdminRole.OPERATOR, AdminRole.METRICS})


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    def validate(self, section: str) -> None:
        """Check ranges and cross-field rules; raise ConfigError naming the key."""


def _check_range(section: str, key: str, value: float, low: float, high: float):
    if not low <= value <= high:
        raise ConfigError(f"{section}.{key}: expected {low}..{high}, got {value}")


def _check_lmdb(section: str, path: str, map_size: int) -> None:
    """An LMDB database's ``path`` and ``map_size`` settings in ``section``."""
    if not path:
        raise ConfigError(f"{section}.path: expected a directory, got none")
    if map_size < MIN_MAP_SIZE:
        raise ConfigError(
            f"{section}.map_size: expected at least {MIN_MAP_SIZE}, got {map_size}"
        )


class StoreConfig(_Section):
    """The central store the collector consumes segments from."""

    # Store URL, e.g. "nats://127.0.0.1:4222" or "dir:///srv/kynara/store";
    # "" consumes no store (pull only).
    url: str = ""
    # Durable consumer name, e.g. "kynara-collector": it resumes after the
    # last segment message it acknowledged.
    consumer: str = DEFAULT_CONSUMER
    # Seconds a store call may take, e.g. 5.
    timeout_seconds: float = 5.0
    # Seconds between reads of a dir:// store, e.g. 1.
    poll_seconds: float = 1.0
    # Seconds to wait before reconnecting after the store was lost, e.g. 2.
    retry_seconds: float = 2.0
    # Seconds a nats:// server waits for the acknowledgement of a segment
    # message before delivering it again, e.g. 30: longer than verifying and
    # archiving one message takes. A message whose delivery or
    # acknowledgement a server crash or network cut lost comes again only
    # after this long, and the consumer waits for it (one in flight).
    ack_wait_seconds: float = ACK_WAIT_SECONDS
    # TLS and credentials for a nats:// store, as the daemon's sync.nats, e.g.
    # {ca_file: /etc/kynara-collector/nats-ca.crt, user: collector,
    #  password_file: /run/secrets/kynara-collector-nats}.
    nats: NatsConnectionConfig = msgspec.field(default_factory=NatsConnectionConfig)

    def validate(self, section: str) -> None:
        if problem := store_url_problem(self.url):
            raise ConfigError(f"{section}.url: {problem}")
        if self.url and not is_store_url(self.url):
            raise ConfigError(
                f"{section}.url: expected dir://PATH or nats://HOST:PORT, "
                f"got {self.url!r}"
            )
        self.nats.validate(f"{section}.nats")
        self.nats.check_store(f"{section}.nats", self.url, f"{section}.url")
        try:
            check_consumer_name(self.consumer)
        except ConfigError as err:
            raise ConfigError(f"{section}.consumer: {err}") from None
        _check_range(section, "timeout_seconds", self.timeout_seconds, 0.1, 300)
        _check_range(section, "poll_seconds", self.poll_seconds, 0.01, 3600)
        _check_range(section, "retry_seconds", self.retry_seconds, 0.01, 3600)
        _check_range(section, "ack_wait_seconds", self.ack_wait_seconds, 1, 3600)

    def open_store(self) -> Store:
        """The store ``url`` names, not yet connected, as every part of the
        collector opens it: its errors name the ``store`` keys."""
        return open_store(
            self.url,
            timeout=self.timeout_seconds,
            poll_seconds=self.poll_seconds,
            nats=self.nats.load("store.nats"),
            timeout_key="store.timeout_seconds",
            setting="store.url",
            # Daemons' users may look the fleet limits bucket up, not make it.
            declares_limits=True,
            ack_wait_seconds=self.ack_wait_seconds,
        )


class PullConfig(_Section):
    """One daemon pulled over its admin AuditService.StreamSegments."""

    # The daemon's id, e.g. "support-bot-7d9f"; must be in `daemons`.
    daemon_id: str = ""
    # Its admin listener: "unix:///run/kynara/admin.sock", "127.0.0.1:50153",
    # or, with ca_file, its TLS port anywhere, e.g. "10.0.3.7:50153".
    target: str = ""
    # PEM file of the certificates to trust for the admin listener's TLS
    # (admin.tls on the daemon), e.g. "/etc/kynara/admin-ca.pem"; read at
    # start. Without it a HOST:PORT target is plaintext and loopback only.
    ca_file: str = ""
    # The name to check the daemon's certificate for, when the target's host
    # is not a name it carries, e.g. "support-bot.kynara.svc".
    server_name: str = ""
    # File holding an operator credential's bearer secret, e.g.
    # "/run/secrets/kynara-collector".
    credential_file: str = ""
    # Seconds between pulls, e.g. 5.
    poll_seconds: float = 5.0
    # Seconds a call may take, e.g. 30.
    timeout_seconds: float = 30.0

    def validate(self, section: str) -> None:
        for key in ("daemon_id", "target", "credential_file"):
            if not getattr(self, key):
                raise ConfigError(f"{section}.{key}: expected a value, got none")
        if self.target.startswith("unix:"):
            if self.ca_file or self.server_name:
                raise ConfigError(
                    f"{section}.ca_file: expected a HOST:PORT target with TLS "
                    f"settings, got the Unix socket {self.target!r} (plaintext)"
                )
        else:
            host, sep, port = self.target.rpartition(":")
            host = host.strip("[]")
            if not sep or not port.isdigit():
                raise ConfigError(
                    f"{section}.target: expected unix:///PATH or HOST:PORT, got "
                    f"{self.target!r}"
                )
            if not self.ca_file and not is_loopback(host):
                raise ConfigError(
                    f"{section}.target: expected a loopback HOST:PORT without "
                    f"{section}.ca_file (plaintext), got {self.target!r}; set "
                    "ca_file to pull over TLS"
                )
        _check_range(section, "poll_seconds", self.poll_seconds, 0.01, 86_400)
        _check_range(section, "timeout_seconds", self.timeout_seconds, 0.1, 3600)

    def load_secret(self, section: str) -> bytes:
        """The bearer secret, whitespace removed.

        Raises:
            ConfigError: unreadable, empty, or shorter than 16 bytes.
        """
        return read_secret(f"{section}.credential_file", self.credential_file)

    def load_roots(self, section: str) -> bytes | None:
        """The certificates to trust for TLS, or None for plaintext.

        Raises:
            ConfigError: ``ca_file`` cannot be read or holds no certificate.
        """
        if not self.ca_file:
            return None
        where = f"{section}.ca_file"
        try:
            roots = pathlib.Path(self.ca_file).read_bytes()
        except OSError as err:
            raise ConfigError(f"{where}: cannot read the certificates: {err}") from None
        if b"-----BEGIN CERTIFICATE-----" not in roots:
            raise ConfigError(f"{where}: expected PEM certificates, got none")
        return roots


class DaemonConfig(_Section):
    """A registered daemon, or a family of them: the keys its checkpoints
    must be signed by.

    Without ``id_prefix`` the entry's name is the daemon's exact id. With
    it the entry registers every daemon id that starts with the prefix
    (and is longer), and its name is only the metrics label
    (``collector.registry``).
    """

    # Public key files (PEM or raw base64url), e.g.
    # ["/etc/kynara/keys/support-bot-7d9f.pub"].
    public_keys: list[str] = []
    # Registers a family: any daemon id starting with it, e.g.
    # "kynara-agent-" for a Deployment's pods (`$(POD_NAME)/$(POD_UID)`);
    # unset registers the entry's name as an exact id.
    id_prefix: str | None = None

    def validate(self, section: str) -> None:
        if not self.public_keys:
            raise ConfigError(f"{section}.public_keys: expected a key file, got none")
        if self.id_prefix is None:
            return
        problem = daemon_id_problem(self.id_prefix)
        if problem is not None or len(self.id_prefix) >= MAX_DAEMON_ID_CHARS:
            raise ConfigError(
                f"{section}.id_prefix: expected 1 to {MAX_DAEMON_ID_CHARS - 1} "
                "printable ASCII characters without '\"' or '\\\\' (the start "
                f"of a daemon id), got {self.id_prefix!r}"
            )

    def load_keys(self, section: str) -> dict[str, PublicKey]:
        """Key id -> key.

        Raises:
            ConfigError: a file cannot be loaded; names it.
        """
        try:
            return load_trusted_keys(self.public_keys)
        except ConfigError as err:
            raise ConfigError(f"{section}.public_keys: {err}") from None


class S3Config(_Section):
    """S3 settings for an ``s3://`` archive (credentials from AWS variables)."""

    # For S3-compatible storage, e.g. "https://minio.example:9000"; "" is AWS.
    endpoint_url: str = ""
    # Region, e.g. "eu-central-1"; "" takes the AWS default.
    region: str = ""


class ArchiveConfig(_Section):
    """Where verified segments are archived."""

    # "dir:///var/lib/kynara-collector/archive" or "s3://BUCKET/PREFIX".
    url: str = "dir://var/collector/archive"
    s3: S3Config = msgspec.field(default_factory=S3Config)

    def validate(self, section: str) -> None:
        scheme, sep, rest = self.url.partition("://")
        if scheme not in ("dir", "s3") or not sep or not rest:
            raise ConfigError(
                f"{section}.url: expected dir://PATH or s3://BUCKET/PREFIX, "
                f"got {self.url!r}"
            )


class StateConfig(_Section):
    """The collector's LMDB state: frontiers, history, alerts."""

    # Directory, e.g. "/var/lib/kynara-collector/state".
    path: str = "var/collector/state"
    # LMDB map size in bytes, e.g. 1073741824 (1 GiB).
    map_size: int = DEFAULT_STATE_MAP_SIZE

    def validate(self, section: str) -> None:
        _check_lmdb(section, self.path, self.map_size)


class HttpConfig(_Section):
    """/metrics and the query API (``GET /daemons``, ``GET /records``).

    Open on loopback without credentials. With ``credentials`` each call
    needs ``authorization: Bearer <secret>`` of one: the query API the
    operator role, /metrics the metrics or operator role (the daemon's
    admin credential roles). Off loopback (the pod address) it needs both
    ``tls`` and ``credentials``: audit records and secrets never cross the
    network in the clear, nor unauthenticated. The inbox's review page keeps
    its own sign-in (``inbox.credentials``).
    """

    # Bind address, e.g. "127.0.0.1"; a loopback address unless tls and
    # credentials are set, then any (e.g. the pod address).
    host: str = "127.0.0.1"
    # Port, e.g. 9465; 0 picks a free port; -1 disables HTTP.
    port: int = 9465
    # TLS on the port, e.g. {cert_file: tls.crt, key_file: tls.key}; the
    # files are re-read when they change (a renewed certificate is served
    # without a restart).
    tls: TlsConfig = msgspec.field(default_factory=TlsConfig)
    # Callers of the query API and /metrics by name, as the daemon's
    # admin.credentials, e.g. {ops: {secret_file: /run/secrets/ops, roles:
    # [operator]}, prometheus: {secret_file: /run/secrets/prom, roles:
    # [metrics]}}.
    credentials: dict[str, AdminCredentialConfig] = {}

    def validate(self, section: str) -> None:
        if self.port == -1:
            return
        _check_range(section, "port", self.port, 0, 65535)
        self.tls.validate(f"{section}.tls")
        for name, credential in self.credentials.items():
            where = f"{section}.credentials.{name}"
            credential.validate(where)
            if not set(credential.roles) & HTTP_ROLES:
                raise ConfigError(
                    f"{where}.roles: expected operator (the query API and "
                    f"/metrics) or metrics (/metrics), got {credential.roles}; "
                    "reviewers sign in to the inbox with inbox.credentials"
                )
        if not is_loopback(self.host) and not (self.tls.enabled and self.credentials):
            missing = " and ".join(
                f"{section}.{key}"
                for key, given in (
                    ("tls", self.tls.enabled),
                    ("credentials", bool(self.credentials)),
                )
                if not given
            )
            raise ConfigError(
                f"{section}.host: expected a loopback address (127.0.0.0/8 or "
                f"::1) unless {section}.tls and {section}.credentials are both "
                f"set, got {self.host!r} without {missing}; the query API "
                "serves audit records"
            )

    def load_credentials(
        self, section: str = "http"
    ) -> dict[str, tuple[bytes, frozenset[AdminRole]]]:
        """Read each credential's secret, checked as the daemon's admin
        credentials are (at least 16 bytes, none shared).

        Raises:
            ConfigError: a file cannot be read, a secret too short or shared.
        """
        return AdminListenerConfig(credentials=self.credentials).load_credentials(
            section
        )


# A final approval stays in the fleet inbox this long after it ended (its
# expiry, or its resolution if later): a week covers a reviewer's look back
# over the last few working days, as the daemon's own page shows recent
# final ones; inbox.retention_seconds.
DEFAULT_INBOX_RETENTION_SECONDS = 7 * 86_400
# How often the fleet inbox drops approvals past the retention (its
# PRUNE_SECONDS): the retention is hours to days, so an hour's overstay is
# small, and a pass walks every approval held.
INBOX_PRUNE_SECONDS = 3_600
# One prune interval at least (an approval overstays by up to one); a year
# at most.
MIN_INBOX_RETENTION_SECONDS = INBOX_PRUNE_SECONDS
MAX_INBOX_RETENTION_SECONDS = 366 * 86_400


class InboxConfig(_Section):
    """The fleet inbox: every daemon's approvals (published to the central
    store) on the collector's review page, reviews signed and sent back."""

    # Serve it (needs store.url and HTTP), e.g. true.
    enabled: bool = False
    # The inbox's name, recorded as each review's `via`, e.g. "fleet".
    name: str = "fleet"
    # Ed25519 private key file the inbox signs reviews with (PKCS#8 PEM,
    # mode 0600; `kynara-sidecar keygen` makes one), e.g.
    # "/etc/kynara-collector/inbox.pem"; daemons list its public half in
    # approvals.inbox_keys.
    signing_key: str = ""
    # The base URL reviewers reach the page by (the daemons'
    # approvals.inbox_url), e.g. "https://kynara.example.com"; its origin is
    # accepted on form posts besides the request's own.
    url: str = ""
    # Reviewers' bearer secrets, as the daemon's admin.credentials, e.g.
    # {carol: {secret_file: /run/secrets/carol, roles: [reviewer],
    # reviewer_roles: [finance_lead]}}; each needs the reviewer role.
    credentials: dict[str, AdminCredentialConfig] = {}
    # JWT issuers whose tokens sign reviewers in, as the daemon's
    # approvals.reviewer_issuers.
    reviewer_issuers: list[ReviewerIssuerConfig] = []
    # How long a sign-in lasts, in seconds, e.g. 28800.
    session_seconds: int = 8 * 3600
    # Clock skew allowed on reviewer JWTs, in seconds, e.g. 60.
    max_clock_skew_seconds: float = 60.0
    # Mark cookies Secure (browsers keep them from https and loopback
    # http only), e.g. true.
    secure_cookie: bool = True
    # Seconds an approval stays listed after it ended (expired, or
    # resolved if that came later), e.g. 604800 (a week); pending ones
    # before their expiry always stay.
    retention_seconds: int = DEFAULT_INBOX_RETENTION_SECONDS

    def validate(self, section: str) -> None:
        if not self.enabled:
            return
        if not self.name or not self.name.isprintable() or len(self.name) > 64:
            raise ConfigError(
                f"{section}.name: expected 1..64 printable characters, "
                f"got {self.name!r}"
            )
        if not self.signing_key:
            raise ConfigError(f"{section}.signing_key: expected a key file, got none")
        if self.url and not self.url.startswith(("http://", "https://")):
            raise ConfigError(
                f"{section}.url: expected an http:// or https:// URL, got {self.url!r}"
            )
        if not self.credentials and not self.reviewer_issuers:
            raise ConfigError(
                f"{section}: expected credentials or reviewer_issuers: without "
                "either no reviewer can sign in"
            )
        for name, credential in self.credentials.items():
            credential.validate(f"{section}.credentials.{name}")
            if AdminRole.REVIEWER not in credential.roles:
                raise ConfigError(
                    f"{section}.credentials.{name}.roles: expected the reviewer "
                    f"role, got {credential.roles}"
                )
        for i, issuer in enumerate(self.reviewer_issuers):
            issuer.validate(f"{section}.reviewer_issuers[{i}]")
        _check_range(section, "session_seconds", self.session_seconds, 60, 604_800)
        _check_range(
            section, "max_clock_skew_seconds", self.max_clock_skew_seconds, 0, 600
        )
        _check_range(
            section,
            "retention_seconds",
            self.retention_seconds,
            MIN_INBOX_RETENTION_SECONDS,
            MAX_INBOX_RETENTION_SECONDS,
        )

    def load_signing_key(self, section: str = "inbox") -> SigningKey:
        """The inbox's review key.

        Raises:
            ConfigError: the file cannot be loaded (names it).
        """
        try:
            return load_signing_key(self.signing_key)
        except ConfigError as err:
            raise ConfigError(f"{section}.signing_key: {err}") from None


# Bounds of directory.pull's schedule: more often than each second is push
# in disguise (and meets an identity provider's rate limit); a day apart is
# the slowest useful.
MIN_PULL_INTERVAL_SECONDS = 1.0
MAX_PULL_INTERVAL_SECONDS = 86_400.0


def endpoint_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a SCIM endpoint directory.pull talks to, or
    None: http:// is accepted on loopback only (bearer tokens travel on it).
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"expected an http:// or https:// URL, got {url!r}"
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        return (
            f"expected https:// off loopback (bearer tokens travel on it), got {url!r}"
        )
    return None


class DirectoryPullConfig(_Section):
    """``kynara-collector directory sync``: users and groups pulled from an
    identity provider's SCIM 2.0 endpoint (for one that does not push) and
    written to the collector's own SCIM endpoint (``collector.dirsync``)."""

    # The source's SCIM base URL, e.g. "https://idp.example.com/scim/v2";
    # http:// on loopback only (the token travels on it).
    url: str = ""
    # File holding the bearer token the source accepts, e.g.
    # "/run/secrets/kynara-idp-scim"; read before each run.
    token_file: str = ""
    # PEM certificates to trust for the source's https, e.g.
    # "/etc/kynara-collector/idp-ca.pem"; "" trusts the system's.
    ca_file: str = ""
    # Seconds between runs when neither --once nor --every is given, e.g.
    # 900; 0 runs once.
    interval_seconds: float = 0.0
    # The collector's SCIM endpoint, e.g. "https://127.0.0.1:9465/scim/v2";
    # "" derives it from http.host and http.port (https with http.tls).
    target_url: str = ""
    # File holding a bearer secret of one of scim.credentials, e.g.
    # "/run/secrets/kynara-scim-pull"; read before each run.
    target_token_file: str = ""
    # PEM certificates to trust for the target's https (http.tls), e.g.
    # "/etc/kynara-collector/http-ca.pem"; "" trusts the system's.
    target_ca_file: str = ""
    # Resources asked for a page (SCIM count), e.g. 100.
    page_size: int = 100
    # Seconds a SCIM request may take, e.g. 30.
    timeout_seconds: float = 30.0
    # Resources of one type (Users, Groups) a run reads at most, e.g.
    # 100000: a listing whose totalResults says more fails the run at its
    # first page instead of being read for hours.
    max_resources: int = 100_000
    # The largest share of the target's owned users (those with an
    # externalId) one run may delete, e.g. 0.5: a source that answers with
    # far too few users (a token of the wrong tenant) fails the run before
    # any write instead of deleting them all; runs deleting 5 or fewer are
    # never held back. `directory sync --force` lets one run through.
    max_delete_fraction: float = 0.5
    # Port of the schedule's /metrics (--every or interval_seconds), e.g.
    # 9466; 0 serves none. A run of its own (--once) serves none either.
    metrics_port: int = 0
    # Bind address of that /metrics, e.g. "127.0.0.1"; a loopback address
    # (it has neither TLS nor credentials).
    metrics_host: str = "127.0.0.1"

    def validate(self, section: str) -> None:
        for key in ("url", "target_url"):
            url = getattr(self, key)
            problem = endpoint_url_problem(url) if url else None
            if problem is not None:
                raise ConfigError(f"{section}.{key}: {problem}")
        if self.url and not self.token_file:
            raise ConfigError(f"{section}.token_file: expected a path, got none")
        if self.url and not self.target_token_file:
            raise ConfigError(
                f"{section}.target_token_file: expected a path (a secret of "
                "scim.credentials on the target), got none"
            )
        if self.interval_seconds:
            _check_range(
                section,
                "interval_seconds",
                self.interval_seconds,
                MIN_PULL_INTERVAL_SECONDS,
                MAX_PULL_INTERVAL_SECONDS,
            )
        _check_range(section, "page_size", self.page_size, 1, 1000)
        _check_range(section, "timeout_seconds", self.timeout_seconds, 0.1, 300)
        _check_range(section, "max_resources", self.max_resources, 1, 10_000_000)
        _check_range(section, "max_delete_fraction", self.max_delete_fraction, 0, 1)
        _check_range(section, "metrics_port", self.metrics_port, 0, 65535)
        if not is_loopback(self.metrics_host):
            raise ConfigError(
                f"{section}.metrics_host: expected a loopback address (127.0.0.0/8 "
                f"or ::1; /metrics has no TLS), got {self.metrics_host!r}"
            )


class DirectoryConfig(_Section):
    """The signed directory: the principals the collector publishes to the
    central store (``sync.directory``), for daemons whose directory.store
    names it; SCIM changes (``scim``) and ``kynara-collector directory
    publish`` publish it."""

    # Ed25519 private key file the directory is signed with (PKCS#8 PEM,
    # mode 0600; `kynara-sidecar keygen` makes one), e.g.
    # "/etc/kynara-collector/directory.pem"; daemons list its public half in
    # directory.trusted_keys. Keep it apart from the offline bundle key: it
    # signs only principals, never policies.
    signing_key: str = ""
    # Pulling from an identity provider that does not push, e.g. {url:
    # https://idp.example.com/scim/v2, token_file: /run/secrets/idp,
    # target_token_file: /run/secrets/kynara-scim-pull, interval_seconds: 900}.
    pull: DirectoryPullConfig = msgspec.field(default_factory=DirectoryPullConfig)

    def validate(self, section: str) -> None:
        self.pull.validate(f"{section}.pull")


def load_directory_key(config: CollectorConfig) -> SigningKey:
    """The directory signing key ``directory.signing_key`` names.

    Raises:
        ConfigError: the setting is empty or the file cannot be loaded (the
            message names the setting and the file).
    """
    path = config.directory.signing_key
    if not path:
        raise ConfigError(
            "directory.signing_key: expected an Ed25519 key file (`kynara-sidecar "
            "keygen` makes one), got none"
        )
    try:
        return load_signing_key(path)
    except ConfigError as err:
        raise ConfigError(f"directory.signing_key: {err}") from None


class ScimCredentialConfig(_Section):
    """One SCIM client (an identity provider's connector): its bearer token."""

    # File holding the bearer secret (at least 16 bytes, surrounding
    # whitespace removed), e.g. "/run/secrets/kynara-scim-okta"; read at start.
    secret_file: str = ""

    def validate(self, section: str) -> None:
        if not self.secret_file:
            raise ConfigError(f"{section}.secret_file: expected a path, got none")


class ScimConfig(_Section):
    """The SCIM 2.0 service provider (``collector.scim``): identity providers
    provision users, agents and groups under ``/scim/v2/`` on the collector's
    HTTP listener, and each change is published as a signed directory
    (``directory.signing_key``) to the central store (``store.url``).

    The listener is ``http``'s: off loopback it needs ``http.tls`` (and
    ``http.credentials``, which SCIM does not use: its callers hold
    ``scim.credentials``).
    """

    # Serve it, e.g. true.
    enabled: bool = False
    # The SCIM store's LMDB environment (Users and Groups), e.g.
    # "/var/lib/kynara-collector/scim".
    path: str = "var/collector/scim"
    # Its LMDB map size in bytes, e.g. 1073741824 (1 GiB).
    map_size: int = DEFAULT_SCIM_MAP_SIZE
    # SCIM clients by name, e.g. {okta: {secret_file:
    # /run/secrets/kynara-scim-okta}}; each sends `Authorization: Bearer
    # <secret>`. Secrets differ from each other and from http.credentials'.
    credentials: dict[str, ScimCredentialConfig] = {}
    # Group displayName -> the roles its direct members get, e.g.
    # {"Support Engineers": [support], "Administrators": [admin]};
    # a group not listed gives no role.
    group_roles: dict[str, list[str]] = {}
    # The URL IdPs reach the endpoint by, for Location headers and
    # meta.location, e.g. "https://kynara.example.com/scim/v2"; "" takes the
    # request's scheme and Host.
    base_url: str = ""
    # The most resources a search returns in one page (filter.maxResults),
    # e.g. 200.
    max_results: int = 200
    # The most terms (comparisons, presence tests) a search filter may hold,
    # GET ?filter= and POST .search alike; more is a 400 invalidFilter,
    # e.g. 200. Each term is matched against every User, and IdPs send few.
    max_filter_terms: int = 200
    # The least time between two directory revisions, in seconds, e.g. 0.5.
    # The first change after a quiet spell is published at once; changes
    # within the interval after it go out together at its end, so a bulk
    # import makes a few revisions, not one per user (each daemon keeps
    # every revision it activates).
    publish_interval_seconds: float = 0.5

    def validate(self, section: str) -> None:
        if not self.enabled:
            return
        _check_lmdb(section, self.path, self.map_size)
        if not self.credentials:
            raise ConfigError(
                f"{section}.credentials: expected at least one SCIM client, got "
                "none: without one every SCIM request is refused"
            )
        for name, credential in self.credentials.items():
            if not name:
                raise ConfigError(f"{section}.credentials: expected names, got ''")
            credential.validate(f"{section}.credentials.{name}")
        for group, roles in self.group_roles.items():
            for role in roles:
                # The rule the signed directory applies to every role: a role
                # it refuses would fail every directory build, so nothing
                # would be published while IdPs still get 2xx.
                if not is_valid_name(role):
                    raise ConfigError(
                        f"{section}.group_roles.{group}: role {role!r}: expected "
                        "a role name of dot-separated [A-Za-z0-9_-] segments, "
                        "e.g. support_agent"
                    )
        if self.base_url and not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"{section}.base_url: expected an http:// or https:// URL, got "
                f"{self.base_url!r}"
            )
        _check_range(section, "max_results", self.max_results, 1, 10_000)
        _check_range(section, "max_filter_terms", self.max_filter_terms, 1, 10_000)
        _check_range(
            section, "publish_interval_seconds", self.publish_interval_seconds, 0, 60
        )

    def load_credentials(
        self, section: str = "scim", others: Collection[bytes] = ()
    ) -> dict[str, tuple[bytes, frozenset[AdminRole]]]:
        """Read each client's secret (at least 16 bytes, none shared, none
        one of ``others``: the http.credentials secrets), with no roles.

        Raises:
            ConfigError: a file cannot be read, a secret too short or shared.
        """
        secrets = read_credential_secrets(section, self.credentials, others)
        return {name: (secret, frozenset()) for name, secret in secrets.items()}


class CollectorConfig(_Section):
    """The whole collector configuration."""

    store: StoreConfig = msgspec.field(default_factory=StoreConfig)
    pull: list[PullConfig] = []
    # Registered daemons by id, e.g. {support-bot-7d9f: {public_keys: [...]}},
    # or families by name, e.g. {kynara-agent: {id_prefix: "kynara-agent-",
    # public_keys: [...]}}.
    daemons: dict[str, DaemonConfig] = {}
    archive: ArchiveConfig = msgspec.field(default_factory=ArchiveConfig)
    state: StateConfig = msgspec.field(default_factory=StateConfig)
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    inbox: InboxConfig = msgspec.field(default_factory=InboxConfig)
    scim: ScimConfig = msgspec.field(default_factory=ScimConfig)
    directory: DirectoryConfig = msgspec.field(default_factory=DirectoryConfig)

    def validate(self, section: str = "") -> None:
        for name in ("store", "archive", "state", "http", "inbox", "scim", "directory"):
            getattr(self, name).validate(name)
        self._check_scim()
        if self.inbox.enabled and not self.store.url:
            raise ConfigError(
                "inbox.enabled: expected store.url too: the inbox reads the "
                "approvals daemons publish to the central store"
            )
        if self.inbox.enabled and self.http.port == -1:
            raise ConfigError(
                "inbox.enabled: expected HTTP (http.port is -1): the inbox is "
                "a page on the collector's HTTP"
            )
        for daemon_id, daemon in self.daemons.items():
            problem = daemon_id_problem(daemon_id)
            if problem is not None:
                raise ConfigError(f"daemons: {problem}")
            if daemon_id == UNREGISTERED:
                raise ConfigError(
                    f"daemons: {UNREGISTERED!r} is the metrics label of daemons "
                    "not registered; expected another name"
                )
            daemon.validate(f"daemons.{daemon_id}")
        self._check_families()
        exact = sorted(
            name for name, daemon in self.daemons.items() if daemon.id_prefix is None
        )
        seen: set[str] = set()
        for index, pull in enumerate(self.pull):
            where = f"pull[{index}]"
            pull.validate(where)
            daemon = self.daemons.get(pull.daemon_id)
            if daemon is not None and daemon.id_prefix is not None:
                raise ConfigError(
                    f"{where}.daemon_id: {pull.daemon_id!r} is a family of daemons "
                    f"(daemons.{pull.daemon_id}.id_prefix); a pull names one daemon: "
                    "register its exact id"
                )
            if daemon is None:
                family = self._family_of(pull.daemon_id)
                matched = (
                    f" (daemons.{family}.id_prefix matches it; a pull names a "
                    "daemon registered by its exact id)"
                    if family
                    else ""
                )
                raise ConfigError(
                    f"{where}.daemon_id: {pull.daemon_id!r} is not registered"
                    f"{matched}; expected one of daemons ({', '.join(exact)})"
                )
            if pull.daemon_id in seen:
                raise ConfigError(f"{where}.daemon_id: {pull.daemon_id!r} pulled twice")
            seen.add(pull.daemon_id)

    def _check_scim(self) -> None:
        """SCIM needs HTTP, a store to publish to and a key to sign with."""
        if not self.scim.enabled:
            return
        if self.http.port == -1:
            raise ConfigError(
                "scim.enabled: expected HTTP (http.port is -1): SCIM is served "
                "on the collector's HTTP listener"
            )
        if not self.store.url:
            raise ConfigError(
                "scim.enabled: expected store.url too: each change is published "
                "to the central store as a signed directory"
            )
        if not self.directory.signing_key:
            raise ConfigError(
                "scim.enabled: expected directory.signing_key too: each change "
                "is published as a directory signed with that key"
            )

    def _family_of(self, daemon_id: str) -> str:
        """The name of the family entry whose prefix matches ``daemon_id``,
        or ""."""
        for name, daemon in self.daemons.items():
            prefix = daemon.id_prefix
            if prefix is not None and daemon_id.startswith(prefix):
                return name
        return ""

    def _check_families(self) -> None:
        """Every daemon id matches one entry at most: no prefix starts
        with another, and no exact id starts with a prefix."""
        families = [
            (name, daemon.id_prefix)
            for name, daemon in self.daemons.items()
            if daemon.id_prefix is not None
        ]
        for i, (name, prefix) in enumerate(families):
            for other, other_prefix in families[i + 1 :]:
                if prefix.startswith(other_prefix) or other_prefix.startswith(prefix):
                    raise ConfigError(
                        f"daemons.{other}.id_prefix: {other_prefix!r} overlaps "
                        f"daemons.{name}.id_prefix {prefix!r}: a daemon id could "
                        "match both; expected prefixes of which none starts "
                        "with another"
                    )
        for daemon_id, daemon in self.daemons.items():
            if daemon.id_prefix is not None:
                continue
            family = self._family_of(daemon_id)
            if family:
                raise ConfigError(
                    f"daemons.{daemon_id}: the id is also matched by "
                    f"daemons.{family}.id_prefix "
                    f"{self.daemons[family].id_prefix!r}; expected each daemon "
                    "under one entry (drop the exact entry, or narrow the prefix)"
                )

    def registry(self) -> DaemonRegistry:
        """The registered daemons and families, their keys loaded.

        Raises:
            ConfigError: a key file cannot be loaded.
        """
        return DaemonRegistry(
            DaemonEntry(
                name,
                daemon.load_keys(f"daemons.{name}"),
                daemon.id_prefix or "",
            )
            for name, daemon in self.daemons.items()
        )

    def registered_keys(self) -> dict[str, dict[str, PublicKey]]:
        """Exactly registered daemon id -> its keys by key id (families,
        which name no id, are left out; see ``registry``).

        Raises:
            ConfigError: a key file cannot be loaded.
        """
        return {
            daemon_id: daemon.load_keys(f"daemons.{daemon_id}")
            for daemon_id, daemon in self.daemons.items()
            if daemon.id_prefix is None
        }


def load_collector_config(
    path: str | os.PathLike[str] | None = None, overrides: list[str] = ()
) -> CollectorConfig:
    """Read, override and validate the collector's configuration.

    Args:
        path: the YAML file; None uses ``$KYNARA_COLLECTOR_CONFIG`` or the
            defaults.
        overrides: ``section.key=value`` strings, applied in order.

    Raises:
        ConfigError: naming the file, the key and what was expected.
    """
    path = path or os.environ.get(DEFAULT_CONFIG_ENV)
    raw = read_raw_config(path, overrides)
    where = path or "config"
    try:
        config = msgspec.convert(raw, CollectorConfig, strict=True)
    except msgspec.ValidationError as err:
        raise ConfigError(f"{where}: {err}") from None
    try:
        config.validate()
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return config
