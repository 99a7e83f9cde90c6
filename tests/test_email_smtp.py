"""Email over SMTP against a real SMTP server in the test process: what arrives, the one-click unsubscribe
link, how the server's replies are treated, the per-minute limit, and bounce reports."""

from __future__ import annotations

import shutil
import types
from collections.abc import Callable, Iterator
from datetime import date, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from harness import MONDAY, REPO, Harness, deal_event, make_settings, start_harness
from servers import Mailbox, free_port
from sqlmodel import col, select

from cadence import store
from cadence.models import EnrollmentStatus, Outcome, TouchStatus
from channels import Message, TransientError
from channels.email_smtp import SmtpEmail
from channels.limits import Limits

CADENCE = """\
cadence: mails
enroll: {on: deal.created}
exit: {on_outcome: [bounced]}
calendar: {business_days: true, window: "09:00-18:00", timezone: Europe/Moscow, country: RU}
steps:
  - day: 0
    channel: email
    template: email/deal-01-proposal-recap
    reason: Recap of the proposal.
  - day: 1
    channel: email
    template: email/deal-03-case-study
    reason: A case study.
"""
ADMIN = {"authorization": "Bearer admin-token"}
ONE_CLICK = {"content-type": "application/x-www-form-urlencoded"}


@pytest.fixture
def start(tmp_path: Path, smtp: tuple[Mailbox, int]) -> Iterator[Callable[..., Harness]]:
    """Starts a Cadence whose email goes to the test's SMTP server; stops it afterwards."""
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "mails.yaml").write_text(CADENCE)
    shutil.copy(REPO / "rules" / "policy.yaml", rules / "policy.yaml")  # unsubscribed and bounced block email
    started: list[Harness] = []

    def make(**overrides: Any) -> Harness:
        settings = make_settings(
            tmp_path,
            rules_dir=rules,
            email_provider="smtp",
            smtp_host="127.0.0.1",
            smtp_port=smtp[1],
            smtp_security="none",
            smtp_timeout_seconds=5,
            secret_key="test-secret",
            admin_token="admin-token",
            **overrides,
        )
        started.append(start_harness(settings))
        return started[-1]

    yield make
    for harness in started:
        harness.stop()


@pytest.fixture
def h(start: Callable[..., Harness]) -> Harness:
    return start()


def _enroll(h: Harness, n: int = 1) -> None:
    event = deal_event(f"evt-{n}", type="deal.created", deal_id=f"d-{n}", contact_id=f"c-{n}")
    assert h.post("/webhooks/generic", event).status_code == 202


def _first_email(h: Harness, mailbox: Mailbox) -> EmailMessage:
    _enroll(h)
    h.run_until(MONDAY + timedelta(minutes=1))
    [message] = mailbox.messages()
    return message


def _unsubscribe_path(message: EmailMessage) -> str:
    link = str(message["List-Unsubscribe"])
    assert link.startswith("<") and link.endswith(">")
    return urlsplit(link[1:-1]).path


def _outcomes(h: Harness) -> list[tuple[str, int | None, str]]:
    with store.session(h.service.db) as s:
        return [
            (o.name, o.touch_id, o.source) for o in s.exec(select(Outcome).order_by(col(Outcome.id))).all()
        ]


# --- what arrives -------------------------------------------------------------------------------------------


def test_an_email_arrives_multipart_with_its_message_id_and_one_click_unsubscribe_headers(
    h: Harness, smtp: tuple[Mailbox, int]
) -> None:
    message = _first_email(h, smtp[0])

    assert message.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in message.iter_parts()] == ["text/plain", "text/html"]
    assert not str(message.get_body(("plain",)).get_content()).startswith("Subject:")  # type: ignore[union-attr]
    assert message["Subject"]
    assert message["Message-ID"] == "<touch-1-0-0@example.com>"
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert str(message["List-Unsubscribe"]).startswith("<http://127.0.0.1:8000/unsubscribe/1.")
    [sent, following] = h.touches()
    assert sent.status == TouchStatus.sent and following.status == TouchStatus.planned
    assert sent.receipt["provider"] == "smtp"
    assert sent.receipt["reference"] == "<touch-1-0-0@example.com>"
    assert sent.receipt["smtp_response"] == "250 2.0.0 Ok: queued as Q1"


# --- unsubscribe --------------------------------------------------------------------------------------------


