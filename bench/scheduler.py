"""Scheduler speed: due touches claimed and enqueued in Redis per second, what a tick costs as the table
grows, and the memory a tick takes as the backlog grows.

Measured on SQLite and on PostgreSQL (a throwaway server), each with a throwaway Redis as the broker, through
`cadence.scheduler.Scheduler.tick` and the service's own `dispatch_touch` actor:

- throughput: a tick claims a burst of due touches (planned -> queued) and enqueues one message each in
  Redis; the messages are counted in Redis afterwards. Target >= 10,000 touches/s on each database.
- scaling: a tick that finds 1,000 due touches, among 10,000 active enrollments and among --enrollments
  (1,000,000 by default), each with a touch planned days ahead. Target: the big tick costs <= 2x the small.
- memory: the peak RSS growth of a fresh scheduler process over one tick claiming a backlog of 10,000 and of
  100,000 due touches. It should not grow with the backlog: claims go in batches of batch_size.

Rows are shaped like the engine's (contacts, enrollments pinned to a cadence version, touches) and loaded in
bulk (executemany on SQLite, COPY on PostgreSQL). Run from the repository root:

    .venv/bin/python bench/scheduler.py [--backend both|sqlite|postgresql] [--enrollments 1000000]
        [--burst 50000] [--batch-size 500] [--repeats 5] [--per-id]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import servers  # noqa: E402  (the test suite's throwaway Redis and PostgreSQL)

from cadence import broker as brokers  # noqa: E402
from cadence import store  # noqa: E402
from cadence.scheduler import Scheduler  # noqa: E402
from cadence.settings import Settings  # noqa: E402

#: The bench's fixed "now"; touches due before it are due.
NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
#: Touches due now in the scaling comparison.
DUE_NOW = 1_000
#: Active enrollments in the small database the big one is compared with.
SMALL = 10_000
#: Backlogs of due touches one tick claims in the memory comparison.
BACKLOGS = (10_000, 100_000)
#: Seconds between RSS samples while a tick runs.
RSS_SAMPLE_SECONDS = 0.002
#: Days ahead over which the not-yet-due touches are spread.
AHEAD_DAYS = 30
#: The lease the scheduler is built with (seconds); nothing in the bench is stale.
LEASE_SECONDS = Settings.model_fields["lease_seconds"].default
#: The service's default claim batch.
DEFAULT_BATCH = Settings.model_fields["scheduler_batch_size"].default

Row = tuple[Any, ...]


# --- bulk loading (shared with bench/calllist.py) ---------------------------------------------------------


def stamp(db: sa.Engine) -> Callable[[datetime], Any]:
    """How an aware time is written raw: naive UTC, as text in SQLAlchemy's SQLite format."""
    if db.dialect.name == "sqlite":
        return lambda when: when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    return lambda when: when.astimezone(UTC).replace(tzinfo=None)


def bulk_insert(db: sa.Engine, table: str, columns: Sequence[str], rows: Iterable[Row]) -> None:
    """Insert rows in one transaction, bypassing the ORM: executemany on SQLite, COPY on PostgreSQL. The rows
    are consistent by construction, so foreign keys are not checked row by row while they load."""
    names = ", ".join(columns)
    raw = db.raw_connection()
    try:
        driver: Any = raw.driver_connection
        if db.dialect.name == "sqlite":
            driver.execute("PRAGMA foreign_keys=OFF")
            driver.execute("PRAGMA synchronous=OFF")
            driver.execute("BEGIN")
            marks = ", ".join("?" for _ in columns)
            driver.executemany(f"INSERT INTO {table} ({names}) VALUES ({marks})", rows)
            driver.execute("COMMIT")
            driver.execute("PRAGMA synchronous=FULL")
            driver.execute("PRAGMA foreign_keys=ON")
        else:
            with driver.cursor() as cursor:
                cursor.execute("SET session_replication_role = replica")
                with cursor.copy(f"COPY {table} ({names}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
                cursor.execute("SET session_replication_role = DEFAULT")
            driver.commit()
    finally:
        raw.close()


def finish_load(db: sa.Engine, tables: Sequence[str]) -> None:
    """After explicit ids: move PostgreSQL's sequences past them and gather planner statistics."""
    if db.dialect.name != "postgresql":
        return
    with db.begin() as connection:
        for table in tables:
            connection.exec_driver_sql(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))"
            )
    with db.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.exec_driver_sql("ANALYZE")


