"""SMS callbacks from the gateway: delivery status, and inbound messages (STOP, START, replies)."""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

import phonenumbers
from sqlmodel import Session, col, select
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cadence import signing, store
from cadence.models import Block, Contact, Enrollment, InboundEvent, Touch, TouchStatus
from channels.sms_gateway import signature

if TYPE_CHECKING:
    from cadence.service import Service

#: Largest callback body accepted, in bytes (Twilio's are well under 10 kB).
MAX_FORM_BYTES = 64_000
#: Inbound bodies (trimmed, any case) that stop SMS to the sender: the carriers' keywords and Russian ones.
STOP_WORDS = frozenset(
    {"stop", "stopall", "unsubscribe", "cancel", "end", "quit", "стоп", "отписаться", "отписка"}
)
#: Inbound bodies that lift the stop.
START_WORDS = frozenset({"start", "unstop", "yes", "старт"})
#: The reason on a block an inbound STOP starts; START lifts exactly these.
STOP_REASON = "sms STOP"
#: Delivery statuses a gateway reports, Twilio's names; the last three are final.
STATUSES = ("accepted", "scheduled", "queued", "sending", "sent", "delivered", "undelivered", "failed")
FINAL = frozenset({"delivered", "undelivered", "failed"})
#: Final statuses that mean the message will never arrive: the touch's outcome is `bounced`.
NOT_DELIVERED = frozenset({"undelivered", "failed"})
#: Characters of an inbound body kept in a `replied` outcome's note.
NOTE_CHARS = 1_000
#: The empty TwiML answer: nothing to send back.
EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response/>'

Form = list[tuple[str, str]]


class _Refused(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.field = status, code, field


def routes(service: Service) -> list[Route]:
    settings = service.settings

    async def _form(request: Request) -> Form:
        """The callback's form fields, checked against X-Twilio-Signature when SMS_AUTH_TOKEN is set."""
        if (
            request.headers.get("content-type", "").split(";")[0].strip()
            != "application/x-www-form-urlencoded"
        ):
            raise _Refused(415, "unsupported_media_type", "send application/x-www-form-urlencoded")
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            raise _Refused(413, "too_large", f"body is over {MAX_FORM_BYTES} bytes")
        try:
            form = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body))
        except (UnicodeDecodeError, ValueError) as exc:
            raise _Refused(400, "invalid", f"body is not a UTF-8 form: {exc}") from exc
        token = settings.sms_auth_token
        if token:
            # The gateway signs the URL it was given, which is the public one, not what a proxy passes on.
            query = f"?{request.url.query}" if request.url.query else ""
            url = f"{settings.public_url.rstrip('/')}{request.url.path}{query}"
            given = request.headers.get("x-twilio-signature", "")
            if not hmac.compare_digest(signature(token, url, form).encode(), given.encode()):
                raise _Refused(403, "forbidden", "X-Twilio-Signature does not match", "X-Twilio-Signature")
        return form

    async def _handle(request: Request, act: Any, *args: Any) -> Response:
        from cadence.api import error

        try:
            form = await _form(request)
            return await run_in_threadpool(act, dict(form), *args)
        except _Refused as exc:
            return error(exc.status, exc.code, str(exc), exc.field)

    async def status(request: Request) -> Response:
        return await _handle(request, _status, request.path_params["token"])

    def _status(form: Mapping[str, str], token: str) -> Response:
        signed = signing.verify(signing.secret_key(settings), token)
        if signed is None or not signed.isdigit():
            raise _Refused(
                403, "forbidden", "the status callback's token is not one this service signed", "token"
            )
        touch_id = int(signed)
        state = _field(form, "MessageStatus").lower()
        if state not in STATUSES:
            raise _Refused(
                422, "invalid", f"MessageStatus must be one of {', '.join(STATUSES)}", "MessageStatus"
            )
        sid = _field(form, "MessageSid")
        now = service.clock()
        with store.session(service.db) as s:
            touch = s.get(Touch, touch_id)
            if touch is None:
                raise _Refused(404, "not_found", f"no touch {touch_id}", "token")
            reference = touch.receipt.get("reference")
            if reference and reference != sid:
                raise _Refused(422, "invalid", f"touch {touch_id} was sent as {reference}", "MessageSid")
            if touch.receipt.get("status") in FINAL:
                return Response(status_code=204)  # a late or repeated report changes nothing
            touch.receipt = {**touch.receipt, "status": state, "status_at": now.isoformat()}
            if form.get("ErrorCode"):
                touch.receipt = {**touch.receipt, "error_code": form["ErrorCode"]}
            if state in NOT_DELIVERED:
                code = f", error {form['ErrorCode']}" if form.get("ErrorCode") else ""
                _outcome(s, "bounced", touch_id, f"sms {state}{code}", now)
        return Response(status_code=204)

    async def inbound(request: Request) -> Response:
        if not settings.sms_auth_token:
            from cadence.api import error

            # Unsigned, anyone could stop or restart texts to any number: inbound needs the gateway's key.
            return error(
                403,
                "forbidden",
                "inbound SMS is off: set SMS_AUTH_TOKEN so the gateway's signature is checked",
            )
        return await _handle(request, _inbound)

    def _inbound(form: Mapping[str, str]) -> Response:
        sid = _field(form, "MessageSid")
        number = _e164(_field(form, "From"))
        text = form.get("Body", "").strip()
        word = text.casefold()
        now = service.clock()
        with store.session(service.db) as s:
            seen = s.exec(
                select(InboundEvent.id).where(InboundEvent.source == "sms", InboundEvent.event_id == sid)
            ).first()
            if seen is not None:  # the gateway delivered it again
                return _twiml()
            contacts = _contacts_at(s, number)
            if word in STOP_WORDS:
                kind = "sms.stop"
                for contact in contacts:
                    _stop(s, contact.id or 0, now)
            elif word in START_WORDS:
                kind = "sms.start"
                for contact in contacts:
                    _start(s, contact.id or 0, now)
            else:
                kind = "sms.reply"
                for contact in contacts:
                    touch = _latest_sms_touch(s, contact.id or 0)
                    if touch is not None:
                        _outcome(s, "replied", touch.id or 0, f"sms from {number}: {text[:NOTE_CHARS]}", now)
            s.add(
                InboundEvent(
                    source="sms",
                    event_id=sid[:128],
                    type=kind,
                    body=urlencode(form),
                    status="processed",
                    received_at=now,
                    processed_at=now,
                )
            )
        return _twiml()

    def _outcome(s: Session, name: str, touch_id: int, note: str, now: datetime) -> None:
        outcome, _ = service.engine.record_outcome(s, name, now, touch_id=touch_id, note=note, source="sms")
        service.metrics.outcomes.labels(outcome.name).inc()

    return [
        Route("/sms/status/{token}", status, methods=["POST"]),
        Route("/sms/inbound", inbound, methods=["POST"]),
    ]


