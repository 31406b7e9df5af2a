"""Child server processes: a free port to start one on, and stopping one cleanly.

Shared by the load-test runner, the benchmark and the tests; standard library only.
"""

from __future__ import annotations

import socket
import subprocess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(process: subprocess.Popen, timeout: float = 30) -> None:
    """Ask a child to stop (SIGTERM); kill it if it has not exited within `timeout` seconds.
    Its pipes are closed after, so none is left for the garbage collector to find open."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    for pipe in (process.stdin, process.stdout, process.stderr):
        if pipe is not None:
            pipe.close()


def rss_bytes(pid: int) -> int:
    """A process's resident memory (Linux /proc); 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
