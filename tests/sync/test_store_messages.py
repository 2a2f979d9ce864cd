"""What a store's errors tell the operator: the setting whose timeout ran
out (the daemon's, the collector's or the CLI's), and the subject a NATS
server refused as the code spells it (the client lowercases its own
report of it). Real stores: a directory in tmp_path, a silent loopback
port, a real nats-server with per-daemon users (test_nats_auth's)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading

import pytest
from support import REPO_ROOT

from kynara_sidecar.sync import StoreUnavailable, daemon_token, open_store
from sync.test_nats_auth import DAEMON_B, _store, fleet_server, run, site

# The fixtures this module borrows, used by name below.
__all__ = ["fleet_server", "site"]


def test_a_dir_store_names_the_timeout_key_its_caller_gave(tmp_path):
    store = open_store(
        f"dir://{tmp_path}", timeout=0.05, timeout_key="store.timeout_seconds"
    )
    release = threading.Event()

    async def hung() -> None:
        # A call that outlasts the timeout, as on a hung mount; released
        # once the store gave up on it.
        await store._call("read current bundle", lambda: release.wait(30))

    try:
        with pytest.raises(StoreUnavailable) as failed:
            asyncio.run(hung())
    finally:
        release.set()
    assert "(store.timeout_seconds)" in str(failed.value)
    assert "sync.timeout_seconds" not in str(failed.value)


def test_a_dir_store_names_the_daemons_key_by_default(tmp_path):
    store = open_store(f"dir://{tmp_path}", timeout=0.05)
    release = threading.Event()

    async def hung() -> None:
        await store._call("read current bundle", lambda: release.wait(30))

    try:
        with pytest.raises(StoreUnavailable, match=r"\(sync\.timeout_seconds\)"):
            asyncio.run(hung())
    finally:
        release.set()


def test_a_nats_store_names_the_timeout_key_its_caller_gave():
    # A loopback port that accepts and never speaks: the connect runs out.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        store = open_store(
            f"nats://127.0.0.1:{port}", timeout=0.3, timeout_key="store.timeout_seconds"
        )

        async def connect() -> None:
            try:
                await store.connect()
            finally:
                await store.close()

        with pytest.raises(StoreUnavailable) as failed:
            asyncio.run(connect())
    assert "no answer within 0.3 s (store.timeout_seconds)" in str(failed.value)


def test_a_refusal_names_the_subject_as_sent_beside_the_lowercased_one(
    fleet_server, site
):
    token_b = daemon_token(DAEMON_B)
    assert token_b != token_b.lower(), "the example needs a mixed-case token"

    async def scenario() -> str:
        collector = _store(fleet_server, site.connection("collector"))
        await collector.connect()  # creates the stream and buckets
        await collector.close()
        # Daemon a's user may write its own status only.
        daemon = _store(fleet_server, site.connection("a"))
        try:
            with pytest.raises(StoreUnavailable, match="refused by the server") as info:
                await daemon.put_status(DAEMON_B, b"{}")
        finally:
            await daemon.close()
        return str(info.value)

    message = run(scenario())
    assert f"$kv.kynara_status.{token_b.lower()}" in message  # the client's report
    assert "lowercased" in message
    assert f"this call publishes to $KV.kynara_status.{token_b}" in message


def test_an_unknown_key_in_a_nats_file_is_named_with_its_file_and_line(tmp_path):
    settings = tmp_path / "publisher-nats.yaml"
    settings.write_text("# the publisher's settings\nuser: publisher\nusers: x\n")

    fleet = subprocess.run(
        [
            sys.executable,
            "-m",
            "kynara_sidecar.cli",
            "fleet",
            "status",
            "--store",
            f"dir://{tmp_path}",
            "--nats",
            str(settings),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )

    assert fleet.returncode != 0
    assert f"--nats {settings}:3: " in fleet.stderr
    assert "unknown field `users`" in fleet.stderr
