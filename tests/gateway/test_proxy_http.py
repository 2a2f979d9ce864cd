"""The MCP gateway over Streamable HTTP, with the SDK's own client.

A daemon (multi-agent, verified identity) serves the gateway in front of the
test upstream (a stdio child); agents connect with the SDK's client, or raw
JSON-RPC over httpx where the client cannot send the bad input. The same
protocol cases run over stdio in test_proxy_stdio.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import pathlib
from typing import Any

import anyio
import httpx2 as httpx
import mcp_types as types
import pytest
from gateway_support import (
    LEGACY_VERSION,
    NARROWED,
    TOKEN_HEADER,
    VISIBLE,
    GatewayDaemon,
    GatewaySetup,
    initialize_message,
    list_all,
    post_tools_list,
    start_gateway,
    wait_for,
    with_flags,
)
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from support import free_port
from upstream_server import FAIL_CODE
from upstream_support import read_call_log, stdio_upstream_config

from kynara_sidecar.approvals.model import Reviewer, Verdict
from kynara_sidecar.errors import ConfigError
from kynara_sidecar.gateway.arguments import arguments_digest
from kynara_sidecar.gateway.proxy import (
    DENIED_CODE,
    REQUEST_ERROR_CODE,
    UPSTREAM_CODE,
)


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Any:
    """One gateway for the cases that change nothing upstream or in policy."""
    root = tmp_path_factory.mktemp("gateway-http")
    setup = GatewaySetup(root)
    calls = root / "calls.jsonl"
    daemon = start_gateway(setup, {"files": stdio_upstream_config(calls)})
    yield setup, daemon, calls
    daemon.stop()


@pytest.fixture
def own(tmp_path) -> Any:
    """A gateway of this test's own (it changes policies or the upstream)."""
    setup = GatewaySetup(tmp_path)
    calls = tmp_path / "calls.jsonl"
    daemon = start_gateway(setup, {"files": stdio_upstream_config(calls)})
    yield setup, daemon, calls
    daemon.stop()


def _headers(setup: GatewaySetup, user: str | None, agent: str) -> dict[str, str]:
    headers = {"authorization": f"Bearer {setup.secret(agent)}"}
    if user is not None:
        headers[TOKEN_HEADER] = setup.token(user, agent)
    return headers


def _http(setup: GatewaySetup, user: str | None, agent: str) -> httpx.AsyncClient:
    # Longer than any call the tests make upstream.
    return httpx.AsyncClient(headers=_headers(setup, user, agent), timeout=60)


def _client(
    daemon: GatewayDaemon,
    setup: GatewaySetup,
    http: httpx.AsyncClient,
    **options: Any,
) -> Client:
    return Client(
        streamable_http_client(daemon.gateway_url, http_client=http), **options
    )


async def _visible(setup, daemon, user, agent, **options) -> list[str]:
    async with _http(setup, user, agent) as http:
        async with _client(daemon, setup, http, **options) as client:
            # Changes are announced, on either protocol.
            assert client.server_capabilities.tools.list_changed is True
            return await list_all(client)


@pytest.mark.parametrize(
    ("user", "agent"),
    [("alice", "reader-bot"), ("bob", "writer-bot"), ("carol", "ops-bot")],
)
@pytest.mark.parametrize("mode", ["auto", "legacy"])
def test_each_agent_sees_exactly_its_tools(shared, user, agent, mode):
    setup, daemon, _ = shared
    names = asyncio.run(_visible(setup, daemon, user, agent, mode=mode))
    assert names == VISIBLE[user]


def test_an_ops_agent_for_a_reader_sees_what_the_reader_may_use(shared):
    setup, daemon, _ = shared
    assert asyncio.run(_visible(setup, daemon, "alice", "ops-bot")) == VISIBLE["alice"]


