"""The documentation site builds with `mkdocs build --strict`, and its tables match the service."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
# the Material theme prints a notice about MkDocs 2 on every build
QUIET = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
METRIC_ROW = re.compile(r"^\| `(blink_[a-z_]+)(?:\{[^}]*\})?` \|", re.MULTILINE)


def test_site_builds_strict(tmp_path: Path) -> None:
    """Broken links, missing anchors and pages left out of the nav fail the build."""
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        env=QUIET,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "index.html").is_file()
    assert (tmp_path / "development" / "index.html").is_file()


def test_strict_build_fails_on_a_broken_link(tmp_path: Path) -> None:
    """The check can fail: the same configuration with one broken link does not build."""
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs)
    (docs / "index.md").write_text((docs / "index.md").read_text() + "\n[gone](no-such-page.md)\n")
    config = tmp_path / "mkdocs.yml"
    config.write_text((ROOT / "mkdocs.yml").read_text())
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-f",
            str(config),
            "-d",
            str(tmp_path / "site"),
        ],
        capture_output=True,
        env=QUIET,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "no-such-page.md" in done.stderr


async def test_metrics_table_names_exactly_what_the_service_exports(
    client: httpx.AsyncClient,
) -> None:
    await client.post("/classify", content=b"not an image", headers={"content-type": "image/png"})
    text = (await client.get("/metrics")).text
    exported = {f.name for f in text_string_to_metric_families(text) if f.name.startswith("blink_")}
    # counters are named without _total by the parser; the table writes the full name
    documented = {
        name.removesuffix("_total")
        for name in METRIC_ROW.findall((ROOT / "docs" / "configuration.md").read_text())
    }
    assert documented == exported
