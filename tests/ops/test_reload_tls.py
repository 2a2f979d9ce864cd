"""SIGHUP with a broken certificate renewal on disk: a real daemon process
whose http.tls key was replaced by another certificate's. The served
certificate is watched on its own (it stays); a reload must still apply a
changed policy and the live settings."""

from __future__ import annotations

import datetime
import pathlib
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from ops_daemon import CALL_TIMEOUT, DaemonProcess, refund, wait_for

CONFIG_REFUSED = "config reload refused; previous config and policies stay active"


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_pair(directory: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """A self-signed certificate for 127.0.0.1 and its key, as files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kynara")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "http.crt", directory / "http.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(_key_pem(key))
    return cert_file, key_file


def test_sighup_applies_policy_and_log_level_despite_a_broken_tls_renewal(tmp_path):
    cert_file, key_file = _write_pair(tmp_path)
    daemon = DaemonProcess(
        tmp_path,
        {"http.tls": {"cert_file": str(cert_file), "key_file": str(key_file)}},
    )

    def reloads(start: int) -> list[dict[str, Any]]:
        return [
            line
            for line in daemon.records()[start:]
            if line["msg"] in ("config reloaded", CONFIG_REFUSED)
        ]

    try:
        with daemon.channel() as channel:
            stub = daemon.stub(channel)
            before = stub.Decide(refund(), timeout=CALL_TIMEOUT).policy_revision
            logged = len(daemon.lines())
            # A renewal gone wrong: the key of another certificate.
            key_file.write_bytes(_key_pem(ec.generate_private_key(ec.SECP256R1())))
            payments = daemon.policies / "payments.yaml"
            payments.write_text(
                payments.read_text().replace("Refunds;", "Refunds (new);")
            )
            daemon.set(**{"log.level": "debug"})
            daemon.reload()
            wait_for(lambda: reloads(logged), "the reload")
            wait_for(
                lambda: (
                    stub.Decide(refund(), timeout=CALL_TIMEOUT).policy_revision
                    != before
                ),
                "the new policy",
            )
        (reloaded,) = reloads(logged)
    finally:
        exit_code = daemon.stop()

    assert reloaded["msg"] == "config reloaded"
    assert "log.level" in reloaded["applied"]
    assert exit_code == 0
