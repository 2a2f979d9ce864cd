"""One inbox for the fleet: a daemon and a collector on a real central store.

The daemon (its own loop, a real gRPC socket) publishes its approvals to
the store; the collector (its own loop, real HTTP) lists them in its fleet
inbox; a review made there is signed, put in the store, verified and
recorded by the daemon, and the waiting agent's retry with the grant is
allowed. Stores: a real nats-server on loopback, and a directory.
"""

from __future__ import annotations

import asyncio
import logging
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

from kynara_sidecar.approvals.fleet import encode_approval
from kynara_sidecar.approvals.model import (
    Approval,
    ApprovalState,
    ChainPrincipal,
    InboxQuery,
    Review,
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
    load_signing_key,
    save_public_key,
    save_signing_key,
)
from kynara_sidecar.audit.record import RecordKind, format_timestamp, parse_timestamp
from kynara_sidecar.collector.config import load_collector_config
from kynara_sidecar.collector.service import Collector
from kynara_sidecar.decision import Timestamp
from kynara_sidecar.errors import ApprovalClosed, SelfApproval
from kynara_sidecar.sync import daemon_token, open_store

# A bound on waiting for what should happen within a poll or two; it only
# stops a broken run from hanging, nothing is timed against it.
BOUND = 20.0
CAROL_SECRET = b"carol-reviewer-secret-0123456789"
# The shipped config's daemon id.
DAEMON_ID = "support-bot-local"
ALICE_SECRET = b"alice-reviewer-secret-0123456789"


class RunningCollector:
    """A collector serving on its own loop thread; ``stop`` at teardown."""

    def __init__(
        self, tmp_path: pathlib.Path, store_url: str, clock, key_path, *extra: str
    ):
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
                *extra,
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
def daemon_key(tmp_path) -> pathlib.Path:
    """The test daemon's audit key, made before it starts (where
    ``daemon_config`` puts it) so the collector can register its public
    half; returns that public key file."""
    key = generate_key()
    (tmp_path / "keys").mkdir()
    save_signing_key(key, tmp_path / "keys" / "audit.pem")
    save_public_key(key.public(), tmp_path / "keys" / "audit.pub")
    return tmp_path / "keys" / "audit.pub"


@pytest.fixture
def collector(
    tmp_path, store_url, clock, inbox_key, daemon_key
) -> Iterator[RunningCollector]:
    running = RunningCollector(
        tmp_path,
        store_url,
        clock,
        inbox_key[0],
        f"daemons={{{DAEMON_ID}: {{public_keys: [{daemon_key}]}}}}",
    )
    yield running
    running.stop()


def fleet_overrides(store_url: str, inbox_public: pathlib.Path, collector) -> list:
    return [
        f"sync.store={store_url}",
        "sync.ship_segments=false",
        "sync.poll_seconds=0.05",
        "sync.timeout_seconds=2",
        "sync.retry_min_seconds=0.05",
        "sync.retry_max_seconds=0.2",
        f"approvals.inbox_keys=[{inbox_public}]",
        f"approvals.inbox_url=http://127.0.0.1:{collector.collector.http_port}",
    ]


@pytest.fixture
def fleet_daemon(start_daemon, store_url, inbox_key, collector) -> RunningDaemon:
    return start_daemon(*fleet_overrides(store_url, inbox_key[1], collector))


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


def test_a_review_on_the_collectors_page_unblocks_the_agent(
    fleet_daemon, collector, caplog
):
    caplog.set_level(logging.INFO, logger="kynara")
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
    # Sent, not recorded: the daemon records it (or refuses it).
    assert f"Your approval was sent to {DAEMON_ID}." in page.after_text
    assert "was recorded" not in page.after_text
    assert granted.decision == pb.DECISION_ALLOW
    assert granted.reason_code == "approval_granted"
    resolved = [r for r in records(fleet_daemon) if r.kind == "approval_resolved"]
    assert len(resolved) == 1
    entry = msgspec.to_builtins(resolved[0].approval)
    assert entry["id"] == approval_id
    assert entry["via"] == "fleet"
    # Every line about the approval, on the collector's side and the
    # daemon's, names its decision.
    about = {
        r.getMessage(): r.fields
        for r in caplog.records
        if getattr(r, "fields", {}).get("approval_id") == approval_id
    }
    assert "review from the fleet inbox recorded" in about
    assert "reviewed approval on review page" in about
    assert all(f.get("decision_id") == asked.decision_id for f in about.values())
    assert entry["resolution"] == "approved"
    # Taken: dropped from the store; the inbox sees the grant used.
    assert asyncio.run(_reviews(fleet_daemon)) == []
    wait_for(
        lambda: collector.inbox.get(approval_id).state is ApprovalState.USED,
        "the used state in the inbox",
    )


