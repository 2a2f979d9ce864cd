"""The daemon's configuration: one YAML file, one typed section per component.

Every section is a ``msgspec.Struct`` with its defaults in the type and a
``validate()`` for ranges and cross-field rules, so a bad file is refused
with the key path, what was expected and what was found. The file path may
come from ``--config`` or the ``KYNARA_CONFIG`` environment variable, and any
key may be overridden with ``--set section.key=value`` (the value is parsed as
YAML, so ``--set audit.map_size=1048576`` is an integer).

Relative paths are taken relative to the working directory of the daemon.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import pathlib
import re
import ssl
import typing
import urllib.parse
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import msgspec
import yaml

from kynara_sidecar._unique_keys import load_yaml
from kynara_sidecar.audit.keys import PublicKey, load_trusted_keys
from kynara_sidecar.audit.redact import (
    MIN_REDACTION_KEY_BYTES,
    REDACTION_SECTIONS,
    RedactAction,
    Redactor,
)
from kynara_sidecar.errors import ConfigError
from kynara_sidecar.identity import SUPPORTED_ALGORITHMS, Issuer, parse_jwks
from kynara_sidecar.policy.names import canonical_name, check_dotted_name
from kynara_sidecar.server.tls import load_certificate_pair, load_client_ca
from kynara_sidecar.sync import STORE_SCHEMES, NatsConnection, is_store_url

__all__ = [
    "AdminCredentialConfig",
    "AdminListenerConfig",
    "AdminRole",
    "AgentCertificateConfig",
    "AgentListenerConfig",
    "AgentTlsConfig",
    "ApprovalsConfig",
    "AuditConfig",
    "Config",
    "DEFAULT_CONFIG_ENV",
    "Durability",
    "EnvConfig",
    "LogConfig",
    "LogFormat",
    "LogLevel",
    "METRICS_READERS",
    "DirectoryConfig",
    "ExtAuthzConfig",
    "ExtAuthzRoute",
    "PathTemplate",
    "PlaygroundConfig",
    "LimitsConfig",
    "GatewayConfig",
    "GatewayStdioConfig",
    "HealthListenerConfig",
    "HttpListenerConfig",
    "IdentityConfig",
    "IdentityMode",
    "IssuerConfig",
    "NatsConnectionConfig",
    "PolicyConfig",
    "RedactConfig",
    "TlsConfig",
    "UpstreamConfig",
    "UpstreamTransport",
    "ApprovalWait",
    "MAX_DAEMON_ID_CHARS",
    "daemon_id_problem",
    "is_loopback",
    "load_config",
    "parse_path_template",
    "read_credential_secrets",
    "read_raw_config",
    "read_secret",
    "store_url_problem",
]

DEFAULT_CONFIG_ENV = "KYNARA_CONFIG"
# A decision request is a few KiB. Every byte of context is decoded on the
# event loop and kept in the audit log, so a small limit keeps one caller
# from stalling the others or filling the log quickly; raise it for agents
# that really send large contexts.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024
# An agent request past this is no decision request; the bound matches the
# other sections' and keeps one large frame's buffer (the fast path
# allocates a frame's size while it arrives) within reason.
MAX_AGENT_MESSAGE_BYTES = 64 * 1024 * 1024
# 1 GiB of address space costs nothing until used; LMDB needs it reserved.
DEFAULT_MAP_SIZE = 1 << 30
# An LMDB commit syncs in ~0.3-0.6 ms here; 256 records a batch keeps one
# transaction well under a millisecond while amortising the sync.
DEFAULT_MAX_BATCH = 256
# Owner and group may connect: in Kubernetes the agent container shares the
# pod's group (fsGroup) but usually not the daemon's uid.
DEFAULT_SOCKET_MODE = 0o660
# Unix socket paths are limited to 107 bytes by sockaddr_un.
MAX_SOCKET_PATH_BYTES = 107
# A fast path connection idle this long after its hello is closed, so one
# an agent forgot does not hold a connection slot (agent.fast_idle_seconds).
# Five minutes outlasts a model's longest turn between two tool calls, and
# the SDK dials again (a hello, microseconds) when it finds one closed.
DEFAULT_FAST_IDLE_SECONDS = 300.0
# Beyond a day an idle timeout is no bound at all: 0 says "never" plainly.
MAX_FAST_IDLE_SECONDS = 86_400.0
MIN_MAP_SIZE = 64 * 1024
# Clocks kept by NTP agree within a second; 30 s absorbs a lagging VM
# without stretching a token's life much. A bound past 5 minutes would make
# short-lived tokens meaningless.
DEFAULT_MAX_CLOCK_SKEW_SECONDS = 30
MAX_CLOCK_SKEW_SECONDS = 300
# A signed bundle's creation time may be this far ahead of the daemon's
# clock (sync.max_clock_skew_seconds): five minutes covers machines that
# sync their clocks; past it, the publisher's clock is wrong, and a bundle
# from the future would make every later one look older. At most a day.
DEFAULT_BUNDLE_CLOCK_SKEW_SECONDS = 300
MAX_BUNDLE_CLOCK_SKEW_SECONDS = 86_400
# A daemon id becomes a checkpoint's origin, a store subject or file name,
# a key in the collector's LMDB (at most 511 bytes) and a metric label;
# 128 characters hold a pod name with room and keep every one of those
# far inside its limit.
MAX_DAEMON_ID_CHARS = 128
# 128 bits: a bearer secret shorter than this could be guessed.
MIN_AGENT_SECRET_BYTES = 16
# The admin socket reads the whole audit log: its owner only, by default.
DEFAULT_ADMIN_SOCKET_MODE = 0o600
# The ext_authz socket states peers the policies trust: its owner only, by
# default.
DEFAULT_EXT_AUTHZ_SOCKET_MODE = 0o600


class IdentityMode(enum.StrEnum):
    """How the subject of a request is established."""

    # The request's asserted chain is trusted. For development only: the
    # daemon warns at start and marks every audit record.
    DEVELOPMENT = "development"
    # Delegation tokens verified against configured issuers.
    VERIFIED = "verified"


class AdminRole(enum.StrEnum):
    """What an admin credential may do on the admin listener."""

    # Reads the audit log: checkpoints, proofs, segments (AuditService).
    OPERATOR = "operator"
    # Lists, reads, approves and rejects approvals (ApprovalService, the
    # review page's sign-in, `kynara-sidecar approvals`).
    REVIEWER = "reviewer"
    # Reads /metrics on an HTTP listener serving TLS (Prometheus); nothing
    # else. Operators may read it too.
    METRICS = "metrics"


# The roles whose credential may read /metrics when it needs one.
METRICS_READERS = frozenset({AdminRole.METRICS, AdminRole.OPERATOR})


class Durability(enum.StrEnum):
    # Answer only after the audit record is synced to disk.
    DURABLE = "durable"
    # Answer after the record is committed but before it is synced; a crash
    # can lose up to `audit.deferred_window_ms` of answered decisions.
    DEFERRED = "deferred"


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    def validate(self, section: str) -> None:
        """Check ranges and cross-field rules; raise ConfigError naming the key."""


class _FileSection(_Section):
    """A section naming files (secrets, keys, certificates) that its
    ``validate`` reads and checks, unless told ``files=False``.

    The daemon checks them at start. A client of the daemon (the CLI's
    admin commands) and a reload check the values only: they use none of
    those files, may not be allowed to read them, and must not fail on one
    the running daemon does not depend on (a renewed certificate the daemon
    watches and refuses on its own, a secret the reload reads itself).
    """

    def validate(self, section: str, *, files: bool = True) -> None:
        """Check the values, and with ``files`` read and check the files."""


def _check_port(section: str, key: str, port: int) -> None:
    if not 0 <= port <= 65535:
        raise ConfigError(f"{section}.{key}: expected a port in 0..65535, got {port}")


def host_port(host: str, port: int) -> str:
    """``host:port`` as gRPC reads an address: an IPv6 host in brackets."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address or ``localhost``; parsed, not
    matched by prefix, so "127.attacker.example" (a name) is not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_loopback(section: str, key: str, host: str) -> None:
    if not is_loopback(host):
        raise ConfigError(
            f"{section}.{key}: expected a loopback address (127.0.0.0/8 or ::1), "
            f"got {host!r}; this listener carries no credentials"
        )


class AgentListenerConfig(_FileSection):
    """Where agents reach the decision service."""

    # Unix socket for gRPC, e.g. "/run/kynara/agent.sock" (the SDK's default
    # target); empty disables it.
    socket: str = "/run/kynara/agent.sock"
    # Unix socket for the fast path (framed MessagePack, protos/fastpath.md),
    # e.g. "/run/kynara/agent.fast.sock", with socket_mode; empty disables it.
    fast_socket: str = ""
    # Seconds a fast path connection may stay idle after its hello (nothing
    # in flight, nothing sent) before the daemon closes it, e.g. 300; it is
    # closed within twice this. 0 never closes one.
    fast_idle_seconds: float = DEFAULT_FAST_IDLE_SECONDS
    # Permission bits of the socket in octal, e.g. 0660: owner and group
    # may connect, so an agent container sharing the pod's group can.
    socket_mode: int = DEFAULT_SOCKET_MODE
    # TCP host for gRPC, e.g. "127.0.0.1"; a loopback address unless tls
    # is set, then any (e.g. the pod address, for agents in other pods).
    host: str = "127.0.0.1"
    # Loopback TCP port for gRPC, e.g. 50151; 0 picks a free port; -1 disables.
    port: int = 50151
    # Largest request accepted, in bytes; larger ones get RESOURCE_EXHAUSTED.
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # TLS on the TCP port, requiring a client certificate (mutual TLS); the
    # Unix sockets stay plaintext. See AgentTlsConfig.
    tls: AgentTlsConfig = msgspec.field(default_factory=lambda: AgentTlsConfig())

    def validate(self, section: str, *, files: bool = True) -> None:
        self.tls.validate(f"{section}.tls", files=files)
        if self.port != -1:
            _check_port(section, "port", self.port)
            if not self.tls.enabled:
                _check_loopback(section, "host", self.host)
        if not self.socket and self.port == -1:
            raise ConfigError(f"{section}: expected a socket or a port, got neither")
        try:
            length = len(os.fsencode(self.socket))
        except UnicodeEncodeError as err:
            raise ConfigError(
                f"{section}.socket: expected a path the filesystem can encode, "
                f"got {self.socket!r} ({err.reason})"
            ) from None
        if length > MAX_SOCKET_PATH_BYTES:
            raise ConfigError(
                f"{section}.socket: expected at most {MAX_SOCKET_PATH_BYTES} bytes, "
                f"got {length}"
            )
        _check_socket_path(section, self.fast_socket, "fast_socket")
        if self.fast_socket and self.socket:
            if os.path.abspath(self.fast_socket) == os.path.abspath(self.socket):
                raise ConfigError(
                    f"{section}.fast_socket: expected a socket apart from "
                    f"{section}.socket, got the same path {self.socket!r}"
                )
        if self.fast_idle_seconds != 0 and not (
            1 <= self.fast_idle_seconds <= MAX_FAST_IDLE_SECONDS
        ):
            raise ConfigError(
                f"{section}.fast_idle_seconds: expected 0 (never) or "
                f"1..{MAX_FAST_IDLE_SECONDS:g} seconds, got {self.fast_idle_seconds}"
            )
        if not 0 <= self.socket_mode <= 0o777:
            raise ConfigError(
                f"{section}.socket_mode: expected permission bits 0..0o777, "
                f"got {self.socket_mode:#o}"
            )
        if not 1024 <= self.max_message_bytes <= MAX_AGENT_MESSAGE_BYTES:
            raise ConfigError(
                f"{section}.max_message_bytes: expected "
                f"1024..{MAX_AGENT_MESSAGE_BYTES}, got {self.max_message_bytes}"
            )


