"""`cadence lint`: `then` cycles and unknown template variables are errors; the sales rules are warnings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from cadence.cli import app
from cadence.errors import Problem
from cadence.lint import lint
from channels import PARTS

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "rules"
TEMPLATES = ROOT / "templates"

#: A template per channel that uses only what every touch's context has.
FINE = {
    "email/fine.txt": "Subject: News for {{ contact.first_name }}\n\nHello. {{ reason }}\n",
    "email/fine.html": "<p>Hello {{ contact.name }}. {{ reason }}</p>\n",
    "sms/fine.txt": "{{ contact.first_name }}: {{ reason }} {{ sender.name }}\n",
    "call/fine.md": "# Call {{ contact.name }} about {{ deal.title }}\n\n{{ reason }}\n",
    "letter/fine.html": "<p>{{ contact.address }}</p><p>{{ reason }}</p>\n",
}


@pytest.fixture(autouse=True)
def workdir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    # Settings() reads the environment and a .env in the working folder: keep both out of the way. The
    # working folder is not above the rule files, so problems name the files as they were given.
    for name in ("RULES_DIR", "TEMPLATES_DIR", "DEFAULT_TIMEZONE", "DATABASE_URL", "REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    folder = tmp_path / "workdir"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


@pytest.fixture
def templates(tmp_path: Path) -> Path:
    root = tmp_path / "templates"
    for name, text in FINE.items():
        add_template(root, name, text)
    return root


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "rules"
    path.mkdir()
    return path


def add_template(root: Path, name: str, text: str) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def step(day: int, channel: str = "email", template: str = "", reason: str = "", **more: str) -> str:
    """A step's lines; `more` adds keys after the reason, e.g. when="contact.age >= 50"."""
    lines = [
        f"  - day: {day}",
        f"    channel: {channel}",
        f"    template: {template or channel + '/fine'}",
        f"    reason: {reason or f'News number {day}.'}",
        *(f"    {key}: {value}" for key, value in more.items()),
    ]
    return "\n".join(lines) + "\n"


def cadence(name: str, *steps: str, head: str = "") -> str:
    return f"cadence: {name}\n{head}steps:\n{''.join(steps)}"


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def value_at(text: str, written: str, occurrence: int = 1) -> tuple[int, int]:
    """1-based (line, column) of the value in the `key: value` line `written`, the n-th time it occurs."""
    index = -1
    for _ in range(occurrence):
        index = text.index(written, index + 1)
    index += written.index(": ") + 2
    return text.count("\n", 0, index) + 1, index - (text.rfind("\n", 0, index) + 1) + 1


def at(problems: list[Problem]) -> list[tuple[str, int, int, str]]:
    return [(Path(p.file).name, p.line, p.column, p.severity) for p in problems]


#: A calendar window inside the default policy's quiet hours (sms 09:00-20:00).
WINDOW = 'calendar:\n  window: "09:00-18:00"\n'


def weekly(count: int, start: int = 0) -> list[str]:
    return [step(start + 4 * n) for n in range(count)]


# --- errors: then cycles --------------------------------------------------------------------------------


def test_a_then_cycle_is_an_error_at_each_then_key_naming_the_whole_cycle(
    folder: Path, templates: Path
) -> None:
    a = write(folder, "a", cadence("a", step(0), head="then:\n  lost: b\n"))
    b = write(folder, "b", cadence("b", step(0), head="then:\n  won: a\n"))
    problems = lint([folder], templates)
    # Line 3 of each file is the `then` outcome; its value follows "  lost: " (col 9) or "  won: " (col 8).
    assert at(problems) == [("a.yaml", 3, 9, "error"), ("b.yaml", 3, 8, "error")]
    assert problems[0].file == str(a)
    assert problems[1].file == str(b)
    assert problems[0].message == "then.lost closes a cycle: a (then.lost) → b (then.won) → a"
    assert problems[1].message == "then.won closes a cycle: b (then.won) → a (then.lost) → b"
    assert all(p.hint for p in problems)


