"""deploy/grafana: provisioning that matches the compose file, and a dashboard whose every query
names only metrics the service exports (scraped from a real server) or the recording rules in
deploy/prometheus, and parses as PromQL (promtool)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, live_server
from tests.images import png

GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "blink.json"
RECORDING_RULES = ROOT / "deploy" / "prometheus" / "rules" / "recording.yml"
# Made by Prometheus for every target, not by the service.
SYNTHETIC = {"up"}
# What Grafana substitutes before sending a query.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "15s"}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
KEYWORDS |= {"group_left", "group_right", "inf", "nan"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict) -> list[dict]:
    """Every panel, rows' nested panels included, rows themselves left out."""
    flat = []
    for panel in board["panels"]:
        flat += panel.get("panels", []) if panel["type"] == "row" else [panel]
    return flat


def queries(board: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target, with Grafana's variables filled in."""
    found = []
    for panel in panels(board):
        for target in panel["targets"]:
            found.append((panel["title"], substitute(target["expr"], board)))
    return found


def substitute(expr: str, board: dict) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    for variable in board["templating"]["list"]:
        expr = expr.replace("$" + variable["name"], variable["current"]["value"])
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    expr = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # range selectors
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", expr):
        rest = expr[match.end() :].lstrip()
        if rest.startswith("(") or match.group() in KEYWORDS:  # a function or an operator
            continue
        names.add(match.group())
    return names


def variable_metrics(board: dict) -> set[str]:
    names = set()
    for variable in board["templating"]["list"]:
        match = re.fullmatch(r"label_values\((\w+),\s*\w+\)", variable["definition"])
        assert match, variable["definition"]
        names.add(match.group(1))
    return names


def recording_rule_names() -> set[str]:
    groups = yaml.safe_load(RECORDING_RULES.read_text())["groups"]
    return {rule["record"] for group in groups for rule in group["rules"]}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> set[str]:
    """Every sample name of a real server's /metrics after it has answered requests (with a
    bundle that records a reference, so that the drift gauges exist, with a shadow, and once the
    monitor has counted the answers: it does so about once a second)."""
    import numpy as np

    from tests.onnx_models import copy_with_reference, write_bundle

    root = tmp_path_factory.mktemp("grafana")
    bundle = copy_with_reference(write_bundle(root / "source"), root / "tiny" / "1", np.eye(10))
    with live_server(bundle, threads=1, shadow=str(bundle)) as url:  # the shadow's series too
        asyncio.run(post(url, [png(i) for i in range(8)]))
        httpx.post(url + "/classify", content=b"junk", headers={"content-type": "image/png"})
        deadline = time.monotonic() + 10
        while "blink_predictions_total{" not in (text := httpx.get(url + "/metrics").text):
            assert time.monotonic() < deadline, "the monitor never counted the answers"
            time.sleep(0.1)
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


async def post(url: str, bodies: list[bytes]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        headers = {"content-type": "image/png"}
        answers = await asyncio.gather(
            *(client.post("/classify", content=b, headers=headers) for b in bodies)
        )
    assert {a.status_code for a in answers} == {200}


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            'histogram_quantile(0.99, sum by (job, le) (rate(a_bucket{job="x",le!="1"}[5m])))',
            {"a_bucket"},
        ),
        ("sum(rate(b_total[1m])) / sum without (instance) (c) > bool 1e-9", {"b_total", "c"}),
        ('max(job:d:p99_1m{route="/x"}) or vector(0)', {"job:d:p99_1m"}),
        ("e_bytes offset 5m and on (instance) up", {"e_bytes", "up"}),
    ],
)
def test_metric_names_are_read_out_of_promql(expr, names):
    assert metric_names(expr) == names


def test_every_panel_queries_only_exported_metrics_and_recording_rules(exported):
    board = dashboard()
    known = exported | recording_rule_names() | SYNTHETIC
    unknown = {
        (title, name)
        for title, expr in queries(board)
        for name in metric_names(expr)
        if name not in known
    }
    assert not unknown, f"panels query metrics nobody exports: {sorted(unknown)}"
    assert variable_metrics(board) <= exported


def test_a_misspelt_metric_is_caught(exported):
    expr = queries(dashboard())[0][1].replace("blink_", "blinc_", 1)
    assert metric_names(expr) - exported - recording_rule_names()


def test_the_dashboard_covers_what_operators_ask_for():
    used = set().union(*(metric_names(expr) for _, expr in queries(dashboard())))
    for needed in (
        "job_route:blink_request_duration_seconds:p50_1m",
        "job_route:blink_request_duration_seconds:p95_1m",
        "job_route:blink_request_duration_seconds:p99_1m",
        "job_route:blink_requests:rate1m",  # throughput
        "blink_batch_size_bucket",  # batch size distribution
        "job:blink_batch_size:mean_1m",
        "blink_queue_depth",
        "job:blink_queue_wait_seconds:p99_1m",
        "job_reason:blink_rejections:rate1m",
        "blink_requests_in_flight",
        "blink_model_info",
        "blink_ready",
    ):
        assert needed in used, needed


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool absent (Debian: prometheus)")
def test_every_query_parses_as_promql(tmp_path):
    exprs = [expr for _, expr in queries(dashboard())]
    rules = [{"record": f"panel_{i}:query", "expr": expr} for i, expr in enumerate(exprs)]
    (tmp_path / "panels.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]})
    )
    result = subprocess.run(
        ["promtool", "check", "rules", str(tmp_path / "panels.yml")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_panels_have_unique_ids_and_do_not_overlap():
    board = dashboard()
    nested = [p for row in board["panels"] for p in row.get("panels", [])]
    ids = [p["id"] for p in board["panels"] + nested]
    assert len(ids) == len(set(ids))
    taken: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


def test_provisioning_matches_the_compose_file():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    sources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    (source,) = sources["datasources"]
    assert source["url"] == "http://prometheus:9090" and "prometheus" in compose
    assert source["type"] == "prometheus"
    # the dashboard refers to the provisioned data source by uid
    for panel in panels(dashboard()):
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == source["uid"], panel["title"]

    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/blink.yml").read_text())
    (provider,) = providers["providers"]
    mounts = dict(v.rsplit(":", 2)[:2] for v in compose["grafana"]["volumes"] if v.startswith("./"))
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning/datasources"].endswith("datasources")
    home = compose["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert Path(home).name == DASHBOARD.name and Path(home).parent == Path(
        provider["options"]["path"]
    )
    assert dashboard()["uid"] == "blink"
