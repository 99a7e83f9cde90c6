"""The inbox: every CRM delivery is stored raw, and a delivery answered 2xx is stored durably.

When a delivery arrives alone it is stored and acted on in one transaction, and the answer says what it
caused. When others are arriving at the same time, it is only stored, together with theirs in one commit, and
handed to a worker to act on, so a burst of deliveries is taken at the pace of the disk, not of the engine.
A rejected delivery, or one the engine fails on, is stored for inspection. A delivery stored but not acted
on (`received`: its hand-off was lost, or a process stopped) is found by the scheduler and acted on then.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import anyio.to_thread
import msgspec
import sqlalchemy as sa
from pydantic import BaseModel, ValidationError
from sqlmodel import Session, col, select

from cadence import store
from cadence.clock import Clock
from cadence.engine import Effects, Engine, EngineError
from cadence.events import Event
from cadence.metrics import Metrics
from cadence.models import InboundEvent

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)

#: Seconds without a delivery stored for a worker before one arriving alone is acted on at once again: in a
#: burst, the moments when no other delivery happens to be in flight do not count as quiet.
BURST_QUIET_SECONDS = 0.5
#: Bodies up to this size are read on the event loop (a CRM's usual delivery takes a fraction of a
#: millisecond); bigger ones on a thread, so one large body does not hold up the other requests.
READ_ON_LOOP_BYTES = 64 * 1024
#: How JSON writes a NUL character inside a string (a raw NUL byte is refused before parsing).
_NUL_ESCAPE = b"\\u0000"


@dataclass(frozen=True)
class Rejection:
    """Why a delivery was not accepted, as the API reports it."""

    status: int
    code: str
    message: str
    field: str | None
    problems: list[dict[str, Any]] = dataclasses.field(default_factory=list)


@dataclass(frozen=True)
class Reading:
    """What an adapter read from one delivery: its id, its kind, the events in it (a CRM may send several),
    or why it was refused. Event types the adapter knows it does not act on are accepted with no events."""

    event_id: str
    kind: str | None = None
    events: list[Event] = dataclasses.field(default_factory=list)
    rejection: Rejection | None = None


#: Reads one source's deliveries.
Reader = Callable[[bytes], Reading]


@dataclass(frozen=True)
class Intake:
    """What became of one delivery: acted on (with its effects), stored for a worker (`queued`, with the
    row's id), a duplicate, or refused."""

    event_id: str
    duplicate: bool = False
    effects: Effects = dataclasses.field(default_factory=Effects)
    rejection: Rejection | None = None
    queued: int | None = None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


#: Reads webhook bodies (see `parse_json`).
_DECODER = msgspec.json.Decoder()


def parse_json(body: bytes) -> Any:
    """Strict JSON: no NaN or Infinity, no NUL characters (no database text column holds them)."""
    if b"\x00" in body:
        raise ValueError("body contains a NUL byte")
    try:
        payload = _DECODER.decode(body)
    except msgspec.DecodeError:
        # msgspec (half the standard library's time, integers of any size kept whole) refuses some JSON the
        # standard library reads (a byte-order mark, a lone surrogate, a number too large for a double),
        # and words its errors differently: the standard library decides those.
        payload = json.loads(body, parse_constant=_no_constant)
    # JSON can only carry NUL escaped, so a body without the escape needs no walk through every value.
    path = _nul_path(payload, "") if _NUL_ESCAPE in body else None
    if path is not None:
        raise ValueError(f"{path or 'body'} contains a NUL character")
    return payload


def _nul_path(value: Any, path: str) -> str | None:
    if isinstance(value, str):
        return path if "\x00" in value else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and "\x00" in key:
            return path
        found = _nul_path(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def read_model(body: bytes, model: type[M]) -> tuple[Any, M | None, Rejection | None]:
    """Parse a body strictly and validate it: (the payload, the model or None, why not or None)."""
    try:
        payload = parse_json(body)
    except (UnicodeDecodeError, ValueError) as exc:
        return None, None, Rejection(400, "unreadable", f"body is not JSON that can be stored: {exc}", "body")
    try:
        return payload, model.model_validate(payload), None
    except ValidationError as exc:
        problems = [
            {"field": ".".join(str(p) for p in e["loc"]) or None, "message": e["msg"]} for e in exc.errors()
        ]
        first = problems[0]
        message = f"{first['field'] or 'body'}: {first['message']}"
        return payload, None, Rejection(422, "invalid", message, first["field"], problems)


def read_generic(body: bytes) -> Reading:
    """Cadence's own event shape, one event a delivery (`/webhooks/generic`)."""
    payload, event, rejection = read_model(body, Event)
    event_id = _event_id(payload, body)
    kind = payload.get("type") if isinstance(payload, dict) else None
    kind = kind if isinstance(kind, str) else None
    if event is None:
        return Reading(event_id, kind, rejection=rejection)
    missing = event.missing_subject()
    if missing is not None:
        message = f"{missing}: a {event.type} event needs `{missing}`"
        problems = [{"field": missing, "message": message}]
        return Reading(event_id, kind, rejection=Rejection(422, "invalid", message, missing, problems))
    return Reading(event_id, kind, [event])


def _event_id(payload: Any, body: bytes) -> str:
    if isinstance(payload, dict) and payload.get("event_id") is not None:
        return str(payload["event_id"])[:128]
    return body_id(body)


def body_id(body: bytes) -> str:
    """An id for a delivery that carries none: the same body is the same delivery."""
    return "sha256:" + hashlib.sha256(body).hexdigest()


class _AlreadyStored(Exception):
    """The delivery is stored already: a duplicate."""


#: A delivery's row as the inbox's insert takes it: every column of InboundEvent but the id. A dictionary,
#: not a model: in a burst, making an ORM object a delivery cost a tenth of its time.
Row = dict[str, Any]


def _row(source: str, body: bytes, reading: Reading, now: datetime, failure: str | None = None) -> Row:
    """The inbox row of one delivery: received, or rejected or failed with why."""
    kind, rejection = reading.kind, reading.rejection
    status = "rejected" if rejection else "failed" if failure else "received"
    return {
        "source": source,
        "event_id": reading.event_id.replace("\x00", "\ufffd"),
        "type": kind[:64].replace("\x00", "\ufffd") if kind else None,
        # Kept for inspection even when rejected; NUL cannot be stored, so it is shown as U+FFFD.
        "body": body.decode("utf-8", errors="replace").replace("\x00", "\ufffd"),
        "status": status,
        "error": rejection.message if rejection else failure,
        "received_at": now,
        "processed_at": now if failure else None,
    }


def _failure(exc: Exception) -> str:
    """Why processing failed, as the row keeps it: an engine error's own words, else the exception."""
    return str(exc) if isinstance(exc, EngineError) else repr(exc)


@dataclass
class _Waiting:
    """One delivery waiting to be stored: its row, then its id (None: a duplicate) or the error."""

    row: Row
    stored: threading.Event = dataclasses.field(default_factory=threading.Event)
    leads: bool = False
    row_id: int | None = None
    error: BaseException | None = None


#: The columns a delivery sent again replaces when its stored row was rejected or failed.
_REPLACED = ("type", "body", "received_at", "status", "error", "processed_at")


class _GroupCommit:
    """Stores deliveries that arrive together in one transaction: one commit, and one wait for the disk,
    for all of them. The first to arrive writes; those arriving meanwhile wait, and the first of them
    writes the next group, so no request writes for others for longer than one group. Once committed, the
    new rows' ids go to `written` together (one message batch to the broker, not one per delivery)."""

    def __init__(self, db: sa.Engine, written: Callable[[list[int]], None]) -> None:
        self.db = db
        self.written = written
        self._lock = threading.Lock()
        self._queue: list[_Waiting] = []
        self._writing = False
        # Requests on the event loop: rows waiting for the next group, and the task writing groups.
        self._pending: list[tuple[Row, asyncio.Future[int | None]]] = []
        self._flusher: asyncio.Future[None] | None = None

    def store(self, row: Row) -> int | None:
        """The stored row's id, or None when the delivery is stored already (a duplicate)."""
        me = _Waiting(row)
        with self._lock:
            self._queue.append(me)
            if not self._writing:
                self._writing = me.leads = True
        if not me.leads:
            me.stored.wait()
        if me.leads:
            self._write_group()
        if me.error is not None:
            raise me.error
        return me.row_id

    def write(self, rows: list[Row]) -> list[int | None]:
        """Store the rows in one transaction and hand the new ones on; each row's id, None for a duplicate.
        Raises when nothing was stored."""
        with self.db.begin() as connection:
            ids = self._insert_all(connection, rows)
        stored = [row_id for row_id in ids if row_id is not None]
        if stored:
            self.written(stored)
        return ids

    async def store_async(self, row: Row) -> int | None:
        """As `store`, for a request on the event loop: it waits for its group without a thread of its own;
        one thread writes each group."""
        loop = asyncio.get_running_loop()
        if self._flusher is not None and (self._flusher.done() or self._flusher.get_loop() is not loop):
            # A loop stopped in the middle of a burst: its requests were never answered, so the CRM sends
            # them again; what they left behind is dropped rather than waited for.
            self._flusher, self._pending = None, []
        future: asyncio.Future[int | None] = loop.create_future()
        self._pending.append((row, future))
        if self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._pending:
                group, self._pending = self._pending, []
                try:
                    ids = await anyio.to_thread.run_sync(self.write, [row for row, _ in group])
                except Exception as exc:  # nothing of the group was stored: each request answers with it
                    for _, future in group:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), row_id in zip(group, ids, strict=True):
                    if not future.done():
                        future.set_result(row_id)
        finally:
            self._flusher = None

    def _write_group(self) -> None:
        with self._lock:
            group, self._queue = self._queue, []
        try:
            for waiting, row_id in zip(group, self.write([w.row for w in group]), strict=True):
                waiting.row_id = row_id
        except BaseException as exc:  # nothing of the group was stored: each request answers with the error
            for waiting in group:
                waiting.error, waiting.row_id = exc, None
        with self._lock:
            if self._queue:
                following = self._queue[0]
                following.leads = True
                following.stored.set()
            else:
                self._writing = False
        for waiting in group:
            waiting.stored.set()

    def _insert_all(self, connection: sa.Connection, rows: list[Row]) -> list[int | None]:
        """Insert the rows by one statement (per run of distinct deliveries: a delivery twice in a group is
        written after the first, as if it came after it); each row's id, None for a duplicate."""
        ids: list[int | None] = [None] * len(rows)
        left: list[int] = list(range(len(rows)))
        while left:
            keys: set[tuple[str, str]] = set()
            run: list[int] = []
            later: list[int] = []
            for n in left:
                key = (rows[n]["source"], rows[n]["event_id"])
                (later if key in keys else run).append(n)
                keys.add(key)
            written = connection.execute(self.insert, [rows[n] for n in run])
            found = {(source, event_id): row_id for row_id, source, event_id in written}
            for n in run:
                ids[n] = found.get((rows[n]["source"], rows[n]["event_id"]))
            left = later
        return ids

    @functools.cached_property
    def insert(self) -> sa.Insert:
        """Insert a row; in place of a rejected or failed one with its id; nothing over any other. Made
        once: the values come as parameters, one row's or many (then sent as one statement). Returns the
        id with the delivery's key."""
        table = InboundEvent.__table__  # type: ignore[attr-defined]
        insert = store.insert(self.db.dialect.name, table)
        return insert.on_conflict_do_update(  # type: ignore[no-any-return]
            index_elements=["source", "event_id"],
            set_={name: insert.excluded[name] for name in _REPLACED},
            # Not IN (...): its expanding parameter cannot go with many rows.
            where=sa.or_(table.c.status == "rejected", table.c.status == "failed"),
        ).returning(table.c.id, table.c.source, table.c.event_id)


class Inbox:
    def __init__(
        self,
        db: sa.Engine,
        engine: Engine,
        clock: Clock,
        metrics: Metrics,
        readers: Callable[[str], Reader | None] | None = None,
        hand_off: Callable[[list[int]], object] | None = None,
    ) -> None:
        self.db = db
        self.engine = engine
        self.clock = clock
        self.metrics = metrics
        #: The reader of each source's deliveries (generic only, without one).
        self.readers = readers or (lambda source: read_generic if source == "generic" else None)
        #: Sends stored deliveries' ids to the workers that act on them; without it, every delivery is acted
        #: on as it arrives.
        self.hand_off = hand_off
        self._group = _GroupCommit(db, self._hand_over)
        self._arriving = 0
        self._arriving_lock = threading.Lock()
        self._last_queued = -BURST_QUIET_SECONDS  # monotonic seconds

    def _reader(self, source: str) -> Reader:
        reader = self.readers(source)
        if reader is None:
            raise KeyError(f"no reader for source {source!r}")
        return reader

    def receive(self, source: str, body: bytes) -> Intake:
        """Store the delivery; act on it at once when it arrived alone, else leave that to a worker."""
        now = self.clock()
        reading = self._reader(source)(body)
        if reading.rejection is not None:
            return self._refuse(source, body, reading, now)
        with self._arrival() as alone:
            if alone or self.hand_off is None:
                return self._act_now(source, body, reading, now)
            return self._queue(source, body, reading, now)

    async def receive_async(self, source: str, body: bytes) -> Intake:
        """As `receive`, for a request on the event loop. A delivery in a burst is read on the loop and waits
        there for its group's commit, so a burst costs a thread hop a group, not one a delivery; what needs
        the database otherwise (acting at once, storing a rejection) runs on a thread."""
        now = self.clock()
        reader = self._reader(source)
        if len(body) > READ_ON_LOOP_BYTES:
            reading = await anyio.to_thread.run_sync(reader, body)
        else:
            reading = reader(body)
        if reading.rejection is not None:
            return await anyio.to_thread.run_sync(self._refuse, source, body, reading, now)
        with self._arrival() as alone:
            if alone or self.hand_off is None:
                return await anyio.to_thread.run_sync(self._act_now, source, body, reading, now)
            row_id = await self._group.store_async(_row(source, body, reading, now))
            return self._queued(source, reading, row_id)

    @contextlib.contextmanager
    def _arrival(self) -> Iterator[bool]:
        """Count the deliveries being received; yields whether this one is the only one, and no burst is
        under way."""
        with self._arriving_lock:
            now = time.monotonic()
            alone = self._arriving == 0 and now - self._last_queued > BURST_QUIET_SECONDS
            if not alone:  # stored for a worker, with the others arriving now
                self._last_queued = now
            self._arriving += 1
        try:
            yield alone
        finally:
            with self._arriving_lock:
                self._arriving -= 1

    def _queue(self, source: str, body: bytes, reading: Reading, now: datetime) -> Intake:
        """Store the delivery with the others arriving now; the group goes to the workers together."""
        return self._queued(source, reading, self._group.store(_row(source, body, reading, now)))

    def _queued(self, source: str, reading: Reading, row_id: int | None) -> Intake:
        if row_id is None:
            self.metrics.webhooks.labels(source, "duplicate").inc()
            return Intake(reading.event_id, duplicate=True)
        self.metrics.webhooks.labels(source, "queued").inc()
        return Intake(reading.event_id, queued=row_id)

    def _hand_over(self, row_ids: list[int]) -> None:
        try:
            if self.hand_off is not None:
                self.hand_off(row_ids)
        except Exception:
            # Stored all the same: the scheduler finds the deliveries still received and acts on them.
            log.warning("could not hand deliveries to a worker", exc_info=True, extra={"rows": row_ids})

    def _act_now(self, source: str, body: bytes, reading: Reading, now: datetime) -> Intake:
        """Store the delivery and act on it in one transaction, so the answer tells what it caused; a
        delivery the engine fails on is stored for inspection all the same."""
        try:
            with store.session(self.db) as s:
                row = self._take(s, _row(source, body, reading, now))
                effects = self._act(s, row, reading.events, now)
        except _AlreadyStored:
            self.metrics.webhooks.labels(source, "duplicate").inc()
            return Intake(reading.event_id, duplicate=True)
        except Exception as exc:
            self._keep_failed(_row(source, body, reading, now, _failure(exc)))
            self.metrics.webhooks.labels(source, "failed").inc()
            if isinstance(exc, EngineError):
                return Intake(
                    reading.event_id, rejection=Rejection(422, "not_applicable", str(exc), exc.field)
                )
            raise
        self._processed(source, reading.events)
        return Intake(reading.event_id, effects=effects)

    def _refuse(self, source: str, body: bytes, reading: Reading, now: datetime) -> Intake:
        assert reading.rejection is not None
        try:
            with store.session(self.db) as s:
                s.add(InboundEvent(**_row(source, body, reading, now)))
        except sa.exc.IntegrityError:
            self.metrics.webhooks.labels(source, "duplicate").inc()
            return Intake(reading.event_id, duplicate=True, rejection=reading.rejection)
        self.metrics.webhooks.labels(source, "rejected").inc()
        return Intake(reading.event_id, rejection=reading.rejection)

    def _take(self, s: Session, delivery: Row) -> InboundEvent:
        """The delivery's row, new or in place of a rejected or failed one (the same statement a burst's
        group uses); _AlreadyStored when it has one already (a duplicate, or another process storing it)."""
        row_id = s.execute(self._group.insert, delivery).scalar_one_or_none()
        if row_id is None:
            raise _AlreadyStored
        return s.get_one(InboundEvent, row_id)

    def _keep_failed(self, delivery: Row) -> None:
        """Store a delivery the engine failed on, unless another process stored it meanwhile."""
        with contextlib.suppress(_AlreadyStored), store.session(self.db) as s:
            self._take(s, delivery)

    def _act(self, s: Session, row: InboundEvent, events: list[Event], now: datetime) -> Effects:
        effects = Effects()
        for event in events:
            done = self.engine.handle_event(s, row.source, event, now)
            effects.enrolled += done.enrolled
            effects.ended += done.ended
        row.status, row.processed_at = "processed", now
        return effects

    def _processed(self, source: str, events: list[Event]) -> None:
        self.metrics.webhooks.labels(source, "processed").inc()
        log.info("delivery processed", extra={"source": source, "events": [e.type for e in events]})

    def process(self, row_id: int, source: str, events: list[Event]) -> Effects | None:
        """Act on a stored delivery's events once, all or none: None when another process already has."""
        now = self.clock()
        try:
            with store.session(self.db) as s:
                row = s.exec(
                    select(InboundEvent)
                    .where(InboundEvent.id == row_id, InboundEvent.status == "received")
                    .with_for_update()
                ).first()
                if row is None:
                    return None
                effects = self._act(s, row, events, now)
        except sa.exc.OperationalError:
            raise  # the database is away: the row stays received, to be acted on when it is back
        except Exception as exc:
            with store.session(self.db) as s:
                failed = s.get_one(InboundEvent, row_id)
                failed.status, failed.error, failed.processed_at = "failed", _failure(exc), now
            self.metrics.webhooks.labels(source, "failed").inc()
            raise
        self._processed(source, events)
        return effects

    def act_on(self, row_id: int) -> Effects | None:
        """Act on a stored delivery that is still waiting: a worker's hand-off, or the scheduler's replay.
        None when it was not waiting, or could not be acted on (it is then marked failed, with why)."""
        with store.session(self.db) as s:
            found = s.exec(
                select(InboundEvent.source, InboundEvent.body).where(
                    InboundEvent.id == row_id, InboundEvent.status == "received"
                )
            ).first()
        if found is None:
            return None
        source, body = found
        reader = self.readers(source)
        reading = reader(body.encode("utf-8")) if reader is not None else None
        why = "no adapter reads this source any more" if reading is None else None
        if reading is not None and reading.rejection is not None:
            why = f"no longer readable: {reading.rejection.message}"  # the rules changed since it was stored
        if reading is None or why is not None:
            with store.session(self.db) as s:
                row = s.get_one(InboundEvent, row_id)
                row.status, row.error, row.processed_at = "failed", why, self.clock()
            self.metrics.webhooks.labels(source, "failed").inc()
            return None
        try:
            return self.process(row_id, source, reading.events)
        except EngineError:
            return None

    def replay(self, received_before: datetime) -> list[int]:
        """Act on deliveries still received from before `received_before`: their hand-off was lost, or a
        process stopped before acting on them."""
        with store.session(self.db) as s:
            stale = s.exec(
                select(InboundEvent.id)
                .where(InboundEvent.status == "received", col(InboundEvent.received_at) < received_before)
                .order_by(col(InboundEvent.id))
            ).all()
        done = [row_id for row_id in stale if row_id is not None and self.act_on(row_id) is not None]
        if done:
            log.warning("replayed unprocessed events", extra={"events": done})
        return done
