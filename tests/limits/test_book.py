"""The limit book over a real audit log: rows written by ``append_batch``
from records (``counters.rows_of``), read back by ``activate`` and rereads,
pending counts, windows that move, shrink and grow, memory sweeps and exact
sums, and a random walk checked against a recount from scratch."""

from __future__ import annotations

import contextlib
import fractions
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kynara_sidecar.audit import verify_pack
from kynara_sidecar.audit.counters import LIMITS_DB, row_prefix, rows_of
from kynara_sidecar.audit.record import (
    AuditRecordV1,
    LimitEntry,
    encode_value,
    format_timestamp,
)
from kynara_sidecar.audit.store import AuditStore
from kynara_sidecar.audit.verify import recompute_totals
from kynara_sidecar.decision import Effect, Timestamp
from kynara_sidecar.limits import book as book_module
from kynara_sidecar.limits.book import GRACE_NANOS, Counted, LimitBook, Tally
from kynara_sidecar.policy.limits import CompiledLimit, KeyPart, Window

SECOND = 1_000_000_000
HOUR = 3600 * SECOND
# 2026-12-01T00:00:00Z: a plausible now.
T0 = 1_795_996_800 * SECOND


def _limit(
    name: str = "refunds",
    *,
    window: int = HOUR,
    sums: bool = False,
    ceiling: int | float = 5,
) -> CompiledLimit:
    return CompiledLimit(
        name=name,
        policy="limits.yaml",
        actions=("payments.refund.issue",),
        resources=("*",),
        decisions=frozenset({Effect.ALLOW}),
        key=(KeyPart("user"),),
        window=Window(rolling_nanos=window),
        ceiling=ceiling,
        sum_source="context" if sums else "",
        sum_field="amount" if sums else "",
    )


def _counted(
    limit: str, key: str, time_nanos: int, amount: int | float, decision_id: str
) -> Counted:
    """A count of one of ``_limit``'s limits, which carry no definition."""
    return Counted(limit, key, time_nanos, amount, decision_id, "")


def _record(decision_id: str, time_nanos: int, counted: dict) -> AuditRecordV1:
    """A decision record whose limits (name -> (key, amount)) counted it."""
    return AuditRecordV1(
        v=1,
        kind="decision",
        time=format_timestamp(Timestamp.from_nanos(time_nanos)),
        decision_id=decision_id,
        decision="allow",
        limits={
            name: LimitEntry(key=key, counted=True, amount=encode_value(amount))
            for name, (key, amount) in counted.items()
        },
    )


def _commit(
    store: AuditStore, decision_id: str, time_nanos: int, counted: dict
) -> None:
    """Append the record and its rows in one transaction, as the pipeline does."""
    record = _record(decision_id, time_nanos, counted)
    store.append_batch([record], [(LIMITS_DB, k, v) for k, v in rows_of(record)])


@pytest.fixture
def store(tmp_path):
    opened = AuditStore.open(tmp_path / "log", extra_dbs=(LIMITS_DB,))
    yield opened
    opened.close()


def _rolling_start(window: int, now: int) -> int:
    return now - window


# ----------------------------------------------------------------- the store


def test_iter_state_from_reads_one_limits_range(store):
    _commit(store, "d1", T0, {"a": ('["u"]', 1), "a_b": ('["u"]', 1)})
    _commit(store, "d2", T0 + SECOND, {"a": ('["v"]', 1)})
    _commit(store, "d3", T0 + 2 * SECOND, {"b": ('["u"]', 1)})
    rows = list(store.iter_state_from(LIMITS_DB, row_prefix("a", T0 + 1), b"a\x00"))
    assert [key[-2:] for key, _ in rows] == [b"d2"]
    everything = list(store.iter_state_from(LIMITS_DB, row_prefix("a"), b"a\x00"))
    assert len(everything) == 2
    assert list(store.iter_state_from(LIMITS_DB, b"z", b"z")) == []
    # Stopped early and closed: the snapshot is released, reads go on.
    rows = store.iter_state_from(LIMITS_DB, b"", b"")
    with contextlib.closing(rows):
        assert next(rows)[0].startswith(b"a\x00")
    assert len(list(store.iter_state_from(LIMITS_DB, b""))) == 4


