"""The one sandboxed Jinja2 world shared by conditions and templates: no internals, no files, no network."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ExpressionError(Exception):
    """An expression that does not compile or cannot be evaluated."""


class TemplateError(Exception):
    """A template that is missing, does not compile, uses an unknown variable, or was refused."""


class _MissingField(jinja2.Undefined):
    """A field the CRM did not send: falsy, and every ordering comparison with it is false.

    So `contact.age >= 50` is simply false for a contact without an age, instead of an error.
    """

    def _false(self, other: object) -> bool:
        return False

    __lt__ = __le__ = __gt__ = __ge__ = _false  # type: ignore[assignment]


#: Longest string or list that `*` may build in a condition or template.
MAX_REPEAT = 100_000
#: Largest exponent `**` may raise to.
MAX_EXPONENT = 1_000


class _Sandbox(ImmutableSandboxedEnvironment):
    """Refuses internals at the first step (not as a silent undefined) and bounds `*` and `**`."""

    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int | float) and abs(right) > MAX_EXPONENT:
            raise jinja2.exceptions.SecurityError(f"exponent {right} is over {MAX_EXPONENT}")
        if operator == "*":
            for sized, count in ((left, right), (right, left)):
                repeats = isinstance(sized, str | list | tuple) and isinstance(count, int)
                if repeats and len(sized) * count > MAX_REPEAT:
                    raise jinja2.exceptions.SecurityError(f"`*` would build over {MAX_REPEAT} items")
        return super().call_binop(context, operator, left, right)


_expressions = _Sandbox(undefined=_MissingField)


@lru_cache(maxsize=1024)
def compile_expression(source: str) -> Any:
    """Compile once; raises ExpressionError with Jinja's message."""
    try:
        return _expressions.compile_expression(source, undefined_to_none=False)
    except jinja2.TemplateSyntaxError as exc:
        raise ExpressionError(exc.message or str(exc)) from exc
    except RecursionError as exc:
        raise ExpressionError("the expression is nested too deeply") from exc


def _present(value: Any) -> Any:
    """A record with its null fields dropped, so a field sent as null reads like one never sent."""
    if isinstance(value, Mapping):
        return {k: v for k, v in value.items() if v is not None}
    return value


def evaluate(source: str, context: Mapping[str, Any]) -> Any:
    """Evaluate a condition; missing or null fields are undefined (falsy), reaching internals is an error."""
    expression = compile_expression(source)
    try:
        value = expression(**{name: _present(value) for name, value in context.items()})
    except jinja2.exceptions.SecurityError as exc:
        raise ExpressionError(f"refused by the sandbox: {exc}") from exc
    except Exception as exc:
        # Whatever an author's expression does wrong (an index out of range, a bad format string, a
        # recursion) is the expression's failure, never the worker's.
        raise ExpressionError(f"{type(exc).__name__}: {exc}") from exc
    if isinstance(value, jinja2.Undefined):
        return None
    return value


def truthy(source: str, context: Mapping[str, Any]) -> bool:
    return bool(evaluate(source, context))


def skip_reason(when: str | None, skip_when: str | None, context: Mapping[str, Any]) -> str | None:
    """Why a step with conditions `when` and `skip_when` is skipped for this context, or None if it goes."""
    try:
        if when and not truthy(when, context):
            return f"condition not met: {when}"
        if skip_when and truthy(skip_when, context):
            return f"skip_when holds: {skip_when}"
    except ExpressionError as exc:
        return f"condition failed: {exc}"
    return None


def template_environment(templates_dir: Path) -> jinja2.Environment:
    """Templates: autoescape for .html, undefined variables are errors, only files under templates_dir."""
    return _Sandbox(
        loader=jinja2.FileSystemLoader(str(templates_dir)),
        undefined=jinja2.StrictUndefined,
        autoescape=jinja2.select_autoescape(enabled_extensions=("html", "htm"), default_for_string=False),
        keep_trailing_newline=True,
    )


def render(env: jinja2.Environment, name: str, context: Mapping[str, Any]) -> str:
    try:
        return env.get_template(name).render(context)
    except jinja2.TemplateNotFound as exc:
        missing = exc.name if isinstance(exc.name, str) else name
        where = "" if missing == name else f"{name}: "
        raise TemplateError(f"{where}template not found: {missing}") from exc
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"{name}:{exc.lineno}: {exc.message}") from exc
    except jinja2.exceptions.SecurityError as exc:
        raise TemplateError(f"{name}: refused by the sandbox: {exc}") from exc
    except jinja2.UndefinedError as exc:
        raise TemplateError(f"{name}: {exc.message}") from exc
    except Exception as exc:
        # As with expressions: whatever a template does wrong fails that template, not the worker.
        raise TemplateError(f"{name}: {type(exc).__name__}: {exc}") from exc
