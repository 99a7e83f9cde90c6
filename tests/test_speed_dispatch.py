"""Sending a touch reads its rows once per transaction, and never keeps them from one send to the next."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from harness import Harness, deal_event, make_settings, start_harness
from sqlmodel import col, select

from cadence import store
from cadence.models import Block, Contact, Deal, Touch, TouchStatus

#: A row read by its primary key alone: what the session asks when it does not hold the row already.
_BY_KEY = re.compile(r"FROM (\w+) WHERE \1\.id = ")


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = start_harness(make_settings(tmp_path))
    yield h
    h.stop()


@contextmanager
def statements(h: Harness) -> Iterator[list[str]]:
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen.append(" ".join(statement.split()))

    sa.event.listen(h.service.db, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sa.event.remove(h.service.db, "before_cursor_execute", record)


def _queue_next(h: Harness) -> int:
    """Queue the earliest planned touch, as the scheduler would, and move the clock to its time."""
    with store.session(h.service.db) as s:
        touch = s.exec(
            select(Touch).where(Touch.status == TouchStatus.planned).order_by(col(Touch.due_at))
        ).first()
        assert touch is not None and touch.id is not None
        touch.status, touch.queued_at = TouchStatus.queued, touch.due_at
        h.clock.set(max(touch.due_at, h.clock()))
        return touch.id


def test_a_send_reads_the_touch_and_what_it_needs_in_one_query(harness: Harness) -> None:
    harness.post("/webhooks/generic", deal_event())
    touch_id = _queue_next(harness)
    with statements(harness) as seen:
        result = harness.service.dispatcher.dispatch(touch_id)
    assert result.status == TouchStatus.sent
    read_by_key = [m.group(1) for m in map(_BY_KEY.search, seen) if m]
    assert read_by_key == [], read_by_key
    # One read before sending, one when recording it: each loads the touch with its rows.
    assert sum(s.startswith("SELECT touch.id") and "JOIN cadence_version" in s for s in seen) == 2


def test_a_send_takes_two_transactions_and_no_savepoint(harness: Harness) -> None:
    """The claim is the late checks' first write, and the next touch is inserted without a savepoint; a
    contact without blocks is not looked up in them."""
    harness.post("/webhooks/generic", deal_event())
    touch_id = _queue_next(harness)
    commits: list[int] = []

    def count(_connection: Any) -> None:
        commits.append(1)

    sa.event.listen(harness.service.db, "commit", count)
    try:
        with statements(harness) as seen:
            assert harness.service.dispatcher.dispatch(touch_id).status == TouchStatus.sent
    finally:
        sa.event.remove(harness.service.db, "commit", count)
    assert len(commits) == 2  # claim with the late checks; the record with the next touch planned
    assert not [s for s in seen if "SAVEPOINT" in s]
    assert not [s for s in seen if s.startswith("SELECT block.")]
    # The claim comes before the late checks' reads of what may stop the touch (the caps' count).
    [claim] = [n for n, s in enumerate(seen) if s.startswith("UPDATE touch SET") and "touch.status = ?" in s]
    caps_read = "SELECT enrollment.contact_id, touch.id, touch.cleared_at"
    [caps] = [n for n, s in enumerate(seen) if s.startswith(caps_read)]
    assert claim < caps


def test_a_change_between_two_sends_is_seen_by_the_second(harness: Harness) -> None:
    harness.post("/webhooks/generic", deal_event())
    first = _queue_next(harness)
    assert harness.service.dispatcher.dispatch(first).status == TouchStatus.sent
    # A CRM webhook or an outcome changes the contact between the two sends: a block starts.
    with store.session(harness.service.db) as s:
        contact = s.exec(select(Contact)).one()
        s.add(Block(contact_id=contact.id or 0, reason="not_interested", starts_at=harness.clock()))
    second = _queue_next(harness)
    result = harness.service.dispatcher.dispatch(second)
    assert (result.status, result.reason) == (TouchStatus.skipped, "contact is blocked: not_interested")


def test_a_deal_won_between_two_sends_ends_the_enrollment_at_the_second(harness: Harness) -> None:
    harness.post("/webhooks/generic", deal_event())
    assert harness.service.dispatcher.dispatch(_queue_next(harness)).status == TouchStatus.sent
    with store.session(harness.service.db) as s:
        s.exec(select(Deal)).one().status = "won"
    result = harness.service.dispatcher.dispatch(_queue_next(harness))
    assert (result.status, result.reason) == (TouchStatus.cancelled, "deal won")
