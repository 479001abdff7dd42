"""Draw the Grafana dashboard's main panels (deploy/grafana/orderflow.json) from a bench run's scraped samples.

    .venv/bin/python scripts/plot_metrics.py var/metrics.json -o docs/img/metrics-dashboard.png

The input is `bench_orders --spawn --metrics-out FILE`'s JSON (bench/observe.py):
every process group's exporter scraped once per interval. Each panel computes
what the dashboard's query computes, over the scrapes instead of Prometheus:
a counter's rate over a sliding window (``--window`` seconds, the dashboard's
``$__rate_interval``), a histogram's quantile as ``histogram_quantile`` does it
(linear within the bucket, summed over the groups), a gauge as read. The
measured saga (between the run's "saga" and "end" marks) is shaded; the
warm-up and the floor come before it. The bench runs no beat, so the
sweeper's panel is left out.
"""

import argparse
import gzip
import json
import math
from collections import defaultdict
from pathlib import Path

Rounds = list[tuple[float, dict[str, list]]]  # (time, group -> samples) per scrape round


def rounds(document: dict) -> Rounds:
    """The scrapes as rounds (every group once each), a failed scrape replaced by the group's previous one."""
    groups = list(document["endpoints"])
    scrapes = document["scrapes"]
    last: dict[str, list] = {group: [] for group in groups}
    found: Rounds = []
    for start in range(0, len(scrapes) - len(groups) + 1, len(groups)):
        batch = scrapes[start : start + len(groups)]
        for scrape in batch:
            if "samples" in scrape:
                last[scrape["group"]] = scrape["samples"]
        found.append((batch[0]["t"], dict(last)))
    return found


def summed(samples_by_group: dict[str, list], name: str, by: tuple[str, ...] = (), **match: str) -> dict[tuple, float]:
    """`name`'s samples whose labels include `match`, summed over groups and grouped by the `by` labels."""
    totals: dict[tuple, float] = defaultdict(float)
    for samples in samples_by_group.values():
        for sample, labels, value in samples:
            if sample == name and all(labels.get(k) == v for k, v in match.items()):
                totals[tuple(labels.get(label, "") for label in by)] += value
    return totals


def rate(data: Rounds, name: str, window: float, by: tuple[str, ...] = (), **match: str):
    """Per key of `by`: times and the counter's increase per second over the last `window` seconds."""
    values = [(t, summed(groups, name, by, **match)) for t, groups in data]
    keys = sorted({key for _, row in values for key in row})
    series = {}
    for key in keys:
        times, rates = [], []
        start = 0
        for i, (t, row) in enumerate(values):
            while values[start][0] < t - window:
                start += 1
            if start == i:
                continue
            t0, row0 = values[start]
            times.append(t)
            rates.append((row.get(key, 0.0) - row0.get(key, 0.0)) / (t - t0))
        series[key] = (times, rates)
    return series


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus's histogram_quantile over cumulative bucket counts {upper bound: count}; None without any."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if math.isinf(bound):
                return lower  # the highest finite bound, as Prometheus answers
            return lower + (bound - lower) * (rank - below) / max(buckets[bound] - below, 1e-12)
        lower, below = bound, buckets[bound]
    return lower


def quantiles(data: Rounds, q: float, name: str, window: float, by: tuple[str, ...] = (), **match: str):
    """Per key of `by`: times and the q-quantile of the histogram `name` over the last `window` seconds."""
    values = [(t, summed(groups, f"{name}_bucket", (*by, "le"), **match)) for t, groups in data]
    keys = sorted({key[:-1] for _, row in values for key in row})
    series = {}
    for key in keys:
        times, points = [], []
        start = 0
        for i, (t, row) in enumerate(values):
            while values[start][0] < t - window:
                start += 1
            if start == i:
                continue
            _, row0 = values[start]
            deltas = {float(bucket[-1]): row[bucket] - row0.get(bucket, 0.0) for bucket in row if bucket[:-1] == key}
            value = quantile(q, deltas)
            if value is not None:
                times.append(t)
                points.append(value)
        series[key] = (times, points)
    return series


def gauge(data: Rounds, name: str, by: tuple[str, ...] = ()):
    values = [(t, summed(groups, name, by)) for t, groups in data]
    keys = sorted({key for _, row in values for key in row})
    return {key: ([t for t, _ in values], [row.get(key, math.nan) for _, row in values]) for key in keys}


