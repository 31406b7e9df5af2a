"""What a shadow version costs the clients: the default model served with no shadow, with a
shadow mirroring 10% of requests and with one mirroring all of them, side by side in one run.

The shadow is a second copy of the served bundle (a candidate of the same cost). c=64
throughput and c=1 p50, the response cache off (every request is computed), rounds in
alternating order, ratios taken within each round; and how many mirrors the shadow compared
and shed in each run (at c=64 the serving version is busy, so mirrors are shed).

    python -m bench.shadow_cost [--model BUNDLE] [--seconds 5] [--rounds 4]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from app.bundle import resolve_bundle_dir
from bench.images import write_bodies
from bench.repository import (
    CACHE_OFF,
    alternating_rounds,
    c1_p50_change_ms,
    ratio,
    rounds_arguments,
    summary,
)
from bench.run import Load
from loadtest import promstats

FRACTIONS = ("0.1", "1")


def shadow_counts(url: str) -> dict:
    """The shadow's compared and shed mirrors so far."""
    samples = promstats.scrape(url)
    return {
        result: promstats.total(samples, "blink_shadow_requests_total", result=result)
        for result in ("compared", "shed", "failed")
    }


def main() -> None:
    args = rounds_arguments(__doc__ or "")
    served = {"BLINK_MODEL": str(args.model), **CACHE_OFF}
    candidate = str(resolve_bundle_dir(args.model).resolve())
    configs = {"off": served}
    for fraction in FRACTIONS:
        configs[f"shadow {fraction}"] = {**served, "BLINK_SHADOW": f"{candidate}@{fraction}"}
    with tempfile.TemporaryDirectory(prefix="blink-shadow-bench-") as tmp:
        scratch = Path(tmp)
        bodies = Load("/classify", scratch / "pngs", write_bodies(scratch / "pngs", 256))
        runs = alternating_rounds(
            configs, bodies, scratch, args.rounds, args.seconds, scrape=shadow_counts
        )
    off = runs["off"]
    print(
        "| shadow | c=64 requests/s | c=64 vs off [range] | c=1 p50 ms | c=1 p50 vs off "
        "[range] | c=1 p50 ratio | mirrors compared / shed, c=64 (with its warm-up) | c=1 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, run in runs.items():
        throughput = ratio(run["c64"], off["c64"])
        change = c1_p50_change_ms(run["c1"], off["c1"])
        p50 = ratio(run["c1"], off["c1"], "p50_us")
        # cumulative counts: the c=1 run's are what it added to the c=64 run's
        at_c64 = {k: sum(s[k] for s in run["c64 scraped"]) for k in ("compared", "shed")}
        at_c1 = {k: sum(s[k] for s in run["c1 scraped"]) - at_c64[k] for k in at_c64}
        mirrored = [f"{n['compared']:.0f} / {n['shed']:.0f}" for n in (at_c64, at_c1)]
        print(
            f"| {name} | {summary(run['c64'])['rps']['median']:.0f} | {throughput['median']:.3f} "
            f"[{throughput['min']:.3f}-{throughput['max']:.3f}] | "
            f"{summary(run['c1'])['p50_ms']['median']:.3f} | {change['median']:+.3f} ms "
            f"[{change['min']:+.3f} to {change['max']:+.3f}] | {p50['median']:.3f} | "
            f"{mirrored[0]} | {mirrored[1]} |"
        )


if __name__ == "__main__":
    main()
