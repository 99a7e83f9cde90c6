"""Sending one touch: claim it, re-check the rules at send time, render, send, record, plan the next step.

A touch moves queued -> sending by a conditional update; whoever wins that update is the only sender, so a
message delivered twice sends once.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

import jinja2
import sqlalchemy as sa
from sqlalchemy.orm.attributes import set_committed_value
from sqlmodel import Session, col, select

from cadence import outbound, sandbox, store, timing
from cadence.clock import Clock
from cadence.engine import Engine, touch_view
from cadence.language import Calendar, Touchpoint
from cadence.metrics import Metrics
from cadence.models import (
    TOUCH_KEY,
    Block,
    CadenceVersion,
    Contact,
    Deal,
    Enrollment,
    EnrollmentStatus,
    Touch,
    TouchStatus,
)
from cadence.policy import Caps
from channels import Channel, DeliveryError, Message, RateLimited, Receipt, TransientError

log = logging.getLogger(__name__)

#: Sends tried (counting retries after transient errors) before a touch is marked failed.
MAX_ATTEMPTS = 5
#: Tries at recording a delivery that already happened.
RECORD_ATTEMPTS = 5
#: Seconds between those tries, times the try's number.
RECORD_BACKOFF_SECONDS = 0.5
#: Touches one worker message from the scheduler carries (see `Dispatcher.dispatch_many`).
BATCH_SIZE = 32


class _Loaded(NamedTuple):
    """A touch and the rows sending it reads. The session keeps a row only while something refers to it,
    so whoever holds this lets the engine find them all in the session instead of asking the database."""

    touch: Touch
    enrollment: Enrollment
    contact: Contact
    deal: Deal | None
    #: Whether the contact has a block not lifted (it may have run out): only then are blocks looked at.
    may_be_blocked: bool
    #: The enrollment's cadence version, read with a touch sent alone. A batch leaves it to
    #: `Engine.spec_of`, which reads it once for the batch: in each of its rows, the version's whole text
    #: would be sent and decoded again.
    version: CadenceVersion | None = None


def _load_statement(touches: Any, *, version: bool) -> Any:
    """The touches chosen by the condition `touches`, each with its rows, and its cadence version if asked
    for; see `_load`."""
    open_block = (
        sa.exists()
        .where(col(Block.contact_id) == col(Contact.id), col(Block.lifted_at).is_(None))
        .label("may_be_blocked")
    )
    query = (
        select(Touch, Enrollment, Contact, Deal, open_block)  # type: ignore[call-overload]
        .join(Enrollment, col(Enrollment.id) == col(Touch.enrollment_id))
        .join(Contact, col(Contact.id) == col(Enrollment.contact_id))
        .outerjoin(Deal, col(Deal.id) == col(Enrollment.deal_id))
        .where(touches)
    )
    if version:
        query = query.add_columns(CadenceVersion).join(
            CadenceVersion, col(CadenceVersion.id) == col(Enrollment.cadence_version_id)
        )
    return query


#: Made once, as building a statement costs about as much as running it: without a lock, and holding the
#: contact's row; for one touch, and for several.
_LOAD = _load_statement(col(Touch.id) == sa.bindparam("touch_id"), version=True)
_LOAD_LOCKING_CONTACT = _LOAD.with_for_update(of=Contact)
# In the contacts' order, so two batches that share contacts lock them in the same order (PostgreSQL locks
# rows as the sort gives them) and one waits for the other instead of both deadlocking.
_LOAD_MANY = _load_statement(
    col(Touch.id).in_(sa.bindparam("touch_ids", expanding=True)), version=False
).order_by(col(Contact.id), col(Touch.id))
_LOAD_MANY_LOCKING_CONTACT = _LOAD_MANY.with_for_update(of=Contact)


def _load(s: Session, touch_id: int, *, lock_contact: bool = False) -> _Loaded:
    """The touch, its enrollment, contact, deal and cadence version, and whether the contact may be
    blocked, in one query.

    `lock_contact` holds the contact's row until the transaction ends (PostgreSQL; SQLite has one writer).
    """
    query = _LOAD_LOCKING_CONTACT if lock_contact else _LOAD
    row = s.exec(query, params={"touch_id": touch_id}).first()
    if row is None:
        s.get_one(Touch, touch_id)  # raises, naming the touch
    return _Loaded(*row)


def _load_many(s: Session, touch_ids: Sequence[int], *, lock_contact: bool = False) -> dict[int, _Loaded]:
    """`_load` for several touches in one query, by id, without their cadence versions; a touch that does
    not exist is left out."""
    query = _LOAD_MANY_LOCKING_CONTACT if lock_contact else _LOAD_MANY
    rows = s.exec(query, params={"touch_ids": list(touch_ids)}).all()
    return {row[0].id: _Loaded(*row) for row in rows}


#: Days back the caps look at a contact's touches: a week, and a day for the time zones.
CAPS_LOOK_BACK_DAYS = 8
#: Why a touch was not claimed.
_NOT_QUEUED = "not queued: already sent, being sent, or cancelled"
#: For the caps, by contact: its touches let go by their send-time checks, (touch id, when).
_Cleared = dict[int, list[tuple[int, datetime | None]]]

#: Queued to sending, by whoever updates it first; the others find it no longer queued; the ids it took.
#: Made once.
_CLAIM_ALL = (
    sa.update(Touch)
    .where(
        col(Touch.id).in_(sa.bindparam("ids", expanding=True)), col(Touch.status) == sa.bindparam("queued")
    )
    .values(
        status=TouchStatus.sending,
        sending_at=sa.bindparam("sending_at"),
        # Let go by its checks, unless they find otherwise (`_check` clears it then): set here, it costs
        # no update of its own. It is seen only once the transaction that checks the touch commits.
        cleared_at=sa.bindparam("sending_at"),
        attempts=Touch.attempts + 1,
    )
    .returning(col(Touch.id))
)

#: A batch's touches as they are now, locked until its transaction ends (PostgreSQL; on SQLite that
#: transaction holds the only write lock already). Made once.
_LOCK_ALL = (
    select(Touch.id, Touch.status, Touch.attempts)
    .where(col(Touch.id).in_(sa.bindparam("ids", expanding=True)))
    .order_by(col(Touch.id))
    .with_for_update()
)

#: A claim's fields, written with the rest of a batch's changes to the touch (see `Dispatcher._take_all`).
_CLAIM_FIELDS = ("status", "sending_at", "cleared_at", "attempts")


def _note_claim(touch: Touch, now: datetime) -> None:
    """Note in the session what a claim at `now` wrote (`_CLAIM_ALL`), or will write (`_CLAIM_FIELDS`)."""
    set_committed_value(touch, "status", TouchStatus.sending)
    set_committed_value(touch, "sending_at", now)
    set_committed_value(touch, "cleared_at", now)
    set_committed_value(touch, "attempts", touch.attempts + 1)


#: A touch let go by its send-time checks is being sent or was sent; one that failed later keeps its
#: `cleared_at` but is not counted.
_LET_GO = (TouchStatus.sending, TouchStatus.sent)

#: When the contacts' touches cleared since `since` were, with each touch's contact, id and status; those
#: `_LET_GO` are what the caps count (see `_read_cleared`). The status is left out of the query and applied
#: to the rows: given it, a planner without statistics (SQLite always, PostgreSQL before its first ANALYZE,
#: or with statistics from before a wave of sends) walks the (status, due_at) index through every touch
#: ever sent, instead of the contacts' few enrollments and their touches. Made once.
_CLEARED_FOR_CONTACTS = (
    select(Enrollment.contact_id, Touch.id, Touch.cleared_at, Touch.status)
    .join(Enrollment, col(Enrollment.id) == col(Touch.enrollment_id))
    .where(
        col(Enrollment.contact_id).in_(sa.bindparam("contacts", expanding=True)),
        col(Touch.cleared_at) >= sa.bindparam("since"),
    )
)


def _read_cleared(s: Session, contacts: set[int], since: datetime) -> _Cleared:
    """When each contact's touches were let go by their send-time checks since `since`, with their ids."""
    found: _Cleared = defaultdict(list)
    for contact_id, touch_id, at, status in store.select_rows(
        s, _CLEARED_FOR_CONTACTS, {"contacts": list(contacts), "since": since}
    ):
        if status in _LET_GO:
            found[contact_id].append((touch_id or 0, at))
    return found


