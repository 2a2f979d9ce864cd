"""The HTTP listener with TLS: a real daemon serving HTTPS on 127.0.0.2.

127.0.0.2 stands in for the pod address (listeners default to 127.0.0.1);
the certificates are self-signed, made with ``cryptography``. With TLS,
/metrics needs an admin credential with the metrics or operator role.
"""

from __future__ import annotations

import http.client
import json
import pathlib
import ssl
import time

import pytest
from support import SHIPPED_CONFIG
from tls_support import self_signed
from tls_support import served_serial as handshake_serial
from tls_support import write_pair as write_files

from kynara_sidecar.config import load_config
from kynara_sidecar.errors import ConfigError

HOST = "127.0.0.2"
SECRETS = {
    "prom": "metrics-secret-0123456789",
    "ops": "operator-secret-0123456789",
    "carol": "reviewer-secret-0123456789",
}
ROLES = {"prom": ["metrics"], "ops": ["operator"], "carol": ["reviewer"]}
# Bounds each request; no assertion depends on how long anything takes.
CALL_TIMEOUT = 10
# Handshakes tried before a renewed certificate must be the one served.
RENEWAL_ATTEMPTS = 50


def write_pair(directory: pathlib.Path) -> int:
    """A self-signed pair for HOST in directory/tls.{crt,key}; its serial."""
    return write_files(directory, self_signed(HOST, "localhost")).serial


def https_overrides(tmp_path: pathlib.Path) -> list[str]:
    credentials = {}
    for name, secret in SECRETS.items():
        (tmp_path / f"{name}.secret").write_text(secret + "\n")
        path = str(tmp_path / f"{name}.secret")
        credentials[name] = {"secret_file": path, "roles": ROLES[name]}
    tls = {
        "cert_file": str(tmp_path / "tls.crt"),
        "key_file": str(tmp_path / "tls.key"),
    }
    return [
        f"http.host={HOST}",
        f"http.tls={json.dumps(tls)}",
        "admin.socket=",
        "admin.port=-1",
        f"admin.credentials={json.dumps(credentials)}",
    ]


@pytest.fixture
def https_daemon(tmp_path, start_daemon):
    serial = write_pair(tmp_path)
    running = start_daemon(*https_overrides(tmp_path))
    running.served_serial = serial
    return running


def trusting(cert_file: pathlib.Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert_file))


