"""The figures of a load-test run (client and server side by side) and summary.md."""

from __future__ import annotations

import json
from pathlib import Path

from loadtest import promstats

ROUTE = "/classify"
SERVER_HISTOGRAMS = {
    "request": ("blink_request_duration_seconds", {"route": ROUTE}),
    "decode": ("blink_decode_duration_seconds", {}),
    "queue_wait": ("blink_queue_wait_seconds", {}),
    "inference": ("blink_inference_duration_seconds", {}),
}
QUANTILES = (0.5, 0.95, 0.99)


def locust_entries(stats_json: Path) -> list[dict]:
    """Locust's final per-name statistics (--json-file), plus an 'Aggregated' entry last.

    The JSON file is written after the last user stopped; Locust's CSV is rewritten once a second
    while it runs, so only the JSON is sure to hold every request.
    """
    raw = json.loads(stats_json.read_text())
    entries = [entry_figures(e["name"], [e]) for e in sorted(raw, key=lambda e: e["name"])]
    return [*entries, entry_figures("Aggregated", raw)]


def entry_figures(name: str, raw: list[dict]) -> dict:
    requests = sum(e["num_requests"] for e in raw)
    times: dict[int, int] = {}
    for e in raw:
        for ms, count in e["response_times"].items():
            times[int(float(ms))] = times.get(int(float(ms)), 0) + count
    start = min((e["start_time"] for e in raw), default=0.0)
    end = max((e["last_request_timestamp"] or 0.0 for e in raw), default=0.0)
    total_ms = sum(e["total_response_time"] for e in raw)
    return {
        "name": name,
        "requests": requests,
        "failures": sum(e["num_failures"] for e in raw),
        "rps": requests / (end - start) if end > start else None,
        "mean_ms": total_ms / requests if requests else None,
        "p50_ms": locust_percentile(times, 0.50),
        "p95_ms": locust_percentile(times, 0.95),
        "p99_ms": locust_percentile(times, 0.99),
        "max_ms": max((e["max_response_time"] or 0.0 for e in raw), default=None),
    }


def locust_percentile(times: dict[int, int], q: float) -> float | None:
    """Locust's own percentile of its {rounded ms: count} table, so the figures match its CSV."""
    count = sum(times.values())
    if not count:
        return None
    allowed_above, seen = int(count * q), 0
    for value in sorted(times, reverse=True):
        seen += times[value]
        if count - seen <= allowed_above:
            return float(value)
    return float(min(times))


def client_side(stats_json: Path, checks: dict | None) -> dict:
    entries = locust_entries(stats_json)
    total = entries[-1]
    requests = total["requests"]
    return {
        **total,
        "failure_ratio": total["failures"] / requests if requests else 0.0,
        "by_name": entries[:-1],
        "checks": checks,
    }


def server_window(scrapes: dict[str, dict]) -> dict | None:
    """The server's figures between the scrapes taken when the test started and stopped."""
    if set(scrapes) != {"start", "stop"}:
        return None
    before, after = (promstats.parse(scrapes[w]["text"]) for w in ("start", "stop"))
    return server_side(before, after, scrapes["stop"]["time"] - scrapes["start"]["time"])


