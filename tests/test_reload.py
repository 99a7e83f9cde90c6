"""Reloading the rules in a running Cadence: all or nothing, guarded, and enrollments keep their version."""

from __future__ import annotations

import logging
import shutil
import signal
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from harness import REPO, Harness, deal_event, make_settings, serve, start_harness
from servers import free_port
from starlette.testclient import TestClient
from test_rules_diff import NEW_CADENCE
from typer.testing import CliRunner, Result

from cadence import sandbox
from cadence.cli import app

TOKEN = "reload-token-for-tests"
#: Where the tests' requests come from: this machine, unless a test says otherwise.
LOOPBACK = ("127.0.0.1", 50000)


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    folder = tmp_path / "rules"
    shutil.copytree(REPO / "rules", folder)
    return folder


@pytest.fixture
def cadence(tmp_path: Path, rules: Path) -> Iterator[Harness]:
    harness = start_harness(make_settings(tmp_path, rules_dir=rules))
    yield harness
    harness.stop()


@pytest.fixture
def guarded(tmp_path: Path, rules: Path) -> Iterator[Harness]:
    harness = start_harness(make_settings(tmp_path, rules_dir=rules, admin_token=TOKEN))
    yield harness
    harness.stop()


def client(h: Harness, host: tuple[str, int] = LOOPBACK) -> TestClient:
    return TestClient(h.client.app, client=host)


def reload(h: Harness, **headers: str) -> Any:
    return client(h).post("/rules/reload", headers=headers)


def enrolled_in(h: Harness, body: dict[str, Any]) -> list[str]:
    response = h.post("/webhooks/generic", body)
    assert response.status_code == 202, response.text
    names = {e.id: e.cadence_name for e in h.enrollments()}
    return [names[i] for i in response.json()["enrolled"]]


def cadences(h: Harness) -> dict[str, dict[str, Any]]:
    response = client(h).get("/cadences")
    assert response.status_code == 200
    return {c["name"]: c for c in response.json()["cadences"]}


# --- a valid change ---------------------------------------------------------------------------------------


def test_a_valid_change_is_picked_up_and_answered_with_the_diff(cadence: Harness, rules: Path) -> None:
    assert enrolled_in(cadence, deal_event("evt-0", type="deal.created")) == []
    (rules / "re-engage.yaml").write_text(NEW_CADENCE, encoding="utf-8")
    edit(rules / "open-deal.yaml", "  - day: 5\n", "  - day: 6\n")

    response = reload(cadence)

    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["differs"] is True
    statuses = {c["name"]: c["status"] for c in answer["cadences"]}
    assert (statuses["re-engage"], statuses["open-deal"], statuses["onboarding"]) == (
        "added",
        "changed",
        "unchanged",
    )
    [open_deal] = [c for c in answer["cadences"] if c["name"] == "open-deal"]
    assert [c["text"] for c in open_deal["changes"]] == ["steps[2].day: 5 → 6"]
    assert answer["policy"] == []
    assert enrolled_in(cadence, deal_event("evt-1", type="deal.created", deal_id="d-2")) == ["re-engage"]
    assert "re-engage" in cadences(cadence)


def test_cadences_lists_what_is_loaded(cadence: Harness) -> None:
    listed = cadences(cadence)

    loaded = cadence.service.rules.cadences
    assert sorted(listed) == sorted(loaded)
    open_deal = listed["open-deal"]
    assert open_deal == {
        "name": "open-deal",
        "kind": "decision",
        "content_hash": loaded["open-deal"].content_hash,
        "file": loaded["open-deal"].file,
        "steps": len(loaded["open-deal"].spec.steps),
    }
    assert open_deal["steps"] == 8


# --- all or nothing ---------------------------------------------------------------------------------------

BROKEN_YAML = NEW_CADENCE.replace("reason: Offer a small pilot", "reason: Offer: a small pilot")
UNKNOWN_TEMPLATE = NEW_CADENCE.replace("call/deal-07-pilot-offer", "call/no-such-script")


