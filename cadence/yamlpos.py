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


def load(text: str) -> Located:
    """Parse one YAML document; duplicate keys are a syntax error (YAML says keys are unique)."""
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise YamlSyntaxError(f"{exc.problem or exc.context}", line, column) from exc
    located = Located(data=None)
    if node is None:
        return located
    constructor = _Loader("")

    def build(n: yaml.Node, path: Path_) -> Any:
        located.values[path] = _mark(n)
        if isinstance(n, yaml.MappingNode):
            result: dict[str, Any] = {}
            for key_node, value_node in n.value:
                # Keys keep their text whatever they look like.
                key = (
                    key_node.value
                    if isinstance(key_node, yaml.ScalarNode)
                    else str(constructor.construct_object(key_node, deep=True))
                )
                if key in result:
                    line, column = _mark(key_node)
                    raise YamlSyntaxError(f"duplicate key {key!r}", line, column)
                located.keys[(*path, key)] = _mark(key_node)
                result[key] = build(value_node, (*path, key))
            return result
        if isinstance(n, yaml.SequenceNode):
            return [build(item, (*path, i)) for i, item in enumerate(n.value)]
        return constructor.construct_object(n, deep=True)

    located.data = build(node, ())
    return located
