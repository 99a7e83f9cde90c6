"""The `cadence` command: run the service, its worker and scheduler, and check or simulate cadences."""

from __future__ import annotations

import json
import signal
import sys
import threading
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from cadence import __version__, logs
from cadence.errors import RulesError
from cadence.lint import report as lint_report
from cadence.schema import SCHEMA_FILE, render
from cadence.settings import Settings
from cadence.simulate import simulate as simulate_timeline

app = typer.Typer(
    help="Cadence: touch cadences for sales teams. Configuration comes from environment variables "
    "(DATABASE_URL, REDIS_URL, RULES_DIR, TEMPLATES_DIR, OUTBOX_DIR, ...); "
    "nothing set runs the embedded default.",
    no_args_is_help=True,
    add_completion=False,
)
_err = Console(stderr=True)


def _settings() -> Settings:
    settings = Settings()
    logs.configure(settings.log_level, settings.log_json)
    return settings


def _wait_for_signal() -> None:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()


def _service(settings: Settings) -> Any:
    from cadence.service import Service

    try:
        return Service(settings)
    except RulesError as exc:
        _err.print(f"[red]The rules in {settings.rules_dir} have errors; nothing was started.[/red]")
        for problem in exc.problems:
            _err.print(str(problem), markup=False, highlight=False)
        raise typer.Exit(2) from exc


@app.command()
def serve(
    host: Annotated[
        str | None, typer.Option(help="Address to listen on (default: HOST or 127.0.0.1).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on (default: PORT or 8000).")] = None,
) -> None:
    """Run the HTTP API. Without REDIS_URL, worker threads and the scheduler run inside it too."""
    import uvicorn

    from cadence.api import create_app

    settings = _settings()
    service = _service(settings)
    mode = (
        "embedded (in-process broker, scheduler thread)" if settings.embedded_broker else "API only (Redis)"
    )
    _err.print(f"Cadence {__version__} on http://{host or settings.host}:{port or settings.port} — {mode}")
    uvicorn.run(
        create_app(service),
        host=host or settings.host,
        port=port or settings.port,
        log_config=None,
        access_log=False,
    )


@app.command()
def worker(
    threads: Annotated[
        int | None, typer.Option(help="Worker threads (default: WORKER_THREADS or 4).")
    ] = None,
) -> None:
    """Run a worker process that sends touches from the Redis queue (needs REDIS_URL)."""
    settings = _settings()
    if settings.embedded_broker:
        _err.print("cadence worker needs REDIS_URL; without it, `cadence serve` runs the workers itself.")
        raise typer.Exit(2)
    service = _service(settings)
    service.start_worker(threads)
    _err.print(f"worker running with {threads or settings.worker_threads} threads; Ctrl-C to stop")
    _wait_for_signal()
    service.stop()


@app.command()
def scheduler(
    once: Annotated[bool, typer.Option("--once", help="Run one pass and exit.")] = False,
) -> None:
    """Run the scheduler: claim due touches and queue them on Redis (needs REDIS_URL). Several may run."""
    settings = _settings()
    if settings.embedded_broker:
        _err.print(
            "cadence scheduler needs REDIS_URL; without it, `cadence serve` runs the scheduler itself."
        )
        raise typer.Exit(2)
    service = _service(settings)
    if once:
        tick = service.scheduler.tick()
        _err.print(f"queued {len(tick.queued)}, requeued {len(tick.requeued)}, failed {len(tick.failed)}")
        service.stop()
        return
    service.start_scheduler()
    _err.print(f"scheduler running every {settings.scheduler_interval_seconds} s; Ctrl-C to stop")
    _wait_for_signal()
    service.stop()


@app.command()
def migrate() -> None:
    """Bring the database schema up to date (serve, worker and scheduler also do this when they start)."""
    from cadence import store

    settings = _settings()
    store.migrate(store.create_engine(settings.database_url))
    _err.print("schema is up to date")


