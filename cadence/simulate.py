"""A cadence's future for one contact, before anyone is enrolled.

`project` is the quick sketch lint uses: each touch's due time from the timing rules alone. `run` is the real
thing: the engine and the send-time checks themselves, on a private in-memory database with a clock that jumps
from one due touch to the next, so what it shows is what the service would do: windows, holidays, DST, quiet
hours, blocks, caps, budgets, repeats, retries and the branches scripted outcomes take.
"""

from __future__ import annotations

import functools
import re
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import jinja2
import sqlalchemy as sa
from sqlalchemy.pool import StaticPool
from sqlmodel import Session, SQLModel, col, select

from cadence import sandbox, store, timing
from cadence.clock import ManualClock
from cadence.dispatch import Dispatcher
from cadence.engine import Engine, contact_view_from, pick_variant, stable_fraction
from cadence.events import ContactData, DealData
from cadence.language import CadenceSpec, OutcomeName
from cadence.metrics import Metrics
from cadence.models import Block, Enrollment, Touch, TouchStatus
from cadence.policy import Policy
from cadence.rules import RuleSet
from channels import Channel, Message, Receipt
from channels.call import CallTasks
from channels.email import EmailOutbox
from channels.letter import LetterOutbox
from channels.sms import SmsOutbox

#: Touches `project` lists at most, so an endless repeat still ends.
MAX_PROJECTED = 1000
#: Dispatch attempts `run` makes at most (each deferral is one), so a contact who can never be touched ends.
MAX_STEPS = 20000


@dataclass(frozen=True)
class Row:
    """One projected touch."""

    step: int
    due_at: datetime
    local: datetime
    channel: str
    template: str
    reason: str
    sent: bool
    note: str
    variant: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "due_at": self.due_at.isoformat(),
            "local": self.local.isoformat(),
            "channel": self.channel,
            "template": self.template,
            "variant": self.variant,
            "reason": self.reason,
            "sent": self.sent,
            "note": self.note,
        }


def project(
    spec: CadenceSpec,
    start: datetime,
    contact: Mapping[str, Any],
    deal: Mapping[str, Any] | None,
    default_timezone: str,
    policy: Policy | None = None,
    until: datetime | None = None,
) -> list[Row]:
    """Each touch's due time in the contact's zone, from the timing rules alone, and whether its condition
    lets it through. A repeat is followed up to `until` (without it, the steps alone)."""
    zone, calendar = timing.placement(
        spec.calendar, contact.get("timezone"), contact.get("country"), default_timezone
    )
    context = {"contact": contact_view_from(contact), "deal": deal, "enrollment": {"cadence": spec.cadence}}
    rows: list[Row] = []
    previous = start
    limit = len(spec.steps) if until is None else MAX_PROJECTED
    for index in range(limit):
        point = spec.touchpoint(index)
        if point is None:
            break
        option = next(
            (o for o in point.options() if not o.when or _holds(o.when, context)), point.options()[0]
        )
        variant = pick_variant(point.variants, stable_fraction(0, index))
        channel = (variant and variant.channel) or option.channel
        template = (variant and variant.template) or option.template
        hours = policy.hours(channel) if policy else None
        counting = timing.for_step(calendar, point.window, hours)
        due = timing.touch_due(spec, index, counting, zone, start, previous)
        if until is not None and due > until:
            break
        skipped = sandbox.skip_reason(point.when, point.skip_when, context)
        rows.append(
            Row(
                index,
                due,
                due.astimezone(zone),
                channel,
                template,
                point.reason,
                skipped is None,
                f"skipped: {skipped}" if skipped else "",
                variant.name if variant else None,
            )
        )
        previous = due
    return rows


def _holds(expression: str, context: Mapping[str, Any]) -> bool:
    try:
        return sandbox.truthy(expression, context)
    except sandbox.ExpressionError:
        return False


# --- the real run -------------------------------------------------------------------------------------------

_SCRIPT = re.compile(r"^\s*day\s+(\d+)(?:\s+(\d{1,2}):(\d{2}))?\s*:\s*([a-z_]+)\s*$")


