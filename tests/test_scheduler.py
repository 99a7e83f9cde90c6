"""The scheduler: batch claims, the sweep of lost sends, duplicate messages, and schedulers side by side."""

from __future__ import annotations

import copy
import json
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from dramatiq import Message, Middleware, Worker
from harness import MONDAY, Harness, deal_event, make_settings, start_harness
from sqlmodel import col, update

from cadence import broker as brokers
from cadence import store
from cadence.models import Touch, TouchStatus
from cadence.scheduler import Scheduler, Tick

#: open-deal's SMS step (business day 9).
SMS_STEP = 4


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[Harness]:
    harness = start_harness(make_settings(tmp_path))
    yield harness
    harness.stop()


def _enroll(h: Harness, count: int = 1) -> list[int]:
    """Enroll `count` deals in open-deal; their day-0 emails are due at once (Monday 09:00 in Moscow)."""
    enrolled = []
    for n in range(count):
        body = deal_event(event_id=f"evt-{n}", deal_id=f"d-{n}", contact_id=f"c-{n}")
        response = h.post("/webhooks/generic", body)
        assert response.status_code == 202, response.text
        enrolled.extend(response.json()["enrolled"])
    assert len(enrolled) == count
    return enrolled


def _touch(h: Harness, touch_id: int) -> Touch:
    with store.session(h.service.db) as s:
        return s.get_one(Touch, touch_id)


def _step(h: Harness, enrollment_id: int, step: int) -> Touch | None:
    found = [t for t in h.touches(enrollment_id) if t.step_index == step]
    return found[0] if found else None


def _tick_losing_messages(h: Harness) -> Tick:
    """A tick whose messages the broker loses: the touches are claimed, but no worker ever hears of them."""
    scheduler = h.service.scheduler
    real = scheduler.send_all
    scheduler.send_all = lambda touch_ids: None
    try:
        return scheduler.tick()
    finally:
        scheduler.send_all = real


def _queue_step(h: Harness, enrollment_id: int, step: int) -> Touch:
    """Send the steps before `step`, then claim `step` with its message lost; the touch is left queued."""
    due = h.service.timeline(enrollment_id)["touches"][step]["due_at"]  # type: ignore[index]
    assert isinstance(due, datetime)
    if due > h.clock():
        h.run_until(due - timedelta(seconds=1))
        h.clock.set(due)
    tick = _tick_losing_messages(h)
    touch = _step(h, enrollment_id, step)
    assert touch is not None
    assert tick.queued == [touch.id]
    assert touch.status == TouchStatus.queued
    return touch


def _worker_dies_while_sending(h: Harness, touch_id: int, checked: bool = True) -> None:
    """What a worker leaves behind when it claims a touch, passes the late checks (`checked`) and dies in the
    channel's send; or, not `checked`, dies before its late checks were committed (the database went away)."""
    with store.session(h.service.db) as s:
        s.exec(
            update(Touch)
            .where(col(Touch.id) == touch_id, col(Touch.status) == TouchStatus.queued)
            .values(
                status=TouchStatus.sending,
                sending_at=h.clock(),
                attempts=Touch.attempts + 1,
                cleared_at=h.clock() if checked else None,
            )
        )


def _past_the_lease(h: Harness) -> None:
    h.clock.advance(timedelta(seconds=h.service.settings.lease_seconds + 1))


def _emails(h: Harness) -> list[str]:
    folder = h.service.settings.outbox_dir / "email"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _sms_keys(h: Harness) -> list[str]:
    path = h.service.settings.outbox_dir / "sms.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["key"] for line in path.read_text(encoding="utf-8").splitlines()]


# --- claiming -----------------------------------------------------------------------------------------------


def test_one_tick_queues_every_due_touch_in_batches_in_due_order(tmp_path: Path) -> None:
    h = start_harness(make_settings(tmp_path, scheduler_batch_size=3))
    try:
        _enroll(h, 8)
        ids = [t.id or 0 for t in h.touches()]
        # Due times out of id order, all in the past but the last, which is due in an hour.
        offsets = [-5, -60, -1, -30, -45, -2, -20, 60]
        with store.session(h.service.db) as s:
            for touch_id, minutes in zip(ids, offsets, strict=True):
                s.get_one(Touch, touch_id).due_at = MONDAY + timedelta(minutes=minutes)
        batches: list[list[int]] = []
        h.service.scheduler.send_all = batches.append

        tick = h.service.scheduler.tick()

        due_order = [i for _, i in sorted((m, i) for i, m in zip(ids, offsets, strict=True) if m <= 0)]
        assert tick.queued == due_order
        assert [touch_id for batch in batches for touch_id in batch] == due_order
        assert [len(batch) for batch in batches] == [3, 3, 1]
        assert (tick.requeued, tick.failed) == ([], [])
        touches = {t.id: t for t in h.touches()}
        assert {touches[i].status for i in due_order} == {TouchStatus.queued}
        assert {touches[i].queued_at for i in due_order} == {MONDAY}
        assert touches[ids[-1]].status == TouchStatus.planned
        assert touches[ids[-1]].queued_at is None
    finally:
        h.stop()