_CSRF = re.compile(r'name="csrf" value="([^"]+)"')
_VIEW = re.compile(r'name="view" value="([^"]+)"')


async def review_on_page(
    collector: RunningCollector,
    approval_id: str,
    secret: bytes,
    before: Callable[[], object] | None = None,
):
    """Sign in to the collector's page and approve, as a browser would;
    returns the review form's response (``before``: called between reading
    the page and posting its form), or with ``before``, its status and the
    text of the page it redirects to (where a refusal is shown)."""
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
            assert shown.status == 200, text
            csrf = _CSRF.search(text).group(1)
            view = _VIEW.search(text).group(1)
        if before is not None:
            before()
        form = {"csrf": csrf, "verdict": "approve", "comment": "fine", "view": view}
        async with http.post(
            f"/approvals/{approval_id}/review",
            data=form,
            headers=origin,
            allow_redirects=False,
        ) as reviewed:
            answer = await reviewed.text()
            if reviewed.status != 303:
                assert before is not None, answer
                return reviewed.status, answer
        async with http.get(reviewed.headers["Location"]) as after:
            reviewed.after_text = await after.text()  # type: ignore[attr-defined]
        if before is not None:
            return reviewed.status, reviewed.after_text  # type: ignore[attr-defined]
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


def test_an_approval_its_daemon_did_not_sign_is_not_shown(
    fleet_daemon, collector, tmp_path
):
    # A store writer shows a small refund with a fake approver, then a
    # state signed by a key that is not the daemon's, then an approval of
    # a daemon the collector does not know: the inbox shows none of them.
    stub = fleet_daemon.stub()
    approval_id = stub.Decide(big_refund()).approval.id
    real = wait_for(lambda: collector.inbox.get(approval_id), "the approval")
    fake_review = Review(
        reviewer="mallory",
        roles=("reviewer",),
        verdict=Verdict.APPROVE,
        at=real.created_at,
    )
    altered = msgspec.structs.replace(
        real, attributes={"amount": {"int": "500"}}, reviews=(fake_review,)
    )
    stranger = msgspec.structs.replace(real, id="apr_" + "s" * 26, daemon_id="rogue")
    asyncio.run(_put_approval(fleet_daemon, altered, msgspec.json.encode(altered)))
    asyncio.run(
        _put_approval(fleet_daemon, altered, encode_approval(altered, generate_key()))
    )
    rogue_key = generate_key()
    asyncio.run(
        _put_approval(fleet_daemon, stranger, encode_approval(stranger, rogue_key))
    )
    # A marker put last: once it is in the copy, the watch has seen the rest.
    marker = msgspec.structs.replace(real, id="apr_" + "m" * 26)
    asyncio.run(
        _put_approval(
            fleet_daemon, marker, encode_approval(marker, _daemon_key(tmp_path))
        )
    )
    wait_for(lambda: collector.inbox.get(marker.id), "the marker in the inbox")

    shown = collector.inbox.get(approval_id)
    assert shown.attributes == real.attributes
    assert shown.reviews == ()
    assert collector.inbox.get(stranger.id) is None
    assert stranger.id not in {a.id for a in collector.inbox.list(InboxQuery())}


def _daemon_key(tmp_path: pathlib.Path):
    return load_signing_key(tmp_path / "keys" / "audit.pem")


async def _put_approval(running: RunningDaemon, approval: Approval, data: bytes):
    store = open_store(running.config.store, timeout=2)
    await store.connect()
    try:
        await store.put_approval(approval.daemon_id, approval.id, data)
    finally:
        await store.close()