def server_side(before: promstats.Samples, after: promstats.Samples, seconds: float) -> dict:
    window = promstats.delta(after, before)
    statuses = promstats.by_label(window, "blink_requests_total", "status", route=ROUTE)
    requests = sum(statuses.values())
    server: dict = {
        "requests": int(requests),
        "by_status": {k: int(v) for k, v in sorted(statuses.items()) if v},
        "rps": requests / seconds if seconds > 0 else None,
        "window_s": seconds,
    }
    for key, (histogram, match) in SERVER_HISTOGRAMS.items():
        cumulative = promstats.buckets(window, histogram, **match)
        server[f"{key}_ms"] = {
            f"p{round(q * 100)}": ms(promstats.quantile(q, cumulative)) for q in QUANTILES
        }
        server[f"{key}_ms"]["mean"] = ms(promstats.mean(window, histogram, **match))
    batch_buckets = promstats.buckets(window, "blink_batch_size")
    server["batches"] = int(promstats.total(window, "blink_batch_size_count"))
    server["mean_batch_size"] = promstats.mean(window, "blink_batch_size")
    server["batch_sizes"] = [
        {"from": low, "to": high, "batches": int(n)}
        for low, high, n in promstats.distribution(batch_buckets)
    ]
    rejections = promstats.by_label(window, "blink_rejections_total", "reason")
    server["rejections"] = {k: int(v) for k, v in sorted(rejections.items())}
    return server


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def knee(steps: list[dict]) -> dict | None:
    """The highest load that stayed inside both limits (the step before the first break)."""
    good = [s for s in steps if not s["broken"]]
    return max(good, key=lambda s: s["offered_rps"]) if good else None


# -- summary.md ----------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def markdown(summary: dict) -> str:
    client, server, model = summary["client"], summary["server"], summary["model"]
    lines = [
        f"# Load test: {summary['scenario_text']}",
        "",
        f"- started: {summary['started']} (UTC); run time {fmt(summary['run_s'], 0)} s",
        f"- target: {summary['target']}"
        + (" (started for this run)" if summary["server_started_here"] else ""),
        f"- model: {model['name']} {model['version']}, variant {model['variant']} on "
        f"{model['provider']}, max batch size {model['max_batch_size']}",
        f"- bodies: Fashion-MNIST test images as PNG and JPEG (28x28) and "
        f"{summary['big_share']:.0%} upscaled 512x512 JPEG",
        f"- command: `{summary['locust_command']}`",
        "",
        "## Client and server, same window",
        "",
        "Client: Locust's statistics (response time from send, or from the scheduled send in "
        "open loop, to the last byte). Server: `/metrics` deltas over the same window; "
        "percentiles interpolated from histogram bucket deltas as `histogram_quantile` does.",
        "",
        "| | client (Locust) | server (/metrics) |",
        "|---|---:|---:|",
        f"| requests | {client['requests']:,} | {server['requests']:,} "
        f"({'same count' if summary['requests_match'] else 'counts differ'}) |",
        f"| failures | {client['failures']:,} ({client['failure_ratio']:.2%}) | "
        f"non-200: {sum(v for k, v in server['by_status'].items() if k != '200'):,} |",
        f"| throughput (req/s) | {fmt(client['rps'])} | {fmt(server['rps'])} |",
    ]
    for q in ("p50", "p95", "p99"):
        client_ms, server_ms = client[q + "_ms"], server["request_ms"][q]
        lines.append(f"| {q} latency (ms) | {fmt(client_ms, 0)} | {fmt(server_ms, 2)} |")
    lines += [
        f"| max latency (ms) | {fmt(client['max_ms'], 0)} | — |",
        "",
        "Locust rounds response times to whole milliseconds; the server's histogram resolves "
        "10 µs. Both sides count the same window: /metrics is scraped when Locust starts the "
        "test and again once its last user has stopped.",
        "",
        "## Inside the server",
        "",
        "| stage | p50 (ms) | p95 (ms) | p99 (ms) | mean (ms) |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, title in (
        ("request", "request (end to end)"),
        ("decode", "decode + preprocess"),
        ("queue_wait", "queue wait"),
        ("inference", "inference (per batch)"),
    ):
        row = server[f"{key}_ms"]
        lines.append(
            f"| {title} | {fmt(row['p50'], 3)} | {fmt(row['p95'], 3)} | {fmt(row['p99'], 3)} | "
            f"{fmt(row['mean'], 3)} |"
        )
    rejections = ", ".join(f"{k} {v:,}" for k, v in server["rejections"].items())
    statuses = ", ".join(f"{k}: {v:,}" for k, v in server["by_status"].items()) or "none"
    lines += [
        "",
        f"- batches: {server['batches']:,}, mean batch size "
        f"{fmt(server['mean_batch_size'], 2)} (distribution: batch_sizes.png)",
        f"- answers by status: {statuses}",
        f"- rejections by reason: {rejections or 'none'}",
        "",
    ]
    lines += accuracy_lines(client["checks"], model)
    lines += per_name_lines(client["by_name"])
    if summary.get("steps"):
        lines += step_lines(summary)
    lines += [
        "## Files",
        "",
        *(f"- {name}" for name in summary["files"]),
        "",
    ]
    return "\n".join(lines)


