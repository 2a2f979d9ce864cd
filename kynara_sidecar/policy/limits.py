"""Limits that remember decisions: compiled from policy files, and the pure
arithmetic of their windows, keys and amounts.

A limit (``model.LimitDocument``) names what it counts, whose, over which
window, and its ceiling. This module compiles it into a ``CompiledLimit``
and answers, for one request at one instant, the three questions the
pipeline asks before the engine evaluates: where the window opens
(``window_start``), whose count it is (``key_of``) and what the request
adds (``amount_of``). Nothing here holds state or does I/O: the counted
decisions live in ``kynara_sidecar.limits`` and in the audit log.

Windows. A rolling window of duration ``d`` holding the instant ``now``
opened at ``now - d``; a calendar window opened at the first instant of
the local hour, day, week (from Monday) or month holding ``now`` in its
IANA time zone. A decision at time ``t`` is in the window iff
``t >= window_start``. A local day is the span of instants whose local
date is that day, so a day of a daylight-saving change lasts 23 or 25
hours, and where a zone moves its clocks forward at midnight the day
starts at the change (01:00 local), the first instant with that date.

Keys. A key's text is the canonical JSON array (compact, as msgspec
writes it) of its parts in declared order: principal ids and the resource
id as strings (NFC, as the directory compares ids), the resource kind as
it is (a dotted ASCII name: ``pipeline.validate_request`` refuses any
other), ``chain`` as an array of ids, and a context or attribute value
in the audit log's typed form (``{"int": "5"}``, ``{"string": "a"}``; see
``audit.record.encode_value``). That form is written here again, for
scalars only, because ``policy`` sits below ``audit`` and may not import
it; ``tests/policy/test_limit_keys.py`` checks the two agree.
"""

from __future__ import annotations

import base64
import datetime
import enum
import functools
import hashlib
import math
import re
import unicodedata
import zoneinfo
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from kynara_sidecar.decision import (
    NANOS_PER_SECOND,
    DecisionRequest,
    Duration,
    Effect,
    Timestamp,
)
from kynara_sidecar.errors import PolicyError
from kynara_sidecar.policy.model import LimitDocument, LimitScope, PolicyDocument
from kynara_sidecar.policy.names import is_valid_pattern, pattern_matches

__all__ = [
    "FIELD_TEXT",
    "MAX_KEY_LENGTH",
    "CalendarUnit",
    "CompiledLimit",
    "KeyPart",
    "LimitProblem",
    "Window",
    "amount_of",
    "compile_limits",
    "is_iana_zone",
    "key_of",
    "window_start",
]

# A key's canonical text is at most this many UTF-8 bytes; a longer one is
# a problem for that request (the limit has no value), never a truncation.
MAX_KEY_LENGTH = 1024


class CalendarUnit(enum.StrEnum):
    HOUR = "hour"
    DAY = "day"
    WEEK = "week"
    MONTH = "month"


class Window(msgspec.Struct, frozen=True):
    """A compiled window: ``rolling_nanos`` > 0 for a rolling one, else
    ``calendar`` in the IANA zone ``time_zone``."""

    rolling_nanos: int = 0
    calendar: CalendarUnit | None = None
    time_zone: str = "UTC"


class KeyPart(msgspec.Struct, frozen=True):
    """One part of a limit's key: ``source`` is ``user``, ``agent``,
    ``chain``, ``resource.id``, ``resource.kind``, ``context``,
    ``resource.attr``, ``user.attr`` or ``agent.attr``; ``field`` names the
    entry for the last four kinds (empty otherwise)."""

    source: str
    field: str = ""