def _field(form: Mapping[str, str], name: str) -> str:
    value = form.get(name, "").strip()
    if not value:
        raise _Refused(400, "missing", f"{name} is required", name)
    return value


def _e164(raw: str, region: str | None = None) -> str:
    try:
        number = phonenumbers.parse(raw, region)
    except phonenumbers.NumberParseException as exc:
        raise _Refused(400, "invalid", f"From {raw!r} is not a phone number", "From") from exc
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _same_number(raw: Any, region: str | None, number: str) -> bool:
    if not raw:
        return False
    try:
        return _e164(str(raw), region) == number
    except _Refused:
        return False


def _contacts_at(s: Session, number: str) -> Sequence[Contact]:
    """Every contact whose phone or mobile, read in the contact's country, is `number`."""
    # Numbers are stored as the CRM wrote them, so they are compared after normalising each one.
    return [
        contact
        for contact in s.exec(select(Contact).order_by(col(Contact.id))).all()
        if any(
            _same_number(raw, (contact.country or "").upper() or None, number)
            for raw in (contact.phone, contact.attributes.get("mobile"))
        )
    ]


def _stop(s: Session, contact_id: int, now: datetime) -> None:
    if _stops(s, contact_id):
        return
    s.add(Block(contact_id=contact_id, channel="sms", reason=STOP_REASON, starts_at=now))


def _start(s: Session, contact_id: int, now: datetime) -> None:
    for block in _stops(s, contact_id):
        block.lifted_at = now


def _stops(s: Session, contact_id: int) -> Sequence[Block]:
    return s.exec(
        select(Block).where(
            Block.contact_id == contact_id,
            Block.channel == "sms",
            Block.reason == STOP_REASON,
            col(Block.lifted_at).is_(None),
        )
    ).all()


def _latest_sms_touch(s: Session, contact_id: int) -> Touch | None:
    return s.exec(
        select(Touch)
        .join(Enrollment, col(Enrollment.id) == col(Touch.enrollment_id))
        .where(Enrollment.contact_id == contact_id, Touch.channel == "sms", Touch.status == TouchStatus.sent)
        .order_by(col(Touch.finished_at).desc(), col(Touch.id).desc())
    ).first()


def _twiml() -> Response:
    return Response(EMPTY_TWIML, media_type="text/xml")
