"""The fleet inbox and a daemon's key rotation: an approval signed with a
key the collector learns only from a segment it has not taken in yet is
kept, and listed once the intake accepts that segment. A real collector
(dir:// store, LMDB state, HTTP) on its own loop, real signed logs and
approvals; and the inbox's bounds on what it keeps, fed by hand."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import time

import msgspec
import pytest
from audit._support import make_record

from kynara_sidecar.approvals.fleet import encode_approval
from kynara_sidecar.approvals.model import (
    Approval,
    ApprovalState,
    ChainPrincipal,
    InboxQuery,
    Review,
    Verdict,
)
from kynara_sidecar.audit.keys import SigningKey, generate_key, save_signing_key
from kynara_sidecar.audit.rotation import rotation_record
from kynara_sidecar.audit.store import AuditStore
from kynara_sidecar.collector import inbox as inbox_module
from kynara_sidecar.collector.archive import open_archive
from kynara_sidecar.collector.inbox import FleetInbox
from kynara_sidecar.collector.intake import Intake
from kynara_sidecar.collector.metrics import CollectorMetrics
from kynara_sidecar.collector.registry import DaemonRegistry
from kynara_sidecar.collector.state import CollectorState
from kynara_sidecar.collector.verifier import Verdict as SegmentVerdict
from kynara_sidecar.sync import PublishedApproval, open_store

from ._logs import ORIGIN, messages_of, write_log
from .test_collector import RunningCollector, dir_store, ship, write_config
from .test_intake_attacks import Delivery

# A bound on waiting for what should happen within a poll or two; it only
# stops a broken run from hanging, nothing is timed against it.
BOUND = 20.0
ROTATED_AT = "2026-12-04T10:00:00Z"


def _approval(letter: str, **changes) -> Approval:
    approval = Approval(
        id="apr_" + letter * 26,
        state=ApprovalState.PENDING,
        daemon_id=ORIGIN,
        agent_id="support-bot",
        digest="sha256:" + "0" * 64,
        decision_id=f"dec_{letter}",
        chain=(ChainPrincipal(id="bob"), ChainPrincipal(id="support-bot")),
        action="payments.refund.issue",
        resource_kind="payments.refund",
        resource_id="R9",
        created_at="2026-01-01T00:00:00Z",
        expires_at="2099-01-01T00:00:00Z",
    )
    return msgspec.structs.replace(approval, **changes)


def _approved(approval: Approval) -> Approval:
    review = Review(
        reviewer="carol",
        roles=("reviewer",),
        verdict=Verdict.APPROVE,
        at="2026-01-01T00:01:00Z",
    )
    return msgspec.structs.replace(
        approval,
        state=ApprovalState.APPROVED,
        reviews=(review,),
        resolved_at=review.at,
    )


def _rotate(log, new_key: SigningKey) -> None:
    """Append a sealed segment that hands the log to ``new_key``."""
    store = AuditStore.open(log.path)
    try:
        rotation = rotation_record(
            log.key, new_key.public(), origin=ORIGIN, log_id=log.log_id, time=ROTATED_AT
        )
        log.append([rotation, make_record(6)], store=store, seal=True, key=new_key)
    finally:
        store.close()


def _append_signed(log, key: SigningKey, seq: int) -> None:
    """Append one record as a sealed segment signed with ``key``."""
    store = AuditStore.open(log.path)
    try:
        log.append([make_record(seq)], store=store, seal=True, key=key)
    finally:
        store.close()


def _publish(store_url: str, *entries: tuple[Approval, SigningKey]) -> None:
    async def put() -> None:
        store = open_store(store_url, timeout=2)
        await store.connect()
        try:
            for approval, key in entries:
                data = encode_approval(approval, key)
                await store.put_approval(approval.daemon_id, approval.id, data)
        finally:
            await store.close()

    asyncio.run(put())


def _wait_for(condition, what: str):
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    pytest.fail(f"gave up waiting for {what}")


@pytest.fixture
def fleet(tmp_path: pathlib.Path):
    """A collector with the fleet inbox over a dir:// store, that took in a
    4-record log of ORIGIN; returns (collector, store url, log)."""
    with running_fleet(tmp_path) as running:
        yield running


@contextlib.contextmanager
def running_fleet(tmp_path: pathlib.Path, **inbox: object):
    """The collector of ``fleet``, with ``inbox`` added to its inbox
    settings; stopped at the end."""
    log = write_log(tmp_path / "log", 4, segment=4)
    store_url = dir_store(tmp_path)
    inbox_key = tmp_path / "inbox.pem"
    save_signing_key(generate_key(), inbox_key)
    (tmp_path / "carol.secret").write_bytes(b"carol-reviewer-secret-0123456789")
    config = write_config(
        tmp_path,
        log,
        store={"url": store_url, "poll_seconds": 0.05, "retry_seconds": 0.1},
        inbox={
            "enabled": True,
            "signing_key": str(inbox_key),
            "credentials": {
                "carol": {
                    "secret_file": str(tmp_path / "carol.secret"),
                    "roles": ["reviewer"],
                }
            },
            **inbox,
        },
    )
    ship(store_url, log.path)
    collector = RunningCollector(config)
    try:
        collector.wait_for(lambda d: d["tree_size"] == 4, "tree size 4")
        yield collector, store_url, log
    finally:
        collector.stop()


def _inbox(collector: RunningCollector) -> FleetInbox:
    assert collector.collector.inbox is not None
    return collector.collector.inbox


def test_an_approval_signed_before_its_rotation_is_taken_in_is_listed_after(fleet):
    collector, store_url, log = fleet
    inbox, new_key = _inbox(collector), generate_key()
    _rotate(log, new_key)
    early, marker = _approval("e"), _approval("m")
    # The daemon publishes with its new key before the collector has the
    # segment that introduces it; a marker under the old key says the
    # inbox has read the store past it.
    _publish(store_url, (early, new_key), (marker, log.key))
    _wait_for(lambda: inbox.get(marker.id), "the marker in the inbox")
    before = inbox.get(early.id)

    ship(store_url, log.path, after=4)
    collector.wait_for(lambda d: d["tree_size"] == 6, "the rotation taken in")
    listed = _wait_for(lambda: inbox.get(early.id), "the early approval listed")

    assert before is None
    assert listed == early
    assert {a.id for a in inbox.list(InboxQuery())} == {early.id, marker.id}
    assert inbox._kept == {}
    entries = collector.collector.metrics.registry.get_sample_value(
        "kynara_collector_inbox_entries_total", {"outcome": "kept"}
    )
    assert entries == 1


def _fed_inbox(tmp_path: pathlib.Path, keys: dict) -> FleetInbox:
    """A fleet inbox on a dir:// store it is never asked to read: its copy
    is fed by ``take``, its keys are ``keys`` (changed by the test)."""
    return FleetInbox(
        open_store(dir_store(tmp_path), timeout=2),
        name="fleet",
        signing_key=generate_key(),
        keys_of=lambda daemon_id: keys if daemon_id == ORIGIN else None,
        timeout=2,
        retry_seconds=0.1,
    )


def _entry(approval: Approval, key: SigningKey) -> PublishedApproval:
    return PublishedApproval(ORIGIN, approval.id, encode_approval(approval, key))


def test_kept_approvals_are_bounded_per_daemon_latest_state_each(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(inbox_module, "MAX_KEPT_PER_DAEMON", 2)
    old, new = generate_key(), generate_key()
    keys = {old.key_id: old.public()}
    inbox = _fed_inbox(tmp_path, keys)
    a, b, c = _approval("a"), _approval("b"), _approval("c")

    for approval in (a, b, _approved(a), c):
        assert inbox.take(_entry(approval, new)) is None
    keys[new.key_id] = new.public()
    inbox.keys_added(ORIGIN)

    # b was kept longest when c came: dropped; a's later state replaced its
    # first and counts as kept since then.
    assert inbox.get(b.id) is None
    assert inbox.get(a.id) == _approved(a)
    assert inbox.get(c.id) == c
    assert inbox._kept == {}
    dropped = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert [r.fields["approval_id"] for r in dropped] == [b.id]


def test_kept_approvals_are_bounded_in_bytes(tmp_path, monkeypatch):
    old, new = generate_key(), generate_key()
    keys = {old.key_id: old.public()}
    inbox = _fed_inbox(tmp_path, keys)
    a, b = _approval("a"), _approval("b")
    monkeypatch.setattr(
        inbox_module, "MAX_KEPT_BYTES_PER_DAEMON", len(_entry(a, new).data) + 1
    )

    inbox.take(_entry(a, new))
    inbox.take(_entry(b, new))
    keys[new.key_id] = new.public()
    inbox.keys_added(ORIGIN)

    assert [x.id for x in inbox.list(InboxQuery())] == [b.id]


def test_a_kept_approval_removed_from_the_store_or_still_unknown_is_not_listed(
    tmp_path,
):
    old, new, later = generate_key(), generate_key(), generate_key()
    keys = {old.key_id: old.public()}
    inbox = _fed_inbox(tmp_path, keys)
    gone, waiting = _approval("g"), _approval("w")
    inbox.take(_entry(gone, new))
    inbox.take(_entry(waiting, later))
    inbox.take(PublishedApproval(ORIGIN, gone.id, b"", deleted=True))

    keys[new.key_id] = new.public()
    inbox.keys_added(ORIGIN)
    still_kept = set(inbox._kept.get(ORIGIN, {}))
    keys[later.key_id] = later.public()
    inbox.keys_added(ORIGIN)

    assert inbox.get(gone.id) is None
    assert still_kept == {waiting.id}
    assert inbox.get(waiting.id) == waiting


def test_an_approval_with_a_bad_signature_is_skipped_not_kept(tmp_path):
    old = generate_key()
    inbox = _fed_inbox(tmp_path, {old.key_id: old.public()})
    approval = _approval("x")
    forged = encode_approval(approval, old).replace(
        b'"resource_id":"R9"', b'"resource_id":"R0"'
    )

    assert inbox.take(PublishedApproval(ORIGIN, approval.id, forged)) is None
    assert inbox._kept == {}


def test_the_intake_tells_of_new_keys_once_and_accepts_whatever_the_hook_does(
    tmp_path, caplog
):
    log, new_key = write_log(tmp_path / "log", 4, segment=4), generate_key()
    _rotate(log, new_key)
    _append_signed(log, new_key, 7)
    told: list[str] = []

    def keys_added(daemon_id: str) -> None:
        told.append(daemon_id)
        raise RuntimeError("listener broke")

    state = CollectorState.open(tmp_path / "state", map_size=1 << 26)
    try:
        intake = Intake(
            state=state,
            archive=open_archive(f"dir://{tmp_path / 'archive'}"),
            registry=DaemonRegistry.exact({ORIGIN: log.trusted}),
            metrics=CollectorMetrics(),
            keys_added=keys_added,
        )
        deliveries = [Delivery(ORIGIN, m) for m in messages_of(log.path)]
        outcomes = [asyncio.run(intake.receive(d)) for d in deliveries]
        frontier = state.frontier(ORIGIN)
    finally:
        state.close()

    assert [o.verdict for o in outcomes] == [SegmentVerdict.ACCEPTED] * 3
    assert [d.acked for d in deliveries] == [1, 1, 1]
    assert (frontier.tree_size, set(frontier.rotated_keys)) == (7, {new_key.key_id})
    assert told == [ORIGIN]
    assert any(
        r.getMessage() == "new keys of a daemon not passed on" for r in caplog.records
    )
