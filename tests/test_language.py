"""The cadence language: what a marketer writes, and the errors (file:line:col, hint) they get back."""

from __future__ import annotations

from datetime import time

import pytest

from cadence.errors import Problem, RulesError
from cadence.language import parse

VALID = """\
cadence: open-deal
description: Proposal sent.
enroll:
  on: deal.stage_changed
  when: deal.stage == "proposal_sent" and deal.amount >= 1000
exit:
  on_outcome: [replied, unsubscribed]
  when: deal.status != "open"
then:
  lost: lost-prospect-nurture
  won: onboarding
calendar:
  business_days: true
  window: "09:00-18:00"
  timezone: Europe/Moscow
  country: RU
steps:
  - day: 0
    channel: email
    template: email/proposal-recap
    reason: Recap of the proposal.
  - day: 2
    channel: call
    template: call/walkthrough
    reason: Book a walkthrough.
  - day: 6
    channel: letter
    template: letter/case-study
    reason: Printed case study.
    when: contact.age >= 50
"""


def position(text: str, needle: str, occurrence: int = 1) -> tuple[int, int]:
    """1-based line and column of the n-th occurrence of `needle` in `text`."""
    index = -1
    for _ in range(occurrence):
        index = text.index(needle, index + 1)
    line = text.count("\n", 0, index) + 1
    column = index - (text.rfind("\n", 0, index) + 1) + 1
    return line, column


def problems_of(text: str, file: str = "rules/x.yaml") -> list[Problem]:
    with pytest.raises(RulesError) as caught:
        parse(text, file)
    assert caught.value.problems, "a RulesError must carry at least one problem"
    return caught.value.problems


def only_problem(text: str) -> Problem:
    problems = problems_of(text)
    assert len(problems) == 1, [str(p) for p in problems]
    return problems[0]


def at(problem: Problem) -> tuple[int, int]:
    return problem.line, problem.column


# --- valid files --------------------------------------------------------------------------------------


def test_valid_file_parses_into_the_model() -> None:
    parsed = parse(VALID, "rules/open-deal.yaml")
    spec = parsed.spec
    assert spec.cadence == "open-deal"
    assert spec.enroll is not None
    assert spec.enroll.on == ("deal.stage_changed",)
    assert spec.exit.on_outcome == ("replied", "unsubscribed")
    assert spec.then.targets() == {"won": "onboarding", "lost": "lost-prospect-nurture"}
    assert spec.calendar.business_days is True
    assert spec.calendar.window == (time(9, 0), time(18, 0))
    assert spec.calendar.timezone == "Europe/Moscow"
    assert spec.calendar.country == "RU"
    assert [(s.day, s.channel, s.template) for s in spec.steps] == [
        (0, "email", "email/proposal-recap"),
        (2, "call", "call/walkthrough"),
        (6, "letter", "letter/case-study"),
    ]
    assert spec.steps[2].when == "contact.age >= 50"
    assert parsed.file == "rules/open-deal.yaml"


def test_parsed_file_points_back_into_the_source() -> None:
    parsed = parse(VALID, "rules/open-deal.yaml")
    assert parsed.where(("steps", 1, "template")) == position(VALID, "call/walkthrough")
    assert parsed.where(("then", "won")) == position(VALID, "onboarding")


def test_unquoted_on_key_is_read_as_on_not_true() -> None:
    # YAML 1.1 reads a bare `on` as the boolean True; the language must keep the key's text.
    assert "\n  on: deal.stage_changed" in VALID
    spec = parse(VALID, "x.yaml").spec
    assert spec.enroll is not None
    assert spec.enroll.on == ("deal.stage_changed",)


def test_quoted_on_key_works_the_same() -> None:
    text = VALID.replace("  on: deal.stage_changed", '  "on": [deal.won, deal.lost]')
    spec = parse(text, "x.yaml").spec
    assert spec.enroll is not None
    assert spec.enroll.on == ("deal.won", "deal.lost")


# --- YAML itself ----------------------------------------------------------------------------------------


def test_yaml_syntax_error_reports_line_and_column() -> None:
    text = "cadence: t\nsteps:\n  - day: 0\n   channel: email\n"
    problem = only_problem(text)
    # `channel` is indented less than `day` (its mapping) but more than the `-`: the parser stops at it.
    assert at(problem) == position(text, "channel") == (4, 4)
    assert "YAML syntax" in problem.message
    assert str(problem).startswith("rules/x.yaml:4:4: error: YAML syntax")


