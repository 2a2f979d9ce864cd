"""The admin listener with TLS: a real daemon serving real TLS on loopback.

Certificates come from tls_support.py: a test CA, a leaf for the loopback
addresses, a second CA no client should trust, and self-signed
certificates.
"""

from __future__ import annotations

import json
import os
import pathlib
import ssl
import subprocess
import sys
import time

import grpc
import pytest
from kynara.v1 import audit_pb2 as pb
from kynara.v1 import audit_pb2_grpc
from support import REPO_ROOT, SHIPPED_CONFIG
from tls_support import Authority, self_signed, write_pair
from tls_support import served_serial as handshake_serial

from kynara_sidecar.config import load_config
from kynara_sidecar.errors import ConfigError

OPERATOR_SECRET = "operator-secret-0123456789"
REVIEWER_SECRET = "reviewer-secret-0123456789"
# Bounds the calls below; no assertion depends on how long anything takes.
CALL_TIMEOUT = 10
# Handshakes tried before a renewed certificate must be the one served.
RENEWAL_ATTEMPTS = 50


@pytest.fixture(scope="module")
def authority() -> Authority:
    return Authority("kynara test CA")


def issued_pair(tmp_path: pathlib.Path, authority: Authority) -> tuple[str, str, int]:
    """A leaf from ``authority`` in tmp_path/tls.{crt,key}: (cert file, key
    file, serial)."""
    files = write_pair(tmp_path, authority.issue())
    return str(files.cert_file), str(files.key_file), files.serial


def admin_overrides(tmp_path, cert_file: str, key_file: str, host: str) -> list[str]:
    secret = tmp_path / "ops.secret"
    secret.write_text(OPERATOR_SECRET + "\n")
    carol = tmp_path / "carol.secret"
    carol.write_text(REVIEWER_SECRET + "\n")
    credentials = {
        "ops": {"secret_file": str(secret), "roles": ["operator"]},
        "carol": {"secret_file": str(carol), "roles": ["reviewer"]},
    }
    return [
        "admin.socket=",
        f"admin.host={host}",
        "admin.port=0",
        f"admin.tls={json.dumps({'cert_file': cert_file, 'key_file': key_file})}",
        f"admin.credentials={json.dumps(credentials)}",
        "audit.create_signing_key=true",
    ]


@pytest.fixture
def tls_daemon(tmp_path, authority, start_daemon):
    """A daemon whose admin TCP port serves TLS on 127.0.0.2 (not 127.0.0.1)."""
    cert_file, key_file, serial = issued_pair(tmp_path, authority)
    running = start_daemon(*admin_overrides(tmp_path, cert_file, key_file, "127.0.0.2"))
    running.served_serial = serial
    return running


@pytest.fixture
def channels():
    opened: list[grpc.Channel] = []

    def open_(target: str, credentials: grpc.ChannelCredentials | None = None):
        channel = (
            grpc.secure_channel(target, credentials)
            if credentials
            else grpc.insecure_channel(target)
        )
        opened.append(channel)
        return audit_pb2_grpc.AuditServiceStub(channel)

    yield open_
    for channel in opened:
        channel.close()


def target(running) -> str:
    return f"127.0.0.2:{running.daemon.admin_port}"


def bearer() -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {OPERATOR_SECRET}"),)


def trusting(authority: Authority) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=authority.pem)


def served_serial(host: str, port: int, ca_pem: bytes) -> int:
    """The serial number of the certificate a fresh TLS handshake is given."""
    context = ssl.create_default_context(cadata=ca_pem.decode())
    context.set_alpn_protocols(["h2"])
    return handshake_serial(host, port, context)


def test_acceptance_tls_admin_refuses_plaintext_and_anonymous_serves_authenticated(
    tls_daemon, authority, channels
):
    """Issue #11's acceptance point: "A TLS admin listener refuses plaintext
    and unauthenticated calls and serves an authenticated client"."""
    plaintext = channels(target(tls_daemon))
    trusting_client = channels(target(tls_daemon), trusting(authority))

    with pytest.raises(grpc.RpcError) as in_the_clear:
        plaintext.GetHead(pb.GetHeadRequest(), metadata=bearer(), timeout=CALL_TIMEOUT)
    with pytest.raises(grpc.RpcError) as without_credential:
        trusting_client.GetHead(pb.GetHeadRequest(), timeout=CALL_TIMEOUT)
    head = trusting_client.GetHead(
        pb.GetHeadRequest(), metadata=bearer(), timeout=CALL_TIMEOUT
    )

    assert in_the_clear.value.code() is grpc.StatusCode.UNAVAILABLE
    assert without_credential.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert head.checkpoint.origin == tls_daemon.config.identity.daemon_id
    # 127.0.0.2 stands in for the pod address: not where listeners default.
    assert tls_daemon.config.admin.host == "127.0.0.2"


