"""Directory publishing against other publishers and the collector's stop:
the publish lock of a dir:// store held by a peer, made by another user;
a publish the stop interrupted that fails. Real DirStores in tmp dirs, a
real collector with SCIM on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import yaml
from support import NOBODY, as_nobody

from kynara_sidecar.collector.scim import DirectoryPublishing
from kynara_sidecar.sync import StoreUnavailable
from kynara_sidecar.sync.dir_store import _OUTSTANDING, MAX_OUTSTANDING_CALLS, DirStore
from kynara_sidecar.sync.follower import bundle_digest

from .test_scim import Scim, stopped_mid_publish

# Bounds that only stop a broken run from hanging.
BOUND = 15.0


@contextlib.contextmanager
def _held(lock: pathlib.Path):
    """The publish lock held by another publisher (as one stopped with
    SIGSTOP, Ctrl-Z or a frozen container while it held it)."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        os.close(fd)


def _drained(root: pathlib.Path) -> None:
    """Wait until no store call on ``root`` is still on its thread."""
    deadline = time.monotonic() + BOUND
    while _OUTSTANDING.get(str(root), 0) and time.monotonic() < deadline:
        time.sleep(0.02)


def test_an_interrupted_publish_that_fails_leaves_no_unretrieved_exception():
    # The stop cancels run() while its shielded publish is in flight; that
    # publish then fails. Nobody awaits it any more: its error must still
    # count as retrieved, or asyncio logs "Task exception was never
    # retrieved" (ERROR, with traceback) when the task is collected.
    reported: list[str] = []

    async def scenario() -> str:
        asyncio.get_running_loop().set_exception_handler(
            lambda loop, context: reported.append(context["message"])
        )
        contents = [b"old", b"new"]
        started: list[bytes] = []

        async def publish(content: bytes) -> str:
            started.append(content)
            await asyncio.sleep(0.05)
            if content == b"old":
                raise StoreUnavailable("dir:///x: publish directory took too long")
            return content.decode()

        publishing = DirectoryPublishing(
            lambda: contents.pop(0), publish, retry_seconds=0
        )
        await stopped_mid_publish(publishing, started)
        await asyncio.wait_for(publishing.flush(), BOUND)
        return publishing.revision

    revision = asyncio.run(scenario())
    gc.collect()

    assert revision == "new"
    assert reported == []


def test_a_held_publish_lock_does_not_stop_the_stores_other_calls(tmp_path):
    # A publish that gives up on the lock must not leave its thread blocked
    # in flock: MAX_OUTSTANDING_CALLS such threads (per root, for every
    # DirStore in the process: the collector's segment intake too) and
    # every other call on the store would be refused as "a hung mount",
    # though the file system is fine and only a peer holds the lock.
    root = tmp_path / "store"
    root.mkdir()

    async def scenario() -> str:
        store = DirStore(f"dir://{root}", timeout=0.2)
        await store.connect()
        with _held(root / "directory" / ".publish.lock"):
            for n in range(MAX_OUTSTANDING_CALLS):
                data = b"update %d" % n
                with contextlib.suppress(StoreUnavailable):
                    await store.publish_directory(bundle_digest(data), data)
            try:
                await store.ship_segment("d1", "log.1.1", b"records")
                refused = ""
            except StoreUnavailable as err:
                refused = str(err)
        return refused

    try:
        refused = asyncio.run(scenario())
    finally:
        _drained(root)

    assert refused == ""


def test_a_lock_file_another_user_made_does_not_stop_publishing():
    # A hand `directory publish` as root makes directory/.publish.lock
    # (0644, root's); the collector's own user may still replace `current`
    # and remove updates (they need only the folder's write permission),
    # and so publish: it locks through a read-only descriptor.
    nobody = as_nobody()
    base = pathlib.Path(tempfile.mkdtemp(prefix="r13c-"))
    try:
        base.chmod(0o755)
        root = base / "store"
        (root / "directory").mkdir(parents=True)
        root.chmod(0o755)
        os.chown(root / "directory", NOBODY, NOBODY)

        async def by_root() -> None:
            data = b"by hand"
            await DirStore(f"dir://{root}").publish_directory(bundle_digest(data), data)

        asyncio.run(by_root())
        script = (
            "import asyncio, hashlib, sys\n"
            "from kynara_sidecar.sync.dir_store import DirStore\n"
            "data = b'by the collector'\n"
            "digest = 'sha256:' + hashlib.sha256(data).hexdigest()\n"
            "store = DirStore(sys.argv[1])\n"
            "asyncio.run(store.publish_directory(digest, data))\n"
        )
        done = subprocess.run(
            [*nobody, sys.executable, "-c", script, f"dir://{root}"],
            capture_output=True,
            text=True,
            timeout=BOUND,
        )
        current = (root / "directory" / "current").read_text().strip()
    finally:
        shutil.rmtree(base, ignore_errors=True)

    assert done.returncode == 0, done.stderr[-400:]
    assert current == bundle_digest(b"by the collector")


def test_the_collectors_stop_beside_a_held_lock_leaves_no_stray_task(tmp_path):
    # A real collector whose publish waits on a lock a peer holds: its stop
    # waits for that publish, which fails, then its own publish is cut off
    # by the same bound (store.timeout_seconds). Nothing is lost (the next
    # start publishes), no error goes unretrieved, and nothing of the
    # publishing is still running after the stop returned.
    (tmp_path / "store").mkdir()
    setup = Scim(tmp_path, publish_interval_seconds=0)
    config = yaml.safe_load(setup.config_path.read_text())
    config["store"]["timeout_seconds"] = 0.5
    setup.config_path.write_text(yaml.safe_dump(config))
    scim = setup.start()
    running = scim.running
    assert running is not None
    reported: list[str] = []
    root = tmp_path / "store"

    async def others() -> list[str]:
        me = asyncio.current_task()
        return sorted(
            repr(task.get_coro())
            for task in asyncio.all_tasks()
            if task is not me and not task.done()
        )

    try:
        running.loop.set_exception_handler(
            lambda loop, context: reported.append(context["message"])
        )
        scim.create_user("alice")
        scim.wait_published(lambda found: len(found) == 1, "alice")
        publishing = running.collector.directory_publishing
        assert publishing is not None
        with _held(root / "directory" / ".publish.lock"):
            before = publishing._inflight
            scim.create_user("bob")
            deadline = time.monotonic() + BOUND
            while time.monotonic() < deadline and (
                publishing._inflight is before or publishing._inflight.done()
            ):
                time.sleep(0.01)
            interrupted = publishing._inflight
            # Stop once the publish is well under way: it fails (0.5 s) while
            # the stop's flush (bounded by the same 0.5 s) waits for it.
            time.sleep(0.3)
            running.call(running.collector.stop())
            left = running.call(others())
        assert interrupted is not None and interrupted.done()
        del interrupted, before
        _drained(root)
    finally:
        scim.stop()
        _drained(root)
    # Let the stopped collector's publishing (and what it still holds) go.
    running.collector.directory_publishing = None
    del publishing
    gc.collect()

    assert left == []
    assert reported == []
