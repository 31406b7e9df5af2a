"""Graceful shutdown of a real `python -m app serve` process, as an orchestrator stops it.

SIGTERM while requests are queued behind a slow engine: every request accepted before the
signal is answered 200, a connection opened during the drain is not served, and the process
exits well within its grace period (request timeout + 1 s, app/cli.py).

With one worker, new connections are refused at once. With several, uvicorn's supervisor keeps
the listening socket open until every worker has exited: a new connection waits in the backlog
and is reset at the end (Kubernetes' preStop pause keeps such connections from arriving).
After a clean shutdown a single uvicorn process re-raises the signal it caught, so its exit
status reads "terminated by SIGTERM" (143 in a shell or a container); the lifespan shutdown is
logged before it.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time

import httpx
import pytest

from loadtest.processes import stop_process
from tests.conftest import server_output, spawn_server, wait_for
from tests.images import png
from tests.metrics_text import scrape, value

REQUESTS = 8  # each costs one slow engine run: a drain of a second or more
REQUEST_TIMEOUT_S = 20
GRACE_S = REQUEST_TIMEOUT_S + 1


def start_server(model, **settings: object) -> tuple[subprocess.Popen, str]:
    process, url = spawn_server(model, **settings)
    wait_for(url, "/readyz", process, 60)  # with several workers: once every one has warmed up
    return process, url


async def served(url: str) -> bool:
    """Whether a new connection gets an answer (refused or reset ones do not)."""
    try:
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            await client.get("/healthz")
    except httpx.TransportError:
        return False
    return True


async def wait_until_received(url: str, count: int, timeout: float = 30) -> None:
    """Until the server has taken in `count` classify requests: in flight plus answered."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        samples = await asyncio.to_thread(scrape, url)
        answered = sum(
            v
            for (name, labels), v in samples.items()
            if name == "blink_requests_total" and ("route", "/classify") in labels
        )
        if value(samples, "blink_requests_in_flight") + answered >= count:
            return
        await asyncio.sleep(0.01)
    raise TimeoutError(f"server did not receive {count} requests in {timeout}s")


async def sigterm_under_load(process: subprocess.Popen, url: str) -> dict:
    limits = httpx.Limits(max_connections=REQUESTS, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        posts = [
            asyncio.create_task(
                client.post("/classify", content=png(i), headers={"content-type": "image/png"})
            )
            for i in range(REQUESTS)
        ]
        await wait_until_received(url, REQUESTS)
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        while True:  # new connections until one goes unserved
            assert time.monotonic() - signalled < 5, (
                "new connections still served 5 s after SIGTERM"
            )
            draining = not all(p.done() for p in posts)
            if not await served(url):
                break
            await asyncio.sleep(0.01)
        responses = await asyncio.gather(*posts, return_exceptions=True)
    return {
        "responses": responses,
        "unserved_while_draining": draining,
        "signalled": signalled,
    }


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_finishes_accepted_requests_refuses_new_ones_and_exits(slow_bundle_dir, workers):
    process, url = start_server(
        slow_bundle_dir,
        workers=workers,
        max_batch_size=1,  # one engine run per request: the queue drains slowly
        threads=1,
        request_timeout_ms=REQUEST_TIMEOUT_S * 1000,
    )
    try:
        outcome = asyncio.run(sigterm_under_load(process, url))
        code = process.wait(timeout=GRACE_S + 10)
        exited_after = time.monotonic() - outcome["signalled"]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = server_output(process)
    stop_process(process)  # already gone: closes its output file
    statuses = [getattr(r, "status_code", repr(r)) for r in outcome["responses"]]
    assert statuses == [200] * REQUESTS, output[-3000:]
    assert outcome["unserved_while_draining"], "the queue emptied before new connections stopped"
    assert code in (0, -signal.SIGTERM), output[-3000:]
    assert "Application shutdown complete." in output, output[-3000:]
    assert exited_after < GRACE_S, f"exit took {exited_after:.1f}s, grace is {GRACE_S}s"
