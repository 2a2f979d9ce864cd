"""The gateway's upstream side (gateway/catalog.py) against the real test
upstream (upstream_server.py), over stdio and over Streamable HTTP."""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import signal
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest
import uvloop
from gateway_support import with_flags
from mcp import Client
from mcp_types import INVALID_PARAMS
from support import free_port
from upstream_server import FAIL_CODE
from upstream_support import (
    HttpUpstream,
    read_call_log,
    start_http_upstream,
    stdio_upstream_config,
)

from kynara_sidecar.config import UpstreamConfig
from kynara_sidecar.errors import ConfigError
from kynara_sidecar.gateway import catalog as catalog_module
from kynara_sidecar.gateway.catalog import (
    _CHANGED,
    _CLOSED,
    _STOP,
    Catalog,
    CatalogTool,
    UpstreamError,
    _Upstream,
)
from kynara_sidecar.gateway.names import tool_name

# Bounds the waits for something the upstream does on its own time (a
# child starting, a re-list); a healthy run takes well under a second each.
WAIT_SECONDS = 30.0

BASE_TOOLS = ["add_tool", "deploy", "read", "slow", "write"]


def run(coro: Any) -> Any:
    """Run ``coro`` on uvloop, as the daemon does."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


class Changes:
    """Records on_change calls; lets a test wait for a state."""

    def __init__(self) -> None:
        self.servers: list[str] = []
        self._event = asyncio.Event()

    def __call__(self, server: str) -> None:
        self.servers.append(server)
        self._event.set()

    async def wait_for(self, condition: Callable[[], bool], what: str) -> None:
        async def until() -> None:
            while not condition():
                self._event.clear()
                await self._event.wait()

        try:
            await asyncio.wait_for(until(), WAIT_SECONDS)
        except TimeoutError:
            raise AssertionError(f"no {what} within {WAIT_SECONDS}s") from None


async def wait_logged(path: pathlib.Path, condition: Callable[[list], bool]) -> None:
    """Poll the upstream's call log until ``condition`` holds (bounded)."""
    for _ in range(int(WAIT_SECONDS / 0.02)):
        if condition(read_call_log(path)):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"call log never matched: {read_call_log(path)}")


def children_with(marker: str) -> list[int]:
    """PIDs of live processes whose environment holds ``marker``."""
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                status = (entry / "status").read_text()
                if "\nState:\tZ" not in status:
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def config(raw: dict[str, Any]) -> UpstreamConfig:
    return msgspec.convert(raw, UpstreamConfig)


@pytest.fixture(params=["stdio", "http"])
def transport(request) -> str:
    return request.param


@pytest.fixture
def upstreams(tmp_path) -> Iterator[Callable[..., dict[str, Any]]]:
    """Call with a transport and upstream_flags options; returns the
    UpstreamConfig dict. HTTP servers are stopped (by PID) at teardown."""
    started: list[HttpUpstream] = []

    def make(transport: str, call_log: pathlib.Path, **options: Any) -> dict[str, Any]:
        if transport == "stdio":
            return stdio_upstream_config(call_log, **options)
        upstream = start_http_upstream(tmp_path, call_log, **options)
        started.append(upstream)
        return upstream.config()

    yield make
    for upstream in started:
        upstream.stop()


def test_lists_every_page_and_names_tools(transport, upstreams, tmp_path):
    raw = upstreams(
        transport, tmp_path / "calls.log", extra_tools=7, page_size=3, dotted=True
    )
    changes = Changes()

    async def scenario():
        catalog = Catalog({"files": config(raw)}, on_change=changes)
        await catalog.start()
        try:
            return catalog.tools(), catalog.get("files__get_2Efile")
        finally:
            await catalog.stop()

    tools, dotted = run(scenario())

    upstream_names = BASE_TOOLS + [f"extra_{i:03d}" for i in range(7)] + ["get.file"]
    assert [tool.name.exposed for tool in tools] == sorted(
        tool_name("files", name).exposed for name in upstream_names
    )
    assert all(tool.definition.name == tool.name.exposed for tool in tools)
    assert dotted is not None
    assert dotted.name.tool == "get.file"
    assert dotted.name.action == "mcp.files.get_2Efile"
    assert dotted.definition.description == "Get a file (dotted name)."
    assert changes.servers == ["files"]


