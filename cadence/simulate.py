"""A cadence's timeline for one contact before anyone is enrolled: zones, holidays, windows, conditions."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cadence import sandbox, timing
from cadence.engine import contact_view_from
from cadence.language import CadenceSpec


@dataclass(frozen=True)
class Row:
    step: int
    day: int
    due_at: datetime
    local: datetime
    channel: str
    template: str
    reason: str
    sent: bool
    note: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "day": self.day,
            "due_at": self.due_at.isoformat(),
            "local": self.local.isoformat(),
            "channel": self.channel,
            "template": self.template,
            "reason": self.reason,
            "sent": self.sent,
            "note": self.note,
        }


def simulate(
    spec: CadenceSpec,
    start: datetime,
    contact: dict[str, Any],
    deal: dict[str, Any] | None,
    default_timezone: str,
) -> list[Row]:
    """Each step's due time in the contact's zone, and whether its condition lets it through."""
    zone, calendar = timing.placement(
        spec.calendar, contact.get("timezone"), contact.get("country"), default_timezone
    )
    context = {"contact": contact_view_from(contact), "deal": deal, "enrollment": {"cadence": spec.cadence}}
    rows = []
    for index, step in enumerate(spec.steps):
        due = timing.due_at(start, step.day, timing.for_step(calendar, step.window, None), zone, step.at)
        skipped = sandbox.skip_reason(step.when, step.skip_when, context)
        sent, note = skipped is None, f"skipped: {skipped}" if skipped else ""
        rows.append(
            Row(
                index,
                step.day,
                due,
                due.astimezone(zone),
                step.channel,
                step.template,
                step.reason,
                sent,
                note,
            )
        )
    return rows
