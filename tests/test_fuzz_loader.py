"""A fuzzed corpus of malformed YAML never crashes the loader: every input gets a located error or loads.

Inputs are random text and bytes, mutations of the shipped rule files, and cadence-shaped documents with
wrong types in every field. Each goes through `language.parse` and through `rules.load` on a folder.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from datetime import time
from pathlib import Path

import pytest
from fuzz_strategies import (
    BYTES,
    ENCODINGS,
    EXPRESSIONS,
    FILE,
    ROOT,
    SHIPPED,
    TEXTS,
    condition_outcome,
    dumped_cadences,
    load_outcome,
    mutated_rule_files,
    parse_outcome,
    unlocated,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cadence import rules
from cadence.errors import Problem, RulesError
from cadence.language import parse

ONBOARDING = SHIPPED["onboarding.yaml"]

FUZZ = settings(max_examples=150, deadline=None, database=None, derandomize=True)


# --- the property ----------------------------------------------------------------------------------------


def _assert_located(problems: list[Problem], is_the_file: Callable[[str], bool], text: str) -> None:
    assert unlocated(problems, is_the_file, text) == [], problems


def assert_never_crashes(folder: Path, text: str) -> None:
    parse_outcome(text)
    load_outcome(folder, text.encode("utf-8", errors="surrogatepass"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rules")


# --- (a) random text and bytes ---------------------------------------------------------------------------


@FUZZ
@given(text=TEXTS)
@example(text="\x1f")  # found: a control character escapes as yaml.reader.ReaderError
@example(text="cadence: \ufffe\n")  # so does a Unicode non-character
def test_random_text_gets_a_located_error_or_loads(folder: Path, text: str) -> None:
    assert_never_crashes(folder, text)


@FUZZ
@given(content=BYTES, encoding=ENCODINGS)
@example(content=b"\x00", encoding="utf-8")  # found: NUL escapes as yaml.reader.ReaderError
@example(content=b"cadence: \xff\xfe\n", encoding="utf-8")
def test_random_bytes_get_a_located_error_or_load(folder: Path, content: bytes, encoding: str) -> None:
    # parse() is given the bytes decoded leniently; rules.load() reads the bytes as they are.
    parse_outcome(content.decode(encoding, errors="replace"))
    load_outcome(folder, content)


# --- (b) mutations of the shipped rule files -------------------------------------------------------------


@settings(FUZZ, max_examples=200)
@given(text=mutated_rule_files())
# Found: each of these escapes from language.parse and rules.load instead of becoming a located problem.
@example(text="\ufffe" + ONBOARDING)  # yaml.reader.ReaderError
@example(text=ONBOARDING.replace("day: 42", "day: " + "9" * 4301))  # ValueError: int digits limit
@example(text=ONBOARDING.replace("country: RU", "country: &c [*c]"))  # RecursionError in yamlpos.load
@example(text=ONBOARDING.replace("country: RU", "country: !!python/name:os.system"))  # ConstructorError
@example(text=ONBOARDING.replace("business_days: true", "business_days: !!int true"))  # ValueError
@example(text=ONBOARDING.replace("business_days: true", "business_days: !!bool maybe"))  # KeyError
@example(text=ONBOARDING.replace("day: 42", "day: !!timestamp later"))  # AttributeError
@example(text=ONBOARDING.replace('"09:00-18:00"', "[" * 600 + "]" * 600))  # RecursionError in PyYAML
def test_mutated_rule_files_get_a_located_error_or_load(folder: Path, text: str) -> None:
    assert_never_crashes(folder, text)


# --- (c) cadence-shaped documents with wrong types in every field ----------------------------------------


@settings(FUZZ, max_examples=200)
@given(text=dumped_cadences())
@example(text="cadence: onboarding\nsteps:\n- day: !!binary AAAA\n  channel: email\n")  # bytes for a number
def test_cadences_with_wrong_types_get_a_located_error_or_load(folder: Path, text: str) -> None:
    assert_never_crashes(folder, text)


# --- known nasty cases -----------------------------------------------------------------------------------

CONDITION = "(contact.age or 0) >= 50"
NASTY_CASES = {
    "empty": "",
    "only a comment": "# nothing\n",
    "only a document end": "...\n",
    "a scalar document": "just text\n",
    "a list document": "- a\n- b\n",
    "NUL inside a value": "cadence: a\x00b\n",
    "a bell character": "cadence: \x07\n",
    "a non-character": "cadence: \ufffe\n",
    "an escaped lone surrogate": 'cadence: "\\ud800"\nsteps: []\n',
    "a BOM": "\ufeff" + ONBOARDING,
    "CRLF line ends": ONBOARDING.replace("\n", "\r\n"),
    "CR line ends": ONBOARDING.replace("\n", "\r"),
    "a tab for indentation": ONBOARDING.replace("  business_days", "\tbusiness_days"),
    "duplicate keys": ONBOARDING + "cadence: again\n",
    "two documents": ONBOARDING + "---\n" + ONBOARDING,
    "an undefined alias": "cadence: *nowhere\n",
    "a recursive sequence alias": "cadence: a\nsteps: &s [*s]\n",
    "a recursive mapping alias": "&m {cadence: a, steps: *m}\n",
    "a recursive key": "? &k [*k]\n: 1\n",
    "a merge key of an alias": "base: &b {day: 0}\nsteps:\n  - <<: *b\n    channel: email\n",
    "a merge key of a scalar": "steps:\n  - <<: 1\n",
    "a python tag on a scalar": ONBOARDING.replace("cadence: onboarding", "cadence: !!python/name:os.system"),
    "a python tag on a key": "? !!python/object:os.system x\n: 1\n",
    "an unknown local tag": ONBOARDING.replace("country: RU", "country: !country RU"),
    "a %TAG directive": "%TAG !e! tag:example.com,2000:\n---\ncadence: !e!name a\n",
    "an unsupported %YAML version": "%YAML 2.0\n---\ncadence: a\n",
    "bad base64 in a binary": ONBOARDING.replace("country: RU", "country: !!binary 'abc'"),
    "a word tagged as an int": ONBOARDING.replace("day: 0", "day: !!int zero"),
    "a word tagged as a float": ONBOARDING.replace("day: 0", "day: !!float zero"),
    "a word tagged as a timestamp": ONBOARDING.replace("day: 0", "day: !!timestamp monday"),
    "an int past Python's digit limit": ONBOARDING.replace("day: 42", "day: " + "9" * 5000),
    "a float past the largest double": ONBOARDING.replace("day: 42", "day: 1e400"),
    "600 nested flow sequences": "[" * 600 + "]" * 600,
    "600 nested flow mappings": "{a: " * 600 + "1" + "}" * 600,
    "600 nested block sequences": "- " * 600 + "x\n",
    "a condition nested 3000 deep": ONBOARDING.replace(CONDITION, "(" * 3000 + "1" + ")" * 3000),
    "a condition of 5000 unary minuses": ONBOARDING.replace(CONDITION, "-" * 5000 + "1"),
    # Found: each of these escaped from the expression compiler (a ValueError; a load that never ended).
    "a condition with a 5000-digit number": ONBOARDING.replace(CONDITION, "9" * 5000),
    "a condition cutting a list into 10**8 slices": ONBOARDING.replace(CONDITION, "[1]|slice(10 ** 8)|list"),
    "a condition of 3000 additions": ONBOARDING.replace(CONDITION, " + ".join(["1"] * 3000)),
    "a 100 kB value": ONBOARDING.replace("description: >-", "description: " + "x" * 100_000 + "\nx: >-"),
    "a window as a sexagesimal list": ONBOARDING.replace('"09:00-18:00"', "[9:00, 18:00]"),
}


@pytest.mark.parametrize("name", sorted(NASTY_CASES))
def test_known_nasty_documents_get_a_located_error_or_load(folder: Path, name: str) -> None:
    assert_never_crashes(folder, NASTY_CASES[name])


# --- conditions --------------------------------------------------------------------------------------------


@settings(FUZZ, max_examples=300)
@given(source=EXPRESSIONS)
@example(source="9" * 5000)  # found: a ValueError out of the compiler
@example(source="[1]|slice(99999999)|list")  # found: run while compiling, for minutes
@example(source="'%0999999999d' % 1")  # found: a gigabyte string
def test_any_condition_works_or_raises_the_sandboxs_error(source: str) -> None:
    assert condition_outcome(source) in ("works", "refused")


# --- templates that cannot compile -----------------------------------------------------------------------

#: Template texts Jinja cannot compile, for reasons other than its syntax.
UNCOMPILABLE = {
    "a 5000-digit number": "{{ " + "9" * 5000 + " }}",
    "250 nested parentheses": "{{ " + "(" * 250 + "1" + ")" * 250 + " }}",
    "3000 additions": "{{ " + " + ".join(["1"] * 3000) + " }}",
    "300 nested ifs": "{% if 1 %}" * 300 + "x" + "{% endif %}" * 300,
    "120 nested loops": "{% for a in [1] %}" * 120 + "x" + "{% endfor %}" * 120,
}


@pytest.mark.parametrize("name", sorted(UNCOMPILABLE))
def test_a_template_that_cannot_compile_is_a_located_error(tmp_path: Path, name: str) -> None:
    # Found: each escaped from rules.load as a RecursionError, a ValueError or an IndentationError.
    templates = tmp_path / "templates"
    shutil.copytree(ROOT / "templates", templates)
    (templates / "call" / "onboarding-02-kickoff.md").write_text(UNCOMPILABLE[name], encoding="utf-8")
    (tmp_path / FILE).write_text(ONBOARDING, encoding="utf-8")
    with pytest.raises(RulesError) as caught:
        rules.load([tmp_path], templates)
    [problem] = caught.value.problems
    assert "call/onboarding-02-kickoff.md:1:" in problem.message
    assert problem.line == ONBOARDING[: ONBOARDING.index("call/onboarding-02-kickoff")].count("\n") + 1


# --- numbers with nothing to read ------------------------------------------------------------------------

#: Found by bench/fuzz.py: PyYAML's int and float constructors index into the value, so an empty (or a bare
#: sign) value tagged as a number raised IndexError out of the loader.
EMPTY_NUMBERS = ('day: !!int ""', 'day: !!float ""', 'day: !!int "-"', 'day: !!int "_"')


@pytest.mark.parametrize("value", EMPTY_NUMBERS)
def test_an_empty_number_gets_a_located_error(folder: Path, value: str) -> None:
    assert_never_crashes(folder, ONBOARDING.replace("day: 42", value))


# --- tags that name Python are refused, never constructed ------------------------------------------------

CONSTRUCTED: list[object] = []


def canary(*args: object) -> object:
    """What a loader that constructs Python tags would call; the tags below name it."""
    CONSTRUCTED.append(args)
    return "constructed"


PYTHON_TAGS = (
    f"!!python/object/apply:{__name__}.canary",
    f"!!python/object/new:{__name__}.canary",
    f"!!python/object:{__name__}.canary",
    f"!!python/name:{__name__}.canary",
    f"!<tag:yaml.org,2002:python/object/apply:{__name__}.canary>",
)
#: Where a tag goes in the valid onboarding cadence: on a scalar, a block sequence and a block mapping.
TAG_PLACES = {"scalar": "cadence:", "sequence": "steps:", "mapping": "calendar:"}


@pytest.mark.parametrize("tag", PYTHON_TAGS)
@pytest.mark.parametrize("place", sorted(TAG_PLACES))
def test_python_tags_are_refused_never_constructed(tag: str, place: str) -> None:
    key = TAG_PLACES[place]
    text = ONBOARDING.replace(f"\n{key}", f"\n{key} {tag}", 1)
    line = text[: text.index(tag)].count("\n") + 1
    with pytest.raises(RulesError) as caught:
        parse(text, FILE)
    assert CONSTRUCTED == []
    assert any(problem.line == line for problem in caught.value.problems), caught.value.problems


# --- a window that loads is usable -----------------------------------------------------------------------

#: What a marketer might put on either side of a window written as a list.
WINDOW_ENDS = st.one_of(
    st.integers(-1, 90_000).map(str),
    st.tuples(st.integers(0, 25), st.integers(0, 60)).map(lambda hm: f"{hm[0]}:{hm[1]:02d}"),
    st.tuples(st.integers(0, 25), st.integers(0, 60)).map(lambda hm: f'"{hm[0]:02d}:{hm[1]:02d}"'),
    st.sampled_from(("null", "12:30:45", '"09:00:00+03:00"', "9.5", "2026-03-01", '"noon"')),
)
WINDOWS = st.one_of(
    st.lists(WINDOW_ENDS, min_size=1, max_size=3).map(lambda ends: "[" + ", ".join(ends) + "]"),
    st.tuples(WINDOW_ENDS, WINDOW_ENDS).map(lambda ends: '"' + "-".join(e.strip('"') for e in ends) + '"'),
)


@FUZZ
@given(window=WINDOWS)
@example(window="[0, 0]")  # found: loaded as 00:00-00:00 with a UTC offset
@example(window='["18:00", "09:00"]')  # loaded, ending before it starts
@example(window="[32400, 64800]")  # loaded as times with a UTC offset, which due_at cannot compare
@example(window="[9:00, 18:00]")  # YAML 1.1 base 60: 540 and 1080 seconds, so 00:09-00:18 UTC
def test_a_window_that_loads_is_two_wall_times_opening_before_closing(window: str) -> None:
    text = ONBOARDING.replace('"09:00-18:00"', window)
    try:
        parsed = parse(text, FILE)
    except RulesError as exc:
        _assert_located(exc.problems, lambda file: file == FILE, text)
        return
    loaded = parsed.spec.calendar.window
    if loaded is not None:
        opens, closes = loaded
        assert isinstance(opens, time) and isinstance(closes, time), loaded
        assert opens.tzinfo is None and closes.tzinfo is None, loaded
        assert opens < closes, loaded


# --- alias bombs -----------------------------------------------------------------------------------------

#: Address space the loader may use for a bomb of under a kilobyte; importing Cadence takes under 100 MiB.
BOMB_MEMORY = 256 * 2**20
#: CPU seconds after which the child is stopped: a guard so a regression cannot hang the suite, not a
#: measure of speed (a loader that does not expand aliases answers at once).
BOMB_CPU_GUARD = 120


def _laughs(level: int, shape: str) -> str:
    """Level 0 is ten strings, each level above ten aliases of the one below: 10**(level+1) once expanded."""
    items = ['"lol"'] * 10 if level == 0 else [f"*a{level - 1}"] * 10
    if shape == "mapping":
        return "{" + ", ".join(f"k{i}: {item}" for i, item in enumerate(items)) + "}"
    return "[" + ", ".join(items) + "]"


ALIAS_BOMBS = {
    # Nine levels: 10**9 strings once expanded, from well under a kilobyte of YAML.
    "sequence": "".join(f"a{n}: &a{n} {_laughs(n, 'sequence')}\n" for n in range(9)),
    "mapping": "".join(f"a{n}: &a{n} {_laughs(n, 'mapping')}\n" for n in range(9)),
    # Inside a complex key, which is constructed whole and then turned into text.
    "key": "? [" + ", ".join(f"&a{n} {_laughs(n, 'sequence')}" for n in range(9)) + "]\n: x\n",
}


@pytest.mark.parametrize("shape", sorted(ALIAS_BOMBS))
def test_an_alias_bomb_gets_a_located_error_or_loads_within_bounded_memory(shape: str) -> None:
    child = textwrap.dedent(
        f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, ({BOMB_MEMORY}, {BOMB_MEMORY}))
        resource.setrlimit(resource.RLIMIT_CPU, ({BOMB_CPU_GUARD}, {BOMB_CPU_GUARD}))
        from cadence.errors import RulesError
        from cadence.language import parse
        try:
            parse(sys.stdin.read(), {FILE!r})
        except RulesError as exc:
            print("located" if all(p.line >= 1 and p.column >= 1 for p in exc.problems) else exc.problems)
        else:
            print("loaded")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", child], input=ALIAS_BOMBS[shape], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-2000:] or f"killed by signal {-done.returncode}"
    assert done.stdout.strip() in ("located", "loaded"), done.stdout