def test_call_sends_the_upstream_name_and_returns_its_result_unchanged(
    transport, upstreams, tmp_path
):
    log = tmp_path / "calls.log"
    raw = upstreams(transport, log, dotted=True)
    arguments = {"path": "/tmp/a", "content": "héllo", "extra": {"n": None}}

    async def scenario():
        catalog = Catalog({"files": config(raw)})
        await catalog.start()
        try:
            write = await catalog.call(catalog.get("files__write"), arguments)
            dotted = await catalog.call(catalog.get("files__get_2Efile"), None)
        finally:
            await catalog.stop()
        direct_params = raw["url"] if transport == "http" else None
        direct = None
        if direct_params is not None:
            async with Client(direct_params, cache=None) as client:
                direct = await client.call_tool("write", arguments)
        return write, dotted, direct

    write, dotted, direct = run(scenario())

    assert write.content[0].text == "wrote 6 bytes to /tmp/a"
    assert not write.is_error
    if direct is not None:
        assert write.model_dump() == direct.model_dump()
    assert dotted.content[0].text == "get.file"
    calls = read_call_log(log)
    assert calls[0] == {"tool": "write", "arguments": arguments}
    assert calls[1] == {"tool": "get.file", "arguments": {}}


def test_collision_within_one_upstream_is_refused_at_start(
    transport, upstreams, tmp_path
):
    raw = upstreams(transport, tmp_path / "calls.log", collide=True)

    async def scenario():
        catalog = Catalog({"files": config(raw)})
        await catalog.start()

    with pytest.raises(ConfigError) as refused:
        run(scenario())

    message = str(refused.value)
    assert "'get.file'" in message
    assert "'get_2Efile'" in message
    assert "'files__get_2Efile'" in message
    assert "server 'files'" in message


def test_collision_across_servers_is_refused_and_leaves_no_child(tmp_path):
    marker = str(tmp_path / "calls.log")
    raw = stdio_upstream_config(marker)

    async def scenario():
        catalog = Catalog({"a.b": config(raw), "a_2Eb": config(raw)})
        await catalog.start()

    with pytest.raises(ConfigError) as refused:
        run(scenario())

    assert "server 'a.b'" in str(refused.value)
    assert "server 'a_2Eb'" in str(refused.value)
    assert children_with(marker) == []


def test_tool_without_a_name_is_refused_at_start(tmp_path):
    raw = stdio_upstream_config(tmp_path / "calls.log", empty_name=True)

    async def scenario():
        await Catalog({"files": config(raw)}).start()

    with pytest.raises(ConfigError, match="gateway.servers.files: .*without a name"):
        run(scenario())


def test_list_changed_relists_and_calls_on_change(transport, upstreams, tmp_path):
    raw = upstreams(transport, tmp_path / "calls.log", page_size=2)
    changes = Changes()

    async def scenario():
        catalog = Catalog({"files": config(raw)}, on_change=changes)
        await catalog.start()
        try:
            assert catalog.get("files__late") is None
            await catalog.call(catalog.get("files__add_tool"), {})
            await changes.wait_for(
                lambda: catalog.get("files__late") is not None, "re-list"
            )
            return await catalog.call(catalog.get("files__late"), {})
        finally:
            await catalog.stop()

    late = run(scenario())

    assert late.content[0].text == "late"
    assert changes.servers == ["files", "files"]


async def _cancel_a_slow_call(catalog: Catalog, log: pathlib.Path) -> None:
    """Start a long ``files__slow`` call, cancel it once the upstream logged
    it, and return when the upstream logged the cancellation too."""
    call = asyncio.ensure_future(
        catalog.call(catalog.get("files__slow"), {"seconds": 60})
    )
    await wait_logged(log, lambda calls: len(calls) == 1)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await wait_logged(log, lambda calls: len(calls) == 2)


def test_cancelling_a_call_cancels_it_upstream(transport, upstreams, tmp_path):
    log = tmp_path / "calls.log"
    raw = upstreams(transport, log)

    async def scenario():
        catalog = Catalog({"files": config(raw)})
        await catalog.start()
        try:
            await _cancel_a_slow_call(catalog, log)
            # The connection stays usable after the cancellation.
            return await catalog.call(catalog.get("files__read"), {"path": "/p"})
        finally:
            await catalog.stop()

    after = run(scenario())

    assert read_call_log(log)[1] == {"tool": "slow", "cancelled": True}
    assert after.content[0].text == "contents of /p"


