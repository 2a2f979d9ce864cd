"""Issue #13's acceptance at the daemon: limits over real gRPC on a Unix
socket, the real pipeline, LMDB on disk and the CLI's ``verify``.

The policy directory is the shipped one (roles, directory, payments, ...)
plus ``refund-limits.yaml``: five refunds per user per Berlin calendar day,
and a running total of refunded amounts per agent over a rolling week. The
daemon reads a settable clock, so a test moves it across local midnight on
the two days of 2026 whose length is not 24 hours in Berlin.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import pathlib
import urllib.parse

import grpc
import pytest
from fault_helpers import CALL_TIMEOUT, verify_cli
from kynara.v1 import decision_pb2 as pb
from kynara.v1 import decision_pb2_grpc
from limits_support import policy_dir, refund_limits, refund_request
from support import RunningDaemon, read_record

from kynara_sidecar.approvals.model import Reviewer, Verdict
from kynara_sidecar.audit.chain import decode_record
from kynara_sidecar.audit.counters import (
    LIMITS_DB,
    counted_entries,
    decode_row,
    rows_of,
)
from kynara_sidecar.audit.record import AuditRecordV1, decode_value
from kynara_sidecar.audit.store import AuditStore
from kynara_sidecar.audit.verify import check_limits, recompute_totals

DAILY = "refunds_today"
TOTAL = "refund_total_week"
TOTAL_CEILING = 10_000
CAROL = Reviewer(id="carol", roles=frozenset({"reviewer"}))
# The 1,000 concurrent decisions: this many channels, each with its share
# of the calls in flight at once.
CHANNELS = 8
CONCURRENT = 1000


@pytest.fixture
def start(tmp_path, start_daemon):
    """Call with ``refund_limits`` options (and config overrides); returns a
    RunningDaemon on the shipped policies plus ``refund-limits.yaml``,
    stopped at teardown."""

    def run(
        *overrides: str, total_ceiling: int = TOTAL_CEILING, **options
    ) -> RunningDaemon:
        limits = refund_limits(total_ceiling=total_ceiling, **options)
        policies = policy_dir(tmp_path / "policies", {"refund-limits.yaml": limits})
        return start_daemon(f"policy.source={policies}", *overrides)

    return run


def stored_records(audit: pathlib.Path) -> list[AuditRecordV1]:
    store = AuditStore.open(audit, readonly=True)
    try:
        return [decode_record(s.record_bytes) for s in store.iter_records()]
    finally:
        store.close()


def denying_rules(answer: pb.DecideResponse) -> set[str]:
    return {m.rule for m in answer.matched_rules if m.effect == pb.DECISION_DENY}


def test_the_sixth_refund_of_a_day_is_denied_over_grpc_and_records_say_what_was_seen(
    start,
):
    running = start()
    stub = running.stub()

    answers = [
        stub.Decide(refund_request(f"rf{i}"), timeout=CALL_TIMEOUT) for i in range(6)
    ]
    # The seventh asks for an explanation: its answer carries what it saw.
    explained = refund_request("rf6")
    explained.explain = True
    answers.append(stub.Decide(explained, timeout=CALL_TIMEOUT))
    bob = stub.Decide(refund_request("rf-bob", user="bob"), timeout=CALL_TIMEOUT)

    assert [a.decision for a in answers] == [pb.DECISION_ALLOW] * 5 + [
        pb.DECISION_DENY
    ] * 2
    assert answers[5].reason_code == "rule_denied"
    assert denying_rules(answers[5]) == {"refunds-per-day"}
    # The count is per user: bob's first refund of the day is allowed.
    assert bob.decision == pb.DECISION_ALLOW
    entries = [
        read_record(running, a.audit_sequence).limits[DAILY] for a in answers + [bob]
    ]
    assert [e.count for e in entries] == [0, 1, 2, 3, 4, 5, 5, 0]
    assert [e.counted for e in entries] == [True] * 5 + [False, False, True]
    assert [e.key for e in entries] == ['["alice"]'] * 7 + ['["bob"]']
    # 2026-12-07 09:00Z is 10:00 CET: the day opened at 23:00Z before.
    assert {e.window_start for e in entries} == {"2026-12-06T23:00:00Z"}
    assert {decode_value(e.ceiling) for e in entries} == {5}
    totals = [
        read_record(running, a.audit_sequence).limits[TOTAL] for a in answers + [bob]
    ]
    # One agent (the daemon's own, support-bot): every allowed amount adds up.
    assert [decode_value(e.sum) for e in totals] == [
        0, 1200, 2400, 3600, 4800, 6000, 6000, 6000
    ]  # fmt: skip
    assert {e.key for e in totals} == {'["support-bot"]'}
    assert [a.HasField("explanation") for a in answers] == [False] * 6 + [True]
    assert not answers[5].limits
    shown = answers[6].limits
    assert set(shown) == {DAILY, TOTAL}
    assert (shown[DAILY].count, shown[DAILY].counted) == (5, False)
    assert shown[DAILY].ceiling.int_value == 5
    assert shown[DAILY].key == '["alice"]'
    assert shown[DAILY].window_start.ToJsonString() == "2026-12-06T23:00:00Z"
    assert shown[TOTAL].sum.int_value == 6000


def test_past_the_ceiling_a_require_approval_rule_pauses_and_its_grant_is_counted(
    start,
):
    running = start(effect="require_approval")
    stub = running.stub()
    for i in range(5):
        stub.Decide(refund_request(f"rf{i}"), timeout=CALL_TIMEOUT)

    asked = stub.Decide(refund_request("rf5"), timeout=CALL_TIMEOUT)
    book = running.daemon.pipeline.approvals
    running.call(book.review(asked.approval.id, CAROL, Verdict.APPROVE, "ok"))
    used = stub.Decide(
        refund_request("rf5", approval_id=asked.approval.id), timeout=CALL_TIMEOUT
    )
    seventh = stub.Decide(refund_request("rf6"), timeout=CALL_TIMEOUT)

    assert asked.decision == pb.DECISION_REQUIRE_APPROVAL
    assert asked.reason_code == "approval_required"
    assert asked.approval.state == "pending"
    port = running.daemon.http_port
    url = urllib.parse.urlsplit(asked.approval.url)
    assert (url.scheme, url.hostname, url.port) == ("http", "127.0.0.1", port)
    assert url.path == f"/approvals/{asked.approval.id}"
    # The URL leads a reviewer who is not signed in to the sign-in page,
    # which returns to this approval.
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=CALL_TIMEOUT)
    try:
        connection.request("GET", url.path)
        page = connection.getresponse()
        page.read()
    finally:
        connection.close()
    assert page.status == 303
    location = urllib.parse.urlsplit(page.getheader("Location"))
    assert location.path == "/approvals/login"
    assert urllib.parse.parse_qs(location.query)["next"] == [url.path]
    assert used.decision == pb.DECISION_ALLOW
    assert used.reason_code == "approval_granted"
    assert list(used.approval.reviewers) == ["carol"]
    # The approved allow is an allow: counted, so the next one sees six.
    assert seventh.decision == pb.DECISION_REQUIRE_APPROVAL
    seen = [
        read_record(running, a.audit_sequence).limits[DAILY]
        for a in (asked, used, seventh)
    ]
    assert [(e.count, e.counted) for e in seen] == [(5, False), (5, True), (6, False)]


@pytest.mark.parametrize(
    ("first", "before_midnight", "midnight"),
    [
        # 2026-10-25 has 25 hours in Berlin (CEST -> CET at 03:00 local).
        ("2026-10-24T22:00:00Z", "2026-10-25T22:59:59.999999Z", "2026-10-25T23:00:00Z"),
        # 2026-03-29 has 23 hours (CET -> CEST at 02:00 local).
        ("2026-03-28T23:00:00Z", "2026-03-29T21:59:59.999999Z", "2026-03-29T22:00:00Z"),
    ],
    ids=["25-hour-day", "23-hour-day"],
)
def test_the_day_resets_at_berlin_midnight_across_a_daylight_saving_change(
    start, clock, first, before_midnight, midnight
):
    # A weekly total that the twelve refunds of 1,200 cannot reach.
    running = start(total_ceiling=1_000_000)
    stub = running.stub()

    clock.set(first)
    early = [
        stub.Decide(refund_request(f"a{i}"), timeout=CALL_TIMEOUT) for i in range(5)
    ]
    clock.set(before_midnight)
    late = stub.Decide(refund_request("late"), timeout=CALL_TIMEOUT)
    clock.set(midnight)
    fresh = [
        stub.Decide(refund_request(f"b{i}"), timeout=CALL_TIMEOUT) for i in range(6)
    ]

    assert [a.decision for a in early] == [pb.DECISION_ALLOW] * 5
    assert late.decision == pb.DECISION_DENY
    assert denying_rules(late) == {"refunds-per-day"}
    assert [a.decision for a in fresh] == [pb.DECISION_ALLOW] * 5 + [pb.DECISION_DENY]
    seen = [
        read_record(running, a.audit_sequence).limits[DAILY]
        for a in [*early, late, *fresh]
    ]
    assert [e.count for e in seen] == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]
    # The window opened at local midnight: the first decision of the day
    # was at it, and so was the reset.
    assert {e.window_start for e in seen[:6]} == {first}
    assert {e.window_start for e in seen[6:]} == {midnight}


def _decide_all(
    target: str, requests: list[pb.DecideRequest]
) -> list[pb.DecideResponse | grpc.RpcError]:
    """Every request in flight at once, spread over ``CHANNELS`` channels;
    the answers (or errors) in request order."""
    channels = [grpc.insecure_channel(target) for _ in range(CHANNELS)]
    try:
        stubs = [decision_pb2_grpc.DecisionServiceStub(c) for c in channels]
        futures = [
            stubs[i % CHANNELS].Decide.future(request, timeout=CALL_TIMEOUT * 6)
            for i, request in enumerate(requests)
        ]
        out: list[pb.DecideResponse | grpc.RpcError] = []
        for future in futures:
            try:
                out.append(future.result())
            except grpc.RpcError as err:
                out.append(err)
        return out
    finally:
        for channel in channels:
            channel.close()


def test_a_running_total_under_1000_concurrent_grpc_decisions_never_passes_its_ceiling(
    tmp_path, start, clock
):
    running = start(ceiling=100_000)
    amounts = [(i * 37) % 90 + 1 for i in range(CONCURRENT)]
    requests = [
        refund_request(f"r{i}", amount, user=("alice", "bob")[i % 2])
        for i, amount in enumerate(amounts)
    ]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        # Two halves from two threads, each all in flight at once.
        halves = list(
            pool.map(
                lambda part: _decide_all(running.target, part),
                [requests[: CONCURRENT // 2], requests[CONCURRENT // 2 :]],
            )
        )
    answers = halves[0] + halves[1]
    running.stop()

    failed = [a for a in answers if isinstance(a, grpc.RpcError)]
    assert failed == []
    allowed = [
        amount
        for amount, answer in zip(amounts, answers, strict=True)
        if answer.decision == pb.DECISION_ALLOW
    ]
    assert sum(allowed) <= TOTAL_CEILING
    # The ceiling was reached, not stopped short of: the smallest amounts
    # left would have passed it.
    assert sum(allowed) > TOTAL_CEILING - max(amounts)
    others = {a.decision for a in answers} - {pb.DECISION_ALLOW}
    assert others == {pb.DECISION_DENY}
    assert {
        next(iter(denying_rules(a))) for a in answers if a.decision == pb.DECISION_DENY
    } == {"refund-total"}

    audit = tmp_path / "audit"
    checked = verify_cli(audit)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.startswith("ok: ")
    # verify's note: every counted decision has its row and every seen
    # value was recomputed from the records before it.
    counted = 2 * len(allowed)
    assert (
        f"limits: {counted} rows stored for {counted} counted decisions; "
        f"{2 * CONCURRENT} seen counts recomputed from the records, 0 not checkable"
    ) in checked.stdout

    records = [r for r in stored_records(audit) if r.kind == "decision"]
    by_seq = {a.audit_sequence: a for a in answers}
    store = AuditStore.open(audit, readonly=True, extra_dbs=(LIMITS_DB,))
    try:
        report = check_limits(store)
        totals = recompute_totals(store, 0)
        rows = sorted(decode_row(k, v) for k, v in store.iter_state(LIMITS_DB))
        seqs = [s.seq for s in store.iter_records()]
    finally:
        store.close()
    assert report.ok and report.counted == counted
    from_records = sum(
        decode_value(entry.amount)
        for record in records
        for name, entry in counted_entries(record)
        if name == TOTAL
    )
    (definition,) = {
        entry.definition
        for record in records
        for name, entry in counted_entries(record)
        if name == TOTAL
    }
    assert definition
    assert totals[(TOTAL, definition, '["support-bot"]')] == (
        len(allowed),
        sum(allowed),
    )
    assert from_records == sum(allowed)
    assert sum(r.amount for r in rows if r.limit == TOTAL) == sum(allowed)
    assert rows == sorted(
        decode_row(k, v) for record in records for k, v in rows_of(record)
    )
    # Each answer is the record at its sequence, and the log holds them all.
    decision_seqs = [
        seq for seq, record in zip(seqs, stored_records(audit), strict=True)
        if record.kind == "decision"
    ]  # fmt: skip
    assert sorted(by_seq) == decision_seqs