def test_a_cadence_that_moves_into_itself_is_a_cycle(folder: Path, templates: Path) -> None:
    write(folder, "a", cadence("a", step(0), head="then:\n  lost: a\n"))
    [problem] = lint([folder], templates)
    assert at([problem]) == [("a.yaml", 3, 9, "error")]
    assert problem.message == "then.lost closes a cycle: a (then.lost) → a"


def test_a_cycle_through_any_then_outcome_is_found(folder: Path, templates: Path) -> None:
    write(folder, "a", cadence("a", step(0), head="then:\n  meeting_booked: b\n"))
    write(folder, "b", cadence("b", step(0), head="then:\n  not_interested: a\n"))
    problems = lint([folder], templates)
    # "  meeting_booked: " is 18 characters and "  not_interested: " 18 too: each value starts at column 19.
    assert at(problems) == [("a.yaml", 3, 19, "error"), ("b.yaml", 3, 19, "error")]
    assert problems[0].message == (
        "then.meeting_booked closes a cycle: a (then.meeting_booked) → b (then.not_interested) → a"
    )


def test_a_cycle_reports_only_the_then_keys_on_it(folder: Path, templates: Path) -> None:
    # a -> b -> c -> b: a's `then` leads into the cycle without being on it.
    write(folder, "a", cadence("a", step(0), head="then:\n  lost: b\n"))
    write(folder, "b", cadence("b", step(0), head="then:\n  won: c\n"))
    write(folder, "c", cadence("c", step(0), head="then:\n  lost: b\n"))
    problems = lint([folder], templates)
    assert at(problems) == [("b.yaml", 3, 8, "error"), ("c.yaml", 3, 9, "error")]
    assert problems[0].message.endswith("b (then.won) → c (then.lost) → b")


def test_chains_that_end_are_not_cycles(folder: Path, templates: Path) -> None:
    # Two ways from a to c (directly, and through b), and c goes nowhere.
    write(folder, "a", cadence("a", step(0), head="then:\n  won: b\n  lost: c\n"))
    write(folder, "b", cadence("b", step(0), head="then:\n  lost: c\n"))
    write(folder, "c", cadence("c", step(0)))
    assert lint([folder], templates) == []


# --- errors: template variables -------------------------------------------------------------------------


def test_a_misspelt_variable_is_an_error_at_the_step_template_key(folder: Path, templates: Path) -> None:
    add_template(templates, "email/typo.txt", "Subject: News\n\nHello {{ contcat.name }}\n")
    add_template(templates, "email/typo.html", FINE["email/fine.html"])
    text = cadence("a", step(0), step(4, template="email/typo"))
    write(folder, "a", text)
    [problem] = lint([folder], templates)
    assert (problem.line, problem.column) == value_at(text, "template: email/typo")
    assert problem.severity == "error"
    assert problem.message == "template email/typo.txt, line 3: undefined variable 'contcat'"
    assert problem.hint == "did you mean 'contact'?"


def test_a_misspelt_deal_field_is_named_with_its_record(folder: Path, templates: Path) -> None:
    add_template(templates, "call/typo.md", "# Call {{ contact.name }} about\n{{ deal.titel }}\n")
    text = cadence("a", step(0, channel="call", template="call/typo"))
    write(folder, "a", text)
    [problem] = lint([folder], templates)
    assert (problem.line, problem.column) == value_at(text, "template: call/typo")
    assert problem.message == "template call/typo.md, line 2: undefined variable 'deal.titel'"
    assert problem.hint == "did you mean 'deal.title'?"


