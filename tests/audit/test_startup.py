"""The audit key set the config names: loading, creating, and what a
verifier reads when it holds no private key."""

from __future__ import annotations

import re

import pytest

from kynara_sidecar.audit.keys import (
    generate_key,
    load_public_key,
    save_public_key,
    save_signing_key,
)
from kynara_sidecar.audit.startup import (
    configured_public_keys,
    load_audit_keys,
    public_key_path,
)
from kynara_sidecar.config import AuditConfig
from kynara_sidecar.errors import ConfigError


@pytest.fixture
def keys_dir(tmp_path):
    """A signing key, an old one and a trusted public key, as files."""
    signing, previous, other = generate_key(), generate_key(), generate_key()
    save_signing_key(signing, tmp_path / "audit-key.pem")
    save_signing_key(previous, tmp_path / "old-key.pem")
    save_public_key(other.public(), tmp_path / "other.pub")
    (tmp_path / "junk.pub").write_text("not a key")
    (tmp_path / "junk.pem").write_text("not a key")
    (tmp_path / "junk.pem").chmod(0o600)
    return tmp_path


def test_public_half_sits_beside_the_private_key_as_keygen_writes_it(tmp_path):
    assert public_key_path(tmp_path / "audit-key.pem") == tmp_path / "audit-key.pub"
    assert public_key_path("keys/audit.key.pem").as_posix() == "keys/audit.key.pub"
    assert public_key_path("secrets/audit").as_posix() == "secrets/audit.pub"


def test_configured_keys_load_and_are_all_trusted(keys_dir):
    cfg = AuditConfig(
        signing_key=str(keys_dir / "audit-key.pem"),
        previous_signing_key=str(keys_dir / "old-key.pem"),
        trusted_keys=[str(keys_dir / "other.pub")],
    )

    keys = load_audit_keys(cfg, create=False)

    assert keys.previous is not None
    assert set(keys.trusted) == {
        keys.signing.key_id,
        keys.previous.key_id,
        load_public_key(keys_dir / "other.pub").key_id,
    }


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (
            {"trusted_keys": ["other.pub", "junk.pub"]},
            r"audit\.trusted_keys\[1\]: {dir}/junk\.pub: expected an Ed25519 "
            r"public key",
        ),
        (
            {"trusted_keys": ["missing.pub"]},
            r"audit\.trusted_keys\[0\]: {dir}/missing\.pub: cannot read public "
            r"key file",
        ),
        (
            {"signing_key": "missing.pem"},
            r"audit\.signing_key: {dir}/missing\.pem: cannot read private key",
        ),
        (
            {"signing_key": "open.pem"},
            r"audit\.signing_key: {dir}/open\.pem: private key permissions 0644 "
            r"are too open",
        ),
        (
            {"previous_signing_key": "junk.pem"},
            r"audit\.previous_signing_key: {dir}/junk\.pem: expected an "
            r"unencrypted PKCS#8 PEM Ed25519 private key",
        ),
    ],
    ids=["bad-trusted", "missing-trusted", "missing", "too-open", "not-private"],
)
def test_key_errors_start_with_the_setting_then_the_file(keys_dir, settings, expected):
    save_signing_key(generate_key(), keys_dir / "open.pem")
    (keys_dir / "open.pem").chmod(0o644)
    values = {"signing_key": "audit-key.pem", **settings}
    cfg = AuditConfig(
        signing_key=str(keys_dir / values["signing_key"]),
        previous_signing_key=(
            str(keys_dir / values["previous_signing_key"])
            if "previous_signing_key" in values
            else ""
        ),
        trusted_keys=[str(keys_dir / name) for name in values.get("trusted_keys", [])],
    )

    with pytest.raises(ConfigError) as info:
        load_audit_keys(cfg)

    assert re.match(expected.format(dir=re.escape(str(keys_dir))), str(info.value))


def test_a_missing_key_is_created_with_its_public_half_beside_it(tmp_path):
    private = tmp_path / "keys" / "audit-key.pem"
    cfg = AuditConfig(signing_key=str(private), create_signing_key=True)

    keys = load_audit_keys(cfg, create=True)

    assert load_public_key(tmp_path / "keys" / "audit-key.pub") == keys.signing.public()
    assert sorted(p.name for p in private.parent.iterdir()) == [
        "audit-key.pem",
        "audit-key.pub",
    ]


def test_a_command_that_may_not_create_a_key_creates_nothing(tmp_path):
    private = tmp_path / "keys" / "audit-key.pem"
    cfg = AuditConfig(signing_key=str(private), create_signing_key=True)

    with pytest.raises(ConfigError) as info:
        load_audit_keys(cfg, create=False)

    message = str(info.value)
    assert message.startswith(f"audit.signing_key: {private}: no such file")
    assert "kynara-sidecar run" in message
    assert not (tmp_path / "keys").exists()


def test_a_stale_public_half_stops_the_key_from_being_created(tmp_path):
    stale = generate_key().public()
    save_public_key(stale, tmp_path / "audit-key.pub")
    cfg = AuditConfig(
        signing_key=str(tmp_path / "audit-key.pem"), create_signing_key=True
    )

    with pytest.raises(ConfigError, match=r"^audit\.signing_key: .* already exists"):
        load_audit_keys(cfg, create=True)

    assert not (tmp_path / "audit-key.pem").exists()
    assert load_public_key(tmp_path / "audit-key.pub") == stale


def test_a_verifier_without_the_private_key_reads_its_public_half(tmp_path):
    signing, previous = generate_key(), generate_key()
    save_public_key(signing.public(), tmp_path / "audit-key.pub")
    # A private key this process refuses to read (too open) counts as absent.
    save_signing_key(previous, tmp_path / "old-key.pem")
    (tmp_path / "old-key.pem").chmod(0o644)
    save_public_key(previous.public(), tmp_path / "old-key.pub")
    cfg = AuditConfig(
        signing_key=str(tmp_path / "audit-key.pem"),
        previous_signing_key=str(tmp_path / "old-key.pem"),
        create_signing_key=True,
    )

    trusted = configured_public_keys(cfg)

    assert trusted == {
        signing.key_id: signing.public(),
        previous.key_id: previous.public(),
    }
    assert not (tmp_path / "audit-key.pem").exists()


def test_a_key_readable_neither_way_names_the_setting_and_both_files(tmp_path):
    cfg = AuditConfig(signing_key=str(tmp_path / "audit-key.pem"))

    with pytest.raises(ConfigError) as info:
        configured_public_keys(cfg)

    message = str(info.value)
    assert message.startswith("audit.signing_key: ")
    assert str(tmp_path / "audit-key.pem") in message
    assert f"its public half in {tmp_path / 'audit-key.pub'}" in message
