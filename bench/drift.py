"""What the drift scores read on test-distribution traffic and on shifted traffic.

The served model's answers (INT8 by default) to the Fashion-MNIST test images: a reference
measured on the first half, then windows drawn from the second half (the traffic the model was
built for) against windows of shifted traffic (one class, two classes, noise images, scikit-
learn's handwritten digits, inverted and darkened test images). The alert thresholds in
deploy/prometheus/rules/alerts.yml come from this table.

    python -m bench.drift [--model models/repository/fashion-mnist] [--windows 300]
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
from PIL import Image

from app.bundle import load_bundle
from app.engine import Engine
from app.monitor import js_distance
from app.postprocess import calibrated_scores, score_bins
from bench.run import DEFAULT_MODEL
from models.evaluate.reference import reference_behaviour

DATA = Path("/usr/share/datasets/fashion-mnist")


def idx(name: str, offset: int) -> np.ndarray:
    return np.frombuffer(gzip.decompress((DATA / name).read_bytes()), np.uint8, offset=offset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--variant", default="int8")
    parser.add_argument("--windows", type=int, default=300)
    args = parser.parse_args()
    bundle = load_bundle(args.model)
    manifest = bundle.manifest
    temperature = manifest.calibration.temperature if manifest.calibration else 1.0
    engine = Engine(bundle, device="cpu", variant=args.variant, threads=2)
    mean, std = manifest.input.mean[0], manifest.input.std[0]

    def outputs(images: np.ndarray) -> np.ndarray:
        tensors = ((images.astype(np.float32) / 255 - mean) / std)[:, None]
        starts = range(0, len(images), 256)
        return np.concatenate([engine.run(tensors[i : i + 256]) for i in starts])

    images = idx("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    labels = idx("t10k-labels-idx1-ubyte.gz", 8)
    answers = outputs(images)
    half = len(images) // 2
    reference = reference_behaviour(answers[:half], "first half", temperature=temperature)
    edges = np.asarray(reference.score_edges)

    def scores(window: np.ndarray) -> tuple[float, float, float]:
        served = calibrated_scores(window, temperature)
        top = served.max(1)
        bins = score_bins(top, edges)
        mix = np.bincount(served.argmax(1), minlength=len(manifest.labels)).astype(float)
        histogram = np.bincount(bins, minlength=len(edges) - 1).astype(float)
        return (
            js_distance(mix, np.asarray(reference.class_frequencies)),
            js_distance(histogram, np.asarray(reference.score_frequencies)),
            float((top < reference.low_confidence_threshold).mean()),
        )

    rng = np.random.default_rng(0)
    low = reference.low_confidence_rate
    print(f"reference: {half} test images, low-confidence share {low:.1%}")
    print("\n| traffic | class mix | confidence | low-confidence share |\n|---|---:|---:|---:|")
    rest = answers[half:]
    for size in (200, 500, 1000):
        drawn = [rest[rng.choice(len(rest), size, replace=False)] for _ in range(args.windows)]
        values = np.array([scores(window) for window in drawn])
        print(
            f"| test distribution, windows of {size} (median / max) | "
            f"{np.median(values[:, 0]):.2f} / {values[:, 0].max():.2f} | "
            f"{np.median(values[:, 1]):.2f} / {values[:, 1].max():.2f} | "
            f"- / {values[:, 2].max():.1%} |"
        )
    from sklearn.datasets import load_digits

    digits = np.stack(
        [
            np.asarray(Image.fromarray((d * 16).astype(np.uint8)).resize((28, 28)))
            for d in load_digits().images[:1000]
        ]
    )
    shifted = {
        f"one class only ({manifest.labels[3]})": answers[labels == 3][:1000],
        "two classes only (0 and 6)": answers[np.isin(labels, [0, 6])][:1000],
        "uniform noise images": outputs(rng.integers(0, 256, (1000, 28, 28), dtype=np.uint8)),
        "handwritten digits (scikit-learn)": outputs(digits),
        "test images inverted": outputs(255 - images[half : half + 1000]),
        "test images at half brightness": outputs(images[half : half + 1000] // 2),
    }
    for name, window in shifted.items():
        mix, confidence, low = scores(window)
        print(f"| {name}, 1,000 | {mix:.2f} | {confidence:.2f} | {low:.1%} |")


if __name__ == "__main__":
    main()
