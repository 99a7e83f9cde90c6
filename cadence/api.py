"""The HTTP API: webhooks in, outcomes in, timelines and call tasks out, the loaded cadences and their
reload, health and metrics."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import date, datetime
from typing import Annotated, Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import col, select
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cadence import email_api, sms_api, store
from cadence.crm import Delivery, adapters
from cadence.engine import EngineError
from cadence.errors import RulesError
from cadence.inbox import Rejection, read_model
from cadence.language import OutcomeName
from cadence.models import CallTask
from cadence.service import Service, run_embedded
from channels.call import task_view

log = logging.getLogger(__name__)

#: Largest webhook or API body accepted, in bytes.
MAX_BODY_BYTES = 1_000_000
#: Header carrying `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">` on /webhooks/generic.
SIGNATURE_HEADER = "X-Cadence-Signature"


def _default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    raise TypeError(f"cannot serialise {type(value).__name__}")


class _JSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json.dumps(content, default=_default, ensure_ascii=False).encode("utf-8")


def error(status: int, code: str, message: str, field: str | None = None, **extra: Any) -> _JSON:
    """The one error shape: {"error": {"code", "message", "field", ...}}."""
    return _JSON({"error": {"code": code, "message": message, "field": field, **extra}}, status_code=status)


def rejected(r: Rejection) -> _JSON:
    extra = {"problems": r.problems} if r.problems else {}
    return error(r.status, r.code, r.message, r.field, **extra)


async def _body(request: Request) -> bytes:
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise HTTPException(413, f"body is over {MAX_BODY_BYTES} bytes")
    return body


def verify_signature(secret: str, header: str | None, body: bytes, now: float, tolerance: int) -> str | None:
    """None when the signature is good, else why not."""
    if not header:
        return f"missing {SIGNATURE_HEADER} header"
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        stamp = int(parts.get("t", ""))
    except ValueError:
        return "signature timestamp `t` is not a number"
    if abs(now - stamp) > tolerance:
        return f"signature timestamp is more than {tolerance} s away from now"
    given = parts.get("v1", "")
    if not given.isascii() or not hmac.compare_digest(_digest(secret, body, stamp), given):
        return "signature does not match the body"
    return None


def sign(secret: str, body: bytes, stamp: int) -> str:
    """The header value a sender puts in X-Cadence-Signature."""
    return f"t={stamp},v1={_digest(secret, body, stamp)}"


def _digest(secret: str, body: bytes, stamp: int) -> str:
    return hmac.new(secret.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()


def _loopback(host: str | None) -> bool:
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def admin_refusal(token: str | None, request: Request) -> Response | None:
    """None when the caller may use an admin endpoint: it brings the token, or, with no token set, it
    calls from this machine (behind a proxy every caller looks local: set ADMIN_TOKEN there)."""
    if token:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode()):
            return None
        refused = error(401, "unauthorised", "send Authorization: Bearer <ADMIN_TOKEN>", "Authorization")
        refused.headers["WWW-Authenticate"] = "Bearer"
        return refused
    if _loopback(request.client.host if request.client else None):
        return None
    return error(403, "forbidden", "without ADMIN_TOKEN set, this is allowed from loopback addresses only")


#: What `GET /call-tasks?status=` may ask for; `open` is the default, the calls still to make.
_CALL_TASK_STATUSES = ("open", "done", "cancelled", "all")
#: Largest id the store can hold (a signed 64-bit integer).
MAX_ID = 2**63 - 1
Id = Annotated[int, Field(ge=1, le=MAX_ID)]


class OutcomeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    touch_id: Id | None = None
    enrollment_id: Id | None = None
    outcome: OutcomeName
    note: str | None = Field(default=None, max_length=10_000)


def create_app(service: Service, background: bool = True) -> Starlette:
    """The ASGI app; with `background`, the embedded worker and scheduler run for the app's lifetime."""
    settings = service.settings
    local_zone = ZoneInfo(settings.default_timezone)
    sources = adapters()

    async def webhook(request: Request) -> Response:
        source = request.path_params["source"]
        adapter = sources.get(source)
        if adapter is None:
            known = ", ".join(sorted(sources))
            return error(
                404, "unknown_source", f"no webhook adapter for {source!r}; there are {known}", "source"
            )
        body = await _body(request)
        query = f"?{request.url.query}" if request.url.query else ""
        delivery = Delivery(
            source=source,
            method=request.method,
            url=f"{settings.public_url.rstrip('/')}{request.url.path}{query}",
            headers={k.lower(): v for k, v in request.headers.items()},
            query=dict(request.query_params),
            body=body,
        )
        problem = adapter.verify(delivery, settings, time.time())
        if problem:
            service.metrics.webhooks.labels(source, "unauthorised").inc()
            return error(401, "bad_signature", problem, adapter.credential)
        return await run_in_threadpool(_receive, source, body)

    def _receive(source: str, body: bytes) -> Response:
        intake = service.inbox.receive(source, body)
        if intake.rejection is not None:
            return rejected(intake.rejection)
        effects = intake.effects
        return _JSON(
            {
                "event_id": intake.event_id,
                "duplicate": intake.duplicate,
                "enrolled": effects.enrolled,
                "ended": effects.ended,
            },
            status_code=200 if intake.duplicate else 202,
        )

    async def outcomes(request: Request) -> Response:
        _, data, rejection = read_model(await _body(request), OutcomeIn)
        if data is None:
            assert rejection is not None
            return rejected(rejection)
        return await run_in_threadpool(_record_outcome, data)

    def _record_outcome(data: OutcomeIn) -> Response:
        try:
            with store.session(service.db) as s:
                outcome, effects = service.engine.record_outcome(
                    s,
                    data.outcome,
                    service.clock(),
                    touch_id=data.touch_id,
                    enrollment_id=data.enrollment_id,
                    note=data.note,
                )
        except EngineError as exc:
            if exc.not_found:
                return error(404, "not_found", str(exc), exc.field)
            return error(422, "invalid", str(exc), exc.field)
        service.metrics.outcomes.labels(outcome.name).inc()
        return _JSON(
            {
                "id": outcome.id,
                "outcome": outcome.name,
                "enrollment_id": outcome.enrollment_id,
                "touch_id": outcome.touch_id,
                "ended": effects.ended,
                "enrolled": effects.enrolled,
            },
            status_code=201,
        )

    async def enrollment(request: Request) -> Response:
        raw = request.path_params["id"]
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_ID:
            return error(422, "invalid", f"enrollment id is a whole number from 1 to {MAX_ID}", "id")
        enrollment_id = int(raw)
        found = await run_in_threadpool(service.timeline, enrollment_id)
        if found is None:
            return error(404, "not_found", f"no enrollment {enrollment_id}", "id")
        return _JSON(found)

    async def call_tasks(request: Request) -> Response:
        owner = request.query_params.get("owner")
        status = request.query_params.get("status", "open")
        if status not in _CALL_TASK_STATUSES:
            return error(422, "invalid", f"status is one of {', '.join(_CALL_TASK_STATUSES)}", "status")
        raw = request.query_params.get("date")
        try:
            day = date.fromisoformat(raw) if raw else service.clock().astimezone(local_zone).date()
        except ValueError:
            return error(422, "invalid", f"date {raw!r} is not YYYY-MM-DD", "date")
        return _JSON(await run_in_threadpool(_call_tasks, owner, day, status))

    def _call_tasks(owner: str | None, day: date, status: str) -> dict[str, Any]:
        with store.session(service.db) as s:
            query = select(CallTask).where(CallTask.due_date == day)
            if owner:
                query = query.where(CallTask.owner == owner)
            if status != "all":
                query = query.where(CallTask.status == status)
            ordered = query.order_by(col(CallTask.priority).desc(), col(CallTask.due_at), col(CallTask.id))
            tasks = s.exec(ordered).all()
            return {"date": day, "owner": owner, "status": status, "tasks": [task_view(s, t) for t in tasks]}

    async def healthz(request: Request) -> Response:
        return await run_in_threadpool(_health)

    def _health() -> Response:
        checks: dict[str, str] = {}
        try:
            with service.db.connect() as connection:
                connection.execute(sa.text("select 1"))
            checks["database"] = "ok"
        except sa.exc.SQLAlchemyError as exc:
            checks["database"] = f"error: {exc.__class__.__name__}"
        client = getattr(service.broker, "client", None)
        if settings.embedded_broker or client is None:
            checks["broker"] = "ok (in-process)"
        else:
            try:
                client.ping()
                checks["broker"] = "ok (redis)"
            except Exception as exc:
                checks["broker"] = f"error: {exc.__class__.__name__}"
        healthy = all(v.startswith("ok") for v in checks.values())
        return _JSON(
            {
                "status": "ok" if healthy else "failing",
                "checks": checks,
                "cadences": sorted(service.rules.cadences),
            },
            status_code=200 if healthy else 503,
        )

    async def reload_rules(request: Request) -> Response:
        refused = admin_refusal(settings.admin_token, request)
        if refused is not None:
            return refused
        try:
            changes = await run_in_threadpool(service.reload_rules)
        except RulesError as exc:
            count = len(exc.problems)
            return error(
                422,
                "invalid_rules",
                f"{count} problem(s) in the rules; the loaded rules stay in force. First: {exc.problems[0]}",
                problems=[p.as_dict() for p in exc.problems],
            )
        return _JSON(changes.as_dict())

    async def cadences(request: Request) -> Response:
        loaded = service.rules.cadences
        return _JSON(
            {
                "cadences": [
                    {
                        "name": name,
                        "kind": parsed.spec.kind,
                        "content_hash": parsed.content_hash,
                        "file": parsed.file,
                        "steps": len(parsed.spec.steps),
                    }
                    for name, parsed in sorted(loaded.items())
                ]
            }
        )

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return error(exc.status_code, "http", str(exc.detail))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if background:
            run_embedded(service)
        try:
            yield
        finally:
            if background:
                service.stop()

    return Starlette(
        routes=[
            Route("/webhooks/{source}", webhook, methods=["POST"]),
            Route("/outcomes", outcomes, methods=["POST"]),
            Route("/enrollments/{id}", enrollment, methods=["GET"]),
            Route("/call-tasks", call_tasks, methods=["GET"]),
            Route("/cadences", cadences, methods=["GET"]),
            Route("/rules/reload", reload_rules, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            *email_api.routes(service),
            *sms_api.routes(service),
        ],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