def test_a_field_only_some_contacts_have_is_an_error_unless_guarded(folder: Path, templates: Path) -> None:
    add_template(templates, "letter/bare.html", "Dear {{ contact.seniority }}\n")
    guarded = "Dear{% if contact.seniority is defined %} {{ contact.seniority }}{% endif %}\n"
    add_template(templates, "letter/guarded.html", guarded)
    text = cadence(
        "a",
        step(0, channel="letter", template="letter/guarded"),
        step(4, channel="letter", template="letter/bare"),
    )
    write(folder, "a", text)
    [problem] = lint([folder], templates)
    assert (problem.line, problem.column) == value_at(text, "template: letter/bare")
    assert problem.message == "template letter/bare.html, line 1: undefined variable 'contact.seniority'"
    assert problem.hint is not None
    assert "{% if contact.seniority is defined %}" in problem.hint


@pytest.mark.parametrize(
    ("channel", "ext"), [(channel, ext) for channel, parts in PARTS.items() for ext in parts.values()]
)
def test_every_part_of_every_channel_is_rendered(
    folder: Path, templates: Path, channel: str, ext: str
) -> None:
    # The part under test misspells a variable; the channel's other parts are fine.
    for other in PARTS[channel].values():
        add_template(templates, f"{channel}/one{other}", FINE[f"{channel}/fine{other}"])
    broken = FINE[f"{channel}/fine{ext}"].replace("{{ reason }}", "{{ reasno }}")
    assert broken != FINE[f"{channel}/fine{ext}"]
    add_template(templates, f"{channel}/one{ext}", broken)
    # A window inside every channel's default quiet hours, so the template error is the only problem.
    text = cadence("a", step(0, channel=channel, template=f"{channel}/one"), head=WINDOW)
    write(folder, "a", text)
    [problem] = lint([folder], templates)
    assert (problem.line, problem.column) == value_at(text, f"template: {channel}/one")
    assert problem.message.startswith(f"template {channel}/one{ext}, line ")
    assert problem.message.endswith("undefined variable 'reasno'")
    assert problem.hint == "did you mean 'reason'?"


def test_everything_dispatch_puts_in_the_context_renders(folder: Path, templates: Path) -> None:
    every_key = (
        "{{ contact.name }} {{ contact.first_name }} {{ contact.email }} {{ contact.phone }} "
        "{{ contact.company }} {{ contact.title }} {{ contact.address }} {{ contact.timezone }} "
        "{{ contact.country }} {{ contact.id }} {{ contact.external_id }}\n"
        "{{ deal.title }} {{ deal.stage }} {{ deal.status }} {{ deal.amount | round | int }} "
        "{{ deal.currency }} {{ deal.owner }} {{ deal.probability }} {{ deal.id }} {{ deal.external_id }}\n"
        "{{ enrollment.id }} {{ enrollment.cadence }} {{ enrollment.status }} {{ enrollment.started_at }}\n"
        "{{ reason }} {{ sender.name }} {{ sender.company }} {{ sender.email }} {{ sender.phone }} "
        "{{ sender.address }}\n"
        "{{ touch.id }} {{ touch.step }} {{ touch.channel }} {{ touch.due_at }}\n"
    )
    add_template(templates, "call/everything.md", every_key)
    write(folder, "a", cadence("a", step(0, channel="call", template="call/everything")))
    assert lint([folder], templates) == []


def test_a_template_that_fails_for_another_reason_is_an_error_with_that_reason(
    folder: Path, templates: Path
) -> None:
    add_template(templates, "call/bad.md", "{{ deal.amount / 0 }}\n")
    text = cadence("a", step(0, channel="call", template="call/bad"))
    write(folder, "a", text)
    [problem] = lint([folder], templates)
    assert (problem.line, problem.column) == value_at(text, "template: call/bad")
    assert problem.severity == "error"
    assert problem.message == "template call/bad.md: ZeroDivisionError: float division by zero"


