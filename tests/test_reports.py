"""Reports: figures on a known data set equal hand-computed ones, in JSON, CSV and HTML; admin only."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from harness import MONDAY, Harness, make_settings, start_harness
from starlette.testclient import TestClient

from cadence import keys, store
from cadence.models import CadenceVersion, CallTask, Contact, Deal, Enrollment, Outcome, Touch

LOOPBACK = ("127.0.0.1", 50000)
D = timedelta(days=1)
T0 = MONDAY - 60 * D


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = start_harness(make_settings(tmp_path))
    harness.client = TestClient(harness.client.app, client=LOOPBACK)
    _seed(harness)
    yield harness
    harness.stop()


def _seed(h: Harness) -> None:
    """Three deals of two owners in open-deal, one lost deal in nurture, one lost deal never touched.

    d1 (ivan): 8 sent touches, steps 0..7, step 0 email/A, step 1 sms/B, the rest email; won after step 7.
    d2 (maria): step 0 sent (email, A), step 1 skipped (condition not met), step 2 skipped (no consent),
        step 3 sent (call); a reply on step 0's touch, a meeting on step 3's (by enrollment only); then lost.
    d3 (ivan, <b>&"x"</b>): step 0 sent (email, B), step 1 skipped (contact is blocked), step 2 deferred
        (planned, not counted); won after step 0.
    d4 (maria): lost, in nurture: one sent touch 45 days before MONDAY.
    d5 (<i>o&"</i>): lost, never touched.
    """
    with store.session(h.service.db) as s:
        version = CadenceVersion(name="open-deal", content_hash="x", yaml_text="", file="x", created_at=T0)
        s.add(version)
        s.flush()
        assert version.id is not None
        contacts, deals = [], []
        for n, (owner, status, title) in enumerate(
            [
                ("ivan", "won", "CRM rollout"),
                ("maria", "lost", "Fleet"),
                ("ivan", "won", '<b>&"x"</b>'),
                ("maria", "lost", "Old lead"),
                ('<i>o&"</i>', "lost", "Never touched"),
            ],
            start=1,
        ):
            contact = Contact(source="generic", external_id=f"c-{n}", created_at=T0, updated_at=T0)
            s.add(contact)
            s.flush()
            contacts.append(contact)
            deal = Deal(
                source="generic",
                external_id=f"d-{n}",
                contact_id=contact.id,
                title=title,
                status=status,
                owner=owner,
                created_at=T0,
                updated_at=T0 + 30 * D,
            )
            s.add(deal)
            s.flush()
            deals.append(deal)

        def enroll(n: int, cadence: str = "open-deal") -> Enrollment:
            e = Enrollment(
                cadence_name=cadence,
                cadence_version_id=version.id or 0,
                subject=f"deal:{deals[n - 1].id}",
                contact_id=contacts[n - 1].id or 0,
                deal_id=deals[n - 1].id,
                status="completed",
                started_at=T0,
            )
            s.add(e)
            s.flush()
            return e

        def touch(
            e: Enrollment,
            step: int,
            at: datetime,
            status: str = "sent",
            channel: str = "email",
            variant: str | None = None,
            why: str | None = None,
        ) -> Touch:
            t = Touch(
                enrollment_id=e.id or 0,
                step_index=step,
                channel=channel,
                template="t",
                variant=variant,
                reason="r",
                due_at=at,
                status=status,
                status_reason=why,
                finished_at=None if status == "planned" else at,
            )
            s.add(t)
            s.flush()
            return t

        e1 = enroll(1)
        for step in range(8):
            channel, variant = {0: ("email", "A"), 1: ("sms", "B")}.get(step, ("email", None))
            touch(e1, step, T0 + step * D, channel=channel, variant=variant)
        s.add(Outcome(name="won", enrollment_id=e1.id, deal_id=deals[0].id, occurred_at=T0 + 10 * D))

        e2 = enroll(2)
        t20 = touch(e2, 0, T0, variant="A")
        touch(e2, 1, T0 + D, "skipped", why="condition not met: contact.age > 50")
        touch(
            e2, 2, T0 + 2 * D, "skipped", "sms", why="no consent for sms: contact.sms_consent does not hold"
        )
        touch(e2, 3, T0 + 3 * D, channel="call")
        s.add(Outcome(name="replied", touch_id=t20.id, enrollment_id=e2.id, occurred_at=T0 + D / 2))
        s.add(
            Outcome(name="meeting_booked", enrollment_id=e2.id, deal_id=deals[1].id, occurred_at=MONDAY + D)
        )
        # d2 lost by status only (no outcome): at its updated_at, T0 + 30 days, after step 3.

        e3 = enroll(3)
        touch(e3, 0, T0 + 5 * D, variant="B")
        touch(e3, 1, T0 + 6 * D, "skipped", why="contact is blocked on all channels until 2027-01-01")
        touch(e3, 2, T0 + 7 * D, "planned", why="deferred to the next send window")
        s.add(Outcome(name="won", deal_id=deals[2].id, occurred_at=T0 + 8 * D))

        e4 = enroll(4, "lost-prospect-nurture")
        touch(e4, 0, MONDAY - 45 * D)
        e4b = enroll(4)
        touch(e4b, 0, MONDAY - 5 * D, "skipped", why="contact is blocked")  # a skip is not a touch

        # Call tasks, on MONDAY's date: ivan one due and done, one due and open, one overdue; maria one due.
        today = date(2026, 11, 23)
        steps = iter(range(100, 200))
        for owner, due, status in [
            ("ivan", today, "done"),
            ("ivan", today, "open"),
            ("ivan", today - D, "open"),
            ("ivan", today - D, "cancelled"),
            ("maria", today, "open"),
        ]:
            s.add(
                CallTask(
                    touch_id=touch(e1, next(steps), T0, "cancelled").id or 0,
                    owner=owner,
                    due_date=due,
                    due_at=MONDAY,
                    contact_id=contacts[0].id or 0,
                    reason="r",
                    script="s",
                    status=status,
                    created_at=T0,
                )
            )
        # This week (Mon 23 to Sun 29 November, Moscow): ivan sends two emails and a letter.
        touch(e1, 200, MONDAY + 2 * D, channel="email")
        touch(e1, 201, MONDAY + 3 * D, channel="email")
        touch(e1, 202, MONDAY + 6 * D, channel="letter")
        touch(e1, 203, MONDAY + 7 * D, channel="letter")  # next week


def _get(h: Harness, path: str, **headers: str) -> Any:
    response = h.client.get(path, headers=headers)
    assert response.status_code == 200, response.text
    return response


def _step(cadences: dict[str, Any], name: str, step: int) -> dict[str, Any]:
    found = next(c for c in cadences["cadences"] if c["cadence"] == name)
    row: dict[str, Any] = next(st for st in found["steps"] if st["step"] == step)
    return row


def test_cadence_report_counts_per_step_channel_and_variant(h: Harness) -> None:
    figures = _get(h, "/reports/cadences").json()

    step0 = _step(figures, "open-deal", 0)
    assert {k: step0[k] for k in ("sent", "skipped", "replies", "meetings", "won", "lost")} == {
        "sent": 3,
        "skipped": 1,
        "replies": 1,
        "meetings": 0,
        "won": 1,
        "lost": 0,
    }
    split = {(c["channel"], c["variant"]): (c["sent"], c["won"], c["replies"]) for c in step0["by_channel"]}
    assert split == {("email", "A"): (2, 0, 1), ("email", "B"): (1, 1, 0), ("email", None): (0, 0, 0)}
    assert step0["skipped_by_reason"] == {"contact is blocked": 1}  # d4's second open-deal enrollment

    step1 = _step(figures, "open-deal", 1)
    assert step1["sent"] == 1 and step1["skipped"] == 2
    assert step1["skipped_by_reason"] == {"condition not met": 1, "contact is blocked": 1}
    step2 = _step(figures, "open-deal", 2)
    assert step2["sent"] == 1 and step2["skipped_by_reason"] == {
        "no consent": 1
    }  # the deferral is not a skip
    step3 = _step(figures, "open-deal", 3)
    assert (step3["meetings"], step3["lost"], step3["won"]) == (1, 1, 0)
    assert _step(figures, "open-deal", 7)["won"] == 1
    assert (
        sum(st["won"] for st in next(c for c in figures["cadences"] if c["cadence"] == "open-deal")["steps"])
        == 2
    )
    # d4's last sent touch before its loss (by status, at updated_at) is the nurture one.
    assert _step(figures, "lost-prospect-nurture", 0)["lost"] == 1


def test_cadence_report_takes_a_period(h: Harness) -> None:
    figures = _get(
        h, "/reports/cadences?since=2026-09-24T06:00:00%2B00:00&until=2026-09-25T06:00:00%2B00:00"
    ).json()

    assert [(c["cadence"], [st["step"] for st in c["steps"]]) for c in figures["cadences"]] == [
        ("open-deal", [0])
    ]
    step0 = _step(figures, "open-deal", 0)
    assert (step0["sent"], step0["replies"]) == (2, 1)


def test_cadence_csv_has_the_same_figures(h: Harness) -> None:
    figures = _get(h, "/reports/cadences").json()
    response = _get(h, "/reports/cadences?format=csv")

    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    for cadence in figures["cadences"]:
        for step in cadence["steps"]:
            row = next(
                r
                for r in rows
                if (r["cadence"], r["step"], r["channel"]) == (cadence["cadence"], str(step["step"]), "all")
            )
            for field in ("sent", "skipped", "replies", "meetings", "won", "lost"):
                assert int(row[field]) == step[field]
    blocked = next(
        r for r in rows if (r["step"], r["channel"]) == ("1", "all") and r["cadence"] == "open-deal"
    )
    assert blocked["skipped_by_reason"] == "condition not met=1; contact is blocked=1"
    email_b = next(r for r in rows if (r["step"], r["channel"], r["variant"]) == ("0", "email", "B"))
    assert (email_b["sent"], email_b["won"]) == ("1", "1")


def test_touches_to_win(h: Harness) -> None:
    figures = _get(h, "/reports/touches-to-win").json()

    # d1 had 8 sent touches before its win (its later ones came after); d3 had 1.
    assert figures == {
        "deals_won": 2,
        "distribution": {"1": 1, "8": 1},
        "won_at_or_after_seventh": 1,
        "share_won_at_or_after_seventh": 0.5,
    }
    rows = list(csv.reader(io.StringIO(_get(h, "/reports/touches-to-win?format=csv").text)))
    assert rows == [["touches", "deals_won"], ["1", "1"], ["8", "1"]]


def test_base_decay(h: Harness) -> None:
    figures = _get(h, "/reports/base-decay?days=30").json()

    # d2 last touched 57 days ago, d4 45 days ago (its skip does not count), d5 never.
    assert (figures["days"], figures["lost_deals"], figures["count"]) == (30, 3, 3)
    assert [(d["title"], d["owner"], d["last_touched_at"]) for d in figures["deals"]] == [
        ("Never touched", '<i>o&"</i>', None),
        ("Fleet", "maria", (T0 + 3 * D).isoformat()),
        ("Old lead", "maria", (MONDAY - 45 * D).isoformat()),
    ]
    assert _get(h, "/reports/base-decay?days=50").json()["count"] == 2
    assert _get(h, "/reports/base-decay?days=60").json()["count"] == 1
    rows = list(csv.DictReader(io.StringIO(_get(h, "/reports/base-decay?format=csv").text)))
    assert [r["title"] for r in rows] == ["Never touched", "Fleet", "Old lead"]
    assert rows[0]["last_touched_at"] == "" and rows[2]["owner"] == "maria"


def test_team(h: Harness) -> None:
    figures = _get(h, "/reports/team?date=2026-11-23&tz=Europe/Moscow").json()

    assert figures["week_start"] == "2026-11-23"
    by_owner = {m["owner"]: m for m in figures["managers"]}
    assert {
        k: by_owner["ivan"][k] for k in ("calls_due", "calls_done", "calls_overdue", "meetings_booked")
    } == {
        "calls_due": 2,
        "calls_done": 1,
        "calls_overdue": 1,
        "meetings_booked": 0,
    }
    assert by_owner["ivan"]["touches_sent"] == {"email": 2, "letter": 1}
    assert (by_owner["maria"]["calls_due"], by_owner["maria"]["meetings_booked"]) == (1, 1)
    assert by_owner["maria"]["touches_sent"] == {}
    rows = {
        r["owner"]: r
        for r in csv.DictReader(io.StringIO(_get(h, "/reports/team?date=2026-11-23&format=csv").text))
    }
    assert (rows["ivan"]["calls_due"], rows["ivan"]["sent_email"], rows["ivan"]["sent_letter"]) == (
        "2",
        "2",
        "1",
    )


def test_the_page_draws_each_chart_with_escaped_labels(h: Harness) -> None:
    response = _get(h, "/reports/page")

    assert response.headers["content-type"].startswith("text/html")
    text = response.text
    # Two per cadence (two cadences), touches to win, base decay, and two for the team.
    assert text.count("<svg") == 8 and text.count("</svg>") == 8
    assert "<script" not in text and "https://" not in text and "<i>" not in text
    assert "&lt;i&gt;o&amp;&quot;&lt;/i&gt;" in text and "8 touches" in text


def test_labels_in_a_chart_are_escaped() -> None:
    from cadence.reports import bar_chart

    svg = bar_chart('<script>"a"&</script>', [("<b>&x</b>", 2), ("two", 1)])
    assert "<script>" not in svg and "<b>" not in svg
    assert "&lt;b&gt;&amp;x&lt;/b&gt;" in svg and svg.count("<rect") == 2


def test_bad_input_answers_in_the_one_shape(h: Harness) -> None:
    for path, field in [
        ("/reports/base-decay?days=0", "days"),
        ("/reports/cadences?format=xml", "format"),
        ("/reports/cadences?since=yesterday", "since"),
        ("/reports/team?tz=Mars/Olympus", "tz"),
        ("/reports/team?date=23.11.2026", "date"),
    ]:
        response = h.client.get(path)
        assert response.status_code == 422, path
        assert response.json()["error"]["field"] == field


def test_only_admin_keys_may_read_reports(h: Harness) -> None:
    admin = keys.create(h.service.db, "admin", "admin", None, MONDAY)[1]
    manager = keys.create(h.service.db, "ivan", "manager", "ivan", MONDAY)[1]
    integration = keys.create(h.service.db, "crm", "integration", None, MONDAY)[1]
    for path in (
        "/reports/cadences",
        "/reports/touches-to-win",
        "/reports/base-decay",
        "/reports/team",
        "/reports/page",
    ):
        assert h.client.get(path).status_code == 401
        for secret in (manager, integration):
            refused = h.client.get(path, headers={"Authorization": f"Bearer {secret}"})
            assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
        assert h.client.get(path, headers={"Authorization": f"Bearer {admin}"}).status_code == 200
