"""The HTTP API: webhooks (validation, duplicates, signatures, the inbox), outcomes, timelines, call tasks."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from harness import MONDAY, Harness, deal_event, make_settings, start_harness
from sqlmodel import SQLModel, col, func, select
from starlette.testclient import TestClient

from cadence import store
from cadence.api import SIGNATURE_HEADER, sign
from cadence.models import CallTask, Contact, Deal, Enrollment, InboundEvent, Outcome, Touch, TouchStatus
from channels.call import script_html

SECRET = "s3cret-for-tests"


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Harness]:
    """One Cadence on the embedded broker, for tests where the broker plays no part."""
    harness = start_harness(make_settings(tmp_path))
    yield harness
    harness.stop()


@pytest.fixture
def signed_api(tmp_path: Path) -> Iterator[Harness]:
    harness = start_harness(make_settings(tmp_path, webhook_secret=SECRET))
    yield harness
    harness.stop()


def _count(h: Harness, model: type[SQLModel]) -> int:
    with store.session(h.service.db) as s:
        return s.exec(select(func.count()).select_from(model)).one()


def _events(h: Harness) -> list[InboundEvent]:
    with store.session(h.service.db) as s:
        return list(s.exec(select(InboundEvent).order_by(col(InboundEvent.id))).all())


def _lenient(h: Harness) -> TestClient:
    """A client that answers with the server's 500 instead of raising the server's exception."""
    return TestClient(h.client.app, raise_server_exceptions=False)


def _assert_error(response: Any, status: int, field: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    problem: dict[str, Any] = response.json()["error"]
    assert set(problem) >= {"code", "message", "field"}
    assert problem["message"]
    assert problem["field"] == field
    return problem


# --- webhooks -----------------------------------------------------------------------------------------------


def test_webhook_good_body_is_accepted_with_the_enrolled_ids(api: Harness) -> None:
    response = api.post("/webhooks/generic", deal_event())

    assert response.status_code == 202
    answer = response.json()
    enrollments = api.enrollments()
    assert [e.cadence_name for e in enrollments] == ["open-deal"]
    assert answer == {
        "event_id": "evt-1",
        "duplicate": False,
        "queued": False,
        "enrolled": [enrollments[0].id],
        "ended": [],
    }


def test_webhook_same_event_id_again_is_a_duplicate_and_changes_nothing(api: Harness) -> None:
    assert api.post("/webhooks/generic", deal_event()).status_code == 202
    touches_before = [(t.id, t.status) for t in api.touches()]

    # The same event id with a different body: still the same delivery, so the new amount is ignored.
    again = api.post("/webhooks/generic", deal_event(amount=99_999))

    assert again.status_code == 200
    assert again.json() == {
        "event_id": "evt-1",
        "duplicate": True,
        "queued": False,
        "enrolled": [],
        "ended": [],
    }
    assert len(api.enrollments()) == 1
    assert [(t.id, t.status) for t in api.touches()] == touches_before
    assert _count(api, InboundEvent) == 1
    with store.session(api.service.db) as s:
        assert s.exec(select(Deal.amount)).one() == 12000


def test_webhook_same_body_without_event_id_twice_enrolls_once(api: Harness) -> None:
    body = deal_event()
    del body["event_id"]

    first = api.post("/webhooks/generic", body)
    second = api.post("/webhooks/generic", body)

    assert first.status_code == 202
    assert len(first.json()["enrolled"]) == 1
    assert second.json()["duplicate"] is True
    assert second.json()["event_id"] == first.json()["event_id"]
    assert first.json()["event_id"].startswith("sha256:")
    assert len(api.enrollments()) == 1
    assert _count(api, InboundEvent) == 1


def test_webhook_invalid_json_is_400_with_the_error_shape(api: Harness) -> None:
    response = api.client.post(
        "/webhooks/generic",
        content=b'{"type": "deal.stage_changed",',
        headers={"content-type": "application/json"},
    )

    problem = _assert_error(response, 400, "body")
    assert "JSON" in problem["message"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda b: b["deal"].update(amount="twelve thousand"), "deal.amount"),
        (lambda b: b["deal"].update(probability=1.5), "deal.probability"),
        (lambda b: b["contact"].update(id=""), "contact.id"),
        (lambda b: b.update(type="deal.exploded"), "type"),
        (lambda b: b.update(surprise=True), "surprise"),
    ],
    ids=["amount-not-a-number", "probability-over-1", "empty-contact-id", "unknown-type", "extra-field"],
)
def test_webhook_wrong_field_is_422_naming_the_field(api: Harness, change: Any, field: str) -> None:
    body = deal_event()
    change(body)

    response = api.post("/webhooks/generic", body)

    problem = _assert_error(response, 422, field)
    assert problem["message"].startswith(f"{field}:")
    assert api.enrollments() == []


def test_webhook_deal_event_without_deal_is_422(api: Harness) -> None:
    body = deal_event()
    del body["deal"]

    response = api.post("/webhooks/generic", body)

    assert response.status_code == 422
    assert "needs `deal`" in response.json()["error"]["message"]
    assert api.enrollments() == []
    assert _count(api, Contact) == 0


@pytest.mark.parametrize(
    ("kind", "missing"), [("deal.won", "deal"), ("contact.updated", "contact")], ids=["deal", "contact"]
)
def test_webhook_event_without_its_subject_names_the_missing_field(
    api: Harness, kind: str, missing: str
) -> None:
    body = deal_event(type=kind)
    del body[missing]

    response = api.post("/webhooks/generic", body)

    _assert_error(response, 422, missing)


def test_webhook_unknown_source_is_404(api: Harness) -> None:
    response = api.post("/webhooks/pipedrive-v9", deal_event())

    _assert_error(response, 404, "source")
    assert api.enrollments() == []


def test_webhook_every_accepted_and_rejected_body_is_stored(api: Harness) -> None:
    good = json.dumps(deal_event(event_id="good")).encode()
    not_json = b"{not json"
    bad_amount = json.dumps(
        {**deal_event(event_id="bad-amount"), "deal": {"id": "d-9", "amount": "lots"}}
    ).encode()
    no_deal = json.dumps({"event_id": "no-deal", "type": "deal.won", "contact": {"id": "c-9"}}).encode()
    answers = {}
    for body in (good, not_json, bad_amount, no_deal):
        answers[body] = api.client.post("/webhooks/generic", content=body).json()

    stored = {e.body.encode(): e for e in _events(api)}
    assert set(stored) == {good, not_json, bad_amount, no_deal}
    assert (stored[good].status, stored[good].error, stored[good].event_id) == ("processed", None, "good")
    assert stored[good].processed_at == MONDAY
    for body in (not_json, bad_amount, no_deal):
        assert stored[body].status == "rejected"
        assert stored[body].error == answers[body]["error"]["message"]
        assert stored[body].source == "generic"
    assert stored[bad_amount].event_id == "bad-amount"
    assert stored[no_deal].type == "deal.won"
    assert stored[not_json].event_id.startswith("sha256:")


def test_webhook_rejected_bodies_leave_no_contact_deal_or_enrollment(api: Harness) -> None:
    bad_amount = deal_event(event_id="a", amount="lots")
    missing_deal = deal_event(event_id="b")
    del missing_deal["deal"]

    codes = [api.post("/webhooks/generic", body).status_code for body in (bad_amount, missing_deal)]

    assert codes == [422, 422]
    counts = (_count(api, Contact), _count(api, Deal), _count(api, Enrollment), _count(api, Touch))
    assert counts == (0, 0, 0, 0)
    stored = {e.event_id: e for e in _events(api)}
    assert set(stored) == {"a", "b"}
    assert all(e.status == "rejected" for e in stored.values())


def test_a_deal_without_its_contact_is_kept_and_enrolled_once_the_contact_comes(api: Harness) -> None:
    # Some CRMs (HubSpot, Bitrix24) send a deal's events without its contact: a cadence touches a person, so
    # the deal waits for an event that brings one.
    alone = deal_event(event_id="c")
    del alone["contact"]
    answer = api.post("/webhooks/generic", alone)
    assert (answer.status_code, answer.json()["enrolled"]) == (202, [])
    assert (_count(api, Contact), _count(api, Deal), _count(api, Enrollment)) == (0, 1, 0)

    answer = api.post("/webhooks/generic", deal_event(event_id="d"))
    assert answer.status_code == 202 and len(answer.json()["enrolled"]) == 1
    assert (_count(api, Contact), _count(api, Deal), _count(api, Enrollment)) == (1, 1, 1)


def test_webhook_that_failed_inside_the_server_is_processed_when_the_crm_retries_it(
    api: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 5xx tells the CRM to retry; the retry is no duplicate, as the first delivery was never applied."""
    real = api.service.engine.handle_event
    calls = []

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("database went away for a moment")
        return real(*args, **kwargs)

    monkeypatch.setattr(api.service.engine, "handle_event", flaky)
    client = _lenient(api)

    first = client.post("/webhooks/generic", content=json.dumps(deal_event()))
    assert first.status_code == 500
    assert api.enrollments() == []

    retry = client.post("/webhooks/generic", content=json.dumps(deal_event()))
    assert retry.status_code == 202, retry.text
    assert len(retry.json()["enrolled"]) == 1


