"""A daemon's stop ends whatever its central store does.

A ``dir://`` store whose ``bundles/current`` is a FIFO stands in for a hung
NFS mount: opening it blocks the calling thread for good, and no
cancellation reaches it. The daemon is the real CLI in a subprocess, so
the process exit (which would join stuck threads forever) is tested too.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

from support import REPO_ROOT, SHIPPED_CONFIG, SHIPPED_POLICIES

from kynara_sidecar.audit.keys import generate_key, save_public_key
from kynara_sidecar.decision import Timestamp
from kynara_sidecar.sync.bundle import build_bundle

CLI = [sys.executable, "-m", "kynara_sidecar.cli"]
# Conditions are waited on, never slept for; these only bound a broken run.
WAIT_SECONDS = 30.0
GRACE_SECONDS = 2


def log_lines(path) -> list[dict]:
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue  # a traceback line would show in the failure message
    return lines


def wait_for_log(process, path, what) -> list[dict]:
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        lines = log_lines(path)
        if any(what(line) for line in lines):
            return lines
        assert process.poll() is None, path.read_text()
        assert time.monotonic() < deadline, f"no such log line:\n{path.read_text()}"
        time.sleep(0.05)


def test_sigterm_ends_the_daemon_while_a_store_call_hangs(tmp_path):
    store = tmp_path / "store"
    (store / "bundles").mkdir(parents=True)
    key = generate_key()
    save_public_key(key.public(), tmp_path / "bundle.pub")
    now = Timestamp(time.time_ns() // 1_000_000_000 - 60)
    data = build_bundle(SHIPPED_POLICIES, key, now)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (store / "bundles" / digest.replace(":", "-")).write_bytes(data)
    (store / "bundles" / "current").write_text(digest + "\n")
    log = tmp_path / "daemon.log"
    overrides = [
        f"agent.socket={tmp_path / 'agent.sock'}",
        f"agent.fast_socket={tmp_path / 'agent.fast.sock'}",
        "agent.port=0",
        "health.port=0",
        "http.port=0",
        f"admin.socket={tmp_path / 'admin.sock'}",
        f"audit.path={tmp_path / 'audit'}",
        f"audit.signing_key={tmp_path / 'keys' / 'audit.pem'}",
        f"audit.witness_path={tmp_path / 'witness'}",
        "audit.map_size=67108864",
        f"policy.source=dir://{store}",
        f"policy.trusted_keys=[{tmp_path / 'bundle.pub'}]",
        "sync.timeout_seconds=0.2",
        "sync.poll_seconds=0.05",
        f"shutdown_grace_seconds={GRACE_SECONDS}",
    ]
    with log.open("w") as out:
        process = subprocess.Popen(
            [*CLI, "run", "--config", str(SHIPPED_CONFIG)]
            + [arg for o in overrides for arg in ("--set", o)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        )
    try:
        wait_for_log(process, log, lambda line: line["msg"] == "serving")
        # The hung mount: every read of `current` now blocks its thread.
        (store / "bundles" / "current").unlink()
        os.mkfifo(store / "bundles" / "current")
        wait_for_log(process, log, lambda line: line.get("outcome") == "unreachable")

        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=WAIT_SECONDS)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert returncode == 0, log.read_text()
    messages = [line["msg"] for line in log_lines(log)]
    assert "audit log closed" in messages, log.read_text()
    assert messages.index("stopping") < messages.index("stopped")
