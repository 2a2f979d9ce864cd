"""One inbox for the fleet: a daemon and a collector on a real central store.

The daemon (its own loop, a real gRPC socket) publishes its approvals to
the store; the collector (its own loop, real HTTP) lists them in its fleet
inbox; a review made there is signed, put in the store, verified and
recorded by the daemon, and the waiting agent's retry with the grant is
allowed. Stores: a real nats-server on loopback, and a directory.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator

import aiohttp
import msgspec
import pytest
from kynara.v1 import decision_pb2 as pb
from support import RunningDaemon

from kynara_sidecar.approvals.model import (
    Approval,
    ApprovalState,
    InboxQuery,
    Reviewer,
    Verdict,
)
from kynara_sidecar.approvals.signed_review import (
    encode_signed_review,
    new_review_id,
    sign_review,
)
from kynara_sidecar.audit.chain import decode_record
from kynara_sidecar.audit.keys import (
    generate_key,
    save_public_key,
    save_signing_key,
)
from kynara_sidecar.audit.record import RecordKind
from kynara_sidecar.collector.config import load_collector_config
from kynara_sidecar.collector.service import Collector
from kynara_sidecar.errors import ApprovalClosed, SelfApproval
from kynara_sidecar.sync import open_store

# A bound on waiting for what should happen within a poll or two; it only
# stops a broken run from hanging, nothing is timed against it.
BOUND = 20.0
CAROL_SECRET = b"carol-reviewer-secret-0123456789"
ALICE_SECRET = b"alice-reviewer-secret-0123456789"


class RunningCollector:
    """A collector serving on its own loop thread; ``stop`` at teardown."""

    def __init__(self, tmp_path: pathlib.Path, store_url: str, clock, key_path):
        for name, secret in (("carol", CAROL_SECRET), ("alice", ALICE_SECRET)):
            (tmp_path / f"{name}.secret").write_bytes(secret)
        config = load_collector_config(
            None,
            [
                f"store.url={store_url}",
                "store.poll_seconds=0.05",
                "store.retry_seconds=0.1",
                "store.timeout_seconds=2",
                f"state.path={tmp_path / 'collector-state'}",
                "state.map_size=16777216",
                f"archive.url=dir://{tmp_path / 'archive'}",
                "http.port=0",
                "inbox.enabled=true",
                # The test's client speaks plain http to 127.0.0.1.
                "inbox.secure_cookie=false",
                f"inbox.signing_key={key_path}",
                "inbox.credentials={"
                f"carol: {{secret_file: {tmp_path / 'carol.secret'}, "
                "roles: [reviewer]}, "
                f"alice: {{secret_file: {tmp_path / 'alice.secret'}, "
                "roles: [reviewer]}}",
            ],
        )
        self.collector = Collector(config, clock=clock)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.call(self.collector.start())

    def call(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def inbox(self):
        assert self.collector.inbox is not None
        return self.collector.inbox

    def reviewer(self, secret: bytes) -> Reviewer:
        assert self.collector._reviewers is not None
        return self.collector._reviewers.authenticate(secret.decode())

    def review(self, approval_id: str, secret: bytes, verdict=Verdict.APPROVE):
        reviewer = self.reviewer(secret)
        return self.call(self.inbox.review(approval_id, reviewer, verdict, "fine"))

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        try:
            self.call(self.collector.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


def wait_for(condition: Callable[[], object], what: str):
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    pytest.fail(f"gave up waiting for {what}")


@pytest.fixture(params=["nats", "dir"])
def store_url(request, tmp_path) -> str:
    if request.param == "dir":
        root = tmp_path / "store"
        root.mkdir()
        return f"dir://{root}"
    return request.getfixturevalue("nats_server").url


@pytest.fixture
def inbox_key(tmp_path) -> tuple[pathlib.Path, pathlib.Path]:
    key = generate_key()
    private, public = tmp_path / "inbox.pem", tmp_path / "inbox.pub"
    save_signing_key(key, private)
    save_public_key(key.public(), public)
    return private, public


@pytest.fixture
def collector(tmp_path, store_url, clock, inbox_key) -> Iterator[RunningCollector]:
    running = RunningCollector(tmp_path, store_url, clock, inbox_key[0])
    yield running
    running.stop()


@pytest.fixture
def fleet_daemon(start_daemon, store_url, inbox_key, collector) -> RunningDaemon:
    return start_daemon(
        f"sync.store={store_url}",
        "sync.ship_segments=false",
        "sync.poll_seconds=0.05",
        "sync.timeout_seconds=2",
        "sync.retry_min_seconds=0.05",
        "sync.retry_max_seconds=0.2",
        f"approvals.inbox_keys=[{inbox_key[1]}]",
        f"approvals.inbox_url=http://127.0.0.1:{collector.collector.http_port}",
    )


def big_refund(approval_id: str = "") -> pb.DecideRequest:
    """A refund alice asks support-bot for, over the shipped limit."""
    return pb.DecideRequest(
        asserted_chain=["alice"],
        action="payments.refund.issue",
        resource=pb.Resource(
            kind="payments.refund",
            id="R1",
            attributes={"amount": pb.Value(int_value=60000)},
        ),
        approval_id=approval_id,
    )


def records(running: RunningDaemon):
    return [
        decode_record(stored.record_bytes)
        for stored in running.daemon._store.iter_records()
    ]


def book_state(running: RunningDaemon, approval_id: str) -> ApprovalState:
    approval = running.daemon._book.get(approval_id)
    assert approval is not None
    return approval.state


def test_a_review_on_the_collectors_page_unblocks_the_agent(fleet_daemon, collector):
    stub = fleet_daemon.stub()
    asked = stub.Decide(big_refund())
    approval_id = asked.approval.id
    listed = wait_for(
        lambda: collector.inbox.list(InboxQuery()), "the approval in the inbox"
    )

    page = asyncio.run(review_on_page(collector, approval_id, CAROL_SECRET))
    wait_for(
        lambda: book_state(fleet_daemon, approval_id) is ApprovalState.APPROVED,
        "the daemon to record the review",
    )
    granted = stub.Decide(big_refund(approval_id))

    assert asked.decision == pb.DECISION_REQUIRE_APPROVAL
    port = collector.collector.http_port
    assert asked.approval.url == f"http://127.0.0.1:{port}/approvals/{approval_id}"
    assert [a.id for a in listed] == [approval_id]
    assert listed[0].daemon_id == fleet_daemon.config.identity.daemon_id
    assert page.status == 303
    assert page.headers["Location"].endswith("?reviewed=approve")
    assert granted.decision == pb.DECISION_ALLOW
    assert granted.reason_code == "approval_granted"
    resolved = [r for r in records(fleet_daemon) if r.kind == "approval_resolved"]
    assert len(resolved) == 1
    entry = msgspec.to_builtins(resolved[0].approval)
    assert entry["id"] == approval_id
    assert entry["via"] == "fleet"
    assert entry["resolution"] == "approved"
    # Taken: dropped from the store; the inbox sees the grant used.
    assert asyncio.run(_reviews(fleet_daemon)) == []
    wait_for(
        lambda: collector.inbox.get(approval_id).state is ApprovalState.USED,
        "the used state in the inbox",
    )


_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


async def review_on_page(collector: RunningCollector, approval_id: str, secret: bytes):
    """Sign in to the collector's page and approve, as a browser would;
    returns the review form's response."""
    base = f"http://127.0.0.1:{collector.collector.http_port}"
    origin = {"Origin": base}
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for 127.0.0.1
    async with aiohttp.ClientSession(base, cookie_jar=jar) as http:
        async with http.get("/approvals/login") as login_page:
            csrf = _CSRF.search(await login_page.text()).group(1)
        form = {"csrf": csrf, "token": secret.decode(), "next": "/approvals"}
        async with http.post("/approvals/login", data=form, headers=origin) as done:
            assert done.status == 200, await done.text()
        async with http.get(f"/approvals/{approval_id}") as shown:
            text = await shown.text()
            assert shown.status == 200 and "60000" in text.replace(",", ""), text
            csrf = _CSRF.search(text).group(1)
        form = {"csrf": csrf, "verdict": "approve", "comment": "fine"}
        async with http.post(
            f"/approvals/{approval_id}/review",
            data=form,
            headers=origin,
            allow_redirects=False,
        ) as reviewed:
            await reviewed.read()
            return reviewed


