"""Lint: rules that load but would misbehave (`then` cycles, unknown template variables) are errors;
cadences that go against the sales rules (seven touches, a reason each, no missed month) are warnings."""

from __future__ import annotations

import difflib
import itertools
import re
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes

from cadence import rules as ruleset
from cadence import sandbox, timing
from cadence.engine import contact_view, deal_view, enrollment_view, touch_view
from cadence.errors import Problem, RulesError
from cadence.language import Parsed, Touchpoint
from cadence.models import Contact, Deal, Enrollment, Touch
from cadence.policy import Policy
from cadence.settings import Settings
from cadence.simulate import project
from channels import PARTS

#: Touches the average client needs before buying (the multiple-touch system).
DECISION_TOUCHES = 7
#: Calendar days after a decision cadence's first touch that its touches should fall within.
DECISION_WINDOW_DAYS = 30
#: Most calendar days a nurture may leave between two touches: no month missed.
NURTURE_MAX_GAP_DAYS = 31
#: The Monday timelines are simulated from; the six weeks after it hold no public holiday in RU, US or DE.
SAMPLE_START = date(2027, 7, 19)

_UNDEFINED_NAME = re.compile(r"^'(?P<name>[^']+)' is undefined$")
_UNDEFINED_KEY = re.compile(r"^'[^']+' has no attribute '(?P<name>[^']+)'$")
#: (template line, variable as written, hint) for a variable a template uses and its context lacks.
_Found = tuple[int, str, str]
#: Records whose extra fields come from the CRM, so a field may be there for one contact and not another.
_CRM_RECORDS = ("contact", "deal")


@dataclass(frozen=True)
class Report:
    """What lint found: the cadences that loaded (none when the rules do not load) and every problem."""

    cadences: list[str]
    problems: list[Problem]


def report(paths: Iterable[Path], templates_dir: Path) -> Report:
    """Load the rules (their errors are lint's errors), then hold the loaded set to the rules below."""
    try:
        loaded = ruleset.load(paths, templates_dir)
    except RulesError as exc:
        return Report([], _sorted(exc.problems))
    env = sandbox.template_environment(templates_dir)
    sample = _sample()
    problems = _cycle_problems(loaded)
    for parsed in loaded.cadences.values():
        problems += _template_problems(parsed, env, sample)
        problems += _reason_problems(parsed)
        problems += _quiet_hours_problems(parsed, loaded.policy)
        if parsed.spec.kind == "decision":
            problems += _decision_problems(parsed)
        elif parsed.spec.kind == "nurture":
            problems += _nurture_problems(parsed)
    return Report(sorted(loaded.cadences), _sorted(problems))


def lint(paths: Iterable[Path], templates_dir: Path) -> list[Problem]:
    """Every problem in the rules, errors and warnings, sorted by file, line and column."""
    return report(paths, templates_dir).problems


