"""Per-step outcomes: a call that gets no answer is tried again, after a gap, a limited number of times."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from harness import MONDAY, REPO, Harness, deal_event, make_settings, start_harness

from cadence.errors import RulesError
from cadence.language import parse
from cadence.models import TouchStatus

MOSCOW = ZoneInfo("Europe/Moscow")
CADENCE = """\
cadence: calls
enroll: {on: deal.created}
calendar: {business_days: true, window: "09:00-18:00", timezone: Europe/Moscow, country: RU}
steps:
  - day: 0
    channel: call
    template: call/deal-02-walkthrough
    reason: Book the walkthrough.
    on_outcome:
      no_answer: {retry_after: 1 business day, max: 2}
  - day: 10
    channel: email
    template: email/deal-03-case-study
    reason: A case study.
"""


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "calls.yaml").write_text(CADENCE)
    (rules / "policy.yaml").write_text("caps: {per_day: null, per_week: null}\n")
    harness = start_harness(make_settings(tmp_path, rules_dir=rules, templates_dir=REPO / "templates"))
    yield harness
    harness.stop()


def _no_answer(h: Harness, touch_id: int) -> None:
    response = h.post("/outcomes", {"touch_id": touch_id, "outcome": "no_answer"})
    assert response.status_code == 201, response.text


def test_no_answer_is_tried_again_on_the_next_business_day_at_most_twice(h: Harness) -> None:
    h.post("/webhooks/generic", deal_event(type="deal.created"))
    h.run_days(1)  # Monday: the call task is made
    tries = [t for t in h.touches() if t.step_index == 0]
    assert [(t.iteration, t.status) for t in tries] == [(0, TouchStatus.sent)]

    # Each no_answer comes in at the clock's time: Tuesday 09:00 after the first day, then when the try is
    # made; one business day later is the next try.
    for expected_iteration, expected_day in [
        (1, MONDAY + timedelta(days=2)),
        (2, MONDAY + timedelta(days=3)),
    ]:
        _no_answer(h, tries[-1].id or 0)
        tries = [t for t in h.touches() if t.step_index == 0]
        retry = tries[-1]
        assert retry.iteration == expected_iteration
        assert retry.due_at.astimezone(MOSCOW).date() == expected_day.date()
        assert retry.reason == "Book the walkthrough."
        h.run_until(retry.due_at + timedelta(minutes=1))
        tries = [t for t in h.touches() if t.step_index == 0]
        assert tries[-1].status == TouchStatus.sent

    _no_answer(h, tries[-1].id or 0)  # the third no_answer: no tries left
    assert len([t for t in h.touches() if t.step_index == 0]) == 3


def test_the_same_outcome_twice_plans_one_try(h: Harness) -> None:
    h.post("/webhooks/generic", deal_event(type="deal.created"))
    h.run_days(1)
    [first] = [t for t in h.touches() if t.step_index == 0]
    _no_answer(h, first.id or 0)
    _no_answer(h, first.id or 0)
    assert [t.iteration for t in h.touches() if t.step_index == 0] == [0, 1]


def test_an_outcome_the_step_does_not_name_plans_nothing(h: Harness) -> None:
    h.post("/webhooks/generic", deal_event(type="deal.created"))
    h.run_days(1)
    [first] = [t for t in h.touches() if t.step_index == 0]
    h.post("/outcomes", {"touch_id": first.id, "outcome": "left_voicemail"})
    assert [t.iteration for t in h.touches() if t.step_index == 0] == [0]


@pytest.mark.parametrize(
    ("retry", "where"),
    [
        ("{retry_after: soon, max: 2}", "retry_after"),
        ("{retry_after: 1 day, max: 0}", "max"),
        ("{max: 2}", ": a retry needs both `retry_after` and `max`"),
        (
            "{retry_after: 1 day, max: 2, exit: true}",
            ": an outcome either retries the step or ends the cadence",
        ),
        ("{}", ": say what the outcome does"),
    ],
)
def test_a_bad_retry_is_a_located_error(retry: str, where: str) -> None:
    text = CADENCE.replace("{retry_after: 1 business day, max: 2}", retry)
    with pytest.raises(RulesError) as caught:
        parse(text, "calls.yaml")
    [problem] = caught.value.problems
    assert problem.line == 10
    assert f"steps.0.on_outcome.no_answer{where if where.startswith(':') else '.' + where}" in problem.message
