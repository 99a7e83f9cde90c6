"""Soak: the fault tests' longer versions, with real `cadence serve|worker|scheduler` processes on a throwaway
Redis and PostgreSQL.

Drills (each on a fresh database):
- kill: 10,000 touches; a worker SIGKILLed when half are sent, a fresh worker started.
- redis: webhooks arriving throughout; Redis stopped for 30 s, then started again (empty) on its port.
- postgres: 2,000 touches; PostgreSQL stopped and started again (same port and data) three times.

Targets: nothing lost and nothing doubled (0 and 0); every webhook answered 2xx is stored; the touches a
fault stranded have ended within the lease plus a minute of the fault's end.

Lost: a touch recorded sent with nothing in the outbox, a touch ended without a reason, a touch an accepted
enrollment never got. Doubled: a key in the SMS outbox more than once (it appends, so a second send shows;
the email outbox writes one file per key). Failed: SMS touches a worker was sending when it was lost, not
sent again because SMS is not idempotent (at most once): "sent" when the text had in fact gone out, "unsent"
when it had not. Unsent failures are expected only for a killed worker; anywhere else they are lost touches.

Run from the repository root: `.venv/bin/python bench/soak.py [--only kill redis] [--touches 10000]`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from processes import (
    DELIVERED,
    LEASE_SECONDS,
    RECOVERY_TARGET_SECONDS,
    Run,
    kill_a_worker,
    restart_postgres,
    stop_redis,
)
from servers import PostgresServer, RedisServer, start_postgres, start_redis

#: Steps per enrollment (email and SMS in turn, all due at once).
STEPS = 4
#: Touches in the kill drill.
KILL_TOUCHES = 10_000
#: Seconds Redis stays down in the redis drill.
REDIS_OUTAGE_SECONDS = 30.0
#: Touches in the postgres drill, and how many times PostgreSQL is restarted during it.
RESTART_TOUCHES, RESTARTS = 2_000, 3

Drill = Callable[[Path, RedisServer, PostgresServer, argparse.Namespace], Run]


def _kill(folder: Path, redis: RedisServer, postgres: PostgresServer, args: argparse.Namespace) -> Run:
    database = postgres.create_database(f"kill_{int(time.time())}")
    return kill_a_worker(folder, redis.url, database, args.touches // STEPS, STEPS)


def _redis(folder: Path, redis: RedisServer, postgres: PostgresServer, args: argparse.Namespace) -> Run:
    database = postgres.create_database(f"redis_{int(time.time())}")
    return stop_redis(folder, redis, database, args.outage, STEPS)


def _postgres(folder: Path, redis: RedisServer, postgres: PostgresServer, args: argparse.Namespace) -> Run:
    return restart_postgres(folder, redis.url, postgres, args.restart_touches // STEPS, STEPS, args.restarts)


DRILLS: dict[str, Drill] = {"kill": _kill, "redis": _redis, "postgres": _postgres}


def _row(run: Run) -> list[str]:
    census, t = run.census, run.timings
    sent = census.by_status["sent"]
    failed = census.failed()
    delivered = sum(n for reason, n in failed.items() if reason.endswith(DELIVERED))
    lost = len(census.lost()) + max(run.tried - len(census.touches), 0)
    refused = sum(not p.accepted for p in run.posted)
    recover = t.get("recover", 0.0)
    return [
        run.fault,
        f"{run.tried:,}",
        f"{sent:,}",
        f"{delivered}/{sum(failed.values()) - delivered}",
        str(lost),
        str(len(census.doubled())),
        str(census.repeated()),
        f"{len(run.posted) - refused:,}/{refused}",
        f"{t.get('fault', 0.0):.1f}",
        f"{recover:.1f} {'met' if recover <= RECOVERY_TARGET_SECONDS else 'MISSED'}",
        f"{t.get('settle', 0.0):.1f}",
    ]


HEADER = [
    "fault",
    "touches tried",
    "sent once",
    "failed sent/unsent",
    "lost",
    "doubled",
    "re-sent",
    "webhooks 2xx/refused",
    "outage s",
    "recover s",
    "settle s",
]


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    lines = [
        " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in [HEADER, *rows]
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", nargs="+", choices=sorted(DRILLS), default=list(DRILLS), help="drills to run"
    )
    parser.add_argument("--touches", type=int, default=KILL_TOUCHES, help="touches in the kill drill")
    parser.add_argument("--outage", type=float, default=REDIS_OUTAGE_SECONDS, help="seconds Redis is down")
    parser.add_argument(
        "--restart-touches", type=int, default=RESTART_TOUCHES, help="touches in the postgres drill"
    )
    parser.add_argument(
        "--restarts", type=int, default=RESTARTS, help="PostgreSQL restarts in the postgres drill"
    )
    args = parser.parse_args()
    rows: list[list[str]] = []
    failures: list[str] = []
    with start_redis() as redis, start_postgres() as postgres:
        for name in args.only:
            with tempfile.TemporaryDirectory(prefix=f"cadence-soak-{name}-") as folder:
                print(f"{name}: running...", file=sys.stderr, flush=True)
                try:
                    run = DRILLS[name](Path(folder), redis, postgres, args)
                except TimeoutError as exc:
                    failures.append(f"{name}: {exc}")
                    continue
                rows.append(_row(run))
                # Each drill's row as it ends too: the whole soak takes a quarter of an hour or more.
                print(f"{name}: {' | '.join(rows[-1])}", file=sys.stderr, flush=True)
                reasons = run.census.failed()
                if reasons:
                    print(f"{name}: failed touches by reason: {dict(reasons)}", file=sys.stderr)
    print(f"\nlease {LEASE_SECONDS} s; recovery target {RECOVERY_TARGET_SECONDS} s after the fault ends\n")
    print(_table(rows))
    for failure in failures:
        print(f"\nDID NOT SETTLE: {failure}")


if __name__ == "__main__":
    main()
