"""Reports for the head of sales: per cadence and step, touches to a win, base decay; JSON, CSV, SVG."""

from __future__ import annotations

import csv
import html
import io
import json
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlmodel import Session, col, select
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from cadence import keys, store
from cadence.models import CallTask, Deal, Enrollment, Outcome, Touch, TouchStatus
from cadence.openapi import Operation, Param

if TYPE_CHECKING:
    from cadence.service import Service

#: The touch after which most deals close, by the multiple-touch rule of thumb.
SEVENTH = 7
#: Largest `days` base decay looks back over.
MAX_DAYS = 3650
#: Skip reasons grouped by what they start with; any other is grouped by the text before its first colon.
_SKIP_KINDS = (
    "condition not met",
    "condition failed",
    "skip_when holds",
    "contact is blocked",
    "no consent",
    "no choice reaches the contact",
    "contact has no",
)
UNASSIGNED = "(unassigned)"


# --- the figures --------------------------------------------------------------------------------------------


def skip_kind(reason: str | None) -> str | None:
    """The kind of a skipped touch's reason; None for a deferral, which is not a skip."""
    text = (reason or "").strip()
    if text.startswith("deferred"):
        return None
    for kind in _SKIP_KINDS:
        if text.startswith(kind):
            return kind
    return text.split(":", 1)[0].strip()[:80] or "unknown"


def _within(moment: datetime | None, since: datetime | None, until: datetime | None) -> bool:
    if moment is None:
        return False
    return (since is None or moment >= since) and (until is None or moment < until)


@dataclass(frozen=True)
class _Sent:
    at: datetime
    cadence: str
    step: int
    channel: str
    variant: str | None


def _sent_by_deal(s: Session) -> dict[int, list[_Sent]]:
    """Each deal's sent touches (across its enrollments), oldest first."""
    rows = s.exec(
        select(Touch, Enrollment)
        .join(Enrollment, col(Enrollment.id) == col(Touch.enrollment_id))
        .where(Touch.status == TouchStatus.sent, col(Enrollment.deal_id).is_not(None))
    ).all()
    found: dict[int, list[_Sent]] = defaultdict(list)
    for touch, enrollment in rows:
        if touch.finished_at is None or enrollment.deal_id is None:
            continue
        found[enrollment.deal_id].append(
            _Sent(touch.finished_at, enrollment.cadence_name, touch.step_index, touch.channel, touch.variant)
        )
    for touches in found.values():
        touches.sort(key=lambda t: t.at)
    return found


def deal_ends(s: Session) -> list[tuple[int, str, datetime]]:
    """(deal id, won or lost, when) for each deal's first won and first lost: the outcome, or, without one,
    the deal's status with its `updated_at`."""
    first: dict[tuple[int, str], datetime] = {}
    deal_of = {e.id: e.deal_id for e in s.exec(select(Enrollment)).all()}
    for outcome in s.exec(select(Outcome).where(col(Outcome.name).in_(["won", "lost"]))).all():
        deal_id = outcome.deal_id or deal_of.get(outcome.enrollment_id)
        if deal_id is None:
            continue
        key = (deal_id, outcome.name)
        if key not in first or outcome.occurred_at < first[key]:
            first[key] = outcome.occurred_at
    for deal in s.exec(select(Deal).where(col(Deal.status).in_(["won", "lost"]))).all():
        assert deal.id is not None
        first.setdefault((deal.id, deal.status), deal.updated_at)
    return sorted((deal_id, name, at) for (deal_id, name), at in first.items())


def _last_before(touches: list[_Sent], moment: datetime) -> _Sent | None:
    before = [t for t in touches if t.at <= moment]
    return before[-1] if before else None


def _blank() -> dict[str, Any]:
    return {
        "sent": 0,
        "skipped": 0,
        "skipped_by_reason": Counter(),
        "replies": 0,
        "meetings": 0,
        "won": 0,
        "lost": 0,
    }