def test_iter_state_from_refuses_bad_arguments(store):
    with pytest.raises(ValueError, match="extra_dbs"):
        list(store.iter_state_from(b"approvals", b""))
    with pytest.raises(ValueError, match="does not begin with its prefix"):
        list(store.iter_state_from(LIMITS_DB, b"b\x00", b"a\x00"))


def test_book_refuses_a_store_without_the_limits_database(tmp_path):
    plain = AuditStore.open(tmp_path / "plain")
    try:
        with pytest.raises(ValueError, match="without the limits database"):
            LimitBook(plain)
    finally:
        plain.close()


# ------------------------------------------------------------------- loading


def test_activate_loads_the_windows_rows_from_the_log(store):
    refunds, total = _limit("refunds"), _limit("total", sums=True, ceiling=100)
    # Before the window, at its edge and inside; two keys; another limit.
    _commit(store, "old", T0 - 2 * HOUR, {"refunds": ('["u"]', 1)})
    _commit(store, "edge", T0 - HOUR, {"refunds": ('["u"]', 1)})
    _commit(
        store, "d1", T0 - 60 * SECOND, {"refunds": ('["u"]', 1), "total": ('["a"]', 40)}
    )
    _commit(store, "d2", T0 - SECOND, {"refunds": ('["v"]', 1), "total": ('["a"]', 2)})
    book = LimitBook(store)
    book.activate({"refunds": refunds, "total": total}, T0)
    start = _rolling_start(HOUR, T0)
    # The window's start is inclusive: "edge" is in.
    assert book.tally(refunds, '["u"]', start) == Tally(2, 2)
    assert book.tally(refunds, '["v"]', start) == Tally(1, 1)
    assert book.tally(refunds, '["nobody"]', start) == Tally(0, 0)
    got = book.tally(total, '["a"]', start)
    assert got == Tally(2, 42) and type(got.sum) is int
    assert book.pending() == 0


def test_a_fresh_book_reads_what_an_earlier_one_committed(store):
    limit = _limit()
    first = LimitBook(store)
    first.activate({"refunds": limit}, T0)
    counted = [_counted("refunds", '["u"]', T0 + i, 1, f"d{i}") for i in range(3)]
    first.add(counted)
    for item in counted[:2]:
        _commit(store, item.decision_id, item.time_nanos, {"refunds": ('["u"]', 1)})
    first.committed(counted[:2])
    first.aborted(counted[2:])
    assert first.tally(limit, '["u"]', T0 - HOUR) == Tally(2, 2)
    # A restart: what the log holds, nothing more.
    second = LimitBook(store)
    second.activate({"refunds": limit}, T0 + 10)
    assert second.tally(limit, '["u"]', T0 + 10 - HOUR) == Tally(2, 2)


def test_activate_drops_limits_no_longer_declared(store):
    book = LimitBook(store)
    book.activate({"a": _limit("a"), "b": _limit("b")}, T0)
    book.add([_counted("a", "k", T0, 1, "d1"), _counted("b", "k", T0, 1, "d1")])
    assert book.size() == (2, 2)
    book.activate({"b": _limit("b")}, T0)
    assert book.size() == (1, 1)


# -------------------------------------------------------------------- windows


def test_a_window_that_moves_forgets_what_left_it(store):
    limit = _limit(window=HOUR)
    book = LimitBook(store)
    book.activate({"refunds": limit}, T0)
    book.add(
        [_counted("refunds", "k", T0 + i * 60 * SECOND, 1, f"d{i}") for i in range(10)]
    )
    for minutes in range(0, 10):
        start = T0 + minutes * 60 * SECOND
        assert book.tally(limit, "k", start) == Tally(10 - minutes, 10 - minutes)
    # Events before the floor (the latest start less the grace) are gone.
    assert book.size() == (1, 1)
    # Past every event: the key itself goes.
    assert book.tally(limit, "k", T0 + HOUR) == Tally(0, 0)
    assert book.size() == (0, 0)