class CompiledLimit(msgspec.Struct, frozen=True):
    """A limit ready to use. ``sum_source``/``sum_field`` are empty for a
    counting limit; ``ceiling`` is an int, or a float when the limit sums
    doubles. ``decisions`` are the final effects that count; with
    ``approved_only`` an allow counts only when an approval granted it
    (``decisions: [approved]``: a prior approval, say)."""

    name: str
    policy: str
    actions: tuple[str, ...]
    resources: tuple[str, ...]
    decisions: frozenset[Effect]
    key: tuple[KeyPart, ...]
    window: Window
    ceiling: int | float
    scope: str = "daemon"
    sum_source: str = ""
    sum_field: str = ""
    description: str = ""
    approved_only: bool = False
    # What the limit counts (actions, resources, decisions, its sum and
    # whether that adds ints or doubles, key), as 16 hex digits: decisions
    # counted under another definition of the same name are not this one's
    # (``audit.counters`` rows carry it).
    definition: str = ""

    @property
    def sums(self) -> bool:
        return bool(self.sum_source)

    def counts(self, kind: str, action: str) -> bool:
        """Whether a decision of ``action`` on ``kind`` is one this limit
        counts (its final effect aside)."""
        return any(pattern_matches(p, action) for p in self.actions) and any(
            pattern_matches(p, kind) for p in self.resources
        )

    def counts_decision(self, effect: Effect, approved: bool) -> bool:
        """Whether a decision with this final ``effect`` counts; ``approved``
        says an approval granted it (reason ``approval_granted``)."""
        if effect not in self.decisions:
            return False
        return approved or not (self.approved_only and effect is Effect.ALLOW)


class LimitProblem(msgspec.Struct, frozen=True):
    """Why a limit has no value for one request (a key part or the amount
    is missing or of the wrong type); conditions reading it then fail
    closed, and the record says why."""

    message: str


# --- compiling -----------------------------------------------------------------

