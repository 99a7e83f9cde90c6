"""Dispatch end to end: touches per second from due to sent, beside Dramatiq's own floor, and worker memory.

N enrollments each have a touch due now (an email or a call, the first step of a cadence written for the
bench, with a second step so sending plans the next touch). The scheduler claims them here, in this process,
and queues their ids on a throwaway Redis, a batch to a message; `cadence worker` processes send them: late
checks, render, file outbox (or a call task), receipt, next touch planned. The time runs from the first
claim to the last touch finished, as the database records them. Dramatiq's floor: the same number of worker
processes and threads on the same Redis, running a no-op actor (bench/noop_actor.py) on N messages queued
before they start, timed from the first message processed to the last.
Each worker's RSS (with its children) is sampled every 100 ms during the Cadence run. From when the workers
are ready until the run is done, their CPU time is counted (printed a touch, or a message), and the whole
machine's split between user, kernel and idle.

Targets: Cadence at least 1,000 touches/s and at least half of Dramatiq's floor; each worker under 200 MB.
The database is PostgreSQL by default, started for the run: Redis with `cadence worker` processes is the
production way to run, and PostgreSQL its database. SQLite (--database sqlite) lets one transaction write at
a time, so its workers take turns at their batches, whatever their number. The tables are analyzed after
loading, as autovacuum analyzes a deployment's. Run from the repository root:

    .venv/bin/python bench/dispatch.py [--touches 10000] [--processes 2] [--threads 4]
        [--database postgresql|sqlite] [--log-level INFO] [--timeout 90] [--profile DIR] [--keep]

Each run stops after --timeout seconds and then reports the rate of what it finished, marked as cut short.
--profile DIR records the first Cadence worker with py-spy during the run (flame graph and raw stacks).
Everything lives in a new temporary folder (in $TMPDIR, else /tmp), removed at the end unless --keep.
On ext4 without a journal, files made in a folder near many files deleted in the last few minutes cost the
kernel several times more (see bench/RESULTS.md): the run after a test suite or another run shows it as a
larger kernel share.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import sqlalchemy as sa
from sqlmodel import col, insert, select

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import noop_actor  # noqa: E402

from cadence import broker as brokers  # noqa: E402
from cadence import store  # noqa: E402
from cadence.models import Contact, Deal, Enrollment, Touch, TouchStatus  # noqa: E402
from cadence.service import Service  # noqa: E402
from cadence.settings import Settings  # noqa: E402
from tests import servers  # noqa: E402

#: Seconds a worker process may take to start (imports, migrations, rules) before the bench gives up.
WORKER_START_SECONDS = 60.0
#: Seconds a worker process has to stop after SIGTERM before it is killed.
WORKER_STOP_SECONDS = 15.0
#: Seconds either run may take by default; a run cut short reports the rate of what it finished.
RUN_TIMEOUT_SECONDS = 90.0
#: Seconds between polls of the database or the Redis counter for progress. The runs are timed by what the
#: database and the counter record, so polling less often changes nothing timed; polling every 50 ms (a
#: count of all the touches by status each time) took 15% of PostgreSQL's rate from the system measured.
POLL_SECONDS = 0.5
#: Seconds between RSS samples of the worker processes.
SAMPLE_SECONDS = 0.1
#: Seconds between scheduler ticks once the first has claimed everything due: the service's default
#: (SCHEDULER_INTERVAL_SECONDS), as a deployment runs it. Ticks every 0.2 s took about 9% of PostgreSQL's
#: rate.
TICK_SECONDS = 5.0
#: Local hour the contacts are placed at, inside every channel's quiet hours, so nothing is deferred.
LOCAL_HOUR = 13
#: Touches per second Cadence must reach.
TARGET_TOUCHES_PER_SECOND = 1_000
#: Share of Dramatiq's floor Cadence must reach.
TARGET_SHARE_OF_FLOOR = 0.5
#: Megabytes of RSS each worker process must stay under.
TARGET_RSS_MB = 200
#: Touch statuses still on their way to the person.
IN_FLIGHT = (TouchStatus.planned, TouchStatus.queued, TouchStatus.sending)
#: Line a `cadence worker` prints on stderr once it consumes (a traceback may quote the code, not this).
CADENCE_READY = re.compile(r"^worker running with \d+ threads", re.MULTILINE)
#: Line a `dramatiq` worker process logs once it consumes.
DRAMATIQ_READY = re.compile(r"Worker process is ready for action")

#: The bench's cadences by the channel of their first touch; the second step is planned when the first goes.
CADENCES = {
    "email": """\
