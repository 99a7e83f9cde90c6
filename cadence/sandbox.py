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


_expressions = ImmutableSandboxedEnvironment(undefined=_MissingField)


@lru_cache(maxsize=1024)
def compile_expression(source: str) -> Any:
    """Compile once; raises ExpressionError with Jinja's message."""
    try:
        return _expressions.compile_expression(source, undefined_to_none=False)
    except jinja2.TemplateSyntaxError as exc:
        raise ExpressionError(exc.message or str(exc)) from exc


def evaluate(source: str, context: Mapping[str, Any]) -> Any:
    """Evaluate a condition; missing fields are undefined (falsy), reaching internals is an error."""
    expression = compile_expression(source)
    try:
        value = expression(**context)
    except jinja2.exceptions.SecurityError as exc:
        raise ExpressionError(f"refused by the sandbox: {exc}") from exc
    except (jinja2.UndefinedError, TypeError, ValueError, ArithmeticError) as exc:
        raise ExpressionError(str(exc)) from exc
    if isinstance(value, jinja2.Undefined):
        return None
    return value


def truthy(source: str, context: Mapping[str, Any]) -> bool:
    return bool(evaluate(source, context))


def template_environment(templates_dir: Path) -> ImmutableSandboxedEnvironment:
    """Templates: autoescape for .html, undefined variables are errors, only files under templates_dir."""
    return ImmutableSandboxedEnvironment(
        loader=jinja2.FileSystemLoader(str(templates_dir)),
        undefined=jinja2.StrictUndefined,
        autoescape=jinja2.select_autoescape(enabled_extensions=("html", "htm"), default_for_string=False),
        keep_trailing_newline=True,
    )


def render(env: jinja2.Environment, name: str, context: Mapping[str, Any]) -> str:
    try:
        return env.get_template(name).render(context)
    except jinja2.TemplateNotFound as exc:
        raise TemplateError(f"template not found: {name}") from exc
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"{name}:{exc.lineno}: {exc.message}") from exc
    except jinja2.exceptions.SecurityError as exc:
        raise TemplateError(f"{name}: refused by the sandbox: {exc}") from exc
    except jinja2.UndefinedError as exc:
        raise TemplateError(f"{name}: {exc.message}") from exc
    except (TypeError, ValueError, ArithmeticError) as exc:
        raise TemplateError(f"{name}: {exc}") from exc
