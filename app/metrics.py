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

import numpy as np
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

from app.postprocess import SCORE_EDGES

# 10 µs to 10 s, five buckets a decade: an idle queue wait, sub-millisecond inference and
# multi-second stalls all land in a bucket narrow enough to read a p99 from.
LATENCY_BUCKETS = (
    *(round(base * 10.0**exp, 7) for exp in range(-5, 1) for base in (1, 2, 3, 5, 7.5)),
    10.0,
)
# Top-1 scores in steps of 0.05, as the drift histogram bins them.
SCORE_BUCKETS = SCORE_EDGES[1:]
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
CACHE_RESULTS = ("hit", "miss", "coalesced", "bypass")
# The hot routes, declared at zero per model (the request label of every model route).
DECLARED_ROUTES = ("/classify", "/v2/models/{name}/infer")
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

    def observe_array(self, amounts: np.ndarray) -> None:
        """Observe every amount of an array: Python work per bucket, not per amount."""
        self._sum.inc(float(amounts.sum()))
        indices = np.searchsorted(self._upper_bounds, amounts, side="left")  # as bisect_left
        for index in np.flatnonzero(counts := np.bincount(indices)):
            self._buckets[index].inc(int(counts[index]))

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
            "End-to-end time from request arrival to response, per model and route.",
            ["model", "route"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.decode_duration = BisectHistogram(
            "blink_decode_duration_seconds",
            "Time to decode and preprocess one image.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.queue_wait = BisectHistogram(
            "blink_queue_wait_seconds",
            "Time a request waited in the batching queue before its batch started.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.inference_duration = BisectHistogram(
            "blink_inference_duration_seconds",
            "ONNX Runtime time per batch.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.batch_size = BisectHistogram(
            "blink_batch_size",
            "Images per batch sent to the engine.",
            ["model"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=reg,
        )
        self.engine_busy = Counter(
            "blink_engine_busy_seconds",
            "Seconds engine slots spent running batches; its rate per slot is the saturation.",
            ["model"],
            registry=reg,
        )
        self.requests = Counter(
            "blink_requests",
            "Requests answered, by model, route and HTTP status.",
            ["model", "route", "status"],
            registry=reg,
        )
        self.rejections = Counter(
            "blink_rejections",
            "Requests refused or dropped before inference, by model and reason.",
            ["model", "reason"],
            registry=reg,
        )
        self.queue_depth = Gauge(
            "blink_queue_depth",
            "Images waiting in the batching queue.",
            ["model"],
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.in_flight = Gauge(
            "blink_requests_in_flight",
            "Requests being processed.",
            ["model"],
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.engine_slots = Gauge(
            "blink_engine_slots",
            "Engine slots (batches that may run at once).",
            ["model"],
            registry=reg,
            multiprocess_mode="livesum",
        )
        # Set by each model's service once its warm-up succeeds, for alerting. With several
        # workers the lowest wins, so one cold worker reads as not ready.
        self.ready = Gauge(
            "blink_ready",
            "1 once the model is loaded and warmed up, else 0 (still warming up, or it failed).",
            ["model"],
            registry=reg,
            multiprocess_mode="livemin",
        )
        # The process as a whole (GET /readyz's rule): /readyz counts the workers at 1.
        self.worker_ready = Gauge(
            "blink_worker_ready",
            "1 while this worker answers GET /readyz with 200, else 0.",
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
            "Reload and load attempts by model and result: success (swapped in or added), "
            "unchanged (already serving it), load_failed or warm_up_failed (the serving "
            "version, if any, stays).",
            ["model", "result"],
            registry=reg,
        )
        self.cache_lookups = Counter(
            "blink_cache_lookups",
            "Response cache lookups by model and result: hit (answered from the cache), "
            "miss (computed and stored), coalesced (answered by an identical request in "
            "progress), bypass (Cache-Control: no-cache or no-store).",
            ["model", "result"],
            registry=reg,
        )
        self.cache_evictions = Counter(
            "blink_cache_evictions",
            "Answers evicted from the response cache to stay within BLINK_CACHE_BYTES.",
            registry=reg,
        )
        self.cache_bytes = Gauge(
            "blink_cache_bytes",
            "Bytes held by the response cache (answers and keys), per worker.",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.cache_entries = Gauge(
            "blink_cache_entries",
            "Answers held by the response cache, per worker.",
            registry=reg,
            multiprocess_mode="livesum",
        )
        # What the models answer (app/monitor.py), counted off the request path.
        self.predictions = Counter(
            "blink_predictions",
            "Answers computed, by model and predicted label (cache hits are not counted again).",
            ["model", "label"],
            registry=reg,
        )
        self.top_score = BisectHistogram(
            "blink_top_score",
            "The top-1 score of each answer computed (calibrated, where the bundle is).",
            ["model"],
            buckets=SCORE_BUCKETS,
            registry=reg,
        )
        self.low_confidence = Counter(
            "blink_low_confidence_answers",
            "Answers whose top-1 score is below the bundle's low-confidence threshold.",
            ["model"],
            registry=reg,
        )
        self.class_drift = Gauge(
            "blink_drift_class_mix",
            "Jensen-Shannon distance (0-1) of the recent answers' predicted-class mix from the "
            "bundle's reference; absent without a reference.",
            ["model"],
            registry=reg,
            multiprocess_mode="livemax",
        )
        self.confidence_drift = Gauge(
            "blink_drift_confidence",
            "Jensen-Shannon distance (0-1) of the recent answers' top-1 score histogram from "
            "the bundle's reference; absent without a reference.",
            ["model"],
            registry=reg,
            multiprocess_mode="livemax",
        )
        self.window_answers = Gauge(
            "blink_drift_window_answers",
            "Answers in the sliding window the drift is measured over (BLINK_DRIFT_WINDOW at "
            "most).",
            ["model"],
            registry=reg,
            multiprocess_mode="livemin",
        )
        self.reference_low_confidence = Gauge(
            "blink_reference_low_confidence_ratio",
            "The share of low-confidence answers in the bundle's reference behaviour.",
            ["model"],
            registry=reg,
            multiprocess_mode="max",
        )
        # A shadow version beside a model (app/candidate.py), labelled with the serving model.
        self.shadow_requests = Counter(
            "blink_shadow_requests",
            "Requests mirrored to a model's shadow version, by result: compared (the shadow "
            "answered and its top-1 was compared with the served one), shed (not sent: the "
            "service was busy or the shadow's queue full), failed (the shadow failed or its "
            "deadline passed).",
            ["model", "result"],
            registry=reg,
        )
        self.shadow_agreements = Counter(
            "blink_shadow_agreements",
            "Compared requests whose top-1 label the shadow and the serving version agree on.",
            ["model"],
            registry=reg,
        )
        self.shadow_latency = BisectHistogram(
            "blink_shadow_latency_seconds",
            "Per compared request, by role: serving (its queue wait plus inference in the "
            "version that answered the client) or shadow (from the mirror's arrival at the "
            "shadow to its answer, gathering included).",
            ["model", "role"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        if reg is not None:
            ProcessCollector(registry=reg)
            PlatformCollector(registry=reg)
        self._models: dict[str, ModelMetrics] = {}

    def for_model(self, name: str) -> ModelMetrics:
        """The series of one model (made once, declared at zero); kept across its reloads."""
        metrics = self._models.get(name)
        if metrics is None:
            metrics = self._models[name] = ModelMetrics(self, name)
        return metrics

    def forget_model(self, name: str) -> None:
        """Drop every series of a model that is no longer served (single process; a worker's
        multiprocess files keep theirs until it exits)."""
        metrics = self._models.pop(name, None)
        if metrics is None or self.multiprocess:
            return
        for family in MODEL_FAMILIES:
            family_metric = getattr(self, family)
            # prometheus_client has no public listing of a family's children
            for labels in list(family_metric._metrics):
                if labels[0] == name:
                    family_metric.remove(*labels)

    def exposition(self) -> bytes:
        if self.registry is not None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)


# The families with a `model` label first: what forget_model removes.
MODEL_FAMILIES = (
    "request_duration",
    "requests",
    "rejections",
    "decode_duration",
    "queue_wait",
    "inference_duration",
    "batch_size",
    "engine_busy",
    "queue_depth",
    "in_flight",
    "engine_slots",
    "ready",
    "reloads",
    "cache_lookups",
    "predictions",
    "top_score",
    "low_confidence",
    "class_drift",
    "confidence_drift",
    "window_answers",
    "reference_low_confidence",
    "shadow_requests",
    "shadow_agreements",
    "shadow_latency",
)
SHADOW_RESULTS = ("compared", "shed", "failed")


class ModelMetrics:
    """One model's children of the service's families, bound once.

    `labels()` takes a lock and builds a key on every call: the request path uses these.
    """

    def __init__(self, metrics: ServiceMetrics, name: str) -> None:
        self.family = metrics
        self.name = name
        self.multiprocess = metrics.multiprocess
        self.decode_duration = metrics.decode_duration.labels(name)
        self.queue_wait = metrics.queue_wait.labels(name)
        self.inference_duration = metrics.inference_duration.labels(name)
        self.batch_size = metrics.batch_size.labels(name)
        self.engine_busy = metrics.engine_busy.labels(name)
        self.queue_depth = metrics.queue_depth.labels(name)
        self.in_flight = metrics.in_flight.labels(name)
        self.engine_slots = metrics.engine_slots.labels(name)
        self.ready = metrics.ready.labels(name)
        self.model_info = metrics.model_info
        self.worker_model = metrics.worker_model
        self._rejected = {
            reason: metrics.rejections.labels(name, reason) for reason in REJECTION_REASONS
        }
        self._reloads = {result: metrics.reloads.labels(name, result) for result in RELOAD_RESULTS}
        self.cache = {
            result: metrics.cache_lookups.labels(name, result) for result in CACHE_RESULTS
        }
        self.top_score = metrics.top_score.labels(name)
        self.low_confidence = metrics.low_confidence.labels(name)
        self.window_answers = metrics.window_answers.labels(name)
        self._predictions: dict[str, Counter] = {}
        self._answered: dict[tuple[str, int], tuple[Counter, BisectHistogram]] = {}
        # Declared at zero, so that rate() sees the first requests after a start.
        for route in DECLARED_ROUTES:
            self.answered_children(route, 200)

    def answered_children(self, route: str, status: int) -> tuple[Counter, BisectHistogram]:
        children = self._answered.get((route, status))
        if children is None:
            family = self.family
            children = (
                family.requests.labels(self.name, route, str(status)),
                family.request_duration.labels(self.name, route),
            )
            self._answered[route, status] = children
        return children

    def request_answered(self, route: str, status: int, seconds: float) -> None:
        children = self._answered.get((route, status)) or self.answered_children(route, status)
        children[0].inc()
        children[1].observe(seconds)

    def rejected(self, reason: str) -> None:
        self._rejected[reason].inc()

    def predicted(self, label: str, count: int) -> None:
        """`count` more answers of `label` (a series per label answered: bounded by labels)."""
        child = self._predictions.get(label)
        if child is None:
            child = self._predictions[label] = self.family.predictions.labels(self.name, label)
        child.inc(count)

    def drift_gauges(self) -> tuple[Gauge, Gauge, Gauge]:
        """Class-mix drift, confidence drift and the reference's low-confidence share: made
        only for a model whose bundle has a reference (without one, they are absent)."""
        family, name = self.family, self.name
        return (
            family.class_drift.labels(name),
            family.confidence_drift.labels(name),
            family.reference_low_confidence.labels(name),
        )

    def reloaded(self, result: str) -> None:
        self._reloads[result].inc()

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


class ShadowMetrics:
    """The series of one model's shadow, bound once (declared at zero)."""

    def __init__(self, metrics: ServiceMetrics, model: str) -> None:
        self.compared, self.shed, self.failed = (
            metrics.shadow_requests.labels(model, result) for result in SHADOW_RESULTS
        )
        self.agreed = metrics.shadow_agreements.labels(model)
        self.serving_latency = metrics.shadow_latency.labels(model, "serving")
        self.shadow_latency = metrics.shadow_latency.labels(model, "shadow")


def ready_workers() -> int:
    """Live worker processes whose `blink_worker_ready` is 1 (multiprocess mode only).

    Each worker warms up on its own, so one that is ready says little about the others. Files of
    a process that died without cleaning up (SIGKILL) are skipped: a stale 1 would count a worker
    that is gone while its replacement is still cold.
    """
    count = 0
    for path in Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).glob("gauge_livemin_*.db"):
        if not process_alive(int(path.stem.rsplit("_", 1)[1])):
            continue
        for metric in multiprocess.MultiProcessCollector.merge([str(path)], accumulate=False):
            if metric.name == "blink_worker_ready":
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
