"""loadtest/: headless Locust runs against the real service, and the arithmetic of the report.

The runs post real Fashion-MNIST test images; without the dataset (Debian package
dataset-fashion-mnist, installed by the set-up) they are skipped, and the runner is shown to stop
with a message rather than fall back to noise.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest import promstats, report, run
from loadtest.images import DatasetMissing, dataset_files
from tests.conftest import ROOT, live_server
from tests.metrics_text import scrape, value

try:
    dataset_files()
    DATASET = None
except DatasetMissing as exc:
    DATASET = str(exc)
needs_dataset = pytest.mark.skipif(DATASET is not None, reason=DATASET or "")

CLASSIFIED = {"route": "/classify", "status": "200"}


def classified(url: str) -> float:
    return value(scrape(url), "blink_requests_total", **CLASSIFIED)


def csv_aggregated(out: Path) -> dict:
    with (out / "locust_stats.csv").open(newline="") as f:
        (row,) = [r for r in csv.DictReader(f) if r["Name"] == "Aggregated"]
    return row


@needs_dataset
def test_closed_loop_run_is_counted_exactly_by_the_server(bundle_dir, tmp_path):
    out = tmp_path / "report"
    with live_server(bundle_dir, threads=1) as url:
        before = classified(url)
        args = f"--scenario closed --url {url} --duration 20s --users 4 --out {out}"
        code = run.main(args.split())
        moved = classified(url) - before
        never_answered = value(scrape(url), "blink_requests_in_flight")
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    client = summary["client"]
    assert client["requests"] > 0
    assert client["failures"] == 0
    # the server's counter, scraped by this test, moved by exactly Locust's count
    assert moved == client["requests"]
    assert never_answered == 0
    assert summary["server"]["requests"] == client["requests"]
    assert summary["requests_match"]
    # Locust's own CSV holds the same final figures as the JSON the summary is built from
    row = csv_aggregated(out)
    assert int(row["Request Count"]) == client["requests"]
    assert int(row["Failure Count"]) == 0
    for q in ("50", "95", "99"):
        assert float(row[f"{q}%"]) == client[f"p{q}_ms"]
    # every answer was checked against the model's labels and the ground truth
    checks = client["checks"]
    assert checks["checked"] == client["requests"]
    assert sum(k["checked"] for k in checks["by_kind"].values()) == client["requests"]
    assert set(checks["by_kind"]) == {"png", "jpeg", "jpeg512"}
    assert 0 <= checks["top1_correct"] <= checks["checked"]
    # the server-side breakdown is there
    server = summary["server"]
    assert server["request_ms"]["p99"] > 0
    assert server["mean_batch_size"] >= 1
    assert sum(r["batches"] for r in server["batch_sizes"]) == server["batches"]
    for name in (
        "summary.md",
        "locust.html",
        "locust_stats.csv",
        "locust_stats_history.csv",
        "locust.json",
        "batch_sizes.png",
        "latency_over_time.png",
        "metrics_start.prom",
        "metrics_stop.prom",
    ):
        assert (out / name).stat().st_size > 0, name
    text = (out / "summary.md").read_text()
    assert f"| requests | {client['requests']:,} | {client['requests']:,} (same count) |" in text
    assert "Accuracy seen by the clients" in text


@pytest.mark.slow
@needs_dataset
def test_open_loop_fires_on_schedule(bundle_dir, tmp_path):
    out = tmp_path / "report"
    with live_server(bundle_dir, threads=1) as url:
        before = classified(url)
        args = f"--scenario open --url {url} --rate 60 --users 2 --duration 15s --out {out}"
        code = run.main(args.split())
        moved = classified(url) - before
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    client = summary["client"]
    assert moved == client["requests"] and client["failures"] == 0
    # requests follow the schedule (60/s), not the answers: a closed loop would send far more
    assert 0.8 * 60 * 15 <= client["requests"] <= 60 * 15 + 2
    assert client["checks"]["schedule_lag_ms"]["max"] >= 0


@pytest.mark.slow
@needs_dataset
def test_step_load_starts_the_service_and_records_each_step(bundle_dir, tmp_path):
    out = tmp_path / "report"
    args = f"--scenario step --model {bundle_dir} --step-rate 20 --step-time 4s --duration 12s"
    code = run.main([*args.split(), "--slo-p99-ms", "2000", "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    steps = summary["steps"]
    assert 1 <= len(steps) <= 3
    assert [s["offered_rps"] for s in steps] == [20.0 * (i + 1) for i in range(len(steps))]
    assert sum(s["requests"] for s in steps) <= summary["client"]["requests"]
    assert len(steps) == 3 or steps[-1]["broken"]
    assert all(s["server_ms"]["p99"] > 0 for s in steps)
    assert summary["requests_match"]
    assert (out / "latency_vs_load.png").stat().st_size > 0
    assert "## Step load" in (out / "summary.md").read_text()
    assert "server.log" in summary["files"]


def test_without_the_dataset_the_run_stops_with_a_message(tmp_path):
    env = {**os.environ, "BLINK_FASHION_MNIST_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "loadtest.run", "--url", "http://127.0.0.1:9", "--out", tmp_path],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "dataset-fashion-mnist" in result.stderr
    assert str(tmp_path / "t10k-images-idx3-ubyte.gz") in result.stderr
    assert not (tmp_path / "summary.md").exists()


# -- the report's arithmetic, on the inputs promtool checks in deploy/prometheus/tests ----------

SLOW = [(0.05, 0), (0.1, 0), (0.3, 10), (float("inf"), 10)]


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        (0.99, SLOW, 0.298),  # as histogram_quantile gives in rules.test.yml
        (0.5, SLOW, 0.2),
        (0.99, [(0.05, 40), (float("inf"), 40)], 0.0495),
        (0.99, [(0.05, 1), (0.1, 1), (float("inf"), 3)], 0.1),  # in +Inf: the top finite bound
        (0.5, [(0.05, 0), (float("inf"), 0)], None),  # no observations
        (0.5, [(0.05, 3)], None),  # no +Inf bucket
    ],
)
def test_quantile_interpolates_like_promql(q, buckets, expected):
    result = promstats.quantile(q, buckets)
    assert result == pytest.approx(expected) if expected is not None else result is None


def test_window_deltas_sum_over_labels():
    before = promstats.parse(
        'blink_requests_total{route="/classify",status="200"} 5\n'
        'blink_batch_size_bucket{le="1.0"} 2\nblink_batch_size_bucket{le="+Inf"} 3\n'
        "blink_batch_size_sum 4\nblink_batch_size_count 3\n"
    )
    after = promstats.parse(
        'blink_requests_total{route="/classify",status="200"} 15\n'
        'blink_requests_total{route="/classify",status="503"} 2\n'
        'blink_batch_size_bucket{le="1.0"} 4\nblink_batch_size_bucket{le="+Inf"} 8\n'
        "blink_batch_size_sum 16\nblink_batch_size_count 8\n"
    )
    window = promstats.delta(after, before)
    statuses = promstats.by_label(window, "blink_requests_total", "status", route="/classify")
    assert statuses == {"200": 10, "503": 2}
    assert promstats.mean(window, "blink_batch_size") == 12 / 5
    assert promstats.distribution(promstats.buckets(window, "blink_batch_size")) == [
        (0.0, 1.0, 2),
        (1.0, float("inf"), 3),
    ]


def test_knee_is_the_last_step_inside_the_limits():
    steps = [
        {"offered_rps": 50, "broken": False},
        {"offered_rps": 100, "broken": False},
        {"offered_rps": 150, "broken": True},
    ]
    assert report.knee(steps)["offered_rps"] == 100
    assert report.knee(steps[2:]) is None


def test_durations_parse_like_locust():
    assert [run.seconds(t) for t in ("30s", "2m", "1m30s", "45", "1h")] == [30, 120, 90, 45, 3600]
    with pytest.raises(Exception, match="not a duration"):
        run.seconds("30 seconds")
