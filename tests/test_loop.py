"""The whole loop, webhook to outcome, on the embedded broker and on a real Redis server."""

from __future__ import annotations

import json
from datetime import timedelta
from email import policy
from email.parser import BytesParser
from pathlib import Path

import pytest
import yaml
from harness import Harness, deal_event, make_settings, start_harness
from sqlmodel import select

from cadence import store
from cadence.errors import RulesError
from cadence.models import CallTask, TouchStatus
from cadence.service import Service

OPEN_DEAL = yaml.safe_load((Path(__file__).parent.parent / "rules" / "open-deal.yaml").read_text())


def test_a_webhook_enrolls_a_deal_and_plans_its_first_touch(cadence: Harness) -> None:
    response = cadence.post("/webhooks/generic", deal_event())
    assert response.status_code == 202, response.text
    [enrollment] = cadence.enrollments()
    assert response.json()["enrolled"] == [enrollment.id]
    assert (enrollment.cadence_name, enrollment.status) == ("open-deal", "active")
    [touch] = cadence.touches()
    assert (touch.step_index, touch.channel, touch.status) == (0, "email", TouchStatus.planned)
    assert touch.reason == OPEN_DEAL["steps"][0]["reason"]


def test_due_touches_go_out_in_order_each_with_its_reason(cadence: Harness) -> None:
    cadence.post("/webhooks/generic", deal_event())
    cadence.run_days(35)
    touches = cadence.touches()
    steps = OPEN_DEAL["steps"]
    assert [t.step_index for t in touches] == list(range(len(steps)))
    assert all(t.status == TouchStatus.sent for t in touches), [
        (t.step_index, t.status_reason) for t in touches
    ]
    assert [t.reason for t in touches] == [s["reason"].strip() for s in steps]
    # The contact is senior: the step that chooses gives its first choice, paper.
    assert [t.channel for t in touches] == [s.get("channel") or s["choose"][0]["channel"] for s in steps]
    finished = [t.finished_at for t in touches]
    assert finished == sorted(finished)
    assert all(t.finished_at is not None and t.finished_at >= t.due_at for t in touches)
    assert touches[-1].finished_at - touches[0].finished_at <= timedelta(days=30)  # type: ignore[operator]

    outbox = cadence.service.settings.outbox_dir
    emails = sorted((outbox / "email").glob("*.eml"))
    assert len(emails) == sum(t.channel == "email" for t in touches)
    first = BytesParser(policy=policy.default).parsebytes(
        (outbox / "email" / f"{touches[0].key}.eml").read_bytes()
    )
    assert first["To"] == "Anna Petrova <anna@example.com>"
    assert first.get_body(("plain",)) is not None and first.get_body(("html",)) is not None
    sms = [json.loads(line) for line in (outbox / "sms.jsonl").read_text().splitlines()]
    sms_touch = next(t for t in touches if t.channel == "sms")
    assert [(m["key"], m["reason"]) for m in sms] == [(sms_touch.key, sms_touch.reason)]
    letter_touch = next(t for t in touches if t.channel == "letter")
    assert "Tverskaya 1" in (outbox / "letters" / f"{letter_touch.key}.html").read_text()
    with store.session(cadence.service.db) as s:
        tasks = s.exec(select(CallTask).order_by(CallTask.id)).all()
    assert [t.reason for t in tasks] == [t.reason for t in touches if t.channel == "call"]
    assert all(t.owner == "ivan" and t.phone == "+79161234567" for t in tasks)
    [enrollment] = cadence.enrollments()
    assert (enrollment.status, enrollment.end_reason) == ("completed", "all steps done")


def test_a_junior_contact_gets_the_executive_brief_by_email_not_on_paper(cadence: Harness) -> None:
    body = deal_event()
    body["contact"]["age"] = 31
    cadence.post("/webhooks/generic", body)
    cadence.run_days(35)
    brief = next(t for t in cadence.touches() if "executive-brief" in t.template)
    assert (brief.channel, brief.template, brief.status) == (
        "email",
        "email/deal-04-executive-brief",
        TouchStatus.sent,
    )
    assert (cadence.service.settings.outbox_dir / "email" / f"{brief.key}.eml").exists()
    assert not (cadence.service.settings.outbox_dir / "letters").exists()
    assert [t.status for t in cadence.touches()].count(TouchStatus.sent) == len(OPEN_DEAL["steps"])


def test_replied_stops_the_rest(cadence: Harness) -> None:
    cadence.post("/webhooks/generic", deal_event())
    cadence.run_days(3)
    sent_before = [t for t in cadence.touches() if t.status == TouchStatus.sent]
    assert len(sent_before) == 2  # the day-0 email and the day-2 call
    [enrollment] = cadence.enrollments()
    response = cadence.post(
        "/outcomes", {"enrollment_id": enrollment.id, "outcome": "replied", "note": "call me"}
    )
    assert response.status_code == 201, response.text
    assert response.json()["ended"] == [enrollment.id]
    cadence.run_days(40)
    touches = cadence.touches()
    assert [t.status for t in touches] == [TouchStatus.sent, TouchStatus.sent, TouchStatus.cancelled]
    assert touches[-1].status_reason == "outcome: replied"
    [enrollment] = cadence.enrollments()
    assert (enrollment.status, enrollment.end_reason) == ("exited", "outcome: replied")


