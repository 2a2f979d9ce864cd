"""The limits rows as evidence: retention keeps open windows, a prune takes
the rows of what it drops, and verify recomputes rows and seen values."""

from __future__ import annotations

import asyncio
import json
import math
import random
import shutil
import subprocess
import sys
import threading

import lmdb
import msgspec
import pytest
from kynara.v1 import decision_pb2 as pb
from limits.test_pipeline_limits import Harness, decisions, policies_dir, refund
from support import (
    SHIPPED_POLICIES,
    RunningDaemon,
    SettableClock,
    daemon_config,
    small_refund,
)

from kynara_sidecar.audit.chain import ProblemKind
from kynara_sidecar.audit.checkpoint import CheckpointKind, sign_checkpoint
from kynara_sidecar.audit.counters import LIMITS_DB, row_value, rows_of
from kynara_sidecar.audit.export import export_pack, parse_time
from kynara_sidecar.audit.keys import generate_key, load_public_key
from kynara_sidecar.audit.record import (
    RECORD_VERSION,
    AuditRecordV1,
    LimitEntry,
    RecordKind,
    UInt64,
    decode_value,
    encode_value,
    format_timestamp,
    parse_timestamp,
)
from kynara_sidecar.audit.store import AuditStore
from kynara_sidecar.audit.verify import (
    EXTRA_ROW,
    LIMIT_ENTRY,
    MISSING_ROW,
    ROW_DIFFERS,
    SEEN_COUNT,
    SEEN_SUM,
    check_limits,
    format_report,
    recompute_totals,
    verify_store,
)
from kynara_sidecar.audit.verify_pack import (
    Held,
    LimitsChecked,
    PackError,
    SeenAbove,
    compare_seen,
    verify_pack,
)
from kynara_sidecar.audit.writer import AuditWriter, Sealing
from kynara_sidecar.decision import Effect, Timestamp
from kynara_sidecar.errors import AuditUnavailable

from ._support import RawLog

ORIGIN = "daemon-a"
SECOND = 1_000_000_000
# 2026-12-04T09:00:00Z in nanoseconds.
T0 = 1_796_374_800 * SECOND
HOUR = 3600 * SECOND


def _stamp(nanos: int) -> str:
    return format_timestamp(Timestamp.from_nanos(nanos))


def _fsum(amounts: list[float]) -> float:
    """``math.fsum``, or the infinity the daemon's book answers where the
    exact sum is past the largest double (and fsum raises)."""
    try:
        return math.fsum(amounts)
    except OverflowError:
        return math.inf


class Book:
    """A brute-force book: what each (limit, key) counted so far."""

    def __init__(self):
        self.events: dict[tuple[str, str], list[tuple[int, int | float]]] = {}

    def seen(self, limit: str, key: str, start: int) -> tuple[int, list]:
        held = [a for t, a in self.events.get((limit, key), []) if t >= start]
        return len(held), held

    def add(self, limit: str, key: str, time: int, amount: int | float) -> None:
        self.events.setdefault((limit, key), []).append((time, amount))

    def decide(
        self,
        n: int,
        time: int,
        key: str = "u1",
        amount: int | float = 5,
        *,
        window: int = HOUR,
        counted: bool = True,
        definition: str = "",
    ) -> AuditRecordV1:
        """A decision record whose entries say what the book held before it
        (a counting limit and a summing one over ``amount``), under the
        limits' definition ``counts``."""
        start = time - window
        limits = {}
        for name, value in (("refunds_hour", 1), ("refund_total", amount)):
            count, held = self.seen(f"{name}/{definition}", key, start)
            total = _fsum(held) if isinstance(value, float) else sum(held)
            limits[name] = LimitEntry(
                key=key,
                definition=definition,
                window_start=_stamp(start),
                count=count,
                sum=encode_value(total) if name == "refund_total" else None,
                ceiling=encode_value(100),
                counted=counted,
                amount=encode_value(value) if counted else None,
            )
            if counted:
                self.add(f"{name}/{definition}", key, time, value)
        return AuditRecordV1(
            v=RECORD_VERSION,
            kind=RecordKind.DECISION,
            time=_stamp(time),
            daemon_id=ORIGIN,
            decision_id=f"dec-{n}",
            action="payments.refund.issue",
            decision="allow",
            reason="allowed",
            limits=limits,
        )


def _append(store: AuditStore, records: list[AuditRecordV1]) -> None:
    for record in records:
        changes = [(LIMITS_DB, k, v) for k, v in rows_of(record)]
        store.append_batch([record], changes)


def _log(open_store, count=6, **decide):
    store = open_store(extra_dbs=(LIMITS_DB,))
    book = Book()
    records = [book.decide(n, T0 + n * SECOND, **decide) for n in range(count)]
    _append(store, records)
    return store, records


