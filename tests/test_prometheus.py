"""deploy/prometheus against the real tools, and a real Prometheus server scraping the service.

promtool checks the config and rules and runs the rules' unit tests (shown to fail on a broken
copy); the service's own exposition is checked against Prometheus naming conventions; then Debian's
`prometheus` scrapes a live server under load and its HTTP API must return what was sent.
"""

from __future__ import annotations

import asyncio
import math
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from loadtest.prometheus import RULES, prometheus_server, wait_until
from tests.conftest import ROOT, live_server
from tests.images import png
from tests.onnx_models import copy_with_reference
from tests.test_grafana import dashboard
from tests.test_grafana import queries as grafana_queries

PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
PNG = {"content-type": "image/png"}

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool absent (Debian package prometheus)"
)
needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None, reason="prometheus absent (Debian package prometheus)"
)


def promtool(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["promtool", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=60
    )


# -- static checks -----------------------------------------------------------------------------


@needs_promtool
def test_config_and_rules_pass_promtool():
    config = promtool("check", "config", PROMETHEUS_DIR / "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr
    assert f"{len(RULES)} rule files found" in config.stdout + config.stderr
    rules = promtool("check", "rules", *RULES)
    assert rules.returncode == 0, rules.stdout + rules.stderr


@needs_promtool
def test_rule_unit_tests_pass():
    result = promtool("test", "rules", PROMETHEUS_DIR / "tests" / "rules.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
@pytest.mark.parametrize(
    ("rule_file", "good", "broken"),
    [
        ("alerts.yml", "p99_1m > 0.1", "p99_1m > 0.5"),  # a looser objective
        ("alerts.yml", "0.01\n        for: 5m", "0.01\n        for: 1m"),  # 503s: not sustained
        ("recording.yml", "quantile(0.99, sum by (job, route", "quantile(0.9, sum by (job, route"),
    ],
)
def test_rule_unit_tests_catch_a_broken_rule(tmp_path, rule_file, good, broken):
    copy = tmp_path / "prometheus"
    shutil.copytree(PROMETHEUS_DIR, copy)
    text = (copy / "rules" / rule_file).read_text()
    assert good in text
    (copy / "rules" / rule_file).write_text(text.replace(good, broken))
    result = promtool("test", "rules", copy / "tests" / "rules.test.yml")
    assert result.returncode != 0, result.stdout


def test_every_alert_has_severity_and_summary():
    groups = yaml.safe_load((PROMETHEUS_DIR / "rules" / "alerts.yml").read_text())["groups"]
    alerts = [rule for group in groups for rule in group["rules"]]
    assert {a["alert"] for a in alerts} >= {
        "BlinkLatencyP99AboveSLO",
        "BlinkSustained503s",
        "BlinkDown",
        "BlinkNotReady",
    }
    for alert in alerts:
        assert alert["labels"]["severity"] in {"warning", "critical"}, alert["alert"]
        assert alert["annotations"]["summary"], alert["alert"]


# -- the service's exposition (metrics review) --------------------------------------------------

# Gauges and histograms of counts, which have no unit to name.
UNITLESS = {
    "blink_batch_size",
    "blink_queue_depth",
    "blink_requests_in_flight",
    "blink_engine_slots",
    "blink_model_info",
    "blink_worker_model_info",
    "blink_ready",
    "blink_worker_ready",
    "blink_cache_entries",
    "blink_top_score",
    "blink_drift_class_mix",
    "blink_drift_confidence",
    "blink_drift_window_answers",
    "blink_reference_low_confidence_ratio",
}


def exposition_under_load(bundle: Path, **settings: object) -> str:
    with live_server(bundle, threads=1, **settings) as url:
        responses = asyncio.run(post_concurrently(url, [png(i) for i in range(16)]))
        assert {r.status_code for r in responses} == {200}
        httpx.post(url + "/classify", content=b"junk", headers=PNG)
        return httpx.get(url + "/metrics").text


@needs_promtool
@pytest.mark.parametrize("workers", [1, 2])
def test_exposition_follows_prometheus_conventions(bundle_dir, workers):
    text = exposition_under_load(bundle_dir, workers=workers)
    lint = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
    families = {f.name: f for f in text_string_to_metric_families(text) if "blink" in f.name}
    assert not [name for name in families if name.endswith("_created")], "created series"
    for name, family in families.items():
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), name
        elif name not in UNITLESS:
            assert name.endswith(("_seconds", "_bytes")), f"{name}: name its base unit"
    for name in (
        "blink_request_duration_seconds",
        "blink_queue_wait_seconds",
        "blink_inference_duration_seconds",
        "blink_decode_duration_seconds",
    ):
        bounds = sorted(
            float(s.labels["le"]) for s in families[name].samples if s.name.endswith("_bucket")
        )
        assert bounds[0] <= 1e-4, f"{name}: first bucket must resolve sub-millisecond"
        assert bounds[-2] >= 5, f"{name}: buckets must reach seconds"
        per_decade = sum(1e-3 < b <= 1e-2 for b in bounds)
        assert per_decade >= 4, f"{name}: too coarse to read a percentile"
    # rejections are declared at zero, so a rate over them reads 0 and not "no data"
    reasons = {s.labels["reason"] for s in families["blink_rejections"].samples}
    assert reasons >= {"queue_full", "not_ready", "deadline", "disconnected"}


# -- a real Prometheus server ---------------------------------------------------------------------


def query(url: str, promql: str) -> dict[tuple, float]:
    """An instant query: {sorted label items without __name__: value}."""
    body = httpx.get(url + "/api/v1/query", params={"query": promql}, timeout=5).json()
    assert body["status"] == "success", body
    return {
        tuple(sorted((k, v) for k, v in r["metric"].items() if k != "__name__")): float(
            r["value"][1]
        )
        for r in body["data"]["result"]
    }


def single(url: str, promql: str) -> float | None:
    values = list(query(url, promql).values())
    assert len(values) <= 1, values
    return values[0] if values else None


async def post_concurrently(url: str, bodies: list[bytes]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        return await asyncio.gather(
            *(client.post("/classify", content=b, headers=PNG) for b in bodies)
        )


def count_is(url: str, promql: str, expected: float):
    return lambda: single(url, promql) == expected


@needs_prometheus
def test_real_prometheus_records_the_load(bundle_dir, tmp_path):
    classified = 'sum(blink_requests_total{job="blink",route="/classify",status="200"})'
    # with a reference, so that the drift panels have data too, and a shadow for its panels
    reference = np.full((10, 10), 0.0) + np.eye(10)
    referenced = copy_with_reference(bundle_dir, tmp_path / "tiny" / "1", reference)
    shadow = str(referenced)
    with (
        live_server(referenced, threads=1, max_batch_size=16, shadow=shadow) as service,
        prometheus_server(tmp_path, service.removeprefix("http://")) as prom,
    ):
        wait_until(lambda: single(prom, 'up{job="blink"}') == 1, "scrape of the service")
        assert single(prom, 'blink_ready{job="blink",model="tiny"}') == 1

        # A first request makes the route's series exist, so the load after it is a rate increase.
        assert httpx.post(service + "/classify", content=png(), headers=PNG).status_code == 200
        wait_until(count_is(prom, classified, 1), "the first request in prometheus")
        sent = 1
        for wave in range(4):
            bodies = [png(wave * 100 + i) for i in range(24)]
            responses = asyncio.run(post_concurrently(service, bodies))
            assert [r.status_code for r in responses] == [200] * len(bodies)
            sent += len(bodies)
        wait_until(count_is(prom, classified, sent), f"{sent} requests in prometheus")

        # Each rule group runs every second on its own schedule: wait for each figure.
        p99 = recorded(prom, 'job_route:blink_request_duration_seconds:p99_1m{route="/classify"}')
        batch = recorded(prom, "job:blink_batch_size:mean_1m")
        throughput = recorded(prom, 'job_route:blink_requests:rate1m{route="/classify"}')
        queue_p99 = recorded(prom, "job:blink_queue_wait_seconds:p99_1m")
        inference_p50 = recorded(prom, "job:blink_inference_duration_seconds:p50_1m")
        rejections = wait_until(lambda: query(prom, "job_reason:blink_rejections:rate1m"), "rates")
        firing = httpx.get(prom + "/api/v1/alerts").json()["data"]["alerts"]
        # every Grafana panel shows data from this Prometheus
        blank = blank_panels(prom)
        exposed = httpx.get(service + "/metrics").text

    assert 0 < p99 <= 10
    assert 1 <= batch <= 16
    assert throughput > 0
    assert queue_p99 >= 0
    assert inference_p50 > 0
    assert set(rejections.values()) == {0.0}
    assert {dict(labels)["reason"] for labels in rejections} >= {"queue_full", "deadline"}
    # latency depends on this machine's load; availability alerts must stay quiet
    alerts = {a["labels"]["alertname"] for a in firing}
    assert not alerts & {"BlinkDown", "BlinkAbsent", "BlinkNotReady", "BlinkSustained503s"}
    assert blank == [], f"Grafana panels without data: {blank}"
    # the service's own count agrees with what prometheus stored (mirrors are not requests)
    series = 'blink_requests_total{model="tiny",route="/classify",status="200"}'
    assert f"{series} {float(sent)}" in exposed


def recorded(url: str, promql: str) -> float:
    """A recording rule's value, once its group has evaluated over the latest scrapes."""
    return wait_until(lambda: finite(single(url, promql)), promql)


def blank_panels(url: str, timeout: float = 30) -> list[str]:
    """Titles of the Grafana panels whose queries still return nothing after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        blank = [title for title, expr in grafana_queries(dashboard()) if not query(url, expr)]
        if not blank or time.monotonic() > deadline:
            return blank
        time.sleep(0.5)


def finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def test_recording_rule_names_follow_level_metric_operation():
    groups = yaml.safe_load((PROMETHEUS_DIR / "rules" / "recording.yml").read_text())["groups"]
    for rule in (r for g in groups for r in g["rules"]):
        assert re.fullmatch(r"[a-z_]+:blink_[a-z_]+:[a-z0-9_]+", rule["record"]), rule["record"]