async def _reviews(running: RunningDaemon):
    store = open_store(running.config.store, timeout=2)
    await store.connect()
    try:
        return await store.reviews(running.config.identity.daemon_id)
    finally:
        await store.close()


async def _put(running: RunningDaemon, approval_id: str, review_id: str, data):
    store = open_store(running.config.store, timeout=2)
    await store.connect()
    try:
        await store.put_review(
            running.config.identity.daemon_id, approval_id, review_id, data
        )
    finally:
        await store.close()


def test_reviews_not_signed_by_an_inbox_key_are_refused(fleet_daemon, collector):
    stub = fleet_daemon.stub()
    approval_id = stub.Decide(big_refund()).approval.id
    approval = wait_for(
        lambda: collector.inbox.get(approval_id), "the approval in the inbox"
    )
    carol = Reviewer(id="carol", roles=frozenset({"reviewer"}))
    forged_key = sign_review(
        generate_key(),
        inbox="fleet",
        approval=approval,
        reviewer=carol,
        verdict=Verdict.APPROVE,
        comment="",
        at="2026-12-07T09:00:00Z",
    )
    tampered = msgspec.structs.replace(
        sign_review(
            collector.inbox._key,
            inbox="fleet",
            approval=approval,
            reviewer=carol,
            verdict=Verdict.REJECT,
            comment="",
            at="2026-12-07T09:00:00Z",
        ),
        verdict=Verdict.APPROVE,
    )
    forged = [
        (forged_key.review_id, encode_signed_review(forged_key)),
        (tampered.review_id, encode_signed_review(tampered)),
        (new_review_id(), b'{"verdict": "approve"}'),
    ]

    for review_id, data in forged:
        asyncio.run(_put(fleet_daemon, approval_id, review_id, data))
    wait_for(lambda: not asyncio.run(_reviews(fleet_daemon)), "the reviews dropped")
    after = stub.Decide(big_refund(approval_id))

    assert book_state(fleet_daemon, approval_id) is ApprovalState.PENDING
    assert after.decision == pb.DECISION_REQUIRE_APPROVAL
    kinds = {r.kind for r in records(fleet_daemon)}
    assert RecordKind.APPROVAL_REVIEWED not in kinds
    assert RecordKind.APPROVAL_RESOLVED not in kinds
    counted = fleet_daemon.daemon.metrics.approval_fleet_reviews
    for outcome in (
        "refused_unknown_key",
        "refused_bad_signature",
        "refused_malformed",
    ):
        assert counted.labels(outcome)._value.get() == 1