def test_pages_hold_only_visible_tools_and_foreign_cursors_are_refused(shared):
    setup, daemon, _ = shared

    async def run() -> None:
        async with _http(setup, "bob", "writer-bot") as http:
            async with _client(daemon, setup, http) as client:
                first = await client.list_tools()
                assert len(first.tools) == 2 and first.next_cursor
                pages = [first]
                while pages[-1].next_cursor:
                    pages.append(await client.list_tools(cursor=pages[-1].next_cursor))
                shown = [t.name for page in pages for t in page.tools]
                assert shown == VISIBLE["bob"]
                assert all("slow" not in json.dumps(p.model_dump()) for p in pages)
                with pytest.raises(MCPError) as info:
                    await client.list_tools(cursor="ZmlsZXNfX3Nsb3c.forged")
                assert info.value.code == types.INVALID_PARAMS
                assert "cursor" in info.value.message

    asyncio.run(run())


def test_an_allowed_call_returns_the_upstream_result_unchanged(shared):
    setup, daemon, calls = shared

    async def run() -> types.CallToolResult:
        async with _http(setup, "bob", "writer-bot") as http:
            async with _client(daemon, setup, http) as client:
                return await client.call_tool(
                    "files__write", {"path": "/tmp/a", "content": "hello"}
                )

    result = asyncio.run(run())
    assert not result.is_error
    assert [c.text for c in result.content] == ["wrote 5 bytes to /tmp/a"]
    assert {"tool": "write", "arguments": {"path": "/tmp/a", "content": "hello"}} in (
        read_call_log(calls)
    )
    decided = [r for r in daemon.records() if r.gateway and r.gateway.tool == "write"]
    assert decided and decided[-1].decision == "allow"
    assert decided[-1].gateway.server == "files"
    assert len(decided[-1].gateway.args_digest) == 64


def test_the_agents_progress_token_is_not_passed_upstream(shared):
    setup, daemon, calls = shared

    async def progress(_progress: float, _total: Any, _message: Any) -> None:
        pass

    async def run() -> types.CallToolResult:
        async with _http(setup, "alice", "reader-bot") as http:
            async with _client(daemon, setup, http, mode="legacy") as client:
                return await client.call_tool(
                    "files__read", {"path": "/progress"}, progress_callback=progress
                )

    assert asyncio.run(run()).content[0].text == "contents of /progress"
    # The gateway relays no progress, so it asks for none.
    (call,) = [
        c for c in read_call_log(calls) if c["arguments"] == {"path": "/progress"}
    ]
    assert call == {"tool": "read", "arguments": {"path": "/progress"}}


def test_a_hidden_tool_called_raw_is_refused_and_never_forwarded(shared):
    setup, daemon, calls = shared

    async def run() -> MCPError:
        async with _http(setup, "alice", "reader-bot") as http:
            async with _client(daemon, setup, http) as client:
                with pytest.raises(MCPError) as info:
                    await client.call_tool(
                        "files__write", {"path": "/etc/x", "content": "no"}
                    )
                return info.value

    err = asyncio.run(run())
    assert err.code == DENIED_CODE
    assert "not permitted" in err.message
    assert err.data["decision"] == "deny" and err.data["decision_id"]
    assert not [
        c for c in read_call_log(calls) if c["arguments"].get("path") == "/etc/x"
    ]


def _refused_alike(err: MCPError, name: str) -> tuple[Any, ...]:
    """What an agent can read from a refusal, with the tool's own name
    (its exposed name and its tool part) taken out."""
    tool = name.partition("__")[2] or name
    return (
        err.code,
        err.message.replace(name, "<name>").replace(tool, "<tool>"),
        sorted(err.data),
        err.data["decision"],
        err.data["reason_code"],
        err.data["reason"].replace(tool, "<tool>"),
    )


