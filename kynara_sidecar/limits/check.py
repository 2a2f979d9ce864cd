"""One request's limits: the values its conditions read, and what it counts.

The pipeline calls ``look`` before the engine evaluates and ``count`` once
the final effect is known (an approval may have turned require_approval
into allow, or into deny). Both run on the event loop with nothing awaited
between them and the book's ``add``, so no other request can slip between
a limit's check and its count.

A limit the request cannot form a value for (a key part or the amount
missing or of the wrong type, a fleet limit whose central store is out of
touch) is left out of the ``limits`` variable: a condition reading it
errors, which fails closed, and the record's entry says why.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import Any, NamedTuple

import msgspec

from kynara_sidecar.audit.record import (
    LimitEntry,
    decode_value,
    encode_value,
    format_timestamp,
    parse_timestamp,
)
from kynara_sidecar.audit.redact import Redactor
from kynara_sidecar.decision import NANOS_PER_SECOND, DecisionRequest, Effect, Timestamp
from kynara_sidecar.limits.book import Counted, LimitBook, LimitDamaged, Tally
from kynara_sidecar.policy.compiler import Directory
from kynara_sidecar.policy.conditions import to_cel_value
from kynara_sidecar.policy.limits import (
    CompiledLimit,
    LimitProblem,
    Window,
    amount_of,
    key_of,
    window_start,
)
from kynara_sidecar.policy.model import LimitScope

__all__ = [
    "NOTHING",
    "Looked",
    "RemoteTally",
    "applies",
    "count",
    "key_attributes",
    "limit_entry",
    "look",
    "recorded_values",
]

# remote(limit, key, start_nanos): the other daemons' part of a fleet
# limit, or None when the central store has been out of touch too long.
RemoteTally = Callable[[CompiledLimit, str, int], "Tally | None"]

_SECTIONS = {"context": "context", "resource.attr": "resource_attributes"}
_NO_STORE = "a fleet limit needs a central store (sync.store, or a store policy.source)"
_OUT_OF_TOUCH = (
    "a fleet limit needs the central store, which has not answered within "
    "limits.fleet_max_staleness_seconds"
)


class _Formed(NamedTuple):
    limit: CompiledLimit
    key: str
    # What this request adds when counted; None when the limit does not
    # count its action.
    amount: int | float | None


class Looked(NamedTuple):
    """A request's limits before it is decided."""

    # For the engine: the CEL values of the limits conditions may read.
    values: dict[str, Any]
    # For the record: every limit read or counted, as it was.
    entries: dict[str, LimitEntry]
    # The counting limits the request formed a value for.
    formed: tuple[_Formed, ...]
    # The names of the limits some candidate rule's condition reads (the
    # others in ``entries`` are only counted).
    read: frozenset[str]


NOTHING = Looked({}, {}, (), frozenset())


