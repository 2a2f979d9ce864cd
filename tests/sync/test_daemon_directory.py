"""A real daemon following the collector's signed directory (directory.store).

The daemon runs in-process on its own loop (``RunningDaemon``) over real
LMDB; the store is a real dir:// directory or a real nats-server; updates
are made with ``build_directory_update`` and a key of their own, and
published through the store's own ``publish_directory``. ``sync now`` is
the real CLI in a subprocess, calling the real admin listener.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import time

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kynara.v1 import decision_pb2 as pb
from kynara.v1 import sync_pb2, sync_pb2_grpc
from support import (
    SHIPPED_POLICIES,
    daemon_config,
    error_of,
    operator_admin,
    operator_cli,
    read_record,
    small_refund,
)

from kynara_sidecar.audit.keys import (
    SigningKey,
    encode_base64url,
    generate_key,
    save_public_key,
)
from kynara_sidecar.audit.record import format_timestamp
from kynara_sidecar.audit.store import AuditStore, directory_changes
from kynara_sidecar.audit.verify import verify_log
from kynara_sidecar.decision import Timestamp
from kynara_sidecar.errors import ConfigError
from kynara_sidecar.policy.compiler import compute_revision
from kynara_sidecar.policy.loader import decode_document
from kynara_sidecar.policy.names import MAX_NAME_LENGTH
from kynara_sidecar.replay import load_stored_policies, replay_record
from kynara_sidecar.sync import open_store
from kynara_sidecar.sync.bundle import (
    BundleError,
    build_bundle,
    build_manifest,
    canonical_json,
    pack_bundle,
    pack_members,
    unpack_members,
    verify_bundle,
)
from kynara_sidecar.sync.directory import (
    DIRECTORY_FILE,
    MANIFEST_NAME,
    SIGNATURE_NAME,
    build_directory_update,
    directory_content,
    directory_revision,
)
from kynara_sidecar.sync.follower import SyncOutcome, bundle_digest
from kynara_sidecar.sync.status import encode_status, fleet_rows, format_fleet

from ._bundles import (
    BASE_SECONDS,
    KEY,
    policy_dir,
    public_key_file,
    revision_of,
    signed,
    truncated,
)

SECRET = "operator-secret-0123456789abcdef"
# Conditions are waited on, never slept for; this only bounds a broken run.
WAIT_SECONDS = 10.0
DIRECTORY_KEY = generate_key()
OTHER_KEY = generate_key()
# A role the collector's group table names that no shipped policy defines.
SCIM_ONLY_ROLE = "scim_only"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# ------------------------------------------------------------------ helpers


def shipped_principals() -> list[dict]:
    raw = yaml.safe_load((SHIPPED_POLICIES / "directory.yaml").read_text())
    return [dict(principal) for principal in raw["principals"]]


def principals(*, drop: tuple[str, ...] = (), **changes: dict) -> list[dict]:
    """The shipped principals, less ``drop``, with ``changes`` by id, plus
    zoe (a user only the signed directory has, with a role of the
    collector's that the policies do not define)."""
    zoe = {
        "id": "zoe",
        "kind": "user",
        "roles": ["support", SCIM_ONLY_ROLE],
        "attributes": {"team": "support", "email": "zoe@example.com"},
    }
    return [
        {**principal, **changes.get(principal["id"], {})}
        for principal in [*shipped_principals(), zoe]
        if principal["id"] not in drop
    ]


def update(
    seconds: int = 0, key: SigningKey = DIRECTORY_KEY, **kwargs: object
) -> bytes:
    """A signed update of ``principals(**kwargs)``, created ``seconds``
    after the tests' base time (before both clocks)."""
    content = directory_content(principals(**kwargs))
    return build_directory_update(content, key, Timestamp(BASE_SECONDS + seconds, 0))


def revision_in(data: bytes) -> str:
    manifest = json.loads(unpack_members(data)["directory-update.json"])
    return manifest["revision"]


def publish(url: str, data: bytes) -> None:
    """Make ``data`` the store's current directory, as the collector does."""

    async def run() -> None:
        store = open_store(url)
        await store.connect()
        try:
            await store.publish_directory(bundle_digest(data), data)
        finally:
            await store.close()

    asyncio.run(run())


def directory_overrides(tmp_path, store: str) -> list[str]:
    key_file = tmp_path / "directory-key.pub"
    if not key_file.exists():
        save_public_key(DIRECTORY_KEY.public(), key_file)
    return [
        f"directory.store={store}",
        f"directory.trusted_keys=[{key_file}]",
        *operator_admin(tmp_path, SECRET),
        "sync.poll_seconds=0.05",
        "sync.retry_min_seconds=0.01",
        "sync.retry_max_seconds=0.05",
        "sync.ship_segments=false",
    ]


@pytest.fixture
def dir_store(tmp_path) -> str:
    root = tmp_path / "store"
    root.mkdir()
    return f"dir://{root}"


def health(running) -> int:
    with grpc.insecure_channel(running.target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    return reply.status


def decide(running, subject: str = "alice"):
    request = small_refund()
    del request.asserted_chain[:]
    request.asserted_chain.append(subject)
    return running.stub().Decide(request, timeout=5)


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def sync_now(tmp_path, *extra: str) -> tuple[int, dict]:
    result = operator_cli(tmp_path, ("sync", "now"), *extra)
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


def sync_now_grpc(tmp_path) -> sync_pb2.SyncNowResponse:
    """SyncNow on the daemon's real admin socket, as the operator."""
    with grpc.insecure_channel(f"unix://{tmp_path / 'admin.sock'}") as channel:
        return sync_pb2_grpc.SyncServiceStub(channel).SyncNow(
            sync_pb2.SyncNowRequest(),
            metadata=[("authorization", f"Bearer {SECRET}")],
            timeout=30,
        )


def with_bundle(tmp_path, dir_store: str) -> list[str]:
    """Overrides for a daemon following a bundle file (r1) and the signed
    directory in ``dir_store``."""
    bundle = tmp_path / "policies.bundle"
    bundle.write_bytes(signed(tmp_path, "r1", seconds=0))
    return [
        *directory_overrides(tmp_path, dir_store),
        f"policy.source={bundle}",
        f"policy.trusted_keys=[{public_key_file(tmp_path)}]",
    ]


def directory_synced(running, outcome: str) -> float:
    value = running.daemon.metrics.registry.get_sample_value(
        "kynara_directory_sync_total", {"outcome": outcome}
    )
    return value or 0.0


def bad_signature(data: bytes) -> bytes:
    """The update with another update's signature in place of its own."""
    members = unpack_members(data)
    members[SIGNATURE_NAME] = unpack_members(update(seconds=99))[SIGNATURE_NAME]
    return pack_members(members)


# -------------------------------------------------------------------- tests


def test_a_bundle_decides_with_the_signed_directory_not_its_own(
    tmp_path, start_daemon, dir_store, caplog
):
    bundle = tmp_path / "policies.bundle"
    bundle.write_bytes(signed(tmp_path, "r1", seconds=0))
    data = update(drop=("bob",))
    publish(dir_store, data)
    running = start_daemon(
        *directory_overrides(tmp_path, dir_store),
        f"policy.source={bundle}",
        f"policy.trusted_keys=[{public_key_file(tmp_path)}]",
    )

    zoe = decide(running, "zoe")
    bob = decide(running, "bob")

    revision = revision_in(data)
    assert health(running) == SERVING
    assert (zoe.decision, zoe.directory_revision) == (pb.DECISION_ALLOW, revision)
    assert bob.reason_code == "unknown_principal"
    assert running.daemon._store.active_directory() == (bundle_digest(data), data)
    stored = running.daemon._store.get_policy_source("directory", revision)
    assert stored.files == {DIRECTORY_FILE: unpack_members(data)[DIRECTORY_FILE]}
    record = read_record(running, running.daemon._store.head().seq)
    assert record.directory_revision == revision
    status = running.daemon._status_document().directory
    assert (status.source, status.revision) == (dir_store, revision)
    assert status.created and status.last_sync.revision == revision
    assert directory_synced(running, "activated") == 1
    warned = [r for r in caplog.records if "do not define" in r.getMessage()]
    assert warned and warned[0].fields["roles"] == [SCIM_ONLY_ROLE]


def test_a_new_bundle_is_compiled_with_the_current_signed_directory(
    tmp_path, start_daemon, dir_store
):
    bundle = tmp_path / "policies.bundle"
    bundle.write_bytes(signed(tmp_path, "r1", seconds=0))
    data = update()
    publish(dir_store, data)
    running = start_daemon(
        *directory_overrides(tmp_path, dir_store),
        f"policy.source={bundle}",
        f"policy.trusted_keys=[{public_key_file(tmp_path)}]",
    )
    first = decide(running, "zoe").policy_revision
    bundle.write_bytes(signed(tmp_path, "r2", seconds=60))

    code, reply = sync_now(tmp_path)
    after = decide(running, "zoe")

    assert (code, reply["outcome"]) == (0, "activated")
    assert after.policy_revision == reply["revision"] != first
    assert after.directory_revision == revision_in(data)
    assert reply["directory"] == {
        "outcome": "unchanged",
        "revision": revision_in(data),
        "previous_revision": revision_in(data),
        "error": "",
        "digest": bundle_digest(data),
    }


@pytest.mark.parametrize("backend", ["dir", "nats"])
def test_a_deactivation_then_a_deletion_deny_at_once(
    tmp_path, start_daemon, dir_store, request, backend
):
    url = dir_store if backend == "dir" else request.getfixturevalue("nats_server").url
    publish(url, update(seconds=0))
    running = start_daemon(*directory_overrides(tmp_path, url))
    assert decide(running, "zoe").decision == pb.DECISION_ALLOW

    publish(url, update(seconds=10, zoe={"active": False}))
    wait_until(
        lambda: decide(running, "zoe").reason_code == "inactive_principal",
        "zoe's decisions to become inactive_principal",
    )
    # Once denied, never allowed again under that directory.
    assert {decide(running, "zoe").reason_code for _ in range(5)} == {
        "inactive_principal"
    }
    publish(url, update(seconds=20, drop=("zoe",)))
    wait_until(
        lambda: decide(running, "zoe").reason_code == "unknown_principal",
        "zoe's decisions to become unknown_principal",
    )

    assert directory_synced(running, "activated") == 3


BROKEN = {
    "bad_signature": lambda: bad_signature(update(seconds=30, drop=("alice",))),
    "unknown_key": lambda: update(seconds=30, key=OTHER_KEY, drop=("alice",)),
    "older": lambda: update(seconds=-30, drop=("alice",)),
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_a_refused_directory_leaves_the_previous_one_active(
    tmp_path, start_daemon, dir_store, kind
):
    data = update(seconds=0)
    publish(dir_store, data)
    running = start_daemon(*directory_overrides(tmp_path, dir_store))
    publish(dir_store, BROKEN[kind]())

    code, reply = sync_now(tmp_path)

    directory = reply["directory"]
    assert (code, directory["outcome"]) == (1, "refused")
    assert kind in directory["error"]
    assert directory["revision"] == directory["previous_revision"]
    assert directory["revision"] == revision_in(data)
    assert directory["digest"] == bundle_digest(BROKEN[kind]())
    # The policies are files: no bundle was synced, so its fields are empty.
    assert (reply["outcome"], reply["revision"], reply["error"]) == ("", "", "")
    alice = decide(running, "alice")
    assert alice.reason_code != "unknown_principal"
    assert alice.directory_revision == revision_in(data)
    last = running.daemon._directory_follower.last_sync
    assert last.outcome is SyncOutcome.REFUSED and last.kind == kind


def test_not_ready_until_the_first_signed_directory(tmp_path, start_daemon, dir_store):
    running = start_daemon(*directory_overrides(tmp_path, dir_store))

    status = health(running)
    code, metadata = error_of(lambda: decide(running))

    assert status == NOT_SERVING
    assert code == grpc.StatusCode.UNAVAILABLE
    assert metadata["kynara-error-code"] == "policy_not_ready"
    publish(dir_store, update())
    wait_until(lambda: health(running) == SERVING, "SERVING after the publish")
    assert decide(running, "zoe").directory_revision == revision_in(update())


def test_a_restart_with_the_store_gone_decides_with_the_kept_directory(
    tmp_path, start_daemon, dir_store
):
    data = update(drop=("bob",))
    publish(dir_store, data)
    first = start_daemon(*directory_overrides(tmp_path, dir_store))
    assert decide(first, "zoe").directory_revision == revision_in(data)
    first.stop()
    shutil.rmtree(dir_store.removeprefix("dir://"))

    second = start_daemon(*directory_overrides(tmp_path, dir_store))

    assert health(second) == SERVING
    assert decide(second, "zoe").directory_revision == revision_in(data)
    assert decide(second, "bob").reason_code == "unknown_principal"


def test_a_directory_without_the_agent_is_taken_and_denies_everything(
    tmp_path, start_daemon, dir_store, caplog
):
    publish(dir_store, update(drop=("support-bot",)))
    running = start_daemon(*directory_overrides(tmp_path, dir_store))

    reply = decide(running, "alice")

    assert health(running) == SERVING
    assert reply.reason_code == "unknown_principal"
    assert reply.directory_revision == revision_in(update(drop=("support-bot",)))
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert [r.fields["agent_id"] for r in errors] == ["support-bot"]
    assert "every decision is denied" in errors[0].getMessage()


def test_replay_finds_a_record_decided_under_the_signed_directory(
    tmp_path, start_daemon, dir_store
):
    publish(dir_store, update())
    running = start_daemon(*directory_overrides(tmp_path, dir_store))
    answer = decide(running, "zoe")
    seq = running.daemon._store.head().seq
    record = read_record(running, seq)
    running.stop()

    store = AuditStore.open(tmp_path / "audit", readonly=True)
    try:
        policies = load_stored_policies(
            store, record.policy_revision, record.directory_revision
        )
    finally:
        store.close()

    assert verify_log(tmp_path / "audit").ok
    assert policies is not None
    assert SCIM_ONLY_ROLE in policies.directory.unknown_roles
    replayed = replay_record(record, policies)
    assert str(replayed.effect) == record.decision == "allow"
    assert record.directory_revision == answer.directory_revision


def test_sync_now_force_takes_an_older_directory(tmp_path, start_daemon, dir_store):
    publish(dir_store, update(seconds=0))
    running = start_daemon(*directory_overrides(tmp_path, dir_store))
    older = update(seconds=-30, drop=("alice",))
    publish(dir_store, older)

    code, reply = sync_now(tmp_path, "--force")

    assert (code, reply["directory"]["outcome"]) == (0, "activated")
    assert reply["directory"]["revision"] == revision_in(older)
    assert reply["outcome"] == ""
    assert decide(running, "alice").reason_code == "unknown_principal"


def test_sync_now_with_a_bundle_reports_a_refused_directory_apart(
    tmp_path, start_daemon, dir_store
):
    data = update(seconds=0)
    publish(dir_store, data)
    running = start_daemon(*with_bundle(tmp_path, dir_store))
    policy_revision = decide(running, "zoe").policy_revision
    publish(dir_store, update(seconds=30, key=OTHER_KEY))

    code, reply = sync_now(tmp_path)
    answer = sync_now_grpc(tmp_path)

    assert code == 1
    assert (reply["outcome"], reply["error"]) == ("unchanged", "")
    assert reply["revision"] == reply["previous_revision"] == policy_revision
    directory = reply["directory"]
    assert directory["outcome"] == "refused"
    assert "unknown_key" in directory["error"]
    assert "directory.trusted_keys" in directory["error"]
    assert directory["revision"] == directory["previous_revision"]
    assert directory["revision"] == revision_in(data)
    assert (answer.outcome, answer.error, answer.revision) == (
        "unchanged",
        "",
        policy_revision,
    )
    assert answer.directory.configured
    assert answer.directory.outcome == "refused"
    assert answer.directory.error == directory["error"]
    assert answer.directory.revision == revision_in(data)


def test_sync_now_reports_a_refused_bundle_beside_an_unchanged_directory(
    tmp_path, start_daemon, dir_store
):
    data = update(seconds=0)
    publish(dir_store, data)
    running = start_daemon(*with_bundle(tmp_path, dir_store))
    policy_revision = decide(running, "zoe").policy_revision
    (tmp_path / "policies.bundle").write_bytes(truncated(tmp_path, seconds=60))

    code, reply = sync_now(tmp_path)

    assert (code, reply["outcome"]) == (1, "refused")
    assert "malformed" in reply["error"]
    assert not reply["error"].startswith("directory")
    assert reply["revision"] == policy_revision
    assert reply["directory"]["outcome"] == "unchanged"
    assert reply["directory"]["error"] == ""
    assert reply["directory"]["revision"] == revision_in(data)


def test_sync_now_reports_an_unreachable_directory_beside_an_activated_bundle(
    tmp_path, start_daemon, dir_store
):
    data = update(seconds=0)
    publish(dir_store, data)
    running = start_daemon(*with_bundle(tmp_path, dir_store))
    first = decide(running, "zoe").policy_revision
    (tmp_path / "policies.bundle").write_bytes(signed(tmp_path, "r2", seconds=60))
    root = dir_store.removeprefix("dir://")
    shutil.rmtree(root)

    code, reply = sync_now(tmp_path)
    after = decide(running, "zoe")

    assert code == 1
    assert reply["outcome"] == "activated" and reply["error"] == ""
    assert after.policy_revision == reply["revision"] != first
    directory = reply["directory"]
    assert directory["outcome"] == "unreachable"
    assert root in directory["error"]
    assert directory["revision"] == after.directory_revision == revision_in(data)


def test_sync_now_without_a_directory_store_shows_no_directory(tmp_path, start_daemon):
    bundle = tmp_path / "policies.bundle"
    bundle.write_bytes(signed(tmp_path, "r1", seconds=0))
    start_daemon(
        *operator_admin(tmp_path, SECRET),
        "sync.ship_segments=false",
        f"policy.source={bundle}",
        f"policy.trusted_keys=[{public_key_file(tmp_path)}]",
    )

    code, reply = sync_now(tmp_path)
    answer = sync_now_grpc(tmp_path)

    assert (code, reply["outcome"]) == (0, "unchanged")
    assert "directory" not in reply
    assert not answer.directory.configured
    assert answer.directory == sync_pb2.DirectorySync()


def test_fleet_status_shows_the_directory(tmp_path, start_daemon, dir_store):
    data = update()
    publish(dir_store, data)
    running = start_daemon(*directory_overrides(tmp_path, dir_store))
    document = running.daemon._status_document()

    table = format_fleet(
        fleet_rows({document.daemon_id: encode_status(document)}, running.clock())
    )

    header, row = table.splitlines()
    assert "DIRECTORY" in header.split("  ")
    assert revision_in(data)[:19] in row
    assert document.directory.created in row


def test_sighup_recompiles_edited_policy_files_with_the_signed_directory(
    tmp_path, start_daemon, dir_store
):
    policies = tmp_path / "policies"
    shutil.copytree(SHIPPED_POLICIES, policies, ignore=shutil.ignore_patterns("tests"))
    data = update()
    publish(dir_store, data)
    running = start_daemon(
        *directory_overrides(tmp_path, dir_store), f"policy.source={policies}"
    )
    before = decide(running, "zoe").policy_revision
    payments = policies / "payments.yaml"
    payments.write_text(payments.read_text() + "# edited\n")

    reloaded = running.call(running.daemon.reload())
    after = decide(running, "zoe")

    assert reloaded is True
    assert after.policy_revision != before
    assert after.directory_revision == revision_in(data)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["directory.store=dir:///srv/store"], r"directory\.trusted_keys: expected"),
        (["directory.store=dir:/srv/store"], r"directory\.store: expected a store URL"),
        (["directory.store=/srv/store"], r"directory\.store: expected dir://"),
    ],
)
def test_a_directory_store_config_error_names_the_setting(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        daemon_config(tmp_path, *overrides)


# ---------------------------- the files' or bundle's directory with a store


def test_the_policy_files_directory_is_ignored_with_a_directory_store(
    tmp_path, start_daemon, dir_store, caplog
):
    policies = tmp_path / "policies"
    shutil.copytree(SHIPPED_POLICIES, policies, ignore=shutil.ignore_patterns("tests"))
    files_directory = policies / "directory.yaml"
    # A role no policy defines: a daemon reading this directory refuses it.
    files_directory.write_text(
        files_directory.read_text().replace("roles: [admin]", "roles: [admni]", 1)
    )
    data = update()
    publish(dir_store, data)
    caplog.set_level("INFO", logger="kynara.daemon")

    running = start_daemon(
        *directory_overrides(tmp_path, dir_store),
        f"policy.source={policies}",
    )
    ignored = [r for r in caplog.records if "ignored" in r.getMessage()]
    assert "roles: [admni]" in files_directory.read_text()
    files_directory.unlink()
    payments = policies / "payments.yaml"
    payments.write_text(payments.read_text() + "# edited\n")
    reloaded = running.call(running.daemon.reload())
    zoe = decide(running, "zoe")

    assert health(running) == SERVING
    assert [r.levelname for r in ignored] == ["INFO"]
    assert ignored[0].fields["files"] == [str(files_directory)]
    assert reloaded is True
    assert (zoe.decision, zoe.directory_revision) == (
        pb.DECISION_ALLOW,
        revision_in(data),
    )
    stored = running.daemon._store.get_policy_source("policy", zoe.policy_revision)
    assert "directory.yaml" not in stored.files and "payments.yaml" in stored.files


def test_without_a_directory_store_the_files_directory_is_still_required(
    tmp_path, start_daemon
):
    policies = tmp_path / "policies"
    shutil.copytree(SHIPPED_POLICIES, policies, ignore=shutil.ignore_patterns("tests"))
    running = start_daemon(f"policy.source={policies}")
    before = decide(running, "alice")
    (policies / "directory.yaml").unlink()

    reloaded = running.call(running.daemon.reload())
    after = decide(running, "alice")

    assert reloaded is False
    assert (after.decision, after.directory_revision) == (
        before.decision,
        before.directory_revision,
    )


def test_a_bundle_without_a_directory_serves_with_the_signed_one(
    tmp_path, start_daemon, dir_store
):
    policies = policy_dir(tmp_path, "nodir")
    (policies / "directory.yaml").unlink()
    bundle = tmp_path / "policies.bundle"
    bundle.write_bytes(build_bundle(policies, KEY, Timestamp(BASE_SECONDS, 0)))
    data = update()
    publish(dir_store, data)

    running = start_daemon(
        *directory_overrides(tmp_path, dir_store),
        f"policy.source={bundle}",
        f"policy.trusted_keys=[{public_key_file(tmp_path)}]",
    )
    zoe = decide(running, "zoe")

    assert health(running) == SERVING
    assert (zoe.decision, zoe.directory_revision) == (
        pb.DECISION_ALLOW,
        revision_in(data),
    )
    assert running.daemon._follower.last_sync.outcome == SyncOutcome.ACTIVATED


def test_a_bundles_directory_is_not_compiled_with_a_directory_store(
    tmp_path, start_daemon, dir_store
):
    policies = policy_dir(tmp_path, "badrole")
    files_directory = policies / "directory.yaml"
    files_directory.write_text(
        files_directory.read_text().replace("roles: [admin]", "roles: [admni]", 1)
    )
    bundle = tmp_path / "policies.bundle"
    assert "roles: [admni]" in files_directory.read_text()
    bundle.write_bytes(unbuildable_bundle(policies))
    publish(dir_store, update())

    running = start_daemon(
        *directory_overrides(tmp_path, dir_store),
        f"policy.source={bundle}",
        f"policy.trusted_keys=[{public_key_file(tmp_path)}]",
    )

    assert health(running) == SERVING
    assert decide(running, "zoe").decision == pb.DECISION_ALLOW
    with pytest.raises(BundleError, match="admni"):
        verify_bundle(bundle.read_bytes(), {KEY.key_id: KEY.public()})


def unbuildable_bundle(policies) -> bytes:
    """The bundle ``build_bundle`` refuses to make of ``policies`` (its
    directory does not compile), signed all the same."""
    files = {
        path.relative_to(policies).as_posix(): path.read_bytes()
        for path in sorted(policies.rglob("*.yaml"))
    }
    documents = [decode_document(name, content) for name, content in files.items()]
    policy_docs = [d for d in documents if d.document.kind == "policy"]
    directory_docs = [d for d in documents if d.document.kind == "directory"]
    manifest = build_manifest(
        files,
        revision=compute_revision(policy_docs),
        directory_revision=compute_revision(directory_docs),
        created=format_timestamp(Timestamp(BASE_SECONDS, 0)),
        key_id=KEY.key_id,
    )
    return pack_bundle(files, manifest, KEY)


# ------------------------------------------------ principal ids past the cap


def test_a_signed_directory_with_an_id_past_the_request_cap_is_refused(
    tmp_path, start_daemon, dir_store
):
    first = update()
    publish(dir_store, first)
    running = start_daemon(*directory_overrides(tmp_path, dir_store))
    long_id = "u" * (MAX_NAME_LENGTH + 1)
    publish(dir_store, resigned_with(long_id, seconds=10))

    code, reply = sync_now(tmp_path)

    directory = reply["directory"]
    assert (code, directory["outcome"]) == (1, "refused")
    assert "bad_content" in directory["error"]
    assert f"1..{MAX_NAME_LENGTH} characters" in directory["error"]
    assert decide(running, "zoe").directory_revision == revision_in(first)


def resigned_with(principal_id: str, seconds: int) -> bytes:
    """A directory update holding ``principal_id`` that a collector would
    refuse to build, signed with the directory key all the same."""
    content = directory_content(principals())
    raw = json.loads(content)
    raw["principals"].append(
        {
            "active": True,
            "attributes": {},
            "id": principal_id,
            "kind": "user",
            "roles": ["support"],
        }
    )
    raw["principals"].sort(key=lambda principal: principal["id"])
    content = json.dumps(
        raw, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode()
    manifest = canonical_json(
        {
            "v": 1,
            "kind": "directory",
            "revision": directory_revision(content),
            "created": format_timestamp(Timestamp(BASE_SECONDS + seconds, 0)),
            "key_id": DIRECTORY_KEY.key_id,
            "sha256": hashlib.sha256(content).hexdigest(),
        }
    )
    return pack_members(
        {
            MANIFEST_NAME: manifest,
            SIGNATURE_NAME: encode_base64url(DIRECTORY_KEY.sign(manifest)).encode(),
            DIRECTORY_FILE: content,
        }
    )


def test_a_missing_directory_store_names_directory_store_to_fix(tmp_path, start_daemon):
    missing = tmp_path / "not-mounted"
    running = start_daemon(*with_bundle(tmp_path, f"dir://{missing}"))

    def unreachable() -> bool:
        last = running.daemon._directory_follower.last_sync
        return last is not None and last.outcome is SyncOutcome.UNREACHABLE

    wait_until(unreachable, "the directory store reported unreachable")
    error = running.daemon._directory_follower.last_sync.error
    assert f"{missing} is not a directory" in error
    assert error.endswith("or fix directory.store)")
    assert health(running) == NOT_SERVING


# An attribute value this daemon's compiler refuses: every update the
# verifier passes compiles today, so the refusal of a kept update (one an
# earlier version took) is played by the compiler the daemon calls.
LEGACY = "legacy-value"


@pytest.fixture
def legacy_refused(monkeypatch):
    import kynara_sidecar.daemon as daemon_module
    from kynara_sidecar.errors import PolicyError

    real = daemon_module.compile_directory
    # Policy set revisions no signed directory compiles against.
    refused_sets: set[str] = set()

    def compile_directory(source, policy_set, **kwargs):
        if policy_set.revision in refused_sets:
            raise PolicyError(
                f"expected roles this directory can hold in {policy_set.revision}",
                path=source.path,
            )
        for index, principal in enumerate(source.document.principals):
            if principal.attributes.get("team") == LEGACY:
                raise PolicyError(
                    "expected a value this version compiles",
                    path=source.path,
                    location=f"$.principals[{index}].attributes.team",
                )
        return real(source, policy_set, **kwargs)

    monkeypatch.setattr(daemon_module, "compile_directory", compile_directory)
    return refused_sets


def keep_as_active(tmp_path, data: bytes) -> None:
    """Make ``data`` the signed directory the daemon's log names active."""
    store = AuditStore.open(tmp_path / "audit")
    try:
        store.append_batch([], directory_changes(bundle_digest(data), data))
    finally:
        store.close()


def test_a_kept_directory_that_no_longer_compiles_is_dropped_at_start(
    tmp_path, start_daemon, dir_store, caplog, legacy_refused
):
    good = update(seconds=0)
    publish(dir_store, good)
    first = start_daemon(*directory_overrides(tmp_path, dir_store))
    assert decide(first, "zoe").directory_revision == revision_in(good)
    first.stop()
    kept = update(seconds=5, alice={"attributes": {"team": LEGACY}})
    keep_as_active(tmp_path, kept)
    caplog.set_level("ERROR", logger="kynara")

    second = start_daemon(*directory_overrides(tmp_path, dir_store))

    # It started, dropped the kept directory and took the store's current
    # one (older, but nothing is active to be older than).
    (dropped,) = [
        r for r in caplog.records if "kept signed directory" in r.getMessage()
    ]
    assert dropped.levelname == "ERROR"
    assert dropped.fields["part"] == "directory"
    assert dropped.fields["directory_revision"] == revision_in(kept)
    assert "attributes.team" in dropped.fields["error"]
    assert decide(second, "zoe").directory_revision == revision_in(good)
    assert health(second) == SERVING


def test_a_kept_directory_that_no_longer_compiles_waits_not_serving(
    tmp_path, start_daemon, caplog, legacy_refused
):
    root = tmp_path / "store"
    root.mkdir()
    store_url = f"dir://{root}"
    first = start_daemon(*directory_overrides(tmp_path, store_url))
    first.stop()
    kept = update(seconds=5, alice={"attributes": {"team": LEGACY}})
    keep_as_active(tmp_path, kept)
    caplog.set_level("ERROR", logger="kynara")

    second = start_daemon(*directory_overrides(tmp_path, store_url))

    assert any("kept signed directory" in r.getMessage() for r in caplog.records)
    assert health(second) == NOT_SERVING
    good = update(seconds=1)
    publish(store_url, good)
    wait_until(lambda: health(second) == SERVING, "the new directory")
    assert decide(second, "zoe").directory_revision == revision_in(good)


def test_a_refused_directory_at_reload_does_not_fail_the_policy_files_reload(
    tmp_path, start_daemon, dir_store, caplog
):
    policies = tmp_path / "policies"
    shutil.copytree(SHIPPED_POLICIES, policies, ignore=shutil.ignore_patterns("tests"))
    data = update()
    publish(dir_store, data)
    running = start_daemon(
        *directory_overrides(tmp_path, dir_store), f"policy.source={policies}"
    )
    before = decide(running, "zoe").policy_revision
    publish(dir_store, bad_signature(update(seconds=20)))
    payments = policies / "payments.yaml"
    payments.write_text(payments.read_text() + "# edited\n")
    caplog.set_level("WARNING", logger="kynara.daemon")

    reloaded = running.call(running.daemon.reload())
    after = decide(running, "zoe")
    registry = running.daemon.metrics.registry
    reloads = {
        result: registry.get_sample_value(
            "kynara_policy_reloads_total", {"result": result}
        )
        for result in ("ok", "error")
    }

    assert reloaded is True
    assert after.policy_revision != before
    assert after.directory_revision == revision_in(data)
    assert reloads["ok"] >= 1 and not reloads["error"], reloads
    assert directory_synced(running, "refused") >= 1
    (warned,) = [r for r in caplog.records if "not synced" in r.getMessage()]
    assert warned.fields["part"] == "directory"
    assert warned.fields["outcome"] == "refused"


def test_a_bundle_the_active_directory_does_not_compile_against_names_it(
    tmp_path, start_daemon, dir_store, legacy_refused
):
    data = update()
    publish(dir_store, data)
    running = start_daemon(*with_bundle(tmp_path, dir_store))
    first = decide(running, "zoe").policy_revision
    bundle = tmp_path / "policies.bundle"
    bundle.write_bytes(signed(tmp_path, "r2", seconds=60))
    legacy_refused.add(revision_of(policy_dir(tmp_path, "r2")))

    result = running.call(running.daemon._follower.sync_now())

    assert result.outcome is SyncOutcome.REFUSED
    assert f"the active signed directory {revision_in(data)}" in result.error
    assert "does not compile against policy set" in result.error
    assert decide(running, "zoe").policy_revision == first