@app.command()
def lint(
    paths: Annotated[
        list[Path] | None, typer.Argument(help="Rule files or folders (default: RULES_DIR).")
    ] = None,
    templates: Annotated[Path | None, typer.Option(help="Templates folder (default: TEMPLATES_DIR).")] = None,
    output: Annotated[str, typer.Option("--format", help="text or json")] = "text",
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 on warnings too.")] = False,
) -> None:
    """Check cadence files: errors and warnings with file:line:column and a hint. Exits 1 on any error."""
    if output not in ("text", "json"):
        raise typer.BadParameter(f"{output!r} is not text or json", param_hint="--format")
    settings = Settings()
    targets = paths or [settings.rules_dir]
    missing = [str(p) for p in targets if not p.exists()]
    if missing:
        _err.print(f"no such file or folder: {', '.join(missing)}")
        raise typer.Exit(2)
    found = lint_report(targets, templates or settings.templates_dir)
    errors = sum(p.severity == "error" for p in found.problems)
    warnings = len(found.problems) - errors
    failed = bool(errors or (strict and warnings))
    if output == "json":
        problems = [p.as_dict() for p in found.problems]
        print(json.dumps({"ok": not failed, "cadences": found.cadences, "problems": problems}, indent=2))
    else:
        for problem in found.problems:
            print(problem)
        if failed:
            because = "" if errors else " (--strict fails on warnings)"
            print(f"{errors} error(s), {warnings} warning(s){because}", file=sys.stderr)
        else:
            names = ", ".join(found.cadences)
            print(f"ok: {len(found.cadences)} cadence(s): {names}; {warnings} warning(s)")
    if failed:
        raise typer.Exit(1)


def _parse_start(value: str) -> datetime:
    try:
        if len(value) == 10:
            return datetime.combine(date.fromisoformat(value), datetime.min.time())
        return datetime.fromisoformat(value)
    except ValueError as exc:
        raise typer.BadParameter(f"{value!r} is not YYYY-MM-DD or an ISO date-time") from exc


def _parse_object(value: str | None, name: str) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"{name} is not JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise typer.BadParameter(f"{name} must be a JSON object")
    return parsed


@app.command()
def simulate(
    file: Annotated[Path, typer.Argument(help="The cadence file.", exists=True, dir_okay=False)],
    start: Annotated[str, typer.Option(help="Enrollment start: YYYY-MM-DD or ISO date-time, in the zone.")],
    tz: Annotated[str | None, typer.Option(help="The contact's IANA time zone, e.g. Europe/Berlin.")] = None,
    contact: Annotated[str | None, typer.Option(help="Contact fields as JSON, e.g. '{\"age\": 55}'.")] = None,
    deal: Annotated[str | None, typer.Option(help="Deal fields as JSON.")] = None,
    output: Annotated[str, typer.Option("--format", help="table or json")] = "table",
) -> None:
    """Print a cadence's timeline for a contact: step, local date and time, channel, reason."""

    from cadence.language import parse

    settings = Settings()
    try:
        spec = parse(file.read_text(encoding="utf-8"), str(file)).spec
    except RulesError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        raise typer.Exit(1) from exc
    fields = _parse_object(contact, "--contact") or {}
    if tz:
        fields["timezone"] = tz
    when = _parse_start(start)
    if when.tzinfo is None:
        from cadence import timing

        zone = timing.zone_for(fields.get("timezone"), spec.calendar, settings.default_timezone)
        when = when.replace(tzinfo=zone)
    rows = simulate_timeline(spec, when, fields, _parse_object(deal, "--deal"), settings.default_timezone)
    if output == "json":
        print(json.dumps([r.as_dict() for r in rows], indent=2, ensure_ascii=False))
        return
    table = Table(title=f"{spec.cadence} from {when.isoformat()}")
    for column in ("step", "local date", "time", "channel", "reason"):
        table.add_column(column)
    for row in rows:
        reason = row.reason if row.sent else f"[dim]{row.reason} — {row.note}[/dim]"
        table.add_row(
            str(row.step),
            row.local.strftime("%a %Y-%m-%d"),
            row.local.strftime("%H:%M %Z"),
            row.channel,
            reason,
        )
    Console().print(table)


@app.command()
def schema(
    write: Annotated[bool, typer.Option("--write", help="Write it to --output, not to stdout.")] = False,
    output: Annotated[
        Path, typer.Option(help="Where --write puts it: the repo root, where rule files look.")
    ] = Path(SCHEMA_FILE),
) -> None:
    """Print the JSON Schema of cadence files, which editors use to complete and check them as you type."""
    text = render()
    if not write:
        print(text, end="")
        return
    output.write_text(text, encoding="utf-8")
    _err.print(f"wrote {output}", markup=False, highlight=False)


def main() -> None:
    app()