def cadence_figures(
    s: Session, since: datetime | None = None, until: datetime | None = None
) -> dict[str, Any]:
    """Per cadence and step, and per channel and variant within the step: touches sent and skipped (by
    kind of reason), replies and meetings on the step's touches, deals won and lost after it (their last
    sent touch before the win or loss was this step). Touches count by when they finished, outcomes by when
    they occurred, in [since, until)."""
    steps: dict[tuple[str, int], dict[str, Any]] = defaultdict(_blank)
    splits: dict[tuple[str, int], dict[tuple[str, str | None], dict[str, Any]]] = defaultdict(
        lambda: defaultdict(_blank)
    )

    def add(
        cadence: str, step: int, channel: str, variant: str | None, field: str, kind: str | None = None
    ) -> None:
        for figures in (steps[(cadence, step)], splits[(cadence, step)][(channel, variant)]):
            figures[field] += 1
            if kind is not None:
                figures["skipped_by_reason"][kind] += 1

    touches: dict[int, tuple[Touch, Enrollment]] = {}
    for touch, enrollment in s.exec(
        select(Touch, Enrollment).join(Enrollment, col(Enrollment.id) == col(Touch.enrollment_id))
    ).all():
        assert touch.id is not None
        touches[touch.id] = (touch, enrollment)
        if not _within(touch.finished_at, since, until):
            continue
        if touch.status == TouchStatus.sent:
            add(enrollment.cadence_name, touch.step_index, touch.channel, touch.variant, "sent")
        elif touch.status == TouchStatus.skipped:
            kind = skip_kind(touch.status_reason)
            if kind is not None:
                add(enrollment.cadence_name, touch.step_index, touch.channel, touch.variant, "skipped", kind)

    last_sent: dict[int, list[Touch]] = defaultdict(list)
    for touch, _ in touches.values():
        if touch.status == TouchStatus.sent and touch.finished_at is not None:
            last_sent[touch.enrollment_id].append(touch)
    for outcome in s.exec(select(Outcome).where(col(Outcome.name).in_(["replied", "meeting_booked"]))).all():
        if not _within(outcome.occurred_at, since, until):
            continue
        on: Touch | None = None
        if outcome.touch_id is not None and outcome.touch_id in touches:
            on = touches[outcome.touch_id][0]
        elif outcome.enrollment_id is not None:
            # Recorded on the enrollment: the touch it answers is the last one sent before it.
            earlier = [
                t
                for t in last_sent[outcome.enrollment_id]
                if t.finished_at and t.finished_at <= outcome.occurred_at
            ]
            on = max(earlier, key=lambda t: t.finished_at or outcome.occurred_at) if earlier else None
        if on is None:
            continue
        cadence = touches[on.id or 0][1].cadence_name
        field = "replies" if outcome.name == "replied" else "meetings"
        add(cadence, on.step_index, on.channel, on.variant, field)

    by_deal = _sent_by_deal(s)
    for deal_id, name, at in deal_ends(s):
        if not _within(at, since, until):
            continue
        last = _last_before(by_deal.get(deal_id, []), at)
        if last is not None:
            add(last.cadence, last.step, last.channel, last.variant, name)

    def plain(figures: dict[str, Any]) -> dict[str, Any]:
        return {**figures, "skipped_by_reason": dict(sorted(figures["skipped_by_reason"].items()))}

    cadences: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for cadence, step in sorted(steps):
        by_channel = [
            {"channel": channel, "variant": variant, **plain(figures)}
            for (channel, variant), figures in sorted(
                splits[(cadence, step)].items(), key=lambda kv: (kv[0][0], kv[0][1] or "")
            )
        ]
        cadences[cadence].append({"step": step, **plain(steps[(cadence, step)]), "by_channel": by_channel})
    return {
        "since": since,
        "until": until,
        "cadences": [{"cadence": name, "steps": rows} for name, rows in cadences.items()],
    }


