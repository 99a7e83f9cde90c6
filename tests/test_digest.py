"""The morning digest arrives at a real SMTP server once per manager per day, at the manager's local 08:00."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from email.message import EmailMessage
from pathlib import Path

import pytest
from harness import MONDAY, Harness, deal_event, make_settings, start_harness
from servers import Mailbox
from sqlmodel import select

from cadence import store
from cadence.digest import Digests
from cadence.errors import RulesError
from cadence.models import Digest

TEAM = """\
managers:
  ivan: {email: ivan@example.com, timezone: Europe/Moscow, name: Ivan}
  maria: {email: maria@example.com, timezone: America/New_York, name: Maria}
"""


@pytest.fixture
def h(tmp_path: Path, smtp: tuple[Mailbox, int]) -> Iterator[Harness]:
    team = tmp_path / "team.yaml"
    team.write_text(TEAM, encoding="utf-8")
    settings = make_settings(
        tmp_path,
        team_file=team,
        email_provider="smtp",
        smtp_host="127.0.0.1",
        smtp_port=smtp[1],
        smtp_security="none",
        secret_key="k",
    )
    # Sunday 23:00 UTC: Monday 02:00 in Moscow, not yet; Sunday 18:00 in New York, too late for Sunday's.
    harness = start_harness(settings, start=MONDAY - timedelta(hours=7))
    yield harness
    harness.stop()


def _digests(box: Mailbox) -> list[EmailMessage]:
    return [m for m in box.messages() if str(m["Subject"]).startswith("Your calls for")]


def test_each_manager_gets_one_digest_a_day_at_their_own_eight_oclock(
    h: Harness, smtp: tuple[Mailbox, int]
) -> None:
    box, _ = smtp
    assert h.service.scheduler.tick().digests == []
    h.clock.set(MONDAY - timedelta(hours=1, seconds=1))  # 07:59:59 in Moscow
    assert h.service.scheduler.tick().digests == []
    h.clock.set(MONDAY - timedelta(hours=1))  # 08:00 in Moscow
    assert h.service.scheduler.tick().digests == ["ivan"]
    assert h.service.scheduler.tick().digests == []  # once a day
    h.clock.set(MONDAY + timedelta(hours=7))  # 13:00 UTC: 08:00 in New York
    assert h.service.scheduler.tick().digests == ["maria"]
    h.clock.set(MONDAY + timedelta(hours=12))  # 21:00 in Moscow, 13:00 in New York: both sent today
    assert h.service.scheduler.tick().digests == []
    h.clock.set(MONDAY + timedelta(days=1) - timedelta(hours=1))  # Tuesday 08:00 in Moscow
    assert h.service.scheduler.tick().digests == ["ivan"]
    to = [str(m["To"]) for m in _digests(box)]
    assert to == ["Ivan <ivan@example.com>", "Maria <maria@example.com>", "Ivan <ivan@example.com>"]


def test_the_digest_lists_the_managers_calls_overdue_first(h: Harness, smtp: tuple[Mailbox, int]) -> None:
    box, _ = smtp
    h.clock.set(MONDAY)
    h.post("/webhooks/generic", deal_event())  # Ivan's deal: the walkthrough call is due on Wednesday
    h.run_days(2.2)
    h.clock.set(
        MONDAY + timedelta(days=3) - timedelta(hours=1)
    )  # Thursday 08:00 in Moscow: the call is overdue
    assert "ivan" in h.service.scheduler.tick().digests
    [digest] = [m for m in _digests(box) if "ivan" in str(m["To"])][-1:]
    text = digest.get_body(("plain",))
    assert text is not None
    body = text.get_content()
    assert "1 call(s) for 2026-11-26" in body
    assert "[overdue] Anna Petrova (+79161234567): Confirm the proposal reached every decision maker" in body


def test_a_digest_is_not_sent_so_late_in_the_day_that_it_is_stale(h: Harness) -> None:
    h.clock.set(MONDAY + timedelta(hours=6))  # 15:00 in Moscow: the service was down all morning
    assert "ivan" not in h.service.scheduler.tick().digests


def test_two_schedulers_send_one_digest(h: Harness, smtp: tuple[Mailbox, int]) -> None:
    box, _ = smtp
    h.clock.set(MONDAY)  # 09:00 in Moscow
    other = Digests(h.service.db, h.service.settings, h.service.channels["email"], h.clock)
    assert sorted(h.service.digests.send_due() + other.send_due()) == ["ivan"]
    with store.session(h.service.db) as s:
        assert len(s.exec(select(Digest)).all()) == 1
    assert len(_digests(box)) == 1


def test_a_digest_that_could_not_be_sent_is_tried_again(h: Harness, smtp: tuple[Mailbox, int]) -> None:
    box, _ = smtp
    box.rcpt_replies = ["451 4.3.0 try later"]
    h.clock.set(MONDAY)
    assert h.service.digests.send_due() == []
    assert h.service.digests.send_due() == ["ivan"]
    assert len(_digests(box)) == 1


def test_a_broken_team_file_is_a_located_error(tmp_path: Path) -> None:
    from cadence.digest import parse_team

    with pytest.raises(RulesError) as caught:
        parse_team("managers:\n  ivan: {email: ivan, timezone: Mars/Base}\n", "team.yaml")
    assert {p.line for p in caught.value.problems} == {2}
    assert len(caught.value.problems) == 2
