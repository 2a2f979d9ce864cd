"""``kynara-sidecar bundle publish``: verify, then make a bundle current."""

from __future__ import annotations

import asyncio
import hashlib
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest
from support import REPO_ROOT, SHIPPED_POLICIES, as_nobody

from kynara_sidecar.audit.keys import generate_key, save_public_key
from kynara_sidecar.decision import Timestamp
from kynara_sidecar.sync import MAX_BUNDLE_BYTES, open_store
from kynara_sidecar.sync.bundle import build_bundle, verify_bundle, write_bundle

CLI = [sys.executable, "-m", "kynara_sidecar.cli"]
# An hour ago, by the real clock: `bundle publish` warns about a bundle
# created in the future.
NOW = Timestamp(time.time_ns() // 1_000_000_000 - 3600)


def run(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*prefix, *CLI, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )


@pytest.fixture
def signed(tmp_path) -> tuple[pathlib.Path, pathlib.Path, bytes, str]:
    """A bundle file of the shipped policies, the key that signed it (public
    half), its bytes and its revision."""
    key = generate_key()
    data = build_bundle(SHIPPED_POLICIES, key, NOW)
    path = tmp_path / "b.tar"
    write_bundle(path, data)
    public = tmp_path / "bundle-key.pub"
    save_public_key(key.public(), public)
    revision = verify_bundle(data, {key.key_id: key.public()}).revision
    return path, public, data, revision


def current(url: str):
    async def read():
        store = open_store(url, timeout=5)
        await store.connect()
        try:
            return await store.current_bundle()
        finally:
            await store.close()

    return asyncio.run(read())


@pytest.fixture(params=["dir", "nats"])
def store_url(request, tmp_path) -> str:
    if request.param == "dir":
        (tmp_path / "store").mkdir()
        return f"dir://{tmp_path / 'store'}"
    return request.getfixturevalue("nats_server").url


def test_publish_verifies_then_prints_digest_and_revision(signed, store_url):
    path, public, data, revision = signed
    digest = "sha256:" + hashlib.sha256(data).hexdigest()

    result = run(
        "bundle", "publish", path, "--store", store_url, "--trusted-key", public
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"ok: published {path} to {store_url}: {digest}, policy {revision}\n"
    )
    assert current(store_url).data == data


def test_publish_without_a_key_says_the_revision_is_not_verified(signed, store_url):
    path, _, data, revision = signed

    result = run("bundle", "publish", path, "--store", store_url)

    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith(
        f"policy {revision} (not verified: no --trusted-key)\n"
    )
    assert current(store_url).data == data


def test_publish_refuses_a_bundle_its_key_does_not_verify(signed, tmp_path, store_url):
    path, _, _, _ = signed
    stranger = tmp_path / "stranger.pub"
    save_public_key(generate_key().public(), stranger)

    result = run(
        "bundle", "publish", path, "--store", store_url, "--trusted-key", stranger
    )

    assert result.returncode == 1
    assert result.stderr.startswith("kynara-sidecar bundle: unknown_key: signed by ")
    assert current(store_url) is None


def test_publish_to_an_unreachable_store_fails_naming_it(signed):
    path, public, _, _ = signed
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"nats://127.0.0.1:{probe.getsockname()[1]}"

    result = run(
        "bundle", "publish", path, "--store", url, "--trusted-key", public,
        "--timeout", "1",
    )  # fmt: skip

    assert result.returncode == 1
    assert result.stderr.startswith(f"kynara-sidecar bundle: {url}: connect: ")
    assert result.stdout == ""


def test_publish_to_a_missing_directory_fails_naming_it(signed, tmp_path):
    path, public, _, _ = signed
    missing = tmp_path / "not-mounted"

    result = run("bundle", "publish", path, "--store", f"dir://{missing}")

    assert result.returncode == 1
    assert f"{missing} is not a directory" in result.stderr


@pytest.fixture
def shared_dir():
    """A directory nobody may enter and read (tmp_path's parent is root's)."""
    path = tempfile.mkdtemp(prefix="kynara-publish-")
    os.chmod(path, 0o755)
    yield pathlib.Path(path)
    shutil.rmtree(path)


def test_publish_to_a_directory_the_user_cannot_write_fails_naming_it(
    signed, shared_dir
):
    prefix = as_nobody()
    bundle = shared_dir / "b.tar"
    shutil.copy(signed[0], bundle)
    bundle.chmod(0o644)
    store = shared_dir / "store"
    store.mkdir(mode=0o755)

    result = run(
        "bundle", "publish", bundle, "--store", f"dir://{store}", prefix=prefix
    )

    assert result.returncode == 1, result.stdout
    assert result.stderr.startswith(f"kynara-sidecar bundle: dir://{store}: ")
    assert str(store / "bundles") in result.stderr
    assert not (store / "bundles").exists()


@pytest.mark.parametrize(
    "content",
    [b"hello", b"policies:\n  - name: not a bundle\n"],
    ids=["text", "yaml"],
)
def test_publish_without_a_key_still_refuses_what_is_not_a_bundle(tmp_path, content):
    (tmp_path / "store").mkdir()
    url = f"dir://{tmp_path / 'store'}"
    path = tmp_path / "not-a-bundle"
    path.write_bytes(content)

    result = run("bundle", "publish", path, "--store", url)

    assert result.returncode == 1
    assert result.stderr.startswith("kynara-sidecar bundle: malformed: ")
    assert current(url) is None


def _bundle_at(tmp_path, name: str, seconds_ago: int, key) -> pathlib.Path:
    created = Timestamp(time.time_ns() // 1_000_000_000 - seconds_ago)
    path = tmp_path / name
    write_bundle(path, build_bundle(SHIPPED_POLICIES, key, created))
    return path


def test_publish_refuses_a_bundle_older_than_the_current_unless_forced(tmp_path):
    (tmp_path / "store").mkdir()
    url = f"dir://{tmp_path / 'store'}"
    key = generate_key()
    newer = _bundle_at(tmp_path, "newer.tar", 60, key)
    older = _bundle_at(tmp_path, "older.tar", 3600, key)
    assert run("bundle", "publish", newer, "--store", url).returncode == 0

    refused = run("bundle", "publish", older, "--store", url)
    kept = current(url).data
    forced = run("bundle", "publish", older, "--store", url, "--force")

    assert refused.returncode == 2
    assert "before the current bundle" in refused.stderr
    assert "--force" in refused.stderr
    assert kept == newer.read_bytes()
    assert forced.returncode == 0, forced.stderr
    assert current(url).data == older.read_bytes()


def test_publish_and_verify_warn_about_a_bundle_from_the_future(tmp_path):
    (tmp_path / "store").mkdir()
    url = f"dir://{tmp_path / 'store'}"
    key = generate_key()
    public = tmp_path / "bundle-key.pub"
    save_public_key(key.public(), public)
    future = _bundle_at(tmp_path, "future.tar", -3600, key)

    verified = run("bundle", "verify", future, "--trusted-key", public)
    published = run("bundle", "publish", future, "--store", url)

    for result in (verified, published):
        assert result.returncode == 0, result.stderr
        assert result.stderr.startswith("warning: the bundle was created ")
        assert "sync.max_clock_skew_seconds (default 300)" in result.stderr


def test_verify_and_publish_refuse_a_bundle_over_the_cap(tmp_path):
    (tmp_path / "store").mkdir()
    url = f"dir://{tmp_path / 'store'}"
    key = generate_key()
    public = tmp_path / "bundle-key.pub"
    save_public_key(key.public(), public)
    path = tmp_path / "huge.tar"
    with path.open("wb") as file:
        file.truncate(MAX_BUNDLE_BYTES + 1)

    verified = run("bundle", "verify", path, "--trusted-key", public)
    published = run("bundle", "publish", path, "--store", url)

    for result in (verified, published):
        assert result.returncode == 1
        assert result.stderr.startswith("kynara-sidecar bundle: too_large: ")
        assert f"{MAX_BUNDLE_BYTES}-byte cap" in result.stderr
    assert current(url) is None


def test_publish_replaces_a_future_or_corrupt_current_without_force(tmp_path):
    (tmp_path / "store").mkdir()
    url = f"dir://{tmp_path / 'store'}"
    key = generate_key()
    future = _bundle_at(tmp_path, "future.tar", -3600, key)
    now = _bundle_at(tmp_path, "now.tar", 60, key)
    assert run("bundle", "publish", future, "--store", url).returncode == 0

    # Every daemon refused the future bundle: the one made now is the fix.
    fixed = run("bundle", "publish", now, "--store", url)
    content = tmp_path / "store" / "bundles" / current(url).digest.replace(":", "-")
    content.write_bytes(b"corrupted")
    over_corrupt = run("bundle", "publish", future, "--store", url)

    assert fixed.returncode == 0, fixed.stderr
    assert over_corrupt.returncode == 0, over_corrupt.stderr
    assert "warning: the current bundle is not readable" in over_corrupt.stderr
    assert current(url).data == future.read_bytes()
