"""Rule sets: the shipped cadences against the domain rules, and the cross-checks that keep a bad set out."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, get_args
from zoneinfo import ZoneInfo

import holidays
import pytest

from cadence import rules, sandbox
from cadence.engine import contact_view_from
from cadence.errors import Problem, RulesError
from cadence.language import CadenceSpec, ChannelName
from cadence.simulate import project as simulate
from channels import PARTS, Channel
from channels.call import CallTasks
from channels.email import EmailOutbox
from channels.letter import LetterOutbox
from channels.sms import SmsOutbox

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "rules"
TEMPLATES = ROOT / "templates"
MOSCOW = ZoneInfo("Europe/Moscow")


@pytest.fixture(scope="module")
def shipped() -> rules.RuleSet:
    return rules.load([RULES], TEMPLATES)


def position(text: str, needle: str, occurrence: int = 1) -> tuple[int, int]:
    index = -1
    for _ in range(occurrence):
        index = text.index(needle, index + 1)
    return text.count("\n", 0, index) + 1, index - (text.rfind("\n", 0, index) + 1) + 1


# --- the shipped rules ----------------------------------------------------------------------------------


def test_shipped_rules_load_cleanly(shipped: rules.RuleSet) -> None:
    files = {p.stem for p in RULES.glob("*.yaml") if p.name not in ("policy.yaml", "crm.yaml")}
    assert {"open-deal", "lost-prospect-nurture", "onboarding", "post-meeting", "warm-letters"} <= files
    assert set(shipped.cadences) == files
    for name, parsed in shipped.cadences.items():
        assert parsed.spec.cadence == name
        assert Path(parsed.file).name == f"{name}.yaml"


def test_then_transitions_point_to_existing_cadences(shipped: rules.RuleSet) -> None:
    transitions = {
        (name, outcome, target)
        for name, parsed in shipped.cadences.items()
        for outcome, target in parsed.spec.then.targets().items()
    }
    assert ("open-deal", "lost", "lost-prospect-nurture") in transitions
    assert ("open-deal", "won", "onboarding") in transitions
    for _name, _outcome, target in transitions:
        assert target in shipped


def _channels(tmp_path: Path) -> dict[str, Channel]:
    return {
        "email": EmailOutbox(tmp_path),
        "sms": SmsOutbox(tmp_path),
        "call": CallTasks(None, None),  # type: ignore[arg-type]  # render needs neither database nor clock
        "letter": LetterOutbox(tmp_path),
    }


CONTACT_KEYS = ("name", "first_name", "email", "phone", "company", "title", "address", "timezone", "country")
DEAL_KEYS = ("title", "stage", "status", "amount", "currency", "owner", "probability")
SENDER = {
    "name": "Olga Petrova",
    "company": "Northwind",
    "email": "olga@northwind.example",
    "phone": "+7 495 000-00-00",
    "address": "1 Tverskaya St, Moscow",
}
FULL_CONTACT = {
    "name": "Ivan Ivanov",
    "first_name": "Ivan",
    "email": "ivan@example.com",
    "phone": "+7 900 000-00-00",
    "company": "Acme <Holding> & Sons",
    "title": "CFO",
    "address": "2 Lenina St\nKazan",
    "timezone": "Europe/Moscow",
    "country": "RU",
}
FULL_DEAL = {
    "title": "CRM rollout",
    "stage": "proposal_sent",
    "status": "open",
    "amount": 125000.5,
    "currency": "RUB",
    "owner": "olga",
    "probability": 0.4,
}


def _contexts() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    yield "all known", FULL_CONTACT, FULL_DEAL
    yield "all None", dict.fromkeys(CONTACT_KEYS), dict.fromkeys(DEAL_KEYS)
    yield "name only", {"name": "Ivan"}, {**dict.fromkeys(DEAL_KEYS), "amount": 0}


@pytest.mark.parametrize("label", [label for label, _, _ in _contexts()])
def test_every_shipped_template_renders_with_a_sample_context(
    shipped: rules.RuleSet, tmp_path: Path, label: str
) -> None:
    contact, deal = next((c, d) for name, c, d in _contexts() if name == label)
    env = sandbox.template_environment(TEMPLATES)
    channels = _channels(tmp_path)
    rendered = 0
    failures = []
    uses = [
        (name, path, point, channel, template)
        for name, parsed in sorted(shipped.cadences.items())
        for path, point in parsed.spec.touchpoints()
        for _, channel, template in point.uses(path)
    ]
    for name, path, point, channel, template in uses:
        context = {
            "contact": contact_view_from(contact),
            "deal": dict(deal),
            "enrollment": {"id": 1, "cadence": name, "status": "active", "started_at": datetime.now(UTC)},
            "reason": point.reason,
            "sender": dict(SENDER),
            "touch": {
                "id": 7,
                "step": 0,
                "channel": channel,
                "variant": None,
                "due_at": datetime(2027, 3, 1, 9),
            },
        }
        try:
            parts = channels[channel].render(env, template, context)
        except sandbox.TemplateError as exc:
            failures.append(f"{name} {path} ({template}): {exc}")
            continue
        rendered += 1
        expected = set(PARTS[channel]) | ({"subject"} if channel == "email" else set())
        assert set(parts) == expected
        assert all(text.strip() for text in parts.values()), (name, path)
        if channel == "email":
            assert "\n" not in parts["subject"]
    assert failures == []
    assert rendered == len(uses) > sum(len(p.spec.steps) for p in shipped.cadences.values())


def test_html_parts_escape_contact_fields(shipped: rules.RuleSet, tmp_path: Path) -> None:
    env = sandbox.template_environment(TEMPLATES)
    context = {
        "contact": contact_view_from(FULL_CONTACT),
        "deal": FULL_DEAL,
        "enrollment": None,
        "reason": "r",
        "sender": SENDER,
        "touch": {"id": 1, "step": 0, "channel": "email", "due_at": None},
    }
    parts = EmailOutbox(tmp_path).render(env, "email/deal-01-proposal-recap", context)
    assert "Acme &lt;Holding&gt; &amp; Sons" in parts["html"]
    assert "Acme <Holding> & Sons" in parts["text"]


def _rows(spec: CadenceSpec, start: datetime, contact: dict[str, Any], days: int | None = None) -> list[Any]:
    until = start + timedelta(days=days) if days else None
    fields = {"timezone": "Europe/Moscow", "country": "RU", **contact}
    return simulate(spec, start, fields, FULL_DEAL, "UTC", until=until)


def _starts_2027() -> Iterator[datetime]:
    day = date(2027, 1, 1)
    while day.year == 2027:
        yield datetime(day.year, day.month, day.day, 10, 0, tzinfo=MOSCOW)
        day += timedelta(days=1)


def test_open_deal_gives_every_contact_at_least_seven_touches(shipped: rules.RuleSet) -> None:
    spec = shipped.get("open-deal")
    start = datetime(2027, 3, 1, 10, 0, tzinfo=MOSCOW)
    for contact in ({}, {"age": 30}, {"age": 49}, {"seniority": "manager"}):
        sent = [row for row in _rows(spec, start, contact) if row.sent]
        assert len(sent) >= 7, contact


def test_open_deal_gives_a_senior_contact_eight_touches_with_one_on_paper(shipped: rules.RuleSet) -> None:
    spec = shipped.get("open-deal")
    start = datetime(2027, 3, 1, 10, 0, tzinfo=MOSCOW)
    for contact in ({"age": 50}, {"age": 63}):
        sent = [row for row in _rows(spec, start, contact) if row.sent]
        assert len(sent) == 8, contact
        assert "letter" in {row.channel for row in sent}
    # A junior contact gets the same brief by email instead.
    junior = [row for row in _rows(spec, start, {"age": 30}) if row.sent]
    assert len(junior) == 8
    assert "letter" not in {row.channel for row in junior}
    assert "email/deal-04-executive-brief" in {row.template for row in junior}


def test_open_deal_stays_inside_30_days_for_every_start_in_2027(shipped: rules.RuleSet) -> None:
    # DOMAIN.md §4: the first decision window is 21-30 days from the first touch (the proposal recap).
    # Public holidays stop decisions too, so each one inside the span lengthens the window by a day: over
    # Russia's ten-day New Year break no business-day cadence could end within 30 calendar days.
    spec = shipped.get("open-deal")
    public_holidays = holidays.country_holidays("RU", years=[2027, 2028])
    late: dict[date, str] = {}
    for start in _starts_2027():
        for contact in ({"age": 30}, {"age": 60}):
            sent = [row for row in _rows(spec, start, contact) if row.sent]
            first, last = sent[0].local.date(), sent[-1].local.date()
            days_off = sum(first + timedelta(days=n) in public_holidays for n in range((last - first).days))
            span = (last - first).days - days_off
            if span > 30:
                late[start.date()] = f"{first} -> {last} ({span} days without holidays)"
    examples = [late[d] for d in sorted(late)][:: max(1, len(late) // 6)]
    assert not late, f"{len(late)} of 365 start dates end later than 30 days, e.g. {examples}"


def test_open_deal_touches_never_start_before_the_enrollment(shipped: rules.RuleSet) -> None:
    spec = shipped.get("open-deal")
    for start in _starts_2027():
        rows = _rows(spec, start, {"age": 60})
        assert rows[0].due_at >= start
        assert [row.due_at for row in rows] == sorted(row.due_at for row in rows)


def test_open_deal_uses_all_four_channels(shipped: rules.RuleSet) -> None:
    spec = shipped.get("open-deal")
    assert set().union(*(step.channels() for step in spec.steps)) == set(get_args(ChannelName))


def test_every_reason_is_distinct(shipped: rules.RuleSet) -> None:
    reasons = [point.reason for parsed in shipped.cadences.values() for _, point in parsed.spec.touchpoints()]
    assert all(reason.strip() for reason in reasons)
    normalised = [" ".join(reason.lower().split()) for reason in reasons]
    assert len(set(normalised)) == len(normalised)


def test_nurture_has_no_gap_over_31_days(shipped: rules.RuleSet) -> None:
    spec = shipped.get("lost-prospect-nurture")
    assert not spec.calendar.business_days
    for start in (datetime(2027, 3, 1, 10, 0, tzinfo=MOSCOW), datetime(2027, 12, 24, 16, 59, tzinfo=MOSCOW)):
        for contact in ({}, {"age": 70}):
            rows = [row for row in _rows(spec, start, contact, days=365) if row.sent]
            assert len(rows) >= 45
            gaps = [(b.local.date() - a.local.date()).days for a, b in itertools.pairwise(rows)]
            assert max(gaps) <= 31, (start, contact, gaps)


def test_nurture_is_weekly_for_a_senior_contact(shipped: rules.RuleSet) -> None:
    # DOMAIN.md §4, the second touch system: weekly, so with every step sent each gap is one week.
    spec = shipped.get("lost-prospect-nurture")
    rows = _rows(spec, datetime(2027, 3, 1, 10, 0, tzinfo=MOSCOW), {"age": 70}, days=365)
    assert len(rows) == 53 and all(row.sent for row in rows)
    gaps = [(b.local.date() - a.local.date()).days for a, b in itertools.pairwise(rows)]
    assert set(gaps) == {7}


# --- cross-checks ---------------------------------------------------------------------------------------

GOOD = """\
cadence: {name}
then:
  lost: {lost}
