"""Load YAML into plain data while remembering where every key and value stands (1-based line:column)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, cast

import yaml

try:
    from yaml._yaml import CParser as _CParser
except ImportError:  # PyYAML built without libyaml: the pure-Python loader reads every document
    _CParser = None  # type: ignore[assignment,misc]

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
#: What reading a scalar raises when its text does not fit its tag (`!!int ''`, `!!timestamp later`...).
_UNREADABLE = (yaml.YAMLError, ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError)
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
    if _CParser is not None and not _READ_APART.search(text):
        try:
            return _located(_compose_fast(text))
        except (yaml.YAMLError, YamlSyntaxError, _Refused, UnicodeError):
            pass  # read again below, so that every error says what and where exactly as it always has
    return _located(_compose(text))


def _compose(text: str) -> yaml.Node | None:
    """The document's node tree from PyYAML's pure-Python reader, scanner, parser and composer."""
    try:
        return yaml.compose(text, Loader=_Loader)
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        raise YamlSyntaxError(f"character {exc.character!r} is not allowed in YAML", line, column) from exc
    except yaml.YAMLError as exc:
        raise _syntax_error(exc) from exc
    except RecursionError as exc:
        raise YamlSyntaxError(f"nested too deeply (more than {MAX_DEPTH} levels)", 1, 1) from exc


#: The events that begin a node of their own (an alias repeats one).
_Start = yaml.ScalarEvent | yaml.CollectionStartEvent
#: Text libyaml reads otherwise than PyYAML, which refuses a tab between tokens and a comment right after
#: a block scalar's `|` or `>`; and a byte order mark. Such a document is read by PyYAML alone.
_READ_APART = re.compile(r"[\t\ufeff]|[|>][-+0-9]*#")


class _Refused(Exception):
    """What the fast composer raises where PyYAML's would: the pure-Python loader then says what and where."""


def _compose_fast(text: str) -> yaml.Node | None:
    """The same node tree, marks included, from libyaml's events. It is composed in a loop rather than by
    recursion, so no nesting can overflow the stack; it raises wherever PyYAML's composer would."""
    assert _CParser is not None
    events = _CParser(text)
    resolver = _Loader("")
    events.get_event()  # the stream's start
    if events.check_event(yaml.StreamEndEvent):
        return None
    events.get_event()  # the document's start
    anchors: dict[str, yaml.Node] = {}
    open_: list[tuple[yaml.Node, list[yaml.Node]]] = []  # collections begun, with their items so far
    while True:
        event = events.get_event()
        if isinstance(event, yaml.CollectionEndEvent):
            node, items = open_.pop()
            keys, values = items[::2], items[1::2]
            node.value = (
                items if isinstance(node, yaml.SequenceNode) else list(zip(keys, values, strict=True))
            )
        elif isinstance(event, yaml.AliasEvent):
            if event.anchor not in anchors:
                raise _Refused("an undefined alias")
            node = anchors[event.anchor]
        else:
            assert isinstance(event, _Start)
            # libyaml resolves a tag's implicit type, and places an empty value, otherwise than PyYAML.
            if event.tag is not None:
                raise _Refused("a tag")
            if isinstance(event, yaml.ScalarEvent) and not event.value and event.implicit[0]:
                raise _Refused("an empty value")
            node = _node(event, resolver)
            if event.anchor is not None:
                if event.anchor in anchors:
                    raise _Refused("a duplicate anchor")
                anchors[event.anchor] = node
            if isinstance(event, yaml.CollectionStartEvent):
                open_.append((node, []))
                # Deeper than _located accepts: stop before libyaml scans the rest of a nesting bomb.
                if len(open_) > MAX_DEPTH + 1:
                    raise _Refused("nested too deeply")
                continue
        if not open_:
            break
        open_[-1][1].append(node)
    events.get_event()  # the document's end
    if not events.check_event(yaml.StreamEndEvent):
        raise _Refused("more than one document")
    return node


def _node(event: _Start, resolver: _Loader) -> yaml.Node:
    """The node an untagged scalar or collection start stands for, typed as PyYAML's resolver types it."""
    # libyaml's marks are its own type, with the same line and column as PyYAML's.
    start, end = cast(yaml.Mark, event.start_mark), cast(yaml.Mark, event.end_mark)
    kind: type[yaml.Node]
    if isinstance(event, yaml.ScalarEvent):
        tag = resolver.resolve(yaml.ScalarNode, event.value, event.implicit)  # type: ignore[no-untyped-call]
        return yaml.ScalarNode(tag, event.value, start, end, event.style)
    kind = yaml.SequenceNode if isinstance(event, yaml.SequenceStartEvent) else yaml.MappingNode
    tag = resolver.resolve(kind, None, event.implicit)  # type: ignore[no-untyped-call]
    return kind(tag, [], start, None, event.flow_style)


def _located(node: yaml.Node | None) -> Located:
    """Plain data and positions from a node tree, refusing what is not plain data (see load)."""
    located = Located(data=None)
    if node is None:
        return located
    constructor = _Loader("")
    count = 0

    def scalar(n: yaml.Node) -> Any:
        try:
            return constructor.construct_object(n, deep=True)
        except _UNREADABLE as exc:
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
