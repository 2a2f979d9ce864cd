"""The MCP gateway over stdio: ``kynara-sidecar gateway`` as an agent's MCP
server.

The SDK's client starts ``python -m kynara_sidecar.cli gateway`` (a whole
daemon, multi-agent, verified identity) with the user's token in its
environment; the gateway starts the test upstream as its own stdio child.
Raw JSON-RPC over the process's pipes covers what the client cannot send
(batches, oversized lines, id 0, bare notifications) and the policy reload
(SIGHUP to the process). The same cases run over HTTP in
test_proxy_http.py.
"""

from __future__ import annotations

import json
import os
import pathlib
import queue
import signal
import subprocess
import threading
import time
from typing import Any

import anyio
import mcp_types as types
import msgspec
import pytest
from gateway_support import (
    NARROWED,
    VISIBLE,
    GatewaySetup,
    audit_records,
    initialize_message,
    list_all,
    stdio_audit_path,
    stdio_gateway_params,
    wait_for,
)
from mcp import Client
from mcp.client.stdio import stdio_client
from mcp.shared.exceptions import MCPError
from support import SHIPPED_CONFIG
from upstream_support import read_call_log, stdio_upstream_config

from kynara_sidecar.config import load_config
from kynara_sidecar.errors import ConfigError
from kynara_sidecar.gateway.arguments import arguments_digest
from kynara_sidecar.gateway.proxy import DENIED_CODE, REQUEST_ERROR_CODE

# A daemon, then its upstream child, start in a second or two here; the
# machine is shared.
REPLY_SECONDS = 60.0


@pytest.fixture
def setup(tmp_path) -> Any:
    setup = GatewaySetup(tmp_path)
    yield setup
    setup.close()


def _servers(setup: GatewaySetup) -> dict[str, Any]:
    return {"files": stdio_upstream_config(setup.root / "calls.jsonl")}


def _calls(setup: GatewaySetup) -> list[dict[str, Any]]:
    return read_call_log(setup.root / "calls.jsonl")


def _token(setup: GatewaySetup, user: str, agent: str) -> str:
    # The daemon process reads the real clock.
    return setup.token(user, agent, now=time.time())


def _client(
    setup: GatewaySetup, user: str | None, agent: str, **options: Any
) -> Client:
    token = _token(setup, user, agent) if user is not None else None
    params = stdio_gateway_params(setup, _servers(setup), agent, token=token)
    errlog = setup.log_file(f"gateway-{agent}.log")
    return Client(stdio_client(params, errlog=errlog), **options)


@pytest.mark.parametrize(
    ("user", "agent", "seen"),
    [
        ("alice", "reader-bot", VISIBLE["alice"]),
        ("bob", "writer-bot", VISIBLE["bob"]),
        ("carol", "ops-bot", VISIBLE["carol"]),
        # Intersection: the ops agent acting for a reader.
        ("alice", "ops-bot", VISIBLE["alice"]),
        # The agent narrower than its user: a reader agent for a deployer.
        ("carol", "reader-bot", NARROWED),
    ],
)
def test_each_agent_sees_exactly_its_tools(setup, user, agent, seen):
    async def run() -> list[str]:
        async with _client(setup, user, agent) as client:
            return await list_all(client)

    assert anyio.run(run) == seen


def test_pages_hold_only_visible_tools_and_foreign_cursors_are_refused(setup):
    async def run() -> tuple[list[types.ListToolsResult], MCPError]:
        async with _client(setup, "bob", "writer-bot") as client:
            pages = [await client.list_tools()]
            while pages[-1].next_cursor:
                pages.append(await client.list_tools(cursor=pages[-1].next_cursor))
            with pytest.raises(MCPError) as info:
                await client.list_tools(cursor="ZmlsZXNfX3Nsb3c.forged")
            return pages, info.value

    pages, forged = anyio.run(run)
    assert [len(page.tools) for page in pages] == [2, 1]
    assert [t.name for page in pages for t in page.tools] == VISIBLE["bob"]
    # Hidden from writers: slow (denied), deploy (no rule); in no page,
    # not even in a cursor.
    for page in pages:
        dumped = json.dumps(page.model_dump())
        assert "slow" not in dumped and "deploy" not in dumped
    assert forged.code == types.INVALID_PARAMS and "cursor" in forged.message


