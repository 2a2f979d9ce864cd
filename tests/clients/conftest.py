"""Fixtures for the SDK tests: a scripted daemon on a Unix socket in tmp_path."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import kynara_sdk
import pytest
from integration_support import reviewer_settings
from sdk_scripted import ScriptedDaemon

# sun_path holds 108 bytes; long test names can push tmp_path past it.
MAX_SOCKET_PATH = 100


@pytest.fixture
def socket_dir(tmp_path):
    if len(str(tmp_path)) < MAX_SOCKET_PATH - len("/kynara.sock"):
        yield tmp_path
        return
    short = Path(tempfile.mkdtemp(prefix="kysdk-"))
    yield short
    shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def daemon(socket_dir):
    scripted = ScriptedDaemon(socket_dir / "kynara.sock")
    scripted.start()
    yield scripted
    scripted.stop()


@pytest.fixture
def client(daemon):
    with kynara_sdk.Client(daemon.target, timeout=5.0) as sync_client:
        yield sync_client


@pytest.fixture
def absent_target(socket_dir):
    """A Unix socket path nobody listens on."""
    return f"unix://{socket_dir / 'absent.sock'}"


@pytest.fixture(autouse=True)
def _fresh_default_clients(monkeypatch):
    monkeypatch.delenv(kynara_sdk.TARGET_ENV, raising=False)
    yield
    kynara_sdk.close_default_clients()


@pytest.fixture
def running(start_daemon, socket_dir):
    """A real daemon (tests/conftest.py's start_daemon) with carol reviewing
    on its admin socket, so a test can ``approve``."""
    return start_daemon(*reviewer_settings(socket_dir), path=socket_dir)