def accuracy_lines(checks: dict | None, model: dict) -> list[str]:
    lines = ["## Accuracy seen by the clients", ""]
    if not checks or not checks["checked"]:
        return [*lines, "No valid answers were checked.", ""]
    lines.append(
        f"Top-1 label matched the ground truth in {checks['top1_correct']:,} of "
        f"{checks['checked']:,} valid answers: **{checks['top1_accuracy']:.2%}**."
    )
    for kind, counts in sorted(checks["by_kind"].items()):
        lines.append(
            f"- {kind}: {counts['correct'] / counts['checked']:.2%} of {counts['checked']:,}"
        )
    built = (model.get("metrics") or {}).get(model["variant"], {}).get("accuracy")
    if built is not None:
        lines.append(f"- the build measured {built:.2%} for this variant on the whole test set")
    lag = checks.get("schedule_lag_ms")
    if lag:
        lines.append(
            f"- open-loop schedule lag (send time minus scheduled time, counted in the response "
            f"times): p50 {lag['p50']:.2f} ms, p99 {lag['p99']:.2f} ms, max {lag['max']:.1f} ms"
        )
    return [*lines, ""]


def per_name_lines(rows: list[dict]) -> list[str]:
    lines = [
        "## By body kind (client)",
        "",
        "| request | requests | failures | req/s | p50 | p95 | p99 | max (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['requests']:,} | {r['failures']:,} | {fmt(r['rps'])} | "
            f"{fmt(r['p50_ms'], 0)} | {fmt(r['p95_ms'], 0)} | {fmt(r['p99_ms'], 0)} | "
            f"{fmt(r['max_ms'], 0)} |"
        )
    return [*lines, ""]


def step_lines(summary: dict) -> list[str]:
    limits = summary["limits"]
    lines = [
        "## Step load",
        "",
        f"Open-loop steps of {fmt(summary['step_rate'], 0)} req/s every "
        f"{fmt(summary['step_time_s'], 0)} s, until client p99 > {fmt(limits['p99_ms'], 0)} ms "
        f"or failures > {limits['failure_ratio']:.1%} (plot: latency_vs_load.png).",
        "",
        "| offered (req/s) | achieved (req/s) | failures | client p50 | p95 | p99 (ms) "
        "| server p50 | p99 (ms) | mean batch | |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in summary["steps"]:
        server = s["server_ms"] or {}
        lines.append(
            f"| {fmt(s['offered_rps'], 0)} | {fmt(s['achieved_rps'], 0)} | "
            f"{s['failure_ratio']:.2%} | {fmt(s['client_ms']['p50'], 0)} | "
            f"{fmt(s['client_ms']['p95'], 0)} | {fmt(s['client_ms']['p99'], 0)} | "
            f"{fmt(server.get('p50'), 2)} | {fmt(server.get('p99'), 2)} | "
            f"{fmt(s['server_mean_batch_size'], 2)} | {'**broke**' if s['broken'] else ''} |"
        )
    best = summary["knee"]
    broke = summary["steps"][-1]["broken"]
    if best is None:
        verdict = "The first step already broke a limit: the knee is below it."
    elif broke:
        verdict = (
            f"**Knee: about {fmt(best['offered_rps'], 0)} req/s** (the last step inside both "
            f"limits; client p99 {fmt(best['client_ms']['p99'], 0)} ms)."
        )
    else:
        verdict = (
            f"No step broke a limit: the knee is above {fmt(best['offered_rps'], 0)} req/s "
            "(raise --max-steps or --step-rate)."
        )
    return [*lines, "", verdict, ""]