class TlsConfig(_FileSection):
    """A TCP listener's TLS certificate and key (admin.tls, http.tls), both
    or neither; with them the listener may be bound off loopback (the pod
    address)."""

    # PEM certificate, leaf first then any intermediates, e.g.
    # "/run/secrets/kynara-admin-tls/tls.crt"; re-read when it changes.
    cert_file: str = ""
    # PEM private key of that certificate, unencrypted, e.g.
    # "/run/secrets/kynara-admin-tls/tls.key"; re-read when it changes.
    key_file: str = ""

    @property
    def enabled(self) -> bool:
        """Whether the TCP port serves TLS."""
        return bool(self.cert_file)

    def validate(self, section: str, *, files: bool = True) -> None:
        _check_pair(section, self.cert_file, self.key_file, "neither for no TLS")
        if self.enabled and files:
            load_certificate_pair(self.cert_file, self.key_file, section)


class AgentTlsConfig(TlsConfig):
    """The agent listener's TLS (agent.tls): its serving certificate and the
    CA whose client certificates it accepts. Every TLS client must present
    a certificate that CA signed, or its handshake fails; in multi-agent
    mode the certificate's URI SAN names the calling agent
    (identity.agents.<id>.certificate_uri)."""

    # PEM certificates of the CA(s) that sign agents' client certificates,
    # e.g. "/run/secrets/kynara-agent-tls/ca.crt"; required with cert_file;
    # re-read when it changes.
    client_ca_file: str = ""

    def validate(self, section: str, *, files: bool = True) -> None:
        super().validate(section, files=files)
        if self.enabled and not self.client_ca_file:
            raise ConfigError(
                f"{section}.client_ca_file: expected the CA that signs the agents' "
                "client certificates with cert_file, got none (the agent port "
                "requires a client certificate)"
            )
        if self.client_ca_file and not self.enabled:
            raise ConfigError(
                f"{section}.cert_file: expected the serving certificate with "
                f"{section}.client_ca_file, got none"
            )
        if self.enabled and files:
            load_client_ca(self.client_ca_file, section)


class HttpListenerConfig(_FileSection):
    """The one HTTP stack: /metrics now, review pages later."""

    # Bind address, e.g. "127.0.0.1"; a loopback address unless tls is set,
    # then any (e.g. the pod address, for Prometheus outside the pod).
    host: str = "127.0.0.1"
    # Port, e.g. 9464; 0 picks a free port; -1 disables HTTP.
    port: int = 9464
    # TLS on the port, e.g. {cert_file: tls.crt, key_file: tls.key}. With it
    # /metrics needs `authorization: Bearer <secret>` of an admin credential
    # with the metrics or operator role; without it /metrics is open, and
    # only loopback may reach it.
    tls: TlsConfig = msgspec.field(default_factory=TlsConfig)

    def validate(self, section: str, *, files: bool = True) -> None:
        if self.port != -1:
            _check_port(section, "port", self.port)
            if not is_loopback(self.host) and not self.tls.enabled:
                raise ConfigError(
                    f"{section}.host: expected a loopback address (127.0.0.0/8 or "
                    f"::1) with no TLS, got {self.host!r}; set {section}.tls "
                    "(cert_file and key_file) to bind it off loopback, else "
                    "/metrics would be open and the review page's sign-in would "
                    "cross the network in the clear"
                )
        self.tls.validate(f"{section}.tls", files=files)

    @property
    def needs_credentials(self) -> bool:
        """Whether /metrics asks for a bearer credential: when TLS is on,
        which is what lets the listener leave loopback."""
        return self.port != -1 and self.tls.enabled


class HealthListenerConfig(_Section):
    """A port that serves only gRPC health, without credentials (kubelet)."""

    # Bind address, e.g. "127.0.0.1" (the pod address in Kubernetes).
    host: str = "127.0.0.1"
    # Port, e.g. 50152; 0 picks a free port; -1 disables it.
    port: int = 50152

    def validate(self, section: str) -> None:
        if self.port != -1:
            _check_port(section, "port", self.port)


class AdminCredentialConfig(_Section):
    """One admin caller: a bearer secret and the roles it carries."""

    # File holding the bearer secret (at least 16 bytes, surrounding
    # whitespace removed), e.g. "/run/secrets/kynara-operator"; read at start.
    secret_file: str = ""
    # What it may do, e.g. [operator]: "operator" reads the audit log and its
    # proofs, "reviewer" resolves approvals.
    roles: list[str] = []
    # A reviewer's principal id, compared with a request's chain to refuse
    # self-approval, e.g. "carol"; defaults to the credential's name. Held to
    # the principal id rule (policy/names.py: no spaces, invisible characters
    # or mixed scripts).
    principal: str = ""
    # Reviewer roles that rules may require (approval.reviewer_roles), e.g.
    # [finance_lead]; only with the reviewer role.
    reviewer_roles: list[str] = []

    def validate(self, section: str) -> None:
        if not self.secret_file:
            raise ConfigError(f"{section}.secret_file: expected a path, got none")
        if self.principal:
            _check_principal(f"{section}.principal", self.principal)
        if self.reviewer_roles and AdminRole.REVIEWER not in self.roles:
            raise ConfigError(
                f"{section}.reviewer_roles: expected the reviewer role in "
                f"{section}.roles with reviewer roles, got roles {self.roles}"
            )
        for role in self.reviewer_roles:
            if not role or not role.isprintable() or len(role) > 128:
                raise ConfigError(
                    f"{section}.reviewer_roles: expected names of 1..128 "
                    f"printable characters, got {role!r}"
                )
        choices = [role.value for role in AdminRole]
        if not self.roles:
            raise ConfigError(
                f"{section}.roles: expected at least one of {', '.join(choices)}, "
                "got none"
            )
        for role in self.roles:
            if role not in choices:
                raise ConfigError(
                    f"{section}.roles: expected each of {', '.join(choices)}, "
                    f"got {role!r}"
                )


class AdminListenerConfig(_FileSection):
    """Where operators and reviewers reach the daemon: audit reads, proofs,
    segment pulls (AuditService) and approvals (ApprovalService). Every call
    needs a credential an agent does not have.

    The listener starts only when it has an address and at least one
    credential (or an approvals.reviewer_issuers entry): without one it
    could only refuse.
    """

    # Unix socket for gRPC, e.g. "var/run/admin.sock"; empty disables it.
    socket: str = ""
    # Permission bits of the socket in octal, e.g. 0600 (the owner only).
    socket_mode: int = DEFAULT_ADMIN_SOCKET_MODE
    # TCP host for gRPC, e.g. "127.0.0.1"; a loopback address unless tls
    # is set, then any (e.g. the pod address).
    host: str = "127.0.0.1"
    # TCP port for gRPC, e.g. 50153; 0 picks a free port; -1 disables.
    port: int = -1
    # TLS on the TCP port (the Unix socket stays plaintext, guarded by its
    # file mode), e.g. {cert_file: tls.crt, key_file: tls.key}.
    tls: TlsConfig = msgspec.field(default_factory=TlsConfig)
    # Admin callers by name, e.g. {ops: {secret_file: /run/secrets/ops,
    # roles: [operator]}}. Each call sends `authorization: Bearer <secret>`.
    credentials: dict[str, AdminCredentialConfig] = {}

    @property
    def enabled(self) -> bool:
        """Whether the listener starts: an address and a credential."""
        return bool(self.socket or self.port != -1) and bool(self.credentials)

    def validate(self, section: str, *, files: bool = True) -> None:
        if self.port != -1:
            _check_port(section, "port", self.port)
            if not is_loopback(self.host) and not self.tls.enabled:
                raise ConfigError(
                    f"{section}.host: expected a loopback address (127.0.0.0/8 or "
                    f"::1) with no TLS, got {self.host!r}; set {section}.tls "
                    "(cert_file and key_file) to bind it off loopback, else its "
                    "secrets would cross the network in the clear"
                )
        self.tls.validate(f"{section}.tls", files=files)
        _check_socket_path(section, self.socket)
        if not 0 <= self.socket_mode <= 0o777:
            raise ConfigError(
                f"{section}.socket_mode: expected permission bits 0..0o777, "
                f"got {self.socket_mode:#o}"
            )
        if files:
            self.load_credentials(section)
        else:
            self._check_credentials(section)

    def load_credentials(
        self, section: str = "admin"
    ) -> dict[str, tuple[bytes, frozenset[AdminRole]]]:
        """Read each credential's secret.

        Returns:
            Credential name -> (secret, roles).

        Raises:
            ConfigError: a bad entry, a file that cannot be read, a secret
                that is too short, or two credentials sharing one.
        """
        self._check_credentials(section)
        secrets = read_credential_secrets(section, self.credentials)
        return {
            name: (secret, frozenset(map(AdminRole, self.credentials[name].roles)))
            for name, secret in secrets.items()
        }

    def _check_credentials(self, section: str) -> None:
        """Check each credential's settings, reading no secret file."""
        for name, credential in self.credentials.items():
            where = f"{section}.credentials.{name}"
            if not name:
                raise ConfigError(f"{section}.credentials: expected names, got ''")
            credential.validate(where)
            if not credential.principal and AdminRole.REVIEWER in credential.roles:
                # The reviewer's principal id defaults to the credential name.
                _check_principal(f"{where}.principal (default: the name)", name)

    def check_apart(
        self,
        agent: AgentListenerConfig,
        identity: IdentityConfig,
        *,
        files: bool = True,
    ) -> None:
        """Refuse an admin listener an agent could reach with what it holds;
        with ``files``, read the secrets to compare them.

        Raises:
            ConfigError: the admin socket or port is the agent's, or an admin
                secret is also an agent's bearer secret.
        """
        for key in ("socket", "fast_socket"):
            theirs = getattr(agent, key)
            if self.socket and theirs:
                if os.path.abspath(self.socket) == os.path.abspath(theirs):
                    raise ConfigError(
                        f"admin.socket: expected a socket apart from agent.{key}, "
                        f"got the same path {self.socket!r}"
                    )
        if self.port > 0 and self.port == agent.port:
            raise ConfigError(
                f"admin.port: expected a port apart from agent.port, got {self.port}"
            )
        if not files or not self.credentials or not identity.agents:
            return
        agent_secrets = set(identity.load_agent_secrets().values())
        for name, (secret, _) in self.load_credentials().items():
            if secret in agent_secrets:
                raise ConfigError(
                    f"admin.credentials.{name}: expected a secret no agent holds, "
                    "got one of identity.agents' secrets"
                )


def _check_principal(key: str, principal: str) -> None:
    try:
        canonical_name(principal)
    except ValueError as err:
        raise ConfigError(
            f"{key}: expected a principal id, got {principal[:80]!r}: {err}"
        ) from None


def _check_socket_path(section: str, socket_path: str, key: str = "socket") -> None:
    try:
        length = len(os.fsencode(socket_path))
    except UnicodeEncodeError as err:
        raise ConfigError(
            f"{section}.{key}: expected a path the filesystem can encode, "
            f"got {socket_path!r} ({err.reason})"
        ) from None
    if length > MAX_SOCKET_PATH_BYTES:
        raise ConfigError(
            f"{section}.{key}: expected at most {MAX_SOCKET_PATH_BYTES} bytes, "
            f"got {length}"
        )


def _check_pair(section: str, cert_file: str, key_file: str, otherwise: str) -> None:
    """Refuse a certificate without its key, or a key without its certificate.

    Raises:
        ConfigError: naming the key missing; ``otherwise`` says what
            leaving both out means, e.g. "neither for no TLS".
    """
    if bool(cert_file) != bool(key_file):
        keys = ("cert_file", "key_file")
        given, missing = keys if cert_file else keys[::-1]
        raise ConfigError(
            f"{section}.{missing}: expected a path with {section}.{given}, "
            f"got none (give both, or {otherwise})"
        )


def read_secret(where: str, path: str) -> bytes:
    """A bearer secret from the file at ``path``, surrounding whitespace
    removed, at least ``MIN_AGENT_SECRET_BYTES`` long.

    Raises:
        ConfigError: naming ``where``: unreadable, empty or too short.
    """
    try:
        secret = pathlib.Path(path).read_bytes().strip()
    except (OSError, ValueError) as err:
        raise ConfigError(f"{where}: cannot read the secret: {err}") from None
    if not secret:
        raise ConfigError(
            f"{where}: {path} is empty; expected a secret of at least "
            f"{MIN_AGENT_SECRET_BYTES} bytes (e.g. `openssl rand -hex 32 > {path}`)"
        )
    if len(secret) < MIN_AGENT_SECRET_BYTES:
        raise ConfigError(
            f"{where}: expected a secret of at least {MIN_AGENT_SECRET_BYTES} "
            f"bytes in {path}, got {len(secret)}"
        )
    return secret


