"""Many models in one service, and the response cache, measured side by side in one run.

Four parts, each a flag (all by default). The server gets every usable core; wrk runs beside it.

* `--two-models`: the default Fashion-MNIST model (28x28 PNGs, c=16) and the imported
  EfficientNet-Lite0 (2 MP JPEGs, c=16) served together, both loaded at once, against each alone
  under the same paced load (each connection waits a random time after each answer, so that
  each model's offered load is the same whether the other runs or not). Served from one
  process (the repository; intra-op threads at the default, and at one per session, which
  cannot oversubscribe), from two workers that each serve both, and from two processes (one
  model each) on the same cores.
* `--overhead`: one model from a repository against `--model` (c=64 throughput, c=1 p50),
  cache off in both, rounds interleaved.
* `--cache`: Lite0 with 2 MP JPEGs at c=64: every request a repeat, cache on against off; no
  repeats (every body unique), cache on against off, for Lite0 and the small model; and a hit's
  server time (`Server-Timing` total) for a 300 KB body.
* `--memory`: resident memory with N = 1, 2, 4 copies of Lite0 under different names.

    python -m bench.repository [--lite0 DIR] [--seconds 5] [--repeat 2] [--two-models]
        [--overhead] [--cache] [--memory]

`--lite0` is a `<repository>/<name>` directory of the imported model (made with
`blink import --pretrained efficientnet-lite0` when missing).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image

from bench.images import write_bodies
from bench.photo_bodies import photo_bodies, read_bodies
from bench.run import DEFAULT_MODEL, ROOT, Load, server, spread, wrk
from loadtest import promstats
from loadtest.processes import rss_bytes

CORES = "0,1" if os.cpu_count() and os.cpu_count() >= 2 else "0"  # type: ignore[operator]
SERVE = [sys.executable, "-m", "app", "serve"]
SMALL, LITE0 = "fashion-mnist", "lite0"
SHARE = 0.4  # of each model's own capacity, offered to each at once: 80% of the machine
CACHE_OFF = {"BLINK_CACHE_BYTES": "0"}


def log_file(scratch: Path):
    return open(scratch / "servers.log", "ab")


@contextlib.contextmanager
def serving(env: dict[str, str], scratch: Path) -> Iterator[tuple[str, int]]:
    with log_file(scratch) as log, server(SERVE, env, CORES, "/readyz", log) as served:
        yield served


def make_repository(root: Path, models: dict[str, Path]) -> Path:
    """A repository of symlinks to `<repository>/<name>` directories (each holding `latest`)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, source in models.items():
        link = root / name
        if not link.exists():
            link.symlink_to(source.resolve(), target_is_directory=True)
    return root


def unique_bodies(source: list[bytes], directory: Path, count: int) -> Load:
    """`count` bodies that differ only in bytes after the image's end (decoders ignore them),
    so no two hash alike and every one decodes as its source."""
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        data = source[i % len(source)] + b"blink-unique-%08d" % i
        (directory / f"{i}.bin").write_bytes(data)
    return Load("/classify", directory, count, "image/jpeg")


def load_for(path: str, load: Load) -> Load:
    return Load(path, load.bodies, load.count, load.content_type)


def run_wrk(url: str, load: Load, conc: int, seconds: float, pace_ms: float | None = None) -> dict:
    """wrk at `conc` connections; paced (a mean wait of `pace_ms` after each answer) if given."""
    paced = {} if pace_ms is None else {"BENCH_PACE_MS": f"{pace_ms:.3f}"}
    return wrk(url, load, CORES, conc, seconds, paced)


