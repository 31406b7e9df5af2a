"""What a shadow version costs the clients: the default model with no shadow, with a shadow
mirroring 10% of requests and with one mirroring all of them, side by side in one run.

The shadow is a second copy of the served bundle (a candidate of the same cost), started and
stopped by the admin routes within one server, since fresh servers differ from each other by
more than the shadow costs. Each round is one server: a window without a shadow, then for each
fraction (in alternating order round by round) a window with that shadow and one without, so
that every shadow window sits between two without; its ratios are taken against their mean.
A window is c=64 throughput, then c=1 p50, the response cache off (every request is computed);
and how many mirrors the shadow compared and shed (at c=64 the serving version is busy, so
mirrors are shed).

    python -m bench.shadow_cost [--model BUNDLE] [--seconds 5] [--rounds 4] [--fractions 0.1,1]
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from statistics import mean, median
from typing import Any

import httpx

from app.bundle import resolve_bundle_dir
from bench.images import write_bodies
from bench.repository import CACHE_OFF, rounds_parser, run_wrk, serving
from bench.run import Load, spread
from loadtest import promstats

TOKEN = "bench-shadow"
RESULTS = ("compared", "shed", "failed")


def shadow_counts(url: str) -> dict[str, float]:
    """The shadow's compared, shed and failed mirrors so far."""
    samples = promstats.scrape(url)
    return {
        result: promstats.total(samples, "blink_shadow_requests_total", result=result)
        for result in RESULTS
    }


@contextlib.contextmanager
def shadow(url: str, candidate: str, fraction: str | None) -> Iterator[None]:
    """A shadow of `candidate` at `fraction` while inside (none for None)."""
    if fraction is None:
        yield
        return
    auth = {"Authorization": f"Bearer {TOKEN}"}
    params = {"version": candidate, "fraction": fraction}
    httpx.post(f"{url}/admin/shadow", params=params, headers=auth, timeout=120).raise_for_status()
    try:
        yield
    finally:
        httpx.delete(f"{url}/admin/shadow", headers=auth, timeout=120).raise_for_status()


def measure(url: str, bodies: Load, seconds: float) -> dict[str, Any]:
    """One window: c=64 (after a second's warm-up), then c=1; and the mirrors each added."""
    window: dict[str, Any] = {}
    counted = shadow_counts(url)
    run_wrk(url, bodies, 64, 1)
    for run, connections in (("c64", 64), ("c1", 1)):
        window[run] = run_wrk(url, bodies, connections, seconds)
        now = shadow_counts(url)  # what this run added (c=64: its warm-up too)
        window[f"{run} mirrors"] = {k: now[k] - counted[k] for k in RESULTS}
        counted = now
    return window


def main() -> None:
    parser = rounds_parser(__doc__ or "")
    parser.add_argument("--fractions", default="0.1,1", help="the shadows' fractions, by commas")
    args = parser.parse_args()
    env = {"BLINK_MODEL": str(args.model), "BLINK_ADMIN_TOKEN": TOKEN, **CACHE_OFF}
    candidate = str(resolve_bundle_dir(args.model).resolve())
    fractions = args.fractions.split(",")
    windows: dict[str, list[dict[str, Any]]] = {"off": []}
    windows.update({f"shadow {fraction}": [] for fraction in fractions})
    with tempfile.TemporaryDirectory(prefix="blink-shadow-bench-") as tmp:
        scratch = Path(tmp)
        bodies = Load("/classify", scratch / "pngs", write_bodies(scratch / "pngs", 256))
        for round_ in range(args.rounds):
            with serving(env, scratch) as (url, _):
                before = measure(url, bodies, args.seconds)
                windows["off"].append(before)
                for fraction in fractions if round_ % 2 == 0 else reversed(fractions):
                    with shadow(url, candidate, fraction):
                        window = measure(url, bodies, args.seconds)
                    after = measure(url, bodies, args.seconds)
                    windows["off"].append(after)
                    window["off"] = (before, after)  # its neighbours, for the ratios
                    windows[f"shadow {fraction}"].append(window)
                    before = after
    print(report(windows))


def report(windows: dict[str, list[dict[str, Any]]]) -> str:
    """Each shadow window against the mean of the windows without a shadow on either side."""
    off = windows["off"]
    lines = [
        "| shadow | c=64 requests/s | c=64 vs off [range] | c=1 p50 ms | c=1 p50 vs off "
        "[range] | c=1 p50 ratio [range] | mirrors compared / shed, c=64 | c=1 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| off | {median(w['c64']['rps'] for w in off):.0f} | | "
        f"{median(w['c1']['p50_us'] for w in off) / 1000:.3f} | | | | |",
    ]
    for name, runs in windows.items():
        if name == "off":
            continue
        throughput = spread([w["c64"]["rps"] / neighbours(w, "c64", "rps") for w in runs])
        p50 = spread([w["c1"]["p50_us"] / neighbours(w, "c1", "p50_us") for w in runs])
        change = spread([(w["c1"]["p50_us"] - neighbours(w, "c1", "p50_us")) / 1000 for w in runs])
        mirrored = [
            "{compared:.0f} / {shed:.0f}".format(
                **{k: sum(w[f"{run} mirrors"][k] for w in runs) for k in RESULTS}
            )
            for run in ("c64", "c1")
        ]
        lines.append(
            f"| {name} | {median(w['c64']['rps'] for w in runs):.0f} | "
            f"{throughput['median']:.3f} [{throughput['min']:.3f}-{throughput['max']:.3f}] | "
            f"{median(w['c1']['p50_us'] for w in runs) / 1000:.3f} | {change['median']:+.3f} ms "
            f"[{change['min']:+.3f} to {change['max']:+.3f}] | {p50['median']:.3f} "
            f"[{p50['min']:.3f}-{p50['max']:.3f}] | {mirrored[0]} | {mirrored[1]} |"
        )
    return "\n".join(lines)


def neighbours(window: dict[str, Any], run: str, key: str) -> float:
    return mean(w[run][key] for w in window["off"])


if __name__ == "__main__":
    main()
