"""The language's newer features, end to end: `after` steps, `calendar.spread`, `choose`, SMS numbers and
consent, step outcomes that end or move, `repeat`, `budget`, `variants`, and what the timeline projects."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from email import message_from_bytes
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from alembic import command
from harness import MONDAY, REPO, Harness, deal_event, make_settings, start_harness

from cadence import lint, store
from cadence import rules as ruleset
from cadence.errors import Problem, RulesError
from cadence.language import parse
from cadence.models import EnrollmentStatus, Touch, TouchStatus

MOSCOW = ZoneInfo("Europe/Moscow")
NO_CAPS = "caps: {per_day: null, per_week: null}\n"
CALENDAR = 'calendar: {window: "09:00-18:00", timezone: Europe/Moscow, country: RU}\n'
EMAIL = "email/deal-01-proposal-recap"

Start = Callable[..., Harness]


# --- helpers --------------------------------------------------------------------------------------------


def _cadence(name: str, body: str, calendar: str = CALENDAR, enroll: str = "{on: deal.created}") -> str:
    return f"cadence: {name}\nenroll: {enroll}\n{calendar}{body}"


def _step(timing: str, template: str = EMAIL, reason: str = "Something new.", extra: str = "") -> str:
    channel = template.split("/")[0]
    return f"  - {timing}\n    channel: {channel}\n    template: {template}\n    reason: {reason}\n{extra}"


def _event(n: int = 1, contact: dict[str, Any] | None = None, **deal: Any) -> dict[str, Any]:
    """A `deal.created` for deal d-n of contact c-n; a contact field given as None is left out."""
    body = deal_event(f"evt-{n}", type="deal.created", deal_id=f"d-{n}", contact_id=f"c-{n}", **deal)
    for key, value in (contact or {}).items():
        if value is None:
            body["contact"].pop(key, None)
        else:
            body["contact"][key] = value
    return body


def _enroll(h: Harness, n: int = 1, contact: dict[str, Any] | None = None, **deal: Any) -> int:
    response = h.post("/webhooks/generic", _event(n, contact, **deal))
    assert response.status_code == 202, response.text
    [enrolled] = response.json()["enrolled"]
    return int(enrolled)


def _local(dt: datetime | None) -> str:
    assert dt is not None
    return dt.astimezone(MOSCOW).strftime("%a %d %b %H:%M")


def _problems(text: str) -> list[Problem]:
    with pytest.raises(RulesError) as caught:
        parse(text, "x.yaml")
    problems: list[Problem] = caught.value.problems
    return problems


def _timeline(h: Harness, enrollment_id: int) -> dict[str, Any]:
    response = h.client.get(f"/enrollments/{enrollment_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _sms_lines(h: Harness) -> list[dict[str, Any]]:
    path = h.service.settings.outbox_dir / "sms.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _subject(h: Harness, touch: Touch) -> str:
    path = h.service.settings.outbox_dir / "email" / f"{touch.key}.eml"
    return str(message_from_bytes(path.read_bytes())["Subject"])


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    """Starts a whole Cadence on the embedded broker with the given cadences, policy and templates."""
    started: list[Harness] = []

    def _start(
        cadences: dict[str, str],
        policy: str = NO_CAPS,
        templates: Path = REPO / "templates",
        at: datetime = MONDAY,
    ) -> Harness:
        home = tmp_path / f"service-{len(started)}"
        rules = home / "rules"
        rules.mkdir(parents=True)
        for name, text in cadences.items():
            (rules / f"{name}.yaml").write_text(text, encoding="utf-8")
        (rules / "policy.yaml").write_text(policy, encoding="utf-8")
        harness = start_harness(make_settings(home, rules_dir=rules, templates_dir=templates), at)
        started.append(harness)
        return harness

    yield _start
    for harness in started:
        harness.stop()


# --- 1. `after`: a gap after the previous touch ---------------------------------------------------------

GAPS = _cadence(
    "gaps",
    "steps:\n"
    + _step("day: 0", reason="The recap.")
    + _step("after: 3 days", "email/deal-03-case-study", "A case study.")
    + _step("after: 2 business days", "email/deal-06-schedule-update", "The new schedule.")
    + _step("after: 1 week", "email/deal-08-price-hold", "The price hold ends."),
)


def test_after_steps_are_due_their_gap_after_the_previous_touch_went_out(start: Start) -> None:
    h = start({"gaps": GAPS})
    _enroll(h)
    h.run_days(30)
    touches = h.touches()
    assert [t.status for t in touches] == [TouchStatus.sent] * 4
    # Thursday is 3 days after Monday; 2 business days after Thursday is Monday (the weekend does not
    # count); a week after that Monday is the next one.
    assert [_local(t.finished_at) for t in touches] == [
        "Mon 23 Nov 09:00",
        "Thu 26 Nov 09:00",
        "Mon 30 Nov 09:00",
        "Mon 07 Dec 09:00",
    ]


def test_an_after_gap_counts_from_a_send_the_daily_cap_deferred(start: Start) -> None:
    # `early` takes Monday's one touch at 09:00, so the first touch of `gaps` (due 10:00) waits for Tuesday.
    early = _cadence("early", "steps:\n" + _step("day: 0", extra='    at: "09:00"\n'))
    gaps = _cadence(
        "gaps",
        "steps:\n"
        + _step("day: 0", extra='    at: "10:00"\n')
        + _step("after: 3 days", "email/deal-03-case-study", "A case study."),
    )
    h = start({"early": early, "gaps": gaps}, policy="caps: {per_day: 1}\n")
    h.post("/webhooks/generic", _event())
    h.run_days(1.5)
    [enrollment] = [e for e in h.enrollments() if e.cadence_name == "gaps"]
    first, second = h.touches(enrollment.id)
    assert first.status == TouchStatus.sent
    assert _local(first.finished_at) == "Tue 24 Nov 09:00"
    # Three days after the Tuesday it went out, not after the Monday it was first due.
    assert _local(second.due_at) == "Fri 27 Nov 09:00"
    h.run_days(5)
    assert _local(h.touches(enrollment.id)[1].finished_at) == "Fri 27 Nov 09:00"


def test_an_after_gap_counts_from_a_send_the_window_deferred(start: Start) -> None:
    h = start({"gaps": GAPS})
    _enroll(h)
    h.clock.set(MONDAY + timedelta(hours=10))  # 19:00 in Moscow: the touch is late and out of its window
    h.run_days(1)
    first, second = h.touches()
    assert first.status == TouchStatus.sent
    assert _local(first.finished_at) == "Tue 24 Nov 09:00"
    assert _local(second.due_at) == "Fri 27 Nov 09:00"


def test_a_day_step_after_an_after_step_is_a_located_error() -> None:
    text = _cadence(
        "x",
        "steps:\n" + _step("day: 0") + _step("after: 2 days") + _step("day: 9"),
    )
    [problem] = _problems(text)
    assert "steps.2 counts `day` from enrollment after a step placed `after`" in problem.message
    assert (problem.line, problem.column) == (13, 10)
    assert problem.hint == "use `after` for this step too"


@pytest.mark.parametrize("timing", ["when: contact.vip", "day: 3\n    after: 2 days"])
def test_a_step_needs_exactly_one_of_day_and_after(timing: str) -> None:
    text = _cadence("x", "steps:\n" + _step("day: 0") + _step(timing))
    [problem] = _problems(text)
    assert problem.message.startswith("steps.1: a step is due either on a `day` after enrollment or `after`")
    assert problem.line == 9


def test_a_bad_after_gap_is_a_located_error() -> None:
    [problem] = _problems(_cadence("x", "steps:\n" + _step("day: 0") + _step("after: 2 months")))
    assert problem.message.startswith("steps.1.after: '2 months' is not a gap")
    assert (problem.line, problem.column) == (9, 12)


# --- 2. calendar.spread ---------------------------------------------------------------------------------


def _spread_cadence(spread: str = "2 hours") -> str:
    calendar = (
        f'calendar: {{window: "09:00-18:00", timezone: Europe/Moscow, country: RU, spread: "{spread}"}}\n'
    )
    return _cadence("spread", "steps:\n" + _step("day: 0") + _step("day: 1"), calendar=calendar)


def _first_dues(h: Harness, count: int) -> dict[int, datetime]:
    for n in range(1, count + 1):
        _enroll(h, n)
    return {t.enrollment_id: t.due_at for t in h.touches() if t.step_index == 0}


def test_spread_gives_enrollments_of_one_second_different_times_within_the_spread(start: Start) -> None:
    h = start({"spread": _spread_cadence()})
    dues = _first_dues(h, 20)
    assert len(dues) == 20
    assert len(set(dues.values())) == 20
    assert all(MONDAY <= due < MONDAY + timedelta(hours=2) for due in dues.values())


def test_spread_stays_inside_the_window_and_on_the_same_local_day(start: Start) -> None:
    late = MONDAY + timedelta(hours=8)  # 17:00 in Moscow: one hour of the window left
    h = start({"spread": _spread_cadence("2 hours")}, at=late)
    dues = list(_first_dues(h, 20).values())
    closes = datetime(2026, 11, 23, 18, 0, tzinfo=MOSCOW)
    assert all(late <= due < closes for due in dues)
    assert len(set(dues)) > 1


def test_spread_is_the_same_for_the_same_enrollment_every_time(start: Start) -> None:
    first = _first_dues(start({"spread": _spread_cadence()}), 8)
    again = _first_dues(start({"spread": _spread_cadence()}), 8)
    assert first == again
    assert len(set(first.values())) > 1
    # The offset is the enrollment's own: its next step keeps it.
    h = start({"spread": _spread_cadence()})
    enrollment = _enroll(h)
    h.run_days(0.5)
    step0, step1 = h.touches(enrollment)
    assert step1.due_at - step0.due_at == timedelta(days=1)


@pytest.mark.parametrize(
    ("value", "message"),
    [("3 days", "'3 days' is not a spread"), ("13 hours", "spread '13 hours' is over 12 hours")],
)
def test_a_bad_spread_is_a_located_error(value: str, message: str) -> None:
    [problem] = _problems(_spread_cadence(value))
    assert problem.message.startswith("calendar.spread: ") and message in problem.message
    assert problem.line == 3


# --- 3. choose ------------------------------------------------------------------------------------------

PAPER = _cadence(
    "paper",
    """\
