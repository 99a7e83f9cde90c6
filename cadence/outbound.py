"""Posting activity back: each touch sent and each outcome recorded, as signed JSON to OUTBOUND_URL.

An activity row is written in the same transaction as what it reports; the scheduler posts pending rows and
tries again with growing pauses until the receiver answers 2xx. Each post carries its own `id`, so a
receiver that sees one twice (a post answered too late) can tell.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timedelta
from typing import Any

import httpx
import sqlalchemy as sa
from sqlmodel import Session, col, select

from cadence import store
from cadence.clock import Clock
from cadence.models import Activity, Contact, Deal, Enrollment, Outcome, Touch
from cadence.settings import Settings

log = logging.getLogger(__name__)

#: Rows claimed per pass.
BATCH = 50
#: How long a claimed row waits before another pass may take it (a poster that died mid-way).
CLAIM = timedelta(minutes=2)
#: The longest pause between tries.
MOST_PAUSE = timedelta(hours=1)


def _refs(s: Session, enrollment_id: int | None) -> dict[str, Any]:
    if enrollment_id is None:
        return {"enrollment": None, "contact": None, "deal": None}
    enrollment = s.get_one(Enrollment, enrollment_id)
    contact = s.get_one(Contact, enrollment.contact_id)
    deal = s.get(Deal, enrollment.deal_id) if enrollment.deal_id else None
    return {
        "enrollment": {"id": enrollment.id, "cadence": enrollment.cadence_name, "status": enrollment.status},
        "contact": {"id": contact.id, "source": contact.source, "external_id": contact.external_id},
        "deal": None
        if deal is None
        else {"id": deal.id, "source": deal.source, "external_id": deal.external_id},
    }


def _keep(s: Session, kind: str, record: dict[str, Any], enrollment_id: int | None, now: datetime) -> None:
    s.add(
        Activity(
            kind=kind,
            payload={**record, **_refs(s, enrollment_id)},
            created_at=now,
            next_try_at=now,
        )
    )


def touch_sent(s: Session, touch: Touch, now: datetime) -> None:
    """Keep a sent touch to be posted."""
    record = {
        "id": touch.id,
        "key": touch.key,
        "channel": touch.channel,
        "template": touch.template,
        "variant": touch.variant,
        "reason": touch.reason,
        "sent_at": now.isoformat(),
    }
    _keep(s, "touch.sent", {"touch": record}, touch.enrollment_id, now)


def outcome_recorded(s: Session, outcome: Outcome, now: datetime) -> None:
    """Keep a recorded outcome to be posted."""
    record = {
        "id": outcome.id,
        "name": outcome.name,
        "touch_id": outcome.touch_id,
        "note": outcome.note,
        "source": outcome.source,
        "occurred_at": outcome.occurred_at.isoformat(),
    }
    _keep(s, "outcome.recorded", {"outcome": record}, outcome.enrollment_id, now)


def signature(secret: str, body: bytes, stamp: int) -> str:
    """X-Cadence-Signature, the same scheme Cadence checks on its own webhook."""
    from cadence.api import sign

    return sign(secret, body, stamp)


class Poster:
    def __init__(self, db: sa.Engine, settings: Settings, clock: Clock) -> None:
        self.db = db
        self.settings = settings
        self.clock = clock

    def post_pending(self) -> list[int]:
        """Post what is due; returns the ids the receiver took."""
        url = self.settings.outbound_url
        if not url:
            return []
        now = self.clock()
        with store.session(self.db) as s:
            rows = s.exec(
                select(Activity)
                .where(col(Activity.posted_at).is_(None), col(Activity.next_try_at) <= now)
                .order_by(col(Activity.id))
                .limit(BATCH)
                .with_for_update(skip_locked=True)
            ).all()
            claimed = [(row.id or 0, row.kind, dict(row.payload), row.created_at) for row in rows]
            for row in rows:
                row.next_try_at = now + CLAIM
        posted = []
        for row_id, kind, payload, created in claimed:
            error = self._post(
                url, {"id": f"activity-{row_id}", "type": kind, "at": created.isoformat(), **payload}
            )
            with store.session(self.db) as s:
                row = s.get_one(Activity, row_id)
                row.attempts += 1
                if error is None:
                    row.posted_at, row.last_error = self.clock(), None
                    posted.append(row_id)
                else:
                    pause = min(timedelta(seconds=10 * 2 ** min(row.attempts, 12)), MOST_PAUSE)
                    row.next_try_at, row.last_error = self.clock() + pause, error
                    log.warning("posting activity failed", extra={"activity": row_id, "error": error})
        return posted

    def _post(self, url: str, document: dict[str, Any]) -> str | None:
        body = json.dumps(document, ensure_ascii=False, default=str).encode()
        headers = {"content-type": "application/json"}
        if self.settings.outbound_secret:
            headers["X-Cadence-Signature"] = signature(self.settings.outbound_secret, body, int(time.time()))
        try:
            response = httpx.post(
                url, content=body, headers=headers, timeout=self.settings.outbound_timeout_seconds
            )
        except httpx.HTTPError as exc:
            return f"{exc.__class__.__name__}: {exc}"
        if response.is_success:
            return None
        return f"answered {response.status_code}: {response.text[:200]}"
