"""Email's callbacks: the one-click unsubscribe link (RFC 8058) and bounce reports."""

from __future__ import annotations

import functools
import logging
import re
from html import escape
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import Session, select
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from cadence import signing, store
from cadence.engine import EngineError
from cadence.inbox import read_model
from cadence.models import Outcome, Touch

if TYPE_CHECKING:
    from cadence.service import Service

log = logging.getLogger(__name__)

#: Largest unsubscribe or bounce body read, in bytes; the one-click body is 26.
MAX_BODY_BYTES = 10_000
#: A Message-ID the SMTP channel made: <touch-ENROLLMENT-STEP-ITERATION@domain>.
_MESSAGE_ID = re.compile(r"^\s*<?touch-(\d{1,18})-(\d{1,18})-(\d{1,18})@[^<>\s]+>?\s*$")
#: Largest id the store can hold (a signed 64-bit integer).
_MAX_ID = 2**63 - 1

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="robots" content="noindex">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>{title}</title></head>
<body style="font-family: sans-serif; max-width: 32em; margin: 4em auto; padding: 0 1em">
<h1 style="font-size: 1.4em">{title}</h1>
{body}
</body></html>
"""


class BounceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message_id: str | None = Field(default=None, min_length=1, max_length=998)
    touch_id: Annotated[int, Field(ge=1, le=_MAX_ID)] | None = None
    type: Literal["hard", "soft"] = "hard"
    reason: str | None = Field(default=None, max_length=10_000)


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(_PAGE.format(title=escape(title), body=body), status_code=status)


def routes(service: Service) -> list[Route]:
    @functools.cache
    def key() -> bytes:
        # Read on first use: an app that never sees a link makes no key file.
        return signing.secret_key(service.settings)

    def touch_of(token: str) -> int | None:
        value = signing.verify(key(), token)
        if value is None or not value.isdigit() or not 1 <= int(value) <= _MAX_ID:
            return None
        return int(value)

    def bad_link() -> Response:
        from cadence.api import error

        return error(404, "not_found", "this unsubscribe link is not valid", "token")

    async def unsubscribe_page(request: Request) -> Response:
        """A page with a button: a mail client that fetches links to preview them must not unsubscribe."""
        touch_id = touch_of(request.path_params["token"])
        if touch_id is None:
            return bad_link()
        form = (
            '<p>Stop receiving these emails?</p>\n<form method="post">'
            '<input type="hidden" name="List-Unsubscribe" value="One-Click">'
            '<button type="submit">Unsubscribe</button></form>'
        )
        return _page("Unsubscribe", form)

    async def unsubscribe(request: Request) -> Response:
        """RFC 8058 one-click (body `List-Unsubscribe=One-Click`) or the page's button: the same form post."""
        touch_id = touch_of(request.path_params["token"])
        if touch_id is None:
            return bad_link()
        if len(await request.body()) > MAX_BODY_BYTES:
            from cadence.api import error

            return error(413, "http", f"body is over {MAX_BODY_BYTES} bytes")
        return await run_in_threadpool(_unsubscribe, touch_id)

    def _unsubscribe(touch_id: int) -> Response:
        try:
            with store.session(service.db) as s:
                if not _recorded(s, touch_id, "unsubscribed"):
                    service.engine.record_outcome(
                        s, "unsubscribed", service.clock(), touch_id=touch_id, source="unsubscribe"
                    )
                    service.metrics.outcomes.labels("unsubscribed").inc()
        except EngineError as exc:
            if exc.not_found:
                return bad_link()
            raise
        log.info("unsubscribed", extra={"touch_id": touch_id})
        return _page("Unsubscribed", "<p>You will not get these emails any more.</p>")

    async def bounces(request: Request) -> Response:
        from cadence.api import admin_refusal, error, rejected

        refused = admin_refusal(service.settings.admin_token, request)
        if refused is not None:
            return refused
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return error(413, "http", f"body is over {MAX_BODY_BYTES} bytes")
        _, data, rejection = read_model(body, BounceIn)
        if data is None:
            assert rejection is not None
            return rejected(rejection)
        if (data.message_id is None) == (data.touch_id is None):
            return error(422, "invalid", "give one of `message_id` or `touch_id`", "message_id")
        return await run_in_threadpool(_bounce, data)

    def _bounce(data: BounceIn) -> Response:
        from cadence.api import error

        field = "touch_id" if data.touch_id is not None else "message_id"
        with store.session(service.db) as s:
            touch = _find(s, data)
            if touch is None or touch.id is None:
                return error(
                    404, "not_found", f"no touch for {field} {data.message_id or data.touch_id}", field
                )
            answer: dict[str, Any] = {"touch_id": touch.id, "type": data.type, "outcome": None}
            if data.type == "soft":
                # A full mailbox or a passing refusal: noted on the touch, nothing is blocked.
                receipt = dict(touch.receipt or {})
                receipt["soft_bounces"] = [
                    *receipt.get("soft_bounces", []),
                    {"at": service.clock().isoformat(), "reason": data.reason},
                ]
                touch.receipt = receipt
                return JSONResponse({**answer, "duplicate": False}, status_code=200)
            if _recorded(s, touch.id, "bounced"):
                return JSONResponse({**answer, "outcome": "bounced", "duplicate": True}, status_code=200)
            outcome, effects = service.engine.record_outcome(
                s, "bounced", service.clock(), touch_id=touch.id, note=data.reason, source="bounce"
            )
            service.metrics.outcomes.labels("bounced").inc()
            return JSONResponse(
                {
                    **answer,
                    "outcome": "bounced",
                    "id": outcome.id,
                    "duplicate": False,
                    "ended": effects.ended,
                },
                status_code=201,
            )

    return [
        Route("/unsubscribe/{token}", unsubscribe_page, methods=["GET"]),
        Route("/unsubscribe/{token}", unsubscribe, methods=["POST"]),
        Route("/bounces", bounces, methods=["POST"]),
    ]


def _recorded(s: Session, touch_id: int, name: str) -> bool:
    found = s.exec(select(Outcome.id).where(Outcome.touch_id == touch_id, Outcome.name == name)).first()
    return found is not None


def _find(s: Session, data: BounceIn) -> Touch | None:
    if data.touch_id is not None:
        return s.get(Touch, data.touch_id)
    match = _MESSAGE_ID.match(data.message_id or "")
    if match is None:
        return None
    enrollment_id, step, iteration = (int(g) for g in match.groups())
    return s.exec(
        select(Touch).where(
            Touch.enrollment_id == enrollment_id, Touch.step_index == step, Touch.iteration == iteration
        )
    ).first()