cadence: bench-email
description: An email due at once, then a call two days later.
exit:
  on_outcome: [replied, unsubscribed]
  when: deal.status != "open"
steps:
  - day: 0
    channel: email
    template: email/deal-01-proposal-recap
    reason: Recap of the proposal and the one open question.
  - day: 2
    channel: call
    template: call/deal-02-walkthrough
    reason: Confirm the proposal arrived; book a walkthrough.
""",
    "call": """\
cadence: bench-call
description: A call task due at once, then an email two days later.
exit:
  on_outcome: [replied, meeting_booked]
  when: deal.status != "open"
steps:
  - day: 0
    channel: call
    template: call/deal-02-walkthrough
    reason: Confirm the proposal arrived; book a walkthrough.
  - day: 2
    channel: email
    template: email/deal-03-case-study
    reason: A case study of a comparable client.
""",
}


@dataclass
class Run:
    """One timed run: items done, seconds from the first hand-off to the last, peak RSS per worker."""

    done: int
    seconds: float
    #: False when the run was cut short at the timeout.
    complete: bool
    peak_mb: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    #: Touches per second the scheduler claimed and queued (Cadence only).
    claim_rate: float = 0.0
    #: CPU seconds the workers spent from when they were ready until the run was done (both processes).
    cpu_seconds: float = 0.0
    #: The whole machine's CPU meanwhile, in shares: user, kernel, idle (see `Sampler.machine`).
    machine: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def rate(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0

    def summary(self, verb: str) -> str:
        cut = "" if self.complete else " (cut short at the timeout)"
        peaks = ", ".join(f"{mb:.0f}" for mb in self.peak_mb)
        cpu = 1000 * self.cpu_seconds / self.done if self.done else 0.0
        user, kernel, idle = self.machine
        return (
            f"{self.done} {verb} in {self.seconds:.2f} s{cut}; worker peaks {peaks} MB; "
            f"worker CPU {cpu:.2f} ms each; machine {user:.0%} user, {kernel:.0%} kernel, {idle:.0%} idle"
        )


@dataclass
class Setup:
    """What both runs share: the servers' URLs, the worker shape, and the folder everything lives in."""

    folder: Path
    redis_url: str
    database_url: str
    processes: int
    threads: int
    log_level: str
    profile: Path | None
    timeout: float


def _zone_at_local_hour(now: datetime, hour: int) -> str:
    """A fixed-offset zone in which `now` falls at `hour`, so quiet hours never defer the bench's calls."""
    offset = (hour - now.hour + 12) % 24 - 12
    return f"Etc/GMT{-offset:+d}" if offset else "UTC"


def _write_rules(folder: Path) -> None:
    """The shipped policy (blocks, quiet hours, caps: all checked at send time) and the bench's cadences."""
    rules = folder / "rules"
    rules.mkdir()
    shutil.copy(ROOT / "rules" / "policy.yaml", rules / "policy.yaml")
    for channel, text in CADENCES.items():
        (rules / f"bench-{channel}.yaml").write_text(text)


def _settings(setup: Setup) -> Settings:
    return Settings(
        database_url=setup.database_url,
        redis_url=setup.redis_url,
        rules_dir=setup.folder / "rules",
        templates_dir=ROOT / "templates",
        outbox_dir=setup.folder / "outbox",
        secret_key="bench",
        log_level=setup.log_level,
        team_file=setup.folder / "team.yaml",
    )


