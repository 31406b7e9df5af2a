"""Goodput under overload: the server on one core, 1,500 connections from the other.

For each server configuration it measures, in one run:

- capacity: 64 connections in a closed loop (each resends when answered): 200s per second;
- `resend`: 1,500 connections that resend at once whatever the answer (they ignore
  `Retry-After`), the load that makes a server spend its core on refusals;
- `honour`: 1,500 connections that, when refused, wait the `Retry-After` the server sent.

and prints one table: goodput (200s per second, and as a share of the same run's capacity),
accepted requests' latency as the client saw it (p50, p99), refusals by status, connection errors
and the server's largest resident memory.

The client is a raw-socket HTTP/1.1 client on uvloop (no HTTP library), so one core holds 1,500
connections and outpaces the server's refusals.

    python -m loadtest.overload --model BUNDLE [--seconds 10] [--configs default,no-hold]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import uvloop
from PIL import Image

from bench.images import grey_images
from loadtest.processes import free_port, stop_process

ROOT = Path(__file__).resolve().parent.parent
HEAVY_CONNECTIONS = 1500
CAPACITY_CONNECTIONS = 64

# name -> (extra BLINK_* settings, extra uvicorn flags). Flags mean starting uvicorn directly.
CONFIGS: dict[str, tuple[dict[str, str], list[str]]] = {
    "default": ({}, []),
    "no-hold": ({"BLINK_REJECT_HOLD_MS": "0"}, []),
    "uvicorn-limit": ({"BLINK_REJECT_HOLD_MS": "0"}, ["--limit-concurrency", "1024"]),
    "queue-256": ({"BLINK_QUEUE_CAPACITY": "256"}, []),
}


@dataclass
class Phase:
    """What the client saw in the measured window of one load phase."""

    name: str
    connections: int
    seconds: float
    statuses: Counter = field(default_factory=Counter)
    latencies_ok: list[float] = field(default_factory=list)
    errors: int = 0
    rss_max_mb: float = 0.0

    @property
    def goodput(self) -> float:
        return self.statuses[200] / self.seconds

    @property
    def offered(self) -> float:
        return sum(self.statuses.values()) / self.seconds

    def latency_ms(self, quantile: float) -> float:
        if not self.latencies_ok:
            return float("nan")
        ordered = sorted(self.latencies_ok)
        return 1000 * ordered[min(len(ordered) - 1, int(quantile * len(ordered)))]


class Connection(asyncio.Protocol):
    """One keep-alive connection sending the same request again and again."""

    def __init__(self, load: Load) -> None:
        self.load = load
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.needed = -1  # bytes of the whole response, once its head has arrived
        self.status = 0
        self.retry_after = 0.0
        self.sent_at = 0.0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def send(self) -> None:
        if self.transport is None or self.transport.is_closing() or self.load.stopped:
            return
        self.buffer.clear()
        self.needed = -1
        self.sent_at = time.perf_counter()
        self.transport.write(self.load.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.needed < 0:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).lower()
            self.status = int(head[9:12])
            self.needed = end + 4 + _header_number(head, b"\r\ncontent-length:")
            self.retry_after = _header_number(head, b"\r\nretry-after:")
        if len(self.buffer) >= self.needed:
            self.load.answered(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.load.lost(self)


def _header_number(head: bytes, name: bytes) -> int:
    start = head.find(name)
    if start < 0:
        return 0
    start += len(name)
    end = head.find(b"\r\n", start)
    return int(head[start : end if end >= 0 else None])


class Load:
    """Connections in a closed loop; counts only what completes inside the measured window."""

    def __init__(self, request: bytes, honour_retry_after: bool, phase: Phase) -> None:
        self.request = request
        self.honour = honour_retry_after
        self.phase = phase
        self.measuring = False
        self.stopped = False
        self.loop = asyncio.get_running_loop()

    def answered(self, conn: Connection) -> None:
        if self.measuring:
            self.phase.statuses[conn.status] += 1
            if conn.status == 200:
                self.phase.latencies_ok.append(time.perf_counter() - conn.sent_at)
        if conn.status != 200 and self.honour and conn.retry_after:
            self.loop.call_later(conn.retry_after, conn.send)
        else:
            conn.send()

    def lost(self, conn: Connection) -> None:
        if self.stopped:
            return
        if self.measuring:
            self.phase.errors += 1
        self.loop.create_task(self.reconnect(conn))

    async def reconnect(self, conn: Connection) -> None:
        await asyncio.sleep(0.05)
        with contextlib.suppress(OSError):
            await self.loop.create_connection(lambda: conn, *self.address)
            conn.send()

    address: tuple[str, int] = ("127.0.0.1", 0)


async def run_phase(
    address: tuple[str, int],
    request: bytes,
    phase: Phase,
    *,
    honour: bool,
    warmup_s: float,
    server_pid: int | None,
) -> Phase:
    load = Load(request, honour, phase)
    load.address = address
    loop = asyncio.get_running_loop()
    connections = [Connection(load) for _ in range(phase.connections)]
    for start in range(0, len(connections), 100):  # in steps: the listen backlog is finite
        group = connections[start : start + 100]
        await asyncio.gather(*(loop.create_connection(lambda c=c: c, *address) for c in group))
    for conn in connections:
        conn.send()
    await asyncio.sleep(warmup_s)
    load.measuring = True
    ends = time.perf_counter() + phase.seconds
    while (left := ends - time.perf_counter()) > 0:
        if server_pid is not None:
            phase.rss_max_mb = max(phase.rss_max_mb, rss_mb(server_pid))
        await asyncio.sleep(min(0.25, left))
    load.measuring = False
    load.stopped = True
    for conn in connections:
        if conn.transport is not None:
            conn.transport.abort()
    await asyncio.sleep(0.2)  # let the server notice before the next phase
    return phase


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def classify_request(body: bytes) -> bytes:
    head = (
        "POST /classify HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: image/png\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


@contextlib.contextmanager
def server(
    model: Path,
    config: str,
    cpu: int | None,
    root: Path,
    extra_env: dict[str, str] | None = None,
) -> Iterator[tuple[tuple[str, int], int]]:
    """The service on `cpu` (one worker, one thread), started from the checkout at `root`."""
    settings, flags = CONFIGS[config]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BLINK_", "PROMETHEUS_"))}
    env.update(
        BLINK_MODEL=str(model), BLINK_HOST="127.0.0.1", BLINK_PORT=str(port), BLINK_THREADS="1"
    )
    # One image is sent again and again: without this the response cache would answer it, and
    # the engine this measures would sit idle.
    env["BLINK_CACHE_BYTES"] = "0"
    env.update(settings)
    env.update(extra_env or {})
    if flags:  # uvicorn's own options: start it as `blink serve` does, plus these
        command = [
            *("-m", "uvicorn", "app.main:create_app", "--factory", "--loop", "uvloop"),
            *("--http", "httptools", "--no-access-log", "--no-server-header"),
            *("--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *flags),
        ]
    else:
        command = ["-m", "app", "serve"]
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    process = subprocess.Popen(
        [*pin, sys.executable, *command],
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}", process)
        yield ("127.0.0.1", port), process.pid
    finally:
        stop_process(process)


def wait_ready(
    url: str, process: subprocess.Popen, log: Path | None = None, timeout: float = 120
) -> None:
    """Until /readyz answers 200; fails at once if the server exits (pointing to its `log`)."""
    see = f"; see {log}" if log is not None else ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}{see}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout:.0f}s{see}")


async def measure_config(
    address: tuple[str, int],
    pid: int | None,
    body: bytes,
    *,
    seconds: float,
    warmup_s: float,
    connections: int,
    capacity_connections: int = CAPACITY_CONNECTIONS,
) -> list[Phase]:
    """Capacity before and after each overload phase: on a shared machine it drifts."""
    request = classify_request(body)
    phases = []
    for name, conns, honour in (
        ("capacity", capacity_connections, False),
        ("resend", connections, False),
        ("capacity", capacity_connections, False),
        ("honour", connections, True),
        ("capacity", capacity_connections, False),
    ):
        phase = Phase(name, conns, seconds)
        phases.append(
            await run_phase(
                address, request, phase, honour=honour, warmup_s=warmup_s, server_pid=pid
            )
        )
    return phases


def capacity_around(phases: list[Phase], index: int) -> float:
    """The mean capacity measured just before and just after phase `index`."""
    near = [p.goodput for p in phases[max(0, index - 1) : index + 2] if p.name == "capacity"]
    return statistics.fmean(near) if near else float("nan")


def table(results: dict[str, list[Phase]]) -> str:
    lines = [
        "| server | load | conns | goodput /s | of capacity | p50 ms | p99 ms | refused /s "
        "| refusals | errors | RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for config, phases in results.items():
        for index, p in enumerate(phases):
            refused = {s: n for s, n in sorted(p.statuses.items()) if s != 200}
            share = (
                "" if p.name == "capacity" else f"{p.goodput / capacity_around(phases, index):.0%}"
            )
            lines.append(
                f"| {config} | {p.name} | {p.connections} | {p.goodput:.0f} | {share} "
                f"| {p.latency_ms(0.5):.1f} | {p.latency_ms(0.99):.1f} "
                f"| {sum(refused.values()) / p.seconds:.0f} "
                f"| {' '.join(f'{s}:{n}' for s, n in refused.items()) or '-'} "
                f"| {p.errors} | {p.rss_max_mb:.0f} |"
            )
    return "\n".join(lines)


def raise_open_files_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def body_png() -> bytes:
    """A Fashion-MNIST test image as PNG (random pixels where the dataset is missing)."""
    out = io.BytesIO()
    Image.fromarray(grey_images(1)[0], "L").save(out, "PNG")
    return out.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="bundle or <repository>/<name>")
    parser.add_argument(
        "--configs", default="default", help=f"comma-separated: {', '.join(CONFIGS)}"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window per phase")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--connections", type=int, default=HEAVY_CONNECTIONS)
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument(
        "--server-root", type=Path, default=ROOT, help="checkout to serve from (a baseline)"
    )
    args = parser.parse_args(argv)
    raise_open_files_limit()  # the server inherits it
    os.sched_setaffinity(0, {args.client_cpu})
    body = body_png()
    results: dict[str, list[Phase]] = {}
    for config in args.configs.split(","):
        label = config if args.server_root == ROOT else f"{config} ({args.server_root})"
        with server(args.model.resolve(), config, args.server_cpu, args.server_root) as (addr, pid):
            results[label] = uvloop.run(
                measure_config(
                    addr,
                    pid,
                    body,
                    seconds=args.seconds,
                    warmup_s=args.warmup,
                    connections=args.connections,
                )
            )
        print(table({label: results[label]}), flush=True)
    print()
    print(table(results))


if __name__ == "__main__":
    main()