def test_a_hidden_and_an_unknown_tool_are_refused_alike_and_audited(shared):
    setup, daemon, calls = shared
    names = ["files__write", "files__nope", "nosuch"]

    async def run() -> list[MCPError]:
        errors = []
        async with _http(setup, "alice", "reader-bot") as http:
            async with _client(daemon, setup, http) as client:
                for name in names:
                    with pytest.raises(MCPError) as info:
                        await client.call_tool(name, {"path": "/alike"})
                    errors.append(info.value)
        return errors

    hidden, unknown, serverless = asyncio.run(run())
    assert hidden.code == DENIED_CODE
    assert _refused_alike(unknown, "files__nope") == _refused_alike(
        hidden, "files__write"
    )
    assert serverless.code == DENIED_CODE
    assert sorted(serverless.data) == sorted(hidden.data)
    assert serverless.message.startswith("tool 'nosuch' is not permitted: ")
    records = {r.decision_id: r for r in daemon.records() if r.kind == "decision"}
    audited = [records[err.data["decision_id"]] for err in (hidden, unknown)]
    assert [(r.decision, r.gateway.server, r.gateway.tool) for r in audited] == [
        ("deny", "files", "write"),
        ("deny", "files", "nope"),
    ]
    assert records[serverless.data["decision_id"]].decision == "deny"
    assert records[serverless.data["decision_id"]].gateway.tool == "nosuch"
    assert not [
        c for c in read_call_log(calls) if c["arguments"].get("path") == "/alike"
    ]


def test_every_absent_name_is_decided_and_denied_like_a_hidden_tool(shared):
    setup, daemon, calls = shared
    # No tool part, a server part no server has, and a name whose action
    # would be longer than a request may carry.
    names = ["files__write", "files__", "nope__", "files__" + "x" * 293, "y" * 300]

    async def run() -> list[MCPError]:
        errors = []
        async with _http(setup, "alice", "reader-bot") as http:
            async with _client(daemon, setup, http) as client:
                for name in names:
                    with pytest.raises(MCPError) as info:
                        await client.call_tool(name, {"path": "/absent"})
                    errors.append(info.value)
        return errors

    hidden, *absent = asyncio.run(run())
    assert [len(name) for name in names[-2:]] == [300, 300]
    records = {r.decision_id: r for r in daemon.records() if r.kind == "decision"}
    for name, err in zip(names[1:], absent, strict=True):
        assert err.code == DENIED_CODE, (name, err)
        assert err.message.startswith(f"tool {name!r} is not permitted: ")
        assert sorted(err.data) == sorted(hidden.data)
        assert err.data["decision"] == hidden.data["decision"] == "deny"
        assert err.data["reason_code"] == hidden.data["reason_code"]
        record = records[err.data["decision_id"]]
        assert record.decision == "deny"
        assert (record.gateway.server, record.gateway.tool) == ("", name)
    assert not [
        c for c in read_call_log(calls) if c["arguments"].get("path") == "/absent"
    ]


def test_an_unknown_tool_a_chain_could_be_allowed_is_unknown(shared):
    setup, daemon, calls = shared

    async def run() -> MCPError:
        # dave and ops-bot may use every tool of "files": a files__nope
        # would be listed, so saying there is none hides nothing.
        async with _http(setup, "dave", "ops-bot") as http:
            async with _client(daemon, setup, http) as client:
                with pytest.raises(MCPError) as info:
                    await client.call_tool("files__nope", {})
                return info.value

    before = daemon.request_errors("invalid_request")
    err = asyncio.run(run())
    assert err.code == types.INVALID_PARAMS
    assert "unknown tool" in err.message
    assert daemon.request_errors("invalid_request") == before + 1
    assert not [c for c in read_call_log(calls) if c["tool"] == "nope"]


def test_an_agent_narrower_than_its_user_sees_and_calls_only_what_both_may(shared):
    setup, daemon, calls = shared

    async def run() -> tuple[list[str], list[MCPError]]:
        async with _http(setup, "carol", "reader-bot") as http:
            async with _client(daemon, setup, http) as client:
                names = await list_all(client)
                refused = []
                for name, args in (
                    ("files__write", {"path": "/narrow", "content": "x"}),
                    ("files__deploy", {"service": "narrow", "version": "1"}),
                ):
                    with pytest.raises(MCPError) as info:
                        await client.call_tool(name, args)
                    refused.append(info.value)
                return names, refused

    names, refused = asyncio.run(run())
    assert names == NARROWED
    # Denied outright: reader-bot may not deploy, so no approval is asked.
    assert [(e.code, e.data["decision"]) for e in refused] == [
        (DENIED_CODE, "deny"),
        (DENIED_CODE, "deny"),
    ]
    assert not [c for c in read_call_log(calls) if "narrow" in json.dumps(c)]


