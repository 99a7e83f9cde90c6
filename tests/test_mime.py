"""The email a touch becomes, read back by the standard library's parser: whatever the names, subject and
bodies, the parser finds exactly what was written, and no value can add a header."""

from __future__ import annotations

import email.header
import email.policy
import email.utils
from datetime import UTC, datetime
from email.message import EmailMessage
from email.parser import BytesParser

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from channels import DeliveryError, Message
from channels.email import build_message

DUE = datetime(2026, 11, 23, 9, 30, tzinfo=UTC)

#: Text a template may render: any character but the line breaks and NUL a header cannot carry.
header_text = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\n\0"), max_size=120)
#: A body: any text, line breaks of every kind included.
body_text = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\0"), max_size=400)
local = st.from_regex(r"[a-z0-9+_-]{1,10}(\.[a-z0-9+_-]{1,8}){0,2}", fullmatch=True)
domain = st.from_regex(r"[a-z0-9]{1,12}(\.[a-z]{2,6}){1,2}", fullmatch=True)
addresses = st.builds(lambda user, host: f"{user}@{host}", local, domain)


def _message(name: str, addr: str, subject: str, text: str, html: str, key: str = "7-0-0") -> Message:
    return Message(
        key=key,
        touch_id=7,
        channel="email",
        contact={"name": name, "email": addr},
        deal=None,
        reason="r",
        due_at=DUE,
        local_date=DUE.date(),
        parts={"subject": subject, "text": text, "html": html},
        sender={"name": "Ivan Sales", "email": "ivan@sales.example"},
    )


def _parse(data: bytes) -> EmailMessage:
    parsed = BytesParser(policy=email.policy.default).parsebytes(data)
    assert isinstance(parsed, EmailMessage)
    return parsed


def _display_name(data: bytes) -> str:
    """The To header's name as RFC 2047 reads it: the space between two encoded words is not part of the
    name. (The standard library's address parser keeps one there, for its own long names too.)"""
    raw = str(email.message_from_bytes(data)["To"])
    name, _ = email.utils.parseaddr(raw)
    return str(email.header.make_header(email.header.decode_header(name)))


def _lines(text: str) -> list[str]:
    """Text as its lines: the parts are sent with one kind of line break, whatever the template used, and
    end with one (an empty part is one empty line)."""
    return [line.decode() for line in text.encode().splitlines()] or [""]  # \r, \n and \r\n only


def _content(parsed: EmailMessage, subtype: str) -> str:
    part = parsed.get_body((subtype,))
    assert part is not None
    content = part.get_content()
    assert isinstance(content, str)
    return content


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=header_text, addr=addresses, subject=header_text, text=body_text, html=body_text)
def test_the_parser_reads_back_every_name_subject_and_body(
    name: str, addr: str, subject: str, text: str, html: str
) -> None:
    for linesep in ("\n", "\r\n"):
        data = build_message(_message(name, addr, subject, text, html), "sales.example", linesep=linesep)

        parsed = _parse(data)
        assert not parsed.defects
        [to] = parsed["To"].addresses
        assert to.addr_spec == addr
        assert _display_name(data) == name
        if name.isprintable() and name.isascii():  # written as it is or quoted: see _display_name
            assert to.display_name == name
        assert str(parsed["Subject"]) == subject
        assert parsed.get_content_type() == "multipart/alternative"
        assert [p.get_content_type() for p in parsed.iter_parts()] == ["text/plain", "text/html"]
        assert _lines(_content(parsed, "plain")) == _lines(text)
        assert _lines(_content(parsed, "html")) == _lines(html)
        assert parsed["Message-ID"] == "<touch-7-0-0@sales.example>"
        assert parsed["Date"].datetime == DUE


@settings(max_examples=100, deadline=None)
@given(name=header_text, subject=header_text)
@example(name="a" * 72 + "  " + "b" * 78, subject="x" * 75 + " y")
def test_header_lines_are_folded_at_78_columns_unless_one_word_is_longer(name: str, subject: str) -> None:
    data = build_message(_message(name, "anna@example.com", subject, "x", "y"), "sales.example")
    head = data.split(b"\n\n", 1)[0].decode("utf-8")
    for line in head.split("\n"):
        assert len(line) <= 78 or " " not in line.strip(), line
        assert line.strip(), "a folded line of whitespace alone"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", "Anna\r\nBcc: everyone@example.com"),
        ("name", "Anna\nBcc: everyone@example.com"),
        ("subject", "Hello\rBcc: everyone@example.com"),
        ("subject", "Hello\0"),
    ],
)
def test_a_line_break_in_a_header_value_is_refused_not_written(field: str, value: str) -> None:
    values = {"name": "Anna", "subject": "Hello", field: value}
    with pytest.raises(DeliveryError, match="line break"):
        build_message(_message(values["name"], "anna@example.com", values["subject"], "t", "h"), "x.example")


@pytest.mark.parametrize(
    "addr",
    [
        "",
        "anna",
        "anna@",
        "@example.com",
        "anna petrova@example.com",
        "a<b>@c.d",
        "a\x01@b.c",
        "a\x7f@b.c",
        ".@.",
        "a..b@c.d",
        "a@b..c",
        "a.@b.c",
    ],
)
def test_what_is_not_an_email_address_is_refused_for_good(addr: str) -> None:
    with pytest.raises(DeliveryError, match=r"contact address .* is not an email address") as refused:
        build_message(_message("Anna", addr, "Hello", "t", "h"), "x.example")
    assert not refused.value.transient


def test_the_boundary_is_one_neither_body_contains() -> None:
    taken = "--=_cadence_7-0-0_0\nand --=_cadence_7-0-0_1"
    data = build_message(_message("Anna", "anna@example.com", "Hi", taken, taken), "x.example")

    parsed = _parse(data)
    assert parsed.get_boundary() == "=_cadence_7-0-0_2"
    assert _lines(_content(parsed, "plain")) == _lines(taken)


def test_the_same_touch_gives_the_same_bytes() -> None:
    message = _message("Анна", "anna@example.com", "Привет", "текст", "<p>html</p>")
    assert build_message(message, "x.example") == build_message(message, "x.example")


@pytest.mark.parametrize(
    ("text", "encoding"),
    [
        ("short ASCII lines\n", "7bit"),
        ("короткие строки\n", "8bit"),
        ("a long line " * 20 + "\n", "quoted-printable"),
        ("длинная строка " * 20 + "\n", "base64"),
        ("a NUL \0 and a bell \a in short lines\n", "quoted-printable"),
    ],
)
def test_a_body_is_sent_as_it_is_when_its_lines_fit_else_encoded(text: str, encoding: str) -> None:
    parsed = _parse(build_message(_message("Anna", "anna@example.com", "Hi", text, text), "x.example"))

    for part in parsed.iter_parts():
        assert part["Content-Transfer-Encoding"] == encoding
        assert part.get_content() == text
    raw = build_message(_message("Anna", "anna@example.com", "Hi", text, text), "x.example")
    assert max(len(line) for line in raw.split(b"\n")) <= 78


def test_wire_format_uses_crlf_throughout() -> None:
    data = build_message(
        _message("Анна", "anna@example.com", "Привет " * 20, "a\nb\n", "<p>" + "x " * 60 + "</p>"),
        "x.example",
        linesep="\r\n",
    )
    assert b"\n" not in data.replace(b"\r\n", b"")
