"""The collector's configuration errors, and ``kynara-collector run`` as a
real process that SIGTERM stops cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml
from support import free_port

from kynara_sidecar.audit.keys import generate_key, save_public_key
from kynara_sidecar.collector.config import load_collector_config, load_directory_key
from kynara_sidecar.errors import ConfigError

WAIT_SECONDS = 30.0


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "bot.pub"
    save_public_key(generate_key().public(), path)
    return str(path)


def _write(tmp_path, raw) -> str:
    path = tmp_path / "collector.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _pull(daemon_id: str, target: str) -> dict:
    return {"daemon_id": daemon_id, "target": target, "credential_file": "s"}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"stores": {}}, r"Object contains unknown field `stores`"),
        ({"store": {"url": "http://x"}}, r"store.url: expected dir://PATH or nats"),
        ({"store": {"url": "nats://"}}, r"store.url: the store URL 'nats://' names no"),
        ({"store": {"consumer": "a b"}}, r"store.consumer: consumer name 'a b'"),
        (
            {"store": {"ack_wait_seconds": 0.5}},
            r"store.ack_wait_seconds: expected 1..3600, got 0.5",
        ),
        ({"archive": {"url": "ftp://x"}}, r"archive.url: expected dir://PATH or s3"),
        ({"http": {"host": "0.0.0.0"}}, r"http.host: expected a loopback address"),
        ({"daemons": {"bot": {}}}, r"daemons.bot.public_keys: expected a key file"),
        (
            {"pull": [_pull("nobody", "unix:///a")]},
            r"pull\[0\].daemon_id: 'nobody' is not registered",
        ),
        (
            {"pull": [_pull("bot", "10.0.0.5:50153")]},
            r"pull\[0\].target: expected a loopback HOST:PORT without "
            r"pull\[0\].ca_file",
        ),
        # A name that merely starts like a loopback address.
        (
            {"http": {"host": "127.attacker.example"}},
            r"http.host: expected a loopback address",
        ),
        (
            {"pull": [{**_pull("bot", "unix:///a"), "ca_file": "/ca.pem"}]},
            r"pull\[0\].ca_file: expected a HOST:PORT target with TLS",
        ),
        (
            {"pull": [_pull("bot", "127.attacker.example:50153")]},
            r"pull\[0\].target: expected a loopback HOST:PORT without "
            r"pull\[0\].ca_file",
        ),
    ],
)  # fmt: skip
def test_bad_config_is_refused_naming_the_key(tmp_path, key_file, raw, expected):
    raw = {"daemons": {"bot": {"public_keys": [key_file]}}, **raw}

    with pytest.raises(ConfigError, match=expected):
        load_collector_config(_write(tmp_path, raw))


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_http_hosts_are_accepted(tmp_path, key_file, host):
    raw = {"daemons": {"bot": {"public_keys": [key_file]}}, "http": {"host": host}}

    assert load_collector_config(_write(tmp_path, raw)).http.host == host


@pytest.mark.parametrize(
    ("daemon_id", "expected"),
    [
        ("x" * 129, r"daemons: expected a daemon id of 1 to 128 printable ASCII"),
        ("bot\n1", r"daemons: expected a daemon id of 1 to 128 printable ASCII"),
        ("", r"daemons: expected a daemon id of 1 to 128"),
    ],
)
def test_registered_daemon_id_past_what_the_state_carries_is_refused(
    tmp_path, key_file, daemon_id, expected
):
    raw = {"daemons": {daemon_id: {"public_keys": [key_file]}}}

    with pytest.raises(ConfigError, match=expected):
        load_collector_config(_write(tmp_path, raw))


def test_registered_daemon_id_of_128_characters_is_accepted(tmp_path, key_file):
    raw = {"daemons": {"b" * 128: {"public_keys": [key_file]}}}

    assert list(load_collector_config(_write(tmp_path, raw)).daemons) == ["b" * 128]


def test_daemon_identity_daemon_id_is_bounded(tmp_path):
    from support import daemon_config

    with pytest.raises(
        ConfigError, match=r"identity.daemon_id: expected a daemon id of 1 to 128"
    ):
        daemon_config(tmp_path, f"identity.daemon_id={'d' * 129}")

    assert daemon_config(tmp_path, "identity.daemon_id=d-1").identity.daemon_id == "d-1"


def test_unreadable_key_file_names_the_daemon(tmp_path):
    raw = {"daemons": {"bot": {"public_keys": [str(tmp_path / "missing.pub")]}}}
    config = load_collector_config(_write(tmp_path, raw))

    with pytest.raises(ConfigError, match=r"daemons.bot.public_keys: .*missing.pub"):
        config.registered_keys()


def test_run_serves_until_sigterm_then_stops_cleanly(tmp_path, key_file):
    port = free_port()
    config = _write(
        tmp_path,
        {
            "daemons": {"bot": {"public_keys": [key_file]}},
            "archive": {"url": f"dir://{tmp_path / 'archive'}"},
            "state": {"path": str(tmp_path / "state"), "map_size": 1 << 24},
            "http": {"port": port},
        },
    )
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kynara_sidecar.collector.cli",
            "run",
            "--config",
            config,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        body = _wait_http(f"http://127.0.0.1:{port}/daemons", process)
        assert json.loads(body)["daemons"][0]["daemon_id"] == "bot"
        # Nothing to reload: logged, and the collector serves on.
        os.kill(process.pid, signal.SIGHUP)
        _wait_http(f"http://127.0.0.1:{port}/daemons", process)

        os.kill(process.pid, signal.SIGTERM)
        _, stderr = process.communicate(timeout=WAIT_SECONDS)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)

    assert process.returncode == 0, stderr
    messages = [json.loads(line)["msg"] for line in stderr.splitlines()]
    assert any(m.startswith("SIGHUP ignored") for m in messages), messages
    # HTTP first: no write is answered once the doors are stopping.
    assert messages[-4:] == [
        "stopping: http",
        "stopping: doors",
        "stopping: state",
        "collector stopped",
    ]


def _wait_http(url: str, process: subprocess.Popen) -> bytes:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"collector exited: {process.stderr.read()!r}")
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                return reply.read()
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"collector never answered on {url}")


def test_directory_signing_key_pointed_at_the_public_key_says_it_is_public(
    tmp_path, key_file
):
    # keygen's pair: bot.pem beside bot.pub; the public one is mode 0644.
    os.chmod(key_file, 0o644)
    raw = {"directory": {"signing_key": key_file}}
    config = load_collector_config(_write(tmp_path, raw))

    with pytest.raises(ConfigError) as caught:
        load_directory_key(config)

    assert str(caught.value) == (
        f"directory.signing_key: {key_file}: this is a public key; expected the "
        "private key (made by keygen as NAME.pem beside NAME.pub)"
    )