@dataclass(frozen=True)
class Scripted:
    """An outcome the simulation records: `day 3: no_answer`, or at a local time, `day 3 16:00: replied`."""

    day: int
    outcome: str
    at: time | None = None

    @classmethod
    def parse(cls, text: str) -> Scripted:
        match = _SCRIPT.match(text)
        if not match:
            raise ValueError(f"{text!r}: write an outcome as 'day 3: no_answer' or 'day 3 16:00: replied'")
        day, hours, minutes, outcome = match.groups()
        if outcome not in OutcomeName.__args__:  # type: ignore[attr-defined]
            known = ", ".join(OutcomeName.__args__)  # type: ignore[attr-defined]
            raise ValueError(f"{text!r}: unknown outcome {outcome!r}; outcomes are {known}")
        at = None
        if hours is not None:
            if int(hours) > 23 or int(minutes) > 59:
                raise ValueError(f"{text!r}: {hours}:{minutes} is not a time of day")
            at = time(int(hours), int(minutes))
        return cls(int(day), outcome, at)


@dataclass(frozen=True)
class BlockedAtStart:
    """A block the contact already has when the simulation starts: `call`, `all`, or `email:30` (days)."""

    channel: str | None
    days: int | None = None

    @classmethod
    def parse(cls, text: str) -> BlockedAtStart:
        name, _, days = text.partition(":")
        name = name.strip()
        if name not in ("all", "email", "sms", "call", "letter"):
            raise ValueError(f"{text!r}: block a channel (email, sms, call, letter) or all, e.g. call:30")
        if days and not days.strip().isdigit():
            raise ValueError(f"{text!r}: the days after ':' are a whole number, e.g. call:30")
        return cls(None if name == "all" else name, int(days) if days else None)


@dataclass
class Event:
    """One line of a simulated timeline: a touch (sent, skipped, ...), an outcome, or an enrollment change."""

    at: datetime
    local: datetime
    kind: str  # touch | outcome | enrolled | ended
    cadence: str
    step: int | None = None
    iteration: int = 0
    channel: str | None = None
    template: str | None = None
    variant: str | None = None
    reason: str | None = None
    status: str | None = None
    note: str | None = None
    deferrals: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(),
            "local": self.local.isoformat(),
            "kind": self.kind,
            "cadence": self.cadence,
            "step": self.step,
            "iteration": self.iteration,
            "channel": self.channel,
            "template": self.template,
            "variant": self.variant,
            "reason": self.reason,
            "status": self.status,
            "note": self.note,
            "deferrals": self.deferrals,
        }


class _Dry(Channel):
    """A channel that checks what the real one checks and sends nothing. It counts as delivering to the
    database, so a simulated touch is checked, sent and recorded in one transaction."""

    in_database = True

    def __init__(self, real: type[Channel]) -> None:
        self._real = real
        self.name = real.name  # type: ignore[misc]

    def missing(self, contact: Mapping[str, Any]) -> str | None:
        return self._real.missing(self, contact)

    def send_in(self, s: Session, message: Message) -> Receipt:
        return Receipt("simulated", message.key)


