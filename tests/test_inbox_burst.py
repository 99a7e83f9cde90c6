"""A burst of deliveries: each one arriving while others are in flight is stored with them in one commit and
handed to a worker; none is lost, none is acted on twice, and a lost hand-off is found by the scheduler."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from harness import Harness, deal_event, make_settings, start_harness
from sqlmodel import func, select

from cadence import store
from cadence.inbox import BURST_QUIET_SECONDS, Inbox, Intake, _GroupCommit
from cadence.models import Enrollment, InboundEvent

#: Deliveries in one burst.
BURST = 24
#: Seconds a test waits for threads to line up or finish.
WAIT = 30.0


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = start_harness(make_settings(tmp_path))
    yield h
    h.stop()


def _body(n: int) -> bytes:
    return json.dumps(deal_event(f"evt-{n}", deal_id=f"d-{n}", contact_id=f"c-{n}")).encode()


def _rows(h: Harness) -> list[InboundEvent]:
    with store.session(h.service.db) as s:
        return list(s.exec(select(InboundEvent).order_by(InboundEvent.id)).all())  # type: ignore[arg-type]


def _enrollments(h: Harness) -> int:
    with store.session(h.service.db) as s:
        return s.exec(select(func.count()).select_from(Enrollment)).one()


def _hold_write_lock(h: Harness) -> sa.Connection:
    """Another writer holding SQLite's write lock, so deliveries pile up behind it."""
    connection = h.service.db.connect()
    connection.begin()  # the engine's begin hook takes the write lock (BEGIN IMMEDIATE)
    return connection


