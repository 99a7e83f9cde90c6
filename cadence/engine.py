"""The engine: events enroll contacts and deals; outcomes and deal changes end or move enrollments.

Every function here works inside one database session handed in by the caller, so a caller's transaction is
the unit of change: an event either has all its effects or none.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from sqlmodel import Session, SQLModel, col, select

from cadence import outbound, sandbox, store, timing
from cadence.events import ContactData, DealData, Event
from cadence.language import CadenceSpec, Calendar, Option, Parsed, Touchpoint, Variant, parse
from cadence.models import (
    Activity,
    Block,
    CadenceVersion,
    CallTask,
    Contact,
    Deal,
    Enrollment,
    EnrollmentStatus,
    InboundEvent,
    Outcome,
    Touch,
    TouchStatus,
)
from cadence.policy import Policy
from cadence.rules import RuleSet

log = logging.getLogger(__name__)
T = TypeVar("T", bound=SQLModel)

_CONTACT_COLUMNS = ("name", "email", "phone", "timezone", "country", "address")
_DEAL_COLUMNS = ("title", "stage", "status", "amount", "currency", "owner", "probability")
#: Contact keys every template can rely on (None when the CRM did not send them).
_CONTACT_KEYS = ("name", "first_name", "email", "phone", "company", "title", "address", "timezone", "country")


class EngineError(Exception):
    """A request the engine cannot carry out; `field` names the input at fault."""

    def __init__(self, message: str, field: str | None = None, not_found: bool = False) -> None:
        super().__init__(message)
        self.field = field
        self.not_found = not_found


@dataclass
class Effects:
    """What one event or outcome changed, for the caller's answer and logs."""

    enrolled: list[int] = field(default_factory=list)
    ended: list[int] = field(default_factory=list)


def contact_view_from(fields: Mapping[str, Any]) -> dict[str, Any]:
    """What conditions and templates see of a contact: the standard keys always present, plus CRM fields."""
    view: dict[str, Any] = dict.fromkeys(_CONTACT_KEYS)
    view.update(fields)
    if not view.get("first_name") and view.get("name"):
        view["first_name"] = str(view["name"]).split()[0]
    return view


def _row_view(row: Contact | Deal, columns: tuple[str, ...]) -> dict[str, Any]:
    """A stored contact or deal as conditions and templates see it: CRM fields, then its own columns."""
    return {
        **row.attributes,
        **{c: getattr(row, c) for c in columns},
        "id": row.id,
        "external_id": row.external_id,
    }


def contact_view(contact: Contact) -> dict[str, Any]:
    return contact_view_from(_row_view(contact, _CONTACT_COLUMNS))


def deal_view(deal: Deal | None) -> dict[str, Any] | None:
    return None if deal is None else _row_view(deal, _DEAL_COLUMNS)


def enrollment_view(enrollment: Enrollment) -> dict[str, Any]:
    return {
        "id": enrollment.id,
        "cadence": enrollment.cadence_name,
        "status": enrollment.status,
        "started_at": enrollment.started_at,
    }


def _get_or_insert(
    s: Session, existing: Callable[[], T | None], make: Callable[[], T], *, likely_new: bool = False
) -> T:
    """The row `existing` finds, else a new one; a row a concurrent transaction inserted first wins.

    A row `likely_new` is inserted straight away (INSERT ... ON CONFLICT DO NOTHING), and looked for only
    when its key is taken: one query fewer, and no savepoint, for the usual case.
    """
    if likely_new:
        row = make()
        if store.insert_unless_taken(s, row):
            return row
        found = existing()
        if found is None:
            raise LookupError(f"{type(row).__name__}: key taken, yet no row has it")
        return found
    found = existing()
    if found is not None:
        return found
    row = make()
    try:
        with s.begin_nested():
            s.add(row)
            s.flush()
        return row
    except sa.exc.IntegrityError:
        found = existing()
        if found is None:
            raise
        return found


def _apply(
    row: Contact | Deal, data: ContactData | DealData, columns: tuple[str, ...], now: datetime
) -> None:
    """What the CRM sent: the fields it named overwrite, the others stay; extra fields merge."""
    for column in columns:
        value = getattr(data, column)
        if value is not None:
            setattr(row, column, value)
    row.attributes = {**row.attributes, **(data.model_extra or {})}
    row.updated_at = now


def _touch_at(s: Session, enrollment_id: int, step_index: int, iteration: int) -> Touch | None:
    """The touch with this key, if one exists: a touch is made at most once per key."""
    return s.exec(
        select(Touch).where(
            Touch.enrollment_id == enrollment_id, Touch.step_index == step_index, Touch.iteration == iteration
        )
    ).first()


def touch_view(touch: Touch) -> dict[str, Any]:
    """What templates see of the touch itself."""
    return {
        "id": touch.id,
        "step": touch.step_index,
        "iteration": touch.iteration,
        "channel": touch.channel,
        "variant": touch.variant,
        "due_at": touch.due_at,
    }


