"""Pages for people: the daily call list (HTML, JSON, CSV), where calls are logged, snoozed, reassigned.

A manager's list for a date holds their open call tasks due that day in the manager's time zone (`tz`,
default DEFAULT_TIMEZONE), with the open ones overdue from earlier days first, then by priority (highest
first), then by due time. The HTML page needs no JavaScript: each task is a card with three forms that post
back here and are redirected (303) to the list.

Who may call: the same API keys as the API (`Authorization: Bearer <key>` once any key or ADMIN_TOKEN
exists; in a browser, HTTP Basic with the key as the password, which the browser asks for itself): an
admin, or a manager whose key's owner is the `{owner}` in the path. The check is the API's (`create_app`'s
guard is local to it), done again here with `cadence.keys`. As with POST /outcomes, the posts are not
limited to loopback callers while no key exists."""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, urlencode
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import sqlalchemy as sa
from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlmodel import Session, col, select
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from cadence import keys, store
from cadence.language import OutcomeName
from cadence.models import CallTask, Contact
from cadence.openapi import Operation, Param
from channels.call import following, task_views

if TYPE_CHECKING:
    from cadence.service import Service

#: The page's outcome choices: what a caller picks, and the outcome it records. A wrong number is recorded
#: as `bounced` (the address does not work: cadences that exit on a bounce stop, and the policy's bounce
#: blocks apply to the call channel only if the policy says so), not `do_not_contact`, which would leave
#: the contact alone on every channel for good.
CALL_OUTCOMES: tuple[tuple[str, str], ...] = (
    ("replied", "Connected"),
    ("no_answer", "No answer"),
    ("left_voicemail", "Voicemail"),
    ("meeting_booked", "Meeting booked"),
    ("not_interested", "Not interested"),
    ("bounced", "Wrong number"),
)
_OUTCOME_NAMES: tuple[str, ...] = OutcomeName.__args__  # type: ignore[attr-defined]
_FORMATS = ("html", "json", "csv")
#: Longest snooze, in minutes (30 days).
MAX_SNOOZE_MINUTES = 30 * 24 * 60
#: The local time "tomorrow" snoozes to.
MORNING = time(9, 0)
_OWNER_MAX = 128
_NOTE_MAX = 10_000
_MAX_BODY_BYTES = 100_000
_MAX_ID = 2**63 - 1
#: A cell a spreadsheet would read as a formula; a phone number like +7 916 ... is left as it is.
_FORMULA = re.compile(r"^[=+\-@\t\r]")
_PHONE = re.compile(r"^\+?[0-9 ()\-.]+$")

_templates = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "page_templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
)

_OWNER = Param("owner", {"type": "string", "minLength": 1, "maxLength": _OWNER_MAX}, "the manager", "path")
_TASK = Param("task_id", {"type": "integer", "minimum": 1, "maximum": _MAX_ID}, "the call task", "path")
_WHERE = {
    "date": {"type": "string", "format": "date", "description": "the list to go back to (form posts)"},
    "tz": {"type": "string", "description": "its time zone (form posts)"},
}
_ROLES = ("admin", "manager")
_ACT_NOTES = (
    "Takes a form (answered with a 303 redirect to the list) or JSON (answered with the task). Only the "
    "list's owner (a manager key with that owner) or an admin; the task must be open and on that list."
)

#: Calls a page of the list shows, the most urgent first: a day's work, however long the list has grown.
CALLS_PER_PAGE = 50