def _environment(setup: Setup) -> dict[str, str]:
    """The workers' environment: the same settings the bench's own service uses."""
    settings = _settings(setup)
    names = (
        "database_url", "redis_url", "rules_dir", "templates_dir", "outbox_dir", "secret_key", "log_level",
        "team_file",
    )  # fmt: skip
    values = {name.upper(): str(getattr(settings, name)) for name in names}
    return {**os.environ, **values, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "bench")])}


# --- data ---------------------------------------------------------------------------------------------------


def _prototype(service: Service, channel: str, zone: str, now: datetime) -> int:
    """One enrollment made by the engine itself; the bulk copies repeat its rows. Returns its id."""
    with store.session(service.db) as s:
        contact = Contact(
            source="bench",
            external_id=f"{channel}-0",
            name="Dana Prototype",
            email="dana@example.com",
            phone="+15555550100",
            timezone=zone,
            attributes={"first_name": "Dana", "company": "Example Ltd", "sms_consent": True},
            created_at=now,
            updated_at=now,
        )
        s.add(contact)
        s.flush()
        deal = Deal(
            source="bench",
            external_id=f"{channel}-0",
            contact_id=contact.id,
            title="Warehouse automation",
            stage="proposal_sent",
            amount=25_000,
            currency="EUR",
            owner="alex",
            probability=0.4,
            created_at=now,
            updated_at=now,
        )
        s.add(deal)
        s.flush()
        enrollment = service.engine.enroll(s, f"bench-{channel}", contact, deal, now, origin="bench")
        assert enrollment is not None and enrollment.id is not None
        return enrollment.id


def _copies(db: sa.Engine, enrollment_id: int, count: int) -> None:
    """`count` more enrollments like the prototype, each with its own contact, deal and due touch."""
    with store.session(db) as s:
        enrollment = s.get_one(Enrollment, enrollment_id)
        contact = s.get_one(Contact, enrollment.contact_id)
        deal = s.get_one(Deal, enrollment.deal_id)
        touch = s.exec(select(Touch).where(Touch.enrollment_id == enrollment_id)).one()
        fields = {
            model: row.model_dump(exclude={"id"})
            for model, row in ((Contact, contact), (Deal, deal), (Enrollment, enrollment), (Touch, touch))
        }

        def add(model: type[Any], rows: list[dict[str, Any]]) -> list[int]:
            returned = s.execute(
                insert(model).returning(model.id, sort_by_parameter_order=True),
                [{**fields[model], **row} for row in rows],
            )
            return list(returned.scalars())

        tag = f"{enrollment.cadence_name}-{enrollment_id}"
        contacts = add(
            Contact,
            [{"external_id": f"{tag}-{n}", "email": f"c{n}.{tag}@example.com"} for n in range(count)],
        )
        deals = add(Deal, [{"external_id": f"{tag}-{n}", "contact_id": c} for n, c in enumerate(contacts)])
        pairs = zip(contacts, deals, strict=True)
        enrollments = add(
            Enrollment, [{"contact_id": c, "deal_id": d, "subject": f"deal:{d}"} for c, d in pairs]
        )
        add(Touch, [{"enrollment_id": e} for e in enrollments])


def make_touches(service: Service, count: int, now: datetime) -> None:
    """`count` due touches, shared out among the bench's cadences in turn."""
    zone = _zone_at_local_hour(now, LOCAL_HOUR)
    channels = list(CADENCES)
    for index, channel in enumerate(channels):
        share = count // len(channels) + (index < count % len(channels))
        if share:
            _copies(service.db, _prototype(service, channel, zone, now), share - 1)
    if service.db.dialect.name == "postgresql":
        # Statistics for the planner, as autovacuum gathers them after a bulk load; without them a run's
        # plans, and its rate, depend on whether autovacuum's first ANALYZE lands before it or during it.
        with service.db.connect() as connection:
            connection.execution_options(isolation_level="AUTOCOMMIT").execute(sa.text("ANALYZE"))


def touch_statuses(db: sa.Engine) -> dict[str, int]:
    """Touches of the first step by status."""
    with db.connect() as connection:
        rows = connection.execute(
            sa.select(col(Touch.status), sa.func.count())
            .where(col(Touch.step_index) == 0)
            .group_by(col(Touch.status))
        ).all()
    return {status: number for status, number in rows}


