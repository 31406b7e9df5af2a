"""Run a load-test scenario headless and write a report.

    python -m loadtest.run --scenario closed --duration 30s --users 8
    python -m loadtest.run --scenario open --rate 300 --duration 1m
    python -m loadtest.run --scenario step --step-rate 50 --step-time 10s --slo-p99-ms 100
    python -m loadtest.run --url http://127.0.0.1:8000 ...      # an already running service

Without --url it starts `blink serve` on a free loopback port (--model, default
models/repository/fashion-mnist) and stops it afterwards. Locust runs as a subprocess and scrapes
/metrics when its test starts and stops (loadtest/users.py). The report goes to
loadtest/reports/<timestamp>/: summary.md and summary.json, Locust's HTML, JSON and CSV files, the
/metrics scrapes, the server log, and PNG plots.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from loadtest import plots, report
from loadtest.images import DatasetMissing, dataset_files
from loadtest.processes import free_port, stop_process

ROOT = Path(__file__).resolve().parent.parent
REPORTS = ROOT / "loadtest" / "reports"
DEFAULT_MODEL = ROOT / "models" / "repository" / "fashion-mnist"
OPEN_LOOP_USER_RATE = 100.0  # requests/s one open-loop user fires at most; more users beyond it


def seconds(text: str) -> float:
    """'30s', '2m', '1m30s', '1h' or a bare number of seconds."""
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 30s, 2m, 1m30s)")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.run", description="Headless Locust run with a report."
    )
    p.add_argument("--scenario", choices=["closed", "open", "step"], default="closed")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--url", help="a running service (default: start one here)")
    target.add_argument("--model", type=Path, help=f"bundle to serve (default {DEFAULT_MODEL})")
    p.add_argument("--workers", type=int, help="uvicorn workers of the started service")
    p.add_argument(
        "--duration", type=seconds, help="run time (default 30s; step: upper bound, default 5m)"
    )
    p.add_argument("--users", type=int, help="closed: users (default 8); open: default rate/100")
    p.add_argument("--rate", type=float, default=200.0, help="open: requests/s (default 200)")
    p.add_argument("--step-rate", type=float, default=50.0, help="step: req/s added each step")
    p.add_argument("--step-time", type=seconds, default=10.0, help="step: length of a step")
    p.add_argument("--slo-p99-ms", type=float, default=100.0, help="step: p99 limit (ms)")
    p.add_argument("--max-failure-ratio", type=float, default=0.01, help="step: failure limit")
    p.add_argument("--big-share", type=float, default=0.1, help="share of 512x512 JPEG bodies")
    p.add_argument("--out", type=Path, help="report directory (default loadtest/reports/<UTC>)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.duration = args.duration or (300.0 if args.scenario == "step" else 30.0)
    try:
        dataset_files()
    except DatasetMissing as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 2
    model = args.model or DEFAULT_MODEL
    if not args.url and not model.exists():
        print(
            f"loadtest: no model at {model}: build one (blink build), or pass --model or --url",
            file=sys.stderr,
        )
        return 2
    out = report_dir(args.out)
    started = datetime.now(UTC)
    with target(args.url, model, args.workers, out) as url:
        model_info = fetch_json(url + "/v1/models")["models"][0]
        command, code = run_locust(args, url, out)
    if not (out / "locust.json").exists() or not (out / "client.json").exists():
        print(f"loadtest: locust failed (exit {code}); see {out / 'locust.log'}", file=sys.stderr)
        return code or 1
    summary = summarize(args, url, model_info, command, started, out)
    print(f"report: {out / 'summary.md'}")
    client, server = summary["client"], summary["server"]
    print(
        f"{client['requests']} requests ({client['failures']} failed), "
        f"{report.fmt(client['rps'])} req/s, p99 {report.fmt(client['p99_ms'], 0)} ms client / "
        f"{report.fmt(server['request_ms']['p99'], 2)} ms server; server counted "
        f"{server['requests']}"
    )
    if args.scenario == "step":
        return 0  # failures at the last step are how the run ends
    return 0 if client["failures"] == 0 and summary["requests_match"] else 1


def report_dir(out: Path | None) -> Path:
    if out is None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        out = REPORTS / stamp
        n = 1
        while out.exists():  # two runs within a second
            n += 1
            out = REPORTS / f"{stamp}-{n}"
    out.mkdir(parents=True, exist_ok=True)
    return out


@contextlib.contextmanager
def target(url: str | None, model: Path, workers: int | None, out: Path) -> Iterator[str]:
    if url:
        yield url.rstrip("/")
        return
    port = free_port()
    command = [sys.executable, "-m", "app", "serve", "--model", str(model)]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    if workers:
        command += ["--workers", str(workers)]
    with (out / "server.log").open("wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base, process, out / "server.log")
            yield base
        finally:
            stop_process(process)


def wait_ready(base: str, process: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    """Until /readyz says 200 (warm-up on a GPU can take minutes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"loadtest: the service exited ({process.returncode}); see {log}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(base + "/readyz", timeout=2) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.1)
    raise SystemExit(f"loadtest: the service was not ready after {timeout:.0f}s; see {log}")


def fetch_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def users_and_rate(args: argparse.Namespace) -> tuple[int, float]:
    """Open loop: users, and requests/s each, that add up to --rate."""
    users = args.users or max(1, math.ceil(args.rate / OPEN_LOOP_USER_RATE))
    return users, args.rate / users


def locust_command(args: argparse.Namespace, url: str, out: Path) -> list[str]:
    files = "loadtest/locustfile.py" + (",loadtest/shapes.py" if args.scenario == "step" else "")
    command = [sys.executable, "-m", "locust", "-f", files, "--headless", "--host", url]
    command += ["-t", f"{args.duration:g}s", "--stop-timeout", "60", "--exit-code-on-error", "0"]
    # JSON: the final statistics; CSV and HTML: Locust's own report files
    command += ["--json-file", str(out / "locust"), "--html", str(out / "locust.html")]
    command += ["--csv", str(out / "locust"), "--csv-full-history"]
    command += ["--logfile", str(out / "locust.log"), "--loglevel", "INFO", "--only-summary"]
    command += ["--results-file", str(out / "client.json"), "--big-share", str(args.big_share)]
    if args.scenario == "closed":
        users = args.users or 8
        command += ["-u", str(users), "-r", str(users), "ClosedLoopUser"]
    elif args.scenario == "open":
        users, rate = users_and_rate(args)
        command += ["-u", str(users), "-r", str(users), "OpenLoopUser", "--user-rate", f"{rate:g}"]
    else:
        command += ["OpenLoopUser", "--user-rate", f"{args.step_rate:g}"]
        command += ["--step-time", f"{args.step_time:g}", "--steps-file", str(out / "steps.json")]
        command += ["--max-steps", str(max(1, int(args.duration // args.step_time)))]
        command += ["--slo-p99-ms", f"{args.slo_p99_ms:g}"]
        command += ["--max-failure-ratio", f"{args.max_failure_ratio:g}"]
    return command


def run_locust(args: argparse.Namespace, url: str, out: Path) -> tuple[list[str], int]:
    command = locust_command(args, url, out)
    with (out / "locust.out").open("wb") as log:
        result = subprocess.run(
            command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=args.duration + 300
        )
    return command, result.returncode


def scenario_text(args: argparse.Namespace) -> str:
    if args.scenario == "closed":
        return f"closed loop, {args.users or 8} users without think time, {args.duration:g} s"
    if args.scenario == "open":
        users, rate = users_and_rate(args)
        return (
            f"open loop at {args.rate:g} req/s ({users} users x {rate:g} req/s), "
            f"{args.duration:g} s"
        )
    return f"step load, +{args.step_rate:g} req/s every {args.step_time:g} s (open loop)"


def summarize(
    args: argparse.Namespace,
    url: str,
    model_info: dict,
    command: list[str],
    started: datetime,
    out: Path,
) -> dict:
    checks = json.loads((out / "client.json").read_text())
    scrapes = checks.pop("server_scrapes")
    for when, scrape in scrapes.items():  # kept beside the report, as scraped
        (out / f"metrics_{when}.prom").write_text(scrape["text"])
    (out / "client.json").write_text(json.dumps(checks, indent=2))
    client = report.client_side(out / "locust.json", checks)
    server = report.server_window(scrapes)
    if server is None:
        raise SystemExit(f"loadtest: /metrics could not be scraped; see {out / 'locust.log'}")
    steps_file = out / "steps.json"
    steps = json.loads(steps_file.read_text()) if steps_file.exists() else None
    shown = [Path(command[0]).name if c == sys.executable else c for c in command]
    summary = {
        "scenario": args.scenario,
        "scenario_text": scenario_text(args),
        "started": started.strftime("%Y-%m-%d %H:%M:%S"),
        "run_s": server["window_s"],
        "target": url,
        "server_started_here": not args.url,
        "model": model_info,
        "big_share": args.big_share,
        "locust_command": shlex.join(shown).replace(str(out), "<report>"),
        "client": client,
        "server": server,
        "requests_match": client["requests"] == server["requests"],
        "steps": steps,
        "knee": report.knee(steps) if steps else None,
        "limits": {"p99_ms": args.slo_p99_ms, "failure_ratio": args.max_failure_ratio},
        "step_rate": args.step_rate,
        "step_time_s": args.step_time,
    }
    made = [
        plots.batch_sizes(summary, out / "batch_sizes.png"),
        plots.latency_vs_load(summary, out / "latency_vs_load.png"),
        plots.latency_over_time(out / "locust_stats_history.csv", out / "latency_over_time.png"),
    ]
    summary["plots"] = [p.name for p in made if p is not None]
    summary["files"] = sorted(
        {p.name for p in out.iterdir() if p.is_file()} | {"summary.md", "summary.json"}
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(report.markdown(summary))
    return summary


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