def _sorted(problems: Iterable[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: (p.file, p.line, p.column))


def _warning(parsed: Parsed, path: tuple[str | int, ...], message: str, hint: str) -> Problem:
    return Problem(parsed.file, *parsed.where(path), message, hint, severity="warning")


# --- then cycles ----------------------------------------------------------------------------------------


def _way_back(rules: ruleset.RuleSet, start: str, goal: str) -> list[tuple[str, str]] | None:
    """The shortest chain of transitions (cadence, where it is written) from `start` to `goal`, or None."""
    came_from: dict[str, tuple[str, str] | None] = {start: None}
    queue = deque([start])
    while queue:
        name = queue.popleft()
        if name == goal:
            hops: list[tuple[str, str]] = []
            while (hop := came_from[name]) is not None:
                hops.insert(0, hop)
                name = hop[0]
            return hops
        for where, _, target in rules.get(name).transitions():
            if target not in came_from:
                came_from[target] = (name, ".".join(str(p) for p in where))
                queue.append(target)
    return None


def _cycle_problems(rules: ruleset.RuleSet) -> list[Problem]:
    problems = []
    for name, parsed in rules.cadences.items():
        for where, _, target in parsed.spec.transitions():
            back = _way_back(rules, target, name)
            if back is None:
                continue
            written = ".".join(str(p) for p in where)
            hops = [(name, written), *back]
            cycle = " → ".join(f"{cadence} ({via})" for cadence, via in hops) + f" → {name}"
            problems.append(
                Problem(
                    parsed.file,
                    *parsed.where(where),
                    f"{written} closes a cycle: {cycle}",
                    "a contact would go round these cadences for ever; end the chain in a cadence without "
                    "a `then` for that outcome",
                )
            )
    return problems


# --- templates ------------------------------------------------------------------------------------------


def _sample() -> dict[str, Any]:
    """The records every template's sample context shares, built once per lint: they are most of its cost.

    Templates share them safely because the sandbox refuses to modify a dict or list (`.update`, `.pop`...).
    """
    started = datetime.combine(SAMPLE_START, time(9), tzinfo=UTC)
    contact = Contact(
        id=17,
        source="lint",
        external_id="c-17",
        name="Anna Petrova",
        email="anna@example.com",
        phone="+79161234567",
        timezone="Europe/Moscow",
        country="RU",
        address="Tverskaya 1\n125009 Moscow",
        attributes={"company": "Acme Logistics", "title": "Head of Sales"},
    )
    deal = Deal(
        id=42,
        source="lint",
        external_id="d-42",
        title="CRM rollout",
        stage="proposal_sent",
        status="open",
        amount=12000.0,
        currency="EUR",
        owner="ivan",
        probability=0.4,
    )
    sender = Settings.model_construct(
        sender_name="Olga Ivanova",
        sender_company="Northwind",
        sender_email="olga@northwind.example",
        sender_phone="+74950000000",
        sender_address="1 Tverskaya St, Moscow",
    ).sender()
    enrollment = Enrollment(
        id=1,
        cadence_name="",
        cadence_version_id=1,
        subject="deal:42",
        contact_id=17,
        deal_id=42,
        started_at=started,
    )
    touch = Touch(id=1, enrollment_id=1, step_index=0, channel="", template="", reason="", due_at=started)
    return {
        "contact": contact_view(contact),
        "deal": deal_view(deal),
        "enrollment": enrollment_view(enrollment),
        "sender": sender,
        "touch": touch_view(touch),
    }


def _sample_context(
    sample: Mapping[str, Any], parsed: Parsed, point: Touchpoint, channel: str
) -> dict[str, Any]:
    """A touch's template context as dispatch builds it, for a contact and deal with every field filled."""
    return {
        "contact": sample["contact"],
        "deal": sample["deal"],
        "enrollment": {**sample["enrollment"], "cadence": parsed.spec.cadence},
        "reason": point.reason,
        "sender": sample["sender"],
        "touch": {**sample["touch"], "channel": channel},
    }


def _template_problems(parsed: Parsed, env: jinja2.Environment, sample: Mapping[str, Any]) -> list[Problem]:
    problems = []
    for path, point in parsed.spec.touchpoints():
        for where, channel, template in point.uses(path):
            context = _sample_context(sample, parsed, point, channel)
            for ext in PARTS[channel].values():
                name = f"{template}{ext}"
                try:
                    sandbox.render(env, name, context)
                except sandbox.TemplateError as exc:
                    found = _undefined(env, name, context, exc)
                    message, hint = found if found else (f"template {exc}", None)
                    problems.append(Problem(parsed.file, *parsed.where(where), message, hint))
    return problems


def _undefined(
    env: jinja2.Environment, name: str, context: Mapping[str, Any], exc: sandbox.TemplateError
) -> tuple[str, str] | None:
    """(message, hint) naming the variable a template lacks and its line, when that is what failed."""
    cause = exc.__cause__
    if not isinstance(cause, jinja2.UndefinedError) or env.loader is None:
        return None
    tree = env.parse(env.loader.get_source(env, name)[0])
    text = cause.message or ""
    if match := _UNDEFINED_NAME.match(text):
        found = _unknown_name(tree, match["name"], context)
    elif match := _UNDEFINED_KEY.match(text):
        found = _unknown_key(tree, match["name"], context)
    else:
        found = None
    if found is None:
        return None
    line, variable, hint = found
    return f"template {name}, line {line}: undefined variable '{variable}'", hint


def _unknown_name(tree: nodes.Template, variable: str, context: Mapping[str, Any]) -> _Found | None:
    line = next((n.lineno for n in tree.find_all(nodes.Name) if n.name == variable), None)
    if line is None:
        return None
    close = difflib.get_close_matches(variable, list(context), n=1)
    return line, variable, f"did you mean '{close[0]}'?" if close else f"templates have {', '.join(context)}"


def _unknown_key(tree: nodes.Template, key: str, context: Mapping[str, Any]) -> _Found | None:
    """The first `record.key` or `record["key"]` whose record is in the context without that key."""
    accesses: list[tuple[int, nodes.Expr, Any]] = [
        (n.lineno, n.node, n.attr) for n in tree.find_all(nodes.Getattr)
    ]
    accesses += [(n.lineno, n.node, getattr(n.arg, "value", None)) for n in tree.find_all(nodes.Getitem)]
    for line, of, written in sorted(accesses, key=lambda access: access[0]):
        root = of.name if isinstance(of, nodes.Name) else None
        record = context.get(root) if root else None
        if written != key or not isinstance(record, Mapping) or key in record:
            continue
        close = difflib.get_close_matches(key, list(record), n=1)
        if close:
            hint = f"did you mean '{root}.{close[0]}'?"
        elif root in _CRM_RECORDS:
            hint = (
                f"every {root} has {', '.join(record)}; guard a field the CRM sends only for some "
                f"with {{% if {root}.{key} is defined %}}"
            )
        else:
            hint = f"{root} has {', '.join(record)}"
        return line, f"{root}.{key}", hint
    return None


# --- the sales rules (warnings) -------------------------------------------------------------------------


def _may_skip(point: Touchpoint) -> bool:
    """Whether a condition may skip the touch for some contacts."""
    if point.choose and all(option.when for option in point.choose):
        return True
    return point.when is not None or point.skip_when is not None


def _timeline(parsed: Parsed, days: int | None = None) -> list[tuple[int, date]]:
    """(touch number, local due date) for a contact with no fields, enrolled at SAMPLE_START's midnight:
    the steps, and a repeat's touches for `days` days."""
    spec = parsed.spec
    # With no contact zone and no cadence zone, the service default applies; dates are the same in any.
    zone = timing.zone_for(None, spec.calendar, "UTC")
    start = datetime.combine(SAMPLE_START, time(), tzinfo=zone)
    until = start + timedelta(days=days) if days is not None else None
    return [(row.step, row.local.date()) for row in project(spec, start, {}, None, "UTC", until=until)]


def _where(parsed: Parsed, index: int) -> tuple[str | int, ...]:
    """Where touch number `index` is written: a step, or an item of the repeat's content."""
    steps = len(parsed.spec.steps)
    if index < steps:
        return ("steps", index)
    assert parsed.spec.repeat is not None
    return ("repeat", "content", (index - steps) % len(parsed.spec.repeat.content))


def _decision_problems(parsed: Parsed) -> list[Problem]:
    spec = parsed.spec
    dates = _timeline(parsed, DECISION_WINDOW_DAYS + 7)
    inside = [i for i, day in dates if (day - dates[0][1]).days <= DECISION_WINDOW_DAYS]
    sure = [i for i in inside if not _may_skip(spec.touchpoint(i))]  # type: ignore[arg-type]
    if len(sure) >= DECISION_TOUCHES:
        return []
    within = f"within {DECISION_WINDOW_DAYS} days of the first touch"
    if len(inside) >= DECISION_TOUCHES:
        message = (
            f"only {len(sure)} of the {len(inside)} touches {within} reach every contact: "
            f"the other {len(inside) - len(sure)} have a `when` or `skip_when` and may be skipped"
        )
    else:
        message = f"{len(inside)} touch(es) {within}"
        if len(sure) < len(inside):
            message += f" ({len(inside) - len(sure)} of them may be skipped by `when` or `skip_when`)"
    return [
        _warning(
            parsed,
            ("kind",),
            f"{message}; a decision cadence needs {DECISION_TOUCHES}",
            f"the average client buys after about {DECISION_TOUCHES} touches, and the first decision window "
            f"is 21-{DECISION_WINDOW_DAYS} days: touch about once a week, each time with something new",
        )
    ]


def _nurture_problems(parsed: Parsed) -> list[Problem]:
    spec = parsed.spec
    dates = dict(_timeline(parsed, 3 * 365 if spec.repeat else None))
    sure = [i for i in dates if not _may_skip(spec.touchpoint(i))]  # type: ignore[arg-type]
    problems = []
    seen: set[tuple[str | int, ...]] = set()
    for before, after in itertools.pairwise(sure):
        gap = (dates[after] - dates[before]).days
        where = _where(parsed, after)
        if gap <= NURTURE_MAX_GAP_DAYS:
            continue
        name, was = ".".join(str(p) for p in where), ".".join(str(p) for p in _where(parsed, before))
        message = f"{name} comes {gap} days after {was}"
        # Every touch in between may be skipped: the gap is there for each contact it skips.
        between = [".".join(str(p) for p in _where(parsed, i)) for i in range(before + 1, after)]
        if between:
            message += f" when {', '.join(between)} {'is' if len(between) == 1 else 'are'} skipped"
        repeating = after >= len(spec.steps) and spec.repeat is not None
        pointer = ("repeat", "every") if repeating and not between else (*where, "day")
        if not repeating and spec.steps[after].after is not None:
            pointer = (*where, "after")
        if repeating and between:
            pointer = where
        if pointer in seen:
            continue  # the repeat comes round again: one warning for each place in the file
        seen.add(pointer)
        problems.append(
            _warning(
                parsed,
                pointer,
                f"{message}; a nurture touches at least every {NURTURE_MAX_GAP_DAYS} days",
                "the second touch system: keep touching until they buy; each missed month costs about 10% "
                "of the value of the base",
            )
        )
    return problems


def _reason_problems(parsed: Parsed) -> list[Problem]:
    first: dict[str, str] = {}
    problems = []
    for path, point in parsed.spec.touchpoints():
        name = ".".join(str(p) for p in path)
        said = " ".join(point.reason.casefold().split())
        if said not in first:
            first[said] = name
            continue
        problems.append(
            _warning(
                parsed,
                (*path, "reason"),
                f"{name}.reason repeats {first[said]}.reason",
                "every touch needs a reason with something new for the contact; a touch with nothing new "
                "is noise",
            )
        )
    return problems


def _span(opens: time, closes: time) -> str:
    return f"{opens:%H:%M}-{'24:00' if closes == time.max else f'{closes:%H:%M}'}"


def _quiet_hours_problems(parsed: Parsed, policy: Policy) -> list[Problem]:
    problems = []
    for path, point in parsed.spec.touchpoints():
        for channel in sorted(point.channels()):
            hours = policy.hours(channel)
            window = point.window or parsed.spec.calendar.window
            opens, closes = window or (time.min, time.max)
            if hours is None or (hours[0] <= opens and closes <= hours[1]):
                continue
            if point.at is not None and hours[0] <= point.at <= hours[1]:
                continue  # a fixed time inside the hours: the window's other hours are never used
            whose = "the step's window" if point.window else "the cadence's window"
            sends = f"{whose} is {_span(opens, closes)}" if window else "the cadence has no window"
            allowed = _span(*hours)
            where = (*path, "channel") if point.channel else (*path, "choose")
            problems.append(
                _warning(
                    parsed,
                    where,
                    f"{channel} planned inside quiet hours: {sends}, and the policy's quiet_hours allow "
                    f"{channel} only {allowed}",
                    f"outside {allowed} in the contact's zone the touch waits for the next allowed hour; "
                    f"narrow the window to fit",
                )
            )
    return problems
