"""The HTTP API: webhooks in, outcomes in; enrollments, contacts, deals, touches, outcomes, blocks and call
tasks; the loaded cadences (validate, simulate, reload); health, metrics and the OpenAPI document.

Callers bring an API key (`Authorization: Bearer <secret>`) once any key or ADMIN_TOKEN exists; its role says
what they may do. Webhooks never need one: each source has its own credential."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError
from sqlmodel import Session, SQLModel, col, select
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import QueryParams
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from cadence import __version__, email_api, keys, pages, sms_api, store, timing
from cadence import reports as reporting
from cadence import simulate as simulation
from cadence.crm import Delivery
from cadence.engine import EngineError
from cadence.errors import Problem, RulesError
from cadence.events import ContactData, DealData
from cadence.inbox import Intake, Rejection, read_model
from cadence.language import OutcomeName, parse
from cadence.lint import report as lint_report
from cadence.models import Block, CallTask, Contact, Deal, Enrollment, Outcome, Touch
from cadence.openapi import Operation, Param, document, model_schema, page, page_of, ref
from cadence.policy import POLICY_FILE
from cadence.rules import load as load_rules
from cadence.rules import rule_files
from cadence.sandbox import template_environment
from cadence.service import Service, run_embedded
from channels.call import following, task_views

log = logging.getLogger(__name__)

#: Largest webhook or API body accepted, in bytes.
MAX_BODY_BYTES = 1_000_000
#: Header carrying `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">` on /webhooks/generic.
SIGNATURE_HEADER = "X-Cadence-Signature"
#: Rows a list answers when `limit` is not given, and the most it may ask for.
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
#: Days `POST /cadences/simulate` follows a contact at most (the CLI allows more: it runs on your machine).
MAX_SIMULATED_DAYS = 366
#: Longest text a query filter takes.
MAX_FILTER_LENGTH = 200


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


class Refused(Exception):
    """A request answered with the error shape; raised from deep inside a handler."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.answer = error(status, code, message, field, **extra)


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
        return _unauthorised("send Authorization: Bearer <ADMIN_TOKEN>")
    if _loopback(request.client.host if request.client else None):
        return None
    return error(403, "forbidden", "without ADMIN_TOKEN set, this is allowed from loopback addresses only")


def _unauthorised(message: str) -> Response:
    refused = error(401, "unauthorised", message, "Authorization")
    refused.headers["WWW-Authenticate"] = "Bearer"
    return refused


#: What `GET /call-tasks?status=` may ask for; `open` is the default, the calls still to make.
_CALL_TASK_STATUSES = ("open", "done", "cancelled", "all")
_ENROLLMENT_STATUSES = ("active", "paused", "completed", "exited")
_TOUCH_STATUSES = ("planned", "held", "queued", "sending", "sent", "failed", "skipped", "cancelled")
_CHANNELS = ("email", "sms", "call", "letter")
#: Largest id the store can hold (a signed 64-bit integer).
MAX_ID = 2**63 - 1
Id = Annotated[int, Field(ge=1, le=MAX_ID)]
Text = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\x00]*$")]


class OutcomeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    touch_id: Id | None = None
    enrollment_id: Id | None = None
    outcome: OutcomeName
    note: str | None = Field(default=None, max_length=10_000, pattern=r"^[^\x00]*$")


class EnrollmentIn(BaseModel):
    """Start a cadence by hand for a contact (by id, or by the CRM's id from `source`), for a deal or not."""

    model_config = ConfigDict(extra="forbid")

    cadence: Text
    contact_id: Id | None = None
    contact_external_id: Text | None = None
    source: Text = "generic"
    deal_id: Id | None = None
    deal_external_id: Text | None = None


class BlockIn(BaseModel):
    """Leave a contact alone on a channel (or `all`) until a time, or until lifted."""

    model_config = ConfigDict(extra="forbid")

    contact_id: Id
    channel: Literal["all", "email", "sms", "call", "letter"] = "all"
    until: AwareDatetime | None = None
    reason: str = Field(min_length=1, max_length=500, pattern=r"^[^\x00]*$")


class SimulateIn(BaseModel):
    """A cadence (a loaded one by name, or YAML text) run for one contact on a simulated clock."""

    model_config = ConfigDict(extra="forbid")

    cadence: Text | None = None
    yaml: str | None = Field(default=None, max_length=MAX_BODY_BYTES)
    start: datetime = Field(description="ISO date-time; without an offset, in the contact's zone")
    days: int = Field(default=30, ge=1, le=MAX_SIMULATED_DAYS)
    contact: dict[str, Any] = Field(default_factory=dict)
    deal: dict[str, Any] | None = None
    outcomes: list[str] = Field(default_factory=list, max_length=100, description="e.g. 'day 3: no_answer'")
    blocks: list[str] = Field(default_factory=list, max_length=10, description="e.g. 'call:30' or 'all'")


@dataclass(frozen=True)
class Call:
    """One request as a handler sees it, once the caller is known."""

    params: QueryParams
    path: dict[str, Any]
    body: bytes
    caller: keys.Principal


Handler = Callable[[Call], Response]


# --- reading the query -------------------------------------------------------------------------------------


def _id(raw: str, name: str) -> int:
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_ID:
        raise Refused(422, "invalid", f"{name} is a whole number from 1 to {MAX_ID}", name)
    return int(raw)


def _int(params: QueryParams, name: str) -> int | None:
    raw = params.get(name)
    return None if raw is None else _id(raw, name)


def _text(params: QueryParams, name: str) -> str | None:
    raw = params.get(name)
    if raw is not None and (not raw or len(raw) > MAX_FILTER_LENGTH or "\x00" in raw):
        raise Refused(422, "invalid", f"{name} is 1 to {MAX_FILTER_LENGTH} characters", name)
    return raw


