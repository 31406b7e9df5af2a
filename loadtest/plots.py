"""PNG plots of a load-test run: batch sizes, latency against offered load, latency over time."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt


def batch_sizes(summary: dict, path: Path) -> Path | None:
    rows = [r for r in summary["server"]["batch_sizes"] if r["batches"]]
    if not rows:
        return None
    names = [bucket_name(r["from"], r["to"]) for r in rows]
    counts = [r["batches"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(names, counts, color="#4c72b0")
    ax.set_xlabel("images per batch")
    ax.set_ylabel("batches (log scale)")
    ax.set_yscale("log")
    mean = summary["server"]["mean_batch_size"]
    ax.set_title(f"Batch sizes ({summary['scenario_text']}; mean {mean:.2f})")
    return save(fig, path)


def bucket_name(low: float, high: float) -> str:
    if high == float("inf"):
        return f">{low:g}"
    low_int, high_int = int(low) + 1, int(high)
    return f"{high_int}" if low_int >= high_int else f"{low_int}-{high_int}"


def latency_vs_load(summary: dict, path: Path) -> Path | None:
    steps = summary.get("steps") or []
    if not steps:
        return None
    offered = [s["offered_rps"] for s in steps]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for q, style in (("p50", ":"), ("p95", "--"), ("p99", "-")):
        ax.plot(offered, [s["client_ms"][q] for s in steps], style, marker="o", label=f"client {q}")
    server = [(s["server_ms"] or {}).get("p99") for s in steps]
    if any(v is not None for v in server):
        ax.plot(offered, server, "-", marker="s", color="#8c564b", label="server p99")
    ax.axhline(summary["limits"]["p99_ms"], color="red", lw=1, label="p99 limit")
    knee = summary.get("knee")
    if knee is not None:
        ax.axvline(knee["offered_rps"], color="grey", lw=1, ls="--", label="knee")
    ax.set_yscale("log")
    ax.set_xlabel("offered load (requests/s, open loop)")
    ax.set_ylabel("latency (ms)")
    ax.set_title("Latency percentiles against offered load")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save(fig, path)


def latency_over_time(history_csv: Path, path: Path) -> Path | None:
    """Locust's history (percentiles over its last ~10 s) and throughput across the run."""
    if not history_csv.exists():
        return None
    with history_csv.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["Name"] == "Aggregated" and r["50%"] != "N/A"]
    if len(rows) < 2:
        return None
    start = int(rows[0]["Timestamp"])
    seconds = [int(r["Timestamp"]) - start for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for q in ("50%", "95%", "99%"):
        ax.plot(seconds, [float(r[q]) for r in rows], label=f"p{q.rstrip('%')}")
    ax.set_xlabel("seconds")
    ax.set_ylabel("latency (ms)")
    rate = ax.twinx()
    rate.plot(seconds, [float(r["Requests/s"]) for r in rows], color="grey", lw=1, label="req/s")
    rate.set_ylabel("requests/s")
    ax.legend(loc="upper left", fontsize=8)
    rate.legend(loc="upper right", fontsize=8)
    ax.set_title("Client latency and throughput over the run")
    return save(fig, path)


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
