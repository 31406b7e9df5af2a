"""Python bytecodes per request, by function: the service against the minimal handler.

Timings on a shared machine move by 10% from run to run; bytecode counts do not. This drives
both apps in-process (the real app and engine, a uvicorn-like `receive`, 64 requests at a
time, so batches form as under load) and counts every bytecode the interpreter executes while
they serve, with `sys.settrace` opcode events. The difference between the two totals is the
Python price of the service's features; the per-function table shows where it goes. Native
work (decoding, ONNX Runtime, JSON) is not counted.

    python -m bench.bytecodes --model BUNDLE [--requests 1280] [--top 40] [--cache-bytes N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path

import uvloop

from bench.images import write_bodies

CONCURRENCY = 64


class Cycle:
    """What the service reads of uvicorn's per-request cycle: `receive` and `disconnected`."""

    disconnected = False

    def __init__(self, body: bytes) -> None:
        self.body = body

    async def receive(self) -> dict:
        return {"type": "http.request", "body": self.body, "more_body": False}


async def ignore(message: dict) -> None:
    pass


async def serve(app, bodies: list[bytes], requests: int, unique: bool = False) -> None:
    """`requests` POST /classify, CONCURRENCY at a time; `unique`: no body is sent twice (bytes
    after the image's end differ, which decoders ignore), so a response cache always misses."""
    sent = 0

    async def client(first: int) -> None:
        nonlocal sent
        index = first
        while sent < requests:
            sent += 1
            body = bodies[index % len(bodies)]
            if unique:
                body += b"%d" % sent
            index += 1
            headers = [(b"content-type", b"image/png"), (b"content-length", b"%d" % len(body))]
            scope = {
                "type": "http",
                "method": "POST",
                "path": "/classify",
                "query_string": b"",
                "headers": headers,
                "root_path": "",
            }
            await app(scope, Cycle(body).receive, ignore)

    await asyncio.gather(*(client(k) for k in range(CONCURRENCY)))


async def count(app, bodies: list[bytes], requests: int, unique: bool = False) -> Counter:
    """Bytecodes per function while `app` serves `requests` (after a warm-up round)."""
    await serve(app, bodies, 2 * CONCURRENCY, unique)
    counts: Counter = Counter()
    stdlib = str(Path(os.__file__).parent) + "/"
    root = str(Path(__file__).resolve().parent.parent) + "/"

    def trace(frame, event, arg):
        frame.f_trace_opcodes = True
        if event == "opcode":
            code = frame.f_code
            where = code.co_filename.removeprefix(root).removeprefix(stdlib)
            counts[f"{where}:{code.co_name}"] += 1
        return trace

    threading.settrace(trace)  # the engine thread too
    sys.settrace(trace)
    try:
        await serve(app, bodies, requests, unique)
    finally:
        sys.settrace(None)
        threading.settrace(None)
    return counts


async def service_counts(
    model: Path, bodies: list[bytes], requests: int, cache_bytes: int = 0
) -> Counter:
    """The service's counts; with a response cache, every request a miss (the most it adds)."""
    from app.main import create_app
    from app.settings import Settings

    app = create_app(Settings(model=model, threads=1, cache_bytes=cache_bytes))
    async with app.api.router.lifespan_context(app.api):
        while app.state.registry.not_ready_reason() is not None:
            await asyncio.sleep(0.05)
        return await count(app, bodies, requests, unique=cache_bytes > 0)


async def minimal_counts(model: Path, bodies: list[bytes], requests: int) -> Counter:
    os.environ["BLINK_MODEL"] = str(model)
    from bench import minimal_app

    return await count(minimal_app.app, bodies, requests)


def report(service: Counter, minimal: Counter, requests: int, top: int) -> str:
    total_s = round(sum(service.values()) / requests)
    total_m = round(sum(minimal.values()) / requests)
    lines = [
        f"bytecodes per request: service {total_s}, minimal handler {total_m}, "
        f"difference {total_s - total_m}",
        "",
        "| service | minimal | difference | function |",
        "|---|---|---|---|",
    ]
    names = sorted(
        set(service) | set(minimal), key=lambda n: abs(service[n] - minimal[n]), reverse=True
    )
    for name in names[:top]:
        s, m = service[name] / requests, minimal[name] / requests
        lines.append(f"| {s:.1f} | {m:.1f} | {s - m:+.1f} | `{name}` |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=1280)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument(
        "--cache-bytes",
        type=int,
        default=0,
        help="the service's response cache (0: off); on, every request misses it",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:  # the benchmark's PNG bodies
        write_bodies(Path(scratch))
        bodies = [p.read_bytes() for p in sorted(Path(scratch).glob("*.bin"))]
    # uvloop, as the service runs: asyncio's pure-Python loop would add its own bytecodes
    service = uvloop.run(service_counts(args.model, bodies, args.requests, args.cache_bytes))
    minimal = uvloop.run(minimal_counts(args.model, bodies, args.requests))
    print(report(service, minimal, args.requests, args.top))


if __name__ == "__main__":
    main()
