"""Call list speed: a manager's day list with 1,000,000 touches and their call tasks in the database.

Measures p50 and p95 over --requests requests of each of the two ways a manager reads the day's calls,
through real HTTP (`cadence serve`, uvicorn on loopback, API only: REDIS_URL points at a throwaway Redis so
no scheduler or worker threads run in the server):

- `GET /call-tasks?owner=&date=`: the JSON API (call tasks due that day, highest priority first);
- `GET /managers/{owner}/calls?date=&tz=`: the HTML page (open calls due by that day, overdue first).

Both give a page at a time (50 calls, the API's default and the page's size), as a manager reads them.

Target: p95 < 50 ms for each. The data: --touches call touches (1,000,000 by default) over the past year,
for 10 steps of one enrollment per deal, deals spread over --managers (50): about 55 calls a manager a day.
A smaller run keeps the day's list that long by giving it fewer managers (--touches 200000 --managers 10).
Every sent touch has its call task; calls before the last week are done, with an outcome logged; of the
last week's, one in ten is still open (overdue); today's are open. Rows are loaded in bulk. Run from the
repository root:

    .venv/bin/python bench/calllist.py [--backend sqlite|postgresql] [--touches 1000000] [--managers 50]
        [--requests 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import psutil
import sqlalchemy as sa
from scheduler import NOW, ROOT, Row, bulk_insert, finish_load, load_people, servers, stamp

from cadence import store
from channels.call import script_html

#: Managers (deal owners) the deals are spread over, unless --managers says otherwise.
MANAGERS = 50
#: Steps (touches) each enrollment has.
STEPS = 10
#: Days back the touches are spread over.
DAYS = 365
#: The managers' time zone, and the contacts'.
ZONE = ZoneInfo("Europe/Moscow")
#: Days back in which one open call in OVERDUE_EVERY is left undone.
OVERDUE_DAYS = 7
#: One call in this many of the last week's is still open.
OVERDUE_EVERY = 10
#: Local working hours the calls are due in (hour of day, and length in seconds).
FIRST_HOUR, WORKING_SECONDS = 9, 9 * 3600
#: Seconds the server has to come up.
SERVER_TIMEOUT = 60.0
#: Percentile reported besides the median.
PERCENTILE = 95

SCRIPT = (
    "**Goal:** confirm the proposal arrived and book a walkthrough.\n\n"
    "1. Ask whether the proposal reached the right people.\n"
    "2. Offer two times for a 30-minute walkthrough.\n"
    "3. Note any open question on pricing or timing.\n"
)
#: The script as the call channel keeps it with each task it makes.
SCRIPT_HTML = script_html(SCRIPT)
REASON = "Confirm the proposal arrived; book a walkthrough."


def owner(n: int, managers: int) -> str:
    return f"manager-{n % managers:02d}"


def today() -> date:
    return NOW.astimezone(ZONE).date()


def due(k: int) -> datetime:
    """The k-th touch's due time: a day of the past year (today included), inside local working hours."""
    day = today() - timedelta(days=(k * 7919) % (DAYS + 1))
    start = datetime.combine(day, datetime.min.time(), tzinfo=ZONE) + timedelta(hours=FIRST_HOUR)
    return start + timedelta(seconds=(k * 104729) % WORKING_SECONDS)


def task_status(k: int, day: date) -> str:
    age = (today() - day).days
    if age == 0 or (age <= OVERDUE_DAYS and k % OVERDUE_EVERY == 0):
        return "open"
    return "done"


class Call:
    """The k-th call touch and what came of it, as rows of the touch, call_task and outcome tables."""

    def __init__(self, k: int, enrollments: int, managers: int, ts: Callable[[datetime], Any]) -> None:
        self.id, self.enrollment, self.step = k + 1, k % enrollments + 1, k // enrollments
        self.owner = owner(self.enrollment, managers)
        self.when = due(k)
        self.day = self.when.astimezone(ZONE).date()
        self.status = task_status(k, self.day)
        self.ts = ts

    def touch(self) -> Row:
        at = self.ts(self.when)
        step = (self.id, self.enrollment, self.step, 0, "call", "call/walkthrough", REASON)
        return (*step, at, "sent", at, at, at, 1, "{}")

    def task(self) -> Row:
        e, at = self.enrollment, self.ts(self.when)
        outcome = None if self.status == "open" else "connected"
        who = (e, e, f"Contact {e}", f"+7900{e:07d}")
        what = (REASON, SCRIPT, SCRIPT_HTML, e % 97, self.status, outcome)
        return (self.id, self.id, self.owner, self.day, at, *who, *what, at)

    def outcome(self) -> Row:
        e = self.enrollment
        return (self.id, "connected", e, self.id, e, e, "api", self.ts(self.when + timedelta(minutes=10)))