def test_a_tick_with_nothing_due_queues_nothing(embedded: Harness) -> None:
    _enroll(embedded)
    embedded.clock.set(MONDAY - timedelta(hours=1))

    tick = embedded.service.scheduler.tick()

    assert tick == Tick()
    assert [t.status for t in embedded.touches()] == [TouchStatus.planned]


def test_touches_the_broker_refuses_are_planned_again_for_the_next_tick(tmp_path: Path) -> None:
    h = start_harness(make_settings(tmp_path, scheduler_batch_size=2))
    try:
        _enroll(h, 3)
        scheduler = h.service.scheduler
        handed: list[list[int]] = []

        def broker_down(touch_ids: list[int]) -> None:
            handed.append(touch_ids)
            raise ConnectionError("Redis is down")

        scheduler.send_all = broker_down
        with pytest.raises(ConnectionError):
            scheduler.tick()

        assert len(handed) == 1  # the tick stops at the first refusal
        touches = h.touches()
        assert {(t.status, t.queued_at) for t in touches} == {(TouchStatus.planned, None)}

        sent: list[int] = []
        scheduler.send_all = sent.extend
        tick = scheduler.tick()  # at once: no lease to wait for

        assert sorted(tick.queued) == sorted(sent) == sorted(t.id or 0 for t in touches)
        assert {t.status for t in h.touches()} == {TouchStatus.queued}
    finally:
        h.stop()


def test_without_a_batch_sender_each_id_goes_through_send(tmp_path: Path) -> None:
    h = start_harness(make_settings(tmp_path, scheduler_batch_size=2))
    try:
        _enroll(h, 3)
        scheduler = copy.copy(h.service.scheduler)
        sent: list[int] = []
        scheduler.send, scheduler.send_all = sent.append, None

        tick = scheduler.tick()

        assert sent == tick.queued and len(sent) == 3
    finally:
        h.stop()


# --- the sweep ----------------------------------------------------------------------------------------------


def test_a_touch_whose_message_was_lost_is_sent_by_a_tick_after_the_lease(embedded: Harness) -> None:
    [enrollment_id] = _enroll(embedded)
    touch = _queue_step(embedded, enrollment_id, 0)

    within_lease = embedded.service.scheduler.tick()
    embedded.drain()

    assert within_lease.requeued == []
    assert _touch(embedded, touch.id or 0).status == TouchStatus.queued
    assert _emails(embedded) == []

    _past_the_lease(embedded)
    after_lease = embedded.service.scheduler.tick()
    embedded.drain()

    assert after_lease.requeued == [touch.id]
    sent = _touch(embedded, touch.id or 0)
    assert (sent.status, sent.attempts) == (TouchStatus.sent, 1)
    assert _emails(embedded) == [f"{touch.key}.eml"]


def test_an_email_stuck_in_sending_past_the_lease_is_sent_again(embedded: Harness) -> None:
    [enrollment_id] = _enroll(embedded)
    touch = _queue_step(embedded, enrollment_id, 0)
    _worker_dies_while_sending(embedded, touch.id or 0)
    _past_the_lease(embedded)

    tick = embedded.service.scheduler.tick()
    embedded.drain()

    assert (tick.requeued, tick.failed) == ([touch.id], [])
    sent = _touch(embedded, touch.id or 0)
    assert (sent.status, sent.attempts) == (TouchStatus.sent, 2)
    assert _emails(embedded) == [f"{touch.key}.eml"]
    assert _step(embedded, enrollment_id, 1) is not None


def test_an_email_in_sending_within_the_lease_is_left_alone(embedded: Harness) -> None:
    [enrollment_id] = _enroll(embedded)
    touch = _queue_step(embedded, enrollment_id, 0)
    _worker_dies_while_sending(embedded, touch.id or 0)
    embedded.clock.advance(timedelta(seconds=embedded.service.settings.lease_seconds - 1))

    tick = embedded.service.scheduler.tick()

    assert (tick.requeued, tick.failed) == ([], [])
    assert _touch(embedded, touch.id or 0).status == TouchStatus.sending