def test_an_approval_swapped_while_the_reviewer_reads_approves_nothing(
    fleet_daemon, collector
):
    # The page showed one approval; by the click the copy holds another
    # (the real one, put back). The form carries the view it showed, so
    # the review is refused ("changed since you read it") rather than
    # approving the real request unseen.
    stub = fleet_daemon.stub()
    approval_id = stub.Decide(big_refund()).approval.id
    real = wait_for(lambda: collector.inbox.get(approval_id), "the approval")
    forged = msgspec.structs.replace(real, attributes={"amount": {"int": "500"}})

    async def swap(approval: Approval) -> None:
        collector.inbox._approvals[approval_id] = approval

    collector.call(swap(forged))
    status, text = asyncio.run(
        review_on_page(
            collector,
            approval_id,
            CAROL_SECRET,
            before=lambda: collector.call(swap(real)),
        )
    )
    # Whatever the daemon does with what was sent, nothing was sent.
    asyncio.run(asyncio.sleep(0.3))

    # Refused: back to the approval's page (303), which says why.
    assert status == 303, text
    assert "changed since you read it; reload" in text
    assert asyncio.run(_reviews(fleet_daemon)) == []
    assert book_state(fleet_daemon, approval_id) is ApprovalState.PENDING
    kinds = {r.kind for r in records(fleet_daemon)}
    assert RecordKind.APPROVAL_REVIEWED not in kinds
    assert RecordKind.APPROVAL_RESOLVED not in kinds


def test_the_inbox_refuses_what_the_daemon_would(fleet_daemon, collector):
    stub = fleet_daemon.stub()
    approval_id = stub.Decide(big_refund()).approval.id
    wait_for(lambda: collector.inbox.get(approval_id), "the approval in the inbox")

    with pytest.raises(SelfApproval):
        collector.review(approval_id, ALICE_SECRET)
    collector.review(approval_id, CAROL_SECRET, Verdict.REJECT)
    # The sent rejection closes it here before the daemon records it.
    with pytest.raises(ApprovalClosed, match="rejected, not pending"):
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


# -- the collector's copy, fed by hand with approvals signed by the daemon key


def _approval(approval_id: str = "apr_" + "q" * 26) -> Approval:
    return Approval(
        id=approval_id,
        state=ApprovalState.PENDING,
        daemon_id=DAEMON_ID,
        agent_id="support-bot",
        digest="sha256:" + "0" * 64,
        decision_id="dec_1",
        chain=(ChainPrincipal(id="bob"), ChainPrincipal(id="support-bot")),
        action="payments.refund.issue",
        resource_kind="payments.refund",
        resource_id="R9",
        created_at="2026-01-01T00:00:00Z",
        expires_at="2099-01-01T00:00:00Z",
    )


async def _put_raw(store_url: str, approval: Approval, data: bytes) -> None:
    store = open_store(store_url, timeout=2)
    await store.connect()
    try:
        await store.put_approval(approval.daemon_id, approval.id, data)
    finally:
        await store.close()


@pytest.mark.parametrize("store_url", ["dir"], indirect=True)
def test_a_sent_rejection_closes_the_approval_until_its_daemon_takes_it(
    collector, store_url, tmp_path
):
    key = _daemon_key(tmp_path)
    approval = _approval()
    asyncio.run(_put_raw(store_url, approval, encode_approval(approval, key)))
    wait_for(lambda: collector.inbox.get(approval.id), "the approval in the inbox")

    rejected = collector.review(approval.id, CAROL_SECRET, Verdict.REJECT)
    with pytest.raises(ApprovalClosed, match="rejected, not pending"):
        collector.review(approval.id, ALICE_SECRET)
    sent = collector.inbox._sent[approval.id][0].review_id
    # The daemon puts the same pending state again (another change, or a
    # restart) before taking the rejection: still closed here.
    again = msgspec.structs.replace(approval, resolved_at="")
    asyncio.run(_put_raw(store_url, again, encode_approval(again, key, ("rev_x",))))
    marker = _approval("apr_" + "m" * 26)
    asyncio.run(_put_raw(store_url, marker, encode_approval(marker, key)))
    wait_for(lambda: collector.inbox.get(marker.id), "the marker")
    still = collector.inbox.get(approval.id)
    # The daemon refused the rejection and says it took it: open again.
    asyncio.run(_put_raw(store_url, approval, encode_approval(approval, key, (sent,))))
    reopened = wait_for(
        lambda: (
            collector.inbox.get(approval.id).state is ApprovalState.PENDING
            and collector.inbox.get(approval.id)
        ),
        "the refusal to reach the inbox",
    )

    assert rejected.state is ApprovalState.REJECTED
    assert still.state is ApprovalState.REJECTED
    assert [r.reviewer for r in still.reviews] == ["carol"]
    assert reopened.reviews == ()
    assert approval.id in {a.id for a in collector.inbox.list(InboxQuery())}