def read_credential_secrets(
    section: str, credentials: Mapping[str, Any], others: Collection[bytes] = ()
) -> dict[str, bytes]:
    """Read each credential's ``secret_file`` (``read_secret``), in order:
    name -> secret. No two may share a secret, nor any be one of ``others``
    (the ``http.credentials`` secrets, for a section whose callers must not
    pass as those).

    Raises:
        ConfigError: naming ``<section>.credentials.<name>``: a file that
            cannot be read, a secret too short, shared or one of ``others``.
    """
    loaded: dict[str, bytes] = {}
    for name, credential in credentials.items():
        where = f"{section}.credentials.{name}"
        secret = read_secret(f"{where}.secret_file", credential.secret_file)
        if secret in loaded.values():
            raise ConfigError(f"{where}: expected its own secret, got a shared one")
        if secret in others:
            raise ConfigError(
                f"{where}: expected its own secret, got one of http.credentials"
            )
        loaded[name] = secret
    return loaded


class IssuerConfig(_Section):
    """One trusted issuer of delegation tokens and the keys it signs with."""

    # The tokens' exact `iss`, e.g. "https://idp.example.com".
    issuer: str = ""
    # The `aud` this daemon accepts from it, e.g. "kynara:support-bot".
    audience: str = ""
    # A JWKS file of its public keys, e.g. "/etc/kynara/idp-jwks.json";
    # read at start (restart to pick up rotated keys).
    jwks_file: str = ""
    # Or the JWKS inline, e.g. {keys: [{kty: OKP, crv: Ed25519, x: "..."}]}.
    jwks: dict[str, Any] = {}
    # Algorithms accepted from it, a subset of RS256, ES256, EdDSA.
    algorithms: tuple[str, ...] = SUPPORTED_ALGORITHMS

    def validate(self, section: str) -> None:
        for key in ("issuer", "audience"):
            if not getattr(self, key):
                raise ConfigError(f"{section}.{key}: expected a string, got none")
        unknown = sorted(set(self.algorithms) - set(SUPPORTED_ALGORITHMS))
        if unknown or not self.algorithms:
            raise ConfigError(
                f"{section}.algorithms: expected a non-empty subset of "
                f"{list(SUPPORTED_ALGORITHMS)}, got {list(self.algorithms)}"
            )
        if bool(self.jwks_file) == bool(self.jwks):
            raise ConfigError(
                f"{section}: expected exactly one of jwks_file and jwks, got "
                + ("both" if self.jwks else "neither")
            )

    def load(self, section: str) -> Issuer:
        """Validate, then read and parse the keys.

        Returns:
            The issuer with its parsed public keys.

        Raises:
            ConfigError: a bad setting, a JWKS that cannot be read or a key
                that does not load.
        """
        self.validate(section)
        document: object = self.jwks
        where = f"{section}.jwks"
        if self.jwks_file:
            where = f"{section}.jwks_file ({self.jwks_file})"
            try:
                document = msgspec.json.decode(
                    pathlib.Path(self.jwks_file).read_bytes()
                )
            except (OSError, ValueError, msgspec.DecodeError) as err:
                raise ConfigError(f"{where}: cannot read a JWKS: {err}") from None
        keys = parse_jwks(document, self.algorithms, where)
        return Issuer(self.issuer, self.audience, keys, frozenset(self.algorithms))


def daemon_id_problem(daemon_id: str) -> str | None:
    """What is wrong with ``daemon_id`` as a log origin, or None: it must be
    1 to ``MAX_DAEMON_ID_CHARS`` printable ASCII characters without '"'
    or '\\' (what a checkpoint's origin may hold)."""
    if (
        0 < len(daemon_id) <= MAX_DAEMON_ID_CHARS
        and daemon_id.isascii()
        and daemon_id.isprintable()
        and '"' not in daemon_id
        and "\\" not in daemon_id
    ):
        return None
    shown = daemon_id if len(daemon_id) <= 40 else daemon_id[:40] + "..."
    return (
        f"expected a daemon id of 1 to {MAX_DAEMON_ID_CHARS} printable ASCII "
        f"characters without '\"' or '\\\\', got {shown!r} "
        f"({len(daemon_id)} characters)"
    )


# A URI SAN with room for a SPIFFE ID (at most 2048 bytes by its spec).
MAX_CERTIFICATE_URI_CHARS = 2048


class AgentCertificateConfig(_Section):
    """An agent that proves itself with a client certificate on agent.tls.

    The certificate names the agent by a URI subject alternative name, as
    service meshes issue them (a SPIFFE ID, e.g.
    "spiffe://example.org/ns/shop/sa/billing-bot"); compared exactly, case
    and all. Not the common name (deprecated for identities) nor a
    fingerprint (it changes with every renewal).
    """

    # The URI SAN the agent's certificate carries, e.g.
    # "spiffe://example.org/agent/billing-bot".
    certificate_uri: str

    def validate(self, section: str) -> None:
        uri = self.certificate_uri
        parts = urllib.parse.urlsplit(uri) if uri.isprintable() else None
        if (
            parts is None
            or not parts.scheme
            or not (parts.netloc or parts.path)
            or any(c.isspace() for c in uri)
            or len(uri) > MAX_CERTIFICATE_URI_CHARS
        ):
            raise ConfigError(
                f"{section}.certificate_uri: expected an absolute URI of at most "
                f"{MAX_CERTIFICATE_URI_CHARS} characters without spaces, e.g. "
                f"'spiffe://example.org/agent/billing-bot', got {uri[:100]!r}"
            )


class IdentityConfig(_FileSection):
    """Who is asking."""

    # "verified" takes the user and intermediate agents from delegation
    # tokens signed by `issuers`; "development" trusts the request's
    # asserted chain (warns at start, marks every record). E.g. "verified".
    mode: IdentityMode = IdentityMode.VERIFIED
    # This daemon's agent: its principal id in the directory, e.g. "support-bot".
    # Left empty when `agents` is set.
    agent_id: str = ""
    # This daemon's own log origin, unique per running instance,
    # e.g. "support-bot-7d9f" (in Kubernetes, the pod name). Defaults to
    # "<agent_id>@<hostname>".
    daemon_id: str = ""
    # Trusted token issuers (verified mode), e.g.
    # [{issuer: "https://idp.example.com", audience: "kynara",
    #   jwks_file: "/etc/kynara/idp-jwks.json"}].
    issuers: list[IssuerConfig] = []
    # How far an issuer's clock may disagree with ours on exp and nbf,
    # in seconds, e.g. 30.
    max_clock_skew_seconds: int = DEFAULT_MAX_CLOCK_SKEW_SECONDS
    # Multi-agent mode: agent id -> its credential: a file holding its
    # bearer secret, or {certificate_uri: <URI SAN>} for a client
    # certificate on agent.tls, e.g. {support-bot: /run/secrets/support-bot,
    # billing-bot: {certificate_uri: "spiffe://example.org/agent/billing-bot"}}.
    # A secret's caller sends `authorization: Bearer <secret>` (read at
    # start); on a TLS connection the client certificate names the agent.
    agents: dict[str, str | AgentCertificateConfig] = {}

    def validate(self, section: str, *, files: bool = True) -> None:
        if self.daemon_id and (problem := daemon_id_problem(self.daemon_id)):
            raise ConfigError(f"{section}.daemon_id: {problem}")
        if self.agents:
            self._validate_agents(section, files=files)
        elif not self.agent_id:
            raise ConfigError(f"{section}.agent_id: expected a principal id, got none")
        if not 0 <= self.max_clock_skew_seconds <= MAX_CLOCK_SKEW_SECONDS:
            raise ConfigError(
                f"{section}.max_clock_skew_seconds: expected "
                f"0..{MAX_CLOCK_SKEW_SECONDS}, "
                f"got {self.max_clock_skew_seconds}"
            )
        if self.mode is IdentityMode.VERIFIED:
            if files:
                self.load_issuers(section)
            else:
                self._check_issuers(section)

    def _validate_agents(self, section: str, *, files: bool) -> None:
        if self.agent_id:
            raise ConfigError(
                f"{section}.agent_id: expected none when {section}.agents is set "
                f"(each caller's credential names its agent), got {self.agent_id!r}"
            )
        if self.mode is not IdentityMode.VERIFIED:
            raise ConfigError(
                f"{section}.agents: expected {section}.mode 'verified' for "
                f"per-agent credentials, got {str(self.mode)!r}"
            )
        if files:
            self.load_agent_secrets(section)
        elif "" in self.agents:
            raise ConfigError(f"{section}.agents: expected agent ids, got ''")
        self.agent_certificates(section)

    def _check_issuers(self, section: str) -> None:
        """Check the issuers' settings, reading no JWKS file.

        Raises:
            ConfigError: no issuer, a bad one, or two with one `iss`.
        """
        if not self.issuers:
            raise ConfigError(
                f"{section}.issuers: expected at least one issuer in "
                "identity.mode 'verified', got none"
            )
        names: list[str] = []
        for i, issuer in enumerate(self.issuers):
            issuer.validate(f"{section}.issuers[{i}]")
            if issuer.issuer in names:
                raise ConfigError(
                    f"{section}.issuers[{i}].issuer: expected each issuer once, "
                    f"got {issuer.issuer!r} again"
                )
            names.append(issuer.issuer)

    def load_issuers(self, section: str = "identity") -> tuple[Issuer, ...]:
        """Read every issuer's keys.

        Raises:
            ConfigError: no issuer, two with one `iss`, or keys that do not load.
        """
        self._check_issuers(section)
        return tuple(
            issuer.load(f"{section}.issuers[{i}]")
            for i, issuer in enumerate(self.issuers)
        )

    def load_agent_secrets(self, section: str = "identity") -> dict[str, bytes]:
        """Read the bearer secret of each agent that has one.

        Returns:
            Agent id -> secret, surrounding whitespace removed; agents with
            a client certificate are left out.

        Raises:
            ConfigError: a file cannot be read, a secret is too short, or two
                agents share one.
        """
        secrets: dict[str, bytes] = {}
        for agent, path in self.agents.items():
            where = f"{section}.agents.{agent}"
            if not agent:
                raise ConfigError(f"{section}.agents: expected agent ids, got ''")
            if not isinstance(path, str):
                continue
            secret = read_secret(where, path)
            if secret in secrets.values():
                raise ConfigError(f"{where}: expected its own secret, got a shared one")
            secrets[agent] = secret
        return secrets

    def agent_certificates(self, section: str = "identity") -> dict[str, str]:
        """The agents that prove themselves with a client certificate.

        Returns:
            The certificate's URI SAN -> agent id.

        Raises:
            ConfigError: a malformed URI, or two agents with one URI.
        """
        agents: dict[str, str] = {}
        for agent, credential in self.agents.items():
            if isinstance(credential, str):
                continue
            where = f"{section}.agents.{agent}"
            credential.validate(where)
            other = agents.get(credential.certificate_uri)
            if other is not None:
                raise ConfigError(
                    f"{where}.certificate_uri: expected its own URI, got "
                    f"{credential.certificate_uri!r}, which names {other!r} too"
                )
            agents[credential.certificate_uri] = agent
        return agents


