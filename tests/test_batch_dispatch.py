"""Batches: the scheduler's touches go to a worker several to a message, and are checked, sent and recorded in
one transaction; whatever cannot go together goes alone."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from harness import REPO, Harness, array_ids, deal_event, make_settings, start_harness
from sqlmodel import Session, col, select

from cadence import broker as brokers
from cadence import store
from cadence.dispatch import _NOT_QUEUED, BATCH_SIZE, Batch, Dispatcher
from cadence.models import CadenceVersion, CallTask, Contact, Deal, Enrollment, Touch, TouchStatus
from channels import TransientError
from channels.email import EmailOutbox

#: One cadence per stage a test deal is put at: its first touch on a channel, or a choice of two.
CADENCES = {
    "email": "channel: email\n    template: email/deal-01-proposal-recap",
    "sms": "channel: sms\n    template: sms/deal-05-round-table-invite",
    "call": "channel: call\n    template: call/deal-02-walkthrough",
    "budget": "channel: email\n    template: email/deal-01-proposal-recap",
    "choice": """choose:
      - channel: sms
        template: sms/deal-05-round-table-invite
        when: (contact.age or 0) >= 90
      - channel: email
        template: email/deal-01-proposal-recap""",
}

CADENCE = """\
cadence: batch-{stage}
description: A first touch due at once, then a call two days later.
enroll:
  on: deal.stage_changed
  when: deal.stage == "{stage}"
exit:
  when: deal.status != "open"
calendar:
  window: "09:00-18:00"
  timezone: Europe/Moscow
steps:
  - day: 0
    {first}
    reason: The first touch of the test.
  - day: 2
    channel: call
    template: call/deal-02-walkthrough
    reason: A call after the first touch.
"""


@pytest.fixture(params=["sqlite", "postgresql"])
def harness(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Harness]:
    """On each database: SQLite's transaction holds the only write lock, PostgreSQL's holds rows."""
    rules = tmp_path / "rules"
    rules.mkdir()
    shutil.copy(REPO / "rules" / "policy.yaml", rules / "policy.yaml")
    for stage, first in CADENCES.items():
        budget = "budget:\n  per_month: 1\n" if stage == "budget" else ""  # a touch a month
        (rules / f"batch-{stage}.yaml").write_text(CADENCE.format(stage=stage, first=first) + budget)
    database = {} if request.param == "sqlite" else {"database_url": request.getfixturevalue("postgres_url")}
    h = start_harness(make_settings(tmp_path, rules_dir=rules, **database))
    yield h
    h.stop()


def enroll(h: Harness, stage: str, count: int, start: int = 0) -> list[int]:
    """`count` deals at `stage`, each with its own contact; the ids of their first touches, queued as the
    scheduler queues them."""
    for n in range(start, start + count):
        body = deal_event(
            f"evt-{stage}-{n}", deal_id=f"d-{stage}-{n}", contact_id=f"c-{stage}-{n}", stage=stage
        )
        body["contact"]["email"] = f"c{n}.{stage}@example.com"
        assert harness_ok(h.post("/webhooks/generic", body))
    with store.session(h.service.db) as s:
        touches = s.exec(
            select(Touch)
            .where(Touch.status == TouchStatus.planned, Touch.step_index == 0)
            .order_by(col(Touch.id))
        ).all()
        for touch in touches:
            touch.status, touch.queued_at = TouchStatus.queued, h.clock()
        return [touch.id or 0 for touch in touches]


def harness_ok(response: Any) -> bool:
    return bool(response.status_code < 300)


def touch(h: Harness, touch_id: int) -> Touch:
    with store.session(h.service.db) as s:
        return s.get_one(Touch, touch_id)


def emails(h: Harness) -> list[Path]:
    return sorted((h.service.settings.outbox_dir / "email").glob("*.eml"))


def next_steps(h: Harness) -> int:
    return sum(t.step_index == 1 for t in h.touches())


def three_emails_the_second_refused_once(h: Harness, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Three email touches queued; the second's email is refused once with a transient error, the rest go
    out. Their ids."""
    ids = enroll(h, "email", 3)
    key = touch(h, ids[1]).key
    send = EmailOutbox.send
    refused: list[str] = []

    def refuses_once(self: EmailOutbox, message: Any) -> Any:
        if message.key == key and not refused:
            refused.append(message.key)
            raise TransientError("mail relay busy")
        return send(self, message)

    monkeypatch.setattr(EmailOutbox, "send", refuses_once)
    return ids