def _kinds(report):
    return sorted((m.kind, m.limit, m.seq) for m in report.mismatches)


# ------------------------------------------------------------------ verify


def test_an_intact_log_recomputes_rows_and_seen_values(open_store):
    store, _ = _log(open_store)

    report = check_limits(store)
    verified = verify_store(store, None, None)

    assert report.ok, report.mismatches
    assert (report.rows, report.counted, report.seen_checked) == (12, 12, 12)
    assert report.not_checkable == 0
    assert verified.ok, verified.problem
    assert any("12 rows stored for 12 counted" in note for note in verified.notes)


def test_a_deleted_row_is_reported_missing(open_store, tmp_path):
    store, records = _log(open_store)
    (key, _), _ = rows_of(records[2])
    store.close()
    raw = RawLog(tmp_path / "log")
    with raw.env.begin(write=True) as txn:
        assert txn.delete(key, db=raw.env.open_db(LIMITS_DB, txn=txn))
    raw.close()
    store = open_store(readonly=True)

    report = check_limits(store)
    verified = verify_store(store, None, None)

    assert _kinds(report) == [(MISSING_ROW, "refunds_hour", 3)]
    assert "dec-2" in report.mismatches[0].message
    assert verified.problem.kind == ProblemKind.MISSING
    assert verified.problem.seq == 3
    # The row is named by what it holds; its record is in the message.
    assert format_report(verified).splitlines()[0] == (
        "limits row 'refunds_hour' 2026-12-04T09:00:02Z 'dec-2': missing: "
        "missing_row: limit 'refunds_hour' key 'u1': record 3 counted decision "
        "'dec-2', but its row is not stored"
    )


def test_a_changed_amount_and_an_added_row_are_reported(open_store):
    store, records = _log(open_store)
    _, (total_key, _) = rows_of(records[1])
    forged = rows_of(records[4])[1][0].replace(b"dec-4", b"dec-99")
    store.append_batch(
        [],
        [
            (LIMITS_DB, total_key, row_value("u1", 500)),
            (LIMITS_DB, forged, row_value("u1", 7)),
        ],
    )

    report = check_limits(store)
    verified = verify_store(store, None, None)

    assert _kinds(report) == [
        (EXTRA_ROW, "refund_total", 0),
        (ROW_DIFFERS, "refund_total", 2),
    ]
    differs = next(m for m in report.mismatches if m.kind == ROW_DIFFERS)
    assert "500" in differs.message and differs.decision_id == "dec-1"
    assert "dec-99" in next(m for m in report.mismatches if m.kind == EXTRA_ROW).message
    assert verified.problem.kind == ProblemKind.EDITED
    # Rows missing or changed come before one added; none is "limits row 0".
    assert verified.problem.message.startswith(ROW_DIFFERS)
    headline = format_report(verified).splitlines()[0]
    assert headline.startswith(
        "limits row 'refund_total' 2026-12-04T09:00:01Z 'dec-1': edited: "
        "row_differs: limit 'refund_total' key 'u1': its row holds key 'u1' "
        "amount 500, record 2 counted key 'u1' amount 5"
    ), headline
    assert (
        "note: limits: limits row 'refund_total' 2026-12-04T09:00:04Z 'dec-99': "
        "extra_row: " in format_report(verified)
    )
    assert "limits mismatches by kind: row_differs 1, extra_row 1" in verified.notes


def test_a_wrong_seen_count_and_sum_are_reported_on_an_intact_chain(open_store):
    store = open_store(extra_dbs=(LIMITS_DB,))
    book = Book()
    records = [book.decide(n, T0 + n * SECOND) for n in range(4)]
    lying = book.decide(4, T0 + 4 * SECOND)
    lying.limits["refunds_hour"].count = 1
    lying.limits["refund_total"].sum = encode_value(3)
    _append(store, [*records, lying])

    report = check_limits(store)
    verified = verify_store(store, None, None)

    assert _kinds(report) == [
        (SEEN_COUNT, "refunds_hour", 5),
        (SEEN_SUM, "refund_total", 5),
    ]
    count = next(m for m in report.mismatches if m.kind == SEEN_COUNT)
    assert "saw count 1" in count.message and "counted 4" in count.message
    assert count.decision_id == "dec-4" and count.key == "u1"
    assert verified.problem.seq == 5 and verified.problem.subject == "record"
    assert "2 limits mismatches" in verified.problem.message


