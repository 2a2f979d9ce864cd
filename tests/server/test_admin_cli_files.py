"""The CLI's admin commands as a client of a real daemon over TLS: they read
only their own credential and trust roots, never the daemon's secrets,
keys or certificates, and a failed handshake is named as one."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import msgspec
import pytest
import yaml
from support import REPO_ROOT
from tls_support import Authority, self_signed, stray_key, write_pair

from kynara_sidecar.config import load_config
from kynara_sidecar.errors import ConfigError

REVIEWER_SECRET = "reviewer-secret-0123456789"


def _pair(tmp_path: pathlib.Path, name: str) -> tuple[str, str]:
    files = write_pair(tmp_path, self_signed("kynara-admin.test"), stem=name)
    return str(files.cert_file), str(files.key_file)


@pytest.fixture
def tls_daemon(tmp_path, start_daemon):
    """A daemon serving ApprovalService on a TLS admin port (no admin
    socket) and /metrics over TLS; its config in ``config_file``."""
    admin_cert, admin_key = _pair(tmp_path, "admin")
    http_cert, http_key = _pair(tmp_path, "http")
    secrets = {}
    for name, secret in (
        ("carol", REVIEWER_SECRET),
        ("prometheus", "metrics-secret-0123456789"),
    ):
        secrets[name] = tmp_path / f"{name}.secret"
        secrets[name].write_text(secret + "\n")
    credentials = {
        "carol": {"secret_file": str(secrets["carol"]), "roles": ["reviewer"]},
        "prometheus": {"secret_file": str(secrets["prometheus"]), "roles": ["metrics"]},
    }
    running = start_daemon(
        "admin.socket=",
        "admin.host=127.0.0.1",
        "admin.port=0",
        f"admin.tls={{cert_file: {admin_cert}, key_file: {admin_key}}}",
        f"http.tls={{cert_file: {http_cert}, key_file: {http_key}}}",
        f"admin.credentials={msgspec.json.encode(credentials).decode()}",
        "audit.create_signing_key=true",
    )
    raw = msgspec.to_builtins(running.config)
    raw["admin"]["port"] = running.daemon.admin_port
    running.config_file = tmp_path / "kynara.yaml"
    running.config_file.write_text(yaml.safe_dump(raw))
    running.ca_file = tmp_path / "trusted.crt"
    running.ca_file.write_bytes(pathlib.Path(admin_cert).read_bytes())
    running.secrets = secrets
    return running


def approvals_list(running, *args: str) -> subprocess.CompletedProcess:
    """``kynara-sidecar approvals list`` as carol, in its own process."""
    env = {**os.environ, "KYNARA_ADMIN_SECRET": REVIEWER_SECRET}
    env.pop("KYNARA_ADMIN_CA_FILE", None)
    return subprocess.run(
        [sys.executable, "-m", "kynara_sidecar.cli", "approvals", "list"]
        + ["--config", str(running.config_file), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env=env,
    )


def test_the_cli_reads_none_of_the_daemons_secrets_keys_or_certificates(
    tls_daemon, tmp_path
):
    """A broken renewal of http.tls, a metrics secret rotated to one too
    short and an admin key the operator may not read: the running daemon
    goes on, and so does the CLI, given its own trust roots and name."""
    config = tls_daemon.config
    pathlib.Path(config.http.tls.key_file).write_bytes(stray_key())
    tls_daemon.secrets["prometheus"].write_text("short\n")
    pathlib.Path(config.admin.tls.key_file).unlink()
    trust = ("--ca-file", str(tls_daemon.ca_file))

    listed = approvals_list(tls_daemon, *trust, "--server-name", "kynara-admin.test")

    # The daemon itself would not start on these files.
    with pytest.raises(ConfigError, match=r"\.tls\.key_file|secret"):
        load_config(tls_daemon.config_file)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout == "no approvals match\n"


def test_a_failed_handshake_is_named_with_its_reason(tls_daemon, tmp_path):
    stranger = tmp_path / "stranger.pem"
    stranger.write_bytes(Authority("someone else's CA").pem)
    trusted = ("--ca-file", str(tls_daemon.ca_file))

    untrusted = approvals_list(tls_daemon, "--ca-file", str(stranger))
    misnamed = approvals_list(tls_daemon, *trusted, "--server-name", "other.test")
    key_as_ca = approvals_list(
        tls_daemon, "--ca-file", tls_daemon.config.admin.tls.key_file
    )

    for failed in (untrusted, misnamed):
        assert failed.returncode == 1
        assert "the TLS handshake failed" in failed.stderr, failed.stderr
        assert "nothing answers" not in failed.stderr
        assert "--ca-file" in failed.stderr and "--server-name" in failed.stderr
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr
    assert "Hostname Verification" in misnamed.stderr
    assert key_as_ca.returncode == 1
    assert "--ca-file: expected PEM certificates to trust in" in key_as_ca.stderr
