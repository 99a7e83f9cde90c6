"""When a step is due: calendar or business days, holidays, the send window, in the contact's own zone."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import holidays

from cadence.language import CadenceSpec, Calendar

_DAY_START = time(0, 0)
_DAY_END = time(23, 59, 59, 999999)


@lru_cache(maxsize=256)
def _days_off(country: str, year: int) -> frozenset[date]:
    """The country's non-working days of a year: weekends and public holidays, less weekend workdays."""
    calendar = holidays.country_holidays(country, years=year)
    first = date(year, 1, 1)
    days = (first + timedelta(days=n) for n in range((date(year + 1, 1, 1) - first).days))
    return frozenset(day for day in days if not calendar.is_working_day(day))


def is_business_day(day: date, country: str | None) -> bool:
    if not country:
        return day.weekday() < 5
    return day not in _days_off(country, day.year)


def is_open(day: date, calendar: Calendar) -> bool:
    """Whether touches may go out on `day`: not one of the cadence's closed dates, and a business day
    when the calendar counts business days."""
    if day in calendar.closed:
        return False
    return not calendar.business_days or is_business_day(day, calendar.country)


def _next_open_day(day: date, calendar: Calendar) -> date:
    """The first day on or after `day` that the calendar allows."""
    while not is_open(day, calendar):
        day += timedelta(days=1)
    return day


def add_days(start: date, days: int, calendar: Calendar) -> date:
    """`days` calendar days (a closed date moves to the next open one), or `days` business days."""
    if not calendar.business_days:
        return _next_open_day(start + timedelta(days=days), calendar)
    day = _next_open_day(start, calendar)
    for _ in range(days):
        day = _next_open_day(day + timedelta(days=1), calendar)
    return day


def zone_for(contact_zone: str | None, calendar: Calendar, default: str) -> ZoneInfo:
    """The contact's own zone when it is a real one, else the cadence's, else the service default."""
    for name in (contact_zone, calendar.timezone, default):
        if name:
            try:
                return ZoneInfo(name)
            except (ZoneInfoNotFoundError, ValueError):
                continue
    return ZoneInfo("UTC")


def first_slot(start: datetime, calendar: Calendar, zone: ZoneInfo) -> tuple[date, time]:
    """The first local (day, time) at or after `start` that the calendar and window allow."""
    local = start.astimezone(zone)
    opens, closes = calendar.window or (_DAY_START, _DAY_END)
    day = _next_open_day(local.date(), calendar)
    at = local.time().replace(tzinfo=None) if day == local.date() else opens
    if at < opens:
        at = opens
    elif at > closes:
        day, at = _next_open_day(day + timedelta(days=1), calendar), opens
    return day, at


def calendar_for(contact_country: str | None, calendar: Calendar) -> Calendar:
    """The contact's own public holidays when their country has a calendar, else the cadence's."""
    if contact_country and contact_country.upper() != (calendar.country or ""):
        code = contact_country.upper()
        if code in holidays.list_supported_countries():
            return calendar.model_copy(update={"country": code})
    return calendar


def narrowed(calendar: Calendar, hours: tuple[time, time]) -> Calendar:
    """The calendar with its window cut down to `hours` (a channel's quiet hours leave the rest)."""
    opens, closes = calendar.window or (_DAY_START, _DAY_END)
    window = (max(opens, hours[0]), min(closes, hours[1]))
    if window[0] >= window[1]:
        raise ValueError(
            f"hours {hours[0]:%H:%M}-{hours[1]:%H:%M} leave no time in window {opens:%H:%M}-{closes:%H:%M}"
        )
    return calendar.model_copy(update={"window": window})


def for_step(
    calendar: Calendar, window: tuple[time, time] | None, hours: tuple[time, time] | None
) -> Calendar:
    """A step's calendar: its own window if it has one, cut down to its channel's quiet hours if any."""
    if window is not None:
        calendar = calendar.model_copy(update={"window": window})
    return narrowed(calendar, hours) if hours is not None else calendar


def placement(
    calendar: Calendar, timezone: str | None, country: str | None, default_timezone: str
) -> tuple[ZoneInfo, Calendar]:
    """The zone and holiday calendar a contact's touches are placed in."""
    return zone_for(timezone, calendar, default_timezone), calendar_for(country, calendar)


def due_at(start: datetime, day: int, calendar: Calendar, zone: ZoneInfo, at: time | None = None) -> datetime:
    """UTC time a step is due: `day` days after the enrollment's first slot, at `at` local time, or else at
    that slot's time of day.

    Keeping the start's time of day spreads enrollments over the window instead of firing all at its opening.
    """
    first_day, slot_time = first_slot(start, calendar, zone)
    target = add_days(first_day, day, calendar)
    wall = at or slot_time
    # A wall time inside a DST gap resolves forward (fold=0), which is what a sender expects. On the day
    # clocks fall back a wall time happens twice: take the second when the first is before the start.
    due = datetime.combine(target, wall, tzinfo=zone).astimezone(UTC)
    if due < start:
        due = datetime.combine(target, wall, tzinfo=zone).replace(fold=1).astimezone(UTC)
    if due < start:  # a fixed `at` already past on the first day: the next open day at that time
        target = _next_open_day(target + timedelta(days=1), calendar)
        due = datetime.combine(target, wall, tzinfo=zone).astimezone(UTC)
    return due


def spread(due: datetime, offset_seconds: float, calendar: Calendar, zone: ZoneInfo) -> datetime:
    """`due` moved later by up to `offset_seconds`, staying on its local day and inside its window."""
    local = due.astimezone(zone)
    _, closes = calendar.window or (_DAY_START, _DAY_END)
    room = (datetime.combine(local.date(), closes, tzinfo=zone) - local).total_seconds()
    if room <= 0:
        return due
    return due + timedelta(seconds=int(offset_seconds % room if offset_seconds >= room else offset_seconds))


def touch_due(
    spec: CadenceSpec,
    index: int,
    calendar: Calendar,
    zone: ZoneInfo,
    started_at: datetime,
    previous: datetime,
) -> datetime:
    """When touch `index` is due by the cadence's timing alone: a `day` step counts from the enrollment's
    start; an `after` step and a repeat count from `previous`, when the touch before it went out."""
    point = spec.touchpoint(index)
    at = point.at if point is not None else None
    if index < len(spec.steps) and spec.steps[index].after is None:
        return due_at(started_at, spec.steps[index].day or 0, calendar, zone, at)
    if index < len(spec.steps):
        days, business = spec.steps[index].gap
    else:
        assert spec.repeat is not None
        days, business = spec.repeat.gap
    counting = calendar.model_copy(update={"business_days": calendar.business_days or business})
    return due_at(previous, days, counting, zone, at)
