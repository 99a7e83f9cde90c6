"""The inbox: every CRM delivery is stored raw and committed before anything acts on it.

An accepted event that a crash kept from being processed is found by the scheduler and processed then.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from pydantic import BaseModel, ValidationError
from sqlmodel import col, select

from cadence import store
from cadence.clock import Clock
from cadence.engine import Effects, Engine, EngineError
from cadence.events import Event
from cadence.metrics import Metrics
from cadence.models import InboundEvent

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Rejection:
    """Why a delivery was not accepted, as the API reports it."""

    status: int
    code: str
    message: str
    field: str | None
    problems: list[dict[str, Any]] = dataclasses.field(default_factory=list)


@dataclass(frozen=True)
class Reading:
    """What an adapter read from one delivery: its id, its kind, the events in it (a CRM may send several),
    or why it was refused. Event types the adapter knows it does not act on are accepted with no events."""

    event_id: str
    kind: str | None = None
    events: list[Event] = dataclasses.field(default_factory=list)
    rejection: Rejection | None = None


#: Reads one source's deliveries.
Reader = Callable[[bytes], Reading]


@dataclass(frozen=True)
class Intake:
    event_id: str
    duplicate: bool = False
    effects: Effects = dataclasses.field(default_factory=Effects)
    rejection: Rejection | None = None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(body: bytes) -> Any:
    """Strict JSON: no NaN or Infinity, no NUL characters (no database text column holds them)."""
    if b"\x00" in body:
        raise ValueError("body contains a NUL byte")
    payload = json.loads(body, parse_constant=_no_constant)
    path = _nul_path(payload, "")
    if path is not None:
        raise ValueError(f"{path or 'body'} contains a NUL character")
    return payload


def _nul_path(value: Any, path: str) -> str | None:
    if isinstance(value, str):
        return path if "\x00" in value else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and "\x00" in key:
            return path
        found = _nul_path(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def read_model(body: bytes, model: type[M]) -> tuple[Any, M | None, Rejection | None]:
    """Parse a body strictly and validate it: (the payload, the model or None, why not or None)."""
    try:
        payload = parse_json(body)
    except (UnicodeDecodeError, ValueError) as exc:
        return None, None, Rejection(400, "unreadable", f"body is not JSON that can be stored: {exc}", "body")
    try:
        return payload, model.model_validate(payload), None
    except ValidationError as exc:
        problems = [
            {"field": ".".join(str(p) for p in e["loc"]) or None, "message": e["msg"]} for e in exc.errors()
        ]
        first = problems[0]
        message = f"{first['field'] or 'body'}: {first['message']}"
        return payload, None, Rejection(422, "invalid", message, first["field"], problems)


def read_generic(body: bytes) -> Reading:
    """Cadence's own event shape, one event a delivery (`/webhooks/generic`)."""
    payload, event, rejection = read_model(body, Event)
    event_id = _event_id(payload, body)
    kind = payload.get("type") if isinstance(payload, dict) else None
    kind = kind if isinstance(kind, str) else None
    if event is None:
        return Reading(event_id, kind, rejection=rejection)
    missing = event.missing_subject()
    if missing is not None:
        message = f"{missing}: a {event.type} event needs `{missing}`"
        problems = [{"field": missing, "message": message}]
        return Reading(event_id, kind, rejection=Rejection(422, "invalid", message, missing, problems))
    return Reading(event_id, kind, [event])


def _event_id(payload: Any, body: bytes) -> str:
    if isinstance(payload, dict) and payload.get("event_id") is not None:
        return str(payload["event_id"])[:128]
    return body_id(body)


def body_id(body: bytes) -> str:
    """An id for a delivery that carries none: the same body is the same delivery."""
    return "sha256:" + hashlib.sha256(body).hexdigest()