def test_a_client_not_trusting_the_ca_fails_the_handshake(tls_daemon, channels):
    stranger = Authority("someone else's CA")
    audit = channels(target(tls_daemon), trusting(stranger))

    with pytest.raises(grpc.RpcError) as info:
        audit.GetHead(pb.GetHeadRequest(), metadata=bearer(), timeout=CALL_TIMEOUT)

    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    with pytest.raises(ssl.SSLCertVerificationError):
        served_serial("127.0.0.2", tls_daemon.daemon.admin_port, stranger.pem)


def test_a_renewed_certificate_is_served_without_a_restart(
    tls_daemon, authority, tmp_path, channels
):
    port = tls_daemon.daemon.admin_port
    assert served_serial("127.0.0.2", port, authority.pem) == tls_daemon.served_serial
    cert_pem, key_pem, renewed = authority.issue()

    (tmp_path / "tls.key").write_bytes(key_pem)
    (tmp_path / "tls.crt").write_bytes(cert_pem)
    served = [served_serial("127.0.0.2", port, authority.pem)]
    while served[-1] != renewed and len(served) < RENEWAL_ATTEMPTS:
        time.sleep(0.05)
        served.append(served_serial("127.0.0.2", port, authority.pem))

    assert served[-1] == renewed != tls_daemon.served_serial
    audit = channels(target(tls_daemon), trusting(authority))
    head = audit.GetHead(pb.GetHeadRequest(), metadata=bearer(), timeout=CALL_TIMEOUT)
    assert head.checkpoint.origin == tls_daemon.config.identity.daemon_id


def test_a_bad_renewal_keeps_the_certificate_served(
    tls_daemon, authority, tmp_path, caplog
):
    port = tls_daemon.daemon.admin_port
    _, other_key, _ = authority.issue()

    (tmp_path / "tls.key").write_bytes(other_key)
    served = [served_serial("127.0.0.2", port, authority.pem) for _ in range(3)]

    assert served == [tls_daemon.served_serial] * 3
    refusals = [r for r in caplog.records if "not renewed" in r.getMessage()]
    assert len(refusals) == 1
    assert "admin.tls.key_file: expected the private key" in str(refusals[0].fields)
    assert (refusals[0].fields["component"], refusals[0].fields["listener"]) == (
        "server",
        "admin",
    )
    assert int(refusals[0].fields["serial"], 16) == tls_daemon.served_serial


def test_the_ipv6_loopback_serves_tls(tmp_path, authority, start_daemon, channels):
    cert_file, key_file, _ = issued_pair(tmp_path, authority)
    running = start_daemon(*admin_overrides(tmp_path, cert_file, key_file, "::1"))
    audit = channels(f"[::1]:{running.daemon.admin_port}", trusting(authority))

    head = audit.GetHead(pb.GetHeadRequest(), metadata=bearer(), timeout=CALL_TIMEOUT)

    assert head.checkpoint.origin == running.config.identity.daemon_id


def tls_config(tmp_path, *overrides: str):
    return load_config(SHIPPED_CONFIG, ["admin.port=0", *overrides])


def test_a_certificate_without_its_key_names_the_missing_key(tmp_path, authority):
    cert_file, _, _ = issued_pair(tmp_path, authority)

    with pytest.raises(ConfigError, match=r"admin\.tls\.key_file: expected a path"):
        tls_config(tmp_path, f"admin.tls={{cert_file: {cert_file}}}")


def test_an_unreadable_key_names_the_key_file(tmp_path, authority):
    cert_file, _, _ = issued_pair(tmp_path, authority)
    missing = tmp_path / "absent.key"

    with pytest.raises(ConfigError, match=r"admin\.tls\.key_file: cannot read"):
        tls_config(
            tmp_path, f"admin.tls={{cert_file: {cert_file}, key_file: {missing}}}"
        )


def test_a_key_of_another_certificate_is_refused(tmp_path, authority):
    cert_file, _, _ = issued_pair(tmp_path, authority)
    _, other_key, _ = authority.issue()
    key_file = tmp_path / "other.key"
    key_file.write_bytes(other_key)

    with pytest.raises(
        ConfigError, match=r"admin\.tls\.key_file: expected the private key"
    ):
        tls_config(
            tmp_path, f"admin.tls={{cert_file: {cert_file}, key_file: {key_file}}}"
        )


def test_a_key_in_the_certificate_file_is_no_certificate(tmp_path, authority):
    _, key_file, _ = issued_pair(tmp_path, authority)

    with pytest.raises(
        ConfigError, match=r"admin\.tls\.cert_file: expected a PEM certificate"
    ):
        tls_config(
            tmp_path, f"admin.tls={{cert_file: {key_file}, key_file: {key_file}}}"
        )


