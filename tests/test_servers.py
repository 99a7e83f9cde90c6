"""The throwaway-server helpers in tests/servers.py, run against real Redis and PostgreSQL."""

from __future__ import annotations

import os
import socket

import pytest
import redis
import sqlalchemy as sa
from servers import ServerKind, missing_server_message, start_postgres, start_redis


def _require(kind: ServerKind) -> None:
    message = missing_server_message(kind)
    if message is None:
        return
    # CI installs both servers, so there a missing one is a broken setup rather than a skip.
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_unknown_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown server kind"):
        missing_server_message("mysql")  # type: ignore[arg-type]


@pytest.mark.integration
def test_redis_answers_and_stops() -> None:
    _require("redis")
    server = start_redis()
    try:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        client = redis.Redis.from_url(server.url)
        try:
            client.set("greeting", "hello")
            assert client.get("greeting") == b"hello"
            assert client.config_get("save") == {"save": ""}
        finally:
            client.close()
    finally:
        server.stop()

    assert not _port_open(server.port)
    assert server.pid is not None and not _pid_alive(server.pid)
    assert not server.workdir.exists()
    server.stop()  # a second stop is harmless


@pytest.mark.integration
def test_postgres_answers_and_creates_databases() -> None:
    _require("postgres")
    with start_postgres() as server:
        assert server.url == f"postgresql+psycopg://postgres@127.0.0.1:{server.port}/cadence"
        engine = sa.create_engine(server.url)
        try:
            with engine.connect() as conn:
                assert conn.execute(sa.text("select 1")).scalar_one() == 1
                assert conn.execute(sa.text("select current_database()")).scalar_one() == "cadence"
        finally:
            engine.dispose()

        fresh_url = server.create_database("fresh_one")
        assert fresh_url.endswith(f":{server.port}/fresh_one")
        fresh = sa.create_engine(fresh_url)
        try:
            with fresh.begin() as conn:
                conn.execute(sa.text("create table t (x int)"))
                conn.execute(sa.text("insert into t values (42)"))
            with fresh.connect() as conn:
                assert conn.execute(sa.text("select x from t")).scalar_one() == 42
        finally:
            fresh.dispose()

    assert not _port_open(server.port)
    assert server.pid is not None and not _pid_alive(server.pid)
    assert not server.workdir.exists()
