"""Throwaway Redis and PostgreSQL servers on 127.0.0.1 for integration tests.

Each server lives in its own temp dir, keeps nothing on disk and is stopped by its own pid.
"""

from __future__ import annotations

import atexit
import contextlib
import email.policy
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, Self
from urllib.parse import quote

import psycopg
import redis
from psycopg import sql
from psycopg.rows import TupleRow
from redis.backoff import NoBackoff
from redis.retry import Retry

ServerKind = Literal["redis", "postgres"]

HOST = "127.0.0.1"
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
POLL_INTERVAL = 0.05
LOG_TAIL_LINES = 40

_DEBIAN_PACKAGE: dict[ServerKind, str] = {"redis": "redis-server", "postgres": "postgresql"}
_POSTGRES_TOOLS = ("initdb", "pg_ctl", "postgres")


class MissingServerError(RuntimeError):
    """The server's binaries are not installed; callers usually turn this into a skip."""


class ServerStartError(RuntimeError):
    """The server (or one of its setup tools) failed or did not come up in time."""


# --- finding binaries -------------------------------------------------------------------------


def _redis_binary() -> Path | None:
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    # /usr/bin is not always on PATH in minimal CI environments.
    fallback = Path("/usr/bin/redis-server")
    return fallback if os.access(fallback, os.X_OK) else None


def _version_key(bin_dir: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", bin_dir.parent.name)) or (0,)


def _postgres_bin_dir() -> Path | None:
    # Debian keeps initdb and postgres off PATH, one directory per major version; newest wins.
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for bin_dir in candidates:
        if all(os.access(bin_dir / tool, os.X_OK) for tool in _POSTGRES_TOOLS):
            return bin_dir
    return None


def _postgres_os_user_exists() -> bool:
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return False
    return True


def missing_server_message(kind: ServerKind) -> str | None:
    """Why `kind` cannot be started here (naming the Debian package to install), or None."""
    if kind not in _DEBIAN_PACKAGE:
        raise ValueError(f"unknown server kind {kind!r}; expected one of {sorted(_DEBIAN_PACKAGE)}")
    package = _DEBIAN_PACKAGE[kind]
    if kind == "redis" and _redis_binary() is None:
        return f"redis-server not found; install it with: apt-get install -y {package}"
    if kind == "postgres":
        if _postgres_bin_dir() is None:
            return (
                "PostgreSQL binaries (initdb, pg_ctl, postgres) not found under /usr/lib/postgresql/*/bin; "
                f"install them with: apt-get install -y {package}"
            )
        # PostgreSQL refuses to run as root, so as root we need its own OS user.
        if os.geteuid() == 0 and not _postgres_os_user_exists():
            return f"running as root without a 'postgres' OS user; install: apt-get install -y {package}"
    return None


def _require(kind: ServerKind) -> None:
    message = missing_server_message(kind)
    if message is not None:
        raise MissingServerError(message)


# --- shared plumbing --------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _log_tail(log_path: Path) -> str:
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-LOG_TAIL_LINES:]) or "(empty log)"


def _wait_until_ready(
    name: str, proc: subprocess.Popen[bytes], log_path: Path, is_ready: Callable[[], bool]
) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise ServerStartError(
                f"{name} exited with code {proc.returncode} during startup; log tail:\n{_log_tail(log_path)}"
            )
        if is_ready():
            return
        if time.monotonic() > deadline:
            raise ServerStartError(
                f"{name} did not answer within {STARTUP_TIMEOUT:.0f}s; log tail:\n{_log_tail(log_path)}"
            )
        time.sleep(POLL_INTERVAL)


