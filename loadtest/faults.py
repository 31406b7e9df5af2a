"""The fault campaign: the real server under load while things go wrong, one table at the end.

    python -m loadtest.faults --model models/repository/fashion-mnist [--soak-seconds 600]
    python -m loadtest.faults --model BUNDLE --only reload,broken,sigterm   # some rows

Rows (each starts its own server on 127.0.0.1, bounded in time):

- overload: clients that resend at once and clients that honour Retry-After (loadtest.overload);
- sigterm: SIGTERM at c=64; every request in flight at the signal must be answered 200 and the
  process must exit within its grace period (request timeout + 1 s);
- sigkill: BLINK_WORKERS=2 at c=64, one worker killed with SIGKILL; the other keeps serving, the
  supervisor starts a replacement (warm before it takes connections); lost requests can only be
  those the killed worker held;
- reload: a new version swapped in at c=64: no failed request, answers move to the new version,
  p99 around the swap against p99 before it;
- reload-workers: the same with BLINK_WORKERS=2 and the pointer watcher: every worker moves, and
  /readyz lists which version each serves on the way;
- broken: three broken new versions (bad hash, not ONNX, failing warm-up) at c=64: none replaces
  the serving one, no failed request;
- soak: c=32 for --soak-seconds: RSS growth < 10%, p99 drift (last tenth / first tenth) < 1.5x;
- fuzz: the Hypothesis and schemathesis suites with their long profiles;
- shadow: both overload phases with a shadow mirroring every request and without, alternating:
  goodput with it must stay within 5% (mirrors are shed while the service is busy);
- drift: a real Prometheus evaluating the drift alerts at their own durations for
  --drift-seconds (loadtest.drift_alerts): test-distribution traffic raises none, one-class
  traffic fires the class-mix alert and noise the confidence alert, within `for:` plus the
  time to fill the window.

The server is pinned to one core (--server-cpu) and the closed-loop client to another
(--client-cpu), as in loadtest.overload. The client is asyncio streams on uvloop: it records
every request's send time, latency, status and the model version that answered.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import uvloop
from PIL import Image

from app.bundle import load_bundle, point_latest, resolve_bundle_dir
from bench.images import grey_images
from loadtest import drift_alerts, overload
from loadtest.overload import wait_ready
from loadtest.processes import free_port, rss_bytes, stop_process
from loadtest.prometheus import prometheus_server
from loadtest.versions import FAULTS, add_version

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models" / "repository" / "fashion-mnist"
ADMIN_TOKEN = "faults-campaign"
LOST = -1  # a request written to a connection that died before its answer
REFUSED = -2  # no connection could be opened
REQUEST_TIMEOUT_MS = 5000
GRACE_S = REQUEST_TIMEOUT_MS / 1000 + 1  # app/cli.py: timeout_graceful_shutdown


# -- the server --------------------------------------------------------------------------------


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    port: int
    log: Path

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30)

    def reload(self) -> dict:
        auth = {"authorization": f"Bearer {ADMIN_TOKEN}"}
        return httpx.post(self.url + "/admin/reload", headers=auth, timeout=120).json()

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.get("/readyz").json()["workers"]]


@contextlib.contextmanager
def server(
    model: Path, out: Path, cpu: int | None, name: str, **settings: object
) -> Iterator[Server]:
    """`python -m app serve` with `BLINK_*` settings, its log in `out/<name>.log`."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BLINK_", "PROMETHEUS_"))}
    env.update({f"BLINK_{k.upper()}": str(v) for k, v in settings.items()})
    env.update(
        BLINK_HOST="127.0.0.1", BLINK_PORT=str(port), BLINK_ADMIN_TOKEN=ADMIN_TOKEN,
        BLINK_REQUEST_TIMEOUT_MS=str(REQUEST_TIMEOUT_MS),
    )  # fmt: skip
    if "repository" not in settings:  # the two are exclusive
        env["BLINK_MODEL"] = str(model)
    env.setdefault("BLINK_THREADS", "1")
    # The rows send one image again and again: without this the response cache would answer
    # it, and the engine path under test would sit idle.
    env.setdefault("BLINK_CACHE_BYTES", "0")
    pin = ["taskset", "-c", str(cpu)] if cpu is not None and shutil.which("taskset") else []
    log = out / f"{name}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [*pin, sys.executable, "-m", "app", "serve"],
            cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, log)
        yield Server(process, url, port, log)
    finally:
        if process.poll() is None:
            stop_process(process)


