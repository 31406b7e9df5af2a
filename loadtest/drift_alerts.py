"""The drift alerts end to end: a real server, a real Prometheus evaluating the repository's
alert rules, and three kinds of traffic at once.

One bundle (with a `reference`) is served three times from one repository, under three names,
each sent its own traffic for the whole run:

- `steady`: Fashion-MNIST test images, the distribution the reference was measured on; no
  drift alert may go pending or fire;
- `one-class`: test images of one class only; `BlinkClassMixDrift` must fire;
- `unseen`: uniform noise, images unlike any the model was trained on;
  `BlinkConfidenceDrift` must fire.

`drift_rules` writes the drift alerts of deploy/prometheus/rules/alerts.yml, optionally with
their durations scaled down (the test's minute instead of the fault campaign's ten).
"""

from __future__ import annotations

import contextlib
import io
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import yaml
from PIL import Image

from loadtest.images import load_test_set
from loadtest.prometheus import RULES_DIR, alerts

DRIFT_ALERTS = ("BlinkClassMixDrift", "BlinkConfidenceDrift", "BlinkLowConfidenceSurge")
# Which alert each traffic must raise (None: none may).
EXPECTED: dict[str, str | None] = {
    "steady": None,
    "one-class": "BlinkClassMixDrift",
    "unseen": "BlinkConfidenceDrift",
}
ONE_CLASS = 1  # Fashion-MNIST's "Trouser"
POLL_S = 1.0


def drift_rules(scratch: Path, scale_to_s: float | None = None) -> Path:
    """The drift alerts of the repository's rules, in a file of their own; with `scale_to_s`,
    their `for:` set to it and their rate windows to twice it."""
    source = yaml.safe_load((RULES_DIR / "alerts.yml").read_text())
    rules = [r for g in source["groups"] for r in g["rules"] if r.get("alert") in DRIFT_ALERTS]
    assert {r["alert"] for r in rules} == set(DRIFT_ALERTS), "a drift alert is missing"
    if scale_to_s is not None:
        for rule in rules:
            rule["for"] = f"{scale_to_s:g}s"
            rule["expr"] = rule["expr"].replace("[5m]", f"[{2 * scale_to_s:g}s]")
    path = scratch / "drift-alerts.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "drift", "rules": rules}]}))
    return path


def serve_three_ways(bundle_source: Path, repository: Path) -> Path:
    """A repository serving `bundle_source` (a bundle, or <repository>/<name>) as each of
    the three models, through symlinks."""
    repository.mkdir(parents=True, exist_ok=True)
    for name in EXPECTED:
        link = repository / name
        if not link.exists():
            link.symlink_to(bundle_source.resolve(), target_is_directory=True)
    return repository


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels, "L").save(out, "PNG")
    return out.getvalue()


def traffic_bodies(count: int = 2000, seed: int = 0) -> dict[str, list[bytes]]:
    """PNG bodies of each traffic kind."""
    images, labels = load_test_set(10_000)
    rng = np.random.default_rng(seed)
    sample = rng.choice(len(images), count, replace=False)
    one_class = np.flatnonzero(labels == ONE_CLASS)[:count]
    noise = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
    return {
        "steady": [png(images[i]) for i in sample],
        "one-class": [png(images[i]) for i in one_class],
        "unseen": [png(pixels) for pixels in noise],
    }


@dataclass
class DriftRun:
    seconds: float = 0.0
    requests: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    # (model, alert) -> seconds from the start of traffic to the first time seen in that state
    pending: dict[tuple[str, str], float] = field(default_factory=dict)
    firing: dict[tuple[str, str], float] = field(default_factory=dict)

    def fired(self, model: str, alert: str) -> float | None:
        return self.firing.get((model, alert))

    def raised(self, model: str) -> list[str]:
        """Every drift alert that went pending or fired for `model`."""
        return sorted({a for (m, a) in [*self.pending, *self.firing] if m == model})


def send(url: str, model: str, bodies: list[bytes], stop: threading.Event, run: DriftRun) -> None:
    """Requests one after another, in a shuffled cycle, until `stop`."""
    order = list(range(len(bodies)))
    random.Random(model).shuffle(order)
    sent = failed = 0
    with httpx.Client(base_url=url, timeout=30) as client:
        while not stop.is_set():
            body = bodies[order[sent % len(order)]]
            try:
                answer = client.post(
                    f"/models/{model}/classify",
                    content=body,
                    headers={"content-type": "image/png"},
                )
                failed += answer.status_code != 200
            except httpx.HTTPError:
                failed += 1
            sent += 1
    run.requests[model], run.failed[model] = sent, failed


def watch_alerts(
    url: str,
    prometheus: str,
    bodies: dict[str, list[bytes]],
    seconds: float,
    stop_early: bool = False,
) -> DriftRun:
    """Send each traffic to its model for `seconds` while recording when each drift alert
    went pending and fired; with `stop_early`, stop once every expected alert fired."""
    run = DriftRun()
    stop = threading.Event()
    threads = [
        threading.Thread(target=send, args=(url, model, bodies[model], stop, run), daemon=True)
        for model in EXPECTED
    ]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    try:
        while (elapsed := time.monotonic() - started) < seconds:
            with contextlib.suppress(httpx.HTTPError):
                for alert in alerts(prometheus):
                    labels = alert["labels"]
                    if labels.get("alertname") not in DRIFT_ALERTS:
                        continue
                    key = (labels.get("model", ""), labels["alertname"])
                    seen = run.firing if alert["state"] == "firing" else run.pending
                    seen.setdefault(key, elapsed)
            if stop_early and all(
                run.fired(model, alert) is not None
                for model, alert in EXPECTED.items()
                if alert is not None
            ):
                break
            time.sleep(POLL_S)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    run.seconds = time.monotonic() - started
    return run
