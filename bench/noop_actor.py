"""A no-op actor on Cadence's broker, for Dramatiq's own floor in bench/dispatch.py.

Run by `dramatiq noop_actor:broker --path bench`; each message only counts itself in Redis and notes the
time, in one round trip, so the bench knows when all are done and how long they took. The actor takes the
same broker and options as Cadence's dispatch actor.
"""

from __future__ import annotations

import os
import time
from typing import Any

import dramatiq

from cadence import broker as brokers

#: Queue the no-op messages travel on, apart from Cadence's touches.
QUEUE = "bench-noop"
#: Redis key counting the messages processed.
COUNTER = "bench:noop:done"
#: Redis keys holding the Unix times the first and the last message were processed.
FIRST, LAST = "bench:noop:first", "bench:noop:last"


def declare(broker: dramatiq.Broker) -> dramatiq.Actor[Any, Any]:
    """The no-op actor on `broker`; it needs a Redis broker, whose client keeps the count."""

    def noop(number: int) -> None:
        now = time.time()
        pipe = broker.client.pipeline(transaction=False)  # type: ignore[attr-defined]
        pipe.set(FIRST, now, nx=True).incr(COUNTER).set(LAST, now).execute()

    declare_actor = dramatiq.actor(
        broker=broker,
        actor_name="bench_noop",
        queue_name=QUEUE,
        max_retries=brokers.MAX_RETRIES,
        min_backoff=brokers.MIN_BACKOFF_MS,
        time_limit=brokers.TIME_LIMIT_MS,
    )
    return declare_actor(noop)


broker = brokers.create_broker(os.environ.get("REDIS_URL"))
actor = declare(broker)