def _choice(
    params: QueryParams, name: str, choices: tuple[str, ...], default: str | None = None
) -> str | None:
    raw = params.get(name, default)
    if raw is not None and raw not in choices:
        raise Refused(422, "invalid", f"{name} is one of {', '.join(choices)}", name)
    return raw


def _day(params: QueryParams, name: str) -> date | None:
    raw = params.get(name)
    try:
        return date.fromisoformat(raw) if raw else None
    except ValueError:
        raise Refused(422, "invalid", f"{name} {raw!r} is not YYYY-MM-DD", name) from None


def _moment(params: QueryParams, name: str) -> datetime | None:
    raw = params.get(name)
    if not raw:
        return None
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise Refused(422, "invalid", f"{name} {raw!r} is not an ISO date-time with an offset", name)
    return moment


def _flag(params: QueryParams, name: str) -> bool | None:
    raw = _choice(params, name, ("true", "false"))
    return None if raw is None else raw == "true"


def _limit(params: QueryParams) -> int:
    """Rows a page may have: `limit`, else DEFAULT_LIMIT."""
    raw = params.get("limit")
    if raw is not None and (not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT):
        raise Refused(422, "invalid", f"limit is a whole number from 1 to {MAX_LIMIT}", "limit")
    return int(raw) if raw else DEFAULT_LIMIT


