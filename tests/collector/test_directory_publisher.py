"""The collector's DirectoryPublisher on a real dir:// store: ``created``
strictly increases whatever the clock does, unchanged content publishes
nothing, a restart continues from the store; the directory settings and
``kynara-collector directory publish``."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys

import pytest
import yaml
from support import REPO_ROOT

from kynara_sidecar.audit.keys import generate_key, save_signing_key
from kynara_sidecar.audit.record import parse_timestamp
from kynara_sidecar.collector.config import load_collector_config, load_directory_key
from kynara_sidecar.collector.directory import DirectoryPublisher
from kynara_sidecar.errors import ConfigError
from kynara_sidecar.sync import open_store
from kynara_sidecar.sync.directory import (
    DirectoryError,
    directory_content,
    directory_revision,
    verify_directory_update,
)

KEY = generate_key()
TRUSTED = {KEY.key_id: KEY.public()}
NOW_NS = 1_796_634_000 * 1_000_000_000


class SteppingClock:
    """Nanoseconds, from a list; the last one repeats."""

    def __init__(self, *values: int):
        self.values = list(values)

    def __call__(self) -> int:
        return self.values.pop(0) if len(self.values) > 1 else self.values[0]


class CountingStore:
    """A real DirStore that counts the directory publishes it was asked for."""

    def __init__(self, url: str):
        self.store = open_store(url, timeout=5.0)
        self.published = 0

    async def publish_directory(self, digest: str, data: bytes) -> None:
        self.published += 1
        await self.store.publish_directory(digest, data)

    async def current_directory(self):
        return await self.store.current_directory()


@pytest.fixture
def store(tmp_path) -> CountingStore:
    root = tmp_path / "store"
    root.mkdir()
    counting = CountingStore(f"dir://{root}")
    asyncio.run(counting.store.connect())
    return counting


def _content(*ids: str) -> bytes:
    return directory_content(
        {"id": i, "kind": "user", "roles": ["support"]} for i in ids
    )


async def _created_ns(store: CountingStore, trusted=TRUSTED) -> int:
    entry = await store.current_directory()
    moment = parse_timestamp(verify_directory_update(entry.data, trusted).created)
    return moment.seconds * 1_000_000_000 + moment.nanos


def test_created_strictly_increases_when_the_clock_steps_back(store):
    clock = SteppingClock(NOW_NS, NOW_NS - 10_000_000_000, NOW_NS + 5)
    publisher = DirectoryPublisher(store, KEY, clock=clock)

    async def scenario():
        created = []
        for content in (_content("a"), _content("a", "b"), _content("b")):
            await publisher.publish(content)
            created.append(await _created_ns(store))
        return created

    created = asyncio.run(scenario())

    assert created == [NOW_NS, NOW_NS + 1, NOW_NS + 5]
    assert store.published == 3


def test_unchanged_content_publishes_nothing_and_returns_its_revision(store):
    publisher = DirectoryPublisher(store, KEY, clock=SteppingClock(NOW_NS))
    content = _content("a", "b")

    async def scenario():
        first = await publisher.publish(content)
        entry = await store.current_directory()
        again = await publisher.publish(_content("b", "a"))
        return first, again, entry, await store.current_directory()

    first, again, before, after = asyncio.run(scenario())

    assert first == again == directory_revision(content)
    assert store.published == 1
    assert before == after
    assert publisher.revision == first


def test_a_restarted_publisher_continues_from_the_store(store):
    content = _content("a")

    async def scenario():
        await DirectoryPublisher(store, KEY, clock=SteppingClock(NOW_NS)).publish(
            content
        )
        # Restarted with the clock an hour back: the same content is
        # current already, a change is created after it.
        restarted = DirectoryPublisher(
            store, KEY, clock=SteppingClock(NOW_NS - 3_600_000_000_000)
        )
        same = await restarted.publish(content)
        count_after_same = store.published
        await restarted.publish(_content("a", "c"))
        return same, count_after_same, await _created_ns(store)

    same, count_after_same, created = asyncio.run(scenario())

    assert same == directory_revision(content)
    assert count_after_same == 1
    assert created == NOW_NS + 1
    assert store.published == 2


def test_a_hand_publish_created_ahead_of_the_clock_is_continued_from(store):
    # A running publisher, then a hand publish from a machine whose clock
    # is an hour ahead: the next revision is created after the hand one,
    # so daemons do not take it for an older update.
    ahead = NOW_NS + 3_600_000_000_000
    running = DirectoryPublisher(store, KEY, clock=SteppingClock(NOW_NS))

    async def scenario():
        await running.publish(_content("a"))
        await DirectoryPublisher(store, KEY, clock=SteppingClock(ahead)).publish(
            _content("a", "b")
        )
        same = await running.publish(_content("a", "b"))
        count_after_same = store.published
        await running.publish(_content("a", "b", "c"))
        return same, count_after_same, await _created_ns(store)

    same, count_after_same, created = asyncio.run(scenario())

    assert same == directory_revision(_content("a", "b"))
    assert count_after_same == 2
    assert created == ahead + 1
    assert store.published == 3


def test_a_directory_signed_by_another_key_is_published_over(store, caplog):
    other = generate_key()
    content = _content("a")

    async def scenario():
        await DirectoryPublisher(store, other, clock=SteppingClock(NOW_NS)).publish(
            content
        )
        with caplog.at_level(logging.WARNING, logger="kynara.collector"):
            await DirectoryPublisher(store, KEY, clock=SteppingClock(NOW_NS)).publish(
                content
            )
        return await store.current_directory()

    entry = asyncio.run(scenario())

    assert store.published == 2
    assert verify_directory_update(entry.data, TRUSTED).key_id == KEY.key_id
    assert "not verified with this key" in caplog.text


def test_content_that_is_no_directory_is_refused_and_nothing_published(store):
    publisher = DirectoryPublisher(store, KEY, clock=SteppingClock(NOW_NS))

    with pytest.raises(DirectoryError, match="bad_content"):
        asyncio.run(publisher.publish(b'{"kind":"directory"}'))
    assert store.published == 0


# ----------------------------------------------------------------- settings


def _config(tmp_path, **directory) -> str:
    root = tmp_path / "store"
    root.mkdir(exist_ok=True)
    path = tmp_path / "collector.yaml"
    raw = {"store": {"url": f"dir://{root}"}, "directory": directory}
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_the_directory_key_setting_is_named_when_missing_or_unreadable(tmp_path):
    empty = load_collector_config(_config(tmp_path), [])
    missing = load_collector_config(
        _config(tmp_path, signing_key=str(tmp_path / "nope.pem")), []
    )

    with pytest.raises(ConfigError, match=r"directory\.signing_key: expected"):
        load_directory_key(empty)
    with pytest.raises(ConfigError, match=r"directory\.signing_key: .*nope\.pem"):
        load_directory_key(missing)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kynara_sidecar.collector.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )


def test_the_cli_signs_and_publishes_a_directory_file(tmp_path):
    key_path = tmp_path / "directory.pem"
    save_signing_key(KEY, key_path)
    config = _config(tmp_path, signing_key=str(key_path))
    directory = tmp_path / "principals.yaml"
    directory.write_text(
        yaml.safe_dump(
            {
                "format_version": 1,
                "kind": "directory",
                "principals": [
                    {"id": "bob", "kind": "user", "roles": ["support"]},
                    {"id": "ann", "kind": "agent", "attributes": {"team": "x"}},
                ],
            }
        )
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("format_version: 1\nkind: directory\nprincipals: [{id: x}]\n")

    published = _cli("directory", "publish", directory, "--config", config)
    refused = _cli("directory", "publish", bad, "--config", config)

    async def current():
        store = open_store(f"dir://{tmp_path / 'store'}")
        return await store.current_directory()

    verified = verify_directory_update(asyncio.run(current()).data, TRUSTED)
    assert published.returncode == 0, published.stderr
    assert f"ok: directory {verified.revision} (2 principals)" in published.stdout
    assert [p.id for p in verified.source.document.principals] == ["ann", "bob"]
    assert refused.returncode != 0
    assert str(bad) in refused.stderr and "kind" in refused.stderr


def test_the_cli_names_store_url_when_the_store_directory_is_missing(tmp_path):
    key_path = tmp_path / "directory.pem"
    save_signing_key(KEY, key_path)
    config = _config(tmp_path, signing_key=str(key_path))
    directory = tmp_path / "principals.yaml"
    directory.write_text(
        "format_version: 1\nkind: directory\nprincipals: [{id: bob, kind: user}]\n"
    )
    missing = tmp_path / "no-such-store"

    refused = _cli(
        "directory",
        "publish",
        directory,
        "--config",
        config,
        "--set",
        f"store.url=dir://{missing}",
    )

    assert refused.returncode != 0
    assert str(missing) in refused.stderr
    assert "fix store.url" in refused.stderr
