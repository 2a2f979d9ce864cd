"""Signed policy bundles: build, verify, and every way verifying refuses."""

from __future__ import annotations

import io
import random
import shutil
import subprocess
import sys
import tarfile

import pytest
from support import REPO_ROOT, SHIPPED_POLICIES

from kynara_sidecar.audit.keys import generate_key, save_public_key, save_signing_key
from kynara_sidecar.decision import Timestamp
from kynara_sidecar.policy.loader import load_policies
from kynara_sidecar.sync.bundle import (
    MANIFEST_NAME,
    BundleError,
    BundleProblem,
    build_bundle,
    build_manifest,
    pack_bundle,
    verify_bundle,
)

NOW = Timestamp(1_796_634_000, 5)
KEY = generate_key()
TRUSTED = {KEY.key_id: KEY.public()}


@pytest.fixture(scope="module")
def shipped() -> bytes:
    return build_bundle(SHIPPED_POLICIES, KEY, NOW)


def _files(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {
            info.name.removeprefix("policies/"): tar.extractfile(info).read()
            for info in tar
            if info.name.startswith("policies/")
        }


def test_shipped_policies_verify_at_the_loaders_revision(shipped):
    loaded = load_policies(SHIPPED_POLICIES)

    verified = verify_bundle(shipped, TRUSTED)

    assert verified.revision == loaded.policy_set.revision
    assert verified.directory_revision == loaded.directory.revision
    assert verified.policies.policy_set.revision == loaded.policy_set.revision
    assert verified.created == "2026-12-07T09:00:00.000000005Z"
    assert verified.key_id == KEY.key_id
    assert "directory.yaml" in verified.files
    assert not any(name.startswith("tests/") for name in verified.files)


def test_builds_are_byte_identical_for_the_same_input_and_time(shipped, tmp_path):
    copy = tmp_path / "policies"
    shutil.copytree(SHIPPED_POLICIES, copy)

    again = build_bundle(copy, KEY, NOW)
    later = build_bundle(copy, KEY, Timestamp(NOW.seconds + 1))

    assert again == shipped
    assert later != shipped


def _flipped(data: bytes, position: int) -> bytes:
    changed = bytearray(data)
    changed[position] ^= 0x01
    return bytes(changed)


def _assert_every_flip_fails(data: bytes, positions: list[int]) -> None:
    passed = []
    for position in positions:
        try:
            verify_bundle(_flipped(data, position), TRUSTED)
        except BundleError:
            continue
        passed.append(position)
    assert passed == []


def test_a_flipped_byte_fails_verification(shipped):
    seed = random.randrange(2**32)
    print(f"seed {seed}")
    positions = random.Random(seed).sample(range(len(shipped)), 1500)

    _assert_every_flip_fails(shipped, positions)


@pytest.mark.slow
def test_every_flipped_byte_fails_verification(shipped):
    _assert_every_flip_fails(shipped, list(range(len(shipped))))


def test_a_flipped_byte_in_a_policy_file_names_the_file(shipped):
    position = shipped.index(b"format_version", shipped.index(b"policies/crm.yaml"))

    with pytest.raises(BundleError) as caught:
        verify_bundle(_flipped(shipped, position), TRUSTED)

    assert caught.value.kind is BundleProblem.HASH_MISMATCH
    assert caught.value.path == "crm.yaml"
    assert "hash_mismatch: crm.yaml: expected SHA-256" in str(caught.value)


def test_a_bundle_signed_by_another_key_is_unknown_key(shipped):
    other = generate_key()

    with pytest.raises(BundleError, match=f"unknown_key: signed by {other.key_id}"):
        verify_bundle(build_bundle(SHIPPED_POLICIES, other, NOW), TRUSTED)


def test_a_signature_by_another_key_under_our_key_id_is_bad_signature():
    files = _files(build_bundle(SHIPPED_POLICIES, KEY, NOW))
    loaded = load_policies(SHIPPED_POLICIES)
    manifest = build_manifest(
        files,
        revision=loaded.policy_set.revision,
        directory_revision=loaded.directory.revision,
        created="2026-12-07T09:00:00Z",
        key_id=KEY.key_id,
    )

    forged = pack_bundle(files, manifest, generate_key())

    with pytest.raises(BundleError, match="^bad_signature: bundle.sig: "):
        verify_bundle(forged, TRUSTED)


def _raw_tar(*members: tarfile.TarInfo, content: bytes = b"x") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for info in members:
            if info.isreg():
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
            else:
                tar.addfile(info)
    return buffer.getvalue()


def _entry(
    name: str, kind: bytes = tarfile.REGTYPE, target: str = ""
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


@pytest.mark.parametrize(
    ("entry", "name"),
    [
        (_entry("/etc/passwd"), "/etc/passwd"),
        (_entry("policies/../../escape.yaml"), "policies/../../escape.yaml"),
        (_entry("policies/link.yaml", tarfile.SYMTYPE, "/etc/passwd"), "link"),
        (_entry("policies/hard.yaml", tarfile.LNKTYPE, "bundle.json"), "hard"),
        (_entry("policies/dev", tarfile.CHRTYPE), "dev"),
    ],
    ids=["absolute", "dotdot", "symlink", "hardlink", "device"],
)
def test_a_path_escape_is_refused(entry, name):
    with pytest.raises(BundleError) as caught:
        verify_bundle(_raw_tar(entry), TRUSTED)

    assert caught.value.kind is BundleProblem.UNSAFE_PATH
    assert caught.value.path == entry.name


def test_a_listed_path_escape_is_refused_even_when_signed(shipped):
    files = {**_files(shipped), "../evil.yaml": b"{}"}
    manifest = build_manifest(
        files, revision="r", directory_revision="d", created="c", key_id=KEY.key_id
    )

    with pytest.raises(BundleError) as caught:
        verify_bundle(pack_bundle(files, manifest, KEY), TRUSTED)

    assert caught.value.kind is BundleProblem.UNSAFE_PATH


def _signed(files: dict[str, bytes], **fields: str) -> bytes:
    loaded = load_policies(SHIPPED_POLICIES)
    stated = {
        "revision": loaded.policy_set.revision,
        "directory_revision": loaded.directory.revision,
        "created": "2026-12-07T09:00:00Z",
        "key_id": KEY.key_id,
        **fields,
    }
    return pack_bundle(files, build_manifest(files, **stated), KEY)


def test_a_signed_file_that_does_not_compile_fails_naming_it(shipped):
    files = _files(shipped)
    files["crm.yaml"] = files["crm.yaml"].replace(b"effect: allow", b"effect: perhaps")

    with pytest.raises(BundleError) as caught:
        verify_bundle(_signed(files), TRUSTED)

    assert caught.value.kind is BundleProblem.DOES_NOT_COMPILE
    assert caught.value.path == "crm.yaml"
    assert "does_not_compile: crm.yaml:$" in str(caught.value)


def test_a_wrongly_stated_revision_is_refused(shipped):
    with pytest.raises(BundleError, match="^revision_mismatch: bundle.json: "):
        verify_bundle(_signed(_files(shipped), revision="sha256:00"), TRUSTED)


def test_an_unlisted_file_is_extra(shipped):
    members = _members(shipped)
    members["policies/extra.yaml"] = b"{}"

    with pytest.raises(BundleError, match="^extra_file: extra.yaml: "):
        verify_bundle(_repack(members), TRUSTED)


def test_a_listed_file_left_out_is_missing(shipped):
    members = _members(shipped)
    del members["policies/roles.yaml"]

    with pytest.raises(BundleError, match="^missing_file: roles.yaml: "):
        verify_bundle(_repack(members), TRUSTED)


def _members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {info.name: tar.extractfile(info).read() for info in tar}


def _repack(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, content in sorted(members.items()):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


@pytest.mark.parametrize(
    "data",
    [b"", b"not a tar at all" * 100, b"\0" * 1024],
    ids=["empty", "garbage", "zeros"],
)
def test_what_is_not_a_bundle_is_malformed(data):
    with pytest.raises(BundleError) as caught:
        verify_bundle(data, TRUSTED)

    assert caught.value.kind is BundleProblem.MALFORMED


def test_a_truncated_bundle_is_refused(shipped):
    with pytest.raises(BundleError):
        verify_bundle(shipped[: len(shipped) // 2], TRUSTED)


def test_a_bundle_cut_on_any_block_boundary_is_malformed(shipped):
    # tar itself reads such a cut as a shorter archive and says nothing.
    for end in range(0, len(shipped), tarfile.BLOCKSIZE):
        with pytest.raises(BundleError) as caught:
            verify_bundle(shipped[:end], TRUSTED)

        assert caught.value.kind is BundleProblem.MALFORMED, end


def test_a_manifest_not_in_canonical_json_is_malformed(shipped):
    members = _members(shipped)
    members[MANIFEST_NAME] = members[MANIFEST_NAME].replace(b",", b", ", 1)

    with pytest.raises(BundleError, match="^malformed: bundle.json: "):
        verify_bundle(_repack(members), TRUSTED)


# ------------------------------------------------------------------ CLI


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kynara_sidecar.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )


def test_cli_builds_verifies_and_refuses_to_overwrite(tmp_path):
    key, public, out = tmp_path / "k.pem", tmp_path / "k.pub", tmp_path / "b.tar"
    save_signing_key(KEY, key)
    save_public_key(KEY.public(), public)
    revision = load_policies(SHIPPED_POLICIES).policy_set.revision

    built = _cli("bundle", "build", SHIPPED_POLICIES, "--key", key, "--out", out)
    verified = _cli("bundle", "verify", out, "--trusted-key", public)
    again = _cli("bundle", "build", SHIPPED_POLICIES, "--key", key, "--out", out)

    assert built.returncode == 0, built.stderr
    assert f"policy {revision}" in built.stdout
    assert verified.returncode == 0, verified.stderr
    assert f"policy {revision}" in verified.stdout
    assert again.returncode == 1
    assert "already exists" in again.stderr
    assert verify_bundle(out.read_bytes(), TRUSTED).revision == revision


def test_cli_verify_with_another_key_fails_naming_the_kind(tmp_path, shipped):
    out, public = tmp_path / "b.tar", tmp_path / "other.pub"
    out.write_bytes(shipped)
    save_public_key(generate_key().public(), public)

    result = _cli("bundle", "verify", out, "--trusted-key", public)

    assert result.returncode == 1
    assert "kynara-sidecar bundle: unknown_key: signed by" in result.stderr


def test_a_bundle_over_the_cap_is_too_large_before_it_is_read():
    from kynara_sidecar.sync import MAX_BUNDLE_BYTES

    with pytest.raises(BundleError, match=r"^too_large: .*-byte cap") as info:
        verify_bundle(bytes(MAX_BUNDLE_BYTES + 1), TRUSTED)

    assert info.value.kind is BundleProblem.TOO_LARGE


def test_build_refuses_a_bundle_over_the_cap(tmp_path, monkeypatch):
    from kynara_sidecar.sync import BundleTooLarge
    from kynara_sidecar.sync import bundle as bundle_module

    size = len(build_bundle(SHIPPED_POLICIES, KEY, NOW))
    # The real cap is 64 MiB; the rule is the same at the shipped set's size.
    monkeypatch.setattr(bundle_module, "MAX_BUNDLE_BYTES", size - 1)

    with pytest.raises(BundleTooLarge, match=rf"{size} bytes, over the {size - 1}"):
        build_bundle(SHIPPED_POLICIES, KEY, NOW)


def test_inspect_checks_everything_but_the_signature(shipped):
    from kynara_sidecar.sync.bundle import inspect_bundle

    other = generate_key()
    foreign = build_bundle(SHIPPED_POLICIES, other, NOW)

    inspected = inspect_bundle(foreign)
    with pytest.raises(BundleError) as info:
        inspect_bundle(shipped[:-1024])

    assert inspected.key_id == other.key_id
    assert inspected.revision == load_policies(SHIPPED_POLICIES).policy_set.revision
    assert info.value.kind is BundleProblem.MALFORMED


def test_seconds_ahead_measures_a_created_time_against_now():
    from kynara_sidecar.sync.bundle import seconds_ahead

    assert seconds_ahead("2026-12-07T09:05:00Z", NOW) == pytest.approx(300.0)
    assert seconds_ahead("2026-12-07T08:59:00Z", NOW) == pytest.approx(-60.0)
    with pytest.raises(ValueError, match="RFC 3339"):
        seconds_ahead("yesterday", NOW)


def test_cli_build_refuses_policies_over_the_cap_naming_it(tmp_path):
    from kynara_sidecar.sync import MAX_BUNDLE_BYTES

    policies = tmp_path / "policies"
    shutil.copytree(SHIPPED_POLICIES, policies)
    with (policies / "payments.yaml").open("ab") as file:
        file.write(b"# " + b"x" * MAX_BUNDLE_BYTES + b"\n")
    key, out = tmp_path / "k.pem", tmp_path / "b.tar"
    save_signing_key(KEY, key)

    built = _cli("bundle", "build", policies, "--key", key, "--out", out)

    assert built.returncode == 1
    assert f"over the {MAX_BUNDLE_BYTES}-byte cap" in built.stderr
    assert not out.exists()
