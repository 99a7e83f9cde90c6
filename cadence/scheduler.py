"""The scheduler: claims due touches in batches and hands their ids to the broker; sweeps lost ones back.

Claims lock rows with SKIP LOCKED on PostgreSQL, so several schedulers can run side by side. A claim is
one UPDATE that returns the ids it queued, so its cost follows the batch, not the table.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlmodel import Session, col, select, update

from cadence import store
from cadence.clock import Clock
from cadence.models import Touch, TouchStatus

log = logging.getLogger(__name__)


@dataclass
class Tick:
    """What one pass did: touches queued, re-queued and failed by the sweep, inbox events replayed."""

    queued: list[int] = field(default_factory=list)
    requeued: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    replayed: list[int] = field(default_factory=list)
    enrolled: list[int] = field(default_factory=list)
    posted: list[int] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)


class Scheduler:
    def __init__(
        self,
        db: sa.Engine,
        send: Callable[[int], None],
        clock: Clock,
        batch_size: int,
        lease: timedelta,
        take_back: Callable[[Session, Touch, str], bool],
        replay_inbox: Callable[[datetime], list[int]],
        blocks_ended: Callable[[Session, datetime], list[int]] | None = None,
        post_activity: Callable[[], list[int]] | None = None,
        send_digests: Callable[[], list[str]] | None = None,
        send_all: Callable[[list[int]], None] | None = None,
    ) -> None:
        self.db = db
        self.send = send
        #: Hands a whole batch to the broker at once (one round trip); without it each id goes through `send`.
        self.send_all = send_all
        self.clock = clock
        self.batch_size = batch_size
        self.lease = lease
        #: Queues a stale touch again (True) or fails it, inside the sweep's transaction.
        self.take_back = take_back
        self.replay_inbox = replay_inbox
        #: Enrolls contacts whose blocks ended into the cadences that start then.
        self.blocks_ended = blocks_ended
        #: Posts touches sent and outcomes recorded back to OUTBOUND_URL.
        self.post_activity = post_activity
        #: Sends the managers' morning digests whose hour has come.
        self.send_digests = send_digests

    def tick(self) -> Tick:
        """One pass: finish events a crash interrupted, claim what is due, re-send what was lost."""
        result = Tick(replayed=self.replay_inbox(self.clock() - self.lease))
        if self.blocks_ended is not None:
            with store.session(self.db) as s:
                result.enrolled = self.blocks_ended(s, self.clock())
        while True:
            batch = self._claim_due()
            self._hand_over(batch)
            result.queued.extend(batch)
            if len(batch) < self.batch_size:
                break
        self._sweep(result)
        self._hand_over(result.requeued)
        if self.post_activity is not None:
            result.posted = self.post_activity()
        if self.send_digests is not None:
            result.digests = self.send_digests()
        return result

    def _claim_due(self) -> list[int]:
        """Queue the next batch of due touches, earliest first; their ids in due order."""
        now = self.clock()
        due = (
            select(Touch.id)
            .where(Touch.status == TouchStatus.planned, col(Touch.due_at) <= now)
            .order_by(col(Touch.due_at), col(Touch.id))
            .limit(self.batch_size)
            .with_for_update(skip_locked=True)
        )
        claim = (
            update(Touch)
            .where(col(Touch.id).in_(due.scalar_subquery()))
            .values(status=TouchStatus.queued, queued_at=now)
            # Compared only, never shown: read as stored, without the aware-time conversion.
            .returning(col(Touch.id), sa.type_coerce(col(Touch.due_at), sa.DateTime()))
        )
        with self.db.begin() as connection:
            claimed = connection.execute(claim).all()
        # RETURNING gives rows in no promised order; the broker gets them in due order.
        return [touch_id or 0 for touch_id, _ in sorted(claimed, key=lambda row: (row[1], row[0] or 0))]

    def _hand_over(self, touch_ids: list[int]) -> None:
        """Give queued touches to the broker. If it refuses, they go back to planned, so the next tick
        claims them again rather than the sweep after the lease; a message that got through before the
        failure finds its touch no longer queued and is ignored by the worker."""
        if not touch_ids:
            return
        try:
            if self.send_all is not None:
                self.send_all(touch_ids)
            else:
                for touch_id in touch_ids:
                    self.send(touch_id)
        except Exception:
            self._release(touch_ids)
            raise

    def _release(self, touch_ids: list[int]) -> None:
        with self.db.begin() as connection:
            connection.execute(
                update(Touch)
                .where(col(Touch.id).in_(touch_ids), col(Touch.status) == TouchStatus.queued)
                .values(status=TouchStatus.planned, queued_at=None)
            )
        log.warning("broker refused touches; planned again", extra={"touches": len(touch_ids)})

    def _sweep(self, result: Tick) -> None:
        now = self.clock()
        expired = now - self.lease
        with store.session(self.db) as s:
            stale = s.exec(
                select(Touch)
                .where(
                    ((col(Touch.status) == TouchStatus.queued) & (col(Touch.queued_at) < expired))
                    | ((col(Touch.status) == TouchStatus.sending) & (col(Touch.sending_at) < expired))
                )
                .limit(self.batch_size)
                .with_for_update(skip_locked=True)
            ).all()
            for touch in stale:
                taken = self.take_back(s, touch, f"taken back after the {self.lease} lease")
                (result.requeued if taken else result.failed).append(touch.id or 0)
        if result.requeued or result.failed:
            log.warning("swept touches", extra={"requeued": result.requeued, "failed": result.failed})

    def run(self, stop: threading.Event, interval: float) -> None:
        """Tick until `stop` is set; an error in one tick is logged and the next tick tries again."""
        while not stop.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("scheduler tick failed")
            stop.wait(interval)