# --- signatures ---------------------------------------------------------------------------------------------


def _signed_post(h: Harness, body: bytes, header: str | None) -> Any:
    headers = {"content-type": "application/json"}
    if header is not None:
        headers[SIGNATURE_HEADER] = header
    return h.client.post("/webhooks/generic", content=body, headers=headers)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "t={now},v1=" + "0" * 64,
        "t={now}",
        "v1=whatever",
        "t=soon,v1=abc",
    ],
    ids=["unsigned", "empty", "wrong-digest", "no-digest", "no-timestamp", "timestamp-not-a-number"],
)
def test_webhook_without_a_good_signature_is_401(signed_api: Harness, header: str | None) -> None:
    body = json.dumps(deal_event()).encode()
    value = None if header is None else header.format(now=int(time.time()))

    response = _signed_post(signed_api, body, value)

    _assert_error(response, 401, SIGNATURE_HEADER)
    assert signed_api.enrollments() == []


def test_webhook_signed_with_another_secret_is_401(signed_api: Harness) -> None:
    body = json.dumps(deal_event()).encode()

    response = _signed_post(signed_api, body, sign("not-the-secret", body, int(time.time())))

    _assert_error(response, 401, SIGNATURE_HEADER)
    assert signed_api.enrollments() == []


def test_webhook_signature_for_another_body_is_401(signed_api: Harness) -> None:
    body = json.dumps(deal_event()).encode()
    other = json.dumps(deal_event(amount=1)).encode()

    response = _signed_post(signed_api, body, sign(SECRET, other, int(time.time())))

    _assert_error(response, 401, SIGNATURE_HEADER)