# -- the client --------------------------------------------------------------------------------


@dataclass(slots=True)
class Sample:
    sent: float  # time.monotonic()
    latency: float
    status: int  # HTTP status, LOST or REFUSED
    version: bytes = b""


@dataclass
class Load:
    """Closed-loop connections that resend as soon as they are answered."""

    port: int
    body: bytes
    connections: int
    samples: list[Sample] = field(default_factory=list)
    in_flight: int = 0

    @property
    def request(self) -> bytes:
        head = (
            "POST /classify HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: image/png\r\n"
            f"content-length: {len(self.body)}\r\n\r\n"
        )
        return head.encode() + self.body

    async def run(self, until: Callable[[], bool]) -> None:
        """Send until `until()` reads true (checked between requests), then stop sending."""
        request = self.request
        await asyncio.gather(*(self._user(request, until) for _ in range(self.connections)))

    async def _user(self, request: bytes, until: Callable[[], bool]) -> None:
        while not until():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                self.samples.append(Sample(time.monotonic(), 0.0, REFUSED))
                await asyncio.sleep(0.05)
                continue
            try:
                while not until():
                    if not await self._one(reader, writer, request):
                        break
            finally:
                writer.close()

    async def _one(self, reader, writer, request: bytes) -> bool:
        """One request; False when the connection is done (closed by the server or broken)."""
        sent = time.monotonic()
        self.in_flight += 1
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
            body = await reader.readexactly(length)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, IndexError):
            self.samples.append(Sample(sent, time.monotonic() - sent, LOST))
            await asyncio.sleep(0.01)
            return False
        finally:
            self.in_flight -= 1
        status = int(head[9:12])
        self.samples.append(Sample(sent, time.monotonic() - sent, status, answered_version(body)))
        return b"connection: close" not in head.lower()


def run(coroutine):
    """On uvloop: the client must outpace the server it measures."""
    return uvloop.run(coroutine)


def answered_version(body: bytes) -> bytes:
    start = body.find(b'"version":"')
    if start < 0:
        return b""
    start += 11
    return body[start : body.find(b'"', start)]


def png_body() -> bytes:
    out = io.BytesIO()
    Image.fromarray(grey_images(1)[0], "L").save(out, "PNG")
    return out.getvalue()


def p99_ms(samples: list[Sample]) -> float:
    latencies = sorted(s.latency for s in samples if s.status == 200)
    if not latencies:
        return float("nan")
    return 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]


def window(samples: list[Sample], start: float, end: float) -> list[Sample]:
    return [s for s in samples if start <= s.sent < end]


def statuses(samples: list[Sample]) -> Counter:
    return Counter({LOST: "lost", REFUSED: "refused"}.get(s.status, s.status) for s in samples)


def failed(samples: list[Sample]) -> int:
    return sum(1 for s in samples if s.status != 200)


# -- rows ----------------------------------------------------------------------------------------


@dataclass
class Row:
    fault: str
    load: str
    requests: int
    failed: int
    measured: str
    target: str
    passed: bool | None  # None: not run

    def cells(self) -> list[str]:
        verdict = {True: "pass", False: "**FAIL**", None: "not run"}[self.passed]
        return [self.fault, self.load, str(self.requests), str(self.failed), self.measured,
                self.target, verdict]  # fmt: skip


@dataclass
class Campaign:
    model: Path  # a bundle directory
    out: Path
    server_cpu: int | None
    connections: int
    soak_seconds: float
    overload_seconds: float
    fuzz_examples: int
    drift_seconds: float

    def repository(self, name: str, *versions: str, faults: dict[str, str] | None = None) -> Path:
        """A fresh repository of copies of the model; `latest` at the first version."""
        repo = self.out / f"repo-{name}" / self.model.name
        shutil.rmtree(repo.parent, ignore_errors=True)
        for version in versions:
            add_version(repo, self.model, version)
        for version, fault in (faults or {}).items():
            add_version(repo, self.model, version, fault=fault)
        point_latest(repo, versions[0])
        return repo


