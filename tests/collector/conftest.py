"""Fixtures for the collector tests: a collector state in tmp_path, running
collectors and AuditService servers stopped at teardown, and moto's
standalone S3 server on loopback (no real S3 runs here), started as a
subprocess and stopped by PID."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from support import free_port

from kynara_sidecar.collector.state import CollectorState

from .test_collector import AdminServer, RunningCollector

# moto_server starts in about a second here; a slow CI machine gets more.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


@pytest.fixture
def state(tmp_path):
    """A collector state opened in tmp_path/state, closed at teardown."""
    opened = CollectorState.open(tmp_path / "state", map_size=1 << 26)
    yield opened
    opened.close()


@pytest.fixture
def start_collector():
    """Call with a config file; returns a RunningCollector stopped at
    teardown, the last started first."""
    started: list[RunningCollector] = []

    def start(config_path: pathlib.Path) -> RunningCollector:
        running = RunningCollector(config_path)
        started.append(running)
        return running

    yield start
    for running in reversed(started):
        running.stop()


@pytest.fixture
def admin_server(tmp_path):
    """Call with a daemon's log path (and a (cert PEM, key PEM) pair for TLS
    off the socket); returns an AdminServer serving it, stopped at
    teardown."""
    started: list[AdminServer] = []

    def start(
        log_path: pathlib.Path, tls: tuple[bytes, bytes] | None = None
    ) -> AdminServer:
        server = AdminServer(log_path, tmp_path / "admin.sock", tls)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def _moto_server() -> str:
    found = shutil.which("moto_server", path=os.path.dirname(sys.executable))
    if found is None:
        pytest.fail(
            "moto_server is not installed: run scripts/setup --test (the test "
            "extra has moto[server])"
        )
    return found


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


@pytest.fixture
def s3_server(tmp_path, monkeypatch):
    """The endpoint URL of a moto S3 server on 127.0.0.1, with the AWS
    variables set to its dummy credentials."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    with open(tmp_path / "moto.log", "wb") as log:
        process = subprocess.Popen(
            [_moto_server(), "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _answers(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"moto_server did not answer on {url}: "
                    f"{(tmp_path / 'moto.log').read_text(errors='replace')[-2000:]}"
                )
            time.sleep(0.05)
        yield url
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=STOP_TIMEOUT)


@pytest.fixture
def s3_bucket(s3_server):
    """A new bucket on the moto server; returns (endpoint_url, bucket)."""
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="kynara-audit")
    return s3_server, "kynara-audit"