@pytest.mark.parametrize("age", [3600, -3600], ids=["stale", "from-the-future"])
def test_webhook_signature_with_a_timestamp_outside_the_tolerance_is_401(
    signed_api: Harness, age: int
) -> None:
    body = json.dumps(deal_event()).encode()

    response = _signed_post(signed_api, body, sign(SECRET, body, int(time.time()) - age))

    problem = _assert_error(response, 401, SIGNATURE_HEADER)
    assert "timestamp" in problem["message"]
    assert signed_api.enrollments() == []


def test_webhook_with_a_good_signature_is_202(signed_api: Harness) -> None:
    body = json.dumps(deal_event()).encode()

    response = _signed_post(signed_api, body, sign(SECRET, body, int(time.time())))

    assert response.status_code == 202, response.text
    assert len(response.json()["enrolled"]) == 1


def test_webhook_signature_with_non_ascii_digest_is_401_not_a_crash(signed_api: Harness) -> None:
    body = json.dumps(deal_event()).encode()
    header = f"t={int(time.time())},v1=\u00e9".encode("latin-1")  # HTTP headers are latin-1 on the wire

    response = _lenient(signed_api).post(
        "/webhooks/generic",
        content=body,
        headers=[(SIGNATURE_HEADER.encode(), header)],
    )

    _assert_error(response, 401, SIGNATURE_HEADER)


# --- outcomes -----------------------------------------------------------------------------------------------


def _enroll(h: Harness) -> int:
    response = h.post("/webhooks/generic", deal_event())
    assert response.status_code == 202
    enrollment_id: int = response.json()["enrolled"][0]
    return enrollment_id


