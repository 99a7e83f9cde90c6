"""Letters on paper by the two printing providers: the daily batch for an in-house printer and mailroom, and
a print-and-mail API in Lob's shape, served for real on loopback."""

from __future__ import annotations

import base64
import csv
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pypdf
import pytest
import uvicorn
from harness import REPO, Harness, deal_event, make_settings, start_harness
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from typer.testing import CliRunner

from cadence.cli import app
from cadence.models import TouchStatus
from channels import DeliveryError, Message, RateLimited, TransientError
from channels.letter_batch import MANIFEST_COLUMNS, BatchLetters, NoLetters, build_batch
from channels.letter_print import PrintApiLetters
from channels.limits import Limits

# This machine's WeasyPrint warns that it will need HarfBuzz-Subset one day; the PDFs are fine without it.
pytestmark = pytest.mark.filterwarnings("ignore:HarfBuzz-Subset:DeprecationWarning")

#: The harness's Monday, as the contacts' local date in Moscow.
DAY = date(2026, 11, 23)
CADENCE = """\
cadence: letters
enroll: {on: deal.created}
calendar: {business_days: true, window: "09:00-18:00", timezone: Europe/Moscow, country: RU}
steps:
  - day: 0
    channel: letter
    template: letter/deal-04-executive-brief
    reason: A one-page executive brief for a senior reader.
"""
ANNA = {"name": "Anna Petrova", "company": "Northwind", "address": "Tverskaya 1\n125009 Moscow"}
BORIS = {
    "name": "Boris Ivanov",
    "company": "Smith & Sons <Ltd>",
    "address": "Nevsky prospekt 10, office 4\n\n191186 Saint Petersburg",
}


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    folder = tmp_path / "rules"
    folder.mkdir()
    (folder / "letters.yaml").write_text(CADENCE)
    (folder / "policy.yaml").write_text("caps: {per_day: null, per_week: null}\n")
    return folder


def _start(tmp_path: Path, rules: Path, **settings: Any) -> Harness:
    return start_harness(
        make_settings(
            tmp_path,
            rules_dir=rules,
            templates_dir=REPO / "templates",
            sender_company="Cadence Ltd",
            sender_address="Lubyanka 2\n101000 Moscow",
            **settings,
        )
    )


def _enroll(h: Harness, n: int, **contact: Any) -> None:
    event = deal_event(f"evt-{n}", type="deal.created", deal_id=f"d-{n}", contact_id=f"c-{n}")
    event["contact"].update(contact)
    response = h.post("/webhooks/generic", event)
    assert response.json()["enrolled"], response.text


# --- the daily batch ----------------------------------------------------------------------------------------


@pytest.fixture
def batch(tmp_path: Path, rules: Path) -> Iterator[Harness]:
    h = _start(tmp_path, rules, letter_provider="batch")
    yield h
    h.stop()


def _pages(pdf: Path) -> list[str]:
    return [p.extract_text() for p in pypdf.PdfReader(pdf).pages]


