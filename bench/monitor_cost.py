"""What watching the answers costs: the default model served with prediction monitoring on
(`BLINK_MONITOR=true`, the default) and off, side by side in one run.

c=64 throughput and c=1 p50, the response cache off in both (every request is computed and
counted), rounds in alternating order; the ratio is taken within each round.

    python -m bench.monitor_cost [--model BUNDLE] [--seconds 5] [--rounds 4]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

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


def main() -> None:
    args = rounds_arguments(__doc__ or "")
    configs = {
        "on": {"BLINK_MODEL": str(args.model), **CACHE_OFF},
        "off": {"BLINK_MODEL": str(args.model), "BLINK_MONITOR": "false", **CACHE_OFF},
    }
    with tempfile.TemporaryDirectory(prefix="blink-monitor-bench-") as tmp:
        scratch = Path(tmp)
        bodies = Load("/classify", scratch / "pngs", write_bodies(scratch / "pngs", 256))
        runs = alternating_rounds(configs, bodies, scratch, args.rounds, args.seconds)
    on, off = runs["on"], runs["off"]
    throughput = ratio(on["c64"], off["c64"])
    p50_ms = c1_p50_change_ms(on["c1"], off["c1"])
    print("| | monitoring off | monitoring on | on vs off [range] |\n|---|---:|---:|---:|")
    print(
        f"| c=64 requests/s | {summary(off['c64'])['rps']['median']:.0f} | "
        f"{summary(on['c64'])['rps']['median']:.0f} | {throughput['median']:.3f} "
        f"[{throughput['min']:.3f}-{throughput['max']:.3f}] |"
    )
    print(
        f"| c=1 p50 ms | {summary(off['c1'])['p50_ms']['median']:.3f} | "
        f"{summary(on['c1'])['p50_ms']['median']:.3f} | {p50_ms['median']:+.3f} ms "
        f"[{p50_ms['min']:+.3f} to {p50_ms['max']:+.3f}] |"
    )


if __name__ == "__main__":
    main()
