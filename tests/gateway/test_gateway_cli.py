"""Seeing the gateway's names: ``kynara-sidecar gateway --list-tools``, the
daemon's log of each tool's names at start, the warnings for a tool no rule
names and for a gateway port without upstreams, and the MCP SDK's log lines
as JSON.

``--list-tools`` runs as an operator runs it (a process, the shipped config
with overrides) against the test upstream (a stdio child, or nothing on a
free loopback port for the unreachable case); the daemon cases start a real
daemon in-process and read its log records.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import subprocess
import sys
from typing import Any

import pytest
import yaml
from gateway_support import POLICIES, REPO_ROOT, GatewaySetup, start_gateway
from support import SHIPPED_CONFIG, free_port
from upstream_support import stdio_upstream_config

from kynara_sidecar.config import DEFAULT_CONFIG_ENV, load_config
from kynara_sidecar.errors import ConfigError

CLI = [sys.executable, "-m", "kynara_sidecar.cli"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != DEFAULT_CONFIG_ENV}
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
        env=env,
    )


def _list_tools(servers: dict[str, Any], *sets: str) -> subprocess.CompletedProcess:
    overrides = [
        f"policy.source={POLICIES}",
        f"gateway.servers={json.dumps(servers)}",
        *sets,
    ]
    args = ["gateway", "--list-tools", "--config", str(SHIPPED_CONFIG)]
    for item in overrides:
        args += ["--set", item]
    return _cli(*args)


def _matches(pattern: str, name: str) -> bool:
    """A rule's action or kind pattern against a name, as the README says:
    exact, ``prefix.*`` for children, or ``*``."""
    if pattern == "*":
        return True
    if pattern.endswith(".*"):
        return name.startswith(pattern[:-1])
    return pattern == name


def _rules_naming(action: str) -> int:
    """Enforced rules of tests/gateway/policies whose patterns match
    ``action`` on ``mcp.tool``, counted from the YAML itself."""
    count = 0
    for path in sorted(POLICIES.glob("*.yaml")):
        document = yaml.safe_load(path.read_text())
        if document.get("kind") != "policy":
            continue
        for rule in document.get("rules", []):
            if "shadow" in (document.get("mode"), rule.get("mode")):
                continue
            if any(_matches(p, "mcp.tool") for p in rule["resources"]) and any(
                _matches(p, action) for p in rule["actions"]
            ):
                count += 1
    return count


def test_list_tools_prints_every_tools_names_and_the_rules_naming_it(tmp_path):
    servers = {
        "files": {
            **stdio_upstream_config(dotted=True),
            # No rule names this action: rules 0.
            "actions": {"deploy": "ops.service.deploy"},
        }
    }

    result = _list_tools(servers)

    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    by_tool = {row["tool"]: row for row in rows}
    assert sorted(by_tool) == [
        "add_tool",
        "deploy",
        "get.file",
        "read",
        "slow",
        "write",
    ]
    assert [row["exposed"] for row in rows] == sorted(row["exposed"] for row in rows)
    assert by_tool["get.file"] == {
        "exposed": "files__get_2Efile",
        "server": "files",
        "tool": "get.file",
        "action": "mcp.files.get_2Efile",
        "resource_id": "files.get_2Efile",
        "rules": _rules_naming("mcp.files.get_2Efile"),
    }
    assert by_tool["deploy"]["action"] == "ops.service.deploy"
    assert by_tool["deploy"]["resource_id"] == "files.deploy"
    assert by_tool["deploy"]["rules"] == 0
    for tool in ("add_tool", "read", "slow", "write"):
        row = by_tool[tool]
        assert row["exposed"] == f"files__{tool}"
        assert row["action"] == f"mcp.files.{tool}"
        assert row["rules"] == _rules_naming(row["action"]) > 0
    # Named by no rule of its own, only by the ops rule's mcp.files.*.
    assert by_tool["get.file"]["rules"] > 0


def test_list_tools_refuses_an_unreachable_upstream_naming_it():
    url = f"http://127.0.0.1:{free_port()}/mcp"
    servers = {"web": {"transport": "http", "url": url, "timeout_seconds": 5}}

    result = _list_tools(servers)

    assert result.returncode == 1
    assert result.stdout == ""
    assert "upstream 'web' could not be reached" in result.stderr


def test_list_tools_refuses_two_tools_with_one_name():
    result = _list_tools({"files": stdio_upstream_config(collide=True)})

    assert result.returncode == 1
    assert result.stdout == ""
    assert "both come out as tool name 'files__get_2Efile'" in result.stderr


def test_list_tools_without_upstreams_says_so():
    result = _cli("gateway", "--list-tools", "--config", str(SHIPPED_CONFIG))

    assert result.returncode == 1
    assert "gateway.servers: expected at least one upstream" in result.stderr


@pytest.fixture
def setup(tmp_path) -> Any:
    setup = GatewaySetup(tmp_path)
    yield setup
    setup.close()


def test_the_daemon_logs_each_tools_names_and_warns_of_a_tool_no_rule_names(
    setup, caplog
):
    servers = {
        "files": {**stdio_upstream_config(), "actions": {"deploy": "ops.deploy"}}
    }
    with caplog.at_level(logging.INFO, logger="kynara.daemon"):
        daemon = start_gateway(setup, servers)
        daemon.stop()

    named = {
        r.fields["exposed"]: r.fields
        for r in caplog.records
        if r.getMessage() == "gateway tool named"
    }
    assert sorted(named) == [
        "files__add_tool",
        "files__deploy",
        "files__read",
        "files__slow",
        "files__write",
    ]
    assert named["files__read"]["action"] == "mcp.files.read"
    assert named["files__read"]["resource_id"] == "files.read"
    assert named["files__deploy"]["action"] == "ops.deploy"
    warned = [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and "no rule names" in r.getMessage()
    ]
    assert [r.fields["action"] for r in warned] == ["ops.deploy"]
    assert warned[0].fields["exposed"] == "files__deploy"
    assert warned[0].fields["resource_kind"] == "mcp.tool"
    assert "every agent is denied it" in warned[0].getMessage()


def test_a_gateway_port_without_upstreams_is_warned(start_daemon, caplog):
    with caplog.at_level(logging.WARNING, logger="kynara.daemon"):
        running = start_daemon("gateway.port=0")

    assert running.daemon.gateway_port is None
    (record,) = [r for r in caplog.records if r.getMessage().startswith("gateway off")]
    assert record.fields["setting"] == "gateway.servers"
    assert record.fields["port"] == 0


def test_no_port_and_no_upstreams_is_no_warning(start_daemon, caplog):
    with caplog.at_level(logging.WARNING, logger="kynara.daemon"):
        start_daemon()

    assert not [r for r in caplog.records if r.getMessage().startswith("gateway off")]


_LOGGING_PROGRAM = """
import logging, sys
from kynara_sidecar.logs import configure_logging
configure_logging(sys.argv[1])
logging.getLogger("mcp.server.streamable_http").warning("session %s gone", "s1")
logging.getLogger("mcp.client.stdio").info("child started")
logging.getLogger("mcp.client.stdio").debug("chatty")
logging.getLogger("kynara.gateway").info("gateway listening")
"""


def _log_lines(level: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        [sys.executable, "-c", _LOGGING_PROGRAM, level],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    # Every line is one JSON object: nothing in another format.
    return [json.loads(line) for line in result.stderr.splitlines()]


def test_the_mcp_sdks_log_lines_are_json_at_warning_unless_debug():
    lines = _log_lines("info")

    assert [(line["logger"], line["level"], line["msg"]) for line in lines] == [
        ("mcp.server.streamable_http", "warning", "session s1 gone"),
        ("kynara.gateway", "info", "gateway listening"),
    ]
    assert all(re.fullmatch(r"\d{4}-.*Z", line["time"]) for line in lines)

    debug = _log_lines("debug")
    assert [line["msg"] for line in debug if line["logger"].startswith("mcp")] == [
        "session s1 gone",
        "child started",
        "chatty",
    ]


def test_a_gateway_host_off_loopback_is_refused_saying_why():
    with pytest.raises(ConfigError) as info:
        load_config(SHIPPED_CONFIG, ["gateway.port=8765", "gateway.host=0.0.0.0"])

    message = str(info.value)
    assert "gateway.host: expected a loopback address" in message
    assert "plain HTTP" in message
    assert "carries no credentials" not in message


def _uncommented_gateway_block() -> str:
    """config/kynara.yaml with its commented ``gateway:`` example block
    uncommented (the block runs from ``# gateway:`` to the first line that is
    not a commented, indented continuation)."""
    lines = SHIPPED_CONFIG.read_text().splitlines()
    start = lines.index("# gateway:")
    end = start + 1
    while end < len(lines) and lines[end].startswith("#   "):
        end += 1
    block = [line[2:] for line in lines[start:end]]
    return "\n".join(lines[:start] + block + lines[end:]) + "\n"


def test_the_shipped_gateway_example_loads_when_uncommented(tmp_path):
    path = tmp_path / "kynara.yaml"
    path.write_text(_uncommented_gateway_block())

    config = load_config(path)

    gateway = config.gateway
    assert gateway.enabled and gateway.port == 8765
    assert sorted(gateway.servers) == ["files", "web"]
    assert gateway.servers["files"].transport == "stdio"
    assert gateway.servers["web"].url == "http://127.0.0.1:9000/mcp"
    assert pathlib.Path(REPO_ROOT, gateway.servers["files"].command[1]).is_file()
