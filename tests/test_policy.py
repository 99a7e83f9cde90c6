"""The policy every cadence obeys: blocks in time, quiet hours, caps across cadences, call priority."""

from __future__ import annotations

import shutil
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from harness import MONDAY, REPO, Harness, deal_event, make_settings, start_harness
from sqlmodel import select

from cadence import rules, store
from cadence.errors import RulesError
from cadence.models import CallTask, Touch, TouchStatus
from cadence.policy import Policy, parse
from channels import DeliveryError

MOSCOW = ZoneInfo("Europe/Moscow")
SMS_STEP = (
    "  - day: 0\n    channel: sms\n    template: sms/deal-05-round-table-invite\n    reason: An invitation.\n"
)


def _problems(text: str) -> list[str]:
    with pytest.raises(RulesError) as caught:
        parse(text, "policy.yaml")
    return [str(p) for p in caught.value.problems]


def test_without_a_policy_file_the_defaults_apply(tmp_path: Path) -> None:
    loaded = rules.load([REPO / "examples" / "tour" / "tour.yaml"], REPO / "templates")
    assert loaded.policy == Policy()
    assert [(b.after, b.channels) for b in Policy().blocks][:2] == [
        ("do_not_contact", "all"),
        ("unsubscribed", ("email",)),
    ]
    assert Policy().caps.per_day == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "blocks:\n  - after: not_interested\n    chanels: [call]\n",
            "policy.yaml:3:5: error: unknown key 'chanels'",
        ),
        ("blocks:\n  - after: not_interestd\n", "policy.yaml:2:12: error: blocks.0.after"),
        (
            "blocks:\n  - after: bounced\n    for: forever\n",
            "policy.yaml:3:10: error: blocks.0.for: 'forever' is not a duration",
        ),
        (
            'quiet_hours:\n  sms: "20:00-09:00"\n',
            "policy.yaml:2:8: error: quiet_hours.sms: window '20:00-09:00' ends before",
        ),
        ("caps:\n  per_day: 0\n", "policy.yaml:2:12: error: caps.per_day"),
        ("call_priority: deal.amount *\n", "policy.yaml:1:16: error: call_priority: invalid expression"),
        (
            "blocks:\n  - {after: bounced, channels: [email]}\n  - {after: bounced, channels: [email]}\n",
            "policy.yaml:3:5: error: blocks.1 repeats an earlier block after 'bounced'",
        ),
    ],
)
def test_policy_errors_say_what_and_where(text: str, expected: str) -> None:
    assert any(problem.startswith(expected) for problem in _problems(text)), _problems(text)


def test_an_unknown_policy_key_gets_the_closest_valid_one() -> None:
    [problem] = _problems("quiet_hour:\n  sms: '09:00-20:00'\n")
    assert "did you mean 'quiet_hours'?" in problem


def test_quiet_hours_that_leave_a_step_no_time_are_an_error_at_the_step(tmp_path: Path) -> None:
    folder = tmp_path / "rules"
    folder.mkdir()
    (folder / "policy.yaml").write_text('quiet_hours:\n  sms: "09:00-12:00"\n')
    (folder / "late.yaml").write_text('cadence: late\ncalendar: {window: "18:00-21:00"}\nsteps:\n' + SMS_STEP)
    with pytest.raises(RulesError) as caught:
        rules.load([folder], REPO / "templates")
    [problem] = caught.value.problems
    assert (problem.line, problem.column) == (5, 14)
    assert "the policy's sms hours 09:00-12:00 leave no time in window 18:00-21:00" in problem.message


@pytest.fixture
def harness(tmp_path: Path) -> Any:
    h = start_harness(make_settings(tmp_path))
    yield h
    h.stop()


def _enrollment_for(h: Harness, body: dict[str, Any]) -> int:
    response = h.post("/webhooks/generic", body)
    [enrolled] = response.json()["enrolled"]
    return int(enrolled)


def test_not_interested_blocks_calls_for_a_year_and_lets_them_through_after(harness: Harness) -> None:
    first = _enrollment_for(harness, deal_event())
    harness.post("/outcomes", {"enrollment_id": first, "outcome": "not_interested"})
    onboarding = _enrollment_for(harness, deal_event("evt-won", "deal.won", status="won"))
    harness.run_days(4)
    call = next(t for t in harness.touches(onboarding) if t.channel == "call")
    assert call.status == TouchStatus.skipped
    expected_until = (MONDAY + timedelta(days=365)).date().isoformat()
    assert call.status_reason == f"contact is blocked: not_interested until {expected_until}"
    email = harness.touches(onboarding)[0]
    assert email.status == TouchStatus.sent  # the block is on calls only

    harness.clock.set(MONDAY + timedelta(days=366))
    later = _enrollment_for(harness, deal_event("evt-d2", deal_id="d-2"))
    harness.run_days(30)  # the caps spread this contact's touches out; the call is no longer blocked
    calls = [t for t in harness.touches(later) if t.channel == "call"]
    assert calls and all(t.status == TouchStatus.sent for t in calls)