def test_upstream_errors_and_timeouts_are_upstream_errors(
    transport, upstreams, tmp_path
):
    log = tmp_path / "calls.log"
    raw = upstreams(transport, log) | {"timeout_seconds": 0.5}

    async def scenario():
        catalog = Catalog({"files": config(raw)})
        await catalog.start()
        try:
            unknown = CatalogTool(
                name=tool_name("files", "nope"),
                definition=catalog.get("files__read").definition,
            )
            with pytest.raises(UpstreamError) as refused:
                await catalog.call(unknown, {})
            with pytest.raises(UpstreamError) as timed_out:
                await catalog.call(catalog.get("files__slow"), {"seconds": 60})
            await wait_logged(log, lambda calls: len(calls) == 3)
            return refused.value, timed_out.value
        finally:
            await catalog.stop()

    refused, timed_out = run(scenario())

    # The upstream's own error, whole.
    assert refused.server == "files"
    assert refused.reason == "upstream_error"
    assert refused.error.code == INVALID_PARAMS
    assert refused.error.message == "unknown tool 'nope'"
    assert "upstream 'files'" in str(refused)
    # The gateway's deadline: no error of the upstream's.
    assert timed_out.reason == "upstream_unavailable"
    assert timed_out.error is None
    assert "tools/call 'slow' timed out after 0.5 s" in str(timed_out)
    assert read_call_log(log)[2] == {"tool": "slow", "cancelled": True}


def test_an_upstream_error_is_kept_whole_and_a_malformed_result_is_invalid(
    tmp_path,
):
    raw = with_flags(stdio_upstream_config(tmp_path / "calls.log"), "--faulty")

    async def scenario():
        catalog = Catalog({"files": config(raw)})
        await catalog.start()
        try:
            with pytest.raises(UpstreamError) as failed:
                await catalog.call(catalog.get("files__fail"), {})
            with pytest.raises(UpstreamError) as malformed:
                await catalog.call(catalog.get("files__malformed"), {})
            # Neither ends the connection.
            after = await catalog.call(catalog.get("files__read"), {"path": "/m"})
            return failed.value, malformed.value, after
        finally:
            await catalog.stop()

    failed, malformed, after = run(scenario())

    assert failed.reason == "upstream_error"
    assert (failed.error.code, failed.error.message, failed.error.data) == (
        FAIL_CODE,
        "failed on purpose",
        {"asked": True},
    )
    assert malformed.reason == "upstream_invalid"
    assert malformed.error is None
    assert "tools/call 'malformed' answered an invalid result" in str(malformed)
    assert "content" in malformed.detail
    assert after.content[0].text == "contents of /m"


def test_a_line_that_is_not_utf8_is_logged_and_the_stdio_upstream_still_answers(
    tmp_path, caplog
):
    raw = with_flags(
        stdio_upstream_config(tmp_path / "calls.log", timeout_seconds=10), "--faulty"
    )

    async def scenario():
        catalog = Catalog({"files": config(raw)})
        await catalog.start()
        try:
            garbage = await catalog.call(catalog.get("files__garbage"), {})
            after = await catalog.call(catalog.get("files__read"), {"path": "/g"})
            return garbage, after
        finally:
            await catalog.stop()

    with caplog.at_level(logging.WARNING, logger="kynara.gateway"):
        garbage, after = run(scenario())

    assert garbage.content[0].text == "garbage"
    assert after.content[0].text == "contents of /g"
    (logged,) = [
        r
        for r in caplog.records
        if r.getMessage() == "upstream sent a message that is not JSON-RPC; ignored"
    ]
    assert logged.fields["server"] == "files"


def test_handshake_era_upstream_is_served_alike(transport, upstreams, tmp_path):
    log = tmp_path / "calls.log"
    raw = upstreams(transport, log, handshake_only=True, page_size=2)
    changes = Changes()

    async def scenario():
        catalog = Catalog({"files": config(raw)}, on_change=changes)
        await catalog.start()
        try:
            await _cancel_a_slow_call(catalog, log)
            await catalog.call(catalog.get("files__add_tool"), {})
            await changes.wait_for(
                lambda: catalog.get("files__late") is not None, "re-list"
            )
            return [tool.name.tool for tool in catalog.tools()]
        finally:
            await catalog.stop()

    names = run(scenario())

    assert names == sorted(BASE_TOOLS + ["late"])
    assert read_call_log(log)[1] == {"tool": "slow", "cancelled": True}


def test_unreachable_upstream_is_logged_then_appears(tmp_path, caplog):
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    changes = Changes()
    started: list[HttpUpstream] = []

    async def scenario():
        catalog = Catalog(
            {"later": config({"transport": "http", "url": url, "timeout_seconds": 5})},
            on_change=changes,
        )
        await catalog.start()
        try:
            absent = catalog.tools()
            started.append(
                await asyncio.to_thread(start_http_upstream, tmp_path, None, port=port)
            )
            await changes.wait_for(lambda: bool(catalog.tools()), "upstream")
            read = await catalog.call(catalog.get("later__read"), {"path": "/x"})
            return absent, read
        finally:
            await catalog.stop()
            for upstream in started:
                upstream.stop()

    with caplog.at_level(logging.ERROR, logger="kynara.gateway"):
        absent, read = run(scenario())

    assert absent == ()
    assert read.content[0].text == "contents of /x"
    assert changes.servers == ["later"]
    unreachable = [
        r for r in caplog.records if r.getMessage() == "upstream unreachable"
    ]
    assert unreachable
    assert unreachable[0].fields["server"] == "later"
    assert unreachable[0].fields["error"]


