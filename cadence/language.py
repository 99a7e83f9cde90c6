"""The cadence language: the YAML a marketer writes, validated into frozen models; errors carry line:col."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import date, time, timedelta
from functools import cached_property
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import holidays
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

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
Kind = Literal["decision", "nurture", "onboarding", "follow-up", "growth", "letters"]
ChannelName = Literal["email", "sms", "call", "letter"]

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_TEMPLATE = re.compile(r"^(email|sms|call|letter)(/[A-Za-z0-9_][A-Za-z0-9_.-]*)+$")
_CLOCK = re.compile(r"^\d{1,2}:\d{2}$")
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


_DURATION = re.compile(r"^\s*(\d+)\s*(day|days|week|weeks|month|months|year|years)\s*$")
_UNIT_DAYS = {"day": 1, "week": 7, "month": 30, "year": 365}


def parse_duration(text: str) -> timedelta:
    """`365 days`, `2 weeks`, `6 months` (30 days each), `1 year` (365 days)."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration such as '365 days', '2 weeks', '6 months'")
    count, unit = int(match.group(1)), match.group(2).rstrip("s")
    return timedelta(days=count * _UNIT_DAYS[unit])


def _duration(text: str) -> str:
    parse_duration(text)
    return text


Duration = Annotated[str, AfterValidator(_duration)]


_GAP = re.compile(r"^\s*(\d+)\s*(business\s+)?(day|days|week|weeks)\s*$")


def parse_gap(text: str) -> tuple[int, bool]:
    """`1 business day`, `2 days`, `1 week` -> (days, business days or not)."""
    match = _GAP.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a gap such as '1 business day', '2 days' or '1 week'")
    count = int(match.group(1)) * (7 if match.group(3).startswith("week") else 1)
    return count, bool(match.group(2))


def _gap(text: str) -> str:
    parse_gap(text)
    return text


def _reenroll(value: str) -> str:
    if value != "never" and not (value.startswith("after ") and parse_duration(value[6:])):
        raise ValueError(f"{value!r}: write `never`, or `after` and a duration such as 'after 90 days'")
    return value


def _parse_window(value: Any) -> Any:
    if isinstance(value, tuple):  # already parsed: a model built in code, or a copy of one
        return value
    if not isinstance(value, str):
        raise ValueError('a window is written "HH:MM-HH:MM", e.g. "09:00-18:00"')
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


def _parse_clock(value: Any) -> Any:
    if isinstance(value, time):
        return value
    if not isinstance(value, str) or not _CLOCK.match(value):
        raise ValueError('a time is written "HH:MM", e.g. "10:30"')
    hours, minutes = (int(part) for part in value.split(":"))
    if hours > 23 or minutes > 59:
        raise ValueError(f"{value!r} is not a time of day")
    return time(hours, minutes)