# A limit name is a CEL identifier (conditions read ``limits.<name>``) that
# is not one of CEL's reserved words, which would not parse after the dot.
_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_CEL_RESERVED = frozenset(
    "as break const continue else false for function if import in let loop "
    "package namespace null return true var void while".split()
)
# Key sources that name the request's parts, and those that take a field.
_PLAIN_SOURCES = ("user", "agent", "chain", "resource.id", "resource.kind")
_FIELD_SOURCES = ("context", "resource.attr", "user.attr", "agent.attr")
_SUM_SOURCES = ("context", "resource.attr")
_MAX_FIELD = 128
# A field after ``context.`` and the like names one map key, dots included
# (no nesting). It may hold ASCII letters, digits and ``_ - . :`` only: no
# blank, control or CEL operator character, so ``resource.attr.amount * 2``
# or a trailing blank (which would name a key no request sends, and so fail
# every request) is refused at load.
_FIELD = re.compile(rf"[A-Za-z0-9_.:-]{{1,{_MAX_FIELD}}}")
FIELD_TEXT = (
    f"1..{_MAX_FIELD} ASCII letters, digits, '_', '-', '.' or ':' (no blank, "
    "control or operator character)"
)
_DURATION_UNITS = {
    "w": 7 * 86_400,
    "d": 86_400,
    "h": 3_600,
    "m": 60,
    "s": 1,
}
# Units largest first, each at most once: "1h30m", "7d", "1w2d".
_DURATION = re.compile(r"(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
_MIN_ROLLING = NANOS_PER_SECOND
_MAX_ROLLING = 366 * 86_400 * NANOS_PER_SECOND
_INT64_MAX = 2**63 - 1
_EFFECTS = {str(effect): effect for effect in Effect}
# In ``decisions``: an allow that an approval granted, and no other.
_APPROVED = "approved"


def compile_limits(
    documents: Any,
) -> Mapping[str, CompiledLimit]:
    """Compile every policy file's ``limits`` (``SourceDocument`` list):
    names unique across the set and CEL identifiers, patterns valid, key
    parts and sum known, windows and time zones valid, ceiling positive.

    Returns:
        Limit name -> compiled limit, in name order.

    Raises:
        PolicyError: naming the file, ``$.limits.<name>.<field>`` and what
            was expected.
    """
    compiled: dict[str, CompiledLimit] = {}
    declared_in: dict[str, str] = {}
    for source in sorted(documents, key=lambda item: item.name):
        document = source.document
        if not isinstance(document, PolicyDocument):
            continue
        for name, limit in document.limits.items():
            where = f"$.limits.{name}"
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise PolicyError(
                    "expected a limit name of [a-z_][a-z0-9_]{0,62} (a CEL "
                    f"identifier), got {name!r}",
                    path=source.path,
                    location=where,
                )
            if name in _CEL_RESERVED:
                raise PolicyError(
                    "expected a limit name that is not a CEL reserved word, got "
                    f"{name!r}",
                    path=source.path,
                    location=where,
                )
            if name in declared_in:
                raise PolicyError(
                    f"expected limit names unique across the set, got {name!r}, "
                    f"also declared in {declared_in[name]}",
                    path=source.path,
                    location=where,
                )
            declared_in[name] = source.path
            compiled[name] = _compile_limit(
                name, limit, document.name, source.path, where
            )
    return {name: compiled[name] for name in sorted(compiled)}


def _compile_limit(
    name: str, limit: LimitDocument, policy: str, path: str, where: str
) -> CompiledLimit:
    def refuse(field: str, message: str) -> PolicyError:
        return PolicyError(
            f"limit {name!r} {message}", path=path, location=f"{where}.{field}"
        )

    for field, what, patterns in (
        ("actions", "an action", limit.actions),
        ("resources", "a resource kind", limit.resources),
    ):
        for position, pattern in enumerate(patterns):
            if not is_valid_pattern(pattern):
                raise refuse(
                    f"{field}[{position}]",
                    f"{field}: expected {what} name, 'name.*' or '*', got {pattern!r}",
                )
    decisions = set()
    for position, decision in enumerate(limit.decisions):
        if decision not in _EFFECTS and decision != _APPROVED:
            raise refuse(
                f"decisions[{position}]",
                "decisions: expected 'allow', 'approved' (an allow an approval "
                f"granted), 'deny' or 'require_approval', got {decision!r}",
            )
        decisions.add(_EFFECTS.get(decision, Effect.ALLOW))
    approved_only = _APPROVED in limit.decisions and "allow" not in limit.decisions
    key = []
    for position, text in enumerate(limit.key):
        part = _key_part(text)
        if part is None:
            raise refuse(
                f"key[{position}]",
                "key: expected user, agent, chain, resource.id, resource.kind, "
                "context.<field>, resource.attr.<field>, user.attr.<field> or "
                f"agent.attr.<field>, a field being {FIELD_TEXT}, got {text!r}",
            )
        if part in key:
            raise refuse(
                f"key[{position}]", f"key: expected each part once, got {text!r} again"
            )
        key.append(part)
    sum_source = sum_field = ""
    if limit.sum:
        part = _key_part(limit.sum)
        if part is None or part.source not in _SUM_SOURCES:
            raise refuse(
                "sum",
                "sum: expected context.<field> or resource.attr.<field>, a "
                f"field being {FIELD_TEXT}, got {limit.sum!r}",
            )
        sum_source, sum_field = part.source, part.field
    window = _window(limit, refuse)
    ceiling = limit.ceiling
    if isinstance(ceiling, bool) or not isinstance(ceiling, int | float):
        raise refuse("ceiling", f"ceiling: expected a number, got {ceiling!r}")
    if isinstance(ceiling, float) and not sum_source:
        raise refuse(
            "ceiling",
            "ceiling: expected an int for a limit that counts decisions, "
            f"got {ceiling!r}",
        )
    if not (math.isfinite(ceiling) and 0 < ceiling <= _INT64_MAX):
        raise refuse(
            "ceiling",
            "ceiling: expected a finite number above 0 and at most 2**63-1, "
            f"got {ceiling!r}",
        )
    defined = _ENCODER.encode(
        {
            "actions": sorted(set(limit.actions)),
            "resources": sorted(set(limit.resources)),
            "decisions": sorted(str(d) for d in decisions),
            "approved_only": approved_only,
            "sum": [sum_source, sum_field],
            # What a sum adds up: ints (an int ceiling) or doubles.
            "sums": "" if not sum_source else type(ceiling).__name__,
            "key": [[part.source, part.field] for part in key],
        }
    )
    return CompiledLimit(
        name=name,
        policy=policy,
        actions=tuple(limit.actions),
        resources=tuple(limit.resources),
        decisions=frozenset(decisions),
        key=tuple(key),
        window=window,
        ceiling=ceiling,
        scope=LimitScope(limit.scope).value,
        sum_source=sum_source,
        sum_field=sum_field,
        description=limit.description,
        approved_only=approved_only,
        definition=hashlib.sha256(defined).hexdigest()[:16],
    )


def _key_part(text: str) -> KeyPart | None:
    if text in _PLAIN_SOURCES:
        return KeyPart(text)
    for source in _FIELD_SOURCES:
        prefix = source + "."
        if text.startswith(prefix):
            field = text[len(prefix) :]
            # The field is one map key, dots included: no nesting.
            if _FIELD.fullmatch(field):
                return KeyPart(source, field)
            return None
    return None


def _window(limit: LimitDocument, refuse: Any) -> Window:
    window = limit.window
    if bool(window.rolling) == bool(window.calendar):
        raise refuse(
            "window",
            "window: expected exactly one of rolling (such as '24h') or "
            "calendar (hour, day, week or month)",
        )
    if window.rolling:
        if window.time_zone != "UTC":
            raise refuse(
                "window.time_zone",
                "window.time_zone: expected a time zone only with a calendar "
                f"window, got {window.time_zone!r} with rolling",
            )
        nanos = _parse_duration(window.rolling)
        if nanos is None or not _MIN_ROLLING <= nanos <= _MAX_ROLLING:
            raise refuse(
                "window.rolling",
                "window.rolling: expected a duration of 1s..366d in units w d h "
                f"m s, largest first (such as '24h', '1h30m'), got {window.rolling!r}",
            )
        return Window(rolling_nanos=nanos)
    if window.calendar not in tuple(CalendarUnit):
        raise refuse(
            "window.calendar",
            "window.calendar: expected 'hour', 'day', 'week' or 'month', got "
            f"{window.calendar!r}",
        )
    if not is_iana_zone(window.time_zone):
        raise refuse(
            "window.time_zone",
            "window.time_zone: expected an IANA time zone of the database "
            "such as 'Europe/Berlin' (default 'UTC'), not 'localtime', "
            "'posixrules' or 'Factory', which follow the host's clock or mean "
            f"none, got {window.time_zone!r}",
        )
    return Window(calendar=CalendarUnit(window.calendar), time_zone=window.time_zone)


# Names the zone directory holds that are no zone of the IANA database: the
# host's own local time (``localtime`` links to /etc/localtime, and
# ``posixrules`` may follow it), so two hosts could open different days
# under one name; and ``Factory``, a zone meaning "local time not set".
_NOT_ZONES = frozenset({"localtime", "posixrules", "Factory"})


def is_iana_zone(name: str) -> bool:
    """Whether ``name`` is a zone (or link) of the IANA time zone database
    as installed (``zoneinfo.available_timezones``, which leaves out the
    ``posix/`` and ``right/`` copies), other than ``localtime``,
    ``posixrules`` and ``Factory``, and loads."""
    if name in _NOT_ZONES or name not in _available_zones():
        return False
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        return False
    return True


@functools.cache
def _available_zones() -> frozenset[str]:
    # Read once per process: listing the zone directory opens every file
    # in it (about 600), some tens of milliseconds.
    return frozenset(zoneinfo.available_timezones())


def _parse_duration(text: str) -> int | None:
    match = _DURATION.fullmatch(text)
    if not text or match is None:
        return None
    seconds = sum(
        int(count) * size
        for count, size in zip(match.groups(), _DURATION_UNITS.values(), strict=True)
        if count is not None
    )
    return seconds * NANOS_PER_SECOND


# --- windows -------------------------------------------------------------------


def window_start(window: Window, now_nanos: int) -> int:
    """The instant (ns since the epoch) the window holding ``now_nanos``
    opened, inclusive (a decision at ``t`` is in it iff ``t >= start``):
    ``now - rolling``, or the first instant of the calendar period in the
    zone (local midnight for a day, DST-safe: a 23- or 25-hour day is one
    day; where midnight does not exist, the first instant of that date)."""
    if window.rolling_nanos:
        return now_nanos - window.rolling_nanos
    zone = zoneinfo.ZoneInfo(window.time_zone)
    seconds = now_nanos // NANOS_PER_SECOND
    local = datetime.datetime.fromtimestamp(seconds, zone)
    naive = local.replace(tzinfo=None)
    fold = 0
    if window.calendar is CalendarUnit.HOUR:
        # In a repeated hour (clocks going back) the later one is its own.
        period = naive.replace(minute=0, second=0, microsecond=0)
        fold = local.fold
    else:
        day = naive.date()
        if window.calendar is CalendarUnit.WEEK:
            day -= datetime.timedelta(days=day.weekday())
        elif window.calendar is CalendarUnit.MONTH:
            day = day.replace(day=1)
        period = datetime.datetime.combine(day, datetime.time())
    start = _first_instant(period, fold, zone)
    return min(start, seconds) * NANOS_PER_SECOND


def _first_instant(period: datetime.datetime, fold: int, zone: Any) -> int:
    """The first second whose local wall time in ``zone`` is at or after
    ``period`` (naive local), preferring ``fold`` where it occurs twice."""
    chosen = _epoch_seconds(period.replace(tzinfo=zone, fold=fold))
    if _local(chosen, zone) == period:
        return chosen
    # ``period`` falls in a gap (clocks went forward over it), or is a
    # midnight clocks went back past: the answer lies between the two
    # readings of it, where local time rises through ``period``.
    other = _epoch_seconds(period.replace(tzinfo=zone, fold=1 - fold))
    low, high = min(chosen, other), max(chosen, other)
    if _local(low, zone) >= period:
        return low
    while high - low > 1:
        middle = (low + high) // 2
        if _local(middle, zone) >= period:
            high = middle
        else:
            low = middle
    return high


def _epoch_seconds(moment: datetime.datetime) -> int:
    delta = moment - _EPOCH
    return delta.days * 86_400 + delta.seconds


def _local(seconds: int, zone: Any) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, zone).replace(tzinfo=None)


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


