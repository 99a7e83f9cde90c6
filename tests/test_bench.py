"""The benchmark scripts, as a developer runs them by hand: a missing tool is named before anything starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_webhook_bench_names_a_missing_wrk_and_how_to_install_it(tmp_path: Path) -> None:
    empty = tmp_path / "bin"  # a PATH on which no wrk is found
    empty.mkdir()
    env = {**os.environ, "PATH": str(empty), "TMPDIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "bench/webhooks.py", "--duration", "1", "--warmup", "0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "wrk not found on PATH; install it with: apt-get install -y wrk" in done.stderr
    assert "Traceback" not in done.stderr
    assert not list(tmp_path.glob("bench-webhooks-*")), "nothing is set up before the check"
