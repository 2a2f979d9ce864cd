"""The collector's HTTP with TLS and credentials: a real collector serving
real TLS on loopback (certificates from the admin listener's test CA), the
query API and /metrics called with and without bearer secrets, and the
configurations that may and may not leave loopback."""

from __future__ import annotations

import http.client
import json
import pathlib
import ssl
import time

import pytest
import yaml
from tls_support import Authority, served_serial, write_pair

from kynara_sidecar.collector.config import load_collector_config
from kynara_sidecar.errors import ConfigError

from ._logs import ORIGIN, write_log
from .test_collector import RunningCollector, dir_store, ship, write_config

OPERATOR_SECRET = "collector-ops-secret-0123456789"
METRICS_SECRET = "collector-prometheus-secret-0123"
REVIEWER_SECRET = "collector-reviewer-secret-012345"
CALL_TIMEOUT = 10
# Bounded waits on a condition, never a blind sleep.
WAIT_SECONDS = 20.0


@pytest.fixture
def authority():
    return Authority("kynara collector test CA")


def _secret(tmp_path: pathlib.Path, name: str, value: str) -> str:
    path = tmp_path / f"{name}.secret"
    path.write_text(value + "\n")
    path.chmod(0o600)
    return str(path)


def _tls_files(tmp_path: pathlib.Path, authority: Authority) -> dict[str, str]:
    return write_pair(tmp_path, authority.issue()).settings()


def _credentials(tmp_path: pathlib.Path) -> dict:
    return {
        "ops": {
            "secret_file": _secret(tmp_path, "ops", OPERATOR_SECRET),
            "roles": ["operator"],
        },
        "prometheus": {
            "secret_file": _secret(tmp_path, "prometheus", METRICS_SECRET),
            "roles": ["metrics"],
        },
    }


@pytest.fixture
def tls_collector(tmp_path, authority, start_collector):
    """A collector on 127.0.0.1 with http.tls and http.credentials, having
    accepted an 8-record log from a dir:// store."""
    log = write_log(tmp_path / "log", 8)
    store_url = dir_store(tmp_path)
    ship(store_url, log.path)
    config = write_config(
        tmp_path,
        log,
        store={"url": store_url, "poll_seconds": 0.05},
        http={
            "host": "127.0.0.1",
            "port": 0,
            "tls": _tls_files(tmp_path, authority),
            "credentials": _credentials(tmp_path),
        },
    )
    return start_collector(config)


def _client_context(authority: Authority) -> ssl.SSLContext:
    return ssl.create_default_context(cadata=authority.pem.decode())


def _get(
    collector: RunningCollector,
    path: str,
    secret: str | None,
    context: ssl.SSLContext | None,
) -> tuple[int, dict[str, str], bytes]:
    port = collector.collector.http_port
    if context is None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=CALL_TIMEOUT)
    else:
        connection = http.client.HTTPSConnection(
            "127.0.0.1", port, timeout=CALL_TIMEOUT, context=context
        )
    headers = {} if secret is None else {"Authorization": f"Bearer {secret}"}
    try:
        connection.request("GET", path, headers=headers)
        reply = connection.getresponse()
        return reply.status, dict(reply.getheaders()), reply.read()
    finally:
        connection.close()


def _wait_accepted(collector: RunningCollector, context: ssl.SSLContext) -> dict:
    found: dict = {}
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        status, _, body = _get(collector, "/daemons", OPERATOR_SECRET, context)
        assert status == 200, body
        found = json.loads(body)["daemons"][0]
        if found["tree_size"] == 8:
            return found
        time.sleep(0.05)
    raise AssertionError(f"collector never accepted the log: {found}")


def test_operator_reads_the_query_api_over_tls(tls_collector, authority):
    context = _client_context(authority)

    found = _wait_accepted(tls_collector, context)
    status, headers, body = _get(
        tls_collector, f"/records?daemon={ORIGIN}&from=2&to=3", OPERATOR_SECRET, context
    )

    assert (found["daemon_id"], found["refused"]) == (ORIGIN, "")
    assert status == 200
    assert headers["Content-Type"].startswith("application/x-ndjson")
    assert [json.loads(line)["seq"] for line in body.splitlines()] == [2, 3]


@pytest.mark.parametrize("path", ["/daemons", f"/records?daemon={ORIGIN}&from=1&to=1"])
@pytest.mark.parametrize(
    ("secret", "status", "challenge"),
    [
        (None, 401, 'Bearer realm="kynara-collector"'),
        (
            REVIEWER_SECRET,
            401,
            'Bearer realm="kynara-collector", error="invalid_token"',
        ),
        (METRICS_SECRET, 403, None),
    ],
)
def test_query_api_refuses_a_caller_without_the_operator_role(
    tls_collector, authority, path, secret, status, challenge, caplog
):
    got, headers, body = _get(tls_collector, path, secret, _client_context(authority))

    assert got == status
    assert headers.get("WWW-Authenticate") == challenge
    error = json.loads(body)["error"]
    if status == 403:
        assert "expected a credential with the operator role" in error
        assert "'prometheus'" in error
    else:
        assert "http.credentials" in error
    assert REVIEWER_SECRET not in body.decode()
    refusals = [r for r in caplog.records if r.getMessage() == "http request refused"]
    assert [r.fields["status"] for r in refusals] == [status]
    assert all(REVIEWER_SECRET not in str(r.fields) for r in refusals)


