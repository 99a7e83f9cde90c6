"""When a step is due: calendar or business days, weekends, holidays, the window, the contact's zone, DST."""

from __future__ import annotations

import itertools
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from cadence import timing
from cadence.language import Calendar

MOSCOW = ZoneInfo("Europe/Moscow")
BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
NINE_TO_SIX = (time(9, 0), time(18, 0))

CALENDAR_DAYS = Calendar()
BUSINESS_DAYS = Calendar(business_days=True)
RU = Calendar(business_days=True, window=NINE_TO_SIX, timezone="Europe/Moscow", country="RU")


# --- calendar and business days -------------------------------------------------------------------------


def test_calendar_days_count_every_day() -> None:
    friday = date(2026, 3, 6)
    assert friday.weekday() == 4
    assert timing.add_days(friday, 0, CALENDAR_DAYS) == friday
    assert timing.add_days(friday, 1, CALENDAR_DAYS) == date(2026, 3, 7)  # Saturday
    assert timing.add_days(friday, 10, CALENDAR_DAYS) == date(2026, 3, 16)


def test_business_days_skip_the_weekend() -> None:
    friday = date(2026, 3, 6)
    assert timing.add_days(friday, 1, BUSINESS_DAYS) == date(2026, 3, 9)  # Monday
    assert timing.add_days(friday, 5, BUSINESS_DAYS) == date(2026, 3, 13)  # a whole week later
    assert timing.add_days(friday, 6, BUSINESS_DAYS) == date(2026, 3, 16)


def test_business_day_zero_on_a_weekend_is_the_next_monday() -> None:
    saturday, sunday = date(2026, 3, 7), date(2026, 3, 8)
    assert timing.add_days(saturday, 0, BUSINESS_DAYS) == date(2026, 3, 9)
    assert timing.add_days(sunday, 0, BUSINESS_DAYS) == date(2026, 3, 9)
    assert timing.add_days(saturday, 1, BUSINESS_DAYS) == date(2026, 3, 10)


def test_weekends_are_not_business_days() -> None:
    assert timing.is_business_day(date(2026, 3, 6), None) is True  # Friday
    assert timing.is_business_day(date(2026, 3, 7), None) is False
    assert timing.is_business_day(date(2026, 3, 8), None) is False
    assert timing.is_business_day(date(2026, 3, 7), "RU") is False


def test_russian_new_year_holidays_are_skipped() -> None:
    # RU: 1-8 January are public holidays; 9-10 January 2027 are a weekend. 31 Dec 2026 is a day off too.
    for day in range(1, 9):
        assert timing.is_business_day(date(2027, 1, day), "RU") is False
    assert timing.is_business_day(date(2027, 1, 11), "RU") is True
    assert timing.is_business_day(date(2027, 1, 4), None) is True  # a Monday without a holiday calendar
    wednesday = date(2026, 12, 30)
    assert timing.add_days(wednesday, 1, RU) == date(2027, 1, 11)
    assert timing.add_days(date(2027, 1, 2), 0, RU) == date(2027, 1, 11)


def test_holidays_only_apply_with_a_country() -> None:
    assert timing.add_days(date(2026, 12, 30), 1, BUSINESS_DAYS) == date(2026, 12, 31)
    assert timing.add_days(date(2026, 12, 30), 2, BUSINESS_DAYS) == date(2027, 1, 1)


def test_holidays_do_not_apply_to_calendar_days() -> None:
    calendar = Calendar(business_days=False, country="RU")
    assert timing.add_days(date(2026, 12, 30), 3, calendar) == date(2027, 1, 2)


def test_us_independence_day_for_a_us_contact() -> None:
    # 4 July 2026 is a Saturday, observed on Friday 3 July; a RU cadence keeps working that Friday.
    thursday = date(2026, 7, 2)
    us = timing.calendar_for("US", RU)
    assert us.country == "US"
    assert timing.add_days(thursday, 1, us) == date(2026, 7, 6)
    assert timing.add_days(thursday, 1, RU) == date(2026, 7, 3)


def test_russian_working_saturday_is_a_business_day() -> None:
    # The RU calendar moves the day off of Saturday 20 Feb 2027 to Monday 22 Feb ("Day off (substituted from
    # 02/20/2027)"): that Saturday is a working day in Russia, and the holidays package says so.
    assert date(2027, 2, 20).weekday() == 5
    assert timing.is_business_day(date(2027, 2, 22), "RU") is False
    assert timing.is_business_day(date(2027, 2, 20), "RU") is True


# --- the contact's country and zone ---------------------------------------------------------------------


def test_calendar_for_uses_the_contacts_country() -> None:
    assert timing.calendar_for("us", RU).country == "US"
    assert timing.calendar_for("DE", RU).country == "DE"
    # Everything else about the cadence's calendar stays.
    changed = timing.calendar_for("US", RU)
    assert (changed.business_days, changed.window, changed.timezone) == (True, NINE_TO_SIX, "Europe/Moscow")