@pytest.mark.parametrize("store_url", ["dir", "nats"], indirect=True)
def test_an_approval_removed_from_the_store_leaves_the_inbox(
    collector, store_url, tmp_path
):
    approval = _approval()
    asyncio.run(
        _put_raw(store_url, approval, encode_approval(approval, _daemon_key(tmp_path)))
    )
    wait_for(lambda: collector.inbox.get(approval.id), "the approval in the inbox")

    async def remove() -> None:
        store = open_store(store_url, timeout=2)
        await store.connect()
        try:
            if store_url.startswith("dir://"):
                root = pathlib.Path(store_url.removeprefix("dir://"))
                token = daemon_token(DAEMON_ID)
                (root / "approvals" / token / f"{approval.id}.json").unlink()
            else:
                await store._approvals.delete(
                    f"{daemon_token(DAEMON_ID)}.{approval.id}"
                )
        finally:
            await store.close()

    asyncio.run(remove())

    wait_for(lambda: collector.inbox.get(approval.id) is None, "the approval gone")


@pytest.mark.parametrize("store_url", ["dir"], indirect=True)
def test_a_replayed_older_state_does_not_reopen_an_approval(
    collector, store_url, tmp_path
):
    key = _daemon_key(tmp_path)
    pending = _approval()
    rejected = msgspec.structs.replace(
        pending,
        state=ApprovalState.REJECTED,
        reviews=(
            Review(
                reviewer="carol",
                roles=("reviewer",),
                verdict=Verdict.REJECT,
                at="2026-01-01T00:01:00Z",
            ),
        ),
        resolved_at="2026-01-01T00:01:00Z",
    )
    asyncio.run(_put_raw(store_url, rejected, encode_approval(rejected, key)))
    wait_for(lambda: collector.inbox.get(pending.id), "the approval in the inbox")
    asyncio.run(_put_raw(store_url, pending, encode_approval(pending, key)))
    marker = _approval("apr_" + "m" * 26)
    asyncio.run(_put_raw(store_url, marker, encode_approval(marker, key)))
    wait_for(lambda: collector.inbox.get(marker.id), "the marker")

    assert collector.inbox.get(pending.id).state is ApprovalState.REJECTED


# -- the daemon: reviews in signed order, conflicts, republishing


def _signed(collector, approval, reviewer_id, verdict, at, review_id=None, **kw):
    return sign_review(
        collector.inbox._key,
        inbox="fleet",
        approval=approval,
        reviewer=Reviewer(id=reviewer_id, roles=frozenset({"reviewer"})),
        verdict=verdict,
        comment="",
        at=at,
        review_id=review_id,
        **kw,
    )


def _later(rfc3339: str, seconds: int) -> str:
    moment = parse_timestamp(rfc3339)
    return format_timestamp(Timestamp(moment.seconds + seconds, moment.nanos))