steps:
  - day: 0
    choose:
      - channel: letter
        template: letter/deal-04-executive-brief
        when: contact.seniority == "executive"
      - channel: email
        template: email/deal-01-proposal-recap
    reason: The proposal, on paper for a senior reader.
""",
)
NO_ADDRESS_REASON = "letter: contact has no address"
UNSUBSCRIBED_REASON = "email: contact is blocked: unsubscribed"


@pytest.mark.parametrize(
    ("contact", "unsubscribed", "expected"),
    [
        ({"seniority": "executive"}, False, ("sent", "letter", "letter/deal-04-executive-brief", None)),
        ({"seniority": "manager"}, False, ("sent", "email", EMAIL, None)),
        ({"seniority": "executive", "address": None}, False, ("sent", "email", EMAIL, None)),
        (
            {"seniority": "manager"},
            True,
            ("skipped", "email", EMAIL, f"no choice reaches the contact: {UNSUBSCRIBED_REASON}"),
        ),
        (
            {"seniority": "executive", "address": None},
            True,
            (
                "skipped",
                "letter",
                "letter/deal-04-executive-brief",
                f"no choice reaches the contact: {NO_ADDRESS_REASON}; {UNSUBSCRIBED_REASON}",
            ),
        ),
    ],
)
def test_choose_takes_the_first_choice_whose_condition_holds_and_channel_reaches_the_contact(
    start: Start, contact: dict[str, Any], unsubscribed: bool, expected: tuple[str, str, str, str | None]
) -> None:
    h = start({"paper": PAPER})
    enrollment = _enroll(h, contact=contact)
    if unsubscribed:
        response = h.post("/outcomes", {"enrollment_id": enrollment, "outcome": "unsubscribed"})
        assert response.status_code == 201, response.text
    h.run_days(1)
    [touch] = h.touches(enrollment)
    assert (touch.status, touch.channel, touch.template, touch.status_reason) == expected
    outbox = h.service.settings.outbox_dir
    assert (outbox / "letters" / f"{touch.key}.html").exists() == (expected[:2] == ("sent", "letter"))
    assert (outbox / "email" / f"{touch.key}.eml").exists() == (expected[:2] == ("sent", "email"))


TEXT_FIRST = _cadence(
    "text-first",
    """\
