"""Step-level timing and conditions: `at`, a step's own `window`, `closed` dates, `skip_when`."""

from __future__ import annotations

from datetime import UTC, date, datetime, time
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from harness import REPO, deal_event, make_settings, start_harness

from cadence import timing
from cadence.errors import RulesError
from cadence.language import Calendar, parse
from cadence.models import TouchStatus
from cadence.simulate import project as simulate

MOSCOW = ZoneInfo("Europe/Moscow")
#: Monday 2026-11-23, 11:00 in Moscow.
START = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)


def _cadence(steps: str, calendar: str = "") -> str:
    return f"cadence: probe\nenroll: {{on: deal.created}}\n{calendar}steps:\n{steps}"


def _step(
    day: int, extra: str = "", channel: str = "email", template: str = "email/deal-01-proposal-recap"
) -> str:
    return (
        f"  - day: {day}\n    channel: {channel}\n    template: {template}\n    reason: Step {day}.\n{extra}"
    )


def _local(dt: datetime) -> datetime:
    return dt.astimezone(MOSCOW)


def test_at_fixes_the_local_time_and_waits_a_day_when_already_past() -> None:
    spec = parse(_cadence(_step(0, '    at: "10:30"\n') + _step(2, '    at: "15:00"\n')), "p.yaml").spec
    rows = simulate(spec, START, {"timezone": "Europe/Moscow"}, None, "UTC")
    # 10:30 on Monday is before the 11:00 start, so day 0 is Tuesday 10:30; day 2 counts from that first slot.
    assert [_local(r.due_at).strftime("%a %H:%M") for r in rows] == ["Tue 10:30", "Wed 15:00"]


def test_a_step_window_overrides_the_calendar_window() -> None:
    text = _cadence(_step(1, '    window: "14:00-16:00"\n'), calendar='calendar: {window: "09:00-18:00"}\n')
    [row] = simulate(parse(text, "p.yaml").spec, START, {"timezone": "Europe/Moscow"}, None, "UTC")
    assert _local(row.due_at).strftime("%a %H:%M") == "Tue 14:00"


def test_at_outside_its_window_is_an_error_at_the_at_key() -> None:
    text = _cadence(_step(0, '    window: "09:00-12:00"\n    at: "13:00"\n'))
    with pytest.raises(RulesError) as caught:
        parse(text, "p.yaml")
    [problem] = caught.value.problems
    assert (problem.line, problem.column) == (9, 9)
    assert "steps.0.at 13:00 is outside its window 09:00-12:00" in problem.message


@pytest.mark.parametrize("text", ['"25:00"', '"9am"', "930"])
def test_a_bad_at_is_an_error(text: str) -> None:
    with pytest.raises(RulesError, match=r"steps\.0\.at"):
        parse(_cadence(_step(0, f"    at: {text}\n")), "p.yaml")


@pytest.mark.parametrize("business_days", [False, True])
def test_closed_dates_are_skipped_in_both_kinds_of_calendar(business_days: bool) -> None:
    calendar = Calendar(business_days=business_days, closed=(date(2026, 11, 24), date(2026, 11, 25)))
    due = timing.due_at(START, 1, calendar, MOSCOW)
    # Day 1 would be Tuesday the 24th; both it and Wednesday are closed, so Thursday.
    assert _local(due).date() == date(2026, 11, 26)
    assert _local(due).time() == time(11, 0)
    assert not timing.is_open(date(2026, 11, 24), calendar)


def test_closed_dates_parse_from_yaml_dates_and_strings() -> None:
    text = _cadence(_step(0), calendar='calendar:\n  closed: [2026-12-31, "2027-01-09"]\n')
    assert parse(text, "p.yaml").spec.calendar.closed == (date(2026, 12, 31), date(2027, 1, 9))


def test_skip_when_skips_the_touch_with_why(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "probe.yaml").write_text(
        _cadence(_step(0, '    skip_when: deal.stage == "negotiation"\n') + _step(1))
    )
    h = start_harness(make_settings(tmp_path, rules_dir=rules, templates_dir=REPO / "templates"))
    try:
        h.post("/webhooks/generic", deal_event(type="deal.created", stage="negotiation"))
        h.run_days(3)
        skipped, sent = h.touches()
        assert (skipped.status, skipped.status_reason) == (
            TouchStatus.skipped,
            'skip_when holds: deal.stage == "negotiation"',
        )
        assert sent.status == TouchStatus.sent
    finally:
        h.stop()


def test_simulate_shows_skip_when() -> None:
    spec = parse(_cadence(_step(0, "    skip_when: (contact.age or 0) > 60\n")), "p.yaml").spec
    [row] = simulate(spec, START, {"age": 70}, None, "UTC")
    assert not row.sent and row.note == "skipped: skip_when holds: (contact.age or 0) > 60"
