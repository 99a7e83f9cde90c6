"""Fuzzing at full scale, where nothing may crash Cadence: cadence files, conditions, injection, API, CRM.

Generated cadence files go through the loader, generated conditions through the sandbox, the
template-injection corpus through templates and conditions, schemathesis requests from the OpenAPI document
through the app, and mangled CRM deliveries through every webhook adapter.

Targets: zero crashes in every campaign (each cadence file loads or gets a located error; each condition
works or raises the sandbox's own ExpressionError; each injection attempt is refused, or renders showing
nothing from Python, as tests/fixtures/template_injection.yaml says; no request gets a 5xx); a full run in
about 5 minutes on a quiet machine. The suite runs the same strategies with a few hundred examples; this
runs them by the ten thousand. Run from the repository root:

    .venv/bin/python bench/fuzz.py [--cadences 10000] [--load-every 10] [--conditions 10000]
        [--api-examples 60] [--crm-bodies 3000] [--seed 0] [--only cadences,conditions,injection,api,crm]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import fuzz_strategies as fuzz  # noqa: E402  (the tests folder is put on the path just above)

from cadence import sandbox  # noqa: E402

#: Crashes kept per campaign to print, beyond the count.
SHOWN_CRASHES = 5


@dataclass
class Tally:
    """One campaign's figures: inputs tried, how each ended, and the first crashes in full."""

    campaign: str
    ok_means: str
    refused_means: str
    tried: int = 0
    ok: int = 0
    refused: int = 0
    crashed: int = 0
    seconds: float = 0.0
    crashes: list[str] = field(default_factory=list)

    def judge(self, what: Any, run: Callable[..., bool], *args: Any) -> None:
        """Run one input (`what`, as shown for a crash): True is ok, False refused as it should be; any
        exception is a crash."""
        self.tried += 1
        try:
            if run(*args):
                self.ok += 1
            else:
                self.refused += 1
        except Exception as exc:
            self.crashed += 1
            if len(self.crashes) < SHOWN_CRASHES:
                self.crashes.append(f"{type(exc).__name__}: {str(exc)[:300]} <- {what!r:.300}")


@contextmanager
def timed(tally: Tally) -> Iterator[Tally]:
    started = time.perf_counter()
    try:
        yield tally
    finally:
        tally.seconds += time.perf_counter() - started


def drive(strategy: st.SearchStrategy[Any], examples: int, seed: int, each: Callable[[Any], None]) -> None:
    """Call `each` on `examples` inputs drawn from `strategy`, reproducibly for one seed; never shrinks."""

    @hypothesis.seed(seed)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate],
    )
    @given(value=strategy)
    def run(value: Any) -> None:
        each(value)

    run()


# --- the campaigns ---------------------------------------------------------------------------------------


def cadence_files(examples: int, load_every: int, seed: int) -> list[Tally]:
    """Generated cadence files through `language.parse`, and every `load_every`-th through `rules.load`."""
    parsed = Tally("cadence files: language.parse", "loaded", "located error")
    loaded = Tally(f"cadence files: rules.load (1 in {load_every})", "loaded", "located error")
    with tempfile.TemporaryDirectory() as folder:

        def each(text: str) -> None:
            with timed(parsed):
                parsed.judge(text, lambda: fuzz.parse_outcome(text) == "loaded")
            if parsed.tried % load_every == 0:
                content = text.encode("utf-8", errors="surrogatepass")
                with timed(loaded):
                    loaded.judge(text, lambda: fuzz.load_outcome(Path(folder), content) == "loaded")

        drive(fuzz.CADENCE_FILES, examples, seed, each)
    return [parsed, loaded]


def conditions(examples: int, seed: int) -> list[Tally]:
    """Generated conditions compiled (as a step's `when` in a file, too) and evaluated on sample contexts."""
    tally = Tally("conditions: compile + evaluate", "works", "ExpressionError")

    def each(source: str) -> None:
        with timed(tally):
            tally.judge(source, lambda: fuzz.condition_outcome(source) == "works")

    drive(fuzz.EXPRESSIONS, examples, seed, each)
    return [tally]


def injection() -> list[Tally]:
    """Every attempt of the corpus, as a template and (unless it is a statement) as a condition."""
    import test_sandbox as corpus

    tally = Tally("template injection corpus", "harmless", "refused")
    saved = os.environ.get("CADENCE_SECRET")
    os.environ["CADENCE_SECRET"] = corpus.SECRET
    try:
        with tempfile.TemporaryDirectory() as folder, timed(tally):
            templates = Path(folder) / "templates"
            (templates / "email").mkdir(parents=True)
            (Path(folder) / "secret.txt").write_text(corpus.SECRET, encoding="utf-8")
            for entry in corpus.CORPUS:
                for where, run in _routes(corpus, entry, templates).items():
                    tally.judge((where, entry["attempt"]), _as_declared, corpus, entry, where, run)
    finally:
        if saved is None:
            del os.environ["CADENCE_SECRET"]
        else:
            os.environ["CADENCE_SECRET"] = saved
    return [tally]


def _routes(corpus: Any, entry: dict[str, Any], templates: Path) -> dict[str, Callable[[], Any]]:
    """How an attempt is tried: as a template, and as a condition unless it is a statement."""
    source = entry["attempt"]
    if entry.get("statement"):
        return {"template": lambda: corpus.render_source(templates, source, corpus.corpus_context())}
    return {
        "template": lambda: corpus.render_source(templates, f"{{{{ {source} }}}}", corpus.corpus_context()),
        "expression": lambda: sandbox.evaluate(source, corpus.corpus_context()),
    }


