"""The `cadence` command: run the service, its worker and scheduler, and check or simulate cadences."""

from __future__ import annotations

import gc
import json
import signal
import sys
import threading
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from cadence import __version__, logs
from cadence.errors import Problem, RulesError
from cadence.lint import report as lint_report
from cadence.rules import RuleSet
from cadence.rules import load as load_rules
from cadence.schema import SCHEMA_FILE, render
from cadence.settings import Settings

app = typer.Typer(
    help="Cadence: touch cadences for sales teams. Configuration comes from environment variables "
    "(DATABASE_URL, REDIS_URL, RULES_DIR, TEMPLATES_DIR, OUTBOX_DIR, ...); "
    "nothing set runs the embedded default.",
    no_args_is_help=True,
    add_completion=False,
)
#: Messages name files, folders and URLs: a line is never wrapped at the console's width (a path cut in two
#: is found by neither grep nor a click), nothing in it is coloured as a guess at what it is, and brackets in
#: it are printed, not read as markup (a colour is given as a style).
_err = Console(stderr=True, soft_wrap=True, highlight=False, markup=False)


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
        _err.print(f"The rules in {settings.rules_dir} have errors; nothing was started.", style="red")
        for problem in exc.problems:
            _err.print(str(problem))
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
    application = create_app(service)
    _settle()
    uvicorn.run(
        application,
        host=host or settings.host,
        port=port or settings.port,
        log_config=None,
        access_log=False,
    )


def _settle() -> None:
    """Keep what a long-running process has loaded by now (modules, rules, templates, its service) out of the
    collector's full passes: they walk every object and hold up every request and send in flight (they set
    the API's p99 latency under load)."""
    gc.collect()
    gc.freeze()


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
    _settle()
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
    days: Annotated[int, typer.Option(min=1, max=3660, help="How many days to follow the contact.")] = 90,
    tz: Annotated[str | None, typer.Option(help="The contact's IANA time zone, e.g. Europe/Berlin.")] = None,
    contact: Annotated[str | None, typer.Option(help="Contact fields as JSON, e.g. '{\"age\": 55}'.")] = None,
    deal: Annotated[
        str | None, typer.Option(help="Deal fields as JSON; the simulated deal is open unless they say not.")
    ] = None,
    outcome: Annotated[
        list[str] | None,
        typer.Option(
            help="An outcome on a day counted from the start, answering that day's touch: "
            "'day 3: no_answer', "
            "'day 10 16:00: meeting_booked', 'day 20: lost'. Repeat the option for more.",
        ),
    ] = None,
    block: Annotated[
        list[str] | None,
        typer.Option(
            help="A block the contact already has: a channel or all, for some days: call, all, email:30."
        ),
    ] = None,
    rules_dir: Annotated[
        Path | None,
        typer.Option(
            "--rules", help="The rules folder (policy.yaml, then-targets); default: the file's own folder."
        ),
    ] = None,
    templates_dir: Annotated[
        Path | None,
        typer.Option(
            "--templates",
            help="The templates folder; default: TEMPLATES_DIR if there, else templates/ beside the rules.",
        ),
    ] = None,
    output: Annotated[str, typer.Option("--format", help="table or json")] = "table",
) -> None:
    """Run a cadence for one contact on a private, simulated clock: every touch as the service would make it
    (windows, holidays, DST, quiet hours, blocks, caps, budget, repeats), and the branches outcomes take."""
    from cadence import rules as ruleset
    from cadence import sandbox, timing
    from cadence import simulate as simulation
    from cadence.language import parse

    if output not in ("table", "json"):
        raise typer.BadParameter("--format is table or json")
    settings = Settings()
    try:
        spec = parse(file.read_text(encoding="utf-8"), str(file)).spec
        folder = rules_dir or file.parent
        paths = [folder] if file.resolve().parent == folder.resolve() else [folder, file]
        templates = templates_dir or settings.templates_dir
        if templates_dir is None and not templates.is_dir():
            templates = folder.resolve().parent / "templates"
        loaded = ruleset.load(paths, templates)
    except RulesError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        raise typer.Exit(1) from exc
    try:
        scripted = [simulation.Scripted.parse(text) for text in outcome or ()]
        blocks = [simulation.BlockedAtStart.parse(text) for text in block or ()]
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    fields = _parse_object(contact, "--contact") or {}
    if tz:
        fields["timezone"] = tz
    when = _parse_start(start)
    zone = timing.zone_for(fields.get("timezone"), spec.calendar, settings.default_timezone)
    if when.tzinfo is None:
        when = when.replace(tzinfo=zone)
    events = simulation.run(
        loaded,
        spec.cadence,
        when,
        fields,
        {"status": "open", **(_parse_object(deal, "--deal") or {})},
        days=days,
        templates=sandbox.template_environment(templates),
        sender=settings.sender(),
        default_timezone=settings.default_timezone,
        outcomes=scripted,
        blocks=blocks,
    )
    if output == "json":
        print(json.dumps(simulation.as_json(events), indent=2, ensure_ascii=False))
        return
    _print_timeline(spec.cadence, when, days, events)


