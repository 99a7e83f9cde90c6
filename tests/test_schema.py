"""The JSON Schema editors check cadence files with: shipped, current, and in agreement with the language."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from typer.testing import CliRunner

from cadence import yamlpos
from cadence.cli import app
from cadence.errors import RulesError
from cadence.language import parse
from cadence.policy import POLICY_FILE
from cadence.rules import CRM_FILE
from cadence.schema import SCHEMA_FILE, cadence_schema, render

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / SCHEMA_FILE
CADENCE_FILES = sorted(
    path
    for path in (*ROOT.glob("rules/*.yaml"), *ROOT.glob("examples/**/*.yaml"))
    if path.name not in (POLICY_FILE, CRM_FILE)
)
MODELINE = "# yaml-language-server: $schema="


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


@pytest.fixture(scope="module")
def validator() -> Any:
    return jsonschema.Draft202012Validator(cadence_schema())


def _schema_errors(validator: Any, text: str) -> list[str]:
    return [error.message for error in validator.iter_errors(yamlpos.load(text).data)]


def _subschemas(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _subschemas(value)
    elif isinstance(node, list):
        for value in node:
            yield from _subschemas(value)


# --- the schema itself ----------------------------------------------------------------------------------


def test_the_shipped_schema_is_current() -> None:
    shipped = json.loads(SHIPPED.read_text(encoding="utf-8"))
    assert shipped == cadence_schema(), (
        f"{SCHEMA_FILE} is behind cadence/language.py: run `cadence schema --write` at the repo root"
    )


def test_the_schema_is_a_valid_2020_12_schema_with_a_name() -> None:
    schema = cadence_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] and schema["title"] and schema["description"]


def test_every_property_has_a_description() -> None:
    undescribed = [
        name
        for node in _subschemas(cadence_schema())
        for name, prop in node.get("properties", {}).items()
        if not prop.get("description")
    ]
    assert undescribed == [], "add Field(description=...) in cadence/language.py"


def test_every_mapping_forbids_keys_it_does_not_know() -> None:
    objects = [node for node in _subschemas(cadence_schema()) if "properties" in node]
    assert len(objects) >= 6  # the file, enroll, exit, then, calendar, a step
    assert all(node.get("additionalProperties") is False for node in objects)


# --- the shipped files ----------------------------------------------------------------------------------


def test_there_are_cadence_files_to_check() -> None:
    assert {"open-deal.yaml", "onboarding.yaml", "lost-prospect-nurture.yaml", "tour.yaml"} <= {
        p.name for p in CADENCE_FILES
    }


@pytest.mark.parametrize("path", CADENCE_FILES, ids=_ids(CADENCE_FILES))
def test_every_shipped_cadence_validates_against_the_schema(path: Path, validator: Any) -> None:
    assert _schema_errors(validator, path.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("path", CADENCE_FILES, ids=_ids(CADENCE_FILES))
def test_every_shipped_cadence_points_editors_to_the_schema(path: Path) -> None:
    first, second, *_ = path.read_text(encoding="utf-8").splitlines()
    assert first.startswith(MODELINE), f"{path.name}: the first line is not `{MODELINE}...`"
    target = path.parent / first.removeprefix(MODELINE)
    assert target.exists() and target.resolve() == SHIPPED, f"{path.name}: {target} is not {SCHEMA_FILE}"
    assert second.startswith("# "), f"{path.name}: the line saying what the cadence is for follows it"


# --- the schema and the language agree ------------------------------------------------------------------

STEP = """\
  - day: 0
    channel: email
    template: email/deal-01-proposal-recap
    reason: Recap of the proposal.
