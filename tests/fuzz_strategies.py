"""Generated inputs for the fuzz tests and bench/fuzz.py: cadence files, condition expressions, CRM bodies.

The tests run them with modest example counts; bench/fuzz.py runs the same strategies by the ten thousand.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from hypothesis import strategies as st

from cadence import rules, sandbox
from cadence.errors import Problem, RulesError
from cadence.language import Parsed, parse

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES_DIR = ROOT / "templates"
SHIPPED = {path.name: path.read_text(encoding="utf-8") for path in sorted((ROOT / "rules").glob("*.yaml"))}
#: The name a generated cadence file is parsed under, or written to in a rules folder.
FILE = "fuzz.yaml"


def unlocated(problems: list[Problem], is_the_file: Callable[[str], bool], text: str) -> list[Problem]:
    """The problems that do not name the file, a line of it (or the one just past its end), a column, and
    what is wrong; a RulesError must carry at least one problem, so none at all is reported as unlocated."""
    if not problems:
        return [Problem("", 0, 0, "a RulesError without a problem")]
    last_line = len(text.splitlines()) + 1
    return [
        p
        for p in problems
        if not (is_the_file(p.file) and 1 <= p.line <= last_line and p.column >= 1 and p.message.strip())
    ]


def parse_outcome(text: str) -> str:
    """`loaded`, or `located` for a RulesError whose every problem is located; anything else fails."""
    try:
        parsed = parse(text, FILE)
    except RulesError as exc:
        assert unlocated(exc.problems, lambda file: file == FILE, text) == [], exc.problems
        return "located"
    assert isinstance(parsed, Parsed)
    return "loaded"


def load_outcome(folder: Path, content: bytes) -> str:
    """The same through `rules.load`, on a folder holding only this file, with the real templates."""
    path = folder / FILE
    path.write_bytes(content)
    try:
        rule_set = rules.load([folder], TEMPLATES_DIR)
    except RulesError as exc:
        text = content.decode("utf-8", errors="replace")
        problems = unlocated(exc.problems, lambda file: Path(file).resolve() == path.resolve(), text)
        assert problems == [], exc.problems
        return "located"
    assert len(rule_set.cadences) == 1
    return "loaded"


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


#: Random text: anything, or a soup of the characters and fragments YAML gives a meaning to.
TEXTS = st.one_of(st.text(max_size=300), st.lists(st.sampled_from(NASTY), max_size=80).map("".join))
#: Random bytes, and the encodings they are read back in.
BYTES = st.binary(max_size=300)
ENCODINGS = st.sampled_from(("utf-8", "latin-1", "utf-16"))


# --- mutations of the shipped rule files -----------------------------------------------------------------

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


# --- cadence-shaped documents with wrong types in every field --------------------------------------------

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


#: Every kind of generated cadence file, for a campaign over all of them.
CADENCE_FILES = st.one_of(TEXTS, mutated_rule_files(), dumped_cadences())


# --- condition expressions -------------------------------------------------------------------------------

#: The conditions written in the shipped rules: the seeds that mutated expressions start from.
_CONDITION_LINE = re.compile(r"^\s*(?:when|skip_when|until|call_priority): (.+?)(?:\s+#.*)?$", re.M)
SHIPPED_CONDITIONS: list[str] = sorted(set(_CONDITION_LINE.findall("".join(SHIPPED.values()))))
#: Names and fields a condition reads, real and not.
FIELDS = (
    *("contact.age", "contact.seniority", "contact.country", "contact.email", "contact.name", "contact"),
    *("deal.amount", "deal.stage", "deal.status", "deal.probability", "deal", "enrollment.id"),
    *("touch.channel", "now", "now.year", "now.hour", "contact.missing", "nobody.here", "contact['age']"),
    *("deal.x.y.z", "contact.__class__", "deal._private", "contact.items", "cycler", "lipsum", "range"),
)
LITERALS = st.one_of(
    st.sampled_from(("0", "1", "-1", "50", "1000", "1e400", "0.5", "none", "true", "False", "[]", "{}")),
    st.sampled_from(("'executive'", '"proposal_sent"', "''", "'%s'", "'{0}'", "'{0.__class__}'", "'\\x00'")),
    st.integers().map(str),
    st.floats(allow_nan=False).map(repr),
    st.text(max_size=10).map(json.dumps),
    HUGE_NUMBERS,
)
BINARY = (
    *("==", "!=", "<", "<=", ">", ">=", "and", "or", "in", "not in", "is", "is not"),
    *("+", "-", "*", "/", "//", "%", "**", "~", "|"),
)
FILTERS = (
    *("length", "lower", "upper", "int", "float", "string", "default(0)", "round", "abs", "first", "last"),
    *("join", "list", "sort", "unique", "sum", "max", "min", "trim", "title", "wordcount", "reverse"),
    *("center(99)", "indent(9)", "format(1)", "replace('a', 'bb')", "slice(3)", "batch(2)", "truncate(5)"),
    *("attr('__class__')", "attr('name')", "map(attribute='x')", "select", "tojson", "pprint", "urlencode"),
)
TESTS = ("defined", "none", "number", "string", "mapping", "odd", "divisibleby(3)", "callable", "in([1])")


def _expressions(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.tuples(inner, st.sampled_from(BINARY), inner).map(" ".join),
        inner.map(lambda e: f"not {e}"),
        inner.map(lambda e: f"-{e}"),
        inner.map(lambda e: f"({e})"),
        st.tuples(inner, st.sampled_from(FILTERS)).map("|".join),
        st.tuples(inner, st.sampled_from(TESTS)).map(" is ".join),
        st.tuples(inner, inner, inner).map(lambda t: f"{t[0]} if {t[1]} else {t[2]}"),
        st.tuples(inner, inner).map(lambda t: f"{t[0]}[{t[1]}]"),
        st.lists(inner, max_size=3).map(lambda items: "[" + ", ".join(items) + "]"),
        st.tuples(
            st.sampled_from(("range", "lipsum", "dict", "cycler", "contact.get", "'{}'.format")), inner
        ).map(lambda t: f"{t[0]}({t[1]})"),
    )


#: Expressions built from the grammar: fields, literals, operators, filters, tests, calls and subscripts.
BUILT_EXPRESSIONS = st.recursive(st.one_of(st.sampled_from(FIELDS), LITERALS), _expressions, max_leaves=10)


@st.composite
def mutated_expressions(draw: st.DrawFn) -> str:
    """A shipped condition with characters cut, doubled or inserted: what a slip of the keyboard makes."""
    text = draw(st.sampled_from(SHIPPED_CONDITIONS))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(text)))
        piece = draw(
            st.sampled_from(("(", ")", "[", "'", '"', "|", ".", "{{", "}}", "%", "~", "__", " ", ""))
        )
        cut = draw(st.integers(0, 3))
        text = text[:at] + piece + text[at + cut :]
    return text


#: Every kind of generated condition expression.
EXPRESSIONS = st.one_of(BUILT_EXPRESSIONS, mutated_expressions(), st.text(max_size=60))

#: What conditions are evaluated against: a full record, an empty one, nulls, and fields of the wrong type.
SAMPLE_CONTEXTS: tuple[dict[str, Any], ...] = (
    {
        "contact": {"id": 1, "age": 56, "seniority": "executive", "country": "RU", "email": "a@example.com"},
        "deal": {"id": 2, "amount": 12000, "stage": "proposal_sent", "status": "open", "probability": 0.4},
        "enrollment": {"id": 3},
        "touch": {"id": 4, "channel": "email"},
        "now": datetime(2026, 11, 23, 9, 0, tzinfo=UTC),
    },
    {"contact": {}, "deal": None, "enrollment": None, "touch": None, "now": datetime(2026, 1, 1, tzinfo=UTC)},
    {"contact": {"age": "fifty", "seniority": ["a"], "country": 7}, "deal": {"amount": "lots", "stage": {}}},
)


#: The condition in the shipped onboarding cadence that a generated one takes the place of.
_ONBOARDING_CONDITION = '(contact.age or 0) >= 50 or contact.seniority == "executive"'


def condition_outcome(source: str) -> str:
    """`works` when the condition compiles and evaluates against some sample context, `refused` when the
    sandbox says why not (ExpressionError) everywhere; any other exception is left to fail. A step's `when`
    holding it gets a located error or loads."""
    parse_outcome(SHIPPED["onboarding.yaml"].replace(_ONBOARDING_CONDITION, json.dumps(source)))
    try:
        sandbox.compile_expression(source)
    except sandbox.ExpressionError:
        return "refused"
    works = False
    for context in SAMPLE_CONTEXTS:
        try:
            sandbox.evaluate(source, context)
            works = True
        except sandbox.ExpressionError:
            pass
        sandbox.skip_reason(source, source, context)  # what a worker does: a reason, never an exception
    return "works" if works else "refused"


# --- CRM bodies ------------------------------------------------------------------------------------------

#: A body in Cadence's own event shape, for the generic adapter.
GENERIC_BODY = json.dumps(
    {
        "event_id": "evt-1",
        "type": "deal.stage_changed",
        "contact": {"id": "c-1", "name": "Anna", "email": "anna@example.com", "age": 56, "country": "RU"},
        "deal": {"id": "d-1", "stage": "proposal_sent", "status": "open", "amount": 12000},
    }
).encode()


def _json_containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3))


#: JSON values put where a body had another one.
JSON_VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False),
        st.text(max_size=12),
        st.sampled_from(("", "9" * 5000, "\x00", "1e999", "2026-13-45", "proposal_sent", "won")),
    ),
    _json_containers,
    max_leaves=6,
)
#: What goes into a form body instead of a key or a value.
FORM_PIECES = ("[", "]", "[]", "[0]", "[x][y]", "%5B", "%5D", "%", "%ff", "%00", "=", "&", "+", "9" * 30, "")


def _paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON document, the document itself first."""
    found = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += _paths(item, (*path, i))
    return found


