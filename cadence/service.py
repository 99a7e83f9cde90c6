"""The service assembled from settings: store, rules, channels, engine, dispatcher, scheduler, broker."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from dramatiq import Worker
from dramatiq.middleware.time_limit import TimeLimitExceeded
from sqlmodel import Session, col, select

from cadence import broker as brokers
from cadence import diff, sandbox, store
from cadence import rules as ruleset
from cadence.clock import Clock, system_clock
from cadence.crm import adapters
from cadence.digest import Digests
from cadence.dispatch import BATCH_SIZE, Batch, Dispatcher
from cadence.engine import Engine, pick_variant, stable_fraction
from cadence.errors import RulesError
from cadence.inbox import Inbox, Reader
from cadence.language import CadenceSpec
from cadence.metrics import Metrics
from cadence.models import Contact, Enrollment, EnrollmentStatus, Outcome, Touch
from cadence.outbound import Poster
from cadence.rules import RuleSet
from cadence.scheduler import Scheduler
from cadence.settings import Settings
from channels import Channel
from channels.call import CallTasks
from channels.email import EmailOutbox
from channels.letter import LetterOutbox
from channels.limits import Limits
from channels.sms import SmsOutbox

log = logging.getLogger(__name__)

#: Touches of a repeat a timeline shows ahead.
PROJECTED_REPEATS = 3


def build_channels(settings: Settings, db: Any, clock: Clock) -> dict[str, Channel]:
    """Each channel with the provider the settings choose; the file outbox is the embedded default."""
    limits = Limits(settings.redis_url)
    email: Channel = EmailOutbox(settings.outbox_dir)
    if settings.email_provider == "smtp":
        from channels.email_smtp import SmtpEmail

        email = SmtpEmail(settings, limits)
    sms: Channel = SmsOutbox(settings.outbox_dir)
    if settings.sms_provider == "gateway":
        from channels.sms_gateway import SmsGateway

        sms = SmsGateway(settings, limits)
    letter: Channel = LetterOutbox(settings.outbox_dir)
    if settings.letter_provider == "print-api":
        from channels.letter_print import PrintApiLetters

        letter = PrintApiLetters(settings, limits)
    elif settings.letter_provider == "batch":
        from channels.letter_batch import BatchLetters

        letter = BatchLetters(settings)
    channels = [email, sms, letter, CallTasks(db, clock)]
    return {channel.name: channel for channel in channels}


class Service:
    """Everything one process needs; `cadence serve`, `worker` and `scheduler` each build one."""

    def __init__(self, settings: Settings, clock: Clock = system_clock) -> None:
        self.settings = settings
        self.clock = clock
        self.db = store.create_engine(settings.database_url)
        store.migrate(self.db)
        self._rules = self._load_rules()
        self._reloading = threading.RLock()
        self.engine = Engine(
            lambda: self._rules, settings.default_timezone, activity=bool(settings.outbound_url)
        )
        self.poster = Poster(self.db, settings, clock)
        self.channels = build_channels(settings, self.db, clock)
        self.digests = Digests(self.db, settings, self.channels["email"], clock)
        self.templates = sandbox.template_environment(settings.templates_dir)
        self.metrics = Metrics()
        self.metrics.watch_backlog(self.db, clock)
        self.dispatcher = Dispatcher(
            self.db,
            self.engine,
            self.channels,
            self.templates,
            settings.sender(),
            clock,
            self.metrics,
            # Half a send's limit to begin sends, the other half for the last of them and the record: the
            # batch ends within one send's limit of its claim, well inside the lease, as one touch does.
            batch_seconds=settings.send_time_limit_seconds / 2,
        )
        #: The webhook adapters, by source, made once.
        self.adapters = adapters()
        self.inbox = Inbox(self.db, self.engine, clock, self.metrics, self._reader)
        self.broker = brokers.create_broker(settings.redis_url)
        self.actor = brokers.declare_dispatch(self.broker, self.dispatcher.dispatch)
        self.batch_actor = brokers.declare_dispatch_many(self.broker, self._dispatch_batch)
        #: Turns at sending a batch (see `Settings.worker_batches`).
        self._batch_turns = threading.BoundedSemaphore(settings.worker_batches)
        #: Deliveries stored in a burst are acted on by workers, like touches.
        inbox_actor = brokers.declare_inbox(self.broker, self.inbox.act_on)
        self.inbox.hand_off = lambda row_ids: brokers.send_all(inbox_actor, row_ids)
        self.scheduler = Scheduler(
            self.db,
            send=self._queue,
            clock=clock,
            batch_size=settings.scheduler_batch_size,
            lease=timedelta(seconds=settings.lease_seconds),
            take_back=self.dispatcher.take_back,
            replay_inbox=self.inbox.replay,
            blocks_ended=self.engine.blocks_ended,
            post_activity=self.poster.post_pending,
            send_digests=self.digests.send_due,
            send_all=self._queue_all,
        )
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._worker: Worker | None = None
        self._hangup: Any = None

    @property
    def rules(self) -> RuleSet:
        return self._rules

    def _load_rules(self) -> RuleSet:
        return ruleset.load([self.settings.rules_dir], self.settings.templates_dir)

    def reload_rules(self) -> diff.RulesDiff:
        """Load the rules again, all or nothing: on any error the loaded ones stay in force and the error is
        raised. Returns what changed; running enrollments keep the version they started on."""
        with self._reloading:
            old = self._rules
            try:
                new = self._load_rules()
            except RulesError as exc:
                log.error("rules not reloaded", extra={"problems": [str(p) for p in exc.problems]})
                raise
            self._rules = new
            sandbox.forget_templates(self.templates)  # checked with the rules: edits go live now
        changes = diff.compare_rules(old, new)
        moved = [f"{c.name} {c.status}" for c in changes.cadences if c.status != "unchanged"]
        log.info("rules reloaded", extra={"cadences": moved, "policy_changed": bool(changes.policy)})
        return changes

    def _reload_on_hangup(self) -> None:
        """SIGHUP reloads the rules; a failed reload is logged and the loaded rules stay. Signals reach only
        the main thread, so a process listens when its worker or scheduler was started there."""
        if self._hangup is not None or threading.current_thread() is not threading.main_thread():
            return
        self._hangup = signal.signal(signal.SIGHUP, self._on_hangup) or signal.SIG_DFL

    def _on_hangup(self, signum: int, frame: Any) -> None:
        with contextlib.suppress(RulesError):  # reload_rules has logged it
            self.reload_rules()

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
                    "variant": t.variant,
                    "reason": t.reason,
                    "due_at": t.due_at,
                    "status": t.status,
                    "status_reason": t.status_reason,
                    "outcomes": [o.name for o in outcomes if o.touch_id == t.id],
                }
                for t in touches
            ]
            if enrollment.status == EnrollmentStatus.active:
                items += self._projected(s, spec, enrollment, touches)
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

    def _projected(
        self, s: Session, spec: CadenceSpec, enrollment: Enrollment, touches: Sequence[Touch]
    ) -> list[dict[str, Any]]:
        """The touches still to come, as planning would place them one after another: the remaining steps
        and the next few of a repeat."""
        contact = s.get_one(Contact, enrollment.contact_id)
        first = max((t.step_index for t in touches), default=-1) + 1
        previous = max((t.due_at for t in touches), default=enrollment.started_at)
        items: list[dict[str, Any]] = []
        index = first
        while (point := spec.touchpoint(index)) is not None and index < max(
            first, len(spec.steps)
        ) + PROJECTED_REPEATS:
            variant = pick_variant(point.variants, stable_fraction(enrollment.id, index))
            option = point.options()[0]
            channel = (variant and variant.channel) or option.channel
            previous = self.engine.due(spec, contact, enrollment, index, channel, previous)
            conditions = [
                f"if {point.when}" if point.when else "",
                f"unless {point.skip_when}" if point.skip_when else "",
            ]
            items.append(
                {
                    "touch_id": None,
                    "step": index,
                    "iteration": 0,
                    "channel": channel if not point.choose else " or ".join(o.channel for o in point.choose),
                    "template": (variant and variant.template) or option.template,
                    "variant": variant.name if variant else None,
                    "reason": point.reason,
                    "due_at": previous,
                    "status": "projected",
                    "status_reason": "; ".join(c for c in conditions if c) or None,
                    "outcomes": [],
                }
            )
            index += 1
        return items

    def _reader(self, source: str) -> Reader | None:
        """The reader of a source's deliveries, with the rules (and so the CRM mapping) loaded now."""
        adapter = self.adapters.get(source)
        if adapter is None:
            return None
        return lambda body: adapter.read(body, self._rules)

    def _queue(self, touch_id: int) -> None:
        # The limit travels with the message, so every worker honours this deployment's setting.
        limit_ms = self.settings.send_time_limit_seconds * 1000
        self.actor.send_with_options(args=(touch_id,), time_limit=limit_ms)

    def _queue_all(self, touch_ids: list[int]) -> None:
        """Touches claimed by the scheduler: BATCH_SIZE to a message, sent together where their channels
        allow (see `Dispatcher.dispatch_many`); a batch has one send's time limit."""
        batches = [touch_ids[n : n + BATCH_SIZE] for n in range(0, len(touch_ids), BATCH_SIZE)]
        brokers.send_all(self.batch_actor, batches, time_limit=self.settings.send_time_limit_seconds * 1000)

    def _queue_each(self, touch_ids: list[int]) -> None:
        brokers.send_all(self.actor, touch_ids, time_limit=self.settings.send_time_limit_seconds * 1000)

    def _dispatch_batch(self, touch_ids: list[int]) -> None:
        """A worker's batch: what may go together goes together, the rest in a message each; after any
        error or time limit, each touch gets a message of its own (one already sent finds nothing to do).
        It waits for a turn first (see `Settings.worker_batches`); the wait counts against the batch's time,
        as it does against the message's time limit."""
        batch = Batch()
        began = time.monotonic()
        try:
            with self._batch_turns:
                self.dispatcher.dispatch_many(touch_ids, self._queue_each, batch, began)
        except (Exception, TimeLimitExceeded):
            log.exception("a batch of touches failed; each is queued alone", extra={"touches": touch_ids})
            waiting = {touch_id for touch_id, _ in batch.retries}  # these keep their pause before a retry
            self._queue_each([touch_id for touch_id in touch_ids if touch_id not in waiting])
        limit_ms = self.settings.send_time_limit_seconds * 1000
        for touch_id, attempts in batch.retries:
            delay = brokers.retry_delay_ms(attempts)
            self.actor.send_with_options(args=(touch_id,), time_limit=limit_ms, delay=delay)

    def start_worker(self, threads: int | None = None, poll_ms: int = 1000) -> Worker:
        """Worker threads in this process; `poll_ms` bounds how long stopping waits for idle consumers."""
        self._worker = Worker(
            self.broker, worker_threads=threads or self.settings.worker_threads, worker_timeout=poll_ms
        )
        self._worker.start()
        self._reload_on_hangup()
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
        self._reload_on_hangup()
        return thread

    def stop(self) -> None:
        if self._hangup is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGHUP, self._hangup)
            self._hangup = None
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