@pytest.mark.parametrize(
    "change",
    [
        '{{ contact.update({"name": "Mallory"}) }}',
        '{{ contact.pop("name") }}',
        '{{ sender.setdefault("name", "Mallory") }}',
        '{{ contact.__setitem__("name", "Mallory") }}',
    ],
)
def test_a_template_cannot_change_what_the_templates_after_it_see(
    folder: Path, templates: Path, change: str
) -> None:
    # Every template's sample context shares the same contact and sender: the sandbox must refuse changes.
    add_template(templates, "call/change.md", change + "\n")
    same = 'contact.name == "Anna Petrova" and sender.name == "Olga Ivanova"'
    add_template(templates, "call/check.md", f"{{% if not ({same}) %}}{{{{ changed }}}}{{% endif %}}\n")
    text = cadence(
        "a",
        step(0, channel="call", template="call/change"),
        step(4, channel="call", template="call/check"),
        step(8, channel="call", template="call/change"),
        step(12, channel="call", template="call/check"),
    )
    write(folder, "a", text)
    problems = lint([folder], templates)
    assert [(p.line, p.column) for p in problems] == [
        value_at(text, "template: call/change", 1),
        value_at(text, "template: call/change", 2),
    ]
    assert all("template call/change.md" in p.message for p in problems)
    assert all("unsafe" in p.message or "refused" in p.message for p in problems)


def test_each_template_sees_its_own_cadence_channel_and_reason(folder: Path, templates: Path) -> None:
    for channel, ext in (("call", ".md"), ("letter", ".html")):
        for name in ("a", "b"):
            own = (
                f'{{% if enrollment.cadence != "{name}" or touch.channel != "{channel}" '
                f'or reason != "{name} by {channel}." %}}{{{{ not_its_own }}}}{{% endif %}}\n'
            )
            add_template(templates, f"{channel}/{name}{ext}", own)
    for name in ("a", "b"):
        steps = [
            step(4 * n, channel=channel, template=f"{channel}/{name}", reason=f"{name} by {channel}.")
            for n, channel in enumerate(("call", "letter"))
        ]
        write(folder, name, cadence(name, *steps, head=WINDOW))
    assert [p for p in lint([folder], templates) if p.severity == "error"] == []


# --- warnings: the decision window ----------------------------------------------------------------------

DECISION = "kind: decision\n"


def test_a_decision_cadence_with_six_touches_is_warned_at_its_kind(folder: Path, templates: Path) -> None:
    text = cadence("a", *weekly(6), head=DECISION)
    write(folder, "a", text)
    [problem] = lint([folder], templates)
    assert (problem.line, problem.column, problem.severity) == (*value_at(text, "kind: decision"), "warning")
    assert problem.message.startswith("6 touch(es) within 30 days of the first touch")
    assert problem.hint is not None
    assert "about 7 touches" in problem.hint
    assert "21-30 days" in problem.hint


def test_seven_touches_in_a_decision_cadence_pass(folder: Path, templates: Path) -> None:
    write(folder, "a", cadence("a", *weekly(7), head=DECISION))
    assert lint([folder], templates) == []


@pytest.mark.parametrize(("last", "warned"), [(30, False), (31, True)])
def test_the_decision_window_is_30_calendar_days_after_the_first_touch(
    folder: Path, templates: Path, last: int, warned: bool
) -> None:
    # Six touches on days 0-20 and a seventh on `last`: day 30 is inside the window, day 31 is not.
    write(folder, "a", cadence("a", *weekly(6), step(last), head=DECISION))
    problems = lint([folder], templates)
    assert bool(problems) is warned
    if warned:
        assert problems[0].message.startswith("6 touch(es) within 30 days")


@pytest.mark.parametrize(("last", "warned"), [(22, False), (23, True)])
def test_business_days_are_counted_as_the_calendar_dates_they_land_on(
    folder: Path, templates: Path, last: int, warned: bool
) -> None:
    # From a Monday, business day 20 is four weeks on (calendar day 28), business day 22 is that
    # Wednesday (calendar day 30) and business day 23 the Thursday (calendar day 31).
    steps = [step(day) for day in (0, 4, 8, 12, 16, 20, last)]
    write(folder, "a", cadence("a", *steps, head=DECISION + "calendar:\n  business_days: true\n"))
    assert bool(lint([folder], templates)) is warned