def _replaced(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: _replaced(value[head], rest, new)}
    return [_replaced(item, rest, new) if i == head else item for i, item in enumerate(value)]


def _json_mutation(draw: st.DrawFn, body: bytes) -> bytes:
    """One value of a JSON body replaced by another of any type, or a key deleted."""
    try:
        document = json.loads(body)
    except ValueError:
        return body
    path = draw(st.sampled_from(_paths(document)))
    if path and draw(st.booleans()):
        parent = path[:-1]
        holder: Any = document
        for part in parent:
            holder = holder[part]
        if isinstance(holder, dict):
            new = {k: v for k, v in holder.items() if k != path[-1]}
            return json.dumps(_replaced(document, parent, new)).encode()
    return json.dumps(_replaced(document, path, draw(JSON_VALUES))).encode()


def _form_mutation(draw: st.DrawFn, body: bytes) -> bytes:
    """One pair of a form body dropped, doubled, or with junk put into its key or value."""
    pairs = body.split(b"&")
    i = draw(st.integers(0, len(pairs) - 1))
    action = draw(st.sampled_from(("drop", "double", "key", "value")))
    if action == "drop":
        del pairs[i]
    elif action == "double":
        pairs.insert(i, pairs[i])
    else:
        key, _, value = pairs[i].partition(b"=")
        piece = draw(st.sampled_from(FORM_PIECES)).encode()
        pairs[i] = key + piece + b"=" + value if action == "key" else key + b"=" + piece
    return b"&".join(pairs)


