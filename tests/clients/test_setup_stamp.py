"""scripts/setup's stamp: a --test install satisfies a plain run, so the two
do not reinstall each other's venv in turn. Run in a copy of the project
files, with a python3 on PATH that only records that it was asked."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess

from support import REPO_ROOT

PROJECT_FILES = (
    "pyproject.toml",
    "protos/pyproject.toml",
    "clients/python/pyproject.toml",
)


def project_copy(tmp_path, installed_extras: str):
    """A copy of what scripts/setup reads, with .venv stamped as installed
    with ``installed_extras``; returns (root, log of python3 runs)."""
    root = tmp_path / "repo"
    digest = hashlib.sha256()
    for name in PROJECT_FILES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO_ROOT / name, root / name)
        digest.update((REPO_ROOT / name).read_bytes())
    (root / "scripts").mkdir()
    shutil.copy2(REPO_ROOT / "scripts" / "setup", root / "scripts" / "setup")
    (root / ".venv").mkdir()
    stamp = digest.hexdigest() + installed_extras
    (root / ".venv" / ".kynara-installed").write_text(stamp + "\n")
    log = tmp_path / "python3.log"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexit 3\n')
    fake.chmod(0o755)
    return root, log, bin_dir


def run_setup(root, bin_dir, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return subprocess.run(
        ["bash", str(root / "scripts" / "setup"), *args],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip


def test_a_plain_setup_after_a_test_install_installs_nothing(tmp_path):
    root, log, bin_dir = project_copy(tmp_path, "[test]")

    done = run_setup(root, bin_dir)

    assert done.returncode == 0, done.stderr
    assert not log.exists()
    stamp = (root / ".venv" / ".kynara-installed").read_text()
    assert stamp.strip().endswith("[test]")  # kept: --test still satisfied


def test_a_test_setup_after_a_plain_install_installs(tmp_path):
    root, log, bin_dir = project_copy(tmp_path, "")

    done = run_setup(root, bin_dir, "--test")

    assert done.returncode != 0  # the fake python3 refused to make a venv
    assert log.read_text().startswith("-m venv .venv")