#: The enrollment's other touches let go by their send-time checks since `since` (its budget counts them).
_SPENT_SINCE = (
    select(sa.func.count())
    .select_from(Touch)
    .where(
        Touch.enrollment_id == sa.bindparam("enrollment_id"),
        col(Touch.status).in_(_LET_GO),
        col(Touch.cleared_at) >= sa.bindparam("since"),
        col(Touch.id) != sa.bindparam("touch_id"),
    )
)


@dataclass(frozen=True)
class _Draft:
    """A touch its checks let go, with what rendering its message takes: its message without parts yet,
    and the template and context to render them from."""

    message: Message
    template: str
    context: dict[str, Any]
    #: The contact, deal and enrollment as the checks read them: what planning the next step reads too.
    facts: dict[str, Any]


class _Sent(NamedTuple):
    """A batch's delivery: its message, its receipt (None for a channel whose delivery is a row of this
    database, made when the batch is recorded), the touch's rows and its draft's facts."""

    message: Message
    receipt: Receipt | None
    loaded: _Loaded
    facts: dict[str, Any]


@dataclass(frozen=True)
class Result:
    touch_id: int
    status: str
    reason: str | None = None


class _Failed(NamedTuple):
    """A send that delivered nothing: the touch's result, and, when it is queued for another try, the error
    and the attempts it has had."""

    result: Result
    retry: DeliveryError | None = None
    attempts: int = 0


