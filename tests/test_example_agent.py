"""End to end as a user runs it: the CLI daemon, the example agent, verify."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import lmdb
import pytest
from support import REPO_ROOT, wait_serving

CLI = [sys.executable, "-m", "kynara_sidecar.cli"]
EXAMPLE = REPO_ROOT / "clients" / "python" / "examples" / "refund_agent.py"
START_TIMEOUT = 30.0


@pytest.fixture
def cli_daemon(tmp_path):
    """`kynara-sidecar run` on the shipped config, moved into tmp_path."""
    socket = tmp_path / "agent.sock"
    audit = tmp_path / "audit"
    log_path = tmp_path / "daemon.log"
    log_file = log_path.open("w")
    process = subprocess.Popen(
        [
            *CLI, "run", "--config", "config/kynara.yaml",
            "--set", f"agent.socket={socket}", "--set", "agent.port=0",
            "--set", f"agent.fast_socket={tmp_path / 'agent.fast.sock'}",
            "--set", "health.port=0", "--set", "http.port=0",
            "--set", f"audit.path={audit}", *_key_and_witness(tmp_path),
        ],
        cwd=REPO_ROOT, stderr=log_file,
    )  # fmt: skip
    target = f"unix://{socket}"
    try:
        wait_serving(target, process, log_path)
        yield process, target, audit
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log_file.close()


def _key_and_witness(tmp_path) -> list[str]:
    # Kept in tmp_path: the shipped paths under var/ are the developer's own.
    return [
        "--set", f"audit.signing_key={tmp_path / 'keys' / 'audit.pem'}",
        "--set", f"audit.witness_path={tmp_path / 'witness'}",
    ]  # fmt: skip


def verify(audit) -> subprocess.CompletedProcess:
    # The config names the daemon's signing key (its public half is trusted)
    # and its witness, as the daemon ran.
    return subprocess.run(
        [
            *CLI, "verify", "--config", "config/kynara.yaml",
            *_key_and_witness(audit.parent), "--audit", str(audit),
        ],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
    )  # fmt: skip


def run_example(target: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(EXAMPLE), "--target", target],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "KYNARA_TARGET": target},
    )  # fmt: skip


def test_example_agent_gets_every_decision_and_log_verifies(cli_daemon):
    process, target, audit = cli_daemon

    session = run_example(target)
    process.send_signal(signal.SIGTERM)
    exit_code = process.wait(timeout=30)
    checked = verify(audit)

    assert session.returncode == 0, session.stderr
    assert "allow" in session.stdout
    assert "deny" in session.stdout
    assert "require_approval" in session.stdout
    assert exit_code == 0
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.startswith("ok")


def test_example_agent_fails_closed_without_daemon(tmp_path):
    session = run_example(f"unix://{tmp_path / 'absent.sock'}")

    assert session.returncode != 0
    assert "allow" not in session.stdout


def stored_log(cli_daemon) -> tuple[object, list[int]]:
    """Make decisions, stop the daemon, and open its LMDB for tampering."""
    process, target, audit = cli_daemon
    assert run_example(target).returncode == 0
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    env = lmdb.open(str(audit), max_dbs=16, subdir=True)
    records = env.open_db(b"records")
    with env.begin() as txn:
        seqs = [int.from_bytes(k, "big") for k, _ in txn.cursor(records)]
    return env, records, seqs


def edit_byte(txn, db, seq):
    key = seq.to_bytes(8, "big")
    value = bytearray(txn.get(key, db=db))
    value[len(value) // 2] ^= 0x01
    txn.put(key, bytes(value), db=db)


def delete_record(txn, db, seq):
    txn.delete(seq.to_bytes(8, "big"), db=db)


def swap_records(txn, db, seq):
    a, b = seq.to_bytes(8, "big"), (seq + 1).to_bytes(8, "big")
    first, second = txn.get(a, db=db), txn.get(b, db=db)
    txn.put(a, second, db=db)
    txn.put(b, first, db=db)


@pytest.mark.parametrize(
    ("tamper", "kind"),
    [(edit_byte, "edited"), (delete_record, "missing"), (swap_records, "reordered")],
    ids=["edited-byte", "deleted", "reordered"],
)
def test_verify_names_the_tampered_record(cli_daemon, tamper, kind):
    env, records, seqs = stored_log(cli_daemon)
    victim = seqs[len(seqs) // 2]
    with env.begin(write=True) as txn:
        tamper(txn, records, victim)
    env.close()

    checked = verify(cli_daemon[2])

    assert checked.returncode == 1
    assert f"record {victim}" in checked.stdout
    assert kind in checked.stdout
