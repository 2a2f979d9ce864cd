"""A daemon whose HTTP listener has TLS (so /metrics asks for a bearer
secret) but no admin credential that may read /metrics: it says so at
start, since every scrape would get 401. A real daemon on 127.0.0.2."""

from __future__ import annotations

import json
import logging

import pytest
from server.test_http_tls import HOST, SECRETS, https_overrides, write_pair

WARNING = "/metrics refuses every scrape: no admin credential may read it"


def _warned(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == WARNING]


def test_http_tls_without_a_metrics_reader_is_warned_at_start(
    tmp_path, start_daemon, caplog
):
    caplog.set_level(logging.WARNING, logger="kynara")
    write_pair(tmp_path)
    secret = tmp_path / "carol.secret"
    secret.write_text(SECRETS["carol"] + "\n")
    reviewers_only = {"carol": {"secret_file": str(secret), "roles": ["reviewer"]}}
    running = start_daemon(
        *https_overrides(tmp_path),
        f"admin.credentials={json.dumps(reviewers_only)}",
    )

    (line,) = _warned(caplog)
    assert line.levelno == logging.WARNING
    assert line.fields["setting"] == "admin.credentials"
    assert "metrics or operator role" in line.fields["hint"]
    assert running.config.http.host == HOST


@pytest.mark.parametrize("reader", ["prom", "ops"])
def test_a_metrics_or_operator_credential_is_no_cause_for_warning(
    tmp_path, start_daemon, caplog, reader
):
    caplog.set_level(logging.WARNING, logger="kynara")
    write_pair(tmp_path)
    roles = {"prom": ["metrics"], "ops": ["operator"]}[reader]
    secret = tmp_path / f"{reader}.secret"
    secret.write_text(SECRETS[reader] + "\n")
    credentials = {reader: {"secret_file": str(secret), "roles": roles}}
    start_daemon(
        *https_overrides(tmp_path), f"admin.credentials={json.dumps(credentials)}"
    )

    assert _warned(caplog) == []
