"""Cadence's real processes under faults: start them, kill them, stop and start the servers beneath them,
and count what reached the outbox, so a lost touch and a doubled one both show.

Shared by tests/test_faults.py (short runs) and bench/soak.py (long ones).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from harness import deal_event
from servers import PostgresServer, RedisServer, _wait_until_ready, free_port
from sqlmodel import select

from cadence import store
from cadence.models import Enrollment, InboundEvent, Touch, TouchStatus

#: Seconds the scheduler sleeps between ticks in these runs.
SCHEDULER_INTERVAL_SECONDS = 0.2
#: Seconds one send may take; short, so that the lease below may be short.
SEND_TIME_LIMIT_SECONDS = 5
#: Seconds before the sweep takes back a touch stuck in queued or sending: the shortest the settings allow.
LEASE_SECONDS = 15
#: Seconds within which the touches a fault stranded must be sent again: the lease, then a minute.
RECOVERY_TARGET_SECONDS = LEASE_SECONDS + 60
#: Seconds to wait for touches to be sent before calling a run hung (a busy machine is slow).
SETTLE_PATIENCE = 600
#: Seconds to wait for a process to answer, or to stop after SIGTERM.
PATIENCE = 60
#: Seconds between looks at the database while waiting.
POLL_SECONDS = 0.25
#: Threads posting webhooks at once.
POSTERS = 8
#: Seconds one webhook may take to be answered (a CRM waits about as long).
WEBHOOK_TIMEOUT_SECONDS = 30.0
#: Worker threads in each `cadence worker`.
WORKER_THREADS = 4
#: Seconds webhooks arrive before Redis stops, and again after it is back.
BEFORE_OUTAGE_SECONDS = 3.0
#: Seconds PostgreSQL stays down at each restart.
DATABASE_DOWN_SECONDS = 3.0
#: Why dispatch fails a non-idempotent touch whose worker was lost mid-send (cadence/dispatch.py).
LOST_DURING_SEND = "worker lost during send"

#: How Census.failed marks a failed touch whose message is in the outbox all the same.
DELIVERED = " (delivered)"

_UNSETTLED = (TouchStatus.planned, TouchStatus.queued, TouchStatus.sending)


#: Templates named `<channel>/hello` that every test cadence run in processes can use.
HELLO_TEMPLATES = [
    ("email", "hello.txt", "Subject: Hello {{ contact.first_name }}\n\n{{ reason }}\n"),
    ("email", "hello.html", "<p>{{ reason }}</p>\n"),
    ("call", "hello.md", "Call {{ contact.name }}: {{ reason }}\n"),
    ("sms", "hello.txt", "{{ reason }}\n"),
]


def write_open_policy_and_templates(rules: Path, templates: Path) -> None:
    """A policy with the caps and quiet hours lifted, so touches are due at once whatever the hour, and
    the `<channel>/hello` templates."""
    (rules / "policy.yaml").write_text("caps: {per_day: null, per_week: null}\nquiet_hours: {}\n")
    for channel, name, text in HELLO_TEMPLATES:
        (templates / channel).mkdir(parents=True, exist_ok=True)
        (templates / channel / name).write_text(text)


def write_rules(folder: Path, steps: int) -> dict[str, str]:
    """A cadence of `steps` touches on the day of enrollment, email and SMS in turn, with the caps and quiet
    hours lifted so every touch is due at once; returns the environment that points Cadence at it."""
    rules, templates = folder / "rules", folder / "templates"
    rules.mkdir(parents=True)
    lines = [
        "cadence: burst",
        "description: Touches all due on the day of enrollment, to keep the workers busy.",
        "enroll:",
        "  on: deal.stage_changed",
        '  when: deal.stage == "proposal_sent"',
        "steps:",
    ]
    for step in range(steps):
        channel = ("email", "sms")[step % 2]
        lines += [
            "  - day: 0",
            f"    channel: {channel}",
            f"    template: {channel}/hello",
            f"    reason: Touch {step + 1} of {steps}.",
        ]
    (rules / "burst.yaml").write_text("\n".join(lines) + "\n")
    write_open_policy_and_templates(rules, templates)
    return {
        "RULES_DIR": str(rules),
        "TEMPLATES_DIR": str(templates),
        "OUTBOX_DIR": str(folder / "outbox"),
        "SCHEDULER_INTERVAL_SECONDS": str(SCHEDULER_INTERVAL_SECONDS),
        "SEND_TIME_LIMIT_SECONDS": str(SEND_TIME_LIMIT_SECONDS),
        "LEASE_SECONDS": str(LEASE_SECONDS),
    }


class Group:
    """`cadence` subprocesses sharing one environment, each logging to its own file, stopped by their pids."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        # Only what the caller sets: a REDIS_URL or DATABASE_URL from the developer's shell must not leak in.
        inherited = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
        self.env = {**inherited, **env}
        self.logs = logs
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        with (self.logs / f"{args[0]}-{len(self.running)}.log").open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "cadence", *args], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        self.running.append(proc)
        return proc

    @staticmethod
    def kill(proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL: no cleanup, no goodbye to the broker, whatever was in flight stays where it was."""
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=PATIENCE)

    def stop(self) -> None:
        for proc in self.running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.running:
            try:
                proc.wait(timeout=PATIENCE / 3)
            except subprocess.TimeoutExpired:
                self.kill(proc)

    def tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.logs.glob("*.log")))


@contextmanager
def server_down(server: RedisServer | PostgresServer) -> Iterator[None]:
    """The server stopped for the length of the block, then started again on the same port (and, for
    PostgreSQL, the same data directory): a restart as an operator or a crash-and-respawn would do it."""
    assert server._proc is not None and server._log is not None
    argv = [str(arg) for arg in server._proc.args]  # type: ignore[union-attr]
    server._shutdown()
    server._log.close()
    try:
        yield
    finally:
        proc = server._spawn(argv)
        ready = server._answers_ping if isinstance(server, RedisServer) else server._accepts_connections
        _wait_until_ready(type(server).__name__, proc, server.log_path, ready)


def wait_for(check: Callable[[], Any], what: str, group: Group, patience: float = PATIENCE) -> Any:
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(POLL_SECONDS)
    raise TimeoutError(f"timed out after {patience:.0f} s waiting for {what}\n{group.tail()}")


def answers(base: str) -> bool:
    try:
        return httpx.get(f"{base}/healthz", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


@dataclass(frozen=True)
class Posted:
    """One webhook and how it was answered: a status code, or None and the transport error in the body."""

    event_id: str
    status: int | None
    body: dict[str, Any]

    @property
    def accepted(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def post_webhook(base: str, number: int) -> Posted:
    """A new deal at proposal_sent for contact `number`: one enrollment in the burst cadence."""
    event = deal_event(f"evt-{number}", deal_id=f"d-{number}", contact_id=f"c-{number}")
    try:
        response = httpx.post(f"{base}/webhooks/generic", json=event, timeout=WEBHOOK_TIMEOUT_SECONDS)
    except httpx.TransportError as exc:
        return Posted(event["event_id"], None, {"error": repr(exc)})
    body = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
    return Posted(event["event_id"], response.status_code, body)


def enroll(base: str, numbers: range) -> list[Posted]:
    """Post one webhook per number, POSTERS at a time."""
    with ThreadPoolExecutor(POSTERS) as pool:
        return list(pool.map(lambda n: post_webhook(base, n), numbers))


@dataclass
class Census:
    """The touches as the database records them, beside what the outbox holds for each key."""

    enrollments: int
    steps: int
    #: (key, channel, status, status_reason, attempts) per touch row.
    touches: list[tuple[str, str, str, str | None, int]]
    #: Lines in sms.jsonl per touch key: the SMS outbox appends, so a second send shows as a second line.
    sms_lines: Counter[str]
    #: Touch keys with an .eml file: the email outbox writes one file per key (it is idempotent).
    emails: set[str]
    #: Event ids in the inbox.
    events: set[str] = field(default_factory=set)
    #: Deliveries stored and not yet acted on (stored in a burst, for a worker).
    waiting: int = 0

    @property
    def by_status(self) -> Counter[str]:
        return Counter(status for _, _, status, _, _ in self.touches)

    @property
    def settled(self) -> bool:
        """Every delivery is acted on, every enrollment has all its touches, and none is still on its way."""
        done = not any(status in _UNSETTLED for _, _, status, _, _ in self.touches)
        return done and not self.waiting and len(self.touches) == self.enrollments * self.steps

    def doubled(self) -> list[str]:
        """Keys delivered more than once."""
        return sorted(key for key, lines in self.sms_lines.items() if lines > 1)

    def lost(self) -> list[str]:
        """Touches recorded sent with nothing in the outbox, or ended another way without a reason."""
        missing = []
        for key, channel, status, reason, _ in self.touches:
            delivered = key in self.emails if channel == "email" else self.sms_lines[key] > 0
            if (status == TouchStatus.sent and not delivered) or (status != TouchStatus.sent and not reason):
                missing.append(key)
        return missing

    def unrecorded(self) -> list[str]:
        """Deliveries in the outbox whose touch the database does not record as sent or failed."""
        ended = {
            key for key, _, status, _, _ in self.touches if status in (TouchStatus.sent, TouchStatus.failed)
        }
        return sorted((self.emails | set(self.sms_lines)) - ended)

    def failed(self) -> Counter[str]:
        """Why touches failed, by reason; DELIVERED ends the reason when the outbox has the message."""
        return Counter(
            f"{reason}{DELIVERED}" if self.sms_lines[key] else str(reason)
            for key, _, status, reason, _ in self.touches
            if status == TouchStatus.failed
        )

    def repeated(self) -> int:
        """Sent touches that took more than one attempt: re-sent after the fault, by the sweep or a retry."""
        return sum(status == TouchStatus.sent and attempts > 1 for _, _, status, _, attempts in self.touches)


def count(database_url: str, outbox: Path, steps: int) -> Census:
    db = store.create_engine(database_url)
    try:
        with store.session(db) as s:
            enrollments = s.exec(select(sa.func.count()).select_from(Enrollment)).one()
            touches = [
                (t.key, t.channel, str(t.status), t.status_reason, t.attempts)
                for t in s.exec(select(Touch)).all()
            ]
            events = set(s.exec(select(InboundEvent.event_id)).all())
            waiting = s.exec(
                select(sa.func.count()).select_from(InboundEvent).where(InboundEvent.status == "received")
            ).one()
    finally:
        db.dispose()
    sms = outbox / "sms.jsonl"
    lines = sms.read_text().splitlines() if sms.exists() else []
    return Census(
        enrollments=enrollments,
        steps=steps,
        touches=touches,
        sms_lines=Counter(json.loads(line)["key"] for line in lines),
        emails={path.stem for path in (outbox / "email").glob("*.eml")},
        events=events,
        waiting=waiting,
    )


@dataclass
class Run:
    """What one fault drill tried, what the database and the outbox hold after it, and how long it took."""

    fault: str
    #: Touches the enrollments made call for (enrollments accepted times steps).
    tried: int
    census: Census
    #: Seconds by phase, the longest when one repeats: "start", "enroll", "before" (sending before the
    #: fault), "fault" (the outages' total length), "recover" (from the fault's end until the touches it
    #: stranded had ended), "settle" (then until every touch had ended).
    timings: dict[str, float]
    posted: list[Posted] = field(default_factory=list)


class _Drill:
    """One deployment in a temp folder: `serve` on a free port, then workers and schedulers as asked."""

    def __init__(self, folder: Path, steps: int, env: dict[str, str]) -> None:
        self.folder, self.steps = folder, steps
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {**write_rules(folder, steps), **env, "PORT": str(self.port)}
        self.group = Group(self.env, folder)
        self.clock = time.monotonic()
        self.timings: dict[str, float] = {}

    def census(self) -> Census:
        return count(self.env["DATABASE_URL"], Path(self.env["OUTBOX_DIR"]), self.steps)

    def lap(self, phase: str) -> None:
        now = time.monotonic()
        self.timings[phase] = max(self.timings.get(phase, 0.0), now - self.clock)
        self.clock = now

    def serve(self) -> None:
        # `serve` migrates the database before it answers; the workers and schedulers start after it.
        self.group.start("serve")
        wait_for(lambda: answers(self.base), "the API to answer", self.group)
        self.lap("start")

    def sent_at_least(self, touches: int) -> None:
        wait_for(
            lambda: self.census().by_status[TouchStatus.sent] >= touches,
            f"{touches} sent",
            self.group,
            SETTLE_PATIENCE,
        )

    def stranded(self, statuses: tuple[str, ...] = _UNSETTLED[1:]) -> set[str]:
        """Keys of the touches on their way right now (by default queued or sending)."""
        return {key for key, _, status, _, _ in self.census().touches if status in statuses}

    def back(self, stranded: set[str]) -> None:
        """Wait until every touch in `stranded` has ended (sent or failed); the time is the recovery's."""

        def ended() -> bool:
            census = self.census()
            return not any(
                key in stranded and status in _UNSETTLED for key, _, status, _, _ in census.touches
            )

        wait_for(ended, "the stranded touches to end", self.group, SETTLE_PATIENCE)
        self.lap("recover")

    def settle(self, fault: str, posted: list[Posted]) -> Run:
        census = wait_for(
            lambda: _if_settled(self.census()), "every touch to settle", self.group, SETTLE_PATIENCE
        )
        self.lap("settle")
        tried = sum(p.accepted for p in posted) * self.steps
        return Run(fault, tried, census, self.timings, posted)


def _if_settled(census: Census) -> Census | None:
    return census if census.settled else None


def kill_a_worker(folder: Path, redis_url: str, database_url: str, enrollments: int, steps: int) -> Run:
    """Enroll, start a worker and a scheduler, SIGKILL the worker once half the touches are sent, start a
    fresh one, and wait for every touch to settle."""
    drill = _Drill(folder, steps, {"REDIS_URL": redis_url, "DATABASE_URL": database_url})
    try:
        drill.serve()
        posted = enroll(drill.base, range(enrollments))
        drill.lap("enroll")
        victim = drill.group.start("worker", "--threads", str(WORKER_THREADS))
        drill.group.start("scheduler")
        drill.sent_at_least(enrollments * steps // 2)
        drill.lap("before")
        drill.group.kill(victim)
        drill.timings["fault"] = 0.0
        # Those it was sending; the messages it had fetched are still in Redis for others to take.
        stranded = drill.stranded((TouchStatus.sending,))
        drill.group.start("worker", "--threads", str(WORKER_THREADS))
        drill.back(stranded)
        return drill.settle("worker SIGKILLed mid-burst", posted)
    finally:
        drill.group.stop()


def stop_redis(folder: Path, redis: RedisServer, database_url: str, outage_seconds: float, steps: int) -> Run:
    """Webhooks arriving all along; Redis stopped for `outage_seconds` and started again empty on its port.
    Every webhook answered 2xx must be stored and its touches sent once."""
    drill = _Drill(folder, steps, {"REDIS_URL": redis.url, "DATABASE_URL": database_url})
    posted: list[Posted] = []
    stop = threading.Event()
    numbers = itertools.count()

    def post_until_stopped() -> None:
        while not stop.is_set():
            posted.append(post_webhook(drill.base, next(numbers)))

    posters = [threading.Thread(target=post_until_stopped, name=f"webhooks-{n}") for n in range(POSTERS)]
    try:
        drill.serve()
        drill.group.start("worker", "--threads", str(WORKER_THREADS))
        drill.group.start("scheduler")
        try:
            for poster in posters:
                poster.start()
            drill.sent_at_least(1)  # the worker and the scheduler are up
            time.sleep(BEFORE_OUTAGE_SECONDS)
            drill.lap("before")
            with server_down(redis):
                time.sleep(outage_seconds)
            drill.lap("fault")
            stranded = drill.stranded()
            time.sleep(BEFORE_OUTAGE_SECONDS)
        finally:
            stop.set()
            for poster in posters:
                if poster.is_alive():
                    poster.join()
        drill.back(stranded)
        return drill.settle(f"Redis stopped {outage_seconds:g} s", posted)
    finally:
        drill.group.stop()


def restart_postgres(
    folder: Path, redis_url: str, postgres: PostgresServer, enrollments: int, steps: int, restarts: int
) -> Run:
    """Enroll, start dispatching, and restart PostgreSQL `restarts` times at even points of the burst (down
    for DATABASE_DOWN_SECONDS each time, same port and data)."""
    database_url = postgres.create_database(f"f_{uuid.uuid4().hex[:12]}")
    drill = _Drill(folder, steps, {"REDIS_URL": redis_url, "DATABASE_URL": database_url})
    try:
        drill.serve()
        posted = enroll(drill.base, range(enrollments))
        drill.lap("enroll")
        drill.group.start("worker", "--threads", str(WORKER_THREADS))
        drill.group.start("scheduler")
        outage = 0.0
        for restart in range(1, restarts + 1):
            drill.sent_at_least(enrollments * steps * restart // (restarts + 1))
            drill.lap("before")
            began = time.monotonic()
            with server_down(postgres):
                time.sleep(DATABASE_DOWN_SECONDS)
            outage += time.monotonic() - began
            drill.clock = time.monotonic()
            drill.back(drill.stranded())
        drill.timings["fault"] = outage
        return drill.settle(f"PostgreSQL restarted {restarts}x", posted)
    finally:
        drill.group.stop()


def post_at_once(folder: Path, database_url: str, copies: int, steps: int) -> Run:
    """The embedded `cadence serve` (real uvicorn), one webhook posted `copies` times at once."""
    drill = _Drill(folder, steps, {"DATABASE_URL": database_url})
    try:
        drill.serve()
        with ThreadPoolExecutor(copies) as pool:
            posted = list(pool.map(lambda _: post_webhook(drill.base, 0), range(copies)))
        drill.lap("fault")
        run = drill.settle(f"one webhook posted {copies}x at once", posted)
        run.tried = steps
        return run
    finally:
        drill.group.stop()