class PolicyConfig(_Section):
    """Where policies and the directory come from."""

    # One of: a policy directory, e.g. "config/policies" or
    # "file://config/policies" (unsigned: the daemon warns at start); a
    # signed bundle file (an existing file, or a name ending in ".bundle"),
    # e.g. "/etc/kynara/policies.bundle"; or a central
    # store, "dir:///srv/kynara-store" or "nats://127.0.0.1:4222", whose
    # current bundle the daemon follows.
    source: str = "config/policies"
    # Public keys (PEM or base64url files) of the policy publishers whose
    # bundles the daemon activates; required when source is a bundle or a
    # store, e.g. ["/etc/kynara/bundle-signing.pub"].
    trusted_keys: list[str] = []

    def validate(self, section: str) -> None:
        if problem := store_url_problem(self.source):
            raise ConfigError(f"{section}.source: {problem}")
        scheme = self.source.split("://", 1)[0] if "://" in self.source else ""
        if scheme and scheme != "file" and scheme not in STORE_SCHEMES:
            raise ConfigError(
                f"{section}.source: expected a policy directory, a bundle file, "
                f"dir://PATH or nats://HOST:PORT, got scheme {scheme!r}"
            )
        if self.signed and not self.trusted_keys:
            raise ConfigError(
                f"{section}.trusted_keys: expected the bundle publisher's public "
                f"key file(s) when {section}.source is a bundle or a store "
                f"({self.source!r}), got none"
            )

    @property
    def store(self) -> str:
        """The store URL when the source is a store, else ''."""
        return self.source if is_store_url(self.source) else ""

    @property
    def signed(self) -> bool:
        """Whether policies come as signed bundles: a store, a file, or a
        path ending in ``.bundle`` (a bundle file not written yet is still
        one, so the daemon waits for it rather than read it as policies)."""
        path = self.path
        return bool(self.store) or path.is_file() or path.suffix == ".bundle"

    @property
    def path(self) -> pathlib.Path:
        """The local directory or bundle file (meaningless for a store)."""
        return pathlib.Path(self.source.removeprefix("file://"))


class DirectoryConfig(_Section):
    """Where the directory comes from when a collector signs it.

    Once ``store`` is set, the collector's signed directory wins over any
    directory in the bundle or the policy files, and the daemon is not
    ready until it has one.
    """

    # "" (the directory comes with the policies, as policy.source's directory
    # file or the bundle's), or a central store whose signed directory the
    # daemon follows, e.g. "nats://127.0.0.1:4222" (connected with
    # sync.nats) or "dir:///srv/kynara-store".
    store: str = ""
    # Public keys (PEM or base64url files) of the collectors' directory keys
    # (not the bundle keys); required when store is set, e.g.
    # ["/etc/kynara/directory-signing.pub"].
    trusted_keys: list[str] = []

    def validate(self, section: str) -> None:
        if problem := store_url_problem(self.store):
            raise ConfigError(f"{section}.store: {problem}")
        if self.store and not is_store_url(self.store):
            raise ConfigError(
                f"{section}.store: expected dir://PATH or nats://HOST:PORT, "
                f"got {self.store!r}"
            )
        if self.store and not self.trusted_keys:
            raise ConfigError(
                f"{section}.trusted_keys: expected the collector's directory "
                f"public key file(s) when {section}.store is set "
                f"({self.store!r}), got none"
            )


# What a store URL looks like, by scheme, for the message about one that
# is almost one ("dir:/srv/store", "nats:host").
_STORE_FORMS = {
    "dir": "dir:///absolute/path or dir://relative/path",
    "nats": "nats://HOST:PORT",
}


def store_url_problem(text: str) -> str | None:
    """Why ``text`` is a malformed store URL (a store scheme without the
    ``//``, a ``nats://`` URL without a host, a ``dir://`` one without a
    path), or None. Checked before the ``sync.nats`` settings, whose TLS
    rule would otherwise take a missing host for one off loopback."""
    scheme, colon, rest = text.partition(":")
    if not colon or scheme not in _STORE_FORMS:
        return None
    if not rest.startswith("//"):
        return f"expected a store URL, {_STORE_FORMS[scheme]}, got {text!r}"
    if scheme == "dir" and rest == "//":
        return f"the store URL {text!r} names no path; expected {_STORE_FORMS[scheme]}"
    if scheme == "nats":
        try:
            host = urllib.parse.urlsplit(text).hostname
        except ValueError as err:
            return f"the store URL {text!r} cannot be read as a URL: {err}"
        if not host:
            expected = _STORE_FORMS[scheme]
            return f"the store URL {text!r} names no host; expected {expected}"
    return None


# A subject token of an inbox prefix: what NATS allows in a subject, less
# wildcards and separators.
_SUBJECT_TOKEN = re.compile(r"[^\s.*>]+")


class NatsConnectionConfig(_FileSection):
    """How a client connects to a ``nats://`` store: TLS and credentials
    (``sync.nats`` for the daemon, its bundles included; ``store.nats`` for
    the collector). Secrets are read from files at start and never logged.
    A store whose host is not loopback is refused without TLS: the segments,
    approvals and credentials would cross the network in the clear.
    ``config/nats-server.conf`` shows the server side."""

    # Use TLS, e.g. true; implied by ca_file and cert_file. Without ca_file
    # the system's trusted certificates verify the server.
    tls: bool = False
    # PEM file of the certificates to trust for the server's, e.g.
    # "/run/secrets/kynara-nats/ca.crt".
    ca_file: str = ""
    # PEM client certificate and unencrypted key, for a server that verifies
    # clients (its tls block's `verify: true`), e.g.
    # "/run/secrets/kynara-nats/tls.crt" and "/run/secrets/kynara-nats/tls.key".
    cert_file: str = ""
    key_file: str = ""
    # The name to check the server's certificate for when the URL's host is
    # not one it carries, e.g. "nats.nats.svc".
    server_name: str = ""
    # Start TLS before the server speaks, e.g. true (the server's tls block
    # needs `handshake_first: true`). false reads the server's first line in
    # plaintext, which a machine in the middle can forge to keep the
    # connection, credentials included, out of TLS.
    tls_first: bool = True
    # The user's name in the server's authorization, e.g. "support-bot-7d9f";
    # with password_file.
    user: str = ""
    # File holding that user's password, e.g. "/run/secrets/kynara-nats/password".
    password_file: str = ""
    # File holding the server's authorization token (instead of a user), e.g.
    # "/run/secrets/kynara-nats/token".
    token_file: str = ""
    # Subject prefix of this client's replies, e.g. "_INBOX.support-bot-7d9f";
    # "" for the default "_INBOX". With a prefix of its own per user the
    # server can let each read its own replies only.
    inbox_prefix: str = ""

    @property
    def tls_enabled(self) -> bool:
        """Whether the connection uses TLS."""
        return self.tls or bool(self.ca_file or self.cert_file)

    @property
    def configured(self) -> bool:
        """Whether any key is set (they only apply to a nats:// store)."""
        return self != type(self)()

    def validate(self, section: str, *, files: bool = True) -> None:
        _check_pair(section, self.cert_file, self.key_file, "neither")
        if bool(self.user) != bool(self.password_file):
            missing = "password_file" if self.user else "user"
            raise ConfigError(
                f"{section}.{missing}: expected a value with "
                f"{section}.{'user' if self.user else 'password_file'}, got none"
            )
        if self.token_file and self.user:
            raise ConfigError(
                f"{section}.token_file: expected a token or a user, got both "
                f"(user {self.user!r})"
            )
        prefix = self.inbox_prefix
        if prefix and not all(_SUBJECT_TOKEN.fullmatch(t) for t in prefix.split(".")):
            raise ConfigError(
                f"{section}.inbox_prefix: expected subject tokens separated by "
                f"'.', without spaces or wildcards, got {prefix!r}"
            )
        if files:
            self.load(section)

    def check_store(self, section: str, url: str, where: str) -> None:
        """Refuse these settings for ``url`` (named by the key ``where``)
        when it is no nats:// store, and a nats:// store off loopback
        without TLS.

        Raises:
            ConfigError: naming ``where`` or ``section``.
        """
        if url.partition("://")[0] != "nats":
            if self.configured:
                raise ConfigError(
                    f"{section}: expected a nats:// store in {where} for these "
                    f"settings, got {url or 'none'!r}"
                )
            return
        host = urllib.parse.urlsplit(url).hostname or ""
        if not self.tls_enabled and not is_loopback(host):
            raise ConfigError(
                f"{section}.tls: expected TLS (tls: true or ca_file) for the "
                f"store {url!r} off loopback, got plaintext; segments, approvals "
                "and credentials would cross the network in the clear"
            )

    def load(self, section: str) -> NatsConnection:
        """The settings with their files read: the TLS context and the
        secrets.

        Raises:
            ConfigError: a file cannot be read or holds no usable
                certificate or secret; the message names the key.
        """
        return NatsConnection(
            tls=self._tls_context(section) if self.tls_enabled else None,
            tls_first=self.tls_first,
            server_name=self.server_name,
            user=self.user,
            password=self._secret(section, "password_file"),
            token=self._secret(section, "token_file"),
            inbox_prefix=self.inbox_prefix,
        )

    def _secret(self, section: str, key: str) -> str:
        path = getattr(self, key)
        if not path:
            return ""
        where = f"{section}.{key}"
        try:
            return read_secret(where, path).decode()
        except UnicodeDecodeError:
            raise ConfigError(f"{where}: expected UTF-8 text in {path}") from None

    def _tls_context(self, section: str) -> ssl.SSLContext:
        try:
            context = ssl.create_default_context(cafile=self.ca_file or None)
        except (OSError, ssl.SSLError) as err:
            raise ConfigError(
                f"{section}.ca_file: cannot load certificates from "
                f"{self.ca_file}: {err}"
            ) from None
        if self.cert_file:
            try:
                context.load_cert_chain(self.cert_file, self.key_file)
            except (OSError, ssl.SSLError) as err:
                raise ConfigError(
                    f"{section}.cert_file: cannot load the certificate "
                    f"{self.cert_file} with the key {self.key_file}: {err}"
                ) from None
        return context


class BacklogPolicy(enum.StrEnum):
    # Past sync.backlog_max_records, keep deciding (the log grows up to
    # audit.map_size, then fails closed anyway) and say so.
    KEEP_DECIDING = "keep_deciding"
    # Past sync.backlog_max_records, answer audit_unavailable until the
    # store acknowledges enough.
    FAIL_CLOSED = "fail_closed"


class SyncConfig(_FileSection):
    """The central store: audit segments out, status up (bundles come in
    through policy.source)."""

    # "" (no central store), "dir:///srv/kynara-store" or
    # "nats://127.0.0.1:4222"; defaults to policy.source when that is a store.
    store: str = ""
    # Ship each sealed audit segment to the store; retention then prunes
    # only segments the store acknowledged.
    ship_segments: bool = True
    # How often a dir:// store is read for a new bundle, and how often a
    # nats:// watch is checked against the store's current bundle, e.g. 1.
    poll_seconds: float = 1.0
    # How often the daemon publishes its status, e.g. 5.
    status_seconds: float = 5.0
    # Seconds one store call may take before it counts as failed, e.g. 5.
    timeout_seconds: float = 5.0
    # First and longest pause between retries after a failure, in seconds.
    retry_min_seconds: float = 0.2
    retry_max_seconds: float = 30.0
    # Unshipped records past which backlog_policy applies, e.g. 1000000.
    backlog_max_records: int = 1_000_000
    # "keep_deciding" or "fail_closed" once backlog_max_records is passed.
    backlog_policy: BacklogPolicy = BacklogPolicy.KEEP_DECIDING
    # How far a bundle's creation time may be ahead of this daemon's clock,
    # in seconds, e.g. 300; a bundle further ahead is refused as "created in
    # the future" (the publisher's clock is wrong).
    max_clock_skew_seconds: float = DEFAULT_BUNDLE_CLOCK_SKEW_SECONDS
    # TLS and credentials for a nats:// store, policy.source included, e.g.
    # {ca_file: /run/secrets/kynara-nats/ca.crt, user: support-bot-7d9f,
    #  password_file: /run/secrets/kynara-nats/password}.
    nats: NatsConnectionConfig = msgspec.field(default_factory=NatsConnectionConfig)

    _RANGES = {
        "max_clock_skew_seconds": (0, MAX_BUNDLE_CLOCK_SKEW_SECONDS),
        "poll_seconds": (0.05, 3600),
        "status_seconds": (0.1, 3600),
        "timeout_seconds": (0.1, 600),
        "retry_min_seconds": (0.01, 600),
        "retry_max_seconds": (0.01, 3600),
        "backlog_max_records": (1, 1 << 40),
    }

    def validate(self, section: str, *, files: bool = True) -> None:
        self.nats.validate(f"{section}.nats", files=files)
        if problem := store_url_problem(self.store):
            raise ConfigError(f"{section}.store: {problem}")
        if self.store and not is_store_url(self.store):
            raise ConfigError(
                f"{section}.store: expected dir://PATH or nats://HOST:PORT, "
                f"got {self.store!r}"
            )
        for key, (low, high) in self._RANGES.items():
            value = getattr(self, key)
            if not low <= value <= high:
                raise ConfigError(
                    f"{section}.{key}: expected {low}..{high}, got {value}"
                )
        if self.retry_min_seconds > self.retry_max_seconds:
            raise ConfigError(
                f"{section}.retry_min_seconds: expected at most "
                f"retry_max_seconds ({self.retry_max_seconds}), "
                f"got {self.retry_min_seconds}"
            )