def _as_declared(corpus: Any, entry: dict[str, Any], where: str, run: Callable[[], Any]) -> bool:
    outcome: str
    shown: str
    outcome, shown = corpus.attempt(run)
    leaks = [leak for leak in corpus.LEAKS if leak in shown]
    if outcome != entry[where] or leaks:
        raise AssertionError(f"{where}: {outcome}, declared {entry[where]}; leaks {leaks}: {shown[:200]}")
    return outcome == "harmless"


def api(examples: int, seed: int) -> list[Tally]:
    """Schemathesis requests from the OpenAPI document to every operation, in process, as the admin."""
    from harness import deal_event, make_settings, start_harness
    from test_openapi import TOKEN, probe_every_operation

    tally = Tally("API from its OpenAPI document", "2xx/3xx/501", "4xx")
    with tempfile.TemporaryDirectory() as folder:
        harness = start_harness(make_settings(Path(folder), admin_token=TOKEN))
        try:
            assert harness.post("/webhooks/generic", deal_event()).status_code == 202
            with timed(tally):
                probe = probe_every_operation(harness.client.app, examples, seed)
        finally:
            harness.stop()
    tally.campaign += f" ({probe.operations} operations)"
    tally.tried = probe.requests
    tally.ok = probe.answers["2xx"] + probe.answers["3xx"] + probe.answers["501"]
    tally.refused = probe.answers["4xx"]
    tally.crashed = probe.answers["5xx"] + probe.answers["exception"]
    tally.crashes = probe.server_errors[:SHOWN_CRASHES]
    return [tally]


def crm_bodies(examples: int, seed: int) -> list[Tally]:
    """Mangled deliveries to every adapter, signed as its CRM would, through the app."""
    from test_crm import SEEDS, lenient_harness, send_mangled

    tally = Tally(f"mangled CRM bodies ({len({s.partition('/')[0] for s in SEEDS})} adapters)", "2xx", "4xx")
    with tempfile.TemporaryDirectory() as folder:
        harness = lenient_harness(Path(folder))
        try:

            def answered(seed_name: str, body: bytes) -> bool:
                response = send_mangled(harness, seed_name, body)
                if response.status_code >= 500 or 300 <= response.status_code < 400:
                    raise AssertionError(f"{response.status_code}: {response.text[:200]}")
                if response.status_code >= 400 and not response.json()["error"]["message"]:
                    raise AssertionError(f"{response.status_code} without a message")
                return bool(response.status_code < 300)

            def each(case: tuple[str, bytes]) -> None:
                with timed(tally):
                    tally.judge(case, answered, *case)

            drive(fuzz.mangled_bodies(SEEDS), examples, seed, each)
        finally:
            harness.stop()
    return [tally]


# --- the report ------------------------------------------------------------------------------------------


def table(tallies: list[Tally]) -> str:
    rows = [
        "| campaign | tried | ok | refused (as it should be) | crashed (must be 0) | seconds |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for t in tallies:
        rows.append(
            f"| {t.campaign} | {t.tried:,} | {t.ok:,} {t.ok_means} | {t.refused:,} {t.refused_means} "
            f"| {t.crashed} | {t.seconds:.1f} |"
        )
    return "\n".join(rows)


CAMPAIGNS = ("cadences", "conditions", "injection", "api", "crm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cadences", type=int, default=10_000, help="generated cadence files")
    parser.add_argument(
        "--load-every", type=int, default=10, help="send 1 in N files through rules.load too (1: all)"
    )
    parser.add_argument("--conditions", type=int, default=10_000, help="generated condition expressions")
    parser.add_argument("--api-examples", type=int, default=60, help="requests per API operation")
    parser.add_argument("--crm-bodies", type=int, default=3_000, help="mangled CRM deliveries")
    parser.add_argument("--seed", type=int, default=0, help="the same seed draws the same inputs")
    parser.add_argument("--only", default=",".join(CAMPAIGNS), help=f"some of {','.join(CAMPAIGNS)}")
    args = parser.parse_args()
    chosen = set(args.only.split(","))
    unknown = chosen - set(CAMPAIGNS)
    if unknown:
        parser.error(f"unknown campaigns: {', '.join(sorted(unknown))}")

    started = time.perf_counter()
    tallies: list[Tally] = []
    runs: dict[str, Callable[[], list[Tally]]] = {
        "cadences": lambda: cadence_files(args.cadences, args.load_every, args.seed),
        "conditions": lambda: conditions(args.conditions, args.seed),
        "injection": injection,
        "api": lambda: api(args.api_examples, args.seed),
        "crm": lambda: crm_bodies(args.crm_bodies, args.seed),
    }
    for name in CAMPAIGNS:
        if name in chosen:
            found = runs[name]()
            for tally in found:
                print(f"{tally.campaign}: {tally.tried:,} tried, {tally.crashed} crashed", flush=True)
                for crash in tally.crashes:
                    print(f"  CRASH {crash}", flush=True)
            tallies += found
    print()
    print(table(tallies))
    print(f"\nwhole run: {time.perf_counter() - started:.0f} s")
    sys.exit(1 if any(t.crashed for t in tallies) else 0)


if __name__ == "__main__":
    main()
