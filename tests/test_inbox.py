"""The inbox: an accepted event is acted on exactly once, even when a crash interrupts it."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

from harness import Harness, deal_event, make_settings, start_harness
from sqlmodel import select

from cadence import store
from cadence.engine import EngineError
from cadence.events import Event
from cadence.models import InboundEvent


def _stored_but_not_processed(harness: Harness, body: dict[str, object]) -> int:
    """What a crash right after the inbox commit leaves behind."""
    service = harness.service
    with store.session(service.db) as s:
        row = InboundEvent(
            source="generic",
            event_id=str(body["event_id"]),
            type=str(body["type"]),
            body=json.dumps(body),
            received_at=service.clock(),
        )
        s.add(row)
        s.flush()
        return row.id or 0


def test_an_event_a_crash_left_unprocessed_is_replayed_after_the_lease(tmp_path: Path) -> None:
    harness = start_harness(make_settings(tmp_path, lease_seconds=300))
    try:
        row_id = _stored_but_not_processed(harness, deal_event())
        assert harness.service.scheduler.tick().replayed == []  # a fresh event may still be in its request
        assert harness.enrollments() == []
        harness.clock.advance(timedelta(seconds=301))
        assert harness.service.scheduler.tick().replayed == [row_id]
        [enrollment] = harness.enrollments()
        assert enrollment.cadence_name == "open-deal"
        with store.session(harness.service.db) as s:
            assert s.get_one(InboundEvent, row_id).status == "processed"
        harness.clock.advance(timedelta(seconds=301))
        assert harness.service.scheduler.tick().replayed == []
        # The delivery the CRM retries after the crash is a duplicate, not a second enrollment.
        again = harness.post("/webhooks/generic", deal_event())
        assert again.status_code == 200 and again.json()["duplicate"] is True
        assert len(harness.enrollments()) == 1
    finally:
        harness.stop()


def test_an_event_is_processed_once_however_often_it_is_offered(tmp_path: Path) -> None:
    harness = start_harness(make_settings(tmp_path))
    try:
        body = deal_event()
        row_id = _stored_but_not_processed(harness, body)
        inbox = harness.service.inbox
        first = inbox.process(row_id, "generic", [Event.model_validate(body)])
        second = inbox.process(row_id, "generic", [Event.model_validate(body)])
        assert first is not None and len(first.enrolled) == 1
        assert second is None
        assert len(harness.enrollments()) == 1
    finally:
        harness.stop()


def test_an_event_the_engine_cannot_apply_is_kept_as_failed_with_why(tmp_path: Path) -> None:
    harness = start_harness(make_settings(tmp_path))
    try:

        def refuse(*args: object) -> None:
            raise EngineError("no cadence named 'gone'", field="cadence")

        harness.service.engine.handle_event = refuse  # type: ignore[method-assign]
        response = harness.post("/webhooks/generic", deal_event())
        assert response.status_code == 422
        assert response.json()["error"]["field"] == "cadence"
        with store.session(harness.service.db) as s:
            [row] = s.exec(select(InboundEvent)).all()
        assert (row.status, row.event_id) == ("failed", "evt-1")
        assert row.error is not None and "no cadence named 'gone'" in row.error
        assert harness.enrollments() == []
    finally:
        harness.stop()