def test_touches_with_a_when_may_be_skipped_so_they_do_not_make_up_the_seven(
    folder: Path, templates: Path
) -> None:
    steps = [*weekly(6), step(24, when="contact.age >= 50"), step(28, when="contact.age >= 50")]
    write(folder, "a", cadence("a", *steps, head=DECISION))
    [problem] = lint([folder], templates)
    assert problem.severity == "warning"
    assert problem.message.startswith(
        "only 6 of the 8 touches within 30 days of the first touch reach every contact: "
        "the other 2 have a `when` or `skip_when` and may be skipped"
    )


def test_too_few_touches_some_conditional_says_how_many_may_be_skipped(folder: Path, templates: Path) -> None:
    write(folder, "a", cadence("a", *weekly(5), step(20, when="contact.age >= 50"), head=DECISION))
    [problem] = lint([folder], templates)
    assert problem.message.startswith(
        "6 touch(es) within 30 days of the first touch (1 of them may be skipped by `when` or `skip_when`)"
    )


def test_a_touch_with_skip_when_may_be_skipped_too(folder: Path, templates: Path) -> None:
    steps = [*weekly(6), step(24, skip_when='deal.stage == "negotiation"')]
    write(folder, "a", cadence("a", *steps, head=DECISION))
    [problem] = lint([folder], templates)
    assert problem.message.startswith("only 6 of the 7 touches within 30 days of the first touch")


@pytest.mark.parametrize("head", ["", "kind: onboarding\n", "kind: nurture\n"])
def test_only_decision_cadences_need_seven_touches(folder: Path, templates: Path, head: str) -> None:
    write(folder, "a", cadence("a", step(0), step(7), head=head))
    assert lint([folder], templates) == []


# --- warnings: reasons ----------------------------------------------------------------------------------


def test_a_repeated_reason_is_warned_at_the_second_step_whatever_its_case_and_spacing(
    folder: Path, templates: Path
) -> None:
    text = cadence(
        "a",
        step(0, reason="A new case study."),
        step(4, reason="Price list."),
        step(8, reason='"  a NEW   case Study. "'),
    )
    write(folder, "a", text)
    [problem] = lint([folder], templates)
    assert (problem.line, problem.column, problem.severity) == (
        *value_at(text, 'reason: "  a NEW'),
        "warning",
    )
    assert problem.message == "steps.2.reason repeats steps.0.reason"
    assert problem.hint is not None
    assert "something new" in problem.hint


def test_the_same_reason_in_two_cadences_is_not_a_repeat(folder: Path, templates: Path) -> None:
    write(folder, "a", cadence("a", step(0, reason="A new case study.")))
    write(folder, "b", cadence("b", step(0, reason="A new case study.")))
    assert lint([folder], templates) == []


# --- warnings: the nurture's months ---------------------------------------------------------------------

NURTURE = "kind: nurture\n"


def test_a_nurture_gap_over_31_days_is_warned_at_the_late_step(folder: Path, templates: Path) -> None:
    text = cadence("a", step(0), step(30), step(62), head=NURTURE)
    write(folder, "a", text)
    [problem] = lint([folder], templates)
    assert (problem.line, problem.column, problem.severity) == (*value_at(text, "day: 62"), "warning")
    assert problem.message.startswith("steps.2 comes 32 days after steps.1")
    assert problem.hint is not None
    assert "10% of the value of the base" in problem.hint


def test_a_nurture_touching_every_31_days_passes(folder: Path, templates: Path) -> None:
    write(folder, "a", cadence("a", step(0), step(31), step(62), head=NURTURE))
    assert lint([folder], templates) == []


def test_a_nurture_gap_left_by_a_skipped_step_is_warned(folder: Path, templates: Path) -> None:
    text = cadence("a", step(0), step(20, when="contact.age >= 50"), step(40), head=NURTURE)
    write(folder, "a", text)
    [problem] = lint([folder], templates)
    assert (problem.line, problem.column) == value_at(text, "day: 40")
    assert problem.message.startswith("steps.2 comes 40 days after steps.0 when steps.1 is skipped")


