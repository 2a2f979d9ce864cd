"""The kynara-sidecar command as an operator runs it."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
from audit._evidence import RawEvidence, write_sealed_log
from audit._support import seq_key
from support import REPO_ROOT, SHIPPED_CONFIG, SHIPPED_POLICIES, as_nobody

from kynara_sidecar.audit.keys import generate_key, save_public_key, save_signing_key
from kynara_sidecar.config import DEFAULT_CONFIG_ENV

CLI = [sys.executable, "-m", "kynara_sidecar.cli"]


def run(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """The command as an operator runs it, without $KYNARA_CONFIG unless a
    test sets one."""
    env = {k: v for k, v in os.environ.items() if k != DEFAULT_CONFIG_ENV}
    return subprocess.run(
        [*prefix, *CLI, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env=env,
    )


def test_check_accepts_the_shipped_policies():
    result = run("check", str(SHIPPED_POLICIES))

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: policy sha256:")


def test_check_names_file_and_field_of_a_bad_policy(tmp_path):
    policies = tmp_path / "policies"
    shutil.copytree(SHIPPED_POLICIES, policies)
    payments = policies / "payments.yaml"
    payments.write_text(
        payments.read_text().replace("effect: allow", "effect: permit", 1)
    )

    result = run("check", str(policies))

    assert result.returncode == 1
    assert str(payments) in result.stderr
    assert "effect" in result.stderr
    assert "permit" in result.stderr or "allow" in result.stderr


def test_run_with_bad_config_exits_naming_the_key(tmp_path):
    result = run(
        "run", "--config", "config/kynara.yaml", "--set", "audit.durability=fast"
    )

    assert result.returncode == 1
    assert "$.audit.durability" in result.stderr


def _public_key_file(tmp_path, key=None):
    key = key or generate_key()
    path = tmp_path / f"{key.key_id.split(':')[1]}.pub"
    save_public_key(key.public(), path)
    return str(path)


def test_verify_of_an_empty_directory_says_so(tmp_path):
    key = _public_key_file(tmp_path)

    result = run("verify", "--audit", str(tmp_path / "nothing"), "--trusted-key", key)

    assert result.returncode == 1
    assert "no audit log at" in result.stderr


def test_verify_without_a_trusted_key_is_a_usage_error(tmp_path):
    result = run("verify", str(tmp_path / "log"))

    assert result.returncode == 2
    assert "--trusted-key" in result.stderr
    assert "audit.trusted_keys" in result.stderr


def test_verify_checks_a_sealed_log_against_its_witness(tmp_path):
    log = write_sealed_log(tmp_path / "log", 12, witness_root=tmp_path / "w")
    args = [str(log.path), "--trusted-key", _public_key_file(tmp_path, log.key)]

    good = run("verify", *args, "--witness", str(tmp_path / "w"))
    raw = RawEvidence(log.path)
    try:
        for seq in (11, 12):
            for db in (b"records", b"chain"):
                raw.delete(db, seq_key(seq))
        raw.put(b"meta", b"head", seq_key(10) + raw.get(b"chain", seq_key(10)))
        raw.delete(b"checkpoints", seq_key(12))
        raw.delete(b"meta", b"head_checkpoint")
    finally:
        raw.close()
    alone = run("verify", *args)
    cut = run("verify", *args, "--witness", str(tmp_path / "w"))

    assert good.returncode == 0, good.stdout + good.stderr
    assert good.stdout.startswith("ok: 12 records, head 12 ")
    assert alone.returncode == 0, alone.stdout
    assert "note: no witness configured" in alone.stdout
    assert cut.returncode == 1
    assert re.match(r"witness checkpoint 12: truncated_tail: ", cut.stdout), cut.stdout


def test_verify_with_a_config_trusts_its_signing_key_and_witness(tmp_path):
    log = write_sealed_log(tmp_path / "log", 7, witness_root=tmp_path / "w")
    save_signing_key(log.key, tmp_path / "audit-key.pem")

    result = run(
        "verify",
        *("--config", "config/kynara.yaml"),
        *("--set", f"audit.path={log.path}"),
        *("--set", f"audit.signing_key={tmp_path / 'audit-key.pem'}"),
        *("--set", f"audit.witness_path={tmp_path / 'w'}"),
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok: 7 records, head 7 ")
    assert "2 checkpoints" in result.stdout
    assert "note:" not in result.stdout


def test_verify_fails_when_the_witness_given_holds_nothing_for_the_log(tmp_path):
    log = write_sealed_log(tmp_path / "log", 7, witness_root=tmp_path / "w")
    key = _public_key_file(tmp_path, log.key)
    (tmp_path / "mistyped").mkdir()
    save_signing_key(log.key, tmp_path / "audit-key.pem")
    config = _config_args(tmp_path, log.path, tmp_path / "audit-key.pem")

    given = run(
        "verify", log.path, "--trusted-key", key, "--witness", tmp_path / "mistyped"
    )
    configured = run(
        "verify", *config, "--set", f"audit.witness_path={tmp_path / 'mistyped'}"
    )

    for result in (given, configured):
        assert result.returncode == 1, result.stdout + result.stderr
        assert re.match(r"witness\b.* 7: missing: the witness at ", result.stdout)
        assert f"{tmp_path / 'mistyped'}" in result.stdout
        assert "holds nothing for this log" in result.stdout


def _config_args(tmp_path, log_path, signing_key) -> list[str]:
    """--config with the shipped file, pointed at a log and key under tmp_path
    (the shipped config sets audit.create_signing_key: true)."""
    return [
        *("--config", SHIPPED_CONFIG),
        *("--set", f"audit.path={log_path}"),
        *("--set", f"audit.signing_key={signing_key}"),
        *("--set", f"audit.witness_path={tmp_path / 'w'}"),
    ]


FROM_TO = ("--from", "2026-12-04T09:00:00Z", "--to", "2026-12-04T10:00:00Z")


@pytest.mark.parametrize(
    ("command", "ways"),
    [
        (["verify"], ["AUDIT_PATH", "--audit DIR", "--config FILE"]),
        (["export", *FROM_TO, "{tmp}/pack"], ["AUDIT_PATH", "--config FILE"]),
        (["new-chain"], ["--config FILE"]),
    ],
    ids=["verify", "export", "new-chain"],
)
def test_an_evidence_command_without_a_log_or_config_says_how_to_give_one(
    tmp_path, command, ways
):
    args = [arg.format(tmp=tmp_path) for arg in command]

    result = run(*args)

    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"kynara-sidecar {command[0]}: ")
    for way in [*ways, f"${DEFAULT_CONFIG_ENV}"]:
        assert way in result.stderr
    assert "identity.agent_id" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_set_without_a_config_is_a_usage_error(tmp_path):
    key = _public_key_file(tmp_path)

    result = run("verify", tmp_path / "log", "--trusted-key", key, "--set", "a.b=1")

    assert result.returncode == 2
    assert "--set needs a config" in result.stderr


def test_verify_refuses_two_audit_paths_naming_both(tmp_path):
    log = write_sealed_log(tmp_path / "log", 3)
    key = _public_key_file(tmp_path, log.key)

    result = run(
        "verify", log.path, "--audit", tmp_path / "other", "--trusted-key", key
    )

    assert result.returncode == 2
    assert f"AUDIT_PATH {log.path} and --audit {tmp_path / 'other'}" in result.stderr
    assert result.stdout == ""


def test_verify_with_a_config_needs_only_the_public_key(tmp_path):
    log = write_sealed_log(tmp_path / "log", 7, witness_root=tmp_path / "w")
    save_public_key(log.key.public(), tmp_path / "audit-key.pub")

    result = run(
        "verify", *_config_args(tmp_path, log.path, tmp_path / "audit-key.pem")
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok: 7 records, head 7 ")
    # verify never creates a key, whatever audit.create_signing_key says.
    assert not (tmp_path / "audit-key.pem").exists()


@pytest.fixture
def shared_dir():
    """A directory nobody may enter and read (tmp_path's parent is root's)."""
    path = tempfile.mkdtemp(prefix="kynara-cli-")
    os.chmod(path, 0o755)
    yield pathlib.Path(path)
    shutil.rmtree(path)


def test_verify_as_a_user_who_cannot_read_the_private_key(shared_dir):
    prefix = as_nobody()
    log = write_sealed_log(shared_dir / "log", 7, witness_root=shared_dir / "w")
    save_signing_key(log.key, shared_dir / "audit-key.pem")  # 0600, root's
    save_public_key(log.key.public(), shared_dir / "audit-key.pub")
    # The log itself must be readable to the verifier, and even a read-only
    # LMDB reader registers in lock.mdb.
    log.path.chmod(0o755)
    (log.path / "data.mdb").chmod(0o644)
    (log.path / "lock.mdb").chmod(0o666)
    config = _config_args(shared_dir, log.path, shared_dir / "audit-key.pem")

    result = run("verify", *config, prefix=prefix)

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok: 7 records, head 7 ")


def test_new_chain_on_a_missing_log_creates_no_key(tmp_path):
    config = _config_args(tmp_path, tmp_path / "audit", tmp_path / "keys" / "k.pem")

    result = run("new-chain", *config)

    assert result.returncode == 1
    assert result.stderr.startswith(
        f"kynara-sidecar new-chain: audit.signing_key: {tmp_path / 'keys' / 'k.pem'}"
    )
    assert "kynara-sidecar run" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_new_chain_on_a_missing_log_creates_no_directory(tmp_path):
    save_signing_key(generate_key(), tmp_path / "k.pem")
    config = _config_args(tmp_path, tmp_path / "audit", tmp_path / "k.pem")

    result = run("new-chain", *config)

    assert result.returncode == 1
    assert f"no audit log at {tmp_path / 'audit'}" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.pem"]


def test_help_lists_commands_and_examples():
    result = run("--help")

    assert result.returncode == 0
    for word in ("run", "verify", "check", "--set audit.durability=deferred"):
        assert word in result.stdout


def test_sync_now_with_an_empty_credential_file_says_it_is_empty(tmp_path):
    empty = tmp_path / "operator"
    empty.write_text("")

    result = run(
        "sync", "now", "--config", SHIPPED_CONFIG,
        "--set", f"admin.socket={tmp_path / 'admin.sock'}",
        "--credential-file", empty,
    )  # fmt: skip

    assert result.returncode == 1
    assert f"--credential-file: {empty} is empty" in result.stderr


def test_sync_now_against_a_daemon_without_admin_listener_names_the_setting(
    tmp_path, start_daemon
):
    admin_socket = tmp_path / "admin.sock"
    # No admin.credentials: the daemon starts no admin listener.
    start_daemon(f"admin.socket={admin_socket}")
    secret = tmp_path / "operator"
    secret.write_text("operator-secret-0123456789abcdef")

    result = run(
        "sync", "now", "--config", SHIPPED_CONFIG,
        "--set", f"admin.socket={admin_socket}",
        "--credential-file", secret,
    )  # fmt: skip

    assert result.returncode == 1
    assert "no admin listener there" in result.stderr
    assert "admin.credentials" in result.stderr


def test_trusted_keys_beside_a_policy_directory_are_warned_unused(
    tmp_path, start_daemon, caplog
):
    public = _public_key_file(tmp_path)

    with caplog.at_level("WARNING", logger="kynara.daemon"):
        start_daemon(f"policy.trusted_keys=[{public}]")

    (record,) = [
        r for r in caplog.records if r.getMessage().startswith("policy.trusted_keys")
    ]
    assert record.fields["setting"] == "policy.trusted_keys"
    assert "policy directory, read unsigned" in record.getMessage()


def test_bundle_build_and_verify_say_no_directory_for_a_bundle_without_one(tmp_path):
    policies = tmp_path / "policies"
    shutil.copytree(SHIPPED_POLICIES, policies, ignore=shutil.ignore_patterns("tests"))
    (policies / "directory.yaml").unlink()
    key = generate_key()
    save_signing_key(key, tmp_path / "bundle-key.pem")
    save_public_key(key.public(), tmp_path / "bundle-key.pub")
    out = tmp_path / "b.tar"

    built = run(
        "bundle", "build", policies, "--key", tmp_path / "bundle-key.pem", "--out", out
    )
    verified = run(
        "bundle", "verify", out, "--trusted-key", tmp_path / "bundle-key.pub"
    )

    for result in (built, verified):
        assert result.returncode == 0, result.stdout + result.stderr
        assert ", no directory, " in result.stdout
        assert "directory ," not in result.stdout


def test_bundle_verify_names_the_directory_revision_of_a_bundle_with_one(tmp_path):
    key = generate_key()
    save_signing_key(key, tmp_path / "bundle-key.pem")
    save_public_key(key.public(), tmp_path / "bundle-key.pub")
    out = tmp_path / "b.tar"
    policies = tmp_path / "policies"
    shutil.copytree(SHIPPED_POLICIES, policies, ignore=shutil.ignore_patterns("tests"))

    run("bundle", "build", policies, "--key", tmp_path / "bundle-key.pem", "--out", out)
    verified = run(
        "bundle", "verify", out, "--trusted-key", tmp_path / "bundle-key.pub"
    )

    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert re.search(r", directory sha256:[0-9a-f]{64}, \d+ files", verified.stdout)
