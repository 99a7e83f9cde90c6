"""The SMS gateway provider against a real local HTTP server speaking Twilio's Messages API, and the
gateway's callbacks (delivery status, inbound STOP/START and replies) through the app."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import pytest
from harness import Harness, deal_event, make_settings, start_harness
from servers import free_port
from sqlmodel import select

from cadence import store
from cadence.models import Block, Enrollment, Outcome, Touch, TouchStatus
from channels import RateLimited, TransientError
from channels.sms_gateway import segments, signature

SID, TOKEN = "AC0123456789", "gateway-token"
PUBLIC = "https://cadence.example.com"
SENDER = "+74950000000"
#: 100 Cyrillic characters: UCS-2, so two parts.
CYRILLIC_100 = ("Анна, ждём вас на встрече в четверг. " * 3)[:99] + "!"
CADENCE = """\
cadence: texts
enroll: {on: deal.created}
steps:
  - {day: 0, channel: sms, template: sms/hello, reason: The first text.}
  - {day: 1, channel: sms, template: sms/hello, reason: The second text.}
  - {day: 2, channel: sms, template: sms/hello, reason: The third text.}
"""


class Gateway:
    """A Messages endpoint on loopback: checks basic auth, records each form, answers as told."""

    def __init__(self) -> None:
        self.forms: list[dict[str, str]] = []
        self.headers: list[dict[str, str]] = []
        #: The next answers, in turn: "ok", "500", "400", "429" or "hang"; "ok" once they run out.
        self.answers: list[str] = []
        #: num_segments to report; None leaves it out, as some gateways do.
        self.segments: str | None = None
        self.release = threading.Event()
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0))).decode()
                expected = "Basic " + base64.b64encode(f"{SID}:{TOKEN}".encode()).decode()
                if self.headers.get("authorization") != expected:
                    return self._answer(401, {"code": 20003, "message": "Authenticate", "status": 401})
                gateway.forms.append(dict(parse_qsl(body)))
                gateway.headers.append(dict(self.headers))
                answer = gateway.answers.pop(0) if gateway.answers else "ok"
                if answer == "hang":
                    gateway.release.wait(5)
                    return None
                if answer == "429":
                    return self._answer(
                        429, {"code": 20429, "message": "Too Many Requests"}, {"Retry-After": "7"}
                    )
                if answer in ("500", "400"):
                    said = "The 'To' number is not a valid phone number." if answer == "400" else "Internal"
                    return self._answer(int(answer), {"code": 21211, "message": said, "status": int(answer)})
                sid = f"SM{len(gateway.forms):032d}"
                reply = {"sid": sid, "status": "queued", "to": gateway.forms[-1]["To"]}
                if gateway.segments is not None:
                    reply["num_segments"] = gateway.segments
                return self._answer(201, reply)

            def _answer(
                self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
            ) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/2010-04-01/Accounts/{SID}/Messages.json"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, name="sms-gateway", daemon=True
        )
        self.thread.start()

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def gateway() -> Iterator[Gateway]:
    server = Gateway()
    yield server
    server.stop()


def _start(tmp_path: Path, url: str, **settings: Any) -> Harness:
    rules, templates = tmp_path / "rules", tmp_path / "templates"
    (templates / "sms").mkdir(parents=True)
    rules.mkdir()
    (templates / "sms" / "hello.txt").write_text(CYRILLIC_100 + "\n", encoding="utf-8")
    (rules / "texts.yaml").write_text(CADENCE)
    (rules / "policy.yaml").write_text("caps: {per_day: null, per_week: null}\n")
    values: dict[str, Any] = {
        "rules_dir": rules,
        "templates_dir": templates,
        "sms_provider": "gateway",
        "sms_gateway_url": url,
        "sms_account_sid": SID,
        "sms_auth_token": TOKEN,
        "sms_from": SENDER,
        "sms_timeout_seconds": 0.5,
        "public_url": PUBLIC,
        "secret_key": "test-secret",
        **settings,
    }
    return start_harness(make_settings(tmp_path, **values))


@pytest.fixture
def h(tmp_path: Path, gateway: Gateway) -> Iterator[Harness]:
    harness = _start(tmp_path, gateway.url)
    yield harness
    harness.stop()


def _enroll(h: Harness) -> None:
    event = deal_event(type="deal.created")
    event["contact"]["mobile"] = "8 916 765-43-21"  # read in the contact's country, RU
    assert h.post("/webhooks/generic", event).status_code == 202


def _callback(h: Harness, url: str, form: dict[str, str], token: str | None = TOKEN) -> Any:
    """POST a form as the gateway would, signed with its auth token, to a URL under PUBLIC."""
    headers = {"content-type": "application/x-www-form-urlencoded"}
    if token:
        headers["x-twilio-signature"] = signature(token, url, form.items())
    return h.client.post(url.removeprefix(PUBLIC), content=urlencode(form), headers=headers)


def _inbound(h: Harness, body: str, sender: str = "+79167654321") -> Any:
    form = {"MessageSid": f"SMin{abs(hash((body, sender)))}", "From": sender, "To": SENDER, "Body": body}
    return _callback(h, f"{PUBLIC}/sms/inbound", form)


def _queue_first_touch(h: Harness) -> Touch:
    """Queue the first touch without a broker message, so only the test's own dispatch calls send it."""
    _enroll(h)
    with store.session(h.service.db) as s:
        touch = s.exec(select(Touch)).one()
        touch.status, touch.queued_at = TouchStatus.queued, h.clock()
    return touch