class RedactConfig(_Section):
    """Entries kept out of audit records (policies still see them).

    Each maps an entry name, or a dotted path into a map such as
    ``customer.email``, to "hash" (stored as a keyed hash, see
    ``audit.redaction_key``) or "drop" (left out).
    """

    # Context entries, e.g. {card_number: hash, customer.email: drop}.
    context: dict[str, str] = {}
    # Resource attributes, e.g. {owner_email: hash}.
    resource_attributes: dict[str, str] = {}

    def validate(self, section: str) -> None:
        choices = [action.value for action in RedactAction]
        for part in REDACTION_SECTIONS:
            for name, action in getattr(self, part).items():
                where = f"{section}.{part}.{name}"
                if not name or "" in name.split("."):
                    raise ConfigError(
                        f"{where}: expected an entry name or a dotted path such "
                        "as customer.email"
                    )
                if action not in choices:
                    raise ConfigError(
                        f"{where}: expected one of {', '.join(choices)}, got {action!r}"
                    )

    def hashing_rule(self, section: str) -> str:
        """The first rule that hashes, as a setting name, or ""."""
        for part in REDACTION_SECTIONS:
            for name, action in getattr(self, part).items():
                if action == RedactAction.HASH:
                    return f"{section}.{part}.{name}"
        return ""


# 1024 records: a checkpoint (one signature, about 0.1 ms) per segment is
# noise beside the commits, and a segment stays small to ship and prove.
DEFAULT_SEGMENT_RECORDS = 1024
# 60 s: a quiet daemon still states its log at least once a minute, so a
# truncated tail loses at most a minute of unwitnessed records.
DEFAULT_SEGMENT_SECONDS = 60.0


def _inside(path: str, parent: str) -> bool:
    child, base = pathlib.Path(path).resolve(), pathlib.Path(parent).resolve()
    return child == base or base in child.parents


class AuditConfig(_FileSection):
    """The tamper-evident decision log."""

    # LMDB environment directory, e.g. "var/audit".
    path: str = "var/audit"
    # LMDB map size in bytes, e.g. 1073741824 (1 GiB); the log fails closed
    # with audit_unavailable when full.
    map_size: int = DEFAULT_MAP_SIZE
    # "durable" (answer after sync) or "deferred" (answer after commit,
    # sync within deferred_window_ms).
    durability: Durability = Durability.DURABLE
    # Deferred mode's bound on unsynced answers, in milliseconds, e.g. 50.
    deferred_window_ms: int = 50
    # Most records committed in one transaction, e.g. 256.
    max_batch: int = DEFAULT_MAX_BATCH
    # The daemon's Ed25519 audit signing key (PKCS#8 PEM, mode 0600), made
    # by `kynara-sidecar keygen`, e.g. "/run/secrets/kynara-audit-key.pem".
    signing_key: str = ""
    # Generate signing_key (and its .pub beside it) when the file does not
    # exist: for development; in production the key comes from a secret.
    create_signing_key: bool = False
    # The key this log was signed with before signing_key, when rotating:
    # the daemon appends a key_rotation record signed by it at start.
    previous_signing_key: str = ""
    # Public key files (PEM or base64url) that `verify` trusts besides the
    # public halves of signing_key and previous_signing_key.
    trusted_keys: list[str] = []
    # Directory outside audit.path (another volume) where every checkpoint
    # and the head signed at each stop are also written, e.g.
    # "/var/lib/kynara-witness"; empty means no witness, and a truncated
    # tail cannot be told from a short log.
    witness_path: str = ""
    # A segment is sealed (a signed checkpoint) after this many records...
    segment_records: int = DEFAULT_SEGMENT_RECORDS
    # ... or once its first record is this many seconds old, e.g. 60.
    segment_seconds: float = DEFAULT_SEGMENT_SECONDS
    # Sealed segments older than this many days are pruned (records only;
    # the checkpoints and Merkle nodes stay); 0 keeps everything. With a
    # central store only acknowledged segments are pruned. EU AI Act
    # Article 19 asks for at least six months (183 days).
    retention_days: int = 0
    # Context and resource attributes hashed or dropped before they reach a
    # record, e.g. {context: {card_number: hash, customer.email: drop},
    # resource_attributes: {owner_email: drop}}; the record lists them.
    redact: RedactConfig = msgspec.field(default_factory=RedactConfig)
    # File holding the secret that keys the hashes of `redact` (at least 32
    # bytes, surrounding whitespace removed), e.g. "/run/secrets/redaction";
    # required when a rule hashes; read at start.
    redaction_key: str = ""

    # Key -> (lowest, highest) accepted.
    _RANGES = {
        "deferred_window_ms": (1, 10_000),
        "max_batch": (1, 65_536),
        "segment_records": (1, 1_000_000),
        "segment_seconds": (0.01, 86_400),
        "retention_days": (0, 36_500),
    }

    def validate(self, section: str, *, files: bool = True) -> None:
        if self.map_size < MIN_MAP_SIZE:
            raise ConfigError(
                f"{section}.map_size: expected at least {MIN_MAP_SIZE} bytes, "
                f"got {self.map_size}"
            )
        for key, (low, high) in self._RANGES.items():
            value = getattr(self, key)
            if not low <= value <= high:
                raise ConfigError(
                    f"{section}.{key}: expected {low}..{high}, got {value}"
                )
        if self.witness_path and _inside(self.witness_path, self.path):
            raise ConfigError(
                f"{section}.witness_path: expected a directory outside "
                f"{section}.path ({self.path}), got {self.witness_path!r}: a log "
                "cannot witness its own tail"
            )
        if files:
            self.load_redactor(section)
        else:
            self._hashing_key_named(section)

    def load_redactor(self, section: str = "audit") -> Redactor:
        """Read the redaction key (when a rule hashes) and build the rules.

        Returns:
            The redactor the pipeline applies to each decision record.

        Raises:
            ConfigError: a bad rule, or a hashing rule without a readable key
                of at least ``MIN_REDACTION_KEY_BYTES``.
        """
        rules = {part: getattr(self.redact, part) for part in REDACTION_SECTIONS}
        if not self._hashing_key_named(section):
            return Redactor(rules)
        where = f"{section}.redaction_key"
        try:
            key = pathlib.Path(self.redaction_key).read_bytes().strip()
        except (OSError, ValueError) as err:
            raise ConfigError(f"{where}: cannot read the key: {err}") from None
        if len(key) < MIN_REDACTION_KEY_BYTES:
            raise ConfigError(
                f"{where}: expected at least {MIN_REDACTION_KEY_BYTES} bytes in "
                f"{self.redaction_key}, got {len(key)}"
            )
        return Redactor(rules, key)

    def _hashing_key_named(self, section: str) -> bool:
        """Check the redaction rules, reading no key: whether a rule hashes
        (then ``redaction_key`` must name the key file).

        Raises:
            ConfigError: a bad rule, or a hashing rule without a key file.
        """
        self.redact.validate(f"{section}.redact")
        hashing = self.redact.hashing_rule(f"{section}.redact")
        if hashing and not self.redaction_key:
            raise ConfigError(
                f"{section}.redaction_key: expected a key file when {hashing} "
                "is 'hash', got none"
            )
        return bool(hashing)


class ReviewerIssuerConfig(IssuerConfig):
    """An issuer of reviewers' JWTs (the company's identity provider, say).

    A token from it signs a reviewer in: ``sub`` is the reviewer's
    principal id and the claim ``roles_claim`` (a list of strings) their
    reviewer roles; the token must name ``reviewer`` among them. Its
    audience must differ from every delegation-token issuer's, so that no
    agent's delegation token can ever pass as a reviewer's.
    """

    # The claim holding the reviewer's roles, e.g. "roles" or "groups".
    roles_claim: str = "roles"


class RiskAmountConfig(_Section):
    """The amount factor: how far an amount is past the thresholds."""

    # The resource attribute (else the context entry) holding the amount,
    # e.g. "amount"; a request without one scores 0 here.
    attribute: str = "amount"
    # [threshold, fraction] pairs, thresholds ascending: an amount past a
    # threshold scores that fraction of the weight (the highest passed),
    # e.g. [[50000, 0.5], [200000, 1.0]].
    thresholds: list[tuple[float, float]] = []

    def validate(self, section: str) -> None:
        last = None
        for i, (threshold, fraction) in enumerate(self.thresholds):
            if not 0 <= fraction <= 1:
                raise ConfigError(
                    f"{section}.thresholds[{i}]: expected a fraction in 0..1, "
                    f"got {fraction}"
                )
            if last is not None and threshold <= last:
                raise ConfigError(
                    f"{section}.thresholds[{i}]: expected thresholds ascending, "
                    f"got {threshold} after {last}"
                )
            last = threshold


class RiskSensitivityConfig(_Section):
    """The sensitivity factor: the resource's sensitivity level."""

    # The resource attribute (else the context entry) naming the level,
    # e.g. "sensitivity".
    attribute: str = "sensitivity"
    # Level -> fraction of the weight, e.g. {internal: 0.3, restricted: 1.0};
    # an unnamed level scores 0.
    levels: dict[str, float] = {}

    def validate(self, section: str) -> None:
        for level, fraction in self.levels.items():
            if not 0 <= fraction <= 1:
                raise ConfigError(
                    f"{section}.levels.{level}: expected a fraction in 0..1, "
                    f"got {fraction}"
                )