steps:
  - day: 0
    choose:
      - channel: sms
        template: sms/deal-05-round-table-invite
        when: contact.prefers_texts
      - channel: email
        template: email/deal-01-proposal-recap
    reason: The round table invitation.
""",
)


@pytest.mark.parametrize(("consent", "channel"), [(True, "sms"), (None, "email")])
def test_choose_passes_over_a_channel_without_the_policys_consent(
    start: Start, consent: bool | None, channel: str
) -> None:
    h = start({"text-first": TEXT_FIRST})
    enrollment = _enroll(h, contact={"prefers_texts": True, "sms_consent": consent})
    h.run_days(1)
    [touch] = h.touches(enrollment)
    assert (touch.status, touch.channel) == (TouchStatus.sent, channel)


def test_a_choice_without_when_before_the_last_is_a_located_error() -> None:
    text = PAPER.replace('        when: contact.seniority == "executive"\n', "").replace(
        "        template: email/deal-01-proposal-recap\n",
        "        template: email/deal-01-proposal-recap\n        when: contact.age > 30\n",
    )
    [problem] = _problems(text)
    assert problem.message == "steps.0.choose.0 has no `when`, so the choices after it are never taken"
    assert (problem.line, problem.column) == (7, 9)


def test_choose_with_a_channel_of_its_own_is_an_error() -> None:
    text = PAPER.replace("    choose:\n", "    channel: email\n    choose:\n")
    [problem] = _problems(text)
    assert problem.message == "steps.0: give `channel` and `template`, or `choose`, not both"
    assert problem.line == 5


# --- 4. SMS: a mobile number and consent ----------------------------------------------------------------

TEXTS = _cadence("texts", "steps:\n" + _step("day: 0", "sms/deal-05-round-table-invite", "The round table."))


@pytest.mark.parametrize(
    ("contact", "to", "reason"),
    [
        ({}, "+79161234567", None),
        ({"phone": "8 916 123-45-67"}, "+79161234567", None),
        ({"phone": "+7 495 123-45-67", "mobile": "+7 916 765-43-21"}, "+79167654321", None),
        ({"sms_consent": None}, None, "no consent for sms: contact.sms_consent does not hold"),
        ({"sms_consent": False}, None, "no consent for sms: contact.sms_consent does not hold"),
        ({"phone": "+7 495 123-45-67"}, None, "contact's phone '+7 495 123-45-67' is not a mobile number"),
        ({"phone": None}, None, "contact has no mobile number"),
    ],
)
def test_an_sms_goes_to_a_mobile_number_in_e164_with_consent(
    start: Start, contact: dict[str, Any], to: str | None, reason: str | None
) -> None:
    h = start({"texts": TEXTS})
    enrollment = _enroll(h, contact=contact)
    h.run_days(1)
    [touch] = h.touches(enrollment)
    assert (touch.status, touch.status_reason) == (TouchStatus.sent if to else TouchStatus.skipped, reason)
    assert [line["to"] for line in _sms_lines(h)] == ([to] if to else [])


@pytest.mark.parametrize(
    ("contact", "sent"),
    [({"sms_consent": True}, False), ({"sms_consent": None, "texts_ok": "yes"}, True)],
)
def test_the_policy_says_what_consent_to_sms_is(start: Start, contact: dict[str, Any], sent: bool) -> None:
    h = start({"texts": TEXTS}, policy=NO_CAPS + "consent: {sms: contact.texts_ok == 'yes'}\n")
    enrollment = _enroll(h, contact=contact)
    h.run_days(1)
    [touch] = h.touches(enrollment)
    if sent:
        assert touch.status == TouchStatus.sent
    else:
        assert (touch.status, touch.status_reason) == (
            TouchStatus.skipped,
            "no consent for sms: contact.texts_ok == 'yes' does not hold",
        )


# --- 5. step outcomes: retry, exit, then ----------------------------------------------------------------

TALKS = _cadence(
    "talks",
    "steps:\n"
    + _step(
        "day: 0",
        "call/deal-02-walkthrough",
        "Book the walkthrough.",
        "    on_outcome:\n"
        "      no_answer: {retry_after: 1 business day, max: 1}\n"
        "      not_interested: {exit: true}\n"
        "      meeting_booked: {then: after-meeting}\n",
    )
    + _step("day: 2", reason="The recap.")
    + _step("day: 5", "email/deal-03-case-study", "A case study."),
)
AFTER_MEETING = _cadence("after-meeting", "steps:\n" + _step("day: 0"), enroll="null")


def _outcome(h: Harness, touch: Touch, name: str) -> dict[str, Any]:
    response = h.post("/outcomes", {"touch_id": touch.id, "outcome": name})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture
def talks(start: Start) -> Harness:
    h = start({"talks": TALKS, "after-meeting": AFTER_MEETING})
    _enroll(h)
    h.run_days(1)
    return h


def test_a_retry_outcome_still_plans_another_try(talks: Harness) -> None:
    call = talks.touches()[0]
    _outcome(talks, call, "no_answer")
    tries = [t for t in talks.touches() if t.step_index == 0]
    assert [(t.iteration, t.status) for t in tries] == [(0, TouchStatus.sent), (1, TouchStatus.planned)]
    assert _local(tries[1].due_at) == "Wed 25 Nov 09:00"  # the outcome came on Tuesday


def test_an_exit_outcome_on_its_touch_ends_the_enrollment(talks: Harness) -> None:
    call = talks.touches()[0]
    body = _outcome(talks, call, "not_interested")
    [enrollment] = talks.enrollments()
    assert body["ended"] == [enrollment.id] and body["enrolled"] == []
    assert (enrollment.status, enrollment.end_reason, enrollment.end_outcome) == (
        EnrollmentStatus.exited,
        "outcome: not_interested",
        "not_interested",
    )
    assert [t.status for t in talks.touches()] == [TouchStatus.sent, TouchStatus.cancelled]


def test_the_same_outcome_on_another_steps_touch_does_not_end_it(talks: Harness) -> None:
    talks.run_days(2)
    recap = talks.touches()[1]
    assert recap.status == TouchStatus.sent
    _outcome(talks, recap, "not_interested")
    [enrollment] = talks.enrollments()
    assert enrollment.status == EnrollmentStatus.active
    assert talks.touches()[2].status == TouchStatus.planned


def test_a_then_outcome_ends_the_enrollment_and_starts_its_target(talks: Harness) -> None:
    call = talks.touches()[0]
    body = _outcome(talks, call, "meeting_booked")
    first, moved = talks.enrollments()
    assert body["ended"] == [first.id] and body["enrolled"] == [moved.id]
    assert (first.status, first.end_outcome) == (EnrollmentStatus.exited, "meeting_booked")
    assert (moved.cadence_name, moved.status, moved.origin) == (
        "after-meeting",
        EnrollmentStatus.active,
        "then from talks",
    )
    assert [t.status for t in talks.touches(moved.id)] == [TouchStatus.planned]


def test_a_then_on_a_lost_outcome_moves_the_enrollment(start: Start) -> None:
    pilot = _cadence(
        "pilot",
        "steps:\n"
        + _step(
            "day: 0", reason="The pilot offer.", extra="    on_outcome:\n      lost: {then: after-meeting}\n"
        )
        + _step("day: 3", "email/deal-03-case-study", "A case study."),
    )
    h = start({"pilot": pilot, "after-meeting": AFTER_MEETING})
    _enroll(h)
    h.run_days(1)
    _outcome(h, h.touches()[0], "lost")
    first, *moved = h.enrollments()
    assert (first.status, first.end_outcome) == (EnrollmentStatus.exited, "lost")
    assert [e.cadence_name for e in moved] == ["after-meeting"]


LAST_CALL = _cadence(
    "last-call",
    "steps:\n"
    + _step("day: 0", reason="The recap.")
    + _step(
        "day: 2",
        "call/deal-02-walkthrough",
        "Book the walkthrough.",
        "    on_outcome:\n"
        "      no_answer: {retry_after: 1 business day, max: 1}\n"
        "      meeting_booked: {then: after-meeting}\n",
    ),
)


@pytest.mark.parametrize("outcome", ["no_answer", "meeting_booked"])
def test_an_outcome_of_the_last_steps_touch_still_acts(start: Start, outcome: str) -> None:
    h = start({"last-call": LAST_CALL, "after-meeting": AFTER_MEETING})
    _enroll(h)
    h.run_days(3)
    call = h.touches()[-1]
    assert (call.step_index, call.channel, call.status) == (1, "call", TouchStatus.sent)
    _outcome(h, call, outcome)
    if outcome == "no_answer":
        assert [t.iteration for t in h.touches() if t.step_index == 1] == [0, 1]
    else:
        assert [e.cadence_name for e in h.enrollments()] == ["last-call", "after-meeting"]


def test_a_then_outcome_naming_an_unknown_cadence_is_a_located_load_error(tmp_path: Path) -> None:
    (tmp_path / "talks.yaml").write_text(TALKS.replace("then: after-meeting", "then: nowhere"))
    with pytest.raises(RulesError) as caught:
        ruleset.load([tmp_path], REPO / "templates")
    [problem] = caught.value.problems
    assert problem.message == "steps.0.on_outcome.meeting_booked.then names unknown cadence 'nowhere'"
    assert problem.file.endswith("talks.yaml")
    assert (problem.line, problem.column) == (12, 30)


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("{}", "say what the outcome does"),
        ("{exit: false}", "say what the outcome does"),
        (
            "{retry_after: 1 day, max: 2, exit: true}",
            "an outcome either retries the step or ends the cadence",
        ),
        ("{retry_after: 1 day, max: 2, then: after-meeting}", "an outcome either retries the step or ends"),
    ],
)
def test_an_outcome_rule_that_does_nothing_or_two_things_is_a_located_error(rule: str, message: str) -> None:
    [problem] = _problems(TALKS.replace("{exit: true}", rule))
    assert problem.message.startswith(f"steps.0.on_outcome.not_interested: {message}")
    assert (problem.line, problem.column) == (11, 23)


def test_lint_reports_a_cycle_through_a_steps_then(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "rules"
    folder.mkdir()
    (folder / "a.yaml").write_text(
        _cadence(
            "a",
            "steps:\n"
            + _step("day: 0", extra="    on_outcome:\n      replied: {then: b}\n")
            + _step("day: 3", "email/deal-03-case-study", "A case study."),
        )
    )
    (folder / "b.yaml").write_text(
        _cadence("b", "steps:\n" + _step("day: 0"), calendar=CALENDAR + "then: {replied: a}\n", enroll="null")
    )
    found = lint.report([folder], REPO / "templates")
    assert found.cadences == ["a", "b"]
    cycles = [p for p in found.problems if "closes a cycle" in p.message]
    assert [(Path(p.file).name, p.severity) for p in cycles] == [("a.yaml", "error"), ("b.yaml", "error")]
    assert cycles[0].message.startswith(
        "steps.0.on_outcome.replied.then closes a cycle: a (steps.0.on_outcome"
    )
    assert cycles[0].line == 10


# --- 6. repeat ------------------------------------------------------------------------------------------


def _nurture(
    repeat: str, steps: str = "steps:\n" + _step("day: 0", "email/nurture-01-rollout-checklist")
) -> str:
    content = (
        "  content:\n"
        "    - {channel: email, template: email/nurture-02-benchmark, reason: A benchmark.}\n"
        "    - {channel: email, template: email/nurture-03-three-mistakes, reason: Three mistakes.}\n"
    )
    return _cadence("nurture", f"{steps}repeat:\n{repeat}{content}")


def test_repeat_rotates_through_its_content_every_period_up_to_times(start: Start) -> None:
    h = start({"nurture": _nurture("  every: 1 week\n  times: 5\n")})
    enrollment = _enroll(h)
    h.run_days(70)
    touches = h.touches(enrollment)
    assert [t.step_index for t in touches] == [0, 1, 2, 3, 4, 5]
    benchmark, mistakes = "email/nurture-02-benchmark", "email/nurture-03-three-mistakes"
    assert [t.template for t in touches] == [
        "email/nurture-01-rollout-checklist",
        benchmark,
        mistakes,
        benchmark,
        mistakes,
        benchmark,
    ]
    assert [t.reason for t in touches[1:3]] == ["A benchmark.", "Three mistakes."]
    assert {t.status for t in touches} == {TouchStatus.sent}
    # Each a week after the one before it went out.
    assert [_local(t.finished_at) for t in touches] == [
        f"Mon {day} 09:00" for day in ("23 Nov", "30 Nov", "07 Dec", "14 Dec", "21 Dec", "28 Dec")
    ]
    [done] = h.enrollments()
    assert (done.status, done.end_reason) == (EnrollmentStatus.completed, "all steps done")


def test_repeat_until_a_deal_field_ends_the_enrollment_at_send_time(start: Start) -> None:
    h = start({"nurture": _nurture('  every: 1 week\n  until: deal.status == "won"\n')})
    enrollment = _enroll(h)
    h.run_days(1)
    won = deal_event("evt-won", type="deal.won", deal_id="d-1", contact_id="c-1", status="won")
    assert h.post("/webhooks/generic", won).status_code == 202
    [active] = h.enrollments()
    assert active.status == EnrollmentStatus.active  # no `then` for won: the repeat's goal ends it
    h.run_days(14)
    first, second = h.touches(enrollment)
    assert first.status == TouchStatus.sent
    assert (second.status, second.status_reason) == (
        TouchStatus.cancelled,
        'repeat until: deal.status == "won"',
    )
    [done] = h.enrollments()
    assert (done.status, done.end_reason) == (
        EnrollmentStatus.completed,
        'repeat until: deal.status == "won"',
    )


def test_repeat_until_a_contact_field_stops_it_when_the_next_touch_is_planned(start: Start) -> None:
    h = start({"nurture": _nurture("  every: 1 week\n  until: contact.customer\n")})
    enrollment = _enroll(h)
    updated = {"event_id": "evt-2", "type": "contact.updated", "contact": {"id": "c-1", "customer": True}}
    assert h.post("/webhooks/generic", updated).status_code == 202
    h.run_days(14)
    # The goal does not stop the steps: only the repeat that follows them.
    [step] = h.touches(enrollment)
    assert step.status == TouchStatus.sent
    [done] = h.enrollments()
    assert (done.status, done.end_reason) == (EnrollmentStatus.completed, "repeat until: contact.customer")


def test_a_cadence_of_only_a_repeat_is_valid_and_runs(start: Start) -> None:
    h = start({"nurture": _nurture("  every: 10 days\n  times: 3\n", steps="")})
    enrollment = _enroll(h)
    h.run_days(60)
    touches = h.touches(enrollment)
    assert [(t.step_index, t.template) for t in touches] == [
        (0, "email/nurture-02-benchmark"),
        (1, "email/nurture-03-three-mistakes"),
        (2, "email/nurture-02-benchmark"),
    ]
    # Without steps, the first touch is one period after the enrollment started.
    assert [_local(t.finished_at) for t in touches] == [
        "Thu 03 Dec 09:00",
        "Sun 13 Dec 09:00",
        "Wed 23 Dec 09:00",
    ]


def test_a_repeat_whose_goal_holds_at_enrollment_completes_it_without_a_touch(start: Start) -> None:
    h = start({"nurture": _nurture("  every: 1 week\n  until: contact.customer\n", steps="")})
    enrollment = _enroll(h, contact={"customer": True})
    assert h.touches(enrollment) == []
    [done] = h.enrollments()
    assert (done.status, done.end_reason) == (EnrollmentStatus.completed, "repeat until: contact.customer")


def test_a_cadence_without_steps_or_repeat_is_a_located_error() -> None:
    [problem] = _problems(_cadence("x", ""))
    assert problem.message == "document: a cadence needs `steps`, a `repeat`, or both"
    assert (problem.line, problem.column) == (1, 1)


# --- 7. budget ------------------------------------------------------------------------------------------


def test_a_touch_over_the_monthly_budget_waits_for_next_months_first_slot(start: Start) -> None:
    steps = "".join(_step(f"day: {d}", reason=f"News {d}.") for d in range(4))
    h = start({"budgeted": _cadence("budgeted", f"budget: {{per_month: 2}}\nsteps:\n{steps}")})
    enrollment = _enroll(h)
    h.run_days(5)
    touches = h.touches(enrollment)
    assert [t.status for t in touches] == [TouchStatus.sent, TouchStatus.sent, TouchStatus.planned]
    third = touches[2]
    assert third.status_reason == "deferred: budget of 2 a month spent"
    assert _local(third.due_at) == "Tue 01 Dec 09:00"
    h.run_days(10)
    touches = h.touches(enrollment)
    assert [t.status for t in touches] == [TouchStatus.sent] * 4
    assert [_local(t.finished_at) for t in touches] == [
        "Mon 23 Nov 09:00",
        "Tue 24 Nov 09:00",
        "Tue 01 Dec 09:00",
        "Wed 02 Dec 09:00",
    ]


# --- 8. variants ----------------------------------------------------------------------------------------

VARIANT_TEMPLATES = {
    "email/a.txt": "Subject: Variant A\n\n{{ reason }}\n",
    "email/a.html": "<p>{{ reason }}</p>\n",
    "email/b.txt": "Subject: Variant B\n\n{{ reason }}\n",
    "email/b.html": "<p>{{ reason }}</p>\n",
    "sms/b.txt": "{{ reason }} (text)\n",
    "call/a.md": "# Call A\n\n{{ reason }}\n",
    "call/b.md": "# Call B\n\n{{ reason }}\n",
}


@pytest.fixture
def templates(tmp_path: Path) -> Path:
    root = tmp_path / "templates"
    for name, text in VARIANT_TEMPLATES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


def _ab(a: int = 1, b: int = 1, b_extra: str = "template: email/b", template: str = "email/a") -> str:
    variants = (
        f"    variants:\n      - {{name: a, weight: {a}}}\n      - {{name: b, weight: {b}, {b_extra}}}\n"
    )
    return _cadence("ab", "steps:\n" + _step("day: 0", template, "The offer.", variants))


def test_variants_are_drawn_by_weight_and_rendered_with_their_template(start: Start, templates: Path) -> None:
    h = start({"ab": _ab()}, templates=templates)
    for n in range(1, 201):
        _enroll(h, n)
    touches = h.touches()
    assert len(touches) == 200
    assert {(t.variant, t.template) for t in touches} == {("a", "email/a"), ("b", "email/b")}
    assert 60 < sum(t.variant == "a" for t in touches) < 140
    # Sending renders each touch with its variant's template.
    h.run_days(0.5)
    sent = h.touches()[:10]
    assert {t.status for t in sent} == {TouchStatus.sent}
    assert [_subject(h, t) for t in sent] == [f"Variant {t.variant.upper()}" for t in sent if t.variant]


@pytest.mark.parametrize(("a", "b", "expected"), [(1, 0, "a"), (0, 3, "b")])
def test_a_variant_of_weight_zero_is_never_drawn(
    start: Start, templates: Path, a: int, b: int, expected: str
) -> None:
    h = start({"ab": _ab(a, b)}, templates=templates)
    for n in range(1, 31):
        _enroll(h, n)
    assert {t.variant for t in h.touches()} == {expected}


def test_the_same_enrollment_and_step_draw_the_same_variant_on_any_service(
    start: Start, templates: Path
) -> None:
    drawn = []
    for _ in range(2):
        h = start({"ab": _ab()}, templates=templates)
        for n in range(1, 21):
            _enroll(h, n)
        drawn.append([(t.enrollment_id, t.variant) for t in h.touches()])
    assert drawn[0] == drawn[1]
    assert {v for _, v in drawn[0]} == {"a", "b"}


def test_a_variant_may_change_the_channel(start: Start, templates: Path) -> None:
    h = start({"ab": _ab(0, 1, "channel: sms, template: sms/b")}, templates=templates)
    enrollment = _enroll(h)
    h.run_days(1)
    [touch] = h.touches(enrollment)
    assert (touch.status, touch.channel, touch.template, touch.variant) == ("sent", "sms", "sms/b", "b")
    assert [line["text"] for line in _sms_lines(h)] == ["The offer. (text)"]


def test_a_retry_keeps_the_variant(start: Start, templates: Path) -> None:
    text = _ab(b_extra="template: call/b", template="call/a").replace(
        "    variants:", "    on_outcome:\n      no_answer: {retry_after: 1 day, max: 1}\n    variants:"
    ) + _step("day: 5", "email/a", "The recap.")  # a step to come keeps the enrollment active
    h = start({"ab": text}, templates=templates)
    for n in range(1, 11):
        _enroll(h, n)
    h.run_days(0.5)
    firsts = [t for t in h.touches() if t.step_index == 0]
    assert {t.variant for t in firsts} == {"a", "b"}
    for touch in firsts:
        _outcome(h, touch, "no_answer")
    retries = {t.enrollment_id: t for t in h.touches() if t.iteration == 1}
    assert [(retries[t.enrollment_id].variant, retries[t.enrollment_id].template) for t in firsts] == [
        (t.variant, t.template) for t in firsts
    ]


def test_a_variant_that_changes_the_channel_without_a_template_is_an_error() -> None:
    [problem] = _problems(_ab(b_extra="channel: sms"))
    assert problem.message == "steps.0.variants.1 changes the channel but not the template"
    assert (problem.line, problem.column) == (11, 9)


def test_variants_that_all_weigh_nothing_are_an_error() -> None:
    [problem] = _problems(_ab(0, 0))
    assert problem.message == "steps.0: every variant has weight 0: give at least one a weight"


def test_migration_0002_adds_the_variant_column(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'variant.db'}"
    db = store.create_engine(url)
    try:
        store.migrate(db)
        [variant] = [c for c in sa.inspect(db).get_columns("touch") if c["name"] == "variant"]
        assert variant["nullable"] and variant["type"].length == 32
        config = store.alembic_config(url)
        with db.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, "0001")
        assert "variant" not in {c["name"] for c in sa.inspect(db).get_columns("touch")}
    finally:
        db.dispose()


# --- 9. the timeline ------------------------------------------------------------------------------------


def test_the_timeline_projects_after_steps_from_the_touch_before(start: Start) -> None:
    h = start({"gaps": GAPS})
    enrollment = _enroll(h)
    touches = _timeline(h, enrollment)["touches"]
    assert [(t["step"], t["status"]) for t in touches] == [
        (0, "planned"),
        (1, "projected"),
        (2, "projected"),
        (3, "projected"),
    ]
    assert [_local(datetime.fromisoformat(t["due_at"])) for t in touches] == [
        "Mon 23 Nov 09:00",
        "Thu 26 Nov 09:00",
        "Mon 30 Nov 09:00",
        "Mon 07 Dec 09:00",
    ]


def test_the_timeline_projects_the_next_repeats_with_their_variants(start: Start, templates: Path) -> None:
    text = _cadence(
        "ab",
        """\
