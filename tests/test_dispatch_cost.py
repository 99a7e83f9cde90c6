"""What a send costs the database follows the touches being sent, not the touches sent before them.

SQLite counts the virtual-machine instructions each statement runs; a worker's late checks for one touch,
or for a batch, must run about as many with thousands of other contacts' touches already sent as with none.
SQLite never gathers planner statistics for Cadence, so this is the planner a deployment on SQLite gets."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from harness import REPO, Harness, make_settings, start_harness
from sqlmodel import select
from test_batch_dispatch import CADENCE, enroll

from cadence import store
from cadence.models import CadenceVersion, Contact, Enrollment, EnrollmentStatus, Touch, TouchStatus

#: Touches of another contact already sent when the measured ones go out.
SENT_BEFORE = 3_000
#: SQLite calls back every this many virtual-machine instructions of a statement: every one, as a
#: statement's remainder below it is never reported.
STEP = 1


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    rules = tmp_path / "rules"
    rules.mkdir()
    shutil.copy(REPO / "rules" / "policy.yaml", rules / "policy.yaml")  # its caps are what is read
    first = "channel: email\n    template: email/deal-01-proposal-recap"
    (rules / "batch-email.yaml").write_text(CADENCE.format(stage="email", first=first))
    h = start_harness(make_settings(tmp_path, rules_dir=rules))
    yield h
    h.stop()


def sent_elsewhere(h: Harness, count: int) -> None:
    """`count` ended enrollments of one other contact, each with a touch sent within the caps' look-back."""
    now = h.clock()
    with store.session(h.service.db) as s:
        version = s.exec(select(CadenceVersion)).first()
        assert version is not None
        contact = Contact(source="test", external_id="elsewhere", created_at=now, updated_at=now)
        s.add(contact)
        s.flush()
        enrollments = [
            Enrollment(
                cadence_name=version.name,
                cadence_version_id=version.id or 0,
                subject=f"contact:elsewhere-{n}",
                contact_id=contact.id or 0,
                status=EnrollmentStatus.completed,
                started_at=now,
            )
            for n in range(count)
        ]
        s.add_all(enrollments)
        s.flush()
        sent_at = now - timedelta(hours=1)
        s.add_all(
            Touch(
                enrollment_id=enrollment.id or 0,
                step_index=0,
                channel="email",
                template="email/deal-01-proposal-recap",
                reason="Sent before.",
                due_at=sent_at,
                status=TouchStatus.sent,
                cleared_at=sent_at,
                finished_at=sent_at,
                attempts=1,
            )
            for enrollment in enrollments
        )


def instructions(h: Harness, work: Callable[[], Any]) -> int:
    """SQLite virtual-machine instructions that `work` runs on the service's database."""
    count = 0

    def progress() -> int:
        nonlocal count
        count += STEP
        return 0  # go on

    def watch(dbapi_connection: Any, *_: Any) -> None:
        dbapi_connection.set_progress_handler(progress, STEP)

    def unwatch(dbapi_connection: Any, *_: Any) -> None:
        dbapi_connection.set_progress_handler(None, STEP)

    db = h.service.db
    sa.event.listen(db, "checkout", watch)
    sa.event.listen(db, "checkin", unwatch)
    try:
        work()
    finally:
        sa.event.remove(db, "checkout", watch)
        sa.event.remove(db, "checkin", unwatch)
    return count


def send_batch(h: Harness, ids: list[int]) -> None:
    batch = h.service.dispatcher.dispatch_many(ids)
    assert [result.status for result in batch.results] == [TouchStatus.sent] * len(ids)


def send_alone(h: Harness, ids: list[int]) -> None:
    for touch_id in ids:
        assert h.service.dispatcher.dispatch(touch_id).status == TouchStatus.sent


@pytest.mark.parametrize("send", [send_batch, send_alone], ids=["batch", "alone"])
def test_the_caps_read_follows_the_contacts_not_every_touch_ever_sent(
    harness: Harness, send: Callable[[Harness, list[int]], None]
) -> None:
    first = enroll(harness, "email", 4)
    quiet = instructions(harness, lambda: send(harness, first))

    sent_elsewhere(harness, SENT_BEFORE)
    then = enroll(harness, "email", 4, start=4)
    busy = instructions(harness, lambda: send(harness, then))

    # Read through the touches' status, the caps walked all the other contact's sent touches for each
    # read: 40,000 instructions for a batch of four against 1,300 without them; 146,000 for four touches
    # sent alone against 1,800.
    assert busy < 1.5 * quiet, f"{busy} instructions with {SENT_BEFORE} touches sent before, {quiet} without"