async def load_while(port: int, connections: int, script) -> tuple[Load, object]:
    """Run `script(load)` (a coroutine function) while `connections` users keep sending."""
    load = Load(port, png_body(), connections)
    stop = False
    users = asyncio.create_task(load.run(lambda: stop))
    try:
        result = await script(load)
    finally:
        stop = True
        await users
    return load, result


def row_sigterm(c: Campaign) -> Row:
    with server(c.model, c.out, c.server_cpu, "sigterm") as srv:
        load = Load(srv.port, png_body(), c.connections)
        signalled: list[float] = []

        async def scenario() -> int:
            # Clients stop sending at the signal (an orchestrator has taken the instance out of
            # its endpoints first); every request already sent must still be answered.
            users = asyncio.create_task(load.run(lambda: bool(signalled)))
            await asyncio.sleep(3)
            in_flight = load.in_flight
            srv.process.send_signal(signal.SIGTERM)
            signalled.append(time.monotonic())
            await users
            return in_flight

        in_flight = run(scenario())
        with contextlib.suppress(subprocess.TimeoutExpired):
            srv.process.wait(timeout=GRACE_S + 10)
        gone = srv.process.poll() is not None
        exited = time.monotonic() - signalled[0] if gone else float("inf")
    at = signalled[0]
    lost = failed([s for s in load.samples if s.sent < at and s.sent + s.latency >= at])
    return Row(
        "SIGTERM under load", f"c={c.connections}, 1 worker", len(load.samples),
        failed(load.samples),
        f"{in_flight} in flight at the signal, {lost} of them lost; exited {exited:.2f} s after",
        f"0 accepted lost; exit < {GRACE_S:g} s", lost == 0 and exited < GRACE_S,
    )  # fmt: skip


def row_sigkill(c: Campaign) -> Row:
    with server(c.model, c.out, c.server_cpu, "sigkill", workers=2) as srv:
        before = srv.worker_pids()
        victim = before[0]
        events: dict[str, float] = {}

        async def script(load: Load):
            await asyncio.sleep(3)
            events["kill"] = time.monotonic()
            events["in_flight"] = load.in_flight
            os.kill(victim, signal.SIGKILL)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # until a replacement is warm and listed
                pids = await asyncio.to_thread(ready_pids, srv)
                if pids and victim not in pids and len(pids) == 2:
                    events["replaced"] = time.monotonic()
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(2)
            return None

        load, _ = run(load_while(srv.port, c.connections, script))
        after = ready_pids(srv)
    kill = events["kill"]
    bad = [s for s in load.samples if s.status != 200]
    # In flight at the kill: the killed worker's share of them is all it may lose. Sent after
    # it: written to a connection whose worker was already dead, so never accepted by anyone.
    in_flight = [s for s in bad if s.sent < kill]
    sent_after = [s for s in bad if s.sent >= kill]
    served_after = sum(1 for s in window(load.samples, kill, kill + 1) if s.status == 200)
    replaced_s = events.get("replaced", float("inf")) - kill
    bound = int(events["in_flight"])
    return Row(
        "worker SIGKILLed under load", f"c={c.connections}, 2 workers", len(load.samples),
        len(bad),
        f"{len(in_flight)} lost in flight at the kill (of {bound} in flight on both workers); "
        f"{len(sent_after)} written after it to the dead worker's connections (never accepted); "
        f"kinds {dict(statuses(bad))}; {served_after} answered 200 in the next second; "
        f"replacement warm and listed after {replaced_s:.1f} s; workers {sorted(before)} → "
        f"{sorted(after)}",
        "only the killed worker's in-flight lost; the other serves; replaced",
        len(in_flight) <= bound and served_after > 0 and replaced_s < 60
        and all(s.status == LOST for s in bad),
    )  # fmt: skip


def ready_pids(srv: Server) -> list[int]:
    with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
        response = srv.get("/readyz")
        if response.status_code == 200:
            return [w["pid"] for w in response.json()["workers"]]
    return []