def _print_timeline(name: str, start: datetime, days: int, events: list[Any]) -> None:
    table = Table(title=f"{name} from {start.isoformat()}, {days} days")
    for column in ("local date", "time", "cadence", "step", "channel", "status", "reason / note"):
        table.add_column(column)
    styles = {"sent": "", "skipped": "dim", "cancelled": "dim", "failed": "red", "planned": "dim italic"}
    for event in events:
        step = (
            "" if event.step is None else f"{event.step}" + (f".{event.iteration}" if event.iteration else "")
        )
        if event.kind == "touch":
            text = event.reason or ""
            if event.status != "sent" and event.note:
                text += f" — {event.note}"
            if event.variant:
                text += f" (variant {event.variant})"
            status, style = event.status or "", styles.get(event.status or "", "")
        else:
            text, status, style = event.note or "", event.status or event.kind, "bold"
        table.add_row(
            event.local.strftime("%a %Y-%m-%d"),
            event.local.strftime("%H:%M %Z"),
            event.cadence,
            step,
            event.channel or event.kind,
            status,
            text,
            style=style or None,
        )
    # Piped into a file or another program, a table keeps whole names rather than fold to 80 columns.
    Console(width=None if sys.stdout.isatty() else 200).print(table)


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
    _err.print(f"wrote {output}")


rules_app = typer.Typer(
    help="Compare rule sets, and have a running server load its rules again without a restart.",
    no_args_is_help=True,
)
app.add_typer(rules_app, name="rules")

#: Seconds `cadence rules reload` waits for the server's answer.
RELOAD_TIMEOUT_SECONDS = 60
#: How a rule-set diff marks each cadence, and in which style.
_MARKS = {"added": ("+", "green"), "removed": ("-", "red"), "changed": ("~", "yellow")}


def _invalid(problems: list[Problem], output: str, after: str) -> NoReturn:
    """Print every problem, located, as `cadence lint` does, and exit 2."""
    if output == "json":
        print(json.dumps({"problems": [p.as_dict() for p in problems]}, indent=2))
    else:
        for problem in problems:
            print(problem)
        print(f"{len(problems)} error(s); {after}", file=sys.stderr)
    raise typer.Exit(2)


def _load_folders(folders: list[Path], templates: Path, output: str, after: str) -> list[RuleSet]:
    """Each folder's rule set; any problem in any of them is printed, with all the others, and exits 2."""
    missing = [str(f) for f in folders if not f.is_dir()]
    if missing:
        _err.print(f"no such folder: {', '.join(missing)}")
        raise typer.Exit(2)
    loaded, problems = [], []
    for folder in folders:
        try:
            loaded.append(load_rules([folder], templates))
        except RulesError as exc:
            problems.extend(exc.problems)
    if problems:
        _invalid(problems, output, after)
    return loaded


def _print_diff(found: dict[str, Any]) -> None:
    """A rule-set diff as its JSON gives it (`rules diff --format json`, POST /rules/reload), for people."""
    from rich.text import Text

    out = Console(highlight=False, soft_wrap=True)
    unchanged = []
    for cadence in found["cadences"]:
        if cadence["status"] == "unchanged":
            unchanged.append(cadence["name"])
            continue
        mark, style = _MARKS[cadence["status"]]
        line = Text.assemble(
            (f"{mark} {cadence['name']}", f"bold {style}"),
            f" {cadence['status']} ({cadence['new_file'] or cadence['old_file']})",
        )
        if cadence.get("active_on_old"):
            line.append(f"; {cadence['active_on_old']} active enrollment(s) keep their old version")
        out.print(line)
        for change in cadence["changes"]:
            out.print(Text(f"    {change['text']}"))
    if found["policy"]:
        out.print(Text("~ policy", style="bold yellow"))
        for change in found["policy"]:
            out.print(Text(f"    {change['text']}"))
    if unchanged:
        out.print(Text(f"unchanged: {', '.join(unchanged)}", style="dim"))
    if not found["differs"]:
        out.print("no differences")


