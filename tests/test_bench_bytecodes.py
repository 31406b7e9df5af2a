"""bench/bytecodes.py counts the service's and the minimal handler's bytecodes per request."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bytecode_counts_compare_the_service_with_the_minimal_handler(bundle_dir):
    command = [sys.executable, "-m", "bench.bytecodes", "--model", str(bundle_dir)]
    command += ["--requests", "128", "--top", "200"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    totals = re.search(r"service (\d+), minimal handler (\d+), difference (-?\d+)", result.stdout)
    assert totals, result.stdout
    service, minimal, difference = map(int, totals.groups())
    assert minimal > 0 and service - minimal == difference
    rows = {
        line.rsplit("`", 2)[1]: [float(c) for c in line.strip("|").split("|")[:3]]
        for line in result.stdout.splitlines()
        if line.startswith("| ") and "`" in line
    }
    # both apps decode every image through the same preprocessing module
    (open_image,) = (v for k, v in rows.items() if k.endswith("app/preprocess.py:open_image"))
    assert open_image[0] == open_image[1] > 0
    # only the service runs its route handler and its batcher
    (handler,) = (v for k, v in rows.items() if k.endswith("app/routes/classify.py:answer"))
    assert handler[0] > 0 and handler[1] == 0
    assert any(k.endswith("app/batching.py:submit") for k in rows)
