"""The sandbox: user-authored templates and conditions never reach Python internals, files or state."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hypothesis
import jinja2
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from cadence import sandbox

SECRET = "s3cr3t-token-4b1d"

#: Templates that walk to Python internals, each with text that would show if the walk had worked.
INTERNALS = {
    "mro": ("{{ ''.__class__.__mro__ }}", "<class 'object'>"),
    "subclasses": ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "<class 'type'>"),
    "cycler-globals": ("{{ cycler.__init__.__globals__ }}", "__builtins__"),
    "self-dict": ("{{ self.__dict__ }}", "_TemplateReference__context"),
    "lipsum-globals": ("{{ lipsum.__globals__ }}", "__builtins__"),
    "format-walk": ("{{ '{0.__class__.__init__.__globals__}'.format(contact) }}", "__builtins__"),
    "attr-filter": ("{{ contact | attr('__class__') }}", "<class"),
}


class Person:
    """A context object with a private attribute holding a secret."""

    def __init__(self) -> None:
        self.name = "Ada"
        self._token = SECRET


@pytest.fixture
def templates(tmp_path: Path) -> Path:
    root = tmp_path / "templates"
    (root / "email").mkdir(parents=True)
    return root


def render_source(templates: Path, source: str, context: dict[str, Any], name: str = "email/t.txt") -> str:
    (templates / name).write_text(source, encoding="utf-8")
    return sandbox.render(sandbox.template_environment(templates), name, context)


def refused_template(templates: Path, source: str, context: dict[str, Any]) -> str:
    """Render a template that must be refused; the output must never be produced. Returns the error text."""
    marker = "RENDERED-MARKER"
    with pytest.raises(sandbox.TemplateError) as caught:
        out = render_source(templates, f"{marker} {source} {marker}", context)
        pytest.fail(f"rendered: {out[:200]!r}")  # pragma: no cover - only reached on a sandbox escape
    message = str(caught.value)
    assert marker not in message
    return message


def refused_expression(source: str, context: dict[str, Any]) -> str:
    with pytest.raises(sandbox.ExpressionError) as caught:
        value = sandbox.evaluate(source, context)
        pytest.fail(f"evaluated to {value!r}")  # pragma: no cover - only reached on a sandbox escape
    return str(caught.value)


# --- templates: Python internals ------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(INTERNALS))
def test_template_refuses_python_internals(
    templates: Path, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CADENCE_TEST_SECRET", SECRET)
    source, leak = INTERNALS[case]
    message = refused_template(templates, source, {"contact": Person()})
    assert leak not in message
    assert SECRET not in message
    assert "refused by the sandbox" in message


def test_template_refuses_attribute_starting_with_underscore(templates: Path) -> None:
    message = refused_template(templates, "{{ contact._token }}", {"contact": Person()})
    assert SECRET not in message
    assert "_token" in message


def test_template_can_read_public_attributes(templates: Path) -> None:
    # The control for the test above: the same object, a public attribute.
    assert render_source(templates, "{{ contact.name }}", {"contact": Person()}) == "Ada"


def test_a_templates_own_globals_overlay_the_environments_and_stay_its_own(templates: Path) -> None:
    """Each template sees the environment's globals (`range`, bounded) under any of its own, and its own
    reach neither the environment nor another template."""
    env = sandbox.template_environment(templates)
    mine = env.from_string("{{ greeting }} {{ range(3) | list }}", globals={"greeting": "hello"})
    other = env.from_string("{{ greeting is defined }} {{ range(2) | list }}")
    assert mine.render() == "hello [0, 1, 2]"
    assert other.render() == "False [0, 1]"
    assert "greeting" not in env.globals
    shadowing = env.from_string("{{ range }}", globals={"range": "mine"})
    assert shadowing.render() == "mine"
    assert env.from_string("{{ range(1) | list }}").render() == "[0]"
    with pytest.raises(sandbox.ExpressionError):
        sandbox.evaluate("range(10 ** 9) | list", {})  # the environment's bounded range, still


def test_template_cannot_mutate_a_list_immutable_sandbox(templates: Path) -> None:
    refused_template(templates, "{{ [].pop() }}", {})
    items = [SECRET, "other"]
    message = refused_template(templates, "{{ items.pop() }}{{ items.append('x') }}", {"items": items})
    assert items == [SECRET, "other"]
    assert SECRET not in message


def test_template_cannot_mutate_a_dict(templates: Path) -> None:
    deal = {"amount": 100}
    refused_template(templates, "{{ deal.update(amount=0) }}", {"deal": deal})
    assert deal == {"amount": 100}


def test_template_refuses_environ_through_globals(templates: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CADENCE_TEST_SECRET", SECRET)
    message = refused_template(templates, "{{ lipsum.__globals__['os'].environ['CADENCE_TEST_SECRET'] }}", {})
    assert SECRET not in message


# --- templates: files -----------------------------------------------------------------------------------


def test_include_of_an_absolute_path_cannot_read_etc_passwd(templates: Path) -> None:
    message = refused_template(templates, "{% include '/etc/passwd' %}", {})
    assert "root:" not in message


def test_include_cannot_leave_the_templates_folder(templates: Path) -> None:
    (templates.parent / "pyproject.toml").write_text(f"[secret]\nkey = '{SECRET}'\n", encoding="utf-8")
    message = refused_template(templates, "{% include '../pyproject.toml' %}", {})
    assert SECRET not in message
    message = refused_template(templates, "{% include '../../pyproject.toml' %}", {})
    assert SECRET not in message


def test_include_inside_the_templates_folder_works(templates: Path) -> None:
    # The control for the two tests above: includes are allowed, just not outside the folder.
    (templates / "email" / "footer.txt").write_text("-- {{ sender }}", encoding="utf-8")
    out = render_source(templates, "Hi{% include 'email/footer.txt' %}", {"sender": "Bob"})
    assert out == "Hi-- Bob"


def test_include_error_names_the_template_that_is_missing(templates: Path) -> None:
    # email/t.txt exists; what is missing is the included file, and the message should say which.
    message = refused_template(templates, "{% include 'email/nowhere.txt' %}", {})
    assert "email/nowhere.txt" in message


def test_missing_template_is_a_template_error(templates: Path) -> None:
    with pytest.raises(sandbox.TemplateError, match=r"email/absent\.txt"):
        sandbox.render(sandbox.template_environment(templates), "email/absent.txt", {})


def test_template_syntax_error_is_a_template_error_with_line(templates: Path) -> None:
    with pytest.raises(sandbox.TemplateError, match=r"email/t\.txt:2:"):
        render_source(templates, "fine\n{{ broken \n", {})


# --- templates: undefined variables and escaping -------------------------------------------------------


def test_undefined_variable_in_a_template_is_an_error(templates: Path) -> None:
    with pytest.raises(sandbox.TemplateError, match="nickname"):
        render_source(templates, "Hello {{ nickname }}", {"contact": {"name": "Ada"}})


def test_undefined_field_in_a_template_is_an_error(templates: Path) -> None:
    with pytest.raises(sandbox.TemplateError, match="nickname"):
        render_source(templates, "Hello {{ contact.nickname }}", {"contact": {"name": "Ada"}})


def test_undefined_variable_in_a_condition_inside_a_template_is_an_error(templates: Path) -> None:
    with pytest.raises(sandbox.TemplateError):
        render_source(templates, "{% if vip %}VIP{% endif %}", {})


def test_none_field_renders_through_or_default(templates: Path) -> None:
    # Contact fields the CRM did not send are present as None: templates use `or` for a default.
    out = render_source(templates, '{{ contact.name or "there" }}', {"contact": {"name": None}})
    assert out == "there"


def test_html_templates_autoescape(templates: Path) -> None:
    out = render_source(
        templates, "<p>{{ contact.name }}</p>", {"contact": {"name": "<b>Ada</b> & co"}}, name="email/t.html"
    )
    assert out == "<p>&lt;b&gt;Ada&lt;/b&gt; &amp; co</p>"


def test_text_templates_do_not_escape(templates: Path) -> None:
    out = render_source(templates, "{{ contact.name }}", {"contact": {"name": "<b>Ada</b> & co"}})
    assert out == "<b>Ada</b> & co"


def test_templates_keep_the_trailing_newline(templates: Path) -> None:
    assert render_source(templates, "{{ x }}\n", {"x": 1}) == "1\n"


def test_template_environment_is_sandboxed_and_strict(templates: Path) -> None:
    env = sandbox.template_environment(templates)
    assert isinstance(env, jinja2.sandbox.ImmutableSandboxedEnvironment)
    assert env.undefined is jinja2.StrictUndefined


# --- expressions ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "''.__class__.__mro__",
        "''.__class__.__mro__[1].__subclasses__()",
        "cycler.__init__.__globals__",
        "lipsum.__globals__",
        "contact.__class__",
    ],
)
def test_expression_refuses_python_internals(source: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CADENCE_TEST_SECRET", SECRET)
    message = refused_expression(source, {"contact": Person()})
    assert "__builtins__" not in message
    assert "<class" not in message
    assert SECRET not in message


def test_expression_refuses_attribute_starting_with_underscore() -> None:
    message = refused_expression("contact._token", {"contact": Person()})
    assert SECRET not in message


def test_expression_refuses_mutation() -> None:
    refused_expression("[].pop()", {})
    items = [1, 2]
    refused_expression("items.pop()", {"items": items})
    assert items == [1, 2]


def test_expression_syntax_error_is_an_expression_error() -> None:
    with pytest.raises(sandbox.ExpressionError):
        sandbox.compile_expression("contact.age >=")


# --- expressions: missing fields ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    ["contact.age >= 50", "contact.age > 50", "contact.age < 50", "contact.age <= 50", "50 <= contact.age"],
)
def test_missing_field_is_false_in_comparisons(source: str) -> None:
    assert sandbox.evaluate(source, {"contact": {"name": "Ada"}}) is False
    assert sandbox.truthy(source, {"contact": {"name": "Ada"}}) is False


def test_present_field_compares_normally() -> None:
    # The control for the test above: the same expressions with an age.
    assert sandbox.truthy("contact.age >= 50", {"contact": {"age": 60}}) is True
    assert sandbox.truthy("contact.age < 50", {"contact": {"age": 30}}) is True
    assert sandbox.truthy("contact.age >= 50", {"contact": {"age": 30}}) is False


def test_missing_field_is_falsy_and_lets_or_give_a_default() -> None:
    assert sandbox.truthy("not contact.seniority", {"contact": {}}) is True
    assert sandbox.truthy("contact.age >= 50 or contact.seniority == 'executive'", {"contact": {}}) is False
    assert sandbox.truthy("(contact.age or 0) >= 50", {"contact": {}}) is False
    assert sandbox.evaluate("contact.nickname", {"contact": {}}) is None


@pytest.mark.parametrize("source", ["contact.age + 1 > 50", "contact.age * 2", "contact.age - 1 >= 0"])
def test_arithmetic_with_a_missing_field_raises(source: str) -> None:
    refused_expression(source, {"contact": {}})


def test_unknown_top_level_name_raises_when_used() -> None:
    refused_expression("customer.age >= 50", {"contact": {}})


# --- the template-injection corpus ----------------------------------------------------------------------

CORPUS: list[dict[str, Any]] = yaml.safe_load(
    (Path(__file__).parent / "fixtures" / "template_injection.yaml").read_text(encoding="utf-8")
)
#: What would show if an attempt had reached Python: an object's repr, a module's globals, the secret
#: (in the environment and in a file beside templates/), or /etc/passwd.
LEAKS = (
    *("<class", "<function", "<built-in", "<bound method", "<method", "<module", "object at 0x"),
    *("'__name__':", SECRET, "root:"),
)


def corpus_context() -> dict[str, Any]:
    """What a touch's template and conditions see, in the shapes the engine gives them."""
    return {
        "contact": {"id": 1, "name": "Ada", "email": "ada@example.com", "age": 50, "timezone": "UTC"},
        "deal": {"id": 2, "stage": "proposal_sent", "amount": 1200, "status": "open"},
        "enrollment": {"id": 3, "cadence": "open-deal"},
        "touch": {"id": 4, "channel": "email", "step": 0},
        "sender": {"name": "Bob", "email": "bob@example.com"},
        "reason": "The proposal and the one open question.",
        "now": datetime(2026, 11, 23, 9, 0, tzinfo=UTC),
    }