@pytest.mark.parametrize(
    ("file", "old", "new", "needle"),
    [
        ("re-engage.yaml", None, BROKEN_YAML, "reason: Offer:"),
        ("re-engage.yaml", None, UNKNOWN_TEMPLATE, "call/no-such-script"),
        ("open-deal.yaml", "  lost: lost-prospect-nurture\n", "  lost: no-such-cadence\n", "no-such-cadence"),
    ],
    ids=["bad-yaml", "unknown-template", "unknown-then-target"],
)
def test_a_broken_file_is_422_with_located_problems_and_the_old_rules_stay(
    cadence: Harness, rules: Path, file: str, old: str | None, new: str, needle: str
) -> None:
    hashes = {name: c["content_hash"] for name, c in cadences(cadence).items()}
    # A change that would stop open-deal enrolling, made together with the broken file: it must not apply.
    edit(rules / "open-deal.yaml", 'when: deal.stage == "proposal_sent"', 'when: deal.stage == "never"')
    if old is None:
        (rules / file).write_text(new, encoding="utf-8")
    else:
        edit(rules / file, old, new)

    response = reload(cadence)

    assert response.status_code == 422, response.text
    problem = response.json()["error"]
    assert problem["code"] == "invalid_rules"
    assert set(problem) >= {"code", "message", "field", "problems"}
    assert "stay" in problem["message"]
    lines = (rules / file).read_text(encoding="utf-8").splitlines()
    line = next(i for i, text in enumerate(lines, 1) if needle in text)
    located = [p for p in problem["problems"] if Path(p["file"]).name == file]
    assert located, problem["problems"]
    assert all(p["line"] == line and p["column"] >= 1 and p["message"] for p in located)
    assert {name: c["content_hash"] for name, c in cadences(cadence).items()} == hashes
    assert enrolled_in(cadence, deal_event()) == ["open-deal"]
    assert enrolled_in(cadence, deal_event("evt-2", type="deal.created", deal_id="d-2")) == []


# --- templates go live with the rules ---------------------------------------------------------------------

INVITE = "sms/deal-05-round-table-invite.txt"


@pytest.fixture
def own_templates(tmp_path: Path, rules: Path) -> Iterator[tuple[Harness, Path]]:
    templates = tmp_path / "templates"
    shutil.copytree(REPO / "templates", templates)
    harness = start_harness(make_settings(tmp_path, rules_dir=rules, templates_dir=templates))
    yield harness, templates
    harness.stop()


def invite(h: Harness) -> str:
    """The invitation as the workers render it now."""
    context = {"contact": {"first_name": "Anna"}, "sender": {"company": "Acme", "name": "Ivan"}}
    return sandbox.render(h.service.dispatcher.templates, INVITE, context)


def test_an_edited_template_goes_live_with_a_reload_not_before(own_templates: tuple[Harness, Path]) -> None:
    cadence, templates = own_templates
    assert "breakfast round table" in invite(cadence)
    edit(templates / INVITE, "breakfast round table", "lunch round table")
    assert "breakfast round table" in invite(cadence)  # saved, not yet checked

    assert reload(cadence).status_code == 200

    assert "lunch round table" in invite(cadence)


def test_a_template_broken_on_disk_leaves_the_loaded_one_in_force(
    own_templates: tuple[Harness, Path],
) -> None:
    cadence, templates = own_templates
    before = invite(cadence)
    edit(templates / INVITE, "Reply YES.", "Reply {{ YES.")

    response = reload(cadence)

    assert response.status_code == 422, response.text
    # Located at the step that uses it, with the template's own line.
    assert any(f"{INVITE}:1:" in p["message"] for p in response.json()["error"]["problems"])
    assert invite(cadence) == before


# --- who may reload ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}],
    ids=["none", "wrong-token", "no-scheme", "basic"],
)
def test_with_a_token_set_the_bearer_token_is_required(guarded: Harness, headers: dict[str, str]) -> None:
    before = guarded.service.rules

    response = reload(guarded, **headers)

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert response.json()["error"]["code"] == "unauthorised"
    assert guarded.service.rules is before


