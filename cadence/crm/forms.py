"""Form-encoded bodies with PHP-style nested keys (`leads[status][0][id]=…`), read strictly into dicts and
lists: amoCRM and Bitrix24 send them."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl

#: Levels of brackets one key may have (amoCRM's deepest is leads[status][0][custom_fields][0][values][0][x]).
MAX_DEPTH = 10
#: Fields one body may have.
MAX_FIELDS = 5000
#: Characters one key may have.
MAX_KEY_LENGTH = 500

_KEY = re.compile(r"([^\[\]]+)((?:\[[^\[\]]*\])*)")
_PART = re.compile(r"\[([^\[\]]*)\]")


class FormError(ValueError):
    """A body that is not a well-formed form; `field` names the key at fault."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def parse_form(body: bytes) -> dict[str, Any]:
    """The body as nested dicts; a dict whose keys are all numbers becomes a list in their order."""
    try:
        text = body.decode("utf-8")
        pairs = parse_qsl(
            text, keep_blank_values=True, strict_parsing=True, errors="strict", max_num_fields=MAX_FIELDS
        )
    except UnicodeDecodeError as exc:
        raise FormError(f"not a form body: {exc.reason} at byte {exc.start}") from exc
    except ValueError as exc:
        raise FormError(f"not a form body: {exc}") from exc
    root: dict[str, Any] = {}
    for key, value in pairs:
        _put(root, key, value)
    listed: dict[str, Any] = _listed(root)  # names at the top, so a dict
    return listed


def _put(root: dict[str, Any], key: str, value: str) -> None:
    if "\x00" in key or "\x00" in value:
        raise FormError("a field contains a NUL character", key[:100])
    if len(key) > MAX_KEY_LENGTH:
        raise FormError(f"a key is over {MAX_KEY_LENGTH} characters", key[:100])
    match = _KEY.fullmatch(key)
    if match is None:
        raise FormError(f"malformed key {key!r}: expected name[part][part]…", key)
    parts = [match.group(1), *_PART.findall(match.group(2))]
    if len(parts) > MAX_DEPTH:
        raise FormError(f"key {key!r} nests deeper than {MAX_DEPTH} levels", key)
    node = root
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if part == "":  # name[] appends
            part = str(sum(1 for k in node if k.isdigit()))
        if last:
            if part in node:
                raise FormError(f"key {key!r} is given twice or clashes with a nested key", key)
            node[part] = value
            return
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise FormError(f"key {key!r} nests under a field that has a value", key)
        node = child


def _listed(node: dict[str, Any]) -> Any:
    items = {k: _listed(v) if isinstance(v, dict) else v for k, v in node.items()}
    if items and all(k.isdigit() for k in items):
        return [items[k] for k in sorted(items, key=int)]
    return items
