"""The outbox channels, one provider at a time: what each writes, and how it behaves when sent twice."""

from __future__ import annotations

import email.policy
import errno
import json
import os
import shutil
import stat
import threading
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, date, datetime
from email.message import EmailMessage
from email.parser import BytesParser
from html import escape
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from harness import make_settings
from sqlmodel import select

import channels
from cadence import sandbox, store
from cadence.clock import ManualClock
from cadence.engine import contact_view_from
from cadence.models import CadenceVersion, CallTask, Contact, Deal, Enrollment, Touch
from cadence.service import build_channels
from channels import Channel, Message, write_atomically
from channels.call import CallTasks, script_html
from channels.email import EmailOutbox
from channels.letter import LetterOutbox
from channels.sms import SmsOutbox

NOW = datetime(2026, 11, 23, 6, 0, tzinfo=UTC)
SENDER = {
    "name": "Ivan Sales",
    "company": "Cadence Ltd",
    "email": "ivan@sales.example",
    "phone": "+74950000000",
    "address": "Lubyanka 2, Moscow",
}
CONTACT = contact_view_from(
    {
        "id": 1,
        "name": "Anna Petrova",
        "email": "anna@example.com",
        "phone": "+79161234567",
        "address": "Tverskaya 1\n125009 Moscow",
        "company": "Northwind",
        "timezone": "Europe/Moscow",
    }
)


def _message(channel: str, parts: Mapping[str, str], key: str = "7-0-0", **contact: Any) -> Message:
    return Message(
        key=key,
        touch_id=1,
        channel=channel,
        contact={**CONTACT, **contact},
        deal={"id": 1, "title": "CRM rollout", "owner": "ivan"},
        reason="Recap of the proposal.",
        due_at=NOW,
        local_date=date(2026, 11, 23),
        parts=parts,
        sender=SENDER,
    )


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- email --------------------------------------------------------------------------------------------------


@pytest.fixture
def templates(tmp_path: Path) -> Path:
    folder = tmp_path / "templates" / "email"
    folder.mkdir(parents=True)
    (folder / "hello.txt").write_text(
        "Subject: {{ deal.title }} for {{ contact.first_name }}\n\nHello {{ contact.name }},\nthe recap.\n"
    )
    (folder / "hello.html").write_text("<p>Hello {{ contact.name }},</p><p>the recap.</p>\n")
    (folder / "nosubject.txt").write_text("Hello {{ contact.name }}\n")
    (folder / "nosubject.html").write_text("<p>Hello</p>\n")
    return tmp_path / "templates"


def _rendered_email(templates: Path, template: str = "email/hello", **contact: Any) -> Message:
    env = sandbox.template_environment(templates)
    message = _message("email", {}, **contact)
    parts = EmailOutbox(templates).render(env, template, {"contact": message.contact, "deal": message.deal})
    return replace(message, parts=parts)


def _parse(path: Path) -> EmailMessage:
    with path.open("rb") as handle:
        parsed = BytesParser(policy=email.policy.default).parse(handle)
    assert isinstance(parsed, EmailMessage)
    return parsed


def test_email_outbox_writes_a_multipart_eml_with_text_and_html(tmp_path: Path, templates: Path) -> None:
    message = _rendered_email(templates)

    receipt = EmailOutbox(tmp_path / "outbox").send(message)

    path = tmp_path / "outbox" / "email" / "7-0-0.eml"
    assert receipt.reference == str(path)
    parsed = _parse(path)
    assert parsed.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in parsed.iter_parts()] == ["text/plain", "text/html"]
    text = parsed.get_body(("plain",))
    html = parsed.get_body(("html",))
    assert text is not None and html is not None
    assert text.get_content() == "Hello Anna Petrova,\nthe recap.\n"
    assert html.get_content() == "<p>Hello Anna Petrova,</p><p>the recap.</p>\n"


def test_email_subject_is_the_templates_first_line_and_not_part_of_the_body(
    tmp_path: Path, templates: Path
) -> None:
    message = _rendered_email(templates)

    EmailOutbox(tmp_path / "outbox").send(message)

    parsed = _parse(tmp_path / "outbox" / "email" / "7-0-0.eml")
    assert parsed["Subject"] == "CRM rollout for Anna"
    text = parsed.get_body(("plain",))
    assert text is not None and "Subject" not in text.get_content()


def test_email_template_without_a_subject_line_is_a_template_error(templates: Path) -> None:
    with pytest.raises(sandbox.TemplateError, match="Subject"):
        _rendered_email(templates, "email/nosubject")


