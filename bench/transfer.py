"""From-scratch CNN against fine-tuned EfficientNet-Lite0 on one folder of photos, one split.

Runs `python -m models` (= `blink build`) once per configuration on the same folder with the
same seed (so the same train/validation/test split), each build timed for wall clock and CPU
time (its process and children), the load average noted before and after, and prints one table
from the manifests: accuracy and macro-F1 of fp32 and INT8, INT8 speed against fp32, the time
of each stage. Default folder: the textile images of the `conformal-clip-data` package (the
`demo` extra). Run it on a quiet machine, one measurement at a time:

    flock /tmp/blink-measure.lock python -m bench.transfer [--data-dir DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The textiles' defects can sit anywhere in the frame: the fine-tuned models see all of it, as
# the from-scratch CNN does (it resizes the whole image).
LITE0 = ["--pretrained", "efficientnet-lite0", "--crop-fraction", "1"]
CONFIGS = {
    "scratch CNN": [],
    "Lite0 head only": [*LITE0, "--tune-last", "0"],
    "Lite0 head + last layer": [*LITE0, "--tune-last", "1"],
    "Lite0 head + last 4 layers": [*LITE0, "--tune-last", "4"],
}


def textile_folder() -> Path:
    try:
        import conformal_clip_data
    except ImportError:
        sys.exit("pip install conformal-clip-data (the project's 'demo' extra), or --data-dir")
    return Path(conformal_clip_data.textile_simulated_root())


def run_build(name: str, extra: list[str], data_dir: Path, out: Path) -> dict:
    slug = name.lower().replace(" ", "-").replace("+", "and")
    argv = [sys.executable, "-m", "models", "--dataset", "folder", "--data-dir", str(data_dir)]
    argv += ["--name", slug, "--version", "v1", "--out", str(out), *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # 1 with "accuracy gate failed": the bundle is written all the same and its figures count
    gate_failed = done.returncode == 1 and "accuracy gate failed" in done.stderr
    if done.returncode != 0 and not gate_failed:
        sys.exit(f"{name}: build failed ({done.returncode}):\n{done.stderr[-3000:]}")
    manifest = json.loads((out / slug / "v1" / "manifest.json").read_text())
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "manifest": manifest,
        "gate": "passed" if done.returncode == 0 else "failed",
        "wall": wall,
        "cpu": cpu,
        "load": (load, os.getloadavg()[0]),
    }


def table(results: dict[str, dict]) -> str:
    lines = [
        "| model | params | fp32 acc | fp32 macro-F1 | int8 acc | int8 macro-F1 "
        "| int8 vs fp32 speed (batch 32, 1 thread) | gate | build wall | build CPU "
        "| load before/after |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for name, r in results.items():
        metrics, provenance = r["manifest"]["metrics"], r["manifest"]["provenance"]
        fp32, int8 = metrics["fp32"], metrics["int8"]
        speed = int8["batch32_images_per_s"] / fp32["batch32_images_per_s"]
        lines.append(
            f"| {name} | {provenance['params']:,} | {100 * fp32['accuracy']:.2f}% "
            f"| {fp32['macro_f1']:.4f} | {100 * int8['accuracy']:.2f}% | {int8['macro_f1']:.4f} "
            f"| {speed:.2f}x ({int8['batch32_images_per_s']:.0f} vs "
            f"{fp32['batch32_images_per_s']:.0f} img/s) | {r['gate']} "
            f"| {r['wall']:.0f} s | {r['cpu']:.0f} s "
            f"| {r['load'][0]:.1f} / {r['load'][1]:.1f} |"
        )
    return "\n".join(lines)


def stage_table(results: dict[str, dict]) -> str:
    stages: list[str] = []
    for r in results.values():
        for stage in r["manifest"]["provenance"]["stages_seconds"]:
            if stage not in stages:
                stages.append(stage)
    lines = ["| stage | " + " | ".join(results) + " |", "|---|" + "---:|" * len(results)]
    for stage in stages:
        cells = [r["manifest"]["provenance"]["stages_seconds"].get(stage) for r in results.values()]
        lines.append(
            f"| {stage} | " + " | ".join("" if c is None else f"{c:.1f}" for c in cells) + " |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, help="default: conformal-clip-data's textiles")
    p.add_argument("--out", type=Path, help="bundle repository (default: a temporary folder)")
    p.add_argument("--only", choices=list(CONFIGS), action="append", help="run only these")
    args = p.parse_args()
    data_dir = args.data_dir or textile_folder()
    out = args.out or Path(tempfile.mkdtemp(prefix="blink-transfer-"))
    print(f"folder {data_dir}, bundles in {out}, {os.cpu_count()} CPUs", file=sys.stderr)
    results = {}
    for name in args.only or CONFIGS:
        print(f"building {name}...", file=sys.stderr, flush=True)
        results[name] = run_build(name, CONFIGS[name], data_dir, out)
        print(f"{name}: {results[name]['wall']:.0f} s", file=sys.stderr, flush=True)
    print(table(results))
    print()
    print(stage_table(results))


if __name__ == "__main__":
    main()