def test_a_lost_deal_moves_into_the_nurture(cadence: Harness) -> None:
    cadence.post("/webhooks/generic", deal_event())
    cadence.run_days(1)
    response = cadence.post("/webhooks/generic", deal_event("evt-2", "deal.lost", status="lost"))
    assert response.status_code == 202, response.text
    open_deal, nurture = cadence.enrollments()
    assert (open_deal.status, open_deal.end_reason) == ("exited", "deal lost")
    assert (nurture.cadence_name, nurture.status, nurture.deal_id) == (
        "lost-prospect-nurture",
        "active",
        open_deal.deal_id,
    )
    assert response.json() == {
        "event_id": "evt-2",
        "duplicate": False,
        "queued": False,
        "enrolled": [nurture.id],
        "ended": [open_deal.id],
    }
    assert all(t.status != TouchStatus.planned for t in cadence.touches(open_deal.id))
    cadence.run_days(8)
    nurture_touches = cadence.touches(nurture.id)
    assert [t.status for t in nurture_touches[:2]] == [TouchStatus.sent, TouchStatus.sent]


def test_a_won_deal_moves_into_onboarding(cadence: Harness) -> None:
    cadence.post("/webhooks/generic", deal_event())
    [enrollment] = cadence.enrollments()
    response = cadence.post("/outcomes", {"enrollment_id": enrollment.id, "outcome": "won"})
    assert response.status_code == 201, response.text
    open_deal, onboarding = cadence.enrollments()
    assert open_deal.end_reason == "deal won"
    assert (onboarding.cadence_name, onboarding.status) == ("onboarding", "active")


def test_the_same_webhook_twice_makes_one_enrollment(cadence: Harness) -> None:
    first = cadence.post("/webhooks/generic", deal_event())
    second = cadence.post("/webhooks/generic", deal_event())
    assert (first.status_code, second.status_code) == (202, 200)
    assert second.json()["duplicate"] is True
    # A new delivery of the same change (another event id) must not enroll again while one is active.
    third = cadence.post("/webhooks/generic", deal_event("evt-again"))
    assert third.status_code == 202 and third.json()["enrolled"] == []
    assert len(cadence.enrollments()) == 1
    assert len(cadence.touches()) == 1


def test_a_touch_whose_message_is_delivered_twice_is_sent_once(cadence: Harness) -> None:
    cadence.post("/webhooks/generic", deal_event())
    [touch] = cadence.touches()
    tick = cadence.service.scheduler.tick()
    assert tick.queued == [touch.id]
    cadence.service.actor.send(touch.id)  # the broker delivers the same touch a second time
    cadence.drain()
    sent, planned = cadence.touches()
    assert (sent.status, sent.attempts) == (TouchStatus.sent, 1)
    assert planned.status == TouchStatus.planned
    assert len(list((cadence.service.settings.outbox_dir / "email").glob("*.eml"))) == 1


def _rules(tmp_path: Path, template: str, cadence_yaml: str) -> tuple[Path, Path]:
    rules, templates = tmp_path / "rules", tmp_path / "templates"
    (templates / "sms").mkdir(parents=True)
    rules.mkdir()
    (templates / "sms" / "probe.txt").write_text(template)
    (rules / "probe.yaml").write_text(cadence_yaml)
    return rules, templates


PROBE = """\
cadence: probe
enroll:
  on: deal.created
steps:
  - day: 0
    channel: sms
    template: sms/probe
    reason: A probe.
"""


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ contact.__class__.__init__.__globals__ }}",
    ],
)
def test_a_template_reaching_python_internals_is_refused_not_rendered(tmp_path: Path, template: str) -> None:
    rules, templates = _rules(tmp_path, template, PROBE)
    harness = start_harness(make_settings(tmp_path, rules_dir=rules, templates_dir=templates))
    try:
        assert harness.post("/webhooks/generic", deal_event(type="deal.created")).status_code == 202
        harness.run_days(1)
        [touch] = harness.touches()
        assert touch.status == TouchStatus.failed
        assert touch.status_reason is not None and "refused by the sandbox" in touch.status_reason
        assert not (harness.service.settings.outbox_dir / "sms.jsonl").exists()
    finally:
        harness.stop()


def test_a_yaml_error_is_reported_with_its_line_and_nothing_starts(tmp_path: Path) -> None:
    broken = PROBE.replace("    reason: A probe.\n", "    reason: [unclosed\n")
    rules, templates = _rules(tmp_path, "hello", broken)
    with pytest.raises(RulesError) as caught:
        Service(make_settings(tmp_path, rules_dir=rules, templates_dir=templates))
    [problem] = caught.value.problems
    assert problem.file.endswith("probe.yaml")
    assert problem.line == 9
    assert "probe.yaml:9:" in str(caught.value)


def test_a_bad_reload_keeps_the_loaded_rules(tmp_path: Path) -> None:
    rules, templates = _rules(tmp_path, "hello {{ contact.name }}", PROBE)
    harness = start_harness(make_settings(tmp_path, rules_dir=rules, templates_dir=templates))
    try:
        (rules / "probe.yaml").write_text(PROBE.replace("    reason: A probe.\n", ""))
        with pytest.raises(RulesError, match="reason is required"):
            harness.service.reload_rules()
        assert "probe" in harness.service.rules
        assert harness.post("/webhooks/generic", deal_event(type="deal.created")).json()["enrolled"] != []
    finally:
        harness.stop()
