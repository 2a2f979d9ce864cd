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

import pytest
from support import REPO_ROOT, SHIPPED_POLICIES, as_nobody

from kynara_sidecar.audit.keys import generate_key, save_public_key
from kynara_sidecar.decision import Timestamp
from kynara_sidecar.sync import open_store
from kynara_sidecar.sync.bundle import build_bundle, verify_bundle, write_bundle

CLI = [sys.executable, "-m", "kynara_sidecar.cli"]
NOW = Timestamp(1_796_634_000)


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
