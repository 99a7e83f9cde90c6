"""Calls: a person makes them. Sending a call touch creates a call task with the script and the reason."""

from __future__ import annotations

from typing import ClassVar

import sqlalchemy as sa
from sqlmodel import select

from cadence import store
from cadence.clock import Clock
from cadence.models import CallTask
from channels import Channel, Message, Receipt


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
