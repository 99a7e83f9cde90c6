"""YAML documents validated against pydantic models, every problem located (file:line:col) with a hint."""

from __future__ import annotations

import difflib
import re
import types
from typing import Any, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from cadence import yamlpos
from cadence.errors import Problem, RulesError

M = TypeVar("M", bound=BaseModel)

#: Hints for required keys whose absence says something about the domain.
_MISSING_HINTS = {"reason": "every touch needs a reason: the new information it brings"}


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The model classes an annotation can hold (through Optional, Annotated, lists, tuples, dicts)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if get_origin(annotation) in (Union, types.UnionType) or get_args(annotation):
        return [m for arg in get_args(annotation) for m in _models_in(arg)]
    return []


def allowed_keys(root: type[BaseModel], loc: tuple[str | int, ...]) -> list[str]:
    """The keys valid in the mapping that holds loc[-1], found by walking the model along loc."""
    models: list[type[BaseModel]] = [root]
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        following = [
            m
            for model in models
            if part in model.model_fields
            for m in _models_in(model.model_fields[part].annotation)
        ]
        models = following or models
    return sorted({key for model in models for key in model.model_fields})


def problem(file: str, located: yamlpos.Located, error: Any, root: type[BaseModel]) -> Problem:
    loc = tuple(error["loc"])
    kind = error["type"]
    where = ".".join(str(p) for p in loc) or "document"
    if kind == "extra_forbidden":
        key = str(loc[-1])
        valid = allowed_keys(root, loc)
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        suggestion = f"did you mean {close[0]!r}?" if close else f"valid keys here: {', '.join(valid)}"
        line, column = located.where(loc, key=True)
        return Problem(file, line, column, f"unknown key {key!r} at {where}", suggestion)
    line, column = located.where(loc)
    message = str(error["msg"]).removeprefix("Value error, ")
    hint: str | None = None
    if kind == "missing":
        message = f"{where} is required"
        hint = _MISSING_HINTS.get(str(loc[-1]))
    elif kind == "literal_error" and isinstance(error.get("input"), str):
        choices = re.findall(r"'([^']+)'", error.get("ctx", {}).get("expected", ""))
        close = difflib.get_close_matches(error["input"], choices, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}?" if close else None
        message = f"{where}: {message}"
    else:
        message = f"{where}: {message}"
    return Problem(file, line, column, message, hint)


def validate(text: str, file: str, root: type[M], shape: str) -> tuple[M, yamlpos.Located]:
    """Load and validate one document; RulesError carries every problem, sorted by position.

    `shape` says what the document should look like, for a document that is not a mapping at all.
    """
    try:
        located = yamlpos.load(text)
    except yamlpos.YamlSyntaxError as exc:
        raise RulesError([Problem(file, exc.line, exc.column, f"YAML syntax: {exc.message}")]) from exc
    if not isinstance(located.data, dict):
        raise RulesError([Problem(file, 1, 1, f"expected {shape}")])
    try:
        return root.model_validate(located.data), located
    except ValidationError as exc:
        errors = exc.errors()
        # A list whose items failed is also reported as too short; the item errors say more.
        deeper = {tuple(e["loc"][:n]) for e in errors for n in range(len(e["loc"]))}
        errors = [e for e in errors if not (e["type"] == "too_short" and tuple(e["loc"]) in deeper)]
        found = sorted((problem(file, located, e, root) for e in errors), key=lambda p: (p.line, p.column))
        raise RulesError(found) from exc
