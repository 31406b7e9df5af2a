"""Reading a Prometheus text exposition in tests."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of `url`/metrics as {(name, sorted label items): value}."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return parse(text)


def parse(text: str) -> dict[tuple[str, tuple], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    """The sum of `name` over the series whose labels include `labels` (0 if none), as
    `sum(name{labels})` reads: a series with more labels (the model) is summed over them."""
    wanted = labels.items()
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= dict(have).items())