@pytest.mark.parametrize("secret", [METRICS_SECRET, OPERATOR_SECRET])
def test_metrics_serves_the_metrics_and_operator_roles(
    tls_collector, authority, secret
):
    status, _, body = _get(
        tls_collector, "/metrics", secret, _client_context(authority)
    )

    assert status == 200
    assert b"kynara_collector_segments_total" in body


def test_metrics_without_a_credential_is_refused(tls_collector, authority):
    status, headers, _ = _get(
        tls_collector, "/metrics", None, _client_context(authority)
    )

    assert (status, headers["WWW-Authenticate"]) == (
        401,
        'Bearer realm="kynara-collector"',
    )


def test_plaintext_to_the_tls_port_is_not_served(tls_collector):
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        _get(tls_collector, "/daemons", OPERATOR_SECRET, None)


def test_a_client_not_trusting_the_ca_refuses_the_server(tls_collector):
    stranger = _client_context(Authority("some other CA"))

    with pytest.raises(ssl.SSLCertVerificationError):
        _get(tls_collector, "/daemons", OPERATOR_SECRET, stranger)


def _served_serial(collector: RunningCollector, authority: Authority) -> int:
    port = collector.collector.http_port
    return served_serial("127.0.0.1", port, _client_context(authority))


def test_a_renewed_certificate_is_served_without_a_restart(
    tls_collector, authority, tmp_path
):
    first = _served_serial(tls_collector, authority)
    cert, key, serial = authority.issue()
    (tmp_path / "tls.key").write_bytes(key)
    (tmp_path / "tls.crt").write_bytes(cert)

    assert first != serial
    assert _served_serial(tls_collector, authority) == serial
    status, _, _ = _get(
        tls_collector, "/daemons", OPERATOR_SECRET, _client_context(authority)
    )
    assert status == 200


def test_credentials_on_loopback_without_tls_are_enforced(tmp_path, start_collector):
    log = write_log(tmp_path / "log", 4)
    config = write_config(
        tmp_path, log, http={"port": 0, "credentials": _credentials(tmp_path)}
    )
    collector = start_collector(config)

    assert _get(collector, "/daemons", None, None)[0] == 401
    assert _get(collector, "/daemons", METRICS_SECRET, None)[0] == 403
    status, _, body = _get(collector, "/daemons", OPERATOR_SECRET, None)
    assert status == 200
    assert json.loads(body)["daemons"][0]["daemon_id"] == ORIGIN


def _config(tmp_path: pathlib.Path, http: dict):
    path = tmp_path / "collector.yaml"
    path.write_text(yaml.safe_dump({"http": http}))
    return load_collector_config(path)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::"])
def test_off_loopback_needs_tls_and_credentials(tmp_path, authority, host):
    tls = _tls_files(tmp_path, authority)
    credentials = _credentials(tmp_path)

    with pytest.raises(
        ConfigError, match=r"got '[^']*' without http.tls and http.credentials;"
    ):
        _config(tmp_path, {"host": host})
    with pytest.raises(ConfigError, match=r"got '[^']*' without http.credentials;"):
        _config(tmp_path, {"host": host, "tls": tls})
    with pytest.raises(ConfigError, match=r"got '[^']*' without http.tls;"):
        _config(tmp_path, {"host": host, "credentials": credentials})
    config = _config(tmp_path, {"host": host, "tls": tls, "credentials": credentials})
    assert (config.http.host, sorted(config.http.credentials)) == (
        host,
        ["ops", "prometheus"],
    )


def test_a_reviewer_credential_is_of_no_use_on_http(tmp_path):
    reviewer = {
        "carol": {
            "secret_file": _secret(tmp_path, "carol", REVIEWER_SECRET),
            "roles": ["reviewer"],
        }
    }

    with pytest.raises(ConfigError, match=r"http.credentials.carol.roles: expected"):
        _config(tmp_path, {"credentials": reviewer})


def test_a_certificate_without_its_key_names_the_missing_key(tmp_path, authority):
    tls = _tls_files(tmp_path, authority)

    with pytest.raises(ConfigError, match=r"http.tls.key_file: expected a path"):
        _config(tmp_path, {"tls": {"cert_file": tls["cert_file"]}})


def test_a_short_secret_stops_the_collector_at_start(tmp_path):
    log = write_log(tmp_path / "log", 4)
    short = {
        "ops": {"secret_file": _secret(tmp_path, "ops", "short"), "roles": ["operator"]}
    }
    config = write_config(tmp_path, log, http={"port": 0, "credentials": short})

    with pytest.raises(ConfigError, match=r"http.credentials.ops.secret_file"):
        RunningCollector(config)