# --- sending ------------------------------------------------------------------------------------------------


def test_a_text_reaches_the_gateway_in_twilios_shape_and_the_receipt_keeps_sid_and_segments(
    h: Harness, gateway: Gateway
) -> None:
    _enroll(h)
    h.run_days(0.5)

    [form] = gateway.forms
    first = h.touches()[0]
    assert form["To"] == "+79167654321"  # the mobile, in E.164
    assert form["From"] == SENDER
    assert form["Body"] == CYRILLIC_100
    assert form["StatusCallback"].startswith(f"{PUBLIC}/sms/status/{first.id}.")
    sent_key = gateway.headers[0]["Idempotency-Key"]
    assert sent_key.startswith("cadence-") and sent_key.endswith(f"-{first.key}")
    assert first.status == TouchStatus.sent
    assert first.receipt == {
        "provider": "sms-gateway",
        "reference": f"SM{1:032d}",
        "segments": 2,
        "to": "+79167654321",
    }


def test_the_gateways_own_segment_count_wins(h: Harness, gateway: Gateway) -> None:
    gateway.segments = "3"
    _enroll(h)
    h.run_days(0.5)
    assert h.touches()[0].receipt["segments"] == 3


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("", 1),
        ("a" * 160, 1),
        ("a" * 161, 2),
        ("a" * 306, 2),
        ("a" * 307, 3),
        ("€" * 80, 1),  # extension characters take two septets
        ("€" * 81, 2),
        ("я" * 70, 1),
        ("я" * 71, 2),
        (CYRILLIC_100, 2),
        ("я" * 134, 2),
        ("я" * 135, 3),
        ("Hi 👋", 1),
    ],
)
def test_segments_count_gsm7_and_ucs2_parts(text: str, parts: int) -> None:
    assert segments(text) == parts


def test_a_server_error_is_retried_and_the_text_sent_once_when_the_gateway_recovers(
    h: Harness, gateway: Gateway
) -> None:
    gateway.answers = ["500"]
    touch = _queue_first_touch(h)
    with pytest.raises(TransientError, match="500: Internal"):
        h.service.dispatcher.dispatch(touch.id or 0)
    assert h.touches()[0].status == TouchStatus.queued
    assert h.service.dispatcher.dispatch(touch.id or 0).status == TouchStatus.sent
    sent = h.touches()[0]
    assert (sent.status, sent.attempts, len(gateway.forms)) == (TouchStatus.sent, 2, 2)


def test_a_refusal_fails_the_touch_with_the_gateways_message_after_one_try(
    h: Harness, gateway: Gateway
) -> None:
    gateway.answers = ["400"]
    _enroll(h)
    h.run_days(0.5)
    failed = h.touches()[0]
    assert failed.status == TouchStatus.failed
    assert (
        failed.status_reason is not None
        and "The 'To' number is not a valid phone number." in failed.status_reason
    )
    assert len(gateway.forms) == 1


def test_too_many_requests_waits_for_retry_after_without_spending_an_attempt(
    h: Harness, gateway: Gateway
) -> None:
    gateway.answers = ["429"]
    touch = _queue_first_touch(h)
    result = h.service.dispatcher.dispatch(touch.id or 0)
    waiting = h.touches()[0]
    assert result.status == TouchStatus.planned
    assert (waiting.status, waiting.attempts) == (TouchStatus.planned, 0)
    assert waiting.due_at == h.clock() + timedelta(seconds=7)


def test_a_gateway_that_is_not_there_is_a_transient_error(tmp_path: Path) -> None:
    harness = _start(tmp_path, f"http://127.0.0.1:{free_port()}/Messages.json")
    try:
        touch = _queue_first_touch(harness)
        with pytest.raises(TransientError, match="unreachable"):
            harness.service.dispatcher.dispatch(touch.id or 0)
        assert harness.touches()[0].status == TouchStatus.queued
    finally:
        harness.stop()


