"""The cadence language: the YAML a marketer writes, validated into frozen models; errors carry line:col."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import date, time, timedelta
from functools import cached_property, lru_cache
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import holidays
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    model_validator,
)

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
#: What may start an enrollment: a CRM event, or the end of a block (a contact left alone may be written to
#: again, e.g. warm letters a year after "not interested").
Trigger = Literal[
    "contact.created",
    "contact.updated",
    "deal.created",
    "deal.updated",
    "deal.stage_changed",
    "deal.won",
    "deal.lost",
    "block.ended",
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
        tuple[Trigger, ...],
        BeforeValidator(_one_or_many),
        Field(
            min_length=1,
            description="The CRM event that enrolls a contact, or a list of them, e.g. deal.stage_changed; "
            "or block.ended, when a block on the contact ends (`block.reason`, `block.channel` say which).",
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


_SPREAD = re.compile(r"^\s*(\d+)\s*(minute|minutes|hour|hours)\s*$")


def parse_spread(text: str) -> int:
    """`45 minutes`, `2 hours` -> seconds (at most 12 hours)."""
    match = _SPREAD.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a spread such as '45 minutes' or '2 hours'")
    seconds = int(match.group(1)) * (3600 if match.group(2).startswith("hour") else 60)
    if seconds > 12 * 3600:
        raise ValueError(f"spread {text!r} is over 12 hours: touches would slip into other days")
    return seconds


def _spread(text: str) -> str:
    parse_spread(text)
    return text


Spread = Annotated[str, AfterValidator(_spread)]


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
    spread: Spread | None = Field(
        default=None,
        description="Spread touches due at the same moment (a thousand contacts imported at once) over this "
        "much time, inside the window, e.g. '2 hours', '45 minutes'.",
    )

    @property
    def spread_seconds(self) -> int:
        return parse_spread(self.spread) if self.spread else 0


class OnOutcome(_Model):
    retry_after: Gap | None = Field(
        default=None, description="Try the step again after this gap: e.g. '1 business day', '2 days'."
    )
    max: int | None = Field(default=None, ge=1, le=10, description="Tries after the first, at most.")
    exit: bool = Field(
        default=False, strict=True, description="true: this outcome of this touch ends the cadence."
    )
    then: CadenceName | None = Field(
        default=None,
        description="End the cadence and start this one, e.g. meeting_booked: {then: post-meeting}.",
    )

    @model_validator(mode="after")
    def _one_action(self) -> OnOutcome:
        retrying = self.retry_after is not None or self.max is not None
        if retrying and (self.retry_after is None or self.max is None):
            raise ValueError(
                "a retry needs both `retry_after` and `max`, e.g. {retry_after: 1 business day, max: 2}"
            )
        if retrying and (self.exit or self.then):
            raise ValueError("an outcome either retries the step or ends the cadence, not both")
        if not retrying and not self.exit and not self.then:
            raise ValueError(
                "say what the outcome does: `retry_after` and `max`, `exit: true`, or `then: <cadence>`"
            )
        return self

    @property
    def gap(self) -> tuple[int, bool]:
        """(days, whether they are business days) before the next try."""
        return parse_gap(self.retry_after or "0 days")

    @property
    def ends(self) -> bool:
        return self.exit or self.then is not None


class Option(_Model):
    channel: ChannelName = Field(description="The channel of this choice.")
    template: Annotated[str, AfterValidator(_template)] = Field(
        description="The template of this choice: <channel>/<name>."
    )
    when: Expression | None = Field(
        default=None,
        description="Take this choice when this holds (and the contact can be reached on its channel), e.g. "
        'contact.seniority == "executive"; the last choice may leave it out: it is the fallback.',
    )


@lru_cache(maxsize=1024)
def _plain_option(channel: ChannelName, template: str) -> tuple[Option, ...]:
    """A plain touch's one choice, made once for each channel and template (an option never changes):
    planning each touch asks for it."""
    return (Option(channel=channel, template=template),)


class Variant(_Model):
    name: Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_-]+$")] = Field(
        description="The variant's name, as reports count it, e.g. a or short-subject."
    )
    weight: int = Field(
        default=1, ge=0, le=1000, description="Its share of contacts, relative to the others."
    )
    template: Annotated[str, AfterValidator(_template)] | None = Field(
        default=None, description="The variant's template; without it, the step's."
    )
    channel: ChannelName | None = Field(
        default=None,
        description="The variant's channel (then give its template too); without it, the step's.",
    )


class Touchpoint(_Model):
    """What one touch is: how it reaches the contact, what is sent, and why."""

    channel: ChannelName | None = Field(
        default=None,
        description="How the touch reaches the contact: email, sms, call (a task for a person) or letter.",
    )
    template: Annotated[str, AfterValidator(_template)] | None = Field(
        default=None,
        description="What is sent: <channel>/<name>, from templates/, e.g. email/deal-01-proposal-recap.",
    )
    choose: tuple[Option, ...] = Field(
        default=(),
        description="Instead of one channel: choices tried in order, the first whose `when` holds and whose "
        "channel reaches the contact wins (paper for senior contacts, else email).",
    )
    variants: tuple[Variant, ...] = Field(
        default=(),
        description="Weighted A/B variants of the template and/or channel; each contact gets one, kept on "
        "the touch for reports.",
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
    on_outcome: dict[OutcomeName, OnOutcome] = Field(
        default_factory=dict,
        description="What an outcome of this touch does: no_answer: {retry_after: 1 business day, max: 2}; "
        "meeting_booked: {then: post-meeting}; replied: {exit: true}.",
    )

    @model_validator(mode="after")
    def _one_way(self) -> Touchpoint:
        if self.choose and (self.channel or self.template):
            raise ValueError("give `channel` and `template`, or `choose`, not both")
        if not self.choose and (self.channel is None or self.template is None):
            raise ValueError("a touch needs `channel` and `template` (or `choose`: a list of them)")
        if self.choose and self.variants:
            raise ValueError("`variants` and `choose` do not mix: vary the template of one channel")
        if self.variants and not any(v.weight for v in self.variants):
            raise ValueError("every variant has weight 0: give at least one a weight")
        if len({v.name for v in self.variants}) < len(self.variants):
            raise ValueError("two variants share a name")
        return self

    def options(self) -> tuple[Option, ...]:
        """The (channel, template) choices, in order; a plain touch has one."""
        if self.choose:
            return self.choose
        return _plain_option(self.channel or "email", self.template or "email/x")

    def channels(self) -> set[str]:
        """Every channel this touch may go out on."""
        found = {o.channel for o in self.options()}
        return found | {v.channel for v in self.variants if v.channel}

    def uses(self, path: tuple[str | int, ...]) -> list[tuple[tuple[str | int, ...], str, str]]:
        """Every (where in the file, channel, template) this touch may send, for checks."""
        if self.choose:
            return [
                ((*path, "choose", j, "template"), o.channel, o.template) for j, o in enumerate(self.choose)
            ]
        found: list[tuple[tuple[str | int, ...], str, str]] = [
            ((*path, "template"), self.channel or "email", self.template or "")
        ]
        for j, v in enumerate(self.variants):
            if v.template:
                found.append(
                    ((*path, "variants", j, "template"), v.channel or self.channel or "email", v.template)
                )
        return found


class Step(Touchpoint):
    day: Annotated[
        int | None,
        Field(
            default=None,
            strict=True,
            ge=0,
            le=3650,
            description="Days after enrollment the touch is due, 0 for the first; steps go in order of day.",
        ),
    ]
    after: Gap | None = Field(
        default=None,
        description="Instead of `day`: the gap after the previous touch went out, e.g. '3 days', "
        "'2 business days', '1 week'.",
    )

    @model_validator(mode="after")
    def _one_timing(self) -> Step:
        if (self.day is None) == (self.after is None):
            raise ValueError("a step is due either on a `day` after enrollment or `after` the previous touch")
        return self

    @property
    def gap(self) -> tuple[int, bool]:
        """For an `after` step: (days, whether they are business days) after the previous touch."""
        return parse_gap(self.after or "0 days")


_EVERY = re.compile(r"^\s*(\d+)\s*(business\s+)?(day|days|week|weeks|month|months)\s*$")


def parse_every(text: str) -> tuple[int, bool]:
    """`1 week`, `2 weeks`, `10 days`, `1 month` (30 days), `5 business days` -> (days, business or not)."""
    match = _EVERY.match(text)
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"{text!r} is not a period such as '1 week', '10 days' or '1 month'")
    unit = match.group(3).rstrip("s")
    return int(match.group(1)) * {"day": 1, "week": 7, "month": 30}[unit], bool(match.group(2))


def _every(text: str) -> str:
    parse_every(text)
    return text


class Repeat(_Model):
    every: Annotated[str, AfterValidator(_every)] = Field(
        description="The gap between repeated touches, after the last step: '1 week', '10 days', '1 month'."
    )
    until: Expression | None = Field(
        default=None,
        description='Stop repeating when this holds, e.g. deal.status == "won" ("until they buy").',
    )
    times: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        description="Repeat at most this many touches; without it, until `until`.",
    )
    content: Annotated[
        tuple[Touchpoint, ...],
        Field(min_length=1, description="The touches repeated in turn, each with its own reason."),
    ]

    @property
    def gap(self) -> tuple[int, bool]:
        return parse_every(self.every)


class Budget(_Model):
    per_month: int = Field(
        ge=1, le=100, description="Touches of this cadence per contact per calendar month, at most."
    )


class CadenceSpec(_Model):
    # Editors learn the rule the validator below enforces: steps, a repeat, or both.
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        json_schema_extra={"anyOf": [{"required": ["steps"]}, {"required": ["repeat"]}]},
    )

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
    steps: tuple[Step, ...] = Field(default=(), min_length=1, description="The touches, in order.")
    repeat: Repeat | None = Field(
        default=None,
        description="After the steps, touches repeated every so often, rotating through content, until a "
        "goal holds: the nurture of the second touch system.",
    )
    budget: Budget | None = Field(
        default=None,
        description="How many of this cadence's touches one contact gets in a month, at most; a touch over "
        "budget waits for the next month.",
    )

    @model_validator(mode="after")
    def _has_touches(self) -> CadenceSpec:
        if not self.steps and self.repeat is None:
            raise ValueError("a cadence needs `steps`, a `repeat`, or both")
        return self

    def touchpoint(self, index: int) -> Touchpoint | None:
        """Touch number `index`: a step, then the repeat's content in turn; None past the end."""
        if index < len(self.steps):
            return self.steps[index]
        if self.repeat is None:
            return None
        turn = index - len(self.steps)
        if self.repeat.times is not None and turn >= self.repeat.times:
            return None
        return self.repeat.content[turn % len(self.repeat.content)]

    def transitions(self) -> list[tuple[tuple[str | int, ...], str, str]]:
        """Every (where in the file, outcome, cadence it moves the contact into): `then`, and steps' own."""
        found: list[tuple[tuple[str | int, ...], str, str]] = [
            (("then", outcome), outcome, target) for outcome, target in self.then.targets().items()
        ]
        for path, point in self.touchpoints():
            for outcome, rule in point.on_outcome.items():
                if rule.then:
                    found.append(((*path, "on_outcome", outcome, "then"), outcome, rule.then))
        return found

    def touchpoints(self) -> list[tuple[tuple[str | int, ...], Touchpoint]]:
        """Every touch written in the file with its path there, for checks."""
        found: list[tuple[tuple[str | int, ...], Touchpoint]] = [
            (("steps", i), s) for i, s in enumerate(self.steps)
        ]
        if self.repeat is not None:
            found += [(("repeat", "content", i), c) for i, c in enumerate(self.repeat.content)]
        return found


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


