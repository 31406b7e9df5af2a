"""The benchmark script runs end to end: every server starts, every target answers without errors.

Slow (about a minute): it starts five servers and drives each with wrk. Its figures are not
checked here; they are benchmarks, read by people.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TARGETS = (
    "blink",
    "blink, batching off",
    "echo (HTTP ceiling)",
    "minimal batching handler",
    "blink, /v2 infer (binary)",
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("wrk") is None or shutil.which("taskset") is None,
        reason="wrk (Debian: wrk) and taskset are needed",
    ),
]


def test_bench_measures_every_target_without_errors(bundle_dir, tmp_path):
    command = [sys.executable, "-m", "bench.run", "--model", str(bundle_dir), "--seconds", "1"]
    command += ["--repeat", "1", "--concurrency", "1", "4", "--out", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "one-core limit" in result.stdout
    (saved,) = tmp_path.glob("*.json")
    served = json.loads(saved.read_text())["served"]
    assert set(served) == set(TARGETS)
    for name, by_concurrency in served.items():
        for concurrency, summary in by_concurrency.items():
            assert summary["errors"] == 0, (name, concurrency)
            assert summary["rps"]["median"] > 0, (name, concurrency)
            # the event loop's share: a part of the server's CPU, and never nothing
            loop, total = summary["loop_cpu_us"]["median"], summary["cpu_us"]["median"]
            assert 0 < loop <= total * 1.1, (name, concurrency, loop, total)
