"""Shared fixtures: real Redis and PostgreSQL servers, and a whole Cadence on each broker."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from harness import Harness, make_settings, start_harness
from servers import (
    Mailbox,
    PostgresServer,
    RedisServer,
    free_port,
    missing_server_message,
    start_postgres,
    start_redis,
)

from cadence import store


def _need(kind: str) -> None:
    message = missing_server_message(kind)  # type: ignore[arg-type]
    if message:
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    _need("redis")
    with start_redis() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A Redis with nothing in it."""
    redis.Redis.from_url(redis_server.url).flushall()
    return redis_server.url


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    _need("postgres")
    with start_postgres() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh, empty PostgreSQL database."""
    return postgres_server.create_database(f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=["embedded", "redis"])
def cadence(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    """The whole service on the embedded broker, then again on a real Redis server."""
    overrides = {}
    if request.param == "redis":
        overrides["redis_url"] = request.getfixturevalue("redis_url")
    harness = start_harness(make_settings(tmp_path, **overrides))
    yield harness
    harness.stop()


@pytest.fixture
def smtp() -> Iterator[tuple[Mailbox, int]]:
    """A real SMTP server (aiosmtpd) on a loopback port, and the mailbox that keeps what it receives."""
    from aiosmtpd.controller import Controller

    mailbox = Mailbox()
    port = free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port, server_hostname="mx.test")
    controller.start()
    try:
        yield mailbox, port
    finally:
        controller.stop()


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sa.Engine]:
    """An SQLite database in the test's folder, its schema migrated."""
    engine = store.create_engine(f"sqlite:///{tmp_path / 'cadence.db'}")
    store.migrate(engine)
    yield engine
    engine.dispose()
