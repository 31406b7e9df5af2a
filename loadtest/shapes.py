"""Step load: open-loop users added one a step until the p99 or the failure ratio breaks.

Each OpenLoopUser fires `--user-rate` requests/s, so step k offers k x user-rate requests/s
whatever the service's speed. At the end of each step the step's own client percentiles (Locust's
cumulative statistics, differenced) and the server's (/metrics, differenced) are recorded; the
first step whose p99 exceeds `--slo-p99-ms` or whose failure ratio exceeds
`--max-failure-ratio` ends the run. The last step inside both limits is the knee.

Use with the users: `locust -f loadtest/locustfile.py,loadtest/shapes.py OpenLoopUser ...`.
Single-process only (no --processes): steps are judged from this process's statistics.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from locust import LoadTestShape

from loadtest import promstats, report


class StepLoad(LoadTestShape):
    def __init__(self) -> None:
        super().__init__()
        self.reset_time()

    def reset_time(self) -> None:
        """Called by Locust as each test starts (the web UI may start several)."""
        super().reset_time()
        self.step = 0
        self.done = False
        self.steps: list[dict] = []
        self.mark: dict | None = None

    def tick(self) -> tuple[int, float] | None:
        options = self.runner.environment.parsed_options
        if self.mark is None:
            self.mark = self.snapshot()
        if self.done:
            return None
        if self.get_run_time() >= (self.step + 1) * options.step_time:
            self.close_step(options)
            self.step += 1
            if self.done or self.step >= options.max_steps:
                self.done = True
                return None
        users = self.step + 1
        return users, users  # spawn the step's new user at once

    def snapshot(self) -> dict:
        total = self.runner.stats.total
        try:
            server = promstats.scrape(self.runner.environment.host, timeout=5)
        except OSError:
            server = None
        return {
            "time": time.monotonic(),
            "requests": total.num_requests,
            "failures": total.num_failures,
            "times": dict(total.response_times),
            "server": server,
        }

    def close_step(self, options) -> None:
        mark, self.mark = self.mark, self.snapshot()
        result = step_result(mark, self.mark, self.step + 1, options.user_rate)
        p99 = result["client_ms"]["p99"]
        result["broken"] = (p99 is not None and p99 > options.slo_p99_ms) or (
            result["failure_ratio"] > options.max_failure_ratio
        )
        self.steps.append(result)
        self.done = result["broken"]
        if options.steps_file:  # after every step, so that an interrupted run keeps its steps
            Path(options.steps_file).write_text(json.dumps(self.steps, indent=2))


def step_result(before: dict, after: dict, users: int, user_rate: float) -> dict:
    seconds = after["time"] - before["time"]
    requests = after["requests"] - before["requests"]
    failures = after["failures"] - before["failures"]
    times = {
        ms: count - before["times"].get(ms, 0)
        for ms, count in after["times"].items()
        if count > before["times"].get(ms, 0)
    }
    result = {
        "users": users,
        "offered_rps": users * user_rate,
        "achieved_rps": requests / seconds if seconds > 0 else 0.0,
        "requests": requests,
        "failure_ratio": failures / requests if requests else 0.0,
        "client_ms": {f"p{q}": report.locust_percentile(times, q / 100) for q in (50, 95, 99)},
        "server_ms": None,
        "server_mean_batch_size": None,
    }
    if before["server"] is not None and after["server"] is not None:
        window = promstats.delta(after["server"], before["server"])
        duration = promstats.buckets(window, "blink_request_duration_seconds", route="/classify")
        result["server_ms"] = {
            f"p{q}": ms(promstats.quantile(q / 100, duration)) for q in (50, 95, 99)
        }
        result["server_mean_batch_size"] = promstats.mean(window, "blink_batch_size")
    return result


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000
