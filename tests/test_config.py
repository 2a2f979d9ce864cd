"""The daemon configuration: typed, overridable, refused with the key named."""

from __future__ import annotations

import pytest
from support import SHIPPED_CONFIG

from kynara_sidecar.config import Durability, IdentityMode, load_config
from kynara_sidecar.errors import ConfigError


def test_shipped_config_loads():
    config = load_config(SHIPPED_CONFIG)

    assert config.identity.mode is IdentityMode.DEVELOPMENT
    assert config.identity.agent_id == "support-bot"
    assert config.audit.durability is Durability.DURABLE
    assert config.agent.socket == "var/run/agent.sock"


def test_overrides_are_typed_and_applied_in_order():
    config = load_config(
        SHIPPED_CONFIG,
        [
            "audit.map_size=1048576",
            "audit.durability=deferred",
            "env.labels={team: payments}",
            "audit.map_size=2097152",
        ],
    )

    assert config.audit.map_size == 2097152
    assert config.audit.durability is Durability.DEFERRED
    assert config.env.labels == {"team": "payments"}


def test_config_path_from_environment(monkeypatch):
    monkeypatch.setenv("KYNARA_CONFIG", str(SHIPPED_CONFIG))

    assert load_config().identity.agent_id == "support-bot"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "audit.durability=fast",
            r"Invalid enum value 'fast' - at `\$.audit.durability`; "
            "expected one of: durable, deferred",
        ),
        ("agent.portx=1", r"unknown field `portx` - at `\$.agent`"),
        ("agent.port=high", r"Expected `int`, got `str` - at `\$.agent.port`"),
        ("agent.port=70000", r"agent.port: expected a port in 0..65535, got 70000"),
        ("agent.host=10.1.2.3", r"agent.host: expected a loopback address"),
        ("agent.host=127.attacker.example", r"agent.host: expected a loopback"),
        ("agent.host=127.0.0.1.nip.io", r"agent.host: expected a loopback"),
        ("audit.map_size=10", r"audit.map_size: expected at least 65536 bytes, got 10"),
        ("audit.max_batch=0", r"audit.max_batch: expected 1..65536, got 0"),
        ("identity.agent_id=", r"identity.agent_id: expected a principal id"),
        (
            "identity.mode=verified",
            r"identity.issuers: expected at least one issuer in identity.mode "
            "'verified', got none",
        ),
        ("policy.source=s3://x", r"policy.source: expected a policy directory"),
        ("policy.source=nats://127.0.0.1:4222", r"policy.trusted_keys: expected"),
        ("sync.store=s3://x", r"sync.store: expected dir://PATH"),
        (
            "policy.source=dir:/var/store",
            r"policy.source: expected a store URL, dir:///absolute/path or "
            r"dir://relative/path, got 'dir:/var/store'",
        ),
        (
            "policy.source=nats:host",
            r"policy.source: expected a store URL, nats://HOST:PORT, got 'nats:host'",
        ),
        ("sync.store=dir:/srv", r"sync.store: expected a store URL, dir:///"),
        (
            "directory.store=nats://",
            r"^[^:]+: directory.store: the store URL 'nats://' names no host; "
            r"expected nats://HOST:PORT$",
        ),
        (
            "sync.store=nats://:4222",
            r"sync.store: the store URL 'nats://:4222' names no host",
        ),
        (
            "policy.source=dir://",
            r"policy.source: the store URL 'dir://' names no path",
        ),
        (
            "sync.max_clock_skew_seconds=-1",
            r"sync.max_clock_skew_seconds: expected 0..86400, got -1",
        ),
        ("sync.backlog_policy=drop", r"expected one of: keep_deciding, fail_closed"),
        ("agent.socket=" + "s" * 200, r"agent.socket: expected at most 107 bytes"),
        ("shutdown_grace_seconds=0", r"shutdown_grace_seconds: expected 0 < seconds"),
        ("audit", r"--set 'audit': expected section.key=value"),
        ("audit.path.deep=1", r"--set audit.path.deep: 'path' is not a section"),
    ],
)
def test_bad_setting_is_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(SHIPPED_CONFIG, [override])


def test_unreadable_config_names_the_file(tmp_path):
    missing = tmp_path / "absent.yaml"

    with pytest.raises(ConfigError, match=f"{missing}: cannot read config"):
        load_config(missing)


def test_config_that_is_not_a_mapping_is_refused(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- agent\n- http\n")

    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(path)


def test_socket_mode_reads_yaml_octal(tmp_path):
    path = tmp_path / "kynara.yaml"
    path.write_text(
        "identity: {mode: development, agent_id: a}\nagent: {socket_mode: 0600}\n"
    )

    assert load_config(path).agent.socket_mode == 0o600


def test_socket_mode_out_of_range_is_refused():
    with pytest.raises(ConfigError, match=r"agent.socket_mode: expected permission"):
        load_config(SHIPPED_CONFIG, ["agent.socket_mode=4096"])


def test_sync_max_clock_skew_defaults_to_five_minutes():
    assert load_config(SHIPPED_CONFIG).sync.max_clock_skew_seconds == 300


def test_an_empty_admin_secret_file_says_it_is_empty(tmp_path):
    empty = tmp_path / "operator"
    empty.write_text("\n")

    with pytest.raises(ConfigError, match=rf"{empty} is empty; expected a secret"):
        load_config(
            SHIPPED_CONFIG,
            [f"admin.credentials={{ops: {{secret_file: {empty}, roles: [operator]}}}}"],
        )


def test_an_unset_daemon_id_defaults_to_agent_at_host_within_bounds(monkeypatch):
    from kynara_sidecar import daemon as daemon_module

    config = load_config(SHIPPED_CONFIG, ["identity.daemon_id="])
    monkeypatch.setattr(daemon_module.socket, "gethostname", lambda: "pod-7")
    named = daemon_module.with_daemon_id(config)
    monkeypatch.setattr(daemon_module.socket, "gethostname", lambda: "h" * 200)

    assert named.identity.daemon_id == "support-bot@pod-7"
    with pytest.raises(ConfigError, match=r"identity.daemon_id: not set, and the"):
        daemon_module.with_daemon_id(config)