def test_calendar_for_keeps_the_cadences_country_without_a_usable_one() -> None:
    assert timing.calendar_for(None, RU) is RU
    assert timing.calendar_for("", RU) is RU
    assert timing.calendar_for("XX", RU).country == "RU"
    assert timing.calendar_for("ru", RU).country == "RU"


def test_calendar_for_gives_a_calendar_without_country_one() -> None:
    assert timing.calendar_for("US", BUSINESS_DAYS).country == "US"


def test_zone_for_prefers_the_contacts_zone() -> None:
    assert timing.zone_for("America/New_York", RU, "UTC") == NEW_YORK
    assert timing.zone_for(None, RU, "UTC") == MOSCOW
    assert timing.zone_for("Not/AZone", RU, "UTC") == MOSCOW
    assert timing.zone_for(None, CALENDAR_DAYS, "Europe/Berlin") == BERLIN
    assert timing.zone_for("bad", CALENDAR_DAYS, "also bad") == ZoneInfo("UTC")


def test_the_window_is_in_the_contacts_own_zone() -> None:
    # 07:00 UTC on Wednesday 4 March 2026 is 10:00 in Moscow (inside the window) and 02:00 in New York.
    start = datetime(2026, 3, 4, 7, 0, tzinfo=UTC)
    assert timing.due_at(start, 0, RU, MOSCOW) == start
    in_new_york = timing.due_at(start, 0, RU, NEW_YORK)
    assert in_new_york.astimezone(NEW_YORK) == datetime(2026, 3, 4, 9, 0, tzinfo=NEW_YORK)
    assert in_new_york == datetime(2026, 3, 4, 14, 0, tzinfo=UTC)  # EST is UTC-5


def test_due_at_is_in_utc() -> None:
    due = timing.due_at(datetime(2026, 3, 4, 10, 0, tzinfo=MOSCOW), 1, RU, MOSCOW)
    assert due.utcoffset() == timedelta(0)
    assert due == datetime(2026, 3, 5, 7, 0, tzinfo=UTC)


# --- the send window ------------------------------------------------------------------------------------


def test_start_before_opening_moves_to_opening() -> None:
    start = datetime(2026, 3, 4, 6, 30, tzinfo=MOSCOW)  # Wednesday
    assert timing.first_slot(start, RU, MOSCOW) == (date(2026, 3, 4), time(9, 0))
    assert timing.due_at(start, 0, RU, MOSCOW) == datetime(2026, 3, 4, 9, 0, tzinfo=MOSCOW)


def test_start_inside_the_window_keeps_its_time() -> None:
    start = datetime(2026, 3, 4, 11, 45, tzinfo=MOSCOW)
    assert timing.first_slot(start, RU, MOSCOW) == (date(2026, 3, 4), time(11, 45))
    # Later steps keep the time of day, so enrollments spread over the window.
    assert timing.due_at(start, 2, RU, MOSCOW) == datetime(2026, 3, 6, 11, 45, tzinfo=MOSCOW)


def test_start_after_closing_moves_to_the_next_open_day() -> None:
    wednesday_evening = datetime(2026, 3, 4, 19, 0, tzinfo=MOSCOW)
    assert timing.first_slot(wednesday_evening, RU, MOSCOW) == (date(2026, 3, 5), time(9, 0))
    # Friday evening: the next open day is Monday... except that Monday 9 March 2026 is the observed
    # Women's Day (8 March is a Sunday) in Russia, so it is Tuesday.
    friday_evening = datetime(2026, 3, 6, 19, 0, tzinfo=MOSCOW)
    assert timing.first_slot(friday_evening, RU, MOSCOW) == (date(2026, 3, 10), time(9, 0))
    assert timing.due_at(friday_evening, 1, RU, MOSCOW) == datetime(2026, 3, 11, 9, 0, tzinfo=MOSCOW)


def test_start_after_closing_with_calendar_days_is_the_next_day() -> None:
    calendar = Calendar(window=NINE_TO_SIX)
    friday_evening = datetime(2026, 3, 6, 19, 0, tzinfo=MOSCOW)
    assert timing.first_slot(friday_evening, calendar, MOSCOW) == (date(2026, 3, 7), time(9, 0))


def test_start_on_a_holiday_moves_to_opening_of_the_next_business_day() -> None:
    start = datetime(2027, 1, 5, 12, 0, tzinfo=MOSCOW)  # inside the window, but a holiday
    assert timing.first_slot(start, RU, MOSCOW) == (date(2027, 1, 11), time(9, 0))


def test_no_window_means_any_time_of_day() -> None:
    start = datetime(2026, 3, 4, 3, 15, tzinfo=MOSCOW)
    assert timing.first_slot(start, BUSINESS_DAYS, MOSCOW) == (date(2026, 3, 4), time(3, 15))


