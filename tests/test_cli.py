"""The kynara-sidecar command as an operator runs it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

from audit._evidence import RawEvidence, write_sealed_log
from audit._support import seq_key
from support import REPO_ROOT, SHIPPED_POLICIES

from kynara_sidecar.audit.keys import generate_key, save_public_key, save_signing_key

CLI = [sys.executable, "-m", "kynara_sidecar.cli"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT
    )


def test_check_accepts_the_shipped_policies():
    result = run("check", str(SHIPPED_POLICIES))

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: policy sha256:")


def test_check_names_file_and_field_of_a_bad_policy(tmp_path):
    policies = tmp_path / "policies"
    shutil.copytree(SHIPPED_POLICIES, policies)
    payments = policies / "payments.yaml"
    payments.write_text(
        payments.read_text().replace("effect: allow", "effect: permit", 1)
    )

    result = run("check", str(policies))

    assert result.returncode == 1
    assert str(payments) in result.stderr
    assert "effect" in result.stderr
    assert "permit" in result.stderr or "allow" in result.stderr


def test_run_with_bad_config_exits_naming_the_key(tmp_path):
    result = run(
        "run", "--config", "config/kynara.yaml", "--set", "audit.durability=fast"
    )

    assert result.returncode == 1
    assert "$.audit.durability" in result.stderr


def _public_key_file(tmp_path, key=None):
    key = key or generate_key()
    path = tmp_path / f"{key.key_id.split(':')[1]}.pub"
    save_public_key(key.public(), path)
    return str(path)


def test_verify_of_an_empty_directory_says_so(tmp_path):
    key = _public_key_file(tmp_path)

    result = run("verify", "--audit", str(tmp_path / "nothing"), "--trusted-key", key)

    assert result.returncode == 1
    assert "no audit log at" in result.stderr


def test_verify_without_a_trusted_key_is_a_usage_error(tmp_path):
    result = run("verify", str(tmp_path / "log"))

    assert result.returncode == 2
    assert "--trusted-key" in result.stderr
    assert "audit.trusted_keys" in result.stderr


def test_verify_checks_a_sealed_log_against_its_witness(tmp_path):
    log = write_sealed_log(tmp_path / "log", 12, witness_root=tmp_path / "w")
    args = [str(log.path), "--trusted-key", _public_key_file(tmp_path, log.key)]

    good = run("verify", *args, "--witness", str(tmp_path / "w"))
    raw = RawEvidence(log.path)
    try:
        for seq in (11, 12):
            for db in (b"records", b"chain"):
                raw.delete(db, seq_key(seq))
        raw.put(b"meta", b"head", seq_key(10) + raw.get(b"chain", seq_key(10)))
        raw.delete(b"checkpoints", seq_key(12))
        raw.delete(b"meta", b"head_checkpoint")
    finally:
        raw.close()
    alone = run("verify", *args)
    cut = run("verify", *args, "--witness", str(tmp_path / "w"))

    assert good.returncode == 0, good.stdout + good.stderr
    assert good.stdout.startswith("ok: 12 records, head 12 ")
    assert alone.returncode == 0, alone.stdout
    assert "note: no witness configured" in alone.stdout
    assert cut.returncode == 1
    assert re.match(r"witness checkpoint 12: truncated_tail: ", cut.stdout), cut.stdout


def test_verify_with_a_config_trusts_its_signing_key_and_witness(tmp_path):
    log = write_sealed_log(tmp_path / "log", 7, witness_root=tmp_path / "w")
    save_signing_key(log.key, tmp_path / "audit-key.pem")

    result = run(
        "verify",
        *("--config", "config/kynara.yaml"),
        *("--set", f"audit.path={log.path}"),
        *("--set", f"audit.signing_key={tmp_path / 'audit-key.pem'}"),
        *("--set", f"audit.witness_path={tmp_path / 'w'}"),
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok: 7 records, head 7 ")
    assert "2 checkpoints" in result.stdout
    assert "note:" not in result.stdout


def test_help_lists_commands_and_examples():
    result = run("--help")

    assert result.returncode == 0
    for word in ("run", "verify", "check", "--set audit.durability=deferred"):
        assert word in result.stdout