def test_a_long_gap_outside_a_nurture_is_not_warned(folder: Path, templates: Path) -> None:
    write(folder, "a", cadence("a", step(0), step(90), head="kind: follow-up\n"))
    assert lint([folder], templates) == []


# --- warnings: quiet hours ------------------------------------------------------------------------------


def test_an_sms_step_in_a_window_wider_than_its_quiet_hours_is_warned_at_its_channel(
    folder: Path, templates: Path
) -> None:
    # The default policy lets sms reach a contact 09:00-20:00 only; email has no quiet hours.
    text = cadence("a", step(0), step(4, channel="sms"), head='calendar:\n  window: "08:00-21:00"\n')
    write(folder, "a", text)
    [problem] = lint([folder], templates)
    assert (problem.line, problem.column, problem.severity) == (*value_at(text, "channel: sms"), "warning")
    assert problem.message.startswith("sms planned inside quiet hours")
    assert "08:00-21:00" in problem.message
    assert problem.hint is not None
    assert "09:00-20:00" in problem.hint


@pytest.mark.parametrize(("head", "warned"), [("", True), ('calendar:\n  window: "09:00-20:00"\n', False)])
def test_a_cadence_without_a_window_sends_at_any_hour(
    folder: Path, templates: Path, head: str, warned: bool
) -> None:
    write(folder, "a", cadence("a", step(0, channel="sms"), head=head))
    assert bool(lint([folder], templates)) is warned


def test_a_step_window_wider_than_the_quiet_hours_is_warned(folder: Path, templates: Path) -> None:
    text = cadence("a", step(0, channel="sms", window='"08:00-12:00"'), head=WINDOW)
    write(folder, "a", text)
    [problem] = lint([folder], templates)
    assert (problem.line, problem.column) == value_at(text, "channel: sms")
    assert "the step's window is 08:00-12:00" in problem.message


def test_a_step_window_inside_the_quiet_hours_needs_no_cadence_window(folder: Path, templates: Path) -> None:
    write(folder, "a", cadence("a", step(0, channel="sms", window='"10:00-12:00"')))
    assert lint([folder], templates) == []


@pytest.mark.parametrize(("at", "warned"), [('"10:00"', False), ('"08:30"', True)])
def test_a_fixed_time_inside_the_quiet_hours_is_not_warned(
    folder: Path, templates: Path, at: str, warned: bool
) -> None:
    text = cadence("a", step(0, channel="sms", at=at), head='calendar:\n  window: "08:00-21:00"\n')
    write(folder, "a", text)
    assert bool(lint([folder], templates)) is warned


def test_quiet_hours_come_from_the_policy_file(folder: Path, templates: Path) -> None:
    (folder / "policy.yaml").write_text('quiet_hours:\n  call: "10:00-17:00"\n', encoding="utf-8")
    text = cadence(
        "a", step(0, channel="sms"), step(4, channel="call"), head='calendar:\n  window: "09:00-18:00"\n'
    )
    write(folder, "a", text)
    # This policy names only calls, so SMS has no quiet hours here.
    [problem] = lint([folder], templates)
    assert (problem.line, problem.column) == value_at(text, "channel: call")
    assert problem.message.startswith("call planned inside quiet hours")


# --- all together ---------------------------------------------------------------------------------------


def test_problems_are_sorted_by_file_line_and_column(folder: Path, templates: Path) -> None:
    add_template(templates, "call/typo.md", "{{ deal.titel }}\n")
    b = cadence("b", step(0, reason="Same."), step(4, reason="Same."), head=DECISION + "then:\n  lost: a\n")
    write(folder, "b", b)
    write(folder, "a", cadence("a", step(0, channel="call", template="call/typo"), head="then:\n  won: b\n"))
    problems = lint([folder], templates)
    # a: `  won: b` on line 3, `    template: call/typo` on line 7. b: `kind: decision` on line 2, `  lost: a`
    # on line 4, then steps from line 6, four lines each: the second reason is on line 13.
    assert at(problems) == [
        ("a.yaml", 3, 8, "error"),
        ("a.yaml", 7, 15, "error"),
        ("b.yaml", 2, 7, "warning"),
        ("b.yaml", 4, 9, "error"),
        ("b.yaml", 13, 13, "warning"),
    ]