def records_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """Recording a batch's sends fails, as on a full disk."""

    def fails(self: Dispatcher, s: Any, sent: Any) -> None:
        raise RuntimeError("the disk is full")

    monkeypatch.setattr(Dispatcher, "_record_all", fails)


def test_a_batch_takes_one_transaction_whatever_its_size(harness: Harness) -> None:
    ids = enroll(harness, "email", 8)
    commits: list[int] = []
    seen: list[str] = []
    written: list[int] = []  # the touches each UPDATE of the touch table writes

    def executes(_c: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, many: bool) -> None:
        seen.append(" ".join(statement.split()))
        if statement.startswith("UPDATE touch"):
            # The touch's id is the WHERE's parameter, the last of each row's on SQLite; PostgreSQL's one
            # statement has an array a column, the ids first.
            if "unnest" in statement:
                written.extend(array_ids(parameters[0]))
            else:
                written.extend(row[-1] for row in (parameters if many else [parameters]))

    sa.event.listen(harness.service.db, "commit", lambda _c: commits.append(1))
    sa.event.listen(harness.service.db, "before_cursor_execute", executes)
    batch = harness.service.dispatcher.dispatch_many(ids)
    assert len(commits) == 1  # the claims, late checks, sends and records, with the next steps planned
    # One statement each for the batch: reading the touches, their cadence version (read apart, not sent
    # again with each touch), and what the caps count.
    assert sum(s.startswith("SELECT touch.id") and "JOIN contact" in s for s in seen) == 1
    assert not any("JOIN cadence_version" in s for s in seen)
    assert sum(s.startswith("SELECT cadence_version.id") for s in seen) == 1
    assert sum(s.startswith("SELECT enrollment.contact_id, touch.id, touch.cleared_at") for s in seen) == 1
    # The claim is written with the record: each touch is updated once, by one statement for them all.
    assert sum(s.startswith("UPDATE touch") for s in seen) == 1
    assert sorted(written) == ids
    sent = [touch(harness, i) for i in ids]
    assert all(t.cleared_at == t.sending_at == harness.clock() and t.finished_at for t in sent)
    assert sorted(r.touch_id for r in batch.results) == ids
    assert {r.status for r in batch.results} == {TouchStatus.sent}
    assert (batch.alone, batch.retries) == ([], [])
    assert len(emails(harness)) == 8
    assert all(touch(harness, i).attempts == 1 for i in ids)
    assert next_steps(harness) == 8