def test_a_wrong_count_is_the_problem_when_every_row_is_gone_too(open_store, tmp_path):
    # 40 decisions, one of which (record 31) saw count 0 after 30 counted,
    # then every row deleted: 80 rows missing, and one decision made on a
    # wrong count, which must head the report, not hide past the notes.
    store = open_store(extra_dbs=(LIMITS_DB,))
    book = Book()
    records = [book.decide(n, T0 + n * SECOND) for n in range(40)]
    records[30].limits["refunds_hour"].count = 0
    _append(store, records)
    store.close()
    raw = RawLog(tmp_path / "log")
    with raw.env.begin(write=True) as txn:
        rows = raw.env.open_db(LIMITS_DB, txn=txn)
        txn.drop(rows, delete=False)
    raw.close()
    store = open_store(readonly=True)

    report = check_limits(store)
    verified = verify_store(store, None, None)
    lines = format_report(verified).splitlines()

    assert report.mismatches[0].kind == SEEN_COUNT
    assert [m.kind for m in report.mismatches[1:]] == [MISSING_ROW] * 80
    assert [m.seq for m in report.mismatches[1:3]] == [1, 1]
    assert verified.problem.subject == "record" and verified.problem.seq == 31
    assert lines[0] == (
        "record 31: edited: seen_count: limit 'refunds_hour' key 'u1': the "
        "decision saw count 0, but the records before it counted 30 since its "
        "window_start 2026-12-04T08:00:30Z (81 limits mismatches in all)"
    )
    assert "note: limits mismatches by kind: seen_count 1, missing_row 80" in lines
    assert "note: limits: 60 more mismatches not listed" in lines
    listed = [line for line in lines if "missing_row:" in line]
    assert len(listed) == 20
    assert listed[0].startswith("note: limits: limits row 'refund_total' ")


def test_the_earliest_wrong_decision_comes_first_whatever_its_kind(open_store):
    store = open_store(extra_dbs=(LIMITS_DB,))
    book = Book()
    records = [book.decide(n, T0 + n * SECOND) for n in range(6)]
    records[2].limits["refund_total"].sum = encode_value(4)
    records[4].limits["refunds_hour"].count = 0
    _append(store, records)
    store.append_batch([], [(LIMITS_DB, rows_of(records[0])[0][0], None)])

    report = check_limits(store)

    assert [(m.kind, m.seq) for m in report.mismatches] == [
        (SEEN_SUM, 3),
        (SEEN_COUNT, 5),
        (MISSING_ROW, 1),
    ]


def test_counts_under_another_definition_are_not_seen(open_store):
    # Three under definition "a", then the limit changed what it counts
    # ("b"): the next decisions see only what "b" counted; records without
    # a definition digest are a group of their own.
    store = open_store(extra_dbs=(LIMITS_DB,))
    book = Book()
    records = [book.decide(n, T0 + n * SECOND, definition="a") for n in range(3)]
    records += [book.decide(n, T0 + n * SECOND, definition="b") for n in range(3, 5)]
    records += [book.decide(n, T0 + n * SECOND) for n in range(5, 7)]
    _append(store, records)

    report = check_limits(store)
    totals = recompute_totals(store, T0)

    assert report.ok, report.mismatches
    assert [r.limits["refunds_hour"].count for r in records] == [0, 1, 2, 0, 1, 0, 1]
    assert report.seen_checked == 14
    # The totals group alike: one (limit, definition, key) each.
    assert {k: v for k, v in totals.items() if k[0] == "refunds_hour"} == {
        ("refunds_hour", "a", "u1"): (3, 3),
        ("refunds_hour", "b", "u1"): (2, 2),
        ("refunds_hour", "", "u1"): (2, 2),
    }


def test_a_negative_counted_amount_is_refused_naming_the_range(open_store, tmp_path):
    # The book never counts a negative amount; a record that says it did
    # would lower the sum below what the decisions counted.
    book = Book()
    records = [book.decide(n, T0 + n * SECOND) for n in range(3)]
    records[1].limits["refund_total"].amount = encode_value(-5)
    store = open_store(extra_dbs=(LIMITS_DB,))
    _append(store, records)
    expected = "limit 'refund_total' counted amount -5; expected a finite number"

    report = check_limits(store)

    assert [(m.kind, m.limit, m.seq) for m in report.mismatches] == [
        (LIMIT_ENTRY, "refund_total", 2)
    ]
    assert report.mismatches[0].message.startswith(expected)
    with pytest.raises(ValueError, match=expected):
        recompute_totals(records, T0)
    with pytest.raises(PackError, match="counted amount -5; expected a finite"):
        verify_pack(_pack(tmp_path / "p", [records]))


def test_a_decision_that_saw_another_definitions_counts_is_reported(open_store):
    store = open_store(extra_dbs=(LIMITS_DB,))
    book = Book()
    records = [book.decide(n, T0 + n * SECOND, definition="a") for n in range(3)]
    records += [book.decide(n, T0 + n * SECOND, definition="b") for n in range(3, 5)]
    # Under "a", it saw what "b" counted (2, 10) instead of its own (3, 15).
    mixed = book.decide(5, T0 + 5 * SECOND, definition="b")
    for entry in mixed.limits.values():
        entry.definition = "a"
    _append(store, [*records, mixed])

    report = check_limits(store)

    assert _kinds(report) == [
        (SEEN_COUNT, "refund_total", 6),
        (SEEN_COUNT, "refunds_hour", 6),
        (SEEN_SUM, "refund_total", 6),
    ]
    hour = next(m for m in report.mismatches if m.limit == "refunds_hour")
    assert hour.message == (
        "limit 'refunds_hour' key 'u1': the decision saw count 2, but the "
        "records before it counted 3 since its window_start 2026-12-04T08:00:05Z"
    )