def test_unclosed_flow_sequence_is_a_syntax_error_not_a_crash() -> None:
    text = "cadence: t\nexit:\n  on_outcome: [replied, bounced\nsteps: []\n"
    problem = only_problem(text)
    assert "YAML syntax" in problem.message
    # The open `[` swallows the next line; `bounced steps` spans two lines, so it cannot be a key and the
    # parser stops at the colon after `steps`.
    assert at(problem) == position(text, ": []") == (4, 6)


def test_duplicate_key_is_reported_at_the_second_key() -> None:
    text = VALID.replace("reason: Book a walkthrough.\n", "reason: Book a walkthrough.\n    reason: Again.\n")
    problem = only_problem(text)
    assert "duplicate key 'reason'" in problem.message
    assert at(problem) == position(text, "reason: Again.")


def test_duplicate_top_level_key() -> None:
    text = VALID + "cadence: other\n"
    problem = only_problem(text)
    assert "duplicate key 'cadence'" in problem.message
    assert at(problem) == position(text, "cadence:", occurrence=2)


def test_empty_file_and_non_mapping_are_errors() -> None:
    for text in ("", "- just\n- a list\n", "plain words\n"):
        problem = only_problem(text)
        assert "mapping" in problem.message
        assert at(problem) == (1, 1)


# --- unknown keys ---------------------------------------------------------------------------------------


def test_unknown_step_key_has_did_you_mean_hint_at_the_key() -> None:
    text = VALID.replace("    template: call/walkthrough", "    templat: call/walkthrough")
    problems = problems_of(text)
    unknown = [p for p in problems if "unknown key 'templat'" in p.message]
    assert len(unknown) == 1
    assert at(unknown[0]) == position(text, "templat:")
    assert unknown[0].hint == "did you mean 'template'?"


def test_unknown_top_level_key_has_did_you_mean_hint() -> None:
    text = VALID.replace("calendar:\n", "calender:\n")
    problem = only_problem(text)
    assert "unknown key 'calender'" in problem.message
    assert problem.hint == "did you mean 'calendar'?"
    assert at(problem) == position(text, "calender:")


def test_unknown_key_in_a_section_suggests_that_sections_keys() -> None:
    text = VALID.replace("  business_days: true", "  busines_days: true")
    problem = only_problem(text)
    assert problem.hint == "did you mean 'business_days'?"
    assert at(problem) == position(text, "busines_days")


def test_unknown_key_with_nothing_close_lists_the_valid_keys() -> None:
    text = VALID.replace("reason: Printed case study.\n", "reason: Printed case study.\n    xyzzy: 1\n")
    problem = only_problem(text)
    assert "unknown key 'xyzzy'" in problem.message
    assert problem.hint is not None
    for key in ("day", "channel", "template", "reason", "when"):
        assert key in problem.hint


# --- reasons --------------------------------------------------------------------------------------------


def test_missing_reason_names_the_step() -> None:
    text = VALID.replace("    reason: Book a walkthrough.\n", "")
    problem = only_problem(text)
    assert "steps.1.reason" in problem.message
    assert problem.hint is not None and "reason" in problem.hint
    # Reported at the step that lacks it (its first key), not at the top of the file.
    assert problem.line == position(text, "- day: 2")[0]


@pytest.mark.parametrize("value", ['""', "'   '"])
def test_empty_reason_names_the_step(value: str) -> None:
    text = VALID.replace("reason: Book a walkthrough.", f"reason: {value}")
    problem = only_problem(text)
    assert "steps.1.reason" in problem.message
    assert "reason" in problem.message.removeprefix("steps.1.reason")
    line, column = position(text, f"reason: {value}")
    assert at(problem) == (line, column + len("reason: "))


def test_null_reason_is_an_error_naming_the_step() -> None:
    text = VALID.replace("reason: Book a walkthrough.", "reason:")
    problem = only_problem(text)
    assert "steps.1.reason" in problem.message


# --- values ---------------------------------------------------------------------------------------------


def test_bad_channel_has_did_you_mean_hint() -> None:
    text = VALID.replace("channel: call", "channel: cal")
    problem = only_problem(text)
    assert problem.message.startswith("steps.1.channel")
    assert problem.hint == "did you mean 'call'?"
    assert at(problem) == position(text, "cal\n")


@pytest.mark.parametrize(
    ("window", "words"),
    [
        ("18:00-09:00", "ends before it starts"),
        ("9-18", "HH:MM-HH:MM"),
        ("25:00-26:00", "impossible"),
        ("09:00-18:61", "impossible"),
    ],
)
def test_bad_window(window: str, words: str) -> None:
    text = VALID.replace('window: "09:00-18:00"', f'window: "{window}"')
    problem = only_problem(text)
    assert problem.message.startswith("calendar.window")
    assert words in problem.message
    assert at(problem) == position(text, f'"{window}"')