def test_a_gateway_that_takes_the_request_and_hangs_is_not_asked_again(
    tmp_path: Path, gateway: Gateway
) -> None:
    # The text may have gone out: a second request could send it twice, so the touch fails and says why.
    gateway.answers = ["hang"]
    harness = _start(tmp_path, gateway.url)
    try:
        touch = _queue_first_touch(harness)
        result = harness.service.dispatcher.dispatch(touch.id or 0)
        failed = harness.touches()[0]
        assert (result.status, failed.status, failed.attempts) == (TouchStatus.failed, TouchStatus.failed, 1)
        assert "may have gone out" in (failed.status_reason or "")
        assert len(gateway.forms) == 1
    finally:
        harness.stop()


def test_the_channel_refuses_to_start_without_its_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="SMS_GATEWAY_URL, SMS_ACCOUNT_SID"):
        _start(tmp_path, "", sms_account_sid=None)


def test_sms_per_second_limits_sends(h: Harness) -> None:
    from channels.limits import Limits
    from channels.sms_gateway import SmsGateway

    channel = SmsGateway(h.service.settings.model_copy(update={"sms_per_second": 1}), Limits(None))
    assert channel.limit is not None
    channel.limit.check("first")
    with pytest.raises(RateLimited, match="1 per 1 s"):
        channel.limit.check("second")


# --- callbacks ----------------------------------------------------------------------------------------------


def test_twilios_documented_signature_is_reproduced() -> None:
    params = {
        "CallSid": "CA1234567890ABCDE",
        "Caller": "+14158675309",
        "Digits": "1234",
        "From": "+14158675309",
        "To": "+18005551212",
    }
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    assert signature("12345", url, params.items()) == "RSOYDt4T1cUTdK1PDd93/VVr8B8="


def test_a_delivery_report_is_kept_on_the_touch(h: Harness, gateway: Gateway) -> None:
    _enroll(h)
    h.run_days(0.5)
    [form] = gateway.forms
    sid = h.touches()[0].receipt["reference"]

    for state in ("sent", "delivered", "sent"):  # a late "sent" does not undo "delivered"
        answer = _callback(h, form["StatusCallback"], {"MessageSid": sid, "MessageStatus": state})
        assert answer.status_code == 204, answer.text

    receipt = h.touches()[0].receipt
    assert receipt["status"] == "delivered" and receipt["reference"] == sid and receipt["segments"] == 2


def test_an_undelivered_text_is_a_bounce_that_ends_the_cadence(h: Harness, gateway: Gateway) -> None:
    (h.service.settings.rules_dir / "texts.yaml").write_text(
        CADENCE.replace("enroll:", "exit: {on_outcome: [bounced]}\nenroll:")
    )
    h.service.reload_rules()
    _enroll(h)
    h.run_days(0.5)
    url, sid = gateway.forms[0]["StatusCallback"], h.touches()[0].receipt["reference"]
    form = {"MessageSid": sid, "MessageStatus": "undelivered", "ErrorCode": "30005"}
    assert _callback(h, url, form).status_code == 204
    assert _callback(h, url, form).status_code == 204  # reported twice, counted once

    receipt = h.touches()[0].receipt
    assert (receipt["status"], receipt["error_code"]) == ("undelivered", "30005")
    with store.session(h.service.db) as s:
        outcomes = s.exec(select(Outcome)).all()
        enrollment = s.exec(select(Enrollment)).one()
    assert [(o.name, o.note, o.source) for o in outcomes] == [
        ("bounced", "sms undelivered, error 30005", "sms")
    ]
    assert enrollment.status == "exited"


@pytest.mark.parametrize(
    ("token", "form", "status", "field"),
    [
        ("forged", {"MessageSid": "SM1", "MessageStatus": "delivered"}, 403, "token"),
        ("good", {"MessageSid": "SM1"}, 400, "MessageStatus"),
        ("good", {"MessageSid": "SM1", "MessageStatus": "lost"}, 422, "MessageStatus"),
        ("good", {"MessageStatus": "delivered"}, 400, "MessageSid"),
        ("unknown", {"MessageSid": "SM1", "MessageStatus": "delivered"}, 404, "token"),
    ],
)
def test_a_bad_status_callback_is_refused_naming_the_field(
    h: Harness, token: str, form: dict[str, str], status: int, field: str
) -> None:
    from cadence import signing

    _enroll(h)
    h.run_days(0.5)
    key = signing.secret_key(h.service.settings)
    touch_id = h.touches()[0].id
    signed = {
        "forged": f"{touch_id}.AAAA",
        "good": signing.sign(key, str(touch_id)),
        "unknown": signing.sign(key, "999"),
    }
    answer = _callback(h, f"{PUBLIC}/sms/status/{signed[token]}", form)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["field"] == field


