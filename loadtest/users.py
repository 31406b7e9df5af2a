"""Locust users that classify Fashion-MNIST test images and check every answer.

ClosedLoopUser: each user sends its next request as soon as the last one is answered, so the
    offered load follows the service's speed.
OpenLoopUser: each user fires requests on a fixed schedule (`--user-rate` per second), each in its
    own greenlet, whatever the state of earlier ones: a slow answer does not delay the next
    request. Response times are counted from the scheduled send time, so a late load generator
    adds to them instead of hiding the wait (no coordinated omission).

Every answer must be 200 with a top label from the served model's /v1/models; top-1 matches
against the ground truth are counted and written to `--results-file` when the test stops, with
the service's /metrics as scraped when the test started and stopped.
"""

from __future__ import annotations

import json
import logging
import random
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import gevent.pool
from locust import FastHttpUser, events, task
from locust.env import Environment
from locust.stats import CSV_STATS_INTERVAL_SEC

from loadtest.images import Body, BodyPicker, DatasetMissing, make_bodies

log = logging.getLogger("blink.loadtest")


@events.init_command_line_parser.add_listener
def add_options(parser) -> None:
    group = parser.add_argument_group("Blink")
    group.add_argument("--user-rate", type=float, default=10.0, help="open loop: requests/s a user")
    group.add_argument("--big-share", type=float, default=0.1, help="share of 512x512 JPEG bodies")
    group.add_argument("--results-file", default="", help="write client-side checks (JSON) here")
    group.add_argument("--steps-file", default="", help="step shape: write per-step results here")
    group.add_argument("--step-time", type=float, default=10.0, help="step shape: seconds a step")
    group.add_argument("--max-steps", type=int, default=30, help="step shape: last step")
    group.add_argument("--slo-p99-ms", type=float, default=100.0, help="step shape: p99 limit")
    group.add_argument(
        "--max-failure-ratio", type=float, default=0.01, help="step shape: failure limit"
    )


@dataclass
class ClientChecks:
    """What the clients saw beyond Locust's own statistics."""

    labels: list[str] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)  # valid answers per body kind
    correct: dict[str, int] = field(default_factory=dict)  # top-1 == ground truth, per kind
    lags_ms: list[float] = field(default_factory=list)  # open loop: send time - scheduled time
    # /metrics at test start and stop: the server's view of exactly the load window
    scrapes: dict[str, dict] = field(default_factory=dict)

    def verdict(self, body: Body, answer: dict) -> str | None:
        """None for a valid answer (counting its top-1 match), else why it is wrong."""
        try:
            top = answer["predictions"][0]
            label, index = top["label"], top["index"]
        except (KeyError, IndexError, TypeError):
            return f"no predictions in {str(answer)[:200]}"
        if not 0 <= index < len(self.labels) or self.labels[index] != label:
            return f"label {label!r} (index {index}) is not one of the model's labels"
        self.checked[body.kind] = self.checked.get(body.kind, 0) + 1
        self.correct[body.kind] = self.correct.get(body.kind, 0) + (index == body.truth)
        return None

    def summary(self) -> dict:
        checked, correct = sum(self.checked.values()), sum(self.correct.values())
        lags = sorted(self.lags_ms)
        return {
            "checked": checked,
            "top1_correct": correct,
            "top1_accuracy": correct / checked if checked else None,
            "by_kind": {
                kind: {"checked": n, "correct": self.correct[kind]}
                for kind, n in self.checked.items()
            },
            "schedule_lag_ms": {
                "p50": lags[len(lags) // 2],
                "p99": lags[min(len(lags) - 1, int(len(lags) * 0.99))],
                "max": lags[-1],
            }
            if lags
            else None,
            "server_scrapes": self.scrapes,
        }

    def scrape(self, host: str, when: str) -> None:
        try:
            with urllib.request.urlopen(host.rstrip("/") + "/metrics", timeout=10) as response:
                text = response.read().decode()
        except OSError as exc:
            log.warning("no /metrics at test %s: %s", when, exc)
            return
        self.scrapes[when] = {"time": time.time(), "text": text}


CHECKS = ClientChecks()
PICK: BodyPicker | None = None


@events.init.add_listener
def load_bodies(environment: Environment, **_) -> None:
    global PICK
    try:
        bodies = make_bodies()
    except DatasetMissing as exc:
        log.error("%s", exc)
        raise SystemExit(2) from exc
    PICK = BodyPicker(bodies, environment.parsed_options.big_share)


@events.test_start.add_listener
def start(environment: Environment, **_) -> None:
    global CHECKS
    CHECKS = ClientChecks()  # Locust clears its statistics for each test: so do these
    url = environment.host.rstrip("/") + "/v1/models"
    with urllib.request.urlopen(url, timeout=30) as response:
        CHECKS.labels = json.load(response)["models"][0]["labels"]
    CHECKS.scrape(environment.host, "start")  # before the first user starts


@events.test_stop.add_listener
def write_results(environment: Environment, **_) -> None:
    CHECKS.scrape(environment.host, "stop")  # after the last user (and its answers) stopped
    summary = CHECKS.summary()
    log.info(
        "client checks: %d valid answers, top-1 accuracy %s",
        summary["checked"],
        summary["top1_accuracy"],
    )
    if environment.parsed_options.results_file:
        Path(environment.parsed_options.results_file).write_text(json.dumps(summary, indent=2))


@events.quitting.add_listener
def let_csv_catch_up(**_) -> None:
    # Locust rewrites its CSV files once a second and not again at exit: give it one more pass
    # now that every user has stopped, so the CSV holds the same final counts as the JSON/HTML.
    gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.2)


class BlinkUser(FastHttpUser):
    abstract = True

    def classify(self, body: Body, lag_s: float = 0.0) -> None:
        with self.client.post(
            "/classify",
            data=body.data,
            headers={"Content-Type": body.content_type},
            name=f"/classify [{body.kind}]",
            catch_response=True,
        ) as response:
            response.request_meta["response_time"] += lag_s * 1000
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {(response.text or '')[:200]}")
                return
            try:
                problem = CHECKS.verdict(body, response.json())
            except ValueError:
                problem = "not JSON"
            if problem:
                response.failure(problem)
            else:
                response.success()


class ClosedLoopUser(BlinkUser):
    """Back-to-back requests, no think time."""

    def wait_time(self) -> float:
        return 0.0

    @task
    def classify_one(self) -> None:
        self.classify(PICK())


class OpenLoopUser(BlinkUser):
    """Requests at a fixed rate, each on its own greenlet: arrivals do not wait for answers."""

    # Connections this user may hold open at once; beyond them requests queue in the client,
    # where the schedule-based response time still counts the wait.
    concurrency = 256

    def on_start(self) -> None:
        self.interval = 1.0 / self.environment.parsed_options.user_rate
        # Users started together would fire together: spread their phases over one interval.
        self.next_due = time.perf_counter() + self.interval * random.random()
        self.pending = gevent.pool.Group()

    def wait_time(self) -> float:
        return max(0.0, self.next_due - time.perf_counter())

    @task
    def fire(self) -> None:
        due, self.next_due = self.next_due, self.next_due + self.interval
        self.pending.spawn(self.scheduled, PICK(), due)

    def scheduled(self, body: Body, due: float) -> None:
        lag_s = max(0.0, time.perf_counter() - due)
        CHECKS.lags_ms.append(lag_s * 1000)
        self.classify(body, lag_s)

    def on_stop(self) -> None:
        # Answers still on their way count: they are requests the service received.
        self.pending.join()