def row_reload(c: Campaign) -> Row:
    repo = c.repository("reload", "v1", "v2")
    with server(repo, c.out, c.server_cpu, "reload") as srv:
        marks: dict[str, float] = {}

        async def script(load: Load):
            await asyncio.sleep(6)  # 4 s of baseline windows after 2 s of ramp-up
            point_latest(repo, "v2")
            marks["start"] = time.monotonic()
            outcome = await asyncio.to_thread(srv.reload)
            marks["end"] = time.monotonic()
            await asyncio.sleep(3)
            return outcome

        load, outcome = run(load_while(srv.port, c.connections, script))
    start, end = marks["start"], marks["end"]
    span = end - start + 0.5  # the swap, then half a second of the new version
    during = p99_ms(window(load.samples, start, start + span))
    # The same statistic over windows of the same length before the reload: on a shared
    # machine a stall from elsewhere lifts a short window's p99 too, so compare with the worst.
    base = [
        p99_ms(window(load.samples, start - k * span, start - (k - 1) * span))
        for k in range(1, int(4 / span) + 1)
    ]
    after = window(load.samples, end + 0.05, end + 60)
    versions = Counter(s.version.decode() for s in load.samples if s.status == 200)
    moved = {s.version for s in after if s.status == 200} == {b"v2"}
    rise = during - max(base)
    return Row(
        "reload under load", f"c={c.connections}, 1 worker", len(load.samples),
        failed(load.samples),
        f"{outcome['result']} in {outcome['seconds']:.2f} s, {outcome['cpu_seconds']:.2f} s of "
        f"CPU (load + verify + warm-up); p99 over {span:.2f} s windows: {during:.1f} ms around "
        f"the swap, {min(base):.1f} to {max(base):.1f} ms in the {len(base)} before it; answers "
        f"{dict(versions)}, all v2 after the swap: {moved}",
        "0 failed; p99 rise over the worst window before ≤ the new version's load + warm-up CPU",
        outcome["result"] == "success" and failed(load.samples) == 0 and moved
        and rise <= 1000 * outcome["cpu_seconds"],
    )  # fmt: skip


def row_reload_workers(c: Campaign) -> Row:
    repo = c.repository("reload-workers", "v1", "v2")
    settings = {"workers": 2, "watch_interval_s": 0.5}
    with server(repo, c.out, c.server_cpu, "reload-workers", **settings) as srv:
        marks: dict[str, float] = {}
        seen: list[list[str]] = []  # each worker's version, as /readyz listed them

        async def script(load: Load):
            await asyncio.sleep(3)
            point_latest(repo, "v2")
            marks["moved"] = time.monotonic()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                response = await asyncio.to_thread(srv.get, "/readyz")
                versions = [w["version"] for w in response.json()["workers"]]
                if not seen or seen[-1] != versions:
                    seen.append(versions)
                if versions == ["v2", "v2"]:
                    marks["all"] = time.monotonic()
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(2)
            return None

        load, _ = run(load_while(srv.port, c.connections, script))
        counted = reload_counts(srv)
    moved_s = marks.get("all", float("inf")) - marks["moved"]
    after = {s.version for s in load.samples if s.sent > marks.get("all", 0) and s.status == 200}
    return Row(
        "reload under load, every worker", f"c={c.connections}, 2 workers, watcher 0.5 s",
        len(load.samples), failed(load.samples),
        f"both workers on v2 {moved_s:.1f} s after `latest` moved; /readyz listed "
        f"{' → '.join('/'.join(v) for v in seen)}; counted {counted}",
        "0 failed; every worker moves; /readyz names each one's version",
        failed(load.samples) == 0 and moved_s < 60 and after == {b"v2"},
    )  # fmt: skip