def test_warm_letters_start_once_when_the_not_interested_block_ends(harness: Harness) -> None:
    first = _enrollment_for(harness, deal_event())
    harness.post("/outcomes", {"enrollment_id": first, "outcome": "not_interested"})
    harness.clock.set(MONDAY + timedelta(days=364))
    assert harness.service.scheduler.tick().enrolled == []  # still inside the year: left alone
    harness.clock.set(MONDAY + timedelta(days=365, hours=1))
    [warm] = harness.service.scheduler.tick().enrolled
    assert harness.service.scheduler.tick().enrolled == []  # one block, one ending: acted on once
    enrollment = next(e for e in harness.enrollments() if e.id == warm)
    opening = harness.enrollments()[0]
    assert (enrollment.cadence_name, enrollment.origin, enrollment.deal_id) == (
        "warm-letters",
        "block ended: not_interested",
        opening.deal_id,
    )
    harness.run_days(1)
    [letter] = harness.touches(warm)[:1]
    assert (letter.channel, letter.status) == ("letter", TouchStatus.sent)


def test_a_block_ending_for_another_reason_starts_no_warm_letters(harness: Harness) -> None:
    first = _enrollment_for(harness, deal_event())
    harness.post("/outcomes", {"enrollment_id": first, "outcome": "bounced"})  # email blocked for 90 days
    harness.clock.set(MONDAY + timedelta(days=91))
    assert harness.service.scheduler.tick().enrolled == []
    assert {e.cadence_name for e in harness.enrollments()} == {"open-deal"}


def test_a_block_for_all_channels_stops_new_enrollments_and_due_touches(harness: Harness) -> None:
    first = _enrollment_for(harness, deal_event())
    other = _enrollment_for(harness, deal_event("evt-d2", deal_id="d-2"))
    harness.post("/outcomes", {"enrollment_id": first, "outcome": "do_not_contact"})
    assert harness.post("/webhooks/generic", deal_event("evt-d3", deal_id="d-3")).json()["enrolled"] == []
    harness.run_days(1)
    [touch] = harness.touches(other)[:1]
    assert (touch.status, touch.status_reason) == (TouchStatus.skipped, "contact is blocked: do_not_contact")


def test_quiet_hours_move_an_sms_into_its_channel_hours(tmp_path: Path) -> None:
    folder = tmp_path / "rules"
    shutil.copytree(REPO / "rules", folder)
    (folder / "early.yaml").write_text(
        'cadence: early\nenroll: {on: deal.created}\ncalendar: {window: "07:00-22:00"}\nsteps:\n' + SMS_STEP
    )
    # 07:30 in Moscow: inside the cadence's window, before the policy lets SMS out at 09:00.
    h = start_harness(make_settings(tmp_path, rules_dir=folder), start=MONDAY.replace(hour=4, minute=30))
    try:
        enrollment = _enrollment_for(h, deal_event(type="deal.created"))
        [touch] = h.touches(enrollment)
        assert touch.due_at.astimezone(MOSCOW).strftime("%H:%M") == "09:00"
        h.run_days(1)
        [sent] = h.touches(enrollment)
        assert sent.status == TouchStatus.sent
        assert sent.finished_at is not None and sent.finished_at.astimezone(MOSCOW).hour == 9
    finally:
        h.stop()


def test_one_touch_a_day_across_cadences(harness: Harness) -> None:
    """Two deals of one contact enroll the same morning: the second touch waits for the next day."""
    a = _enrollment_for(harness, deal_event())
    b = _enrollment_for(harness, deal_event("evt-d2", deal_id="d-2"))
    harness.run_until(MONDAY + timedelta(hours=12))
    # Both were due at once; whichever worker took the day's place first sent, the other waits.
    pair = (harness.touches(a)[0], harness.touches(b)[0])
    sent, waiting = sorted(pair, key=lambda t: t.status != TouchStatus.sent)
    assert sent.status == TouchStatus.sent
    assert waiting.status == TouchStatus.planned
    assert waiting.status_reason == "deferred: 1 touch(es) a day cap"
    assert waiting.due_at.astimezone(MOSCOW).date() == (MONDAY + timedelta(days=1)).date()
    harness.run_days(1)
    assert all(harness.touches(e)[0].status == TouchStatus.sent for e in (a, b))


def _send_first_touch(h: Harness, enrollment_id: int, together: bool) -> Touch:
    """The enrollment's first touch, queued and sent alone or as a batch of one; as it is afterwards."""
    with store.session(h.service.db) as s:
        touch = s.exec(select(Touch).where(Touch.enrollment_id == enrollment_id, Touch.step_index == 0)).one()
        touch.status, touch.queued_at = TouchStatus.queued, h.clock()
        touch_id = touch.id or 0
    if together:
        h.service.dispatcher.dispatch_many([touch_id])
    else:
        h.service.dispatcher.dispatch(touch_id)
    with store.session(h.service.db) as s:
        return s.get_one(Touch, touch_id)