def test_a_hidden_and_an_unknown_tool_are_refused_alike_and_audited(setup):
    names = ["files__write", "files__nope"]

    async def run() -> list[MCPError]:
        errors = []
        async with _client(setup, "alice", "reader-bot", mode="legacy") as client:
            for name in names:
                with pytest.raises(MCPError) as info:
                    await client.call_tool(name, {"path": "/alike"})
                errors.append(info.value)
        return errors

    hidden, unknown = anyio.run(run)
    for err, name in ((hidden, "files__write"), (unknown, "files__nope")):
        assert err.code == DENIED_CODE
        assert err.message.startswith(f"tool {name!r} is not permitted: no rule ")
        assert sorted(err.data) == ["decision", "decision_id", "reason", "reason_code"]
        assert err.data["reason_code"] == hidden.data["reason_code"]
    records = {
        r.decision_id: r
        for r in audit_records(stdio_audit_path(setup))
        if r.kind == "decision"
    }
    audited = [records[err.data["decision_id"]] for err in (hidden, unknown)]
    assert [(r.decision, r.gateway.tool) for r in audited] == [
        ("deny", "write"),
        ("deny", "nope"),
    ]
    assert _calls(setup) == []


def test_an_unknown_tool_a_chain_could_be_allowed_is_unknown(setup):
    async def run() -> MCPError:
        async with _client(setup, "dave", "ops-bot") as client:
            with pytest.raises(MCPError) as info:
                await client.call_tool("files__nope", {})
            return info.value

    err = anyio.run(run)
    assert err.code == types.INVALID_PARAMS
    assert "unknown tool 'files__nope'" in err.message
    assert err.data == {"code": "invalid_request", "field": "name"}
    assert _calls(setup) == []


def test_require_approval_returns_the_approval_url(setup):
    args = {"service": "web", "version": "1.2", "replicas": 3}

    async def run() -> types.CallToolResult:
        async with _client(setup, "carol", "ops-bot") as client:
            return await client.call_tool("files__deploy", args)

    result = anyio.run(run)
    assert result.is_error
    structured = result.structured_content
    assert structured["decision"] == "require_approval"
    approval = structured["approval"]
    assert approval["url"].endswith(f"/approvals/{approval['id']}")
    assert approval["url"] in result.content[0].text
    assert _calls(setup) == []


def test_a_hidden_tool_called_raw_is_refused_and_an_allowed_one_forwarded(setup):
    async def run() -> tuple[MCPError, types.CallToolResult]:
        async with _client(setup, "alice", "reader-bot", mode="legacy") as client:
            with pytest.raises(MCPError) as info:
                await client.call_tool(
                    "files__write", {"path": "/etc/x", "content": "n"}
                )
            allowed = await client.call_tool("files__read", {"path": "/r"})
            return info.value, allowed

    err, allowed = anyio.run(run)
    assert err.code == DENIED_CODE and "not permitted" in err.message
    assert err.data["decision"] == "deny"
    assert [c.text for c in allowed.content] == ["contents of /r"]
    assert [c["tool"] for c in _calls(setup)] == ["read"]


@pytest.mark.parametrize("mode", ["auto", "legacy"])
def test_no_token_no_tools(setup, mode):
    async def run() -> MCPError:
        async with _client(setup, None, "reader-bot", mode=mode) as client:
            with pytest.raises(MCPError) as info:
                await client.list_tools()
            return info.value

    err = anyio.run(run)
    assert err.code == REQUEST_ERROR_CODE
    assert "KYNARA_DELEGATION_TOKEN" in err.message
    assert err.data["code"] == "identity_invalid"