def row_broken(c: Campaign) -> Row:
    broken = {f"v-{fault}": fault for fault in sorted(FAULTS)}
    repo = c.repository("broken", "v1", faults=broken)
    with server(repo, c.out, c.server_cpu, "broken") as srv:

        async def script(load: Load):
            await asyncio.sleep(2)
            outcomes = []
            for version in broken:
                point_latest(repo, version)
                outcomes.append(await asyncio.to_thread(srv.reload))
                await asyncio.sleep(0.5)
            return outcomes

        load, outcomes = run(load_while(srv.port, c.connections, script))
        counted = reload_counts(srv)
    results = [o["result"] for o in outcomes]
    versions = {s.version for s in load.samples if s.status == 200}
    return Row(
        "broken new versions", f"c={c.connections}, 1 worker", len(load.samples),
        failed(load.samples),
        f"{', '.join(f'{f}: {r}' for f, r in zip(broken.values(), results, strict=True))}; "
        f"served {sorted(v.decode() for v in versions)}; counted {counted}",
        "never replaces v1; 0 failed; counted by result",
        versions == {b"v1"} and failed(load.samples) == 0
        and all(r.endswith("_failed") for r in results),
    )  # fmt: skip


def reload_counts(srv: Server) -> dict[str, int]:
    counts = {}
    for line in srv.get("/metrics").text.splitlines():
        if line.startswith("blink_model_reloads_total{"):
            result = line.split('result="', 1)[1].split('"', 1)[0]
            if (n := int(float(line.rsplit(" ", 1)[1]))) > 0:
                counts[result] = n
    return counts


def row_soak(c: Campaign) -> Row:
    connections = 32
    with server(c.model, c.out, c.server_cpu, "soak") as srv:
        rss: list[tuple[float, int]] = []

        async def script(load: Load):
            ends = time.monotonic() + c.soak_seconds
            while time.monotonic() < ends:
                rss.append((time.monotonic(), rss_bytes(srv.process.pid)))
                await asyncio.sleep(1)
            return None

        load, _ = run(load_while(srv.port, connections, script))
    start, end = load.samples[0].sent, load.samples[-1].sent
    tenth = (end - start) / 10
    first = p99_ms(window(load.samples, start + tenth, start + 2 * tenth))  # after warming
    last = p99_ms(window(load.samples, end - tenth, end))
    early = max(r for t, r in rss if t <= start + 2 * tenth)
    final = rss[-1][1]
    growth = final / early - 1
    drift = last / first
    return Row(
        f"soak {c.soak_seconds:g} s", f"c={connections}, 1 worker", len(load.samples),
        failed(load.samples),
        f"RSS {early / 2**20:.0f} → {final / 2**20:.0f} MiB ({growth:+.1%}); p99 "
        f"{first:.1f} → {last:.1f} ms ({drift:.2f}x)",
        "RSS growth < 10%; p99 drift < 1.5x",
        growth < 0.10 and drift < 1.5 and failed(load.samples) == 0,
    )  # fmt: skip


def rows_overload(c: Campaign) -> list[Row]:
    """Both overload client kinds, measured by loadtest.overload (capacity in the same run)."""
    try:
        from loadtest import overload
    except ImportError:
        return [Row("overload", "-", 0, 0, "loadtest.overload is not in this checkout", "-", None)]
    overload.raise_open_files_limit()
    client_cpu = next(iter(os.sched_getaffinity(0) - {c.server_cpu}), None)
    if client_cpu is not None:
        os.sched_setaffinity(0, {client_cpu})
    with overload.server(c.model, "default", c.server_cpu, ROOT) as (address, pid):
        phases = run(
            overload.measure_config(
                address, pid, png_body(), seconds=c.overload_seconds, warmup_s=2.0,
                connections=overload.HEAVY_CONNECTIONS,
            )
        )  # fmt: skip
    rows = []
    targets = {"resend": ("resend at once", 0.5), "honour": ("honour Retry-After", 0.9)}
    for index, phase in enumerate(phases):
        if phase.name not in targets:
            continue
        kind, share_target = targets[phase.name]
        capacity = capacity_before_and_after(overload, phases, index)
        share = phase.goodput / capacity if capacity else 0.0
        refused = sum(n for s, n in phase.statuses.items() if s != 200)
        rows.append(
            Row(
                f"overload: {kind}", f"{phase.connections} connections",
                sum(phase.statuses.values()), refused + phase.errors,
                f"goodput {phase.goodput:.0f}/s = {share:.0%} of capacity {capacity:.0f}/s "
                f"(c=64, measured around it); accepted p99 {phase.latency_ms(0.99):.0f} ms; "
                f"RSS ≤ {phase.rss_max_mb:.0f} MB",
                f"goodput ≥ {share_target:.0%} of capacity; p99 within the deadline",
                share >= share_target and phase.latency_ms(0.99) < REQUEST_TIMEOUT_MS,
            )
        )  # fmt: skip
    return rows


