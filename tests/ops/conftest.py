"""Fixtures for the operations tests: a real daemon process (ops_daemon.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from ops_daemon import DaemonProcess


@pytest.fixture
def daemon_process(tmp_path) -> Iterator[DaemonProcess]:
    """``kynara-sidecar run`` on the shipped config in tmp_path, logging JSON
    (the default); stopped at teardown if the test has not stopped it."""
    running = DaemonProcess(tmp_path)
    yield running
    running.stop()
