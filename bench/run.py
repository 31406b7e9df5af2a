"""Blink on one core against its ceilings, measured side by side in one run.

The service is pinned to one core and driven from the other by wrk (closed loop, every latency
recorded). Beside it, on the same core: (a) the engine ceiling without HTTP, (b) a bare uvicorn
echo app (the HTTP ceiling), (c) the service with batching off, (d) the least a batching handler
can do on this stack (bench/minimal_app.py: no metrics, deadlines or validation), (e) the same
images through the Open Inference Protocol (`/v2/models/<name>/infer`, binary tensors, top-5
classification, as a Triton client sends them). Rounds are interleaved across targets and
repeated, so drift on a noisy machine hits all of them alike; the spread is printed.

    python bench/run.py [--model models/repository/fashion-mnist] [--seconds 5] [--repeat 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.images import write_bodies, write_v2_bodies
from loadtest.processes import free_port, stop_process

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models" / "repository" / "fashion-mnist"
LUA = ROOT / "bench" / "post_images.lua"


@contextlib.contextmanager
def server(
    command: list[str], env: dict[str, str], cpu: int | str, ready_path: str, log
) -> Iterator[tuple[str, int]]:
    port = free_port()
    env = {**os.environ, **env, "BLINK_PORT": str(port), "BLINK_HOST": "127.0.0.1"}
    command = [c.replace("{port}", str(port)) for c in command]
    process = subprocess.Popen(
        ["taskset", "-c", str(cpu), *command],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{command} exited with {process.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + ready_path, timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        else:
            raise TimeoutError(f"{command}: {url}{ready_path} not 200 after 120 s")
        yield url, process.pid
    finally:
        stop_process(process)


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU time of a process, or of one of its threads, from /proc (robust to a
    busy machine)."""
    stat = Path(f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Load:
    """What wrk sends: a route and its request bodies (with optional per-body headers)."""

    path: str
    bodies: Path
    count: int
    content_type: str = "image/png"


def wrk(
    url: str,
    load: Load,
    cpu: int | str,
    conc: int,
    seconds: float,
    extra_env: dict[str, str] | None = None,
) -> dict:
    env = {
        **os.environ,
        **(extra_env or {}),
        "BENCH_BODIES": str(load.bodies),
        "BENCH_COUNT": str(load.count),
        "BENCH_PATH": load.path,
        "BENCH_TYPE": load.content_type,
    }
    command = ["taskset", "-c", str(cpu), "wrk", "-t1", f"-c{conc}", f"-d{max(1, round(seconds))}s"]
    command += ["--timeout", "10s", "-s", str(LUA), url]
    output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    result = json.loads(output.strip().splitlines()[-1])
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    return result


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(runs: list[dict]) -> dict:
    keys = ("rps", "p50_us", "p90_us", "p99_us", "cpu_us", "loop_cpu_us")
    summary = {key: spread([r[key] for r in runs]) for key in keys}
    summary["errors"] = sum(r["non_2xx"] + r["socket_errors"] for r in runs)
    return summary


def engine_ceiling(model: Path, bodies: Path, cpu: int, repeat: int) -> dict:
    command = ["taskset", "-c", str(cpu), sys.executable, "-m", "bench.engine_ceiling"]
    command += ["--model", str(model), "--bodies", str(bodies), "--repeat", str(repeat)]
    output = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def servers(model: Path) -> dict[str, tuple[list[str], dict[str, str], str]]:
    blink = [sys.executable, "-m", "app", "serve"]
    base = {"BLINK_MODEL": str(model), "BLINK_THREADS": "1", "BLINK_WORKERS": "1"}
    uvicorn = [sys.executable, "-m", "uvicorn", "--port", "{port}", "--loop", "uvloop"]
    uvicorn += ["--http", "httptools", "--no-access-log", "--log-level", "warning"]
    return {
        "blink": (blink, base, "/readyz"),
        "blink, batching off": (blink, {**base, "BLINK_MAX_BATCH_SIZE": "1"}, "/readyz"),
        "echo (HTTP ceiling)": ([*uvicorn, "bench.echo_app:app"], {}, "/"),
        MINIMAL: ([*uvicorn, "bench.minimal_app:app"], {"BLINK_MODEL": str(model)}, "/"),
    }


MINIMAL = "minimal batching handler"


V2_TARGET = "blink, /v2 infer (binary)"


def targets(urls: dict, pngs: Load, scratch: Path) -> dict[str, tuple[tuple[str, int], Load]]:
    """Each measured target: a running server and the load sent to it."""
    chosen = {name: (url, pngs) for name, url in urls.items()}
    blink_url = urls["blink"][0]
    name = httpx.get(blink_url + "/v1/models").json()["models"][0]["name"]
    v2_bodies = scratch / "v2-bodies"
    count = write_v2_bodies(v2_bodies, pngs.bodies, pngs.count)
    v2 = Load(f"/v2/models/{name}/infer", v2_bodies, count, "application/octet-stream")
    chosen[V2_TARGET] = (urls["blink"], v2)
    return chosen


def measure(args: argparse.Namespace, model: Path, pngs: Load, scratch: Path) -> dict:
    results: dict[str, dict[int, list[dict]]] = {}
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(tempfile.TemporaryFile())  # server logs, kept off the report
        urls = {
            name: stack.enter_context(server(cmd, env, args.server_cpu, ready, log))
            for name, (cmd, env, ready) in servers(model).items()
        }
        loads = targets(urls, pngs, scratch)
        for conc in args.concurrency:  # warm-up, not recorded
            for (url, _), load in loads.values():
                wrk(url, load, args.client_cpu, conc, 2)
        for round_ in range(args.repeat):
            for conc in args.concurrency:
                for name, ((url, pid), load) in loads.items():
                    # the event loop is the main thread (one uvicorn worker): its thread id is
                    # the pid; the rest is the engine's thread and the decode pool
                    before, loop_before = cpu_seconds(pid), cpu_seconds(pid, pid)
                    run = wrk(url, load, args.client_cpu, conc, args.seconds)
                    run["cpu_us"] = (cpu_seconds(pid) - before) / run["requests"] * 1e6
                    loop_s = cpu_seconds(pid, pid) - loop_before
                    run["loop_cpu_us"] = loop_s / run["requests"] * 1e6
                    results.setdefault(name, {}).setdefault(conc, []).append(run)
                    print(
                        f"round {round_ + 1} c={conc:<3} {name:<22} {run['rps']:8.0f} req/s "
                        f"p99 {run['p99_us'] / 1000:6.2f} ms",
                        file=sys.stderr,
                    )
    return {
        name: {c: summarise(runs) for c, runs in by_c.items()} for name, by_c in results.items()
    }


def report(ceiling: dict, served: dict, args: argparse.Namespace) -> str:
    lines = [
        f"model variant {ceiling['variant']}; server on CPU {args.server_cpu}, wrk on CPU "
        f"{args.client_cpu}; {args.repeat} interleaved rounds of {args.seconds:g} s; "
        "median [min-max]",
        "",
        "| concurrency | target | req/s | p50 ms | p90 ms | p99 ms | server CPU us/req "
        "| of which event loop | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for conc in args.concurrency:
        for name, by_c in served.items():
            s = by_c[conc]
            rps, p = s["rps"], {k: s[k] for k in ("p50_us", "p90_us", "p99_us")}
            cells = [f"{rps['median']:.0f} [{rps['min']:.0f}-{rps['max']:.0f}]"]
            cells += [
                f"{v['median'] / 1000:.2f} [{v['min'] / 1000:.2f}-{v['max'] / 1000:.2f}]"
                for v in p.values()
            ]
            cells.append(f"{s['cpu_us']['median']:.0f}")
            cells.append(f"{s['loop_cpu_us']['median']:.0f}")
            lines.append(f"| {conc} | {name} | " + " | ".join(cells) + f" | {s['errors']} |")
    b1, b32 = ceiling["b1"]["median"], ceiling["b32"]["median"]
    top = max(args.concurrency)
    echo_rps = served["echo (HTTP ceiling)"][top]["rps"]["median"]
    limit = 1 / (1 / b32 + 1 / echo_rps)
    blink = served["blink"]
    nobatch_rps = served["blink, batching off"][top]["rps"]["median"]
    lines += [
        "",
        f"engine ceiling (decode + run + postprocess, no HTTP): batch 1 {b1:.0f} img/s "
        f"({1000 / b1:.3f} ms/img), batch 32 {b32:.0f} img/s "
        f"[{ceiling['b32']['min']:.0f}-{ceiling['b32']['max']:.0f}]",
        f"HTTP ceiling (echo, c={top}): {echo_rps:.0f} req/s",
        f"one-core limit 1/(1/engine_b32 + 1/echo) = {limit:.0f} req/s",
        "",
        "| target | measured | goal | met |",
        "|---|---|---|---|",
    ]
    checks = []
    if top in blink:
        got = blink[top]["rps"]["median"]
        checks.append(
            (f"c={top} throughput vs limit", f"{got / limit:.1%}", ">= 85%", got >= 0.85 * limit)
        )
        checks.append(
            (f"c={top} vs batching off", f"{got / nobatch_rps:.2f}x", "> 1x", got > nobatch_rps)
        )
        floor = served[MINIMAL][top]["rps"]["median"]
        checks.append((f"c={top} vs {MINIMAL}", f"{got / floor:.2f}x", "(reference)", None))
        v2 = served[V2_TARGET][top]["rps"]["median"]
        checks.append(
            (f"c={top} /v2 infer vs /classify", f"{v2 / got:.2f}x", ">= 0.9x", v2 >= 0.9 * got)
        )
    if 16 in blink:
        p99 = blink[16]["p99_us"]["median"] / 1000
        checks.append(("c=16 p99", f"{p99:.2f} ms", "<= 20 ms", p99 <= 20))
    if 1 in blink:
        p50 = blink[1]["p50_us"]["median"] / 1000
        echo_p50 = served["echo (HTTP ceiling)"][1]["p50_us"]["median"] / 1000
        goal = 1000 / b1 + echo_p50 + 0.2
        checks.append(("c=1 p50", f"{p50:.3f} ms", f"<= {goal:.3f} ms", p50 <= goal))
    verdict = {True: "yes", False: "NO", None: "-"}
    lines += [f"| {a} | {b} | {c} | {verdict[d]} |" for a, b, c, d in checks]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="bundle (default: the built default model)")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model = args.model or bench_model(Path(scratch))
        bodies = Path(scratch) / "bodies"
        pngs = Load("/classify", bodies, write_bodies(bodies))
        ceiling = engine_ceiling(model, bodies, args.server_cpu, args.repeat)
        served = measure(args, model, pngs, Path(scratch))
    text = report(ceiling, served, args)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    (args.out / f"{stamp}.md").write_text(text + "\n")
    (args.out / f"{stamp}.json").write_text(json.dumps({"ceiling": ceiling, "served": served}))


def bench_model(scratch: Path) -> Path:
    """The built default model if there is one, else a ~300k-parameter CNN made here."""
    if (DEFAULT_MODEL / "latest").exists():
        return DEFAULT_MODEL
    from tests.onnx_models import write_bundle

    print("no built model: benchmarking a generated 316k-parameter CNN", file=sys.stderr)
    return write_bundle(
        scratch / "bench-cnn", widths=(32, 64, 128, 192), extra_variants=("int8",), name="bench"
    )


if __name__ == "__main__":
    main()