def test_stdio_child_exit_drops_tools_and_reconnects(tmp_path):
    marker = str(tmp_path / "calls.log")
    changes = Changes()

    async def scenario():
        catalog = Catalog(
            {"files": config(stdio_upstream_config(marker))}, on_change=changes
        )
        await catalog.start()
        try:
            (child,) = children_with(marker)
            os.kill(child, signal.SIGKILL)
            await changes.wait_for(lambda: not catalog.tools(), "drop")
            await changes.wait_for(lambda: bool(catalog.tools()), "reconnect")
            (again,) = children_with(marker)
            read = await catalog.call(catalog.get("files__read"), {"path": "/y"})
            return child, again, read
        finally:
            await catalog.stop()

    child, again, read = run(scenario())

    assert again != child
    assert read.content[0].text == "contents of /y"
    assert changes.servers == ["files", "files", "files"]


@pytest.mark.parametrize("era", ["2026", "2026-no-listen", "handshake"])
def test_http_server_gone_drops_tools_and_reconnects(era, tmp_path):
    # No call is made: a 2026 connection's listen stream ends; a 2026 one
    # without tools.listChanged has no such stream and is probed with
    # server/discover, a handshake-era one is pinged (either every
    # timeout_seconds, here 2 s).
    handshake_only = era == "handshake"
    no_listen = era == "2026-no-listen"
    upstream = start_http_upstream(
        tmp_path, handshake_only=handshake_only, no_listen=no_listen
    )
    changes = Changes()
    restarted: list[HttpUpstream] = []

    async def scenario():
        catalog = Catalog(
            {"web": config(upstream.config(timeout_seconds=2))}, on_change=changes
        )
        await catalog.start()
        try:
            await asyncio.to_thread(upstream.stop)
            await changes.wait_for(lambda: not catalog.tools(), "drop")
            restarted.append(
                await asyncio.to_thread(
                    start_http_upstream,
                    tmp_path,
                    None,
                    port=upstream.port,
                    handshake_only=handshake_only,
                    no_listen=no_listen,
                )
            )
            await changes.wait_for(lambda: bool(catalog.tools()), "reconnect")
            return await catalog.call(catalog.get("web__read"), {"path": "/z"})
        finally:
            await catalog.stop()

    try:
        read = run(scenario())
    finally:
        upstream.stop()
        for server in restarted:
            server.stop()

    assert read.content[0].text == "contents of /z"
    assert changes.servers == ["web", "web", "web"]


def test_handshake_era_http_server_restarted_is_reconnected(tmp_path, caplog):
    # A server back on its port before the gateway looked again no longer
    # knows the gateway's session: its ping is refused and the gateway
    # connects afresh. It offers no GET stream, whose opening would make the
    # gateway re-list, a re-list that could see the restart before the ping.
    upstream = start_http_upstream(tmp_path, handshake_only=True, no_get_stream=True)
    changes = Changes()
    restarted: list[HttpUpstream] = []

    async def scenario():
        catalog = Catalog(
            {"web": config(upstream.config(timeout_seconds=2))}, on_change=changes
        )
        await catalog.start()
        try:
            # Blocking the event loop on purpose: the gateway sees nothing of
            # the restart, neither a ping nor a stream in between.
            upstream.stop()
            restarted.append(
                start_http_upstream(
                    tmp_path,
                    None,
                    port=upstream.port,
                    handshake_only=True,
                    no_get_stream=True,
                )
            )
            await changes.wait_for(lambda: len(changes.servers) == 3, "reconnect")
            return await catalog.call(catalog.get("web__read"), {"path": "/r"})
        finally:
            await catalog.stop()

    try:
        with caplog.at_level(logging.ERROR, logger="kynara.gateway"):
            read = run(scenario())
    finally:
        upstream.stop()
        for server in restarted:
            server.stop()

    assert read.content[0].text == "contents of /r"
    assert changes.servers == ["web", "web", "web"]
    (lost,) = [r for r in caplog.records if r.getMessage() == "upstream lost"]
    assert "ping failed" in lost.fields["error"]
    assert "Session not found" in lost.fields["error"]


