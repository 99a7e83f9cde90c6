"""The cadence language: the YAML a marketer writes, validated into frozen models; errors carry line:col."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import time
from functools import cached_property
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import holidays
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from cadence import sandbox, yamlpos
from cadence.errors import Problem, RulesError
from cadence.validation import validate

EventType = Literal[
    "contact.created",
    "contact.updated",
    "deal.created",
    "deal.updated",
    "deal.stage_changed",
    "deal.won",
    "deal.lost",
]
OutcomeName = Literal[
    "replied",
    "meeting_booked",
    "no_answer",
    "left_voicemail",
    "not_interested",
    "unsubscribed",
    "bounced",
    "do_not_contact",
    "won",
    "lost",
]
ChannelName = Literal["email", "sms", "call", "letter"]

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_TEMPLATE = re.compile(r"^(email|sms|call|letter)(/[A-Za-z0-9_][A-Za-z0-9_.-]*)+$")
_WINDOW = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


def _expression(source: str) -> str:
    try:
        sandbox.compile_expression(source)
    except sandbox.ExpressionError as exc:
        raise ValueError(f"invalid expression: {exc}") from exc
    return source


def _cadence_name(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError("a cadence name is lowercase letters, digits and dashes, e.g. open-deal")
    return value


def _template(value: str) -> str:
    if not _TEMPLATE.match(value) or any(part.startswith(".") for part in value.split("/")):
        raise ValueError(
            f"template {value!r} is not <channel>/<name>: a folder under templates/, no '..' or leading '.'"
        )
    return value


def _reason(value: str) -> str:
    if not value.strip():
        raise ValueError("every touch needs a reason: say what is new for the contact in this touch")
    return value.strip()


def _timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown IANA time zone {value!r} (e.g. Europe/Moscow, America/New_York)") from exc
    return value


def _country(value: str) -> str:
    code = value.upper()
    if code not in holidays.list_supported_countries():
        raise ValueError(
            f"no public-holiday calendar for country {value!r}; use an ISO code such as RU, US, DE"
        )
    return code


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _parse_window(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    match = _WINDOW.match(value)
    if not match:
        raise ValueError('a window is "HH:MM-HH:MM", e.g. "09:00-18:00"')
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    if h1 > 23 or h2 > 24 or m1 > 59 or m2 > 59 or (h2 == 24 and m2):
        raise ValueError(f"window {value!r} has an impossible time")
    start, end = time(h1, m1), (time(23, 59, 59, 999999) if h2 == 24 else time(h2, m2))
    if start >= end:
        raise ValueError(f"window {value!r} ends before it starts")
    return (start, end)


Expression = Annotated[str, AfterValidator(_expression)]
CadenceName = Annotated[str, AfterValidator(_cadence_name)]
Reason = Annotated[str, AfterValidator(_reason)]
TimeZone = Annotated[str, AfterValidator(_timezone)]
Country = Annotated[str, AfterValidator(_country)]
Window = Annotated[tuple[time, time], BeforeValidator(_parse_window)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Enroll(_Model):
    on: Annotated[tuple[EventType, ...], BeforeValidator(_one_or_many), Field(min_length=1)]
    when: Expression | None = None


class Exit(_Model):
    on_outcome: Annotated[tuple[OutcomeName, ...], BeforeValidator(_one_or_many)] = ()
    when: Expression | None = None


class Then(_Model):
    won: CadenceName | None = None
    lost: CadenceName | None = None

    def targets(self) -> dict[str, str]:
        return {k: v for k, v in (("won", self.won), ("lost", self.lost)) if v}


class Calendar(_Model):
    business_days: bool = False
    window: Window | None = None
    timezone: TimeZone | None = None
    country: Country | None = None


class Step(_Model):
    day: Annotated[int, Field(ge=0, le=3650)]
    channel: ChannelName
    template: Annotated[str, AfterValidator(_template)]
    reason: Reason
    when: Expression | None = None


class CadenceSpec(_Model):
    cadence: CadenceName
    description: str = ""
    enroll: Enroll | None = None
    exit: Exit = Exit()
    then: Then = Then()
    calendar: Calendar = Calendar()
    steps: Annotated[tuple[Step, ...], Field(min_length=1)]


@dataclass(frozen=True)
class Parsed:
    """A valid cadence with its source, so later checks can point into the file."""

    spec: CadenceSpec
    file: str
    text: str
    located: yamlpos.Located

    def where(self, path: tuple[str | int, ...]) -> tuple[int, int]:
        return self.located.where(path)

    @cached_property
    def content_hash(self) -> str:
        """The version's identity: the same text is the same version."""
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def parse(text: str, file: str) -> Parsed:
    """Validate one cadence file; raises RulesError carrying every problem with its position."""
    spec, located = validate(text, file, CadenceSpec, "a mapping with `cadence:` and `steps:`")
    problems = []
    previous_day = 0
    for i, step in enumerate(spec.steps):
        if step.day < previous_day:
            line, column = located.where(("steps", i, "day"))
            problems.append(
                Problem(file, line, column, f"steps.{i}.day goes back in time", "steps run in order of `day`")
            )
        previous_day = step.day
        if not step.template.startswith(f"{step.channel}/"):
            line, column = located.where(("steps", i, "template"))
            problems.append(
                Problem(
                    file,
                    line,
                    column,
                    f"steps.{i}.template is outside its channel's folder",
                    f"write {step.channel}/<name>",
                )
            )
    if problems:
        raise RulesError(problems)
    return Parsed(spec, file, text, located)
