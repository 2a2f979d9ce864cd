"""The counted decisions of every active limit, for the pipeline.

The pipeline asks ``tally`` before it evaluates and ``add``s what a
decision counted the moment it is decided (on the event loop, before the
record is queued), so the next request sees it: the check and the count
are one step, and two requests can never both take the last unit under a
ceiling. Once the transaction carrying the record returned, the pipeline
calls ``committed`` or ``aborted``; an aborted decision's counts are taken
back. The rows in the log's ``limits`` database (``audit.counters``) are
written in that same transaction from the record itself, so the log and
the counters cannot disagree; at start (and when a policy set brings a
limit whose window reaches further back) the book reads them again.

Theory of operation
-------------------
Per (limit, key) the book holds a series of events ``(time, decision id,
amount)`` sorted by time (appended as a rule; an event from a clock that
stepped back is inserted in its place) and the running count and sum of
those at or after the series' *cut*, the window start its last ``tally``
asked for. A tally moves the cut to its start, adding or taking away only
the events it crosses, so a window that slides costs what slid out of it.

Per limit the book knows its *floor*: every event this log counted at or
after it is in memory (rows read from the log, plus pending adds). A tally
moves the floor up to its start less ``GRACE_NANOS`` and forgets what lies
before the floor; a tally whose start is below the floor (a clock stepped
back further than the grace, a window that grew) reads the limit's rows
again from that start. The grace keeps requests whose clocks were read a
moment apart, and answered out of order, from each causing a reread.

Pending counts (added, not yet committed) are counted like the rest and
kept across rereads: a reread takes the rows, then adds the pending events
the rows do not hold yet. ``aborted`` takes back exactly the pending events
it names (by limit and decision id); ``committed`` makes them ordinary. A
decision counted twice by one limit is refused (``ValueError``).

Sums are exact: an int sum stays a Python int; a double sum is kept as an
exact integer multiple of 2**-1074 (every double is one) and rounded once
when asked, which is what ``math.fsum`` of the same amounts gives (the
correctly rounded exact sum; infinity past the largest double), however
many were added and taken away. The units and the rounding are
``audit.verify_pack``'s (``double_units``, ``rounded_sum``), the ones
``verify`` and the pack check recompute seen sums with.

Memory: keys whose events all lie before their limit's floor are removed
by a sweep, run on ``activate`` and after every ``max(SWEEP_EVERY_ADDS,
keys held)`` adds (so its cost per add stays constant); ``size`` says how
many keys and events are held, for a gauge.

Threads: the book is not thread-safe. It is used on the event loop only
(the pipeline's tally/add, the writer's answers through committed/aborted,
activation); its reads of the log are synchronous LMDB reads from one
snapshot, done at activation and on a reread.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import math
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from kynara_sidecar.audit.counters import LIMITS_DB, decode_row, row_prefix
from kynara_sidecar.audit.store import AuditStore
from kynara_sidecar.audit.verify_pack import double_units, rounded_sum
from kynara_sidecar.decision import NANOS_PER_SECOND
from kynara_sidecar.policy import limits as policy_limits
from kynara_sidecar.policy.limits import CompiledLimit

__all__ = [
    "GRACE_NANOS",
    "SWEEP_EVERY_ADDS",
    "Counted",
    "LimitBook",
    "LimitDamaged",
    "Tally",
]

log = logging.getLogger("kynara.limits")

# How far below the latest window start a limit's events stay in memory:
# a tally up to this much earlier (requests whose clocks were read a moment
# apart, a small clock step back) is answered without reading the log.
GRACE_NANOS = 10 * NANOS_PER_SECOND
# A sweep for keys left with no events runs at most once per this many
# adds (or per as many adds as keys held, if more).
SWEEP_EVERY_ADDS = 4096


class Tally(NamedTuple):
    """What a window holds for one key: decisions counted and their sum
    (equal to ``count`` for a counting limit)."""

    count: int
    sum: int | float


class Counted(NamedTuple):
    """One decision counted by one limit."""

    limit: str
    key: str
    time_nanos: int
    amount: int | float
    decision_id: str
    # The limit's definition digest (CompiledLimit.definition): a count
    # belongs to the definition it was made under (see ``activate``).
    definition: str


class LimitDamaged(ValueError):
    """Some of the log's rows of a limit could not be counted (malformed,
    an amount that is not a finite non-negative number, or a decision
    counted twice): counting on without them could let decisions past its
    ceiling, so the limit has no value (its conditions fail closed) until
    the rows are repaired and the daemon restarted (``kynara-sidecar
    verify`` names them)."""


# (time nanos, decision id, amount): sorted by time, ties by decision id.
_Event = tuple[int, str, int | float]


def _amount_problem(amount: object) -> str:
    if isinstance(amount, bool) or not isinstance(amount, int | float):
        return f"amount must be an int or a float, got {type(amount).__name__}"
    if isinstance(amount, float) and not math.isfinite(amount):
        return f"amount must be finite, got {amount!r}"
    if amount < 0:
        return f"amount must not be negative, got {amount!r}"
    return ""


class _Series:
    """The events of one (limit, key) and the running totals of those at
    or after ``cut``. ``events[:lo]`` are forgotten (compacted lazily)."""

    __slots__ = ("count", "cut", "events", "floats", "int_sum", "lo", "scaled_sum")

    def __init__(self) -> None:
        self.events: list[_Event] = []
        self.lo = 0
        # Events at or after ``cut`` are in the totals; a new series
        # counts everything until its first tally.
        self.cut = -1
        self.count = 0
        self.int_sum = 0
        # Exact sum of the float amounts, in units of 2**-1074.
        self.scaled_sum = 0
        self.floats = 0

    def __len__(self) -> int:
        return len(self.events) - self.lo

    def _take(self, amount: int | float, sign: int) -> None:
        self.count += sign
        if isinstance(amount, float):
            self.scaled_sum += sign * double_units(amount)
            self.floats += sign
        else:
            self.int_sum += sign * amount

    def insert(self, event: _Event) -> None:
        events = self.events
        if len(events) == self.lo or events[-1] < event:
            events.append(event)
        else:
            bisect.insort(events, event, lo=self.lo)
        if event[0] >= self.cut:
            self._take(event[2], 1)

    def remove(self, time_nanos: int, decision_id: str) -> bool:
        """Take one event out; False when it is not held."""
        events = self.events
        i = bisect.bisect_left(events, (time_nanos, decision_id), lo=self.lo)
        if i == len(events) or events[i][:2] != (time_nanos, decision_id):
            return False
        event = events.pop(i)
        if event[0] >= self.cut:
            self._take(event[2], -1)
        return True

    def move_cut(self, start: int) -> None:
        """Count the events at or after ``start`` (and only those)."""
        if start == self.cut:
            return
        events, lo = self.events, self.lo
        low, high, sign = (
            (self.cut, start, -1)
            if start > self.cut
            else (
                start,
                self.cut,
                1,
            )
        )
        first = bisect.bisect_left(events, (low,), lo=lo)
        last = bisect.bisect_left(events, (high,), lo=first)
        for i in range(first, last):
            self._take(events[i][2], sign)
        self.cut = start

    def drop_before(self, floor: int) -> list[_Event]:
        """Forget the events before ``floor``; returns them."""
        if self.cut < floor:
            self.move_cut(floor)
        events = self.events
        end = bisect.bisect_left(events, (floor,), lo=self.lo)
        if end == self.lo:
            return []
        dropped = events[self.lo : end]
        self.lo = end
        if self.lo == len(events):
            events.clear()
            self.lo = 0
        elif self.lo > 32 and 2 * self.lo > len(events):
            del events[: self.lo]
            self.lo = 0
        return dropped

    def total(self, limit: CompiledLimit) -> Tally:
        if not limit.sums:
            return Tally(self.count, self.count)
        if not self.floats and not isinstance(limit.ceiling, float):
            return Tally(self.count, self.int_sum)
        # One rounding of the exact sum, as verify and the pack check round.
        return Tally(self.count, rounded_sum(self.int_sum, self.scaled_sum))


class _LimitState:
    """One limit's series by key, and the floor above which memory holds
    every event the log has for it."""

    __slots__ = ("damaged", "events", "floor", "ids", "keys", "limit")

    def __init__(self, limit: CompiledLimit, floor: int):
        self.limit = limit
        self.floor = floor
        # Why the log's rows could not all be read, or "".
        self.damaged = ""
        self.keys: dict[str, _Series] = {}
        # Decision id -> key, of every event held.
        self.ids: dict[str, str] = {}
        self.events = 0

    def insert(
        self, key: str, time_nanos: int, decision_id: str, amount: int | float
    ) -> None:
        series = self.keys.get(key)
        if series is None:
            series = self.keys[key] = _Series()
        series.insert((time_nanos, decision_id, amount))
        self.ids[decision_id] = key
        self.events += 1

    def remove(self, key: str, time_nanos: int, decision_id: str) -> None:
        series = self.keys.get(key)
        if series is None or not series.remove(time_nanos, decision_id):
            return
        self.ids.pop(decision_id, None)
        self.events -= 1
        if not len(series):
            del self.keys[key]

    def trim(self, key: str, series: _Series) -> None:
        """Forget the events of ``key`` before the floor (and the key when
        none is left)."""
        for _, decision_id, _ in series.drop_before(self.floor):
            del self.ids[decision_id]
            self.events -= 1
        if not len(series):
            del self.keys[key]

    def sweep(self) -> None:
        for key, series in list(self.keys.items()):
            self.trim(key, series)


class LimitBook:
    """Counted decisions per (limit, key), in memory over the log's rows.

    Args:
        store: the audit store, opened with ``extra_dbs=(LIMITS_DB,)``;
            None keeps counts in memory only (tests, no log): what falls
            below a limit's floor is then gone, and a window that grows
            back is answered from what memory still holds.

    Raises:
        ValueError: the store was opened without the ``limits`` database.
    """

    def __init__(self, store: AuditStore | None):
        if store is not None and LIMITS_DB not in store.extra_dbs:
            raise ValueError(
                f"audit store {store.path} was opened without the "
                f"{LIMITS_DB.decode()} database"
            )
        self._store = store
        self._limits: dict[str, _LimitState] = {}
        # (limit, decision id) -> the count, until committed or aborted;
        # kept for limits not active too, so that a reread keeps them.
        self._pending: dict[tuple[str, str], Counted] = {}
        self._adds = 0

    def activate(self, limits: Mapping[str, CompiledLimit], now_nanos: int) -> None:
        """Take the limits of a newly active policy set: a limit new to the
        book, or whose window now reaches further back, is read from the
        store's rows (its pending counts kept); limits no longer declared
        are dropped from memory (their rows stay)."""
        for name in [name for name in self._limits if name not in limits]:
            del self._limits[name]
        for name, limit in limits.items():
            start = policy_limits.window_start(limit.window, now_nanos)
            state = self._limits.get(name)
            if (
                state is None
                or start < state.floor
                or state.limit.definition != limit.definition
            ):
                self._load(limit, start)
                continue
            state.limit = limit
            state.floor = max(state.floor, start - GRACE_NANOS)
            state.sweep()
        self._adds = 0

    def tally(self, limit: CompiledLimit, key: str, start_nanos: int) -> Tally:
        """What the window opening at ``start_nanos`` holds for ``key``:
        counted decisions (committed and pending) at or after it.

        A limit not activated yet is read from the log first; so is one
        whose memory does not reach back to ``start_nanos``.

        Raises:
            LimitDamaged: some of the limit's rows could not be read.
        """
        state = self._limits.get(limit.name)
        if state is None or (start_nanos < state.floor and self._store is not None):
            state = self._load(limit, start_nanos)
        if state.damaged:
            raise LimitDamaged(state.damaged)
        elif start_nanos - GRACE_NANOS > state.floor:
            state.floor = start_nanos - GRACE_NANOS
        series = state.keys.get(key)
        if series is not None:
            state.trim(key, series)
        if series is None or key not in state.keys:
            return (
                _EMPTY_SUM
                if limit.sums and isinstance(limit.ceiling, float)
                else _EMPTY
            )
        series.move_cut(start_nanos)
        return series.total(limit)

    def add(self, counted: Iterable[Counted]) -> None:
        """Count decisions now, before their record commits.

        Raises:
            ValueError: an amount is not a finite, non-negative int or
                float, or a limit counted a decision it already holds (in
                this call or before); nothing was added.
        """
        batch = list(counted)
        seen: set[tuple[str, str]] = set()
        for item in batch:
            where = f"limit {item.limit!r}, decision {item.decision_id!r}"
            problem = _amount_problem(item.amount)
            if problem:
                raise ValueError(f"{where}: {problem}")
            ident = (item.limit, item.decision_id)
            state = self._limits.get(item.limit)
            if (
                ident in seen
                or ident in self._pending
                or (state is not None and item.decision_id in state.ids)
            ):
                raise ValueError(f"{where}: the limit counted this decision already")
            seen.add(ident)
        for item in batch:
            self._pending[(item.limit, item.decision_id)] = item
            state = self._limits.get(item.limit)
            if state is not None:
                state.insert(item.key, item.time_nanos, item.decision_id, item.amount)
        self._adds += len(batch)
        if self._adds >= SWEEP_EVERY_ADDS and self._adds >= self.size()[0]:
            for state in self._limits.values():
                state.sweep()
            self._adds = 0

    def committed(self, counted: Iterable[Counted]) -> None:
        """Their record is in the log: the counts stay."""
        for item in counted:
            self._pending.pop((item.limit, item.decision_id), None)

    def aborted(self, counted: Iterable[Counted]) -> None:
        """Their record never reached the log: take the counts back (only
        those still pending; a committed count stays)."""
        for item in counted:
            held = self._pending.pop((item.limit, item.decision_id), None)
            if held is None:
                continue
            state = self._limits.get(held.limit)
            if state is not None and state.ids.get(held.decision_id) == held.key:
                state.remove(held.key, held.time_nanos, held.decision_id)

    def size(self) -> tuple[int, int]:
        """``(keys, events)`` held in memory, over every limit."""
        keys = events = 0
        for state in self._limits.values():
            keys += len(state.keys)
            events += state.events
        return keys, events

    def held(self, names: Iterable[str]) -> list[Counted]:
        """Every count held in memory for the limits ``names`` (those
        active), pending ones included, in (limit, key, time) order: what
        the fleet publisher is seeded with after ``activate``. Events below
        a limit's floor are not held."""
        found = []
        for name in sorted(set(names)):
            state = self._limits.get(name)
            if state is None:
                continue
            for key, series in sorted(state.keys.items()):
                found.extend(
                    Counted(
                        name,
                        key,
                        time_nanos,
                        amount,
                        decision_id,
                        state.limit.definition,
                    )
                    for time_nanos, decision_id, amount in series.events[series.lo :]
                    if time_nanos >= state.floor
                )
        return found

    def pending(self) -> int:
        """How many counts await their record's commit."""
        return len(self._pending)

    def _load(self, limit: CompiledLimit, start_nanos: int) -> _LimitState:
        """Read ``limit``'s rows from ``start_nanos`` less the grace, and
        add its pending counts the rows do not hold yet."""
        floor = max(start_nanos - GRACE_NANOS, 0)
        state = _LimitState(limit, floor)
        name = limit.name
        skipped = 0
        if self._store is not None:
            # NOTE: the read runs on the loop, about 7 us a row (a second
            # for some 150,000 counted decisions in one limit's window), at
            # start and when a reload brings a new or longer window; a
            # window holding millions would want it read on a thread.
            rows = self._store.iter_state_from(
                LIMITS_DB, row_prefix(name, floor), name.encode() + b"\x00"
            )
            with contextlib.closing(rows):
                for raw_key, raw_value in rows:
                    try:
                        row = decode_row(raw_key, raw_value)
                    except ValueError as err:
                        skipped += 1
                        log.error(
                            "limits row not read",
                            extra={"fields": {"limit": name, "error": str(err)}},
                        )
                        continue
                    if row.definition != limit.definition:
                        # Counted under another definition of this name.
                        continue
                    if _amount_problem(row.amount) or row.decision_id in state.ids:
                        skipped += 1
                        continue
                    state.insert(row.key, row.time_nanos, row.decision_id, row.amount)
        for (limit_name, decision_id), item in self._pending.items():
            if (
                limit_name == name
                and item.definition == limit.definition
                and decision_id not in state.ids
                and item.time_nanos >= floor
            ):
                state.insert(item.key, item.time_nanos, decision_id, item.amount)
        self._limits[name] = state
        if skipped:
            state.damaged = (
                f"{skipped} of its rows in the audit log's limits database could "
                "not be counted (malformed, a bad amount, or a decision counted "
                "twice); run `kynara-sidecar verify` and restart"
            )
            log.error(
                "limit %r: %d rows of the log not counted (malformed, or a "
                "decision counted twice): run `kynara-sidecar verify`",
                name,
                skipped,
            )
        return state


_EMPTY = Tally(0, 0)
_EMPTY_SUM = Tally(0, 0.0)