@contextmanager
def _private_database() -> Iterator[sa.Engine]:
    """A private in-memory database with the schema and nothing else.

    The schema is copied (SQLite's backup) from one made once, as making it costs more than a short
    simulation. Databases are reused after a run that ended well, because each engine compiles every
    statement anew, and that too costs more than a short simulation."""
    with _idle_lock:
        db = _idle.pop() if _idle else None
    if db is None:
        db = sa.create_engine("sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False})
    with db.connect() as connection, _copying:
        _schema().backup(connection.connection.dbapi_connection)  # type: ignore[arg-type]
    yield db
    with _idle_lock:
        if len(_idle) < MAX_IDLE_DATABASES:
            _idle.append(db)
            return
    db.dispose()


#: Private databases kept for reuse, at most (one a simulation running at once).
MAX_IDLE_DATABASES = 8
_idle: list[sa.Engine] = []
_idle_lock = threading.Lock()
#: One copy of the schema at a time (simulations may run in several threads).
_copying = threading.Lock()


@functools.cache
def _schema() -> sqlite3.Connection:
    """An empty in-memory database with every table, kept to be copied."""
    db = sa.create_engine("sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False})
    SQLModel.metadata.create_all(db)
    connection = db.raw_connection().dbapi_connection
    assert isinstance(connection, sqlite3.Connection)
    return connection


#: The simulation's own queries, made once: the earliest block to run out, and the next touch due with it.
_BLOCK_ENDS = select(sa.func.min(Block.until)).where(col(Block.ended_seen_at).is_(None))
_NEXT_DUE = (
    select(Touch.id, Touch.due_at, _BLOCK_ENDS.scalar_subquery())
    .where(Touch.status == TouchStatus.planned)
    .order_by(col(Touch.due_at), col(Touch.id))
    .limit(1)
)


#: The scheduler's claim of one touch. Made once.
_QUEUE = sa.update(Touch).where(col(Touch.id) == sa.bindparam("touch_id")).values(status=TouchStatus.queued)


def run(
    rules: RuleSet,
    name: str,
    start: datetime,
    contact: Mapping[str, Any],
    deal: Mapping[str, Any] | None,
    *,
    days: int,
    templates: jinja2.Environment,
    sender: Mapping[str, str],
    default_timezone: str,
    outcomes: Sequence[Scripted] = (),
    blocks: Sequence[BlockedAtStart] = (),
) -> list[Event]:
    """Enroll the contact in cadence `name` at `start` and run the service for `days` days."""
    with _private_database() as db:
        clock = ManualClock(start)
        engine = Engine(lambda: rules, default_timezone)
        channels: dict[str, Channel] = {
            real.name: _Dry(real) for real in (EmailOutbox, SmsOutbox, LetterOutbox, CallTasks)
        }
        dispatcher = Dispatcher(db, engine, channels, templates, sender, clock, Metrics())
        end = start + timedelta(days=days)
        zone = timing.zone_for(contact.get("timezone"), rules.get(name).calendar, default_timezone)
        with store.session(db) as s:
            person = engine.upsert_contact(
                s, "simulate", ContactData.model_validate({"id": "1", **contact}), start
            )
            for block in blocks:
                s.add(
                    Block(
                        contact_id=person.id or 0,
                        channel=block.channel,
                        reason="blocked when the simulation starts",
                        starts_at=start,
                        until=start + timedelta(days=block.days) if block.days else None,
                    )
                )
            subject = None
            if deal is not None:
                data = DealData.model_validate({"id": "1", "status": "open", **deal})
                subject = engine.upsert_deal(s, "simulate", data, person, None, start)
            s.flush()
            engine.enroll(s, name, person, subject, start, origin="simulate")
        pending = sorted(_scripted_times(outcomes, start, zone), key=lambda item: item[0])
        timeline = _Timeline(db, zone)
        for _ in range(MAX_STEPS):
            with store.session(db) as s:
                found = store.select_rows(s, _NEXT_DUE, {}).first()
                if found is not None:
                    touch_id, due, block_ends = found
                else:
                    touch_id, due = 0, None
                    block_ends = store.select_rows(s, _BLOCK_ENDS, {}).scalar()
                if block_ends is not None and (block_ends > end or (due is not None and block_ends > due)):
                    block_ends = None  # none runs out before the next touch, within the span
                outcome_first = (
                    bool(pending) and (due is None or pending[0][0] <= due) and pending[0][0] <= end
                )
                if due is not None and due <= end and block_ends is None and not outcome_first:
                    # Claimed as the scheduler claims it, then dispatched: the dry channels deliver to the
                    # database, so the checks, the send and the record are this one transaction.
                    s.connection().execute(_QUEUE, {"touch_id": touch_id})
                    clock.set(max(due, clock()))
                    result, _ = dispatcher.dispatch_in(s, touch_id)
                    touched = timeline.touched(s, touch_id, result.reason, clock())
                    store.update_all(s, [touched])  # written as a batch writes its touches
                    continue
            if block_ends is not None:
                clock.set(max(block_ends, clock()))
                with store.session(db) as s:
                    engine.blocks_ended(s, clock())
                continue
            if outcome_first:
                at, scripted = pending.pop(0)
                clock.set(max(at, clock()))
                timeline.outcome(engine, clock(), scripted)
                continue
            break
        return timeline.events()


def _scripted_times(
    outcomes: Sequence[Scripted], start: datetime, zone: ZoneInfo
) -> Iterator[tuple[datetime, Scripted]]:
    """When each scripted outcome happens: its time on its day, else late in the day (after that day's
    touches went out)."""
    first = start.astimezone(zone).date()
    for scripted in outcomes:
        day = first + timedelta(days=scripted.day)
        at = datetime.combine(day, scripted.at or time(23, 0), tzinfo=zone).astimezone(UTC)
        yield max(at, start), scripted


class _Timeline:
    """What happened, collected as it happens."""

    def __init__(self, db: sa.Engine, zone: ZoneInfo) -> None:
        self.db = db
        self.zone = zone
        self._touches: dict[int, Event] = {}
        #: Each enrollment's cadence, by the enrollment's id.
        self._cadences: dict[int, str] = {}
        self._other: list[Event] = []

    def _local(self, at: datetime) -> datetime:
        return at.astimezone(self.zone)

    def touched(self, s: Session, touch_id: int, reason: str | None, now: datetime) -> Touch:
        """Record touch `touch_id` as dispatching it at `now` left it (deferred for `reason`, or done); the
        touch."""
        touch = s.get_one(Touch, touch_id)  # in the session already, as the dispatch left it
        event = self._touches.get(touch_id)
        if event is None:
            cadence = self._cadences.get(touch.enrollment_id)
            if cadence is None:
                cadence = self._cadences[touch.enrollment_id] = s.get_one(
                    Enrollment, touch.enrollment_id
                ).cadence_name
            event = Event(now, self._local(now), "touch", cadence, touch.step_index)
            self._touches[touch_id] = event
        event.at, event.local = now, self._local(now)
        event.iteration = touch.iteration
        event.channel, event.template, event.variant = touch.channel, touch.template, touch.variant
        event.reason = touch.reason
        event.status = touch.status
        event.note = touch.status_reason
        if touch.status == TouchStatus.planned:
            event.deferrals.append(f"{self._local(now):%Y-%m-%d %H:%M}: {reason}")
            event.note = f"{reason}, to {self._local(touch.due_at):%Y-%m-%d %H:%M}"
        return touch

    def outcome(self, engine: Engine, now: datetime, scripted: Scripted) -> None:
        """Record the outcome on the latest touch that went out, or on the latest enrollment."""
        with store.session(self.db) as s:
            touch = s.exec(
                select(Touch)
                .where(col(Touch.status).in_([TouchStatus.sent, TouchStatus.skipped]))
                .where(col(Touch.finished_at) <= now)
                .order_by(col(Touch.finished_at).desc(), col(Touch.id).desc())
            ).first()
            enrollment = s.exec(select(Enrollment).order_by(col(Enrollment.id).desc())).first()
            if enrollment is None:
                return
            target = touch if touch is not None and scripted.outcome not in ("won", "lost") else None
            on = f"touch {target.key}" if target is not None else f"enrollment {enrollment.id}"
            if target is not None:
                enrollment = s.get_one(Enrollment, target.enrollment_id)
            engine.record_outcome(
                s,
                scripted.outcome,
                now,
                touch_id=target.id if target is not None else None,
                enrollment_id=enrollment.id,
                source="simulate",
            )
            self._other.append(
                Event(
                    now,
                    self._local(now),
                    "outcome",
                    enrollment.cadence_name,
                    target.step_index if target else None,
                    status=scripted.outcome,
                    note=f"{scripted.outcome} on {on}",
                )
            )

    def events(self) -> list[Event]:
        with Session(self.db) as s:
            for enrollment in s.exec(select(Enrollment).order_by(col(Enrollment.id))).all():
                self._other.append(
                    Event(
                        enrollment.started_at,
                        self._local(enrollment.started_at),
                        "enrolled",
                        enrollment.cadence_name,
                        note=enrollment.origin,
                    )
                )
                if enrollment.ended_at is not None:
                    self._other.append(
                        Event(
                            enrollment.ended_at,
                            self._local(enrollment.ended_at),
                            "ended",
                            enrollment.cadence_name,
                            status=enrollment.status,
                            note=enrollment.end_reason,
                        )
                    )
            # Every touch as the database has it at the end: one cancelled by an exit after it was last
            # dispatched (or before its time came) shows cancelled, one past the span shows planned.
            for row in s.exec(select(Touch).order_by(col(Touch.id))).all():
                cadence = s.get_one(Enrollment, row.enrollment_id).cadence_name
                event = self._touches.get(row.id or 0)
                if event is None:
                    at = row.finished_at or row.due_at
                    event = Event(
                        at,
                        self._local(at),
                        "touch",
                        cadence,
                        row.step_index,
                        row.iteration,
                        row.channel,
                        row.template,
                        row.variant,
                        row.reason,
                        row.status,
                        row.status_reason,
                    )
                    self._touches[row.id or 0] = event
                elif row.status != TouchStatus.planned:
                    event.status, event.note = row.status, row.status_reason
                    if row.finished_at is not None:
                        event.at, event.local = row.finished_at, self._local(row.finished_at)
                if row.status == TouchStatus.planned and not event.deferrals:
                    event.note = "due after the simulated span"
        order = {"enrolled": 0, "touch": 1, "outcome": 2, "ended": 3}
        found = [*self._touches.values(), *self._other]
        return sorted(found, key=lambda e: (e.at, order[e.kind]))


def as_json(events: Sequence[Event]) -> list[dict[str, Any]]:
    return [event.as_dict() for event in events]
