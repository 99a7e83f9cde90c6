"""Faults with real processes and servers: a worker killed mid-send, Redis stopped while webhooks arrive,
PostgreSQL restarted mid-dispatch, one webhook posted many times at once. Nothing accepted is lost and no
touch is sent twice (bench/soak.py runs the longer versions)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from processes import (
    DELIVERED,
    LOST_DURING_SEND,
    WORKER_THREADS,
    Run,
    kill_a_worker,
    post_at_once,
    restart_postgres,
    stop_redis,
)
from servers import PostgresServer, RedisServer, missing_server_message, start_postgres, start_redis

from cadence.models import TouchStatus

#: Touches in the killed-worker test: enrollments times steps (the soak runs 10,000).
KILLED_ENROLLMENTS, KILLED_STEPS = 150, 4
#: Seconds Redis is down while webhooks arrive (the soak runs 30).
REDIS_OUTAGE_SECONDS = 10.0
#: Touches in the PostgreSQL restart test: enrollments times steps.
RESTART_ENROLLMENTS, RESTART_STEPS = 75, 4
#: Copies of one webhook posted at once.
COPIES = 100

pytestmark = pytest.mark.integration


def _own(kind: str) -> None:
    message = missing_server_message(kind)  # type: ignore[arg-type]
    if message:
        pytest.skip(message)


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own, since the test stops it."""
    _own("redis")
    with start_redis() as server:
        yield server


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL of this test's own, since the test restarts it."""
    _own("postgres")
    with start_postgres() as server:
        yield server


def _assert_once(run: Run, may_fail: int = 0, undelivered_may_fail: bool = False) -> None:
    """Exactly once on the idempotent email outbox. At most once on the appending SMS outbox: a touch a
    worker was sending when it was lost is failed with that reason and never sent again. At most `may_fail`
    such touches (one per worker thread lost); unless `undelivered_may_fail`, only ones that did go out."""
    census = run.census
    assert len(census.touches) == run.tried
    assert census.doubled() == []
    assert census.lost() == []
    assert census.unrecorded() == []
    emails = [key for key, channel, *_ in census.touches if channel == "email"]
    assert sorted(emails) == sorted(census.emails)
    failed = census.failed()
    assert all(LOST_DURING_SEND in reason for reason in failed), failed
    assert sum(failed.values()) <= may_fail, failed
    assert undelivered_may_fail or all(reason.endswith(DELIVERED) for reason in failed), failed
    assert census.by_status[TouchStatus.sent] + sum(failed.values()) == len(census.touches)


def test_a_worker_killed_mid_burst_loses_and_doubles_nothing(
    tmp_path: Path, redis_url: str, postgres_url: str
) -> None:
    run = kill_a_worker(tmp_path, redis_url, postgres_url, KILLED_ENROLLMENTS, KILLED_STEPS)
    assert run.tried == KILLED_ENROLLMENTS * KILLED_STEPS
    _assert_once(run, may_fail=WORKER_THREADS, undelivered_may_fail=True)


def test_webhooks_while_redis_is_down_are_stored_or_refused_and_sent_once_it_is_back(
    tmp_path: Path, own_redis: RedisServer, postgres_url: str
) -> None:
    run = stop_redis(tmp_path, own_redis, postgres_url, REDIS_OUTAGE_SECONDS, steps=2)
    accepted = {p.event_id for p in run.posted if p.accepted}
    assert accepted and accepted <= run.census.events
    assert run.census.enrollments == len(accepted)
    assert all(p.status is None or p.status >= 400 for p in run.posted if not p.accepted)
    _assert_once(run)


def test_postgresql_restarted_mid_dispatch_loses_and_doubles_nothing(
    tmp_path: Path, redis_url: str, own_postgres: PostgresServer
) -> None:
    run = restart_postgres(tmp_path, redis_url, own_postgres, RESTART_ENROLLMENTS, RESTART_STEPS, restarts=1)
    # No worker was lost, so no touch may fail unsent; one whose send went out while the database was down,
    # and whose worker could not record it before the lease ran out, is failed but was sent once.
    _assert_once(run, may_fail=WORKER_THREADS)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_one_webhook_posted_a_hundred_times_at_once_enrolls_once(
    tmp_path: Path, database: str, request: pytest.FixtureRequest
) -> None:
    url = (
        request.getfixturevalue("postgres_url")
        if database == "postgresql"
        else f"sqlite:///{tmp_path / 'cadence.db'}"
    )
    run = post_at_once(tmp_path, url, COPIES, steps=2)
    assert [(p.status, p.body) for p in run.posted if not p.accepted] == []
    [first] = [p for p in run.posted if not p.body.get("duplicate")]
    # Acted on before its answer, or stored with a burst and acted on by a worker moments later.
    assert len(first.body["enrolled"]) == 1 or first.body["queued"] is True
    assert run.census.enrollments == 1
    _assert_once(run)