def load_people(db: sa.Engine, count: int, owners: Sequence[str] = ()) -> None:
    """A cadence version, `count` contacts, and for each an active enrollment (and, given owners, a deal)."""
    ts = stamp(db)
    created = ts(NOW - timedelta(days=AHEAD_DAYS))
    bulk_insert(
        db,
        "cadence_version",
        ("id", "name", "content_hash", "yaml_text", "file", "created_at"),
        [(1, "open-deal", "bench", "cadence: open-deal\n", "rules/open-deal.yaml", created)],
    )
    bulk_insert(
        db,
        "contact",
        ("id", "source", "external_id", "name", "email", "phone", "timezone", "attributes", "created_at",
         "updated_at"),
        ((n, "bench", f"c-{n}", f"Contact {n}", f"c{n}@example.com", f"+7900{n:07d}", "Europe/Moscow", "{}",
          created, created) for n in range(1, count + 1)),
    )  # fmt: skip
    deal: Callable[[int], int | None] = lambda n: None  # noqa: E731
    if owners:
        deal = lambda n: n  # noqa: E731
        bulk_insert(
            db,
            "deal",
            ("id", "source", "external_id", "contact_id", "title", "stage", "status", "amount", "currency",
             "owner", "probability", "attributes", "created_at", "updated_at"),
            ((n, "bench", f"d-{n}", n, f"Deal {n}", "proposal_sent", "open", 1000.0 + n % 9000, "RUB",
              owners[n % len(owners)], 0.5, "{}", created, created) for n in range(1, count + 1)),
        )  # fmt: skip
    bulk_insert(
        db,
        "enrollment",
        (
            "id",
            "cadence_name",
            "cadence_version_id",
            "subject",
            "contact_id",
            "deal_id",
            "status",
            "started_at",
        ),
        ((n, "open-deal", 1, f"contact:{n}", n, deal(n), "active", created) for n in range(1, count + 1)),
    )


TOUCH_COLUMNS = (
    "id", "enrollment_id", "step_index", "iteration", "channel", "template", "reason", "due_at", "status",
    "attempts", "receipt",
)  # fmt: skip


def planned_touch(touch_id: int, enrollment_id: int, step: int, iteration: int, due: Any) -> Row:
    return (touch_id, enrollment_id, step, iteration, "email", "email/proposal-recap",
            "Recap of the proposal and the one open question.", due, "planned", 0, "{}")  # fmt: skip


def load_future_touches(db: sa.Engine, enrollments: int) -> None:
    """One planned touch per enrollment, due over the next AHEAD_DAYS days."""
    ts = stamp(db)
    spread = AHEAD_DAYS * 24 * 3600 // max(enrollments, 1) or 1
    bulk_insert(
        db,
        "touch",
        TOUCH_COLUMNS,
        (planned_touch(n, n, 0, 0, ts(NOW + timedelta(hours=1, seconds=n * spread)))
         for n in range(1, enrollments + 1)),
    )  # fmt: skip


def add_due_touches(db: sa.Engine, count: int, enrollments: int) -> None:
    """`count` touches due within the last hour on the first enrollments, each call a step of its own."""
    with db.connect() as connection:
        first = (connection.exec_driver_sql("SELECT max(id) FROM touch").scalar() or 0) + 1
    ts = stamp(db)
    bulk_insert(
        db,
        "touch",
        TOUCH_COLUMNS,
        (planned_touch(first + k, 1 + k % enrollments, first, k // enrollments,
                       ts(NOW - timedelta(seconds=1 + k % 3600))) for k in range(count)),
    )  # fmt: skip
    finish_load(db, ["touch"])


def make_database(url: str, enrollments: int) -> sa.Engine:
    db = store.create_engine(url)
    store.migrate(db)
    load_people(db, enrollments)
    load_future_touches(db, enrollments)
    finish_load(db, ["cadence_version", "contact", "enrollment", "touch"])
    return db


# --- measuring --------------------------------------------------------------------------------------------