def test_an_sms_stuck_in_sending_past_the_lease_fails_and_the_next_step_is_planned(embedded: Harness) -> None:
    [enrollment_id] = _enroll(embedded)
    touch = _queue_step(embedded, enrollment_id, SMS_STEP)
    assert touch.channel == "sms"
    _worker_dies_while_sending(embedded, touch.id or 0)
    _past_the_lease(embedded)

    tick = embedded.service.scheduler.tick()
    embedded.drain()

    assert (tick.requeued, tick.failed) == ([], [touch.id])
    failed = _touch(embedded, touch.id or 0)
    assert failed.status == TouchStatus.failed
    assert failed.status_reason and "not repeated" in failed.status_reason
    assert failed.attempts == 1
    assert touch.key not in _sms_keys(embedded)
    following = _step(embedded, enrollment_id, SMS_STEP + 1)
    assert following is not None and following.status == TouchStatus.planned
    assert embedded.enrollments()[0].status == "active"


def test_an_sms_lost_before_its_late_checks_is_sent_again_once(embedded: Harness) -> None:
    [enrollment_id] = _enroll(embedded)
    touch = _queue_step(embedded, enrollment_id, SMS_STEP)
    _worker_dies_while_sending(embedded, touch.id or 0, checked=False)
    _past_the_lease(embedded)

    tick = embedded.service.scheduler.tick()
    embedded.drain()

    assert (tick.requeued, tick.failed) == ([touch.id], [])
    sent = _touch(embedded, touch.id or 0)
    assert (sent.status, sent.attempts) == (TouchStatus.sent, 2)
    assert _sms_keys(embedded).count(touch.key) == 1


# --- duplicate messages -------------------------------------------------------------------------------------


def _outbox_entries(h: Harness, touch: Touch) -> int:
    if touch.channel == "email":
        return _emails(h).count(f"{touch.key}.eml")
    return _sms_keys(h).count(touch.key)


@pytest.mark.parametrize("step", [0, SMS_STEP], ids=["email", "sms"])
def test_dispatching_the_same_touch_twice_sends_it_once(embedded: Harness, step: int) -> None:
    [enrollment_id] = _enroll(embedded)
    touch = _queue_step(embedded, enrollment_id, step)

    first = embedded.service.dispatcher.dispatch(touch.id or 0)
    second = embedded.service.dispatcher.dispatch(touch.id or 0)

    assert (first.status, second.status) == (TouchStatus.sent, "ignored")
    assert _outbox_entries(embedded, touch) == 1
    sent = _touch(embedded, touch.id or 0)
    assert (sent.status, sent.attempts) == (TouchStatus.sent, 1)


@pytest.mark.integration
@pytest.mark.parametrize("step", [0, SMS_STEP], ids=["email", "sms"])
def test_two_broker_messages_for_one_touch_send_it_once(cadence: Harness, step: int) -> None:
    [enrollment_id] = _enroll(cadence)
    touch = _queue_step(cadence, enrollment_id, step)

    cadence.service.actor.send(touch.id)
    cadence.service.actor.send(touch.id)
    cadence.drain()

    assert _outbox_entries(cadence, touch) == 1
    sent = _touch(cadence, touch.id or 0)
    assert (sent.status, sent.attempts) == (TouchStatus.sent, 1)


@pytest.mark.integration
def test_a_batch_sent_to_redis_is_the_messages_actor_sends_and_workers_run_them(redis_url: str) -> None:
    broker = brokers.create_broker(redis_url)
    received: list[int] = []
    actor = brokers.declare_dispatch(broker, received.append)
    client = redis.Redis.from_url(redis_url)
    queue = f"dramatiq:{brokers.QUEUE}"
    try:
        actor.send_with_options(args=(1,), time_limit=5_000)
        brokers.send_all(actor, [2, 3, 4], time_limit=5_000)

        ids = [raw.decode() for raw in client.lrange(queue, 0, -1)]
        bodies = [json.loads(client.hget(f"{queue}.msgs", i) or b"{}") for i in ids]
        assert [b["args"] for b in bodies] == [[1], [2], [3], [4]]
        single, *batch = bodies
        varying = ("message_id", "message_timestamp", "args", "options")
        shape = {k: v for k, v in single.items() if k not in varying}
        for body in batch:
            assert {k: v for k, v in body.items() if k in shape} == shape
            assert body.keys() == single.keys()
            assert body["options"].keys() == single["options"].keys()
            assert body["options"]["time_limit"] == 5_000
        assert [b["options"]["redis_message_id"] for b in bodies] == ids

        worker = Worker(broker, worker_timeout=100)
        worker.start()
        try:
            broker.join(brokers.QUEUE, timeout=10_000)
            worker.join()
        finally:
            worker.stop()
        assert sorted(received) == [1, 2, 3, 4]
    finally:
        client.close()
        broker.close()