# --- daylight saving time -------------------------------------------------------------------------------


def test_berlin_spring_forward_keeps_the_local_time() -> None:
    # Clocks go forward on Sunday 29 March 2026: CET (UTC+1) before, CEST (UTC+2) after.
    calendar = Calendar(business_days=True, window=NINE_TO_SIX, country="DE")
    start = datetime(2026, 3, 26, 10, 0, tzinfo=BERLIN)  # Thursday, CET
    before = timing.due_at(start, 0, calendar, BERLIN)
    after = timing.due_at(start, 2, calendar, BERLIN)  # Monday 30 March, CEST
    assert before == datetime(2026, 3, 26, 9, 0, tzinfo=UTC)
    assert after == datetime(2026, 3, 30, 8, 0, tzinfo=UTC)
    assert before.astimezone(BERLIN).time() == after.astimezone(BERLIN).time() == time(10, 0)


def test_berlin_calendar_days_across_the_change() -> None:
    start = datetime(2026, 3, 28, 10, 0, tzinfo=BERLIN)  # Saturday
    due = timing.due_at(start, 1, CALENDAR_DAYS, BERLIN)
    assert due.astimezone(BERLIN) == datetime(2026, 3, 29, 10, 0, tzinfo=BERLIN)
    assert due - timing.due_at(start, 0, CALENDAR_DAYS, BERLIN) == timedelta(hours=23)


def test_wall_time_in_the_spring_gap_resolves_forward() -> None:
    # 02:30 on 29 March 2026 does not exist in Berlin; with fold=0 it is read with the old offset (UTC+1),
    # which is 01:30 UTC = 03:30 CEST.
    start = datetime(2026, 3, 28, 2, 30, tzinfo=BERLIN)
    due = timing.due_at(start, 1, CALENDAR_DAYS, BERLIN)
    assert due == datetime(2026, 3, 29, 1, 30, tzinfo=UTC)
    assert due.astimezone(BERLIN).time() == time(3, 30)


def test_new_york_fall_back_keeps_the_local_time() -> None:
    # Clocks go back on Sunday 1 November 2026: EDT (UTC-4) before, EST (UTC-5) after.
    calendar = Calendar(business_days=True, window=NINE_TO_SIX, country="US")
    start = datetime(2026, 10, 29, 10, 0, tzinfo=NEW_YORK)  # Thursday, EDT
    before = timing.due_at(start, 0, calendar, NEW_YORK)
    after = timing.due_at(start, 2, calendar, NEW_YORK)  # Monday 2 November, EST
    assert before == datetime(2026, 10, 29, 14, 0, tzinfo=UTC)
    assert after == datetime(2026, 11, 2, 15, 0, tzinfo=UTC)
    assert before.astimezone(NEW_YORK).time() == after.astimezone(NEW_YORK).time() == time(10, 0)


# --- day 0 ----------------------------------------------------------------------------------------------

_CALENDARS = {
    "calendar days": CALENDAR_DAYS,
    "business days": BUSINESS_DAYS,
    "RU window": RU,
    "window only": Calendar(window=NINE_TO_SIX),
    "night window DE": Calendar(business_days=True, window=(time(0, 30), time(2, 45)), country="DE"),
    "night window US": Calendar(business_days=True, window=(time(1, 30), time(3, 0)), country="US"),
}


@pytest.mark.parametrize("name", sorted(_CALENDARS))
@pytest.mark.parametrize("zone", ["Europe/Moscow", "Europe/Berlin", "America/New_York", "Asia/Kathmandu"])
def test_day_zero_is_never_before_the_start(name: str, zone: str) -> None:
    calendar, tz = _CALENDARS[name], ZoneInfo(zone)
    late = []
    # Both DST changes, the RU and US New Year, weekends; every 53 minutes hits every time of day.
    for first in (
        datetime(2026, 3, 25, tzinfo=UTC),
        datetime(2026, 10, 28, tzinfo=UTC),
        datetime(2026, 12, 27, tzinfo=UTC),
    ):
        for step in range(0, 7 * 24 * 60, 53):
            start = first + timedelta(minutes=step)
            due = timing.due_at(start, 0, calendar, tz)
            if due < start:
                late.append((start.isoformat(), due.isoformat()))
    assert late == []


def test_day_zero_inside_the_window_is_the_start_itself() -> None:
    start = datetime(2026, 3, 4, 12, 34, 56, tzinfo=MOSCOW)
    assert timing.due_at(start, 0, RU, MOSCOW) == start


def test_later_days_never_come_before_earlier_ones() -> None:
    start = datetime(2026, 12, 25, 20, 0, tzinfo=MOSCOW)
    dues = [timing.due_at(start, day, RU, MOSCOW) for day in range(30)]
    assert all(a < b for a, b in itertools.pairwise(dues))
