"""Cadence as people run it: `cadence serve` alone (embedded), and serve + worker + scheduler on Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from harness import deal_event
from processes import Group, wait_for, write_open_policy_and_templates
from servers import free_port

#: Seconds to wait for the processes to carry a touch through.
PATIENCE = 60

QUICK = """\
cadence: quick
description: Three touches on the day of enrollment, so real processes can show the whole path at once.
enroll:
  on: deal.stage_changed
  when: deal.stage == "proposal_sent"
exit:
  on_outcome: [replied]
steps:
  - day: 0
    channel: email
    template: email/hello
    reason: The proposal recap.
  - day: 0
    channel: call
    template: call/hello
    reason: Book the walkthrough.
  - day: 0
    channel: sms
    template: sms/hello
    reason: Invitation to the round table.
  - day: 5
    channel: email
    template: email/hello
    reason: Never sent in this test.
"""


@pytest.fixture
def quick_rules(tmp_path: Path) -> dict[str, str]:
    rules, templates = tmp_path / "rules", tmp_path / "templates"
    rules.mkdir()
    (rules / "quick.yaml").write_text(QUICK)
    # Three touches at once, whatever the hour: the policy's daily cap and quiet hours are lifted.
    write_open_policy_and_templates(rules, templates)
    return {
        "RULES_DIR": str(rules),
        "TEMPLATES_DIR": str(templates),
        "OUTBOX_DIR": str(tmp_path / "outbox"),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'cadence.db'}",
        "SCHEDULER_INTERVAL_SECONDS": "0.2",
    }


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Any]:
    made: list[Group] = []

    def make(env: dict[str, str]) -> Group:
        made.append(Group(env, tmp_path))
        return made[-1]

    yield make
    for group in made:
        group.stop()


def _get(url: str) -> Any:
    try:
        response = httpx.get(url, timeout=5)
    except httpx.TransportError:
        return None
    return response.json() if response.status_code == 200 else None


def _walk_the_path(base: str, outbox: Path, group: Group) -> None:
    """Webhook in, three touches out through the worker in order, an outcome ends the rest."""
    wait_for(lambda: _get(f"{base}/healthz"), "the API to answer", group, PATIENCE)
    response = httpx.post(f"{base}/webhooks/generic", json=deal_event(), timeout=10)
    assert response.status_code == 202, response.text
    [enrollment_id] = response.json()["enrolled"]
    again = httpx.post(f"{base}/webhooks/generic", json=deal_event(), timeout=10)
    assert again.json()["duplicate"] is True

    def three_sent() -> Any:
        timeline = _get(f"{base}/enrollments/{enrollment_id}")
        if timeline and [t["status"] for t in timeline["touches"][:3]] == ["sent"] * 3:
            return timeline
        return None

    timeline = wait_for(three_sent, "three touches sent", group, PATIENCE)
    touches = timeline["touches"]
    assert [t["reason"] for t in touches[:3]] == [
        "The proposal recap.",
        "Book the walkthrough.",
        "Invitation to the round table.",
    ]
    assert touches[3]["status"] == "planned"
    [eml] = list((outbox / "email").glob("*.eml"))
    assert "The proposal recap." in eml.read_text()
    [sms] = [json.loads(line) for line in (outbox / "sms.jsonl").read_text().splitlines()]
    assert sms["text"] == "Invitation to the round table."
    # A call task is filed under the contact's own date, which in the evening (UTC) is already tomorrow.
    call_day = datetime.fromisoformat(touches[1]["due_at"]).astimezone(ZoneInfo("Europe/Moscow")).date()
    tasks = _get(f"{base}/call-tasks?owner=ivan&date={call_day}")
    assert [t["reason"] for t in tasks["tasks"]] == ["Book the walkthrough."]

    outcome = httpx.post(
        f"{base}/outcomes", json={"enrollment_id": enrollment_id, "outcome": "replied"}, timeout=10
    )
    assert outcome.status_code == 201, outcome.text
    timeline = _get(f"{base}/enrollments/{enrollment_id}")
    assert timeline["status"] == "exited"
    assert timeline["touches"][3]["status"] == "cancelled"


def test_cadence_serve_alone_runs_the_embedded_default(
    quick_rules: dict[str, str], processes: Any, tmp_path: Path
) -> None:
    port = free_port()
    group = processes({**quick_rules, "PORT": str(port)})
    group.start("serve")
    _walk_the_path(f"http://127.0.0.1:{port}", tmp_path / "outbox", group)


@pytest.mark.integration
@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_serve_worker_and_scheduler_processes_on_redis(
    quick_rules: dict[str, str],
    processes: Any,
    tmp_path: Path,
    redis_url: str,
    database: str,
    request: pytest.FixtureRequest,
) -> None:
    env = {**quick_rules, "REDIS_URL": redis_url}
    if database == "postgresql":
        env["DATABASE_URL"] = request.getfixturevalue("postgres_url")
    port = free_port()
    group = processes({**env, "PORT": str(port)})
    subprocess.run(
        [sys.executable, "-m", "cadence", "migrate"], env=group.env, check=True, capture_output=True
    )
    group.start("serve")
    group.start("worker", "--threads", "2")
    group.start("worker", "--threads", "2")
    group.start("scheduler")
    group.start("scheduler")
    _walk_the_path(f"http://127.0.0.1:{port}", tmp_path / "outbox", group)
    group.stop()
    serve, *others = group.running
    assert [p.returncode for p in others] == [0] * len(others), group.tail()
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status tells how it ended.
    assert serve.returncode in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in (tmp_path / "serve-0.log").read_text()


def test_worker_and_scheduler_refuse_to_run_without_redis(quick_rules: dict[str, str]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"} | quick_rules
    for command in ("worker", "scheduler"):
        done = subprocess.run(
            [sys.executable, "-m", "cadence", command], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 2
        assert "needs REDIS_URL" in done.stderr
