"""Sending one touch: claim it, re-check the rules at send time, render, send, record, plan the next step.

A touch moves queued -> sending by a conditional update; whoever wins that update is the only sender, so a
message delivered twice sends once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jinja2
import sqlalchemy as sa
from sqlmodel import Session, col, update

from cadence import sandbox, store, timing
from cadence.clock import Clock
from cadence.engine import Engine
from cadence.metrics import Metrics
from cadence.models import Contact, Enrollment, EnrollmentStatus, Touch, TouchStatus
from channels import Channel, DeliveryError, Message

log = logging.getLogger(__name__)

#: Sends tried (counting retries after transient errors) before a touch is marked failed.
MAX_ATTEMPTS = 5


@dataclass(frozen=True)
class Result:
    touch_id: int
    status: str
    reason: str | None = None


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
    ) -> None:
        self.db = db
        self.engine = engine
        self.channels = channels
        self.templates = templates
        self.sender = sender
        self.clock = clock
        self.metrics = metrics

    def dispatch(self, touch_id: int) -> Result:
        if not self._claim(touch_id):
            return Result(touch_id, "ignored", "not queued: already sent, being sent, or cancelled")
        try:
            with store.session(self.db) as s:
                outcome, message = self._prepare(s, touch_id)
            if message is None:
                return outcome
            channel = self.channels[message.channel]
        except BaseException:
            self._requeue(touch_id, "error before sending")
            raise
        try:
            receipt = channel.send(message)
        except DeliveryError as exc:
            return self._delivery_failed(touch_id, exc)
        with store.session(self.db) as s:
            touch = s.get(Touch, touch_id)
            assert touch is not None
            touch.receipt = {"provider": receipt.provider, "reference": receipt.reference, **receipt.detail}
            self.finish(s, touch, TouchStatus.sent, None)
        log.info(
            "touch sent", extra={"touch": message.key, "channel": message.channel, "reason": message.reason}
        )
        return Result(touch_id, TouchStatus.sent)

    def _claim(self, touch_id: int) -> bool:
        now = self.clock()
        with store.session(self.db) as s:
            claimed = s.exec(
                update(Touch)
                .where(col(Touch.id) == touch_id, col(Touch.status) == TouchStatus.queued)
                .values(status=TouchStatus.sending, sending_at=now, attempts=Touch.attempts + 1)
            )
            return bool(claimed.rowcount)

    def _requeue(self, touch_id: int, why: str) -> None:
        with store.session(self.db) as s:
            s.exec(
                update(Touch)
                .where(col(Touch.id) == touch_id, col(Touch.status) == TouchStatus.sending)
                .values(status=TouchStatus.queued, queued_at=self.clock(), status_reason=why)
            )

    def _prepare(self, s: Session, touch_id: int) -> tuple[Result, Message | None]:
        """Late binding: everything that may have changed since planning is checked now."""
        touch = s.get(Touch, touch_id)
        assert touch is not None
        enrollment = s.get(Enrollment, touch.enrollment_id)
        assert enrollment is not None
        if enrollment.status != EnrollmentStatus.active:
            return self._close(s, touch, TouchStatus.cancelled, f"enrollment {enrollment.status}"), None
        why, _ = self.engine.exit_decision(s, enrollment)
        if why is not None:
            # review() ends the enrollment and, for a won or lost deal, starts the `then` cadence.
            self.engine.review(s, s.get_one(Contact, enrollment.contact_id), self.clock())
            return self._close(s, touch, TouchStatus.cancelled, why), None
        spec = self.engine.spec_of(s, enrollment)
        step = spec.steps[touch.step_index]
        context: dict[str, Any] = self.engine.context(s, enrollment)
        if step.when:
            try:
                wanted = sandbox.truthy(step.when, context)
            except sandbox.ExpressionError as exc:
                return self.finish(s, touch, TouchStatus.skipped, f"condition failed: {exc}"), None
            if not wanted:
                return self.finish(s, touch, TouchStatus.skipped, f"condition not met: {step.when}"), None
        channel = self.channels[touch.channel]
        missing = channel.missing(context["contact"])
        if missing:
            return self.finish(s, touch, TouchStatus.skipped, missing), None
        context.update(
            reason=touch.reason,
            sender=dict(self.sender),
            touch={
                "id": touch.id,
                "step": touch.step_index,
                "channel": touch.channel,
                "due_at": touch.due_at,
            },
        )
        try:
            parts = channel.render(self.templates, touch.template, context)
        except sandbox.TemplateError as exc:
            return self.finish(s, touch, TouchStatus.failed, f"template: {exc}"), None
        zone = timing.zone_for(context["contact"]["timezone"], spec.calendar, self.engine.default_timezone)
        message = Message(
            key=touch.key,
            touch_id=touch.id or 0,
            channel=touch.channel,
            contact=context["contact"],
            deal=context["deal"],
            reason=touch.reason,
            due_at=touch.due_at,
            local_date=touch.due_at.astimezone(zone).date(),
            parts=parts,
            sender=self.sender,
        )
        return Result(touch_id, TouchStatus.sending), message

    def _delivery_failed(self, touch_id: int, exc: DeliveryError) -> Result:
        with store.session(self.db) as s:
            touch = s.get(Touch, touch_id)
            assert touch is not None
            if exc.transient and touch.attempts < MAX_ATTEMPTS:
                touch.status = TouchStatus.queued
                touch.queued_at = self.clock()
                touch.status_reason = f"retrying: {exc}"
            else:
                self.finish(s, touch, TouchStatus.failed, str(exc))
        if exc.transient and touch.attempts < MAX_ATTEMPTS:
            raise exc  # the broker retries with backoff; the touch is queued again for that retry to claim
        return Result(touch_id, TouchStatus.failed, str(exc))

    def _close(self, s: Session, touch: Touch, status: str, reason: str | None) -> Result:
        touch.status = status
        touch.status_reason = reason
        touch.finished_at = self.clock()
        return Result(touch.id or 0, status, reason)

    def finish(self, s: Session, touch: Touch, status: str, reason: str | None) -> Result:
        """Record how a touch ended and plan the enrollment's next step."""
        result = self._close(s, touch, status, reason)
        self.metrics.touches.labels(touch.channel, status).inc()
        enrollment = s.get(Enrollment, touch.enrollment_id)
        assert enrollment is not None
        if enrollment.status == EnrollmentStatus.active:
            self.engine.plan(s, enrollment, touch.step_index + 1, self.clock())
        return result
