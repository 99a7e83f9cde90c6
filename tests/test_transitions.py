"""`then` on named outcomes, and the re-enrollment rule (never, after a cool-off, or the default)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from harness import REPO, Harness, deal_event, make_settings, start_harness

from cadence.errors import RulesError
from cadence.language import parse

STEP = (
    "  - day: {day}\n    channel: email\n    template: email/deal-01-proposal-recap\n"
    "    reason: Step {day}.\n"
)


def _cadence(
    name: str, extra: str = "", enroll: str = "{on: deal.created}", days: tuple[int, ...] = (0,)
) -> str:
    steps = "".join(STEP.format(day=d) for d in days)
    return f"cadence: {name}\nenroll: {enroll}\n{extra}steps:\n{steps}"


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "rules"
    folder.mkdir()
    (folder / "policy.yaml").write_text("caps: {per_day: null, per_week: null}\n")
    return folder


def _start(tmp_path: Path, folder: Path) -> Harness:
    return start_harness(make_settings(tmp_path, rules_dir=folder, templates_dir=REPO / "templates"))


def _created(h: Harness, n: int = 1) -> Any:
    return h.post("/webhooks/generic", deal_event(f"evt-{n}", type="deal.created")).json()


def test_meeting_booked_moves_the_contact_into_the_post_meeting_cadence(
    tmp_path: Path, rules_dir: Path
) -> None:
    (rules_dir / "talks.yaml").write_text(
        _cadence("talks", "then: {meeting_booked: after-meeting}\n", days=(0, 5))
    )
    (rules_dir / "after-meeting.yaml").write_text(_cadence("after-meeting", enroll="null"))
    h = _start(tmp_path, rules_dir)
    try:
        [talks] = _created(h)["enrolled"]
        response = h.post("/outcomes", {"enrollment_id": talks, "outcome": "meeting_booked"})
        assert response.status_code == 201, response.text
        first, moved = h.enrollments()
        assert response.json()["ended"] == [first.id] and response.json()["enrolled"] == [moved.id]
        assert (first.status, first.end_reason, first.end_outcome) == (
            "exited",
            "outcome: meeting_booked",
            "meeting_booked",
        )
        assert (moved.cadence_name, moved.status, moved.origin) == (
            "after-meeting",
            "active",
            "then from talks",
        )
        assert [t.status for t in h.touches(first.id)] == ["cancelled"]  # its planned touch
    finally:
        h.stop()


@pytest.mark.parametrize(
    ("rule", "after_days", "enrolled_again"),
    [
        ("never", 400, False),
        ("after 30 days", 10, False),
        ("after 30 days", 31, True),
        (
            None,
            1,
            True,
        ),  # without a rule: again, because the last time completed rather than ended by an answer
    ],
)
def test_the_reenrollment_rule(
    tmp_path: Path, rules_dir: Path, rule: str | None, after_days: int, enrolled_again: bool
) -> None:
    enroll = f"{{on: deal.created, reenroll: {rule}}}" if rule else "{on: deal.created}"
    (rules_dir / "once.yaml").write_text(_cadence("once", enroll=enroll))
    h = _start(tmp_path, rules_dir)
    try:
        assert len(_created(h, 1)["enrolled"]) == 1
        h.run_days(1)
        [done] = h.enrollments()
        assert done.status == "completed"
        h.clock.set(done.ended_at + timedelta(days=after_days))  # type: ignore[operator]
        assert (len(_created(h, 2)["enrolled"]) == 1) is enrolled_again
    finally:
        h.stop()


def test_without_a_rule_an_answered_cadence_is_not_started_again(tmp_path: Path, rules_dir: Path) -> None:
    (rules_dir / "ask.yaml").write_text(_cadence("ask", "exit: {on_outcome: [replied]}\n", days=(0, 3)))
    h = _start(tmp_path, rules_dir)
    try:
        [first] = _created(h, 1)["enrolled"]
        h.post("/outcomes", {"enrollment_id": first, "outcome": "replied"})
        assert _created(h, 2)["enrolled"] == []
    finally:
        h.stop()


@pytest.mark.parametrize("value", ["sometimes", "after soon", "90 days"])
def test_a_bad_reenrollment_rule_is_a_located_error(value: str) -> None:
    with pytest.raises(RulesError) as caught:
        parse(_cadence("x", enroll=f"{{on: deal.created, reenroll: {value}}}"), "x.yaml")
    [problem] = caught.value.problems
    assert problem.line == 2 and "enroll.reenroll" in problem.message