def test_outcome_with_an_unknown_name_is_422_naming_outcome(api: Harness) -> None:
    enrollment_id = _enroll(api)

    response = api.post("/outcomes", {"enrollment_id": enrollment_id, "outcome": "delighted"})

    _assert_error(response, 422, "outcome")
    assert _count(api, Outcome) == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"touch_id": 987654, "outcome": "replied"}, "touch_id"),
        ({"enrollment_id": 987654, "outcome": "replied"}, "enrollment_id"),
    ],
    ids=["touch", "enrollment"],
)
def test_outcome_for_an_unknown_touch_or_enrollment_is_404(
    api: Harness, body: dict[str, Any], field: str
) -> None:
    _enroll(api)

    response = api.post("/outcomes", body)

    problem = _assert_error(response, 404, field)
    assert "987654" in problem["message"]
    assert _count(api, Outcome) == 0


def test_outcome_for_a_touch_of_another_enrollment_is_422(api: Harness) -> None:
    first = _enroll(api)
    second = api.post("/webhooks/generic", deal_event(event_id="e2", deal_id="d-2")).json()["enrolled"][0]
    [touch] = api.touches(first)

    response = api.post("/outcomes", {"touch_id": touch.id, "enrollment_id": second, "outcome": "replied"})

    _assert_error(response, 422, "enrollment_id")
    assert _count(api, Outcome) == 0
    assert {e.status for e in api.enrollments()} == {"active"}


def test_outcome_with_an_extra_field_is_422(api: Harness) -> None:
    enrollment_id = _enroll(api)

    response = api.post("/outcomes", {"enrollment_id": enrollment_id, "outcome": "replied", "mood": "happy"})

    _assert_error(response, 422, "mood")
    assert api.enrollments()[0].status == "active"


def test_outcome_replied_ends_the_enrollment_and_cancels_its_pending_touches(api: Harness) -> None:
    enrollment_id = _enroll(api)
    pending = [t.id for t in api.touches(enrollment_id) if t.status == TouchStatus.planned]
    assert pending

    response = api.post(
        "/outcomes", {"enrollment_id": enrollment_id, "outcome": "replied", "note": "thanks!"}
    )

    assert response.status_code == 201, response.text
    assert response.json()["ended"] == [enrollment_id]
    [enrollment] = api.enrollments()
    assert (enrollment.status, enrollment.end_reason) == ("exited", "outcome: replied")
    touches = {t.id: t for t in api.touches(enrollment_id)}
    assert all(touches[i].status == TouchStatus.cancelled for i in pending)
    assert all(touches[i].status_reason == "outcome: replied" for i in pending)
    # Nothing goes out afterwards, and nothing new is planned.
    api.run_days(30)
    assert not (api.service.settings.outbox_dir / "email").exists()
    assert {t.status for t in api.touches(enrollment_id)} == {TouchStatus.cancelled}


# --- timelines ----------------------------------------------------------------------------------------------


def test_timeline_lists_stored_touches_and_projected_steps_with_reasons(api: Harness) -> None:
    enrollment_id = _enroll(api)
    api.run_days(2)  # day 0 (email) and business day 2 (call) are sent; business day 5 is planned
    steps = api.service.rules.cadences["open-deal"].spec.steps

    response = api.client.get(f"/enrollments/{enrollment_id}")

    assert response.status_code == 200
    timeline = response.json()
    assert (timeline["id"], timeline["cadence"], timeline["status"]) == (enrollment_id, "open-deal", "active")
    items = timeline["touches"]
    assert [i["step"] for i in items] == list(range(len(steps)))
    assert [i["reason"] for i in items] == [step.reason for step in steps]
    assert [i["status"] for i in items] == ["sent", "sent", "planned"] + ["projected"] * (len(steps) - 3)
    stored = {t.step_index: t.id for t in api.touches(enrollment_id)}
    assert [i["touch_id"] for i in items[:3]] == [stored[0], stored[1], stored[2]]
    assert all(i["touch_id"] is None for i in items[3:])
    # Business day 7 from Monday 2026-11-23 is Wednesday 2026-12-02, at the enrollment's 09:00 Moscow slot.
    assert items[3]["due_at"] == "2026-12-02T06:00:00+00:00"
    # The brief's step chooses at send time: paper for a senior contact, else email.
    assert (items[3]["channel"], items[3]["status_reason"]) == ("letter or email", None)