def _deal_of(s: Session, enrollment: Enrollment, held: Deal | None) -> Deal | None:
    """The enrollment's deal: `held`, when the caller has it, else found in `s` (None without one)."""
    if held is None and enrollment.deal_id:
        return s.get(Deal, enrollment.deal_id)
    return held


def stable_fraction(*parts: object) -> float:
    """A number in [0, 1) fixed by `parts`: the same touch always draws the same variant, on any machine."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def pick_variant(variants: tuple[Variant, ...], draw: float) -> Variant | None:
    """The variant a draw in [0, 1) lands on, by weight."""
    total = sum(v.weight for v in variants)
    if not total:
        return None
    mark = draw * total
    for variant in variants:
        if mark < variant.weight:
            return variant
        mark -= variant.weight
    return variants[-1]


#: Where a session keeps the cadence versions `Engine.spec_of` has read, by id.
_SPECS = "cadence.specs"


@lru_cache(maxsize=256)
def _spec_from_text(text: str, file: str) -> CadenceSpec:
    return parse(text, file).spec


class Engine:
    """Decisions about enrollments and touches; the rules come from a provider so reloads are seen at once."""

    def __init__(self, rules: Callable[[], RuleSet], default_timezone: str, activity: bool = False) -> None:
        self._rules = rules
        self.default_timezone = default_timezone
        #: Keep touches sent and outcomes recorded to be posted back (OUTBOUND_URL is set).
        self.activity = activity

    @property
    def policy(self) -> Policy:
        return self._rules().policy

    # --- versions -------------------------------------------------------------------------------------------

    def spec_of(self, s: Session, enrollment: Enrollment) -> CadenceSpec:
        """The cadence version the enrollment started on, whatever the rules say now. Kept by the session
        (a version never changes): sending a touch asks three or four times, a batch for each touch."""
        specs: dict[int, CadenceSpec] = s.info.setdefault(_SPECS, {})
        spec = specs.get(enrollment.cadence_version_id)
        if spec is None:
            version = s.get_one(CadenceVersion, enrollment.cadence_version_id)
            spec = specs[enrollment.cadence_version_id] = _spec_from_text(version.yaml_text, version.file)
        return spec

    def _current_version(self, s: Session, parsed: Parsed, now: datetime) -> CadenceVersion:
        name = parsed.spec.cadence

        def existing() -> CadenceVersion | None:
            return s.exec(
                select(CadenceVersion).where(
                    CadenceVersion.name == name, CadenceVersion.content_hash == parsed.content_hash
                )
            ).first()

        def make() -> CadenceVersion:
            return CadenceVersion(
                name=name,
                content_hash=parsed.content_hash,
                yaml_text=parsed.text,
                file=parsed.file,
                created_at=now,
            )

        return _get_or_insert(s, existing, make)

    # --- events ---------------------------------------------------------------------------------------------

    def handle_event(self, s: Session, source: str, event: Event, now: datetime) -> Effects:
        effects = Effects()
        deal = self._find_deal(s, source, event.deal) if event.deal else None
        if event.contact is not None:
            contact = self.upsert_contact(s, source, event.contact, now)
        elif deal is not None and deal.contact_id is not None:
            contact = s.get_one(Contact, deal.contact_id)
        elif event.deal is not None:
            # A CRM that sends a deal without its contact (HubSpot, Bitrix24): keep the deal; it is enrolled
            # once an event brings the contact, since a cadence touches a person.
            self._upsert_deal_alone(s, source, event, deal, now)
            return effects
        else:
            raise EngineError("an event needs a `contact` or a `deal`", field="contact")
        if event.deal is not None:
            deal = self.upsert_deal(s, source, event.deal, contact, deal, now)
            if event.type in ("deal.won", "deal.lost"):
                deal.status = event.type.removeprefix("deal.")
        s.flush()
        self.review(s, contact, now, effects)
        self._enroll_matching(s, event, contact, deal, now, effects)
        return effects

    def _upsert_deal_alone(
        self, s: Session, source: str, event: Event, deal: Deal | None, now: datetime
    ) -> None:
        assert event.deal is not None
        if deal is None:
            data = event.deal
            deal = _get_or_insert(
                s,
                lambda: self._find_deal(s, source, data),
                lambda: Deal(source=source, external_id=data.id, created_at=now, updated_at=now),
            )
        _apply(deal, event.deal, _DEAL_COLUMNS, now)
        if event.type in ("deal.won", "deal.lost"):
            deal.status = event.type.removeprefix("deal.")
        s.flush()

    def upsert_contact(self, s: Session, source: str, data: ContactData, now: datetime) -> Contact:
        def existing() -> Contact | None:
            return s.exec(
                select(Contact).where(Contact.source == source, Contact.external_id == data.id)
            ).first()

        contact = _get_or_insert(
            s, existing, lambda: Contact(source=source, external_id=data.id, created_at=now, updated_at=now)
        )
        _apply(contact, data, _CONTACT_COLUMNS, now)
        s.flush()
        return contact

    def _find_deal(self, s: Session, source: str, data: DealData) -> Deal | None:
        return s.exec(select(Deal).where(Deal.source == source, Deal.external_id == data.id)).first()

    def upsert_deal(
        self, s: Session, source: str, data: DealData, contact: Contact, deal: Deal | None, now: datetime
    ) -> Deal:
        if deal is None:
            deal = _get_or_insert(
                s,
                lambda: self._find_deal(s, source, data),
                lambda: Deal(
                    source=source, external_id=data.id, contact_id=contact.id, created_at=now, updated_at=now
                ),
            )
        deal.contact_id = contact.id
        _apply(deal, data, _DEAL_COLUMNS, now)
        return deal

    def _enroll_matching(
        self, s: Session, event: Event, contact: Contact, deal: Deal | None, now: datetime, effects: Effects
    ) -> None:
        context = {"contact": contact_view(contact), "deal": deal_view(deal), "enrollment": None}
        for name, parsed in list(self._rules().cadences.items()):
            enroll = parsed.spec.enroll
            if enroll is None or event.type not in enroll.on:
                continue
            if enroll.when and not self._holds(enroll.when, context, f"{name}: enroll.when"):
                continue
            enrollment = self.enroll(s, name, contact, deal, now, origin=f"event {event.type}")
            if enrollment is not None:
                effects.enrolled.append(enrollment.id or 0)

    @staticmethod
    def _holds(expression: str, context: Mapping[str, Any], where: str) -> bool:
        try:
            return sandbox.truthy(expression, context)
        except sandbox.ExpressionError as exc:
            log.warning("condition could not be evaluated", extra={"where": where, "error": str(exc)})
            return False

    # --- enrollments ----------------------------------------------------------------------------------------

    def enroll(
        self, s: Session, name: str, contact: Contact, deal: Deal | None, now: datetime, origin: str
    ) -> Enrollment | None:
        """Start `name` for the deal (or the contact); None when one is already active."""
        parsed = self._rules().cadences.get(name)  # once: a reload meanwhile must not change it midway
        if parsed is None:
            raise EngineError(f"no cadence named {name!r}", field="cadence", not_found=True)
        subject = f"deal:{deal.id}" if deal is not None else f"contact:{contact.id}"
        if self.blocked(s, contact.id or 0, None, now) is not None:
            return None
        if self._barred(s, parsed, subject, now):
            return None
        version = self._current_version(s, parsed, now)
        enrollment = Enrollment(
            cadence_name=name,
            cadence_version_id=version.id or 0,
            subject=subject,
            contact_id=contact.id or 0,
            deal_id=deal.id if deal is not None else None,
            started_at=now,
            origin=origin,
        )
        try:
            # The partial unique index settles a race with another process enrolling the same subject.
            with s.begin_nested():
                s.add(enrollment)
                s.flush()
        except sa.exc.IntegrityError:
            return None
        self.plan(s, enrollment, 0, now)
        return enrollment

    def _barred(self, s: Session, parsed: Parsed, subject: str, now: datetime) -> bool:
        """Whether the subject may not enter cadence `name` now: it is in it, or its re-enrollment rule
        says not yet. Without a rule, a time that ended with an outcome (a reply, "not interested") bars it:
        the person answered this cadence, so the same trigger must not start it over."""
        name, enroll = parsed.spec.cadence, parsed.spec.enroll
        rule = enroll.reenroll if enroll else None
        earlier = select(Enrollment.id).where(Enrollment.cadence_name == name, Enrollment.subject == subject)
        if rule == "never":
            return s.exec(earlier).first() is not None
        barring: sa.ColumnElement[bool] = col(Enrollment.status).in_(
            [EnrollmentStatus.active, EnrollmentStatus.paused]
        )
        cool_off = enroll.cool_off if enroll else None
        if cool_off is not None:
            barring = barring | (col(Enrollment.ended_at) > now - cool_off)
        elif rule is None:
            barring = barring | col(Enrollment.end_outcome).is_not(None)
        return s.exec(earlier.where(barring)).first() is not None

    def _retry(
        self, s: Session, spec: CadenceSpec, enrollment: Enrollment, touch: Touch, outcome: str, now: datetime
    ) -> Touch | None:
        """The step's next try after `outcome`, if its on_outcome asks for one and tries are left."""
        point = spec.touchpoint(touch.step_index)
        rule = point.on_outcome.get(outcome) if point else None  # type: ignore[call-overload]
        if point is None or rule is None or rule.max is None or touch.iteration >= rule.max:
            return None
        days, business = rule.gap
        contact = s.get_one(Contact, enrollment.contact_id)
        zone, calendar = self.placement(spec, point, touch.channel, contact.timezone, contact.country)
        counting = calendar.model_copy(update={"business_days": business})
        again = Touch(
            enrollment_id=enrollment.id or 0,
            step_index=touch.step_index,
            iteration=touch.iteration + 1,
            channel=touch.channel,
            template=touch.template,
            variant=touch.variant,
            reason=touch.reason,
            due_at=timing.due_at(now, days, counting, zone, point.at),
            status_reason=f"try {touch.iteration + 2} after {outcome}",
        )
        # A repeated outcome for the same touch finds its try already planned (the touch key is unique).
        return _get_or_insert(
            s,
            lambda: _touch_at(s, again.enrollment_id, again.step_index, again.iteration),
            lambda: again,
            likely_new=True,
        )

    def plan(
        self,
        s: Session,
        enrollment: Enrollment,
        step_index: int,
        now: datetime,
        later: list[Touch] | None = None,
        context: dict[str, Any] | None = None,
        contact: Contact | None = None,
    ) -> Touch | None:
        """Plan touch number `step_index`, or complete the enrollment when there is none (or its repeat's
        goal holds). Given `later`, the new touch is added to it instead of inserted, for the caller to insert
        with others (`store.insert_all_unless_taken`, which leaves it out if its key is taken by then).
        `context` is the enrollment's (see `context`), when the caller has just read it; `contact` its
        contact's row, when the caller holds it."""
        spec = self.spec_of(s, enrollment)
        point = spec.touchpoint(step_index)
        if point is None:
            self.end(s, enrollment, EnrollmentStatus.completed, "all steps done", now)
            return None
        goal = self.goal_reached(s, spec, enrollment, step_index, context)
        if goal is not None:
            self.end(s, enrollment, EnrollmentStatus.completed, goal, now)
            return None

        def make() -> Touch:
            person = contact or s.get_one(Contact, enrollment.contact_id)
            facts = context if context is not None else self.context(s, enrollment)
            variant = pick_variant(point.variants, stable_fraction(enrollment.id, step_index))
            option = self.choose_option(point, facts)
            channel = (variant and variant.channel) or option.channel
            template = (variant and variant.template) or option.template
            return store.new_row(
                Touch,
                enrollment_id=enrollment.id or 0,
                step_index=step_index,
                channel=channel,
                template=template,
                variant=variant.name if variant else None,
                reason=point.reason,
                due_at=self.due(spec, person, enrollment, step_index, channel, now),
            )

        if later is not None:
            later.append(make())
            return later[-1]
        return _get_or_insert(
            s, lambda: _touch_at(s, enrollment.id or 0, step_index, 0), make, likely_new=True
        )

    def goal_reached(
        self,
        s: Session,
        spec: CadenceSpec,
        enrollment: Enrollment,
        step_index: int,
        context: dict[str, Any] | None = None,
    ) -> str | None:
        """Why a repeat stops before touch `step_index` (its `until` holds), or None."""
        repeat = spec.repeat
        if repeat is None or repeat.until is None or step_index < len(spec.steps):
            return None
        context = context or self.context(s, enrollment)
        if self._holds(repeat.until, context, f"{spec.cadence}: repeat.until"):
            return f"repeat until: {repeat.until}"
        return None

    def choose_option(
        self, point: Touchpoint, context: Mapping[str, Any], usable: Callable[[str], str | None] | None = None
    ) -> Option:
        """The first choice whose `when` holds (and, given `usable`, whose channel reaches the contact).

        Without a usable choice, the first one: the caller then sees why it cannot go out.
        """
        options = point.options()
        for option in options:
            if option.when and not self._holds(option.when, context, f"choose.when: {option.when}"):
                continue
            if usable is None or usable(option.channel) is None:
                return option
        return options[0]

    def placement(
        self, spec: CadenceSpec, point: Touchpoint, channel: str, timezone: str | None, country: str | None
    ) -> tuple[ZoneInfo, Calendar]:
        """Zone and calendar of one touch for a contact: the step's window, within its channel's hours."""
        zone, calendar = timing.placement(spec.calendar, timezone, country, self.default_timezone)
        return zone, timing.for_step(calendar, point.window, self.policy.hours(channel))

    def due(
        self,
        spec: CadenceSpec,
        contact: Contact,
        enrollment: Enrollment,
        step_index: int,
        channel: str,
        now: datetime | None = None,
    ) -> datetime:
        """When touch `step_index` is due, planned at `now` (when the touch before it went out).

        A `day` step counts from the enrollment's start; planned behind schedule (an outage), it keeps its
        spacing from now. An `after` step and a repeat count from now. The calendar's `spread` then moves
        each enrollment by its own few minutes, inside the window.
        """
        point = spec.touchpoint(step_index)
        assert point is not None
        zone, calendar = self.placement(spec, point, channel, contact.timezone, contact.country)
        due = timing.touch_due(
            spec, step_index, calendar, zone, enrollment.started_at, now or enrollment.started_at
        )
        relative = step_index >= len(spec.steps) or spec.steps[step_index].after is not None
        if not relative and now is not None and step_index > 0 and due < now:
            gap = (spec.steps[step_index].day or 0) - (spec.steps[step_index - 1].day or 0)
            due = timing.due_at(now, gap, calendar, zone, point.at)
        spread = calendar.spread_seconds
        if spread and not relative:  # a relative touch inherits the offset from the touch before it
            due = timing.spread(due, spread * stable_fraction("spread", enrollment.id), calendar, zone)
        return due

    def blocked(self, s: Session, contact_id: int, channel: str | None, now: datetime) -> str | None:
        """Why the contact may not be touched on `channel` now (None: on any channel at all), or None."""
        on_channel = sa.or_(col(Block.channel).is_(None), col(Block.channel) == channel)
        block = s.exec(
            select(Block)
            .where(
                Block.contact_id == contact_id,
                on_channel,
                col(Block.lifted_at).is_(None),
                col(Block.starts_at) <= now,
                col(Block.until).is_(None) | (col(Block.until) > now),
            )
            .order_by(col(Block.id))
        ).first()
        if block is None:
            return None
        until = f" until {block.until.date().isoformat()}" if block.until else ""
        return f"contact is blocked: {block.reason}{until}"

    def blocks_ended(self, s: Session, now: datetime, limit: int = 100) -> list[int]:
        """Act once on each block that has run out or been lifted: enroll the contact into every cadence
        that starts on `block.ended` and whose `enroll.when` holds. Returns the new enrollments."""
        ended = s.exec(
            select(Block)
            .where(
                col(Block.ended_seen_at).is_(None),
                (col(Block.until) <= now) | col(Block.lifted_at).is_not(None),
            )
            .order_by(col(Block.id))
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
        enrolled: list[int] = []
        for block in ended:
            block.ended_seen_at = now
            outcome = s.get(Outcome, block.outcome_id) if block.outcome_id else None
            deal = s.get(Deal, outcome.deal_id) if outcome is not None and outcome.deal_id else None
            contact = s.get_one(Contact, block.contact_id)
            context = {
                "contact": contact_view(contact),
                "deal": deal_view(deal),
                "enrollment": None,
                "block": {
                    "reason": block.reason,
                    "channel": block.channel,
                    "starts_at": block.starts_at,
                    "until": block.until,
                },
            }
            for name, parsed in list(self._rules().cadences.items()):
                enroll = parsed.spec.enroll
                if enroll is None or "block.ended" not in enroll.on:
                    continue
                if enroll.when and not self._holds(enroll.when, context, f"{name}: enroll.when"):
                    continue
                moved = self.enroll(s, name, contact, deal, now, origin=f"block ended: {block.reason}")
                if moved is not None:
                    enrolled.append(moved.id or 0)
        s.flush()
        return enrolled

    def _block(self, s: Session, outcome: Outcome, now: datetime) -> None:
        """The blocks the policy starts after this outcome, one per channel (or one for all of them)."""
        # A bounce says one address does not work: an SMS bounce leaves email alone.
        bounced = s.get(Touch, outcome.touch_id) if outcome.name == "bounced" and outcome.touch_id else None
        for rule in self.policy.blocking(outcome.name):
            if bounced is not None and not rule.covers(bounced.channel):
                continue
            until = now + rule.length if rule.length else None
            channels: tuple[str | None, ...] = (None,) if rule.channels == "all" else rule.channels
            for channel in channels:
                s.add(
                    Block(
                        contact_id=outcome.contact_id or 0,
                        channel=channel,
                        reason=outcome.name,
                        outcome_id=outcome.id,
                        starts_at=now,
                        until=until,
                    )
                )

    def end(
        self,
        s: Session,
        enrollment: Enrollment,
        status: str,
        reason: str,
        now: datetime,
        outcome: str | None = None,
    ) -> None:
        """End an active or paused enrollment; its touches not yet being sent (held ones too), and its open
        call tasks, are cancelled."""
        if enrollment.status not in (EnrollmentStatus.active, EnrollmentStatus.paused):
            return
        enrollment.status = status
        enrollment.ended_at = now
        enrollment.end_reason = reason
        enrollment.end_outcome = outcome
        pending = self._touches_in(s, enrollment, TouchStatus.planned, TouchStatus.queued, TouchStatus.held)
        for touch in pending:
            touch.status = TouchStatus.cancelled
            touch.status_reason = reason
            touch.finished_at = now
        touches = select(Touch.id).where(Touch.enrollment_id == enrollment.id)
        for task in s.exec(
            select(CallTask).where(col(CallTask.touch_id).in_(touches), CallTask.status == "open")
        ).all():
            task.status = "cancelled"
        s.flush()

    def review(self, s: Session, contact: Contact, now: datetime, effects: Effects | None = None) -> None:
        """Re-check exits and won/lost transitions for every active enrollment of the contact."""
        active = s.exec(
            select(Enrollment).where(
                Enrollment.contact_id == contact.id, Enrollment.status == EnrollmentStatus.active
            )
        ).all()
        for enrollment in active:
            why, target = self.exit_decision(s, enrollment)
            if why is not None:
                self.leave(s, enrollment, why, target, now, effects)

    def leave(
        self,
        s: Session,
        enrollment: Enrollment,
        why: str,
        target: str | None,
        now: datetime,
        effects: Effects | None = None,
        outcome: str | None = None,
    ) -> None:
        """End the enrollment (for `why`, or the outcome that ended it) and start the `then` cadence."""
        self.end(s, enrollment, EnrollmentStatus.exited, why, now, outcome=outcome)
        if effects is not None:
            effects.ended.append(enrollment.id or 0)
        if target is None:
            return
        if target not in self._rules():
            # The version this enrollment runs on names a cadence the current rules no longer have.
            where = {"cadence": enrollment.cadence_name, "target": target}
            log.warning("then-target missing", extra=where)
            return
        contact = s.get_one(Contact, enrollment.contact_id)
        deal = s.get(Deal, enrollment.deal_id) if enrollment.deal_id else None
        moved = self.enroll(s, target, contact, deal, now, origin=f"then from {enrollment.cadence_name}")
        if moved is not None and effects is not None:
            effects.enrolled.append(moved.id or 0)

    def exit_decision(
        self,
        s: Session,
        enrollment: Enrollment,
        context: dict[str, Any] | None = None,
        deal: Deal | None = None,
    ) -> tuple[str | None, str | None]:
        """(why the enrollment should end, the cadence it moves to) — (None, None) while it should go on.
        `deal` is the enrollment's, when the caller holds it."""
        spec = self.spec_of(s, enrollment)
        deal = _deal_of(s, enrollment, deal)
        if deal is not None and deal.status in ("won", "lost"):
            target = spec.then.targets().get(deal.status)
            if target is not None:
                return f"deal {deal.status}", target
        if spec.exit.when:
            context = context or self.context(s, enrollment)
            if self._holds(spec.exit.when, context, f"{spec.cadence}: exit.when"):
                return f"exit.when: {spec.exit.when}", None
        return None, None

    def context(
        self, s: Session, enrollment: Enrollment, contact: Contact | None = None, deal: Deal | None = None
    ) -> dict[str, Any]:
        """What conditions and templates see of the enrollment; `contact` and `deal` are its rows, when the
        caller holds them (else they are found in `s`)."""
        contact = contact or s.get_one(Contact, enrollment.contact_id)
        deal = _deal_of(s, enrollment, deal)
        return {
            "contact": contact_view(contact),
            "deal": deal_view(deal),
            "enrollment": enrollment_view(enrollment),
        }

    # --- outcomes -------------------------------------------------------------------------------------------

    def _follow(
        self,
        s: Session,
        enrollment: Enrollment,
        touch: Touch | None,
        name: str,
        now: datetime,
        effects: Effects,
    ) -> None:
        """What the outcome does to the enrollment: the touch's step rule first, then the cadence's.

        An answer to the last touch may come after the enrollment completed (a call task is logged days
        later): it still moves the contact on, or reopens the enrollment for the step's retry.
        """
        late = (
            touch is not None
            and enrollment.status == EnrollmentStatus.completed
            and enrollment.end_outcome is None
        )
        if enrollment.status != EnrollmentStatus.active and not late:
            return
        spec = self.spec_of(s, enrollment)
        point = spec.touchpoint(touch.step_index) if touch is not None else None
        rule = point.on_outcome.get(name) if point else None  # type: ignore[call-overload]
        target = spec.then.targets().get(name)
        if rule is not None and rule.ends:
            self._conclude(s, enrollment, name, rule.then or target, now, effects)
        elif name in ("won", "lost"):
            return  # through the deal's status: the review after it applies `then`
        elif target is not None or name in spec.exit.on_outcome:
            self._conclude(s, enrollment, name, target, now, effects)
        elif rule is not None and touch is not None and self._reopen(s, enrollment):
            self._retry(s, spec, enrollment, touch, name, now)

    def _conclude(
        self,
        s: Session,
        enrollment: Enrollment,
        name: str,
        target: str | None,
        now: datetime,
        effects: Effects,
    ) -> None:
        """End the enrollment for outcome `name` and start `target`; a completed one keeps its end."""
        if enrollment.status == EnrollmentStatus.active:
            self.leave(s, enrollment, f"outcome: {name}", target, now, effects, outcome=name)
            return
        enrollment.end_outcome = name
        if target is not None and target in self._rules():
            contact = s.get_one(Contact, enrollment.contact_id)
            deal = s.get(Deal, enrollment.deal_id) if enrollment.deal_id else None
            moved = self.enroll(s, target, contact, deal, now, origin=f"then from {enrollment.cadence_name}")
            if moved is not None:
                effects.enrolled.append(moved.id or 0)

    def _reopen(self, s: Session, enrollment: Enrollment) -> bool:
        """Make a completed enrollment active again for a retry; False if another took its place."""
        if enrollment.status == EnrollmentStatus.active:
            return True
        try:
            with s.begin_nested():
                enrollment.status = EnrollmentStatus.active
                enrollment.ended_at = enrollment.end_reason = None
                s.flush()
        except sa.exc.IntegrityError:
            s.refresh(enrollment)
            return False
        return True

    def record_outcome(
        self,
        s: Session,
        name: str,
        now: datetime,
        *,
        touch_id: int | None = None,
        enrollment_id: int | None = None,
        note: str | None = None,
        source: str = "api",
    ) -> tuple[Outcome, Effects]:
        """Store what came of a touch or an enrollment and act on it: exit, or a won/lost transition."""
        touch = None
        if touch_id is not None:
            touch = s.get(Touch, touch_id)
            if touch is None:
                raise EngineError(f"no touch {touch_id}", field="touch_id", not_found=True)
            if enrollment_id is not None and enrollment_id != touch.enrollment_id:
                raise EngineError(
                    f"touch {touch_id} belongs to enrollment {touch.enrollment_id}", field="enrollment_id"
                )
            enrollment_id = touch.enrollment_id
        if enrollment_id is None:
            raise EngineError("give `touch_id` or `enrollment_id`", field="touch_id")
        enrollment = s.get(Enrollment, enrollment_id)
        if enrollment is None:
            raise EngineError(f"no enrollment {enrollment_id}", field="enrollment_id", not_found=True)
        outcome = Outcome(
            name=name,
            enrollment_id=enrollment.id,
            touch_id=touch.id if touch else None,
            contact_id=enrollment.contact_id,
            deal_id=enrollment.deal_id,
            note=note,
            source=source,
            occurred_at=now,
        )
        s.add(outcome)
        s.flush()
        if self.activity:
            outbound.outcome_recorded(s, outcome, now)
        self._block(s, outcome, now)
        if touch is not None:
            task = s.exec(select(CallTask).where(CallTask.touch_id == touch.id)).first()
            if task is not None:
                task.status = "done"
                task.outcome = name
        effects = Effects()
        contact = s.get_one(Contact, enrollment.contact_id)
        self._follow(s, enrollment, touch, name, now, effects)
        if name in ("won", "lost") and enrollment.deal_id is not None:
            deal = s.get_one(Deal, enrollment.deal_id)
            deal.status = name
            deal.updated_at = now
        s.flush()
        self.review(s, contact, now, effects)
        return outcome, effects

    # --- by hand --------------------------------------------------------------------------------------------

    def pause(self, s: Session, enrollment: Enrollment, now: datetime) -> None:
        """Keep an active enrollment's touches from going out: those planned or queued are held (the
        scheduler claims only planned ones, and a worker sends only what it claimed from queued)."""
        if enrollment.status != EnrollmentStatus.active:
            raise EngineError(f"enrollment {enrollment.id} is {enrollment.status}; only an active one pauses")
        enrollment.status = EnrollmentStatus.paused
        for touch in self._touches_in(s, enrollment, TouchStatus.planned, TouchStatus.queued):
            touch.status = TouchStatus.held
            touch.status_reason = f"enrollment paused at {now.isoformat()}"
        s.flush()

    def resume(self, s: Session, enrollment: Enrollment, now: datetime) -> None:
        """Make a paused enrollment active again. A held touch still ahead keeps its time; one whose time
        passed while paused is planned again from now, keeping its spacing from the step before it."""
        if enrollment.status != EnrollmentStatus.paused:
            raise EngineError(f"enrollment {enrollment.id} is {enrollment.status}; only a paused one resumes")
        try:
            with s.begin_nested():
                enrollment.status = EnrollmentStatus.active
                s.flush()
        except sa.exc.IntegrityError:
            s.refresh(enrollment)
            raise EngineError(
                f"{enrollment.subject} is already active in {enrollment.cadence_name} again; stop that first"
            ) from None
        spec = self.spec_of(s, enrollment)
        contact = s.get_one(Contact, enrollment.contact_id)
        for touch in self._touches_in(s, enrollment, TouchStatus.held):
            touch.status = TouchStatus.planned
            touch.status_reason = f"resumed at {now.isoformat()}"
            point = spec.touchpoint(touch.step_index)
            if touch.due_at >= now or point is None:
                continue
            if touch.iteration == 0:
                touch.due_at = max(
                    now, self.due(spec, contact, enrollment, touch.step_index, touch.channel, now)
                )
            else:
                zone, calendar = self.placement(spec, point, touch.channel, contact.timezone, contact.country)
                touch.due_at = timing.due_at(now, 0, calendar, zone, point.at)
        s.flush()

    def stop(self, s: Session, enrollment: Enrollment, reason: str, now: datetime) -> None:
        """End an active or paused enrollment by hand: what it has not sent is cancelled; no `then`."""
        if enrollment.status not in (EnrollmentStatus.active, EnrollmentStatus.paused):
            raise EngineError(f"enrollment {enrollment.id} has already ended ({enrollment.status})")
        self.end(s, enrollment, EnrollmentStatus.exited, reason, now)

    @staticmethod
    def _touches_in(s: Session, enrollment: Enrollment, *statuses: str) -> list[Touch]:
        return list(
            s.exec(
                select(Touch).where(Touch.enrollment_id == enrollment.id, col(Touch.status).in_(statuses))
            ).all()
        )

    def forget(self, s: Session, contact_id: int) -> dict[str, int]:
        """Erase a contact and everything about them: their deals, enrollments, touches, outcomes, call
        tasks, blocks, the activity kept to post about them, and the stored webhook bodies that name them
        (by their external id from the same source, their email or their phone). Returns rows erased."""
        contact = s.get(Contact, contact_id)
        if contact is None:
            raise EngineError(f"no contact {contact_id}", field="id", not_found=True)
        deals = list(s.exec(select(Deal.id).where(Deal.contact_id == contact_id)).all())
        enrollments = list(
            s.exec(
                select(Enrollment.id).where(
                    (col(Enrollment.contact_id) == contact_id) | col(Enrollment.deal_id).in_(deals)
                )
            ).all()
        )
        touches = list(s.exec(select(Touch.id).where(col(Touch.enrollment_id).in_(enrollments))).all())
        outcomes = list(
            s.exec(
                select(Outcome.id).where(
                    (col(Outcome.contact_id) == contact_id)
                    | col(Outcome.deal_id).in_(deals)
                    | col(Outcome.enrollment_id).in_(enrollments)
                    | col(Outcome.touch_id).in_(touches)
                )
            ).all()
        )
        erased: dict[str, int] = {}

        def erase(name: str, model: type[SQLModel], where: Any) -> None:
            erased[name] = s.exec(sa.delete(model).where(where)).rowcount

        erase("activity", Activity, col(Activity.id).in_(self._activity_about(s, contact_id, enrollments)))
        erase("inbound_events", InboundEvent, col(InboundEvent.id).in_(self._bodies_naming(s, contact)))
        erase("blocks", Block, (col(Block.contact_id) == contact_id) | col(Block.outcome_id).in_(outcomes))
        erase(
            "call_tasks",
            CallTask,
            (col(CallTask.contact_id) == contact_id)
            | col(CallTask.touch_id).in_(touches)
            | col(CallTask.deal_id).in_(deals),
        )
        erase("outcomes", Outcome, col(Outcome.id).in_(outcomes))
        erase("touches", Touch, col(Touch.id).in_(touches))
        erase("enrollments", Enrollment, col(Enrollment.id).in_(enrollments))
        erase("deals", Deal, col(Deal.id).in_(deals))
        erase("contacts", Contact, col(Contact.id) == contact_id)
        s.expunge_all()
        return erased

    @staticmethod
    def _activity_about(s: Session, contact_id: int, enrollments: list[int | None]) -> list[int]:
        found = []
        for row in s.exec(select(Activity)).all():
            refs = row.payload
            contact = refs.get("contact") or {}
            enrollment = refs.get("enrollment") or {}
            if contact.get("id") == contact_id or enrollment.get("id") in enrollments:
                found.append(row.id or 0)
        return found

    @staticmethod
    def _bodies_naming(s: Session, contact: Contact) -> list[int]:
        """Stored deliveries naming the contact: a JSON body with one of its values as a whole string (or
        number), any other body containing one."""
        own = {contact.external_id}
        anywhere = {v for v in (contact.email, contact.phone) if v}
        found = []
        candidates = s.exec(
            select(InboundEvent).where(
                sa.or_(
                    (col(InboundEvent.source) == contact.source)
                    & col(InboundEvent.body).contains(contact.external_id),
                    *(col(InboundEvent.body).contains(v) for v in anywhere),
                )
            )
        ).all()
        for row in candidates:
            names = own | anywhere if row.source == contact.source else anywhere
            try:
                leaves = set(_leaves(json.loads(row.body)))
            except ValueError:
                found.append(row.id or 0)
                continue
            if leaves & names:
                found.append(row.id or 0)
        return found


def _leaves(value: Any) -> Iterator[str]:
    """Every string and number in a JSON value, as text."""
    if isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item)
    elif isinstance(value, list):
        for item in value:
            yield from _leaves(item)
    elif isinstance(value, str | int | float) and not isinstance(value, bool):
        yield str(value)
