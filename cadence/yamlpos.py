"""Load YAML into plain data while remembering where every key and value stands (1-based line:column)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

Path_ = tuple[str | int, ...]


@dataclass
class Located:
    """Plain data plus the positions of its values and keys, keyed by path (e.g. ("steps", 0, "day"))."""

    data: Any
    values: dict[Path_, tuple[int, int]] = field(default_factory=dict)
    keys: dict[Path_, tuple[int, int]] = field(default_factory=dict)

    def where(self, path: Path_, *, key: bool = False) -> tuple[int, int]:
        """Position of a value (or of its key), else of the nearest enclosing node that exists."""
        if key and path in self.keys:
            return self.keys[path]
        for end in range(len(path), -1, -1):
            if path[:end] in self.values:
                return self.values[path[:end]]
        return (1, 1)


class YamlSyntaxError(Exception):
    def __init__(self, message: str, line: int, column: int) -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.column = column


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans, only true/false: YAML 1.1 also reads yes/no/on/off, so `country: NO` was False."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _mark(node: yaml.Node) -> tuple[int, int]:
    return (node.start_mark.line + 1, node.start_mark.column + 1)


#: Values the document may hold at most, counting every alias expansion (an alias bomb stops here).
MAX_NODES = 100_000
#: Deepest nesting of mappings and lists accepted.
MAX_DEPTH = 64
#: The only tags a rules document may carry: YAML's core types; anything else is refused, never built.
_CORE = "tag:yaml.org,2002:"
_ALLOWED_TAGS = frozenset(
    _CORE + name for name in ("str", "int", "float", "bool", "null", "seq", "map", "timestamp")
)


def _syntax_error(exc: yaml.YAMLError) -> YamlSyntaxError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if mark is not None:
        problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc)
        return YamlSyntaxError(str(problem), mark.line + 1, mark.column + 1)
    return YamlSyntaxError(str(exc), 1, 1)


def load(text: str) -> Located:
    """Parse one YAML document into plain data with positions, refusing anything but plain data.

    Duplicate keys are an error (YAML says keys are unique), and so are tags beyond the core types,
    nesting deeper than MAX_DEPTH and documents that expand (through aliases) past MAX_NODES values.
    """
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        raise YamlSyntaxError(f"character {exc.character!r} is not allowed in YAML", line, column) from exc
    except yaml.YAMLError as exc:
        raise _syntax_error(exc) from exc
    except RecursionError as exc:
        raise YamlSyntaxError(f"nested too deeply (more than {MAX_DEPTH} levels)", 1, 1) from exc
    located = Located(data=None)
    if node is None:
        return located
    constructor = _Loader("")
    count = 0

    def scalar(n: yaml.Node) -> Any:
        try:
            return constructor.construct_object(n, deep=True)
        except (yaml.YAMLError, ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
            line, column = _mark(n)
            raise YamlSyntaxError(f"cannot read the value {n.value!r}: {exc}", line, column) from exc

    def build(n: yaml.Node, path: Path_, open_: tuple[int, ...]) -> Any:
        nonlocal count
        line, column = _mark(n)
        count += 1
        if count > MAX_NODES:
            raise YamlSyntaxError(f"the document expands to more than {MAX_NODES} values", line, column)
        if len(open_) > MAX_DEPTH:
            raise YamlSyntaxError(f"nested too deeply (more than {MAX_DEPTH} levels)", line, column)
        if id(n) in open_:
            raise YamlSyntaxError("an alias refers to a value that contains it", line, column)
        if n.tag not in _ALLOWED_TAGS:
            raise YamlSyntaxError(f"tag {n.tag!r} is not allowed: write plain values", line, column)
        located.values[path] = (line, column)
        inner = (*open_, id(n))
        if isinstance(n, yaml.MappingNode):
            result: dict[str, Any] = {}
            for key_node, value_node in n.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    key_line, key_column = _mark(key_node)
                    raise YamlSyntaxError("a key must be plain text", key_line, key_column)
                # Keys keep their text whatever they look like.
                key = key_node.value
                if key in result:
                    key_line, key_column = _mark(key_node)
                    raise YamlSyntaxError(f"duplicate key {key!r}", key_line, key_column)
                located.keys[(*path, key)] = _mark(key_node)
                result[key] = build(value_node, (*path, key), inner)
            return result
        if isinstance(n, yaml.SequenceNode):
            return [build(item, (*path, i), inner) for i, item in enumerate(n.value)]
        return scalar(n)

    located.data = build(node, (), ())
    return located