def test_timeline_of_an_ended_enrollment_projects_nothing(api: Harness) -> None:
    enrollment_id = _enroll(api)
    api.post("/outcomes", {"enrollment_id": enrollment_id, "outcome": "not_interested"})

    timeline = api.client.get(f"/enrollments/{enrollment_id}").json()

    assert timeline["status"] == "exited"
    assert [i["status"] for i in timeline["touches"]] == ["cancelled"]
    assert [o["name"] for o in timeline["outcomes"]] == ["not_interested"]


def test_timeline_of_an_unknown_enrollment_is_404(api: Harness) -> None:
    _assert_error(api.client.get("/enrollments/424242"), 404, "id")


@pytest.mark.parametrize("raw", ["abc", "1.5", "0x10"])
def test_timeline_with_a_non_numeric_id_is_422(api: Harness, raw: str) -> None:
    _assert_error(api.client.get(f"/enrollments/{raw}"), 422, "id")


BEYOND_64_BITS = 2**64


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("GET", f"/enrollments/{BEYOND_64_BITS}", None, "id"),
        ("POST", "/outcomes", {"touch_id": BEYOND_64_BITS, "outcome": "replied"}, "touch_id"),
        ("POST", "/outcomes", {"enrollment_id": BEYOND_64_BITS, "outcome": "replied"}, "enrollment_id"),
    ],
    ids=["timeline", "outcome-touch", "outcome-enrollment"],
)
def test_an_id_beyond_64_bits_is_a_client_error_not_a_crash(
    api: Harness, method: str, path: str, body: Any, field: str
) -> None:
    content = None if body is None else json.dumps(body)

    response = _lenient(api).request(method, path, content=content)

    assert response.status_code in (404, 422), response.text
    assert response.json()["error"]["field"] == field


# --- call tasks ---------------------------------------------------------------------------------------------


def test_call_task_shows_for_its_owner_and_local_date_with_reason_phone_and_script(api: Harness) -> None:
    enrollment_id = _enroll(api)
    api.run_days(2)  # business day 2: Wednesday 2026-11-25, 09:00 in Moscow
    [call] = [t for t in api.touches(enrollment_id) if t.channel == "call"]
    assert call.status == TouchStatus.sent

    response = api.client.get("/call-tasks", params={"owner": "ivan", "date": "2026-11-25"})

    assert response.status_code == 200
    answer = response.json()
    assert (answer["date"], answer["owner"]) == ("2026-11-25", "ivan")
    [task] = answer["tasks"]
    assert task["touch_id"] == call.id
    assert task["reason"] == call.reason
    assert task["phone"] == "+79161234567"
    assert task["contact_name"] == "Anna Petrova"
    assert "Anna Petrova" in task["script"] and call.reason in task["script"]
    assert task["status"] == "open"


def test_call_task_carries_the_script_as_html_the_deal_and_the_history_before_it(api: Harness) -> None:
    enrollment_id = _enroll(api)
    api.run_days(2)
    [email, call] = [t for t in api.touches(enrollment_id) if t.step_index in (0, 1)]
    api.post("/outcomes", {"touch_id": email.id, "outcome": "left_voicemail", "note": "asked to call back"})

    [task] = api.client.get("/call-tasks", params={"owner": "ivan", "date": "2026-11-25"}).json()["tasks"]

    html = task["script_html"]
    assert html.startswith("<h1>Call: proposal walkthrough - Anna Petrova")
    assert (
        "<h2>Questions</h2>" in html
        and "<ol>" in html
        and f"<strong>Why this call:</strong> {call.reason}" in html
    )
    assert task["deal"]["title"] == "CRM rollout" and task["deal"]["amount"] == 12000
    history = task["history"]
    assert [(h["kind"], h.get("outcome"), h.get("channel")) for h in history] == [
        ("outcome", "left_voicemail", None),
        ("touch", None, "email"),
    ]
    assert history[0]["note"] == "asked to call back"
    assert history[1]["reason"] == email.reason and history[1]["status"] == "sent"