def test_email_headers_carry_the_touch_key_and_both_addresses(tmp_path: Path, templates: Path) -> None:
    EmailOutbox(tmp_path / "outbox").send(_rendered_email(templates))

    parsed = _parse(tmp_path / "outbox" / "email" / "7-0-0.eml")
    assert "touch-7-0-0" in parsed["Message-ID"]
    assert parsed["Message-ID"].endswith("@sales.example>")
    [to] = parsed["To"].addresses
    [sender] = parsed["From"].addresses
    assert (to.display_name, to.addr_spec) == ("Anna Petrova", "anna@example.com")
    assert (sender.display_name, sender.addr_spec) == ("Ivan Sales", "ivan@sales.example")


@pytest.mark.parametrize(
    "name",
    [
        "Anna Petrova",
        "Анна Петрова",
        "Petrova, Anna",
        "Петрова, Анна",
        'Anna "the boss" Petrova',
        "Anna <boss@elsewhere.example>",
        "Анна (CEO)",
        "Анна <boss@elsewhere.example>",
    ],
    ids=[
        "latin",
        "cyrillic",
        "latin-comma",
        "cyrillic-comma",
        "quotes",
        "latin-angle-brackets",
        "cyrillic-parentheses",
        "cyrillic-angle-brackets",
    ],
)
def test_email_goes_to_the_contacts_address_under_the_contacts_name(
    tmp_path: Path, templates: Path, name: str
) -> None:
    EmailOutbox(tmp_path / "outbox").send(_rendered_email(templates, name=name))

    parsed = _parse(tmp_path / "outbox" / "email" / "7-0-0.eml")
    assert [(a.display_name, a.addr_spec) for a in parsed["To"].addresses] == [(name, "anna@example.com")]


def test_email_without_a_name_is_addressed_to_the_bare_address(tmp_path: Path, templates: Path) -> None:
    EmailOutbox(tmp_path / "outbox").send(_rendered_email(templates, name=None))

    parsed = _parse(tmp_path / "outbox" / "email" / "7-0-0.eml")
    assert [a.addr_spec for a in parsed["To"].addresses] == ["anna@example.com"]


def test_email_html_part_escapes_the_contacts_name(tmp_path: Path, templates: Path) -> None:
    EmailOutbox(tmp_path / "outbox").send(_rendered_email(templates, name="<b>Anna</b> & Co"))

    html = _parse(tmp_path / "outbox" / "email" / "7-0-0.eml").get_body(("html",))
    assert html is not None
    assert "&lt;b&gt;Anna&lt;/b&gt; &amp; Co" in html.get_content()
    assert "<b>" not in html.get_content()


def test_email_sent_twice_with_the_same_key_leaves_one_file(tmp_path: Path, templates: Path) -> None:
    outbox = EmailOutbox(tmp_path / "outbox")
    message = _rendered_email(templates)

    first = outbox.send(message)
    second = outbox.send(message)

    assert first == second
    assert _files(tmp_path / "outbox" / "email") == ["7-0-0.eml"]
    assert _parse(tmp_path / "outbox" / "email" / "7-0-0.eml")["Subject"] == "CRM rollout for Anna"


def test_email_with_another_key_is_another_file(tmp_path: Path, templates: Path) -> None:
    outbox = EmailOutbox(tmp_path / "outbox")
    message = _rendered_email(templates)

    outbox.send(message)
    outbox.send(replace(message, key="7-1-0"))

    assert _files(tmp_path / "outbox" / "email") == ["7-0-0.eml", "7-1-0.eml"]


# --- sms ----------------------------------------------------------------------------------------------------


def _sms_lines(outbox: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (outbox / "sms.jsonl").read_text(encoding="utf-8").splitlines()]


def test_sms_outbox_appends_one_json_line_per_send(tmp_path: Path) -> None:
    outbox = SmsOutbox(tmp_path)
    texts = {"1-4-0": "Round table on Friday. Reply YES.\n", "2-4-0": "Круглый стол в пятницу — ответьте ДА."}

    for key, text in texts.items():
        outbox.send(_message("sms", {"text": text}, key=key, phone=f"+7916000000{key[0]}"))

    lines = _sms_lines(tmp_path)
    assert [(line["key"], line["to"], line["text"]) for line in lines] == [
        ("1-4-0", "+79160000001", "Round table on Friday. Reply YES."),
        ("2-4-0", "+79160000002", "Круглый стол в пятницу — ответьте ДА."),
    ]
    assert {line["reason"] for line in lines} == {"Recap of the proposal."}
    assert {line["from"] for line in lines} == {SENDER["phone"]}


