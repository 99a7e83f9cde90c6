"""Reading a webhook body: a fast decoder, and the standard library's reading and words where they differ."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cadence.inbox import parse_json

#: Text without NUL (refused on purpose) or lone surrogates (which UTF-8 cannot carry).
_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))
_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _TEXT,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(_TEXT, inner, max_size=5),
    max_leaves=30,
)


def _same(a: Any, b: Any) -> bool:
    """Equal, and of the same types all the way down (1 is not 1.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


@given(_VALUES, st.booleans())
def test_a_body_reads_as_the_standard_library_reads_it(value: Any, ascii_only: bool) -> None:
    body = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8")
    assert _same(parse_json(body), json.loads(body))


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"id": 123456789012345678901234567890}', {"id": 123456789012345678901234567890}),
        (b'{"id": 18446744073709551616}', {"id": 18446744073709551616}),
        (b"\xef\xbb\xbf{}", {}),  # a byte-order mark
        (b'{"name": "\\ud800"}', {"name": "\ud800"}),  # a lone surrogate, escaped
        (b'{"a": 1, "a": 2}', {"a": 2}),
    ],
)
def test_json_the_fast_decoder_refuses_or_misreads_is_read_as_the_standard_library_reads_it(
    body: bytes, expected: Any
) -> None:
    assert _same(parse_json(body), expected)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"amount": NaN}', "NaN is not a JSON number"),
        (b"[Infinity]", "Infinity is not a JSON number"),
        (b"[1,]", "Expecting value: line 1 column 4"),
        (b'{"name": "a\\u0000b"}', "name contains a NUL character"),
        (b'{"name": "a\x00b"}', "body contains a NUL byte"),
    ],
)
def test_a_body_that_cannot_be_stored_is_refused_in_the_standard_librarys_words(
    body: bytes, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        parse_json(body)