class _Seen(Middleware):
    """Middleware that looks at each message enqueued, as a tracing or metrics middleware would."""

    def __init__(self) -> None:
        self.before: list[Message[Any]] = []
        self.after: list[Message[Any]] = []

    def before_enqueue(self, broker: Any, message: Message[Any], delay: Any) -> None:
        self.before.append(message)

    def after_enqueue(self, broker: Any, message: Message[Any], delay: Any) -> None:
        self.after.append(message)


def test_middleware_that_looks_at_enqueued_messages_sees_each_of_a_batch(redis_url: str) -> None:
    broker = brokers.create_broker(redis_url)
    seen = _Seen()
    broker.add_middleware(seen)
    actor = brokers.declare_dispatch(broker, lambda _: None)
    client = redis.Redis.from_url(redis_url)
    queue = f"dramatiq:{brokers.QUEUE}"
    try:
        client.delete(queue, f"{queue}.msgs")
        brokers.send_all(actor, [5, 6], time_limit=5_000)
        assert [m.args for m in seen.before] == [(5,), (6,)] == [m.args for m in seen.after]
        stored = [raw.decode() for raw in client.lrange(queue, 0, -1)]
        assert [m.options["redis_message_id"] for m in seen.before] == stored
    finally:
        client.delete(queue, f"{queue}.msgs")
        client.close()
        broker.close()


# --- schedulers side by side --------------------------------------------------------------------------------


def _many_due_touches(h: Harness, count: int) -> list[int]:
    """One enrollment with `count` touches due now (iterations of its first step), due a second apart."""
    [enrollment_id] = _enroll(h)
    [first] = h.touches(enrollment_id)
    with store.session(h.service.db) as s:
        s.add_all(
            Touch(
                enrollment_id=enrollment_id,
                step_index=0,
                iteration=n,
                channel=first.channel,
                template=first.template,
                reason=first.reason,
                due_at=MONDAY - timedelta(seconds=n),
            )
            for n in range(1, count)
        )
    return [t.id or 0 for t in h.touches(enrollment_id)]


def _tick_side_by_side(h: Harness, engines: list[sa.Engine], batch_size: int) -> list[list[int]]:
    """Each engine's scheduler ticks once, all starting together; the ids each one handed to its broker."""
    sent: list[list[int]] = [[] for _ in engines]
    schedulers = []
    for engine, record in zip(engines, sent, strict=True):
        # The service's own scheduler, as another process would build it, on its own connections.
        scheduler = copy.copy(h.service.scheduler)
        scheduler.db, scheduler.send_all, scheduler.batch_size = engine, record.extend, batch_size
        schedulers.append(scheduler)
    start = threading.Barrier(len(schedulers))
    errors: list[BaseException] = []

    def run(scheduler: Scheduler) -> None:
        try:
            start.wait()
            scheduler.tick()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in schedulers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    return sent


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def test_two_schedulers_ticking_together_never_queue_a_touch_twice(
    tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    overrides = {"database_url": request.getfixturevalue("postgres_url")} if backend == "postgresql" else {}
    h = start_harness(make_settings(tmp_path, **overrides))
    engines = [store.create_engine(h.service.settings.database_url) for _ in range(2)]
    try:
        ids = _many_due_touches(h, 300)
        for _ in range(3):
            sent = _tick_side_by_side(h, engines, batch_size=50)

            counts = Counter(touch_id for record in sent for touch_id in record)
            assert sorted(counts) == sorted(ids)
            assert set(counts.values()) == {1}
            assert {t.status for t in h.touches()} == {TouchStatus.queued}

            with store.session(h.service.db) as s:  # due again, for the next round
                s.exec(update(Touch).values(status=TouchStatus.planned, queued_at=None))
    finally:
        for engine in engines:
            engine.dispose()
        h.stop()