def test_what_the_loader_refuses_comes_back_as_errors(folder: Path, templates: Path) -> None:
    write(folder, "a", cadence("a", step(0)).replace("channel: email", "channel: emial"))
    [problem] = lint([folder], templates)
    # `    channel: emial` is line 4; the value starts at column 14.
    assert (problem.line, problem.column, problem.severity) == (4, 14, "error")
    assert problem.hint == "did you mean 'email'?"


def test_the_shipped_rules_have_no_problems() -> None:
    assert lint([RULES], TEMPLATES) == []


# --- the command ----------------------------------------------------------------------------------------


def invoke(*args: object) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def warned(folder: Path, templates: Path) -> Path:
    """Rules that load and render, with one warning: a repeated reason."""
    write(folder, "a", cadence("a", step(0, reason="Same."), step(4, reason="Same.")))
    return folder


def test_warnings_alone_exit_0_and_are_printed_and_counted(warned: Path, templates: Path) -> None:
    result = invoke("lint", warned, "--templates", templates)
    assert result.exit_code == 0, result.output
    assert f"{warned / 'a.yaml'}:" in result.stdout
    assert ": warning: steps.1.reason repeats steps.0.reason (hint: " in result.stdout
    assert result.stdout.splitlines()[-1] == "ok: 1 cadence(s): a; 1 warning(s)"


def test_strict_turns_warnings_into_exit_1(warned: Path, templates: Path) -> None:
    result = invoke("lint", warned, "--templates", templates, "--strict")
    assert result.exit_code == 1
    assert ": warning: " in result.stdout
    assert "0 error(s), 1 warning(s)" in result.stderr


def test_an_error_exits_1_with_or_without_strict(folder: Path, templates: Path) -> None:
    write(folder, "a", cadence("a", step(0), head="then:\n  lost: a\n"))
    for flags in ((), ("--strict",)):
        result = invoke("lint", folder, "--templates", templates, *flags)
        assert result.exit_code == 1
        assert f"{folder / 'a.yaml'}:3:9: error: then.lost closes a cycle" in result.stdout