"""


def _cadence(head: str = "", step: str = STEP) -> str:
    return f"cadence: open-deal\n{head}steps:\n{step}"


ACCEPTED = {
    "the smallest cadence": _cadence(),
    "one enroll event, not a list": _cadence("enroll:\n  on: deal.won\n"),
    "a list of enroll events": _cadence("enroll:\n  on: [deal.won, deal.lost]\n"),
    "one exit outcome, not a list": _cadence("exit:\n  on_outcome: replied\n"),
    "a window with spaces": _cadence('calendar:\n  window: " 9:00 - 18:00 "\n'),
    "a window to the end of the day": _cadence('calendar:\n  window: "09:00-24:00"\n'),
    "then, and no enroll": _cadence("then:\n  won: onboarding\n"),
}

REJECTED = {
    "an unknown key": _cadence(step=STEP.replace("channel:", "chanel:")),
    "an unknown top-level key": _cadence("sequence: open-deal\n"),
    "a bad channel": _cadence(step=STEP.replace("channel: email", "channel: emial")),
    "a missing reason": _cadence(step=STEP.replace("    reason: Recap of the proposal.\n", "")),
    "a blank reason": _cadence(step=STEP.replace("Recap of the proposal.", '"  "')),
    "a window not HH:MM-HH:MM": _cadence('calendar:\n  window: "9 to 6"\n'),
    "a window as a number": _cadence("calendar:\n  window: 9\n"),
    "an unknown enroll event": _cadence("enroll:\n  on: deal.closed\n"),
    "no enroll events": _cadence("enroll:\n  on: []\n"),
    "an unknown exit outcome": _cadence("exit:\n  on_outcome: [replied, ghosted]\n"),
    "a name with capitals": _cadence().replace("open-deal", "Open-Deal", 1),
    "a template outside any channel": _cadence(step=STEP.replace("email/deal-01", "mail/deal-01")),
    "a hidden template": _cadence(step=STEP.replace("email/deal-01-proposal-recap", "email/.secret")),
    "a negative day": _cadence(step=STEP.replace("day: 0", "day: -1")),
    "a day in quotes": _cadence(step=STEP.replace("day: 0", 'day: "0"')),
    "no steps": "cadence: open-deal\nsteps: []\n",
    "business_days: yes": _cadence("calendar:\n  business_days: yes\n"),
}

# What JSON Schema cannot say: `cadence lint` finds these, editors do not.
ONLY_THE_LANGUAGE_REJECTS = {
    "an impossible window time": _cadence('calendar:\n  window: "09:00-25:00"\n'),
    "a window that ends before it starts": _cadence('calendar:\n  window: "18:00-09:00"\n'),
    "a template in another channel's folder": _cadence(step=STEP.replace("email/deal-01", "sms/deal-01")),
    "steps going back in time": _cadence(step=STEP.replace("day: 0", "day: 5") + STEP),
    "a condition that is not an expression": _cadence(step=STEP + "    when: deal.stage ==\n"),
    "an unknown time zone": _cadence("calendar:\n  timezone: Europe/Atlantis\n"),
    "a country without a holiday calendar": _cadence("calendar:\n  country: XX\n"),
}


@pytest.mark.parametrize("text", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_both_accept(text: str, validator: Any) -> None:
    parse(text, "x.yaml")
    assert _schema_errors(validator, text) == []


@pytest.mark.parametrize("text", REJECTED.values(), ids=REJECTED.keys())
def test_both_reject(text: str, validator: Any) -> None:
    with pytest.raises(RulesError):
        parse(text, "x.yaml")
    assert _schema_errors(validator, text) != []


@pytest.mark.parametrize("text", ONLY_THE_LANGUAGE_REJECTS.values(), ids=ONLY_THE_LANGUAGE_REJECTS.keys())
def test_only_the_language_rejects(text: str, validator: Any) -> None:
    with pytest.raises(RulesError):
        parse(text, "x.yaml")
    assert _schema_errors(validator, text) == []


# --- cadence schema -------------------------------------------------------------------------------------


def test_cadence_schema_prints_the_schema() -> None:
    result = CliRunner().invoke(app, ["schema"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == cadence_schema()
    assert result.stdout == render()


def test_cadence_schema_write_writes_the_file_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["schema", "--write"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / SCHEMA_FILE).read_text(encoding="utf-8") == render()


def test_cadence_schema_write_to_an_output(tmp_path: Path) -> None:
    output = tmp_path / "editors" / "cadence.json"
    output.parent.mkdir()
    result = CliRunner().invoke(app, ["schema", "--write", "--output", str(output)])
    assert result.exit_code == 0, result.output
    assert json.loads(output.read_text(encoding="utf-8")) == cadence_schema()
