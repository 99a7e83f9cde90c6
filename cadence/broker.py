"""The broker and its actors: Redis when REDIS_URL is set, else Dramatiq's in-process stub broker."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any
from uuid import UUID, uuid4

import dramatiq
from dramatiq import Message, Middleware
from dramatiq.brokers.redis import RedisBroker
from dramatiq.brokers.stub import StubBroker

from cadence.dispatch import MAX_ATTEMPTS
from cadence.settings import SEND_TIME_LIMIT_SECONDS

#: Queue that carries touch ids to workers.
QUEUE = "touches"
#: Queue that carries the ids of stored webhook deliveries that a worker is to act on.
INBOX_QUEUE = "deliveries"
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


def _declare(
    broker: dramatiq.Broker, name: str, queue: str, fn: Callable[[Any], Any]
) -> dramatiq.Actor[Any, Any]:
    """An actor whose message carries only a row's id, or a list of them; the database has the rest."""

    def act(row_ids: Any) -> None:
        fn(row_ids)

    act.__name__ = act.__qualname__ = name
    declare = dramatiq.actor(
        broker=broker,
        actor_name=name,
        queue_name=queue,
        max_retries=MAX_RETRIES,
        min_backoff=MIN_BACKOFF_MS,
        time_limit=TIME_LIMIT_MS,
    )
    return declare(act)


def declare_dispatch(broker: dramatiq.Broker, dispatch: Callable[[int], Any]) -> dramatiq.Actor[Any, Any]:
    """The actor that sends one touch."""
    return _declare(broker, "dispatch_touch", QUEUE, dispatch)


def declare_dispatch_many(
    broker: dramatiq.Broker, dispatch: Callable[[list[int]], Any]
) -> dramatiq.Actor[Any, Any]:
    """The actor that sends a batch of touches (a list of their ids) from the scheduler."""
    return _declare(broker, "dispatch_touches", QUEUE, dispatch)


def retry_delay_ms(attempts: int) -> int:
    """Milliseconds before a touch's next try after `attempts` tries, as the broker's own retries wait."""
    return int(MIN_BACKOFF_MS * 2 ** max(attempts - 1, 0))


def declare_inbox(broker: dramatiq.Broker, act_on: Callable[[int], Any]) -> dramatiq.Actor[Any, Any]:
    """The actor that acts on one stored webhook delivery."""
    return _declare(broker, "act_on_delivery", INBOX_QUEUE, act_on)


def send_all(actor: dramatiq.Actor[Any, Any], ids: list[Any], **options: Any) -> None:
    """Queue one message per id (a touch's, or a stored delivery's) or list of ids, the messages
    `actor.send_with_options(args=(id,), **options)` makes.
    On Redis the batch is written in one round trip, all or nothing, instead of a script call per message."""
    broker = actor.broker
    if not ids:
        return
    if not isinstance(broker, RedisBroker):
        for one in ids:
            actor.send_with_options(args=(one,), **options)
        return
    queue = f"{broker.namespace}:{actor.queue_name}"
    if any(_hooks_enqueue(middleware) for middleware in broker.middleware):
        messages = _messages(actor, ids, options)
        for message in messages:
            broker.emit_before("enqueue", message, None)
        bodies = {message.options["redis_message_id"]: message.encode() for message in messages}
    else:
        messages, bodies = [], _encoded(actor, ids, options)
    # Dramatiq's Redis layout: the queue is a list of message ids, the bodies a hash beside it. Its enqueue
    # script writes those two keys and, besides, a heartbeat that only consumers need.
    with broker.client.pipeline(transaction=True) as pipe:
        pipe.hset(f"{queue}.msgs", mapping=bodies)
        pipe.rpush(queue, *bodies)
        pipe.execute()
    for message in messages:
        broker.emit_after("enqueue", message, None)


def _hooks_enqueue(middleware: Middleware) -> bool:
    kind = type(middleware)
    return (
        kind.before_enqueue is not Middleware.before_enqueue
        or kind.after_enqueue is not Middleware.after_enqueue
    )


def _messages(actor: dramatiq.Actor[Any, Any], ids: list[Any], options: dict[str, Any]) -> list[Message[Any]]:
    """The messages, each with its own id in Redis, as RedisBroker.enqueue gives it."""
    return [actor.message_with_options(args=(one,), **options, redis_message_id=str(uuid4())) for one in ids]


def _encoded(actor: dramatiq.Actor[Any, Any], ids: list[Any], options: dict[str, Any]) -> dict[str, bytes]:
    """The bodies of `_messages` by their Redis ids, encoded straight from one message's fields: no middleware
    looks at them, and a Message object apiece costs more than the rest of a claim."""
    shape = actor.message_with_options(args=(), **options).asdict()
    encoder = dramatiq.get_encoder()
    random = os.urandom(32 * len(ids))
    bodies = {}
    for n, one in enumerate(ids):
        message_id = str(UUID(bytes=random[32 * n : 32 * n + 16], version=4))
        redis_id = str(UUID(bytes=random[32 * n + 16 : 32 * n + 32], version=4))
        fields = {**shape, "args": [one], "options": {**shape["options"], "redis_message_id": redis_id}}
        fields["message_id"] = message_id
        bodies[redis_id] = encoder.encode(fields)
    return bodies