def test_require_approval_returns_the_approval_url(shared):
    setup, daemon, calls = shared
    args = {"service": "web", "version": "1.2", "replicas": 3}

    async def run() -> types.CallToolResult:
        async with _http(setup, "carol", "ops-bot") as http:
            async with _client(daemon, setup, http) as client:
                return await client.call_tool("files__deploy", args)

    result = asyncio.run(run())
    assert result.is_error
    approval = result.structured_content["approval"]
    assert result.structured_content["decision"] == "require_approval"
    assert approval["url"].endswith(f"/approvals/{approval['id']}")
    assert approval["url"] in result.content[0].text
    assert not [c for c in read_call_log(calls) if c["tool"] == "deploy"]


@pytest.mark.parametrize("mode", ["auto", "legacy"])
def test_no_token_no_tools(shared, mode):
    setup, daemon, _ = shared

    async def run() -> tuple[MCPError, MCPError]:
        async with _http(setup, None, "reader-bot") as http:
            async with _client(daemon, setup, http, mode=mode) as client:
                with pytest.raises(MCPError) as listing:
                    await client.list_tools()
                with pytest.raises(MCPError) as calling:
                    await client.call_tool("files__read", {"path": "/x"})
                return listing.value, calling.value

    before = daemon.request_errors("identity_invalid")
    listing, calling = asyncio.run(run())
    for err in (listing, calling):
        assert err.code == REQUEST_ERROR_CODE
        assert TOKEN_HEADER in err.message
        assert err.data == {"code": "identity_invalid", "field": "delegation_token"}
    # Both refusals counted.
    assert daemon.request_errors("identity_invalid") == before + 2


def test_an_unknown_agent_credential_is_refused_with_401(shared):
    _, daemon, _ = shared
    response = post_tools_list(daemon, {"authorization": "Bearer not-a-secret"})
    assert response.status_code == 401
    assert response.json()["error"]["data"]["code"] == "identity_invalid"


class _Raw:
    """A handshake-era session driven by hand over httpx."""

    def __init__(self, daemon: GatewayDaemon, headers: dict[str, str]):
        self.url = daemon.gateway_url
        self.http = httpx.Client(
            headers={
                **headers,
                "accept": "application/json, text/event-stream",
                "content-type": "application/json",
            },
            timeout=30,
        )
        opened = self.post(initialize_message("raw"))
        self.http.headers["mcp-session-id"] = opened.headers["mcp-session-id"]
        self.http.headers["mcp-protocol-version"] = LEGACY_VERSION
        self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})

    def post(self, message: Any) -> httpx.Response:
        body = message if isinstance(message, bytes) else json.dumps(message).encode()
        return self.http.post(self.url, content=body)

    @staticmethod
    def messages(response: httpx.Response) -> list[dict[str, Any]]:
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            return [
                json.loads(line[5:])
                for line in response.text.splitlines()
                if line.startswith("data:") and line[5:].strip()
            ]
        return [response.json()] if response.content else []

    def close(self) -> None:
        self.http.close()


@pytest.fixture
def raw(shared):
    setup, daemon, calls = shared
    session = _Raw(daemon, _headers(setup, "alice", "reader-bot"))
    yield session, calls
    session.close()


def test_notifications_get_no_response(raw):
    session, _ = raw
    response = session.post(
        {
            "jsonrpc": "2.0",
            "method": "notifications/cancelled",
            "params": {"requestId": 12345, "reason": "nothing"},
        }
    )
    assert response.status_code == 202
    assert response.content == b""


def test_request_id_zero_is_answered_with_id_zero(raw):
    session, _ = raw
    response = session.post({"jsonrpc": "2.0", "id": 0, "method": "tools/list"})
    (answer,) = session.messages(response)
    assert answer["id"] == 0
    assert [t["name"] for t in answer["result"]["tools"]] == VISIBLE["alice"][:2]


