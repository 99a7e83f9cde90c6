"""A whole Cadence in the test process, driven by a manual clock, on either broker."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import uvicorn
from sqlmodel import col, select
from starlette.testclient import TestClient

from cadence import store
from cadence.api import create_app
from cadence.broker import INBOX_QUEUE, QUEUE
from cadence.clock import ManualClock
from cadence.models import Enrollment, Touch, TouchStatus
from cadence.service import Service
from cadence.settings import Settings

REPO = Path(__file__).resolve().parent.parent
#: A Monday morning in Moscow (06:00 UTC = 09:00 MSK), not a holiday.
MONDAY = datetime(2026, 11, 23, 6, 0, tzinfo=UTC)


def array_ids(array: str) -> list[int]:
    """The ids in an array of integers in PostgreSQL's text form (`{"1","2"}`), as the store's statements of
    arrays send them."""
    return [int(element.strip('"')) for element in array.strip("{}").split(",")]


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": f"sqlite:///{tmp_path / 'cadence.db'}",
        "rules_dir": REPO / "rules",
        "templates_dir": REPO / "templates",
        "outbox_dir": tmp_path / "outbox",
        "redis_url": None,
        "log_json": False,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


def deal_event(
    event_id: str = "evt-1",
    type: str = "deal.stage_changed",
    deal_id: str = "d-1",
    contact_id: str = "c-1",
    **deal: Any,
) -> dict[str, Any]:
    """A generic webhook body for a deal at `proposal_sent` with a reachable, senior contact."""
    return {
        "event_id": event_id,
        "type": type,
        "contact": {
            "id": contact_id,
            "name": "Anna Petrova",
            "email": "anna@example.com",
            "phone": "+79161234567",
            "sms_consent": True,
            "timezone": "Europe/Moscow",
            "country": "RU",
            "address": "Tverskaya 1\n125009 Moscow",
            "age": 56,
            "company": "Northwind",
        },
        "deal": {
            "id": deal_id,
            "title": "CRM rollout",
            "stage": "proposal_sent",
            "status": "open",
            "amount": 12000,
            "currency": "EUR",
            "owner": "ivan",
            **deal,
        },
    }


@dataclass
class Harness:
    service: Service
    clock: ManualClock
    client: TestClient

    def post(self, path: str, body: Any) -> Any:
        return self.client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})

    def drain(self) -> None:
        """Wait until every queued message (stored deliveries, then touches) has been handled by the worker
        threads."""
        self.service.broker.join(INBOX_QUEUE, timeout=30_000)
        self.service.broker.join(QUEUE, timeout=30_000)
        assert self.service._worker is not None
        self.service._worker.join()

    def run_until(self, until: datetime) -> None:
        """Move the clock to each due touch in turn up to `until`; scheduler and worker do their work."""
        while True:
            self.service.scheduler.tick()
            self.drain()
            with store.session(self.service.db) as s:
                next_due = s.exec(
                    select(Touch.due_at)
                    .where(Touch.status == TouchStatus.planned)
                    .order_by(col(Touch.due_at))
                ).first()
            if next_due is None or next_due > until:
                break
            if next_due > self.clock():
                self.clock.set(next_due)
        self.clock.set(max(until, self.clock()))

    def run_days(self, days: float) -> None:
        self.run_until(self.clock() + timedelta(days=days))

    def touches(self, enrollment_id: int | None = None) -> list[Touch]:
        with store.session(self.service.db) as s:
            query = select(Touch).order_by(
                col(Touch.enrollment_id), col(Touch.step_index), col(Touch.iteration)
            )
            if enrollment_id is not None:
                query = query.where(Touch.enrollment_id == enrollment_id)
            return list(s.exec(query).all())

    def enrollments(self) -> list[Enrollment]:
        with store.session(self.service.db) as s:
            return list(s.exec(select(Enrollment).order_by(col(Enrollment.id))).all())

    def stop(self) -> None:
        self.client.close()
        self.service.stop()


def start_harness(settings: Settings, start: datetime = MONDAY) -> Harness:
    clock = ManualClock(start)
    service = Service(settings, clock)
    service.start_worker(threads=2, poll_ms=50)
    client = TestClient(create_app(service, background=False), raise_server_exceptions=True)
    return Harness(service, clock, client)


@contextmanager
def serve(harness: Harness) -> Iterator[str]:
    """The harness's app on a real loopback port, for clients that speak HTTP (a CLI, a browser)."""
    from servers import free_port

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(harness.service, background=False), port=port, log_config=None)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join()