ClockTime = Annotated[
    time,
    BeforeValidator(_parse_clock),
    WithJsonSchema({"type": "string", "pattern": r"^\d{1,2}:\d{2}$"}),
]
Reenroll = Annotated[str, AfterValidator(_reenroll)]
Gap = Annotated[str, AfterValidator(_gap)]
Window = Annotated[
    tuple[time, time],
    BeforeValidator(_parse_window),
    # Editors check what is written, "09:00-18:00", not the pair of times it becomes.
    WithJsonSchema({"type": "string", "pattern": _WINDOW.pattern}, mode="validation"),
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Enroll(_Model):
    on: Annotated[
        tuple[EventType, ...],
        BeforeValidator(_one_or_many),
        Field(
            min_length=1,
            description="The CRM event that enrolls a contact, or a list of them, e.g. deal.stage_changed.",
        ),
    ]
    when: Expression | None = Field(
        default=None,
        description='Enroll only when this holds for contact and deal, e.g. deal.stage == "proposal_sent".',
    )
    reenroll: Reenroll | None = Field(
        default=None,
        description="Whether a deal (or contact) may go through this cadence again: `never`, or `after 90 "
        "days` (counted from when the last time ended); without it, again whenever triggered, unless the "
        "last time ended with an outcome such as a reply.",
    )

    @property
    def cool_off(self) -> timedelta | None:
        """How long after the last enrollment ended a new one may start; None for `never` or unset."""
        if self.reenroll is None or self.reenroll == "never":
            return None
        return parse_duration(self.reenroll.removeprefix("after").strip())


class Exit(_Model):
    on_outcome: Annotated[tuple[OutcomeName, ...], BeforeValidator(_one_or_many)] = Field(
        default=(),
        description="The outcome that ends the cadence, or a list of them, e.g. [replied, meeting_booked].",
    )
    when: Expression | None = Field(
        default=None,
        description='End the cadence when this holds, checked before each touch, e.g. deal.status != "open".',
    )


class Then(_Model):
    won: CadenceName | None = Field(
        default=None, description="The cadence a contact moves into when the deal is won, e.g. onboarding."
    )
    lost: CadenceName | None = Field(
        default=None, description="The cadence a contact moves into when the deal is lost, e.g. a nurture."
    )
    meeting_booked: CadenceName | None = Field(
        default=None, description="The cadence after a meeting is booked, e.g. the post-meeting follow-up."
    )
    replied: CadenceName | None = Field(default=None, description="The cadence after a reply.")
    not_interested: CadenceName | None = Field(
        default=None,
        description="The cadence after `not_interested`, e.g. warm letters, if the policy allows.",
    )

    def targets(self) -> dict[str, str]:
        """Outcome -> the cadence it moves the contact into."""
        return {name: target for name in type(self).model_fields if (target := getattr(self, name))}


class Calendar(_Model):
    business_days: bool = Field(
        default=False,
        strict=True,
        description="true: `day` counts working days, skipping weekends and public holidays.",
    )
    window: Window | None = Field(
        default=None,
        description='Hours touches go out, in the contact\'s own time zone, e.g. "09:00-18:00"; '
        "without it, any hour.",
    )
    timezone: TimeZone | None = Field(
        default=None, description="IANA time zone for contacts without one, e.g. Europe/Moscow."
    )
    country: Country | None = Field(
        default=None,
        description="Country code for public holidays, e.g. RU, US, DE; a contact's own country comes first.",
    )
    closed: tuple[date, ...] = Field(
        default=(),
        description="The cadence's own closed dates (YYYY-MM-DD): no touch goes out on them.",
    )


class Retry(_Model):
    retry_after: Gap = Field(description="When to try again: e.g. '1 business day', '2 days', '1 week'.")
    max: int = Field(ge=1, le=10, description="Tries after the first, at most.")

    @property
    def gap(self) -> tuple[int, bool]:
        """(days, whether they are business days)."""
        return parse_gap(self.retry_after)


class Step(_Model):
    day: Annotated[
        int,
        Field(
            strict=True,
            ge=0,
            le=3650,
            description="Days after enrollment the touch is due, 0 for the first; steps go in order of day.",
        ),
    ]
    channel: ChannelName = Field(
        description="How the touch reaches the contact: email, sms, call (a task for a person) or letter."
    )
    template: Annotated[str, AfterValidator(_template)] = Field(
        description="What is sent: <channel>/<name>, from templates/, e.g. email/deal-01-proposal-recap."
    )
    reason: Reason = Field(description="What is new for the contact in this touch: every touch needs one.")
    when: Expression | None = Field(
        default=None,
        description='Send only when this holds, else skip the touch, e.g. contact.seniority == "executive".',
    )
    skip_when: Expression | None = Field(
        default=None,
        description='Skip the touch when this holds, e.g. deal.stage == "negotiation"; the skip is recorded.',
    )
    at: ClockTime | None = Field(
        default=None,
        description='A fixed local time for this touch, "HH:MM", inside its window; without it, the time of '
        "day the enrollment started.",
    )
    window: Window | None = Field(
        default=None,
        description='Hours for this step alone, e.g. "10:00-12:00"; without it, the calendar\'s.',
    )
    on_outcome: dict[OutcomeName, Retry] = Field(
        default_factory=dict,
        description="What an outcome of this touch does to it, e.g. no_answer: {retry_after: 1 business day, "
        "max: 2}.",
    )


class CadenceSpec(_Model):
    cadence: CadenceName = Field(
        description="The cadence's name: lowercase letters, digits and dashes, e.g. open-deal."
    )
    description: str = Field(default="", description="What the cadence is for, for the people who read it.")
    kind: Kind | None = Field(
        default=None,
        description="What the cadence is for, so lint can hold it to its rule: `decision` (a decision "
        "window: seven touches in 30 days), `nurture` (no gap over a month), `onboarding`, `follow-up`, "
        "`growth`, `letters`.",
    )
    enroll: Enroll | None = Field(
        default=None,
        description="Which CRM events enroll a contact; without it, contacts come from another cadence's "
        "`then`, or by hand.",
    )
    exit: Exit = Field(
        default=Exit(), description="What ends the cadence for a contact before its last step."
    )
    then: Then = Field(
        default=Then(), description="The cadence a contact moves into when the deal is decided."
    )
    calendar: Calendar = Field(
        default=Calendar(), description="When touches may go out: working days, hours, time zone, holidays."
    )
    steps: Annotated[tuple[Step, ...], Field(min_length=1, description="The touches, in order of day.")]


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
        opens, closes = step.window or spec.calendar.window or (time.min, time.max)
        if step.at is not None and not opens <= step.at <= closes:
            line, column = located.where(("steps", i, "at"))
            problems.append(
                Problem(
                    file,
                    line,
                    column,
                    f"steps.{i}.at {step.at:%H:%M} is outside its window {opens:%H:%M}-{closes:%H:%M}",
                    "move `at` inside the window, or widen the window",
                )
            )
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