def rounds_parser(doc: str) -> argparse.ArgumentParser:
    """--model, --seconds and --rounds of a benchmark that compares servers side by side."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=4)
    return parser


def rounds_arguments(doc: str) -> argparse.Namespace:
    return rounds_parser(doc).parse_args()


def alternating_rounds(
    configs: dict[str, dict[str, str]], load: Load, scratch: Path, rounds: int, seconds: float
) -> dict[str, dict[str, list[dict]]]:
    """c=64 and c=1 runs of each server configuration, in alternating order round by round
    (a fresh server each time), so that each round compares them side by side."""
    runs: dict[str, dict[str, list[dict]]] = {name: {"c64": [], "c1": []} for name in configs}
    for round_ in range(rounds):
        order = list(configs.items())
        for name, env in order if round_ % 2 == 0 else reversed(order):
            with serving(env, scratch) as (url, _):
                run_wrk(url, load, 64, 1)
                for run, connections in (("c64", 64), ("c1", 1)):
                    runs[name][run].append(run_wrk(url, load, connections, seconds))
    return runs


def c1_p50_change_ms(a: list[dict], b: list[dict]) -> dict:
    """a's c=1 p50 minus b's, per round, in ms: median and range."""
    return spread([(x["p50_us"] - y["p50_us"]) / 1000 for x, y in zip(a, b, strict=True)])


def together(runs: list[tuple[str, Load, int, float | None]], seconds: float) -> list[dict]:
    """wrk against several targets at once (one process each); their results in order."""
    with ThreadPoolExecutor(len(runs)) as pool:
        futures = [pool.submit(run_wrk, url, load, c, seconds, pace) for url, load, c, pace in runs]
        return [f.result() for f in futures]


# -- two models ------------------------------------------------------------------------------


def two_models(args: argparse.Namespace, small: Load, photos: Load, scratch: Path) -> dict:
    repository = make_repository(scratch / "two", {SMALL: args.small, LITE0: args.lite0})
    one_process = {"BLINK_REPOSITORY": str(repository), **CACHE_OFF}
    configs = {
        "one process": one_process,
        "one process, 1 thread per session": {**one_process, "BLINK_THREADS": "1"},
        "two workers, each serving both": {**one_process, "BLINK_WORKERS": "2"},
    }
    small_path, lite_path = f"/models/{SMALL}/classify", f"/models/{LITE0}/classify"
    results: dict[str, dict[str, list[dict]]] = {}
    capacity: dict[str, float] = {}
    # Each model's own capacity (closed loop, alone, the default configuration) sets the pace.
    with serving(one_process, scratch) as (url, _):
        run_wrk(url, load_for(small_path, small), 16, 1)  # warm
        capacity[SMALL] = run_wrk(url, load_for(small_path, small), 16, args.seconds)["rps"]
        run_wrk(url, load_for(lite_path, photos), 16, 1)
        capacity[LITE0] = run_wrk(url, load_for(lite_path, photos), 16, args.seconds)["rps"]
    # pace per connection: c / (share x capacity) seconds between a connection's requests
    pace = {name: 16 / (SHARE * rate) * 1000 for name, rate in capacity.items()}
    print(f"capacity alone {capacity}; paced at {SHARE:.0%}: {pace} ms", file=sys.stderr)
    for round_ in range(args.repeat):
        for name, env in configs.items():
            with serving(env, scratch) as (url, _):
                measure_pair(results.setdefault(name, {}), url, url, small, photos, pace, args)
        # two processes, each serving one model, on the same cores
        small_env = {"BLINK_MODEL": str(args.small), **CACHE_OFF}
        lite_env = {"BLINK_MODEL": str(args.lite0), **CACHE_OFF}
        with (
            serving(small_env, scratch) as (small_url, _),
            serving(lite_env, scratch) as (
                lite_url,
                _,
            ),
        ):
            measure_pair(
                results.setdefault("two processes", {}),
                small_url,
                lite_url,
                load_for("/classify", small),
                load_for("/classify", photos),
                pace,
                args,
                paths=("/classify", "/classify"),
            )
        print(f"round {round_ + 1} done", file=sys.stderr)
    return {"capacity_alone_rps": capacity, "pace_ms": pace, "runs": results}


def measure_pair(
    into: dict[str, list[dict]],
    small_url: str,
    lite_url: str,
    small: Load,
    photos: Load,
    pace: dict[str, float],
    args: argparse.Namespace,
    paths: tuple[str, str] = (f"/models/{SMALL}/classify", f"/models/{LITE0}/classify"),
) -> None:
    small_load, lite_load = load_for(paths[0], small), load_for(paths[1], photos)
    run_wrk(small_url, small_load, 16, 1, pace[SMALL])  # warm both
    run_wrk(lite_url, lite_load, 16, 1, pace[LITE0])
    into.setdefault("small alone", []).append(
        run_wrk(small_url, small_load, 16, args.seconds, pace[SMALL])
    )
    into.setdefault("lite0 alone", []).append(
        run_wrk(lite_url, lite_load, 16, args.seconds, pace[LITE0])
    )
    both = together(
        [(small_url, small_load, 16, pace[SMALL]), (lite_url, lite_load, 16, pace[LITE0])],
        args.seconds,
    )
    into.setdefault("small together", []).append(both[0])
    into.setdefault("lite0 together", []).append(both[1])


# -- one model: repository against --model ---------------------------------------------------


def overhead(args: argparse.Namespace, small: Load, scratch: Path) -> dict:
    repository = make_repository(scratch / "one", {SMALL: args.small})
    configs = {
        "--model": {"BLINK_MODEL": str(args.small), **CACHE_OFF},
        "--repository": {"BLINK_REPOSITORY": str(repository), **CACHE_OFF},
    }
    runs: dict[str, dict[str, list[dict]]] = {name: {"c64": [], "c1": []} for name in configs}
    for round_ in range(2 * args.repeat + 1):  # c=1 p50 moves more between servers than c=64
        order = list(configs.items())
        for name, env in order if round_ % 2 == 0 else reversed(order):  # neither always first
            with serving(env, scratch) as (url, _):
                run_wrk(url, small, 64, 1)
                runs[name]["c64"].append(run_wrk(url, small, 64, args.seconds))
                runs[name]["c1"].append(run_wrk(url, small, 1, args.seconds))
    return runs


# -- the cache -------------------------------------------------------------------------------


def cache(args: argparse.Namespace, small: Load, photos: Load, scratch: Path) -> dict:
    lite = {"BLINK_MODEL": str(args.lite0)}
    small_env = {"BLINK_MODEL": str(args.small)}
    on, off = {}, CACHE_OFF
    jpegs = read_bodies(photos.bodies)
    # enough unique bodies that none repeats within a window
    unique_photos = unique_bodies(jpegs, scratch / "unique-2mp", 300 * int(args.seconds))
    pngs = read_bodies_from(small)
    unique_pngs = unique_bodies(pngs, scratch / "unique-png", 6000 * int(args.seconds))
    unique_pngs = Load("/classify", unique_pngs.bodies, unique_pngs.count, "image/png")
    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeat):
        for label, env in (("on", on), ("off", off)):
            with serving({**lite, **env}, scratch) as (url, _):
                run_wrk(url, photos, 64, 1)  # warm with the repeats: no unique body is seen twice
                runs.setdefault(f"lite0 repeats, cache {label}", []).append(
                    run_wrk(url, photos, 64, args.seconds)
                )
                runs.setdefault(f"lite0 unique, cache {label}", []).append(
                    counted_hits(url, unique_photos, args.seconds)
                )
            with serving({**small_env, **env}, scratch) as (url, _):
                run_wrk(url, small, 64, 1)
                runs.setdefault(f"small unique, cache {label}", []).append(
                    counted_hits(url, unique_pngs, args.seconds)
                )
    hit_ms = hit_server_time(lite, jpegs, scratch)
    return {"runs": runs, "hit_server_time_ms": hit_ms}


def counted_hits(url: str, load: Load, seconds: float) -> dict:
    """A c=64 run, with the cache hits the server counted during it (0 if every body was new:
    the check that "unique" was)."""
    before = promstats.total(promstats.scrape(url), "blink_cache_lookups_total", result="hit")
    run = run_wrk(url, load, 64, seconds)
    after = promstats.total(promstats.scrape(url), "blink_cache_lookups_total", result="hit")
    run["cache_hits"] = after - before
    return run


def read_bodies_from(load: Load) -> list[bytes]:
    return [(load.bodies / f"{i}.bin").read_bytes() for i in range(load.count)]


def body_of_size(jpegs: list[bytes], size: int) -> bytes:
    """A JPEG of about `size` bytes: a photo re-encoded at the scale that gives it."""
    image = Image.open(io.BytesIO(max(jpegs, key=len))).convert("RGB")
    low, high = 0.1, 1.0
    best = b""
    for _ in range(12):
        scale = (low + high) / 2
        buffer = io.BytesIO()
        size_px = (round(image.width * scale), round(image.height * scale))
        image.resize(size_px).save(buffer, "JPEG", quality=90)
        best = buffer.getvalue()
        if len(best) > size:
            high = scale
        else:
            low = scale
    return best


def hit_server_time(env: dict[str, str], jpegs: list[bytes], scratch: Path) -> dict:
    body = body_of_size(jpegs, 300_000)
    totals = []
    with serving(env, scratch) as (url, _), httpx.Client(base_url=url) as client:
        headers = {"content-type": "image/jpeg"}
        assert client.post("/classify", content=body, headers=headers).headers["x-cache"] == "miss"
        for _ in range(300):
            response = client.post("/classify", content=body, headers=headers)
            assert response.headers["x-cache"] == "hit"
            timing = dict(
                part.strip().split(";dur=") for part in response.headers["server-timing"].split(",")
            )
            totals.append(float(timing["total"]))
    totals.sort()
    return {
        "body_bytes": len(body),
        "p50": statistics.median(totals),
        "p99": totals[int(len(totals) * 0.99) - 1],
        "max": totals[-1],
    }


# -- memory ----------------------------------------------------------------------------------


def memory(args: argparse.Namespace, photos: Load, scratch: Path) -> dict:
    jpeg = read_bodies(photos.bodies)[0]
    rss = {}
    for count in (1, 2, 4):
        names = {f"lite0-{i}": args.lite0 for i in range(count)}
        repository = make_repository(scratch / f"memory-{count}", names)
        env = {"BLINK_REPOSITORY": str(repository), **CACHE_OFF}
        with serving(env, scratch) as (url, pid):
            warm = rss_bytes(pid)
            for name in names:  # one answer each, and a batch each, so every arena is touched
                for _ in range(3):
                    httpx.post(
                        f"{url}/models/{name}/classify",
                        content=jpeg,
                        headers={"content-type": "image/jpeg"},
                    )
            run_wrk(url, load_for("/models/lite0-0/classify", photos), 16, 2)
            after = rss_bytes(pid)
            rss[count] = {"after_warm_up_mib": warm / 2**20, "after_load_mib": after / 2**20}
    return rss


# -- report ----------------------------------------------------------------------------------


def summary(runs: list[dict]) -> dict:
    return {
        "rps": spread([r["rps"] for r in runs]),
        "p50_ms": spread([r["p50_us"] / 1000 for r in runs]),
        "p99_ms": spread([r["p99_us"] / 1000 for r in runs]),
        "errors": sum(r["non_2xx"] + r["socket_errors"] for r in runs),
    }


def ratio(a: list[dict], b: list[dict], key: str = "rps") -> dict:
    """a / b per round (same round, side by side), as median and range."""
    return spread([x[key] / y[key] for x, y in zip(a, b, strict=True)])


def report(results: dict) -> str:
    lines = []
    if "two_models" in results:
        two = results["two_models"]
        lines += [
            "## Two models at once (paced load, each offered "
            f"{SHARE:.0%} of its own capacity alone)",
            f"capacity alone, closed loop c=16: {two['capacity_alone_rps']}",
            "",
            "| served by | model | alone rps | together rps | together/alone | "
            "p99 alone ms | p99 together ms | p99 ratio |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for config, runs in two["runs"].items():
            for model in ("small", "lite0"):
                alone, both = runs[f"{model} alone"], runs[f"{model} together"]
                thr = ratio(both, alone)
                p99 = ratio(both, alone, "p99_us")
                lines.append(
                    f"| {config} | {model} | {summary(alone)['rps']['median']:.0f} | "
                    f"{summary(both)['rps']['median']:.0f} | {thr['median']:.2f} "
                    f"[{thr['min']:.2f}-{thr['max']:.2f}] | "
                    f"{summary(alone)['p99_ms']['median']:.2f} | "
                    f"{summary(both)['p99_ms']['median']:.2f} | {p99['median']:.2f} "
                    f"[{p99['min']:.2f}-{p99['max']:.2f}] |"
                )
        lines.append("")
    if "overhead" in results:
        runs = results["overhead"]
        model, repo = runs["--model"], runs["--repository"]
        thr, p50 = ratio(repo["c64"], model["c64"]), ratio(repo["c1"], model["c1"], "p50_us")
        lines += [
            "## One model: --repository against --model (cache off in both)",
            "",
            "| | --model | --repository | ratio [range] |",
            "|---|---:|---:|---:|",
            f"| c=64 rps | {summary(model['c64'])['rps']['median']:.0f} | "
            f"{summary(repo['c64'])['rps']['median']:.0f} | {thr['median']:.3f} "
            f"[{thr['min']:.3f}-{thr['max']:.3f}] |",
            f"| c=1 p50 ms | {summary(model['c1'])['p50_ms']['median']:.3f} | "
            f"{summary(repo['c1'])['p50_ms']['median']:.3f} | {p50['median']:.3f} "
            f"[{p50['min']:.3f}-{p50['max']:.3f}] |",
            "",
        ]
    if "cache" in results:
        runs = results["cache"]["runs"]
        lines += ["## Response cache (c=64)", ""]
        lines.append("| load | cache on rps | cache off rps | on/off |")
        lines.append("|---|---:|---:|---:|")
        for load in ("lite0 repeats", "lite0 unique", "small unique"):
            on, off = runs[f"{load}, cache on"], runs[f"{load}, cache off"]
            r = ratio(on, off)
            hits = sum(run.get("cache_hits", 0) for run in on)
            lines.append(
                f"| {load} | {summary(on)['rps']['median']:.0f} | "
                f"{summary(off)['rps']['median']:.0f} | {r['median']:.3f} "
                f"[{r['min']:.3f}-{r['max']:.3f}] |"
                + (f" hits counted: {hits:.0f}" if "unique" in load else "")
            )
        hit = results["cache"]["hit_server_time_ms"]
        lines += [
            "",
            f"hit server time (Server-Timing total), {hit['body_bytes']} B body: "
            f"p50 {hit['p50']:.3f} ms, p99 {hit['p99']:.3f} ms, max {hit['max']:.3f} ms",
            "",
        ]
    if "memory" in results:
        lines += ["## Memory: N copies of Lite0", ""]
        lines.append("| N | RSS after warm-up MiB | after load MiB |")
        lines.append("|---:|---:|---:|")
        for count, rss in results["memory"].items():
            lines.append(
                f"| {count} | {rss['after_warm_up_mib']:.0f} | {rss['after_load_mib']:.0f} |"
            )
    return "\n".join(lines)


def lite0_bundle(path: Path | None) -> Path:
    if path is not None:
        return path
    out = ROOT / "bench" / "results" / "lite0"
    target = out / "imagenet-efficientnet-lite0"
    if not (target / "latest").exists():
        command = [sys.executable, "-m", "app", "import", "--pretrained", "efficientnet-lite0"]
        subprocess.run([*command, "--out", str(out)], cwd=ROOT, check=True)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--lite0", type=Path, help="<repository>/<name> of the imported Lite0")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=2)
    parts = ("two_models", "overhead", "cache", "memory")
    for part in parts:
        parser.add_argument(f"--{part.replace('_', '-')}", action="store_true")
    parser.add_argument("--json", type=Path, help="write the raw results here too")
    args = parser.parse_args()
    chosen = [p for p in parts if getattr(args, p)] or list(parts)
    with tempfile.TemporaryDirectory(prefix="blink-repo-bench-") as tmp:
        scratch = Path(tmp)
        args.lite0 = lite0_bundle(args.lite0)
        small_dir = scratch / "pngs"
        small = Load("/classify", small_dir, write_bodies(small_dir, 256))
        photo_dir = photo_bodies(ROOT / "bench" / "results" / "photos", "2MP")
        photos = Load("/classify", photo_dir, len(read_bodies(photo_dir)), "image/jpeg")
        results: dict = {}
        if "two_models" in chosen:
            results["two_models"] = two_models(args, small, photos, scratch)
        if "overhead" in chosen:
            results["overhead"] = overhead(args, small, scratch)
        if "cache" in chosen:
            results["cache"] = cache(args, small, photos, scratch)
        if "memory" in chosen:
            results["memory"] = memory(args, photos, scratch)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2, default=str))
        print(report(results))
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
