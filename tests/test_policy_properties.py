"""Properties of the policy over whole simulated runs: caps, budget, blocks, quiet hours, order, nothing lost.

Each example builds a cadence and a policy in code (random steps, repeats, budgets, caps, quiet hours, block
rules), a contact reachable on every channel in a zone with or without DST, blocks the contact already has and
outcomes recorded along the way, and runs `cadence.simulate.run`: the real engine and dispatcher on a private
database with a manual clock. Every expectation comes from the README's description of the policy.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import jinja2
import phonenumbers
import pytest
import yaml
from hypothesis import given, seed, settings
from hypothesis import strategies as st

from cadence import sandbox
from cadence.language import parse
from cadence.policy import parse as parse_policy
from cadence.rules import RuleSet
from cadence.simulate import BlockedAtStart, Event, Scripted, run

CHANNELS = ("email", "sms", "call", "letter")
#: Contact zones, each with the country whose public holidays and mobile numbers go with it.
ZONES = {
    "Europe/Berlin": "DE",
    "America/New_York": "US",
    "Australia/Sydney": "AU",
    "America/Santiago": "CL",
    "Europe/Moscow": "RU",
    "Asia/Kolkata": "IN",
    "UTC": "RU",
}
FIRST = datetime(2025, 1, 1, tzinfo=UTC)
LAST = datetime(2027, 6, 30, tzinfo=UTC)
#: Outcomes a run may record, the ones that start blocks more often than the others.
OUTCOMES = (
    "not_interested",
    "not_interested",
    "unsubscribed",
    "bounced",
    "do_not_contact",
    "no_answer",
    "replied",
)

#: Every property sees the same examples (same seed, same strategy), so a scenario is simulated once and the
#: seven properties read the one timeline from `_simulate`'s cache.
PROPERTIES = settings(max_examples=80, deadline=None, database=None)
SEED = 20270719


def _mobile(country: str) -> str:
    number = phonenumbers.example_number_for_type(country, phonenumbers.PhoneNumberType.MOBILE)
    assert number is not None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _hhmm(minutes: int) -> str:
    return "24:00" if minutes == 1440 else f"{minutes // 60:02d}:{minutes % 60:02d}"


def _wall(minutes: int) -> time:
    return time.max if minutes == 1440 else time(minutes // 60, minutes % 60)


def _offset_changes(zone: ZoneInfo) -> tuple[datetime, ...]:
    """The midnights (UTC) just before the zone's UTC offset changes, FIRST to LAST."""
    midnights = [FIRST + timedelta(days=n) for n in range((LAST - FIRST).days + 1)]
    return tuple(
        a
        for a, b in itertools.pairwise(midnights)
        if a.astimezone(zone).utcoffset() != b.astimezone(zone).utcoffset()
    )


OFFSET_CHANGES = {name: _offset_changes(ZoneInfo(name)) for name in ZONES}


# --- scenarios ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Touchpoint:
    """A step (with its `day`) or a repeat's content item (day None); times are minutes after midnight."""

    channel: str
    day: int | None = None
    at: int | None = None
    retry: tuple[int, int] | None = None  # no_answer: (retry_after days, max)

    def as_yaml(self, reason: str) -> dict[str, Any]:
        found: dict[str, Any] = {}
        if self.day is not None:
            found["day"] = self.day
        found |= {"channel": self.channel, "template": f"{self.channel}/t", "reason": reason}
        if self.at is not None:
            found["at"] = _hhmm(self.at)
        if self.retry is not None:
            found["on_outcome"] = {
                "no_answer": {"retry_after": f"{self.retry[0]} days", "max": self.retry[1]}
            }
        return found


@dataclass(frozen=True)
class BlockRule:
    after: str
    channels: tuple[str, ...] | None  # None: all
    days: int | None

    def as_yaml(self) -> dict[str, Any]:
        found: dict[str, Any] = {"after": self.after, "channels": list(self.channels or ()) or "all"}
        if self.days is not None:
            found["for"] = f"{self.days} days"
        return found