@pytest.mark.parametrize("mode", ["auto", "legacy"])
def test_a_cancelled_call_reaches_upstream_and_is_recorded_cancelled(setup, mode):
    async def run() -> None:
        async with _client(setup, "alice", "reader-bot", mode=mode) as client:
            async with anyio.create_task_group() as group:
                group.start_soon(client.call_tool, "files__slow", {"seconds": 30})
                await anyio.to_thread.run_sync(
                    lambda: wait_for(
                        lambda: any(c["tool"] == "slow" for c in _calls(setup)),
                        timeout=REPLY_SECONDS,
                        what="the slow call upstream",
                    )
                )
                group.cancel_scope.cancel()
            await anyio.to_thread.run_sync(
                lambda: wait_for(
                    lambda: {"tool": "slow", "cancelled": True} in _calls(setup),
                    what="the upstream's cancelled entry",
                )
            )

    anyio.run(run)
    # The client closed the gateway's stdin: the daemon stopped, its log
    # is closed.
    records = audit_records(stdio_audit_path(setup))
    digest = arguments_digest({"seconds": 30})
    (decision,) = [
        r
        for r in records
        if r.kind == "decision" and r.gateway and r.gateway.args_digest == digest
    ]
    assert decision.decision == "allow"
    same = [r for r in records if r.decision_id == decision.decision_id]
    assert [(r.kind, r.outcome) for r in same] == [
        ("decision", ""),
        ("outcome", "cancelled"),
    ]


@pytest.mark.parametrize("mode", ["auto", "legacy"])
def test_list_changed_after_the_upstream_adds_a_tool(setup, mode):
    async def run() -> list[str]:
        changed = anyio.Event()

        async def on_message(message: Any) -> None:
            if isinstance(message, types.ToolListChangedNotification):
                changed.set()

        async with _client(
            setup, "alice", "reader-bot", mode=mode, message_handler=on_message
        ) as client:
            await list_all(client)
            if mode == "legacy":
                await client.call_tool("files__add_tool", {})
                with anyio.fail_after(REPLY_SECONDS):
                    await changed.wait()
            else:
                async with client.listen(tools_list_changed=True) as subscription:
                    await client.call_tool("files__add_tool", {})
                    with anyio.fail_after(REPLY_SECONDS):
                        async for _event in subscription:
                            break
            return await list_all(client)

    assert anyio.run(run) == sorted([*VISIBLE["alice"], "files__late"])


class _RawGateway:
    """``kynara-sidecar gateway`` on pipes, driven line by line."""

    def __init__(self, setup: GatewaySetup, user: str, agent: str):
        params = stdio_gateway_params(
            setup, _servers(setup), agent, token=_token(setup, user, agent)
        )
        self._log = open(setup.root / "raw-gateway.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            [params.command, *params.args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=params.env,
            cwd=params.cwd,
        )
        self._lines: queue.Queue[bytes] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.send(initialize_message("raw"))
        assert self.receive()["id"] == "init"
        self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)

    def send(self, message: Any) -> None:
        raw = message if isinstance(message, bytes) else json.dumps(message).encode()
        assert self.process.stdin is not None
        self.process.stdin.write(raw + b"\n")
        self.process.stdin.flush()

    def receive(self, timeout: float = REPLY_SECONDS) -> dict[str, Any]:
        return json.loads(self._lines.get(timeout=timeout))

    def pending(self) -> list[bytes]:
        out = []
        while not self._lines.empty():
            out.append(self._lines.get_nowait())
        return out

    def close(self) -> None:
        """Close stdin (the daemon stops) and wait for the process."""
        if self.process.stdin is not None and not self.process.stdin.closed:
            self.process.stdin.close()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self._reader.join(10)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()


@pytest.fixture
def raw(setup):
    gateway = _RawGateway(setup, "alice", "reader-bot")
    yield gateway
    gateway.close()


def _ask(raw: _RawGateway, request_id: Any, method: str, **params: Any) -> Any:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
    if params:
        message["params"] = params
    raw.send(message)
    return raw.receive()