def test_a_batch_plans_each_next_step_from_the_context_its_checks_read(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The contact, deal and enrollment are made into a context once a touch: by the checks, which planning
    the next step then reads too; the next steps are those planned from a context of their own."""
    ids = enroll(harness, "email", 3) + enroll(harness, "call", 2)
    engine = harness.service.engine
    context = engine.context
    made: list[int] = []
    monkeypatch.setattr(engine, "context", lambda s, e, *rows: made.append(e.id) or context(s, e, *rows))
    batch = harness.service.dispatcher.dispatch_many(ids)
    assert {r.status for r in batch.results} == {TouchStatus.sent}
    assert sorted(made) == sorted(touch(harness, i).enrollment_id for i in ids)
    with store.session(harness.service.db) as s:
        planned = s.exec(select(Touch).where(Touch.step_index == 1).order_by(col(Touch.enrollment_id))).all()
        expected = [
            engine.plan(s, s.get_one(Enrollment, t.enrollment_id), 1, harness.clock(), []) for t in planned
        ]
    assert [(t.channel, t.template, t.due_at) for t in planned] == [
        (t.channel, t.template, t.due_at) for t in expected if t is not None
    ]


def test_a_call_task_is_made_in_the_transaction_that_records_its_touch(harness: Harness) -> None:
    ids = enroll(harness, "call", 4) + enroll(harness, "email", 2)
    commits: list[int] = []
    sa.event.listen(harness.service.db, "commit", lambda _c: commits.append(1))
    batch = harness.service.dispatcher.dispatch_many(ids)
    assert len(commits) == 1
    assert sorted(r.touch_id for r in batch.results) == ids
    assert {r.status for r in batch.results} == {TouchStatus.sent}
    with store.session(harness.service.db) as s:
        tasks = s.exec(select(CallTask).order_by(col(CallTask.touch_id))).all()
    assert [task.touch_id for task in tasks] == ids[:4]
    assert [touch(harness, i).receipt["reference"] for i in ids[:4]] == [f"call_task:{t.id}" for t in tasks]
    assert all(task.script_html and task.script_html.startswith("<") for task in tasks)


def test_a_batch_inserts_its_call_tasks_and_next_touches_with_one_statement_each(harness: Harness) -> None:
    ids = enroll(harness, "call", 4) + enroll(harness, "email", 4)
    seen: list[str] = []
    sa.event.listen(
        harness.service.db, "before_cursor_execute", lambda *a: seen.append(" ".join(a[2].split()))
    )
    batch = harness.service.dispatcher.dispatch_many(ids)
    assert {r.status for r in batch.results} == {TouchStatus.sent}
    assert sum(s.startswith("INSERT INTO call_task") for s in seen) == 1
    assert sum(s.startswith("INSERT INTO touch") for s in seen) == 1
    assert next_steps(harness) == 8
    with store.session(harness.service.db) as s:
        planned = s.exec(select(Touch).where(Touch.step_index == 1).order_by(col(Touch.enrollment_id))).all()
        first = s.exec(select(Touch).where(col(Touch.id).in_(ids)).order_by(col(Touch.enrollment_id))).all()
    # Each next touch is its own enrollment's second step, two days after its first.
    assert [t.enrollment_id for t in planned] == [t.enrollment_id for t in first]
    assert {(t.channel, t.reason, t.status) for t in planned} == {
        ("call", "A call after the first touch.", "planned")
    }
    assert all((p.due_at - f.due_at).days in (1, 2) for p, f in zip(planned, first, strict=True))


def test_a_call_task_made_before_is_kept_and_named_in_the_receipt(harness: Harness) -> None:
    ids = enroll(harness, "call", 3)
    harness.service.dispatcher.dispatch_many(ids[1:2])  # one task exists before the batch
    with store.session(harness.service.db) as s:
        before = s.exec(select(CallTask)).one()
        s.get_one(Touch, ids[1]).status = TouchStatus.queued  # as if its message came again
    batch = harness.service.dispatcher.dispatch_many(ids)
    assert {r.status for r in batch.results} == {TouchStatus.sent}
    with store.session(harness.service.db) as s:
        tasks = {t.touch_id: t.id for t in s.exec(select(CallTask)).all()}
    assert sorted(tasks) == ids and tasks[ids[1]] == before.id
    assert [touch(harness, i).receipt["reference"] for i in ids] == [f"call_task:{tasks[i]}" for i in ids]


def test_the_caps_count_what_a_batch_lets_go_and_what_went_before(harness: Harness) -> None:
    """The policy allows one touch a contact a day. Two of one contact's touches in one batch: the second
    waits for tomorrow; so does a touch in a later batch, after one sent alone earlier the same day."""
    for n, stage in enumerate(["email", "call", "email"]):
        body = deal_event(
            f"evt-{n}", deal_id=f"d-{n}", contact_id="c-same" if n < 2 else "c-other", stage=stage
        )
        assert harness_ok(harness.post("/webhooks/generic", body))
    first, second, other = enroll(harness, "none", 0)
    batch = harness.service.dispatcher.dispatch_many([first, second])
    assert [(r.touch_id, r.status) for r in batch.results] == [(second, TouchStatus.planned), (first, "sent")]
    assert batch.results[0].reason == "deferred: 1 touch(es) a day cap"
    assert touch(harness, second).due_at.date() > harness.clock().date()
    assert (touch(harness, first).cleared_at, touch(harness, second).cleared_at) == (harness.clock(), None)
    # The other contact: a touch of a second enrollment, sent alone first, then one in a batch.
    body = deal_event("evt-3", deal_id="d-3", contact_id="c-other", stage="call")
    assert harness_ok(harness.post("/webhooks/generic", body))
    [later] = [i for i in enroll(harness, "none", 0) if i != second]
    assert harness.service.dispatcher.dispatch(other).status == TouchStatus.sent
    [result] = harness.service.dispatcher.dispatch_many([later]).results
    assert (result.status, result.reason) == (TouchStatus.planned, "deferred: 1 touch(es) a day cap")


def test_a_touch_that_may_go_out_on_an_unrepeatable_channel_is_left_to_go_alone(harness: Harness) -> None:
    """SMS may not be repeated after a lost worker, so it never waits in a batch: neither a touch planned on
    SMS nor one whose choice may fall on it, though this contact gets the email."""
    email = enroll(harness, "email", 2)
    sms = enroll(harness, "sms", 2)
    choice = enroll(harness, "choice", 1)
    batch = harness.service.dispatcher.dispatch_many(email + sms + choice)
    assert batch.alone == sms + choice
    assert sorted(r.touch_id for r in batch.results) == email
    for touch_id in sms + choice:  # untouched: still queued, no attempt counted, nothing sent
        left = touch(harness, touch_id)
        assert (left.status, left.attempts, left.cleared_at) == (TouchStatus.queued, 0, None)
    assert not (harness.service.settings.outbox_dir / "sms.jsonl").exists()
    assert len(emails(harness)) == 2
    for touch_id in sms + choice:
        assert harness.service.dispatcher.dispatch(touch_id).status == TouchStatus.sent
    assert touch(harness, choice[0]).channel == "email"
    assert len(emails(harness)) == 3


def test_a_worker_sends_what_goes_alone_in_a_message_of_its_own(harness: Harness) -> None:
    ids = enroll(harness, "sms", 1) + enroll(harness, "email", 1)
    harness.service.batch_actor.send(ids)
    harness.drain()
    assert [touch(harness, i).status for i in ids] == [TouchStatus.sent, TouchStatus.sent]
    assert len((harness.service.settings.outbox_dir / "sms.jsonl").read_text().splitlines()) == 1


def test_a_batch_out_of_time_hands_back_what_it_did_not_begin(harness: Harness) -> None:
    ids = enroll(harness, "email", 3)
    dispatcher = harness.service.dispatcher
    dispatcher.batch_seconds = -1.0  # out of time before the first send
    batch = dispatcher.dispatch_many(ids)
    assert (batch.results, batch.alone) == ([], ids)
    for touch_id in ids:  # as before the claim: queued again, the attempt not counted
        left = touch(harness, touch_id)
        assert (left.status, left.attempts, left.cleared_at, left.sending_at) == (
            TouchStatus.queued,
            0,
            None,
            None,
        )
    assert emails(harness) == []
    harness.service._dispatch_batch(ids)  # the worker's actor: each goes alone, and is sent once
    harness.drain()
    assert [touch(harness, i).status for i in ids] == [TouchStatus.sent] * 3
    assert [touch(harness, i).attempts for i in ids] == [1, 1, 1]
    assert len(emails(harness)) == 3


def test_a_batch_whose_late_checks_fail_sends_each_touch_alone(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = enroll(harness, "email", 4)
    unlucky = "c2.email@example.com"  # the third touch's contact
    engine = harness.service.engine
    decide = engine.exit_decision
    failed: list[str] = []

    def fails_once(s: Any, enrollment: Any, context: dict[str, Any], *deal: Any) -> Any:
        if context["contact"]["email"] == unlucky and not failed:
            failed.append(unlucky)
            raise RuntimeError("the exit condition's data source hiccupped")
        return decide(s, enrollment, context, *deal)

    monkeypatch.setattr(engine, "exit_decision", fails_once)
    keys = [touch(harness, i).key for i in ids]
    with pytest.raises(RuntimeError):
        harness.service.dispatcher.dispatch_many(ids)
    # The whole batch rolled back: every claim, and the records of the two emails written before the error.
    assert [(touch(harness, i).status, touch(harness, i).attempts) for i in ids] == [
        (TouchStatus.queued, 0)
    ] * 4
    assert [path.stem for path in emails(harness)] == sorted(keys[:2])
    assert next_steps(harness) == 0
    written = {path.name: path.read_bytes() for path in emails(harness)}
    harness.service._dispatch_batch(ids)  # fails once more inside; each touch then goes alone
    harness.drain()
    assert failed == [unlucky]
    assert [touch(harness, i).status for i in ids] == [TouchStatus.sent] * 4
    # One email a touch, by its key: the two written again are the same messages.
    assert [path.stem for path in emails(harness)] == sorted(keys)
    assert all(
        (harness.service.settings.outbox_dir / "email" / name).read_bytes() == data
        for name, data in written.items()
    )
    assert next_steps(harness) == 4


def test_a_render_that_breaks_in_a_batch_is_retried_and_the_others_go(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = enroll(harness, "email", 3)
    render = EmailOutbox.render
    broke: list[int] = []

    def breaks_once(self: EmailOutbox, env: Any, template: str, context: dict[str, Any]) -> dict[str, str]:
        if context["touch"]["id"] == ids[1] and not broke:
            broke.append(ids[1])
            raise RuntimeError("a filter broke")
        return render(self, env, template, context)

    monkeypatch.setattr(EmailOutbox, "render", breaks_once)
    batch = harness.service.dispatcher.dispatch_many(ids)
    assert batch.retries == [(ids[1], 1)]
    assert [r.status for r in batch.results] == [TouchStatus.queued, TouchStatus.sent, TouchStatus.sent]
    left = touch(harness, ids[1])
    assert (left.status, left.attempts, left.cleared_at) == (TouchStatus.queued, 1, None)
    assert left.status_reason == "retrying: rendering: RuntimeError('a filter broke')"
    assert len(emails(harness)) == 2
    assert next_steps(harness) == 2
    assert harness.service.dispatcher.dispatch(ids[1]).status == TouchStatus.sent
    assert [touch(harness, i).status for i in ids] == [TouchStatus.sent] * 3
    assert next_steps(harness) == 3


def test_a_transient_failure_in_a_batch_is_retried_alone_after_a_pause(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = three_emails_the_second_refused_once(harness, monkeypatch)
    queued: list[dict[str, Any]] = []
    single = harness.service.actor
    original = single.send_with_options
    monkeypatch.setattr(single, "send_with_options", lambda **o: queued.append(o) or original(**o))
    harness.service._dispatch_batch(ids)
    left = touch(harness, ids[1])
    assert (left.status, left.attempts) == (TouchStatus.queued, 1)
    assert queued == [
        {
            "args": (ids[1],),
            "time_limit": harness.service.settings.send_time_limit_seconds * 1000,
            "delay": 2000,
        }
    ]
    harness.drain()  # the delayed message comes due and is sent
    assert [touch(harness, i).status for i in ids] == [TouchStatus.sent] * 3
    assert touch(harness, ids[1]).attempts == 2


def test_a_batch_whose_record_fails_records_nothing_and_each_touch_goes_alone_once(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = enroll(harness, "email", 2) + enroll(harness, "call", 1)
    mark = Dispatcher._mark_sent
    calls: list[int] = []

    def fails_second(self: Dispatcher, s: Any, touch_id: int, *rest: Any, **named: Any) -> None:
        calls.append(touch_id)
        if len(calls) == 2:  # the second touch of the batch's record: the whole transaction goes
            raise sa.exc.OperationalError("UPDATE touch", {}, Exception("database is locked"))
        mark(self, s, touch_id, *rest, **named)

    monkeypatch.setattr(Dispatcher, "_mark_sent", fails_second)
    batch = Batch()
    with pytest.raises(sa.exc.OperationalError):
        harness.service.dispatcher.dispatch_many(ids, batch=batch)
    assert (batch.results, batch.alone, batch.retries) == ([], [], [])
    assert [(touch(harness, i).status, touch(harness, i).attempts) for i in ids] == [
        (TouchStatus.queued, 0)
    ] * 3
    with store.session(harness.service.db) as s:  # the call task went with the rest of the transaction
        assert s.exec(select(CallTask)).all() == []
    assert len(emails(harness)) == 2  # written before the record failed
    harness.service._dispatch_batch(ids)  # the worker's actor: fails again inside, then each goes alone
    harness.drain()
    assert [touch(harness, i).status for i in ids] == [TouchStatus.sent] * 3
    assert [touch(harness, i).attempts for i in ids] == [1, 1, 1]
    assert sorted(calls[:2]) == ids[:2] and sorted(calls[-3:]) == ids  # then each alone, once
    assert [path.stem for path in emails(harness)] == sorted(touch(harness, i).key for i in ids[:2])
    assert next_steps(harness) == 3
    with store.session(harness.service.db) as s:
        assert [task.touch_id for task in s.exec(select(CallTask)).all()] == [ids[2]]


def test_the_scheduler_queues_its_touches_in_batches(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    count = BATCH_SIZE + 4
    for n in range(count):
        body = deal_event(f"evt-{n}", deal_id=f"d-{n}", contact_id=f"c-{n}", stage="email")
        assert harness_ok(harness.post("/webhooks/generic", body))
    sizes: list[int] = []
    dispatch_many = harness.service.dispatcher.dispatch_many
    monkeypatch.setattr(
        harness.service.dispatcher,
        "dispatch_many",
        lambda ids, *rest: sizes.append(len(ids)) or dispatch_many(ids, *rest),
    )
    harness.run_days(1)
    assert sorted(sizes) == [4, BATCH_SIZE]
    assert len(emails(harness)) == count


def test_a_retry_waits_as_the_brokers_own_retries_do() -> None:
    assert [brokers.retry_delay_ms(n) for n in (1, 2, 3, 4)] == [2000, 4000, 8000, 16000]


def test_touches_that_go_alone_are_handed_on_before_the_batch_sends(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = enroll(harness, "sms", 2) + enroll(harness, "email", 2)
    order: list[str] = []
    send = EmailOutbox.send
    monkeypatch.setattr(EmailOutbox, "send", lambda self, m: order.append("email") or send(self, m))
    batch = harness.service.dispatcher.dispatch_many(ids, lambda alone: order.append(f"alone {alone}"))
    assert order == [f"alone {ids[:2]}", "email", "email"]
    assert batch.alone == ids[:2]


def test_a_batch_whose_record_fails_still_hands_back_what_it_did_not_begin(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = enroll(harness, "email", 2)
    dispatcher = harness.service.dispatcher
    dispatcher.batch_seconds = -1.0
    records_fail(monkeypatch)
    with pytest.raises(RuntimeError):
        dispatcher.dispatch_many(ids)
    assert [touch(harness, i).status for i in ids] == [TouchStatus.queued] * 2


def test_after_a_batch_error_a_touch_waiting_for_its_retry_keeps_its_pause(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = three_emails_the_second_refused_once(harness, monkeypatch)
    records_fail(monkeypatch)
    alone: list[list[int]] = []
    later: list[dict[str, Any]] = []
    service = harness.service
    monkeypatch.setattr(service, "_queue_each", alone.append)
    monkeypatch.setattr(service.actor, "send_with_options", lambda **o: later.append(o))
    service._dispatch_batch(ids)
    assert alone == [[ids[0], ids[2]]]  # at once, as the batch failed
    assert [(o["args"], o["delay"]) for o in later] == [((ids[1],), 2000)]  # after the broker's pause


def test_two_workers_holding_the_same_batch_send_it_once(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch delivered twice: the second worker reads the touches while the first is sending them, waits
    for the first's transaction (its rows, or SQLite's write lock), and then finds them no longer queued."""
    ids = enroll(harness, "email", 3) + enroll(harness, "call", 1)
    sending = threading.Event()
    send = EmailOutbox.send

    def slow_first(self: EmailOutbox, message: Any) -> Any:
        if not sending.is_set():
            sending.set()
            time.sleep(0.5)  # the second worker starts meanwhile and must wait
        return send(self, message)

    monkeypatch.setattr(EmailOutbox, "send", slow_first)
    dispatcher = harness.service.dispatcher
    batches: dict[str, Batch] = {}
    first = threading.Thread(target=lambda: batches.setdefault("first", dispatcher.dispatch_many(ids)))
    first.start()
    assert sending.wait(10)
    batches["second"] = dispatcher.dispatch_many(ids)
    first.join(10)
    assert {r.status for r in batches["first"].results} == {TouchStatus.sent}
    assert [(r.status, r.reason) for r in batches["second"].results] == [("ignored", _NOT_QUEUED)] * 4
    assert [(touch(harness, i).status, touch(harness, i).attempts) for i in ids] == [("sent", 1)] * 4
    assert len(emails(harness)) == 3
    assert next_steps(harness) == 4
    with store.session(harness.service.db) as s:
        assert [task.touch_id for task in s.exec(select(CallTask)).all()] == ids[3:]


def test_a_batch_counts_an_enrollments_touches_it_let_go_against_its_budget(harness: Harness) -> None:
    """Two touches of one enrollment due in one batch (a step's retry beside the next step, after an
    outage), on a budget of one a month: the first goes, the second waits for next month, though the
    first's record is not yet written when the second is checked."""
    policy = harness.service.settings.rules_dir / "policy.yaml"
    policy.write_text(policy.read_text().replace("per_day: 1 ", "per_day: 5 "))  # the caps let both go
    harness.service.reload_rules()
    assert harness.service.engine.policy.caps.per_day == 5
    [first] = enroll(harness, "budget", 1)
    with store.session(harness.service.db) as s:
        earlier = s.get_one(Touch, first)
        second = store.new_row(
            Touch,
            enrollment_id=earlier.enrollment_id,
            step_index=1,
            channel="email",
            template=earlier.template,
            reason="The second touch, due as well.",
            due_at=earlier.due_at,
            status=TouchStatus.queued,
            queued_at=harness.clock(),
        )
        store.insert_unless_taken(s, second)
    batch = harness.service.dispatcher.dispatch_many([first, second.id or 0])
    assert [(r.touch_id, r.status, r.reason) for r in batch.results] == [
        (second.id, TouchStatus.planned, "deferred: budget of 1 a month spent"),
        (first, TouchStatus.sent, None),
    ]
    assert touch(harness, second.id or 0).due_at.month == harness.clock().month + 1
    assert len(emails(harness)) == 1


def test_a_batch_looks_up_each_cadence_version_once(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sending a touch asks for its cadence version three or four times (is it batchable, the exit, the
    step, planning the next): the session keeps each version's cadence, read once."""
    ids = enroll(harness, "email", 3) + enroll(harness, "call", 2)
    get_one = Session.get_one
    looked_up: list[Any] = []

    def counting(self: Session, model: Any, ident: Any, **options: Any) -> Any:
        if model is CadenceVersion:
            looked_up.append(ident)
        return get_one(self, model, ident, **options)

    monkeypatch.setattr(Session, "get_one", counting)
    batch = harness.service.dispatcher.dispatch_many(ids)
    assert {r.status for r in batch.results} == {TouchStatus.sent}
    assert len(looked_up) == len(set(looked_up)) == 2  # the email cadence's version, the call cadence's


def test_a_batch_asks_the_session_for_none_of_the_rows_it_read_with_its_touches(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch reads each touch with its enrollment, contact and deal in one query; its checks, its record
    and its planning use those rows, rather than looking each up again by its key."""
    ids = enroll(harness, "email", 3) + enroll(harness, "call", 2)
    get, get_one = Session.get, Session.get_one
    looked_up: list[str] = []

    def counting(found: Any) -> Any:
        def look_up(self: Session, model: Any, ident: Any, **options: Any) -> Any:
            if model in (Enrollment, Contact, Deal):
                looked_up.append(model.__name__)
            return found(self, model, ident, **options)

        return look_up

    monkeypatch.setattr(Session, "get", counting(get))
    monkeypatch.setattr(Session, "get_one", counting(get_one))
    batch = harness.service.dispatcher.dispatch_many(ids)
    assert {r.status for r in batch.results} == {TouchStatus.sent}
    assert looked_up == []
    assert next_steps(harness) == 5


@pytest.mark.parametrize("harness", ["sqlite"], indirect=True)
def test_a_worker_sends_as_many_batches_at_a_time_as_it_is_given_turns(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four threads each with a batch, in a process with two turns (the default): two batches are sent at
    a time, the others wait for a turn, and every touch is sent once."""
    turns = harness.service.settings.worker_batches
    assert turns == 2
    lots = [enroll(harness, "email", 2, start=2 * n) for n in range(4)]
    inside: list[int] = []
    most = 0
    changed = threading.Condition()
    dispatch_many = Dispatcher.dispatch_many

    def watched(self: Dispatcher, *args: Any, **named: Any) -> Batch:
        nonlocal most
        with changed:
            inside.append(threading.get_ident())
            most = max(most, len(inside))
            changed.notify_all()
            changed.wait_for(lambda: len(inside) >= turns, timeout=10)  # the turns all taken
            # Then time for the other threads to come in beside these, were they let in.
            changed.wait_for(lambda: len(inside) > turns, timeout=0.5)
        try:
            return dispatch_many(self, *args, **named)
        finally:
            with changed:
                inside.remove(threading.get_ident())
                changed.notify_all()

    monkeypatch.setattr(Dispatcher, "dispatch_many", watched)
    threads = [threading.Thread(target=harness.service._dispatch_batch, args=(lot,)) for lot in lots]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert most == turns
    ids = [touch_id for lot in lots for touch_id in lot]
    assert [(touch(harness, i).status, touch(harness, i).attempts) for i in ids] == [("sent", 1)] * 8
    assert len(emails(harness)) == 8


def test_a_worker_needs_at_least_one_turn_at_batches(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="worker_batches"):
        make_settings(tmp_path, worker_batches=0)


@pytest.mark.parametrize("harness", ["sqlite"], indirect=True)
def test_a_batch_that_waited_out_its_time_for_a_turn_hands_its_touches_back(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wait for a turn counts against a batch's time, as against its message's time limit: a batch that
    waited longer than it may take to begin its sends begins none, and each touch goes alone, once."""
    service = harness.service
    ids = enroll(harness, "email", 3)
    service.dispatcher.batch_seconds = 0.2
    handed_back: list[int] = []
    queue_each = service._queue_each

    def noted(touch_ids: list[int]) -> None:
        handed_back.extend(touch_ids)
        queue_each(touch_ids)

    monkeypatch.setattr(service, "_queue_each", noted)
    turns = service.settings.worker_batches
    for _ in range(turns):  # every turn taken, by batches that take their time
        service._batch_turns.acquire()
    waiting = threading.Thread(target=service._dispatch_batch, args=(ids,))
    waiting.start()
    time.sleep(0.4)
    for _ in range(turns):
        service._batch_turns.release()
    waiting.join(10)
    assert handed_back == ids
    assert emails(harness) == []
    harness.drain()
    assert [(touch(harness, i).status, touch(harness, i).attempts) for i in ids] == [("sent", 1)] * 3
    assert len(emails(harness)) == 3
