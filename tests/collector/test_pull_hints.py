"""A pull over TLS whose target's host the daemon's certificate does not
name: the failed pull's log line says to set ``server_name``, and with it
set the pull succeeds. A real admin server on 127.0.0.2, a certificate
naming only ``kynara`` (as the Kubernetes example's does)."""

from __future__ import annotations

import logging

from tls_support import self_signed

from ._logs import write_log
from .test_collector import pull_config, wait_for_a_failed_pull


def _failed_pulls(caplog) -> list[dict]:
    return [
        r.fields for r in caplog.records if r.getMessage() == "pull failed; retrying"
    ]


def test_a_certificate_not_naming_the_target_gets_a_server_name_hint(
    tmp_path, start_collector, admin_server, caplog
):
    caplog.set_level(logging.WARNING, logger="kynara.collector")
    cert, key, _ = self_signed("kynara")
    (tmp_path / "ca.pem").write_bytes(cert)
    log = write_log(tmp_path / "log", 8)
    server = admin_server(log.path, (cert, key))
    config = pull_config(tmp_path, log, server, ca_file=str(tmp_path / "ca.pem"))
    collector = start_collector(config)
    wait_for_a_failed_pull(collector)

    assert collector.daemon()["tree_size"] == 0
    failed = _failed_pulls(caplog)
    assert failed, "no failed pull logged"
    assert "hostname verification" in failed[0]["error"].lower()
    assert "server_name" in failed[0]["hint"]


def test_with_server_name_the_same_certificate_is_pulled(
    tmp_path, start_collector, admin_server, caplog
):
    cert, key, _ = self_signed("kynara")
    (tmp_path / "ca.pem").write_bytes(cert)
    log = write_log(tmp_path / "log", 8)
    server = admin_server(log.path, (cert, key))
    config = pull_config(
        tmp_path,
        log,
        server,
        ca_file=str(tmp_path / "ca.pem"),
        server_name="kynara",
    )
    collector = start_collector(config)
    found = collector.wait_for(lambda d: d["tree_size"] == 8, "tree size 8")

    assert found["alerts"] == []
    assert _failed_pulls(caplog) == []


def test_a_ca_that_does_not_trust_the_certificate_gets_no_server_name_hint(
    tmp_path, start_collector, admin_server, caplog
):
    caplog.set_level(logging.WARNING, logger="kynara.collector")
    cert, key, _ = self_signed("kynara")
    other, _, _ = self_signed("kynara")
    (tmp_path / "ca.pem").write_bytes(other)
    log = write_log(tmp_path / "log", 8)
    server = admin_server(log.path, (cert, key))
    config = pull_config(
        tmp_path, log, server, ca_file=str(tmp_path / "ca.pem"), server_name="kynara"
    )
    collector = start_collector(config)
    wait_for_a_failed_pull(collector)

    failed = _failed_pulls(caplog)
    assert failed, "no failed pull logged"
    assert "hint" not in failed[0]