@dataclass
class Batch:
    """What `Dispatcher.dispatch_many` did with its touches."""

    #: Each touch's result, in the order given, but for those below.
    results: list[Result] = field(default_factory=list)
    #: Touches to send alone, each in a message of its own: their channel may not repeat a send safely, or
    #: reaches out over the network, or the batch ran out of time before their turn.
    alone: list[int] = field(default_factory=list)
    #: Touches queued again after a transient error, with the attempts each has had, for a delayed retry.
    retries: list[tuple[int, int]] = field(default_factory=list)

    def add(self, failed: _Failed) -> None:
        """A touch that was not delivered: its result, and its retry when it is queued for one."""
        self.results.append(failed.result)
        if failed.retry:
            self.retries.append((failed.result.touch_id, failed.attempts))


class Dispatcher:
    def __init__(
        self,
        db: sa.Engine,
        engine: Engine,
        channels: Mapping[str, Channel],
        templates: jinja2.Environment,
        sender: Mapping[str, str],
        clock: Clock,
        metrics: Metrics,
        batch_seconds: float = 5.0,
    ) -> None:
        self.db = db
        self.engine = engine
        self.channels = channels
        self.templates = templates
        self.sender = sender
        self.clock = clock
        self.metrics = metrics
        #: Seconds after its claim a batch begins no more sends: the touches still waiting are handed back
        #: to go alone, as the lease counts from the claim.
        self.batch_seconds = batch_seconds

    def dispatch(self, touch_id: int) -> Result:
        """Claim the touch, check it, send it and record it. A channel that delivers to the database does all
        of it in one transaction; any other sends between the transaction of the checks and that of the
        record, so no delivery waits on the database."""
        try:
            with store.session(self.db) as s:
                outcome, message = self.dispatch_in(s, touch_id)
        except Exception as exc:
            # Nothing was sent, and the claim went with the rest of the transaction: count the attempt and
            # give the touch back for the broker's retry, within the attempt cap.
            self._give_back(touch_id, f"error before sending: {exc!r}")
            raise
        if message is None:
            return outcome
        if outcome.status == TouchStatus.sent:
            self._sent(message)
            return outcome
        receipt = self._send(message)
        if isinstance(receipt, DeliveryError):
            with store.session(self.db) as s:
                failed = self._not_delivered(s, s.get_one(Touch, touch_id), receipt)
            if failed.retry:
                raise failed.retry  # the broker retries with backoff; the touch is queued for that retry
            return failed.result
        self._record_sent(touch_id, receipt)
        self._sent(message)
        return Result(touch_id, TouchStatus.sent)

    def dispatch_in(self, s: Session, touch_id: int) -> tuple[Result, Message | None]:
        """Claim and check the touch in the caller's transaction `s` (see `_check`). When it may go out on a
        channel that delivers to the database, it is sent and recorded in `s` too: (sent, its message). When
        it may go out on another channel: (sending, its message), for the caller to send after committing.
        Otherwise (what became of it, None)."""
        loaded = _load(s, touch_id, lock_contact=self._locks_contact())
        if not self._claim(s, loaded.touch):
            return Result(touch_id, "ignored", _NOT_QUEUED), None
        outcome, draft = self._check(s, loaded)
        if draft is None:
            return outcome, None
        try:
            message = self._render(draft)
        except sandbox.TemplateError as exc:
            return self.finish(s, loaded.touch, TouchStatus.failed, f"template: {exc}"), None
        if not self.channels[message.channel].in_database:
            return outcome, message
        receipt = self.channels[message.channel].send_in(s, message)
        self._mark_sent(s, touch_id, receipt, loaded, facts=draft.facts)
        return Result(touch_id, TouchStatus.sent), message

    def dispatch_many(
        self,
        touch_ids: Sequence[int],
        send_alone: Callable[[list[int]], None] | None = None,
        batch: Batch | None = None,
        began: float | None = None,
    ) -> Batch:
        """Send several touches in one transaction: their late checks, their sends and their records with the
        next steps planned, instead of two transactions each. What a worker does with a batch from the
        scheduler.

        Only touches whose channel is `batchable` go through the batch: idempotent, and quick because the send
        stays on this machine (a file, a row), so it may run inside the transaction. Should the transaction
        roll back after a send, nothing of the batch is recorded: each touch is sent again alone, which writes
        the same file (by its key) once more. The others are left queued and listed in `alone`, as are those
        whose turn comes `batch_seconds` after the batch began (at `began`, a `time.monotonic()` reading, when
        its message waited for a turn before this; else now); `send_alone`, if given, gets each lot as soon
        as it is known, to give each touch a message of its own. An error rolls back the whole batch and is
        raised: the caller then gives each touch a message of its own. `batch` (a new one unless given)
        gets the results, and keeps the touches to go alone and those to retry after a pause when an error
        is raised, for a caller that catches it.
        """
        batch = batch if batch is not None else Batch()
        began = time.monotonic() if began is None else began
        late: list[int] = []
        sent: list[_Sent] = []
        try:
            with store.session(self.db) as s:
                rows = _load_many(s, touch_ids, lock_contact=self._locks_contact())
                together: list[_Loaded] = []
                for touch_id in touch_ids:
                    loaded = rows.get(touch_id) or _load(s, touch_id)  # a touch not found raises, by its id
                    if loaded.touch.status == TouchStatus.queued and not self._batchable(s, loaded):
                        batch.alone.append(touch_id)
                    else:
                        together.append(loaded)
                self._let_go(batch.alone, send_alone)
                claimed = self._take_all(s, [loaded.touch for loaded in together])
                contacts = {loaded.enrollment.contact_id for loaded in together}
                cleared = self._cleared_for_contacts(s, contacts)
                spent: Counter[int] = Counter()  # for the budgets: touches let go so far, by enrollment
                for loaded in together:
                    touch = loaded.touch
                    if touch.id not in claimed:
                        batch.results.append(Result(touch.id or 0, "ignored", _NOT_QUEUED))
                        continue
                    if time.monotonic() - began > self.batch_seconds:
                        self._unclaim(touch)
                        late.append(touch.id or 0)
                        continue
                    outcome, draft = self._check(s, loaded, cleared, spent)
                    if draft is None:
                        batch.results.append(outcome)
                        continue
                    delivered = self._deliver(s, touch, draft)
                    if isinstance(delivered, _Failed):
                        batch.add(delivered)
                        continue
                    sent.append(_Sent(*delivered, loaded, draft.facts))
                    spent[touch.enrollment_id] += 1
                    if cleared is not None:  # counted by the caps of the contact's touches after it
                        cleared[loaded.enrollment.contact_id].append((outcome.touch_id, touch.cleared_at))
                self._record_all(s, sent)
                # The claim goes with each touch's one UPDATE.
                store.update_all(
                    s, [loaded.touch for loaded in together if loaded.touch.id in claimed], _CLAIM_FIELDS
                )
        except BaseException:
            batch.results.clear()  # rolled back: none of it happened
            raise
        batch.alone.extend(late)
        self._let_go(late, send_alone)
        for delivery in sent:
            self._sent(delivery.message)
            batch.results.append(Result(delivery.message.touch_id, TouchStatus.sent))
        return batch

    @staticmethod
    def _let_go(touch_ids: list[int], send_alone: Callable[[list[int]], None] | None) -> None:
        """Hand touches left queued to go alone; if that fails, the sweep finds them after the lease."""
        if not touch_ids or send_alone is None:
            return
        try:
            send_alone(touch_ids)
        except Exception:
            log.warning("queuing touches alone failed", exc_info=True, extra={"touches": touch_ids})

    def _send(self, message: Message) -> Receipt | DeliveryError:
        """The channel's receipt, or the error by which nothing was delivered (see `_not_delivered`)."""
        try:
            return self.channels[message.channel].send(message)
        except DeliveryError as exc:
            return exc
        except Exception as exc:
            # A provider bug or the machine (a full disk): retried like a transient error, within the cap.
            return TransientError(repr(exc))

    def _sent(self, message: Message) -> None:
        late = (self.clock() - message.due_at).total_seconds()
        self.metrics.latency.labels(message.channel).observe(max(late, 0.0))
        log.info(
            "touch sent", extra={"touch": message.key, "channel": message.channel, "reason": message.reason}
        )

    def _batchable(self, s: Session, loaded: _Loaded) -> bool:
        """Whether the touch may go in a batch: every channel it may go out on is batchable."""
        channel = self.channels.get(loaded.touch.channel)
        if channel is None or not channel.batchable:
            return False
        point = self.engine.spec_of(s, loaded.enrollment).touchpoint(loaded.touch.step_index)
        options = point.choose if point is not None else ()
        return all(getattr(self.channels.get(option.channel), "batchable", False) for option in options)

    def _claim_all(self, s: Session, touches: list[Touch]) -> set[int]:
        """`_claim` for several touches in one statement; the ids of those claimed."""
        now = self.clock()
        queued = [touch for touch in touches if touch.status == TouchStatus.queued]
        if not queued:
            return set()
        ids = [touch.id for touch in queued]
        rows = s.connection().execute(
            _CLAIM_ALL, {"ids": ids, "queued": TouchStatus.queued, "sending_at": now}
        )
        claimed = {row[0] or 0 for row in rows}
        for touch in queued:
            if touch.id in claimed:
                _note_claim(touch, now)
        return claimed

    def _take_all(self, s: Session, touches: list[Touch]) -> set[int]:
        """`_claim_all` in a batch, whose transaction commits its claims with its sends and records: each
        claim is noted in the session as if written, and written with the touch's record or whatever else
        its checks change, so a touch takes one UPDATE, not two (see `dispatch_many`). The touches are
        locked first, and read again as they are then, so that of two workers holding the same touches one
        waits for the other and finds them no longer queued. The ids of those claimed."""
        now = self.clock()
        queued = [touch for touch in touches if touch.status == TouchStatus.queued]
        if queued and self.db.dialect.name != "sqlite":
            ids = [touch.id for touch in queued]
            current = {row[0]: row[1:] for row in store.select_rows(s, _LOCK_ALL, {"ids": ids})}
            for touch in queued:
                status, attempts = current[touch.id]
                set_committed_value(touch, "status", status)
                set_committed_value(touch, "attempts", attempts)
            queued = [touch for touch in queued if touch.status == TouchStatus.queued]
        for touch in queued:
            _note_claim(touch, now)
        return {touch.id or 0 for touch in queued}

    def _unclaim(self, touch: Touch) -> None:
        """A claimed touch a batch did not get to: queued again as if never claimed, the attempt uncounted."""
        touch.status, touch.queued_at = TouchStatus.queued, self.clock()
        touch.sending_at = touch.cleared_at = None
        touch.attempts -= 1

    def _cleared_for_contacts(self, s: Session, contacts: set[int]) -> _Cleared | None:
        """For the caps, when each contact's touches were let go in the last eight days, with their ids,
        read once for a batch (None without caps). The batch's own claims are not written yet, so none of
        its touches is among them: each is added as its checks let it go (see `dispatch_many`)."""
        if not self._locks_contact() or not contacts:
            return None
        return _read_cleared(s, contacts, self.clock() - timedelta(days=CAPS_LOOK_BACK_DAYS))

    def _claim(self, s: Session, touch: Touch) -> bool:
        """Take the touch from queued to sending; False if it is not queued (already sent, being sent, or
        cancelled). The update's condition decides between two workers holding the same message: the second
        waits for the first's transaction and then finds the touch no longer queued."""
        return touch.id in self._claim_all(s, [touch])

    def _give_back(self, touch_id: int, why: str) -> None:
        with store.session(self.db) as s:
            touch = s.get_one(Touch, touch_id)
            if touch.status == TouchStatus.queued:  # no other worker took it meanwhile
                touch.attempts += 1
                self.retry_or_fail(s, touch, why)

    def retry_or_fail(self, s: Session, touch: Touch, why: str) -> bool:
        """Queue the touch for another attempt, or fail it once it has had MAX_ATTEMPTS; True if queued."""
        if touch.attempts >= MAX_ATTEMPTS:
            self.finish(s, touch, TouchStatus.failed, f"gave up after {touch.attempts} attempts: {why}")
            return False
        touch.status = TouchStatus.queued
        touch.queued_at = self.clock()
        touch.cleared_at = None
        touch.status_reason = why
        return True

    def _record_sent(self, touch_id: int, receipt: Receipt) -> None:
        """Record a delivery that happened; a passing database error must not lose it."""
        for attempt in range(1, RECORD_ATTEMPTS + 1):
            try:
                with store.session(self.db) as s:
                    self._mark_sent(s, touch_id, receipt)
                return
            except sa.exc.OperationalError:
                if attempt == RECORD_ATTEMPTS:
                    raise
                log.warning("recording a sent touch failed; trying again", extra={"touch_id": touch_id})
                time.sleep(RECORD_BACKOFF_SECONDS * attempt)

    def _record_all(self, s: Session, sent: list[_Sent]) -> None:
        """Record a batch's deliveries in its transaction `s`, making those that are rows of this database
        there too (one statement a channel), and insert the next touches with one statement."""
        receipts = self._send_in(s, [(delivery.message, delivery.receipt) for delivery in sent])
        later: list[Touch] = []
        for (message, receipt), delivery in zip(receipts, sent, strict=True):
            self._mark_sent(s, message.touch_id, receipt, delivery.loaded, later, delivery.facts)
        store.insert_all_unless_taken(s, later, TOUCH_KEY, attach=False)  # none of them is changed after

    def _send_in(
        self, s: Session, sent: list[tuple[Message, Receipt | None]]
    ) -> list[tuple[Message, Receipt]]:
        """Each delivery with its receipt: those without one are made in `s`, one call per channel."""
        waiting: dict[str, list[Message]] = defaultdict(list)
        for message, receipt in sent:
            if receipt is None:
                waiting[message.channel].append(message)
        made: dict[int, Receipt] = {}
        for channel, messages in waiting.items():
            receipts = self.channels[channel].send_all_in(s, messages)
            made.update(
                (message.touch_id, receipt) for message, receipt in zip(messages, receipts, strict=True)
            )
        return [(message, receipt or made[message.touch_id]) for message, receipt in sent]

    def _mark_sent(
        self,
        s: Session,
        touch_id: int,
        receipt: Receipt,
        loaded: _Loaded | None = None,
        later: list[Touch] | None = None,
        facts: dict[str, Any] | None = None,
    ) -> None:
        """Record the delivery; `loaded` holds the touch's rows when they were read with others, `later`
        gathers the next touches a batch inserts together, `facts` are the checks' (see `_Draft`)."""
        loaded = loaded or _load(s, touch_id)  # held, so planning finds the touch's rows in the session
        touch = loaded.touch
        touch.receipt = {
            **touch.receipt,  # a provider's status callback may have come first
            **receipt.details,
            "provider": receipt.provider,
            "reference": receipt.reference,
        }
        self.finish(s, touch, TouchStatus.sent, None, later, facts, loaded)
        if self.engine.activity:
            outbound.touch_sent(s, touch, self.clock())

    def _locks_contact(self) -> bool:
        """With caps, one decision at a time per contact, so two workers cannot both take the last place."""
        caps = self.engine.policy.caps
        return bool(caps.per_day or caps.per_week)

    def _check(
        self,
        s: Session,
        loaded: _Loaded,
        cleared: _Cleared | None = None,
        spent: Counter[int] | None = None,
    ) -> tuple[Result, _Draft | None]:
        """Late binding: everything that may have changed since planning is checked now, for a touch just
        claimed; its message, not yet rendered, when it may go out. For a batch, `cleared` is what the caps
        count, read once, and `spent` the touches of each enrollment the batch has let go so far, which its
        budget counts. A touch the checks keep back is no longer counted as let go (see `_CLAIM_ALL`)."""
        outcome, draft = self._decide(s, loaded, cleared, spent)
        if draft is None:
            loaded.touch.cleared_at = None
        return outcome, draft

    def _decide(
        self, s: Session, loaded: _Loaded, cleared: _Cleared | None, spent: Counter[int] | None
    ) -> tuple[Result, _Draft | None]:
        caps = self.engine.policy.caps
        touch, enrollment = loaded.touch, loaded.enrollment
        touch_id = touch.id or 0
        if enrollment.status == EnrollmentStatus.paused:
            # Paused while this touch was on its way: it waits with the others until the enrollment resumes.
            touch.status, touch.queued_at, touch.status_reason = TouchStatus.held, None, "enrollment paused"
            touch.attempts -= 1
            return Result(touch_id, TouchStatus.held, "enrollment paused"), None
        if enrollment.status != EnrollmentStatus.active:
            return self._close(touch, TouchStatus.cancelled, f"enrollment {enrollment.status}"), None
        now = self.clock()
        context: dict[str, Any] = self.engine.context(s, enrollment, loaded.contact, loaded.deal)
        why, target = self.engine.exit_decision(s, enrollment, context, loaded.deal)
        if why is not None:
            self.engine.leave(s, enrollment, why, target, now)
            return self._close(touch, TouchStatus.cancelled, why), None
        spec = self.engine.spec_of(s, enrollment)
        point = spec.touchpoint(touch.step_index)
        if point is None:  # only a hand-edited database gets here: the version is pinned
            return self._close(touch, TouchStatus.cancelled, "no such step in the cadence"), None
        goal = self.engine.goal_reached(s, spec, enrollment, touch.step_index, context)
        if goal is not None:
            self.engine.end(s, enrollment, EnrollmentStatus.completed, goal, now)
            return self._close(touch, TouchStatus.cancelled, goal), None
        contact = context["contact"]
        planned_channel = touch.channel
        zone, calendar = self.engine.placement(
            spec, point, touch.channel, contact["timezone"], contact["country"]
        )
        slot = timing.due_at(now, 0, calendar, zone)
        if slot > now:
            # Late (a backlog, an outage, a retry) and now outside the window or on a day off: wait for it.
            return self._defer(touch, slot, "deferred to the next send window"), None
        skipped = sandbox.skip_reason(point.when, point.skip_when, context)
        if skipped:
            return self.finish(s, touch, TouchStatus.skipped, skipped), None
        unreachable = self._route(s, point, touch, context, now, loaded.may_be_blocked)
        if unreachable:
            return self.finish(s, touch, TouchStatus.skipped, unreachable), None
        if (
            touch.channel != planned_channel
        ):  # the choice fell on another channel: its hours may not have begun
            zone, calendar = self.engine.placement(
                spec, point, touch.channel, contact["timezone"], contact["country"]
            )
            slot = timing.due_at(now, 0, calendar, zone)
            if slot > now:
                return self._defer(touch, slot, f"deferred to {touch.channel}'s hours"), None
        capped = self._capped(
            s, caps, touch, enrollment.contact_id, now, zone, calendar, cleared
        ) or self._over_budget(
            s,
            spec.budget.per_month if spec.budget else None,
            touch,
            now,
            zone,
            calendar,
            spent[touch.enrollment_id] if spent else 0,
        )
        if capped is not None:
            return self._defer(touch, *capped), None
        facts = context
        context = {**facts, "reason": touch.reason, "sender": dict(self.sender), "touch": touch_view(touch)}
        message = Message(
            key=touch.key,
            touch_id=touch_id,
            channel=touch.channel,
            contact=context["contact"],
            deal=context["deal"],
            reason=touch.reason,
            due_at=touch.due_at,
            local_date=now.astimezone(zone).date(),
            parts={},
            sender=self.sender,
        )
        return Result(touch_id, TouchStatus.sending), _Draft(message, touch.template, context, facts)

    def _render(self, draft: _Draft) -> Message:
        """The draft's message with its parts rendered (and a call's priority worked out); raises
        sandbox.TemplateError."""
        message = draft.message
        parts = self.channels[message.channel].render(self.templates, draft.template, draft.context)
        priority = self._priority(draft.context) if message.channel == "call" else 0.0
        return dataclasses.replace(message, parts=parts, priority=priority)

    def _deliver(self, s: Session, touch: Touch, draft: _Draft) -> tuple[Message, Receipt | None] | _Failed:
        """A batch's send of `touch` (held in `s`), its checks passed: its message and receipt (None for a
        channel whose delivery is a row of this database, made when the batch is recorded), or how the touch
        was left when nothing was delivered. A template that fails fails the touch for good; any other error
        while rendering (a bug, the machine) is retried like a transient send error, within the cap."""
        try:
            message = self._render(draft)
        except sandbox.TemplateError as exc:
            return self._not_delivered(s, touch, DeliveryError(f"template: {exc}"))
        except Exception as exc:
            return self._not_delivered(s, touch, TransientError(f"rendering: {exc!r}"))
        if self.channels[message.channel].in_database:
            return message, None
        receipt = self._send(message)
        if isinstance(receipt, DeliveryError):
            return self._not_delivered(s, touch, receipt)
        return message, receipt

    def _unusable(
        self, s: Session, channel: str, context: Mapping[str, Any], now: datetime, may_be_blocked: bool
    ) -> str | None:
        """Why the contact cannot be reached on `channel` now: a block, a missing address, no consent."""
        contact = context["contact"]
        blocked = self.engine.blocked(s, contact["id"], channel, now) if may_be_blocked else None
        if blocked:
            return blocked
        missing = self.channels[channel].missing(contact)
        if missing:
            return missing
        consent = self.engine.policy.consent_for(channel)
        if consent and not self.engine._holds(consent, context, f"policy consent.{channel}"):
            return f"no consent for {channel}: {consent} does not hold"
        return None

    def _route(
        self,
        s: Session,
        point: Touchpoint,
        touch: Touch,
        context: Mapping[str, Any],
        now: datetime,
        may_be_blocked: bool,
    ) -> str | None:
        """Settle the touch's channel and template at send time; why it cannot go out at all, or None."""
        if not point.choose:
            return self._unusable(s, touch.channel, context, now, may_be_blocked)
        reasons: list[str] = []

        def usable(channel: str) -> str | None:
            why = self._unusable(s, channel, context, now, may_be_blocked)
            if why:
                reasons.append(f"{channel}: {why}")
            return why

        option = self.engine.choose_option(point, context, usable)
        if (option.when and not sandbox.truthy(option.when, context)) or usable(option.channel):
            found = "; ".join(dict.fromkeys(reasons)) or "no choice's condition holds"
            return f"no choice reaches the contact: {found}"
        touch.channel, touch.template = option.channel, option.template
        return None

    def _over_budget(
        self,
        s: Session,
        per_month: int | None,
        touch: Touch,
        now: datetime,
        zone: ZoneInfo,
        calendar: Calendar,
        unwritten: int = 0,
    ) -> tuple[datetime, str] | None:
        """(the next month's first slot, why) when the enrollment has had its monthly budget, else None;
        `unwritten` touches of it let go in this transaction are not yet in the database to count."""
        if not per_month:
            return None
        local = now.astimezone(zone)
        month = datetime(local.year, local.month, 1, tzinfo=zone)
        since = month.astimezone(UTC)
        parameters = {"enrollment_id": touch.enrollment_id, "since": since, "touch_id": touch.id}
        spent = store.select_rows(s, _SPENT_SINCE, parameters).scalar_one() + unwritten
        if spent < per_month:
            return None
        following = datetime(local.year + local.month // 12, local.month % 12 + 1, 1, tzinfo=zone)
        return timing.due_at(following, 0, calendar, zone), f"deferred: budget of {per_month} a month spent"

    def _defer(self, touch: Touch, until: datetime, why: str) -> Result:
        """Not now: plan the touch again for `until`; the attempt does not count."""
        touch.status, touch.due_at, touch.queued_at = TouchStatus.planned, until, None
        touch.attempts -= 1
        touch.status_reason = why
        return Result(touch.id or 0, TouchStatus.planned, why)

    def _capped(
        self,
        s: Session,
        caps: Caps,
        touch: Touch,
        contact_id: int,
        now: datetime,
        zone: ZoneInfo,
        calendar: Calendar,
        batch: _Cleared | None = None,
    ) -> tuple[datetime, str] | None:
        """(when the contact may next be touched, why) if the policy's caps are reached, else None.

        The caller holds the contact's row (see `dispatch_in`); in a batch, `batch` has what it counts."""
        if not caps.per_day and not caps.per_week:
            return None
        local_midnight = datetime.combine(now.astimezone(zone).date(), datetime.min.time(), tzinfo=zone)
        since = min(now - timedelta(days=CAPS_LOOK_BACK_DAYS), local_midnight.astimezone(UTC))
        if batch is None:  # one touch: its contact's, read now
            batch = _read_cleared(s, {contact_id}, since)
        cleared = sorted(at for other, at in batch[contact_id] if other != touch.id and at and at >= since)
        today = [at for at in cleared if at >= local_midnight]
        if caps.per_day and len(today) >= caps.per_day:
            tomorrow = local_midnight + timedelta(days=1)
            return timing.due_at(tomorrow, 0, calendar, zone), f"deferred: {caps.per_day} touch(es) a day cap"

        # Seven days of the contact's wall clock, so a weekly touch keeps its local hour across a DST change;
        # strictly within them, so the moment a place frees up always lies ahead of now.
        def wall(at: datetime) -> datetime:
            return at.astimezone(zone).replace(tzinfo=None)

        week = [at for at in cleared if wall(at) > wall(now) - timedelta(days=7)]
        if caps.per_week and len(week) >= caps.per_week:
            frees = (wall(week[len(week) - caps.per_week]) + timedelta(days=7)).replace(tzinfo=zone)
            return timing.due_at(frees, 0, calendar, zone), f"deferred: {caps.per_week} touches a week cap"
        return None

    def _priority(self, context: Mapping[str, Any]) -> float:
        try:
            value = sandbox.evaluate(self.engine.policy.call_priority, context)
            return float(value or 0)
        except (sandbox.ExpressionError, TypeError, ValueError):
            return 0.0

    def _not_delivered(self, s: Session, touch: Touch, error: DeliveryError) -> _Failed:
        """How `touch` (held in `s`) is left after `error` delivered nothing: a rate limit lets it wait for a
        place without counting the attempt; a transient error queues it for a retry within the cap; any
        other fails it."""
        touch_id = touch.id or 0
        if isinstance(error, RateLimited):
            touch.cleared_at = None
            until = self.clock() + timedelta(seconds=max(error.retry_after, 1))
            return _Failed(self._defer(touch, until, str(error)))
        if error.transient and self.retry_or_fail(s, touch, f"retrying: {error}"):
            return _Failed(Result(touch_id, TouchStatus.queued, f"retrying: {error}"), error, touch.attempts)
        if not error.transient:
            self.finish(s, touch, TouchStatus.failed, str(error))
        return _Failed(Result(touch_id, TouchStatus.failed, str(error)))

    def _close(self, touch: Touch, status: str, reason: str | None) -> Result:
        touch.status = status
        touch.status_reason = reason
        touch.finished_at = self.clock()
        return Result(touch.id or 0, status, reason)

    def finish(
        self,
        s: Session,
        touch: Touch,
        status: str,
        reason: str | None,
        later: list[Touch] | None = None,
        facts: dict[str, Any] | None = None,
        loaded: _Loaded | None = None,
    ) -> Result:
        """Record how a touch ended and plan the enrollment's next step (into `later`, given it, and from
        `facts`, the enrollment's context when the caller has it read: see `Engine.plan`); `loaded` holds
        the touch's rows when the caller has them."""
        result = self._close(touch, status, reason)
        self.metrics.touches.labels(touch.channel, status).inc()
        enrollment = loaded.enrollment if loaded else s.get_one(Enrollment, touch.enrollment_id)
        contact = loaded.contact if loaded else None
        if enrollment.status in (EnrollmentStatus.active, EnrollmentStatus.paused):
            following = self.engine.plan(
                s, enrollment, touch.step_index + 1, self.clock(), later, facts, contact
            )
            if following is not None and enrollment.status == EnrollmentStatus.paused:
                following.status, following.status_reason = TouchStatus.held, "enrollment paused"
        return result

    def take_back(self, s: Session, touch: Touch, why: str) -> bool:
        """A touch stuck in queued or sending past its lease: queue it again (True), or fail it.

        A send a worker lost may have reached the person, so only an idempotent channel may repeat it. A
        worker lost before its late checks were committed (no `cleared_at`) never called the channel.
        """
        began = touch.status == TouchStatus.sending and touch.cleared_at is not None
        if began and not self.channels[touch.channel].idempotent:
            self.finish(
                s, touch, TouchStatus.failed, "worker lost during send; not repeated to avoid a duplicate"
            )
            return False
        return self.retry_or_fail(s, touch, why)