@pytest.mark.parametrize("store_url", ["dir", "nats"], indirect=True)
def test_reviews_read_together_are_applied_in_signed_order(
    start_daemon, fleet_daemon, collector, store_url, inbox_key
):
    # Dave approved after Carol rejected; the store lists the approval
    # first (by name in a directory, by put order in NATS). The rejection,
    # made first, wins.
    stub = fleet_daemon.stub()
    approval_id = stub.Decide(big_refund()).approval.id
    approval = fleet_daemon.daemon._book.get(approval_id)
    overrides = fleet_overrides(store_url, inbox_key[1], collector)
    fleet_daemon.stop()
    approve = _signed(
        collector,
        approval,
        "dave",
        Verdict.APPROVE,
        _later(approval.created_at, 2),
        review_id="rev_" + "a" * 26,
    )
    reject = _signed(
        collector,
        approval,
        "carol",
        Verdict.REJECT,
        _later(approval.created_at, 1),
        review_id="rev_" + "z" * 26,
    )
    for review in (approve, reject):
        asyncio.run(
            _put(
                fleet_daemon,
                approval_id,
                review.review_id,
                encode_signed_review(review),
            )
        )
    again = start_daemon(*overrides)
    wait_for(lambda: not asyncio.run(_reviews(again)), "both reviews taken")

    assert book_state(again, approval_id) is ApprovalState.REJECTED
    counted = again.daemon.metrics.approval_fleet_reviews
    assert counted.labels("recorded")._value.get() == 1
    assert counted.labels("refused_approval_closed")._value.get() == 1


def test_a_rejection_made_first_but_taken_after_the_approval_is_a_conflict(
    fleet_daemon, collector, clock, caplog
):
    stub = fleet_daemon.stub()
    approval_id = stub.Decide(big_refund()).approval.id
    approval = fleet_daemon.daemon._book.get(approval_id)
    made = _later(approval.created_at, 1)
    clock.set(_later(approval.created_at, 5))
    approve = _signed(collector, approval, "dave", Verdict.APPROVE, made)
    asyncio.run(
        _put(
            fleet_daemon, approval_id, approve.review_id, encode_signed_review(approve)
        )
    )
    wait_for(
        lambda: book_state(fleet_daemon, approval_id) is ApprovalState.APPROVED,
        "the approval recorded",
    )
    # Signed before the approval was recorded, held back by the store.
    reject = _signed(collector, approval, "carol", Verdict.REJECT, made)
    asyncio.run(
        _put(fleet_daemon, approval_id, reject.review_id, encode_signed_review(reject))
    )
    counted = fleet_daemon.daemon.metrics.approval_fleet_reviews
    wait_for(lambda: counted.labels("conflict")._value.get() == 1, "the conflict")
    # Left in the store until the approval's state naming it is put.
    wait_for(lambda: not asyncio.run(_reviews(fleet_daemon)), "the rejection dropped")

    assert reject.review_id in _published_taken(fleet_daemon, approval_id)
    assert book_state(fleet_daemon, approval_id) is ApprovalState.APPROVED
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert any(
        "rejection from the fleet inbox made before" in r.message for r in errors
    )


def test_a_refused_review_is_named_in_the_state_published_again(
    fleet_daemon, collector
):
    # Signed by the inbox but made before the approval existed (a collector
    # clock behind): refused, and the approval put again naming it taken,
    # so the inbox stops counting it.
    stub = fleet_daemon.stub()
    approval_id = stub.Decide(big_refund()).approval.id
    approval = fleet_daemon.daemon._book.get(approval_id)
    stale = _signed(
        collector, approval, "carol", Verdict.REJECT, _later(approval.created_at, -60)
    )
    asyncio.run(
        _put(fleet_daemon, approval_id, stale.review_id, encode_signed_review(stale))
    )
    counted = fleet_daemon.daemon.metrics.approval_fleet_reviews
    wait_for(lambda: counted.labels("refused_stale")._value.get() == 1, "the refusal")

    def published_taken():
        store = open_store(fleet_daemon.config.store, timeout=2)

        async def read():
            await store.connect()
            try:
                return await store.approvals()
            finally:
                await store.close()

        for entry in asyncio.run(read()):
            if entry.approval_id == approval_id:
                envelope = msgspec.json.decode(entry.data)
                return stale.review_id in envelope["taken"]
        return False

    wait_for(published_taken, "the approval published again naming the review")
    assert book_state(fleet_daemon, approval_id) is ApprovalState.PENDING


# -- a refused review stays in the store until a put names it taken


def _store_root(store_url: str) -> pathlib.Path:
    return pathlib.Path(store_url.removeprefix("dir://"))


