"""Where a limit's window opens: rolling, and calendar periods in UTC and
in zones with daylight-saving changes, a change at midnight and a
half-hour offset. Every start is inclusive: a decision at ``t`` is in the
window iff ``t >= start``."""

from __future__ import annotations

import datetime
import zoneinfo

import pytest

from kynara_sidecar.policy.limits import CalendarUnit, Window, window_start

NS = 10**9
UTC = datetime.UTC


def at(text: str) -> int:
    """ns since the epoch of an ISO instant with its offset."""
    moment = datetime.datetime.fromisoformat(text)
    return int(moment.timestamp()) * NS


def calendar(unit: str, zone: str = "UTC") -> Window:
    return Window(calendar=CalendarUnit(unit), time_zone=zone)


def test_a_rolling_window_opens_its_duration_before_now():
    window = Window(rolling_nanos=24 * 3_600 * NS)
    now = at("2026-06-01T12:00:00.5+00:00") + 123
    assert window_start(window, now) == now - 24 * 3_600 * NS


@pytest.mark.parametrize(
    ("unit", "now", "start"),
    [
        ("hour", "2026-06-03T14:59:59+00:00", "2026-06-03T14:00:00+00:00"),
        ("hour", "2026-06-03T14:00:00+00:00", "2026-06-03T14:00:00+00:00"),
        ("day", "2026-06-03T23:59:59+00:00", "2026-06-03T00:00:00+00:00"),
        ("day", "2026-06-04T00:00:00+00:00", "2026-06-04T00:00:00+00:00"),
        # 2026-06-07 is a Sunday; weeks start on Monday.
        ("week", "2026-06-07T23:00:00+00:00", "2026-06-01T00:00:00+00:00"),
        ("week", "2026-06-08T00:00:00+00:00", "2026-06-08T00:00:00+00:00"),
        ("month", "2026-02-28T23:59:59+00:00", "2026-02-01T00:00:00+00:00"),
        ("month", "2026-12-31T12:00:00+00:00", "2026-12-01T00:00:00+00:00"),
    ],
)
def test_calendar_periods_in_utc(unit, now, start):
    assert window_start(calendar(unit), at(now)) == at(start)


def test_a_fraction_of_a_second_stays_in_its_period():
    start = at("2026-06-03T00:00:00+00:00")
    assert window_start(calendar("day"), start + NS - 1) == start


@pytest.mark.parametrize(
    ("now", "start", "hours"),
    [
        # 2026-03-29: clocks go 02:00 -> 03:00, a 23-hour day.
        ("2026-03-29T01:30:00+01:00", "2026-03-29T00:00:00+01:00", 23),
        ("2026-03-29T03:30:00+02:00", "2026-03-29T00:00:00+01:00", 23),
        ("2026-03-29T23:59:59+02:00", "2026-03-29T00:00:00+01:00", 23),
        ("2026-03-30T00:00:00+02:00", "2026-03-30T00:00:00+02:00", 24),
        # 2026-10-25: clocks go 03:00 -> 02:00, a 25-hour day.
        ("2026-10-25T02:30:00+02:00", "2026-10-25T00:00:00+02:00", 25),
        ("2026-10-25T02:30:00+01:00", "2026-10-25T00:00:00+02:00", 25),
        ("2026-10-25T23:59:59+01:00", "2026-10-25T00:00:00+02:00", 25),
        ("2026-10-26T00:00:00+01:00", "2026-10-26T00:00:00+01:00", 24),
    ],
)
def test_a_berlin_day_across_both_2026_changes(now, start, hours):
    window = calendar("day", "Europe/Berlin")
    opened = window_start(window, at(now))
    assert opened == at(start)
    # The day lasts until the next one opens: 23, 24 or 25 hours.
    next_day = window_start(window, opened + (hours * 3_600 - 1) * NS)
    assert next_day == opened
    assert (
        window_start(window, opened + hours * 3_600 * NS) == opened + hours * 3_600 * NS
    )


def test_a_berlin_hour_repeated_by_the_autumn_change_is_two_hours():
    window = calendar("hour", "Europe/Berlin")
    first = at("2026-10-25T02:00:00+02:00")
    second = at("2026-10-25T02:00:00+01:00")
    assert window_start(window, first + 1_800 * NS) == first
    assert window_start(window, second + 1_800 * NS) == second
    assert second - first == 3_600 * NS