def _page(s: Session, query: Any, model: type[SQLModel], params: QueryParams) -> dict[str, Any]:
    """One page of `query` in id order: `limit` rows after the row `cursor` names, and the next cursor."""
    limit = _limit(params)
    after = _int(params, "cursor")
    key = col(model.id)  # type: ignore[attr-defined]
    if after is not None:
        query = query.where(key > after)
    rows = s.exec(query.order_by(key).limit(limit + 1)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return {"items": [_row(r) for r in rows], "next_cursor": str(rows[-1].id) if more else None}


def _row(row: SQLModel) -> dict[str, Any]:
    return row.model_dump()


def _owned(s: Session, enrollment: Enrollment, owner: str | None) -> bool:
    """Whether the enrollment is for a deal this manager owns."""
    deal = s.get(Deal, enrollment.deal_id) if enrollment.deal_id else None
    return deal is not None and owner is not None and deal.owner == owner


def _own_enrollments(owner: str | None) -> Any:
    return (
        select(Enrollment.id).join(Deal, col(Deal.id) == col(Enrollment.deal_id)).where(Deal.owner == owner)
    )


def _parsed(body: bytes, model: type[BaseModel]) -> Any:
    _, data, rejection = read_model(body, model)
    if data is None:
        assert rejection is not None
        raise Refused(
            rejection.status, rejection.code, rejection.message, rejection.field, problems=rejection.problems
        )
    return data


def _engine_refusal(exc: EngineError) -> Refused:
    if exc.not_found:
        return Refused(404, "not_found", str(exc), exc.field)
    return Refused(422, "invalid", str(exc), exc.field)


# --- what the API declares: its operations, for the routes and the OpenAPI document ------------------------

ADMIN = ("admin",)
MANAGERS = ("admin", "manager")
_INT = {"type": "integer", "minimum": 1, "maximum": MAX_ID}
_STR = {"type": "string", "minLength": 1, "maxLength": MAX_FILTER_LENGTH}
PAGE = (
    Param(
        "limit",
        {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
        f"rows on a page (default {DEFAULT_LIMIT})",
    ),
    Param("cursor", {"type": "string", "pattern": "^[1-9][0-9]{0,18}$"}, "`next_cursor` of the page before"),
)


def _path_id(what: str) -> Param:
    return Param("id", _INT, f"the {what}'s id", "path")


def _enum(values: tuple[str, ...]) -> dict[str, Any]:
    return {"type": "string", "enum": list(values)}


_CONTACT, _DEAL, _ENROLLMENT, _TOUCH, _OUTCOME, _BLOCK = (
    ref(m.__name__) for m in (Contact, Deal, Enrollment, Touch, Outcome, Block)
)
_TIMELINE = {
    "type": "object",
    "description": "the enrollment, its touches (stored and projected), its outcomes",
}
_ENROLLMENT_ACTION = "Without keys, loopback only."
OPERATIONS: list[Operation] = [
    Operation(
        "POST",
        "/webhooks/{source}",
        "An event from a CRM, checked with that source's own credential",
        roles=("admin", "integration"),
        params=(Param("source", {"type": "string", "pattern": "^[a-z0-9-]{1,32}$"}, "the adapter", "path"),),
        raw_body=("application/json", {"type": "object"}),
        status=202,
        answer={"type": "object"},
        errors=(400, 404, 422),
        notes=(
            "No API key needed (a CRM cannot send one); a key sent must be valid and not a manager's. "
            "A delivery answered 2xx is stored. One arriving alone is acted on before the answer, "
            "which lists what it caused; one of many arriving together is stored and acted on by a worker "
            "moments later (`queued: true`). A repeated delivery gets 200 with `duplicate: true`."
        ),
    ),
    Operation(
        "POST",
        "/outcomes",
        "Record what came of a touch or an enrollment",
        roles=("admin", "integration", "manager"),
        body=OutcomeIn,
        status=201,
        answer={"type": "object"},
        errors=(400, 404, 422),
        notes="A manager records outcomes on their own deals' touches only (403 otherwise).",
    ),
    Operation(
        "GET",
        "/outcomes",
        "Outcomes, newest last",
        roles=ADMIN,
        params=(
            Param("enrollment_id", _INT, "of this enrollment"),
            Param("touch_id", _INT, "of this touch"),
            Param("contact_id", _INT, "of this contact"),
            Param("name", {"type": "string", "enum": list(OutcomeName.__args__)}, "this outcome"),  # type: ignore[attr-defined]
            *PAGE,
        ),
        answer=page_of(_OUTCOME),
        errors=(422,),
    ),
    Operation(
        "GET",
        "/enrollments",
        "Enrollments",
        roles=MANAGERS,
        params=(
            Param("cadence", _STR, "in this cadence"),
            Param("status", _enum(_ENROLLMENT_STATUSES), "in this status"),
            Param("contact_id", _INT, "of this contact"),
            Param("deal_id", _INT, "for this deal"),
            *PAGE,
        ),
        answer=page_of(_ENROLLMENT),
        errors=(422,),
        notes="A manager sees only the enrollments of deals they own.",
    ),
    Operation(
        "POST",
        "/enrollments",
        "Start a cadence by hand",
        roles=ADMIN,
        body=EnrollmentIn,
        status=201,
        answer=_TIMELINE,
        errors=(400, 404, 409, 422),
        notes="409 when the subject is already in it, is blocked, or its re-enrollment rule says not yet. "
        + _ENROLLMENT_ACTION,
    ),
    Operation(
        "GET",
        "/enrollments/{id}",
        "An enrollment's timeline",
        roles=MANAGERS,
        params=(_path_id("enrollment"),),
        answer=_TIMELINE,
        errors=(404, 422),
        notes="A manager gets 403 for another manager's enrollment.",
    ),
    *(
        Operation(
            "POST",
            f"/enrollments/{{id}}/{action}",
            summary,
            roles=ADMIN,
            params=(_path_id("enrollment"),),
            answer=_TIMELINE,
            errors=(404, 409, 422),
            notes=f"{notes} {_ENROLLMENT_ACTION}",
        )
        for action, summary, notes in (
            ("pause", "Pause an active enrollment", "Its planned and queued touches are held."),
            (
                "resume",
                "Resume a paused enrollment",
                "Held touches go out again; one whose time passed is planned from now, keeping its spacing.",
            ),
            (
                "stop",
                "Stop an enrollment",
                "Its touches not yet sent are cancelled; no `then` cadence starts.",
            ),
        )
    ),
    Operation(
        "GET",
        "/call-tasks",
        "The call tasks due on a local date",
        roles=MANAGERS,
        params=(
            Param("owner", _STR, "whose calls; a manager's key means its own"),
            Param("date", {"type": "string", "format": "date"}, "the contact's local date (default today)"),
            Param("status", _enum(_CALL_TASK_STATUSES), "open (default), done, cancelled or all"),
            *PAGE,
        ),
        answer={"type": "object"},
        errors=(422,),
        notes="Highest priority first, a page at a time: {date, owner, status, tasks, next_cursor}. A "
        "manager gets 403 asking for another owner.",
    ),
    Operation(
        "GET",
        "/contacts",
        "Contacts",
        roles=ADMIN,
        params=(
            Param("source", _STR, "from this source"),
            Param("external_id", _STR, "with this CRM id"),
            Param("email", _STR, "with this email"),
            *PAGE,
        ),
        answer=page_of(_CONTACT),
        errors=(422,),
    ),
    Operation(
        "GET",
        "/contacts/{id}",
        "A contact",
        roles=ADMIN,
        params=(_path_id("contact"),),
        answer=_CONTACT,
        errors=(404, 422),
    ),
    Operation(
        "DELETE",
        "/contacts/{id}",
        "Forget a contact entirely",
        roles=ADMIN,
        params=(_path_id("contact"),),
        status=204,
        errors=(404, 422),
        notes="Erases the contact, their deals, enrollments, touches, outcomes, call tasks, blocks, the "
        "activity "
        "kept to post about them, and the stored webhook bodies naming their CRM id, email or phone. "
        "Without keys, loopback only.",
    ),
    Operation(
        "GET",
        "/deals",
        "Deals",
        roles=MANAGERS,
        params=(
            Param("owner", _STR, "owned by"),
            Param("status", _enum(("open", "won", "lost")), "in this status"),
            Param("contact_id", _INT, "of this contact"),
            *PAGE,
        ),
        answer=page_of(_DEAL),
        errors=(422,),
        notes="A manager sees only their own deals.",
    ),
    Operation(
        "GET",
        "/deals/{id}",
        "A deal",
        roles=MANAGERS,
        params=(_path_id("deal"),),
        answer=_DEAL,
        errors=(404, 422),
        notes="A manager gets 403 for another manager's deal.",
    ),
    Operation(
        "GET",
        "/touches",
        "Touches",
        roles=MANAGERS,
        params=(
            Param("status", _enum(_TOUCH_STATUSES), "in this status"),
            Param("channel", _enum(_CHANNELS), "on this channel"),
            Param("owner", _STR, "of deals owned by"),
            Param("enrollment_id", _INT, "of this enrollment"),
            Param("date", {"type": "string", "format": "date"}, "due on this date in DEFAULT_TIMEZONE"),
            Param("due_from", {"type": "string", "format": "date-time"}, "due at or after"),
            Param("due_to", {"type": "string", "format": "date-time"}, "due before"),
            *PAGE,
        ),
        answer=page_of(_TOUCH),
        errors=(422,),
        notes="A manager sees only the touches of their own deals.",
    ),
    Operation(
        "GET",
        "/blocks",
        "Blocks",
        roles=ADMIN,
        params=(
            Param("contact_id", _INT, "of this contact"),
            Param(
                "channel", _enum(("all", *_CHANNELS)), "on this channel (`all`: the blocks of every channel)"
            ),
            Param("active", _enum(("true", "false")), "in force now, or not"),
            *PAGE,
        ),
        answer=page_of(_BLOCK),
        errors=(422,),
    ),
    Operation(
        "POST",
        "/blocks",
        "Block a contact",
        roles=ADMIN,
        body=BlockIn,
        status=201,
        answer=_BLOCK,
        errors=(400, 404, 422),
        notes="Without keys, loopback only.",
    ),
    Operation(
        "POST",
        "/blocks/{id}/lift",
        "Lift a block",
        roles=ADMIN,
        params=(_path_id("block"),),
        answer=_BLOCK,
        errors=(404, 409, 422),
        notes="Cadences that start on `block.ended` then see it end. Without keys, loopback only.",
    ),
    Operation("GET", "/cadences", "The loaded cadences", roles=ADMIN, answer={"type": "object"}),
    Operation(
        "POST",
        "/cadences/validate",
        "Check a cadence's YAML as `cadence lint` does",
        roles=ADMIN,
        raw_body=("application/yaml", {"type": "string"}),
        answer={"type": "object"},
        errors=(400,),
        notes="Checked beside the loaded rules (it replaces a loaded cadence of the same name). Answers "
        "`valid` and the located problems, errors and warnings.",
    ),
    Operation(
        "POST",
        "/cadences/simulate",
        "Run a cadence for one contact on a simulated clock",
        roles=ADMIN,
        body=SimulateIn,
        answer={"type": "object"},
        errors=(400, 404, 422),
        notes="Give `cadence` (a loaded one) or `yaml`.",
    ),
    Operation(
        "POST",
        "/rules/reload",
        "Load the rules again, all or nothing",
        roles=ADMIN,
        answer={"type": "object"},
        errors=(422,),
        notes="Without keys, loopback only.",
    ),
    Operation("GET", "/reports", "Reports (coming)", roles=ADMIN, status=501, answer=ref("Error")),
    Operation(
        "GET", "/healthz", "Database and broker checks", roles=(), answer={"type": "object"}, errors=(503,)
    ),
    Operation(
        "GET", "/metrics", "Prometheus metrics", roles=(), answer={"type": "string"}, answer_type="text/plain"
    ),
    Operation("GET", "/openapi.json", "This document", roles=(), answer={"type": "object"}),
    Operation(
        "GET",
        "/docs",
        "This document as a page",
        roles=(),
        answer={"type": "string"},
        answer_type="text/html",
    ),
    Operation(
        "GET",
        "/unsubscribe/{token}",
        "The unsubscribe page an email links to",
        roles=(),
        params=(Param("token", {"type": "string"}, "the signed link token", "path"),),
        answer={"type": "string"},
        answer_type="text/html",
        errors=(404,),
    ),
    Operation(
        "POST",
        "/unsubscribe/{token}",
        "Unsubscribe (RFC 8058 one-click, or the page's button)",
        roles=(),
        params=(Param("token", {"type": "string"}, "the signed link token", "path"),),
        raw_body=("application/x-www-form-urlencoded", {"type": "object"}),
        answer={"type": "string"},
        answer_type="text/html",
        errors=(404,),
    ),
    Operation(
        "POST",
        "/bounces",
        "A bounce reported by the mail system",
        roles=(),
        raw_body=("application/json", {"type": "object"}),
        answer={"type": "object"},
        errors=(400, 401, 403, 404, 422),
        notes="Needs ADMIN_TOKEN when it is set, else loopback.",
    ),
    Operation(
        "POST",
        "/sms/status/{token}",
        "An SMS gateway's status callback",
        roles=(),
        params=(Param("token", {"type": "string"}, "the signed callback token", "path"),),
        raw_body=("application/x-www-form-urlencoded", {"type": "object"}),
        status=204,
        errors=(400, 403, 404, 422),
    ),
    Operation(
        "POST",
        "/sms/inbound",
        "An inbound SMS (STOP, START), signed by the gateway",
        roles=(),
        raw_body=("application/x-www-form-urlencoded", {"type": "object"}),
        answer={"type": "string"},
        answer_type="text/xml",
        errors=(400, 401, 403, 422),
    ),
]
#: Operations that, while no key exists at all, only loopback callers may use: they change or erase data.
LOCAL_ONLY = {
    ("POST", "/enrollments"),
    ("POST", "/enrollments/{id}/pause"),
    ("POST", "/enrollments/{id}/resume"),
    ("POST", "/enrollments/{id}/stop"),
    ("DELETE", "/contacts/{id}"),
    ("POST", "/blocks"),
    ("POST", "/blocks/{id}/lift"),
    ("POST", "/rules/reload"),
}


def openapi_document() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for model in (Contact, Deal, Enrollment, Touch, Outcome, Block):
        model_schema(model, schemas)
    return document([*OPERATIONS, *pages.OPERATIONS, *reporting.OPERATIONS], "Cadence", __version__, schemas)


def path_and_query(scope: Mapping[str, Any]) -> str:
    """The request's path and query as `request.url` has them (a webhook's signature may cover them), without
    building the whole URL: Starlette escapes ?, # and \\ in the path, and urlsplit drops tabs and newlines
    and cuts the query at a #."""
    path = scope["path"].replace("?", "%3F").replace("#", "%23").replace("\\", "%5C")
    query = scope.get("query_string", b"").decode("utf-8", errors="replace")
    for unsafe in "\t\r\n":
        path, query = path.replace(unsafe, ""), query.replace(unsafe, "")
    query = query.partition("#")[0]
    return f"{path}?{query}" if query else path


def create_app(service: Service, background: bool = True) -> Starlette:
    """The ASGI app; with `background`, the embedded worker and scheduler run for the app's lifetime."""
    settings = service.settings
    local_zone = ZoneInfo(settings.default_timezone)
    sources = service.adapters
    spec = openapi_document()

    # --- who is calling -------------------------------------------------------------------------------------

    def _caller(request: Request, local: bool) -> keys.Principal | Response:
        """The caller its key names; without any key in existence, anyone (loopback only if `local`)."""
        with store.session(service.db) as s:
            found = keys.authenticate(s, settings.admin_token, request.headers.get("authorization"))
        if isinstance(found, str):
            return _unauthorised(found)
        if found is not keys.OPEN:
            return found
        if local and not _loopback(request.client.host if request.client else None):
            return error(
                403,
                "forbidden",
                "without API keys or ADMIN_TOKEN, this is allowed from loopback addresses only",
            )
        return keys.OPEN

    def guard(op: Operation, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        local = (op.method, op.path) in LOCAL_ONLY

        async def endpoint(request: Request) -> Response:
            caller = await run_in_threadpool(_caller, request, local)
            if isinstance(caller, Response):
                return caller
            if not caller.may(*op.roles):
                return error(
                    403, "forbidden", f"a {caller.role} key may not {op.method} {op.path}", "Authorization"
                )
            body = b"" if request.method == "GET" else await _body(request)
            call = Call(request.query_params, dict(request.path_params), body, caller)
            try:
                return await run_in_threadpool(handler, call)
            except Refused as exc:
                return exc.answer

        return endpoint

    async def keyed_webhook(request: Request) -> Response:
        """Webhooks need no key; a Bearer key that is sent must be valid and may not be a manager's. Other
        schemes (Pipedrive's HTTP Basic) are the CRM's own credential, for its adapter to check."""
        header = request.headers.get("authorization") or ""
        if header.partition(" ")[0].lower() == "bearer":
            caller = await run_in_threadpool(_caller, request, False)
            if isinstance(caller, Response):
                return caller
            if not caller.may("admin", "integration"):
                return error(403, "forbidden", f"a {caller.role} key may not send webhooks", "Authorization")
        return await webhook(request)

    async def webhook(request: Request) -> Response:
        source = request.path_params["source"]
        adapter = sources.get(source)
        if adapter is None:
            known = ", ".join(sorted(sources))
            return error(
                404, "unknown_source", f"no webhook adapter for {source!r}; there are {known}", "source"
            )
        body = await _body(request)
        delivery = Delivery(
            source=source,
            method=request.method,
            url=f"{settings.public_url.rstrip('/')}{path_and_query(request.scope)}",
            headers={k.lower(): v for k, v in request.headers.items()},
            query=dict(request.query_params),
            body=body,
        )
        problem = adapter.verify(delivery, settings, time.time())
        if problem:
            service.metrics.webhooks.labels(source, "unauthorised").inc()
            return error(401, "bad_signature", problem, adapter.credential)
        return _answer(await service.inbox.receive_async(source, body))

    def _answer(intake: Intake) -> Response:
        if intake.rejection is not None:
            return rejected(intake.rejection)
        effects = intake.effects
        return _JSON(
            {
                "event_id": intake.event_id,
                "duplicate": intake.duplicate,
                # Stored, and a worker acts on it moments later (many deliveries were arriving at once).
                "queued": intake.queued is not None,
                "enrolled": effects.enrolled,
                "ended": effects.ended,
            },
            status_code=200 if intake.duplicate else 202,
        )

    def outcomes(call: Call) -> Response:
        data: OutcomeIn = _parsed(call.body, OutcomeIn)
        if call.caller.role == "manager":
            with store.session(service.db) as s:
                touch = s.get(Touch, data.touch_id) if data.touch_id is not None else None
                enrollment_id = touch.enrollment_id if touch is not None else data.enrollment_id
                enrollment = s.get(Enrollment, enrollment_id) if enrollment_id is not None else None
                if enrollment is not None and not _owned(s, enrollment, call.caller.owner):
                    where = "touch_id" if touch is not None else "enrollment_id"
                    raise Refused(403, "forbidden", f"{where} is another manager's deal", where)
        return _record_outcome(data)

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
            raise _engine_refusal(exc) from None
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

    def outcome_list(call: Call) -> Response:
        p = call.params
        query = select(Outcome)
        for name in ("enrollment_id", "touch_id", "contact_id"):
            value = _int(p, name)
            if value is not None:
                query = query.where(getattr(Outcome, name) == value)
        outcome = _choice(p, "name", OutcomeName.__args__)  # type: ignore[attr-defined]
        if outcome is not None:
            query = query.where(Outcome.name == outcome)
        with store.session(service.db) as s:
            return _JSON(_page(s, query, Outcome, p))

    # --- enrollments ----------------------------------------------------------------------------------------

    def enrollment_list(call: Call) -> Response:
        p = call.params
        query = select(Enrollment)
        cadence = _text(p, "cadence")
        if cadence is not None:
            query = query.where(Enrollment.cadence_name == cadence)
        status = _choice(p, "status", _ENROLLMENT_STATUSES)
        if status is not None:
            query = query.where(Enrollment.status == status)
        for name in ("contact_id", "deal_id"):
            value = _int(p, name)
            if value is not None:
                query = query.where(getattr(Enrollment, name) == value)
        if call.caller.role == "manager":
            query = query.where(col(Enrollment.id).in_(_own_enrollments(call.caller.owner)))
        with store.session(service.db) as s:
            return _JSON(_page(s, query, Enrollment, p))

    def enrollment(call: Call) -> Response:
        enrollment_id = _id(call.path["id"], "id")
        if call.caller.role == "manager":
            with store.session(service.db) as s:
                found = s.get(Enrollment, enrollment_id)
                if found is not None and not _owned(s, found, call.caller.owner):
                    raise Refused(403, "forbidden", f"enrollment {enrollment_id} is another manager's", "id")
        return _JSON(_timeline(enrollment_id))

    def _timeline(enrollment_id: int) -> dict[str, Any]:
        found = service.timeline(enrollment_id)
        if found is None:
            raise Refused(404, "not_found", f"no enrollment {enrollment_id}", "id")
        return found

    def enrollment_start(call: Call) -> Response:
        data: EnrollmentIn = _parsed(call.body, EnrollmentIn)
        now = service.clock()
        with store.session(service.db) as s:
            contact = _contact_for(s, data)
            deal = _deal_for(s, data)
            if deal is not None and deal.contact_id not in (None, contact.id):
                raise Refused(422, "invalid", f"deal {deal.id} is contact {deal.contact_id}'s", "deal_id")
            try:
                started = service.engine.enroll(s, data.cadence, contact, deal, now, origin="by hand")
            except EngineError as exc:
                raise _engine_refusal(exc) from None
            if started is None:
                raise Refused(
                    409,
                    "conflict",
                    f"not started: already in {data.cadence}, blocked or barred by its re-enrollment rule",
                    "cadence",
                )
            enrollment_id = started.id or 0
        return _JSON(_timeline(enrollment_id), status_code=201)

    def _contact_for(s: Session, data: EnrollmentIn) -> Contact:
        if (data.contact_id is None) == (data.contact_external_id is None):
            raise Refused(
                422, "invalid", "give `contact_id` or `contact_external_id`, one of them", "contact_id"
            )
        if data.contact_id is not None:
            contact = s.get(Contact, data.contact_id)
            field = "contact_id"
        else:
            contact = s.exec(
                select(Contact).where(
                    Contact.source == data.source, Contact.external_id == data.contact_external_id
                )
            ).first()
            field = "contact_external_id"
        if contact is None:
            raise Refused(404, "not_found", f"no such contact from {data.source}", field)
        return contact

    def _deal_for(s: Session, data: EnrollmentIn) -> Deal | None:
        if data.deal_id is not None and data.deal_external_id is not None:
            raise Refused(422, "invalid", "give `deal_id` or `deal_external_id`, not both", "deal_id")
        if data.deal_id is not None:
            deal = s.get(Deal, data.deal_id)
            field = "deal_id"
        elif data.deal_external_id is not None:
            deal = s.exec(
                select(Deal).where(Deal.source == data.source, Deal.external_id == data.deal_external_id)
            ).first()
            field = "deal_external_id"
        else:
            return None
        if deal is None:
            raise Refused(404, "not_found", "no such deal", field)
        return deal

    def enrollment_action(act: Callable[[Session, Enrollment, datetime], None]) -> Handler:
        def handler(call: Call) -> Response:
            enrollment_id = _id(call.path["id"], "id")
            with store.session(service.db) as s:
                found = s.get(Enrollment, enrollment_id)
                if found is None:
                    raise Refused(404, "not_found", f"no enrollment {enrollment_id}", "id")
                try:
                    act(s, found, service.clock())
                except EngineError as exc:
                    raise Refused(409, "conflict", str(exc), "id") from None
            return _JSON(_timeline(enrollment_id))

        return handler

    def _stop(s: Session, enrollment: Enrollment, now: datetime) -> None:
        service.engine.stop(s, enrollment, "stopped by hand", now)

    # --- call tasks -----------------------------------------------------------------------------------------

    def call_tasks(call: Call) -> Response:
        p = call.params
        owner = _text(p, "owner")
        if call.caller.role == "manager":
            if owner is not None and owner != call.caller.owner:
                raise Refused(403, "forbidden", "a manager's key lists its own call tasks only", "owner")
            owner = call.caller.owner
        status = _choice(p, "status", _CALL_TASK_STATUSES, "open") or "open"
        day = _day(p, "date") or service.clock().astimezone(local_zone).date()
        return _JSON(_call_tasks(owner, day, status, _limit(p), _int(p, "cursor")))

    def _call_tasks(
        owner: str | None, day: date, status: str, limit: int, after: int | None
    ) -> dict[str, Any]:
        """A page of the day's call tasks, highest priority first, after the task `after`."""
        with store.session(service.db) as s:
            query = select(CallTask).where(CallTask.due_date == day)
            if owner:
                query = query.where(CallTask.owner == owner)
            if status != "all":
                query = query.where(CallTask.status == status)
            order = (col(CallTask.priority).desc(), col(CallTask.due_at), col(CallTask.id))
            if after is not None:
                mark = s.get(CallTask, after)
                if mark is None:
                    raise Refused(422, "invalid", "cursor is the next_cursor of the page before", "cursor")
                query = query.where(following(order, (mark.priority, mark.due_at, mark.id)))
            tasks = s.exec(query.order_by(*order).limit(limit + 1)).all()
            page = tasks[:limit]
            return {
                "date": day,
                "owner": owner,
                "status": status,
                "tasks": task_views(s, page),
                "next_cursor": str(page[-1].id) if len(tasks) > limit else None,
            }

    # --- contacts, deals, touches ---------------------------------------------------------------------------

    def contact_list(call: Call) -> Response:
        p = call.params
        query = select(Contact)
        for name in ("source", "external_id", "email"):
            value = _text(p, name)
            if value is not None:
                query = query.where(getattr(Contact, name) == value)
        with store.session(service.db) as s:
            return _JSON(_page(s, query, Contact, p))

    def contact(call: Call) -> Response:
        contact_id = _id(call.path["id"], "id")
        with store.session(service.db) as s:
            found = s.get(Contact, contact_id)
            if found is None:
                raise Refused(404, "not_found", f"no contact {contact_id}", "id")
            return _JSON(_row(found))

    def contact_forget(call: Call) -> Response:
        contact_id = _id(call.path["id"], "id")
        try:
            with store.session(service.db) as s:
                erased = service.engine.forget(s, contact_id)
        except EngineError as exc:
            raise _engine_refusal(exc) from None
        log.info("contact forgotten", extra={"contact": contact_id, "erased": erased})
        return Response(status_code=204)

    def deal_list(call: Call) -> Response:
        p = call.params
        query = select(Deal)
        owner = _text(p, "owner")
        if owner is not None:
            query = query.where(Deal.owner == owner)
        status = _choice(p, "status", ("open", "won", "lost"))
        if status is not None:
            query = query.where(Deal.status == status)
        contact_id = _int(p, "contact_id")
        if contact_id is not None:
            query = query.where(Deal.contact_id == contact_id)
        if call.caller.role == "manager":
            query = query.where(Deal.owner == call.caller.owner)
        with store.session(service.db) as s:
            return _JSON(_page(s, query, Deal, p))

    def deal(call: Call) -> Response:
        deal_id = _id(call.path["id"], "id")
        with store.session(service.db) as s:
            found = s.get(Deal, deal_id)
            if found is None:
                raise Refused(404, "not_found", f"no deal {deal_id}", "id")
            if call.caller.role == "manager" and found.owner != call.caller.owner:
                raise Refused(403, "forbidden", f"deal {deal_id} is another manager's", "id")
            return _JSON(_row(found))

    def touch_list(call: Call) -> Response:
        p = call.params
        query = select(Touch)
        status = _choice(p, "status", _TOUCH_STATUSES)
        if status is not None:
            query = query.where(Touch.status == status)
        channel = _choice(p, "channel", _CHANNELS)
        if channel is not None:
            query = query.where(Touch.channel == channel)
        enrollment_id = _int(p, "enrollment_id")
        if enrollment_id is not None:
            query = query.where(Touch.enrollment_id == enrollment_id)
        day = _day(p, "date")
        if day is not None:
            first = datetime.combine(day, datetime.min.time(), tzinfo=local_zone)
            query = query.where(col(Touch.due_at) >= first, col(Touch.due_at) < first + timedelta(days=1))
        due_from, due_to = _moment(p, "due_from"), _moment(p, "due_to")
        if due_from is not None:
            query = query.where(col(Touch.due_at) >= due_from)
        if due_to is not None:
            query = query.where(col(Touch.due_at) < due_to)
        owner = _text(p, "owner")
        if owner is not None:
            query = query.where(col(Touch.enrollment_id).in_(_own_enrollments(owner)))
        if call.caller.role == "manager":
            query = query.where(col(Touch.enrollment_id).in_(_own_enrollments(call.caller.owner)))
        with store.session(service.db) as s:
            return _JSON(_page(s, query, Touch, p))

    # --- blocks ---------------------------------------------------------------------------------------------

    def block_list(call: Call) -> Response:
        p = call.params
        query = select(Block)
        contact_id = _int(p, "contact_id")
        if contact_id is not None:
            query = query.where(Block.contact_id == contact_id)
        channel = _choice(p, "channel", ("all", *_CHANNELS))
        if channel is not None:
            query = query.where(Block.channel == (None if channel == "all" else channel))
        active = _flag(p, "active")
        if active is not None:
            now = service.clock()
            in_force = (
                col(Block.lifted_at).is_(None)
                & (col(Block.starts_at) <= now)
                & (col(Block.until).is_(None) | (col(Block.until) > now))
            )
            query = query.where(in_force if active else ~in_force)
        with store.session(service.db) as s:
            return _JSON(_page(s, query, Block, p))

    def block_add(call: Call) -> Response:
        data: BlockIn = _parsed(call.body, BlockIn)
        now = service.clock()
        if data.until is not None and data.until <= now:
            raise Refused(422, "invalid", "until is a time still to come", "until")
        with store.session(service.db) as s:
            if s.get(Contact, data.contact_id) is None:
                raise Refused(404, "not_found", f"no contact {data.contact_id}", "contact_id")
            block = Block(
                contact_id=data.contact_id,
                channel=None if data.channel == "all" else data.channel,
                reason=data.reason,
                starts_at=now,
                until=data.until,
            )
            s.add(block)
            s.flush()
            return _JSON(_row(block), status_code=201)

    def block_lift(call: Call) -> Response:
        block_id = _id(call.path["id"], "id")
        with store.session(service.db) as s:
            block = s.get(Block, block_id)
            if block is None:
                raise Refused(404, "not_found", f"no block {block_id}", "id")
            if block.lifted_at is not None:
                raise Refused(409, "conflict", f"block {block_id} was lifted already", "id")
            block.lifted_at = service.clock()
            return _JSON(_row(block))

    # --- cadences and rules ---------------------------------------------------------------------------------

    def cadences(call: Call) -> Response:
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

    def validate(call: Call) -> Response:
        try:
            text = call.body.decode("utf-8")
        except UnicodeDecodeError:
            raise Refused(400, "unreadable", "the body is not UTF-8 text", "body") from None
        with _beside_loaded(text) as (folder, name):
            found = lint_report([folder], settings.templates_dir)
        problems = [_posted(p) for p in found.problems if Path(p.file).name == _POSTED]
        valid = not any(p["severity"] == "error" for p in problems)
        return _JSON({"valid": valid, "cadence": name, "problems": problems})

    @contextmanager
    def _beside_loaded(text: str) -> Iterator[tuple[Path, str | None]]:
        """A folder with the loaded rules and `text` as one more file; it replaces a cadence of its name."""
        try:
            name: str | None = parse(text, _POSTED).spec.cadence
        except RulesError:
            name = None
        with tempfile.TemporaryDirectory(prefix="cadence-posted-") as tmp:
            folder = Path(tmp)
            for path in rule_files([settings.rules_dir]):
                if name is None or path.name == POLICY_FILE or not _defines(path, name):
                    copy = folder / path.relative_to(settings.rules_dir)
                    copy.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, copy)
            (folder / _POSTED).write_text(text, encoding="utf-8")
            yield folder, name

    def simulate(call: Call) -> Response:
        data: SimulateIn = _parsed(call.body, SimulateIn)
        if (data.cadence is None) == (data.yaml is None):
            raise Refused(422, "invalid", "give `cadence` (a loaded one) or `yaml`, one of them", "cadence")
        if not 2000 <= data.start.year <= 2100:
            raise Refused(422, "invalid", "start is a date between the years 2000 and 2100", "start")
        scripted = _each(data.outcomes, "outcomes", simulation.Scripted.parse)
        blocks = _each(data.blocks, "blocks", simulation.BlockedAtStart.parse)
        deal = None if data.deal is None else {"status": "open", **data.deal}
        _check(ContactData, {"id": "1", **data.contact}, "contact")
        if deal is not None:
            _check(DealData, {"id": "1", **deal}, "deal")
        if data.yaml is not None:
            with _beside_loaded(data.yaml) as (folder, named):
                try:
                    rules = load_rules([folder], settings.templates_dir)
                except RulesError as exc:
                    problems = [_posted(p) for p in exc.problems if Path(p.file).name == _POSTED]
                    first = problems[0]["message"] if problems else str(exc.problems[0])
                    raise Refused(
                        422, "invalid_rules", f"the cadence has errors: {first}", "yaml", problems=problems
                    ) from None
            name = named or ""
        else:
            rules, name = service.rules, data.cadence or ""
            if name not in rules:
                raise Refused(404, "not_found", f"no cadence named {name!r} is loaded", "cadence")
        zone = timing.zone_for(
            data.contact.get("timezone"), rules.get(name).calendar, settings.default_timezone
        )
        start = data.start if data.start.tzinfo else data.start.replace(tzinfo=zone)
        events = simulation.run(
            rules,
            name,
            start,
            data.contact,
            deal,
            days=data.days,
            templates=template_environment(settings.templates_dir),
            sender=settings.sender(),
            default_timezone=settings.default_timezone,
            outcomes=scripted,
            blocks=blocks,
        )
        return _JSON(
            {"cadence": name, "start": start, "days": data.days, "events": simulation.as_json(events)}
        )

    def reload_rules(call: Call) -> Response:
        try:
            changes = service.reload_rules()
        except RulesError as exc:
            count = len(exc.problems)
            return error(
                422,
                "invalid_rules",
                f"{count} problem(s) in the rules; the loaded rules stay in force. First: {exc.problems[0]}",
                problems=[p.as_dict() for p in exc.problems],
            )
        return _JSON(changes.as_dict())

    def reports(call: Call) -> Response:
        return error(501, "not_implemented", "reports are coming in a later release; nothing to show yet")

    # --- open to all ----------------------------------------------------------------------------------------

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

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def openapi_json(request: Request) -> Response:
        return _JSON(spec)

    async def docs(request: Request) -> Response:
        return HTMLResponse(page(spec))

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

    handlers: dict[tuple[str, str], Handler] = {
        ("POST", "/outcomes"): outcomes,
        ("GET", "/outcomes"): outcome_list,
        ("GET", "/enrollments"): enrollment_list,
        ("POST", "/enrollments"): enrollment_start,
        ("GET", "/enrollments/{id}"): enrollment,
        ("POST", "/enrollments/{id}/pause"): enrollment_action(service.engine.pause),
        ("POST", "/enrollments/{id}/resume"): enrollment_action(service.engine.resume),
        ("POST", "/enrollments/{id}/stop"): enrollment_action(_stop),
        ("GET", "/call-tasks"): call_tasks,
        ("GET", "/contacts"): contact_list,
        ("GET", "/contacts/{id}"): contact,
        ("DELETE", "/contacts/{id}"): contact_forget,
        ("GET", "/deals"): deal_list,
        ("GET", "/deals/{id}"): deal,
        ("GET", "/touches"): touch_list,
        ("GET", "/blocks"): block_list,
        ("POST", "/blocks"): block_add,
        ("POST", "/blocks/{id}/lift"): block_lift,
        ("GET", "/cadences"): cadences,
        ("POST", "/cadences/validate"): validate,
        ("POST", "/cadences/simulate"): simulate,
        ("POST", "/rules/reload"): reload_rules,
        ("GET", "/reports"): reports,
    }
    open_to_all: dict[tuple[str, str], Callable[[Request], Awaitable[Response]]] = {
        ("POST", "/webhooks/{source}"): keyed_webhook,
        ("GET", "/healthz"): healthz,
        ("GET", "/metrics"): metrics,
        ("GET", "/openapi.json"): openapi_json,
        ("GET", "/docs"): docs,
    }
    routes = [
        Route(op.path, guard(op, handlers[key]) if key in handlers else open_to_all[key], methods=[op.method])
        for op in OPERATIONS
        if (key := (op.method, op.path)) in handlers or key in open_to_all
    ]
    return Starlette(
        routes=[
            *routes,
            *email_api.routes(service),
            *pages.routes(service),
            *reporting.routes(service),
            *sms_api.routes(service),
        ],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )


_POSTED = "posted-cadence.yaml"


def _posted(problem: Problem) -> dict[str, object]:
    """A problem in the posted text, located in the body."""
    return {**problem.as_dict(), "file": "body"}


def _defines(path: Path, name: str) -> bool:
    try:
        return parse(path.read_text(encoding="utf-8"), str(path)).spec.cadence == name
    except (OSError, UnicodeDecodeError, RulesError):
        return False


def _each(texts: list[str], field: str, read: Callable[[str], Any]) -> list[Any]:
    found = []
    for number, text in enumerate(texts):
        try:
            found.append(read(text))
        except ValueError as exc:
            raise Refused(422, "invalid", str(exc), f"{field}.{number}") from None
    return found


def _check(model: type[BaseModel], value: dict[str, Any], field: str) -> None:
    try:
        model.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in (field, *first["loc"]))
        raise Refused(422, "invalid", f"{where}: {first['msg']}", where) from None