class RiskOffHoursConfig(_Section):
    """The off-hours factor: the full weight outside working hours."""

    # IANA zone of the working hours, e.g. "Europe/Berlin".
    time_zone: str = "UTC"
    # Working hours [start_hour, end_hour) on weekdays (ISO: Monday 1).
    start_hour: int = 9
    end_hour: int = 17
    weekdays: list[int] = msgspec.field(default_factory=lambda: [1, 2, 3, 4, 5])

    def validate(self, section: str) -> None:
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(self.time_zone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ConfigError(
                f"{section}.time_zone: expected an IANA zone such as "
                f"Europe/Berlin, got {self.time_zone!r}"
            ) from None
        if not 0 <= self.start_hour < self.end_hour <= 24:
            raise ConfigError(
                f"{section}: expected 0 <= start_hour < end_hour <= 24, got "
                f"{self.start_hour}..{self.end_hour}"
            )
        if any(day not in range(1, 8) for day in self.weekdays):
            raise ConfigError(
                f"{section}.weekdays: expected ISO weekdays 1..7, got {self.weekdays}"
            )


RISK_FACTORS = (
    "rule",
    "amount",
    "sensitivity",
    "off_hours",
    "delegation_depth",
    "unusual_action",
)


class RiskConfig(_Section):
    """The risk score of an approval: named factors, each worth up to its
    weight in points (``points = weight * fraction``), summed, rounded half
    up and capped at 100."""

    # Factor -> weight in points. rule: the asking rules' highest
    # approval.risk (0..100) as a fraction; amount, sensitivity, off_hours:
    # below; delegation_depth: hops past the first agent, full at
    # full_delegation_depth; unusual_action: the agent did not do this
    # action in its last unusual_window decisions.
    weights: dict[str, float] = msgspec.field(
        default_factory=lambda: {
            "rule": 40.0,
            "amount": 25.0,
            "sensitivity": 15.0,
            "off_hours": 5.0,
            "delegation_depth": 5.0,
            "unusual_action": 10.0,
        }
    )
    amount: RiskAmountConfig = msgspec.field(default_factory=RiskAmountConfig)
    sensitivity: RiskSensitivityConfig = msgspec.field(
        default_factory=RiskSensitivityConfig
    )
    off_hours: RiskOffHoursConfig = msgspec.field(default_factory=RiskOffHoursConfig)
    # Chain length (user included) at which delegation_depth is full, e.g. 4
    # (user -> orchestrator -> two sub-agents); a user and one agent score 0.
    full_delegation_depth: int = 4
    # How many of the agent's latest decisions count as its usual actions.
    unusual_window: int = 500

    def validate(self, section: str) -> None:
        for name, weight in self.weights.items():
            if name not in RISK_FACTORS:
                raise ConfigError(
                    f"{section}.weights.{name}: expected one of "
                    f"{', '.join(RISK_FACTORS)}"
                )
            if not 0 <= weight <= 100:
                raise ConfigError(
                    f"{section}.weights.{name}: expected 0..100 points, got {weight}"
                )
        for name in ("amount", "sensitivity", "off_hours"):
            getattr(self, name).validate(f"{section}.{name}")
        if self.full_delegation_depth < 3:
            raise ConfigError(
                f"{section}.full_delegation_depth: expected at least 3, "
                f"got {self.full_delegation_depth}"
            )
        if not 1 <= self.unusual_window <= 100_000:
            raise ConfigError(
                f"{section}.unusual_window: expected 1..100000, "
                f"got {self.unusual_window}"
            )


class WebhookConfig(_FileSection):
    """Where a compact JSON summary of each new approval is posted."""

    # e.g. "https://chat.example.com/hooks/kynara"; empty posts nothing.
    url: str = ""
    # Per attempt, in seconds.
    timeout_seconds: float = 5.0
    # Attempts per approval, with backoff between them; then it is dropped
    # (and counted): the approval itself never depends on the webhook.
    attempts: int = 5
    # Optional file holding a secret (at least 16 bytes): each post then
    # carries `kynara-signature: sha256=<hex HMAC of the body>`.
    secret_file: str = ""

    def validate(self, section: str, *, files: bool = True) -> None:
        if self.url and not self.url.startswith(("http://", "https://")):
            raise ConfigError(
                f"{section}.url: expected an http:// or https:// URL, got {self.url!r}"
            )
        if not 0 < self.timeout_seconds <= 60:
            raise ConfigError(
                f"{section}.timeout_seconds: expected 0 < seconds <= 60, "
                f"got {self.timeout_seconds}"
            )
        if not 1 <= self.attempts <= 20:
            raise ConfigError(
                f"{section}.attempts: expected 1..20, got {self.attempts}"
            )
        if self.secret_file and files:
            read_secret(f"{section}.secret_file", self.secret_file)


class ApprovalsConfig(_FileSection):
    """Human approval of require_approval decisions."""

    # How long an approval stays open when its rule names no
    # approval.expires_in_seconds, e.g. 3600.
    default_expiry_seconds: int = 3600
    # No rule may keep one open longer, e.g. 604800 (a week).
    max_expiry_seconds: int = 7 * 86_400
    # Top-level context entries that may differ between the request that
    # asked and the retry that uses the approval (left out of the binding
    # digest), e.g. [trace_id, attempt].
    volatile_context: list[str] = []
    # An agent with this many approvals pending gets approval_rate_limited
    # (a deny) instead of a new one.
    max_pending_per_agent: int = 100
    # ... and so does one that asked for more than this many in a minute.
    max_new_per_agent_per_minute: int = 30
    # The inbox reviewers use, as a base URL: the approval's page is
    # <inbox_url>/approvals/<id>. Empty: this daemon's own HTTP listener.
    # With a central store and the collector's fleet inbox, its URL, e.g.
    # "https://kynara.example.com".
    inbox_url: str = ""
    # Public key files (PEM or raw base64url) of the fleet inboxes whose
    # signed reviews this daemon takes from the central store (the
    # collector's inbox.signing_key), e.g. ["/etc/kynara/keys/inbox.pub"].
    # Empty: reviews in the store are refused, whoever wrote them.
    inbox_keys: list[str] = []
    # JWT issuers whose tokens sign reviewers in (besides admin
    # credentials with the reviewer role).
    reviewer_issuers: list[ReviewerIssuerConfig] = []
    # How long a review page session lasts after sign-in, in seconds.
    session_seconds: int = 8 * 3600
    risk: RiskConfig = msgspec.field(default_factory=RiskConfig)
    webhook: WebhookConfig = msgspec.field(default_factory=WebhookConfig)

    def validate(self, section: str, *, files: bool = True) -> None:
        if not 60 <= self.max_expiry_seconds <= 90 * 86_400:
            raise ConfigError(
                f"{section}.max_expiry_seconds: expected 60..7776000, "
                f"got {self.max_expiry_seconds}"
            )
        if not 1 <= self.default_expiry_seconds <= self.max_expiry_seconds:
            raise ConfigError(
                f"{section}.default_expiry_seconds: expected 1.."
                f"{self.max_expiry_seconds} (max_expiry_seconds), "
                f"got {self.default_expiry_seconds}"
            )
        for key in ("max_pending_per_agent", "max_new_per_agent_per_minute"):
            if not 1 <= getattr(self, key) <= 100_000:
                raise ConfigError(
                    f"{section}.{key}: expected 1..100000, got {getattr(self, key)}"
                )
        if self.inbox_url and not self.inbox_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"{section}.inbox_url: expected an http:// or https:// URL, "
                f"got {self.inbox_url!r}"
            )
        if not 60 <= self.session_seconds <= 7 * 86_400:
            raise ConfigError(
                f"{section}.session_seconds: expected 60..604800, "
                f"got {self.session_seconds}"
            )
        for i, issuer in enumerate(self.reviewer_issuers):
            where = f"{section}.reviewer_issuers[{i}]"
            if files:
                issuer.load(where)
            else:
                issuer.validate(where)
            if not issuer.roles_claim:
                raise ConfigError(
                    f"{section}.reviewer_issuers[{i}].roles_claim: expected a "
                    "claim name, got none"
                )
        self.risk.validate(f"{section}.risk")
        self.webhook.validate(f"{section}.webhook", files=files)
        if files:
            self.load_inbox_keys(section)

    def load_inbox_keys(self, section: str = "approvals") -> dict[str, PublicKey]:
        """The fleet inboxes' review keys by key id (``inbox_keys``).

        Raises:
            ConfigError: a file cannot be loaded; names it.
        """
        try:
            return load_trusted_keys(self.inbox_keys)
        except ConfigError as err:
            raise ConfigError(f"{section}.inbox_keys: {err}") from None

    def check_apart(self, identity: IdentityConfig) -> None:
        """Refuse a reviewer issuer whose tokens a delegation token could
        pass for: same issuer and audience as a delegation-token issuer."""
        delegation = {(i.issuer, i.audience) for i in identity.issuers}
        for i, issuer in enumerate(self.reviewer_issuers):
            if (issuer.issuer, issuer.audience) in delegation:
                raise ConfigError(
                    f"approvals.reviewer_issuers[{i}].audience: expected an "
                    "audience apart from identity.issuers' for the same issuer, "
                    f"got {issuer.audience!r}: an agent's delegation token must "
                    "never sign a reviewer in"
                )


class UpstreamTransport(enum.StrEnum):
    """How the gateway reaches an upstream MCP server."""

    STDIO = "stdio"
    HTTP = "http"


class UpstreamConfig(_Section):
    """One upstream MCP server behind the gateway."""

    # "stdio" starts `command` and speaks MCP on its stdin/stdout; "http"
    # speaks Streamable HTTP to `url`.
    transport: UpstreamTransport = UpstreamTransport.STDIO
    # stdio: the program and its arguments, e.g. ["python", "-m", "files_mcp"].
    command: list[str] = []
    # stdio: extra environment for the program. It inherits only HOME,
    # LOGNAME, PATH, SHELL, TERM and USER (the MCP SDK's default set) and the
    # locale's (LANG, LANGUAGE, LC_ALL, LC_CTYPE, LC_MESSAGES); these entries
    # are added over them, e.g. {FILES_ROOT: /srv/files}.
    env: dict[str, str] = {}
    # stdio: its working directory; empty for the daemon's.
    cwd: str = ""
    # http: the server's MCP endpoint, e.g. "http://127.0.0.1:9000/mcp".
    url: str = ""
    # http: headers sent on every request, e.g. {authorization: "Bearer ..."}.
    headers: dict[str, str] = {}
    # Upstream tool name -> the action its calls are decided as, e.g.
    # {refund: payments.refund.issue}; tools not named here are
    # mcp.<server>.<tool> (names escaped, see gateway/names.py).
    actions: dict[str, str] = {}
    # Per upstream request (connect, tools/list, tools/call), in seconds.
    timeout_seconds: float = 30.0

    def validate(self, section: str) -> None:
        if self.transport is UpstreamTransport.STDIO:
            if not self.command or not self.command[0]:
                raise ConfigError(
                    f"{section}.command: expected the program to start for a "
                    "stdio upstream, got none"
                )
            if self.url:
                raise ConfigError(
                    f"{section}.url: expected none for transport 'stdio', "
                    f"got {self.url!r}"
                )
        else:
            if not self.url.startswith(("http://", "https://")):
                raise ConfigError(
                    f"{section}.url: expected an http:// or https:// URL for "
                    f"transport 'http', got {self.url!r}"
                )
            if self.command:
                raise ConfigError(
                    f"{section}.command: expected none for transport 'http', "
                    f"got {self.command!r}"
                )
        for tool, action in self.actions.items():
            try:
                check_dotted_name(action)
            except ValueError as err:
                raise ConfigError(f"{section}.actions.{tool}: {err}") from None
        if not 0 < self.timeout_seconds <= 600:
            raise ConfigError(
                f"{section}.timeout_seconds: expected 0 < seconds <= 600, "
                f"got {self.timeout_seconds}"
            )


class ApprovalWait(enum.StrEnum):
    """What the gateway does with a tool call that requires approval."""

    # Answer at once with a tool error carrying the approval URL.
    RETURN = "return"
    # When the client supports URL elicitation: show it the approval URL,
    # wait for the review, then forward the call if it was approved;
    # otherwise as "return".
    ELICIT = "elicit"


class GatewayStdioConfig(_Section):
    """The gateway over stdio (`kynara-sidecar gateway`): one agent."""

    # The agent served; empty for identity.agent_id. In multi-agent mode it
    # must be one of identity.agents, whose secret the gateway presents.
    agent_id: str = ""
    # Where the user's delegation token is read: this environment variable
    # when it is set and not blank, else `token_file`, e.g.
    # /run/agent/token. The environment is the one the gateway was started
    # with, so a token given there lasts for the process's life and hides
    # the file; the file is read again on every request, so a token
    # rewritten there is used from the next request on. identity.mode
    # development reads the asserted chain (comma-separated, user first)
    # from `asserted_chain_env` instead.
    token_env: str = "KYNARA_DELEGATION_TOKEN"
    token_file: str = ""
    asserted_chain_env: str = "KYNARA_ASSERTED_CHAIN"


