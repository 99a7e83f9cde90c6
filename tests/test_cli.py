"""The `cadence` command line: lint and simulate, as a marketer runs them."""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from cadence.cli import app

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "rules"
TEMPLATES = ROOT / "templates"
OPEN_DEAL = RULES / "open-deal.yaml"


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CliRunner:
    # Settings() reads the environment and a .env in the working folder: keep both out of the way.
    for name in ("RULES_DIR", "TEMPLATES_DIR", "DEFAULT_TIMEZONE", "DATABASE_URL", "REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    workdir = tmp_path / "workdir"  # not above the rule files, so lint prints their paths as given
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    return CliRunner()


def invoke(runner: CliRunner, *args: str) -> Result:
    return runner.invoke(app, [str(a) for a in args])


def simulate_json(runner: CliRunner, *args: str) -> list[dict[str, Any]]:
    result = invoke(runner, "simulate", str(OPEN_DEAL), *args, "--format", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert isinstance(rows, list)
    return rows


def touches(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["kind"] == "touch"]


#: A contact every channel reaches.
REACHABLE = {
    "email": "anna@example.com",
    "phone": "+79161234567",
    "sms_consent": True,
    "address": "Tverskaya 1, Moscow",
}


def contact(**fields: Any) -> str:
    return json.dumps({**REACHABLE, **fields})


BROKEN = """\
cadence: broken
steps:
  - day: 0
    channel: emial
    template: email/deal-01-proposal-recap
    reason: Recap.
"""


@pytest.fixture
def broken(tmp_path: Path) -> Path:
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN, encoding="utf-8")
    return path


# --- help -----------------------------------------------------------------------------------------------


def test_help_lists_the_commands(runner: CliRunner) -> None:
    result = invoke(runner, "--help")
    assert result.exit_code == 0
    for command in ("serve", "worker", "scheduler", "migrate", "lint", "simulate", "schema"):
        assert command in result.output


# --- lint -----------------------------------------------------------------------------------------------


def test_lint_on_the_shipped_rules_exits_0(runner: CliRunner) -> None:
    result = invoke(runner, "lint", RULES, "--templates", TEMPLATES)
    assert result.exit_code == 0, result.output
    for name in ("open-deal", "onboarding", "lost-prospect-nurture"):
        assert name in result.stdout


def test_lint_on_a_broken_file_exits_1_with_file_line_column(runner: CliRunner, broken: Path) -> None:
    result = invoke(runner, "lint", broken, "--templates", TEMPLATES)
    assert result.exit_code == 1
    # `channel: emial` is on line 4; its value starts at column 14.
    assert f"{broken}:4:14:" in result.stdout
    assert "did you mean 'email'?" in result.stdout


def test_lint_json_parses_and_carries_line_and_column(runner: CliRunner, broken: Path) -> None:
    result = invoke(runner, "lint", broken, "--templates", TEMPLATES, "--format", "json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False
    [problem] = report["problems"]
    assert (problem["file"], problem["line"], problem["column"]) == (str(broken), 4, 14)
    assert problem["severity"] == "error"
    assert problem["hint"] == "did you mean 'email'?"


def test_lint_json_on_the_shipped_rules(runner: CliRunner) -> None:
    result = invoke(runner, "lint", RULES, "--templates", TEMPLATES, "--format", "json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    # Every rules file but the policy is a cadence named after its file.
    cadences = sorted(p.stem for p in Path(RULES).glob("*.yaml") if p.name not in ("policy.yaml", "crm.yaml"))
    assert len(cadences) >= 3
    assert report == {"ok": True, "cadences": cadences, "problems": []}


def test_lint_checks_templates_in_the_given_folder(runner: CliRunner, tmp_path: Path) -> None:
    # The shipped rules are fine against their own templates, and not against an empty folder.
    empty = tmp_path / "no-templates"
    empty.mkdir()
    result = invoke(runner, "lint", RULES, "--templates", empty, "--format", "json")
    assert result.exit_code == 1
    problems = json.loads(result.stdout)["problems"]
    assert problems
    assert all("not found" in p["message"] and p["line"] > 1 and p["column"] > 1 for p in problems)


def test_lint_on_a_missing_path_is_an_error(runner: CliRunner, tmp_path: Path) -> None:
    result = invoke(runner, "lint", tmp_path / "nowhere.yaml", "--templates", TEMPLATES)
    assert result.exit_code != 0
    assert "nowhere.yaml" in result.output


def test_an_error_gives_a_long_path_whole_on_one_line_brackets_and_all(
    runner: CliRunner, tmp_path: Path
) -> None:
    """Not wrapped at the console's width, nor read as markup: the path can be copied or searched for."""
    missing = tmp_path / ("a-folder-with-a-long-name-" * 5) / "[draft] nowhere.yaml"
    result = invoke(runner, "lint", missing, "--templates", TEMPLATES)
    assert result.exit_code == 2
    assert result.output == f"no such file or folder: {missing}\n"


def test_a_process_refusing_rules_with_errors_names_their_folder_as_it_is(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    rules = tmp_path / ("rules-kept-in-a-folder-with-a-long-name-" * 3) / "[team] rules"
    rules.mkdir(parents=True)
    (rules / "broken.yaml").write_text("cadence: broken\nsteps: [\n", encoding="utf-8")
    monkeypatch.setenv("RULES_DIR", str(rules))
    monkeypatch.setenv("TEMPLATES_DIR", str(TEMPLATES))
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'cadence.db'}")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")  # never reached: the rules come first
    result = invoke(runner, "worker")
    assert result.exit_code == 2
    assert result.output.splitlines()[0] == f"The rules in {rules} have errors; nothing was started."
    assert "broken.yaml" in result.output


# --- simulate -------------------------------------------------------------------------------------------

# Start Monday 28 Dec 2026 (midnight, so day 0 opens at 09:00). Business days in RU: 29 Dec = 1,
# 30 Dec = 2, then 31 Dec and 1-8 Jan are days off and 9-10 Jan a weekend, so 11 Jan = 3 ... 15 Jan = 7,
# 18-22 Jan = 8-12, 25-29 Jan = 13-17, 1 Feb = 18, 2 Feb = 19. Steps: business days 0, 2, 5, 7, 9, 12, 15, 19.
EXPECTED_DATES = [
    date(2026, 12, 28),
    date(2026, 12, 30),
    date(2027, 1, 13),
    date(2027, 1, 15),
    date(2027, 1, 19),
    date(2027, 1, 22),
    date(2027, 1, 27),
    date(2027, 2, 2),
]


def test_simulate_skips_russian_new_year_and_emails_the_brief_to_a_young_contact(runner: CliRunner) -> None:
    rows = touches(simulate_json(runner, "--start", "2026-12-28", "--contact", contact(age=30)))
    assert [row["step"] for row in rows] == list(range(8))
    local = [datetime.fromisoformat(row["local"]) for row in rows]
    assert [t.date() for t in local] == EXPECTED_DATES
    assert all(not (date(2026, 12, 31) <= t.date() <= date(2027, 1, 8)) for t in local)
    assert {t.utcoffset() for t in local} == {timedelta(hours=3)}  # Moscow
    assert all((t.hour, t.minute) == (9, 0) for t in local)
    assert "letter" not in {row["channel"] for row in rows}
    [brief] = [row for row in rows if row["step"] == 3]
    assert (brief["channel"], brief["template"]) == ("email", "email/deal-04-executive-brief")
    assert all(row["status"] == "sent" for row in rows)
    assert all(row["reason"] for row in rows)


def test_simulate_sends_the_letter_to_a_senior_contact(runner: CliRunner) -> None:
    rows = touches(simulate_json(runner, "--start", "2026-12-28", "--contact", contact(age=60)))
    assert [datetime.fromisoformat(row["local"]).date() for row in rows] == EXPECTED_DATES
    assert all(row["status"] == "sent" for row in rows)
    assert [row["channel"] for row in rows].count("letter") == 1


def test_simulate_tz_changes_the_local_times_zone(runner: CliRunner) -> None:
    rows = touches(
        simulate_json(
            runner, "--start", "2026-12-28", "--contact", contact(age=30), "--tz", "America/New_York"
        )
    )
    local = [datetime.fromisoformat(row["local"]) for row in rows]
    # New York in winter is UTC-5; the start is midnight there, so day 0 opens at 09:00 New York time.
    assert {t.utcoffset() for t in local} == {timedelta(hours=-5)}
    assert all((t.hour, t.minute) == (9, 0) for t in local)
    # The contact has no country, so the cadence's RU holidays still apply.
    assert [t.date() for t in local] == EXPECTED_DATES
    due = [datetime.fromisoformat(row["at"]) for row in rows]
    assert [d.hour for d in due] == [14] * 8  # 09:00 EST is 14:00 UTC


def test_simulate_table_output_runs(runner: CliRunner) -> None:
    result = invoke(runner, "simulate", OPEN_DEAL, "--start", "2026-12-28")
    assert result.exit_code == 0, result.output
    assert "open-deal" in result.stdout
    assert "2027-01-13" in result.stdout


@pytest.mark.parametrize("start", ["2026-13-45", "next tuesday", "28.12.2026"])
def test_simulate_bad_start_is_a_clear_error(runner: CliRunner, start: str) -> None:
    result = invoke(runner, "simulate", OPEN_DEAL, "--start", start)
    assert result.exit_code != 0
    assert start in result.output
    assert "YYYY-MM-DD" in result.output
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, ValueError)


def test_simulate_bad_contact_json_is_a_clear_error(runner: CliRunner) -> None:
    result = invoke(runner, "simulate", OPEN_DEAL, "--start", "2026-12-28", "--contact", "{age: 30}")
    assert result.exit_code != 0
    assert "--contact" in result.output
    assert "JSON" in result.output


def test_simulate_broken_file_exits_1_with_position(runner: CliRunner, broken: Path) -> None:
    result = invoke(runner, "simulate", broken, "--start", "2026-12-28")
    assert result.exit_code == 1
    assert f"{broken}:4:14:" in result.output


# --- simulate: branches, blocks, caps, repeats -------------------------------------------------------------

NURTURE = RULES / "lost-prospect-nurture.yaml"


def test_simulate_retries_an_unanswered_call_after_a_scripted_no_answer(runner: CliRunner) -> None:
    events = simulate_json(
        runner, "--start", "2027-03-01", "--contact", contact(), "--outcome", "day 2: no_answer"
    )
    calls = [e for e in touches(events) if e["step"] == 1]
    assert [(e["iteration"], e["status"]) for e in calls] == [(0, "sent"), (1, "sent")]
    assert calls[1]["at"] > calls[0]["at"]
    [outcome] = [e for e in events if e["kind"] == "outcome"]
    assert (outcome["status"], outcome["step"]) == ("no_answer", 1)


def test_simulate_follows_a_meeting_into_the_post_meeting_series_within_the_daily_cap(
    runner: CliRunner,
) -> None:
    events = simulate_json(
        runner, "--start", "2027-03-01", "--contact", contact(), "--outcome", "day 7 12:00: meeting_booked"
    )
    ended = [e for e in events if e["kind"] == "ended"]
    assert ended[0]["cadence"] == "open-deal" and ended[0]["note"] == "outcome: meeting_booked"
    assert [e["cadence"] for e in events if e["kind"] == "enrolled"] == ["open-deal", "post-meeting"]
    first = next(e for e in touches(events) if e["cadence"] == "post-meeting")
    # Day 7 (Monday 8 March, a public holiday in RU, so open-deal's step went out on Tuesday 9 March) ...
    sent_days = [datetime.fromisoformat(e["local"]).date() for e in touches(events) if e["status"] == "sent"]
    assert len(sent_days) == len(set(sent_days)), "the policy allows one touch per contact per local day"
    assert first["status"] == "sent"


def test_simulate_skips_blocked_channels(runner: CliRunner) -> None:
    events = simulate_json(runner, "--start", "2027-03-01", "--contact", contact(), "--block", "call")
    calls = [e for e in touches(events) if e["channel"] == "call"]
    assert calls and all(e["status"] == "skipped" and "blocked" in e["note"] for e in calls)
    assert all(e["status"] == "sent" for e in touches(events) if e["channel"] != "call")


def test_simulate_skips_sms_without_consent(runner: CliRunner) -> None:
    events = simulate_json(runner, "--start", "2027-03-01", "--contact", contact(sms_consent=False))
    [sms] = [e for e in touches(events) if e["channel"] == "sms"]
    assert sms["status"] == "skipped" and "consent" in sms["note"]


def test_simulate_repeats_the_nurture_weekly_within_its_monthly_budget(runner: CliRunner) -> None:
    result = invoke(
        runner,
        "simulate",
        NURTURE,
        "--start",
        "2027-03-01",
        "--days",
        "365",
        "--contact",
        contact(age=60),
        "--deal",
        '{"status": "lost"}',
        "--format",
        "json",
    )
    assert result.exit_code == 0, result.output
    sent = [e for e in touches(json.loads(result.stdout)) if e["status"] == "sent"]
    assert len(sent) >= 45
    months: dict[tuple[int, int], int] = {}
    for e in sent:
        local = datetime.fromisoformat(e["local"])
        months[(local.year, local.month)] = months.get((local.year, local.month), 0) + 1
    assert max(months.values()) == 4  # the budget, reached in months with five Mondays
    assert any("budget" in d for e in sent for d in e["deferrals"])
    # The content rotates: the repeat's ten items come round again in order.
    templates = [e["template"] for e in sent]
    assert templates[1:10] == templates[10:19]


def test_simulate_ends_the_nurture_when_the_deal_is_won(runner: CliRunner) -> None:
    result = invoke(
        runner,
        "simulate",
        NURTURE,
        "--start",
        "2027-03-01",
        "--days",
        "120",
        "--contact",
        contact(),
        "--deal",
        '{"status": "lost"}',
        "--outcome",
        "day 30: won",
        "--format",
        "json",
    )
    assert result.exit_code == 0, result.output
    events = json.loads(result.stdout)
    ended = next(e for e in events if e["kind"] == "ended" and e["cadence"] == "lost-prospect-nurture")
    assert datetime.fromisoformat(ended["local"]).date() == date(2027, 3, 31)
    assert "onboarding" in {e["cadence"] for e in events if e["kind"] == "enrolled"}
    assert all(
        datetime.fromisoformat(e["local"]).date() <= date(2027, 3, 31)
        for e in touches(events)
        if e["cadence"] == "lost-prospect-nurture" and e["status"] == "sent"
    )


@pytest.mark.parametrize(
    ("option", "value", "said"),
    [
        ("--outcome", "3: no_answer", "day 3: no_answer"),
        ("--outcome", "day 3: maybe", "unknown outcome 'maybe'"),
        ("--outcome", "day 3 25:00: replied", "not a time of day"),
        ("--block", "fax", "block a channel"),
        ("--block", "call:soon", "whole number"),
    ],
)
def test_simulate_bad_outcome_or_block_is_a_clear_error(
    runner: CliRunner, option: str, value: str, said: str
) -> None:
    result = invoke(runner, "simulate", OPEN_DEAL, "--start", "2027-03-01", option, value)
    assert result.exit_code == 2
    assert said in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_simulate_table_shows_outcomes_and_transitions(runner: CliRunner) -> None:
    result = invoke(
        runner,
        "simulate",
        OPEN_DEAL,
        "--start",
        "2027-03-01",
        "--contact",
        contact(),
        "--outcome",
        "day 9: lost",
    )
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "lost-prospect-nurture" in text and "no_answer" not in text
    assert "lost" in text and "exited" in text
