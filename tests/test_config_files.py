"""What loading the config reads: the daemon's start reads and checks every
secret, key and certificate file the config names; a client's load (the
CLI's admin commands, a reload) checks the values only. And a key given
twice in the YAML is refused."""

from __future__ import annotations

import json
import pathlib

import pytest
from support import SHIPPED_CONFIG

from kynara_sidecar.config import load_config
from kynara_sidecar.errors import ConfigError

GOOD_SECRET = "a-secret-of-enough-bytes-0123456789"


def _tls(tmp_path: pathlib.Path, name: str) -> str:
    """A TLS setting whose files do not exist."""
    return json.dumps(
        {
            "cert_file": str(tmp_path / f"{name}.crt"),
            "key_file": str(tmp_path / f"{name}.key"),
        }
    )


def _unreadable_files(tmp_path: pathlib.Path) -> dict[str, list[str]]:
    """Settings naming one file each that the daemon would refuse at start
    (missing, or holding a secret too short), by the key its error names."""
    short = tmp_path / "metrics.secret"
    short.write_text("short\n")
    good = tmp_path / "ops.secret"
    good.write_text(GOOD_SECRET)
    credentials = {
        "ops": {"secret_file": str(good), "roles": ["operator"]},
        "prometheus": {"secret_file": str(short), "roles": ["metrics"]},
    }
    missing = str(tmp_path / "absent")
    issuer = {"issuer": "https://idp.test", "audience": "kynara", "jwks_file": missing}
    return {
        "http.tls.cert_file": ["http.port=0", f"http.tls={_tls(tmp_path, 'http')}"],
        "admin.tls.cert_file": [
            "admin.port=0",
            f"admin.tls={_tls(tmp_path, 'admin')}",
        ],
        "admin.credentials.prometheus.secret_file": [
            f"admin.credentials={json.dumps(credentials)}"
        ],
        "identity.issuers[0].jwks_file": [
            "identity.mode=verified",
            f"identity.issuers={json.dumps([issuer])}",
        ],
        "identity.agents.support-bot": [
            "identity.mode=verified",
            "identity.agent_id=",
            f"identity.agents={{support-bot: {missing}}}",
            "identity.issuers="
            + json.dumps([{**issuer, "jwks": {"keys": []}, "jwks_file": ""}]),
        ],
        "audit.redaction_key": [
            "audit.redact.context={card: hash}",
            f"audit.redaction_key={missing}",
        ],
        "approvals.webhook.secret_file": [
            "approvals.webhook.url=https://hooks.test/k",
            f"approvals.webhook.secret_file={missing}",
        ],
        "approvals.reviewer_issuers[0].jwks_file": [
            f"approvals.reviewer_issuers={json.dumps([{**issuer, 'audience': 'r'}])}"
        ],
        "approvals.inbox_keys": [f"approvals.inbox_keys=[{missing}]"],
    }


@pytest.mark.parametrize(
    "key",
    [
        "http.tls.cert_file",
        "admin.tls.cert_file",
        "admin.credentials.prometheus.secret_file",
        "identity.issuers[0].jwks_file",
        "identity.agents.support-bot",
        "audit.redaction_key",
        "approvals.webhook.secret_file",
        "approvals.reviewer_issuers[0].jwks_file",
        "approvals.inbox_keys",
    ],
)
def test_a_client_load_reads_none_of_the_files_the_daemon_checks(tmp_path, key):
    overrides = _unreadable_files(tmp_path)[key]

    with pytest.raises(ConfigError) as at_start:
        load_config(SHIPPED_CONFIG, overrides)
    as_client = load_config(SHIPPED_CONFIG, overrides, read_files=False)

    assert key in str(at_start.value)
    assert as_client.policy.source == "config/policies"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["admin.port=0", "admin.tls={cert_file: a.crt}"],
            "admin.tls.key_file: expected a path with admin.tls.cert_file",
        ),
        (
            ["admin.credentials={ops: {secret_file: s, roles: [root]}}"],
            "admin.credentials.ops.roles: expected each of",
        ),
        (
            ["admin.credentials={ops: {roles: [operator]}}"],
            "admin.credentials.ops.secret_file: expected a path, got none",
        ),
        (
            ["identity.mode=verified"],
            "identity.issuers: expected at least one issuer",
        ),
        (
            ["audit.redact.context={card: hash}"],
            "audit.redaction_key: expected a key file when",
        ),
        (
            ["approvals.webhook.url=ftp://hooks.test"],
            "approvals.webhook.url: expected an http:// or https:// URL",
        ),
        (["http.host=10.0.0.1"], "http.host: expected a loopback address"),
    ],
)
def test_a_client_load_still_checks_the_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(SHIPPED_CONFIG, overrides, read_files=False)


def test_a_key_given_twice_in_the_config_is_refused_naming_it(tmp_path):
    path = tmp_path / "kynara.yaml"
    text = SHIPPED_CONFIG.read_text()
    path.write_text(text + "\nidentity:\n  agent_id: someone-else\n")
    line = text.count("\n") + 2

    with pytest.raises(ConfigError) as refused:
        load_config(path)

    assert str(refused.value).startswith(f"{path}: cannot read config: line {line}")
    assert "key 'identity' given again (first on line" in str(refused.value)


def test_a_nested_key_given_twice_is_refused_and_a_merge_may_override(tmp_path):
    path = tmp_path / "kynara.yaml"
    path.write_text("audit:\n  path: var/a\n  map_size: 1048576\n  path: var/b\n")
    merged = tmp_path / "merged.yaml"
    merged.write_text(
        "identity: {mode: development, agent_id: bot}\n"
        "env:\n  labels:\n    <<: {team: a, tier: x}\n    team: b\n"
    )

    with pytest.raises(ConfigError, match=r"line 4: key 'path' given again"):
        load_config(path, ["identity.agent_id=bot"])
    with pytest.raises(ConfigError, match=r"--set env.labels: .*key 'a' given again"):
        load_config(SHIPPED_CONFIG, ["env.labels={a: x, a: y}"])
    # YAML's merge key brings defaults that the mapping's own keys override.
    assert load_config(merged).env.labels == {"team": "b", "tier": "x"}