class GatewayConfig(_Section):
    """The MCP gateway: agents reach their tools through the daemon, which
    shows each agent only the tools it may use and authorizes every call."""

    # Streamable HTTP for agents: loopback host and port, e.g. 8765;
    # 0 picks a free port; -1 disables it.
    host: str = "127.0.0.1"
    port: int = -1
    # The MCP endpoint's path.
    path: str = "/mcp"
    # Header carrying the user's delegation token over HTTP (verified mode);
    # in development mode `asserted_chain_header` carries the chain
    # (comma-separated, user first). The agent's own credential is the
    # `authorization: Bearer <secret>` header in multi-agent mode.
    token_header: str = "kynara-delegation-token"
    asserted_chain_header: str = "kynara-asserted-chain"
    # Largest JSON-RPC message accepted from an agent, in bytes; larger ones
    # are refused with an error naming the limit.
    max_message_bytes: int = 1024 * 1024
    # Tools per tools/list page.
    page_size: int = 100
    # Seconds an HTTP client has to send a request's headers once it
    # connected (or finished its previous request), e.g. 10; a connection
    # still without a whole header block then is closed, trickled bytes or
    # not.
    header_timeout_seconds: float = 10.0
    # Seconds an HTTP client has to send a request's whole body once its
    # headers arrived, e.g. 30; later it is answered 408 and disconnected.
    body_timeout_seconds: float = 30.0
    # Seconds an idle HTTP keep-alive connection stays open between
    # requests, e.g. 5.
    keep_alive_seconds: float = 5.0
    # Open HTTP connections at most (SSE streams included), e.g. 1000;
    # connections beyond it are closed as soon as they are accepted.
    max_connections: int = 1000
    # Open MCP sessions (2025-11-25 handshake protocol) per agent, e.g. 100;
    # a new one past it is refused with 429 and a JSON-RPC error naming
    # this key, while other agents still open theirs.
    max_sessions_per_agent: int = 100
    # Seconds a session may go without any request in flight before it is
    # closed, e.g. 1800; the agent then opens a new one.
    session_idle_seconds: float = 1800.0
    # require_approval: "return" the approval URL as a tool error, or
    # "elicit" (wait while the client shows the URL, when it can).
    approval_wait: ApprovalWait = ApprovalWait.RETURN
    # How long an "elicit" wait lasts, in seconds, before the call is
    # answered with the approval URL after all.
    approval_wait_seconds: float = 300.0
    stdio: GatewayStdioConfig = msgspec.field(default_factory=GatewayStdioConfig)
    # Upstream servers by name, e.g. {files: {transport: stdio, command: [...]}}.
    # The name is the <server> of actions, resource ids and tool names.
    servers: dict[str, UpstreamConfig] = {}

    def validate(self, section: str) -> None:
        if self.port != -1:
            _check_port(section, "port", self.port)
            if not is_loopback(self.host):
                raise ConfigError(
                    f"{section}.host: expected a loopback address (127.0.0.0/8 "
                    f"or ::1), got {self.host!r}; the gateway speaks plain HTTP, "
                    "and agents' secrets and delegation tokens must not leave "
                    "this machine"
                )
        if not self.path.startswith("/"):
            raise ConfigError(
                f"{section}.path: expected a path starting with '/', got {self.path!r}"
            )
        if not 1024 <= self.max_message_bytes <= 64 * 1024 * 1024:
            raise ConfigError(
                f"{section}.max_message_bytes: expected 1024..67108864, "
                f"got {self.max_message_bytes}"
            )
        if not 1 <= self.page_size <= 1000:
            raise ConfigError(
                f"{section}.page_size: expected 1..1000, got {self.page_size}"
            )
        if not 0 < self.approval_wait_seconds <= 86_400:
            raise ConfigError(
                f"{section}.approval_wait_seconds: expected 0 < seconds <= 86400, "
                f"got {self.approval_wait_seconds}"
            )
        for key, limit in (
            ("header_timeout_seconds", 3600),
            ("body_timeout_seconds", 3600),
            ("keep_alive_seconds", 3600),
            ("session_idle_seconds", 7 * 86_400),
        ):
            value = getattr(self, key)
            if not 0 < value <= limit:
                raise ConfigError(
                    f"{section}.{key}: expected 0 < seconds <= {limit}, got {value}"
                )
        for key, limit in (
            ("max_connections", 100_000),
            ("max_sessions_per_agent", 10_000),
        ):
            value = getattr(self, key)
            if not 1 <= value <= limit:
                raise ConfigError(f"{section}.{key}: expected 1..{limit}, got {value}")
        for name, server in self.servers.items():
            if not name or len(name) > 64:
                raise ConfigError(
                    f"{section}.servers: expected names of 1..64 characters, "
                    f"got {name!r}"
                )
            server.validate(f"{section}.servers.{name}")

    @property
    def enabled(self) -> bool:
        return bool(self.servers)


# A path template's `{name}`: letters, digits and "_", not starting with a
# digit; a resource id template's placeholders.
_TEMPLATE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
TEMPLATE_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


class PathTemplate(typing.NamedTuple):
    """An ``ext_authz.routes[].path`` template, parsed."""

    # Literal segments as strings, names as (name,) tuples.
    segments: tuple[str | tuple[str], ...]
    # The name of a last `{name...}`, else "".
    rest: str

    @property
    def names(self) -> frozenset[str]:
        """Every name the template gives a request's path."""
        named = {s[0] for s in self.segments if isinstance(s, tuple)}
        return frozenset(named | ({self.rest} - {""}))


def parse_path_template(path: str) -> PathTemplate:
    """Parse a route's path template, e.g. ``/v1/refunds/{refund_id}``.

    ``{name}`` fills one whole segment; a last ``{name...}`` takes the rest
    of the path. Pure, so that config validation and the ext_authz door
    read templates alike.

    Raises:
        ValueError: what is wrong, for the caller to prefix with the key.
    """
    if not path.startswith("/"):
        raise ValueError(f"expected a path template starting with '/', got {path!r}")
    segments: list[str | tuple[str]] = []
    rest = ""
    seen: set[str] = set()
    parts = path[1:].split("/")
    for i, part in enumerate(parts):
        if not (part.startswith("{") and part.endswith("}")):
            if "{" in part or "}" in part:
                raise ValueError(
                    f"expected '{{name}}' to fill a whole segment, got {part!r}"
                )
            if part in (".", ".."):
                # Requests with such segments are refused, so it could
                # never match.
                raise ValueError(f"expected no '.' or '..' segment, got {path!r}")
            segments.append(part)
            continue
        name = part[1:-1]
        is_rest = name.endswith("...")
        name = name.removesuffix("...")
        if is_rest and i != len(parts) - 1:
            raise ValueError(
                f"expected {part!r} only as the last segment, got it at segment {i + 1}"
            )
        if not _TEMPLATE_NAME.fullmatch(name):
            raise ValueError(
                f"expected a name of letters, digits and '_' in '{{...}}', got {part!r}"
            )
        if name in seen:
            raise ValueError(f"expected each name once, got {name!r} twice")
        seen.add(name)
        if is_rest:
            rest = name
        else:
            segments.append((name,))
    return PathTemplate(tuple(segments), rest)


class ExtAuthzRoute(_Section):
    """How one kind of HTTP request becomes a decision request."""

    # Matches when every given field matches: the methods (any when empty),
    # the host (exact, any when empty) and the path template, whose `{name}`
    # segments match one path segment and become resource attributes, and a
    # last `{name...}` matches the rest, e.g. "/v1/refunds/{refund_id}".
    methods: list[str] = []
    host: str = ""
    path: str = "/"
    # The decision request: action, resource kind, and the resource id as a
    # template over the path's names, e.g. "{refund_id}".
    action: str = ""
    resource_kind: str = ""
    resource_id: str = ""
    # MCP over HTTP: the body is a JSON-RPC message; tools/call is decided as
    # the gateway decides it (mcp.<server>.<tool>, kind mcp.tool), other
    # methods as mcp.<server>.<method>. Needs Envoy's with_request_body.
    mcp_server: str = ""
    # MCP over HTTP: upstream tool name -> action, as
    # gateway.servers.<name>.actions (which applies too, when mcp_server is
    # also a gateway server; these win), e.g. {refund: payments.refund.issue}.
    actions: dict[str, str] = {}

    def template(self, section: str) -> PathTemplate:
        """The parsed path template.

        Raises:
            ConfigError: naming ``<section>.path``.
        """
        try:
            return parse_path_template(self.path)
        except ValueError as err:
            raise ConfigError(f"{section}.path: {err}") from None

    def validate(self, section: str) -> None:
        names = self.template(section).names
        if self.mcp_server:
            if self.action or self.resource_kind:
                raise ConfigError(
                    f"{section}: expected either mcp_server or action and "
                    "resource_kind, got both"
                )
            if self.resource_id:
                raise ConfigError(
                    f"{section}.resource_id: expected none for an mcp_server route "
                    f"(the tool or method names the resource), got "
                    f"{self.resource_id!r}"
                )
        else:
            for key in ("action", "resource_kind"):
                try:
                    check_dotted_name(getattr(self, key))
                except ValueError as err:
                    raise ConfigError(f"{section}.{key}: {err}") from None
            if self.actions:
                raise ConfigError(
                    f"{section}.actions: expected tool -> action mappings only on "
                    "an mcp_server route, got them on a route without one"
                )
        for placeholder in TEMPLATE_PLACEHOLDER.findall(self.resource_id):
            if placeholder not in names:
                raise ConfigError(
                    f"{section}.resource_id: expected names of the path "
                    f"{sorted(names)}, got {{{placeholder}}}"
                )
        for tool, action in self.actions.items():
            try:
                check_dotted_name(action)
            except ValueError as err:
                raise ConfigError(f"{section}.actions.{tool}: {err}") from None


class ExtAuthzConfig(_Section):
    """Envoy's ext_authz (envoy.service.auth.v3.Authorization/Check): Envoy
    asks before it forwards an HTTP request.

    Served on a listener of its own, never the agent's: the CheckRequest
    names the peer (its mTLS principal), which policies trust as the
    daemon's own knowledge, so only Envoy may reach it.
    """

    enabled: bool = False
    # Unix socket for Envoy in the same pod (a shared volume), e.g.
    # "/run/kynara/ext_authz.sock"; empty disables it.
    socket: str = ""
    # Permission bits of the socket in octal, e.g. 0600 (the owner only);
    # 0660 lets an Envoy sharing the pod's group (fsGroup) connect.
    socket_mode: int = DEFAULT_EXT_AUTHZ_SOCKET_MODE
    # Loopback TCP host and port for Envoy, e.g. 127.0.0.1 and 50155;
    # 0 picks a free port; -1 disables it.
    host: str = "127.0.0.1"
    port: int = -1
    # Header carrying the user's delegation token (verified mode).
    token_header: str = "kynara-delegation-token"
    # Header carrying the asserted chain (development mode, comma-separated,
    # user first).
    asserted_chain_header: str = "kynara-asserted-chain"
    # Multi-agent mode: the header carrying the agent's
    # `Bearer <secret>`; Envoy must strip it from what it forwards.
    credential_header: str = "kynara-agent-authorization"
    # Header naming an approved approval to use (the retry after a
    # require_approval answer), e.g. "kynara-approval-id: apr_...".
    approval_header: str = "kynara-approval-id"
    # Request headers (lower case) copied into context.http.headers.
    context_headers: list[str] = []
    # First match wins; a request no route matches is decided as action
    # http.request on resource kind http.route, id "<host><path>" (so
    # policies deny it unless they allow that).
    routes: list[ExtAuthzRoute] = []
    # Largest CheckRequest accepted, in bytes: the request's headers plus
    # its body. Must exceed Envoy's with_request_body.max_request_bytes plus
    # the headers Envoy sends, else a body Envoy passes on gets 413; the
    # default leaves 64 KiB of headers above a 1 MiB body.
    max_message_bytes: int = 1024 * 1024 + 64 * 1024

    def validate(self, section: str) -> None:
        for i, route in enumerate(self.routes):
            route.validate(f"{section}.routes[{i}]")
        if not 1024 <= self.max_message_bytes <= 64 * 1024 * 1024:
            raise ConfigError(
                f"{section}.max_message_bytes: expected 1024..67108864 (a "
                "CheckRequest: headers plus body), "
                f"got {self.max_message_bytes}"
            )
        if self.port != -1:
            _check_port(section, "port", self.port)
            _check_loopback(section, "host", self.host)
        _check_socket_path(section, self.socket)
        if not 0 <= self.socket_mode <= 0o777:
            raise ConfigError(
                f"{section}.socket_mode: expected permission bits 0..0o777, "
                f"got {self.socket_mode:#o}"
            )
        if self.enabled and not self.socket and self.port == -1:
            raise ConfigError(
                f"{section}: expected a socket or a port for Envoy to reach "
                "(a listener of its own, not the agent's), got neither"
            )

    def check_apart(
        self, agent: AgentListenerConfig, admin: AdminListenerConfig
    ) -> None:
        """Refuse an ext_authz socket or port shared with the agent or admin
        listener: agents must not reach Check, nor Envoy the admin calls.

        Raises:
            ConfigError: naming the setting that collides.
        """
        if not self.enabled:
            return
        for setting, other in (("agent", agent), ("admin", admin)):
            if self.socket and other.socket:
                if os.path.abspath(self.socket) == os.path.abspath(other.socket):
                    raise ConfigError(
                        f"ext_authz.socket: expected a socket apart from "
                        f"{setting}.socket, got the same path {self.socket!r}"
                    )
            if self.port > 0 and self.port == other.port:
                raise ConfigError(
                    f"ext_authz.port: expected a port apart from {setting}.port, "
                    f"got {self.port}"
                )
        if self.socket and agent.fast_socket:
            if os.path.abspath(self.socket) == os.path.abspath(agent.fast_socket):
                raise ConfigError(
                    "ext_authz.socket: expected a socket apart from "
                    f"agent.fast_socket, got the same path {self.socket!r}"
                )