#: What these routes are, for the OpenAPI document (every route of the app must be in it).
OPERATIONS: list[Operation] = [
    Operation(
        "GET",
        "/managers/{owner}/calls",
        "A manager's daily call list",
        roles=_ROLES,
        params=(
            _OWNER,
            Param("date", {"type": "string", "format": "date"}, "the day (default today in `tz`)"),
            Param(
                "tz", {"type": "string", "maxLength": 64}, "the manager's time zone (default the service's)"
            ),
            Param("format", {"type": "string", "enum": list(_FORMATS)}, "html (default), json or csv"),
            Param("cursor", {"type": "string", "pattern": "^[1-9][0-9]{0,17}$"}, "a page's `next_cursor`"),
        ),
        answer={"type": "string"},
        answer_type="text/html",
        errors=(422,),
        notes="Open call tasks due that day, and open ones overdue from earlier days first; then by "
        f"priority, highest first, then due time; {CALLS_PER_PAGE} a page (the HTML page links to the "
        "next). `format=json` answers {owner, date, tz, total, tasks, next_cursor}; `csv` one row per task, "
        "all of them. A manager gets 403 for another owner's list.",
    ),
    Operation(
        "POST",
        "/managers/{owner}/calls/{task_id}/outcome",
        "Log what came of a call",
        roles=_ROLES,
        params=(_OWNER, _TASK),
        raw_body=(
            "application/x-www-form-urlencoded",
            {
                "type": "object",
                "required": ["outcome"],
                "properties": {
                    "outcome": {"type": "string", "enum": list(_OUTCOME_NAMES)},
                    "note": {"type": "string", "maxLength": _NOTE_MAX},
                    **_WHERE,
                },
            },
        ),
        answer={"type": "object"},
        errors=(400, 404, 409, 422),
        notes="Recorded on the task's touch as POST /outcomes does: the step's retries, the cadence's exits "
        "and the policy's blocks follow. " + _ACT_NOTES,
    ),
    Operation(
        "POST",
        "/managers/{owner}/calls/{task_id}/snooze",
        "Put a call off until later",
        roles=_ROLES,
        params=(_OWNER, _TASK),
        raw_body=(
            "application/x-www-form-urlencoded",
            {
                "type": "object",
                "properties": {
                    "until": {"type": "string", "format": "date-time"},
                    "minutes": {"type": "integer", "minimum": 1, "maximum": MAX_SNOOZE_MINUTES},
                    **_WHERE,
                },
            },
        ),
        answer={"type": "object"},
        errors=(400, 404, 409, 422),
        notes="Give `until` (an ISO date-time with an offset, still to come) or `minutes` from now. "
        + _ACT_NOTES,
    ),
    Operation(
        "POST",
        "/managers/{owner}/calls/{task_id}/reassign",
        "Hand a call to another manager",
        roles=_ROLES,
        params=(_OWNER, _TASK),
        raw_body=(
            "application/x-www-form-urlencoded",
            {
                "type": "object",
                "required": ["owner"],
                "properties": {
                    "owner": {"type": "string", "minLength": 1, "maxLength": _OWNER_MAX},
                    **_WHERE,
                },
            },
        ),
        answer={"type": "object"},
        errors=(400, 404, 409, 422),
        notes="The task moves to the new owner's list; the deal keeps its owner. " + _ACT_NOTES,
    ),
]


