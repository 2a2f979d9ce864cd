"""Shared fixtures: a real daemon on a Unix socket in a temp directory."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest
from nats_support import NatsServer
from store_support import Backend
from support import RunningDaemon, SettableClock, daemon_config


@pytest.fixture
def clock() -> SettableClock:
    return SettableClock()


@pytest.fixture
def start_daemon(tmp_path, clock) -> Iterator:
    """Call with config overrides; returns a RunningDaemon stopped at teardown."""
    started: list[RunningDaemon] = []

    def start(*overrides: str, path: pathlib.Path | None = None) -> RunningDaemon:
        config = daemon_config(path or tmp_path, *overrides)
        running = RunningDaemon(config, clock)
        started.append(running)
        return running

    yield start
    for running in reversed(started):
        running.stop()


@pytest.fixture
def daemon(start_daemon) -> RunningDaemon:
    return start_daemon()


@pytest.fixture
def nats_server(tmp_path) -> Iterator[NatsServer]:
    """A real nats-server -js on loopback, store in tmp_path; stopped (by
    PID) at teardown."""
    server = NatsServer(tmp_path)
    yield server
    server.stop()


@pytest.fixture(params=["dir", "nats"])
def backend(request, tmp_path) -> Backend:
    """A directory store (its outage: the directory moved away) and a NATS
    one (its outage: the server stopped)."""
    if request.param == "dir":
        root = tmp_path / "store"
        root.mkdir()
        away = tmp_path / "store-away"
        return Backend(
            "dir",
            f"dir://{root}",
            outage=lambda: root.rename(away),
            restore=lambda: away.rename(root),
        )
    server = request.getfixturevalue("nats_server")
    return Backend("nats", server.url, outage=server.stop, restore=server.start)