def _byte_mutation(draw: st.DrawFn, body: bytes) -> bytes:
    """Bytes cut off, flipped, inserted or deleted, as a broken proxy or a hand-written test would."""
    data = bytearray(body)
    at = draw(st.integers(0, len(data)))
    action = draw(st.sampled_from(("cut", "flip", "insert", "delete")))
    if action == "cut":
        del data[at:]
    elif action == "flip" and at < len(data):
        data[at] = draw(st.sampled_from(b'[]{}"&=%,:0a\x00\xff'))
    elif action == "insert":
        data[at:at] = draw(st.sampled_from((b"[", b"]", b"%5B", b"{}", b"null", b"&x", b'"', b"\xff\xfe")))
    else:
        del data[at : at + draw(st.integers(1, 20))]
    return bytes(data)


@st.composite
def mangled_bodies(draw: st.DrawFn, seeds: dict[str, bytes]) -> tuple[str, bytes]:
    """(seed name, body): a recorded delivery with one to four mutations, each on its bytes, its JSON or its
    form, whichever the body is."""
    name = draw(st.sampled_from(sorted(seeds)))
    body = seeds[name]
    for _ in range(draw(st.integers(1, 4))):
        mutate = draw(st.sampled_from((_byte_mutation, _json_mutation, _form_mutation)))
        body = mutate(draw, body)
    return name, body