def test_a_row_whose_definition_digest_changed_differs(open_store):
    store, records = _log(open_store, definition="a")
    (hour_key, _), _ = rows_of(records[1])
    store.append_batch([], [(LIMITS_DB, hour_key, row_value("u1", 1, "forged"))])

    report = check_limits(store)

    assert _kinds(report) == [(ROW_DIFFERS, "refunds_hour", 2)]
    assert "definition 'forged'" in report.mismatches[0].message
    assert report.mismatches[0].row == (
        "limits row 'refunds_hour' 2026-12-04T09:00:01Z 'dec-1'"
    )


def test_a_seen_count_edited_in_the_record_breaks_the_chain_first(open_store, tmp_path):
    store, _ = _log(open_store)
    store.close()
    raw = RawLog(tmp_path / "log")
    data = raw.get(b"records", (3).to_bytes(8, "big"))
    raw.put(
        b"records", (3).to_bytes(8, "big"), data.replace(b'"count":2', b'"count":0')
    )
    raw.close()
    store = open_store(readonly=True)

    verified = verify_store(store, None, None)
    report = check_limits(store)

    assert verified.problem.kind == ProblemKind.EDITED and verified.problem.seq == 3
    assert {m.kind for m in report.mismatches} == {SEEN_COUNT}


def test_only_records_inside_the_window_count(open_store):
    store = open_store(extra_dbs=(LIMITS_DB,))
    book = Book()
    # 40 minutes apart with a one-hour window: each sees only the one before.
    records = [book.decide(n, T0 + n * 2400 * SECOND) for n in range(5)]
    _append(store, records)

    report = check_limits(store)

    assert report.ok, report.mismatches
    assert [r.limits["refunds_hour"].count for r in records] == [0, 1, 1, 1, 1]


def test_double_sums_compare_exactly_with_fsum(open_store):
    rng = random.Random(13)
    store = open_store(extra_dbs=(LIMITS_DB,))
    book = Book()
    amounts = [rng.choice([0.1, 1e-9, 12345.678, 1e16, 0.3]) for _ in range(60)]
    records = [
        book.decide(n, T0 + n * SECOND, amount=a, window=24 * HOUR)
        for n, a in enumerate(amounts)
    ]
    _append(store, records)

    report = check_limits(store)
    totals = recompute_totals(store, T0)

    assert report.ok, report.mismatches
    assert totals[("refund_total", "", "u1")] == (60, math.fsum(amounts))
    assert totals[("refunds_hour", "", "u1")] == (60, 60)


# Subnormals, the largest doubles (two of them sum past the largest double:
# the book answers infinity), and a huge amount sliding out of a short
# window beside tiny ones (what is left must not be a rounding residue).
AWKWARD = [5e-324, 1.7976931348623157e308, 1.7976931348623157e308, 5e-324]
AWKWARD += [1.0, 1e308, 5e-324, 0.1, 2.2250738585072014e-308, 0.2, 1e16, 0.3]