def touches_to_win(s: Session) -> dict[str, Any]:
    """How many sent touches each won deal had (across its enrollments) before it was won."""
    by_deal = _sent_by_deal(s)
    counts: Counter[int] = Counter()
    for deal_id, name, at in deal_ends(s):
        if name == "won":
            counts[sum(1 for t in by_deal.get(deal_id, []) if t.at <= at)] += 1
    won = sum(counts.values())
    late = sum(n for touches, n in counts.items() if touches >= SEVENTH)
    return {
        "deals_won": won,
        "distribution": {str(touches): counts[touches] for touches in sorted(counts)},
        "won_at_or_after_seventh": late,
        "share_won_at_or_after_seventh": round(late / won, 4) if won else None,
    }


def base_decay(s: Session, now: datetime, days: int) -> dict[str, Any]:
    """Lost deals with no sent touch in the last `days` days: the base losing its value."""
    by_deal = _sent_by_deal(s)
    cutoff = now - timedelta(days=days)
    lost = s.exec(select(Deal).where(Deal.status == "lost").order_by(col(Deal.id))).all()
    decaying = []
    for deal in lost:
        touched = by_deal.get(deal.id or 0, [])
        last = touched[-1].at if touched else None
        if last is None or last < cutoff:
            decaying.append(
                {"deal_id": deal.id, "title": deal.title, "owner": deal.owner, "last_touched_at": last}
            )
    decaying.sort(key=lambda d: (d["last_touched_at"] is not None, d["last_touched_at"] or now, d["deal_id"]))
    return {"days": days, "lost_deals": len(lost), "count": len(decaying), "deals": decaying}


def team(s: Session, day: date, zone: ZoneInfo) -> dict[str, Any]:
    """Per manager (deal owner): calls due, done and overdue on `day`; meetings booked and touches sent by
    channel in the week (Monday to Sunday, in `zone`) holding `day`."""
    monday = day - timedelta(days=day.weekday())
    start = datetime.combine(monday, time(), zone)
    end = datetime.combine(monday + timedelta(days=7), time(), zone)
    rows: dict[str, dict[str, Any]] = defaultdict(
        lambda: {
            "calls_due": 0,
            "calls_done": 0,
            "calls_overdue": 0,
            "meetings_booked": 0,
            "touches_sent": Counter(),
        }
    )
    for task in s.exec(select(CallTask).where(CallTask.status != "cancelled")).all():
        row = rows[task.owner or UNASSIGNED]
        if task.due_date == day:
            row["calls_due"] += 1
            row["calls_done"] += task.status == "done"
        elif task.due_date < day and task.status == "open":
            row["calls_overdue"] += 1
    owners = {d.id: d.owner for d in s.exec(select(Deal)).all()}
    deal_of = {e.id: e.deal_id for e in s.exec(select(Enrollment)).all()}
    for outcome in s.exec(select(Outcome).where(Outcome.name == "meeting_booked")).all():
        if _within(outcome.occurred_at, start, end):
            deal_id = outcome.deal_id or deal_of.get(outcome.enrollment_id)
            rows[owners.get(deal_id) or UNASSIGNED]["meetings_booked"] += 1
    for touch in s.exec(select(Touch).where(Touch.status == TouchStatus.sent)).all():
        if _within(touch.finished_at, start, end):
            rows[owners.get(deal_of.get(touch.enrollment_id)) or UNASSIGNED]["touches_sent"][
                touch.channel
            ] += 1
    return {
        "date": day,
        "timezone": zone.key,
        "week_start": monday,
        "managers": [
            {"owner": owner, **row, "touches_sent": dict(sorted(row["touches_sent"].items()))}
            for owner, row in sorted(rows.items())
        ],
    }


# --- CSV ----------------------------------------------------------------------------------------------------

_CADENCE_COLUMNS = (
    "cadence",
    "step",
    "channel",
    "variant",
    "sent",
    "skipped",
    "replies",
    "meetings",
    "won",
    "lost",
)