def test_sms_outbox_keeps_earlier_lines(tmp_path: Path) -> None:
    (tmp_path / "sms.jsonl").write_text('{"key": "earlier"}\n', encoding="utf-8")

    SmsOutbox(tmp_path).send(_message("sms", {"text": "hi"}))

    assert [line["key"] for line in _sms_lines(tmp_path)] == ["earlier", "7-0-0"]


def test_sms_channel_says_a_lost_send_may_not_be_repeated() -> None:
    assert SmsOutbox.idempotent is False
    assert EmailOutbox.idempotent and LetterOutbox.idempotent and CallTasks.idempotent


# --- letter -------------------------------------------------------------------------------------------------


def _address_block(page: str) -> str:
    start = page.index('<div class="address">') + len('<div class="address">')
    return page[start : page.index("</div>", start)]


def test_letter_page_has_the_escaped_address_block_and_the_body(tmp_path: Path) -> None:
    body = "<p>Dear Anna,</p>\n<p>The <strong>business case</strong> on one page.</p>\n"
    message = _message(
        "letter", {"html": body}, address="Tverskaya 1 & 3\n125009 Moscow", company="R&D <Ltd>"
    )

    receipt = LetterOutbox(tmp_path).send(message)

    path = tmp_path / "letters" / "7-0-0.html"
    assert receipt.reference == str(path)
    page = path.read_text(encoding="utf-8")
    assert _address_block(page) == "Anna Petrova\nR&amp;D &lt;Ltd&gt;\nTverskaya 1 &amp; 3\n125009 Moscow"
    assert body in page
    assert escape("Cadence Ltd · Lubyanka 2, Moscow") in page
    assert "2026-11-23" in page


def test_letter_escapes_html_in_the_contacts_name(tmp_path: Path) -> None:
    name = '<script>alert("x")</script> Anna'

    LetterOutbox(tmp_path).send(_message("letter", {"html": "<p>Hello</p>"}, name=name))

    page = (tmp_path / "letters" / "7-0-0.html").read_text(encoding="utf-8")
    assert "<script>" not in page
    assert _address_block(page).startswith(escape(name))


def test_letter_sent_twice_with_the_same_key_leaves_one_page(tmp_path: Path) -> None:
    outbox = LetterOutbox(tmp_path)
    message = _message("letter", {"html": "<p>Hello</p>"})

    outbox.send(message)
    outbox.send(message)

    assert _files(tmp_path / "letters") == ["7-0-0.html"]


# --- call ---------------------------------------------------------------------------------------------------


def _touch_row(db: sa.Engine) -> tuple[int, int, int]:
    """A contact, deal, enrollment and call touch in the store; (touch id, contact id, deal id)."""
    with store.session(db) as s:
        contact = Contact(source="generic", external_id="c-1", created_at=NOW, updated_at=NOW)
        version = CadenceVersion(
            name="open-deal", content_hash="x", yaml_text="", file="x.yaml", created_at=NOW
        )
        s.add_all([contact, version])
        s.flush()
        deal = Deal(
            source="generic", external_id="d-1", contact_id=contact.id, created_at=NOW, updated_at=NOW
        )
        s.add(deal)
        s.flush()
        enrollment = Enrollment(
            cadence_name="open-deal",
            cadence_version_id=version.id or 0,
            subject=f"deal:{deal.id}",
            contact_id=contact.id or 0,
            deal_id=deal.id,
            started_at=NOW,
        )
        s.add(enrollment)
        s.flush()
        touch = Touch(
            enrollment_id=enrollment.id or 0,
            step_index=1,
            channel="call",
            template="call/x",
            reason="r",
            due_at=NOW,
        )
        s.add(touch)
        s.flush()
        return touch.id or 0, contact.id or 0, deal.id or 0


def test_call_channel_creates_one_call_task_per_touch_even_when_sent_twice(db: sa.Engine) -> None:
    touch_id, contact_id, deal_id = _touch_row(db)
    channel = CallTasks(db, ManualClock(NOW))
    message = replace(
        _message("call", {"script": "# Call Anna\nAsk about the proposal."}),
        touch_id=touch_id,
        contact={**CONTACT, "id": contact_id},
        deal={"id": deal_id, "owner": "ivan"},
        local_date=date(2026, 11, 25),
    )

    first = channel.send(message)
    second = channel.send(message)

    assert first == second
    with store.session(db) as s:
        [task] = s.exec(select(CallTask)).all()
    assert first.reference == f"call_task:{task.id}"
    assert (task.touch_id, task.owner, task.due_date, task.contact_id, task.deal_id) == (
        touch_id,
        "ivan",
        date(2026, 11, 25),
        contact_id,
        deal_id,
    )
    assert (task.phone, task.contact_name, task.reason, task.status) == (
        "+79161234567",
        "Anna Petrova",
        "Recap of the proposal.",
        "open",
    )
    assert task.script == "# Call Anna\nAsk about the proposal."