def _step_problems(spec: CadenceSpec) -> list[tuple[tuple[str | int, ...], str, str | None]]:
    """What is wrong across steps: (path, message, hint)."""
    found: list[tuple[tuple[str | int, ...], str, str | None]] = []
    previous_day, relative = 0, False
    for i, step in enumerate(spec.steps):
        if step.day is not None:
            if relative:
                found.append(
                    (
                        ("steps", i, "day"),
                        f"steps.{i} counts `day` from enrollment after a step placed `after` "
                        "the one before it",
                        "use `after` for this step too",
                    )
                )
            elif step.day < previous_day:
                found.append(
                    (("steps", i, "day"), f"steps.{i}.day goes back in time", "steps run in order of `day`")
                )
            previous_day = max(previous_day, step.day)
        else:
            relative = True
    for path, point in spec.touchpoints():
        name = ".".join(str(p) for p in path)
        opens, closes = point.window or spec.calendar.window or (time.min, time.max)
        if point.at is not None and not opens <= point.at <= closes:
            found.append(
                (
                    (*path, "at"),
                    f"{name}.at {point.at:%H:%M} is outside its window {opens:%H:%M}-{closes:%H:%M}",
                    "move `at` inside the window, or widen the window",
                )
            )
        if (
            point.template is not None
            and point.channel
            and not point.template.startswith(f"{point.channel}/")
        ):
            found.append(
                (
                    (*path, "template"),
                    f"{name}.template is outside its channel's folder",
                    f"write {point.channel}/<name>",
                )
            )
        for j, option in enumerate(point.choose):
            if not option.template.startswith(f"{option.channel}/"):
                found.append(
                    (
                        (*path, "choose", j, "template"),
                        f"{name}.choose.{j}.template is outside its channel's folder",
                        f"write {option.channel}/<name>",
                    )
                )
            if option.when is None and j < len(point.choose) - 1:
                found.append(
                    (
                        (*path, "choose", j),
                        f"{name}.choose.{j} has no `when`, so the choices after it are never taken",
                        "give it a `when`, or move it last",
                    )
                )
        for j, variant in enumerate(point.variants):
            if variant.channel and not variant.template:
                found.append(
                    (
                        (*path, "variants", j),
                        f"{name}.variants.{j} changes the channel but not the template",
                        f"give it a {variant.channel}/<name> template",
                    )
                )
            channel = variant.channel or point.channel
            if variant.template and channel and not variant.template.startswith(f"{channel}/"):
                found.append(
                    (
                        (*path, "variants", j, "template"),
                        f"{name}.variants.{j}.template is outside its channel's folder",
                        f"write {channel}/<name>",
                    )
                )
    return found


def parse(text: str, file: str) -> Parsed:
    """Validate one cadence file; raises RulesError carrying every problem with its position."""
    spec, located = validate(text, file, CadenceSpec, "a mapping with `cadence:` and `steps:`")
    problems = [
        Problem(file, *located.where(path), message, hint) for path, message, hint in _step_problems(spec)
    ]
    if problems:
        raise RulesError(problems)
    return Parsed(spec, file, text, located)