def test_a_call_tasks_script_is_made_html_once_when_the_task_is_made(api: Harness) -> None:
    _enroll(api)
    api.run_days(2)
    with store.session(api.service.db) as s:
        task = s.exec(select(CallTask)).one()
        assert task.script_html == script_html(task.script)
        # The list shows what the task keeps: it does not convert the script again on each view.
        task.script_html = "<p>kept with the task</p>"
    [shown] = api.client.get("/call-tasks", params={"owner": "ivan", "date": "2026-11-25"}).json()["tasks"]
    assert shown["script_html"] == "<p>kept with the task</p>"
    # A task made before tasks kept their HTML is converted when shown.
    with store.session(api.service.db) as s:
        s.exec(select(CallTask)).one().script_html = None
    [shown] = api.client.get("/call-tasks", params={"owner": "ivan", "date": "2026-11-25"}).json()["tasks"]
    assert shown["script_html"].startswith("<h1>Call: proposal walkthrough - Anna Petrova")


def test_markup_from_the_crm_is_shown_as_text_in_the_script(api: Harness) -> None:
    body = deal_event()
    body["contact"]["name"] = "Anna <img src=x onerror=alert(1)> Petrova"
    api.post("/webhooks/generic", body)
    api.run_days(2)

    [task] = api.client.get("/call-tasks", params={"owner": "ivan", "date": "2026-11-25"}).json()["tasks"]

    assert "<img" not in task["script_html"]
    assert "Anna &lt;img src=x onerror=alert(1)&gt; Petrova" in task["script_html"]


def test_call_tasks_of_another_owner_or_day_are_not_listed(api: Harness) -> None:
    _enroll(api)
    api.run_days(2)

    other_owner = api.client.get("/call-tasks", params={"owner": "maria", "date": "2026-11-25"}).json()
    other_day = api.client.get("/call-tasks", params={"owner": "ivan", "date": "2026-11-24"}).json()

    assert other_owner["tasks"] == []
    assert other_day["tasks"] == []


def test_call_tasks_come_a_page_at_a_time_highest_priority_first(api: Harness) -> None:
    for n, amount in enumerate([1000, 30000, 5000]):
        event = deal_event(f"evt-{n}", deal_id=f"d-{n}", contact_id=f"c-{n}", amount=amount)
        assert api.post("/webhooks/generic", event).status_code == 202
    api.run_days(2)
    day = {"owner": "ivan", "date": "2026-11-25"}

    first = api.client.get("/call-tasks", params={**day, "limit": 2}).json()
    rest = api.client.get("/call-tasks", params={**day, "limit": 2, "cursor": first["next_cursor"]}).json()
    whole = api.client.get("/call-tasks", params=day).json()

    assert first["next_cursor"] == str(first["tasks"][-1]["id"])
    assert rest["next_cursor"] is None and whole["next_cursor"] is None
    assert [t["id"] for t in first["tasks"] + rest["tasks"]] == [t["id"] for t in whole["tasks"]]
    priorities = [t["priority"] for t in whole["tasks"]]
    assert (
        len(priorities) == 3
        and priorities == sorted(priorities, reverse=True)
        and priorities[0] > priorities[2]
    )
    _assert_error(api.client.get("/call-tasks", params={**day, "limit": 0}), 422, "limit")
    _assert_error(api.client.get("/call-tasks", params={**day, "cursor": "x"}), 422, "cursor")


def test_call_task_is_listed_under_the_contacts_local_date(api: Harness) -> None:
    # Kiritimati is UTC+14: Monday 06:00 UTC is 20:00 there, after the window, so day 0 is Tuesday 09:00
    # local and business day 2 is Thursday 2026-11-26 09:00 local, which is still Wednesday in UTC.
    body = deal_event()
    body["contact"]["timezone"] = "Pacific/Kiritimati"
    assert api.post("/webhooks/generic", body).status_code == 202
    api.run_days(3)
    [call] = [t for t in api.touches() if t.channel == "call"]
    assert call.status == TouchStatus.sent
    assert call.due_at.date().isoformat() == "2026-11-25"

    local_day = api.client.get("/call-tasks", params={"owner": "ivan", "date": "2026-11-26"}).json()
    utc_day = api.client.get("/call-tasks", params={"owner": "ivan", "date": "2026-11-25"}).json()

    assert [t["touch_id"] for t in local_day["tasks"]] == [call.id]
    assert utc_day["tasks"] == []