def span(db: sa.Engine) -> tuple[int, float, float]:
    """First-step touches claimed; seconds from the first claim to the last, and to the last finished."""
    with db.connect() as connection:
        claimed, first, last, finished = connection.execute(
            sa.select(
                sa.func.count(col(Touch.queued_at)),
                sa.func.min(col(Touch.queued_at)),
                sa.func.max(col(Touch.queued_at)),
                sa.func.max(col(Touch.finished_at)),
            ).where(col(Touch.step_index) == 0)
        ).one()
    if first is None or last is None or finished is None:
        return claimed, 0.0, 0.0
    return claimed, (last - first).total_seconds(), (finished - first).total_seconds()


def planned_next(db: sa.Engine) -> int:
    with db.connect() as connection:
        return int(
            connection.execute(
                sa.select(sa.func.count()).select_from(Touch).where(col(Touch.step_index) == 1)
            ).scalar_one()
        )


# --- processes ----------------------------------------------------------------------------------------------


@contextmanager
def workers(
    argv: list[str], setup: Setup, ready: re.Pattern[str], name: str
) -> Iterator[list[psutil.Process]]:
    """`setup.processes` copies of `argv`, started, waited for until each has logged `ready`, and stopped."""
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    try:
        for n in range(setup.processes):
            log = setup.folder / f"{name}-{n}.log"
            with log.open("wb") as out:
                procs.append(
                    subprocess.Popen(
                        argv,
                        cwd=setup.folder,
                        env=_environment(setup),
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )
            logs.append(log)
        deadline = time.monotonic() + WORKER_START_SECONDS
        for proc, log in zip(procs, logs, strict=True):
            while not ready.search(log.read_text(errors="replace")):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{name} worker did not start; its log:\n{log.read_text()[-3000:]}")
                time.sleep(POLL_SECONDS)
        yield [psutil.Process(proc.pid) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=WORKER_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class Sampler(threading.Thread):
    """Peak RSS of each process with its children, sampled until stopped; and their CPU time meanwhile."""

    def __init__(self, procs: list[psutil.Process]) -> None:
        super().__init__(daemon=True)
        self.procs = procs
        self.peaks = [0.0] * len(procs)
        self.done = threading.Event()
        self._cpu_at_start = self._cpu_now()
        self._machine_at_start = psutil.cpu_times()
        #: CPU seconds of all the processes from the sampler's making until it was stopped.
        self.cpu_seconds = 0.0
        #: The whole machine's CPU time over the same span, in shares: user (with nice), kernel (with
        #: interrupts), idle (with waits for the disk). A file system that makes files slowly shows as kernel.
        self.machine = (0.0, 0.0, 0.0)

    def _cpu_now(self) -> float:
        return sum(self._total(proc, lambda one: sum(one.cpu_times()[:2])) for proc in self.procs)

    @staticmethod
    def _total(proc: psutil.Process, measure: Callable[[psutil.Process], float]) -> float:
        """`measure` of the process and its children, summed over those still running (0 once it is gone)."""
        try:
            family = [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0.0
        total = 0.0
        for each in family:
            try:
                total += measure(each)
            except psutil.NoSuchProcess:
                continue
        return total

    def run(self) -> None:
        while not self.done.is_set():
            for n, proc in enumerate(self.procs):
                rss = self._total(proc, lambda one: one.memory_info().rss)
                self.peaks[n] = max(self.peaks[n], rss / 2**20)
            self.done.wait(SAMPLE_SECONDS)
        self.cpu_seconds = self._cpu_now() - self._cpu_at_start
        spent = {
            name: value - getattr(self._machine_at_start, name)
            for name, value in psutil.cpu_times()._asdict().items()
        }
        total = sum(spent.values()) or 1.0

        def share(*names: str) -> float:
            return sum(spent.get(name, 0.0) for name in names) / total

        self.machine = (share("user", "nice"), share("system", "irq", "softirq"), share("idle", "iowait"))


def _wait_for(finished: Callable[[], bool], procs: list[psutil.Process], timeout: float, what: str) -> bool:
    """Whether `finished` came true within `timeout` seconds; raises if a worker dies meanwhile."""
    deadline = time.monotonic() + timeout
    while not finished():
        if time.monotonic() > deadline:
            return False
        if not all(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE for proc in procs):
            raise RuntimeError(f"a worker of {what} died; see its log")
        time.sleep(POLL_SECONDS)
    return True


@contextmanager
def py_spy(pid: int, folder: Path | None) -> Iterator[None]:
    """py-spy recording `pid` while the block runs, when a folder is given."""
    if folder is None:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    spy = str(Path(sys.executable).with_name("py-spy"))
    recorders = [
        subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--rate", "200", "--format", form, "-o", str(folder / out)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for form, out in (("flamegraph", "worker.svg"), ("raw", "worker.txt"))
    ]
    try:
        yield
    finally:
        for recorder in recorders:
            recorder.send_signal(signal.SIGINT)
        for recorder in recorders:
            try:
                recorder.wait(timeout=WORKER_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                recorder.kill()
                recorder.wait()


# --- the two runs -------------------------------------------------------------------------------------------


def run_cadence(setup: Setup, count: int) -> Run:
    service = Service(_settings(setup))
    # Polls read without the service's BEGIN IMMEDIATE, so they never queue for SQLite's write lock.
    watch = sa.create_engine(setup.database_url)
    try:
        make_touches(service, count, datetime.now(UTC))
        argv = [sys.executable, "-m", "cadence", "worker", "--threads", str(setup.threads)]
        with workers(argv, setup, CADENCE_READY, "cadence") as procs:
            sampler = Sampler(procs)
            stop = threading.Event()
            sampler.start()
            with py_spy(procs[0].pid, setup.profile):
                scheduler = threading.Thread(target=service.scheduler.run, args=(stop, TICK_SECONDS))
                scheduler.start()
                try:
                    complete = _wait_for(
                        lambda: not any(touch_statuses(watch).get(s) for s in IN_FLIGHT),
                        procs,
                        setup.timeout,
                        "the Cadence run",
                    )
                finally:
                    stop.set()
                    scheduler.join()
                    sampler.done.set()
                    sampler.join()
        statuses = touch_statuses(watch)
        statuses["next planned"] = planned_next(watch)
        claimed, claiming, seconds = span(watch)
        sent = statuses.get(TouchStatus.sent, 0)
        claim_rate = claimed / claiming if claiming else 0.0
        return Run(
            sent, seconds, complete, sampler.peaks, statuses, claim_rate, sampler.cpu_seconds, sampler.machine
        )
    finally:
        watch.dispose()
        service.stop()


def run_floor(setup: Setup, count: int) -> Run:
    """N no-op messages queued up front, then consumed; timed by the actor from the first to the last."""
    broker = brokers.create_broker(setup.redis_url)
    actor = noop_actor.declare(broker)
    client: Any = broker.client  # type: ignore[attr-defined]
    client.delete(noop_actor.COUNTER, noop_actor.FIRST, noop_actor.LAST)
    argv = [
        str(Path(sys.executable).with_name("dramatiq")),
        "noop_actor:broker",
        "--path", str(ROOT / "bench"),
        "--processes", "1",
        "--threads", str(setup.threads),
        "--queues", noop_actor.QUEUE,
    ]  # fmt: skip
    try:
        for number in range(count):
            actor.send(number)
        with workers(argv, setup, DRAMATIQ_READY, "dramatiq") as procs:
            sampler = Sampler(procs)
            sampler.start()
            try:
                complete = _wait_for(
                    lambda: int(client.get(noop_actor.COUNTER) or 0) >= count,
                    procs,
                    setup.timeout,
                    "the Dramatiq run",
                )
            finally:
                sampler.done.set()
                sampler.join()
        seconds = float(client.get(noop_actor.LAST)) - float(client.get(noop_actor.FIRST))
        done = int(client.get(noop_actor.COUNTER))
        return Run(
            done, seconds, complete, sampler.peaks, cpu_seconds=sampler.cpu_seconds, machine=sampler.machine
        )
    finally:
        broker.close()


# --- main ---------------------------------------------------------------------------------------------------


def _verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def report(setup: Setup, count: int, cadence: Run, floor: Run, database: str) -> None:
    share = cadence.rate / floor.rate if floor.rate else 0.0
    peak = max(cadence.peak_mb, default=0.0)
    print()
    print(
        f"workers: {setup.processes} processes x {setup.threads} threads, same Redis for both runs; "
        f"database {database}; LOG_LEVEL={setup.log_level}; {count} touches"
    )
    print(f"Cadence first-step touches by status: {cadence.statuses}")
    print()
    print(f"{'what':<44} {'target':>14} {'measured':>14}")
    rows = [
        (
            "Cadence dispatch, touches/s",
            f">= {TARGET_TOUCHES_PER_SECOND}",
            f"{cadence.rate:,.0f}",
            cadence.rate >= TARGET_TOUCHES_PER_SECOND,
        ),
        ("Dramatiq no-op floor, messages/s", "-", f"{floor.rate:,.0f}", True),
        (
            "Cadence / floor",
            f">= {TARGET_SHARE_OF_FLOOR:.0%}",
            f"{share:.0%}",
            share >= TARGET_SHARE_OF_FLOOR,
        ),
        ("peak RSS per Cadence worker, MB", f"< {TARGET_RSS_MB}", f"{peak:.0f}", peak < TARGET_RSS_MB),
    ]
    for what, target, measured, met in rows:
        print(f"{what:<44} {target:>14} {measured:>14}  {_verdict(met) if target != '-' else ''}")
    print()
    print(f"Cadence: {cadence.summary('sent')}; the scheduler claimed and queued {cadence.claim_rate:,.0f}/s")
    print(f"Dramatiq: {floor.summary('processed')}")
    if setup.profile is not None:
        print(f"py-spy profile of the first Cadence worker: {setup.profile}/worker.svg and worker.txt")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--touches", type=int, default=10_000, help="due touches, and no-op messages")
    parser.add_argument("--processes", type=int, default=2, help="worker processes in each run")
    parser.add_argument(
        "--threads", type=int, default=4, help="threads per worker process (the default: `cadence worker`'s)"
    )
    parser.add_argument(
        "--database",
        choices=["postgresql", "sqlite"],
        default="postgresql",
        help="the production database (the default), or SQLite, where one batch writes at a time",
    )
    parser.add_argument("--log-level", default="INFO", help="LOG_LEVEL of the Cadence workers")
    parser.add_argument("--profile", type=Path, help="folder for a py-spy profile of the first worker")
    parser.add_argument(
        "--timeout",
        type=float,
        default=RUN_TIMEOUT_SECONDS,
        help="seconds each run may take; a run cut short reports the rate of what it finished",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (logs, outbox, database)")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="cadence-bench-dispatch-"))
    with ExitStack() as stack:
        if args.keep:
            stack.callback(print, f"kept {folder}")
        else:
            stack.callback(shutil.rmtree, folder, ignore_errors=True)
        redis = stack.enter_context(servers.start_redis())
        postgres = stack.enter_context(servers.start_postgres()) if args.database == "postgresql" else None
        setup = Setup(
            folder=folder,
            redis_url=redis.url,
            database_url=postgres.url if postgres else f"sqlite:///{folder / 'cadence.db'}",
            processes=args.processes,
            threads=args.threads,
            log_level=args.log_level,
            profile=args.profile.resolve() if args.profile else None,
            timeout=args.timeout,
        )
        _write_rules(folder)
        print(f"Dramatiq floor: {args.touches} no-op messages ...", flush=True)
        floor = run_floor(setup, args.touches)
        print(f"Cadence: {args.touches} due touches ...", flush=True)
        cadence = run_cadence(setup, args.touches)
        report(setup, args.touches, cadence, floor, args.database)


if __name__ == "__main__":
    main()