def look(
    read: Sequence[CompiledLimit],
    counted: Sequence[CompiledLimit],
    request: DecisionRequest,
    attributes: Mapping[str, Mapping[str, Any]],
    now_nanos: int,
    book: LimitBook,
    *,
    redactor: Redactor | None = None,
    remote: RemoteTally | None = None,
) -> Looked:
    """The limits ``read`` (by some candidate rule's condition) and
    ``counted`` (of this request's action) as the request finds them.

    Args:
        attributes: the directory attributes of ``"user"`` and ``"agent"``.
        remote: the fleet's part of fleet limits; without it a fleet limit
            has no value (it fails closed) rather than a local one.
    """
    if not read and not counted:
        return NOTHING
    counting = {limit.name for limit in counted}
    values: dict[str, Any] = {}
    entries: dict[str, LimitEntry] = {}
    formed: list[_Formed] = []
    for limit in _union(read, counted):
        start, opened, opened_cel = _opening(limit.window, now_nanos)
        key = _key(limit, request, attributes, redactor)
        amount: int | float | LimitProblem | None = None
        if limit.name in counting:
            amount = _amount(limit, request, redactor)
        problem = next((p for p in (key, amount) if isinstance(p, LimitProblem)), None)
        if problem is None and limit.name in counting:
            # Formed: the decision is counted if its effect counts, even
            # when the limit has no value now (its store out of touch, its
            # rows damaged), so no decision goes uncounted meanwhile.
            formed.append(_Formed(limit, key, amount))  # type: ignore[arg-type]
        mine: Tally | None = None
        theirs: Tally | None = _NONE_SEEN
        if problem is None:
            assert isinstance(key, str)
            if limit.scope == LimitScope.FLEET:
                theirs = None if remote is None else remote(limit, key, start)
                if theirs is None:
                    problem = LimitProblem(_OUT_OF_TOUCH if remote else _NO_STORE)
            try:
                mine = book.tally(limit, key, start)
            except LimitDamaged as err:
                problem = problem or LimitProblem(str(err))
        if problem is not None or mine is None or theirs is None:
            entries[limit.name] = limit_entry(
                limit,
                opened,
                key if isinstance(key, str) else "",
                error=problem.message if problem else "",
            )
            continue
        fleet = limit.scope == LimitScope.FLEET
        entries[limit.name] = limit_entry(
            limit,
            opened,
            key,  # type: ignore[arg-type]
            count=mine.count,
            sum=encode_value(mine.sum) if limit.sums else None,
            remote_count=theirs.count,
            remote_sum=encode_value(theirs.sum) if limit.sums and fleet else None,
        )
        values[limit.name] = _cel_value(
            limit, mine, theirs, opened_cel, amount if limit.name in counting else None
        )
    return Looked(
        values, entries, tuple(formed), frozenset(limit.name for limit in read)
    )


def key_attributes(
    directory: Directory, chain: Sequence[str]
) -> dict[str, Mapping[str, Any]]:
    """The directory attributes a limit's key parts read: ``"user"`` (the
    chain's first principal) and ``"agent"`` (its last); a principal the
    directory does not hold has none."""
    attributes: dict[str, Mapping[str, Any]] = {}
    for role, principal_id in (("user", chain[0]), ("agent", chain[-1])):
        principal = directory.lookup(principal_id)
        attributes[role] = principal.attributes if principal is not None else {}
    return attributes


def limit_entry(
    limit: CompiledLimit, window_start: str, key: str, **values: Any
) -> LimitEntry:
    """A record's entry for ``limit`` in the window opening at
    ``window_start`` (its record text) for ``key`` ("" when the request
    formed none): the limit's definition, scope and ceiling, and ``values``
    (``count``, ``sum``, ``error`` and the rest of ``LimitEntry``)."""
    return LimitEntry(
        key=key,
        definition=limit.definition,
        scope=limit.scope,
        window_start=window_start,
        ceiling=_ceiling(limit.ceiling),
        **values,
    )


def count(
    looked: Looked,
    effect: Effect,
    decision_id: str,
    now_nanos: int,
    book: LimitBook,
    *,
    approved: bool = False,
) -> tuple[dict[str, LimitEntry], tuple[Counted, ...]]:
    """Count the decided request in every limit whose decisions include its
    final ``effect`` (``approved``: an approval granted it), in the book at
    once.

    Returns:
        The record's limit entries (those counted marked so) and what was
        counted, for ``LimitBook.committed`` or ``aborted``.
    """
    if not looked.formed:
        return looked.entries, ()
    entries = dict(looked.entries)
    counted = []
    for limit, key, amount in looked.formed:
        if amount is None or not limit.counts_decision(effect, approved):
            continue
        counted.append(
            Counted(limit.name, key, now_nanos, amount, decision_id, limit.definition)
        )
        entries[limit.name] = _with(
            entries[limit.name], counted=True, amount=encode_value(amount)
        )
    if counted:
        book.add(counted)
    return entries, tuple(counted)