def test_a_start_slightly_earlier_is_answered_from_memory(store):
    limit = _limit()
    book = LimitBook(store)
    book.activate({"refunds": limit}, T0)
    book.add([_counted("refunds", "k", T0 + i * SECOND, 1, f"d{i}") for i in range(10)])
    assert book.tally(limit, "k", T0 + 8 * SECOND) == Tally(2, 2)
    # Requests answered out of order: an earlier start within the grace.
    assert book.tally(limit, "k", T0 + 3 * SECOND) == Tally(7, 7)
    assert book.tally(limit, "k", T0 + 9 * SECOND) == Tally(1, 1)


def test_a_clock_step_back_inserts_in_time_order(store):
    limit = _limit(sums=True, ceiling=1000)
    book = LimitBook(store)
    book.activate({"refunds": limit}, T0)
    times = [T0 + 50, T0 + 40, T0 + 60, T0 + 10, T0 + 60]
    book.add([_counted("refunds", "k", t, i + 1, f"d{i}") for i, t in enumerate(times)])
    assert book.tally(limit, "k", T0) == Tally(5, 15)
    assert book.tally(limit, "k", T0 + 41) == Tally(3, 9)
    assert book.tally(limit, "k", T0 + 60) == Tally(2, 8)
    book.aborted([_counted("refunds", "k", T0 + 40, 2, "d1")])
    assert book.tally(limit, "k", T0) == Tally(4, 13)