def test_protocol_cases_on_the_raw_wire(setup, raw):
    # A notification gets no response: the next line answers the ping.
    raw.send(
        {
            "jsonrpc": "2.0",
            "method": "notifications/cancelled",
            "params": {"requestId": 999, "reason": "nothing"},
        }
    )
    assert _ask(raw, "after-notification", "ping")["id"] == "after-notification"
    # Request id 0 is an id like any other.
    answer = _ask(raw, 0, "tools/list")
    assert answer["id"] == 0
    assert [t["name"] for t in answer["result"]["tools"]] == VISIBLE["alice"][:2]
    # A batch is refused whole, with one Invalid Request; nothing forwarded.
    raw.send(
        [
            {
                "jsonrpc": "2.0",
                "id": i,
                "method": "tools/call",
                "params": {"name": "files__read", "arguments": {"path": f"/b/{i}"}},
            }
            for i in range(3)
        ]
    )
    refused = raw.receive()
    assert refused["id"] is None and refused["error"]["code"] == -32600
    assert "batch" in refused["error"]["message"]
    # An oversized line is refused naming the limit; the next one is served.
    raw.send(
        {
            "jsonrpc": "2.0",
            "id": "big",
            "method": "tools/call",
            "params": {"name": "files__read", "arguments": {"path": "x" * 6000}},
        }
    )
    too_large = raw.receive()
    assert too_large["id"] is None
    assert "gateway.max_message_bytes (4096 bytes)" in too_large["error"]["message"]
    assert too_large["error"]["data"]["code"] == "request_too_large"
    answer = _ask(
        raw, "small", "tools/call", name="files__read", arguments={"path": "/ok"}
    )
    assert answer["result"]["content"][0]["text"] == "contents of /ok"
    assert raw.pending() == []
    # Only the last call reached the upstream.
    assert [c["arguments"]["path"] for c in _calls(setup)] == ["/ok"]


def test_list_changed_after_a_policy_reload(setup, raw):
    _ask(raw, 1, "tools/list")
    path: pathlib.Path = setup.policies / "files.yaml"
    text = path.read_text()
    path.write_text(
        text.replace(
            "actions: [mcp.files.read, mcp.files.add_tool, mcp.files.late]",
            "actions: [mcp.files.add_tool, mcp.files.late]",
        )
    )
    os.kill(raw.process.pid, signal.SIGHUP)
    notice = raw.receive()
    assert notice == {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}
    answer = _ask(raw, 2, "tools/list")
    assert [t["name"] for t in answer["result"]["tools"]] == [
        "files__add_tool",
        "files__slow",
    ]


def test_the_stdio_agent_must_be_one_of_identity_agents(setup):
    params = stdio_gateway_params(setup, _servers(setup), "nobody-bot", token=None)
    overrides = [a for a in params.args[5:] if a != "--set"]
    with pytest.raises(ConfigError) as info:
        load_config(SHIPPED_CONFIG, overrides)
    assert "gateway.stdio.agent_id: expected one of identity.agents" in str(info.value)
    assert "'nobody-bot'" in str(info.value)


def test_a_stdio_agent_with_a_client_certificate_is_refused_naming_the_key(setup):
    """Config validation refuses it; ``stdio_caller`` refuses alike (not a
    KeyError) for a config built without that validation."""
    from kynara_sidecar.config import AgentCertificateConfig
    from kynara_sidecar.gateway.stdio import stdio_caller

    params = stdio_gateway_params(setup, _servers(setup), "reader-bot", token=None)
    overrides = [a for a in params.args[5:] if a != "--set"]
    config = load_config(SHIPPED_CONFIG, overrides)
    identity = config.identity
    agents = {
        **identity.agents,
        "reader-bot": AgentCertificateConfig(
            certificate_uri="spiffe://example.org/agent/reader-bot"
        ),
    }
    unchecked = msgspec.structs.replace(
        config, identity=msgspec.structs.replace(identity, agents=agents)
    )

    with pytest.raises(ConfigError) as info:
        stdio_caller(unchecked)

    assert "gateway.stdio.agent_id: expected an agent with a bearer secret" in str(
        info.value
    )
    assert "'reader-bot'" in str(info.value)