@pytest.mark.parametrize(
    ("unit", "now", "start"),
    [
        ("week", "2026-03-29T12:00:00+02:00", "2026-03-23T00:00:00+01:00"),
        ("week", "2026-10-28T12:00:00+01:00", "2026-10-26T00:00:00+01:00"),
        ("month", "2026-04-01T00:00:00+02:00", "2026-04-01T00:00:00+02:00"),
        ("month", "2026-03-31T23:59:59+02:00", "2026-03-01T00:00:00+01:00"),
        ("month", "2026-11-15T12:00:00+01:00", "2026-11-01T00:00:00+01:00"),
    ],
)
def test_berlin_weeks_and_months_start_at_local_midnight(unit, now, start):
    assert window_start(calendar(unit, "Europe/Berlin"), at(now)) == at(start)


def test_a_day_whose_midnight_does_not_exist_starts_at_the_change():
    # America/Santiago moves 2026-09-06 00:00 -04 to 01:00 -03: the day's
    # first instant is 04:00 UTC, the first whose local date is the 6th.
    zone = zoneinfo.ZoneInfo("America/Santiago")
    window = calendar("day", "America/Santiago")
    start = window_start(window, at("2026-09-06T12:00:00-03:00"))
    assert start == at("2026-09-06T04:00:00+00:00")
    first = datetime.datetime.fromtimestamp(start // NS, zone)
    before = datetime.datetime.fromtimestamp(start // NS - 1, zone)
    assert (first.date(), first.hour) == (datetime.date(2026, 9, 6), 1)
    assert before.date() == datetime.date(2026, 9, 5)
    # The day before ends there: 24 hours counted from its own midnight.
    assert window_start(window, start - NS) == at("2026-09-05T00:00:00-04:00")
    # And the week (Monday 2026-08-31) and month hold it, unaffected.
    assert window_start(calendar("week", "America/Santiago"), start) == at(
        "2026-08-31T00:00:00-04:00"
    )


def test_santiago_autumn_change_repeats_the_last_hour_of_the_day_before():
    # 2026-04-05 00:00 -03 becomes 2026-04-04 23:00 -04: the 5th starts once.
    window = calendar("day", "America/Santiago")
    start = at("2026-04-05T00:00:00-04:00")
    assert window_start(window, start + 3_600 * NS) == start
    assert window_start(window, start - NS) == at("2026-04-04T00:00:00-03:00")


@pytest.mark.parametrize(
    ("unit", "now", "start"),
    [
        ("day", "2026-06-01T00:10:00-02:30", "2026-06-01T00:00:00-02:30"),
        ("day", "2026-01-15T23:59:59-03:30", "2026-01-15T00:00:00-03:30"),
        ("hour", "2026-01-15T10:45:00-03:30", "2026-01-15T10:00:00-03:30"),
        ("month", "2026-01-15T10:45:00-03:30", "2026-01-01T00:00:00-03:30"),
        # 2026-03-08 02:00 -03:30 -> 03:00 -02:30.
        ("day", "2026-03-08T12:00:00-02:30", "2026-03-08T00:00:00-03:30"),
    ],
)
def test_st_johns_half_hour_offset(unit, now, start):
    assert window_start(calendar(unit, "America/St_Johns"), at(now)) == at(start)


@pytest.mark.parametrize(
    "zone",
    [
        "UTC",
        "Europe/Berlin",
        "America/Santiago",
        "America/St_Johns",
        "Australia/Lord_Howe",
    ],
)
@pytest.mark.parametrize("unit", list(CalendarUnit))
def test_a_start_is_never_after_now_and_is_the_period_s_first_instant(zone, unit):
    # Every six hours of 2026 and the hours around each: the start is at
    # or before now, its local period is now's, and the instant before it
    # belongs to an earlier period.
    window = calendar(unit, zone)
    tz = zoneinfo.ZoneInfo(zone)
    now = at("2026-01-01T00:00:00+00:00")
    for _ in range(365 * 4):
        start = window_start(window, now)
        assert start <= now
        local = datetime.datetime.fromtimestamp(start // NS, tz)
        here = datetime.datetime.fromtimestamp(now // NS, tz)
        before = datetime.datetime.fromtimestamp(start // NS - 1, tz)
        assert _period(local, unit) == _period(here, unit)
        assert _period(before, unit) != _period(here, unit) or unit == "hour"
        now += 6 * 3_600 * NS + 17 * NS


def _period(moment: datetime.datetime, unit: str) -> tuple[int, ...]:
    if unit == "hour":
        return (moment.year, moment.month, moment.day, moment.hour)
    if unit == "day":
        return (moment.year, moment.month, moment.day)
    if unit == "week":
        return tuple(
            (moment.date() - datetime.timedelta(days=moment.weekday())).timetuple()[:3]
        )
    return (moment.year, moment.month)
