"""Calls: a person makes them. Sending a call touch creates a call task with the script and the reason."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any, ClassVar

import cmarkgfm
import sqlalchemy as sa
from sqlmodel import Session, col, select

from cadence import store
from cadence.clock import Clock
from cadence.models import CallTask, Deal, Enrollment, Outcome, Touch, TouchStatus
from channels import Channel, Message, Receipt

#: Earlier touches and outcomes a call task shows, newest first.
HISTORY = 20


def script_html(script: str) -> str:
    """The call script's Markdown (CommonMark) as HTML. Any HTML in it (a CRM field with markup) is shown as
    text, and links to `javascript:` and the like are left out."""
    # cmark's default, safe mode already drops raw HTML and unsafe links; escaping first shows the markup.
    html: str = cmarkgfm.markdown_to_html(script.replace("&", "&amp;").replace("<", "&lt;"))
    return html


def following(order: Sequence[Any], values: Sequence[Any]) -> Any:
    """The condition for the rows that come after a row in `order` (ORDER BY terms, ascending or `.desc()`),
    `values` being that row's values of the same terms: a page of a list follows the row it ended with, so
    rows done or added meanwhile do not make the next page skip or repeat any."""
    columns = [(term.element, True) if _descending(term) else (term, False) for term in order]
    either = []
    for n, (column, descending) in enumerate(columns):
        same = [columns[m][0] == values[m] for m in range(n)]
        beyond = column < values[n] if descending else column > values[n]
        either.append(sa.and_(*same, beyond))
    return sa.or_(*either)


def _descending(term: Any) -> bool:
    return getattr(term, "modifier", None) is sa.sql.operators.desc_op


def _latest(partition: Any, order: Any) -> Any:
    return sa.func.row_number().over(partition_by=partition, order_by=order).label("n")


def histories(s: Session, tasks: Sequence[CallTask]) -> dict[int, list[dict[str, Any]]]:
    """What already happened with each task's contact, across cadences, newest first: touches and outcomes
    (the task's own touch left out). Two queries, however many tasks."""
    contacts = Counter(t.contact_id for t in tasks)
    if not contacts:
        return {}
    done = col(Touch.status).in_([TouchStatus.sent, TouchStatus.skipped, TouchStatus.failed])
    # Done touches are ranked apart and told by a column, not a filter on status: that would lead the
    # database to walk every sent touch by the status index instead of these contacts' few.
    ranked_touches = (
        select(
            col(Touch.id),
            done.label("done"),
            _latest((Enrollment.contact_id, done), col(Touch.finished_at).desc()),
        )
        .join(Enrollment, col(Enrollment.id) == col(Touch.enrollment_id))
        .where(col(Enrollment.contact_id).in_(contacts), col(Touch.finished_at).is_not(None))
        .subquery()
    )
    # A contact's own tasks in the list are each left out of its history: take that many more.
    # Columns, not ORM objects: a list reads about twenty rows a task, and an object apiece cost most of it.
    touches = s.exec(
        select(  # type: ignore[call-overload]
            col(Touch.id),
            col(Touch.finished_at),
            col(Touch.channel),
            col(Touch.status),
            col(Touch.reason),
            col(Touch.status_reason),
            col(Enrollment.cadence_name),
            col(Enrollment.contact_id),
        )
        .join(ranked_touches, ranked_touches.c.id == col(Touch.id))
        .join(Enrollment, col(Enrollment.id) == col(Touch.enrollment_id))
        .where(ranked_touches.c.done, ranked_touches.c.n <= HISTORY + max(contacts.values()))
        .order_by(col(Touch.finished_at).desc())
    ).all()
    ranked_outcomes = (
        select(col(Outcome.id), _latest(Outcome.contact_id, col(Outcome.occurred_at).desc()))
        .where(col(Outcome.contact_id).in_(contacts))
        .subquery()
    )
    outcomes = s.exec(
        select(  # type: ignore[call-overload]
            col(Outcome.occurred_at),
            col(Outcome.name),
            col(Outcome.touch_id),
            col(Outcome.note),
            col(Outcome.contact_id),
        )
        .join(ranked_outcomes, ranked_outcomes.c.id == col(Outcome.id))
        .where(ranked_outcomes.c.n <= HISTORY)
    ).all()
    done_by: dict[int, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for touch_id, finished, channel, status, reason, note, cadence, contact in touches:
        sent: dict[str, Any] = {
            "at": finished,
            "kind": "touch",
            "cadence": cadence,
            "channel": channel,
            "status": status,
            "reason": reason,
            "note": note,
        }
        done_by[contact].append((touch_id, sent))
    heard_by: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for occurred, name, about, said, contact in outcomes:
        heard: dict[str, Any] = {
            "at": occurred,
            "kind": "outcome",
            "outcome": name,
            "touch_id": about,
            "note": said,
        }
        heard_by[contact or 0].append(heard)
    found: dict[int, list[dict[str, Any]]] = {}
    for task in tasks:
        earlier = [item for touch_id, item in done_by[task.contact_id] if touch_id != task.touch_id][:HISTORY]
        items = earlier + heard_by[task.contact_id]
        found[task.id or 0] = sorted(items, key=lambda item: item["at"], reverse=True)[:HISTORY]
    return found


def task_views(s: Session, tasks: Sequence[CallTask]) -> list[dict[str, Any]]:
    """Call tasks as a person works them: the script as HTML, the deal, and the history before each."""
    wanted = {t.deal_id for t in tasks if t.deal_id}
    deals = {d.id: d for d in s.exec(select(Deal).where(col(Deal.id).in_(wanted)))} if wanted else {}
    found = histories(s, tasks)
    views = []
    for task in tasks:
        deal = deals.get(task.deal_id)
        views.append(
            {
                **task.model_dump(),
                "script_html": task.script_html if task.script_html is not None else script_html(task.script),
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
                "history": found[task.id or 0],
            }
        )
    return views


class CallTasks(Channel):
    """Stores the call task in the database; one task per touch, however often it is sent."""

    name: ClassVar[str] = "call"
    requires: ClassVar[str | None] = "phone"
    idempotent: ClassVar[bool] = True
    batchable: ClassVar[bool] = True
    in_database: ClassVar[bool] = True

    def __init__(self, engine: sa.Engine, clock: Clock) -> None:
        self.engine = engine
        self.clock = clock

    def send(self, message: Message) -> Receipt:
        with store.session(self.engine) as s:
            return self.send_in(s, message)

    def send_in(self, s: Session, message: Message) -> Receipt:
        return self.send_all_in(s, [message])[0]

    def send_all_in(self, s: Session, messages: Sequence[Message]) -> list[Receipt]:
        """The messages' call tasks, made by one statement; a touch sent before keeps the task it has."""
        tasks = [self._task(message) for message in messages]
        store.insert_all_unless_taken(s, tasks, ("touch_id",), attach=False)
        ids = {task.touch_id: task.id or 0 for task in tasks if task.id is not None}
        if missing := [task.touch_id for task in tasks if task.id is None]:
            found = s.exec(select(CallTask.touch_id, CallTask.id).where(col(CallTask.touch_id).in_(missing)))
            ids.update((touch_id, task_id or 0) for touch_id, task_id in found)
        return [Receipt("call-task", f"call_task:{ids[message.touch_id]}") for message in messages]

    def _task(self, message: Message) -> CallTask:
        deal = message.deal or {}
        return store.new_row(
            CallTask,
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
            script_html=script_html(message.parts["script"]),
            priority=message.priority,
            created_at=self.clock(),
        )
