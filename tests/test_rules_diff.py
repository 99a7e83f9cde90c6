"""`cadence rules diff`: what changed between two rule sets, and between the rules and the database."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from harness import REPO, deal_event, make_settings, start_harness
from typer.testing import CliRunner, Result

from cadence import diff
from cadence.cli import app
from cadence.language import CadenceSpec, Parsed
from cadence.rules import RuleSet, load

TEMPLATES = REPO / "templates"

NEW_CADENCE = """\
cadence: re-engage
description: A short series for deals that went quiet.
kind: follow-up
enroll:
  on: deal.created
steps:
  - day: 0
    channel: email
    template: email/deal-06-schedule-update
    reason: The updated schedule, in case timing was what stalled the deal.
  - day: 3
    channel: call
    template: call/deal-07-pilot-offer
    reason: Offer a small pilot to restart the conversation.
"""

LAST_STEP = """\
  - day: 19
    channel: email
    template: email/deal-08-price-hold
    reason: The prices in the proposal are held for 30 days from sending; the hold ends in a few days.
"""


def copy_rules(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    shutil.copytree(REPO / "rules", folder)
    return folder


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def load_folder(folder: Path) -> RuleSet:
    return load([folder], TEMPLATES)


def by_name(found: diff.RulesDiff) -> dict[str, diff.CadenceDiff]:
    return {c.name: c for c in found.cadences}


def texts(cadence: diff.CadenceDiff) -> list[str]:
    return [str(c) for c in cadence.changes]


@pytest.fixture
def old_and_new(tmp_path: Path) -> tuple[Path, Path]:
    """The shipped rules, and a copy with one cadence changed, one removed, one added and a policy change."""
    old, new = copy_rules(tmp_path, "old"), copy_rules(tmp_path, "new")
    open_deal = new / "open-deal.yaml"
    edit(open_deal, "  - day: 5\n", "  - day: 6\n")
    edit(
        open_deal,
        "    channel: sms\n    template: sms/deal-05-round-table-invite\n",
        "    channel: letter\n    template: letter/deal-04-executive-brief\n",
    )
    edit(
        open_deal,
        'when: deal.stage == "proposal_sent"',
        'when: deal.stage == "proposal_sent" and deal.amount',
    )
    edit(open_deal, 'window: "09:00-18:00"', 'window: "10:00-24:00"')
    edit(open_deal, "  meeting_booked: post-meeting\n", "")
    (new / "warm-letters.yaml").unlink()
    (new / "re-engage.yaml").write_text(NEW_CADENCE, encoding="utf-8")
    edit(new / "policy.yaml", "per_week: 3", "per_week: 2")
    edit(new / "policy.yaml", '  call: "09:00-19:00"\n', "")
    return old, new


# --- the diff -----------------------------------------------------------------------------------------------


def test_cadences_are_added_removed_changed_or_unchanged(old_and_new: tuple[Path, Path]) -> None:
    old, new = old_and_new
    found = diff.compare_rules(load_folder(old), load_folder(new))

    statuses = {c.name: c.status for c in found.cadences}
    assert statuses == {
        "key-account": "unchanged",
        "lost-prospect-nurture": "unchanged",
        "onboarding": "unchanged",
        "open-deal": "changed",
        "post-meeting": "unchanged",
        "re-engage": "added",
        "warm-letters": "removed",
    }
    assert found.differs
    added, removed = by_name(found)["re-engage"], by_name(found)["warm-letters"]
    assert (added.old_file, added.new_file) == (None, str(new / "re-engage.yaml"))
    assert added.new_hash is not None and added.old_hash is None
    assert removed.old_file is not None and removed.new_file is None


def test_a_changed_cadence_lists_its_fields_and_steps_as_the_file_names_them(
    old_and_new: tuple[Path, Path],
) -> None:
    old, new = old_and_new
    open_deal = by_name(diff.compare_rules(load_folder(old), load_folder(new)))["open-deal"]

    assert texts(open_deal) == [
        'enroll.when: deal.stage == "proposal_sent" → deal.stage == "proposal_sent" and deal.amount',
        "then.meeting_booked: post-meeting → (none)",
        "calendar.window: 09:00-18:00 → 10:00-24:00",
        "steps[2].day: 5 → 6",
        "steps[4].channel: sms → letter",
        "steps[4].template: sms/deal-05-round-table-invite → letter/deal-04-executive-brief",
    ]
    day = open_deal.changes[3]
    assert (day.path, day.old, day.new, day.kind) == ("steps[2].day", 5, 6, "changed")


def test_the_policy_is_compared_too(old_and_new: tuple[Path, Path]) -> None:
    old, new = old_and_new
    found = diff.compare_rules(load_folder(old), load_folder(new))

    assert found.policy is not None
    assert [str(c) for c in found.policy] == [
        "quiet_hours.call removed: 09:00-19:00",
        "caps.per_week: 3 → 2",
    ]


def test_steps_added_and_removed_at_the_end(tmp_path: Path) -> None:
    old, longer, shorter = (copy_rules(tmp_path, name) for name in ("old", "longer", "shorter"))
    edit(
        longer / "open-deal.yaml",
        LAST_STEP,
        LAST_STEP
        + "\n  - day: 25\n    channel: call\n    template: call/deal-07-pilot-offer\n"
        + "    reason: The last call before the decision.\n",
    )
    edit(shorter / "open-deal.yaml", LAST_STEP, "")

    grown = by_name(diff.compare_rules(load_folder(old), load_folder(longer)))["open-deal"]
    shrunk = by_name(diff.compare_rules(load_folder(old), load_folder(shorter)))["open-deal"]

    [added] = grown.changes
    assert (added.path, added.kind, added.old) == ("steps[8]", "added", None)
    assert added.new["channel"] == "call" and added.new["day"] == 25
    assert str(added).startswith("steps[8] added: {")
    assert "reason: The last call before the decision." in str(added)
    [removed] = shrunk.changes
    assert (removed.path, removed.kind, removed.new) == ("steps[7]", "removed", None)
    assert removed.old["template"] == "email/deal-08-price-hold"


def test_a_comment_is_a_new_version_but_no_change(tmp_path: Path) -> None:
    old, new = copy_rules(tmp_path, "old"), copy_rules(tmp_path, "new")
    edit(new / "open-deal.yaml", "steps:\n", "# Reviewed by sales ops.\nsteps:\n")

    found = diff.compare_rules(load_folder(old), load_folder(new))

    open_deal = by_name(found)["open-deal"]
    assert (open_deal.status, open_deal.changes) == ("unchanged", ())
    assert open_deal.old_hash != open_deal.new_hash
    assert not found.differs


def test_a_field_the_language_gains_shows_up_without_changes_to_the_diff() -> None:
    class Extended(CadenceSpec):
        budget: int = 0

    rules = load_folder(REPO / "rules")
    shipped = rules.cadences["open-deal"]

    def with_budget(budget: int) -> RuleSet:
        spec = Extended.model_validate({**shipped.spec.model_dump(by_alias=True), "budget": budget})
        parsed = Parsed(spec, shipped.file, shipped.text, shipped.located)
        return RuleSet({**rules.cadences, "open-deal": parsed}, rules.policy)

    found = diff.compare_rules(with_budget(100), with_budget(250))

    assert texts(by_name(found)["open-deal"]) == ["budget: 100 → 250"]


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ({"a": [{"x": 1}]}, {"a": [{"x": 1}, {"x": 2}]}, ["a[1] added: {x: 2}"]),
        ({"a": ["x", "y"]}, {"a": ["y", "x"]}, ["a: [x, y] → [y, x]"]),
        ({"a": {"b": None}}, {"a": {"b": True}}, ["a.b: (none) → true"]),
        ({"a": {"b": {"c": 1}}}, {"a": {"b": {"c": 1}}}, []),
        ({"a": {}}, {"a": {"no_answer": {"max": 2}}}, ["a.no_answer added: {max: 2}"]),
        ({"when": "10:30:00"}, {"when": "11:00:00"}, ["when: 10:30 → 11:00"]),
    ],
)
def test_compare_is_generic_over_json(old: Any, new: Any, expected: list[str]) -> None:
    assert [str(c) for c in diff.compare(old, new)] == expected


# --- cadence rules diff ---------------------------------------------------------------------------------


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CliRunner:
    for name in ("RULES_DIR", "TEMPLATES_DIR", "DATABASE_URL", "REDIS_URL", "ADMIN_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TEMPLATES_DIR", str(TEMPLATES))
    workdir = tmp_path / "workdir"  # no .env here
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    return CliRunner()


def invoke(runner: CliRunner, *args: object) -> Result:
    return runner.invoke(app, [str(a) for a in args])


def test_cli_diff_prints_the_changes_and_exits_1(runner: CliRunner, old_and_new: tuple[Path, Path]) -> None:
    old, new = old_and_new
    result = invoke(runner, "rules", "diff", old, new)

    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert f"~ open-deal changed ({new / 'open-deal.yaml'})" in lines
    assert "    steps[2].day: 5 → 6" in lines
    assert "    steps[4].channel: sms → letter" in lines
    assert f"+ re-engage added ({new / 're-engage.yaml'})" in lines
    assert f"- warm-letters removed ({old / 'warm-letters.yaml'})" in lines
    assert "~ policy" in lines
    assert "    caps.per_week: 3 → 2" in lines
    assert "unchanged: key-account, lost-prospect-nurture, onboarding, post-meeting" in lines


def test_cli_diff_json(runner: CliRunner, old_and_new: tuple[Path, Path]) -> None:
    old, new = old_and_new
    result = invoke(runner, "rules", "diff", old, new, "--format", "json")

    assert result.exit_code == 1, result.output
    found = json.loads(result.stdout)
    assert found["differs"] is True
    cadences = {c["name"]: c for c in found["cadences"]}
    assert cadences["re-engage"]["status"] == "added"
    day = cadences["open-deal"]["changes"][3]
    assert day == {
        "path": "steps[2].day",
        "change": "changed",
        "old": 5,
        "new": 6,
        "text": "steps[2].day: 5 → 6",
    }
    assert {"path": "caps.per_week", "change": "changed", "old": 3, "new": 2}.items() <= found["policy"][
        1
    ].items()


def test_cli_diff_of_the_same_rules_exits_0(runner: CliRunner, tmp_path: Path) -> None:
    result = invoke(runner, "rules", "diff", REPO / "rules", copy_rules(tmp_path, "same"))

    assert result.exit_code == 0, result.output
    assert "no differences" in result.stdout


def test_cli_diff_on_invalid_rules_prints_every_located_error_and_exits_2(
    runner: CliRunner, old_and_new: tuple[Path, Path]
) -> None:
    old, new = old_and_new
    edit(old / "onboarding.yaml", "channel: email", "channel: emial")
    edit(new / "re-engage.yaml", "reason: Offer a small pilot", "reason: [Offer a small pilot")

    for output in ("text", "json"):
        result = invoke(runner, "rules", "diff", old, new, "--format", output)

        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        if output == "json":
            problems = json.loads(result.stdout)["problems"]
            # The others name onboarding in `then`, which no longer loads: those are errors too.
            assert {Path(p["file"]).name for p in problems} >= {"onboarding.yaml", "re-engage.yaml"}
            assert all(p["line"] > 1 and p["column"] >= 1 for p in problems)
        else:
            assert f"{old / 'onboarding.yaml'}:" in result.stdout
            assert "did you mean 'email'?" in result.stdout
            assert f"{new / 're-engage.yaml'}:" in result.stdout


@pytest.mark.parametrize("args", [["one-folder"], ["a", "b", "--against-db"], ["a", "b", "c"]])
def test_cli_diff_wants_two_folders_or_one_against_the_database(runner: CliRunner, args: list[str]) -> None:
    result = invoke(runner, "rules", "diff", *args)

    assert result.exit_code == 2
    assert "OLD NEW" in result.output


def test_cli_diff_on_a_missing_folder_exits_2(runner: CliRunner, tmp_path: Path) -> None:
    result = invoke(runner, "rules", "diff", REPO / "rules", tmp_path / "nowhere")

    assert result.exit_code == 2
    assert "nowhere" in result.output


def test_help_explains_rules_diff_and_reload(runner: CliRunner) -> None:
    assert "rules" in invoke(runner, "--help").stdout
    helped = invoke(runner, "rules", "--help")
    assert helped.exit_code == 0
    assert "diff" in helped.stdout and "reload" in helped.stdout
    assert "--against-db" in invoke(runner, "rules", "diff", "--help").stdout
    assert "--url" in invoke(runner, "rules", "reload", "--help").stdout


# --- against the database -----------------------------------------------------------------------------------


def test_against_db_counts_the_active_enrollments_that_keep_the_old_version(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    rules = copy_rules(tmp_path, "rules")
    settings = make_settings(tmp_path, rules_dir=rules)
    harness = start_harness(settings)
    try:
        for n in range(3):
            body = deal_event(f"evt-{n}", deal_id=f"d-{n}", contact_id=f"c-{n}")
            assert harness.post("/webhooks/generic", body).json()["enrolled"]
        first = harness.enrollments()[0]
        harness.post("/outcomes", {"enrollment_id": first.id, "outcome": "replied"})
    finally:
        harness.stop()
    monkeypatch.setenv("DATABASE_URL", settings.database_url)

    unchanged = invoke(runner, "rules", "diff", rules, "--against-db", "--format", "json")
    edit(rules / "open-deal.yaml", "  - day: 5\n", "  - day: 6\n")
    changed = invoke(runner, "rules", "diff", rules, "--against-db", "--format", "json")
    text = invoke(runner, "rules", "diff", rules, "--against-db")

    # Only open-deal has been enrolled on, so only it has a version in the database.
    assert unchanged.exit_code == 1, unchanged.output
    before = {c["name"]: c for c in json.loads(unchanged.stdout)["cadences"]}
    assert (before["open-deal"]["status"], before["open-deal"]["active_on_old"]) == ("unchanged", 0)
    assert {c["status"] for name, c in before.items() if name != "open-deal"} == {"added"}
    assert json.loads(unchanged.stdout)["policy"] is None

    assert changed.exit_code == 1, changed.output
    after = {c["name"]: c for c in json.loads(changed.stdout)["cadences"]}
    open_deal = after["open-deal"]
    assert (open_deal["status"], open_deal["active_on_old"]) == ("changed", 2)
    assert [c["text"] for c in open_deal["changes"]] == ["steps[2].day: 5 → 6"]
    assert open_deal["old_hash"] == before["open-deal"]["new_hash"] != open_deal["new_hash"]

    assert text.exit_code == 1
    assert "2 active enrollment(s) keep their old version" in text.stdout
    assert "    steps[2].day: 5 → 6" in text.stdout


def test_against_a_database_never_migrated_everything_is_new(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'empty.db'}")

    result = invoke(runner, "rules", "diff", REPO / "rules", "--against-db", "--format", "json")

    assert result.exit_code == 1, result.output
    assert {c["status"] for c in json.loads(result.stdout)["cadences"]} == {"added"}