@dataclass(frozen=True)
class Scenario:
    zone: str
    start: datetime
    days: int
    business_days: bool
    window: tuple[int, int] | None
    steps: tuple[Touchpoint, ...]
    repeat_every: int | None
    repeat_times: int | None
    repeat: tuple[Touchpoint, ...]
    per_month: int | None
    exits: tuple[str, ...]
    per_day: int | None
    per_week: int | None
    quiet_hours: tuple[tuple[str, tuple[int, int]], ...]
    block_rules: tuple[BlockRule, ...]
    blocks: tuple[BlockedAtStart, ...]
    outcomes: tuple[Scripted, ...]

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.zone)

    @property
    def end(self) -> datetime:
        return self.start + timedelta(days=self.days)

    def cadence_yaml(self) -> str:
        cadence: dict[str, Any] = {"cadence": "generated", "exit": {"on_outcome": list(self.exits)}}
        calendar: dict[str, Any] = {"business_days": self.business_days}
        if self.window is not None:
            calendar["window"] = f"{_hhmm(self.window[0])}-{_hhmm(self.window[1])}"
        cadence["calendar"] = calendar
        cadence["steps"] = [step.as_yaml(f"step {i}") for i, step in enumerate(self.steps)]
        if self.repeat_every is not None:
            cadence["repeat"] = {
                "every": f"{self.repeat_every} days",
                "content": [item.as_yaml(f"repeat {i}") for i, item in enumerate(self.repeat)],
            }
            if self.repeat_times is not None:
                cadence["repeat"]["times"] = self.repeat_times
        if self.per_month is not None:
            cadence["budget"] = {"per_month": self.per_month}
        return yaml.safe_dump(cadence, sort_keys=False)

    def policy_yaml(self) -> str:
        policy = {
            "blocks": [rule.as_yaml() for rule in self.block_rules],
            "quiet_hours": {channel: f"{_hhmm(a)}-{_hhmm(b)}" for channel, (a, b) in self.quiet_hours},
            "caps": {"per_day": self.per_day, "per_week": self.per_week},
        }
        return yaml.safe_dump(policy, sort_keys=False)

    def rules(self) -> RuleSet:
        """The cadence and its policy, as `rules.load` would hold them after reading them from a folder."""
        parsed = parse(self.cadence_yaml(), "rules/generated.yaml")
        return RuleSet({parsed.spec.cadence: parsed}, parse_policy(self.policy_yaml(), "rules/policy.yaml"))

    def contact(self) -> dict[str, Any]:
        country = ZONES[self.zone]
        return {
            "name": "Anna Petrova",
            "email": "anna@example.com",
            "phone": _mobile(country),
            "country": country,
            "timezone": self.zone,
            "address": "Tverskaya 1\n125009 Moscow",
            "sms_consent": True,
        }

    def hours(self, channel: str) -> tuple[time, time]:
        """The local hours a touch on `channel` may go out: the cadence's window within the channel's quiet
        hours (the whole day for either when not set)."""
        opens, closes = self.window or (0, 1440)
        quiet_opens, quiet_closes = dict(self.quiet_hours).get(channel, (0, 1440))
        return _wall(max(opens, quiet_opens)), _wall(min(closes, quiet_closes))