def build_scheduler(db: sa.Engine, redis_url: str, batch_size: int, per_id: bool) -> Scheduler:
    """The service's scheduler on a real Redis broker with the service's actor; nothing else in a tick."""
    broker = brokers.create_broker(redis_url)
    actor = brokers.declare_dispatch(broker, lambda touch_id: None)
    batch: dict[str, Any] = {} if per_id else {"send_all": lambda ids: brokers.send_all(actor, ids)}
    return Scheduler(
        db,
        send=actor.send,
        clock=lambda: NOW,
        batch_size=batch_size,
        lease=timedelta(seconds=LEASE_SECONDS),
        take_back=lambda s, touch, why: False,
        replay_inbox=lambda since: [],
        **batch,
    )


def in_redis(scheduler: Scheduler) -> int:
    """Messages waiting in Redis on the touches queue."""
    client: Any = scheduler.send.__self__.broker.client  # type: ignore[attr-defined]
    return int(client.llen(f"dramatiq:{brokers.QUEUE}"))


def reset(scheduler: Scheduler) -> None:
    """Every queued touch planned again and the Redis queue emptied, for the next run."""
    with scheduler.db.begin() as connection:
        connection.exec_driver_sql(
            "UPDATE touch SET status = 'planned', queued_at = NULL WHERE status = 'queued'"
        )
    scheduler.send.__self__.broker.flush_all()  # type: ignore[attr-defined]


def warm_up(scheduler: Scheduler) -> None:
    """A tick a day early (nothing due): statements compiled, the Redis script loaded, connections open."""
    real = scheduler.clock
    scheduler.clock = lambda: NOW - timedelta(days=1)
    try:
        scheduler.tick()
    finally:
        scheduler.clock = real


def timed_tick(scheduler: Scheduler) -> tuple[float, float, int]:
    """Seconds one tick takes (wall clock, and this process's CPU), and touches it queued; checks each is a
    message in Redis. The CPU figure leaves out the database and Redis servers, but not a busy machine's
    other work, so it is the steadier of the two there."""
    reset(scheduler)
    start, cpu = time.perf_counter(), time.process_time()
    tick = scheduler.tick()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    waiting = in_redis(scheduler)
    if waiting != len(tick.queued):
        raise RuntimeError(f"{len(tick.queued)} touches queued but {waiting} messages in Redis")
    return seconds, cpu, len(tick.queued)


def median_tick(scheduler: Scheduler, repeats: int) -> tuple[float, float, int]:
    runs = [timed_tick(scheduler) for _ in range(repeats)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs), runs[0][2]


