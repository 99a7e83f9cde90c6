"""A fuzzed corpus of malformed YAML never crashes the loader: every input gets a located error or loads.

Inputs are random text and bytes, mutations of the shipped rule files, and cadence-shaped documents with
wrong types in every field. Each goes through `language.parse` and through `rules.load` on a folder.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from datetime import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cadence import rules
from cadence.errors import Problem, RulesError
from cadence.language import Parsed, parse

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES_DIR = ROOT / "templates"
SHIPPED = {path.name: path.read_text(encoding="utf-8") for path in sorted((ROOT / "rules").glob("*.yaml"))}
ONBOARDING = SHIPPED["onboarding.yaml"]
FILE = "fuzz.yaml"

FUZZ = settings(max_examples=150, deadline=None, database=None, derandomize=True)


# --- the property ----------------------------------------------------------------------------------------


def _assert_located(problems: list[Problem], is_the_file: Callable[[str], bool], text: str) -> None:
    """Every problem names the file, a line of it (or the one just past its end), a column, and says what."""
    assert problems, "a RulesError must carry at least one problem"
    last_line = len(text.splitlines()) + 1
    for problem in problems:
        assert is_the_file(problem.file), problem
        assert 1 <= problem.line <= last_line, (problem, last_line)
        assert problem.column >= 1, problem
        assert problem.message.strip(), problem


def assert_parses_or_locates(text: str) -> None:
    try:
        parsed = parse(text, FILE)
    except RulesError as exc:
        _assert_located(exc.problems, lambda file: file == FILE, text)
    else:
        assert isinstance(parsed, Parsed)


def assert_loads_or_locates(folder: Path, content: bytes) -> None:
    """The same through `rules.load`, on a folder holding only this file, with the real templates."""
    path = folder / FILE
    path.write_bytes(content)
    try:
        rule_set = rules.load([folder], TEMPLATES_DIR)
    except RulesError as exc:
        text = content.decode("utf-8", errors="replace")
        _assert_located(exc.problems, lambda file: Path(file).resolve() == path.resolve(), text)
    else:
        assert len(rule_set.cadences) == 1


def assert_never_crashes(folder: Path, text: str) -> None:
    assert_parses_or_locates(text)
    assert_loads_or_locates(folder, text.encode("utf-8", errors="surrogatepass"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rules")


# --- what goes into the documents ------------------------------------------------------------------------

#: Characters and fragments that YAML gives a meaning to, that its reader refuses, or that are far from ASCII.
NASTY = (
    *"\t:-[]{},'\"&*!%@`|>?#\\ \n\r",
    *("\x00", "\x07", "\x1b", "\x7f", "\x85", "\u2028", "\ufeff", "\ufffe", "é", "日本", "🙂"),
    *(": ", "- ", "? ", "&a ", "*a", "!!", "<<: ", "---", "...", "\r\n"),
)
#: Tags: Python's own (to be refused, never constructed), standard ones on values they do not fit, unknown.
TAGS = (
    "!!python/object:os.system",
    "!!python/object/apply:os.system",
    "!!python/object/new:os.system",
    "!!python/name:os.system",
    "!!python/module:os",
    "!!python/tuple",
    "!<tag:yaml.org,2002:python/object:os.system>",
    "!!binary",
    "!!int",
    "!!float",
    "!!bool",
    "!!timestamp",
    "!!set",
    "!!omap",
    "!!pairs",
    "!!map",
    "!!seq",
    "!!str",
    "!!null",
    "!local",
)
#: Huge numbers as (before, repeated, times, after), built when drawn so that no strategy's repr is huge.
_HUGE = (
    ("", "9", 4301, ""),  # one digit over Python's limit on converting a decimal string to an int
    ("-", "9", 10_000, ""),
    ("", "1_", 5000, "1"),
    ("0x", "f", 10_000, ""),
    ("0b", "1", 10_000, ""),
    ("1", ":59", 2000, ""),  # YAML 1.1 base 60
    ("1e", "4", 3, ""),
    ("9", "9", 400, ".5"),
)
HUGE_NUMBERS = st.sampled_from(_HUGE).map(lambda h: h[0] + h[1] * h[2] + h[3])
#: Plain and quoted scalars that YAML reads as something other than a string, or that are wrong here.
WORDS = (
    *("~", "null", "true", "False", "yes", "NO", "on", "0", "-1", "0x1F", "0o17", "017", "1_000", "3.14"),
    *(".inf", "-.inf", ".nan", "2026-03-01", "2026-03-01T10:00:00Z", "9:00", "12:30:45"),
    *("'09:00-18:00'", '"18:00-09:00"', "''", '""', "'", '"', "|", ">-", "=", "<<", "{{ 7 * 7 }}"),
    *("email", "email/../../etc/passwd", "deal.won", "Europe/Moscow", "Mars/Olympus", "RU", "XX"),
)
SCALARS = st.one_of(
    st.sampled_from(WORDS),
    HUGE_NUMBERS,
    st.integers().map(str),
    st.floats().map(repr),
    st.text(max_size=20).map(json.dumps),
)
TAGGED = st.tuples(st.sampled_from(TAGS), SCALARS).map(" ".join)
ALIASES = st.sampled_from(("*a", "*missing", "&a x", "&a [*a]", "&a {k: *a}", "&a &b x", "<<: *a"))
#: How each level of nesting opens and closes; a few hundred levels is past what PyYAML's recursion survives.
_LEVELS = {"[": "]", "{a: ": "}", "- ": "", "[{a: ": "}]"}
DEEP = st.tuples(st.integers(1, 800), st.sampled_from(sorted(_LEVELS))).map(
    lambda pair: pair[1] * pair[0] + "x" + _LEVELS[pair[1]] * pair[0]
)
VALUES = st.recursive(
    st.one_of(SCALARS, TAGGED, ALIASES),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda items: "[" + ", ".join(items) + "]"),
        st.dictionaries(SCALARS, inner, max_size=3).map(
            lambda pairs: "{" + ", ".join(f"{k}: {v}" for k, v in pairs.items()) + "}"
        ),
    ),
    max_leaves=8,
)


@st.composite
def small_alias_bombs(draw: st.DrawFn) -> str:
    """The billion-laughs shape, kept to at most 2 * 4**3 leaves so it can run in this process."""
    levels, fan_out = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    lines = ["b0: &b0 [x, x]"]
    lines += [f"b{i}: &b{i} [{', '.join([f'*b{i - 1}'] * fan_out)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


# --- (a) random text and bytes ---------------------------------------------------------------------------


@FUZZ
@given(text=st.one_of(st.text(max_size=300), st.lists(st.sampled_from(NASTY), max_size=80).map("".join)))
@example(text="\x1f")  # found: a control character escapes as yaml.reader.ReaderError
@example(text="cadence: \ufffe\n")  # so does a Unicode non-character
def test_random_text_gets_a_located_error_or_loads(folder: Path, text: str) -> None:
    assert_never_crashes(folder, text)


@FUZZ
@given(content=st.binary(max_size=300), encoding=st.sampled_from(("utf-8", "latin-1", "utf-16")))
@example(content=b"\x00", encoding="utf-8")  # found: NUL escapes as yaml.reader.ReaderError
@example(content=b"cadence: \xff\xfe\n", encoding="utf-8")
def test_random_bytes_get_a_located_error_or_load(folder: Path, content: bytes, encoding: str) -> None:
    # parse() is given the bytes decoded leniently; rules.load() reads the bytes as they are.
    assert_parses_or_locates(content.decode(encoding, errors="replace"))
    assert_loads_or_locates(folder, content)


# --- (b) mutations of the shipped rule files -------------------------------------------------------------

Lines = list[str]
_KEY_VALUE = re.compile(r"^(\s*(?:- )?[\w-]+:)[ \t]*(.*?)(\r?\n)?$")


def _pick(draw: st.DrawFn, lines: Lines) -> int:
    return draw(st.integers(0, len(lines) - 1))


def _delete(draw: st.DrawFn, lines: Lines) -> Lines:
    del lines[_pick(draw, lines)]
    return lines


def _duplicate(draw: st.DrawFn, lines: Lines) -> Lines:
    i = _pick(draw, lines)
    return [*lines[: i + 1], lines[i], *lines[i + 1 :]]


def _swap(draw: st.DrawFn, lines: Lines) -> Lines:
    i, j = _pick(draw, lines), _pick(draw, lines)
    lines[i], lines[j] = lines[j], lines[i]
    return lines


def _reindent(draw: st.DrawFn, lines: Lines) -> Lines:
    i = _pick(draw, lines)
    lines[i] = draw(st.text(alphabet=" \t", max_size=12)) + lines[i].lstrip(" \t")
    return lines


def _truncate(draw: st.DrawFn, lines: Lines) -> Lines:
    text = "".join(lines)
    return [text[: draw(st.integers(0, len(text)))]]


def _insert(draw: st.DrawFn, lines: Lines) -> Lines:
    text = "".join(lines)
    at = draw(st.integers(0, len(text)))
    return [text[:at], draw(st.lists(st.sampled_from(NASTY), min_size=1, max_size=6).map("".join)), text[at:]]


def _key_value_lines(lines: Lines) -> list[int]:
    return [i for i, line in enumerate(lines) if _KEY_VALUE.match(line)]


def _set_value(lines: Lines, i: int, value: str) -> None:
    """Line i, a `key: value` line, with a new value."""
    match = _KEY_VALUE.match(lines[i])
    assert match
    lines[i] = f"{match.group(1)} {value}\n"


def _new_value(draw: st.DrawFn, lines: Lines) -> Lines:
    value = draw(st.one_of(VALUES, DEEP, HUGE_NUMBERS))
    candidates = _key_value_lines(lines)
    if not candidates:
        return [*lines, value]
    _set_value(lines, draw(st.sampled_from(candidates)), value)
    return lines


def _anchor_and_alias(draw: st.DrawFn, lines: Lines) -> Lines:
    candidates = _key_value_lines(lines)
    if len(candidates) < 2:
        return lines
    anchored, aliased = draw(st.permutations(candidates))[:2]
    match = _KEY_VALUE.match(lines[anchored])
    assert match
    _set_value(lines, anchored, f"&v {match.group(2)}")
    _set_value(lines, aliased, draw(st.sampled_from(("*v", "*v2", "&v [*v]", "{<<: *v}", "[*v, *v]"))))
    return lines


def _tag_value(draw: st.DrawFn, lines: Lines) -> Lines:
    candidates = _key_value_lines(lines)
    if candidates:
        i = draw(st.sampled_from(candidates))
        match = _KEY_VALUE.match(lines[i])
        assert match
        _set_value(lines, i, f"{draw(st.sampled_from(TAGS))} {match.group(2)}")
    return lines


def _prepend_alias_bomb(draw: st.DrawFn, lines: Lines) -> Lines:
    return [draw(small_alias_bombs()), *lines]


MUTATIONS = (
    _delete,
    _duplicate,
    _swap,
    _reindent,
    _truncate,
    _insert,
    _new_value,
    _anchor_and_alias,
    _tag_value,
    _prepend_alias_bomb,
)


@st.composite
def mutated_rule_files(draw: st.DrawFn) -> str:
    lines = SHIPPED[draw(st.sampled_from(sorted(SHIPPED)))].splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 4))):
        lines = draw(st.sampled_from(MUTATIONS))(draw, lines) or [""]
    return "".join(lines)


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

ANY = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(),
        st.text(max_size=20),
        st.dates(),
        st.datetimes(),
        st.binary(max_size=8),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), inner, max_size=3),
    ),
    max_leaves=8,
)


def _field(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A field's value: a valid one, or anything at all in its place."""
    return st.one_of(valid, ANY)


