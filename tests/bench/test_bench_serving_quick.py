"""The serving benchmark runs end to end as documented (`python -m bench.bench_serving --quick`): real
servers on 127.0.0.1 (naive, batcher, CareCanvas on SQLite with the sandbox EHR), one burst each, its
tables printed. Figures are not asserted (benchmarks report ratios; tests never time): only that every
variant served every request and the table and the ratios came out."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROW = re.compile(
    r"^\| (naive|batcher|cc-sqlite) \| [\d.]+ \| [\d.]+ s \| [\d.]+ s \| [\d.]+ s \| \d+% \| .+ \|$"
)


def test_the_quick_serving_benchmark_runs_every_variant_and_prints_its_tables() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "bench.bench_serving", "--quick", "--no-postgres"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {match.group(1) for line in run.stdout.splitlines() if (match := ROW.match(line))}
    assert rows == {"naive", "batcher", "cc-sqlite"}, run.stdout
    assert re.search(r"^\| cc-sqlite / naive \| [\d.]+× \|", run.stdout, re.MULTILINE)
    assert re.search(r"^\| cc-sqlite / batcher \| [\d.]+× \|", run.stdout, re.MULTILINE)
    # CareCanvas's queuing POST was measured (its requests went through the JSON API).
    assert re.search(r"^\| cc-sqlite \|.*\| \d+ ms \|$", run.stdout, re.MULTILINE)
    assert "Traceback" not in run.stderr
