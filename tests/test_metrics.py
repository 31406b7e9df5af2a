"""The service's histogram type counts exactly as prometheus_client's own does."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from app.metrics import BATCH_SIZE_BUCKETS, LATENCY_BUCKETS, BisectHistogram


def amounts() -> list[float]:
    """Every bound, its neighbours, zero, negatives and a spread of random latencies."""
    rng = np.random.default_rng(0)
    edges = [b * f for b in LATENCY_BUCKETS for f in (1.0, 1 - 1e-9, 1 + 1e-9)]
    return [0.0, -1.0, 1e9, *edges, *rng.lognormal(-6, 3, 2000).tolist()]


def exposition(kind: type[Histogram], buckets, observe) -> bytes:
    registry = CollectorRegistry()
    histogram = kind("h_seconds", "h", ["route"], buckets=buckets, registry=registry)
    observe(histogram.labels("/x"))
    return generate_latest(registry)


def test_observe_matches_prometheus_client():
    def each(h):
        for a in amounts():
            h.observe(a)

    assert exposition(BisectHistogram, LATENCY_BUCKETS, each) == exposition(
        Histogram, LATENCY_BUCKETS, each
    )


def test_observe_all_matches_one_observe_each():
    values = amounts()
    sizes = [float(s) for s in range(0, 1100, 7)]

    def each(vs):
        return lambda h: [h.observe(v) for v in vs]

    def at_once(vs):
        return lambda h: h.observe_all(vs)

    for buckets, vs in ((LATENCY_BUCKETS, values), (BATCH_SIZE_BUCKETS, sizes)):
        expected = exposition(Histogram, buckets, each(vs))
        assert exposition(BisectHistogram, buckets, at_once(vs)) == expected
    empty = exposition(BisectHistogram, LATENCY_BUCKETS, at_once([]))
    assert empty == exposition(Histogram, LATENCY_BUCKETS, lambda h: None)