STEP = st.fixed_dictionaries(
    {
        "day": _field(st.integers(0, 60)),
        "channel": _field(st.sampled_from(("email", "sms", "call", "letter"))),
        "template": _field(st.sampled_from(("email/onboarding-01-welcome", "call/deal-02-walkthrough", "x"))),
        "reason": _field(st.text(max_size=30)),
    },
    optional={"when": _field(st.sampled_from(("contact.age >= 50", "deal.", "{{", "x" * 50))), "extra": ANY},
)
CALENDAR = st.fixed_dictionaries(
    {},
    optional={
        "business_days": _field(st.booleans()),
        "window": _field(st.sampled_from(("09:00-18:00", "18:00-09:00", "24:00-24:30", "9-5"))),
        "timezone": _field(st.sampled_from(("Europe/Moscow", "UTC", "Europe", "../etc/passwd"))),
        "country": _field(st.sampled_from(("RU", "us", "XX", "NO"))),
    },
)
CADENCE = st.fixed_dictionaries(
    {
        "cadence": _field(st.sampled_from(("onboarding", "Open Deal", ""))),
        "steps": _field(st.lists(STEP, max_size=3)),
    },
    optional={
        "description": _field(st.text(max_size=30)),
        "enroll": _field(
            st.fixed_dictionaries(
                {"on": _field(st.sampled_from(("deal.won", "deal.lost", "deal.exploded")))},
                optional={"when": ANY},
            )
        ),
        "exit": _field(st.fixed_dictionaries({}, optional={"on_outcome": ANY, "when": ANY})),
        "then": _field(st.fixed_dictionaries({}, optional={"won": ANY, "lost": ANY})),
        "calendar": _field(CALENDAR),
    },
)


@st.composite
def dumped_cadences(draw: st.DrawFn) -> str:
    document = draw(st.one_of(CADENCE, ANY))
    return yaml.safe_dump(
        document,
        sort_keys=False,
        allow_unicode=draw(st.booleans()),
        default_flow_style=draw(st.sampled_from((False, True, None))),
    )


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
    "a 100 kB value": ONBOARDING.replace("description: >-", "description: " + "x" * 100_000 + "\nx: >-"),
    "a window as a sexagesimal list": ONBOARDING.replace('"09:00-18:00"', "[9:00, 18:00]"),
}


@pytest.mark.parametrize("name", sorted(NASTY_CASES))
def test_known_nasty_documents_get_a_located_error_or_load(folder: Path, name: str) -> None:
    assert_never_crashes(folder, NASTY_CASES[name])


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