def _hold_puts(store_url: str, approval_id: str) -> Callable[[], None]:
    """Make the directory store refuse every put of one of the test
    daemon's approvals (a directory where its file is renamed to), keeping
    the state last put; returns what puts that state back and lets puts
    in again."""
    token = daemon_token(DAEMON_ID)
    path = _store_root(store_url) / "approvals" / token / f"{approval_id}.json"
    last = path.read_bytes()
    path.unlink()
    path.mkdir()

    def release() -> None:
        path.rmdir()
        temp = path.with_name(".put-back")
        temp.write_bytes(last)
        os.replace(temp, path)

    return release


def _published_taken(running: RunningDaemon, approval_id: str) -> list[str] | None:
    """The review ids the store's state of the approval names as taken
    (None: the store holds no state of it)."""

    async def read():
        store = open_store(running.config.store, timeout=2)
        await store.connect()
        try:
            return await store.approvals()
        finally:
            await store.close()

    for entry in asyncio.run(read()):
        if entry.approval_id == approval_id:
            return msgspec.json.decode(entry.data)["taken"]
    return None


def _logged(caplog, message: str, review_id: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.getMessage().startswith(message)
        and getattr(r, "fields", {}).get("review_id") == review_id
    ]


@pytest.mark.parametrize("store_url", ["dir"], indirect=True)
def test_a_review_refused_just_before_a_restart_is_named_after_it(
    start_daemon, fleet_daemon, collector, store_url, inbox_key, caplog
):
    # A store writer altered the collector's copy; Carol's rejection of it
    # is refused by the daemon (not the view it holds), which stops before
    # a state naming the rejection is put. The rejection stays in the
    # store, so the daemon, restarted, refuses it again and names it, and
    # the inbox stops counting it: the approval is open again there.
    stub = fleet_daemon.stub()
    approval_id = stub.Decide(big_refund()).approval.id
    real = wait_for(lambda: collector.inbox.get(approval_id), "the approval")
    overrides = fleet_overrides(store_url, inbox_key[1], collector)
    release = _hold_puts(store_url, approval_id)
    # The collector's next scan notices the held entry: any earlier scan
    # (one that may have found no file there) is behind it.
    wait_for(
        lambda: any(
            getattr(r, "fields", {}).get("entry", "").endswith(f"{approval_id}.json")
            for r in caplog.records
            if r.getMessage() == "malformed store entry"
        ),
        "the collector to read the held entry",
    )
    forged = msgspec.structs.replace(real, attributes={"amount": {"int": "500"}})

    async def swap() -> None:
        collector.inbox._approvals[approval_id] = forged

    collector.call(swap())
    sent = collector.review(approval_id, CAROL_SECRET, Verdict.REJECT)
    review_id = collector.inbox._sent[approval_id][0].review_id
    counted = fleet_daemon.daemon.metrics.approval_fleet_reviews
    wait_for(
        lambda: counted.labels("refused_view_mismatch")._value.get() == 1,
        "the refusal",
    )
    # Refused while no put goes through: left in the store.
    left = [r.review_id for r in asyncio.run(_reviews(fleet_daemon))]
    assert left == [review_id]
    fleet_daemon.stop()
    release()
    again = start_daemon(*overrides)
    reopened = wait_for(
        lambda: (
            collector.inbox.get(approval_id).state is ApprovalState.PENDING
            and collector.inbox.get(approval_id)
        ),
        "the inbox to open the approval again",
    )
    wait_for(lambda: not asyncio.run(_reviews(again)), "the refused review dropped")

    assert sent.state is ApprovalState.REJECTED
    assert reopened.reviews == ()
    assert _published_taken(again, approval_id) == [review_id]
    recounted = again.daemon.metrics.approval_fleet_reviews
    assert recounted.labels("refused_view_mismatch")._value.get() == 1
    assert book_state(again, approval_id) is ApprovalState.PENDING