def recorded_values(
    entries: Mapping[str, LimitEntry],
    limits: Mapping[str, CompiledLimit],
    request: DecisionRequest,
    now_nanos: int | None = None,
) -> dict[str, Any]:
    """The CEL ``limits`` values a recorded decision saw, for deciding it
    again (replay, the playground) under ``limits``, a policy set's.

    Counts and sums are the record's (``count + remote_count``, the sum
    likewise), never the book's live ones: a replay decides on what the
    decision saw. The ceiling is the given set's, and ``remaining`` and
    ``exceeded`` are worked out again with it (``exceeded`` adds the
    request's own contribution when the given limit counts its action).

    Returns:
        Limit name -> CEL value. A limit is absent (a condition reading it
        fails closed, as it did live) when the record has no entry for it,
        its entry has an ``error`` or does not ``apply`` to the given limit
        (counted otherwise, another scope or window), the given limit sums
        and the entry holds no sum (or a double sum for an int ceiling), the
        given set declares no such limit, or the request cannot form its
        amount.
    """
    values: dict[str, Any] = {}
    for name, entry in entries.items():
        limit = limits.get(name)
        if limit is None or entry.error or not entry.window_start:
            continue
        if not applies(entry, limit, now_nanos):
            continue
        try:
            start = parse_timestamp(entry.window_start).to_nanos()
            mine = Tally(entry.count, _recorded_sum(limit, entry.sum))
            theirs = Tally(entry.remote_count, _recorded_sum(limit, entry.remote_sum))
        except ValueError:
            continue
        if limit.sums and entry.sum is None:
            continue
        amount: int | float | LimitProblem | None = None
        if limit.counts(request.resource.kind, request.action):
            amount = amount_of(limit, request)
            if isinstance(amount, LimitProblem):
                continue
        opened = to_cel_value(Timestamp.from_nanos(start))
        values[name] = _cel_value(limit, mine, theirs, opened, amount)
    return values


def _recorded_sum(limit: CompiledLimit, recorded: dict[str, Any] | None) -> int | float:
    """A recorded sum as ``limit`` would hold it (0 when none was kept).

    Raises:
        ValueError: not a number, or a double where the ceiling is an int.
    """
    if recorded is None or not limit.sums:
        return 0
    value = decode_value(recorded)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a recorded sum as a number, got {value!r}")
    if isinstance(limit.ceiling, float):
        return float(value)
    if isinstance(value, float):
        raise ValueError(f"expected an int sum for an int ceiling, got {value!r}")
    return int(value)


def _union(
    read: Sequence[CompiledLimit], counted: Sequence[CompiledLimit]
) -> list[CompiledLimit]:
    if not counted:
        return list(read)
    if not read:
        return list(counted)
    by_name = {limit.name: limit for limit in (*read, *counted)}
    return [by_name[name] for name in sorted(by_name)]


def applies(
    entry: LimitEntry, limit: CompiledLimit, now_nanos: int | None = None
) -> bool:
    """Whether what a record saw of a limit is a value of ``limit`` as a
    policy set defines it now: it counts the same (``definition``), in the same
    scope, and (given the record's instant) its window opened where the
    recorded one did. A changed key, sum, window or scope makes the recorded
    count another limit's."""
    if entry.definition != limit.definition:
        return False
    if entry.scope != limit.scope:
        return False
    if now_nanos is not None and entry.window_start:
        opened = format_timestamp(
            Timestamp.from_nanos(window_start(limit.window, now_nanos))
        )
        return opened == entry.window_start
    return True


def _amount(
    limit: CompiledLimit, request: DecisionRequest, redactor: Redactor | None
) -> int | float | LimitProblem:
    """What the request adds to ``limit``; a problem when the limit sums a
    value that audit.redact keeps out of records: the amount would reach
    the record, the log's rows and the central store in the clear."""
    if limit.sums and redactor and limit.sum_source in _SECTIONS:
        if redactor.covers(_SECTIONS[limit.sum_source], limit.sum_field):
            return LimitProblem(
                f"sums {limit.sum_source}.{limit.sum_field}, which audit.redact "
                "keeps out of records; a limit's amounts are kept in them"
            )
    return amount_of(limit, request)


