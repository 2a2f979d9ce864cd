"""A CLI whose config has no admin.tls, dialling an admin port that serves
TLS: it says the port serves TLS rather than that nothing answers. A real
daemon (test_admin_tls's ``tls_daemon``) on 127.0.0.2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from server.test_admin_tls import REVIEWER_SECRET, authority, tls_daemon
from support import REPO_ROOT, SHIPPED_CONFIG, free_port

# The fixtures this module borrows, used by name below.
__all__ = ["authority", "tls_daemon"]


def plaintext_approvals_cli(host: str, port: int) -> subprocess.CompletedProcess:
    """``approvals list`` against ``host:port`` with no admin.tls."""
    where = ["--config", str(SHIPPED_CONFIG), "--set", "admin.socket="]
    where += ["--set", f"admin.host={host}", "--set", f"admin.port={port}"]
    credentials = {"carol": {"secret_file": "/dev/null", "roles": ["reviewer"]}}
    where += ["--set", f"admin.credentials={json.dumps(credentials)}"]
    env = {**os.environ, "KYNARA_ADMIN_SECRET": REVIEWER_SECRET}
    return subprocess.run(
        [sys.executable, "-m", "kynara_sidecar.cli", "approvals", "list", *where],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env=env,
    )


def test_a_plaintext_cli_at_a_tls_admin_port_is_told_the_port_serves_tls(
    tls_daemon,
):
    listed = plaintext_approvals_cli("127.0.0.2", tls_daemon.daemon.admin_port)

    assert listed.returncode == 1, listed.stderr
    assert "the port serves TLS" in listed.stderr
    assert "admin.tls" in listed.stderr
    assert "nothing answers" not in listed.stderr


def test_a_port_where_nothing_listens_still_asks_whether_the_daemon_runs():
    listed = plaintext_approvals_cli("127.0.0.1", free_port())

    assert listed.returncode == 1, listed.stderr
    assert "nothing answers" in listed.stderr
    assert "serves TLS" not in listed.stderr