steps:
  - day: 0
    channel: sms
    template: {template}
    reason: {reason}
"""


def write_rules(folder: Path, **files: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / f"{name}.yaml").write_text(text, encoding="utf-8")
    return folder


def cadence_text(name: str, lost: str, template: str = "sms/hello", reason: str = "A new case.") -> str:
    return GOOD.format(name=name, lost=lost, template=template, reason=reason)


@pytest.fixture
def templates(tmp_path: Path) -> Path:
    root = tmp_path / "templates"
    (root / "sms").mkdir(parents=True)
    (root / "sms" / "hello.txt").write_text("Hello {{ contact.first_name or 'there' }}", encoding="utf-8")
    return root


def load_problems(paths: list[Path], templates: Path) -> list[Problem]:
    with pytest.raises(RulesError) as caught:
        rules.load(paths, templates)
    return caught.value.problems


def test_a_good_pair_of_files_loads(tmp_path: Path, templates: Path) -> None:
    folder = write_rules(
        tmp_path / "rules", a=cadence_text("a", "b"), b=cadence_text("b", "a", reason="Other.")
    )
    loaded = rules.load([folder], templates)
    assert set(loaded.cadences) == {"a", "b"}
    assert loaded.get("a").then.lost == "b"


def test_unknown_then_target_lists_the_known_cadences(tmp_path: Path, templates: Path) -> None:
    text = cadence_text("a", "nurture")
    folder = write_rules(tmp_path / "rules", a=text, b=cadence_text("b", "a", reason="Other."))
    [problem] = load_problems([folder], templates)
    assert "then.lost names unknown cadence 'nurture'" in problem.message
    assert problem.hint == "known cadences: a, b"
    assert Path(problem.file).name == "a.yaml"
    assert (problem.line, problem.column) == position(text, "nurture")
    assert str(problem).startswith(f"{problem.file}:{problem.line}:{problem.column}: error:")


def test_missing_template_file(tmp_path: Path, templates: Path) -> None:
    text = cadence_text("a", "a", template="sms/absent")
    [problem] = load_problems([write_rules(tmp_path / "rules", a=text)], templates)
    assert "sms/absent.txt" in problem.message
    assert "not found" in problem.message
    assert (problem.line, problem.column) == position(text, "sms/absent")


def test_every_missing_part_of_an_email_is_reported(tmp_path: Path, templates: Path) -> None:
    (templates / "email").mkdir()
    (templates / "email" / "half.txt").write_text("Subject: s\n\nbody", encoding="utf-8")
    text = cadence_text("a", "a", template="email/half").replace("channel: sms", "channel: email")
    [problem] = load_problems([write_rules(tmp_path / "rules", a=text)], templates)
    assert "email/half.html" in problem.message
    assert (problem.line, problem.column) == position(text, "email/half")


def test_template_syntax_error(tmp_path: Path, templates: Path) -> None:
    (templates / "sms" / "broken.txt").write_text("Hi\n{% if contact.name %}no end", encoding="utf-8")
    text = cadence_text("a", "a", template="sms/broken")
    [problem] = load_problems([write_rules(tmp_path / "rules", a=text)], templates)
    assert problem.message.startswith("sms/broken.txt:")
    assert (problem.line, problem.column) == position(text, "sms/broken")


def test_template_name_with_dotdot_is_a_problem_not_a_crash(tmp_path: Path, templates: Path) -> None:
    # templates/sms/../sms/hello.txt exists on disk, but Jinja's loader refuses `..`: that must come back as a
    # Problem with a position, like every other bad template, not as an exception from the loader.
    text = cadence_text("a", "a", template="sms/../sms/hello")
    [problem] = load_problems([write_rules(tmp_path / "rules", a=text)], templates)
    assert (problem.line, problem.column) == position(text, "sms/../sms/hello")


def test_duplicate_cadence_name_across_two_files(tmp_path: Path, templates: Path) -> None:
    second = cadence_text("dup", "dup", reason="Other.")
    folder = write_rules(tmp_path / "rules", a=cadence_text("dup", "dup"), b=second)
    [problem] = load_problems([folder], templates)
    assert Path(problem.file).name == "b.yaml"
    assert "cadence 'dup' is also defined in" in problem.message
    assert "a.yaml" in problem.message
    assert (problem.line, problem.column) == position(second, "dup") == (1, 10)


def test_problems_from_several_files_come_together(tmp_path: Path, templates: Path) -> None:
    folder = write_rules(
        tmp_path / "rules",
        a=cadence_text("a", "a", template="sms/absent"),
        b=cadence_text("b", "b").replace("channel: sms", "channel: smss"),
    )
    problems = load_problems([folder], templates)
    assert {Path(p.file).name for p in problems} == {"a.yaml", "b.yaml"}


def test_load_is_all_or_nothing(tmp_path: Path, templates: Path) -> None:
    good = write_rules(tmp_path / "good", a=cadence_text("a", "a"), b=cadence_text("b", "a", reason="Other."))
    assert set(rules.load([good], templates).cadences) == {"a", "b"}
    bad = tmp_path / "bad.yaml"
    bad.write_text(cadence_text("c", "a", template="sms/absent"), encoding="utf-8")
    result = None
    with pytest.raises(RulesError) as caught:
        result = rules.load([good, bad], templates)
    assert result is None
    # Only the bad file is blamed; the good ones are not loaded either.
    assert {Path(p.file).name for p in caught.value.problems} == {"bad.yaml"}


def test_a_file_that_cannot_be_read_is_a_problem(tmp_path: Path, templates: Path) -> None:
    folder = write_rules(tmp_path / "rules", a=cadence_text("a", "a"))
    (folder / "b.yaml").write_bytes(b"cadence: b\xff\xfe\n")
    [problem] = load_problems([folder], templates)
    assert Path(problem.file).name == "b.yaml"
    assert (problem.line, problem.column) == (1, 1)


def test_rule_files_takes_yaml_and_yml_in_name_order(tmp_path: Path) -> None:
    folder = tmp_path / "rules"
    folder.mkdir()
    for name in ("b.yml", "a.yaml", "c.txt", "d.yaml~"):
        (folder / name).write_text("x", encoding="utf-8")
    assert [p.name for p in rules.rule_files([folder])] == ["a.yaml", "b.yml"]