def test_a_batch_is_refused_whole_and_nothing_is_forwarded(raw):
    session, calls = raw
    before = len(read_call_log(calls))
    batch = [
        {
            "jsonrpc": "2.0",
            "id": i,
            "method": "tools/call",
            "params": {"name": "files__read", "arguments": {"path": f"/batch/{i}"}},
        }
        for i in range(3)
    ]
    response = session.post(batch)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == -32600 and "batch" in error["message"]
    assert len(read_call_log(calls)) == before


def test_an_oversized_message_is_refused_naming_the_limit(raw):
    session, calls = raw
    before = len(read_call_log(calls))
    message = {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {"name": "files__read", "arguments": {"path": "x" * 5000}},
    }
    response = session.post(message)
    assert response.status_code == 413
    error = response.json()["error"]
    assert "gateway.max_message_bytes (4096 bytes)" in error["message"]
    assert error["data"]["code"] == "request_too_large"
    assert len(read_call_log(calls)) == before


@pytest.mark.parametrize("mode", ["auto", "legacy"])
def test_a_cancelled_call_reaches_upstream_and_is_recorded_cancelled(shared, mode):
    setup, daemon, calls = shared
    seconds = 30 if mode == "auto" else 31

    async def run() -> None:
        async with _http(setup, "alice", "reader-bot") as http:
            async with _client(daemon, setup, http, mode=mode) as client:
                async with anyio.create_task_group() as group:
                    group.start_soon(
                        client.call_tool, "files__slow", {"seconds": seconds}
                    )
                    await anyio.to_thread.run_sync(
                        lambda: wait_for(
                            lambda: any(
                                c.get("arguments") == {"seconds": seconds}
                                for c in read_call_log(calls)
                            ),
                            what="the slow call upstream",
                        )
                    )
                    group.cancel_scope.cancel()

    asyncio.run(run())
    wait_for(
        lambda: {"tool": "slow", "cancelled": True} in read_call_log(calls),
        what="the upstream's cancelled entry",
    )
    decided = [
        r
        for r in daemon.records()
        if r.kind == "decision" and r.gateway and r.gateway.tool == "slow"
    ]
    digest = arguments_digest({"seconds": seconds})
    (decision,) = [r for r in decided if r.gateway.args_digest == digest]
    assert decision.decision == "allow"

    def outcomes() -> list[Any]:
        return [
            r
            for r in daemon.records()
            if r.kind == "outcome" and r.decision_id == decision.decision_id
        ]

    wait_for(lambda: outcomes(), what="the cancelled outcome record")
    assert [r.outcome for r in outcomes()] == ["cancelled"]
    assert not [
        r
        for r in daemon.records()
        if r.decision_id == decision.decision_id and r.decision == "deny"
    ]


def _without_read_for_readers(setup: GatewaySetup) -> None:
    path = setup.policies / "files.yaml"
    text = path.read_text()
    changed = text.replace(
        "actions: [mcp.files.read, mcp.files.add_tool, mcp.files.late]",
        "actions: [mcp.files.add_tool, mcp.files.late]",
    )
    assert changed != text
    path.write_text(changed)


async def _legacy_changes(
    setup, daemon, trigger, user: str = "alice", agent: str = "reader-bot"
) -> list[str]:
    """Open a handshake-era session, list, run ``trigger`` and wait for
    list_changed; return the list after it."""
    changed = anyio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            changed.set()

    async with _http(setup, user, agent) as http:
        async with _client(
            daemon, setup, http, mode="legacy", message_handler=on_message
        ) as client:
            await list_all(client)
            await trigger(client)
            with anyio.fail_after(20):
                await changed.wait()
            return await list_all(client)


async def _listen_changes(
    setup, daemon, trigger, user: str = "alice", agent: str = "reader-bot"
) -> list[str]:
    """The same on the 2026-07-28 protocol, through subscriptions/listen."""
    async with _http(setup, user, agent) as http:
        async with _client(daemon, setup, http) as client:
            async with client.listen(tools_list_changed=True) as subscription:
                await trigger(client)
                with anyio.fail_after(20):
                    async for _event in subscription:
                        break
            return await list_all(client)


