"""What one image costs each bundle to serve on one core: decode, preprocess and its INT8
model at batch 1, measured side by side in one run.

The question it answers: how much more does a model trained on a folder cost per image than a
reference bundle (by default the imported ImageNet EfficientNet-Lite0), on the same photos?
Each bundle decodes every photo with its own input spec (as the service does) and runs its
served variant on one ONNX Runtime thread. Bundles take turns round by round; each round's
figure is the median per image, and the ratio is computed per round so that the machine's
drift cancels out. The process is pinned to one core.

    python -m bench.served_cost BUNDLE REFERENCE --photos DIR [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from app.bundle import load_bundle
from app.engine import Engine
from app.preprocess import Preprocessor

SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def photos(directory: Path, count: int) -> list[bytes]:
    files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in SUFFIXES)
    if not files:
        raise SystemExit(f"no photos in {directory}")
    step = max(1, len(files) // count)
    return [p.read_bytes() for p in files[::step][:count]]


class Served:
    """One bundle's request path without HTTP: decode, preprocess, INT8 (else fp32) batch 1."""

    def __init__(self, path: Path, variant: str) -> None:
        bundle = load_bundle(path)
        self.name = bundle.manifest.name
        self.preprocess = Preprocessor(bundle.manifest.input)
        self.engine = Engine(bundle, device="cpu", variant=variant, threads=1)

    def __call__(self, body: bytes) -> None:
        self.engine.run(self.preprocess(body))

    def round_ms(self, bodies: list[bytes], seconds: float) -> float:
        """The median milliseconds per image over passes through `bodies` for `seconds`."""
        times = []
        ends = time.perf_counter() + seconds
        while time.perf_counter() < ends or not times:
            for body in bodies:
                started = time.perf_counter()
                self(body)
                times.append(time.perf_counter() - started)
        return statistics.median(times) * 1000


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path, help="the bundle to measure")
    p.add_argument("reference", type=Path, help="the bundle it is compared with")
    p.add_argument("--photos", type=Path, required=True, help="photos both decode")
    p.add_argument("--count", type=int, default=32, help="photos used")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--seconds", type=float, default=2.0, help="per bundle per round")
    p.add_argument("--variant", default="int8")
    p.add_argument("--cpu", type=int, default=0, help="the core to pin to")
    args = p.parse_args(argv)
    os.sched_setaffinity(0, {args.cpu})
    bodies = photos(args.photos, args.count)
    measured, reference = Served(args.bundle, args.variant), Served(args.reference, args.variant)
    for served in (measured, reference):  # warm-up: first runs allocate and pick kernels
        served.round_ms(bodies, 0.5)
    rows = []
    for index in range(args.rounds):
        order = (measured, reference) if index % 2 == 0 else (reference, measured)
        figures = {served.name: served.round_ms(bodies, args.seconds) for served in order}
        rows.append((figures[measured.name], figures[reference.name]))
        print(
            f"round {index + 1}: {measured.name} {rows[-1][0]:.3f} ms, "
            f"{reference.name} {rows[-1][1]:.3f} ms, ratio {rows[-1][0] / rows[-1][1]:.3f}",
            flush=True,
        )
    ratios = sorted(m / r for m, r in rows)
    print(
        f"\n{measured.name} ({measured.engine.variant}) per image, decode included, one core: "
        f"median {statistics.median(m for m, _ in rows):.3f} ms; "
        f"{reference.name} ({reference.engine.variant}): "
        f"{statistics.median(r for _, r in rows):.3f} ms\n"
        f"ratio, by round: median {statistics.median(ratios):.3f} "
        f"[{ratios[0]:.3f}-{ratios[-1]:.3f}] over {len(ratios)} rounds"
    )


if __name__ == "__main__":
    main()
