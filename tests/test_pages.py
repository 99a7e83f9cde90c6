"""The managers' daily call list: its order, its JSON, CSV and HTML, and logging, snoozing and reassigning
calls from it, for the list's owner only."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from harness import MONDAY, Harness, deal_event, make_settings, start_harness
from sqlmodel import col, select

from cadence import keys, store
from cadence.models import CallTask, Enrollment, Touch, TouchStatus
from cadence.pages import CALLS_PER_PAGE

#: The day the open-deal cadence's first call is due (business day 2 after MONDAY).
WEDNESDAY = "2026-11-25"
THURSDAY = "2026-11-26"
FORM = {"content-type": "application/x-www-form-urlencoded"}


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = start_harness(make_settings(tmp_path))
    yield harness
    harness.stop()


def _enroll(h: Harness, **contact: Any) -> int:
    body = deal_event()
    body["contact"].update(contact)
    response = h.post("/webhooks/generic", body)
    assert response.status_code == 202, response.text
    enrollment_id: int = response.json()["enrolled"][0]
    return enrollment_id


def _calls(h: Harness, owner: str = "ivan", day: str = WEDNESDAY, **params: str) -> list[dict[str, Any]]:
    response = h.client.get(f"/managers/{owner}/calls", params={"date": day, "format": "json", **params})
    assert response.status_code == 200, response.text
    tasks: list[dict[str, Any]] = response.json()["tasks"]
    return tasks


def _tasks(h: Harness) -> list[CallTask]:
    with store.session(h.service.db) as s:
        return list(s.exec(select(CallTask).order_by(col(CallTask.id))).all())


def _seed(
    h: Harness,
    enrollment_id: int,
    step: int,
    due_at: datetime,
    priority: float,
    owner: str = "ivan",
    status: str = "open",
) -> int:
    """A call task (and its sent touch) on an enrollment, as the call channel would have made it."""
    with store.session(h.service.db) as s:
        enrollment = s.get_one(Enrollment, enrollment_id)
        touch = Touch(
            enrollment_id=enrollment_id,
            step_index=step,
            channel="call",
            template="call/deal-02-walkthrough",
            reason=f"reason {step}",
            due_at=due_at,
            status=TouchStatus.sent,
            finished_at=due_at,
        )
        s.add(touch)
        s.flush()
        task = CallTask(
            touch_id=touch.id or 0,
            owner=owner,
            due_date=due_at.date(),
            due_at=due_at,
            contact_id=enrollment.contact_id,
            deal_id=enrollment.deal_id,
            contact_name="Anna Petrova",
            phone="+79161234567",
            reason=f"reason {step}",
            script="# Call\n\nAsk.",
            priority=priority,
            status=status,
            created_at=MONDAY,
        )
        s.add(task)
        s.flush()
        return task.id or 0


def _key(h: Harness, role: str, owner: str | None = None) -> dict[str, str]:
    _, secret = keys.create(h.service.db, f"{role} key", role, owner, MONDAY)
    return {"Authorization": f"Bearer {secret}"}


def _assert_error(response: Any, status: int, field: str | None) -> None:
    assert response.status_code == status, response.text
    problem = response.json()["error"]
    assert set(problem) >= {"code", "message", "field"} and problem["message"]
    assert problem["field"] == field


# --- the list -----------------------------------------------------------------------------------------------


def test_overdue_tasks_come_first_then_priority_highest_first_then_due_time(h: Harness) -> None:
    enrollment_id = _enroll(h)
    at = datetime(2026, 11, 25, tzinfo=UTC)
    low = _seed(h, enrollment_id, 101, at + timedelta(hours=10), 1)
    high_early = _seed(h, enrollment_id, 102, at + timedelta(hours=8), 5)
    high_late = _seed(h, enrollment_id, 103, at + timedelta(hours=12), 5)
    overdue_low = _seed(h, enrollment_id, 104, at - timedelta(days=2), 0)
    overdue_high = _seed(h, enrollment_id, 105, at - timedelta(days=1), 3)
    _seed(h, enrollment_id, 106, at + timedelta(days=1), 9)  # tomorrow
    _seed(h, enrollment_id, 107, at - timedelta(days=1), 9, status="done")
    _seed(h, enrollment_id, 108, at + timedelta(hours=9), 9, owner="maria")

    tasks = _calls(h)

    assert [t["id"] for t in tasks] == [overdue_high, overdue_low, high_early, high_late, low]
    assert [t["overdue"] for t in tasks] == [True, True, False, False, False]
    assert [t["reason"] for t in tasks] == [
        "reason 105",
        "reason 104",
        "reason 102",
        "reason 103",
        "reason 101",
    ]


def test_a_long_list_comes_a_page_at_a_time_the_most_urgent_first(h: Harness) -> None:
    """However long the list grows, a page holds CALLS_PER_PAGE calls, overdue and highest priority first;
    the page says how many there are in all and links to the next; the CSV has them all."""
    enrollment_id = _enroll(h)
    at = datetime(2026, 11, 25, 9, tzinfo=UTC)
    count = CALLS_PER_PAGE + 5
    ids = [_seed(h, enrollment_id, 200 + n, at + timedelta(minutes=n), count - n) for n in range(count)]
    overdue = _seed(h, enrollment_id, 199, at - timedelta(days=1), 0)
    ordered = [overdue, *ids]  # overdue first, then by priority, highest first

    first = h.client.get("/managers/ivan/calls", params={"date": WEDNESDAY, "format": "json"}).json()
    assert (first["total"], first["next_cursor"]) == (count + 1, str(ordered[CALLS_PER_PAGE - 1]))
    assert [t["id"] for t in first["tasks"]] == ordered[:CALLS_PER_PAGE]
    rest = _calls(h, cursor=first["next_cursor"])
    assert [t["id"] for t in rest] == ordered[CALLS_PER_PAGE:]

    page = h.client.get("/managers/ivan/calls", params={"date": WEDNESDAY, "tz": "UTC"})
    assert page.text.count('class="task') == CALLS_PER_PAGE
    assert f"{count + 1} calls to make; {CALLS_PER_PAGE} on this page, the most urgent first" in page.text
    [following] = re.findall(r'<a href="([^"]+)" rel="next">', page.text)
    second = h.client.get(following.replace("&amp;", "&"))
    assert second.text.count('class="task') == 6
    assert "6 on this page, the most urgent after the pages before" in second.text
    assert 'rel="next"' not in second.text and "Back to the most urgent calls" in second.text

    csv_rows = h.client.get("/managers/ivan/calls", params={"date": WEDNESDAY, "format": "csv"}).text
    assert len(csv_rows.strip().splitlines()) == count + 2  # a header, and every call

    for cursor in ("-1", "0", "x", "999999"):
        bad = h.client.get("/managers/ivan/calls", params={"date": WEDNESDAY, "cursor": cursor})
        _assert_error(bad, 422, "cursor")


def test_calls_done_meanwhile_do_not_make_the_next_page_skip_any(h: Harness) -> None:
    """The next page follows the last call of the page before, not a count of calls: a manager who works
    through the first page and then asks for the next misses nothing."""
    enrollment_id = _enroll(h)
    at = datetime(2026, 11, 25, 9, tzinfo=UTC)
    count = CALLS_PER_PAGE + 5
    ids = [_seed(h, enrollment_id, 200 + n, at + timedelta(minutes=n), count - n) for n in range(count)]
    first = h.client.get("/managers/ivan/calls", params={"date": WEDNESDAY, "format": "json"}).json()
    for done in ids[:10]:  # ten calls of the first page logged, from the page, which keeps its place
        response = h.client.post(
            f"/managers/ivan/calls/{done}/outcome",
            data={"outcome": "no_answer", "date": WEDNESDAY, "tz": "UTC", "cursor": first["next_cursor"]},
            headers=FORM,
            follow_redirects=False,
        )
        assert response.status_code == 303
        assert f"cursor={first['next_cursor']}" in response.headers["location"]
    assert [t["id"] for t in _calls(h, cursor=first["next_cursor"])] == ids[CALLS_PER_PAGE:]


def test_the_day_is_the_managers_day_in_tz(h: Harness) -> None:
    enrollment_id = _enroll(h)
    # 22:30 UTC on Wednesday is already Thursday in Moscow.
    late = _seed(h, enrollment_id, 101, datetime(2026, 11, 25, 22, 30, tzinfo=UTC), 1)

    assert [t["id"] for t in _calls(h, day=WEDNESDAY)] == [late]
    assert _calls(h, day=WEDNESDAY, tz="Europe/Moscow") == []
    assert [t["id"] for t in _calls(h, day=THURSDAY, tz="Europe/Moscow")] == [late]


def test_json_carries_reason_script_contact_deal_and_history(h: Harness) -> None:
    enrollment_id = _enroll(h)
    h.run_days(2)
    [call] = [t for t in h.touches(enrollment_id) if t.channel == "call"]

    response = h.client.get("/managers/ivan/calls", params={"date": WEDNESDAY, "format": "json"})

    answer = response.json()
    assert (answer["owner"], answer["date"]) == ("ivan", WEDNESDAY)
    [task] = answer["tasks"]
    assert task["touch_id"] == call.id and task["reason"] == call.reason
    assert task["overdue"] is False
    assert f"<strong>Why this call:</strong> {call.reason}" in task["script_html"]
    assert task["contact"]["name"] == "Anna Petrova" and task["contact"]["phone"] == "+79161234567"
    deal = task["deal"]
    assert (deal["title"], deal["amount"], deal["stage"]) == ("CRM rollout", 12000, "proposal_sent")
    assert [(i["kind"], i["channel"]) for i in task["history"]] == [("touch", "email")]


def test_csv_has_one_row_per_task(h: Harness) -> None:
    enrollment_id = _enroll(h)
    h.run_days(2)
    _seed(h, enrollment_id, 101, datetime(2026, 11, 24, 9, tzinfo=UTC), 2)
    [call] = [t for t in h.touches(enrollment_id) if t.channel == "call" and t.step_index == 1]

    response = h.client.get("/managers/ivan/calls", params={"date": WEDNESDAY, "format": "csv"})

    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(response.text)))
    assert rows[0] == ["due", "overdue", "priority", "contact", "phone", "deal", "reason"]
    assert [(r[1], r[3], r[4], r[5], r[6]) for r in rows[1:]] == [
        ("yes", "Anna Petrova", "+79161234567", "CRM rollout", "reason 101"),
        ("no", "Anna Petrova", "+79161234567", "CRM rollout", call.reason),
    ]


def test_csv_cells_never_start_a_formula(h: Harness) -> None:
    body = deal_event()
    body["deal"]["title"] = '=HYPERLINK("http://x")'
    h.post("/webhooks/generic", body)
    h.run_days(2)

    response = h.client.get("/managers/ivan/calls", params={"date": WEDNESDAY, "format": "csv"})

    [row] = list(csv.reader(io.StringIO(response.text)))[1:]
    assert row[5] == '\'=HYPERLINK("http://x")'


def test_html_page_has_a_card_with_forms_and_escapes_crm_data(h: Harness) -> None:
    body = deal_event()
    body["contact"]["name"] = "Anna <img src=x onerror=alert(1)> Petrova"
    body["deal"]["title"] = "<script>alert(2)</script>"
    h.post("/webhooks/generic", body)
    h.run_days(2)
    [task] = _tasks(h)

    page = h.client.get("/managers/ivan/calls", params={"date": WEDNESDAY})

    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    text = page.text
    assert task.reason in text
    assert "<img" not in text and "<script" not in text
    assert "Anna &lt;img src=x onerror=alert(1)&gt; Petrova" in text
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in text
    for action in ("outcome", "snooze", "reassign"):
        assert f'action="/managers/ivan/calls/{task.id}/{action}"' in text
    assert '<option value="no_answer">No answer</option>' in text
    assert '<option value="bounced">Wrong number</option>' in text
    assert 'name="note"' in text and 'name="minutes" value="60"' in text


# --- acting on it -------------------------------------------------------------------------------------------


def test_logging_no_answer_through_the_form_closes_the_task_and_plans_the_retry(h: Harness) -> None:
    enrollment_id = _enroll(h)
    h.run_days(2)
    [task] = _calls(h)

    response = h.client.post(
        f"/managers/ivan/calls/{task['id']}/outcome",
        content=f"outcome=no_answer&note=rang+twice&date={WEDNESDAY}&tz=UTC",
        headers=FORM,
        follow_redirects=False,
    )

    assert response.status_code == 303
    assert response.headers["location"] == f"/managers/ivan/calls?tz=UTC&date={WEDNESDAY}"
    assert _calls(h) == []
    [done] = _tasks(h)
    assert (done.status, done.outcome) == ("done", "no_answer")
    # The step's on_outcome: no_answer retries one business day later, as the same call.
    retry = [t for t in h.touches(enrollment_id) if t.channel == "call" and t.iteration == 1]
    assert len(retry) == 1 and retry[0].status == TouchStatus.planned
    h.run_days(1)
    [again] = _calls(h, day=THURSDAY)
    assert again["touch_id"] == retry[0].id and again["reason"] == task["reason"]
    [logged] = [i for i in again["history"] if i["kind"] == "outcome"]
    assert (logged["outcome"], logged["note"]) == ("no_answer", "rang twice")


def test_logging_a_reply_as_json_answers_the_task_and_ends_the_cadence(h: Harness) -> None:
    enrollment_id = _enroll(h)
    h.run_days(2)
    [task] = _calls(h)

    response = h.post(f"/managers/ivan/calls/{task['id']}/outcome", {"outcome": "replied"})

    assert response.status_code == 200, response.text
    assert response.json()["status"] == "done" and response.json()["outcome"] == "replied"
    [enrollment] = [e for e in h.enrollments() if e.id == enrollment_id]
    assert enrollment.status == "exited"


def test_an_outcome_for_a_task_already_done_is_409(h: Harness) -> None:
    _enroll(h)
    h.run_days(2)
    [task] = _calls(h)
    path = f"/managers/ivan/calls/{task['id']}/outcome"
    assert h.post(path, {"outcome": "left_voicemail"}).status_code == 200

    _assert_error(h.post(path, {"outcome": "replied"}), 409, "task_id")


def test_snooze_by_minutes_stays_today_and_until_tomorrow_moves_it_off_today(h: Harness) -> None:
    _enroll(h)
    h.run_days(2)
    [task] = _calls(h)
    before = datetime.fromisoformat(task["due_at"])
    now = h.clock()

    hour = h.client.post(
        f"/managers/ivan/calls/{task['id']}/snooze",
        content="minutes=60",
        headers=FORM,
        follow_redirects=False,
    )

    assert hour.status_code == 303
    [later] = _calls(h)
    assert datetime.fromisoformat(later["due_at"]) == now + timedelta(minutes=60) > before

    tomorrow = h.post(f"/managers/ivan/calls/{task['id']}/snooze", {"until": "2026-11-26T09:00:00+03:00"})

    assert tomorrow.status_code == 200, tomorrow.text
    assert _calls(h) == []
    [moved] = _calls(h, day=THURSDAY)
    assert moved["id"] == task["id"] and moved["overdue"] is False
    assert _tasks(h)[0].due_date.isoformat() == THURSDAY


def test_the_pages_tomorrow_button_snoozes_to_tomorrow_morning(h: Harness) -> None:
    _enroll(h)
    h.run_days(2)
    page = h.client.get("/managers/ivan/calls", params={"date": WEDNESDAY}).text
    until = page.split('name="until" value="', 1)[1].split('"', 1)[0]
    [task] = _calls(h)

    h.client.post(f"/managers/ivan/calls/{task['id']}/snooze", data={"until": until}, follow_redirects=False)

    assert _calls(h) == [] and [t["id"] for t in _calls(h, day=THURSDAY)] == [task["id"]]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "until"),
        ({"minutes": 0}, "minutes"),
        ({"minutes": "soon"}, "minutes"),
        ({"until": "2026-11-26T09:00:00"}, "until"),
        ({"until": "2020-01-01T09:00:00+00:00"}, "until"),
        ({"until": "2026-11-26T09:00:00+00:00", "minutes": 5}, "until"),
    ],
)
def test_a_bad_snooze_is_422(h: Harness, body: dict[str, Any], field: str) -> None:
    _enroll(h)
    h.run_days(2)
    [task] = _calls(h)

    _assert_error(h.post(f"/managers/ivan/calls/{task['id']}/snooze", body), 422, field)


def test_reassign_moves_the_task_to_another_managers_list(h: Harness) -> None:
    _enroll(h)
    h.run_days(2)
    [task] = _calls(h)

    response = h.client.post(
        f"/managers/ivan/calls/{task['id']}/reassign",
        content=f"owner=maria&date={WEDNESDAY}",
        headers=FORM,
        follow_redirects=False,
    )

    assert response.status_code == 303
    assert response.headers["location"] == f"/managers/ivan/calls?date={WEDNESDAY}"
    assert _calls(h, owner="ivan") == []
    assert [t["id"] for t in _calls(h, owner="maria")] == [task["id"]]
    # Now maria's: ivan's list no longer reaches it.
    _assert_error(
        h.post(f"/managers/ivan/calls/{task['id']}/outcome", {"outcome": "replied"}), 404, "task_id"
    )


# --- who may ------------------------------------------------------------------------------------------------


def test_a_manager_works_their_own_list_only(h: Harness) -> None:
    _enroll(h)
    h.run_days(2)
    [task] = _calls(h)
    ivan, maria = _key(h, "manager", "ivan"), _key(h, "manager", "maria")
    outcome = f"/managers/ivan/calls/{task['id']}/outcome"

    assert h.client.get("/managers/ivan/calls", headers=ivan, params={"date": WEDNESDAY}).status_code == 200
    _assert_error(h.client.get("/managers/ivan/calls", headers=maria), 403, "owner")
    for action, data in (
        ("outcome", {"outcome": "replied"}),
        ("snooze", {"minutes": "5"}),
        ("reassign", {"owner": "maria"}),
    ):
        path = f"/managers/ivan/calls/{task['id']}/{action}"
        _assert_error(h.client.post(path, data=data, headers=maria), 403, "owner")
    # Nor through its own list's address: the task is not on maria's list.
    _assert_error(
        h.client.post(
            f"/managers/maria/calls/{task['id']}/outcome", data={"outcome": "replied"}, headers=maria
        ),
        404,
        "task_id",
    )
    assert _tasks(h)[0].status == "open"

    done = h.client.post(outcome, data={"outcome": "replied"}, headers=ivan, follow_redirects=False)
    assert done.status_code == 303 and _tasks(h)[0].status == "done"


def test_keys_are_needed_once_they_exist_and_only_admins_and_managers_may_use_the_list(h: Harness) -> None:
    admin, crm = _key(h, "admin"), _key(h, "integration")

    _assert_error(h.client.get("/managers/ivan/calls"), 401, "Authorization")
    _assert_error(
        h.client.get("/managers/ivan/calls", headers={"Authorization": "Bearer nope"}), 401, "Authorization"
    )
    _assert_error(h.client.get("/managers/ivan/calls", headers=crm), 403, "Authorization")
    assert h.client.get("/managers/ivan/calls", headers=admin).status_code == 200


def test_a_browser_signs_in_with_basic_auth_and_the_key_as_password(h: Harness) -> None:
    import base64

    secret = _key(h, "manager", "ivan")["Authorization"].removeprefix("Bearer ")
    asked = h.client.get("/managers/ivan/calls")
    assert asked.status_code == 401 and 'Basic realm="Cadence"' in asked.headers["WWW-Authenticate"]
    basic = base64.b64encode(f"ivan:{secret}".encode()).decode()
    assert (
        h.client.get("/managers/ivan/calls", headers={"Authorization": f"Basic {basic}"}).status_code == 200
    )
    wrong = base64.b64encode(b"ivan:not-the-key").decode()
    _assert_error(
        h.client.get("/managers/ivan/calls", headers={"Authorization": f"Basic {wrong}"}),
        401,
        "Authorization",
    )
    maria = base64.b64encode(f"maria:{secret}".encode()).decode()  # the key is Ivan's, whatever name is typed
    _assert_error(
        h.client.get("/managers/maria/calls", headers={"Authorization": f"Basic {maria}"}), 403, "owner"
    )


@pytest.mark.parametrize(
    ("params", "field"),
    [({"date": "2026-13-01"}, "date"), ({"tz": "Mars/Olympus"}, "tz"), ({"format": "xml"}, "format")],
)
def test_a_bad_query_is_422(h: Harness, params: dict[str, str], field: str) -> None:
    _assert_error(h.client.get("/managers/ivan/calls", params=params), 422, field)


def test_unknown_task_or_outcome(h: Harness) -> None:
    _enroll(h)
    h.run_days(2)
    [task] = _calls(h)

    _assert_error(h.post("/managers/ivan/calls/999/outcome", {"outcome": "replied"}), 404, "task_id")
    _assert_error(
        h.post(f"/managers/ivan/calls/{task['id']}/outcome", {"outcome": "delighted"}), 422, "outcome"
    )
    _assert_error(h.post(f"/managers/ivan/calls/{task['id']}/outcome", {}), 422, "outcome")
    assert _tasks(h)[0].status == "open"