def test_a_call_script_is_commonmark_with_markup_shown_as_text_and_unsafe_links_dropped() -> None:
    html = script_html(
        "# Call Anna\n\n**Why:** the proposal\n\n1. first\n2. second\n   - nested\n\n"
        "Anna <img src=x onerror=alert(1)> & co · [site](https://example.com) [bad](javascript:alert(1))\n"
    )

    assert html.startswith(
        "<h1>Call Anna</h1>\n<p><strong>Why:</strong> the proposal</p>\n<ol>\n<li>first</li>"
    )
    assert "<li>second\n<ul>\n<li>nested</li>" in html  # nested by the item's own indentation
    assert "Anna &lt;img src=x onerror=alert(1)&gt; &amp; co" in html and "<img" not in html
    assert '<a href="https://example.com">site</a>' in html
    assert "javascript" not in html and '<a href="">bad</a>' in html


# --- what each channel needs --------------------------------------------------------------------------------


@pytest.fixture
def all_channels(tmp_path: Path, db: sa.Engine) -> dict[str, Channel]:
    return build_channels(make_settings(tmp_path), db, ManualClock(NOW))


@pytest.mark.parametrize(
    ("channel", "field", "said"),
    [
        ("email", "email", "email"),
        ("sms", "phone", "mobile number"),
        ("call", "phone", "phone"),
        ("letter", "address", "address"),
    ],
)
@pytest.mark.parametrize("absent", [None, ""], ids=["missing", "empty"])
def test_missing_names_the_field_a_channel_cannot_do_without(
    all_channels: dict[str, Channel], channel: str, field: str, said: str, absent: str | None
) -> None:
    contact = {**CONTACT, field: absent}

    assert all_channels[channel].missing(contact) == f"contact has no {said}"


@pytest.mark.parametrize("channel", ["email", "sms", "call", "letter"])
def test_missing_is_none_for_a_reachable_contact(all_channels: dict[str, Channel], channel: str) -> None:
    assert all_channels[channel].missing(CONTACT) is None


def test_a_contact_without_email_is_still_reachable_by_phone_and_post(
    all_channels: dict[str, Channel],
) -> None:
    contact = {**CONTACT, "email": None}

    reachable = {name for name, channel in all_channels.items() if channel.missing(contact) is None}

    assert reachable == {"sms", "call", "letter"}


def _makes_unnamed_files(folder: Path) -> bool:
    """Whether the file system under `folder` makes files with no name (`O_TMPFILE`)."""
    try:
        os.close(os.open(folder, os.O_TMPFILE | os.O_WRONLY, 0o600))
    except (AttributeError, OSError):
        return False
    return True


@pytest.fixture(params=["unnamed", "named"])
def way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """How the outbox writes a file: into a file with no name, linked once written (where the file system
    can), or into a named temporary file, renamed once written (elsewhere)."""
    if request.param == "named":
        monkeypatch.setattr(channels, "_UNNAMED", 0)
    return str(request.param)


def test_an_outbox_write_makes_its_folder_again_when_it_was_removed(tmp_path: Path, way: str) -> None:
    """The folder is made once and remembered; if someone removes it, the next write makes it again."""
    path = tmp_path / "outbox" / "email" / "a.eml"
    write_atomically(path, b"first")
    shutil.rmtree(tmp_path / "outbox")
    write_atomically(path, b"second")
    assert path.read_bytes() == b"second"
    assert [p.name for p in path.parent.iterdir()] == ["a.eml"]  # no temporary file left behind


