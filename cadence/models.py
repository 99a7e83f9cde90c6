"""The store's tables: contacts, deals, cadence versions, enrollments, touches, outcomes, call tasks, keys."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.types import TypeDecorator
from sqlmodel import JSON, Column, Field, SQLModel


class UTCDateTime(TypeDecorator[datetime]):
    """Stored as naive UTC on every database, handed back aware."""

    impl = sa.DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; pass an aware one")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


def _when(**kwargs: Any) -> Any:
    return Field(sa_type=UTCDateTime, **kwargs)


def _json() -> Any:
    return Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class TouchStatus:
    planned = "planned"
    queued = "queued"
    sending = "sending"
    sent = "sent"
    failed = "failed"
    skipped = "skipped"
    cancelled = "cancelled"
    #: Kept back while its enrollment is paused: the scheduler claims only planned touches.
    held = "held"


class EnrollmentStatus:
    active = "active"
    completed = "completed"
    exited = "exited"
    #: Stopped for now by hand: its touches are held until it is resumed.
    paused = "paused"


class Contact(SQLModel, table=True):
    __table_args__ = (sa.UniqueConstraint("source", "external_id", name="uq_contact_source_external"),)

    id: int | None = Field(default=None, primary_key=True)
    source: str = Field(max_length=64)
    external_id: str = Field(max_length=128)
    name: str | None = None
    email: str | None = None
    phone: str | None = None
    timezone: str | None = None
    country: str | None = None
    address: str | None = None
    attributes: dict[str, Any] = _json()
    created_at: datetime = _when()
    updated_at: datetime = _when()


class Deal(SQLModel, table=True):
    __table_args__ = (sa.UniqueConstraint("source", "external_id", name="uq_deal_source_external"),)

    id: int | None = Field(default=None, primary_key=True)
    source: str = Field(max_length=64)
    external_id: str = Field(max_length=128)
    contact_id: int | None = Field(default=None, foreign_key="contact.id", index=True)
    title: str | None = None
    stage: str | None = None
    status: str = "open"
    amount: float | None = None
    currency: str | None = None
    owner: str | None = Field(default=None, index=True)
    probability: float | None = None
    attributes: dict[str, Any] = _json()
    created_at: datetime = _when()
    updated_at: datetime = _when()


class CadenceVersion(SQLModel, table=True):
    """A cadence version is its content: the same text is the same version."""

    __tablename__ = "cadence_version"
    __table_args__ = (sa.UniqueConstraint("name", "content_hash", name="uq_cadence_version_content"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=128, index=True)
    content_hash: str = Field(max_length=64)
    yaml_text: str
    file: str
    created_at: datetime = _when()


class Enrollment(SQLModel, table=True):
    __table_args__ = (
        # At most one active enrollment per cadence and subject, enforced by the database itself.
        sa.Index(
            "uq_enrollment_active",
            "cadence_name",
            "subject",
            unique=True,
            sqlite_where=sa.text("status = 'active'"),
            postgresql_where=sa.text("status = 'active'"),
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    cadence_name: str = Field(max_length=128, index=True)
    cadence_version_id: int = Field(foreign_key="cadence_version.id")
    subject: str = Field(max_length=64, description="deal:<id> or contact:<id>")
    contact_id: int = Field(foreign_key="contact.id", index=True)
    deal_id: int | None = Field(default=None, foreign_key="deal.id", index=True)
    status: str = Field(default=EnrollmentStatus.active, max_length=16)
    started_at: datetime = _when()
    ended_at: datetime | None = _when(default=None)
    end_reason: str | None = None
    end_outcome: str | None = Field(default=None, max_length=32, description="the outcome that ended it")
    origin: str | None = Field(default=None, description="event, transition or hand that started it")


#: A touch's key: each is made at most once.
TOUCH_KEY = ("enrollment_id", "step_index", "iteration")


class Touch(SQLModel, table=True):
    __table_args__ = (
        sa.UniqueConstraint(*TOUCH_KEY, name="uq_touch_key"),
        sa.Index("ix_touch_status_due", "status", "due_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    enrollment_id: int = Field(foreign_key="enrollment.id", index=True)
    step_index: int
    iteration: int = 0
    channel: str = Field(max_length=16)
    template: str
    variant: str | None = Field(default=None, max_length=32, description="the A/B variant it was given")
    reason: str
    due_at: datetime = _when()
    status: str = Field(default=TouchStatus.planned, max_length=16)
    status_reason: str | None = None
    queued_at: datetime | None = _when(default=None)
    sending_at: datetime | None = _when(default=None)
    finished_at: datetime | None = _when(default=None)
    attempts: int = 0
    cleared_at: datetime | None = _when(
        default=None, description="when send-time checks let it go: caps count it"
    )
    receipt: dict[str, Any] = _json()

    @property
    def key(self) -> str:
        return f"{self.enrollment_id}-{self.step_index}-{self.iteration}"


class Outcome(SQLModel, table=True):
    __table_args__ = (
        # A call task's history: a contact's latest outcomes.
        sa.Index("ix_outcome_contact_time", "contact_id", "occurred_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=32, index=True)
    enrollment_id: int | None = Field(default=None, foreign_key="enrollment.id", index=True)
    touch_id: int | None = Field(default=None, foreign_key="touch.id", index=True)
    contact_id: int | None = Field(default=None, foreign_key="contact.id")
    deal_id: int | None = Field(default=None, foreign_key="deal.id")
    note: str | None = None
    source: str = Field(default="api", max_length=64)
    occurred_at: datetime = _when()


class CallTask(SQLModel, table=True):
    """A call a person must make: the call channel's delivery."""

    __tablename__ = "call_task"
    __table_args__ = (
        # A manager's day (GET /call-tasks?owner=&date=) and open calls due by a day (the call list page).
        sa.Index("ix_call_task_owner_day", "owner", "due_date"),
        sa.Index("ix_call_task_owner_open", "owner", "status", "due_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    touch_id: int = Field(foreign_key="touch.id", unique=True)
    owner: str | None = Field(default=None, index=True)
    due_date: date = Field(index=True, description="the contact's local date the call is due")
    due_at: datetime = _when()
    contact_id: int = Field(foreign_key="contact.id")
    deal_id: int | None = Field(default=None, foreign_key="deal.id")
    contact_name: str | None = None
    phone: str | None = None
    reason: str
    script: str
    script_html: str | None = Field(
        default=None,
        description="the script as HTML, made with the task (None: made before, shown converted)",
    )
    priority: float = Field(default=0, index=True, description="the policy's call_priority when created")
    status: str = Field(default="open", max_length=16)
    outcome: str | None = None
    created_at: datetime = _when()


class Block(SQLModel, table=True):
    """A contact left alone on a channel (or all of them) until a time, or until lifted."""

    id: int | None = Field(default=None, primary_key=True)
    contact_id: int = Field(foreign_key="contact.id", index=True)
    channel: str | None = Field(default=None, max_length=16, description="None blocks every channel")
    reason: str
    outcome_id: int | None = Field(default=None, foreign_key="outcome.id")
    starts_at: datetime = _when()
    until: datetime | None = _when(default=None)
    lifted_at: datetime | None = _when(default=None)
    ended_seen_at: datetime | None = _when(
        default=None, description="when the scheduler acted on its end (block.ended enrollments)"
    )


class InboundEvent(SQLModel, table=True):
    """Every delivery from a CRM, stored raw: acted on, waiting for a worker (received), or rejected or
    failed with why."""

    __tablename__ = "inbound_event"
    __table_args__ = (sa.UniqueConstraint("source", "event_id", name="uq_inbound_event"),)

    id: int | None = Field(default=None, primary_key=True)
    source: str = Field(max_length=64)
    event_id: str = Field(max_length=128)
    type: str | None = Field(default=None, max_length=64)
    body: str
    status: str = Field(default="received", max_length=16)
    error: str | None = None
    received_at: datetime = _when()
    processed_at: datetime | None = _when(default=None)


class Activity(SQLModel, table=True):
    """A touch sent or an outcome recorded, kept to be posted to OUTBOUND_URL: written in the same
    transaction as what it reports, so a crash cannot lose it; posted until the receiver takes it."""

    __table_args__ = (sa.Index("ix_activity_pending", "posted_at", "next_try_at"),)

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(max_length=32, description="touch.sent or outcome.recorded")
    payload: dict[str, Any] = _json()
    created_at: datetime = _when()
    next_try_at: datetime = _when()
    posted_at: datetime | None = _when(default=None)
    attempts: int = 0
    last_error: str | None = None


class ApiKey(SQLModel, table=True):
    """A caller of the API: a role, for a manager the deal owner it acts as, and only the secret's hash."""

    __tablename__ = "api_key"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=200)
    role: str = Field(max_length=16, description="admin, integration or manager")
    owner: str | None = Field(default=None, max_length=128, description="a manager's name as deals carry it")
    secret_hash: str = Field(max_length=64, unique=True, description="sha256 of the secret, hex")
    created_at: datetime = _when()
    revoked_at: datetime | None = _when(default=None)


class Digest(SQLModel, table=True):
    """A manager's morning digest for one local day: the unique key lets one scheduler send it."""

    __table_args__ = (sa.UniqueConstraint("owner", "local_date", name="uq_digest_owner_day"),)

    id: int | None = Field(default=None, primary_key=True)
    owner: str = Field(max_length=128)
    local_date: date
    created_at: datetime = _when()
    sent_at: datetime | None = _when(default=None)