def test_with_a_token_set_the_right_one_reloads_from_anywhere(guarded: Harness) -> None:
    before = guarded.service.rules

    response = client(guarded, ("203.0.113.7", 4000)).post(
        "/rules/reload", headers={"Authorization": f"bearer {TOKEN}"}
    )

    assert response.status_code == 200, response.text
    assert guarded.service.rules is not before


@pytest.mark.parametrize(
    ("host", "status"),
    [("127.0.0.1", 200), ("::1", 200), ("::ffff:127.0.0.1", 200), ("203.0.113.7", 403), ("testclient", 403)],
)
def test_without_a_token_only_loopback_may_reload(cadence: Harness, host: str, status: int) -> None:
    response = client(cadence, (host, 4000)).post("/rules/reload")

    assert response.status_code == status, response.text
    if status == 403:
        assert response.json()["error"]["code"] == "forbidden"


# --- running enrollments keep their version -----------------------------------------------------------------


def test_an_enrollment_started_before_a_reload_keeps_its_version_and_its_steps(
    cadence: Harness, rules: Path
) -> None:
    [before] = cadence.post("/webhooks/generic", deal_event()).json()["enrolled"]
    edit(
        rules / "open-deal.yaml",
        "  - day: 2\n    channel: call\n    template: call/deal-02-walkthrough\n",
        "  - day: 3\n    channel: email\n    template: email/deal-06-schedule-update\n",
    )
    assert reload(cadence).status_code == 200
    body = deal_event("evt-2", deal_id="d-2", contact_id="c-2")
    [after] = cadence.post("/webhooks/generic", body).json()["enrolled"]

    cadence.run_days(6)

    old, new = (
        cadence.client.get(f"/enrollments/{before}").json(),
        cadence.client.get(f"/enrollments/{after}").json(),
    )
    assert old["cadence_version"] != new["cadence_version"]
    old_touches = {t["step"]: t for t in old["touches"]}
    new_touches = {t["step"]: t for t in new["touches"]}
    assert (old_touches[1]["channel"], old_touches[1]["template"]) == ("call", "call/deal-02-walkthrough")
    assert (new_touches[1]["channel"], new_touches[1]["template"]) == (
        "email",
        "email/deal-06-schedule-update",
    )
    assert old_touches[1]["status"] == new_touches[1]["status"] == "sent"
    # Business day 2 against business day 3 of the same week: a day apart.
    gap = datetime.fromisoformat(new_touches[1]["due_at"]) - datetime.fromisoformat(old_touches[1]["due_at"])
    assert gap == timedelta(days=1)


# --- SIGHUP -------------------------------------------------------------------------------------------------


def test_sighup_reloads_all_or_nothing_and_stop_restores_the_handler(
    tmp_path: Path, rules: Path, caplog: pytest.LogCaptureFixture
) -> None:
    original = signal.getsignal(signal.SIGHUP)
    harness = start_harness(make_settings(tmp_path, rules_dir=rules))  # its worker starts in this thread
    try:
        (rules / "re-engage.yaml").write_text(NEW_CADENCE, encoding="utf-8")
        signal.raise_signal(signal.SIGHUP)
        assert "re-engage" in harness.service.rules

        loaded = harness.service.rules
        (rules / "broken.yaml").write_text(BROKEN_YAML.replace("re-engage", "broken"), encoding="utf-8")
        with caplog.at_level(logging.ERROR, logger="cadence.service"):
            signal.raise_signal(signal.SIGHUP)
        assert harness.service.rules is loaded
        [record] = [r for r in caplog.records if r.getMessage() == "rules not reloaded"]
        assert any("broken.yaml:" in p for p in record.__dict__["problems"])
    finally:
        harness.stop()
    assert signal.getsignal(signal.SIGHUP) == original