async def _publish(running: RunningDaemon, approval: Approval) -> None:
    store = open_store(running.config.store, timeout=2)
    await store.connect()
    try:
        await store.put_approval(
            approval.daemon_id, approval.id, msgspec.json.encode(approval)
        )
    finally:
        await store.close()


def test_a_review_of_an_altered_approval_approves_nothing(fleet_daemon, collector):
    # A store writer shows the reviewer a small refund; the daemon holds
    # the real one. The review binds what was shown, so the daemon refuses
    # it rather than approve the real request unseen.
    stub = fleet_daemon.stub()
    approval_id = stub.Decide(big_refund()).approval.id
    real = wait_for(lambda: collector.inbox.get(approval_id), "the approval")
    altered = msgspec.structs.replace(real, attributes={"amount": {"int": "500"}})
    asyncio.run(_publish(fleet_daemon, altered))
    wait_for(
        lambda: collector.inbox.get(approval_id).attributes == altered.attributes,
        "the altered approval in the inbox",
    )
    carol = Reviewer(id="carol", roles=frozenset({"reviewer"}))

    asyncio.run(collector.inbox.review(approval_id, carol, Verdict.APPROVE, "small"))
    counted = fleet_daemon.daemon.metrics.approval_fleet_reviews
    wait_for(
        lambda: counted.labels("refused_view_mismatch")._value.get() == 1,
        "the review refused",
    )
    after = stub.Decide(big_refund(approval_id))

    assert book_state(fleet_daemon, approval_id) is ApprovalState.PENDING
    assert after.decision == pb.DECISION_REQUIRE_APPROVAL
    kinds = {r.kind for r in records(fleet_daemon)}
    assert RecordKind.APPROVAL_RESOLVED not in kinds