class _Refused(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field


def _zone(raw: str | None, default: str) -> ZoneInfo:
    name = raw if raw is not None else default
    if not name or len(name) > 64 or "\x00" in name:
        raise _Refused(422, "invalid", "tz is an IANA time zone, e.g. Europe/Moscow", "tz")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise _Refused(422, "invalid", f"tz {name!r} is not a known time zone", "tz") from None


def _cursor(raw: str | None) -> int | None:
    """The call a page follows, as its `cursor` names it (None: the first page)."""
    if raw is None:
        return None
    if not raw.isascii() or not raw.isdigit() or not 1 <= len(raw) <= 18 or raw.startswith("0"):
        raise _Refused(422, "invalid", "cursor is the next_cursor of the page before", "cursor")
    return int(raw)


def _day(raw: str | None, zone: ZoneInfo, now: datetime) -> date:
    if not raw:
        return now.astimezone(zone).date()
    try:
        day = date.fromisoformat(raw)
    except ValueError:
        raise _Refused(422, "invalid", f"date {raw!r} is not YYYY-MM-DD", "date") from None
    if not 2000 <= day.year <= 2100:
        raise _Refused(422, "invalid", "date is between the years 2000 and 2100", "date")
    return day


def _owner(raw: str, field: str) -> str:
    owner = raw.strip()
    if not owner or len(owner) > _OWNER_MAX or "\x00" in owner:
        raise _Refused(422, "invalid", f"{field} is 1 to {_OWNER_MAX} characters", field)
    return owner


def _task_id(raw: str) -> int:
    if not raw.isdigit() or not 1 <= int(raw) <= _MAX_ID:
        raise _Refused(422, "invalid", f"task_id is a whole number from 1 to {_MAX_ID}", "task_id")
    return int(raw)


def _cell(value: Any) -> str:
    """A CSV cell a spreadsheet shows as text, never runs as a formula."""
    text = "" if value is None else str(value)
    if _FORMULA.match(text) and not _PHONE.match(text):
        return "'" + text
    return text


def _open_by(owner: str, day: date, zone: ZoneInfo) -> tuple[Any, datetime]:
    """The condition for the owner's open calls due by the end of `day` in `zone`, and the day's start."""
    first = datetime.combine(day, time.min, tzinfo=zone)
    end = datetime.combine(day + timedelta(days=1), time.min, tzinfo=zone)
    return (
        sa.and_(CallTask.owner == owner, CallTask.status == "open", col(CallTask.due_at) < end),  # type: ignore[arg-type]
        first,
    )


def calls_count(s: Session, owner: str, day: date, zone: ZoneInfo) -> int:
    """How many calls `calls_list` has in all."""
    where, _ = _open_by(owner, day, zone)
    return s.exec(select(sa.func.count()).select_from(CallTask).where(where)).one()


def calls_list(
    s: Session, owner: str, day: date, zone: ZoneInfo, *, after: int | None = None, limit: int | None = None
) -> list[dict[str, Any]]:
    """The owner's open call tasks due by the end of `day` in `zone`: overdue first, then by priority
    (highest first), then due time; `limit` of them after call `after`, or all."""
    where, first = _open_by(owner, day, zone)
    overdue = sa.case((col(CallTask.due_at) < first, 0), else_=1)
    order = (overdue, col(CallTask.priority).desc(), col(CallTask.due_at), col(CallTask.id))
    query = select(CallTask).where(where).order_by(*order)
    if after is not None:
        mark = s.get(CallTask, after)
        if mark is None:
            raise _Refused(422, "invalid", "cursor is the next_cursor of the page before", "cursor")
        values = (0 if mark.due_at < first else 1, mark.priority, mark.due_at, mark.id)
        query = query.where(following(order, values))
    if limit is not None:
        query = query.limit(limit)
    ordered = s.exec(query).all()
    found = []
    for task, view in zip(ordered, task_views(s, ordered), strict=True):
        deal = view["deal"]
        found.append(
            {
                "id": task.id,
                "touch_id": task.touch_id,
                "owner": task.owner,
                "due_at": task.due_at,
                "due_local": task.due_at.astimezone(zone).strftime("%Y-%m-%d %H:%M"),
                "due_date": task.due_date,
                "overdue": task.due_at < first,
                "priority": task.priority,
                "status": task.status,
                "reason": task.reason,
                "script": task.script,
                "script_html": view["script_html"],
                "contact": {"id": task.contact_id, "name": task.contact_name, "phone": task.phone},
                "deal": None
                if deal is None
                else {k: deal[k] for k in ("id", "title", "amount", "currency", "stage", "status")},
                "history": view["history"],
            }
        )
    return found


def _browser(refused: Response) -> Response:
    """A browser shows its own sign-in box for Basic: the manager types any name and the API key."""
    refused.headers["WWW-Authenticate"] = 'Bearer, Basic realm="Cadence", charset="UTF-8"'
    return refused


def routes(service: Service) -> list[Route]:
    from cadence.api import _JSON, _unauthorised, error

    settings = service.settings

    def caller(request: Request) -> keys.Principal | Response:
        """The caller its key names, as the API's guard finds it (anyone, while no key exists)."""
        with store.session(service.db) as s:
            found = keys.authenticate(
                s, settings.admin_token, request.headers.get("authorization"), basic=True
            )
        return _browser(_unauthorised(found)) if isinstance(found, str) else found

    async def guarded(request: Request, act: Any) -> Response:
        who = await run_in_threadpool(caller, request)
        if isinstance(who, Response):
            return who
        if not who.may(*_ROLES):
            return error(
                403, "forbidden", f"a {who.role} key may not {request.method} this page", "Authorization"
            )
        try:
            owner = _owner(request.path_params["owner"], "owner")
            if who.role == "manager" and owner != who.owner:
                raise _Refused(403, "forbidden", "a manager's key works its own call list only", "owner")
            body = b"" if request.method == "GET" else await request.body()
            if len(body) > _MAX_BODY_BYTES:
                raise _Refused(413, "http", f"body is over {_MAX_BODY_BYTES} bytes")
            answer: Response = await run_in_threadpool(act, request, owner, body)
            return answer
        except _Refused as exc:
            return error(exc.status, exc.code, exc.message, exc.field)

    # --- the list -------------------------------------------------------------------------------------------

    def list_page(request: Request, owner: str, body: bytes) -> Response:
        p = request.query_params
        fmt = p.get("format", "html")
        if fmt not in _FORMATS:
            raise _Refused(422, "invalid", f"format is one of {', '.join(_FORMATS)}", "format")
        zone = _zone(p.get("tz"), settings.default_timezone)
        now = service.clock()
        day = _day(p.get("date"), zone, now)
        after = _cursor(p.get("cursor"))
        with store.session(service.db) as s:
            # A CSV is the whole list; a page shows the most urgent CALLS_PER_PAGE, the rest a page further.
            if fmt == "csv":
                tasks, more, after = calls_list(s, owner, day, zone), False, None
            else:
                tasks = calls_list(s, owner, day, zone, after=after, limit=CALLS_PER_PAGE + 1)
                tasks, more = tasks[:CALLS_PER_PAGE], len(tasks) > CALLS_PER_PAGE
            # A whole list counts itself; a page asks how many there are in all.
            total = len(tasks) if after is None and not more else calls_count(s, owner, day, zone)
        next_cursor = str(tasks[-1]["id"]) if more else None
        if fmt == "json":
            return _JSON(
                {
                    "owner": owner,
                    "date": day,
                    "tz": zone.key,
                    "total": total,
                    "tasks": tasks,
                    "next_cursor": next_cursor,
                }
            )
        if fmt == "csv":
            out = io.StringIO()
            writer = csv.writer(out)
            writer.writerow(["due", "overdue", "priority", "contact", "phone", "deal", "reason"])
            for t in tasks:
                deal = t["deal"] or {}
                writer.writerow(
                    [
                        t["due_local"],
                        "yes" if t["overdue"] else "no",
                        t["priority"],
                        _cell(t["contact"]["name"]),
                        _cell(t["contact"]["phone"]),
                        _cell(deal.get("title")),
                        _cell(t["reason"]),
                    ]
                )
            name = f"calls-{day.isoformat()}.csv"
            return Response(
                out.getvalue(),
                media_type="text/csv; charset=utf-8",
                headers={"Content-Disposition": f'attachment; filename="{name}"'},
            )
        base = f"/managers/{quote(owner, safe='')}/calls"
        where = {"date": day.isoformat(), "tz": zone.key}
        tomorrow = datetime.combine(now.astimezone(zone).date() + timedelta(days=1), MORNING, tzinfo=zone)
        for t in tasks:
            t["actions"] = {a: f"{base}/{t['id']}/{a}" for a in ("outcome", "snooze", "reassign")}
        text = _templates.get_template("calls.html").render(
            owner=owner,
            day=day.isoformat(),
            tz=zone.key,
            tasks=tasks,
            total=total,
            cursor=after,
            next_url=f"{base}?{urlencode({**where, 'cursor': next_cursor})}" if next_cursor else None,
            start_url=f"{base}?{urlencode(where)}" if after else None,
            outcomes=CALL_OUTCOMES,
            tomorrow=tomorrow.isoformat(),
            json_url=f"{base}?{urlencode({**where, 'format': 'json'})}",
            csv_url=f"{base}?{urlencode({**where, 'format': 'csv'})}",
        )
        return HTMLResponse(text)

    # --- acting on a task -----------------------------------------------------------------------------------

    def read(request: Request, body: bytes) -> tuple[dict[str, Any], bool]:
        """The posted fields, and whether they came as a form (answered with a redirect)."""
        kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise _Refused(400, "unreadable", "the body is not UTF-8 text", "body") from None
        if kind == "application/json":
            try:
                data = json.loads(text) if text.strip() else {}
            except ValueError:
                raise _Refused(400, "unreadable", "the body is not JSON", "body") from None
            if not isinstance(data, dict):
                raise _Refused(422, "invalid", "the body is a JSON object", "body")
            return data, False
        try:
            fields = parse_qs(text, keep_blank_values=True, errors="strict")
        except (UnicodeDecodeError, ValueError):
            raise _Refused(400, "unreadable", "the form is not readable", "body") from None
        return {k: v[-1] for k, v in fields.items()}, True

    def text_field(data: dict[str, Any], name: str, most: int, required: bool = False) -> str | None:
        value = data.get(name)
        if value is None or value == "":
            if required:
                raise _Refused(422, "invalid", f"{name} is required", name)
            return None
        if not isinstance(value, str) or len(value) > most or "\x00" in value:
            raise _Refused(422, "invalid", f"{name} is text of at most {most} characters", name)
        return value

    def back(owner: str, data: dict[str, Any]) -> Response:
        """The 303 to the list the form was on (its date and zone, when they are good)."""
        where: dict[str, str] = {}
        raw_tz = text_field(data, "tz", 64)
        if raw_tz is not None:
            where["tz"] = _zone(raw_tz, settings.default_timezone).key
        raw_day = text_field(data, "date", 10)
        if raw_day is not None:
            where["date"] = _day(raw_day, ZoneInfo("UTC"), service.clock()).isoformat()
        cursor = _cursor(text_field(data, "cursor", 18))
        if cursor is not None:  # back to the page the form was on
            where["cursor"] = str(cursor)
        query = f"?{urlencode(where)}" if where else ""
        return RedirectResponse(f"/managers/{quote(owner, safe='')}/calls{query}", status_code=303)

    def open_task(s: Session, owner: str, request: Request) -> CallTask:
        task_id = _task_id(request.path_params["task_id"])
        task = s.get(CallTask, task_id)
        if task is None or task.owner != owner:
            raise _Refused(404, "not_found", f"no call task {task_id} on {owner}'s list", "task_id")
        if task.status != "open":
            raise _Refused(409, "conflict", f"call task {task_id} is {task.status}, not open", "task_id")
        return task

    def answer(owner: str, data: dict[str, Any], form: bool, task_id: int) -> Response:
        if form:
            return back(owner, data)
        with store.session(service.db) as s:
            task = s.get_one(CallTask, task_id)
            return _JSON({**task.model_dump(), "list": f"/managers/{quote(owner, safe='')}/calls"})

    def log_outcome(request: Request, owner: str, body: bytes) -> Response:
        from cadence.engine import EngineError

        data, form = read(request, body)
        name = text_field(data, "outcome", 32, required=True)
        if name not in _OUTCOME_NAMES:
            raise _Refused(422, "invalid", f"outcome is one of {', '.join(_OUTCOME_NAMES)}", "outcome")
        note = text_field(data, "note", _NOTE_MAX)
        try:
            with store.session(service.db) as s:
                task = open_task(s, owner, request)
                task_id = task.id or 0
                service.engine.record_outcome(
                    s, name, service.clock(), touch_id=task.touch_id, note=note, source="call list"
                )
        except EngineError as exc:
            status = 404 if exc.not_found else 422
            raise _Refused(status, "not_found" if exc.not_found else "invalid", str(exc), exc.field) from None
        service.metrics.outcomes.labels(name).inc()
        return answer(owner, data, form, task_id)

    def snooze(request: Request, owner: str, body: bytes) -> Response:
        data, form = read(request, body)
        now = service.clock()
        until_raw = text_field(data, "until", 64)
        minutes_raw = data.get("minutes")
        if (until_raw is None) == (minutes_raw in (None, "")):
            raise _Refused(422, "invalid", "give `until` or `minutes`, one of them", "until")
        if until_raw is not None:
            try:
                until: datetime | None = datetime.fromisoformat(until_raw)
            except ValueError:
                until = None
            if until is None or until.tzinfo is None:
                raise _Refused(422, "invalid", "until is an ISO date-time with an offset", "until")
            if until <= now:
                raise _Refused(422, "invalid", "until is a time still to come", "until")
            if until > now + timedelta(minutes=MAX_SNOOZE_MINUTES):
                raise _Refused(422, "invalid", "until is at most 30 days away", "until")
        else:
            text = str(minutes_raw) if isinstance(minutes_raw, str | int) else ""
            if (
                isinstance(minutes_raw, bool)
                or not text.isdigit()
                or not 1 <= int(text) <= MAX_SNOOZE_MINUTES
            ):
                raise _Refused(
                    422, "invalid", f"minutes is a whole number from 1 to {MAX_SNOOZE_MINUTES}", "minutes"
                )
            until = now + timedelta(minutes=int(text))
        with store.session(service.db) as s:
            task = open_task(s, owner, request)
            contact = s.get(Contact, task.contact_id)
            zone = _contact_zone(contact.timezone if contact else None, settings.default_timezone)
            task.due_at = until
            task.due_date = until.astimezone(zone).date()
            task_id = task.id or 0
        return answer(owner, data, form, task_id)

    def reassign(request: Request, owner: str, body: bytes) -> Response:
        data, form = read(request, body)
        raw = text_field(data, "owner", _OWNER_MAX, required=True)
        new_owner = _owner(raw or "", "owner")
        with store.session(service.db) as s:
            task = open_task(s, owner, request)
            task.owner = new_owner
            task_id = task.id or 0
        return answer(owner, data, form, task_id)

    def endpoint(act: Any) -> Any:
        async def handle(request: Request) -> Response:
            return await guarded(request, act)

        return handle

    return [
        Route("/managers/{owner}/calls", endpoint(list_page), methods=["GET"]),
        Route("/managers/{owner}/calls/{task_id}/outcome", endpoint(log_outcome), methods=["POST"]),
        Route("/managers/{owner}/calls/{task_id}/snooze", endpoint(snooze), methods=["POST"]),
        Route("/managers/{owner}/calls/{task_id}/reassign", endpoint(reassign), methods=["POST"]),
    ]


def _contact_zone(name: str | None, default: str) -> ZoneInfo:
    for candidate in (name, default):
        if candidate:
            try:
                return ZoneInfo(candidate)
            except (ZoneInfoNotFoundError, ValueError, OSError):
                continue
    return ZoneInfo("UTC")
