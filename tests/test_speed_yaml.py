"""The rules loader reads through libyaml when PyYAML has it, and answers exactly as the pure-Python reader:
the same data, the same positions, the same errors at the same line and column."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from cadence import yamlpos

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "rules").glob("*.yaml"))
ONBOARDING = (ROOT / "rules" / "onboarding.yaml").read_text(encoding="utf-8")

needs_libyaml = pytest.mark.skipif(not yaml.__with_libyaml__, reason="PyYAML is built without libyaml")

#: Pieces YAML gives a meaning to, that its two readers have read differently, or that are far from ASCII.
FRAGMENTS = (
    *("a", "key", "b c", ": ", ":", "- ", "-", "? ", "?", "[", "]", "{", "}", ", ", "#c", " # c", "'", '"'),
    *("\n", "\n  ", "\n    ", "\n- ", "\r\n", "\r", "\x85", "\u2028", "\t", "\ufeff", "\x07"),
    *("é", "日本", "🙂", "&x ", "*x", "<<: *x", "!", "!!str ", "!!int ", "!local ", "---", "..."),
    *("%YAML 1.1\n", "!!python/name:os.system ", "~", "null", "true", "NO", "0x1F", "1_000", "3.14"),
    *(".inf", ".nan"),
    *("2026-03-01", "9:00", "'09:00-18:00'", "|\n  x", ">-\n  x", '"\\u00e9\\n"', "'it''s'", "x" * 1100),
)
TEXTS = st.lists(st.sampled_from(FRAGMENTS), max_size=60).map("".join)


@st.composite
def edited_shipped_files(draw: st.DrawFn) -> str:
    """A shipped cadence with a few fragments put in at random places."""
    text = draw(st.sampled_from([path.read_text(encoding="utf-8") for path in SHIPPED]))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(TEXTS) + text[at:]
    return text


def _outcome(text: str) -> tuple[Any, ...]:
    try:
        located = yamlpos.load(text)
    except yamlpos.YamlSyntaxError as exc:
        return ("error", exc.message, exc.line, exc.column)
    return ("loaded", repr(located.data), located.values, located.keys)


def _pure_python(text: str) -> tuple[Any, ...]:
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(yamlpos, "_CParser", None)
        return _outcome(text)


@needs_libyaml
@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: path.name)
def test_the_shipped_rules_load_through_libyaml_alone(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    expected = _pure_python(text)
    monkeypatch.setattr(yaml, "compose", None)  # the pure-Python composer is not used at all
    assert _outcome(text) == expected


@needs_libyaml
@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(text=st.one_of(TEXTS, edited_shipped_files()))
def test_libyaml_and_the_pure_python_reader_answer_alike(text: str) -> None:
    assert _outcome(text) == _pure_python(text)


@pytest.mark.parametrize(
    "text",
    [
        "cadence: onboarding\t\n",  # a tab after a value: libyaml reads it, PyYAML refuses it
        "a: |#\n  x\n",  # a comment right after `|`: libyaml reads it, PyYAML refuses it
        ">#'09:00-18:00'",
        "a: {b: }\n",  # an empty value in a flow mapping: the two readers place it apart
        "? \n",
        "cadence: ! 1\n",  # a bare `!`: PyYAML resolves the value as if untagged
        "\ufeff\ufeffcadence: x\n",
        "cadence: x\n---\ncadence: y\n",
        "a: &x 1\nb: &x 2\n",
        "a: *missing\n",
        ONBOARDING.replace("country: RU", "country: &c [*c]"),
        ONBOARDING.replace("country: RU", "country: !!python/name:os.system"),
    ],
)
def test_where_the_readers_differ_the_answer_is_the_pure_python_one(text: str) -> None:
    assert _outcome(text) == _pure_python(text)


def test_a_nesting_bomb_is_refused_without_scanning_it_to_the_end() -> None:
    # libyaml's composer recurses in C (this depth overflows its stack) and its scanner slows with depth.
    with pytest.raises(yamlpos.YamlSyntaxError, match="nested too deeply"):
        yamlpos.load("a: " + "[" * 200_000 + "]" * 200_000)


def test_without_libyaml_the_pure_python_reader_does_it_all(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(yamlpos, "_CParser", None)
    located = yamlpos.load(ONBOARDING)
    assert located.data["cadence"] == "onboarding"
    assert located.where(("steps", 0, "day")) == _line_col(ONBOARDING, "day:")


def _line_col(text: str, needle: str) -> tuple[int, int]:
    """1-based line and column of the value after the first `needle`."""
    at = text.index(needle) + len(needle) + 1
    line = text.count("\n", 0, at) + 1
    return line, at - (text.rfind("\n", 0, at) + 1) + 1


@pytest.mark.parametrize("tag", ["!!int", "!!float", "!!timestamp"])
def test_an_empty_value_under_a_type_tag_is_a_located_error(tag: str) -> None:
    with pytest.raises(yamlpos.YamlSyntaxError, match="cannot read the value ''") as caught:
        yamlpos.load(f"cadence: x\nday: {tag} \n")
    assert (caught.value.line, caught.value.column) == (2, 6)