def test_a_start_below_the_floor_rereads_the_log(store):
    limit = _limit(window=24 * HOUR)
    for i in range(6):
        _commit(store, f"d{i}", T0 + i * HOUR, {"refunds": ("k", 1)})
    book = LimitBook(store)
    book.activate({"refunds": limit}, T0 + 5 * HOUR)
    assert book.tally(limit, "k", T0 + 4 * HOUR) == Tally(2, 2)
    assert book.size() == (1, 2)
    # A pending count beside the log's rows survives the reread.
    book.add([_counted("refunds", "k", T0 + 5 * HOUR + 1, 1, "p")])
    # The clock stepped back an hour and a half: more than the grace.
    assert book.tally(limit, "k", T0 + 2 * HOUR + HOUR // 2) == Tally(4, 4)
    assert book.tally(limit, "k", T0) == Tally(7, 7)
    book.aborted([_counted("refunds", "k", T0 + 5 * HOUR + 1, 1, "p")])
    assert book.tally(limit, "k", T0) == Tally(6, 6)


def test_a_window_that_grows_on_activate_is_read_again(store):
    short, long = _limit(window=HOUR), _limit(window=7 * 24 * HOUR)
    for i in range(5):
        _commit(store, f"d{i}", T0 - i * 24 * HOUR, {"refunds": ("k", 1)})
    book = LimitBook(store)
    book.activate({"refunds": short}, T0)
    assert book.tally(short, "k", T0 - HOUR) == Tally(1, 1)
    book.add([_counted("refunds", "k", T0 + 1, 1, "p")])
    book.activate({"refunds": long}, T0 + 2)
    assert book.tally(long, "k", T0 + 2 - 7 * 24 * HOUR) == Tally(6, 6)
    # Still pending after the reread: an abort takes it back.
    assert book.pending() == 1
    book.aborted([_counted("refunds", "k", T0 + 1, 1, "p")])
    assert book.tally(long, "k", T0 + 2 - 7 * 24 * HOUR) == Tally(5, 5)
    # Shrunk again: nothing read, the old events forgotten.
    book.activate({"refunds": short}, T0 + 3)
    assert book.size() == (1, 1)


def test_a_pending_count_committed_before_a_reread_is_counted_once(store):
    limit = _limit()
    book = LimitBook(store)
    book.activate({"refunds": limit}, T0)
    item = _counted("refunds", "k", T0 + 1, 1, "d1")
    book.add([item])
    # The writer committed it; committed() has not been called yet.
    _commit(store, "d1", T0 + 1, {"refunds": ("k", 1)})
    book.activate({"refunds": _limit(window=2 * HOUR)}, T0 + 2)
    assert book.tally(limit, "k", T0 - HOUR) == Tally(1, 1)
    book.committed([item])
    assert book.pending() == 0
    assert book.tally(limit, "k", T0 - HOUR) == Tally(1, 1)


def test_a_limit_not_activated_is_read_on_first_tally(store):
    limit = _limit()
    _commit(store, "d1", T0, {"refunds": ("k", 1)})
    book = LimitBook(store)
    assert book.tally(limit, "k", T0 - HOUR) == Tally(1, 1)


# ------------------------------------------------------------ pending, errors


def test_pending_counts_count_and_an_abort_takes_exactly_them_back(store):
    limit = _limit()
    book = LimitBook(store)
    book.activate({"refunds": limit}, T0)
    first = [_counted("refunds", "k", T0 + 1, 1, "d1")]
    second = [_counted("refunds", "k", T0 + 2, 1, "d2")]
    book.add(first)
    book.add(second)
    assert book.tally(limit, "k", T0) == Tally(2, 2)
    assert book.pending() == 2
    book.committed(first)
    book.aborted(second)
    assert book.tally(limit, "k", T0) == Tally(1, 1)
    # A committed count cannot be taken back.
    book.aborted(first)
    assert book.tally(limit, "k", T0) == Tally(1, 1)
    assert book.pending() == 0


def test_a_decision_counted_twice_by_one_limit_is_refused(store):
    _commit(store, "logged", T0, {"refunds": ("k", 1)})
    book = LimitBook(store)
    book.activate({"refunds": _limit()}, T0)
    with pytest.raises(ValueError, match="'refunds', decision 'd1'.*already"):
        book.add(
            [
                _counted("refunds", "k", T0, 1, "d1"),
                _counted("refunds", "j", T0, 1, "d1"),
            ]
        )
    assert book.size() == (1, 1)  # nothing of the refused batch
    book.add([_counted("refunds", "k", T0 + 1, 1, "d1")])
    with pytest.raises(ValueError, match="already"):
        book.add([_counted("refunds", "k", T0 + 2, 1, "d1")])
    with pytest.raises(ValueError, match="already"):
        book.add([_counted("refunds", "j", T0 + 2, 1, "logged")])
    # Another limit may count the same decision.
    book.add([_counted("other", "k", T0 + 1, 1, "d1")])


@pytest.mark.parametrize(
    ("amount", "message"),
    [
        (float("nan"), "finite"),
        (float("inf"), "finite"),
        (-1, "negative"),
        (True, "int or a float"),
        ("3", "int or a float"),
    ],
)
def test_a_bad_amount_is_refused(amount, message):
    book = LimitBook(None)
    with pytest.raises(ValueError, match=message):
        book.add([_counted("refunds", "k", T0, amount, "d1")])
    assert book.pending() == 0


# --------------------------------------------------------------------- sums


def test_sums_of_doubles_are_exact(store):
    limit = _limit(sums=True, ceiling=1e6)
    amounts = [0.1] * 10 + [1e16, 1.0, -0.0, 3.3] + [1e-300]
    for i, amount in enumerate(amounts[:5]):
        _commit(store, f"row{i}", T0 + i, {"refunds": ("k", amount)})
    book = LimitBook(store)
    book.activate({"refunds": limit}, T0 + 100)
    book.add(
        [
            _counted("refunds", "k", T0 + 10 + i, amount, f"d{i}")
            for i, amount in enumerate(amounts[5:])
        ]
    )
    got = book.tally(limit, "k", T0)
    assert got.count == len(amounts)
    assert got.sum == math.fsum(amounts) and type(got.sum) is float
    # Taking amounts away leaves no rounding residue.
    book.aborted([_counted("refunds", "k", T0 + 15, 1e16, "d5")])
    rest = amounts[:10] + amounts[11:]
    assert book.tally(limit, "k", T0).sum == math.fsum(rest)
    assert book.tally(limit, "k", T0 + 11).sum == math.fsum(rest[6:])


def test_sums_of_ints_stay_ints(store):
    limit = _limit(sums=True, ceiling=10)
    big = 2**62
    _commit(store, "r", T0, {"refunds": ("k", big)})
    book = LimitBook(store)
    book.activate({"refunds": limit}, T0)
    book.add([_counted("refunds", "k", T0 + 1, big + 1, "d")])
    got = book.tally(limit, "k", T0)
    assert got == Tally(2, 2 * big + 1) and type(got.sum) is int
    # A double limit over int amounts answers a double; a counting one its count.
    as_double = _limit(sums=True, ceiling=10.0)
    assert book.tally(as_double, "k", T0) == Tally(2, float(2 * big + 1))
    assert type(book.tally(as_double, "nobody", T0).sum) is float
    assert book.tally(_limit(), "k", T0) == Tally(2, 2)


# One exact sum everywhere: the book, verify (``recompute_totals``), the
# pack check (``verify_pack.SeenValues``) and ``math.fsum`` agree on any
# amounts, the book also after the window slid past some of them.

# Doubles a naive running sum gets wrong: subnormals, the largest doubles
# (whose sum overflows), values far apart in scale (one in the window with
# tiny ones, then sliding out: a cancellation).
_AWKWARD = [
    5e-324,
    2.2250738585072014e-308,
    1.7976931348623157e308,
    1e308,
    1e16,
    2.0**53,
    1.0,
    0.1,
    0.3,
    0.0,
]
_DOUBLES = st.one_of(
    st.sampled_from(_AWKWARD),
    st.floats(min_value=0.0, allow_nan=False, allow_infinity=False),
)
_AMOUNTS = st.one_of(
    st.lists(_DOUBLES, max_size=25).map(lambda a: (a, 1e300)),
    st.lists(st.integers(0, 2**63 - 1), max_size=25).map(lambda a: (a, 10)),
    # Ints a double limit holds as rows counted before it became one; fsum
    # is exact on them only up to 2**53.
    st.lists(st.one_of(st.integers(0, 2**53), _DOUBLES), max_size=25).map(
        lambda a: (a, 1e300)
    ),
)


def _fsum(amounts: list) -> float:
    """``math.fsum``, or the infinity it cannot return past the largest double."""
    try:
        return math.fsum(amounts)
    except OverflowError:
        return math.inf


@settings(max_examples=300, deadline=None)
@given(_AMOUNTS, st.data())
def test_book_verify_pack_and_fsum_sum_alike(amounts_and_ceiling, data):
    amounts, ceiling = amounts_and_ceiling
    cut = data.draw(st.integers(0, len(amounts)), label="cut")
    limit = _limit(sums=True, ceiling=ceiling)
    as_double = isinstance(ceiling, float)
    book = LimitBook(None)
    book.activate({"refunds": limit}, T0)
    book.add(
        _counted("refunds", "k", T0 + i, amount, f"d{i}")
        for i, amount in enumerate(amounts)
    )
    records = [
        _record(f"d{i}", T0 + i, {"refunds": ("k", amount)})
        for i, amount in enumerate(amounts)
    ]
    seen = verify_pack.SeenValues()
    for i, amount in enumerate(amounts):
        seen.add("refunds", "", "k", T0 + i, amount)

    for start, held in ((T0, amounts), (T0 + cut, amounts[cut:]), (T0, amounts)):
        if as_double:
            expected = (
                _fsum(held)
                if all(isinstance(a, float) or a <= 2**53 for a in held)
                else float(sum(held))
            )
        else:
            expected = sum(held)
        tally = book.tally(limit, "k", start)
        totals = recompute_totals(records, start).get(("refunds", "", "k"), (0, 0))
        recomputed = seen.held("refunds", "", "k", start)
        sums = {
            "book": tally.sum,
            "verify": float(totals[1]) if as_double else totals[1],
            "verify_pack": recomputed.total(as_double),
            "exact_sum": verify_pack.exact_sum(held),
        }
        if as_double:
            sums["exact_sum"] = float(sums["exact_sum"])
        assert {name: (type(v), v) for name, v in sums.items()} == {
            name: (type(expected), expected) for name in sums
        }, (start - T0, held)
        assert tally.count == totals[0] == recomputed.count == len(held)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.floats(allow_nan=False, allow_infinity=False),
            st.sampled_from(_AWKWARD + [-a for a in _AWKWARD]),
            st.integers(-(2**70), 2**70),
        ),
        max_size=25,
    )
)
def test_the_exact_sum_of_signed_amounts_is_rounded_once(amounts):
    # Signed amounts cancel; the one rounding is of the exact rational sum
    # (where fsum may raise on an intermediate overflow instead).
    exact = sum((fractions.Fraction(a) for a in amounts), fractions.Fraction(0))
    whole = units = 0
    for amount in amounts:
        part, scaled = verify_pack.exact_parts(amount)
        whole, units = whole + part, units + scaled
    try:
        expected: int | float = float(exact)
    except OverflowError:
        expected = math.inf if exact > 0 else -math.inf
    if all(isinstance(a, int) for a in amounts):
        expected = int(exact)
    got = verify_pack.exact_sum(amounts)
    assert (type(got), got) == (type(expected), expected)
    rounded = verify_pack.rounded_sum(whole, units)
    assert rounded == (float(expected) if isinstance(expected, int) else expected)