def draw(document: dict, output: Path, window: float) -> None:
    # Here, not at the top: the computations above are tested where matplotlib is not installed.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after the backend is chosen

    data = rounds(document)
    if len(data) < 2:
        raise SystemExit("fewer than two scrape rounds: nothing to draw")
    t0 = data[0][0]
    phases = {phase["name"]: phase["t"] - t0 for phase in document.get("phases", [])}
    figure, axes = plt.subplots(4, 2, figsize=(14, 15), sharex=True)
    panels = iter(axes.flat)

    def plot(ax, series, label, *, scale=1.0, style="-"):
        for key, (times, values) in series.items():
            name = label.format(*key) if key else label
            ax.plot([t - t0 for t in times], [v * scale for v in values], style, label=name, linewidth=1.2)

    def finish(ax, title, unit):
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit)
        if "saga" in phases and "end" in phases:
            ax.axvspan(phases["saga"], phases["end"], color="tab:green", alpha=0.08)
        for name in ("warmup", "floor", "saga"):
            if name in phases:
                ax.axvline(phases[name], color="grey", linewidth=0.6, linestyle=":")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper right")

    ax = next(panels)
    plot(ax, rate(data, "orderflow_orders_placed_total", window), "placed")
    plot(ax, rate(data, "orderflow_orders_confirmed_total", window), "confirmed")
    plot(ax, rate(data, "orderflow_orders_cancelled_total", window, ("cause",)), "cancelled: {}")
    finish(ax, "Orders placed, confirmed, cancelled by cause", "orders/s")

    ax = next(panels)
    for q in (0.5, 0.95, 0.99):
        plot(ax, quantiles(data, q, "orderflow_order_confirmed_latency_seconds", window), f"→confirmed p{q * 100:g}")
    cancelled = "orderflow_order_cancelled_latency_seconds"
    plot(ax, quantiles(data, 0.5, cancelled, window, ("cause",)), "→cancelled p50 {}", style="--")
    finish(ax, "Commit → confirmed / cancelled", "seconds")

    ax = next(panels)
    plot(ax, rate(data, "orderflow_saga_task_runs_total", window, ("task",)), "{}")
    finish(ax, "Saga task runs by task (every outcome)", "runs/s")

    ax = next(panels)
    steps = quantiles(data, 0.95, "orderflow_saga_task_duration_seconds", window, ("task",))
    plot(ax, steps, "p95 {}", scale=1000)
    finish(ax, "Saga task duration p95 by task", "ms")

    ax = next(panels)
    for name in ("pending", "cancelling", "stuck"):
        plot(ax, gauge(data, f"orderflow_orders_{name}"), name)
    finish(ax, "Orders pending, cancelling, stuck (the orders worker's gauges)", "orders")

    ax = next(panels)
    plot(ax, gauge(data, "orderflow_broker_queue_messages", ("queue",)), "{}")
    finish(ax, "Queue depth (messages ready)", "messages")

    ax = next(panels)
    for q in (0.5, 0.99):
        plot(ax, quantiles(data, q, "orderflow_broker_publish_duration_seconds", window), f"p{q * 100:g}", scale=1000)
    failures = rate(data, "orderflow_broker_publish_failures_total", window)
    failed = sum(max(values, default=0) for _, values in failures.values())
    finish(ax, f"Publish duration, all tasks (failures: {'none' if not failed else 'some'})", "ms")

    ax = next(panels)
    plot(ax, rate(data, "django_http_responses_total_by_status_total", window, ("status",)), "status {}")
    latency = quantiles(data, 0.99, "django_http_requests_latency_seconds_by_view_method", window, ("view",))
    twin = ax.twinx()
    twin.set_prop_cycle(color=["tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"])  # not the counts'
    plot(twin, latency, "p99 {}", scale=1000, style="--")
    twin.set_ylabel("ms (dashed: latency p99)")
    twin.set_ylim(bottom=0)
    if twin.get_legend_handles_labels()[0]:
        twin.legend(fontsize=7, loc="upper left")
    finish(ax, "HTTP responses by status (django-prometheus), latency p99 by view", "responses/s")

    for ax in axes[-1]:
        ax.set_xlabel("seconds since the first scrape")
    options = document.get("options", {})
    pace = f"{options['rate']:g}/s" if options.get("rate") else "burst"
    figure.suptitle(
        f"bench_orders run {document.get('run_id', '?')}: {options.get('orders')} orders via {options.get('via')}, "
        f"{options.get('concurrency')} clients, {pace}; scraped every {document['interval']:g} s, "
        f"rates and quantiles over {window:g} s (shaded: the measured saga)",
        fontsize=10,
    )
    figure.tight_layout(rect=(0, 0, 1, 0.98))
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=90)
    print(f"wrote {output}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("samples", type=Path, help="bench_orders --metrics-out's JSON (or .json.gz)")
    parser.add_argument("-o", "--output", type=Path, default=Path("docs/img/metrics-dashboard.png"))
    parser.add_argument("--window", type=float, default=5.0, help="seconds a rate or quantile looks back (default 5)")
    args = parser.parse_args()
    text = gzip.decompress(args.samples.read_bytes()) if args.samples.suffix == ".gz" else args.samples.read_bytes()
    draw(json.loads(text), args.output, args.window)


if __name__ == "__main__":
    main()