def test_bad_timezone() -> None:
    text = VALID.replace("timezone: Europe/Moscow", "timezone: Europe/Moskva")
    problem = only_problem(text)
    assert problem.message.startswith("calendar.timezone")
    assert "Europe/Moskva" in problem.message
    assert at(problem) == position(text, "Europe/Moskva")


def test_bad_country() -> None:
    text = VALID.replace("country: RU", "country: XX")
    problem = only_problem(text)
    assert problem.message.startswith("calendar.country")
    assert "'XX'" in problem.message
    assert at(problem) == position(text, "XX")


def test_lowercase_country_is_accepted_and_normalised() -> None:
    spec = parse(VALID.replace("country: RU", "country: de"), "x.yaml").spec
    assert spec.calendar.country == "DE"


def test_country_norway_written_unquoted_is_accepted() -> None:
    # Norway's ISO code is NO, which YAML 1.1 reads as the boolean False, as it reads a bare `on` key as True.
    # The language keeps keys' text for `on:`; a marketer writing `country: NO` means Norway too.
    spec = parse(VALID.replace("country: RU", "country: NO"), "x.yaml").spec
    assert spec.calendar.country == "NO"


def test_bad_cadence_name() -> None:
    text = VALID.replace("cadence: open-deal", "cadence: Open Deal")
    problem = only_problem(text)
    assert problem.message.startswith("cadence")
    assert at(problem) == position(text, "Open Deal")


# --- expressions ----------------------------------------------------------------------------------------


def test_step_expression_syntax_error_at_the_expression() -> None:
    text = VALID.replace("when: contact.age >= 50", "when: contact.age >= ")
    problem = only_problem(text)
    assert problem.message.startswith("steps.2.when")
    assert "invalid expression" in problem.message
    assert at(problem) == position(text, "contact.age >= ")


def test_enroll_expression_syntax_error_at_the_expression() -> None:
    text = VALID.replace('deal.stage == "proposal_sent" and', 'deal.stage === "proposal_sent" and')
    problem = only_problem(text)
    assert problem.message.startswith("enroll.when")
    assert at(problem) == position(text, "deal.stage ===")


def test_exit_expression_syntax_error_at_the_expression() -> None:
    text = VALID.replace('when: deal.status != "open"', "when: deal.status in (")
    problem = only_problem(text)
    assert problem.message.startswith("exit.when")
    assert at(problem) == position(text, "deal.status in (")


# --- step order and template folders --------------------------------------------------------------------


def test_steps_going_back_in_time() -> None:
    text = VALID.replace("  - day: 6", "  - day: 1")
    problem = only_problem(text)
    assert "steps.2.day goes back in time" in problem.message
    assert at(problem) == position(text, "1\n    channel: letter")


def test_steps_on_the_same_day_are_allowed() -> None:
    spec = parse(VALID.replace("  - day: 6", "  - day: 2"), "x.yaml").spec
    assert [s.day for s in spec.steps] == [0, 2, 2]


def test_template_outside_its_channel_folder() -> None:
    text = VALID.replace("template: call/walkthrough", "template: email/walkthrough")
    problem = only_problem(text)
    assert "steps.1.template is outside its channel's folder" in problem.message
    assert problem.hint == "write call/<name>"
    assert at(problem) == position(text, "email/walkthrough")


def test_template_escaping_its_channel_folder_with_dotdot() -> None:
    # `call/../email/x` starts with `call/` but names a file in email/: still outside the channel's folder.
    text = VALID.replace("template: call/walkthrough", "template: call/../email/proposal-recap")
    problem = only_problem(text)
    assert "steps.1.template" in problem.message
    assert at(problem) == position(text, "call/../email/proposal-recap")


# --- several problems -----------------------------------------------------------------------------------


def test_several_errors_reported_at_once_sorted_by_line() -> None:
    # steps come before calendar in this file, while the model lists calendar first: the report follows
    # the file.
    text = """\
cadence: t
steps:
  - day: 0
    channel: fax
    template: email/x
    reason: ""
  - day: 1
    chanel: email
    template: email/y
    reason: ok
calendar:
  window: "18:00-09:00"
  country: XX
"""
    problems = problems_of(text)
    lines = [p.line for p in problems]
    assert lines == sorted(lines)
    assert [at(p) for p in problems] == [
        position(text, "fax"),
        position(text, '""'),
        position(text, "chanel"),  # the misspelt key, with its hint; the lacking channel follows from it
        position(text, '"18:00-09:00"'),
        position(text, "XX"),
    ]
    assert all(p.file == "rules/x.yaml" for p in problems)