repeat:
  every: 1 week
  content:
    - channel: email
      template: email/a
      reason: The offer.
      variants: [{name: a}, {name: b, template: email/b}]
""",
    )
    h = start({"ab": text}, templates=templates)
    enrollments = [_enroll(h, n) for n in range(1, 11)]
    seen = set()
    for enrollment in enrollments:
        touches = _timeline(h, enrollment)["touches"]
        assert [t["status"] for t in touches] == ["planned", "projected", "projected", "projected"]
        assert [t["step"] for t in touches] == [0, 1, 2, 3]
        for t in touches:
            assert t["template"] == f"email/{t['variant']}"
            seen.add(t["variant"])
    assert seen == {"a", "b"}
    # What the timeline projected is what the touch gets when it is planned.
    projected = {(e, t["step"]): t["variant"] for e in enrollments for t in _timeline(h, e)["touches"]}
    h.run_days(22)
    planned = {(t.enrollment_id, t.step_index): t.variant for t in h.touches()}
    assert {key: planned.get(key) for key in projected} == projected


def test_the_timeline_keeps_projecting_repeats_later_on(start: Start) -> None:
    h = start({"nurture": _nurture("  every: 1 week\n", steps="")})
    enrollment = _enroll(h)
    h.run_days(29)  # four touches sent (one a week), the fifth planned
    touches = _timeline(h, enrollment)["touches"]
    assert [t["status"] for t in touches][:5] == ["sent"] * 4 + ["planned"]
    assert [t["step"] for t in touches if t["status"] == "projected"][:1] == [5]


def test_a_projected_steps_status_reason_names_when_and_skip_when(start: Start) -> None:
    extra = '    when: contact.age >= 50\n    skip_when: deal.stage == "negotiation"\n'
    h = start({"probe": _cadence("probe", "steps:\n" + _step("day: 0") + _step("day: 3", extra=extra))})
    enrollment = _enroll(h)
    projected = _timeline(h, enrollment)["touches"][1]
    assert projected["status"] == "projected"
    assert "contact.age >= 50" in projected["status_reason"]
    assert 'deal.stage == "negotiation"' in projected["status_reason"]