@rules_app.command("diff")
def rules_diff(
    folders: Annotated[
        list[Path],
        typer.Argument(
            metavar="OLD NEW",
            help="Two rules folders, each with its policy.yaml: OLD, then NEW. With --against-db, NEW only.",
            show_default=False,
        ),
    ],
    against_db: Annotated[
        bool,
        typer.Option(
            "--against-db",
            help="Compare NEW with the newest cadence versions in the database (DATABASE_URL), the ones "
            "enrollments started on, and count the active enrollments that keep an old version.",
        ),
    ] = False,
    templates: Annotated[Path | None, typer.Option(help="Templates folder (default: TEMPLATES_DIR).")] = None,
    output: Annotated[str, typer.Option("--format", help="text or json")] = "text",
) -> None:
    """Show what changed between two rule sets: cadences added, removed or changed, and the policy.

    A changed cadence lists its changed fields and steps as its file names them: `steps[2].day: 4 → 5`.
    Exits 0 when the rules are the same and 1 when they differ.
    Invalid rules exit 2, with every error and its file:line:column, as `cadence lint` prints them.
    """
    import sqlalchemy as sa

    from cadence import diff, store

    if output not in ("text", "json"):
        raise typer.BadParameter(f"{output!r} is not text or json", param_hint="--format")
    if len(folders) != (1 if against_db else 2):
        wanted = "one folder, NEW, with --against-db" if against_db else "two folders, OLD and NEW"
        raise typer.BadParameter(f"give {wanted}", param_hint="[OLD] NEW")
    settings = Settings()
    rule_sets = _load_folders(folders, templates or settings.templates_dir, output, "nothing compared")
    if against_db:
        db = store.create_engine(settings.database_url)
        try:
            found = diff.against_db(db, rule_sets[0])
        except RulesError as exc:
            # A stored version the language no longer reads: the enrollments on it cannot run either.
            _invalid(exc.problems, output, "a version in the database does not load")
        except sa.exc.SQLAlchemyError as exc:
            _err.print(f"cannot read the database: {exc}")
            raise typer.Exit(2) from exc
        finally:
            db.dispose()
    else:
        found = diff.compare_rules(rule_sets[0], rule_sets[1])
    if output == "json":
        print(json.dumps(found.as_dict(), indent=2, ensure_ascii=False))
    else:
        if against_db:
            _err.print("against the cadence versions in the database (which holds no policy)")
        _print_diff(found.as_dict())
    if found.differs:
        raise typer.Exit(1)


def _server_url(settings: Settings) -> str:
    host = "127.0.0.1" if settings.host in ("", "0.0.0.0", "::") else settings.host
    return f"http://[{host}]:{settings.port}" if ":" in host else f"http://{host}:{settings.port}"


def _refusal(body: bytes) -> dict[str, Any]:
    """The API's one error shape from a refusal; {} when the answer is something else, e.g. a proxy's page."""
    try:
        answer = json.loads(body)
    except ValueError:
        return {}
    problem = answer.get("error") if isinstance(answer, dict) else None
    return problem if isinstance(problem, dict) else {}


@rules_app.command("reload")
def rules_reload(
    url: Annotated[
        str | None, typer.Option(help="The running server (default: http://HOST:PORT from the settings).")
    ] = None,
) -> None:
    """Check RULES_DIR here, then have the running server load it again, and print what changed.

    All or nothing: invalid rules are not sent (exit 2), and a server that finds problems keeps its rules.
    Running enrollments keep their cadence version; only new enrollments start on the new rules.
    Sends ADMIN_TOKEN as a bearer token when it is set; without it, the server answers only its own machine.
    """
    import urllib.error
    import urllib.request

    settings = Settings()
    base = (url or _server_url(settings)).rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise typer.BadParameter(f"{base!r} is not an http:// or https:// address", param_hint="--url")
    _load_folders([settings.rules_dir], settings.templates_dir, "text", "nothing sent to the server")
    headers = {"Authorization": f"Bearer {settings.admin_token}"} if settings.admin_token else {}
    request = urllib.request.Request(f"{base}/rules/reload", data=b"", method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=RELOAD_TIMEOUT_SECONDS) as response:
            found = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            problem = _refusal(exc.read())
        if exc.code == 422 and problem.get("problems"):
            _invalid([Problem(**p) for p in problem["problems"]], "text", "the server keeps the rules it has")
        _err.print(f"{base}: {exc.code} {problem.get('message', exc.reason)}")
        raise typer.Exit(1) from exc
    except (urllib.error.URLError, OSError) as exc:
        _err.print(f"cannot reach {base}: {exc}")
        raise typer.Exit(1) from exc
    _err.print(f"{base} reloaded {settings.rules_dir}")
    _print_diff(found)