@pytest.mark.parametrize("listen", [_legacy_changes, _listen_changes])
def test_list_changed_after_a_policy_reload(own, listen):
    setup, daemon, _ = own

    async def reload(_client: Client) -> None:
        _without_read_for_readers(setup)
        ok = await anyio.to_thread.run_sync(lambda: daemon.call(daemon.daemon.reload()))
        assert ok

    names = asyncio.run(listen(setup, daemon, reload))
    assert names == ["files__add_tool", "files__slow"]


@pytest.mark.parametrize("listen", [_legacy_changes, _listen_changes])
def test_list_changed_after_the_upstream_adds_a_tool(own, listen):
    setup, daemon, _ = own

    async def add(client: Client) -> None:
        await client.call_tool("files__add_tool", {})

    names = asyncio.run(listen(setup, daemon, add))
    assert names == sorted([*VISIBLE["alice"], "files__late"])


REVIEWER = Reviewer(id="rita", roles=frozenset({"reviewer"}), credential="test")
DEPLOY = {"service": "web", "version": "2.0", "replicas": 2}


def _approve(daemon: GatewayDaemon, approval_id: str) -> None:
    book = daemon.daemon._book
    daemon.call(book.review(approval_id, REVIEWER, Verdict.APPROVE, "looks fine"))


def test_a_retry_after_the_approval_is_forwarded(own):
    setup, daemon, calls = own

    async def call() -> types.CallToolResult:
        async with _http(setup, "carol", "ops-bot") as h:
            async with _client(daemon, setup, h) as client:
                return await client.call_tool("files__deploy", DEPLOY)

    first = asyncio.run(call())
    assert first.is_error
    _approve(daemon, first.structured_content["approval"]["id"])
    retried = asyncio.run(call())
    assert not retried.is_error
    assert retried.content[0].text.startswith("deployed")
    assert [c["arguments"] for c in read_call_log(calls) if c["tool"] == "deploy"] == [
        DEPLOY
    ]
    granted = [r for r in daemon.records() if r.reason_code == "approval_granted"]
    assert len(granted) == 1 and granted[0].decision == "allow"
    # The grant was used: a third call asks again.
    assert asyncio.run(call()).is_error


def _eliciting_gateway(
    tmp_path: pathlib.Path, wait_seconds: int
) -> tuple[GatewaySetup, GatewayDaemon, pathlib.Path]:
    """A gateway of the test's own that, on require_approval, elicits the
    review URL and waits up to ``wait_seconds`` for the review; the caller
    must ``stop()`` it."""
    setup = GatewaySetup(tmp_path)
    calls = tmp_path / "calls.jsonl"
    daemon = start_gateway(
        setup,
        {"files": stdio_upstream_config(calls)},
        "gateway.approval_wait=elicit",
        f"gateway.approval_wait_seconds={wait_seconds}",
    )
    return setup, daemon, calls


def test_elicit_shows_the_url_waits_for_the_review_and_forwards(tmp_path):
    setup, daemon, calls = _eliciting_gateway(tmp_path, wait_seconds=30)
    shown: list[types.ElicitRequestURLParams] = []

    async def on_elicit(_context: Any, params: Any) -> types.ElicitResult:
        shown.append(params)
        approval_id = params.url.rsplit("/", 1)[1]
        await anyio.to_thread.run_sync(lambda: _approve(daemon, approval_id))
        return types.ElicitResult(action="accept")

    async def call() -> types.CallToolResult:
        async with _http(setup, "carol", "ops-bot") as h:
            async with _client(
                daemon, setup, h, mode="legacy", elicitation_callback=on_elicit
            ) as client:
                return await client.call_tool("files__deploy", DEPLOY)

    try:
        result = asyncio.run(call())
    finally:
        daemon.stop()
    assert not result.is_error, result
    assert result.content[0].text.startswith("deployed")
    (params,) = shown
    assert params.mode == "url" and "/approvals/apr_" in params.url
    assert [c["tool"] for c in read_call_log(calls)] == ["deploy"]