def rows_shadow_overload(c: Campaign) -> list[Row]:
    """Overload goodput with a shadow mirroring every request against none, alternating."""
    overload.raise_open_files_limit()
    shadow = {"BLINK_SHADOW": str(c.model.resolve())}  # a second copy of the model
    goodput: dict[str, dict[str, list[float]]] = {"off": {}, "on": {}}
    for round_ in range(SHADOW_ROUNDS):
        order = [("off", {}), ("on", shadow)]
        for name, env in order if round_ % 2 == 0 else order[::-1]:
            with overload.server(c.model, "default", c.server_cpu, ROOT, env) as (address, pid):
                phases = run(
                    overload.measure_config(
                        address, pid, png_body(), seconds=c.overload_seconds, warmup_s=2.0,
                        connections=overload.HEAVY_CONNECTIONS,
                    )
                )  # fmt: skip
            for phase in phases:
                goodput[name].setdefault(phase.name, []).append(phase.goodput)
    rows = []
    for kind, label in (("resend", "resend at once"), ("honour", "honour Retry-After")):
        on, off = goodput["on"][kind], goodput["off"][kind]
        ratios = sorted(a / b for a, b in zip(on, off, strict=True) if b)
        median = ratios[len(ratios) // 2] if ratios else 0.0
        rows.append(
            Row(
                f"overload with a shadow at 100%: {label}",
                f"{overload.HEAVY_CONNECTIONS} connections, {SHADOW_ROUNDS} rounds",
                0, 0,
                f"goodput {statistics.median(on):.0f}/s with, {statistics.median(off):.0f}/s "
                f"without: {median:.3f} (rounds {', '.join(f'{r:.3f}' for r in ratios)})",
                "goodput with the shadow ≥ 0.95 of without",
                median >= 0.95,
            )
        )  # fmt: skip
    return rows


def rows_drift(c: Campaign) -> list[Row]:
    """The drift alerts at the rules' own durations, with a real Prometheus."""

    def not_run(why: str) -> list[Row]:
        return [Row("drift alerts", "-", 0, 0, why, "-", None)]

    if shutil.which("prometheus") is None:
        return not_run("needs Debian's prometheus")
    if load_bundle(c.model).manifest.reference is None:
        return not_run("the bundle has no reference behaviour: rebuild it (blink build)")
    scratch = c.out / "drift"
    scratch.mkdir(parents=True, exist_ok=True)
    repository = drift_alerts.serve_three_ways(c.model, scratch / "served")
    rules = drift_alerts.drift_rules(scratch)
    bodies = drift_alerts.traffic_bodies()
    with (
        server(c.model, c.out, c.server_cpu, "drift", repository=repository) as srv,
        prometheus_server(scratch, f"127.0.0.1:{srv.port}", [rules]) as prometheus,
    ):
        drift = drift_alerts.watch_alerts(srv.url, prometheus, bodies, c.drift_seconds)
    rows = []
    for model, alert in drift_alerts.EXPECTED.items():
        requests, lost = drift.requests.get(model, 0), drift.failed.get(model, 0)
        load = f"1 connection, {drift.seconds:.0f} s"
        raised = drift.raised(model)
        if alert is None:
            rows.append(
                Row(
                    "drift: test-distribution traffic", load, requests, lost,
                    f"drift alerts pending or firing: {', '.join(raised) or 'none'}",
                    f"none in {c.drift_seconds:.0f} s", not raised and not lost,
                )
            )  # fmt: skip
            continue
        fired = drift.fired(model, alert)
        seen = f"fired after {fired:.0f} s" if fired is not None else "did not fire"
        rows.append(
            Row(
                f"drift: {model} traffic", load, requests, lost,
                f"{alert} {seen}; raised in all: {', '.join(raised) or 'none'}",
                f"{alert} within its for: (300 s) + {DRIFT_FILL_S} s",
                fired is not None and fired <= 300 + DRIFT_FILL_S and not lost,
            )
        )  # fmt: skip
    return rows


def capacity_before_and_after(overload, phases: list, index: int) -> float:
    if hasattr(overload, "capacity_around"):
        return overload.capacity_around(phases, index)
    capacities = [p.goodput for p in phases[:index] if p.name == "capacity"]
    return capacities[-1] if capacities else 0.0


def row_fuzz(c: Campaign) -> Row:
    env = {
        **os.environ,
        "BLINK_FUZZ_EXAMPLES": str(c.fuzz_examples),
        "BLINK_SCHEMATHESIS_EXAMPLES": str(max(20, c.fuzz_examples // 20)),
    }
    tests = ["tests/test_fuzz.py", "tests/test_schemathesis.py"]
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", *tests, "-q", "-p", "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    (c.out / "fuzz.log").write_text(result.stdout + result.stderr)
    summary = (result.stdout.strip().splitlines() or ["no output"])[-1]
    return Row(
        "fuzzing: images, V2 codec, OpenAPI", f"{c.fuzz_examples} examples a property", 0, 0,
        f"{summary} ({time.monotonic() - started:.0f} s)", "no 5xx, no hang, still serving",
        result.returncode == 0,
    )  # fmt: skip


ROWS: dict[str, Callable[[Campaign], Row | list[Row]]] = {
    "overload": rows_overload,
    "sigterm": row_sigterm,
    "sigkill": row_sigkill,
    "reload": row_reload,
    "reload-workers": row_reload_workers,
    "broken": row_broken,
    "soak": row_soak,
    "fuzz": row_fuzz,
    "shadow": rows_shadow_overload,
    "drift": rows_drift,
}
SHADOW_ROUNDS = 3
DRIFT_FILL_S = 60  # filling the window to the alert's 500 answers, scraping, evaluating


def table(rows: list[Row]) -> str:
    header = ["fault", "load", "requests", "failed", "measured", "target", "result"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.faults", description=__doc__)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="bundle or repo/name")
    parser.add_argument("--only", default=",".join(ROWS), help=f"rows, of: {','.join(ROWS)}")
    parser.add_argument("--soak-seconds", type=float, default=600.0)
    parser.add_argument("--overload-seconds", type=float, default=10.0)
    parser.add_argument("--fuzz-examples", type=int, default=2000)
    parser.add_argument("--drift-seconds", type=float, default=600.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--server-cpu", type=int, default=0, help="-1: no pinning")
    parser.add_argument("--out", type=Path, help="logs and repositories (default: a temp dir)")
    args = parser.parse_args(argv)
    chosen = args.only.split(",")
    if unknown := set(chosen) - set(ROWS):
        parser.error(f"unknown rows {sorted(unknown)}; rows are {', '.join(ROWS)}")
    try:
        model = resolve_bundle_dir(args.model)
    except Exception as exc:
        print(f"faults: {exc}; build a model (blink build) or pass --model", file=sys.stderr)
        return 2
    out = args.out or Path(tempfile.mkdtemp(prefix="blink-faults-"))
    out.mkdir(parents=True, exist_ok=True)
    cpu = None if args.server_cpu < 0 or len(os.sched_getaffinity(0)) < 2 else args.server_cpu
    if cpu is not None:  # the client (this process) on the other cores
        os.sched_setaffinity(0, os.sched_getaffinity(0) - {cpu})
    campaign = Campaign(
        model, out, cpu, args.connections, args.soak_seconds, args.overload_seconds,
        args.fuzz_examples, args.drift_seconds,
    )  # fmt: skip
    rows: list[Row] = []
    started = time.monotonic()
    for name in chosen:
        print(f"faults: {name} ...", file=sys.stderr, flush=True)
        made = ROWS[name](campaign)
        rows += made if isinstance(made, list) else [made]
        print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print(f"\nmodel {model}; logs in {out}; {time.monotonic() - started:.0f} s\n")
    print(table(rows))
    return 0 if all(r.passed is not False for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