def test_the_inbox_refuses_what_the_daemon_would(fleet_daemon, collector):
    stub = fleet_daemon.stub()
    approval_id = stub.Decide(big_refund()).approval.id
    wait_for(lambda: collector.inbox.get(approval_id), "the approval in the inbox")

    with pytest.raises(SelfApproval):
        collector.review(approval_id, ALICE_SECRET)
    collector.review(approval_id, CAROL_SECRET, Verdict.REJECT)
    with pytest.raises(ApprovalClosed, match="reviewed approval .* already"):
        collector.review(approval_id, CAROL_SECRET)
    wait_for(
        lambda: book_state(fleet_daemon, approval_id) is ApprovalState.REJECTED,
        "the rejection recorded",
    )

    assert stub.Decide(big_refund(approval_id)).reason_code == "approval_rejected"


@pytest.mark.parametrize("store_url", ["nats"], indirect=True)
def test_a_store_down_then_back(fleet_daemon, collector, nats_server):
    stub = fleet_daemon.stub()
    nats_server.stop()

    asked = stub.Decide(big_refund())
    nats_server.start()
    wait_for(lambda: collector.inbox.get(asked.approval.id), "the approval published")
    collector.review(asked.approval.id, CAROL_SECRET)
    wait_for(
        lambda: book_state(fleet_daemon, asked.approval.id) is ApprovalState.APPROVED,
        "the review taken after the outage",
    )

    assert asked.decision == pb.DECISION_REQUIRE_APPROVAL
    assert stub.Decide(big_refund(asked.approval.id)).decision == pb.DECISION_ALLOW


def test_the_collector_serves_the_review_page(collector):
    port = collector.collector.http_port

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/approvals/login") as page:
        body = page.read().decode()

    assert page.status == 200
    assert "Kynara fleet inbox" in body


def test_inbox_keys_that_do_not_load_are_named(tmp_path):
    from support import daemon_config

    from kynara_sidecar.errors import ConfigError

    missing = tmp_path / "nope.pub"

    with pytest.raises(ConfigError, match=r"approvals.inbox_keys: .*nope.pub"):
        daemon_config(tmp_path, f"approvals.inbox_keys=[{missing}]")
    assert not os.path.exists(missing)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["inbox.enabled=true"], r"inbox.signing_key: expected a key file"),
        (
            ["inbox.enabled=true", "inbox.signing_key=k.pem"],
            r"inbox: expected credentials or reviewer_issuers",
        ),
        (
            [
                "inbox.enabled=true",
                "inbox.signing_key=k.pem",
                "inbox.credentials={ops: {secret_file: s, roles: [operator]}}",
            ],
            r"inbox.credentials.ops.roles: expected the reviewer role",
        ),
        (
            [
                "inbox.enabled=true",
                "inbox.signing_key=k.pem",
                "inbox.credentials={c: {secret_file: s, roles: [reviewer]}}",
            ],
            r"inbox.enabled: expected store.url too",
        ),
        (
            [
                "inbox.enabled=true",
                "inbox.signing_key=k.pem",
                "inbox.url=ftp://x",
                "inbox.credentials={c: {secret_file: s, roles: [reviewer]}}",
            ],
            r"inbox.url: expected an http:// or https:// URL",
        ),
    ],
    ids=["no-key", "nobody-can-sign-in", "not-a-reviewer", "no-store", "bad-url"],
)
def test_inbox_config_errors_name_the_key(overrides, message):
    from kynara_sidecar.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_collector_config(None, overrides)


def test_an_inbox_key_readable_by_others_is_refused_at_start(
    tmp_path, store_url, clock
):
    from kynara_sidecar.errors import ConfigError

    key = tmp_path / "open.pem"
    save_signing_key(generate_key(), key)
    key.chmod(0o644)

    with pytest.raises(ConfigError, match=r"inbox.signing_key: .*too open"):
        RunningCollector(tmp_path, store_url, clock, key)
