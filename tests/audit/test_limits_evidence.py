"""The limits rows as evidence: retention keeps open windows, a prune takes
the rows of what it drops, and verify recomputes rows and seen values."""

from __future__ import annotations

import asyncio
import math
import random

import msgspec

from kynara_sidecar.audit.chain import ProblemKind
from kynara_sidecar.audit.counters import LIMITS_DB, row_value, rows_of
from kynara_sidecar.audit.keys import generate_key
from kynara_sidecar.audit.record import (
    RECORD_VERSION,
    AuditRecordV1,
    LimitEntry,
    RecordKind,
    encode_value,
    format_timestamp,
)
from kynara_sidecar.audit.store import AuditStore
from kynara_sidecar.audit.verify import (
    EXTRA_ROW,
    MISSING_ROW,
    ROW_DIFFERS,
    SEEN_COUNT,
    SEEN_SUM,
    check_limits,
    recompute_totals,
    verify_store,
)
from kynara_sidecar.audit.writer import AuditWriter, Sealing
from kynara_sidecar.decision import Timestamp

from ._support import RawLog

ORIGIN = "daemon-a"
SECOND = 1_000_000_000
# 2026-12-04T09:00:00Z in nanoseconds.
T0 = 1_796_374_800 * SECOND
HOUR = 3600 * SECOND


def _stamp(nanos: int) -> str:
    return format_timestamp(Timestamp.from_nanos(nanos))


class Book:
    """A brute-force book: what each (limit, key) counted so far."""

    def __init__(self):
        self.events: dict[tuple[str, str], list[tuple[int, int | float]]] = {}

    def seen(self, limit: str, key: str, start: int) -> tuple[int, list]:
        held = [a for t, a in self.events.get((limit, key), []) if t >= start]
        return len(held), held

    def decide(
        self,
        n: int,
        time: int,
        key: str = "u1",
        amount: int | float = 5,
        *,
        window: int = HOUR,
        counted: bool = True,
    ) -> AuditRecordV1:
        """A decision record whose entries say what the book held before it
        (a counting limit and a summing one over ``amount``)."""
        start = time - window
        limits = {}
        for name, value in (("refunds_hour", 1), ("refund_total", amount)):
            count, held = self.seen(name, key, start)
            total = math.fsum(held) if isinstance(value, float) else sum(held)
            limits[name] = LimitEntry(
                key=key,
                window_start=_stamp(start),
                count=count,
                sum=encode_value(total) if name == "refund_total" else None,
                ceiling=encode_value(100),
                counted=counted,
                amount=encode_value(value) if counted else None,
            )
            if counted:
                self.events.setdefault((name, key), []).append((time, value))
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
    assert verified.problem.seq == 3 and verified.problem.subject == "limits row"
    assert "refunds_hour" in verified.problem.message


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
    assert verified.problem.message.startswith(EXTRA_ROW)
    assert any(ROW_DIFFERS in note for note in verified.notes)


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
    assert totals[("refund_total", "u1")] == (60, math.fsum(amounts))
    assert totals[("refunds_hour", "u1")] == (60, 60)


def test_recompute_totals_takes_records_since_an_instant(open_store):
    book = Book()
    records = [
        book.decide(n, T0 + n * SECOND, key=f"u{n % 2}", amount=n) for n in range(6)
    ]

    totals = recompute_totals(records, T0 + 2 * SECOND)
    from_bytes = recompute_totals([msgspec.json.encode(r) for r in records], 0)

    assert totals == {
        ("refunds_hour", "u0"): (2, 2),
        ("refunds_hour", "u1"): (2, 2),
        ("refund_total", "u0"): (2, 6),
        ("refund_total", "u1"): (2, 8),
    }
    assert from_bytes[("refund_total", "u1")] == (3, 9)


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