class Inbox:
    def __init__(
        self,
        db: sa.Engine,
        engine: Engine,
        clock: Clock,
        metrics: Metrics,
        readers: Callable[[str], Reader | None] | None = None,
    ) -> None:
        self.db = db
        self.engine = engine
        self.clock = clock
        self.metrics = metrics
        #: The reader of each source's deliveries (generic only, without one).
        self.readers = readers or (lambda source: read_generic if source == "generic" else None)

    def _reader(self, source: str) -> Reader:
        reader = self.readers(source)
        if reader is None:
            raise KeyError(f"no reader for source {source!r}")
        return reader

    def receive(self, source: str, body: bytes) -> Intake:
        """Store the delivery (a rejected one too, for inspection), then act on it."""
        now = self.clock()
        reading = self._reader(source)(body)
        event_id, kind, rejection = reading.event_id, reading.kind, reading.rejection
        row = InboundEvent(
            source=source,
            event_id=event_id.replace("\x00", "\ufffd"),
            type=kind[:64].replace("\x00", "\ufffd") if kind else None,
            # Kept for inspection even when rejected; NUL cannot be stored, so it is shown as U+FFFD.
            body=body.decode("utf-8", errors="replace").replace("\x00", "\ufffd"),
            received_at=now,
            status="rejected" if rejection else "received",
            error=rejection.message if rejection else None,
        )
        try:
            with store.session(self.db) as s:
                s.add(row)
        except sa.exc.IntegrityError:
            retried = self._retry(row) if rejection is None else None
            if retried is None:
                self.metrics.webhooks.labels(source, "duplicate").inc()
                return Intake(event_id, duplicate=True, rejection=rejection)
            row = retried
        if rejection is not None:
            self.metrics.webhooks.labels(source, "rejected").inc()
            return Intake(event_id, rejection=rejection)
        try:
            effects = self.process(row.id or 0, source, reading.events)
        except EngineError as exc:
            return Intake(event_id, rejection=Rejection(422, "not_applicable", str(exc), exc.field))
        return Intake(event_id, effects=effects or Effects())  # None: another process acted on it

    def _retry(self, delivery: InboundEvent) -> InboundEvent | None:
        """A new delivery of a rejected or failed event takes its place; None for a true duplicate."""
        with store.session(self.db) as s:
            row = s.exec(
                select(InboundEvent)
                .where(
                    InboundEvent.source == delivery.source,
                    InboundEvent.event_id == delivery.event_id,
                    col(InboundEvent.status).in_(["rejected", "failed"]),
                )
                .with_for_update()
            ).first()
            if row is None:
                return None
            row.body, row.type, row.received_at = delivery.body, delivery.type, delivery.received_at
            row.status, row.error, row.processed_at = "received", None, None
            return row

    def process(self, row_id: int, source: str, events: list[Event]) -> Effects | None:
        """Act on a stored delivery's events once, all or none: None when another process already has."""
        now = self.clock()
        try:
            with store.session(self.db) as s:
                row = s.exec(
                    select(InboundEvent)
                    .where(InboundEvent.id == row_id, InboundEvent.status == "received")
                    .with_for_update()
                ).first()
                if row is None:
                    return None
                effects = Effects()
                for event in events:
                    done = self.engine.handle_event(s, source, event, now)
                    effects.enrolled += done.enrolled
                    effects.ended += done.ended
                row.status, row.processed_at = "processed", now
        except Exception as exc:
            self._mark_failed(row_id, str(exc) if isinstance(exc, EngineError) else repr(exc), now)
            self.metrics.webhooks.labels(source, "failed").inc()
            raise
        self.metrics.webhooks.labels(source, "processed").inc()
        log.info("delivery processed", extra={"source": source, "events": [e.type for e in events]})
        return effects

    def _mark_failed(self, row_id: int, message: str, now: datetime) -> None:
        with store.session(self.db) as s:
            row = s.get_one(InboundEvent, row_id)
            row.status, row.error, row.processed_at = "failed", message, now

    def replay(self, received_before: datetime) -> list[int]:
        """Process accepted events still unprocessed from before `received_before`: a crash cut them short."""
        with store.session(self.db) as s:
            stale = s.exec(
                select(InboundEvent.id, InboundEvent.source, InboundEvent.body)
                .where(InboundEvent.status == "received", col(InboundEvent.received_at) < received_before)
                .order_by(col(InboundEvent.id))
            ).all()
        done = []
        for row_id, source, body in stale:
            reader = self.readers(source)
            reading = reader(body.encode("utf-8")) if reader is not None else None
            if reading is None or reading.rejection is not None:
                continue
            try:
                if self.process(row_id or 0, source, reading.events) is not None:
                    done.append(row_id or 0)
            except EngineError:
                continue
        if done:
            log.warning("replayed unprocessed events", extra={"events": done})
        return done