@pytest.mark.parametrize("raw", ["tomorrow", "2026-13-01", "25.11.2026"])
def test_call_tasks_with_a_bad_date_is_422(api: Harness, raw: str) -> None:
    _assert_error(api.client.get("/call-tasks", params={"date": raw}), 422, "date")


@pytest.mark.integration
@pytest.mark.parametrize(
    "body",
    [
        b'{"event_id": "nul\x00byte", "type": "deal.won"}',
        json.dumps(deal_event(event_id="escaped-nul-\u0000")).encode(),
        json.dumps(deal_event(title="CRM\u0000rollout")).encode(),
    ],
    ids=["raw-nul-byte", "nul-in-event-id", "nul-in-deal-title"],
)
def test_webhook_with_a_nul_character_is_no_server_error_on_postgresql(
    tmp_path: Path, postgres_url: str, body: bytes
) -> None:
    """PostgreSQL text cannot hold NUL, which JSON allows as \\u0000; SQLite stores it without complaint."""
    h = start_harness(make_settings(tmp_path, database_url=postgres_url))
    try:
        response = _lenient(h).post("/webhooks/generic", content=body)
    finally:
        h.stop()

    assert response.status_code < 500, response.text


# --- health and metrics -------------------------------------------------------------------------------------


@pytest.mark.integration
def test_healthz_is_ok_on_either_broker(cadence: Harness) -> None:
    response = cadence.client.get("/healthz")

    assert response.status_code == 200
    answer = response.json()
    expected_broker = "ok (in-process)" if cadence.service.settings.embedded_broker else "ok (redis)"
    assert answer["status"] == "ok"
    assert answer["checks"] == {"database": "ok", "broker": expected_broker}
    assert answer["cadences"] == sorted(cadence.service.rules.cadences)


def test_metrics_count_webhooks_by_result(api: Harness) -> None:
    api.post("/webhooks/generic", deal_event())
    api.post("/webhooks/generic", deal_event())
    api.post("/webhooks/generic", deal_event(event_id="bad", amount="lots"))

    response = api.client.get("/metrics")

    assert response.status_code == 200
    lines = set(response.text.splitlines())
    assert 'cadence_webhooks_total{result="processed",source="generic"} 1.0' in lines
    assert 'cadence_webhooks_total{result="duplicate",source="generic"} 1.0' in lines
    assert 'cadence_webhooks_total{result="rejected",source="generic"} 1.0' in lines


def test_metrics_show_the_due_backlog_touches_by_channel_and_dispatch_latency(api: Harness) -> None:
    def value(text: str, name: str) -> float:
        return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name)))

    api.post("/webhooks/generic", deal_event())
    api.clock.set(api.clock() + timedelta(hours=2))  # the first touch is now two hours overdue
    before = api.client.get("/metrics").text
    assert value(before, 'cadence_due_backlog{status="planned"}') == 1.0
    assert value(before, 'cadence_due_backlog{status="queued"}') == 0.0

    api.service.scheduler.tick()
    api.drain()

    after = api.client.get("/metrics").text
    assert value(after, 'cadence_due_backlog{status="planned"}') == 0.0
    assert value(after, 'cadence_touches_total{channel="email",status="sent"}') == 1.0
    assert value(after, 'cadence_dispatch_latency_seconds_count{channel="email"}') == 1.0
    assert value(after, 'cadence_dispatch_latency_seconds_sum{channel="email"}') == 2 * 3600
    assert value(after, 'cadence_dispatch_latency_seconds_bucket{channel="email",le="900.0"}') == 0.0
    assert value(after, 'cadence_dispatch_latency_seconds_bucket{channel="email",le="3600.0"}') == 0.0
    assert value(after, 'cadence_dispatch_latency_seconds_bucket{channel="email",le="14400.0"}') == 1.0


@pytest.mark.parametrize("path", ["/webhooks/generic", "/outcomes"])
def test_a_body_over_the_limit_is_413_on_every_endpoint(api: Harness, path: str) -> None:
    from cadence.api import MAX_BODY_BYTES

    body = b'{"note": "' + b"x" * MAX_BODY_BYTES + b'"}'
    response = api.client.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "http"
    assert _count(api, InboundEvent) == 0
