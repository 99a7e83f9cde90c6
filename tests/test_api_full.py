"""The whole API: each endpoint's answers and errors, pagination, API keys and roles, pause and forget."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from harness import MONDAY, REPO, Harness, deal_event, make_settings, start_harness
from sqlmodel import SQLModel, func, select
from starlette.testclient import TestClient

from cadence import keys, store
from cadence.models import (
    Block,
    CallTask,
    Contact,
    Deal,
    Enrollment,
    InboundEvent,
    Outcome,
    Touch,
    TouchStatus,
)

LOOPBACK = ("127.0.0.1", 50000)


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = start_harness(make_settings(tmp_path))
    harness.client = TestClient(harness.client.app, client=LOOPBACK)
    yield harness
    harness.stop()


def _two_deals(h: Harness) -> None:
    """Ivan's deal d-1 for contact c-1, Maria's deal d-2 for contact c-2, both enrolled in open-deal."""
    assert h.post("/webhooks/generic", deal_event("e-1")).status_code == 202
    other = deal_event("e-2", deal_id="d-2", contact_id="c-2", owner="maria")
    other["contact"].update(email="boris@example.com", phone="+79160000002", name="Boris")
    assert h.post("/webhooks/generic", other).status_code == 202


def _error(response: Any, status: int, field: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    problem: dict[str, Any] = response.json()["error"]
    assert problem["field"] == field and problem["message"]
    return problem


def _key(h: Harness, role: str, owner: str | None = None) -> dict[str, str]:
    _, secret = keys.create(h.service.db, f"{role} key", role, owner, MONDAY)
    return {"Authorization": f"Bearer {secret}"}


def _count(h: Harness, model: type[SQLModel]) -> int:
    with store.session(h.service.db) as s:
        return s.exec(select(func.count()).select_from(model)).one()


def _id_of(h: Harness, model: type[Any], **where: Any) -> int:
    with store.session(h.service.db) as s:
        query = select(model)
        for name, value in where.items():
            query = query.where(getattr(model, name) == value)
        found: int = s.exec(query).one().id
        return found


# --- lists and pagination -----------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [1, 2, 3, 50])
def test_pagination_walks_every_row_exactly_once(h: Harness, limit: int) -> None:
    for n in range(7):
        assert h.post(
            "/webhooks/generic", deal_event(f"e-{n}", deal_id=f"d-{n}", contact_id=f"c-{n}")
        ).status_code
    seen: list[int] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": limit, **({"cursor": cursor} if cursor else {})}
        page = h.client.get("/contacts", params=params).json()
        assert len(page["items"]) <= limit
        seen += [c["id"] for c in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == seen and len(seen) == len(set(seen)) == 7 == _count(h, Contact)


@pytest.mark.parametrize(
    ("path", "params", "field"),
    [
        ("/contacts", {"limit": "0"}, "limit"),
        ("/contacts", {"limit": "501"}, "limit"),
        ("/contacts", {"cursor": "abc"}, "cursor"),
        ("/enrollments", {"status": "sleeping"}, "status"),
        ("/enrollments", {"contact_id": "-1"}, "contact_id"),
        ("/touches", {"channel": "pigeon"}, "channel"),
        ("/touches", {"date": "2026-13-01"}, "date"),
        ("/touches", {"due_from": "2026-11-23T10:00"}, "due_from"),
        ("/deals", {"status": "maybe"}, "status"),
        ("/blocks", {"active": "yes"}, "active"),
        ("/outcomes", {"name": "shrugged"}, "name"),
    ],
)
def test_a_bad_filter_is_422_naming_it(h: Harness, path: str, params: dict[str, str], field: str) -> None:
    _error(h.client.get(path, params=params), 422, field)


def test_contacts_and_deals_are_listed_filtered_and_read_one_by_one(h: Harness) -> None:
    _two_deals(h)

    [boris] = h.client.get("/contacts", params={"email": "boris@example.com"}).json()["items"]
    assert boris["external_id"] == "c-2"
    assert h.client.get(f"/contacts/{boris['id']}").json()["name"] == "Boris"
    [maria] = h.client.get("/deals", params={"owner": "maria"}).json()["items"]
    assert h.client.get(f"/deals/{maria['id']}").json()["external_id"] == "d-2"
    assert [
        d["external_id"] for d in h.client.get("/deals", params={"contact_id": boris["id"]}).json()["items"]
    ] == ["d-2"]
    for path in ("/contacts/999", "/deals/999"):
        _error(h.client.get(path), 404, "id")
    _error(h.client.get("/contacts/x"), 422, "id")


def test_enrollments_touches_and_outcomes_are_listed_with_their_filters(h: Harness) -> None:
    _two_deals(h)
    maria_deal = _id_of(h, Deal, external_id="d-2")

    [enrollment] = h.client.get("/enrollments", params={"deal_id": maria_deal}).json()["items"]
    assert enrollment["cadence_name"] == "open-deal"
    assert (
        len(h.client.get("/enrollments", params={"cadence": "open-deal", "status": "active"}).json()["items"])
        == 2
    )
    touches = h.client.get("/touches", params={"owner": "maria"}).json()["items"]
    assert {t["enrollment_id"] for t in touches} == {enrollment["id"]}
    day = h.client.get("/touches", params={"date": "2026-11-23", "channel": "email"}).json()["items"]
    assert len(day) == 2 and all(t["channel"] == "email" for t in day)
    assert h.client.get("/touches", params={"due_from": "2030-01-01T00:00:00+00:00"}).json()["items"] == []

    touch_id = touches[0]["id"]
    assert h.post("/outcomes", {"touch_id": touch_id, "outcome": "replied"}).status_code == 201
    [outcome] = h.client.get("/outcomes", params={"touch_id": touch_id}).json()["items"]
    assert outcome["name"] == "replied"
    assert h.client.get("/outcomes", params={"name": "won"}).json()["items"] == []


# --- enrollments by hand ------------------------------------------------------------------------------------


def test_an_enrollment_starts_by_hand_and_not_twice(h: Harness) -> None:
    _two_deals(h)
    body = {"cadence": "post-meeting", "contact_external_id": "c-1", "deal_external_id": "d-1"}

    started = h.post("/enrollments", body)

    assert started.status_code == 201, started.text
    timeline = started.json()
    assert timeline["cadence"] == "post-meeting" and timeline["origin"] == "by hand"
    _error(h.post("/enrollments", body), 409, "cadence")
    _error(h.post("/enrollments", {**body, "cadence": "no-such"}), 404, "cadence")
    _error(h.post("/enrollments", {"cadence": "post-meeting"}), 422, "contact_id")
    _error(h.post("/enrollments", {"cadence": "post-meeting", "contact_id": 999}), 404, "contact_id")
    _error(h.post("/enrollments", {**body, "deal_external_id": "d-404"}), 404, "deal_external_id")
    _error(h.post("/enrollments", {**body, "deal_external_id": "d-2"}), 422, "deal_id")
    _error(h.post("/enrollments", {**body, "surprise": 1}), 422, "surprise")


def test_pause_holds_the_touches_and_resume_plans_them_from_now_keeping_their_spacing(h: Harness) -> None:
    _two_deals(h)
    enrollment_id = _id_of(h, Enrollment, deal_id=_id_of(h, Deal, external_id="d-1"))
    h.run_days(1)
    sent_before = [t.id for t in h.touches(enrollment_id) if t.status == TouchStatus.sent]

    paused = h.client.post(f"/enrollments/{enrollment_id}/pause")

    assert paused.status_code == 200, paused.text
    assert paused.json()["status"] == "paused"
    [held] = [t for t in h.touches(enrollment_id) if t.status == TouchStatus.held]
    _error(h.client.post(f"/enrollments/{enrollment_id}/pause"), 409, "id")
    h.run_days(20)
    assert [t.id for t in h.touches(enrollment_id) if t.status == TouchStatus.sent] == sent_before

    resumed = h.client.post(f"/enrollments/{enrollment_id}/resume")

    assert resumed.status_code == 200 and resumed.json()["status"] == "active"
    [again] = [t for t in h.touches(enrollment_id) if t.id == held.id]
    assert again.status == TouchStatus.planned
    assert h.clock() <= again.due_at <= h.clock() + timedelta(days=7)
    h.run_days(3)
    assert again.id in [t.id for t in h.touches(enrollment_id) if t.status == TouchStatus.sent]


def test_a_touch_on_its_way_when_the_enrollment_pauses_is_held_not_cancelled(h: Harness) -> None:
    _two_deals(h)
    enrollment_id = _id_of(h, Enrollment, deal_id=_id_of(h, Deal, external_id="d-1"))
    [first] = h.touches(enrollment_id)
    with store.session(h.service.db) as s:  # queued by the scheduler, its message not yet taken by a worker
        s.get_one(Touch, first.id).status = TouchStatus.queued
    assert h.client.post(f"/enrollments/{enrollment_id}/pause").status_code == 200
    with store.session(h.service.db) as s:  # the worker had claimed it just before the pause
        s.get_one(Touch, first.id).status = TouchStatus.queued
    result = h.service.dispatcher.dispatch(first.id or 0)
    [held] = h.touches(enrollment_id)
    assert (result.status, held.status, held.attempts) == (TouchStatus.held, TouchStatus.held, 0)
    assert h.client.post(f"/enrollments/{enrollment_id}/resume").status_code == 200
    h.run_days(1)
    assert h.touches(enrollment_id)[0].status == TouchStatus.sent


def test_a_paused_enrollment_is_not_started_again_by_the_same_trigger(h: Harness) -> None:
    _two_deals(h)
    deal_id = _id_of(h, Deal, external_id="d-1")
    enrollment_id = _id_of(h, Enrollment, deal_id=deal_id)
    assert h.client.post(f"/enrollments/{enrollment_id}/pause").status_code == 200
    again = h.post("/webhooks/generic", deal_event(event_id="again"))
    assert again.status_code == 202 and again.json()["enrolled"] == []
    assert h.client.post(f"/enrollments/{enrollment_id}/resume").status_code == 200


def test_stop_cancels_what_is_not_sent_even_while_paused(h: Harness) -> None:
    _two_deals(h)
    enrollment_id = _id_of(h, Enrollment, deal_id=_id_of(h, Deal, external_id="d-1"))
    assert h.client.post(f"/enrollments/{enrollment_id}/pause").status_code == 200

    stopped = h.client.post(f"/enrollments/{enrollment_id}/stop")

    assert stopped.status_code == 200
    assert stopped.json()["status"] == "exited"
    assert {t.status for t in h.touches(enrollment_id)} <= {TouchStatus.sent, TouchStatus.cancelled}
    _error(h.client.post(f"/enrollments/{enrollment_id}/stop"), 409, "id")
    _error(h.client.post(f"/enrollments/{enrollment_id}/resume"), 409, "id")
    _error(h.client.post("/enrollments/999/pause"), 404, "id")


# --- blocks -------------------------------------------------------------------------------------------------


def test_a_block_is_added_listed_and_lifted(h: Harness) -> None:
    _two_deals(h)
    contact_id = _id_of(h, Contact, external_id="c-1")
    until = (h.clock() + timedelta(days=30)).isoformat()

    added = h.post(
        "/blocks", {"contact_id": contact_id, "channel": "call", "until": until, "reason": "on leave"}
    )

    assert added.status_code == 201, added.text
    block = added.json()
    assert block["channel"] == "call"
    [listed] = h.client.get("/blocks", params={"contact_id": contact_id, "active": "true"}).json()["items"]
    assert listed["id"] == block["id"]
    lifted = h.client.post(f"/blocks/{block['id']}/lift")
    assert lifted.status_code == 200 and lifted.json()["lifted_at"]
    assert h.client.get("/blocks", params={"active": "true"}).json()["items"] == []
    _error(h.client.post(f"/blocks/{block['id']}/lift"), 409, "id")
    _error(h.client.post("/blocks/999/lift"), 404, "id")
    _error(h.post("/blocks", {"contact_id": 999, "reason": "x"}), 404, "contact_id")
    _error(
        h.post("/blocks", {"contact_id": contact_id, "reason": "x", "until": MONDAY.isoformat()}),
        422,
        "until",
    )
    _error(h.post("/blocks", {"contact_id": contact_id, "reason": "x", "channel": "fax"}), 422, "channel")
    _error(h.post("/blocks", {"contact_id": contact_id}), 422, "reason")


# --- cadences -----------------------------------------------------------------------------------------------


def test_validate_answers_the_located_problems_of_posted_yaml(h: Harness) -> None:
    good = (REPO / "rules" / "open-deal.yaml").read_text(encoding="utf-8")

    fine = h.client.post("/cadences/validate", content=good.encode())
    broken = h.client.post("/cadences/validate", content=good.replace("channel: email", "channel: pigeon", 1))

    assert fine.status_code == 200, fine.text
    assert fine.json()["valid"] is True and fine.json()["cadence"] == "open-deal"
    answer = broken.json()
    assert answer["valid"] is False
    problem = answer["problems"][0]
    assert problem["file"] == "body" and problem["line"] > 1 and "channel" in problem["message"]
    unreadable = h.client.post("/cadences/validate", content=b"cadence: [unclosed")
    assert unreadable.json()["valid"] is False and unreadable.json()["problems"]
    _error(h.client.post("/cadences/validate", content=b"\xff\xfe"), 400, "body")


def test_simulate_runs_a_loaded_cadence_or_posted_yaml(h: Harness) -> None:
    body = {
        "cadence": "open-deal",
        "start": "2026-11-23T09:00:00+03:00",
        "days": 30,
        "contact": {"timezone": "Europe/Moscow", "email": "a@example.com", "age": 56},
        "deal": {"owner": "ivan", "amount": 1000},
        "outcomes": ["day 3: no_answer"],
    }

    answer = h.post("/cadences/simulate", body)

    assert answer.status_code == 200, answer.text
    events = answer.json()["events"]
    assert events[0]["kind"] == "enrolled" and any(e["kind"] == "outcome" for e in events)
    text = (REPO / "rules" / "post-meeting.yaml").read_text(encoding="utf-8")
    posted = h.post("/cadences/simulate", {**body, "cadence": None, "yaml": text, "outcomes": []})
    assert posted.status_code == 200, posted.text
    _error(h.post("/cadences/simulate", {**body, "cadence": "nope"}), 404, "cadence")
    _error(h.post("/cadences/simulate", {**body, "yaml": text}), 422, "cadence")
    _error(h.post("/cadences/simulate", {**body, "outcomes": ["day x: replied"]}), 422, "outcomes.0")
    _error(h.post("/cadences/simulate", {**body, "days": 0}), 422, "days")
    bad = h.post("/cadences/simulate", {**body, "cadence": None, "yaml": "cadence: x\nsteps: nope\n"})
    assert _error(bad, 422, "yaml")["problems"]


def test_reports_are_coming(h: Harness) -> None:
    assert _error(h.client.get("/reports"), 501, None)["code"] == "not_implemented"


# --- forget -------------------------------------------------------------------------------------------------


def test_forget_erases_the_contact_and_everything_about_them_and_nothing_else(h: Harness) -> None:
    _two_deals(h)
    contact_id = _id_of(h, Contact, external_id="c-1")
    h.run_days(3)
    [task_touch] = [t for t in h.touches() if t.channel == "call" and t.status == TouchStatus.sent][:1]
    assert h.post("/outcomes", {"touch_id": task_touch.id, "outcome": "not_interested"}).status_code == 201
    with store.session(h.service.db) as s:
        assert s.exec(select(Block).where(Block.contact_id == contact_id)).first() is not None
        assert s.exec(select(CallTask).where(CallTask.contact_id == contact_id)).first() is not None
    before = {m.__name__: _count(h, m) for m in (Contact, Deal, Enrollment, InboundEvent)}

    answer = h.client.delete(f"/contacts/{contact_id}")

    assert answer.status_code == 204 and answer.content == b""
    with store.session(h.service.db) as s:
        assert s.get(Contact, contact_id) is None
        for model in (Deal, Enrollment, Outcome, CallTask, Block):
            assert s.exec(select(model).where(model.contact_id == contact_id)).first() is None  # type: ignore[attr-defined]
        bodies = [e.body for e in s.exec(select(InboundEvent)).all()]
        left_touches = s.exec(select(Touch)).all()
    assert not any("anna@example.com" in b or '"c-1"' in b for b in bodies)
    assert any("boris@example.com" in b for b in bodies)
    assert {t.enrollment_id for t in left_touches} == {
        _id_of(h, Enrollment, contact_id=_id_of(h, Contact, external_id="c-2"))
    }
    assert _count(h, Contact) == before["Contact"] - 1 and _count(h, Deal) == before["Deal"] - 1
    _error(h.client.delete(f"/contacts/{contact_id}"), 404, "id")


# --- keys and roles -----------------------------------------------------------------------------------------


def test_once_a_key_exists_every_call_but_webhooks_and_health_needs_one(h: Harness) -> None:
    admin = _key(h, "admin")

    assert h.client.get("/contacts").status_code == 401
    assert h.client.get("/contacts", headers=admin).status_code == 200
    assert h.post("/webhooks/generic", deal_event()).status_code == 202
    assert h.client.get("/healthz").status_code == 200
    assert h.client.get("/openapi.json").status_code == 200
    _error(h.client.get("/contacts", headers={"Authorization": "Bearer nope"}), 401, "Authorization")
    _error(h.client.get("/contacts", headers={"Authorization": "Basic abc"}), 401, "Authorization")


def test_a_revoked_key_is_refused(h: Harness) -> None:
    headers = _key(h, "admin")
    [key] = keys.listing(h.service.db)
    keys.revoke(h.service.db, key.id or 0, MONDAY)

    problem = _error(h.client.get("/contacts", headers=headers), 401, "Authorization")
    assert "revoked" in problem["message"]


def test_admin_token_is_an_admin_key(tmp_path: Path) -> None:
    harness = start_harness(make_settings(tmp_path, admin_token="tok"))
    try:
        client = TestClient(harness.client.app, client=("203.0.113.7", 4000))
        assert client.get("/contacts").status_code == 401
        assert client.get("/contacts", headers={"Authorization": "Bearer tok"}).status_code == 200
        assert client.delete("/contacts/1", headers={"Authorization": "Bearer tok"}).status_code == 404
    finally:
        harness.stop()


def test_without_keys_changes_are_for_loopback_only(h: Harness) -> None:
    remote = TestClient(h.client.app, client=("203.0.113.7", 4000))

    assert remote.get("/contacts").status_code == 200
    assert _error(remote.delete("/contacts/1"), 403, None)["code"] == "forbidden"
    assert remote.post("/enrollments/1/pause").status_code == 403


def test_a_manager_sees_and_acts_on_their_own_deals_only(h: Harness) -> None:
    _two_deals(h)
    ivan = _key(h, "manager", "ivan")
    h.run_days(3)
    ivans = _id_of(h, Enrollment, deal_id=_id_of(h, Deal, external_id="d-1"))
    marias = _id_of(h, Enrollment, deal_id=_id_of(h, Deal, external_id="d-2"))

    deals = h.client.get("/deals", headers=ivan).json()["items"]
    enrollments = h.client.get("/enrollments", headers=ivan).json()["items"]
    touches = h.client.get("/touches", headers=ivan).json()["items"]
    tasks = h.client.get("/call-tasks", params={"date": "2026-11-25"}, headers=ivan).json()

    assert [d["owner"] for d in deals] == ["ivan"]
    assert [e["id"] for e in enrollments] == [ivans]
    assert touches and {t["enrollment_id"] for t in touches} == {ivans}
    assert tasks["owner"] == "ivan" and tasks["tasks"]
    assert h.client.get(f"/enrollments/{ivans}", headers=ivan).status_code == 200
    _error(h.client.get(f"/enrollments/{marias}", headers=ivan), 403, "id")
    _error(h.client.get(f"/deals/{_id_of(h, Deal, external_id='d-2')}", headers=ivan), 403, "id")
    _error(h.client.get("/call-tasks", params={"owner": "maria"}, headers=ivan), 403, "owner")
    assert h.client.get("/touches", params={"owner": "maria"}, headers=ivan).json()["items"] == []
    _error(h.client.get("/contacts", headers=ivan), 403, "Authorization")
    _error(h.client.post(f"/enrollments/{ivans}/pause", headers=ivan), 403, "Authorization")

    maria_touch = next(t.id for t in h.touches(marias))
    own = h.client.post(
        "/outcomes", json={"touch_id": touches[0]["id"], "outcome": "no_answer"}, headers=ivan
    )
    other = h.client.post("/outcomes", json={"touch_id": maria_touch, "outcome": "replied"}, headers=ivan)
    assert own.status_code == 201, own.text
    _error(other, 403, "touch_id")
    _error(
        h.client.post("/outcomes", json={"enrollment_id": marias, "outcome": "replied"}, headers=ivan),
        403,
        "enrollment_id",
    )
    assert h.client.post("/webhooks/generic", json=deal_event("e-9"), headers=ivan).status_code == 403


def test_an_integration_posts_outcomes_and_webhooks_but_reads_nothing(h: Harness) -> None:
    crm = _key(h, "integration")

    hook = h.client.post("/webhooks/generic", content=json.dumps(deal_event()), headers=crm)
    assert hook.status_code == 202, hook.text
    [enrolled] = hook.json()["enrolled"]
    outcome = h.client.post("/outcomes", json={"enrollment_id": enrolled, "outcome": "replied"}, headers=crm)
    assert outcome.status_code == 201
    for path in ("/contacts", "/deals", "/touches", f"/enrollments/{enrolled}", "/call-tasks", "/outcomes"):
        _error(h.client.get(path, headers=crm), 403, "Authorization")
