"""A daemon with the MCP gateway in front of the test upstream, for the
gateway's tests.

- ``GatewaySetup(tmp_path)``: a policy directory (``tests/gateway/policies``
  copied, so a test may rewrite it), an issuer key and its JWKS, and
  multi-agent secrets for ``reader-bot``, ``writer-bot`` and ``ops-bot``.
  ``overrides(servers)`` gives the ``--set`` list of a verified-mode,
  multi-agent config with the gateway (HTTP on a free loopback port);
  ``token(user, agent)`` signs a delegation token; ``secret(agent)`` is an
  agent's bearer secret.
- ``start_gateway(setup, servers)``: a ``RunningDaemon`` (tests/support.py)
  with that config; its ``gateway_url`` is the agent-facing MCP endpoint.
- ``stdio_gateway_params(setup, servers, agent, token)``: the SDK's
  ``StdioServerParameters`` that start ``python -m kynara_sidecar.cli
  gateway`` as an agent's MCP server.
- ``audit_records(path)``: every record of an audit log, read beside (or
  after) the daemon that writes it.

Who sees what (tests/gateway/policies): alice is a reader (read; slow while
``seconds <= 60``, a conditional allow; add_tool; late; the ``--faulty``
upstream's tools), bob a writer (also write; slow is denied to writers,
unconditionally), carol a deployer (also deploy, which requires approval);
dave and ops-bot hold every tool of the server "files" (``mcp.files.*``).
A chain sees what all of its principals may use: carol through reader-bot
sees only what a reader who is also a writer may (``NARROWED``).

- ``GatewayDaemon.request_errors(code)``: the daemon's
  ``kynara_request_errors_total`` for ``code``, read from its /metrics.
- ``with_flags(upstream, *flags)``: an upstream config dict with more
  ``upstream_server.py`` flags (``--faulty``).
- ``list_all(client)``: every tool name an SDK client is listed, page after
  page.
- ``initialize_message(client)`` (``LEGACY_VERSION``): the handshake-era
  ``initialize`` request, for sessions driven by hand (raw HTTP, pipes).
- ``post_tools_list(daemon, headers)``: one raw ``tools/list`` POST to the
  gateway's endpoint with exactly these headers.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys
import time
import urllib.request
from typing import Any

import httpx2
from identity_support import SigningKey, claims, jwks
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from support import SHIPPED_CONFIG, RunningDaemon, SettableClock, daemon_config

from kynara_sidecar.audit.chain import decode_record
from kynara_sidecar.audit.record import AuditRecordV1
from kynara_sidecar.audit.store import AuditStore

POLICIES = pathlib.Path(__file__).resolve().parent / "policies"
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
ISSUER = "https://idp.gateway.test"
AUDIENCE = "kynara:gateway"
AGENTS = ("reader-bot", "writer-bot", "ops-bot")
TOKEN_HEADER = "kynara-delegation-token"
# What each user, through an agent of the same role, sees of the upstream's
# tools (the upstream's server is named "files").
VISIBLE = {
    "alice": ["files__add_tool", "files__read", "files__slow"],
    "bob": ["files__add_tool", "files__read", "files__write"],
    "carol": ["files__add_tool", "files__deploy", "files__read", "files__write"],
}
# carol (a deployer, so also a writer and a reader) through reader-bot (a
# reader): what both may use. Not write or deploy (reader-bot may not), not
# slow (denied to writers, so to carol).
NARROWED = ["files__add_tool", "files__read"]
# The handshake-era protocol version (initialize, sessions) that sessions
# driven by hand speak.
LEGACY_VERSION = "2025-11-25"


class GatewaySetup:
    """Keys, secrets and a policy directory in ``root``."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        self.policies = root / "policies"
        shutil.copytree(POLICIES, self.policies)
        self.key = SigningKey("EdDSA", "gateway-test")
        self.jwks_file = root / "idp-jwks.json"
        self.jwks_file.write_text(json.dumps(jwks(self.key)))
        self._secrets: dict[str, str] = {}
        self._logs: list[Any] = []
        secrets_dir = root / "secrets"
        secrets_dir.mkdir()
        for agent in AGENTS:
            secret = f"{agent}-secret-{os.urandom(16).hex()}"
            path = secrets_dir / agent
            path.write_text(secret)
            self._secrets[agent] = str(path)

    def log_file(self, name: str) -> Any:
        """A file in ``root`` for a process's stderr; closed by ``close``."""
        handle = open(self.root / name, "a")  # noqa: SIM115
        self._logs.append(handle)
        return handle

    def close(self) -> None:
        for handle in self._logs:
            handle.close()
        self._logs.clear()

    def secret(self, agent: str) -> str:
        return pathlib.Path(self._secrets[agent]).read_text()

    def token(self, user: str, agent: str, *, now: float | None = None) -> str:
        """A delegation token of ``user`` for ``agent``, valid around ``now``
        (the tests' fixed clock by default; real time for a daemon process)."""
        extra: dict[str, Any] = {}
        if now is not None:
            extra = {"exp": now + 600, "iat": now}
        return self.key.sign(claims(user, agent, iss=ISSUER, aud=AUDIENCE, **extra))

    def overrides(self, servers: dict[str, Any], *, http: bool = True) -> list[str]:
        issuer = {
            "issuer": ISSUER,
            "audience": AUDIENCE,
            "jwks_file": str(self.jwks_file),
        }
        return [
            "identity.mode=verified",
            "identity.agent_id=",
            "identity.daemon_id=gateway-test",
            f"identity.agents={json.dumps(self._secrets)}",
            f"identity.issuers={json.dumps([issuer])}",
            f"policy.source={self.policies}",
            f"gateway.port={0 if http else -1}",
            f"gateway.servers={json.dumps(servers)}",
            "gateway.max_message_bytes=4096",
            "gateway.page_size=2",
        ]


