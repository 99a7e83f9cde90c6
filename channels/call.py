"""Calls: a person makes them. Sending a call touch creates a call task with the script and the reason."""

from __future__ import annotations

from typing import Any, ClassVar

import markdown
import sqlalchemy as sa
from sqlmodel import Session, col, select

from cadence import store
from cadence.clock import Clock
from cadence.models import CallTask, Deal, Enrollment, Outcome, Touch, TouchStatus
from channels import Channel, Message, Receipt

#: Earlier touches and outcomes a call task shows, newest first.
HISTORY = 20


def script_html(script: str) -> str:
    """The call script's Markdown as HTML. Any HTML in it (a CRM field with markup) is shown as text."""
    return markdown.markdown(script.replace("&", "&amp;").replace("<", "&lt;"), extensions=["sane_lists"])


def history(s: Session, contact_id: int, before_touch: int | None = None) -> list[dict[str, Any]]:
    """What already happened with the contact, across cadences, newest first: touches and outcomes."""
    touches = s.exec(
        select(Touch, Enrollment.cadence_name)
        .join(Enrollment, col(Enrollment.id) == col(Touch.enrollment_id))
        .where(
            Enrollment.contact_id == contact_id,
            col(Touch.status).in_([TouchStatus.sent, TouchStatus.skipped, TouchStatus.failed]),
            col(Touch.finished_at).is_not(None),
            col(Touch.id) != (before_touch or 0),
        )
        .order_by(col(Touch.finished_at).desc())
        .limit(HISTORY)
    ).all()
    outcomes = s.exec(
        select(Outcome)
        .where(Outcome.contact_id == contact_id)
        .order_by(col(Outcome.occurred_at).desc())
        .limit(HISTORY)
    ).all()
    items: list[dict[str, Any]] = [
        {
            "at": touch.finished_at,
            "kind": "touch",
            "cadence": cadence,
            "channel": touch.channel,
            "status": touch.status,
            "reason": touch.reason,
            "note": touch.status_reason,
        }
        for touch, cadence in touches
    ]
    items += [
        {"at": o.occurred_at, "kind": "outcome", "outcome": o.name, "touch_id": o.touch_id, "note": o.note}
        for o in outcomes
    ]
    return sorted(items, key=lambda item: item["at"], reverse=True)[:HISTORY]


def task_view(s: Session, task: CallTask) -> dict[str, Any]:
    """A call task as a person works it: the script as HTML, the deal, and the history before it."""
    deal = s.get(Deal, task.deal_id) if task.deal_id else None
    return {
        **task.model_dump(),
        "script_html": script_html(task.script),
        "deal": None
        if deal is None
        else {
            "id": deal.id,
            "title": deal.title,
            "stage": deal.stage,
            "status": deal.status,
            "amount": deal.amount,
            "currency": deal.currency,
            "probability": deal.probability,
        },
        "history": history(s, task.contact_id, task.touch_id),
    }


class CallTasks(Channel):
    """Stores the call task in the database; one task per touch, however often it is sent."""

    name: ClassVar[str] = "call"
    requires: ClassVar[str | None] = "phone"
    idempotent: ClassVar[bool] = True

    def __init__(self, engine: sa.Engine, clock: Clock) -> None:
        self.engine = engine
        self.clock = clock

    def send(self, message: Message) -> Receipt:
        with store.session(self.engine) as s:
            task = s.exec(select(CallTask).where(CallTask.touch_id == message.touch_id)).first()
            if task is None:
                deal = message.deal or {}
                task = CallTask(
                    touch_id=message.touch_id,
                    owner=deal.get("owner"),
                    due_date=message.local_date,
                    due_at=message.due_at,
                    contact_id=message.contact["id"],
                    deal_id=deal.get("id"),
                    contact_name=message.contact.get("name"),
                    phone=message.contact["phone"],
                    reason=message.reason,
                    script=message.parts["script"],
                    priority=message.priority,
                    created_at=self.clock(),
                )
                s.add(task)
                s.flush()
            return Receipt("call-task", f"call_task:{task.id}")
