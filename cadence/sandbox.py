"""The one sandboxed Jinja2 world shared by conditions and templates: no internals, no files, no network."""

from __future__ import annotations

import re
import string
import types
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, MutableMapping, Sized
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.filters import (
    do_batch,
    do_center,
    do_format,
    do_indent,
    do_replace,
    sync_do_slice,
    sync_do_sum,
)
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range
from jinja2.utils import Cycler, Joiner, generate_lorem_ipsum


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
#: Most bits an integer `**` may build (about 3,000 decimal digits), so powers of powers stay small.
MAX_POWER_BITS = 10_000
#: Widest field a format (`%`, `.format`, `|format`) or `center`/`indent` may pad to, in characters; also
#: the most pieces `slice` and `batch` may cut into.
MAX_WIDTH = 10_000
#: Most paragraphs `lipsum` may write, and most words in one of them.
MAX_LIPSUM = (20, 200)
#: Longest string `replace` may build, in characters.
MAX_REPLACED = 1_000_000
#: Most characters and items one condition or one render may build, all told, with the operations above
#: and `range`: so a bounded operation repeated by `map` or by a loop adds up to this and no further.
MAX_BUILT = 10_000_000

_Built = TypeVar("_Built", bound=Sized)

#: What the condition or render under way may still build; None outside one (compiling a template).
_left: ContextVar[list[int] | None] = ContextVar("_left", default=None)


@contextmanager
def _budget() -> Iterator[None]:
    token = _left.set([MAX_BUILT])
    try:
        yield
    finally:
        _left.reset(token)


#: A printf-style conversion (`%-10.2f`, `%(name)s`): its flags, width and precision are what may be huge.
_PRINTF = re.compile(r"%(?:\([^)]*\))?([^a-zA-Z%]*)")


def _refuse(message: str) -> jinja2.exceptions.SecurityError:
    return jinja2.exceptions.SecurityError(message)


def _charge(built: _Built, what: str) -> _Built:
    """Count what an operation built against the budget of the condition or render under way."""
    left = _left.get()
    if left is not None:
        left[0] -= _size(built) if isinstance(built, str | list | tuple) else len(built)
        if left[0] < 0:
            raise _refuse(f"{what}: over {MAX_BUILT} characters and items built in all")
    return built