def test_a_call_cancelled_while_waiting_for_the_review_is_recorded(tmp_path):
    setup, daemon, calls = _eliciting_gateway(tmp_path, wait_seconds=600)
    args = {"service": "waits", "version": "1", "replicas": 1}

    async def call() -> None:
        shown = anyio.Event()

        async def on_elicit(_context: Any, _params: Any) -> types.ElicitResult:
            shown.set()
            return types.ElicitResult(action="accept")

        async with _http(setup, "carol", "ops-bot") as h:
            async with _client(
                daemon, setup, h, mode="legacy", elicitation_callback=on_elicit
            ) as client:
                async with anyio.create_task_group() as group:
                    group.start_soon(client.call_tool, "files__deploy", args)
                    await shown.wait()
                    group.cancel_scope.cancel()

    try:
        asyncio.run(call())
        digest = arguments_digest(args)
        (decision,) = [
            r
            for r in daemon.records()
            if r.kind == "decision" and r.gateway and r.gateway.args_digest == digest
        ]

        def outcomes() -> list[str]:
            return [
                r.outcome
                for r in daemon.records()
                if r.kind == "outcome" and r.decision_id == decision.decision_id
            ]

        wait_for(outcomes, what="the cancelled outcome record")
        recorded = outcomes()
    finally:
        daemon.stop()
    assert decision.decision == "require_approval"
    assert recorded == ["cancelled"]
    assert not [c for c in read_call_log(calls) if c["tool"] == "deploy"]


def test_two_upstream_tools_with_one_name_refuse_the_start(tmp_path):
    setup = GatewaySetup(tmp_path)
    upstream = stdio_upstream_config(tmp_path / "calls.jsonl", collide=True)
    with pytest.raises(ConfigError) as info:
        start_gateway(setup, {"files": upstream})
    assert "get.file" in str(info.value) and "get_2Efile" in str(info.value)


def test_upstream_errors_pass_unchanged_and_failures_name_the_server(tmp_path, caplog):
    setup = GatewaySetup(tmp_path)
    calls = tmp_path / "calls.jsonl"
    upstream = with_flags(stdio_upstream_config(calls, timeout_seconds=5), "--faulty")
    daemon = start_gateway(setup, {"files": upstream})

    async def call() -> list[MCPError]:
        errors = []
        async with _http(setup, "alice", "reader-bot") as h:
            async with _client(daemon, setup, h) as client:
                # The slow call outlasts the upstream's timeout_seconds.
                for name, args in (
                    ("files__fail", {}),
                    ("files__malformed", {}),
                    ("files__slow", {"seconds": 50}),
                ):
                    with pytest.raises(MCPError) as info:
                        await client.call_tool(name, args)
                    errors.append(info.value)
        return errors

    try:
        with caplog.at_level(logging.WARNING, logger="kynara.gateway"):
            failed, malformed, timed_out = asyncio.run(call())
        decided = {
            r.gateway.tool: r.decision_id
            for r in daemon.records()
            if r.kind == "decision" and r.gateway
        }
    finally:
        daemon.stop()
    # The upstream's own error, unchanged: the gateway is transparent.
    assert (failed.code, failed.message, failed.data) == (
        FAIL_CODE,
        "failed on purpose",
        {"asked": True},
    )
    for err, tool, code in (
        (malformed, "malformed", "upstream_invalid"),
        (timed_out, "slow", "upstream_unavailable"),
    ):
        assert err.code == UPSTREAM_CODE
        assert f"upstream server 'files' failed on tool '{tool}'" in err.message
        assert err.data == {
            "code": code,
            "server": "files",
            "decision_id": decided[tool],
        }
    logged = [
        (r.fields["tool"], r.fields["code"])
        for r in caplog.records
        if r.getMessage() == "upstream call failed"
    ]
    assert logged == [
        ("fail", "upstream_error"),
        ("malformed", "upstream_invalid"),
        ("slow", "upstream_unavailable"),
    ]


