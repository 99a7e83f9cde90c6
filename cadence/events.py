"""Cadence's own event shape: what every CRM adapter produces and what `/webhooks/generic` accepts."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cadence.language import EventType


def _text_id(value: Any) -> Any:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class ContactData(BaseModel):
    """A contact as the CRM knows it; fields beyond these are kept and usable in conditions and templates."""

    model_config = ConfigDict(extra="allow")

    id: str = Field(min_length=1, max_length=128, description="the CRM's id for the contact")
    name: str | None = None
    email: str | None = None
    phone: str | None = None
    timezone: str | None = Field(default=None, description="IANA zone, e.g. Europe/Moscow")
    country: str | None = None
    address: str | None = Field(default=None, description="postal address, lines separated by newlines")

    _id = field_validator("id", mode="before")(_text_id)


class DealData(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str = Field(min_length=1, max_length=128, description="the CRM's id for the deal")
    title: str | None = None
    stage: str | None = None
    status: Literal["open", "won", "lost"] | None = None
    amount: float | None = None
    currency: str | None = None
    owner: str | None = Field(
        default=None, description="the manager who owns the deal (call tasks go to them)"
    )
    probability: float | None = Field(default=None, ge=0, le=1)

    _id = field_validator("id", mode="before")(_text_id)


class Event(BaseModel):
    """One thing that happened in the CRM."""

    model_config = ConfigDict(extra="forbid")

    event_id: str | None = Field(
        default=None, max_length=128, description="unique per source; repeats are ignored"
    )
    type: EventType
    occurred_at: datetime | None = None
    contact: ContactData | None = None
    deal: DealData | None = None

    _id = field_validator("event_id", mode="before")(_text_id)

    def missing_subject(self) -> str | None:
        """`contact` or `deal` when the event type needs it and the body lacks it."""
        subject = self.type.partition(".")[0]
        return subject if getattr(self, subject) is None else None
