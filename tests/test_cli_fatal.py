"""A daemon that cannot start says why on its log stream too: with JSON
logs (the default) as one JSON error line, then the plain line."""

from __future__ import annotations

import json
import subprocess
import sys

from support import REPO_ROOT, SHIPPED_CONFIG

from kynara_sidecar.cli import EXIT_FAILED


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kynara_sidecar.cli", "run"]
        + ["--config", str(SHIPPED_CONFIG), "--set", "audit.map_size=10", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )


def test_a_fatal_start_error_is_one_json_line_then_the_plain_line():
    failed = _run()

    *logged, plain = failed.stderr.splitlines()
    (line,) = [json.loads(text) for text in logged if text.startswith("{")]
    assert failed.returncode == EXIT_FAILED
    assert (line["level"], line["logger"]) == ("error", "kynara.daemon")
    assert line["error_type"] == "ConfigError"
    assert "audit.map_size: expected at least 65536 bytes, got 10" in line["error"]
    assert plain == f"kynara-sidecar run: {line['error']}"


def test_with_text_logs_only_the_plain_line_is_written():
    failed = _run("--log-format", "text")

    assert failed.returncode == EXIT_FAILED
    assert failed.stderr.splitlines() == [
        f"kynara-sidecar run: {SHIPPED_CONFIG}: audit.map_size: expected at least "
        "65536 bytes, got 10"
    ]


def test_a_trusted_key_file_that_is_no_key_is_named_but_never_printed(tmp_path):
    password = tmp_path / "db-password"
    password.write_text("hunter2-correct-horse\n")
    (tmp_path / "store").mkdir()

    failed = _run(
        "--set",
        "audit.map_size=16777216",
        "--set",
        f"audit.path={tmp_path / 'audit'}",
        "--set",
        f"directory.store=dir://{tmp_path / 'store'}",
        "--set",
        f"directory.trusted_keys=[{password}]",
    )

    *logged, plain = failed.stderr.splitlines()
    (line,) = [json.loads(text) for text in logged if '"error_type"' in text]
    assert failed.returncode == EXIT_FAILED
    assert line["error"].startswith(
        f"directory.trusted_keys: {password}: expected an Ed25519 public key"
    )
    assert "got a file of 22 bytes in neither form (content not shown)" in plain
    assert "hunter2" not in failed.stderr and "hunter2" not in failed.stdout