def test_an_address_off_loopback_needs_tls(tmp_path):
    with pytest.raises(
        ConfigError, match=r"admin\.host: .*; set admin\.tls \(cert_file"
    ):
        tls_config(tmp_path, "admin.host=10.1.2.3")


def test_with_tls_an_address_off_loopback_is_accepted(tmp_path, authority):
    cert_file, key_file, _ = issued_pair(tmp_path, authority)

    config = tls_config(
        tmp_path,
        "admin.host=10.1.2.3",
        f"admin.tls={{cert_file: {cert_file}, key_file: {key_file}}}",
    )

    assert (config.admin.host, config.admin.tls.cert_file) == ("10.1.2.3", cert_file)


def approvals_cli(running, *args: str) -> subprocess.CompletedProcess:
    """``kynara-sidecar approvals list`` as a reviewer against the daemon's
    TLS admin port (no admin socket), in its own process."""
    admin = running.config.admin
    tls = json.dumps({"cert_file": admin.tls.cert_file, "key_file": admin.tls.key_file})
    credentials = {
        name: {"secret_file": c.secret_file, "roles": c.roles}
        for name, c in admin.credentials.items()
    }
    where = ["--config", str(SHIPPED_CONFIG), "--set", "admin.socket="]
    where += ["--set", f"admin.host={admin.host}"]
    where += ["--set", f"admin.port={running.daemon.admin_port}"]
    where += ["--set", f"admin.tls={tls}"]
    where += ["--set", f"admin.credentials={json.dumps(credentials)}"]
    env = {**os.environ, "KYNARA_ADMIN_SECRET": REVIEWER_SECRET}
    env.pop("KYNARA_ADMIN_CA_FILE", None)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "kynara_sidecar.cli",
            "approvals",
            "list",
            *where,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env=env,
    )


def test_the_cli_lists_approvals_over_tls_trusting_the_given_ca(tls_daemon, authority):
    ca_file = tls_daemon.config.admin.tls.cert_file + ".ca"
    pathlib.Path(ca_file).write_bytes(authority.pem)

    listed = approvals_cli(tls_daemon, "--ca-file", ca_file)

    assert listed.returncode == 0, listed.stderr
    # The daemon answered (an empty inbox), through TLS.
    assert listed.stdout == "no approvals match\n"


def test_the_cli_trusts_a_self_signed_certificate_by_its_name(tmp_path, start_daemon):
    # Names no address: the CLI dials 127.0.0.2 and checks the DNS name.
    files = write_pair(tmp_path, self_signed("kynara-admin.test"))
    cert_file, key_file = str(files.cert_file), str(files.key_file)
    running = start_daemon(*admin_overrides(tmp_path, cert_file, key_file, "127.0.0.2"))

    listed = approvals_cli(running)
    misnamed = approvals_cli(running, "--server-name", "someone-else.test")

    assert listed.returncode == 0, listed.stderr
    # The daemon answered (an empty inbox), through TLS.
    assert listed.stdout == "no approvals match\n"
    assert misnamed.returncode == 1
    assert "UNAVAILABLE" in misnamed.stderr or "nothing answers" in misnamed.stderr


def test_the_cli_refuses_a_certificate_its_ca_file_does_not_trust(tls_daemon, tmp_path):
    stranger = tmp_path / "stranger.pem"
    stranger.write_bytes(Authority("someone else's CA").pem)

    listed = approvals_cli(tls_daemon, "--ca-file", str(stranger))
    unreadable = approvals_cli(tls_daemon, "--ca-file", str(tmp_path / "absent.pem"))

    assert listed.returncode == 1
    assert listed.stdout == ""
    assert unreadable.returncode != 0
    assert "--ca-file: cannot read the certificates to trust" in unreadable.stderr


def test_the_cli_dials_loopback_for_a_wildcard_admin_host(tmp_path, authority):
    from kynara_sidecar.cli import _admin_target

    cert_file, key_file, _ = issued_pair(tmp_path, authority)
    tls = f"admin.tls={{cert_file: {cert_file}, key_file: {key_file}}}"
    wildcard = tls_config(
        tmp_path, "admin.socket=", "admin.host=0.0.0.0", "admin.port=50999", tls
    )
    with_socket = tls_config(
        tmp_path, f"admin.socket={tmp_path / 'admin.sock'}", "admin.port=50999", tls
    )

    assert _admin_target(wildcard) == "127.0.0.1:50999"
    assert _admin_target(with_socket) == f"unix://{tmp_path / 'admin.sock'}"


@pytest.mark.parametrize(
    ("host", "address"),
    [("127.0.0.1", "127.0.0.1:9"), ("::1", "[::1]:9"), ("[::1]", "[::1]:9")],
)
def test_an_ipv6_host_is_bracketed_for_grpc(host, address):
    from kynara_sidecar.config import host_port

    assert host_port(host, 9) == address