# ------------------------------------------------------------------- memory


def test_keys_that_left_the_window_are_swept(store, monkeypatch):
    monkeypatch.setattr(book_module, "SWEEP_EVERY_ADDS", 100)
    limit = _limit(window=HOUR)
    book = LimitBook(store)
    book.activate({"refunds": limit}, T0)
    book.add([_counted("refunds", f"user{i}", T0, 1, f"old{i}") for i in range(5000)])
    assert book.size() == (5000, 5000)
    later = T0 + 2 * HOUR
    # One key is asked about: its own old events go at once; the floor moves.
    assert book.tally(limit, "fresh", later - HOUR) == Tally(0, 0)
    # As many adds as keys held: a sweep, without a tally of the old keys.
    for i in range(51):
        book.add(
            [
                _counted("refunds", "fresh", later + j, 1, f"n{i}-{j}")
                for j in range(100)
            ]
        )
    assert book.size() == (1, 5100)
    assert book.tally(limit, "fresh", later - HOUR) == Tally(5100, 5100)


def test_activate_sweeps_keys_out_of_the_window(store):
    limit = _limit(window=HOUR)
    book = LimitBook(store)
    book.activate({"refunds": limit}, T0)
    book.add([_counted("refunds", f"user{i}", T0, 1, f"d{i}") for i in range(300)])
    book.add([_counted("refunds", "late", T0 + HOUR, 1, "late")])
    book.activate({"refunds": limit}, T0 + HOUR + GRACE_NANOS + 1)
    assert book.size() == (1, 1)


