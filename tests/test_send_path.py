"""The send path under trouble: bad templates, failing providers, outages, blocks, races."""

from __future__ import annotations

import shutil
import threading
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pydantic
import pytest
import sqlalchemy as sa
from harness import MONDAY, REPO, Harness, deal_event, make_settings, start_harness
from sqlmodel import select

from cadence import store, timing
from cadence.dispatch import MAX_ATTEMPTS
from cadence.models import CallTask, Contact, Touch, TouchStatus
from cadence.settings import Settings
from channels import TransientError

MOSCOW = ZoneInfo("Europe/Moscow")


@pytest.fixture
def harness(tmp_path: Path) -> Any:
    h = start_harness(make_settings(tmp_path))
    yield h
    h.stop()


def _queue_first_touch(h: Harness) -> Touch:
    """Queue the first touch without a broker message, so only the test's own dispatch calls send it."""
    h.post("/webhooks/generic", deal_event())
    with store.session(h.service.db) as s:
        touch = s.exec(select(Touch)).one()
        touch.status, touch.queued_at = TouchStatus.queued, h.clock()
    return touch


def _templates_with(tmp_path: Path, name: str, extra: str, templates: Path | None = None) -> Path:
    if templates is None:
        templates = tmp_path / "templates"
        shutil.copytree(REPO / "templates", templates)
    (templates / name).write_text((templates / name).read_text() + extra)
    return templates


def test_a_template_that_raises_fails_its_touch_and_the_cadence_moves_on(tmp_path: Path) -> None:
    # Both variants of open-deal's opening email are broken, whichever one the enrollment draws.
    raises = '{{ "{0} {1}".format(1) }}\n'
    templates = _templates_with(tmp_path, "email/deal-01-proposal-recap.txt", raises)
    _templates_with(tmp_path, "email/deal-01-open-question.txt", raises, templates)
    h = start_harness(make_settings(tmp_path, templates_dir=templates))
    try:
        h.post("/webhooks/generic", deal_event())
        h.run_days(1)
        failed, following = h.touches()
        assert failed.status == TouchStatus.failed
        assert failed.status_reason is not None and "IndexError" in failed.status_reason
        assert failed.attempts == 1
        assert (following.step_index, following.status) == (1, TouchStatus.planned)
    finally:
        h.stop()


class _Broken:
    """A provider that fails with something other than a DeliveryError (a full disk, a bug)."""

    idempotent = True

    def __init__(self, real: Any) -> None:
        self.real = real
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def send(self, message: Any) -> Any:
        self.calls += 1
        raise OSError(28, "No space left on device")


def test_an_unexpected_send_error_is_retried_then_failed_after_the_attempt_cap(harness: Harness) -> None:
    broken = _Broken(harness.service.channels["email"])
    harness.service.dispatcher.channels = {**harness.service.channels, "email": broken}
    touch = _queue_first_touch(harness)
    for _ in range(MAX_ATTEMPTS - 1):
        with pytest.raises(TransientError, match="No space left"):
            harness.service.dispatcher.dispatch(touch.id or 0)
    result = harness.service.dispatcher.dispatch(touch.id or 0)
    assert result.status == TouchStatus.failed
    failed, following = harness.touches()
    assert (failed.status, failed.attempts, broken.calls) == (TouchStatus.failed, MAX_ATTEMPTS, MAX_ATTEMPTS)
    assert failed.status_reason is not None and failed.status_reason.startswith(
        f"gave up after {MAX_ATTEMPTS}"
    )
    assert following.status == TouchStatus.planned


def test_the_sweep_fails_a_touch_that_has_had_all_its_attempts(harness: Harness) -> None:
    touch = _queue_first_touch(harness)  # queued, and its message lost
    with store.session(harness.service.db) as s:
        s.get_one(Touch, touch.id).attempts = MAX_ATTEMPTS
    harness.clock.advance(timedelta(seconds=harness.service.settings.lease_seconds + 1))
    tick = harness.service.scheduler.tick()
    assert (tick.requeued, tick.failed) == ([], [touch.id])
    failed, following = harness.touches()
    assert failed.status == TouchStatus.failed and following.status == TouchStatus.planned


