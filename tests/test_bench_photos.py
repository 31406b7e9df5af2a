"""The photo benchmark runs end to end in quick mode and prints every table, filled.

Slow (under a minute): it makes real JPEG photos at three sizes, starts engine-ceiling
processes and two servers, and drives them with wrk. Its figures are not checked against any
threshold here; only that each was measured (positive) and that nothing failed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.onnx_models import write_bundle

ROOT = Path(__file__).resolve().parent.parent
SIZES = ("0.3MP", "2MP", "12MP")
CONFIGS = ("workers 1, threads 2", "workers 2, threads 1")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("wrk") is None or shutil.which("taskset") is None,
        reason="wrk (Debian: wrk) and taskset are needed",
    ),
]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    scratch = tmp_path_factory.mktemp("photos")
    model = write_bundle(scratch / "rgb" / "1", channels=3, size=32, extra_variants=("int8",))
    command = [sys.executable, "-m", "bench.photos", "--model", str(model), "--quick"]
    command += ["--cache", str(scratch / "cache"), "--out", str(scratch / "out")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (saved,) = (scratch / "out").glob("photos-*.json")
    return result.stdout, json.loads(saved.read_text())


def table_rows(text: str, header_start: str) -> list[list[str]]:
    """The body rows of the Markdown table whose header begins with `header_start`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_decode_table_has_every_size_with_and_without_dct_scaling(quick_run):
    text, results = quick_run
    rows = table_rows(text, "| photos |")
    assert [row[0] for row in rows] == list(SIZES)
    for label in SIZES:
        decode = results["decode"][label]
        assert decode["draft_ms"]["median"] > 0 and decode["full_ms"]["median"] > 0
        # all above the small-image limit; camera sizes decode on the loop only when alone
        alone = "event loop when alone, else decode pool"
        assert decode["where"] == ["decode pool" if label == "12MP" else alone]
        served = results["loop_by_size"][label]
        assert 0 < served["loop_cpu_us"]["median"] <= served["cpu_us"]["median"] * 1.1
    megapixels = [results["decode"][label]["megapixels"] for label in SIZES]
    assert megapixels == sorted(megapixels) and megapixels[0] < 0.5 < 10 < megapixels[-1]


def test_ceiling_table_has_fp32_and_int8_for_every_configuration(quick_run):
    text, results = quick_run
    rows = table_rows(text, "| configuration | variant | batch 1 |")
    assert {(row[0], row[1]) for row in rows} == {
        (config, variant) for config in CONFIGS for variant in ("fp32", "int8")
    }
    for by_config in results["ceilings"].values():
        for ceiling in by_config.values():
            assert ceiling["best"]["median"] > 0 and ceiling["model_b1_ms"] > 0
            assert ceiling["lone_b1_ms"] > 0
            assert 1 <= ceiling["cap"] <= 32
    for name, batching in results["batching"].items():
        # the served variant's ceiling is also measured at the batch cap the service chose
        served = results["ceilings"][batching["variant"]][name]
        assert str(batching["batch_cap"]) in served["batches"]


def test_served_table_has_every_configuration_and_concurrency_without_errors(quick_run):
    text, results = quick_run
    rows = table_rows(text, "| configuration | c |")
    assert {(row[0], row[1]) for row in rows} == {(c, n) for c in CONFIGS for n in ("1", "16")}
    for by_c in results["served"].values():
        for summary in by_c.values():
            assert summary["errors"] == 0
            assert summary["rps"]["median"] > 0 and summary["p50_us"]["median"] > 0
            assert summary["mean_batch"]["median"] >= 1
    for by_c in results["served"].values():  # c=16, the top here, against its own ceiling
        assert by_c["16"]["of_ceiling"]["min"] > 0 and "of_ceiling" not in by_c["1"]
    for batching in results["batching"].values():
        assert batching["policy"] == "measured" and batching["batch_cap"] >= 1


def test_lone_request_is_compared_with_the_same_work_without_http(quick_run):
    text, results = quick_run
    rows = table_rows(text, "| configuration | served p50 |")
    assert [row[0] for row in rows] == list(CONFIGS)
    for name in CONFIGS:
        c1 = results["served"][name]["1"]  # JSON keys are strings
        # the path without HTTP decodes a 2 MP photo and runs the model: milliseconds, not zero
        assert c1["no_http_ms"]["min"] > 1
        served = c1["p50_us"]["median"] / 1000
        assert c1["over_no_http_ms"]["min"] <= served - c1["no_http_ms"]["min"] + 1e-9


def test_targets_table_names_each_target(quick_run):
    text, _ = quick_run
    targets = [row[0] for row in table_rows(text, "| target |")]
    for config in CONFIGS:
        assert f"{config}: c=16 vs engine ceiling (int8)" in targets
        assert f"{config}: c=1 p50 over the same work without HTTP" in targets
        assert f"{config}: c=1 p50 vs its parts timed apart" in targets
        assert f"{config}: INT8 / fp32 engine throughput (model alone)" in targets
    assert "12MP decoded off the event loop" in targets
    photos = 7 * len(SIZES)
    assert f"INT8 top-1 agreement with fp32 on the photo set ({photos} JPEGs)" in targets