def memory_child(url: str, redis_url: str, batch_size: int, per_id: bool) -> None:
    """In a fresh process: RSS before a tick, and the peak during it; printed as JSON."""
    db = store.create_engine(url)
    scheduler = build_scheduler(db, redis_url, batch_size, per_id)
    warm_up(scheduler)
    process = psutil.Process()
    before = process.memory_info().rss
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(RSS_SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        queued = scheduler.tick().queued
    finally:
        done.set()
        sampler.join()
    peak = max(peak, process.memory_info().rss)
    # What the tick hands back, a list of every id it queued, is the one part that grows with the backlog.
    ids = sys.getsizeof(queued) + sum(sys.getsizeof(i) for i in queued)
    print(json.dumps({"queued": len(queued), "before": before, "peak": peak, "ids": ids}))


def memory_growth(
    url: str, redis_url: str, db: sa.Engine, backlog: int, args: argparse.Namespace
) -> tuple[int, int]:
    """Bytes of peak RSS growth over one tick claiming `backlog` due touches, in a fresh process, and the
    bytes of the list of ids the tick returns."""
    with db.connect() as connection:
        last = connection.exec_driver_sql("SELECT max(id) FROM touch").scalar() or 0
    add_due_touches(db, backlog, SMALL)
    try:
        argv = [
            sys.executable,
            __file__,
            "--memory-child",
            url,
            redis_url,
            "--batch-size",
            str(args.batch_size),
        ]
        found = subprocess.run([*argv, *(["--per-id"] if args.per_id else [])], check=True,
                               capture_output=True, text=True)  # fmt: skip
        figures = json.loads(found.stdout.strip().splitlines()[-1])
        if figures["queued"] != backlog:
            raise RuntimeError(f"the tick queued {figures['queued']} of a backlog of {backlog}")
        return int(figures["peak"] - figures["before"]), int(figures["ids"])
    finally:
        with db.begin() as connection:
            connection.exec_driver_sql(f"DELETE FROM touch WHERE id > {last}")


def say(line: str) -> None:
    print(line, flush=True)


# --- the runs ---------------------------------------------------------------------------------------------


def database_urls(stack: ExitStack, backend: str, folder: Path) -> Iterator[str]:
    """Two fresh databases of one backend: the small one, then the big one."""
    if backend == "sqlite":
        yield f"sqlite:///{folder / 'small.db'}"
        yield f"sqlite:///{folder / 'big.db'}"
        return
    postgres = stack.enter_context(servers.start_postgres())
    yield postgres.create_database("small")
    yield postgres.create_database("big")


def run_backend(backend: str, redis_url: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"backend": backend}
    with ExitStack() as stack:
        urls = database_urls(stack, backend, folder)
        small_url = next(urls)
        start = time.perf_counter()
        small = make_database(small_url, SMALL)
        big_url = next(urls)
        big = make_database(big_url, args.enrollments)
        out["setup_s"] = time.perf_counter() - start
        say(f"[{backend}] loaded {SMALL:,} and {args.enrollments:,} enrollments in {out['setup_s']:.1f} s")
        for name, db, size in (("small", small, SMALL), ("big", big, args.enrollments)):
            add_due_touches(db, DUE_NOW, size)
            scheduler = build_scheduler(db, redis_url, args.batch_size, args.per_id)
            warm_up(scheduler)
            seconds, _, queued = median_tick(scheduler, args.repeats)
            assert queued == DUE_NOW, queued
            out[f"{name}_tick_s"] = seconds
            say(f"[{backend}] tick finding {DUE_NOW:,} due among {size:,}: {seconds * 1000:.1f} ms")
        add_due_touches(big, args.burst, args.enrollments)
        seconds, cpu, queued = median_tick(scheduler, max(1, args.repeats // 2))
        out["rate"], out["cpu_rate"] = queued / seconds, queued / cpu
        rates = f"{out['rate']:,.0f}/s, {out['cpu_rate']:,.0f}/CPU-s"
        say(f"[{backend}] {queued:,} due claimed and enqueued: {rates}")
        for backlog in BACKLOGS:
            grown, ids = memory_growth(small_url, redis_url, small, backlog, args)
            out[f"rss_{backlog}"] = grown
            say(
                f"[{backend}] tick over a backlog of {backlog:,}: RSS +{grown / 2**20:.1f} MiB, of which "
                f"{ids / 2**20:.1f} MiB is the list of ids the tick returns"
            )
        small.dispose()
        big.dispose()
    return out


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    mib = 2**20
    print()
    print(f"batch_size {args.batch_size}, {'one Redis call per id' if args.per_id else 'pipelined batches'}")
    head = ("backend", "claimed+enq/s", "per CPU-s", "tick@10k ms", "tick@big ms", "ratio", "RSS@10k MiB",
            "RSS@100k MiB")  # fmt: skip
    print("  ".join(f"{h:>12}" for h in head))
    for r in results:
        ratio = r["big_tick_s"] / r["small_tick_s"]
        cells = (f"{r['rate']:,.0f}", f"{r['cpu_rate']:,.0f}", f"{r['small_tick_s'] * 1000:.1f}",
                 f"{r['big_tick_s'] * 1000:.1f}", f"{ratio:.2f}", f"{r['rss_10000'] / mib:.1f}",
                 f"{r['rss_100000'] / mib:.1f}")  # fmt: skip
        print("  ".join(f"{c:>12}" for c in (r["backend"], *cells)))
    print(f"targets: >= 10,000/s; tick@{args.enrollments:,} <= 2x tick@{SMALL:,}; RSS flat in the backlog")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=("both", "sqlite", "postgresql"), default="both")
    parser.add_argument("--enrollments", type=int, default=1_000_000, help="active enrollments in the big db")
    parser.add_argument("--burst", type=int, default=50_000, help="due touches in the throughput run")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="the scheduler's claim batch")
    parser.add_argument("--repeats", type=int, default=5, help="ticks per figure (the median is shown)")
    parser.add_argument("--per-id", action="store_true", help="enqueue one id at a time, as without send_all")
    parser.add_argument("--memory-child", nargs=2, metavar=("DB_URL", "REDIS_URL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child, args.batch_size, args.per_id)
        return
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    results = []
    with servers.start_redis() as redis, tempfile.TemporaryDirectory(prefix="cadence-bench-") as folder:
        for backend in backends:
            results.append(run_backend(backend, redis.url, args, Path(folder)))
    report(results, args)


if __name__ == "__main__":
    main()
