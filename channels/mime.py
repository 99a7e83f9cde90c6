"""A multipart text + HTML email written straight to bytes.

The standard library's `email` package builds a message as objects, parses every header it is given and
then writes it all out again: for a touch that was most of the cost of sending it. The messages Cadence
sends have one fixed shape, so they are written directly, to the same standards: headers folded at 78
columns; non-ASCII names and subjects as RFC 2047 encoded words; bodies as 7bit or 8bit when their lines
fit, else quoted-printable (or base64 when most of the text is not ASCII); a boundary found in neither
part. A header value with a line break in it is refused, never written: no rendered value can add a
header of its own.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable

from channels import DeliveryError

#: Where a header is folded (RFC 5322 asks for 78 columns), and the longest body line sent as it is.
LINE = 78
#: Bytes of UTF-8 in one encoded word: base64 makes 52 characters of them, 64 with `=?utf-8?b?` and `?=`,
#: so that one fits on a line after `Subject: ` too.
WORD_BYTES = 39

#: An address Cadence sends to: dot-atoms (RFC 5322) on either side of the @, of printable characters
#: (UTF-8 ones too, for SMTPUTF8) other than spaces and the separators.
_ATEXT = r'[^\x00-\x20\x7f-\x9f()<>\[\]:;@\\,."]+'
_ADDRESS = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*@{_ATEXT}(?:\.{_ATEXT})*")
#: A name written as it is: atoms of RFC 5322 `atext`, one space apart.
_ATOMS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?: [A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
#: Printable ASCII and spaces: text a header may carry as it is.
_PRINTABLE = re.compile(r"[ -~]*")
_LINE_BREAK = re.compile(r"[\r\n\0]")
#: Characters 7bit and 8bit bodies may not carry (RFC 2045): control characters but tabs and line breaks.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def address(name: str, addr: str, role: str) -> str:
    """`Name <addr>`, the name quoted or encoded as it needs; the bare address without a name."""
    if not addr or not _ADDRESS.fullmatch(addr):
        raise DeliveryError(f"{role} address {addr!r} is not an email address")
    if not name:
        return addr
    _refuse_line_breaks(role, name)
    # A name with `=?` in it is encoded: some readers decode what looks like an encoded word even in quotes.
    if "=?" in name or not _PRINTABLE.fullmatch(name):
        shown = " ".join(_encoded_words(name))
    elif _ATOMS.fullmatch(name):
        shown = name
    else:
        shown = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{shown} <{addr}>"


def header(name: str, value: str, linesep: str) -> str:
    """One unstructured header (a subject), folded: as it is if it is plain ASCII that reads the same
    decoded, else as encoded words."""
    _refuse_line_breaks(name, value)
    words = value.split(" ")
    plain = (
        _PRINTABLE.fullmatch(value)
        and "=?" not in value
        and len(f"{name}: {words[0]}") <= LINE
        and all(0 < len(word) < LINE for word in words)
    )
    if not plain and value:
        words = _encoded_words(value)
    return _fold(f"{name}:", words, linesep)


def structured(name: str, value: str, linesep: str) -> str:
    """A header whose value is already in its final form (addresses, a date, an id): folded at spaces."""
    _refuse_line_breaks(name, value)
    return _fold(f"{name}:", value.split(" "), linesep)


def message(
    headers: Iterable[str], text: str, html: str, *, boundary_seed: str, linesep: str = "\n"
) -> bytes:
    """The whole message: `headers` (already made by `header`, `structured` or `address`), then the text
    and HTML alternatives. `boundary_seed` makes the boundary (the touch key: rewrites give the same file)."""
    parts = [_part("plain", text, linesep), _part("html", html, linesep)]
    boundary = _boundary(boundary_seed, parts)
    sep = linesep.encode()
    head = linesep.join(
        [
            *headers,
            "MIME-Version: 1.0",
            f'Content-Type: multipart/alternative;{linesep} boundary="{boundary}"',
        ]
    )
    delimiter = b"--" + boundary.encode()
    out = [head.encode("utf-8"), sep, sep]
    for part in parts:
        out += [delimiter, sep, part, sep]
    out += [delimiter, b"--", sep]
    return b"".join(out)


def _refuse_line_breaks(name: str, value: str) -> None:
    if _LINE_BREAK.search(value):
        raise DeliveryError(f"{name} {value!r} has a line break; a header value may not have one")


def _encoded_words(value: str) -> list[str]:
    """`value` as RFC 2047 base64 words of at most WORD_BYTES bytes each, never splitting a character."""
    words = []
    chunk: list[bytes] = []
    size = 0
    for char in value:
        data = char.encode("utf-8")
        if size + len(data) > WORD_BYTES:
            words.append(b"".join(chunk))
            chunk, size = [], 0
        chunk.append(data)
        size += len(data)
    words.append(b"".join(chunk))
    return [f"=?utf-8?b?{base64.b64encode(word).decode('ascii')}?=" for word in words]


def _fold(start: str, words: list[str], linesep: str) -> str:
    """`start` and the words one space apart, a line break put before a space where a line would pass
    LINE columns (a word longer than a line stays whole)."""
    first, *rest = words
    lines = [f"{start} {first}"]  # a value folded before its first word would read as starting with a space
    for word in rest:
        if word and len(lines[-1]) + 1 + len(word) > LINE:  # never a line of spaces alone
            lines.append(" " + word)
        else:
            lines[-1] += " " + word
    return linesep.join(lines)


def _part(subtype: str, content: str, linesep: str) -> bytes:
    """One alternative's headers and body. Lines that fit are sent as they are (7bit, or 8bit for UTF-8);
    longer ones, or control characters, as quoted-printable (base64 if most of the text is not ASCII)."""
    lines = content.encode("utf-8").splitlines()
    sep = linesep.encode()
    data = b"\n".join(lines) + b"\n"
    if max((len(line) for line in lines), default=0) <= LINE and not _CONTROL.search(content):
        cte = "7bit" if content.isascii() else "8bit"
        body = data
    elif (len(data) - len(content.encode("ascii", "ignore"))) * 3 > len(data):  # mostly not ASCII
        cte = "base64"
        body = base64.encodebytes(data)
    else:
        cte = "quoted-printable"
        body = binascii.b2a_qp(data, istext=True)
    if linesep != "\n":
        body = body.replace(b"\n", sep)
    head = f'Content-Type: text/{subtype}; charset="utf-8"{linesep}Content-Transfer-Encoding: {cte}'
    return head.encode() + sep + sep + body


def _boundary(seed: str, parts: list[bytes]) -> str:
    """A boundary no line of the parts starts with (RFC 2046 asks only that)."""
    n = 0
    while True:
        boundary = f"=_cadence_{seed}_{n}"
        marker = b"--" + boundary.encode()
        if not any(marker in part for part in parts):
            return boundary
        n += 1