def test_an_outbox_write_over_a_temporary_file_left_by_a_killed_writer_leaves_the_whole_message(
    tmp_path: Path, way: str
) -> None:
    """A writer killed between writing its temporary file and renaming it leaves the file behind; a later
    write by the same name (its process id come round again) replaces it, so nothing of it is left over."""
    path = tmp_path / "outbox" / "email" / "a.eml"
    write_atomically(path, b"first")
    left = path.parent / f".a.eml.{os.getpid()}-{threading.get_ident()}.tmp"
    left.write_bytes(b"a longer message, half written by a killed writer")
    write_atomically(path, b"second")
    assert path.read_bytes() == b"second"
    assert [p.name for p in path.parent.iterdir()] == ["a.eml"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # as the outbox's files always were


def test_an_outbox_write_makes_a_new_file_readable_by_its_user_alone(tmp_path: Path, way: str) -> None:
    path = tmp_path / "email" / "a.eml"
    write_atomically(path, b"message")
    assert path.read_bytes() == b"message"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_an_outbox_writes_temporary_file_never_looks_like_a_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer killed before its rename leaves its temporary file: a reader of `*.eml` must not take it."""
    monkeypatch.setattr(channels, "_UNNAMED", 0)  # the named way, where the file system has no other
    path = tmp_path / "email" / "7-1-0.eml"

    def killed(source: Any, target: Any) -> None:
        raise KeyboardInterrupt  # as if killed between writing and renaming

    monkeypatch.setattr(os, "replace", killed)
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: None)  # no clean-up: the process died
    with pytest.raises(KeyboardInterrupt):
        write_atomically(path, b"half")
    left = list(path.parent.iterdir())
    assert len(left) == 1 and left[0].suffix == ".tmp"
    assert list(path.parent.glob("*.eml")) == []


def test_an_outbox_writer_killed_before_naming_its_file_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the file system makes files with no name, a new message is written into one and then named:
    a writer killed before that leaves nothing in the folder, not even a temporary file."""
    if not _makes_unnamed_files(tmp_path):
        pytest.skip("this file system makes no files without a name")
    path = tmp_path / "email" / "7-1-0.eml"
    path.parent.mkdir()

    def killed(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt  # as if killed between writing and naming

    monkeypatch.setattr(os, "link", killed)
    with pytest.raises(KeyboardInterrupt):
        write_atomically(path, b"half")
    assert list(path.parent.iterdir()) == []


def test_an_outbox_write_of_a_new_file_changes_its_folder_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new message is named once it is written, with no temporary name made and then renamed: threads
    and processes making files in one folder hold its lock half as often. A rewrite still replaces the
    file by a rename, which a link cannot do."""
    if not _makes_unnamed_files(tmp_path):
        pytest.skip("this file system makes no files without a name")
    renames: list[str] = []
    rename = os.replace

    def counted(source: Any, target: Any) -> None:
        renames.append(Path(target).name)
        rename(source, target)

    monkeypatch.setattr(os, "replace", counted)
    path = tmp_path / "email" / "a.eml"
    write_atomically(path, b"first")
    assert renames == []
    write_atomically(path, b"second")
    assert renames == ["a.eml"] and path.read_bytes() == b"second"
    assert [p.name for p in path.parent.iterdir()] == ["a.eml"]


def test_an_outbox_rewrite_that_fails_leaves_the_message_before_it_and_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, way: str
) -> None:
    """A rewrite goes under a temporary name and is renamed over the message: should the rename fail, the
    temporary file goes and the message stays as it was."""
    path = tmp_path / "email" / "a.eml"
    write_atomically(path, b"first")

    def refused(source: Any, target: Any) -> None:
        raise OSError(errno.EACCES, "cannot replace it")

    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(OSError, match="cannot replace it"):
        write_atomically(path, b"second")
    assert [p.name for p in path.parent.iterdir()] == ["a.eml"]
    assert path.read_bytes() == b"first"


@pytest.mark.parametrize("refused", ["making", "naming"])
def test_an_outbox_on_a_file_system_without_unnamed_files_takes_the_named_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refused: str
) -> None:
    """A file system that cannot make a file with no name (or name one) gets a named temporary file instead,
    the whole message all the same; the folder is remembered, so the next write does not try again."""
    path = tmp_path / "email" / "a.eml"
    path.parent.mkdir()
    tries: list[str] = []
    real_open = os.open

    def no_unnamed_open(file: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & channels._UNNAMED == channels._UNNAMED:
            tries.append("open")
            if refused == "making":
                raise OSError(errno.EOPNOTSUPP, "no unnamed files here")
        return real_open(file, flags, *args, **kwargs)

    def no_link(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EXDEV, "cannot name it here")

    monkeypatch.setattr(os, "open", no_unnamed_open)
    if refused == "naming":
        monkeypatch.setattr(os, "link", no_link)
    monkeypatch.setattr(channels, "_named_only", set())
    write_atomically(path, b"first")
    write_atomically(tmp_path / "email" / "b.eml", b"second")
    assert tries == ["open"]  # the second write went the named way straight away
    assert path.read_bytes() == b"first" and (tmp_path / "email" / "b.eml").read_bytes() == b"second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.eml", "b.eml"]