def test_one_click_unsubscribe_records_it_blocks_email_and_a_second_click_changes_nothing(
    h: Harness, smtp: tuple[Mailbox, int]
) -> None:
    path = _unsubscribe_path(_first_email(h, smtp[0]))

    first = h.client.post(path, content="List-Unsubscribe=One-Click", headers=ONE_CLICK)
    second = h.client.post(path, content="List-Unsubscribe=One-Click", headers=ONE_CLICK)

    assert (first.status_code, second.status_code) == (200, 200)
    assert "unsubscribed" in first.text.lower()
    assert _outcomes(h) == [("unsubscribed", 1, "unsubscribe")]
    h.run_days(2)  # Tuesday's email: skipped, nothing more reaches the server
    [_, blocked] = h.touches()
    assert blocked.status == TouchStatus.skipped
    assert blocked.status_reason == "contact is blocked: unsubscribed"
    assert len(smtp[0].received) == 1


def test_the_unsubscribe_page_offers_a_button_and_opening_it_does_not_unsubscribe(
    h: Harness, smtp: tuple[Mailbox, int]
) -> None:
    path = _unsubscribe_path(_first_email(h, smtp[0]))

    page = h.client.get(path)

    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<form method="post">' in page.text and "<button" in page.text
    assert _outcomes(h) == []
    # The button's form post unsubscribes, like the one-click post.
    assert h.client.post(path, data={"List-Unsubscribe": "One-Click"}).status_code == 200
    assert _outcomes(h) == [("unsubscribed", 1, "unsubscribe")]


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_a_tampered_unsubscribe_token_is_refused(h: Harness, smtp: tuple[Mailbox, int], method: str) -> None:
    path = _unsubscribe_path(_first_email(h, smtp[0]))
    value, _, mac = path.rpartition("/")[2].partition(".")
    tampered = [
        f"/unsubscribe/2.{mac}",
        f"/unsubscribe/{value}.{mac[:-1]}A",
        "/unsubscribe/1",
        "/unsubscribe/x",
    ]

    for bad in tampered:
        response = h.client.request(method, bad, content="List-Unsubscribe=One-Click", headers=ONE_CLICK)
        assert response.status_code == 404, bad
        assert response.json()["error"]["field"] == "token"
    assert _outcomes(h) == []


# --- the server's replies -----------------------------------------------------------------------------------


def test_a_550_reply_fails_the_touch_with_the_servers_words_after_one_attempt(
    h: Harness, smtp: tuple[Mailbox, int]
) -> None:
    mailbox = smtp[0]
    mailbox.rcpt_replies = ["550 5.1.1 <anna@example.com>: mailbox unavailable"]
    _enroll(h)
    h.run_until(MONDAY + timedelta(minutes=1))

    failed, following = h.touches()
    assert (failed.status, failed.attempts, mailbox.rcpts) == (TouchStatus.failed, 1, 1)
    assert failed.status_reason == "SMTP server refused: 550 5.1.1 <anna@example.com>: mailbox unavailable"
    assert following.status == TouchStatus.planned
    assert mailbox.received == []


def test_a_451_reply_is_tried_again_and_delivered_once(h: Harness, smtp: tuple[Mailbox, int]) -> None:
    mailbox = smtp[0]
    mailbox.rcpt_replies = ["451 4.7.1 greylisted, try again later"]
    _enroll(h)
    h.run_until(MONDAY + timedelta(minutes=1))  # the broker's retry comes after its backoff, 2-4 s

    sent, _ = h.touches()
    assert (sent.status, sent.attempts, mailbox.rcpts) == (TouchStatus.sent, 2, 2)
    assert len(mailbox.received) == 1


def _message() -> Message:
    return Message(
        key="1-0-0",
        touch_id=1,
        channel="email",
        contact={"name": "Anna Petrova", "email": "anna@example.com"},
        deal=None,
        reason="Recap.",
        due_at=MONDAY,
        local_date=date(2026, 11, 23),
        parts={"subject": "Recap", "text": "Hello\n.\n..dots\n", "html": "<p>Hello</p>"},
        sender={"name": "Ivan", "email": "ivan@sales.example"},
    )


def _channel(tmp_path: Path, port: int, **overrides: Any) -> SmtpEmail:
    settings = make_settings(
        tmp_path,
        email_provider="smtp",
        smtp_host="127.0.0.1",
        smtp_port=port,
        smtp_security="none",
        smtp_timeout_seconds=5,
        secret_key="test-secret",
        **overrides,
    )
    return SmtpEmail(settings, Limits(None))


def test_a_refused_connection_is_transient(tmp_path: Path) -> None:
    with pytest.raises(TransientError, match="unreachable"):
        _channel(tmp_path, free_port()).send(_message())  # nothing listens there