def test_a_post_send_database_error_is_retried_so_the_delivery_is_recorded_once(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    touch = _queue_first_touch(harness)
    dispatcher = harness.service.dispatcher
    real_finish = dispatcher.finish
    failures = iter([sa.exc.OperationalError("UPDATE touch", {}, Exception("database is locked"))])

    def flaky_finish(*args: Any, **kwargs: Any) -> Any:
        for error in failures:
            raise error
        return real_finish(*args, **kwargs)

    monkeypatch.setattr(dispatcher, "finish", flaky_finish)
    monkeypatch.setattr("cadence.dispatch.RECORD_BACKOFF_SECONDS", 0)
    assert dispatcher.dispatch(touch.id or 0).status == TouchStatus.sent
    sent, _ = harness.touches()
    assert sent.status == TouchStatus.sent and sent.receipt["provider"] == "outbox"
    assert len(list((harness.service.settings.outbox_dir / "email").glob("*.eml"))) == 1


def test_after_an_outage_touches_wait_for_the_send_window_instead_of_bursting(harness: Harness) -> None:
    harness.post("/webhooks/generic", deal_event())
    # The scheduler was down for 40 days and comes back at 23:00 in Moscow.
    harness.clock.set(
        (MONDAY + timedelta(days=40)).astimezone(MOSCOW).replace(hour=23).astimezone(MONDAY.tzinfo)
    )
    harness.run_days(40)
    sent = [t for t in harness.touches() if t.status == TouchStatus.sent]
    assert len(sent) >= 7
    for touch in sent:
        local = (touch.finished_at or touch.due_at).astimezone(MOSCOW)
        assert 9 <= local.hour < 18, f"step {touch.step_index} sent at {local}"
        assert timing.is_business_day(local.date(), "RU"), f"step {touch.step_index} sent on {local.date()}"
    # The backlog keeps the cadence's spacing from the day it resumes instead of firing all at once.
    days = [t.finished_at.astimezone(MOSCOW).date() for t in sent if t.finished_at]
    assert len(set(days)) == len(days)


def test_an_unsubscribed_contact_is_not_enrolled_again_by_the_same_trigger(harness: Harness) -> None:
    harness.post("/webhooks/generic", deal_event())
    [first] = harness.enrollments()
    harness.post("/outcomes", {"enrollment_id": first.id, "outcome": "unsubscribed"})
    again = harness.post("/webhooks/generic", deal_event("evt-2", amount=15000))
    assert again.status_code == 202 and again.json()["enrolled"] == []
    assert len(harness.enrollments()) == 1


def test_unsubscribed_blocks_email_but_a_call_still_reaches_the_manager(harness: Harness) -> None:
    harness.post("/webhooks/generic", deal_event())
    [first] = harness.enrollments()
    harness.post("/outcomes", {"enrollment_id": first.id, "outcome": "unsubscribed"})
    harness.post("/webhooks/generic", deal_event("evt-won", "deal.won", status="won"))
    onboarding = harness.enrollments()[-1]
    assert onboarding.cadence_name == "onboarding"
    harness.run_days(4)
    email, call = harness.touches(onboarding.id)[:2]
    assert (email.channel, email.status, email.status_reason) == (
        "email",
        TouchStatus.skipped,
        "contact is blocked: unsubscribed",
    )
    assert (call.channel, call.status) == ("call", TouchStatus.sent)


def test_do_not_contact_ends_every_touch_and_every_new_enrollment(harness: Harness) -> None:
    harness.post("/webhooks/generic", deal_event())
    [first] = harness.enrollments()
    harness.run_days(1)
    harness.post("/outcomes", {"enrollment_id": first.id, "outcome": "do_not_contact"})
    won = harness.post("/webhooks/generic", deal_event("evt-won", "deal.won", status="won"))
    assert won.json()["enrolled"] == []
    assert [e.cadence_name for e in harness.enrollments()] == ["open-deal"]


def test_a_deal_that_comes_back_after_being_lost_is_enrolled_again(harness: Harness) -> None:
    harness.post("/webhooks/generic", deal_event())
    harness.post("/webhooks/generic", deal_event("evt-lost", "deal.lost", status="lost"))
    back = harness.post("/webhooks/generic", deal_event("evt-back", status="open"))
    assert len(back.json()["enrolled"]) == 1
    names = [(e.cadence_name, e.status) for e in harness.enrollments()]
    assert names == [
        ("open-deal", "exited"),
        ("lost-prospect-nurture", "exited"),
        ("open-deal", "active"),
    ]


def test_ending_an_enrollment_cancels_its_open_call_tasks(harness: Harness) -> None:
    harness.post("/webhooks/generic", deal_event())
    harness.run_days(3)
    with store.session(harness.service.db) as s:
        [task] = s.exec(select(CallTask)).all()
    assert task.status == "open"
    [enrollment] = harness.enrollments()
    harness.post("/outcomes", {"enrollment_id": enrollment.id, "outcome": "not_interested"})
    with store.session(harness.service.db) as s:
        assert s.get_one(CallTask, task.id).status == "cancelled"
    listed = harness.client.get("/call-tasks", params={"owner": "ivan", "date": task.due_date.isoformat()})
    assert listed.json()["tasks"] == []


def test_a_then_target_missing_from_new_rules_ends_without_moving_and_keeps_the_status(
    tmp_path: Path,
) -> None:
    rules = tmp_path / "rules"
    shutil.copytree(REPO / "rules", rules)
    h = start_harness(make_settings(tmp_path, rules_dir=rules))
    try:
        h.post("/webhooks/generic", deal_event())
        (rules / "lost-prospect-nurture.yaml").unlink()
        for cadence in rules.glob("*.yaml"):
            cadence.write_text(cadence.read_text().replace("  lost: lost-prospect-nurture\n", ""))
        h.service.reload_rules()
        lost = h.post("/webhooks/generic", deal_event("evt-lost", "deal.lost", status="lost"))
        assert lost.status_code == 202, lost.text
        [enrollment] = h.enrollments()
        assert (enrollment.status, enrollment.end_reason) == ("exited", "deal lost")
    finally:
        h.stop()


def test_the_lease_must_outlast_a_send() -> None:
    with pytest.raises(pydantic.ValidationError, match="lease_seconds"):
        Settings(_env_file=None, lease_seconds=60)


@pytest.mark.integration
def test_simultaneous_webhooks_for_one_new_contact_on_postgresql(tmp_path: Path, postgres_url: str) -> None:
    h = start_harness(make_settings(tmp_path, database_url=postgres_url))
    try:
        results: list[Any] = []
        start = threading.Barrier(8)

        def deliver(n: int) -> None:
            body = deal_event(f"evt-{n}", deal_id=f"d-{n}")
            start.wait()
            results.append(h.service.inbox.receive("generic", __import__("json").dumps(body).encode()))

        threads = [threading.Thread(target=deliver, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        h.drain()  # deliveries that arrived together are acted on by the worker threads
        assert [r.rejection for r in results] == [None] * 8
        with store.session(h.service.db) as s:
            assert len(s.exec(select(Contact)).all()) == 1
        assert Counter(e.cadence_name for e in h.enrollments()) == {"open-deal": 8}
    finally:
        h.stop()


def test_a_call_task_and_its_touchs_record_commit_together_or_not_at_all(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness.post("/webhooks/generic", deal_event())
    harness.run_days(1)  # the day-0 email goes; the day-2 call waits
    with store.session(harness.service.db) as s:
        call = s.exec(select(Touch).where(Touch.channel == "call")).one()
        call.status, call.queued_at = TouchStatus.queued, call.due_at
        call_id, due = call.id or 0, call.due_at
    harness.clock.set(due)
    dispatcher = harness.service.dispatcher
    real_finish = dispatcher.finish
    failures = iter([RuntimeError("planning the next step broke")])

    def failing_finish(*args: Any, **kwargs: Any) -> Any:
        for error in failures:
            raise error
        return real_finish(*args, **kwargs)

    monkeypatch.setattr(dispatcher, "finish", failing_finish)
    with pytest.raises(RuntimeError, match="planning the next step broke"):
        dispatcher.dispatch(call_id)
    with store.session(harness.service.db) as s:
        assert s.exec(select(CallTask)).all() == []  # the task went with the failed record
        touch = s.get_one(Touch, call_id)
        assert (touch.status, touch.attempts) == (TouchStatus.queued, 1)

    assert dispatcher.dispatch(call_id).status == TouchStatus.sent
    with store.session(harness.service.db) as s:
        [task] = s.exec(select(CallTask)).all()
        touch = s.get_one(Touch, call_id)
        assert task.touch_id == call_id
        assert (touch.status, touch.receipt["reference"]) == (TouchStatus.sent, f"call_task:{task.id}")