def attempt(run: Callable[[], Any]) -> tuple[str, str]:
    """`refused` with the project's error, or `harmless` with what it showed."""
    try:
        return "harmless", str(run())
    except (sandbox.TemplateError, sandbox.ExpressionError) as exc:
        return "refused", str(exc)


def test_the_corpus_covers_the_known_families() -> None:
    families = {entry["family"] for entry in CORPUS}
    assert len(CORPUS) >= 60 and len(families) >= 15
    assert all(entry["template"] in ("refused", "harmless") for entry in CORPUS)


@pytest.mark.parametrize("entry", CORPUS, ids=[f"{i}-{e['family']}" for i, e in enumerate(CORPUS)])
def test_every_injection_attempt_is_refused_or_harmless(
    templates: Path, entry: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CADENCE_SECRET", SECRET)
    (templates.parent / "secret.txt").write_text(SECRET, encoding="utf-8")
    source = entry["attempt"]
    context = corpus_context()
    if entry.get("statement"):
        found = {"template": attempt(lambda: render_source(templates, source, context))}
    else:
        found = {
            "template": attempt(lambda: render_source(templates, f"{{{{ {source} }}}}", context)),
            "expression": attempt(lambda: sandbox.evaluate(source, context)),
        }
    for where, (outcome, shown) in found.items():
        assert outcome == entry[where], (where, shown[:300])
        assert [leak for leak in LEAKS if leak in shown] == [], (where, shown[:300])
    assert context == corpus_context()  # and nothing it could reach was changed


# --- reading a record's fields ------------------------------------------------------------------------

#: Keys of a record as a CRM may send them: plain fields, and names of a dictionary's own methods.
FIELD_NAMES = st.sampled_from(["name", "title", "items", "keys", "get", "values", "copy", "_x", "x_"])


class Record(dict[str, Any]):
    """A dictionary of another type, which the sandbox reads the long way, as Jinja does: an attribute
    first, then the key."""


@given(record=st.dictionaries(FIELD_NAMES, st.one_of(st.none(), st.integers(), st.text(max_size=5))))
@hypothesis.settings(max_examples=150, deadline=None)
def test_a_records_fields_read_the_same_the_short_way_and_the_long_way(record: dict[str, Any]) -> None:
    """`contact.x` on a plain dictionary reads the key straight away where the dictionary has no attribute
    `x`; what it gives is what the long way gives: a method of the dictionary (`contact.items`) included,
    and a missing field an error."""
    env = sandbox.template_environment(Path("."))
    for name in ["name", "title", "items", "keys", "get", "values", "copy", "x_"]:
        template = env.from_string(f"{{{{ contact.{name} is callable }}}} {{{{ contact.{name} }}}}")
        if name in record or hasattr(dict, name):
            assert template.render(contact=record) == template.render(contact=Record(record)), name
        else:
            for contact in (record, Record(record)):
                with pytest.raises(jinja2.UndefinedError):
                    template.render(contact=contact)
        expression = f"contact.{name} is defined and contact.{name}"
        short, long = (sandbox.evaluate(expression, {"contact": c}) for c in (record, Record(record)))
        assert (type(short), repr(short)) == (type(long), repr(long))  # a method: one wrapper of each


def test_a_records_dunder_key_is_refused_like_any_dunder() -> None:
    assert "unsafe" in refused_expression("contact.__secret__", {"contact": {"__secret__": SECRET}})
