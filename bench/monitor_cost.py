"""What watching the answers costs: the default model served with prediction monitoring on
(`BLINK_MONITOR=true`, the default) and off, side by side in one run.

c=64 throughput and c=1 p50, the response cache off in both (every request is computed and
counted), rounds in alternating order; the ratio is taken within each round.

    python -m bench.monitor_cost [--model BUNDLE] [--seconds 5] [--rounds 4]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.images import write_bodies
from bench.repository import CACHE_OFF, ratio, run_wrk, serving, summary
from bench.run import DEFAULT_MODEL, Load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    configs = {
        "on": {"BLINK_MODEL": str(args.model), **CACHE_OFF},
        "off": {"BLINK_MODEL": str(args.model), "BLINK_MONITOR": "false", **CACHE_OFF},
    }
    runs: dict[str, dict[str, list[dict]]] = {name: {"c64": [], "c1": []} for name in configs}
    with tempfile.TemporaryDirectory(prefix="blink-monitor-bench-") as tmp:
        scratch = Path(tmp)
        bodies = Load("/classify", scratch / "pngs", write_bodies(scratch / "pngs", 256))
        for round_ in range(args.rounds):
            order = list(configs.items())
            for name, env in order if round_ % 2 == 0 else reversed(order):
                with serving(env, scratch) as (url, _):
                    run_wrk(url, bodies, 64, 1)
                    runs[name]["c64"].append(run_wrk(url, bodies, 64, args.seconds))
                    runs[name]["c1"].append(run_wrk(url, bodies, 1, args.seconds))
    on, off = runs["on"], runs["off"]
    throughput = ratio(on["c64"], off["c64"])
    p50_ms = [(a["p50_us"] - b["p50_us"]) / 1000 for a, b in zip(on["c1"], off["c1"], strict=True)]
    print("| | monitoring off | monitoring on | on vs off [range] |\n|---|---:|---:|---:|")
    print(
        f"| c=64 requests/s | {summary(off['c64'])['rps']['median']:.0f} | "
        f"{summary(on['c64'])['rps']['median']:.0f} | {throughput['median']:.3f} "
        f"[{throughput['min']:.3f}-{throughput['max']:.3f}] |"
    )
    print(
        f"| c=1 p50 ms | {summary(off['c1'])['p50_ms']['median']:.3f} | "
        f"{summary(on['c1'])['p50_ms']['median']:.3f} | {sorted(p50_ms)[len(p50_ms) // 2]:+.3f} ms "
        f"[{min(p50_ms):+.3f} to {max(p50_ms):+.3f}] |"
    )


if __name__ == "__main__":
    main()