class GatewayDaemon(RunningDaemon):
    """A running daemon with the gateway; ``gateway_url`` is its endpoint."""

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.daemon.gateway_port}/mcp"

    def records(self) -> list[AuditRecordV1]:
        store = self.daemon._store
        return [decode_record(s.record_bytes) for s in store.iter_records()]

    def request_errors(self, code: str) -> float:
        """``kynara_request_errors_total{code=...}`` on the daemon's
        /metrics (0 before the first)."""
        url = f"http://127.0.0.1:{self.daemon.http_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        prefix = f'kynara_request_errors_total{{code="{code}"}} '
        for line in text.splitlines():
            if line.startswith(prefix):
                return float(line[len(prefix) :])
        return 0.0


def with_flags(upstream: dict[str, Any], *flags: str) -> dict[str, Any]:
    """A stdio upstream config (``stdio_upstream_config``) whose server
    also gets ``flags``."""
    return {**upstream, "command": [*upstream["command"], *flags]}


def start_gateway(
    setup: GatewaySetup, servers: dict[str, Any], *extra: str
) -> GatewayDaemon:
    """A daemon (fixed test clock) serving the gateway over HTTP; the
    caller must ``stop()`` it."""
    config = daemon_config(setup.root / "daemon", *setup.overrides(servers), *extra)
    return GatewayDaemon(config, SettableClock())


def stdio_gateway_params(
    setup: GatewaySetup,
    servers: dict[str, Any],
    agent: str,
    *,
    token: str | None,
    extra: tuple[str, ...] = (),
) -> StdioServerParameters:
    """Start ``kynara-sidecar gateway`` for ``agent``, the token (if any) in
    its environment, the daemon's own state under ``setup.root/stdio``."""
    state = setup.root / "stdio"
    sets = [
        f"agent.socket={state / 'agent.sock'}",
        f"agent.fast_socket={state / 'agent.fast.sock'}",
        "agent.port=-1",
        "health.port=-1",
        "http.port=0",
        f"audit.path={state / 'audit'}",
        f"audit.signing_key={state / 'keys' / 'audit.pem'}",
        f"audit.witness_path={state / 'witness'}",
        "audit.map_size=67108864",
        "shutdown_grace_seconds=5",
        *setup.overrides(servers, http=False),
        f"gateway.stdio.agent_id={agent}",
        *extra,
    ]
    env = {
        key: value
        for key, value in os.environ.items()
        if key in ("PATH", "HOME", "LANG", "LC_ALL", "PYTHONPATH", "TMPDIR")
    }
    if token is not None:
        env["KYNARA_DELEGATION_TOKEN"] = token
    args = ["-m", "kynara_sidecar.cli", "gateway", "--config", str(SHIPPED_CONFIG)]
    for item in sets:
        args += ["--set", item]
    return StdioServerParameters(
        command=sys.executable, args=args, env=env, cwd=str(REPO_ROOT)
    )


def stdio_audit_path(setup: GatewaySetup) -> pathlib.Path:
    return setup.root / "stdio" / "audit"


def audit_records(path: pathlib.Path) -> list[AuditRecordV1]:
    """Every record of the audit log at ``path`` (read only)."""
    store = AuditStore.open(path, readonly=True)
    try:
        return [decode_record(s.record_bytes) for s in store.iter_records()]
    finally:
        store.close()


def wait_for(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    """Poll ``predicate`` until true; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


async def list_all(client: Client) -> list[str]:
    """Every tool name the gateway lists to ``client``, following the
    cursor page after page."""
    names: list[str] = []
    cursor = None
    while True:
        page = await client.list_tools(cursor=cursor)
        names += [tool.name for tool in page.tools]
        cursor = page.next_cursor
        if cursor is None:
            return names


def initialize_message(client: str) -> dict[str, Any]:
    """The ``initialize`` request (id "init", ``LEGACY_VERSION``) of a
    client named ``client`` that drives a session by hand."""
    return {
        "jsonrpc": "2.0",
        "id": "init",
        "method": "initialize",
        "params": {
            "protocolVersion": LEGACY_VERSION,
            "capabilities": {},
            "clientInfo": {"name": client, "version": "0"},
        },
    }


def post_tools_list(
    daemon: GatewayDaemon, headers: dict[str, str] | list[tuple[str, str]]
) -> httpx2.Response:
    """One raw ``tools/list`` request (id 1) POSTed to the gateway's HTTP
    endpoint with exactly ``headers`` (a list may repeat a header)."""
    return httpx2.post(
        daemon.gateway_url,
        json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        headers=headers,
    )
