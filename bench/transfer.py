"""Folder builds on one folder of photos: the default command and single candidates, over seeds.

Runs `python -m models` (= `blink build`) once per configuration and seed on the same folder
(a seed fixes the train/validation/calibration/test split and the training), each build timed
for wall clock and CPU time (its process and children), the load average noted before and after,
and prints tables from the manifests: accuracy and macro-F1 of fp32 and INT8, the accuracy of the
two-way question "--negative class or not" (nominal against any defect), the 95% prediction
sets' coverage and size, the candidate chosen, the time of each stage; then, per configuration,
the mean and range over the seeds. Default folder: the textile images of the `conformal-clip-data`
package (the `demo` extra). Run it on a quiet machine, one measurement at a time:

    flock /tmp/blink-measure.lock python -m bench.transfer --only default --seeds 0,1,2
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

import numpy as np

CONFIGS = {
    "default": [],
    "scratch": ["--candidates", "scratch"],
    "lite0-whole": ["--pretrained", "efficientnet-lite0"],
    "lite0-whole-bn-train": ["--pretrained", "efficientnet-lite0", "--batch-norm", "train"],
    "lite0-fast": ["--fast"],
}


def textile_folder() -> Path:
    try:
        import conformal_clip_data
    except ImportError:
        sys.exit("pip install conformal-clip-data (the project's 'demo' extra), or --data-dir")
    return Path(conformal_clip_data.textile_simulated_root())


def run_build(name: str, extra: list[str], data_dir: Path, out: Path, seed: int) -> dict:
    slug, version = name, f"seed{seed}"
    argv = [sys.executable, "-m", "models", "--dataset", "folder", "--data-dir", str(data_dir)]
    argv += ["--name", slug, "--version", version, "--out", str(out), "--seed", str(seed), *extra]
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
    manifest = json.loads((out / slug / version / "manifest.json").read_text())
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "manifest": manifest,
        "gate": "passed" if done.returncode == 0 else "failed",
        "wall": wall,
        "cpu": cpu,
        "load": (load, os.getloadavg()[0]),
    }


def two_way_accuracy(confusion: list[list[int]], labels: list[str], negative: str) -> float:
    """Accuracy of "`negative` or not", from a confusion matrix of every class."""
    if negative not in labels:
        return float("nan")
    index = labels.index(negative)
    matrix = np.asarray(confusion)
    right = matrix[index, index] + np.delete(np.delete(matrix, index, 0), index, 1).sum()
    return float(right / matrix.sum())


def figures(r: dict, negative: str) -> dict[str, float]:
    """The row's numbers, for the table and the summary over seeds."""
    manifest = r["manifest"]
    metrics, calibration = manifest["metrics"], manifest.get("calibration") or {}
    fp32, int8 = metrics["fp32"], metrics["int8"]
    return {
        "fp32 acc": 100 * fp32["accuracy"],
        "fp32 macro-F1": fp32["macro_f1"],
        "int8 acc": 100 * int8["accuracy"],
        "int8 macro-F1": int8["macro_f1"],
        "two-way acc": 100
        * two_way_accuracy(int8["confusion_matrix"], manifest["labels"], negative),
        "95% coverage": 100 * calibration.get("coverage", {}).get("0.95", float("nan")),
        "95% set size": calibration.get("mean_set_size", {}).get("0.95", float("nan")),
        "build wall s": r["wall"],
    }


def table(results: dict[tuple[str, int], dict], negative: str) -> str:
    columns = list(figures(next(iter(results.values())), negative))
    lines = [
        "| configuration | seed | chosen | params | " + " | ".join(columns) + " | gate "
        "| build CPU s | load before/after |",
        "|---|---:|---|---:|" + "---:|" * len(columns) + "---|---:|---:|",
    ]
    for (name, seed), r in results.items():
        provenance = r["manifest"]["provenance"]
        chosen = provenance.get("training", {}).get("chosen", provenance["network"])
        row = figures(r, negative)
        lines.append(
            f"| {name} | {seed} | {chosen} | {provenance['params']:,} | "
            + " | ".join(f"{value:.4g}" for value in row.values())
            + f" | {r['gate']} | {r['cpu']:.0f} | {r['load'][0]:.1f} / {r['load'][1]:.1f} |"
        )
    return "\n".join(lines)


def summary(results: dict[tuple[str, int], dict], negative: str) -> str:
    """Per configuration: the mean and [min-max] of each figure over the seeds."""
    names = list(dict.fromkeys(name for name, _ in results))
    columns = list(figures(next(iter(results.values())), negative))
    lines = ["| configuration | seeds | " + " | ".join(columns) + " |"]
    lines.append("|---|---:|" + "---:|" * len(columns))
    for name in names:
        rows = [figures(r, negative) for (n, _), r in results.items() if n == name]
        cells = []
        for column in columns:
            values = [row[column] for row in rows]
            cells.append(f"{np.mean(values):.4g} [{min(values):.4g}-{max(values):.4g}]")
        lines.append(f"| {name} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stage_table(results: dict[tuple[str, int], dict]) -> str:
    stages: list[str] = []
    for r in results.values():
        for stage in r["manifest"]["provenance"]["stages_seconds"]:
            if stage not in stages:
                stages.append(stage)
    heads = [f"{name} seed {seed}" for name, seed in results]
    lines = ["| stage | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(results)]
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
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    p.add_argument("--negative", default="nominal", help="the class the two-way accuracy separates")
    args = p.parse_args()
    data_dir = args.data_dir or textile_folder()
    out = args.out or Path(tempfile.mkdtemp(prefix="blink-transfer-"))
    seeds = [int(seed) for seed in args.seeds.split(",")]
    print(f"folder {data_dir}, bundles in {out}, {os.cpu_count()} CPUs", file=sys.stderr)
    results = {}
    for name in args.only or CONFIGS:
        for seed in seeds:
            print(f"building {name}, seed {seed}...", file=sys.stderr, flush=True)
            results[name, seed] = run_build(name, CONFIGS[name], data_dir, out, seed)
            print(f"{name}: {results[name, seed]['wall']:.0f} s", file=sys.stderr, flush=True)
    print(table(results, args.negative))
    print()
    print(summary(results, args.negative))
    print()
    print(stage_table(results))


if __name__ == "__main__":
    main()