def _size(value: Any) -> int:
    """The characters or items of a string or list, counting those of the strings and lists inside it."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list | tuple):
        return len(value) + sum(_size(item) for item in value if isinstance(item, str | list | tuple))
    return 0


def _check_widths(spec: str, what: str) -> None:
    """A format spec whose width or precision is huge (or read from an argument) would build a huge string."""
    if "*" in spec or "{" in spec:
        raise _refuse(f"{what}: a width or precision taken from an argument is not allowed")
    for number in re.findall(r"\d+", spec):
        if len(number.lstrip("0")) > len(str(MAX_WIDTH)) or int(number) > MAX_WIDTH:
            raise _refuse(f"{what}: width {number[:12]} is over {MAX_WIDTH}")


def _check_printf(template: str) -> None:
    for spec in _PRINTF.findall(template):
        _check_widths(spec, "`%` format")


def _count(value: Any, name: str) -> None:
    if isinstance(value, int) and value > MAX_WIDTH:
        raise _refuse(f"{name} {value} is over {MAX_WIDTH}")


def _format(value: Any, *args: Any, **kwargs: Any) -> str:
    _check_printf(str(value))
    return _charge(do_format(value, *args, **kwargs), "format")


def _center(value: str, width: int = 80) -> str:
    _count(width, "center width")
    return _charge(do_center(value, width), "center")


def _indent(value: str, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
    _count(width if isinstance(width, int) else len(width), "indent width")
    return _charge(do_indent(value, width, first, blank), "indent")


@jinja2.pass_eval_context
def _replace(eval_ctx: Any, value: str, old: str, new: str, count: int | None = None) -> str:
    text = str(value)
    found = text.count(str(old)) if old else len(text) + 1
    if count is not None and count >= 0:
        found = min(found, count)
    if len(text) + found * len(str(new)) > MAX_REPLACED:
        raise _refuse(f"`replace` would build over {MAX_REPLACED} characters")
    return _charge(do_replace(eval_ctx, value, old, new, count), "replace")


def _slice(value: Collection[Any], slices: int, fill_with: Any = None) -> Any:
    _count(slices, "slice count")
    return sync_do_slice(value, slices, fill_with)


def _batch(value: Iterable[Any], linecount: int, fill_with: Any = None) -> Any:
    _count(linecount, "batch size")
    return do_batch(value, linecount, fill_with)


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    paragraphs, words = MAX_LIPSUM
    if n > paragraphs or min > words or max > words:
        raise _refuse(f"lipsum is limited to {paragraphs} paragraphs of {words} words")
    return _charge(generate_lorem_ipsum(n, html, min, max), "lipsum")


def _range(*args: int) -> range:
    return _charge(safe_range(*args), "range")


def _sum(environment: Any, iterable: Iterable[Any], attribute: Any = None, start: Any = 0) -> Any:
    if isinstance(start, list | tuple):
        # Adding lists one to the next copies them all each time: quadratic in the items.
        raise _refuse("`sum` adds numbers, not lists")
    return sync_do_sum(environment, iterable, attribute, start)


#: Filters that can build a string or list far larger than their input, each checked before it runs.
_BOUNDED_FILTERS: dict[str, Callable[..., Any]] = {
    "format": _format,
    "center": _center,
    "indent": _indent,
    "replace": _replace,
    "slice": _slice,
    "batch": _batch,
    "sum": jinja2.pass_environment(_sum),
}


#: What a template could print as `<function …>`, `<built-in method …>` or `<class …>`: Python's own objects.
_PYTHON_CALLABLES = (
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.MethodWrapperType,
    type,
)


class _Named:
    """A function, method or class reached from a template: printed, it shows its name, not the Python object
    behind it; called, the sandbox unwraps it first (see `_Sandbox.call`)."""

    def __init__(self, name: str, wrapped: Callable[..., Any]) -> None:
        self._name = name
        self._wrapped = wrapped

    def __repr__(self) -> str:
        return self._name


def _named(value: Any, name: str) -> Any:
    return _Named(name, value) if isinstance(value, _PYTHON_CALLABLES) else value


class _Cycler(Cycler):
    def __repr__(self) -> str:
        return "cycler"


class _Joiner(Joiner):
    def __repr__(self) -> str:
        return "joiner"


class _AtRuntime(CodeGenerator):
    """Folds nothing while compiling: a filter with constant arguments would otherwise run when a rules
    file loads, unbounded (`[1]|slice(10**8)`), outside the checks made at render time."""

    def _output_child_to_const(self, node: nodes.Expr, frame: Frame, finalize: Any) -> str:
        raise nodes.Impossible()


#: A dictionary's own attributes, which Jinja's `a.b` prefers to its key `b` (`items`, `get`, ...).
_DICT_ATTRIBUTES = frozenset(dir(dict))


class _Sandbox(ImmutableSandboxedEnvironment):
    """Refuses internals at the first step (not as a silent undefined), bounds whatever can build a huge
    value from a short source, and reports a source too large or too deep to compile as a syntax error."""

    intercepted_binops = frozenset({"*", "**", "%"})
    code_generator_class = _AtRuntime

    def __init__(self, **options: Any) -> None:
        super().__init__(optimized=False, **options)
        self.filters.update(_BOUNDED_FILTERS)
        self.globals.update(range=_range, lipsum=_lipsum, cycler=_Cycler, joiner=_Joiner)
        self.globals.update({name: _named(value, name) for name, value in self.globals.items()})

    def make_globals(self, d: MutableMapping[str, Any] | None) -> MutableMapping[str, Any]:
        """A template's globals as one plain mapping, over the environment's (all set when it is made), not
        Jinja's chain of the two: every render and condition copies them into its context, twice, and a
        chain made that copying most of a short condition's cost."""
        return {**self.globals, **(d or {})}

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise _refuse(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def getattr(self, obj: Any, attribute: str) -> Any:
        if attribute.startswith("__"):
            # Refused whether or not this object has it: a dunder is never data, and the answer must not
            # depend on what the object is (`lipsum.__globals__` and `range.__globals__` alike).
            return self.unsafe_undefined(obj, attribute)
        if type(obj) is dict and attribute in obj and attribute not in _DICT_ATTRIBUTES:
            # A record's field (`contact.name`): what Jinja finds too, after an attribute lookup that fails.
            return _named(obj[attribute], attribute)
        return _named(super().getattr(obj, attribute), attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        return _named(super().getitem(obj, argument), str(argument))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        # Named as in Jinja, so that no keyword argument of the call can clash with them.
        target = __obj._wrapped if isinstance(__obj, _Named) else __obj
        return super().call(__context, target, *args, **kwargs)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int | float):
            if abs(right) > MAX_EXPONENT:
                raise _refuse(f"exponent {right} is over {MAX_EXPONENT}")
            if (
                isinstance(left, int)
                and isinstance(right, int)
                and left.bit_length() * right > MAX_POWER_BITS
            ):
                raise _refuse(f"`**` would build a number of over {MAX_POWER_BITS} bits")
        if operator == "*":
            for sized, count in ((left, right), (right, left)):
                repeats = isinstance(sized, str | list | tuple) and isinstance(count, int)
                if repeats and _size(sized) * count > MAX_REPEAT:
                    raise _refuse(f"`*` would build over {MAX_REPEAT} items")
        if operator == "%" and isinstance(left, str):
            _check_printf(left)
        built = super().call_binop(context, operator, left, right)
        return _charge(built, f"`{operator}`") if isinstance(built, str | list | tuple) else built

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        template = str(value.__self__)

        def checked(*args: Any, **kwargs: Any) -> str:
            for _, _, spec, _ in string.Formatter().parse(template):
                _check_widths(spec or "", "`.format`")
            return _charge(wrapped(*args, **kwargs), "`.format`")

        return checked

    def compile(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().compile(*args, **kwargs)
        except (RecursionError, SyntaxError) as exc:
            raise jinja2.TemplateSyntaxError("nested too deeply to compile", 1) from exc
        except (ValueError, MemoryError, OverflowError) as exc:
            # A number literal over Python's digit limit, for one: the source's fault, said as a syntax error.
            raise jinja2.TemplateSyntaxError(f"cannot compile: {exc}", 1) from exc


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
    except (ValueError, MemoryError, OverflowError) as exc:
        raise ExpressionError(f"cannot compile: {exc}") from exc


def _present(value: Any) -> Any:
    """A record with its null fields dropped, so a field sent as null reads like one never sent."""
    if isinstance(value, Mapping):
        return {k: v for k, v in value.items() if v is not None}
    return value


def evaluate(source: str, context: Mapping[str, Any]) -> Any:
    """Evaluate a condition; missing or null fields are undefined (falsy), reaching internals is an error."""
    expression = compile_expression(source)
    try:
        with _budget():
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
    """Templates: autoescape for .html, undefined variables are errors, only files under templates_dir.
    A template is read from disk once: an edit goes live when the rules are reloaded (which checks it and
    calls `forget_templates`), not halfway through a save, and a render costs no look at the file's time."""
    return _Sandbox(
        loader=jinja2.FileSystemLoader(str(templates_dir)),
        undefined=jinja2.StrictUndefined,
        autoescape=jinja2.select_autoescape(enabled_extensions=("html", "htm"), default_for_string=False),
        keep_trailing_newline=True,
        auto_reload=False,
    )


def forget_templates(env: jinja2.Environment) -> None:
    """Drop the templates `env` has read, so each is read from disk again when next rendered."""
    if env.cache is not None:
        env.cache.clear()


def render(env: jinja2.Environment, name: str, context: Mapping[str, Any]) -> str:
    try:
        with _budget():
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
