"""The service assembled from settings: store, rules, channels, engine, dispatcher, scheduler, broker."""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from typing import Any

from dramatiq import Worker
from sqlmodel import col, select

from cadence import broker as brokers
from cadence import rules as ruleset
from cadence import sandbox, store
from cadence.clock import Clock, system_clock
from cadence.dispatch import Dispatcher
from cadence.engine import Engine
from cadence.inbox import Inbox
from cadence.metrics import Metrics
from cadence.models import Contact, Enrollment, EnrollmentStatus, Outcome, Touch
from cadence.rules import RuleSet
from cadence.scheduler import Scheduler
from cadence.settings import Settings
from channels import Channel
from channels.call import CallTasks
from channels.email import EmailOutbox
from channels.letter import LetterOutbox
from channels.sms import SmsOutbox

log = logging.getLogger(__name__)


def build_channels(settings: Settings, db: Any, clock: Clock) -> dict[str, Channel]:
    channels: list[Channel] = [
        EmailOutbox(settings.outbox_dir),
        SmsOutbox(settings.outbox_dir),
        LetterOutbox(settings.outbox_dir),
        CallTasks(db, clock),
    ]
    return {channel.name: channel for channel in channels}


class Service:
    """Everything one process needs; `cadence serve`, `worker` and `scheduler` each build one."""

    def __init__(self, settings: Settings, clock: Clock = system_clock) -> None:
        self.settings = settings
        self.clock = clock
        self.db = store.create_engine(settings.database_url)
        store.migrate(self.db)
        self._rules = self._load_rules()
        self.engine = Engine(lambda: self._rules, settings.default_timezone)
        self.channels = build_channels(settings, self.db, clock)
        self.templates = sandbox.template_environment(settings.templates_dir)
        self.metrics = Metrics()
        self.dispatcher = Dispatcher(
            self.db, self.engine, self.channels, self.templates, settings.sender(), clock, self.metrics
        )
        self.inbox = Inbox(self.db, self.engine, clock, self.metrics)
        self.broker = brokers.create_broker(settings.redis_url)
        self.actor = brokers.declare_dispatch(self.broker, self.dispatcher.dispatch)
        self.scheduler = Scheduler(
            self.db,
            send=self._queue,
            clock=clock,
            batch_size=settings.scheduler_batch_size,
            lease=timedelta(seconds=settings.lease_seconds),
            take_back=self.dispatcher.take_back,
            replay_inbox=self.inbox.replay,
        )
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._worker: Worker | None = None

    @property
    def rules(self) -> RuleSet:
        return self._rules

    def _load_rules(self) -> RuleSet:
        return ruleset.load([self.settings.rules_dir], self.settings.templates_dir)

    def reload_rules(self) -> RuleSet:
        """Load the rules again; on any error the loaded ones stay in force and the error is raised."""
        self._rules = self._load_rules()
        return self._rules

    def timeline(self, enrollment_id: int) -> dict[str, Any] | None:
        """The enrollment's touches as stored, the steps still to come by the cadence's days, its outcomes."""
        with store.session(self.db) as s:
            enrollment = s.get(Enrollment, enrollment_id)
            if enrollment is None:
                return None
            spec = self.engine.spec_of(s, enrollment)
            touches = s.exec(
                select(Touch)
                .where(Touch.enrollment_id == enrollment_id)
                .order_by(col(Touch.due_at), col(Touch.id))
            ).all()
            outcomes = s.exec(
                select(Outcome)
                .where(Outcome.enrollment_id == enrollment_id)
                .order_by(col(Outcome.occurred_at))
            ).all()
            items: list[dict[str, Any]] = [
                {
                    "touch_id": t.id,
                    "step": t.step_index,
                    "iteration": t.iteration,
                    "channel": t.channel,
                    "template": t.template,
                    "reason": t.reason,
                    "due_at": t.due_at,
                    "status": t.status,
                    "status_reason": t.status_reason,
                    "outcomes": [o.name for o in outcomes if o.touch_id == t.id],
                }
                for t in touches
            ]
            if enrollment.status == EnrollmentStatus.active:
                contact = s.get_one(Contact, enrollment.contact_id)
                for index in range(max((t.step_index for t in touches), default=-1) + 1, len(spec.steps)):
                    step = spec.steps[index]
                    items.append(
                        {
                            "touch_id": None,
                            "step": index,
                            "iteration": 0,
                            "channel": step.channel,
                            "template": step.template,
                            "reason": step.reason,
                            "due_at": self.engine.due(spec, contact, enrollment.started_at, index),
                            "status": "projected",
                            "status_reason": step.when and f"if {step.when}",
                            "outcomes": [],
                        }
                    )
            return {
                "id": enrollment.id,
                "cadence": enrollment.cadence_name,
                "cadence_version": enrollment.cadence_version_id,
                "contact_id": enrollment.contact_id,
                "deal_id": enrollment.deal_id,
                "status": enrollment.status,
                "started_at": enrollment.started_at,
                "ended_at": enrollment.ended_at,
                "end_reason": enrollment.end_reason,
                "origin": enrollment.origin,
                "touches": items,
                "outcomes": [
                    {"id": o.id, "name": o.name, "touch_id": o.touch_id, "note": o.note, "at": o.occurred_at}
                    for o in outcomes
                ],
            }

    def _queue(self, touch_id: int) -> None:
        self.actor.send(touch_id)

    def start_worker(self, threads: int | None = None, poll_ms: int = 1000) -> Worker:
        """Worker threads in this process; `poll_ms` bounds how long stopping waits for idle consumers."""
        self._worker = Worker(
            self.broker, worker_threads=threads or self.settings.worker_threads, worker_timeout=poll_ms
        )
        self._worker.start()
        return self._worker

    def start_scheduler(self) -> threading.Thread:
        thread = threading.Thread(
            target=self.scheduler.run,
            args=(self._stop, self.settings.scheduler_interval_seconds),
            name="cadence-scheduler",
            daemon=True,
        )
        thread.start()
        self._threads.append(thread)
        return thread

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        if self._worker is not None:
            self._worker.stop()
            self._worker = None
        self.broker.close()
        self.db.dispose()


def run_embedded(service: Service) -> None:
    """The embedded mode's background parts: worker threads and the scheduler, inside the server process."""
    if not service.settings.embedded_broker:
        return
    service.start_worker()
    service.start_scheduler()
