"""CPU time of a server and every process it started, with the event loops apart.

Each uvicorn worker runs its event loop on its main thread; decode pools, engine threads and
ONNX Runtime's intra-op threads are the other threads. With `BLINK_WORKERS` > 1 the workers are
children of the supervising process, so the whole process tree is counted.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from bench.run import cpu_seconds


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants that are alive now."""
    pids = [pid]
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                pids += process_tree(int(child))
    return pids


def tree_cpu(pid: int) -> dict[str, float]:
    """Seconds of CPU: `total` over the tree, `loops` over its processes' main threads."""
    total = loops = 0.0
    for member in process_tree(pid):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += cpu_seconds(member)
            loops += cpu_seconds(member, member)
    return {"total": total, "loops": loops}
