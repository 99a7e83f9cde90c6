"""The broker and the one actor: Redis when REDIS_URL is set, else Dramatiq's in-process stub broker."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.brokers.stub import StubBroker

from cadence.dispatch import MAX_ATTEMPTS
from cadence.settings import SEND_TIME_LIMIT_SECONDS

#: Queue that carries touch ids to workers.
QUEUE = "touches"
#: Broker retries after a transient delivery error: the attempts a touch has, less the first.
MAX_RETRIES = MAX_ATTEMPTS - 1
#: Milliseconds before the first retry; Dramatiq doubles it each time.
MIN_BACKOFF_MS = 2_000
#: Milliseconds one send may take before the worker gives up on it.
TIME_LIMIT_MS = SEND_TIME_LIMIT_SECONDS * 1000


def create_broker(redis_url: str | None) -> dramatiq.Broker:
    if redis_url:
        return RedisBroker(url=redis_url)  # type: ignore[no-untyped-call]
    return StubBroker()


def declare_dispatch(broker: dramatiq.Broker, dispatch: Callable[[int], Any]) -> dramatiq.Actor[Any, Any]:
    """The actor that sends one touch; the message carries only the touch id, the database has the rest."""

    def dispatch_touch(touch_id: int) -> None:
        dispatch(touch_id)

    declare = dramatiq.actor(
        broker=broker,
        actor_name="dispatch_touch",
        queue_name=QUEUE,
        max_retries=MAX_RETRIES,
        min_backoff=MIN_BACKOFF_MS,
        time_limit=TIME_LIMIT_MS,
    )
    return declare(dispatch_touch)
