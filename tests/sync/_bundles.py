"""Bundles for the follower and daemon tests: good ones at chosen creation
times, and the three broken kinds the issue names (a bad signature, one
file that does not compile, a truncated bundle)."""

from __future__ import annotations

import pathlib
import shutil
import time

from support import SHIPPED_POLICIES

from kynara_sidecar.audit.keys import SigningKey, generate_key, save_public_key
from kynara_sidecar.decision import Timestamp
from kynara_sidecar.policy.loader import load_policies
from kynara_sidecar.sync.bundle import (
    build_bundle,
    build_manifest,
    pack_bundle,
)

__all__ = [
    "BROKEN_RULE",
    "KEY",
    "OTHER_KEY",
    "bad_signature",
    "broken_compile",
    "policy_dir",
    "public_key_file",
    "revision_of",
    "signed",
    "truncated",
]

KEY = generate_key()
OTHER_KEY = generate_key()
# Each test bundle is created some seconds after this: an hour before
# both the tests' settable clock (2026-12-07T09:00:00Z) and the real one,
# since daemons refuse a bundle created in the future
# (sync.max_clock_skew_seconds) by either clock.
BASE_SECONDS = min(1_796_634_000, time.time_ns() // 1_000_000_000) - 3600
# The rule whose condition the broken bundle cuts short.
BROKEN_RULE = "refund-small"


def public_key_file(directory: pathlib.Path, key: SigningKey = KEY) -> pathlib.Path:
    path = directory / f"bundle-{key.key_id[:12]}.pub"
    if not path.exists():
        save_public_key(key.public(), path)
    return path


def policy_dir(root: pathlib.Path, variant: str) -> pathlib.Path:
    """The shipped policies with a comment naming ``variant``: one revision
    per variant."""
    target = root / f"policies-{variant}"
    if not target.exists():
        shutil.copytree(
            SHIPPED_POLICIES, target, ignore=shutil.ignore_patterns("tests")
        )
        payments = target / "payments.yaml"
        payments.write_text(payments.read_text() + f"# variant {variant}\n")
    return target


def revision_of(directory: pathlib.Path) -> str:
    return load_policies(directory).policy_set.revision


def signed(root: pathlib.Path, variant: str, seconds: int = 0) -> bytes:
    """A good bundle of ``variant``, created ``seconds`` after the base."""
    return build_bundle(
        policy_dir(root, variant), KEY, Timestamp(BASE_SECONDS + seconds, 0)
    )


def _files(directory: pathlib.Path) -> dict[str, bytes]:
    return {
        path.relative_to(directory).as_posix(): path.read_bytes()
        for path in sorted(directory.rglob("*.yaml"))
    }


def bad_signature(root: pathlib.Path, seconds: int = 0) -> bytes:
    """Names KEY as its signer, but OTHER_KEY signed it."""
    directory = policy_dir(root, "forged")
    loaded = load_policies(directory)
    manifest = build_manifest(
        _files(directory),
        revision=loaded.policy_set.revision,
        directory_revision=loaded.directory.revision,
        created=f"2026-12-07T09:{seconds // 60:02d}:{seconds % 60:02d}Z",
        key_id=KEY.key_id,
    )
    return pack_bundle(_files(directory), manifest, OTHER_KEY)


def broken_compile(root: pathlib.Path, seconds: int = 0) -> bytes:
    """Signed by KEY, but payments.yaml's rule BROKEN_RULE has a condition
    cut short, so the set does not compile."""
    files = _files(policy_dir(root, "broken"))
    files["payments.yaml"] = files["payments.yaml"].replace(
        b"condition: resource.attr.amount <= 50000",
        b"condition: resource.attr.amount <= ",
    )
    manifest = build_manifest(
        files,
        revision="sha256:" + "0" * 64,
        directory_revision="sha256:" + "0" * 64,
        created=f"2026-12-07T09:{seconds // 60:02d}:{seconds % 60:02d}Z",
        key_id=KEY.key_id,
    )
    return pack_bundle(files, manifest, KEY)


def truncated(root: pathlib.Path, seconds: int = 0) -> bytes:
    data = signed(root, "cut", seconds)
    return data[: len(data) // 2]