def _end_process(proc: subprocess.Popen[bytes]) -> None:
    """Terminate our own child by pid, escalating to SIGKILL if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)


# A test that forgets stop() (or dies mid-way) must not leave servers behind after pytest exits.
_live_servers: set[_Server] = set()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_live_servers):
        # A forked child exiting normally must not take down its parent's servers.
        if server.owner_pid == os.getpid():
            server.stop()


class _Server:
    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.workdir = workdir
        self.owner_pid = os.getpid()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        _live_servers.add(self)

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _spawn(self, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            argv, cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )
        return self._proc

    def _shutdown(self) -> None:
        if self._proc is not None:
            _end_process(self._proc)

    def stop(self) -> None:
        """Stop the server (idempotent) and delete its temp dir."""
        if self not in _live_servers:
            return
        _live_servers.discard(self)
        try:
            self._shutdown()
        finally:
            if self._log is not None:
                self._log.close()
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


# --- Redis ------------------------------------------------------------------------------------


class RedisServer(_Server):
    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def _answers_ping(self) -> bool:
        # No client-side retries: the poll loop retries, and must notice a crashed server quickly.
        client = redis.Redis(
            host=HOST, port=self.port, socket_connect_timeout=1, socket_timeout=1, retry=Retry(NoBackoff(), 0)
        )
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()


def start_redis() -> RedisServer:
    """Start redis-server on a free loopback port with persistence off; raise MissingServerError if absent."""
    _require("redis")
    binary = _redis_binary()
    assert binary is not None
    server = RedisServer(free_port(), Path(tempfile.mkdtemp(prefix="cadence-redis-")))
    try:
        proc = server._spawn(
            [
                str(binary),
                "--port", str(server.port),
                "--bind", HOST,
                "--dir", str(server.workdir),
                "--save", "",
                "--appendonly", "no",
                "--daemonize", "no",
                "--logfile", "",
            ]
        )  # fmt: skip
        _wait_until_ready("redis-server", proc, server.log_path, server._answers_ping)
    except BaseException:
        server.stop()
        raise
    return server


# --- PostgreSQL -------------------------------------------------------------------------------


class PostgresServer(_Server):
    def __init__(self, port: int, workdir: Path, bin_dir: Path) -> None:
        super().__init__(port, workdir)
        self.bin_dir = bin_dir
        self.data_dir = workdir / "data"
        self.socket_dir = workdir / "socket"
        self.url = self.url_for("cadence")

    def url_for(self, database: str) -> str:
        """SQLAlchemy URL (psycopg 3 driver) for a database on this server."""
        return f"postgresql+psycopg://postgres@{HOST}:{self.port}/{quote(database, safe='')}"

    def connect(self, database: str = "postgres") -> psycopg.Connection[TupleRow]:
        """A raw autocommit psycopg connection, for setup that SQLAlchemy would wrap in a transaction."""
        return psycopg.connect(
            host=HOST, port=self.port, user="postgres", dbname=database, connect_timeout=2, autocommit=True
        )

    def create_database(self, name: str) -> str:
        """Create an empty database and return its SQLAlchemy URL."""
        with self.connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)

    def _accepts_connections(self) -> bool:
        try:
            with self.connect():
                return True
        except psycopg.OperationalError:
            return False

    def _run_tool(self, tool: str, *args: str, timeout: float = STARTUP_TIMEOUT) -> None:
        argv = _as_postgres_user([str(self.bin_dir / tool), *args])
        result = subprocess.run(
            argv, cwd=self.workdir, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace").strip()
            raise ServerStartError(f"{tool} failed with code {result.returncode}:\n{output}")

    def _shutdown(self) -> None:
        if self._proc is None:
            return
        # pg_ctl's fast mode rolls back open sessions; if it fails we signal the postmaster ourselves.
        if self._proc.poll() is None:
            with contextlib.suppress(ServerStartError, subprocess.TimeoutExpired):
                self._run_tool("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "fast", timeout=STOP_TIMEOUT)
        _end_process(self._proc)


def _as_postgres_user(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    # setpriv execs in place (runuser forks), so the pid we hold is the postmaster's own.
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--", *argv]


def start_postgres() -> PostgresServer:
    """Start PostgreSQL on a free loopback port with a `cadence` database; MissingServerError if absent."""
    _require("postgres")
    bin_dir = _postgres_bin_dir()
    assert bin_dir is not None
    server = PostgresServer(free_port(), Path(tempfile.mkdtemp(prefix="cadence-pg-")), bin_dir)
    try:
        server.socket_dir.mkdir()
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            for path in (server.workdir, server.socket_dir):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        server._run_tool(
            "initdb", "-D", str(server.data_dir), "-U", "postgres", "--auth=trust",
            "--encoding=UTF8", "--no-locale", "--no-sync",
        )  # fmt: skip
        # Durability settings are off: the data is thrown away and speed is what matters.
        proc = server._spawn(
            _as_postgres_user(
                [
                    str(bin_dir / "postgres"),
                    "-D", str(server.data_dir),
                    "-p", str(server.port),
                    "-c", f"listen_addresses={HOST}",
                    "-c", f"unix_socket_directories={server.socket_dir}",
                    "-c", "fsync=off",
                    "-c", "synchronous_commit=off",
                    "-c", "full_page_writes=off",
                ]
            )
        )  # fmt: skip
        _wait_until_ready("postgres", proc, server.log_path, server._accepts_connections)
        server.create_database("cadence")
    except BaseException:
        server.stop()
        raise
    return server


class Mailbox:
    """An aiosmtpd handler: answers RCPT with the queued replies first, then accepts; keeps what arrives."""

    def __init__(self) -> None:
        self.rcpt_replies: list[str] = []
        self.rcpts = 0
        self.received: list[bytes] = []

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        self.rcpts += 1
        if self.rcpt_replies:
            return self.rcpt_replies.pop(0)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append(envelope.content)
        return "250 2.0.0 Ok: queued as Q1"

    def messages(self) -> list[EmailMessage]:
        parsed = [BytesParser(policy=email.policy.default).parsebytes(raw) for raw in self.received]
        assert all(isinstance(p, EmailMessage) for p in parsed)
        return parsed
