"""A real Prometheus (Debian's `prometheus`) on loopback, scraping the service with the
repository's rules: for the tests and the fault campaign."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import httpx
import yaml

from loadtest.processes import free_port, stop_process

ROOT = Path(__file__).resolve().parent.parent
RULES_DIR = ROOT / "deploy" / "prometheus" / "rules"
RULES = sorted(RULES_DIR.glob("*.yml"))
T = TypeVar("T")


@contextlib.contextmanager
def prometheus_server(scratch: Path, target: str, rules: Sequence[Path] = RULES) -> Iterator[str]:
    """Prometheus scraping `target` (host:port) every second and evaluating `rules` every
    second; yields its URL once it is ready."""
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(path) for path in rules],
        "scrape_configs": [{"job_name": "blink", "static_configs": [{"targets": [target]}]}],
    }
    (scratch / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = (scratch / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={scratch / 'prometheus.yml'}",
            f"--storage.tsdb.path={scratch / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: ready(url), "prometheus ready", process, scratch / "prometheus.log")
        yield url
    finally:
        stop_process(process)
        log.close()


def ready(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(url + "/-/ready", timeout=1).status_code == 200
    return False


def wait_until(
    check: Callable[[], T],
    what: str,
    process: subprocess.Popen | None = None,
    log: Path | None = None,
    timeout: float = 60,
) -> T:
    """Poll `check` until it returns a truthy value; a generous bound, not a timing assertion."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"prometheus exited: {log.read_text() if log else ''}")
        result = check()
        if result:
            return result
        time.sleep(0.2)
    raise TimeoutError(f"no {what} after {timeout}s")


def alerts(url: str) -> list[dict]:
    """The alerts pending or firing now: labels and state."""
    body = httpx.get(url + "/api/v1/alerts", timeout=5).json()
    return body["data"]["alerts"]
