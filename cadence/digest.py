"""The morning digest: at 08:00 in each manager's own time zone, an email with the day's call list.

Managers come from a team file (TEAM_FILE, `team.yaml`): name, email, time zone. A digest is sent at most
once per manager and local day, however many schedulers run: each claims the (manager, day) row first, and
the database's unique key lets one of them have it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import jinja2
import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import Session, col, select

from cadence import store
from cadence.clock import Clock
from cadence.errors import RulesError
from cadence.language import ClockTime, TimeZone
from cadence.models import CallTask, Digest
from cadence.settings import Settings
from cadence.validation import validate
from channels import Channel, DeliveryError, Message

log = logging.getLogger(__name__)

#: How long after its hour a digest may still go out (a scheduler that was down at 08:00).
LATE = timedelta(hours=4)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Manager(_Model):
    email: str = Field(pattern=r"^[^@\s]+@[^@\s]+$", description="Where the digest goes.")
    timezone: TimeZone = Field(description="The manager's IANA time zone, e.g. Europe/Moscow.")
    name: str = Field(default="", description="How the digest greets them.")
    digest_at: ClockTime = Field(default=time(8), description='Local time of the digest, "HH:MM".')


class Team(_Model):
    managers: dict[str, Manager] = Field(
        default_factory=dict, description="Managers by the name deals carry as `owner`."
    )


def parse_team(text: str, file: str) -> Team:
    team, _ = validate(text, file, Team, "a mapping with `managers:`")
    return team


@dataclass
class _Cached:
    mtime: float
    team: Team


_PAGE = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
_TEXT = jinja2.Environment(autoescape=False, undefined=jinja2.StrictUndefined)
_HTML_BODY = _PAGE.from_string(
    """<p>Good morning{% if name %}, {{ name }}{% endif %}. {{ tasks|length }} call(s) for {{ day }}:</p>
<ol>{% for t in tasks %}<li>{% if t.overdue %}<strong>overdue</strong> · {% endif %}
<strong>{{ t.contact }}</strong> {% if t.phone %}({{ t.phone }}){% endif %}: {{ t.reason }}</li>
{% endfor %}</ol>"""
)
_TEXT_BODY = _TEXT.from_string(
    """Good morning{% if name %}, {{ name }}{% endif %}. {{ tasks|length }} call(s) for {{ day }}:
{% for t in tasks %}
{{ loop.index }}. {% if t.overdue %}[overdue] {% endif %}{{ t.contact }}
{%- if t.phone %} ({{ t.phone }}){% endif %}: {{ t.reason }}
{%- endfor %}
"""
)


def call_list(s: Session, owner: str, day: date) -> list[dict[str, Any]]:
    """A manager's open calls for `day`: overdue ones first, then by priority."""
    tasks = s.exec(
        select(CallTask).where(
            CallTask.owner == owner, CallTask.status == "open", col(CallTask.due_date) <= day
        )
    ).all()
    ordered = sorted(tasks, key=lambda t: (t.due_date >= day, -t.priority, t.due_at))
    return [
        {
            "id": t.id,
            "overdue": t.due_date < day,
            "contact": t.contact_name or "",
            "phone": t.phone,
            "reason": t.reason,
        }
        for t in ordered
    ]


class Digests:
    def __init__(self, db: sa.Engine, settings: Settings, email: Channel, clock: Clock) -> None:
        self.db = db
        self.settings = settings
        self.email = email
        self.clock = clock
        self._cached: _Cached | None = None

    def team(self) -> Team:
        """The team file, read again when it changes; a broken one keeps the last good one (and is logged)."""
        path = Path(self.settings.team_file)
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return self._cached.team if self._cached else Team()
        if self._cached is None or self._cached.mtime != mtime:
            try:
                team = parse_team(path.read_text(encoding="utf-8"), str(path))
            except (RulesError, OSError, UnicodeDecodeError) as exc:
                log.error("team file has errors; digests use the last good one", extra={"error": str(exc)})
                self._cached = _Cached(mtime, self._cached.team if self._cached else Team())
            else:
                self._cached = _Cached(mtime, team)
        return self._cached.team

    def send_due(self) -> list[str]:
        """Send each manager's digest whose local hour has come and that no one has sent today."""
        sent = []
        now = self.clock()
        for owner, manager in self.team().managers.items():
            local = now.astimezone(ZoneInfo(manager.timezone))
            day = local.date()
            starts = datetime.combine(day, manager.digest_at, tzinfo=local.tzinfo)
            if not starts <= local < starts + LATE:
                continue  # not yet; or so late in the day (the service was down) that the list is stale
            if not self._claim(owner, day, now):
                continue
            try:
                self._send(owner, manager, day, now)
            except DeliveryError as exc:
                log.warning("digest not sent; will try again", extra={"owner": owner, "error": str(exc)})
                self._release(owner, day)
                continue
            sent.append(owner)
        return sent

    def _claim(self, owner: str, day: date, now: datetime) -> bool:
        try:
            with store.session(self.db) as s:
                s.add(Digest(owner=owner, local_date=day, created_at=now))
        except sa.exc.IntegrityError:
            return False
        return True

    def _release(self, owner: str, day: date) -> None:
        with store.session(self.db) as s:
            row = s.exec(select(Digest).where(Digest.owner == owner, Digest.local_date == day)).first()
            if row is not None:
                s.delete(row)

    def _send(self, owner: str, manager: Manager, day: date, now: datetime) -> None:
        with store.session(self.db) as s:
            tasks = call_list(s, owner, day)
        values = {"name": manager.name, "day": day.isoformat(), "tasks": tasks}
        message = Message(
            key=f"digest-{owner}-{day.isoformat()}",
            touch_id=0,
            channel="email",
            contact={"name": manager.name or owner, "email": manager.email},
            deal=None,
            reason="the morning digest",
            due_at=now,
            local_date=day,
            parts={
                "subject": f"Your calls for {day.isoformat()}: {len(tasks)}",
                "text": _TEXT_BODY.render(values),
                "html": _HTML_BODY.render(values),
            },
            sender=self.settings.sender(),
        )
        self.email.send(message)
        with store.session(self.db) as s:
            row = s.exec(select(Digest).where(Digest.owner == owner, Digest.local_date == day)).one()
            row.sent_at = self.clock()