# --- keys and amounts ----------------------------------------------------------

_ENCODER = msgspec.json.Encoder()


def key_of(
    limit: CompiledLimit,
    request: DecisionRequest,
    attributes: Mapping[str, Mapping[str, Any]],
) -> str | LimitProblem:
    """The key's canonical text: a JSON array of the parts' values in order
    (ids as strings in NFC, the resource kind, an ASCII name, as it is;
    context and attribute values as ``_scalar``
    gives them: equal numbers alike whatever their type, text in NFC,
    scalars only). ``attributes`` holds the directory attributes of
    ``"user"`` and ``"agent"`` (as compiled, not CEL values)."""
    parts: list[Any] = []
    chain = request.chain
    for part in limit.key:
        source = part.source
        if source == "user" or source == "agent":
            if not chain:
                return LimitProblem(f"key part {source}: the chain is empty")
            parts.append(_nfc(chain[0] if source == "user" else chain[-1]))
        elif source == "chain":
            if not chain:
                return LimitProblem("key part chain: the chain is empty")
            parts.append([_nfc(item) for item in chain])
        elif source == "resource.kind":
            parts.append(request.resource.kind)
        elif source == "resource.id":
            if not request.resource.id:
                return LimitProblem(
                    "key part resource.id: the request names no resource id"
                )
            parts.append(_nfc(request.resource.id))
        else:
            if source == "context":
                values: Mapping[str, Any] = request.context
            elif source == "resource.attr":
                values = request.resource.attributes
            else:
                values = attributes.get(source.partition(".")[0]) or {}
            name = f"{source}.{part.field}"
            if part.field not in values:
                return LimitProblem(f"key part {name}: the request has no such value")
            encoded = _scalar(values[part.field])
            if encoded is None:
                return LimitProblem(
                    f"key part {name}: expected a scalar value, got "
                    f"{_type_name(values[part.field])}"
                )
            parts.append(encoded)
    text = _ENCODER.encode(parts).decode()
    if len(text.encode()) > MAX_KEY_LENGTH:
        return LimitProblem(
            f"key: expected at most {MAX_KEY_LENGTH} bytes of key text, got "
            f"{len(text.encode())}"
        )
    return text


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def _scalar(value: Any) -> dict[str, Any] | None:
    """A scalar as a key part, in ``audit.record.encode_value`` form but for
    what must not split one key into several: every number is one
    ``number`` form (an int, uint or double that are equal, as CEL finds
    ``7 == 7u == 7.0``, give the same text; ``-0.0`` is ``0``), and text is
    in Unicode NFC, as names compare. None for a value that is no scalar or
    no number (NaN, an infinity)."""
    if isinstance(value, bool):
        return {"bool": value}
    if isinstance(value, int):
        return {"number": str(int(value))}
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        if value.is_integer():
            return {"number": str(int(value))}
        return {"number": repr(value)}
    if isinstance(value, str):
        return {"string": _nfc(value)}
    if isinstance(value, bytes):
        return {"bytes": base64.b64encode(value).decode("ascii")}
    if isinstance(value, Timestamp):
        text = _timestamp_text(value)
        return None if text is None else {"timestamp": text}
    if isinstance(value, Duration):
        return _duration_form(value)
    return None