@pytest.mark.parametrize("store_url", ["dir"], indirect=True)
def test_a_refused_review_given_again_is_counted_once(
    fleet_daemon, collector, store_url, caplog
):
    # The store takes no put of the approval, so a refused review stays in
    # it; the review watch then fails, and the next one gives the review
    # again: it is not refused (counted, logged) twice. A review recorded
    # meanwhile is dropped at once, as ever. Once puts go through, the
    # approval's state names both and the refused one is dropped.
    caplog.set_level(logging.DEBUG, logger="kynara.sync")
    stub = fleet_daemon.stub()
    approval_id = stub.Decide(big_refund()).approval.id
    approval = fleet_daemon.daemon._book.get(approval_id)
    wait_for(lambda: collector.inbox.get(approval_id), "the approval in the inbox")
    release = _hold_puts(store_url, approval_id)
    stale = _signed(
        collector, approval, "carol", Verdict.REJECT, _later(approval.created_at, -60)
    )
    asyncio.run(
        _put(fleet_daemon, approval_id, stale.review_id, encode_signed_review(stale))
    )
    counted = fleet_daemon.daemon.metrics.approval_fleet_reviews
    wait_for(lambda: counted.labels("refused_stale")._value.get() == 1, "the refusal")
    held = [r.review_id for r in asyncio.run(_reviews(fleet_daemon))]
    approve = _signed(
        collector, approval, "dave", Verdict.APPROVE, _later(approval.created_at, 1)
    )
    asyncio.run(
        _put(
            fleet_daemon, approval_id, approve.review_id, encode_signed_review(approve)
        )
    )
    wait_for(
        lambda: book_state(fleet_daemon, approval_id) is ApprovalState.APPROVED,
        "the approval recorded",
    )
    wait_for(
        lambda: [r.review_id for r in asyncio.run(_reviews(fleet_daemon))] == held,
        "the recorded review dropped",
    )
    root = _store_root(store_url)
    failed = fleet_daemon.daemon.metrics.approval_fleet_failures.labels("reviews")
    before = failed._value.get()
    (root / "reviews").rename(root / "reviews-away")
    wait_for(lambda: failed._value.get() > before, "the review watch to fail")
    # Over the empty directory the link's reconnect may have made.
    (root / "reviews-away").rename(root / "reviews")
    wait_for(
        lambda: _logged(caplog, "review from the store given again", stale.review_id),
        "the refused review given again",
    )
    release()
    wait_for(
        lambda: not asyncio.run(_reviews(fleet_daemon)), "the refused review dropped"
    )

    assert held == [stale.review_id]
    taken = _published_taken(fleet_daemon, approval_id)
    assert sorted(taken) == sorted([stale.review_id, approve.review_id])
    assert counted.labels("refused_stale")._value.get() == 1
    assert counted.labels("recorded")._value.get() == 1
    refused = _logged(caplog, "review from the store refused", stale.review_id)
    assert len(refused) == 1


@pytest.mark.parametrize("store_url", ["dir"], indirect=True)
def test_a_final_state_reached_while_the_store_was_down_is_published_at_start(
    start_daemon, fleet_daemon, collector, store_url, inbox_key
):
    stub = fleet_daemon.stub()
    approval_id = stub.Decide(big_refund()).approval.id
    wait_for(lambda: collector.inbox.get(approval_id), "the approval in the inbox")
    root = pathlib.Path(store_url.removeprefix("dir://"))
    away = root.with_name("store-away")
    root.rename(away)
    try:
        carol = Reviewer(id="carol", roles=frozenset({"reviewer"}))
        fleet_daemon.call(
            fleet_daemon.daemon._book.review(approval_id, carol, Verdict.REJECT, "no")
        )
        overrides = fleet_overrides(store_url, inbox_key[1], collector)
        fleet_daemon.stop()
    finally:
        away.rename(root)
    start_daemon(*overrides)

    wait_for(
        lambda: collector.inbox.get(approval_id).state is ApprovalState.REJECTED,
        "the rejection published after the restart",
    )


@pytest.mark.parametrize("store_url", ["dir"], indirect=True)
def test_an_inbox_url_without_inbox_keys_is_warned_of(start_daemon, store_url, caplog):
    start_daemon(
        f"sync.store={store_url}",
        "sync.ship_segments=false",
        "approvals.inbox_url=http://127.0.0.1:9/",
    )

    warned = [
        r
        for r in caplog.records
        if r.levelname == "WARNING" and "approvals.inbox_keys is empty" in r.message
    ]
    assert len(warned) == 1