def test_a_book_without_a_log_keeps_counts_in_memory():
    limit = _limit()
    book = LimitBook(None)
    # Counted before the limit was ever asked about: still counted.
    book.add([_counted("refunds", "k", T0, 1, "d1")])
    assert book.tally(limit, "k", T0) == Tally(1, 1)
    book.add([_counted("refunds", "k", T0 + 1, 1, "d2")])
    assert book.tally(limit, "k", T0) == Tally(2, 2)
    book.aborted([_counted("refunds", "k", T0, 1, "d1")])
    assert book.tally(limit, "k", T0) == Tally(1, 1)


# ---------------------------------------------------------- random, checked


@pytest.mark.parametrize("seed", range(6))
def test_random_adds_aborts_and_tallies_match_a_recount(store, seed):
    rng = random.Random(seed)
    limits = {
        "counts": _limit("counts", window=HOUR),
        "ints": _limit("ints", window=2 * HOUR, sums=True, ceiling=10**6),
        "doubles": _limit("doubles", window=30 * 60 * SECOND, sums=True, ceiling=1e6),
    }
    keys = [f"k{i}" for i in range(5)]
    book = LimitBook(store)
    now = T0
    book.activate(limits, now)
    # Every count the log or the book holds: limit -> decision id -> event.
    truth: dict[str, dict[str, tuple[str, int, int | float]]] = {n: {} for n in limits}
    pending: list[list[Counted]] = []
    for step in range(600):
        roll = rng.random()
        if roll < 0.03:
            now -= rng.choice([SECOND, HOUR // 2])  # the clock steps back
        else:
            now += rng.randrange(0, 90 * SECOND)
        if roll < 0.45:
            decision = f"s{seed}-{step}"
            counted = []
            for name in rng.sample(sorted(limits), rng.randrange(1, 4)):
                amount = (
                    rng.randrange(0, 1000)
                    if name == "ints"
                    else rng.choice([0.1, 0.7, 1e-3, 12.5, 1e9])
                    if name == "doubles"
                    else 1
                )
                counted.append(_counted(name, rng.choice(keys), now, amount, decision))
            book.add(counted)
            for item in counted:
                truth[item.limit][decision] = (item.key, now, item.amount)
            pending.append(counted)
        elif roll < 0.7 and pending:
            counted = pending.pop(rng.randrange(len(pending)))
            if rng.random() < 0.3:
                book.aborted(counted)
                for item in counted:
                    del truth[item.limit][item.decision_id]
            else:
                _commit(
                    store,
                    counted[0].decision_id,
                    counted[0].time_nanos,
                    {item.limit: (item.key, item.amount) for item in counted},
                )
                book.committed(counted)
        elif roll < 0.75:
            # A new policy set: a window grows or shrinks.
            name = rng.choice(sorted(limits))
            limit = limits[name]
            limits[name] = _limit(
                name,
                window=rng.choice([HOUR // 2, HOUR, 3 * HOUR]),
                sums=limit.sums,
                ceiling=limit.ceiling,
            )
            book.activate(limits, now)
        for name, limit in limits.items():
            key = rng.choice(keys)
            start = _rolling_start(limit.window.rolling_nanos, now)
            held = [
                amount
                for k, t, amount in truth[name].values()
                if k == key and t >= start
            ]
            got = book.tally(limit, key, start)
            assert got.count == len(held), (step, name, key)
            if name == "doubles":
                assert got.sum == math.fsum(held), (step, key)
            elif name == "ints":
                assert got.sum == sum(held) and type(got.sum) is int, (step, key)
            else:
                assert got.sum == len(held)
    # And a restart from the log agrees with the book on what committed.
    for counted in pending:
        book.aborted(counted)
        for item in counted:
            del truth[item.limit][item.decision_id]
    fresh = LimitBook(store)
    fresh.activate(limits, now)
    for limit in limits.values():
        start = _rolling_start(limit.window.rolling_nanos, now)
        for key in keys:
            assert fresh.tally(limit, key, start) == book.tally(limit, key, start)


def test_held_lists_the_counts_in_memory(store):
    _commit(store, "logged", T0, {"a": ("k", 1)})
    book = LimitBook(store)
    book.activate({"a": _limit("a"), "b": _limit("b")}, T0)
    book.add([_counted("a", "j", T0 + 1, 1, "p"), _counted("b", "k", T0 + 1, 1, "p")])
    assert book.held(["a", "missing"]) == [
        _counted("a", "j", T0 + 1, 1, "p"),
        _counted("a", "k", T0, 1, "logged"),
    ]
    book.aborted([_counted("a", "j", T0 + 1, 1, "p")])
    assert [c.decision_id for c in book.held(["a", "b"])] == ["logged", "p"]
