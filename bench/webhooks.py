"""Webhook ingest: how many real CRM deliveries one `cadence serve` process takes in a second, and how fast.

wrk posts Pipedrive's recorded v2 "deal moved to the proposal stage" body (18 KB, HTTP Basic credentials)
over loopback; every request is a different delivery (its own event id, deal and person), so each one is
stored and, then or moments later, creates a contact and a deal, enrolls the deal in `open-deal` and plans
its first touch (a delivery arriving alone is acted on before the answer; in a burst, a worker acts on it
once it is stored, and the answer says `queued`). Beside it,
the same wrk settings against a bare Starlette endpoint that only parses the body (bench/bare_app.py), on
the same uvicorn, give the floor. A further run sends one delivery over and over: the duplicate rate.
After the runs the database is counted: every delivery answered 2xx must be stored (acted on, or waiting
for a worker: in the redis setup no worker runs, so they wait).

Two setups, one server process each:
- embedded: only the SQLite file set, as `cadence serve` runs out of the box, with its worker threads and
  scheduler inside the process, as a laptop or demo runs it. The day-0 email of `open-deal` is due at once
  inside its window (Moscow business hours, 06:00-15:00 UTC on weekdays): in a run inside it the
  in-process workers also render and file those emails; outside it the touches wait for the window;
- redis: REDIS_URL set (a throwaway redis-server), so `cadence serve` is the API alone, as in production
  where workers and schedulers run elsewhere; still the SQLite file.

Targets: at least 1,000 webhooks/s with p99 under 100 ms. Run from the repository root:

    .venv/bin/python bench/webhooks.py [--setup embedded|redis|both] [--duration 15] [--warmup 5]
        [--threads 2] [--connections 32] [--profile DIR]

With --profile, py-spy records where the Cadence server spends CPU (threads holding the GIL) during each
measured run: collapsed stacks, one file per setup, for flamegraph.pl or speedscope.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
FIXTURE = ROOT / "tests" / "fixtures" / "crm_webhooks" / "pipedrive" / "v2_change_deal_stage.json"
LUA = Path(__file__).with_name("webhooks.lua")
#: The HTTP Basic credentials set on the Pipedrive webhook.
PIPEDRIVE_USER, PIPEDRIVE_PASSWORD = "cadence", "bench-secret"
#: Seconds a server may take to answer its first request.
START_TIMEOUT = 60.0
#: Seconds a server may take to stop after SIGINT before it is killed.
STOP_TIMEOUT = 30.0
#: Webhooks a second the Cadence server must take, and the p99 latency it must keep, in milliseconds.
TARGET_RATE = 1000
TARGET_P99_MS = 100.0
#: Samples a second py-spy takes of each server thread.
PROFILE_RATE = 200
#: Seconds wrk waits for one answer before counting a timeout (long, so slow answers show in the latency).
WRK_TIMEOUT = "10s"


@dataclass(frozen=True)
class Load:
    threads: int
    connections: int
    duration: int
    warmup: int


@dataclass(frozen=True)
class Run:
    """One wrk run as webhooks.lua reports it."""

    requests: int
    seconds: float
    new: int
    duplicate: int
    refused: int
    socket_errors: int
    p50_ms: float
    p99_ms: float
    max_ms: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def line(self, what: str) -> str:
        errors = self.socket_errors
        answers = f"202 {self.new}, 200 {self.duplicate}, other {self.refused}, socket errors {errors}"
        return (
            f"{what:<34} {self.rate:8.0f} req/s   p50 {self.p50_ms:7.1f} ms   p99 {self.p99_ms:7.1f} ms"
            f"   max {self.max_ms:7.1f} ms   ({answers})"
        )


def write_template(folder: Path) -> Path:
    """The recorded body with its event id, deal id and person id left as @EVENT@, @DEAL@ and @PERSON@."""
    payload = json.loads(FIXTURE.read_bytes())
    payload["meta"]["id"] = "@EVENT@"
    payload["meta"]["entity_id"] = "@DEAL@"
    payload["data"]["id"] = "@DEAL@"
    payload["data"]["person_id"] = "@PERSON@"
    text = json.dumps(payload, indent=2, ensure_ascii=False)
    text = text.replace('"id": "@DEAL@"', '"id": @DEAL@').replace('"@PERSON@"', "@PERSON@")
    path = folder / "pipedrive.json.template"
    path.write_text(text, encoding="utf-8")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError as exc:
        return hasattr(exc, "code")  # an HTTP error is an answer


@contextlib.contextmanager
def server(argv: list[str], env: dict[str, str], cwd: Path, probe: str) -> Iterator[subprocess.Popen[bytes]]:
    """A server process, stopped by its own pid (SIGINT, then SIGKILL) however the block ends."""
    log = (cwd / "server.log").open("ab")
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _answers(probe):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv[:4]} did not start; see {cwd / 'server.log'}")
            time.sleep(0.2)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


@contextlib.contextmanager
def profiler(pid: int, out: Path | None) -> Iterator[None]:
    """py-spy sampling the server (all threads, idle ones left out) while the block runs."""
    if out is None:
        yield
        return
    argv = [str(Path(PYTHON).with_name("py-spy")), "record", "--pid", str(pid), "--format", "raw", "--gil"]
    argv += ["--output", str(out), "--rate", str(PROFILE_RATE)]
    proc = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wrk(port: int, load: Load, template: Path, run: int, duration: int, same: bool = False) -> Run:
    token = base64.b64encode(f"{PIPEDRIVE_USER}:{PIPEDRIVE_PASSWORD}".encode()).decode()
    argv = [
        "wrk",
        f"-t{load.threads}",
        f"-c{load.connections}",
        f"-d{duration}s",
        "--latency",
        "--timeout", WRK_TIMEOUT,
        "-s", str(LUA),
        f"http://127.0.0.1:{port}",
        "--", str(template), str(run), f"Basic {token}",
    ]  # fmt: skip
    if same:
        argv.append("same")
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    result = next(line for line in out.splitlines() if line.startswith("RESULT "))
    return Run(**json.loads(result.removeprefix("RESULT ")))


def cadence_env(folder: Path, port: int, redis_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(
        DATABASE_URL=f"sqlite:///{folder / 'cadence.db'}",
        RULES_DIR=str(ROOT / "rules"),
        TEMPLATES_DIR=str(ROOT / "templates"),
        OUTBOX_DIR=str(folder / "outbox"),
        PUBLIC_URL=f"http://127.0.0.1:{port}",
        PIPEDRIVE_USER=PIPEDRIVE_USER,
        PIPEDRIVE_PASSWORD=PIPEDRIVE_PASSWORD,
        PYTHONPATH=str(ROOT),
    )
    if redis_url:
        env["REDIS_URL"] = redis_url
    return env


def count_rows(database: Path) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(database)) as db:
        found = dict(db.execute("SELECT status, count(*) FROM inbound_event GROUP BY status").fetchall())
        for table in ("contact", "deal", "enrollment", "touch"):
            found[table] = db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    return found


def measure_cadence(setup: str, load: Load, template: Path, profile: Path | None) -> list[str]:
    """Warm-up, the measured run of distinct deliveries, the duplicate run; then the rows are counted."""
    with contextlib.ExitStack() as stack:
        redis_url = None
        if setup == "redis":
            sys.path.insert(0, str(ROOT / "tests"))
            from servers import start_redis

            redis_url = stack.enter_context(start_redis()).url
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"bench-webhooks-{setup}-")))
        port = free_port()
        argv = [PYTHON, "-m", "cadence", "serve", "--port", str(port)]
        env = cadence_env(folder, port, redis_url)
        with server(argv, env, folder, f"http://127.0.0.1:{port}/healthz") as proc:
            warm = wrk(port, load, template, 1, load.warmup)
            with profiler(proc.pid, profile and profile / f"cadence-{setup}.txt"):
                distinct = wrk(port, load, template, 2, load.duration)
            duplicate = wrk(port, load, template, 3, load.duration, same=True)
        rows = count_rows(folder / "cadence.db")
    accepted = warm.new + distinct.new + duplicate.new
    processed, waiting = rows.pop("processed", 0), rows.pop("received", 0)
    made = {table: rows.pop(table) for table in ("deal", "enrollment", "touch")}
    rows.pop("contact")
    kept = "every one stored" if processed + waiting >= accepted and not rows else "SOME LOST"
    met = distinct.rate >= TARGET_RATE and distinct.p99_ms < TARGET_P99_MS
    return [
        distinct.line(f"cadence ({setup}), new deliveries"),
        duplicate.line(f"cadence ({setup}), one duplicate"),
        f"  answered 202: {accepted}; rows processed: {processed}, waiting for a worker: {waiting}, "
        f"otherwise: {rows or 'none'}; "
        f"made: {made}: {kept}",
        f"  target {TARGET_RATE} webhooks/s, p99 < {TARGET_P99_MS:.0f} ms: {'met' if met else 'MISSED'}",
    ]


def measure_bare(load: Load, template: Path) -> str:
    with tempfile.TemporaryDirectory(prefix="bench-webhooks-bare-") as name:
        port = free_port()
        argv = [PYTHON, "-m", "uvicorn", "bare_app:app", "--app-dir", str(LUA.parent)]
        argv += ["--port", str(port), "--no-access-log", "--log-level", "warning"]
        with server(argv, dict(os.environ), Path(name), f"http://127.0.0.1:{port}/"):
            wrk(port, load, template, 1, load.warmup)
            return wrk(port, load, template, 2, load.duration).line("bare Starlette, parse JSON only")


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--setup", choices=["embedded", "redis", "both"], default="both")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections")
    parser.add_argument("--duration", type=int, default=15, help="seconds of each measured run")
    parser.add_argument("--warmup", type=int, default=5, help="seconds of warm-up before them")
    parser.add_argument("--profile", type=Path, help="folder for py-spy profiles of the measured runs")
    args = parser.parse_args()
    if shutil.which("wrk") is None:  # before any server starts
        parser.error("wrk not found on PATH; install it with: apt-get install -y wrk")
    load = Load(args.threads, args.connections, args.duration, args.warmup)
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    setups = ["embedded", "redis"] if args.setup == "both" else [args.setup]
    with tempfile.TemporaryDirectory(prefix="bench-webhooks-") as name:
        template = write_template(Path(name))
        lines = [measure_bare(load, template)]
        for setup in setups:
            lines += measure_cadence(setup, load, template, args.profile)
    print(f"\nwrk -t{load.threads} -c{load.connections}: {load.duration} s a run, {load.warmup} s warm-up")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