def test_awkward_double_sums_verify_in_the_log_and_in_a_pack(open_store, tmp_path):
    store = open_store(extra_dbs=(LIMITS_DB,))
    book = Book()
    # A day's window, then a 2.5-second one: each sees the two before it.
    records = [
        book.decide(n, T0 + n * SECOND, amount=a, window=24 * HOUR)
        for n, a in enumerate(AWKWARD)
    ]
    records += [
        book.decide(n, T0 + n * SECOND, amount=a, window=2 * SECOND + SECOND // 2)
        for n, a in enumerate(AWKWARD, start=len(AWKWARD))
    ]
    _append(store, records)
    seen = [decode_value(r.limits["refund_total"].sum) for r in records]

    report = check_limits(store)
    totals = recompute_totals(store, T0)
    tail = recompute_totals(store, T0 + 20 * SECOND)
    pack = _pack(tmp_path / "p", [records[:10], records[10:]])

    assert math.inf in seen and 5e-324 in seen and 0.1 + 0.2 not in seen
    assert report.ok, report.mismatches
    assert report.seen_checked == 2 * len(records)
    # math.fsum raises here; the exact sum is past the largest double.
    assert totals[("refund_total", "", "u1")] == (24, math.inf)
    assert tail[("refund_total", "", "u1")] == (4, math.fsum(AWKWARD[8:]))
    assert verify_pack(pack).limits.checked == 2 * len(records)


def test_a_seen_count_above_the_records_is_a_note_naming_the_first(open_store):
    # Two decisions saw a count the log never held (one decision whose
    # commit was refused): a note naming the first, not a mismatch.
    store = open_store(extra_dbs=(LIMITS_DB,))
    book = Book()
    records = [book.decide(n, T0 + n * SECOND) for n in range(6)]
    for record in records[3:5]:
        record.limits["refunds_hour"].count += 1
    _append(store, records)

    report = check_limits(store)
    verified = verify_store(store, None, None)

    assert report.ok, report.mismatches
    assert (report.seen_above, report.first_above) == (
        2,
        SeenAbove(4, "refunds_hour", "u1"),
    )
    assert verified.ok, verified.problem
    assert any(
        note.endswith(
            "; 2 saw more than the records before them hold (counts of a "
            "decision whose commit was refused, then taken back); the first at "
            "record 4, limit 'refunds_hour' key 'u1'"
        )
        for note in verified.notes
    ), verified.notes


def test_decisions_made_during_a_refused_commit_all_see_its_count(tmp_path):
    """The real writer: a commit refused for a full log while two more
    decisions are made; they share the next commit, which succeeds. Both
    saw the refused decision's count, the second with the first's record in
    the same window as well: an excess that persists at a later record is
    what an honest log shows, so it stays a note."""
    clock = SettableClock("2026-12-07T09:00:00Z")
    harness = Harness(tmp_path, clock, policies_dir(tmp_path))
    taken, release = threading.Event(), threading.Event()

    async def go():
        async with harness as pipeline:
            real = harness.store.append_batch

            def append_batch(records, changes=(), **options):
                if not taken.is_set():
                    taken.set()
                    release.wait(30)
                    full = AuditUnavailable("audit log: map full")
                    full.__cause__ = lmdb.MapFullError("MDB_MAP_FULL")
                    raise full
                return real(records, changes, **options)

            harness.store.append_batch = append_batch
            lost = asyncio.ensure_future(pipeline.decide(refund(rid="lost")))
            loop = asyncio.get_running_loop()
            assert await loop.run_in_executor(None, taken.wait, 30)
            kept = [
                asyncio.ensure_future(pipeline.decide(refund(rid=f"kept{i}")))
                for i in range(2)
            ]
            await asyncio.sleep(0)
            release.set()
            return await asyncio.gather(lost, *kept, return_exceptions=True)

    try:
        lost, *kept = asyncio.run(go())
        del harness.store.append_batch
        report = check_limits(harness.store)
        records = decisions(harness.records())
    finally:
        release.set()
        harness.close()
    assert isinstance(lost, AuditUnavailable)
    assert [answer.decision.effect for answer in kept] == [Effect.ALLOW] * 2
    seen = [r.limits["refunds_today"] for r in records]
    # The log holds 0, then 1 before them; each saw one more.
    assert [e.count for e in seen] == [1, 2]
    assert seen[0].window_start == seen[1].window_start
    assert report.ok, report.mismatches
    # Three limits counted each of the two decisions.
    assert report.seen_above == 6
    assert report.first_above is not None and report.first_above.seq == 1


@pytest.mark.parametrize(
    ("count", "seen_sum", "held", "expected"),
    [
        # (above, count differs, sum differs, total)
        (2, 10, Held(2, 10), (False, False, False, 10)),
        (2, UInt64(10), Held(2, 10), (False, False, False, 10)),
        (2, True, Held(2, 1), (False, False, True, 1)),
        (2, 10, Held(2, 10, 0, 1), (False, False, True, 10.0)),
        (2, 10.0, Held(2, 10), (False, False, False, 10.0)),
        (2, math.nan, Held(2, 10), (False, False, True, 10.0)),
        (3, 15, Held(2, 10), (True, False, False, 10)),
        (3, 5, Held(2, 10), (False, True, True, 10)),
        (3, None, Held(2, 10), (True, False, False, 10)),
        (1, None, Held(2, 10), (False, True, False, 10)),
    ],
)
def test_seen_values_compare_by_kind_and_value(count, seen_sum, held, expected):
    found = compare_seen(count, seen_sum, held)
    assert (*found[:3], type(found.total), found.total) == (
        *expected[:3],
        type(expected[3]),
        expected[3],
    )


def test_recompute_totals_takes_records_since_an_instant(open_store):
    book = Book()
    records = [
        book.decide(n, T0 + n * SECOND, key=f"u{n % 2}", amount=n) for n in range(6)
    ]

    totals = recompute_totals(records, T0 + 2 * SECOND)
    from_bytes = recompute_totals([msgspec.json.encode(r) for r in records], 0)

    assert totals == {
        ("refunds_hour", "", "u0"): (2, 2),
        ("refunds_hour", "", "u1"): (2, 2),
        ("refund_total", "", "u0"): (2, 6),
        ("refund_total", "", "u1"): (2, 8),
    }
    assert from_bytes[("refund_total", "", "u1")] == (3, 9)


def test_an_uncounted_read_is_checked_but_makes_no_row(open_store):
    store = open_store(extra_dbs=(LIMITS_DB,))
    book = Book()
    records = [book.decide(0, T0), book.decide(1, T0 + SECOND, counted=False)]
    _append(store, records)

    report = check_limits(store)

    assert report.ok and (report.rows, report.counted) == (2, 2)
    assert report.seen_checked == 4


# --------------------------------------------------------------- retention


class Clock:
    def __init__(self, nanos: int):
        self.nanos = nanos

    def __call__(self) -> int:
        return self.nanos


def _retaining(open_store, keep_from):
    store = open_store(extra_dbs=(LIMITS_DB,))
    clock = Clock(T0 + 10 * SECOND)
    pruned: list[int] = []
    sealing = Sealing(
        key=generate_key(),
        origin=ORIGIN,
        segment_records=3,
        segment_seconds=3600.0,
        clock=clock,
        retention_seconds=60,
        on_prune=pruned.append,
        keep_from=keep_from,
    )
    book = Book()

    async def main():
        writer = AuditWriter(store, sealing=sealing)
        writer.start()
        for n in range(6):
            record = book.decide(n, T0 + n * SECOND)
            await writer.append(record, [(LIMITS_DB, k, v) for k, v in rows_of(record)])
        clock.nanos += 600 * SECOND
        for n in range(6, 9):
            record = book.decide(n, T0 + n * SECOND)
            await writer.append(record, [(LIMITS_DB, k, v) for k, v in rows_of(record)])
        await writer.close()

    asyncio.run(main())
    return store, pruned


def test_retention_without_limits_prunes_and_takes_the_rows(open_store):
    store, pruned = _retaining(open_store, lambda: 0)

    report = check_limits(store)

    assert pruned == [6] and store.seam() == 6
    assert report.ok, report.mismatches
    assert report.rows == report.counted == 6
    assert store.pruned_time() == T0 + 5 * SECOND
    assert all(b"dec-5" not in k for k, _ in store.iter_state(LIMITS_DB))
    # Windows opening at or before the last pruned record are not checkable.
    assert report.not_checkable == 6 and report.seen_checked == 0


def test_retention_never_prunes_a_segment_inside_an_open_window(open_store):
    # Records 1..3 are before keep_from, record 4 (dec-3) is at it.
    store, pruned = _retaining(open_store, lambda: T0 + 3 * SECOND)

    assert pruned == [3] and store.seam() == 3
    assert store.get(4) is not None
    assert check_limits(store).ok


def test_retention_keeps_everything_when_keep_from_fails(open_store):
    def broken() -> int:
        raise RuntimeError("no policy yet")

    store, pruned = _retaining(open_store, broken)

    assert pruned == [] and store.seam() == 0


def test_verify_reads_the_rows_of_a_log_opened_read_only(open_store, tmp_path):
    store, _ = _log(open_store)
    store.close()

    reader = AuditStore.open(tmp_path / "log", readonly=True)
    try:
        assert LIMITS_DB in reader.extra_dbs
        assert check_limits(reader).rows == 12
    finally:
        reader.close()


# ----------------------------------------------------------- evidence packs


def _sealed_log(path, batches: list[list[AuditRecordV1]]):
    """A log of ``batches``, each sealed into a segment with its rows; the
    signing key."""
    key = generate_key()
    store = AuditStore.open(path, extra_dbs=(LIMITS_DB,))
    try:
        for batch in batches:

            def seal(tree_size: int, root: bytes, chain: bytes):
                return sign_checkpoint(
                    kind=CheckpointKind.CHECKPOINT,
                    origin=ORIGIN,
                    log_id=store.log_id,
                    tree_size=tree_size,
                    root=root,
                    chain_hash=chain,
                    time=Timestamp.from_nanos(T0 + HOUR),
                    key=key,
                )

            changes = [(LIMITS_DB, k, v) for r in batch for k, v in rows_of(r)]
            store.append_batch(batch, changes, seal=seal)
    finally:
        store.close()
    return key


def _pack(tmp_path, batches, start=T0 - HOUR, stop=T0 + HOUR):
    key = _sealed_log(tmp_path / "log", batches)
    out = tmp_path / "pack"
    export_pack(
        tmp_path / "log",
        out,
        Timestamp.from_nanos(start),
        Timestamp.from_nanos(stop),
        [key.public()],
    )
    return out


def test_a_pack_recomputes_the_seen_counts_of_its_decisions(tmp_path):
    book = Book()
    records = [book.decide(n, T0 + n * SECOND) for n in range(6)]
    pack = _pack(tmp_path, [records[:3], records[3:]])

    report = verify_pack(pack)

    assert report.limits == LimitsChecked(checked=12, not_checkable=0, seen_above=0)
    assert report.summary().endswith(
        "; limits: 12 seen counts recomputed from the pack's records, 0 not checkable"
    )


def test_a_pack_holding_a_decision_made_on_a_wrong_count_fails(tmp_path):
    book = Book()
    records = [book.decide(n, T0 + n * SECOND) for n in range(6)]
    records[4].limits["refunds_hour"].count = 1
    pack = _pack(tmp_path, [records[:3], records[3:]])

    with pytest.raises(PackError) as info:
        verify_pack(pack)
    script = subprocess.run(
        [sys.executable, "-I", pack / "verify_pack.py", pack],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )

    assert info.value.kind == "limits"
    assert str(info.value) == (
        "limits: record 5: limit 'refunds_hour' key 'u1': the decision saw count "
        "1, but the pack's records before it counted 4 since its window_start "
        "2026-12-04T08:00:04Z"
    )
    assert script.returncode == 1, script.stderr
    assert script.stdout.startswith(f"FAILED: {info.value}"), script.stdout


def test_a_pack_notes_a_seen_count_above_the_records(tmp_path):
    # A decision whose commit was refused was seen by the next one.
    book = Book()
    records = [book.decide(n, T0 + n * SECOND) for n in range(4)]
    records[3].limits["refunds_hour"].count = 4
    records[3].limits["refund_total"].count = 4
    records[3].limits["refund_total"].sum = encode_value(20)
    pack = _pack(tmp_path, [records])

    report = verify_pack(pack)

    assert report.limits.seen_above == 2
    assert report.limits.first_above == SeenAbove(4, "refund_total", "u1")
    assert report.summary().endswith(
        ", 2 saw more than the records before them hold (counts of a decision "
        "whose commit was refused, then taken back); the first at record 4, "
        "limit 'refund_total' key 'u1'"
    )


def test_a_pack_checks_only_windows_it_reaches_back_to(tmp_path):
    # Ten seconds apart, a 15-second window: each sees the one before. The
    # pack starts at record 4 (09:00:30): windows opening at or before it
    # may hold records the pack does not.
    book = Book()
    records = [
        book.decide(n, T0 + n * 10 * SECOND, window=15 * SECOND) for n in range(9)
    ]
    lying = records[4]  # 09:00:40, window from 09:00:25: not checkable
    lying.limits["refunds_hour"].count = 0
    batches = [records[:3], records[3:6], records[6:]]
    pack = _pack(tmp_path, batches, start=T0 + 30 * SECOND, stop=T0 + 90 * SECOND)

    report = verify_pack(pack)

    assert report.manifest["tree_sizes"]["first"] == 3
    assert report.limits == LimitsChecked(checked=8, not_checkable=4, seen_above=0)
    assert "4 not checkable (their window opens before the pack's first record)" in (
        report.summary()
    )


def test_a_pack_starting_later_still_fails_a_checkable_wrong_count(tmp_path):
    book = Book()
    records = [
        book.decide(n, T0 + n * 10 * SECOND, window=15 * SECOND) for n in range(9)
    ]
    records[5].limits["refunds_hour"].count = 0  # 09:00:50: sees 09:00:40
    batches = [records[:3], records[3:6], records[6:]]
    pack = _pack(tmp_path, batches, start=T0 + 30 * SECOND, stop=T0 + 90 * SECOND)

    with pytest.raises(PackError, match=r"^limits: record 6: limit 'refunds_hour'"):
        verify_pack(pack)


def test_a_pack_sums_doubles_exactly(tmp_path):
    rng = random.Random(13)
    book = Book()
    amounts = [rng.choice([0.1, 1e-9, 12345.678, 1e16, 0.3]) for _ in range(40)]
    records = [
        book.decide(n, T0 + n * SECOND, amount=a, window=24 * HOUR)
        for n, a in enumerate(amounts)
    ]
    good = _pack(tmp_path / "good", [records[:20], records[20:]])
    exact = math.fsum(amounts[:39])
    # One unit in the last place below the exact sum.
    records[39].limits["refund_total"].sum = encode_value(math.nextafter(exact, 0))
    off = _pack(tmp_path / "off", [records[:20], records[20:]])

    report = verify_pack(good)

    assert report.limits.checked == 80
    assert records[39].limits["refund_total"].count == 39
    with pytest.raises(PackError, match=r"record 40: limit 'refund_total' .* sum"):
        verify_pack(off)


def test_a_pack_groups_counts_by_the_limits_definition(tmp_path):
    book = Book()
    records = [book.decide(n, T0 + n * SECOND, definition="a") for n in range(3)]
    records += [book.decide(n, T0 + n * SECOND, definition="b") for n in range(3, 5)]
    records += [book.decide(5, T0 + 5 * SECOND)]
    wrong = book.decide(6, T0 + 6 * SECOND, definition="b")
    for entry in wrong.limits.values():
        entry.definition = "a"  # saw b's 2 where a counted 3
    good = _pack(tmp_path / "good", [records])
    bad = _pack(tmp_path / "bad", [[*records, wrong]])

    report = verify_pack(good)

    assert report.limits.checked == 12 and report.limits.seen_above == 0
    with pytest.raises(PackError, match=r"record 7: .* saw count 2, .* counted 3"):
        verify_pack(bad)


def test_an_entry_counted_with_an_error_is_held_by_both_checks(open_store, tmp_path):
    # Its rows damaged (or a fleet store out of touch) the limit had no
    # value, yet the decision was counted: the next one saw it.
    book = Book()
    records = [book.decide(n, T0 + n * SECOND) for n in range(3)]
    records[1].limits["refund_total"].error = "some of the limit's rows are damaged"
    store = open_store(extra_dbs=(LIMITS_DB,))
    _append(store, records)

    report = check_limits(store)
    pack = verify_pack(_pack(tmp_path / "p", [records]))

    assert report.ok, report.mismatches
    assert (report.seen_checked, report.seen_above) == (5, 0)
    assert pack.limits == LimitsChecked(checked=5, not_checkable=0, seen_above=0)


REAL_LIMITS = """\
format_version: 1
kind: policy
name: refund-limits
limits:
  refunds_hour:
    actions: [payments.refund.issue]
    key: [user]
    window: {rolling: 1h}
    ceiling: 100
  refund_total:
    actions: [payments.refund.issue]
    sum: resource.attr.amount
    key: [agent]
    window: {rolling: 90s}
    ceiling: 1000000
rules:
  - id: refunds-per-hour
    effect: deny
    actions: [payments.refund.issue]
    resources: [payments.refund]
    roles: ["*"]
    condition: limits.refunds_hour.exceeded || limits.refund_total.exceeded
"""


def test_a_daemons_pack_recomputes_what_its_decisions_saw(tmp_path):
    """A real daemon over gRPC: one refund a minute for 12 minutes, sealed
    every 4 records; the whole pack checks every entry, a pack of the
    later segments only the windows opening after its first record (the
    90-second ones, from its third decision on)."""
    policies = tmp_path / "policies"
    policies.mkdir()
    for path in SHIPPED_POLICIES.glob("*.yaml"):
        shutil.copy(path, policies / path.name)
    (policies / "refund-limits.yaml").write_text(REAL_LIMITS)
    key_path = tmp_path / "keys" / "audit.pem"
    config = daemon_config(
        tmp_path,
        f"policy.source={policies}",
        "audit.create_signing_key=true",
        "audit.segment_records=4",
    )
    clock = SettableClock("2026-12-07T09:00:00Z")
    running = RunningDaemon(config, clock)
    try:
        stub = running.stub()
        for minute in range(12):
            clock.set(f"2026-12-07T09:{minute:02d}:30Z")
            assert stub.Decide(small_refund()).decision == pb.DECISION_ALLOW
    finally:
        running.stop()
    public = load_public_key(key_path.with_suffix(".pub"))

    def pack(name: str, start: str):
        export_pack(
            tmp_path / "audit",
            tmp_path / name,
            parse_time(start),
            parse_time("2026-12-07T10:00:00Z"),
            [public],
        )
        return verify_pack(tmp_path / name)

    whole = pack("whole", "2026-12-07T09:00:00Z")
    later = pack("later", "2026-12-07T09:09:30Z")
    records = [
        json.loads(line)
        for line in (tmp_path / "whole" / "records.jsonl").read_bytes().splitlines()
    ]

    decided = [r for r in records if r.get("limits")]
    assert len(decided) == 12
    assert decided[-1]["limits"]["refunds_hour"]["count"] == 11
    assert decided[-1]["limits"]["refund_total"]["count"] == 1
    assert decided[-1]["limits"]["refunds_hour"]["definition"]
    assert whole.limits == LimitsChecked(checked=24, not_checkable=0, seen_above=0)
    later_records = [
        json.loads(line)
        for line in (tmp_path / "later" / "records.jsonl").read_bytes().splitlines()
    ]
    first = parse_timestamp(later_records[0]["time"]).to_nanos()
    opens = [
        parse_timestamp(entry["window_start"]).to_nanos()
        for record in later_records
        for entry in record.get("limits", {}).values()
    ]
    assert later.manifest["tree_sizes"]["first"] > 0
    assert later.limits.checked == sum(start > first for start in opens) > 0
    assert later.limits.not_checkable == sum(start <= first for start in opens) > 0
