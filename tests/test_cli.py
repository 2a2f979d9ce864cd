"""The kynara-sidecar command as an operator runs it."""

from __future__ import annotations

import shutil
import subprocess
import sys

from support import REPO_ROOT, SHIPPED_POLICIES

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


def test_verify_of_an_empty_directory_says_so(tmp_path):
    result = run("verify", "--audit", str(tmp_path / "nothing"))

    assert result.returncode == 1
    assert "no audit log at" in result.stderr


def test_help_lists_commands_and_examples():
    result = run("--help")

    assert result.returncode == 0
    for word in ("run", "verify", "check", "--set audit.durability=deferred"):
        assert word in result.stdout