def test_json_parses_and_carries_each_problems_severity(folder: Path, templates: Path) -> None:
    write(folder, "a", cadence("a", step(0), head="then:\n  lost: a\n"))
    write(folder, "b", cadence("b", step(0, reason="Same."), step(4, reason="Same.")))
    result = invoke("lint", folder, "--templates", templates, "--format", "json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert report["cadences"] == ["a", "b"]
    assert [(Path(p["file"]).name, p["line"], p["severity"]) for p in report["problems"]] == [
        ("a.yaml", 3, "error"),
        ("b.yaml", 10, "warning"),  # steps from line 3, four lines each: the second reason is on line 10
    ]
    assert all(
        set(p) == {"file", "line", "column", "severity", "message", "hint"} for p in report["problems"]
    )


def test_json_ok_follows_strict(warned: Path, templates: Path) -> None:
    for flags, ok, code in (((), True, 0), (("--strict",), False, 1)):
        result = invoke("lint", warned, "--templates", templates, "--format", "json", *flags)
        assert result.exit_code == code
        report = json.loads(result.stdout)
        assert report["ok"] is ok
        assert [p["severity"] for p in report["problems"]] == ["warning"]


def test_the_shipped_rules_pass_strict() -> None:
    result = invoke("lint", RULES, "--templates", TEMPLATES, "--strict")
    assert result.exit_code == 0, result.output
    cadences = sorted(
        path.stem for path in RULES.glob("*.yaml") if path.name not in ("policy.yaml", "crm.yaml")
    )
    assert "open-deal" in cadences
    assert result.stdout == f"ok: {len(cadences)} cadence(s): {', '.join(cadences)}; 0 warning(s)\n"


def test_a_missing_path_exits_2(tmp_path: Path) -> None:
    result = invoke("lint", tmp_path / "nowhere.yaml", "--templates", TEMPLATES)
    assert result.exit_code == 2
    assert "nowhere.yaml" in result.output


def test_an_unknown_format_is_refused(warned: Path, templates: Path) -> None:
    result = invoke("lint", warned, "--templates", templates, "--format", "xml")
    assert result.exit_code == 2
    assert "xml" in result.output


# --- the fuller language: repeats, choices, variants, step transitions -----------------------------------

REPEAT = """\
repeat:
  every: {every}
  content:
    - channel: email
      template: email/fine
      reason: Useful note one.
    - channel: email
      template: email/fine
      reason: Useful note two.
"""


def test_a_nurture_repeating_less_than_monthly_is_warned_once_at_its_every(
    folder: Path, templates: Path
) -> None:
    text = cadence("n", step(0), head="kind: nurture\n") + REPEAT.format(every="6 weeks")
    write(folder, "n", text)
    problems = lint([folder], templates)
    assert at(problems) == [("n.yaml", *value_at(text, "every: 6 weeks"), "warning")]
    assert "comes 42 days after" in problems[0].message and "31 days" in problems[0].message


def test_a_weekly_nurture_repeat_passes(folder: Path, templates: Path) -> None:
    write(folder, "n", cadence("n", step(0), head="kind: nurture\n") + REPEAT.format(every="1 week"))
    assert lint([folder], templates) == []


def test_a_repeated_reason_inside_a_repeat_is_warned_at_the_content_item(
    folder: Path, templates: Path
) -> None:
    text = cadence("n", step(0)) + REPEAT.format(every="1 week").replace(
        "Useful note two.", "Useful note one."
    )
    write(folder, "n", text)
    problems = lint([folder], templates)
    assert at(problems) == [("n.yaml", *value_at(text, "reason: Useful note one.", 2), "warning")]
    assert problems[0].message == "repeat.content.1.reason repeats repeat.content.0.reason"


def test_a_step_transition_closing_a_cycle_is_an_error_at_its_then(folder: Path, templates: Path) -> None:
    a_text = cadence("a", step(0, "call", on_outcome="{meeting_booked: {then: b}}"))
    write(folder, "a", a_text)
    write(folder, "b", cadence("b", step(0), head="then:\n  won: a\n"))
    problems = [p for p in lint([folder], templates) if p.file.endswith("a.yaml")]
    assert [p.message for p in problems] == [
        "steps.0.on_outcome.meeting_booked.then closes a cycle: "
        "a (steps.0.on_outcome.meeting_booked.then) → b (then.won) → a"
    ]


def test_every_choice_and_variant_template_is_rendered(folder: Path, templates: Path) -> None:
    add_template(templates, "letter/brief.html", "<p>{{ contact.adress }}</p>")
    add_template(templates, "email/b.txt", "Subject: B\n\n{{ deal.titel }}")
    add_template(templates, "email/b.html", "<p>B</p>")
    text = cadence(
        "c",
        "  - day: 0\n    choose:\n      - {channel: letter, template: letter/brief, when: contact.age > 50}\n"
        "      - {channel: email, template: email/fine}\n    reason: Brief.\n",
        "  - day: 1\n    channel: email\n    template: email/fine\n    reason: Opening.\n"
        "    variants:\n      - {name: a}\n      - {name: b, template: email/b}\n",
    )
    write(folder, "c", text)
    problems = lint([folder], templates)
    assert [(p.line, p.message.split(":")[0]) for p in problems] == [
        (5, "template letter/brief.html, line 1"),
        (14, "template email/b.txt, line 3"),
    ]
    assert "contact.adress" in problems[0].message and "deal.titel" in problems[1].message
