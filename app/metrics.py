"""Prometheus metrics, in seconds, under the `blink_` prefix.

With several workers the values live in `PROMETHEUS_MULTIPROC_DIR` (set by the CLI before any
worker imports prometheus_client) and each scrape aggregates every process's files.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

# 10 µs to 10 s, five buckets a decade: an idle queue wait, sub-millisecond inference and
# multi-second stalls all land in a bucket narrow enough to read a p99 from.
LATENCY_BUCKETS = (
    *(round(base * 10.0**exp, 7) for exp in range(-5, 1) for base in (1, 2, 3, 5, 7.5)),
    10.0,
)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024)
# Declared at zero from the start, so that rates over them read 0 rather than nothing.
REJECTION_REASONS = (
    "queue_full",
    "concurrency",
    "deadline_unmeetable",
    "not_ready",
    "deadline",
    "disconnected",
    "cancelled",
)
RELOAD_RESULTS = ("success", "unchanged", "load_failed", "warm_up_failed")
CONTENT_TYPE = CONTENT_TYPE_LATEST

# `*_created` gauges double the series count, exist only in single-process mode, and the text
# format gives Prometheus no use for them.
disable_created_metrics()


class BisectHistogram(Histogram):
    """prometheus_client's Histogram, finding the bucket by binary search.

    Its own observe() scans the bounds in a Python loop, one step per bound: for a latency
    histogram, one of the largest Python costs on the hot path (bench/bytecodes.py counts it).
    Same buckets, same values, same exposition.
    """

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        if exemplar:
            super().observe(amount, exemplar)
            return
        self._sum.inc(amount)
        # bisect_left finds the first bound >= amount, as the scan does; the last bound is +Inf.
        self._buckets[bisect_left(self._upper_bounds, amount)].inc(1)

    def observe_all(self, amounts: Sequence[float]) -> None:
        """Observe every amount, writing each touched bucket once (a batch's queue waits)."""
        self._sum.inc(sum(amounts))
        buckets, bounds = self._buckets, self._upper_bounds
        for index, count in Tally([bisect_left(bounds, a) for a in amounts]).items():
            buckets[index].inc(count)


def multiprocess_mode() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class ServiceMetrics:
    """The service's metrics; one instance per app, with its own registry in single-process mode."""

    def __init__(self) -> None:
        self.multiprocess = multiprocess_mode()
        # In multiprocess mode values go to mmap files and a registry is built per scrape.
        self.registry = None if self.multiprocess else CollectorRegistry()
        reg = self.registry
        self.request_duration = BisectHistogram(
            "blink_request_duration_seconds",
            "End-to-end time from request arrival to response, per route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.decode_duration = BisectHistogram(
            "blink_decode_duration_seconds",
            "Time to decode and preprocess one image.",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.queue_wait = BisectHistogram(
            "blink_queue_wait_seconds",
            "Time a request waited in the batching queue before its batch started.",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.inference_duration = BisectHistogram(
            "blink_inference_duration_seconds",
            "ONNX Runtime time per batch.",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.batch_size = BisectHistogram(
            "blink_batch_size",
            "Images per batch sent to the engine.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=reg,
        )
        self.engine_busy = Counter(
            "blink_engine_busy_seconds",
            "Seconds engine slots spent running batches; its rate per slot is the saturation.",
            registry=reg,
        )
        self.requests = Counter(
            "blink_requests",
            "Requests answered, by route and HTTP status.",
            ["route", "status"],
            registry=reg,
        )
        self.rejections = Counter(
            "blink_rejections",
            "Requests refused or dropped before inference, by reason.",
            ["reason"],
            registry=reg,
        )
        # labels() takes a lock and builds a key: refusing under load must stay cheap
        self._rejected = {reason: self.rejections.labels(reason) for reason in REJECTION_REASONS}
        self.queue_depth = Gauge(
            "blink_queue_depth",
            "Images waiting in the batching queue.",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.in_flight = Gauge(
            "blink_requests_in_flight",
            "Requests being processed.",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.engine_slots = Gauge(
            "blink_engine_slots",
            "Engine slots (batches that may run at once).",
            registry=reg,
            multiprocess_mode="livesum",
        )
        # Set by the service once warm-up succeeds, for alerting. With several workers the lowest
        # wins, so one cold worker reads as not ready; /readyz counts them (ready_workers).
        self.ready = Gauge(
            "blink_ready",
            "1 once the model is loaded and warmed up (GET /readyz answers 200), else 0.",
            registry=reg,
            multiprocess_mode="livemin",
        )
        # Info metrics do not work in multiprocess mode: a gauge at 1 carries the labels.
        self.model_info = Gauge(
            "blink_model_info",
            "The served model: name, version, variant and execution provider.",
            ["name", "version", "variant", "provider"],
            registry=reg,
            multiprocess_mode="max",
        )
        # model_info's "max" merges workers; this one keeps a series per worker (its pid), so a
        # reload in progress shows which worker serves which version.
        self.worker_model = Gauge(
            "blink_worker_model_info",
            "1 for the model version this worker process serves.",
            ["name", "version"],
            registry=reg,
            multiprocess_mode="liveall",
        )
        self.reloads = Counter(
            "blink_model_reloads",
            "Reload attempts by result: success (swapped in), unchanged (already serving it), "
            "load_failed or warm_up_failed (the serving version stays).",
            ["result"],
            registry=reg,
        )
        for result in RELOAD_RESULTS:
            self.reloads.labels(result)
        if reg is not None:
            ProcessCollector(registry=reg)
            PlatformCollector(registry=reg)
        # labels() takes a lock and builds a key on every call: keep each route's children.
        self._answered: dict[tuple[str, int], tuple[Counter, BisectHistogram]] = {}

    def request_answered(self, route: str, status: int, seconds: float) -> None:
        children = self._answered.get((route, status))
        if children is None:
            children = (
                self.requests.labels(route, str(status)),
                self.request_duration.labels(route),
            )
            self._answered[route, status] = children
        children[0].inc()
        children[1].observe(seconds)

    def rejected(self, reason: str) -> None:
        self._rejected[reason].inc()

    def watch(self, queue_depth: Callable[[], float], in_flight: Callable[[], float]) -> bool:
        """Read the two live gauges from these functions at each scrape, where that is possible.

        Single-process, prometheus_client calls them at collection time, so requests pay
        nothing for the gauges. Returns False in multiprocess mode, where each worker must
        write its gauges as they change (a scrape reads other workers' files, not their state).
        """
        if self.multiprocess:
            return False
        self.queue_depth.set_function(queue_depth)
        self.in_flight.set_function(in_flight)
        return True

    # BatchObserver: called by the batcher on the event loop.
    def batch_started(self, size: int, queue_waits_s: list[float]) -> None:
        self.queue_wait.observe_all(queue_waits_s)
        self.batch_size.observe(size)

    def batch_finished(self, size: int, inference_s: float) -> None:
        self.inference_duration.observe(inference_s)
        self.engine_busy.inc(inference_s)

    def exposition(self) -> bytes:
        if self.registry is not None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)


def ready_workers() -> int:
    """Live worker processes whose `blink_ready` is 1 (multiprocess mode only).

    Each worker warms up on its own, so one that is ready says little about the others. Files of
    a process that died without cleaning up (SIGKILL) are skipped: a stale 1 would count a worker
    that is gone while its replacement is still cold.
    """
    count = 0
    for path in Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).glob("gauge_livemin_*.db"):
        if not process_alive(int(path.stem.rsplit("_", 1)[1])):
            continue
        for metric in multiprocess.MultiProcessCollector.merge([str(path)], accumulate=False):
            if metric.name == "blink_ready":
                count += any(sample.value == 1 for sample in metric.samples)
    return count


def worker_models() -> list[dict[str, Any]]:
    """The name and version each live worker serves, by pid (multiprocess mode only)."""
    served = []
    for path in Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).glob("gauge_liveall_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        if not process_alive(pid):
            continue
        for metric in multiprocess.MultiProcessCollector.merge([str(path)], accumulate=False):
            if metric.name == "blink_worker_model_info":
                served += [
                    {"pid": pid, "name": s.labels["name"], "version": s.labels["version"]}
                    for s in metric.samples
                    if s.value == 1
                ]
    return sorted(served, key=lambda w: w["pid"])


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, under another user
        return True
    return True


def mark_worker_exit() -> None:
    """Drop this process's live gauges from the aggregate (multiprocess mode only)."""
    if multiprocess_mode():
        multiprocess.mark_process_dead(os.getpid())
