"""Bundles without a directory file, for fleets that follow a signed
directory, and the cap on principal ids a signed directory may hold."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from support import REPO_ROOT, SHIPPED_POLICIES

from kynara_sidecar.audit.keys import generate_key, save_public_key, save_signing_key
from kynara_sidecar.decision import Timestamp
from kynara_sidecar.errors import PolicyError
from kynara_sidecar.policy.loader import (
    NO_DIRECTORY,
    compile_documents,
    load_policies,
    read_documents,
    read_policy_documents,
)
from kynara_sidecar.policy.names import MAX_NAME_LENGTH
from kynara_sidecar.sync.bundle import (
    BundleError,
    BundleProblem,
    build_bundle,
    inspect_bundle,
    verify_bundle,
)
from kynara_sidecar.sync.directory import (
    DirectoryError,
    DirectoryProblem,
    canonical_principal_id,
    directory_content,
)

KEY = generate_key()
TRUSTED = {KEY.key_id: KEY.public()}
NOW = Timestamp(1_796_634_000, 0)


@pytest.fixture
def no_directory(tmp_path):
    """The shipped policies without their directory file."""
    target = tmp_path / "policies"
    shutil.copytree(SHIPPED_POLICIES, target, ignore=shutil.ignore_patterns("tests"))
    (target / "directory.yaml").unlink()
    return target


def test_a_policy_directory_without_a_directory_file_builds_a_bundle_without_one(
    no_directory,
):
    data = build_bundle(no_directory, KEY, NOW)

    verified = verify_bundle(data, TRUSTED)

    assert verified.directory_revision == ""
    assert verified.policies.directory is NO_DIRECTORY
    assert "directory.yaml" not in verified.files
    expected = compile_documents(read_documents(no_directory), directory="optional")
    assert verified.revision == expected.policy_set.revision
    assert inspect_bundle(data).directory_revision == ""


def test_a_daemon_without_a_directory_store_refuses_a_bundle_without_one(
    no_directory,
):
    data = build_bundle(no_directory, KEY, NOW)

    with pytest.raises(BundleError) as refused:
        verify_bundle(data, TRUSTED, directory="required")

    assert refused.value.kind is BundleProblem.DOES_NOT_COMPILE
    assert "expected exactly one directory file, got none" in str(refused.value)
    assert verify_bundle(data, TRUSTED, directory="ignored").directory_revision == ""


@pytest.mark.parametrize("use", ["optional", "required", "ignored"])
def test_a_bundle_with_a_directory_verifies_as_before(use):
    data = build_bundle(SHIPPED_POLICIES, KEY, NOW)
    loaded = load_policies(SHIPPED_POLICIES)

    verified = verify_bundle(data, TRUSTED, directory=use)

    assert verified.directory_revision == loaded.directory.revision
    assert verified.revision == loaded.policy_set.revision
    compiled = verified.policies.directory
    assert (compiled is NO_DIRECTORY) == (use == "ignored")


def test_a_policy_directory_without_a_directory_file_still_fails_to_load(
    no_directory,
):
    with pytest.raises(PolicyError, match="expected exactly one directory file"):
        load_policies(no_directory)


def test_reading_policies_leaves_directory_files_aside_unvalidated(tmp_path):
    target = tmp_path / "policies"
    shutil.copytree(SHIPPED_POLICIES, target, ignore=shutil.ignore_patterns("tests"))
    directory = target / "directory.yaml"
    # An unknown field: validation would refuse the file.
    directory.write_text(directory.read_text() + "surprise: true\n")

    documents, skipped = read_policy_documents(target)

    assert skipped == [str(directory)]
    assert all(item.document.kind == "policy" for item in documents)
    with pytest.raises(PolicyError, match="surprise"):
        read_documents(target)


def test_cli_builds_a_bundle_without_a_directory(tmp_path, no_directory):
    key, public, out = tmp_path / "k.pem", tmp_path / "k.pub", tmp_path / "b.tar"
    save_signing_key(KEY, key)
    save_public_key(KEY.public(), public)

    built = _cli("bundle", "build", no_directory, "--key", key, "--out", out)
    verified = _cli("bundle", "verify", out, "--trusted-key", public)

    assert built.returncode == 0, built.stderr
    assert verified.returncode == 0, verified.stderr
    assert verify_bundle(out.read_bytes(), TRUSTED).directory_revision == ""


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kynara_sidecar.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )


# ------------------------------------------------------------ principal ids


def test_a_principal_id_at_the_request_cap_is_taken_one_past_is_refused():
    at_cap = "u" * MAX_NAME_LENGTH
    content = directory_content([{"id": at_cap, "kind": "user"}])

    with pytest.raises(DirectoryError) as refused:
        directory_content([{"id": at_cap + "u", "kind": "user"}])

    assert at_cap.encode() in content
    assert refused.value.kind is DirectoryProblem.BAD_CONTENT
    assert refused.value.path == "$.principals[0].id"
    assert f"1..{MAX_NAME_LENGTH} characters" in str(refused.value)
    # The message quotes the id cut short, not whole.
    assert len(str(refused.value)) < 400


def test_the_cap_counts_characters_of_the_nfc_form():
    # "e" and a combining acute: two code points that NFC makes one.
    decomposed = "e\u0301" * MAX_NAME_LENGTH

    assert canonical_principal_id(decomposed) == "\u00e9" * MAX_NAME_LENGTH
    with pytest.raises(ValueError, match=f"1..{MAX_NAME_LENGTH} characters"):
        canonical_principal_id("\u00e9" * (MAX_NAME_LENGTH + 1))
