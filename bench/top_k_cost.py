"""What answering the top classes costs per request: the service's `top_k` against sorting and
converting every class (what it did before), side by side, for 10, 1000 and 21843 classes.

It runs on the event loop for every request, so its microseconds are the loop's.

    python -m bench.top_k_cost [--rounds 7]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import timeit

import numpy as np

from app.postprocess import softmax, top_k


def sort_everything(
    logits: np.ndarray, k: int, labels: list[str], *, probabilities: bool = False
) -> list[dict]:
    """top_k by its plain definition: every class's score, a stable sort of every class
    (tests/test_postprocess.py holds `top_k` to it)."""
    scores = logits.tolist() if probabilities else softmax(logits).tolist()
    best = np.argsort(-logits, kind="stable")[:k].tolist()
    return [{"label": labels[i], "index": i, "score": scores[i]} for i in best]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--k", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print("| classes | sort everything us | top_k us | ratio (median [min-max] of rounds) |")
    print("|---|---|---|---|")
    for classes in (10, 1000, 21843):
        logits = rng.normal(0, 3, classes).astype(np.float32)
        labels = [f"class {i}" for i in range(classes)]
        assert sort_everything(logits, args.k, labels) == top_k(logits, args.k, labels)
        number = max(10, 200_000 // classes)
        times: dict[str, list[float]] = {"sort everything": [], "top_k": []}
        for _ in range(args.rounds):  # interleaved, so drift moves both
            for name, answer in (("sort everything", sort_everything), ("top_k", top_k)):
                call = functools.partial(answer, logits, args.k, labels)
                seconds = timeit.timeit(call, number=number)
                times[name].append(seconds / number * 1e6)
        ratios = [a / b for a, b in zip(times["sort everything"], times["top_k"], strict=True)]
        print(
            f"| {classes} | {statistics.median(times['sort everything']):.1f} "
            f"| {statistics.median(times['top_k']):.1f} "
            f"| {statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}] |"
        )


if __name__ == "__main__":
    main()