def test_only_the_bound_address_and_localhost_are_accepted_as_host(shared):
    setup, daemon, _ = shared
    port = daemon.daemon.gateway_port
    message = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    headers = {
        **_headers(setup, "alice", "reader-bot"),
        "accept": "application/json, text/event-stream",
    }
    refused = httpx.post(
        daemon.gateway_url, json=message, headers={**headers, "host": "evil.test"}
    )
    assert refused.status_code in (400, 403, 421), refused.text
    assert "host" in refused.text.lower()
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        response = httpx.post(
            daemon.gateway_url, json=message, headers={**headers, "host": host}
        )
        # Past the host check: the SDK wants a session (or the 2026 envelope).
        assert response.status_code not in (403, 421), host


def test_a_tool_of_an_upstream_that_is_down_is_unavailable_not_unknown(tmp_path):
    setup = GatewaySetup(tmp_path)
    # Nothing listens there: the upstream is unreachable from the start.
    dead = {"transport": "http", "url": f"http://127.0.0.1:{free_port()}/mcp"}
    daemon = start_gateway(setup, {"files": dead})
    alice_calls = [
        ("files__read", {"path": "/x"}),
        # slow-short allows seconds <= 60 only: a conditional deny.
        ("files__slow", {"seconds": 100}),
        ("files__slow", {"seconds": 10}),
        ("files__write", {"path": "/x"}),
    ]

    async def call(user: str, agent: str, name: str, args: dict[str, Any]) -> Any:
        async with _http(setup, user, agent) as http:
            async with _client(daemon, setup, http) as client:
                try:
                    return await client.call_tool(name, args)
                except MCPError as err:
                    return err

    async def alice() -> list[Any]:
        return [await call("alice", "reader-bot", *c) for c in alice_calls]

    try:
        readable, too_slow, slow, hidden = asyncio.run(alice())
        # carol's deploy needs approval even with its server down; the
        # approval binds the call, and an approved retry while the server is
        # still down leaves the grant unused for the retry once it is back.
        deploy = ("carol", "ops-bot", "files__deploy", DEPLOY)
        asked = asyncio.run(call(*deploy))
        _approve(daemon, asked.structured_content["approval"]["id"])
        retries = [asyncio.run(call(*deploy)) for _ in range(2)]
        records = daemon.records()
    finally:
        daemon.stop()
    decisions = {r.decision_id: r for r in records if r.kind == "decision"}
    outcomes = {r.decision_id: r.outcome for r in records if r.kind == "outcome"}
    # alice may read: the read tool would be listed, so its server being
    # down is said, after an audited allow and its outcome.
    for err, (name, args) in ((readable, alice_calls[0]), (slow, alice_calls[2])):
        assert err.code == UPSTREAM_CODE, err
        assert sorted(err.data) == ["code", "decision_id", "server"]
        assert err.data["code"] == "upstream_unavailable"
        assert err.data["server"] == "files"
        assert "'files' is not connected" in err.message
        record = decisions[err.data["decision_id"]]
        assert record.decision == "allow"
        assert record.gateway.server == "files"
        assert record.gateway.tool == name.partition("__")[2]
        assert record.gateway.args_digest == arguments_digest(args)
        assert outcomes[err.data["decision_id"]] == "upstream_unavailable"
    # The policy's deny stands, server down or not, and is audited.
    assert too_slow.code == DENIED_CODE
    assert decisions[too_slow.data["decision_id"]].decision == "deny"
    assert too_slow.data["decision_id"] not in outcomes
    # The write tool she may not use is denied as ever.
    assert hidden.code == DENIED_CODE
    assert decisions[hidden.data["decision_id"]].decision == "deny"
    assert asked.is_error
    assert asked.structured_content["decision"] == "require_approval"
    for err in retries:
        assert err.code == UPSTREAM_CODE, err
        assert outcomes[err.data["decision_id"]] == "upstream_unavailable"
    assert not [r for r in records if r.reason_code == "approval_granted"]