def test_stop_blocks_the_next_text_and_start_lifts_it(h: Harness, gateway: Gateway) -> None:
    _enroll(h)
    h.run_days(0.5)
    assert len(gateway.forms) == 1

    for word in ("STOP", " стоп "):  # a second STOP does not stack a second block
        answer = _inbound(h, word)
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"].startswith("text/xml")
        assert answer.text.endswith("<Response/>")
    with store.session(h.service.db) as s:
        [block] = s.exec(select(Block)).all()
    assert (block.channel, block.reason, block.lifted_at) == ("sms", "sms STOP", None)

    h.run_days(1)
    second = h.touches()[1]
    assert (second.status, second.status_reason) == (TouchStatus.skipped, "contact is blocked: sms STOP")
    assert len(gateway.forms) == 1

    assert _inbound(h, "Start").status_code == 200
    h.run_days(1)
    assert h.touches()[2].status == TouchStatus.sent
    assert len(gateway.forms) == 2


def test_an_inbound_stop_matches_the_phone_too_in_any_notation(h: Harness) -> None:
    _enroll(h)  # phone +79161234567
    assert _inbound(h, "unsubscribe", sender="+7 916 123-45-67").status_code == 200
    with store.session(h.service.db) as s:
        assert len(s.exec(select(Block)).all()) == 1


def test_any_other_text_is_a_reply_to_the_latest_text(h: Harness, gateway: Gateway) -> None:
    _enroll(h)
    h.run_days(0.5)
    assert _inbound(h, "Давайте созвонимся в четверг").status_code == 200
    assert _inbound(h, "Давайте созвонимся в четверг").status_code == 200  # redelivered: same MessageSid
    with store.session(h.service.db) as s:
        outcomes = s.exec(select(Outcome)).all()
    assert [(o.name, o.touch_id) for o in outcomes] == [("replied", h.touches()[0].id)]
    assert outcomes[0].note == "sms from +79167654321: Давайте созвонимся в четверг"


def test_a_forged_inbound_is_refused(h: Harness) -> None:
    _enroll(h)
    form = {"MessageSid": "SMx", "From": "+79167654321", "To": SENDER, "Body": "STOP"}
    for token in ("wrong-token", None):
        answer = _callback(h, f"{PUBLIC}/sms/inbound", form, token=token)
        assert answer.status_code == 403
        assert answer.json()["error"]["field"] == "X-Twilio-Signature"
    with store.session(h.service.db) as s:
        assert s.exec(select(Block)).all() == []


@pytest.mark.parametrize(
    ("form", "status", "field"),
    [
        ({"From": "+79167654321", "Body": "STOP"}, 400, "MessageSid"),
        ({"MessageSid": "SM1", "Body": "STOP"}, 400, "From"),
        ({"MessageSid": "SM1", "From": "not a number", "Body": "STOP"}, 400, "From"),
    ],
)
def test_a_bad_inbound_is_refused_naming_the_field(
    h: Harness, form: dict[str, str], status: int, field: str
) -> None:
    answer = _callback(h, f"{PUBLIC}/sms/inbound", form)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["field"] == field


def test_an_inbound_that_is_not_a_form_is_refused(h: Harness) -> None:
    answer = h.client.post("/sms/inbound", content=b"\xff\xfe", headers={"content-type": "application/json"})
    assert answer.status_code == 415
    answer = h.client.post(
        "/sms/inbound", content=b"\xff\xfe", headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert answer.status_code == 400


def test_without_an_auth_token_inbound_callbacks_are_refused(tmp_path: Path, gateway: Gateway) -> None:
    harness = _start(tmp_path, gateway.url, sms_provider="outbox", sms_auth_token=None)
    try:
        answer = _callback(
            harness,
            f"{PUBLIC}/sms/inbound",
            {"MessageSid": "SM1", "From": "+79167654321", "Body": "STOP"},
            None,
        )
        assert answer.status_code == 403, answer.text
        assert "SMS_AUTH_TOKEN" in answer.json()["error"]["message"]
        with store.session(harness.service.db) as s:
            assert s.exec(select(Block)).all() == []
    finally:
        harness.stop()


def test_stop_words_are_matched_whole_not_inside_a_reply(h: Harness) -> None:
    _enroll(h)
    assert _inbound(h, "please stop by on Monday").status_code == 200
    with store.session(h.service.db) as s:
        assert s.exec(select(Block)).all() == []


def test_a_stop_for_an_unknown_number_is_answered_and_kept(h: Harness) -> None:
    assert _inbound(h, "STOP", sender="+79990001122").status_code == 200
    with store.session(h.service.db) as s:
        assert s.exec(select(Block)).all() == []