@pytest.mark.parametrize("together", [False, True], ids=["alone", "batch"])
def test_a_touch_its_channel_refused_takes_no_place_in_the_caps(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, together: bool
) -> None:
    """Let go by its checks, then refused for good: nothing reached the contact, so the day's one place is
    still free for the contact's touch from another deal."""
    email = harness.service.dispatcher.channels["email"]

    def refuse(message: Any) -> Any:
        raise DeliveryError("550 mailbox unavailable")

    monkeypatch.setattr(email, "send", refuse)
    refused = _send_first_touch(harness, _enrollment_for(harness, deal_event()), together)
    assert (refused.channel, refused.status) == ("email", TouchStatus.failed)
    assert refused.cleared_at is not None  # its checks let it go
    monkeypatch.undo()

    another_deal = _enrollment_for(harness, deal_event("evt-d2", deal_id="d-2"))
    second = _send_first_touch(harness, another_deal, together)
    assert (second.channel, second.status) == ("email", TouchStatus.sent)


def _sent_per_local_day(h: Harness) -> dict[str, int]:
    days: dict[str, int] = {}
    for touch in h.touches():
        if touch.status == TouchStatus.sent and touch.cleared_at is not None:
            day = touch.cleared_at.astimezone(MOSCOW).date().isoformat()
            days[day] = days.get(day, 0) + 1
    return days


def test_caps_hold_over_weeks_of_several_cadences(harness: Harness) -> None:
    for n in range(4):
        _enrollment_for(harness, deal_event(f"evt-{n}", deal_id=f"d-{n}"))
    harness.run_days(60)
    assert max(_sent_per_local_day(harness).values()) == 1
    cleared = sorted(t.cleared_at for t in harness.touches() if t.status == TouchStatus.sent and t.cleared_at)
    for i, at in enumerate(cleared):
        in_week = [c for c in cleared[: i + 1] if c > at - timedelta(days=7)]
        assert len(in_week) <= 3, f"{len(in_week)} touches in the 7 days to {at}"


@pytest.mark.integration
def test_caps_hold_when_workers_race_on_postgresql(tmp_path: Path, postgres_url: str) -> None:
    h = start_harness(make_settings(tmp_path, database_url=postgres_url))
    try:
        for n in range(6):
            _enrollment_for(h, deal_event(f"evt-{n}", deal_id=f"d-{n}"))
        h.service.scheduler.tick()  # all six first touches queued at once
        queued = [t.id or 0 for t in h.touches()]
        threads = [threading.Thread(target=h.service.dispatcher.dispatch, args=(i,)) for i in queued]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        h.drain()
        statuses = [t.status for t in h.touches() if t.step_index == 0]
        assert statuses.count(TouchStatus.sent) == 1
        assert statuses.count(TouchStatus.planned) == 5
    finally:
        h.stop()


def test_the_call_list_puts_the_likeliest_biggest_deal_first(harness: Harness) -> None:
    folder_day = MONDAY + timedelta(days=2)
    for n, (amount, probability) in enumerate([(1000, 0.9), (50000, 0.5), (20000, 0.1)]):
        body = deal_event(
            f"evt-{n}", deal_id=f"d-{n}", contact_id=f"c-{n}", amount=amount, probability=probability
        )
        body["contact"]["email"] = f"c{n}@example.com"
        _enrollment_for(harness, body)
    harness.run_until(folder_day + timedelta(hours=10))
    listed = harness.client.get(
        "/call-tasks", params={"owner": "ivan", "date": folder_day.date().isoformat()}
    )
    tasks = listed.json()["tasks"]
    assert [t["priority"] for t in tasks] == [25000.0, 2000.0, 900.0]
    with store.session(harness.service.db) as s:
        assert len(s.exec(select(CallTask)).all()) == 3


@pytest.mark.parametrize(("channel", "email_blocked"), [("email", True), ("sms", False)])
def test_a_bounce_blocks_the_channel_that_bounced_only(
    harness: Harness, channel: str, email_blocked: bool
) -> None:
    # The shipped policy blocks email for 90 days after `bounced`; an undelivered SMS says nothing of email.
    _enrollment_for(harness, deal_event())
    harness.run_days(1)
    [touch] = harness.touches()[:1]
    with store.session(harness.service.db) as s:
        stored = s.get_one(Touch, touch.id)
        stored.channel = channel
    harness.post("/outcomes", {"touch_id": touch.id, "outcome": "bounced"})
    [enrollment] = harness.enrollments()
    with store.session(harness.service.db) as s:
        blocked = harness.service.engine.blocked(s, enrollment.contact_id, "email", harness.clock())
    assert (blocked is not None) == email_blocked