def _fraction(nanos: int) -> str:
    return "." + f"{nanos:09d}".rstrip("0") if nanos else ""


def _timestamp_text(value: Timestamp) -> str | None:
    if not 0 <= value.nanos < NANOS_PER_SECOND:
        return None
    try:
        moment = _EPOCH + datetime.timedelta(seconds=value.seconds)
    except OverflowError:
        return None
    if moment.year > 9999:
        return None
    return (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T"
        f"{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}"
        f"{_fraction(value.nanos)}Z"
    )


def _duration_form(value: Duration) -> dict[str, Any] | None:
    seconds, nanos = value.seconds, value.nanos
    if not -NANOS_PER_SECOND < nanos < NANOS_PER_SECOND or seconds * nanos < 0:
        return None
    sign = "-" if seconds < 0 or nanos < 0 else ""
    return {"duration": f"{sign}{abs(seconds)}{_fraction(abs(nanos))}s"}


def _type_name(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a map"
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return "a list"
    return type(value).__name__


def amount_of(
    limit: CompiledLimit, request: DecisionRequest
) -> int | float | LimitProblem:
    """What a counted request adds: 1 for a counting limit; for a summing
    one its value, an int (or a ``UInt64`` within int64) for an int ceiling,
    an int or float for a float ceiling (as a float); never negative, NaN or
    infinite."""
    if not limit.sum_source:
        return 1
    values = (
        request.context
        if limit.sum_source == "context"
        else request.resource.attributes
    )
    name = f"{limit.sum_source}.{limit.sum_field}"
    if limit.sum_field not in values:
        return LimitProblem(f"sum {name}: the request has no such value")
    value = values[limit.sum_field]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return LimitProblem(f"sum {name}: expected a number, got {_type_name(value)}")
    if isinstance(limit.ceiling, float):
        amount = float(value)
        if not math.isfinite(amount):
            return LimitProblem(f"sum {name}: expected a finite number, got {value!r}")
        if amount < 0:
            return LimitProblem(
                f"sum {name}: expected a number at least 0, got {value!r}"
            )
        return amount + 0.0  # -0.0 counts as 0.0
    if isinstance(value, float):
        return LimitProblem(
            f"sum {name}: expected an int (the ceiling is an int), got double {value!r}"
        )
    amount = int(value)
    if amount < 0:
        return LimitProblem(f"sum {name}: expected an int at least 0, got {amount}")
    if amount > _INT64_MAX:
        return LimitProblem(
            f"sum {name}: expected an int of at most 2**63-1, got {amount}"
        )
    return amount
