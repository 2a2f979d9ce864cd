"""The fleet inbox's retention: an approval that ended longer ago than
``inbox.retention_seconds`` leaves the copy and does not come back. Real
signed approvals fed to an inbox on a real dir:// store, its clock set by
the test; and the collector's config and wiring."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib

import msgspec
import pytest

from kynara_sidecar.approvals.model import ApprovalState, InboxQuery
from kynara_sidecar.audit.keys import generate_key
from kynara_sidecar.collector import inbox as inbox_module
from kynara_sidecar.collector.config import (
    DEFAULT_INBOX_RETENTION_SECONDS,
    load_collector_config,
)
from kynara_sidecar.collector.inbox import FleetInbox
from kynara_sidecar.errors import ConfigError
from kynara_sidecar.sync import open_store

from .test_collector import dir_store
from .test_inbox_rotation import (
    ORIGIN,
    _approval,
    _approved,
    _entry,
    _inbox,
    running_fleet,
)

HOUR = 3600
SECOND_NS = 1_000_000_000
# 2026-01-01T00:00:00Z, when the approvals below end.
ENDED_NS = 1_767_225_600 * SECOND_NS
ENDED = "2026-01-01T00:00:00Z"
# A bound on waiting for the prune task; nothing is timed against it.
BOUND = 20.0


class Clock:
    """The inbox's clock, in nanoseconds, moved by the test."""

    def __init__(self, now: int):
        self.now = now

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def key():
    return generate_key()


@pytest.fixture
def clock() -> Clock:
    return Clock(ENDED_NS)


@pytest.fixture
def outcomes() -> list[str]:
    """What the inbox told its ``on_entry`` of, in order."""
    return []


@pytest.fixture
def inbox(tmp_path: pathlib.Path, key, clock, outcomes) -> FleetInbox:
    return FleetInbox(
        open_store(dir_store(tmp_path), timeout=2),
        name="fleet",
        signing_key=generate_key(),
        keys_of=lambda daemon_id: (
            {key.key_id: key.public()} if daemon_id == ORIGIN else None
        ),
        timeout=2,
        retry_seconds=0.1,
        clock=clock,
        on_entry=outcomes.append,
        retention_seconds=HOUR,
    )


def _rejected(letter: str):
    return msgspec.structs.replace(
        _approval(letter, expires_at=ENDED),
        state=ApprovalState.REJECTED,
        resolved_at="2025-12-31T23:00:00Z",
    )


def test_an_approval_leaves_the_copy_once_it_ended_a_retention_ago(inbox, key, clock):
    ended = _rejected("r")
    inbox.take(_entry(ended, key))

    clock.now = ENDED_NS + HOUR * SECOND_NS
    kept = inbox.prune()
    listed_at_the_bound = inbox.get(ended.id)
    clock.now += SECOND_NS
    dropped = inbox.prune()

    assert kept == 0
    assert listed_at_the_bound == ended
    assert dropped == 1
    assert inbox.get(ended.id) is None
    assert list(inbox.list(InboxQuery(state=None))) == []


def test_a_resolution_after_the_expiry_counts_from_the_resolution(inbox, key, clock):
    used = msgspec.structs.replace(
        _approved(_approval("u", expires_at=ENDED)),
        state=ApprovalState.USED,
        resolved_at="2026-01-01T00:30:00Z",
    )
    inbox.take(_entry(used, key))

    clock.now = ENDED_NS + (HOUR + 1) * SECOND_NS
    first = inbox.prune()
    clock.now = ENDED_NS + (HOUR + 1800 + 1) * SECOND_NS
    second = inbox.prune()

    assert (first, second) == (0, 1)


def test_a_pending_approval_stays_until_a_retention_past_its_expiry(inbox, key, clock):
    pending = _approval("p", expires_at="2026-03-01T00:00:00Z")
    inbox.take(_entry(pending, key))
    expiry_ns = ENDED_NS + 59 * 86_400 * SECOND_NS

    clock.now = expiry_ns
    kept = inbox.prune()
    clock.now = expiry_ns + (HOUR + 1) * SECOND_NS
    dropped = inbox.prune()

    assert kept == 0
    assert dropped == 1
    assert inbox.get(pending.id) is None


def test_a_pruned_approval_does_not_come_back(inbox, key, clock, caplog, outcomes):
    earlier = _approval("b", expires_at=ENDED)
    ended = _rejected("b")
    inbox.take(_entry(ended, key))
    clock.now = ENDED_NS + (HOUR + 1) * SECOND_NS
    inbox.prune()

    with caplog.at_level(logging.INFO, logger="kynara.collector"):
        replayed = inbox.take(_entry(earlier, key))
        again = inbox.take(_entry(ended, key))
        inbox.prune()

    assert replayed is None and again is None
    assert inbox.get(ended.id) is None
    (line,) = [r for r in caplog.records if "past retention" in r.getMessage()]
    assert (line.fields["dropped"], line.fields["not_taken"]) == (0, 2)
    assert outcomes == ["past_retention"] * 2


def test_entries_past_the_retention_are_not_taken_at_start(inbox, key, clock, outcomes):
    clock.now = ENDED_NS + 2 * HOUR * SECOND_NS
    old, recent = _rejected("o"), _approval("n")

    taken = [inbox.take(_entry(a, key)) for a in (old, recent)]

    assert taken == [None, recent]
    assert [a.id for a in inbox.list(InboxQuery(state=None))] == [recent.id]
    assert outcomes == ["past_retention"]


def test_the_running_inbox_prunes_on_its_own(inbox, key, clock, monkeypatch):
    monkeypatch.setattr(inbox_module, "PRUNE_SECONDS", 0.05)
    ended = _rejected("t")

    async def main() -> tuple[object, object]:
        stop = asyncio.Event()
        running = asyncio.create_task(inbox.run(stop))
        try:
            listed = inbox.take(_entry(ended, key))
            clock.now = ENDED_NS + (HOUR + 1) * SECOND_NS
            async with asyncio.timeout(BOUND):
                while inbox.get(ended.id) is not None:
                    await asyncio.sleep(0.01)
        finally:
            # As the collector stops it: the watch waits on the store.
            stop.set()
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
        return listed, inbox.get(ended.id)

    listed, after = asyncio.run(main())

    assert listed == ended
    assert after is None


INBOX = [
    "inbox.enabled=true",
    "inbox.signing_key=k.pem",
    "inbox.credentials={c: {secret_file: s, roles: [reviewer]}}",
    "store.url=dir:///tmp/kynara-unused-store",
]


@pytest.mark.parametrize("seconds", [0, HOUR - 1, 366 * 86_400 + 1])
def test_retention_seconds_is_bounded(seconds):
    with pytest.raises(
        ConfigError, match=r"inbox.retention_seconds: expected 3600\.\.31622400"
    ):
        load_collector_config(None, [*INBOX, f"inbox.retention_seconds={seconds}"])


def test_retention_seconds_defaults_to_a_week():
    config = load_collector_config(None, INBOX)

    assert config.inbox.retention_seconds == DEFAULT_INBOX_RETENTION_SECONDS
    assert DEFAULT_INBOX_RETENTION_SECONDS == 7 * 86_400


def test_the_collector_hands_its_retention_to_the_inbox(tmp_path):
    # Two hours: neither the config's default nor the inbox's own.
    with running_fleet(tmp_path, retention_seconds=2 * HOUR) as (collector, _, _):
        retention = _inbox(collector)._retention_nanos

    assert retention == 2 * HOUR * SECOND_NS