def test_lines_that_start_with_a_dot_arrive_intact(tmp_path: Path, smtp: tuple[Mailbox, int]) -> None:
    mailbox, port = smtp
    _channel(tmp_path, port).send(_message())

    [message] = mailbox.messages()
    text = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert text.replace("\r\n", "\n") == "Hello\n.\n..dots\n"  # as sent on the wire, with CRLF


# --- the per-minute limit -----------------------------------------------------------------------------------


def test_the_per_minute_limit_defers_the_second_email_until_a_minute_has_passed(
    start: Callable[..., Harness], smtp: tuple[Mailbox, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Dramatiq's window limiter reads time.time(); here it reads the harness clock instead.
    h = start(email_per_minute=1)
    clock = types.SimpleNamespace(time=lambda: h.clock().timestamp())
    monkeypatch.setattr("dramatiq.rate_limits.window.time", clock)
    mailbox = smtp[0]
    _enroll(h, 1)
    _enroll(h, 2)

    h.service.scheduler.tick()
    h.drain()
    firsts = sorted((t for t in h.touches() if t.step_index == 0), key=lambda t: t.status)
    assert [t.status for t in firsts] == [TouchStatus.planned, TouchStatus.sent]
    assert firsts[0].status_reason == "email from sales@example.com: limit of 1 per 60 s reached"
    assert len(mailbox.received) == 1

    for seconds, expected in [(30, 1), (31, 2)]:  # half a minute on: still waiting; a minute on: sent
        h.clock.advance(timedelta(seconds=seconds))
        h.service.scheduler.tick()
        h.drain()
        assert len(mailbox.received) == expected
    assert all(t.status == TouchStatus.sent for t in h.touches() if t.step_index == 0)


# --- bounces ------------------------------------------------------------------------------------------------


def test_a_hard_bounce_by_message_id_records_bounced_blocks_email_and_exits(
    h: Harness, smtp: tuple[Mailbox, int]
) -> None:
    message = _first_email(h, smtp[0])
    body = {"message_id": message["Message-ID"], "reason": "550 5.1.1 user unknown"}

    response = h.client.post("/bounces", json=body, headers=ADMIN)
    again = h.client.post("/bounces", json=body, headers=ADMIN)

    assert response.status_code == 201, response.text
    assert (response.json()["outcome"], response.json()["ended"]) == ("bounced", [1])
    assert (again.status_code, again.json()["duplicate"]) == (200, True)
    assert _outcomes(h) == [("bounced", 1, "bounce")]
    [enrollment] = h.enrollments()
    assert enrollment.status == EnrollmentStatus.exited
    with store.session(h.service.db) as s:
        assert h.service.engine.blocked(s, enrollment.contact_id, "email", h.clock()) is not None


def test_a_soft_bounce_blocks_nothing(h: Harness, smtp: tuple[Mailbox, int]) -> None:
    _first_email(h, smtp[0])

    response = h.client.post(
        "/bounces", json={"touch_id": 1, "type": "soft", "reason": "452 mailbox full"}, headers=ADMIN
    )

    assert response.status_code == 200, response.text
    assert response.json()["outcome"] is None
    assert _outcomes(h) == []
    assert h.touches()[0].receipt["soft_bounces"][0]["reason"] == "452 mailbox full"
    h.run_days(2)  # Tuesday's email still goes out, and the cadence runs to its end
    assert [t.status for t in h.touches()] == [TouchStatus.sent, TouchStatus.sent]
    assert len(smtp[0].received) == 2
    assert [e.status for e in h.enrollments()] == [EnrollmentStatus.completed]


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"message_id": "<touch-9-0-0@example.com>"}, 404, "message_id"),
        ({"message_id": "<someone-else@example.com>"}, 404, "message_id"),
        ({"touch_id": 99}, 404, "touch_id"),
        ({}, 422, "message_id"),
        ({"touch_id": 1, "message_id": "<touch-1-0-0@example.com>"}, 422, "message_id"),
        ({"touch_id": "one"}, 422, "touch_id"),
        ({"touch_id": 1, "type": "medium"}, 422, "type"),
        ({"touch_id": 1, "colour": "red"}, 422, "colour"),
    ],
)
def test_a_bounce_for_an_unknown_touch_or_a_malformed_one_is_refused_naming_the_field(
    h: Harness, body: dict[str, Any], status: int, field: str
) -> None:
    _enroll(h)
    response = h.client.post("/bounces", json=body, headers=ADMIN)
    assert response.status_code == status, response.text
    assert response.json()["error"]["field"] == field


def test_bounces_need_the_admin_token(h: Harness) -> None:
    response = h.client.post("/bounces", json={"touch_id": 1})
    assert response.status_code == 401
    assert response.json()["error"]["field"] == "Authorization"
