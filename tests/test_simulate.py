"""The simulation's own mechanics: it reports without sending, and its private databases start empty."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from harness import REPO

from cadence import rules, sandbox, simulate
from cadence.settings import Settings

START = datetime(2027, 3, 1, tzinfo=ZoneInfo("Europe/Moscow"))
CONTACT = {"email": "a@example.com", "phone": "+79161234567", "sms_consent": True, "age": 60}


def _nurture(name: str = "lost-prospect-nurture", days: int = 120) -> list[dict[str, Any]]:
    loaded = rules.load([REPO / "rules"], REPO / "templates")
    events = simulate.run(
        loaded,
        name,
        START,
        CONTACT,
        {"status": "lost"},
        days=days,
        templates=sandbox.template_environment(REPO / "templates"),
        sender=Settings(_env_file=None).sender(),
        default_timezone="UTC",
    )
    return simulate.as_json(events)


def test_a_simulation_writes_no_send_to_the_log(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        events = _nurture()
    assert sum(e["kind"] == "touch" and e["status"] == "sent" for e in events) >= 10
    assert [r.getMessage() for r in caplog.records if r.getMessage() == "touch sent"] == []


def test_a_reused_private_database_starts_empty() -> None:
    first = _nurture()
    idle = list(simulate._idle)
    assert idle, "a run that ended well keeps its database for the next"
    second = _nurture()
    assert second == first  # nothing of the first run's contact, enrollment or touches is left
    assert simulate._idle == idle  # and the next run took that same database


def test_a_run_that_fails_does_not_keep_its_database() -> None:
    _nurture()
    idle = list(simulate._idle)
    with pytest.raises(KeyError):
        _nurture("no-such-cadence")
    assert simulate._idle == idle[:-1]  # taken, and dropped rather than kept half written
    assert _nurture(days=30)[0]["kind"] == "enrolled"