def get_metrics(
    running, context: ssl.SSLContext | None, authorization: str | None = None
) -> tuple[int, dict[str, str], str]:
    """GET /metrics over HTTPS (HTTP without a context): status, headers,
    body."""
    port = running.daemon.http_port
    if context is None:
        connection = http.client.HTTPConnection(HOST, port, timeout=CALL_TIMEOUT)
    else:
        connection = http.client.HTTPSConnection(
            HOST, port, timeout=CALL_TIMEOUT, context=context
        )
    headers = {"authorization": authorization} if authorization else {}
    try:
        connection.request("GET", "/metrics", headers=headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode()
    finally:
        connection.close()


def bearer(name: str) -> str:
    return f"Bearer {SECRETS[name]}"


def refusals(running, code: str) -> float:
    registry = running.daemon.metrics.registry
    value = registry.get_sample_value("kynara_admin_refusals_total", {"code": code})
    return value or 0.0


def served_serial(port: int) -> int:
    """The serial number of the certificate a fresh handshake is given,
    whoever signed it (the client checks nothing: it only reads it)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return handshake_serial(HOST, port, context)


def config_with(*overrides: str):
    return load_config(SHIPPED_CONFIG, list(overrides))


def test_an_address_off_loopback_needs_tls():
    with pytest.raises(ConfigError, match=r"http\.host: .*; set http\.tls \(cert_file"):
        config_with("http.host=10.1.2.3")


def test_with_tls_an_address_off_loopback_is_accepted(tmp_path):
    write_pair(tmp_path)
    tls = f"{{cert_file: {tmp_path / 'tls.crt'}, key_file: {tmp_path / 'tls.key'}}}"

    config = config_with("http.host=10.1.2.3", f"http.tls={tls}")

    assert config.http.host == "10.1.2.3"
    assert config.http.needs_credentials


def test_a_certificate_without_its_key_names_http_tls_key_file(tmp_path):
    write_pair(tmp_path)

    with pytest.raises(ConfigError, match=r"http\.tls\.key_file: expected a path"):
        config_with(f"http.tls={{cert_file: {tmp_path / 'tls.crt'}}}")


def test_a_key_of_another_certificate_names_http_tls(tmp_path):
    write_pair(tmp_path)
    _, other_key, _ = self_signed(HOST)
    (tmp_path / "other.key").write_bytes(other_key)
    tls = f"{{cert_file: {tmp_path / 'tls.crt'}, key_file: {tmp_path / 'other.key'}}}"

    with pytest.raises(
        ConfigError, match=r"http\.tls\.key_file: expected the private key"
    ):
        config_with(f"http.tls={tls}")


def test_metrics_credentials_serve_the_metric_text_over_tls(https_daemon, tmp_path):
    context = trusting(tmp_path / "tls.crt")

    by_metrics = get_metrics(https_daemon, context, bearer("prom"))
    by_operator = get_metrics(https_daemon, context, bearer("ops"))

    for status, headers, body in (by_metrics, by_operator):
        assert status == 200
        assert headers["Content-Type"].startswith("text/plain; version=")
        assert "# TYPE kynara_decisions_total counter" in body
    assert https_daemon.config.http.host == HOST


def test_a_plaintext_client_is_refused(https_daemon):
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        get_metrics(https_daemon, None, bearer("prom"))


def test_metrics_without_or_with_a_wrong_bearer_are_401(https_daemon, tmp_path, caplog):
    context = trusting(tmp_path / "tls.crt")
    wrong = "not-any-secret-0123456789"

    without = get_metrics(https_daemon, context)
    with_wrong = get_metrics(https_daemon, context, f"Bearer {wrong}")
    bare_secret = get_metrics(https_daemon, context, SECRETS["prom"])

    assert [r[0] for r in (without, with_wrong, bare_secret)] == [401, 401, 401]
    assert without[1]["WWW-Authenticate"] == 'Bearer realm="kynara"'
    assert with_wrong[1]["WWW-Authenticate"] == (
        'Bearer realm="kynara", error="invalid_token"'
    )
    assert "kynara_" not in without[2]
    assert refusals(https_daemon, "identity_invalid") == 3
    logged = [r for r in caplog.records if r.getMessage() == "metrics request refused"]
    assert len(logged) == 3
    assert all(r.fields["listener"] == "http" for r in logged)
    text = " ".join(str(r.fields) for r in logged)
    assert wrong not in text and SECRETS["prom"] not in text


def test_a_reviewer_only_credential_is_403(https_daemon, tmp_path):
    context = trusting(tmp_path / "tls.crt")

    status, headers, body = get_metrics(https_daemon, context, bearer("carol"))

    assert status == 403
    assert "WWW-Authenticate" not in headers
    assert body.startswith("role_missing: expected a credential with the metrics")
    assert "admin.credentials.carol.roles" in body
    assert refusals(https_daemon, "role_missing") == 1


def test_on_loopback_without_tls_metrics_stay_open(start_daemon):
    running = start_daemon()
    port = running.daemon.http_port

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=CALL_TIMEOUT)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        status, body = response.status, response.read().decode()
    finally:
        connection.close()

    assert (running.config.http.host, running.config.http.needs_credentials) == (
        "127.0.0.1",
        False,
    )
    assert status == 200
    assert "kynara_" in body


def test_a_renewed_certificate_is_served_without_a_restart(https_daemon, tmp_path):
    port = https_daemon.daemon.http_port
    assert served_serial(port) == https_daemon.served_serial

    renewed = write_pair(tmp_path)
    served = [served_serial(port)]
    while served[-1] != renewed and len(served) < RENEWAL_ATTEMPTS:
        time.sleep(0.05)
        served.append(served_serial(port))

    assert served[-1] == renewed != https_daemon.served_serial
    status, _, body = get_metrics(
        https_daemon, trusting(tmp_path / "tls.crt"), bearer("prom")
    )
    assert status == 200
    assert "kynara_" in body


def test_a_bad_renewal_keeps_the_certificate_served(https_daemon, tmp_path, caplog):
    port = https_daemon.daemon.http_port
    _, other_key, _ = self_signed(HOST)

    (tmp_path / "tls.key").write_bytes(other_key)
    served = [served_serial(port) for _ in range(3)]

    assert served == [https_daemon.served_serial] * 3
    kept = [r for r in caplog.records if "not renewed" in r.getMessage()]
    assert len(kept) == 1
    assert "http.tls.key_file: expected the private key" in str(kept[0].fields)
    assert (kept[0].fields["component"], kept[0].fields["listener"]) == (
        "server",
        "http",
    )
    # Hex, as ``openssl x509 -serial`` prints it.
    assert int(kept[0].fields["serial"], 16) == https_daemon.served_serial
    assert kept[0].fields["serial"] == kept[0].fields["serial"].upper()
