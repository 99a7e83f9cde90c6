"""Authoring speed: `cadence lint` over 1,000 cadences, and simulating a one-year weekly nurture.

Targets: lint under 5 s; the simulation under 200 ms. The simulation runs the real dispatch path on an
in-memory SQLite database, so its count of database statements per touch sent is printed too. Run from the
repository root:

    .venv/bin/python bench/authoring.py [--cadences 1000] [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa

from cadence import rules, sandbox, simulate
from cadence.lint import report
from cadence.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def lint_many(count: int) -> tuple[float, int]:
    """Copies of the shipped cadences under new names, with the policy, linted as one folder."""
    shipped = [
        p for p in sorted((ROOT / "rules").glob("*.yaml")) if p.name not in ("policy.yaml", "crm.yaml")
    ]
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        (out / "policy.yaml").write_text((ROOT / "rules" / "policy.yaml").read_text())
        names = {p.stem for p in shipped}
        families = -(-count // len(shipped))  # whole families, so every `then` target exists
        for n in range(families * len(shipped)):
            source, family = shipped[n % len(shipped)], n // len(shipped)
            lines = []
            for line in source.read_text().splitlines(keepends=True):
                if not line.startswith("kind:"):  # a family of copies names its own cadences in `then`
                    for name in names:
                        line = line.replace(f": {name}\n", f": {name}-{family}\n")
                lines.append(line)
            text = "".join(lines)
            (out / f"{source.stem}-{family}.yaml").write_text(text)
        started = time.perf_counter()
        found = report([out], ROOT / "templates")
        took = time.perf_counter() - started
    errors = [p for p in found.problems if p.severity == "error"]
    assert not errors, errors[:3]
    return took, len(found.cadences)


def simulate_nurture(runs: int) -> tuple[list[float], float]:
    """Seconds each run took (after one warm-up run), and database statements per touch sent."""
    loaded = rules.load([ROOT / "rules"], ROOT / "templates")
    env = sandbox.template_environment(ROOT / "templates")
    contact = {
        "email": "a@example.com",
        "phone": "+79161234567",
        "sms_consent": True,
        "address": "x",
        "age": 60,
    }
    start = datetime(2027, 3, 1, tzinfo=ZoneInfo("Europe/Moscow"))
    times = []
    statements = 0

    def count(*_: Any) -> None:
        nonlocal statements
        statements += 1

    for _ in range(runs + 1):  # the first run warms caches and is not counted
        statements = 0
        sa.event.listen(sa.Engine, "before_cursor_execute", count)
        began = time.perf_counter()
        events = simulate.run(
            loaded,
            "lost-prospect-nurture",
            start,
            contact,
            {"status": "lost"},
            days=365,
            templates=env,
            sender=Settings(_env_file=None).sender(),
            default_timezone="UTC",
        )
        times.append(time.perf_counter() - began)
        sa.event.remove(sa.Engine, "before_cursor_execute", count)
    sent = sum(e.kind == "touch" and e.status == "sent" for e in events)
    assert sent >= 45
    return times[1:], statements / sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cadences", type=int, default=1000, help="cadences to lint (default 1000)")
    parser.add_argument("--runs", type=int, default=5, help="timed simulation runs (default 5)")
    args = parser.parse_args()
    took, count = lint_many(args.cadences)
    print(f"lint: {count} cadences in {took:.2f} s (target < 5 s)")
    times, per_touch = simulate_nurture(args.runs)
    print(
        f"simulate a one-year weekly nurture: median {statistics.median(times) * 1000:.0f} ms, "
        f"best {min(times) * 1000:.0f} ms over {len(times)} runs (target < 200 ms); "
        f"{per_touch:.1f} database statements per touch sent"
    )


if __name__ == "__main__":
    main()