class EnvConfig(_Section):
    """What the daemon knows about where it runs; policies see it as `env`."""

    # Deployment environment, e.g. "production".
    environment: str = ""
    # Region, e.g. "eu-central-1".
    region: str = ""
    # Free-form labels, e.g. {team: payments}.
    labels: dict[str, str] = {}


class LogLevel(enum.StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class LogFormat(enum.StrEnum):
    # One JSON object a line.
    JSON = "json"
    # `time level logger msg key=value ...`, the same fields as JSON.
    TEXT = "text"


class LogConfig(_Section):
    """The daemon's own log lines, on stderr; both keys apply on SIGHUP.
    The CLI's --log-level and --log-format override them."""

    # Lowest level written: debug, info, warning or error.
    level: LogLevel = LogLevel.INFO
    # json (one object a line) or text.
    format: LogFormat = LogFormat.JSON


class PlaygroundConfig(_Section):
    """Limits of one playground what-if run. Each run compiles and decides
    in a process of its own, so an edited policy that builds a huge value
    costs that process, never the daemon's memory or the live decisions'
    time; past a limit the run is refused (422) naming the setting."""

    # Address space of a run's process in MiB (RLIMIT_AS), e.g. 1024.
    memory_mib: int = 1024
    # CPU seconds a run's process may use (RLIMIT_CPU), e.g. 10.
    cpu_seconds: int = 10
    # Wall-clock seconds after which a run's process is killed, e.g. 15.
    deadline_seconds: float = 15.0

    def validate(self, section: str) -> None:
        # The floor leaves room for the interpreter and the engine's modules.
        if not 256 <= self.memory_mib <= 65536:
            raise ConfigError(
                f"{section}.memory_mib: expected 256..65536 MiB, got {self.memory_mib}"
            )
        if not 1 <= self.cpu_seconds <= 600:
            raise ConfigError(
                f"{section}.cpu_seconds: expected 1..600 seconds, "
                f"got {self.cpu_seconds}"
            )
        if not 0 < self.deadline_seconds <= 600:
            raise ConfigError(
                f"{section}.deadline_seconds: expected 0 < seconds <= 600, "
                f"got {self.deadline_seconds}"
            )


# How long a fleet limit keeps its value without word from the central
# store: the default rides out a store restart or a reconnect of the watch;
# under a second an ordinary pause would fail fleet limits closed, and past
# an hour the other daemons' counts say little about the window.
DEFAULT_FLEET_MAX_STALENESS_SECONDS = 30.0
MIN_FLEET_MAX_STALENESS_SECONDS = 1.0
MAX_FLEET_MAX_STALENESS_SECONDS = 3600.0
# How long new counts wait to be published: the default gathers the counts
# of many decisions into one write while the other daemons see them within
# a fraction of a second; past a minute they would decide on counts that
# old.
DEFAULT_FLEET_PUBLISH_INTERVAL_SECONDS = 0.2
MAX_FLEET_PUBLISH_INTERVAL_SECONDS = 60.0


class LimitsConfig(_Section):
    """How fleet-scope limits (``scope: fleet`` in a policy's ``limits``)
    share counts through the central store (``sync.store``)."""

    # A fleet limit has no value (its conditions fail closed) once the
    # central store has not been heard from for this long, e.g. 30.
    fleet_max_staleness_seconds: float = DEFAULT_FLEET_MAX_STALENESS_SECONDS
    # The longest this daemon's new counts wait before they are published
    # for the other daemons, in seconds, e.g. 0.2.
    fleet_publish_interval_seconds: float = DEFAULT_FLEET_PUBLISH_INTERVAL_SECONDS

    def validate(self, section: str) -> None:
        low, high = MIN_FLEET_MAX_STALENESS_SECONDS, MAX_FLEET_MAX_STALENESS_SECONDS
        if not low <= self.fleet_max_staleness_seconds <= high:
            raise ConfigError(
                f"{section}.fleet_max_staleness_seconds: expected {low:g}..{high:g} "
                f"seconds, got {self.fleet_max_staleness_seconds}"
            )
        high = MAX_FLEET_PUBLISH_INTERVAL_SECONDS
        if not 0 < self.fleet_publish_interval_seconds <= high:
            raise ConfigError(
                f"{section}.fleet_publish_interval_seconds: expected 0 < seconds "
                f"<= {high:g}, got {self.fleet_publish_interval_seconds}"
            )


class Config(_Section):
    """The whole daemon configuration."""

    agent: AgentListenerConfig = msgspec.field(default_factory=AgentListenerConfig)
    http: HttpListenerConfig = msgspec.field(default_factory=HttpListenerConfig)
    health: HealthListenerConfig = msgspec.field(default_factory=HealthListenerConfig)
    admin: AdminListenerConfig = msgspec.field(default_factory=AdminListenerConfig)
    identity: IdentityConfig = msgspec.field(default_factory=IdentityConfig)
    policy: PolicyConfig = msgspec.field(default_factory=PolicyConfig)
    directory: DirectoryConfig = msgspec.field(default_factory=DirectoryConfig)
    audit: AuditConfig = msgspec.field(default_factory=AuditConfig)
    sync: SyncConfig = msgspec.field(default_factory=SyncConfig)
    approvals: ApprovalsConfig = msgspec.field(default_factory=ApprovalsConfig)
    env: EnvConfig = msgspec.field(default_factory=EnvConfig)
    gateway: GatewayConfig = msgspec.field(default_factory=GatewayConfig)
    ext_authz: ExtAuthzConfig = msgspec.field(default_factory=ExtAuthzConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    playground: PlaygroundConfig = msgspec.field(default_factory=PlaygroundConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    # Drain period on SIGTERM, in seconds, e.g. 10.
    shutdown_grace_seconds: float = 10.0

    @property
    def store(self) -> str:
        """The central store's URL: sync.store, else policy.source when
        that is a store; '' for none."""
        return self.sync.store or self.policy.store

    def validate(self, section: str = "", *, files: bool = True) -> None:
        """Check every section; with ``files``, also read and check the
        files they name (see ``_FileSection``)."""
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if isinstance(value, _FileSection):
                value.validate(name, files=files)
            elif isinstance(value, _Section):
                value.validate(name)
        self._check_store_connection()
        self.admin.check_apart(self.agent, self.identity, files=files)
        self.ext_authz.check_apart(self.agent, self.admin)
        self.approvals.check_apart(self.identity)
        self._check_stdio_agent()
        self._check_agent_certificates()
        if not 0 < self.shutdown_grace_seconds <= 600:
            raise ConfigError(
                "shutdown_grace_seconds: expected 0 < seconds <= 600, "
                f"got {self.shutdown_grace_seconds}"
            )

    def _check_store_connection(self) -> None:
        """sync.nats applies to the nats:// stores: sync.store,
        policy.source and directory.store, whichever are one."""
        stores = [
            ("sync.store", self.sync.store),
            ("policy.source", self.policy.store),
            ("directory.store", self.directory.store),
        ]
        named = [(key, url) for key, url in stores if url]
        for key, url in named or [("sync.store", "")]:
            self.sync.nats.check_store("sync.nats", url, key)

    def _check_agent_certificates(self) -> None:
        """An agent named by certificate needs the agent listener's TLS
        port to present it on."""
        certificates = self.identity.agent_certificates()
        if not certificates:
            return
        agent = next(iter(certificates.values()))
        if not self.agent.tls.enabled or self.agent.port == -1:
            raise ConfigError(
                f"identity.agents.{agent}: expected agent.tls (cert_file, key_file, "
                "client_ca_file) and agent.port for an agent with a client "
                "certificate, got "
                + ("agent.port -1" if self.agent.tls.enabled else "no agent.tls")
            )

    def _check_stdio_agent(self) -> None:
        """gateway.stdio.agent_id names an agent this daemon serves: one of
        identity.agents (multi-agent mode), else identity.agent_id."""
        agent = self.gateway.stdio.agent_id
        agents = self.identity.agents
        if not agent:
            return
        if agents and agent not in agents:
            raise ConfigError(
                f"gateway.stdio.agent_id: expected one of identity.agents "
                f"({', '.join(sorted(agents))}), got {agent!r}"
            )
        if agents and not isinstance(agents[agent], str):
            raise ConfigError(
                "gateway.stdio.agent_id: expected an agent with a bearer secret "
                "(the gateway presents it), got "
                f"{agent!r}, which has a client certificate"
            )
        if not agents and agent != self.identity.agent_id:
            raise ConfigError(
                "gateway.stdio.agent_id: expected identity.agent_id "
                f"({self.identity.agent_id!r}) or empty, got {agent!r}"
            )


def _choices_hint(error: msgspec.ValidationError) -> str:
    """Name the allowed values when the error is about an enum setting."""
    message = str(error)
    if not message.startswith("Invalid enum value") or "`$." not in message:
        return ""
    keys = message.rsplit("`$.", 1)[1].rstrip("`").split(".")
    node: Any = Config
    for key in keys:
        node = typing.get_type_hints(node).get(key)
        if node is None:
            return ""
    if not (isinstance(node, type) and issubclass(node, enum.Enum)):
        return ""
    return "; expected one of: " + ", ".join(str(m.value) for m in node)


def _parse_yaml(text: str) -> Any:
    """``text`` as YAML, refusing a key given twice in one mapping: YAML
    would keep the last silently, so an edit meant for one setting could be
    undone by a forgotten line below. Keys brought in by a merge
    (``<<: *base``) may still be overridden. Policy files are read by the
    same loader (``kynara_sidecar._unique_keys``)."""
    return load_yaml(text)


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {override!r}: expected section.key=value")
    try:
        value = _parse_yaml(text) if text else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key}: value is not valid YAML: {err}") from err
    except RecursionError:
        raise ConfigError(f"--set {key}: value is nested too deeply") from None
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
        node = child
    node[leaf] = value


def read_raw_config(
    path: str | os.PathLike[str] | None, overrides: Iterable[str] = ()
) -> dict[str, Any]:
    """A YAML config file as plain data, with ``section.key=value``
    overrides applied in order (values parsed as YAML); ``{}`` for no path.

    Raises:
        ConfigError: the file cannot be read or parsed, or an override is
            malformed; the message names the file or the override.
    """
    raw: dict[str, Any] = {}
    if path:
        try:
            text = pathlib.Path(path).read_text(encoding="utf-8")
            raw = _parse_yaml(text) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            raise ConfigError(f"{path}: cannot read config: {err}") from err
        except RecursionError:
            raise ConfigError(f"{path}: config is nested too deeply") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at top level")
    for override in overrides:
        _apply_override(raw, override)
    return raw


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: list[str] = (),
    *,
    read_files: bool = True,
) -> Config:
    """Read, override and validate the configuration.

    Args:
        path: the YAML file; ``None`` uses ``$KYNARA_CONFIG`` or defaults only.
        overrides: ``section.key=value`` strings, applied in order.
        read_files: also read and check the secrets, keys and certificates
            the config names, as the daemon does at start; False checks
            the values only, for a client of the daemon (the CLI) and a
            reload, which use none of those files.

    Returns:
        The validated ``Config``.

    Raises:
        ConfigError: naming the file, key and what was expected.
    """
    path = path or os.environ.get(DEFAULT_CONFIG_ENV)
    raw = read_raw_config(path, overrides)
    try:
        config = msgspec.convert(raw, Config, strict=True)
    except msgspec.ValidationError as err:
        raise ConfigError(f"{path or 'config'}: {err}{_choices_hint(err)}") from None
    try:
        config.validate(files=read_files)
    except ConfigError as err:
        raise ConfigError(f"{path or 'config'}: {err}") from None
    return config