@app.command("print-batch")
def print_batch(
    day: Annotated[
        str | None,
        typer.Option(
            "--date", help="The local date of the letters, YYYY-MM-DD (default: today in DEFAULT_TIMEZONE)."
        ),
    ] = None,
) -> None:
    """Join one day's letters (LETTER_PROVIDER=batch) into one PDF for the printer and a CSV manifest for
    the mailroom, both beside that day's folder in OUTBOX_DIR/print."""
    from zoneinfo import ZoneInfo

    from channels.letter_batch import NoLetters, build_batch

    settings = Settings()
    try:
        when = date.fromisoformat(day) if day else datetime.now(ZoneInfo(settings.default_timezone)).date()
    except ValueError as exc:
        raise typer.BadParameter(f"{day!r} is not YYYY-MM-DD", param_hint="--date") from exc
    try:
        pdf, manifest, count = build_batch(settings.outbox_dir, when)
    except NoLetters as exc:
        hint = "" if settings.letter_provider == "batch" else " (letters go there with LETTER_PROVIDER=batch)"
        _err.print(f"{exc}{hint}")
        raise typer.Exit(1) from exc
    print(f"{count} letter(s) for {when.isoformat()}")
    print(f"PDF: {pdf}")
    print(f"manifest: {manifest}")


keys_app = typer.Typer(help="API keys: make one for a manager, an integration or an admin; list; revoke.")
app.add_typer(keys_app, name="keys")


@keys_app.command("create")
def keys_create(
    role: Annotated[str, typer.Option(help="admin, integration or manager.")],
    name: Annotated[str, typer.Option(help='What the key is for, e.g. "Ivan\'s phone".')],
    owner: Annotated[
        str | None, typer.Option(help="For a manager: their name as deals carry it in `owner`.")
    ] = None,
) -> None:
    """Make a key and print its secret: it is shown this once and stored only as a hash."""
    from datetime import UTC

    from cadence import keys, store

    settings = Settings()
    db = store.create_engine(settings.database_url)
    store.migrate(db)
    try:
        key, secret = keys.create(db, name, role, owner, datetime.now(UTC))
    except keys.BadKey as exc:
        raise typer.BadParameter(str(exc), param_hint=f"--{exc.field}") from exc
    _err.print(f"key {key.id} ({key.role}{f', {key.owner}' if key.owner else ''}): {key.name}")
    _err.print("The secret, shown only now; send it as Authorization: Bearer <secret>")
    print(secret)


@keys_app.command("list")
def keys_list() -> None:
    """Every key: id, role, owner, name, when made and revoked. Secrets are not stored, so not shown."""
    from cadence import keys, store

    settings = Settings()
    db = store.create_engine(settings.database_url)
    store.migrate(db)
    table = Table("id", "role", "owner", "name", "created", "revoked")
    for key in keys.listing(db):
        revoked = key.revoked_at.isoformat(timespec="seconds") if key.revoked_at else ""
        table.add_row(
            str(key.id),
            key.role,
            key.owner or "",
            key.name,
            key.created_at.isoformat(timespec="seconds"),
            revoked,
        )
    Console().print(table)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[int, typer.Argument(help="The key's id, from `cadence keys list`.")],
) -> None:
    """Revoke a key: requests with it are refused from now on."""
    from datetime import UTC

    from cadence import keys, store

    settings = Settings()
    db = store.create_engine(settings.database_url)
    store.migrate(db)
    key = keys.revoke(db, key_id, datetime.now(UTC))
    if key is None:
        _err.print(f"no key {key_id}")
        raise typer.Exit(1)
    print(f"key {key.id} revoked at {key.revoked_at.isoformat() if key.revoked_at else ''}")


def main() -> None:
    app()