# --- cadence rules reload -------------------------------------------------------------------------------


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, rules: Path) -> CliRunner:
    for name in ("DATABASE_URL", "REDIS_URL", "ADMIN_TOKEN", "HOST", "PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RULES_DIR", str(rules))
    monkeypatch.setenv("TEMPLATES_DIR", str(REPO / "templates"))
    workdir = tmp_path / "workdir"  # no .env here
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    return CliRunner()


@pytest.fixture
def serving(tmp_path: Path, rules: Path) -> Iterator[tuple[str, Harness]]:
    """The API on a real loopback port, for the command to talk to."""
    harness = start_harness(make_settings(tmp_path, rules_dir=rules, admin_token=TOKEN))
    with serve(harness) as url:
        yield url, harness
    harness.stop()


def invoke(runner: CliRunner, *args: object) -> Result:
    return runner.invoke(app, [str(a) for a in args])


def test_cli_reload_prints_what_changed(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, serving: tuple[str, Harness], rules: Path
) -> None:
    url, harness = serving
    monkeypatch.setenv("ADMIN_TOKEN", TOKEN)
    (rules / "re-engage.yaml").write_text(NEW_CADENCE, encoding="utf-8")

    result = invoke(runner, "rules", "reload", "--url", url)

    assert result.exit_code == 0, result.output
    assert f"+ re-engage added ({rules / 're-engage.yaml'})" in result.stdout
    assert "re-engage" in harness.service.rules


def test_cli_reload_with_a_wrong_token_fails(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, serving: tuple[str, Harness]
) -> None:
    url, harness = serving
    monkeypatch.setenv("ADMIN_TOKEN", "wrong")
    before = harness.service.rules

    result = invoke(runner, "rules", "reload", "--url", url)

    assert result.exit_code == 1
    assert "401" in result.output
    assert harness.service.rules is before


def test_cli_reload_prints_the_servers_problems(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, serving: tuple[str, Harness], tmp_path: Path
) -> None:
    url, harness = serving
    monkeypatch.setenv("ADMIN_TOKEN", TOKEN)
    # The server's folder breaks; the one checked here (another copy) is fine.
    served = harness.service.settings.rules_dir
    edit(served / "open-deal.yaml", "  lost: lost-prospect-nurture\n", "  lost: no-such-cadence\n")
    here = tmp_path / "here"
    shutil.copytree(REPO / "rules", here)
    monkeypatch.setenv("RULES_DIR", str(here))
    before = harness.service.rules

    result = invoke(runner, "rules", "reload", "--url", url)

    assert result.exit_code == 2, result.output
    assert f"{served / 'open-deal.yaml'}:" in result.stdout
    assert "no-such-cadence" in result.stdout
    assert harness.service.rules is before


def test_cli_reload_checks_the_rules_first_and_sends_nothing_when_they_are_invalid(
    runner: CliRunner, rules: Path
) -> None:
    (rules / "broken.yaml").write_text(BROKEN_YAML.replace("re-engage", "broken"), encoding="utf-8")
    nobody = f"http://127.0.0.1:{free_port()}"  # were it asked, the command would fail to reach it: exit 1

    result = invoke(runner, "rules", "reload", "--url", nobody)

    assert result.exit_code == 2, result.output
    assert f"{rules / 'broken.yaml'}:" in result.stdout
    assert "nothing sent to the server" in result.output
    assert "cannot reach" not in result.output


def test_cli_reload_says_when_the_server_cannot_be_reached(runner: CliRunner) -> None:
    result = invoke(runner, "rules", "reload", "--url", f"http://127.0.0.1:{free_port()}")

    assert result.exit_code == 1
    assert "cannot reach" in result.output


def test_cli_reload_wants_an_http_address(runner: CliRunner) -> None:
    result = invoke(runner, "rules", "reload", "--url", "file:///etc/passwd")

    assert result.exit_code == 2
    assert "http://" in result.output


def test_a_reload_without_changes_says_so(cadence: Harness) -> None:
    before = cadence.service.rules

    answer = reload(cadence).json()

    assert answer["differs"] is False
    assert {c["status"] for c in answer["cadences"]} == {"unchanged"}
    assert cadence.service.rules is not before
