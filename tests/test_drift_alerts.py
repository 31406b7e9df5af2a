"""The drift alerts with a real Prometheus evaluating the repository's rules against a real
server (their durations scaled from minutes to seconds): test-distribution traffic raises
nothing, one-class traffic fires the class-mix alert and noise the confidence alert, each
within its `for:` and the time to fill the window. The fault campaign runs the same at the
rules' own durations (python -m loadtest.faults --only drift)."""

from __future__ import annotations

import shutil

import pytest

from loadtest.drift_alerts import (
    EXPECTED,
    drift_rules,
    serve_three_ways,
    traffic_bodies,
    watch_alerts,
)
from loadtest.prometheus import prometheus_server
from models.commands.build import main as build_main
from models.data import datasets as data
from tests.conftest import live_server

FOR_S = 10  # the rules' `for:`, scaled from 5 minutes
RUN_S = 60  # long enough for test-distribution traffic to show it raises nothing
FILL_S = 20  # a generous bound on filling the window, scraping and evaluating

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs Debian's prometheus"),
    pytest.mark.skipif(
        not (data.FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
        reason="needs Debian's dataset-fashion-mnist (scripts/setup.sh installs it)",
    ),
]


def test_real_prometheus_fires_each_drift_alert_on_its_shift_and_none_on_steady_traffic(
    tmp_path,
):
    # a real build records the reference the service compares with (its test split)
    argv = ["--limit", "1000", "--epochs", "1", "--width", "4", "--calibration-images", "64"]
    built = tmp_path / "built"
    assert build_main([*argv, "--out", str(built), "--max-int8-drop", "100"]) == 0
    repository = serve_three_ways(built / "fashion-mnist", tmp_path / "served")
    rules = drift_rules(tmp_path, scale_to_s=FOR_S)
    bodies = traffic_bodies(1500)
    with (
        live_server(repository, repository=repository, threads=1) as url,
        prometheus_server(tmp_path, url.removeprefix("http://"), [rules]) as prometheus,
    ):
        run = watch_alerts(url, prometheus, bodies, RUN_S)
    assert not any(run.failed.values()), run
    assert min(run.requests.values()) > 1000, run  # every window filled
    assert run.raised("steady") == [], run
    for model, alert in EXPECTED.items():
        if alert is not None:
            fired = run.fired(model, alert)
            assert fired is not None and fired <= FOR_S + FILL_S, (model, alert, run)