def test_call_to_a_restarted_handshake_era_http_server_reconnects(
    tmp_path, caplog, monkeypatch
):
    # The server, restarted, answers the gateway's session id with HTTP 404
    # (JSON-RPC -32600 "Session not found"). No ping runs during the test and
    # the server offers no GET stream (whose opening makes the gateway
    # re-list), so only the failed call can end the connection.
    monkeypatch.setattr(catalog_module, "MAX_PING_SECONDS", 3600.0)
    upstream = start_http_upstream(tmp_path, handshake_only=True, no_get_stream=True)
    changes = Changes()
    restarted: list[HttpUpstream] = []

    async def scenario():
        catalog = Catalog(
            {"web": config(upstream.config(timeout_seconds=3600))}, on_change=changes
        )
        await catalog.start()
        try:
            # Blocking the event loop on purpose: the gateway sees nothing of
            # the restart before its call.
            upstream.stop()
            restarted.append(
                start_http_upstream(
                    tmp_path,
                    None,
                    port=upstream.port,
                    handshake_only=True,
                    no_get_stream=True,
                )
            )
            with pytest.raises(UpstreamError) as failed:
                await catalog.call(catalog.get("web__read"), {"path": "/s"})
            await changes.wait_for(lambda: len(changes.servers) == 3, "reconnect")
            read = await catalog.call(catalog.get("web__read"), {"path": "/s"})
            return failed.value, read
        finally:
            await catalog.stop()

    try:
        with caplog.at_level(logging.ERROR, logger="kynara.gateway"):
            failed, read = run(scenario())
    finally:
        upstream.stop()
        for server in restarted:
            server.stop()

    assert failed.reason == "upstream_unavailable"
    assert failed.error is None
    assert "tools/call 'read'" in str(failed)
    assert "session" in failed.detail
    assert read.content[0].text == "contents of /s"
    assert changes.servers == ["web", "web", "web"]
    (lost,) = [r for r in caplog.records if r.getMessage() == "upstream lost"]
    assert "tools/call 'read'" in lost.fields["error"]


def test_a_closed_signal_is_not_lost_behind_tool_list_changes():
    # However many "tools changed" arrive before the task reads them, a
    # "closed" and a "stop" after them still arrive; the changes coalesce.
    upstream = _Upstream("files", config(stdio_upstream_config()))

    async def scenario():
        for _ in range(100):
            upstream.signal(_CHANGED)
        upstream.signal(_CLOSED)
        upstream.signal(_STOP)
        events = [await upstream.next_event() for _ in range(3)]
        # A change signalled after the task took the last one is queued anew.
        upstream.signal(_CHANGED)
        events.append(await upstream.next_event())
        upstream.close_events()
        return events

    events = run(scenario())

    assert events == [_CHANGED, _CLOSED, _STOP, _CHANGED]


def test_list_changed_before_the_stream_opens_is_not_lost(tmp_path):
    # The upstream announces a new tool right after its first tools/list,
    # before the handshake-era client's standalone GET stream is open (it
    # holds the GET until then), so the announcement itself is lost.
    upstream = start_http_upstream(tmp_path, handshake_only=True, announce_early=True)
    lists: list[list[str]] = []
    changes = Changes()

    async def scenario():
        catalog: Catalog

        def changed(server: str) -> None:
            lists.append([tool.name.tool for tool in catalog.tools()])
            changes(server)

        catalog = Catalog({"web": config(upstream.config())}, on_change=changed)
        await catalog.start()
        try:
            await changes.wait_for(
                lambda: catalog.get("web__late") is not None, "re-list"
            )
            return await catalog.call(catalog.get("web__late"), {})
        finally:
            await catalog.stop()

    try:
        late = run(scenario())
    finally:
        upstream.stop()

    assert late.content[0].text == "late"
    assert lists == [BASE_TOOLS, sorted(BASE_TOOLS + ["late"])]


def test_stop_leaves_no_child_and_no_task(tmp_path):
    marker = str(tmp_path / "calls.log")

    async def scenario():
        catalog = Catalog(
            {
                "one": config(stdio_upstream_config(marker)),
                "two": config(stdio_upstream_config(marker, dotted=True)),
            }
        )
        await catalog.start()
        running = children_with(marker)
        await catalog.stop()
        tasks = [
            task.get_name()
            for task in asyncio.all_tasks()
            if task.get_name().startswith("kynara-upstream-")
        ]
        return running, tasks

    running, tasks = run(scenario())

    assert len(running) == 2
    assert children_with(marker) == []
    assert tasks == []
