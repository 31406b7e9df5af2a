"""The server's view of a load-test window: two /metrics scrapes, subtracted.

Percentiles come from histogram bucket deltas with the interpolation of PromQL's
`histogram_quantile`, so they read the same as the recording rules in deploy/prometheus.
"""

from __future__ import annotations

import math
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

# {(sample name, sorted label items): value}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(base_url: str, timeout: float = 10) -> Samples:
    with urllib.request.urlopen(base_url.rstrip("/") + "/metrics", timeout=timeout) as response:
        return parse(response.read().decode())


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def delta(after: Samples, before: Samples) -> Samples:
    """after - before per series; a series new in `after` started from zero."""
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def total(samples: Samples, name: str, **match: str) -> float:
    """Sum of `name` over the series whose labels include `match`."""
    return sum(value for labels, value in select(samples, name, match))


def by_label(samples: Samples, name: str, label: str, **match: str) -> dict[str, float]:
    """Sum of `name` per value of `label` (like `sum by (label)`)."""
    sums: dict[str, float] = {}
    for labels, value in select(samples, name, match):
        key = dict(labels).get(label, "")
        sums[key] = sums.get(key, 0.0) + value
    return sums


def select(samples: Samples, name: str, match: dict[str, str]):
    for (sample_name, labels), value in samples.items():
        if sample_name == name and match.items() <= dict(labels).items():
            yield labels, value


def buckets(samples: Samples, histogram: str, **match: str) -> list[tuple[float, float]]:
    """[(upper bound, cumulative count)] of a histogram, summed over its other labels."""
    counts: dict[float, float] = {}
    for labels, value in select(samples, histogram + "_bucket", match):
        bound = float(dict(labels)["le"])
        counts[bound] = counts.get(bound, 0.0) + value
    return sorted(counts.items())


def quantile(q: float, cumulative: list[tuple[float, float]]) -> float | None:
    """PromQL's histogram_quantile over [(le, cumulative count)]; None without observations."""
    if len(cumulative) < 2 or not math.isinf(cumulative[-1][0]):
        return None
    observations = cumulative[-1][1]
    if observations <= 0:
        return None
    rank = q * observations
    # the first finite bucket holding the rank; past them all, the largest finite bound
    b = next((i for i, (_, count) in enumerate(cumulative[:-1]) if count >= rank), None)
    if b is None:
        return cumulative[-2][0]
    end, count = cumulative[b]
    if b == 0:
        if end <= 0:
            return end
        start = 0.0
    else:
        start, below = cumulative[b - 1]
        count -= below
        rank -= below
    return start + (end - start) * (rank / count)


def mean(samples: Samples, histogram: str, **match: str) -> float | None:
    count = total(samples, histogram + "_count", **match)
    return total(samples, histogram + "_sum", **match) / count if count > 0 else None


def distribution(cumulative: list[tuple[float, float]]) -> list[tuple[float, float, float]]:
    """[(lower bound, upper bound, observations)] per bucket, from cumulative counts."""
    rows, below_bound, below_count = [], 0.0, 0.0
    for bound, count in cumulative:
        rows.append((below_bound, bound, count - below_count))
        below_bound, below_count = bound, count
    return rows