def _csv(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([_cell(v) for v in row])
    return out.getvalue()


def _cell(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@"):
        return "'" + value  # not a formula when opened in a spreadsheet
    return "" if value is None else value


def cadence_csv(figures: dict[str, Any]) -> str:
    """A row per step (channel and variant `all`) and per channel and variant in it; skips by kind last."""
    rows = []
    for cadence in figures["cadences"]:
        for step in cadence["steps"]:
            for part, channel, variant in [(step, "all", "all")] + [
                (c, c["channel"], c["variant"]) for c in step["by_channel"]
            ]:
                reasons = "; ".join(f"{k}={n}" for k, n in part["skipped_by_reason"].items())
                rows.append(
                    [cadence["cadence"], step["step"], channel, variant]
                    + [part[k] for k in _CADENCE_COLUMNS[4:]]
                    + [reasons]
                )
    return _csv([*_CADENCE_COLUMNS, "skipped_by_reason"], rows)


def touches_csv(figures: dict[str, Any]) -> str:
    return _csv(["touches", "deals_won"], [[int(t), n] for t, n in figures["distribution"].items()])


def decay_csv(figures: dict[str, Any]) -> str:
    rows = [[d["deal_id"], d["title"], d["owner"], d["last_touched_at"]] for d in figures["deals"]]
    return _csv(["deal_id", "title", "owner", "last_touched_at"], rows)


def team_csv(figures: dict[str, Any]) -> str:
    channels = sorted({c for m in figures["managers"] for c in m["touches_sent"]})
    rows = [
        [m["owner"], m["calls_due"], m["calls_done"], m["calls_overdue"], m["meetings_booked"]]
        + [m["touches_sent"].get(c, 0) for c in channels]
        for m in figures["managers"]
    ]
    header = ["owner", "calls_due", "calls_done", "calls_overdue", "meetings_booked"]
    return _csv(header + [f"sent_{c}" for c in channels], rows)


# --- SVG and the page ---------------------------------------------------------------------------------------


def bar_chart(title: str, bars: list[tuple[str, float]], width: int = 560) -> str:
    """A horizontal bar chart as inline SVG; every label escaped."""
    e = html.escape
    row, label_w, top = 22, 200, 28
    height = top + row * max(len(bars), 1) + 8
    most = max((v for _, v in bars), default=0) or 1
    span = width - label_w - 60
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="{e(title)}" font-family="sans-serif" font-size="12">',
        f"<title>{e(title)}</title>",
        f'<text x="0" y="16" font-weight="bold">{e(title)}</text>',
    ]
    if not bars:
        parts.append(f'<text x="0" y="{top + 14}" fill="#777">nothing yet</text>')
    for i, (label, value) in enumerate(bars):
        y = top + i * row
        w = round(span * value / most, 1)
        shown = label if len(label) <= 30 else label[:29] + "…"
        parts.append(f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end">{e(shown)}</text>')
        parts.append(f'<rect x="{label_w}" y="{y + 3}" width="{w}" height="{row - 6}" fill="#4a7bb7"/>')
        parts.append(f'<text x="{label_w + w + 4}" y="{y + 14}">{e(_number(value))}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.2f}"


def report_page(
    cadences: dict[str, Any], wins: dict[str, Any], decay: dict[str, Any], people: dict[str, Any]
) -> str:
    e = html.escape
    charts = []
    for cadence in cadences["cadences"]:
        bars = [(f"step {st['step']}", float(st["sent"])) for st in cadence["steps"]]
        charts.append(bar_chart(f"{cadence['cadence']}: touches sent per step", bars))
        bars = [(f"step {st['step']}", float(st["replies"] + st["meetings"])) for st in cadence["steps"]]
        charts.append(bar_chart(f"{cadence['cadence']}: replies and meetings per step", bars))
    share = wins["share_won_at_or_after_seventh"]
    charts.append(
        bar_chart(
            "Deals won by touches before the win",
            [(f"{t} touches", float(n)) for t, n in wins["distribution"].items()],
        )
    )
    owners: Counter[str] = Counter(d["owner"] or UNASSIGNED for d in decay["deals"])
    charts.append(
        bar_chart(
            f"Lost deals not touched in {decay['days']} days, by owner",
            [(o, float(n)) for o, n in sorted(owners.items())],
        )
    )
    charts.append(
        bar_chart(
            "Touches sent this week, by manager",
            [(m["owner"], float(sum(m["touches_sent"].values()))) for m in people["managers"]],
        )
    )
    charts.append(
        bar_chart(
            "Meetings booked this week, by manager",
            [(m["owner"], float(m["meetings_booked"])) for m in people["managers"]],
        )
    )
    summary = (
        f"<p>{wins['deals_won']} deals won; share won at or after the seventh touch: "
        f"{e('—' if share is None else f'{share:.0%}')}. "
        f"{decay['count']} of {decay['lost_deals']} lost deals not touched in {decay['days']} days.</p>"
    )
    return (
        "<!doctype html><html lang=en><meta charset=utf-8><title>Cadence reports</title>"
        "<style>body{font:15px/1.45 system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem}"
        "figure{margin:1.5rem 0}</style><h1>Cadence reports</h1>"
        + summary
        + "".join(f"<figure>{chart}</figure>" for chart in charts)
        + "</html>"
    )


# --- the routes ---------------------------------------------------------------------------------------------

ADMIN = ("admin",)
_FORMAT = Param("format", {"type": "string", "enum": ["json", "csv"]}, "json (the default) or csv")
_MOMENT = {"type": "string", "format": "date-time"}
OPERATIONS: list[Operation] = [
    Operation(
        "GET",
        "/reports/cadences",
        "Per cadence and step: touches sent and skipped, replies, meetings, deals won and lost after it",
        roles=ADMIN,
        params=(
            _FORMAT,
            Param("since", _MOMENT, "from this moment (ISO date-time with an offset)"),
            Param("until", _MOMENT, "up to this moment, not included"),
        ),
        answer={"type": "object"},
        errors=(422,),
    ),
    Operation(
        "GET",
        "/reports/touches-to-win",
        "How many sent touches won deals had before the win, and the share won at or after the seventh",
        roles=ADMIN,
        params=(_FORMAT,),
        answer={"type": "object"},
        errors=(422,),
    ),
    Operation(
        "GET",
        "/reports/base-decay",
        "Lost deals not touched in the last N days",
        roles=ADMIN,
        params=(
            Param(
                "days", {"type": "integer", "minimum": 1, "maximum": MAX_DAYS}, "days without a touch (30)"
            ),
            _FORMAT,
        ),
        answer={"type": "object"},
        errors=(422,),
    ),
    Operation(
        "GET",
        "/reports/team",
        "Per manager: calls due, done and overdue on the day; meetings booked and touches sent that week",
        roles=ADMIN,
        params=(
            Param("date", {"type": "string", "format": "date"}, "the day (default: today in `tz`)"),
            Param(
                "tz",
                {"type": "string", "minLength": 1, "maxLength": 64},
                "IANA time zone (default: the service's)",
            ),
            _FORMAT,
        ),
        answer={"type": "object"},
        errors=(422,),
    ),
    Operation(
        "GET",
        "/reports/page",
        "The reports as one HTML page with SVG bar charts",
        roles=ADMIN,
        answer={"type": "string"},
        answer_type="text/html",
    ),
]


class _Refused(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _format(params: QueryParams) -> str:
    raw = params.get("format", "json")
    if raw not in ("json", "csv"):
        raise _Refused("format", "format is one of json, csv")
    return raw


def _moment(params: QueryParams, name: str) -> datetime | None:
    raw = params.get(name)
    if not raw:
        return None
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise _Refused(name, f"{name} is an ISO date-time with an offset")
    return moment


def _days(params: QueryParams) -> int:
    raw = params.get("days", "30")
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_DAYS:
        raise _Refused("days", f"days is a whole number from 1 to {MAX_DAYS}")
    return int(raw)


def _zone(params: QueryParams, default: str) -> ZoneInfo:
    raw = params.get("tz") or default
    try:
        if len(raw) > 64 or "\x00" in raw:
            raise ValueError(raw)
        return ZoneInfo(raw)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise _Refused("tz", "tz is an IANA time zone such as Europe/Moscow") from None


def _day(params: QueryParams, default: date) -> date:
    raw = params.get("date")
    try:
        day = date.fromisoformat(raw) if raw else default
    except ValueError:
        raise _Refused("date", "date is YYYY-MM-DD") from None
    if not date(1900, 1, 1) <= day <= date(9998, 12, 31):
        raise _Refused("date", "date is from 1900-01-01 to 9998-12-31")
    return day


def _json(content: Any) -> Response:
    def default(value: Any) -> Any:
        if isinstance(value, datetime | date):
            return value.isoformat()
        raise TypeError(type(value).__name__)

    body = json.dumps(content, default=default, ensure_ascii=False)
    return Response(body, media_type="application/json")


def _answer(
    figures: dict[str, Any], form: str, to_csv: Callable[[dict[str, Any]], str], name: str
) -> Response:
    if form == "csv":
        return Response(
            to_csv(figures),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{name}.csv"'},
        )
    return _json(figures)


def routes(service: Service) -> list[Route]:
    from cadence.api import _unauthorised, error

    settings = service.settings

    def caller(request: Request) -> keys.Principal | Response:
        with store.session(service.db) as s:
            found = keys.authenticate(s, settings.admin_token, request.headers.get("authorization"))
        return _unauthorised(found) if isinstance(found, str) else found

    def guard(
        op: Operation, handler: Callable[[QueryParams], Response]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            who = await run_in_threadpool(caller, request)
            if isinstance(who, Response):
                return who
            if not who.may(*op.roles):
                return error(
                    403, "forbidden", f"a {who.role} key may not {op.method} {op.path}", "Authorization"
                )
            try:
                return await run_in_threadpool(handler, request.query_params)
            except _Refused as exc:
                return error(422, "invalid", str(exc), exc.field)

        return endpoint

    def cadences(params: QueryParams) -> Response:
        form, since, until = _format(params), _moment(params, "since"), _moment(params, "until")
        with store.session(service.db) as s:
            return _answer(cadence_figures(s, since, until), form, cadence_csv, "cadences")

    def wins(params: QueryParams) -> Response:
        form = _format(params)
        with store.session(service.db) as s:
            return _answer(touches_to_win(s), form, touches_csv, "touches-to-win")

    def decay(params: QueryParams) -> Response:
        days, form = _days(params), _format(params)
        with store.session(service.db) as s:
            return _answer(base_decay(s, service.clock(), days), form, decay_csv, "base-decay")

    def people(params: QueryParams) -> Response:
        zone = _zone(params, settings.default_timezone)
        day, form = _day(params, service.clock().astimezone(zone).date()), _format(params)
        with store.session(service.db) as s:
            return _answer(team(s, day, zone), form, team_csv, "team")

    def report(params: QueryParams) -> Response:
        zone = ZoneInfo(settings.default_timezone)
        now = service.clock()
        with store.session(service.db) as s:
            text = report_page(
                cadence_figures(s),
                touches_to_win(s),
                base_decay(s, now, 30),
                team(s, now.astimezone(zone).date(), zone),
            )
        return HTMLResponse(text)

    handlers: dict[str, Callable[[QueryParams], Response]] = {
        "/reports/cadences": cadences,
        "/reports/touches-to-win": wins,
        "/reports/base-decay": decay,
        "/reports/team": people,
        "/reports/page": report,
    }
    return [Route(op.path, guard(op, handlers[op.path]), methods=[op.method]) for op in OPERATIONS]
