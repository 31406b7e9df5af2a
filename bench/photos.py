"""Blink on real photos: decode cost, the engine ceiling and the service, side by side in one run.

Real JPEG photos at about 0.3, 2 and 12 megapixels (bench/photo_bodies.py) against a real model
bundle, on every usable core (the server gets them all, wrk runs beside it):

1. decode + preprocess per image at each size, with and without JPEG DCT scaling, on one core;
   where the service decodes it and what the request costs its event loop;
2. the engine ceiling (decode + run + postprocess, no HTTP) for each workers x intra-op threads
   configuration, fp32 and INT8, at batch 1 and at the batch cap the warm-up curve chose;
3. Blink at c=1, 16, 64 for each configuration (requests/s, p50/p99, CPU per request split into
   the event loops and every other thread, and what the service's own metrics say);
4. the targets: c=64 against the ceiling of the same configuration, c=1 p50 against engine
   batch-1 + decode (timed as one path, one image at a time, no HTTP) + 1 ms, INT8 against
   fp32.

Rounds are interleaved across configurations and repeated; the spread is printed. The engine
figures are measured inside the rounds, each just before the service's window it is compared
with, so that a machine whose speed drifts moves both.

    python -m bench.photos --model BUNDLE [--seconds 3] [--repeat 2] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from bench.decode_cost import decode_costs, pinned
from bench.photo_bodies import SIZES, body_count, photo_bodies, read_bodies
from bench.photo_report import report
from bench.run import ROOT, Load, server, spread, wrk
from bench.server_cpu import tree_cpu
from loadtest import promstats
from loadtest.processes import stop_process


class Config(NamedTuple):
    workers: int  # BLINK_WORKERS
    threads: int  # intra-op threads per worker
    lone: bool = True  # BLINK_SPIN_WHEN_ALONE: a spinning session for lone requests

    @property
    def name(self) -> str:
        return f"workers {self.workers}, threads {self.threads}" + (
            "" if self.lone else ", one session"
        )


# The first is the service's default on 2 cores; the last is it without the lone-request session.
CONFIGS = [Config(1, 2), Config(2, 1), Config(1, 1), Config(2, 2), Config(1, 2, lone=False)]
MAIN_SIZE = "2MP"  # the photos the engine ceiling and the concurrency matrix use


class EngineGroup:
    """The engine without HTTP for one configuration and variant: one bench.engine_ceiling
    process per worker (same intra-op threads, a decode pool as large as the service's), kept
    running so that its windows can be measured between the service's."""

    def __init__(self, args: argparse.Namespace, variant: str, config: Config) -> None:
        command = ["taskset", "-c", args.cpus, sys.executable, "-m", "bench.engine_ceiling"]
        command += ["--model", str(args.model), "--bodies", str(args.bodies[MAIN_SIZE])]
        command += ["--variant", variant, "--threads", str(config.threads), "--commands"]
        command += [] if config.lone else ["--no-lone-session"]
        command += ["--decode-threads", str(args.decode_threads)]
        self.processes = [
            subprocess.Popen(
                command,
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            for _ in range(config.workers)  # they warm up together, as the service's workers do
        ]
        self.first = self.answer(self.processes[0])  # the first worker's curve decides the cap
        for process in self.processes[1:]:
            self.answer(process)
        self.rates: dict[int, list[float]] = {1: [], self.first["cap"]: []}

    @staticmethod
    def answer(process: subprocess.Popen) -> dict:
        line = process.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"bench.engine_ceiling exited with {process.wait()}")
        return json.loads(line)

    def command(self, processes: list[subprocess.Popen], line: str) -> list[dict]:
        for process in processes:
            process.stdin.write(line + "\n")  # type: ignore[union-attr]
            process.stdin.flush()  # type: ignore[union-attr]
        return [self.answer(process) for process in processes]

    def ceiling_windows(self, seconds: float, also: int | None = None) -> float:
        """Batch 1, the cap of this engine's warm-up curve and `also` (the cap the service
        chose: curves timed at warm-up are noisy, so the two can differ), every worker over
        the same window; the rates add up. Returns this round's best rate."""
        if also is not None:
            self.rates.setdefault(also, [])
        for size in sorted(self.rates):
            opens = time.time() + 0.2
            answers = self.command(self.processes, f"window {opens} {size} {seconds}")
            self.rates[size].append(sum(a["rate"] for a in answers))
        return max(rates[-1] for rates in self.rates.values())

    def lone_window(self, seconds: float) -> float:
        """A lone request's work without HTTP, one image at a time (median ms): what c=1 costs
        the one worker it reaches, less HTTP and the service."""
        (answer,) = self.command(self.processes[:1], f"lone {seconds}")
        return answer["one_at_a_time_ms"]

    def close(self) -> None:
        for process in self.processes:
            stop_process(process)

    def summary(self) -> dict:
        first = self.first
        combined: dict = {"variant": first["variant"], "cap": first["cap"]}
        combined["model_b1_ms"] = first["model_b1_ms"]
        combined["lone_b1_ms"] = first["lone_b1_ms"]
        combined["model_ms_per_image"] = {
            int(size): seconds / int(size) for size, seconds in first["seconds_per_batch"].items()
        }
        combined["batches"] = {size: spread(rates) for size, rates in self.rates.items()}
        best = max(combined["batches"], key=lambda s: combined["batches"][s]["median"])
        combined["best_batch"] = best
        combined["best"] = combined["batches"][best]
        return combined


def photo_set_agreement(bundle, bodies: list[bytes]) -> dict:
    """How often INT8's top class is fp32's on the benchmark's own photos, every size, through
    the service's preprocessing and engine."""
    import numpy as np

    from app.engine import Engine
    from app.preprocess import Preprocessor

    preprocess = Preprocessor(bundle.manifest.input)
    tensors = np.concatenate([preprocess(body) for body in bodies])
    top = {
        variant: Engine(bundle, device="cpu", variant=variant).run(tensors).argmax(1)
        for variant in ("fp32", "int8")
    }
    return {"images": len(tensors), "agree": int((top["fp32"] == top["int8"]).sum())}


def served_env(args: argparse.Namespace, config: Config) -> dict[str, str]:
    return {
        "BLINK_MODEL": str(args.model),
        "BLINK_WORKERS": str(config.workers),
        "BLINK_THREADS": str(config.threads),
        "BLINK_SPIN_WHEN_ALONE": str(config.lone).lower(),
        "BLINK_LOG_LEVEL": "warning",
    }


def wait_idle(urls: list[str], timeout_s: float = 30.0) -> None:
    """Until no server has a request in flight: a wrk run ends with up to `c` requests still
    queued, and on shared cores their tail would fall into the next measured window."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(
            promstats.total(promstats.scrape(url), "blink_requests_in_flight") == 0 for url in urls
        ):
            return
        time.sleep(0.05)
    raise TimeoutError(f"requests still in flight after {timeout_s:g} s")


def measured_run(url: str, pid: int, load: Load, args: argparse.Namespace, conc: int) -> dict:
    """One wrk run, with the server's CPU per request (all processes, event loops apart) and
    what its own metrics say about decode, inference and batch sizes."""
    before_cpu, before_metrics = tree_cpu(pid), promstats.scrape(url)
    run = wrk(url, load, args.cpus, conc, args.seconds)
    after_cpu, metrics = tree_cpu(pid), promstats.delta(promstats.scrape(url), before_metrics)
    requests = max(1, run["requests"])
    run["cpu_us"] = (after_cpu["total"] - before_cpu["total"]) / requests * 1e6
    run["loop_cpu_us"] = (after_cpu["loops"] - before_cpu["loops"]) / requests * 1e6
    decodes = promstats.total(metrics, "blink_decode_duration_seconds_count")
    images = promstats.total(metrics, "blink_batch_size_sum")
    batches = promstats.total(metrics, "blink_batch_size_count")
    inference_s = promstats.total(metrics, "blink_inference_duration_seconds_sum")
    decode_s = promstats.total(metrics, "blink_decode_duration_seconds_sum")
    run["decode_ms"] = decode_s / decodes * 1000 if decodes else 0.0
    run["inference_ms_per_image"] = inference_s / images * 1000 if images else 0.0
    run["mean_batch"] = images / batches if batches else 0.0
    return run


def summarise(runs: list[dict]) -> dict:
    keys = ("rps", "p50_us", "p99_us", "cpu_us", "loop_cpu_us", "decode_ms")
    summary = {key: spread([r[key] for r in runs]) for key in keys}
    for key in ("inference_ms_per_image", "mean_batch"):
        summary[key] = spread([r[key] for r in runs])
    for key in ("no_http_ms", "over_no_http_ms", "of_ceiling"):  # c=1 or the top c only
        if key in runs[0]:
            summary[key] = spread([r[key] for r in runs])
    summary["errors"] = sum(r["non_2xx"] + r["socket_errors"] for r in runs)
    return summary


def measure(args: argparse.Namespace, variants: list[str]) -> tuple[dict, dict, dict, dict]:
    """The concurrency matrix on the main photos, the engine ceilings and the event loop's cost
    at every size. Each round measures, for every configuration, the engine ceiling (every
    variant) just before the service at the highest concurrency and a lone request's work
    without HTTP just before c=1, so that the figures compared see the machine in one state."""
    loads = {
        label: Load("/classify", directory, body_count(directory), "image/jpeg")
        for label, directory in args.bodies.items()
    }
    matrix: dict[str, dict[int, list[dict]]] = {}
    by_size: dict[str, list[dict]] = {}
    caps: dict[str, dict] = {}
    top = max(args.concurrency)
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(tempfile.TemporaryFile())
        engines: dict[tuple[str, str], EngineGroup] = {}
        for config in args.configs:  # one at a time: each warm-up times its curve
            for variant in variants:
                engines[variant, config.name] = group = EngineGroup(args, variant, config)
                stack.callback(group.close)
        urls = {}
        for config in args.configs:
            command = [sys.executable, "-m", "app", "serve"]
            urls[config.name] = stack.enter_context(
                server(command, served_env(args, config), args.cpus, "/readyz", log)
            )
            caps[config.name] = model_batching(urls[config.name][0])
        default = args.configs[0].name
        every_url = [url for url, _ in urls.values()]
        for url, _ in urls.values():  # warm-up, not recorded
            wrk(url, loads[MAIN_SIZE], args.cpus, top, 1)
        for round_ in range(args.repeat):
            for conc in args.concurrency:
                for name, (url, pid) in urls.items():
                    wait_idle(every_url)
                    served = engines[caps[name]["variant"], name]
                    ceiling_now = None
                    if conc == top:  # the served variant's ceiling last: next to the service's
                        for variant in variants:
                            if engines[variant, name] is not served:
                                engines[variant, name].ceiling_windows(args.seconds)
                        also = caps[name].get("batch_cap")
                        ceiling_now = served.ceiling_windows(args.seconds, also)
                    no_http_ms = served.lone_window(args.seconds) if conc == 1 else None
                    run = measured_run(url, pid, loads[MAIN_SIZE], args, conc)
                    if ceiling_now is not None:
                        run["of_ceiling"] = run["rps"] / ceiling_now
                    if no_http_ms is not None:
                        run["no_http_ms"] = no_http_ms
                        run["over_no_http_ms"] = run["p50_us"] / 1000 - no_http_ms
                    matrix.setdefault(name, {}).setdefault(conc, []).append(run)
                    progress(round_, f"c={conc:<3} {name:<34}", run)
            url, pid = urls[default]
            for label, load in loads.items():
                wait_idle(every_url)
                run = measured_run(url, pid, load, args, args.loop_concurrency)
                by_size.setdefault(label, []).append(run)
                progress(round_, f"c={args.loop_concurrency:<3} {default} {label:<6}", run)
        ceilings = {
            variant: {c.name: engines[variant, c.name].summary() for c in args.configs}
            for variant in variants
        }
    served = {
        name: {c: summarise(runs) for c, runs in by_c.items()} for name, by_c in matrix.items()
    }
    sizes = {label: summarise(runs) for label, runs in by_size.items()}
    return ceilings, served, sizes, caps


def model_batching(url: str) -> dict:
    import httpx

    (model,) = httpx.get(url + "/v1/models").json()["models"]
    return {"variant": model["variant"], **model.get("batching", {})}


def progress(round_: int, what: str, run: dict) -> None:
    print(
        f"round {round_ + 1} {what} {run['rps']:7.1f} req/s p99 {run['p99_us'] / 1000:7.1f} ms",
        file=sys.stderr,
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="an image-classifier bundle")
    parser.add_argument("--seconds", type=float, default=3.0, help="per measured window")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--cpus", default=None, help="cores for server and wrk (default: all)")
    parser.add_argument("--decode-cpu", type=int, default=None, help="core for the decode table")
    parser.add_argument("--cache", type=Path, default=ROOT / "bench" / "results" / "photos")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 s windows, 1 round")
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    args.cpus = args.cpus or ",".join(map(str, cores))
    args.decode_cpu = cores[0] if args.decode_cpu is None else args.decode_cpu
    args.configs = CONFIGS
    args.decode_threads = len(cores)  # the service's default decode pool, per worker
    args.loop_concurrency = 16
    args.decode_repeat = 5
    if args.quick:
        args.seconds, args.repeat, args.decode_repeat = 1.0, 1, 1
        args.configs = CONFIGS[:2]
        args.concurrency = [1, 16]
        args.loop_concurrency = 4
    return args


def main() -> None:
    args = parse_args()
    args.bodies = {label: photo_bodies(args.cache, label) for label in SIZES}
    from app.bundle import load_bundle
    from app.preprocess import Preprocessor

    load_before = os.getloadavg()[0]
    bundle = load_bundle(args.model)
    preprocessor = Preprocessor(bundle.manifest.input)
    with pinned(args.decode_cpu):
        decode = {
            label: decode_costs(preprocessor, read_bodies(directory), args.decode_repeat)
            for label, directory in args.bodies.items()
        }
    variants = [v for v in ("fp32", "int8") if v in bundle.manifest.variants]
    every_photo = [body for directory in args.bodies.values() for body in read_bodies(directory)]
    agreement = photo_set_agreement(bundle, every_photo) if len(variants) == 2 else None
    ceilings, served, by_size, caps = measure(args, variants)
    results = {
        "model": f"{bundle.manifest.name}/{bundle.manifest.version}",
        "cpus": args.cpus,
        "seconds": args.seconds,
        "repeat": args.repeat,
        "main_size": MAIN_SIZE,
        "loop_concurrency": args.loop_concurrency,
        "decode": decode,
        "int8_agreement": agreement,
        "ceilings": ceilings,
        "served": served,
        "loop_by_size": by_size,
        "batching": caps,
        # the 1-minute load average before and after: how shared the machine was
        "load_average": [load_before, os.getloadavg()[0]],
    }
    text = report(results)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    (args.out / f"photos-{stamp}.md").write_text(text + "\n")
    (args.out / f"photos-{stamp}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