def _key(
    limit: CompiledLimit,
    request: DecisionRequest,
    attributes: Mapping[str, Mapping[str, Any]],
    redactor: Redactor | None,
) -> str | LimitProblem:
    key = key_of(limit, request, attributes)
    if isinstance(key, LimitProblem) or not redactor:
        return key
    redacted = [
        f"{part.source}.{part.field}"
        for part in limit.key
        if part.source in _SECTIONS
        and redactor.covers(_SECTIONS[part.source], part.field)
    ]
    if not redacted:
        return key
    # The key reaches the record and the log's rows: a redacted part stays
    # out of both, as it stays out of the record's context.
    sealed = redactor.seal_digest(key)
    if not sealed:
        return LimitProblem(
            f"key part {redacted[0]} is dropped from records by audit.redact, and "
            "with no audit.redaction_key to hash it the limit cannot be kept"
        )
    return sealed


def _cel_value(
    limit: CompiledLimit,
    mine: Tally,
    theirs: Tally,
    opened: Any,
    amount: int | float | None,
) -> dict[str, Any]:
    count = mine.count + theirs.count
    value: dict[str, Any] = {
        "count": count,
        "ceiling": limit.ceiling,
        "window_start": opened,
    }
    if limit.sums:
        held = mine.sum + theirs.sum
        value["sum"] = _int64(held)
    else:
        held = count
    value["remaining"] = _int64(limit.ceiling - held)
    value["exceeded"] = _over(held, amount or 0, limit.ceiling)
    return value


def _int64(value: int | float) -> int | float:
    """An int as CEL holds it: a sum past int64 (the log keeps it exact)
    reads as the nearest int64, so a condition compares it rather than
    failing on it, and no other limit's value is spoilt with it."""
    if isinstance(value, int):
        return min(max(value, _INT64_MIN), _INT64_MAX)
    return value


def _over(held: int | float, amount: int | float, ceiling: int | float) -> bool:
    """Whether ``held + amount`` is over ``ceiling``, with no rounding of
    that addition (a double sum at the ceiling is exceeded by the smallest
    amount); ``held`` itself is the book's correctly rounded sum."""
    if isinstance(held, int) and isinstance(amount, int):
        return held + amount > ceiling
    if not all(math.isfinite(v) for v in (held, amount)):
        return held + amount > ceiling
    return Fraction(held) + Fraction(amount) > Fraction(ceiling)


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_NONE_SEEN = Tally(0, 0)
# Window -> (second, start, its text, its CEL value) of the last request:
# a calendar period starts on a whole second, so every instant of one
# second is in the same period; a rolling window moves with the clock.
_openings: dict[Any, tuple[int, int, str, Any]] = {}
_ceilings: dict[Any, dict[str, Any]] = {}
# Bounds both tables: a policy set declares few windows and ceilings.
_MEMO_ENTRIES = 1024


def _opening(window: Window, now_nanos: int) -> tuple[int, str, Any]:
    """Where the window holding ``now_nanos`` opened: the instant, its
    record text and its CEL timestamp, worked out once a second for a
    calendar window."""
    second = now_nanos // NANOS_PER_SECOND
    if not window.rolling_nanos:
        found = _openings.get(window)
        if found is not None and found[0] == second:
            return found[1:]
    start = window_start(window, now_nanos)
    stamp = Timestamp.from_nanos(start)
    opening = (start, format_timestamp(stamp), to_cel_value(stamp))
    if not window.rolling_nanos:
        if len(_openings) >= _MEMO_ENTRIES:
            _openings.clear()
        _openings[window] = (second, *opening)
    return opening


def _ceiling(ceiling: int | float) -> dict[str, Any]:
    """The ceiling's record form, encoded once per ceiling; each entry gets
    its own copy, so no entry's change reaches another's."""
    found = _ceilings.get((type(ceiling), ceiling))
    if found is None:
        if len(_ceilings) >= _MEMO_ENTRIES:
            _ceilings.clear()
        found = _ceilings[(type(ceiling), ceiling)] = encode_value(ceiling)
    return dict(found)


def _with(entry: LimitEntry, **changes: Any) -> LimitEntry:
    return msgspec.structs.replace(entry, **changes)