def _manifest(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_days_letters_become_one_pdf_and_a_manifest_for_the_mailroom(batch: Harness) -> None:
    _enroll(batch, 1, **ANNA)
    _enroll(batch, 2, **BORIS)
    batch.run_days(1)
    touches = batch.touches()
    assert [(t.status, t.receipt["provider"]) for t in touches] == [(TouchStatus.sent, "print-batch")] * 2

    pdf, manifest, count = build_batch(batch.service.settings.outbox_dir, DAY)

    assert count == 2
    rows = _manifest(manifest)
    assert list(rows[0]) == list(MANIFEST_COLUMNS)
    assert [(r["touch_key"], r["name"], r["company"], r["address"]) for r in rows] == [
        (touches[0].key, "Anna Petrova", "Northwind", "Tverskaya 1, 125009 Moscow"),
        (
            touches[1].key,
            "Boris Ivanov",
            "Smith & Sons <Ltd>",
            "Nevsky prospekt 10, office 4, 191186 Saint Petersburg",
        ),
    ]
    assert {r["reason"] for r in rows} == {"A one-page executive brief for a senior reader."}
    pages = _pages(pdf)
    assert len(pages) == sum(int(r["pages"]) for r in rows)
    for row, person in zip(rows, (ANNA, BORIS), strict=True):
        first = pages[int(row["first_page"]) - 1]
        for line in [person["name"], person["company"], *filter(None, person["address"].splitlines())]:
            assert line in first
        assert "Cadence Ltd · Lubyanka 2, 101000 Moscow" in first  # the return line
        assert "2026-11-23" in first
        assert f"Dear {person['name']}," in first  # the rendered body follows the address


def test_the_window_shows_the_address_where_a_dl_envelope_has_its_window(batch: Harness) -> None:
    _enroll(batch, 1, **ANNA)
    batch.run_days(1)
    pdf, _, _ = build_batch(batch.service.settings.outbox_dir, DAY)
    page = pypdf.PdfReader(pdf).pages[0]
    height = float(page.mediabox.height)
    placed: dict[str, tuple[float, float]] = {}

    def visit(text: str, cm: list[float], tm: list[float], *_: Any) -> None:
        if text.strip():
            x, y = tm[4] * cm[0] + tm[5] * cm[2] + cm[4], tm[4] * cm[1] + tm[5] * cm[3] + cm[5]
            placed[text.strip()] = (x / 72 * 25.4, (height - y) / 72 * 25.4)  # mm from left, from top

    page.extract_text(visitor_text=visit)
    for line in ("Anna Petrova", "Northwind", "Tverskaya 1", "125009 Moscow"):
        left, top = placed[line]
        assert 20 <= left <= 20 + 85 and 45 <= top <= 45 + 45, (line, left, top)
    assert placed["Cadence Ltd · Lubyanka 2, 101000 Moscow"][1] < placed["Anna Petrova"][1]


def test_print_batch_command_writes_the_pdf_and_manifest(
    batch: Harness, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _enroll(batch, 1, **ANNA)
    _enroll(batch, 2, **BORIS)
    batch.run_days(1)
    outbox = batch.service.settings.outbox_dir
    monkeypatch.setenv("OUTBOX_DIR", str(outbox))
    monkeypatch.setenv("LETTER_PROVIDER", "batch")
    monkeypatch.chdir(tmp_path)  # away from any .env

    result = CliRunner().invoke(app, ["print-batch", "--date", "2026-11-23"])

    assert result.exit_code == 0, result.output
    assert "2 letter(s) for 2026-11-23" in result.stdout
    pdf, manifest = outbox / "print" / "2026-11-23.pdf", outbox / "print" / "2026-11-23.csv"
    assert str(pdf) in result.stdout and str(manifest) in result.stdout
    assert len(_manifest(manifest)) == 2
    text = "\n".join(_pages(pdf))
    assert "Anna Petrova" in text and "Boris Ivanov" in text


def test_print_batch_command_says_when_there_is_nothing_to_print(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("OUTBOX_DIR", str(tmp_path / "outbox"))
    monkeypatch.setenv("LETTER_PROVIDER", "batch")
    monkeypatch.chdir(tmp_path)

    result = CliRunner().invoke(app, ["print-batch", "--date", "2026-11-24"])

    assert result.exit_code == 1
    assert "no letters to print for 2026-11-24" in result.output
    with pytest.raises(NoLetters):
        build_batch(tmp_path / "outbox", DAY)


def test_print_batch_command_refuses_a_date_it_cannot_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["print-batch", "--date", "23.11.2026"])
    assert result.exit_code == 2
    assert "YYYY-MM-DD" in result.output


def _message(key: str = "7-0-0", **contact: Any) -> Message:
    return Message(
        key=key,
        touch_id=1,
        channel="letter",
        contact={**ANNA, "id": 1, "country": "RU", **contact},
        deal=None,
        reason="A one-page executive brief.",
        due_at=datetime(2026, 11, 23, 6, 0, tzinfo=UTC),
        local_date=DAY,
        parts={"html": "<p>Dear Anna,</p>"},
        sender={"name": "Ivan", "company": "Cadence Ltd", "address": "Lubyanka 2"},
    )


def test_the_same_touch_sent_twice_leaves_one_letter_in_the_batch(tmp_path: Path) -> None:
    channel = BatchLetters(make_settings(tmp_path))
    first = channel.send(_message())
    second = channel.send(_message(name="Anna P. Petrova"))  # a retry after the CRM corrected the name

    assert first == second
    assert sorted(p.name for p in (tmp_path / "outbox" / "print" / "2026-11-23").iterdir()) == [
        "7-0-0.html",
        "7-0-0.json",
    ]
    _, manifest, count = build_batch(tmp_path / "outbox", DAY)
    assert count == 1
    assert [r["name"] for r in _manifest(manifest)] == ["Anna P. Petrova"]


def test_the_batch_is_in_touch_key_order_and_formulas_stay_text(tmp_path: Path) -> None:
    channel = BatchLetters(make_settings(tmp_path))
    for key in ("10-0-0", "9-0-0", "9-1-0"):
        channel.send(_message(key, name="=HYPERLINK(1)" if key == "10-0-0" else "Anna Petrova"))

    _, manifest, _ = build_batch(tmp_path / "outbox", DAY)

    rows = _manifest(manifest)
    assert [r["touch_key"] for r in rows] == ["9-0-0", "9-1-0", "10-0-0"]
    assert [r["first_page"] for r in rows] == ["1", "2", "3"]
    assert rows[2]["name"] == "'=HYPERLINK(1)"


def test_a_contact_without_an_address_is_skipped_with_the_reason(batch: Harness) -> None:
    _enroll(batch, 1, address=None)
    batch.run_days(1)

    [touch] = batch.touches()
    assert touch.status == TouchStatus.skipped
    assert touch.status_reason is not None and "contact has no address" in touch.status_reason
    assert not (batch.service.settings.outbox_dir / "print").exists()


# --- a print API in Lob's shape -----------------------------------------------------------------------------

KEY = "test_print_key"


@dataclass
class PrintApi:
    """A print-and-mail API on loopback: keeps every letter and every idempotency key, as Lob does."""

    url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    letters: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Answers to give, in turn, before working normally again: (status, body, headers).
    failures: list[tuple[int, dict[str, Any], dict[str, str]]] = field(default_factory=list)

    async def create_letter(self, request: Request) -> JSONResponse:
        body = await request.json()
        self.requests.append({"headers": dict(request.headers), "body": body})
        expected = "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()
        if request.headers.get("authorization") != expected:
            return JSONResponse({"error": {"message": "Your API key is not valid.", "status_code": 401}}, 401)
        if self.failures:
            status, error, headers = self.failures.pop(0)
            return JSONResponse(error, status, headers=headers)
        key = request.headers.get("idempotency-key", "")
        if key in self.letters:
            return JSONResponse(self.letters[key])
        if not body.get("to", {}).get("address_line1"):
            error = {"message": "to.address_line1 is required", "status_code": 422}
            return JSONResponse({"error": error}, 422)
        letter = {"id": f"ltr_{len(self.letters) + 1}", "expected_delivery_date": "2026-11-30", **body}
        self.letters[key] = letter
        return JSONResponse(letter)

    def fail_next(self, status: int, message: str = "", headers: dict[str, str] | None = None) -> None:
        self.failures.append((status, {"error": {"message": message, "status_code": status}}, headers or {}))


@pytest.fixture
def print_api() -> Iterator[PrintApi]:
    api = PrintApi()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    host, port = listener.getsockname()
    api.url = f"http://{host}:{port}/v1"
    server = uvicorn.Server(
        uvicorn.Config(
            Starlette(routes=[Route("/v1/letters", api.create_letter, methods=["POST"])]),
            log_config=None,
            access_log=False,
            lifespan="off",
            ws="none",
        )
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "the print API did not start"
    yield api
    server.should_exit = True
    thread.join(timeout=10)
    listener.close()


@pytest.fixture
def printed(tmp_path: Path, rules: Path, print_api: PrintApi) -> Iterator[Harness]:
    h = _start(tmp_path, rules, letter_provider="print-api", print_api_url=print_api.url, print_api_key=KEY)
    yield h
    h.stop()


def test_the_print_api_gets_the_letter_its_addresses_and_the_touch_key(
    printed: Harness, print_api: PrintApi
) -> None:
    _enroll(printed, 1, **BORIS)
    printed.run_days(1)

    [touch] = printed.touches()
    assert touch.status == TouchStatus.sent
    assert touch.receipt == {
        "provider": "print-api",
        "reference": "ltr_1",
        "expected_delivery_date": "2026-11-30",
    }
    [request] = print_api.requests
    # The touch key, marked with this installation's own prefix (from its secret key).
    sent_key = request["headers"]["idempotency-key"]
    assert sent_key.startswith("cadence-") and sent_key.endswith(f"-{touch.key}")
    body = request["body"]
    assert body["to"] == {
        "name": "Boris Ivanov",
        "company": "Smith & Sons <Ltd>",
        "address_line1": "Nevsky prospekt 10, office 4",
        "address_line2": "191186 Saint Petersburg",
        "address_country": "RU",
    }
    assert body["from"] == {
        "name": "Cadence",
        "company": "Cadence Ltd",
        "address_line1": "Lubyanka 2",
        "address_line2": "101000 Moscow",
    }
    assert (body["send_date"], body["color"]) == ("2026-11-23", False)
    assert body["file"].startswith("<!doctype html>") and "size: A4" in body["file"]
    assert "Smith &amp; Sons &lt;Ltd&gt;" in body["file"] and "<Ltd>" not in body["file"]
    assert "Dear Boris Ivanov," in body["file"]


def test_a_repeated_send_with_the_same_key_is_one_letter(printed: Harness, print_api: PrintApi) -> None:
    channel = printed.service.channels["letter"]

    first = channel.send(_message())
    second = channel.send(_message())

    assert first == second and first.reference == "ltr_1"
    assert len(print_api.requests) == 2
    assert len(print_api.letters) == 1


def test_a_server_error_is_retried_and_the_letter_goes_once(printed: Harness, print_api: PrintApi) -> None:
    print_api.fail_next(500, "Internal server error")
    _enroll(printed, 1, **ANNA)

    printed.run_days(1)  # the broker's retry comes after its backoff, within the same day

    [touch] = printed.touches()
    assert (touch.status, touch.attempts, touch.receipt["reference"]) == (TouchStatus.sent, 2, "ltr_1")
    assert len(print_api.requests) == 2 and len(print_api.letters) == 1


def test_a_refused_letter_fails_with_the_apis_message(printed: Harness, print_api: PrintApi) -> None:
    print_api.fail_next(422, "address_line1 must be no longer than 64 characters")
    _enroll(printed, 1, **ANNA)

    printed.run_days(1)

    [touch] = printed.touches()
    assert (touch.status, touch.attempts) == (TouchStatus.failed, 1)
    assert touch.status_reason is not None
    assert "address_line1 must be no longer than 64 characters" in touch.status_reason
    assert print_api.letters == {}


@pytest.mark.parametrize(
    ("status", "headers", "raised", "transient"),
    [
        (500, {}, TransientError, True),
        (503, {}, TransientError, True),
        (429, {"Retry-After": "7"}, RateLimited, True),
        (422, {}, DeliveryError, False),
        (400, {}, DeliveryError, False),
        (404, {}, DeliveryError, False),
    ],
)
def test_how_each_answer_of_the_api_is_taken(
    tmp_path: Path,
    print_api: PrintApi,
    status: int,
    headers: dict[str, str],
    raised: type[DeliveryError],
    transient: bool,
) -> None:
    settings = make_settings(tmp_path, print_api_url=print_api.url, print_api_key=KEY)
    print_api.fail_next(status, f"said with {status}", headers)

    with pytest.raises(raised, match=f"said with {status}") as caught:
        PrintApiLetters(settings, Limits(None)).send(_message())

    assert caught.value.transient is transient
    if isinstance(caught.value, RateLimited):
        assert caught.value.retry_after == 7


def test_a_wrong_key_is_a_failure_not_a_retry(tmp_path: Path, print_api: PrintApi) -> None:
    settings = make_settings(tmp_path, print_api_url=print_api.url, print_api_key="wrong")

    with pytest.raises(DeliveryError, match="API key is not valid") as caught:
        PrintApiLetters(settings, Limits(None)).send(_message())

    assert not caught.value.transient


def test_a_refused_connection_is_transient(tmp_path: Path) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    settings = make_settings(tmp_path, print_api_url=f"http://127.0.0.1:{port}/v1", print_api_key=KEY)

    with pytest.raises(TransientError, match="unreachable"):
        PrintApiLetters(settings, Limits(None)).send(_message())


def test_the_print_api_needs_its_url_and_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="PRINT_API_URL and PRINT_API_KEY"):
        PrintApiLetters(make_settings(tmp_path, print_api_url="http://127.0.0.1:9"), Limits(None))


def test_an_address_of_one_line_has_no_second_line(printed: Harness, print_api: PrintApi) -> None:
    message = replace(_message(), contact={"name": "Anna", "address": "Poste restante Moscow"})
    printed.service.channels["letter"].send(message)
    assert print_api.requests[0]["body"]["to"] == {"name": "Anna", "address_line1": "Poste restante Moscow"}