def _wait_for(condition: object, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _burst(inbox: Inbox, bodies: list[bytes]) -> list[object]:
    """Receive the bodies on threads at once; the answers in order."""
    answers: list[object] = [None] * len(bodies)

    def receive(n: int) -> None:
        answers[n] = inbox.receive("generic", bodies[n])

    threads = [threading.Thread(target=receive, args=(n,)) for n in range(len(bodies))]
    for thread in threads:
        thread.start()
    return [threads, answers]


def test_a_burst_is_stored_in_a_few_commits_and_handed_off_whole(harness: Harness) -> None:
    inbox = harness.service.inbox
    handed: list[int] = []
    inbox.hand_off = handed.extend
    commits: list[int] = []
    sa.event.listen(harness.service.db, "commit", lambda _connection: commits.append(1))
    blocker = _hold_write_lock(harness)
    threads, answers = _burst(inbox, [_body(n) for n in range(BURST)])
    # One delivery arrived first and is inside its own transaction, waiting for the lock; one of the others
    # is writing the group and waits too; the rest are lined up behind it.
    _wait_for(lambda: len(inbox._group._queue) == BURST - 2, "the burst to line up")
    blocker.rollback()
    blocker.close()
    for thread in threads:  # type: ignore[attr-defined]
        thread.join(WAIT)
    queued = [a.queued for a in answers if a.queued is not None]  # type: ignore[attr-defined]
    acted = [a for a in answers if a.queued is None]  # type: ignore[attr-defined]
    assert len(acted) == 1 and len(acted[0].effects.enrolled) == 1  # type: ignore[attr-defined]
    assert sorted(queued) == sorted(handed) and len(handed) == BURST - 1
    # The one acted on at once, the group's first writer, then everyone who lined up behind it: 3 commits.
    assert len(commits) <= 3
    assert [r.status for r in _rows(harness)].count("received") == BURST - 1
    for row_id in handed:
        assert inbox.act_on(row_id) is not None
    assert {r.status for r in _rows(harness)} == {"processed"}
    assert _enrollments(harness) == BURST
    # A worker offered the same delivery again (the broker redelivers) acts on nothing.
    assert all(inbox.act_on(row_id) is None for row_id in handed)
    assert _enrollments(harness) == BURST


def _lined_up(inbox: Inbox) -> bool:
    """Every delivery of the burst arrived, and the group being written holds all of them but the first."""
    group = inbox._group
    return inbox._arriving == BURST and not group._pending and group._flusher is not None


def _burst_on_the_loop(harness: Harness, bodies: list[bytes]) -> list[Intake]:
    """Receive the bodies at once on one event loop, as the API does, while another writer holds the lock
    until they have all lined up; their answers in order."""
    inbox = harness.service.inbox
    blocker = _hold_write_lock(harness)
    answers: list[Intake] = []

    async def burst() -> None:
        answers.extend(await asyncio.gather(*[inbox.receive_async("generic", body) for body in bodies]))

    loop = threading.Thread(target=asyncio.run, args=(burst(),))
    loop.start()
    # The first is acted on at once on a thread, waiting for the lock; all the others arrived while it was
    # in flight, and wait on the loop while one thread writes them as one group, waiting for the lock too.
    _wait_for(lambda: _lined_up(inbox), "the burst to line up")
    blocker.rollback()
    blocker.close()
    loop.join(WAIT)
    assert len(answers) == len(bodies)
    return answers


def test_a_burst_on_the_event_loop_waits_there_and_is_stored_in_a_few_commits(harness: Harness) -> None:
    """The API's path: requests on one event loop; one thread writes each group, none waits per request."""
    inbox = harness.service.inbox
    handed: list[int] = []
    inbox.hand_off = handed.extend
    commits: list[int] = []
    sa.event.listen(harness.service.db, "commit", lambda _connection: commits.append(1))
    answers = _burst_on_the_loop(harness, [_body(n) for n in range(BURST)])
    queued = [a.queued for a in answers if a.queued is not None]
    acted = [a for a in answers if a.queued is None]
    assert len(acted) == 1 and len(acted[0].effects.enrolled) == 1
    assert sorted(queued) == sorted(handed) and len(handed) == BURST - 1
    assert len(commits) <= 3
    assert [r.status for r in _rows(harness)].count("received") == BURST - 1
    for row_id in handed:
        assert inbox.act_on(row_id) is not None
    assert _enrollments(harness) == BURST


def test_the_same_delivery_in_a_burst_on_the_event_loop_is_stored_once(harness: Harness) -> None:
    inbox = harness.service.inbox
    handed: list[int] = []
    inbox.hand_off = handed.extend
    answers = _burst_on_the_loop(harness, [_body(7)] * BURST)
    assert len([a for a in answers if a.duplicate]) == BURST - 1
    assert len(_rows(harness)) == 1
    for row_id in handed:
        inbox.act_on(row_id)
    assert _enrollments(harness) == 1


def test_the_same_delivery_in_a_burst_is_stored_once(harness: Harness) -> None:
    inbox = harness.service.inbox
    handed: list[int] = []
    inbox.hand_off = handed.extend
    blocker = _hold_write_lock(harness)
    threads, answers = _burst(inbox, [_body(7)] * BURST)
    _wait_for(lambda: len(inbox._group._queue) == BURST - 2, "the burst to line up")
    blocker.rollback()
    blocker.close()
    for thread in threads:  # type: ignore[attr-defined]
        thread.join(WAIT)
    duplicates = [a for a in answers if a.duplicate]  # type: ignore[attr-defined]
    assert len(duplicates) == BURST - 1
    assert len(_rows(harness)) == 1
    for row_id in handed:
        inbox.act_on(row_id)
    assert _enrollments(harness) == 1


def test_a_lost_hand_off_is_found_by_the_scheduler(harness: Harness) -> None:
    inbox = harness.service.inbox

    def broker_down(row_ids: list[int]) -> None:
        raise ConnectionError("broker unreachable")

    inbox.hand_off = broker_down
    blocker = _hold_write_lock(harness)
    threads, answers = _burst(inbox, [_body(n) for n in range(3)])
    _wait_for(lambda: len(inbox._group._queue) == 1, "the burst to line up")
    blocker.rollback()
    blocker.close()
    for thread in threads:  # type: ignore[attr-defined]
        thread.join(WAIT)
    queued = sorted(a.queued for a in answers if a.queued is not None)  # type: ignore[attr-defined]
    assert len(queued) == 2
    assert [r.id for r in _rows(harness) if r.status == "received"] == queued  # stored, not handed off
    assert _enrollments(harness) == 1
    assert harness.service.scheduler.tick().replayed == []  # a fresh delivery may still be on its way
    harness.clock.advance(timedelta(seconds=harness.service.settings.lease_seconds + 1))
    assert harness.service.scheduler.tick().replayed == queued
    assert _enrollments(harness) == 3


def test_a_delivery_that_failed_before_is_stored_again_in_a_group(harness: Harness) -> None:
    inbox = harness.service.inbox
    handed: list[int] = []
    inbox.hand_off = handed.extend
    with store.session(harness.service.db) as s:
        s.add(
            InboundEvent(
                source="generic",
                event_id="evt-0",
                body="{}",
                status="failed",
                error="the database was away",
                received_at=harness.clock(),
            )
        )
    stored = inbox._group.store(
        InboundEvent(
            source="generic", event_id="evt-0", body=_body(0).decode(), received_at=harness.clock()
        ).model_dump(exclude={"id"})
    )
    [row] = _rows(harness)
    assert stored == row.id and row.status == "received" and row.error is None
    assert handed == [row.id]
    assert inbox.act_on(row.id or 0) is not None
    assert (
        inbox._group.store(
            InboundEvent(
                source="generic", event_id="evt-0", body="{}", received_at=harness.clock()
            ).model_dump(exclude={"id"})
        )
        is None
    )  # processed: a duplicate now


def test_during_a_burst_a_delivery_alone_for_a_moment_is_still_queued(harness: Harness) -> None:
    inbox = harness.service.inbox
    handed: list[int] = []
    inbox.hand_off = handed.extend
    inbox._last_queued = time.monotonic()  # a delivery was stored for a worker just now
    during = inbox.receive("generic", _body(1))
    assert during.queued is not None and handed == [during.queued]
    assert _enrollments(harness) == 0
    inbox._last_queued = time.monotonic() - BURST_QUIET_SECONDS - 1  # the burst is over
    after = inbox.receive("generic", _body(2))
    assert after.queued is None and len(after.effects.enrolled) == 1


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_group_is_written_by_one_statement_a_run_of_distinct_deliveries(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A group's rows go in one INSERT; a delivery that comes twice in the group is written after the first,
    as if it came after it: a duplicate of one received, or in place of one rejected."""
    url = request.getfixturevalue("postgres_url") if backend == "postgresql" else f"sqlite:///{tmp_path}/g.db"
    db = store.create_engine(url)
    store.migrate(db)
    handed: list[list[int]] = []
    group = _GroupCommit(db, handed.append)
    now = datetime.now(UTC)

    def row(event_id: str, status: str = "received") -> dict[str, object]:
        return {"source": "generic", "event_id": event_id, "type": "deal.stage_changed", "body": "{}",
                "status": status, "error": "unreadable" if status == "rejected" else None,
                "received_at": now, "processed_at": None}  # fmt: skip

    inserts: list[str] = []
    sa.event.listen(
        db, "before_cursor_execute", lambda *a: inserts.append(a[2]) if "INSERT" in a[2] else None
    )
    ids = group.write([row("a", "rejected"), row("b"), row("a"), row("b"), row("c"), row("a")])
    assert len(inserts) == 3  # [a b c], then [a], then [a]: each run one statement
    a, b, c = ids[0], ids[1], ids[4]
    assert None not in (a, b, c) and len({a, b, c}) == 3
    # The second "a" replaced the rejected one (same row); the second "b" and third "a" are duplicates.
    assert ids == [a, b, a, None, c, None]
    assert handed == [[a, b, a, c]]
    with db.connect() as connection:
        stored = connection.execute(sa.text("SELECT event_id, status FROM inbound_event ORDER BY id")).all()
    assert [tuple(r) for r in stored] == [("a", "received"), ("b", "received"), ("c", "received")]
    db.dispose()