def _minutes(low: int, high: int) -> st.SearchStrategy[int]:
    """Minutes after midnight in [low, high], on the quarter hour or anywhere."""
    return st.one_of(st.integers(-(-low // 15), high // 15).map(lambda q: q * 15), st.integers(low, high))


def _touchpoint(window: tuple[int, int] | None, day: int | None) -> st.SearchStrategy[Touchpoint]:
    opens, closes = window or (0, 1439)
    return st.builds(
        Touchpoint,
        channel=st.sampled_from(CHANNELS),
        day=st.just(day),
        at=st.none() | _minutes(opens, min(closes, 1439)),
        retry=st.none() | st.tuples(st.integers(1, 5), st.integers(1, 3)) if day is not None else st.none(),
    )


def _block_rules() -> st.SearchStrategy[tuple[BlockRule, ...]]:
    """The default policy's blocks with `not_interested` varied, and sometimes a block after a bounce."""
    not_interested = st.builds(
        BlockRule,
        after=st.just("not_interested"),
        channels=st.sampled_from([("call",), ("call", "sms"), ("email", "letter"), None]),
        days=st.none() | st.integers(1, 400),
    )
    bounced = st.builds(
        BlockRule, after=st.just("bounced"), channels=st.just(("email",)), days=st.integers(1, 90)
    )
    return st.tuples(not_interested, st.lists(bounced, max_size=1)).map(
        lambda found: (
            BlockRule("do_not_contact", None, None),
            BlockRule("unsubscribed", ("email",), None),
            found[0],
            *found[1],
        )
    )


def _often(draw: st.DrawFn, strategy: st.SearchStrategy[Any]) -> Any:
    """A value from `strategy` three times in four, else None (which is what shrinking heads for)."""
    return draw(strategy) if draw(st.integers(0, 3)) else None


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    zone = draw(st.sampled_from(sorted(ZONES)))
    changes = OFFSET_CHANGES[zone]
    instant = draw(st.datetimes(min_value=FIRST.replace(tzinfo=None), max_value=LAST.replace(tzinfo=None)))
    start = instant.replace(tzinfo=UTC)
    if draw(st.booleans()) and changes:
        # Half of the runs start within days of a DST change, so the first touches straddle it.
        start = draw(st.sampled_from(changes)) + timedelta(seconds=draw(st.integers(-5 * 86400, 2 * 86400)))
    days = draw(st.integers(60, 120))
    # Windows open by 11:00 and close after 15:00, quiet hours open by 12:00 and close after 13:00: a
    # channel always keeps some hours inside the window, as loading the rules demands.
    window = draw(st.none() | st.tuples(_minutes(6 * 60, 11 * 60), _minutes(15 * 60, 1440)))
    # Gaps of 0 days are drawn often, so the caps have touches to hold back.
    gaps = draw(st.lists(st.just(0) | st.integers(0, 10), max_size=7))
    steps = tuple(draw(_touchpoint(window, day)) for day in itertools.accumulate(gaps, initial=0))
    every = _often(draw, st.integers(1, 14))
    quiet_channels = draw(st.lists(st.sampled_from(CHANNELS), unique=True, max_size=4))
    quiet = tuple(
        (channel, draw(st.tuples(_minutes(0, 12 * 60), _minutes(13 * 60, 1440))))
        for channel in quiet_channels
    )
    on_channels = st.builds(
        BlockedAtStart, channel=st.sampled_from(CHANNELS), days=st.none() | st.integers(1, 60)
    )
    blocks = draw(st.lists(on_channels, max_size=2))
    if draw(st.integers(0, 7)) == 7:  # now and then a contact left alone on every channel for a while
        blocks.append(BlockedAtStart(None, draw(st.integers(1, 30))))
    scripted = st.builds(
        Scripted, day=st.integers(0, days), outcome=st.sampled_from(OUTCOMES), at=st.none() | st.times()
    )
    return Scenario(
        zone=zone,
        start=start,
        days=days,
        business_days=draw(st.booleans()),
        window=window,
        steps=steps,
        repeat_every=every,
        repeat_times=draw(st.none() | st.integers(1, 20)) if every else None,
        repeat=tuple(draw(st.lists(_touchpoint(window, None), min_size=1, max_size=3))) if every else (),
        per_month=_often(draw, st.integers(1, 6)),
        exits=tuple(
            draw(st.lists(st.sampled_from(("replied", "not_interested", "unsubscribed")), unique=True))
        ),
        per_day=_often(draw, st.integers(1, 3)),
        per_week=_often(draw, st.integers(1, 7)),
        quiet_hours=quiet,
        block_rules=draw(_block_rules()),
        blocks=tuple(blocks),
        outcomes=tuple(draw(st.lists(scripted, max_size=3))),
    )


# --- running one --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> jinja2.Environment:
    """A trivial template `<channel>/t` for every channel."""
    folder = tmp_path_factory.mktemp("templates")
    files = {
        "email/t.txt": "Subject: {{ reason }}\n\nHello {{ contact.first_name }}: {{ reason }}\n",
        "email/t.html": "<p>Hello {{ contact.first_name }}: {{ reason }}</p>\n",
        "sms/t.txt": "{{ reason }}\n",
        "call/t.md": "Call {{ contact.name }}: {{ reason }}\n",
        "letter/t.html": "<p>{{ reason }}</p>\n",
    }
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text, encoding="utf-8")
    return sandbox.template_environment(Path(folder))


@functools.cache
def _simulate(scenario: Scenario, templates: jinja2.Environment) -> tuple[Event, ...]:
    events = run(
        scenario.rules(),
        "generated",
        scenario.start,
        scenario.contact(),
        {"status": "open", "owner": "ivan"},
        days=scenario.days,
        templates=templates,
        sender={"name": "Ivan", "email": "ivan@example.com", "phone": "+79160000000"},
        default_timezone="UTC",
        outcomes=scenario.outcomes,
        blocks=scenario.blocks,
    )
    return tuple(events)


def _sent(events: Sequence[Event]) -> list[Event]:
    return [e for e in events if e.kind == "touch" and e.status == "sent"]


def _show(events: Sequence[Event]) -> str:
    return "\n".join(
        f"{e.local:%Y-%m-%d %H:%M %Z} {e.kind} {e.step}.{e.iteration} {e.channel} {e.status} {e.note or ''}"
        for e in events
    )


# --- the properties -----------------------------------------------------------------------------------------


@PROPERTIES
@seed(SEED)
@given(scenario=scenarios())
def test_per_day_cap(templates: jinja2.Environment, scenario: Scenario) -> None:
    """Never more than `per_day` sent touches on one local calendar day of the contact."""
    events = _simulate(scenario, templates)
    if scenario.per_day is None:
        return
    days = Counter(e.local.date() for e in _sent(events))
    over = {day: n for day, n in days.items() if n > scenario.per_day}
    assert not over, f"over the cap of {scenario.per_day} a day on {over}\n{_show(events)}"


@PROPERTIES
@seed(SEED)
@given(scenario=scenarios())
def test_per_week_cap(templates: jinja2.Environment, scenario: Scenario) -> None:
    """Never more than `per_week` sent touches in any 7 days of the contact's wall clock (so a weekly touch
    keeps its local hour across a DST change)."""
    events = _simulate(scenario, templates)
    if scenario.per_week is None:
        return
    times = sorted(e.local.replace(tzinfo=None) for e in _sent(events))
    k = scenario.per_week
    crowded = [(a, b) for a, b in zip(times, times[k:], strict=False) if b - a < timedelta(days=7)]
    assert not crowded, f"{k + 1} touches within 7 days: {crowded}\n{_show(events)}"


@PROPERTIES
@seed(SEED)
@given(scenario=scenarios())
def test_monthly_budget(templates: jinja2.Environment, scenario: Scenario) -> None:
    """Never more than the budget's `per_month` sent touches in one local calendar month."""
    events = _simulate(scenario, templates)
    if scenario.per_month is None:
        return
    months = Counter((e.local.year, e.local.month) for e in _sent(events))
    over = {month: n for month, n in months.items() if n > scenario.per_month}
    assert not over, f"over the budget of {scenario.per_month} a month in {over}\n{_show(events)}"


def _blocks(
    scenario: Scenario, events: Sequence[Event]
) -> list[tuple[str | None, datetime, datetime | None, str]]:
    """(channel or None for all, from, until or None for ever, why): those at the start and those the policy
    starts after each recorded outcome."""
    found: list[tuple[str | None, datetime, datetime | None, str]] = [
        (b.channel, scenario.start, scenario.start + timedelta(days=b.days) if b.days else None, "at start")
        for b in scenario.blocks
    ]
    for outcome in (e for e in events if e.kind == "outcome"):
        for rule in (r for r in scenario.block_rules if r.after == outcome.status):
            until = outcome.at + timedelta(days=rule.days) if rule.days else None
            for channel in rule.channels or (None,):
                found.append((channel, outcome.at, until, f"after {outcome.status}"))
    return found


@PROPERTIES
@seed(SEED)
@given(scenario=scenarios())
def test_no_touch_on_a_blocked_channel(templates: jinja2.Environment, scenario: Scenario) -> None:
    """No touch goes out on a channel while a block on it lasts: blocks at the start, and those the
    policy starts after an outcome; after do_not_contact, nothing at all."""
    events = _simulate(scenario, templates)
    blocks = _blocks(scenario, events)
    broken = [
        (e.local, e.channel, why)
        for e in _sent(events)
        for channel, since, until, why in blocks
        if channel in (None, e.channel) and since <= e.at and (until is None or e.at < until)
    ]
    assert not broken, f"sent while blocked: {broken}\n{_show(events)}"
    stops = [e.at for e in events if e.kind == "outcome" and e.status == "do_not_contact"]
    if stops:
        after = [e.local for e in _sent(events) if e.at >= min(stops)]
        assert not after, f"sent after do_not_contact: {after}\n{_show(events)}"


@PROPERTIES
@seed(SEED)
@given(scenario=scenarios())
def test_touches_go_out_inside_the_window_and_quiet_hours(
    templates: jinja2.Environment, scenario: Scenario
) -> None:
    """Every touch goes out at a local time inside the cadence's window and its channel's quiet hours."""
    events = _simulate(scenario, templates)
    outside = []
    for e in _sent(events):
        assert e.channel is not None
        opens, closes = scenario.hours(e.channel)
        if not opens <= e.local.time() <= closes:
            outside.append((e.local, e.channel, f"{opens:%H:%M}-{closes:%H:%M}"))
    assert not outside, f"sent outside the channel's hours: {outside}\n{_show(events)}"


@PROPERTIES
@seed(SEED)
@given(scenario=scenarios())
def test_touches_go_out_in_step_order_once_each(templates: jinja2.Environment, scenario: Scenario) -> None:
    """Steps (repeats included) go out in order, a step's tries in order, and no touch key twice."""
    events = _simulate(scenario, templates)
    sent = _sent(events)
    keys = Counter((e.cadence, e.step, e.iteration) for e in sent)
    assert all(n == 1 for n in keys.values()), f"a touch key sent twice: {keys}\n{_show(events)}"
    firsts = sorted((e for e in sent if e.iteration == 0), key=lambda e: e.step or 0)
    assert all(a.at <= b.at for a, b in itertools.pairwise(firsts)), f"steps out of order\n{_show(events)}"
    by_step = sorted(sent, key=lambda e: (e.step or 0, e.iteration))
    for a, b in itertools.pairwise(by_step):
        if a.step == b.step:
            assert a.at < b.at, f"step {a.step}'s tries out of order\n{_show(events)}"


def _planned_for(event: Event, zone: ZoneInfo) -> datetime:
    """When a planned touch is due: its time, or for one deferred along the way, the time its note names."""
    if not event.deferrals:
        return event.at
    _, _, wall = (event.note or "").rpartition(", to ")
    # The note has the local time to the minute; of a wall time that happens twice, take the later.
    return datetime.strptime(wall, "%Y-%m-%d %H:%M").replace(tzinfo=zone, fold=1) + timedelta(minutes=1)


@PROPERTIES
@seed(SEED)
@given(scenario=scenarios())
def test_no_touch_is_lost(templates: jinja2.Environment, scenario: Scenario) -> None:
    """Every touch ends sent, skipped or cancelled, or is planned past the span; an enrollment still
    active has its next touch planned, and one that ended has none."""
    events = _simulate(scenario, templates)
    touches = [e for e in events if e.kind == "touch"]
    stuck = [
        (e.local, e.step, e.status)
        for e in touches
        if e.status not in ("sent", "skipped", "cancelled", "planned")
    ]
    assert not stuck, f"touches neither done nor planned: {stuck}\n{_show(events)}"
    early = [
        e.local for e in touches if e.status == "planned" and _planned_for(e, scenario.tz) <= scenario.end
    ]
    assert not early, f"planned touches due inside the span were never sent: {early}\n{_show(events)}"
    planned = any(e.status == "planned" for e in touches)
    if any(e.kind == "ended" for e in events):
        assert not planned, f"an ended enrollment with a touch still planned\n{_show(events)}"
    elif any(e.kind == "enrolled" for e in events):
        assert planned, f"an active enrollment with nothing next\n{_show(events)}"


# --- what the properties found ------------------------------------------------------------------------------

#: Two email steps a day apart, one touch a week, and a reply on day 3 that ends the cadence.
REPLY_ON_DAY_3 = Scenario(
    zone="Europe/Berlin",
    start=datetime(2026, 6, 1, 8, 0, tzinfo=UTC),  # Monday 10:00 in Berlin
    days=60,
    business_days=False,
    window=None,
    steps=(Touchpoint("email", day=0), Touchpoint("email", day=1)),
    repeat_every=None,
    repeat_times=None,
    repeat=(),
    per_month=None,
    exits=("replied",),
    per_day=None,
    per_week=1,
    quiet_hours=(),
    block_rules=(BlockRule("do_not_contact", None, None),),
    blocks=(),
    outcomes=(Scripted(3, "replied"),),
)


def _step(events: Sequence[Event], step: int) -> list[Event]:
    return [e for e in events if e.kind == "touch" and e.step == step]


def test_a_deferred_touch_cancelled_by_an_exit_reads_cancelled(templates: jinja2.Environment) -> None:
    """The timeline once kept the status a touch had at its last dispatch: deferred by the weekly cap to
    8 June, then cancelled by the reply on 4 June, it read "planned ... to 2026-06-08 10:00"."""
    events = _simulate(REPLY_ON_DAY_3, templates)
    assert [e.status for e in _step(events, 0)] == ["sent"]
    assert [e.status for e in _step(events, 1)] == ["cancelled"], _show(events)


def test_a_touch_cancelled_before_its_time_is_on_the_timeline(templates: jinja2.Environment) -> None:
    """The timeline once listed only touches dispatched or still planned: the day-7 touch the reply on
    day 3 cancelled was missing."""
    scenario = dataclasses.replace(
        REPLY_ON_DAY_3, steps=(Touchpoint("email", day=0), Touchpoint("email", day=7)), per_week=None
    )
    events = _simulate(scenario, templates)
    assert [e.status for e in _step(events, 0)] == ["sent"]
    assert [e.status for e in _step(events, 1)] == ["cancelled"], _show(events)