def load(db: sa.Engine, touches: int, managers: int) -> None:
    enrollments = max(touches // STEPS, 1)
    load_people(db, enrollments, [owner(n, managers) for n in range(managers)])
    ts = stamp(db)

    def calls() -> Iterator[Call]:
        return (Call(k, enrollments, managers, ts) for k in range(touches))

    bulk_insert(
        db,
        "touch",
        ("id", "enrollment_id", "step_index", "iteration", "channel", "template", "reason", "due_at",
         "status", "queued_at", "sending_at", "finished_at", "attempts", "receipt"),
        (c.touch() for c in calls()),
    )  # fmt: skip
    bulk_insert(
        db,
        "call_task",
        ("id", "touch_id", "owner", "due_date", "due_at", "contact_id", "deal_id", "contact_name", "phone",
         "reason", "script", "script_html", "priority", "status", "outcome", "created_at"),
        (c.task() for c in calls()),
    )  # fmt: skip
    bulk_insert(
        db,
        "outcome",
        ("id", "name", "enrollment_id", "touch_id", "contact_id", "deal_id", "source", "occurred_at"),
        (c.outcome() for c in calls() if c.status != "open"),
    )
    finish_load(db, ["cadence_version", "contact", "deal", "enrollment", "touch", "call_task", "outcome"])


def start_server(stack: ExitStack, url: str, redis_url: str, folder: Path) -> tuple[str, psutil.Process]:
    """`cadence serve` on a free loopback port: its base URL once it answers, and its process."""
    port = servers.free_port()
    env = {**os.environ, "DATABASE_URL": url, "REDIS_URL": redis_url, "HOST": "127.0.0.1", "PORT": str(port),
           "OUTBOX_DIR": str(folder / "outbox"), "DEFAULT_TIMEZONE": ZONE.key}  # fmt: skip
    log = stack.enter_context((folder / "server.log").open("wb"))
    server = subprocess.Popen(
        [sys.executable, "-m", "cadence", "serve"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )

    def stop() -> None:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

    stack.callback(stop)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited; see {folder / 'server.log'}")
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return base, psutil.Process(server.pid)
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server did not answer within {SERVER_TIMEOUT:.0f} s")


def measure(
    client: httpx.Client, server: psutil.Process, paths: list[str]
) -> tuple[float, float, float, int]:
    """Median and PERCENTILE-th latency in ms over the paths (after a warm-up), the server's CPU ms per
    request (steadier than latency on a busy machine), and calls per list."""
    for path in dict.fromkeys(paths):
        client.get(path).raise_for_status()
    times, sizes = [], []
    cpu = sum(server.cpu_times()[:2])
    for path in paths:
        start = time.perf_counter()
        response = client.get(path)
        times.append((time.perf_counter() - start) * 1000)
        response.raise_for_status()
        if path.startswith("/call-tasks"):
            sizes.append(len(response.json()["tasks"]))
        else:
            sizes.append(response.text.count('class="task'))
    cpu_ms = (sum(server.cpu_times()[:2]) - cpu) * 1000 / len(paths)
    cut = statistics.quantiles(times, n=100)[PERCENTILE - 1]
    return statistics.median(times), cut, cpu_ms, round(statistics.mean(sizes))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--touches", type=int, default=1_000_000, help="call touches (and tasks) in the db")
    parser.add_argument("--requests", type=int, default=200, help="requests per endpoint")
    parser.add_argument("--managers", type=int, default=MANAGERS, help="managers the deals are spread over")
    args = parser.parse_args()
    day = today().isoformat()
    with ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cadence-bench-")))
        redis = stack.enter_context(servers.start_redis())
        if args.backend == "sqlite":
            url = f"sqlite:///{folder / 'cadence.db'}"
        else:
            url = stack.enter_context(servers.start_postgres()).url
        db = store.create_engine(url)
        store.migrate(db)
        start = time.perf_counter()
        load(db, args.touches, args.managers)
        db.dispose()
        print(
            f"loaded {args.touches:,} touches and their call tasks in {time.perf_counter() - start:.1f} s",
            flush=True,
        )
        base, server = start_server(stack, url, redis.url, folder)
        client = stack.enter_context(httpx.Client(base_url=base, timeout=60))
        owners = [owner(n, args.managers) for n in range(args.requests)]
        endpoints = {
            "GET /call-tasks?owner=&date= (JSON)": [f"/call-tasks?owner={o}&date={day}" for o in owners],
            "GET /managers/{owner}/calls (HTML)": [
                f"/managers/{o}/calls?date={day}&tz={ZONE.key}" for o in owners
            ],
        }
        print()
        print(
            f"{args.backend}, {args.touches:,} touches, {args.requests} requests each, real HTTP on loopback"
        )
        for name, paths in endpoints.items():
            p50, p95, cpu, size = measure(client, server, paths)
            met = "met" if p95 < 50 else "missed"
            figures = f"p50 {p50:6.1f} ms  p{PERCENTILE} {p95:6.1f} ms  server CPU {cpu:5.1f} ms/request"
            print(f"{name:<37} {figures}  ({size} calls a list) {met}", flush=True)
        print("target: p95 < 50 ms")


if __name__ == "__main__":
    main()
