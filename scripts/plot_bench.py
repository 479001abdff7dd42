"""Plot `bench_orders --json` results: throughput and latency against offered load.

    .venv/bin/python scripts/plot_bench.py results/*.json -o docs/img/bench-postgres.png

Each input file is one run's JSON document. Runs are grouped by (via and
worker pool, rate);
each point is the median of its group's runs. A burst run (no --rate) is
placed at the rate its clients achieved, as a star, with its floor (chains/s
of the same runs) as a dotted line. Left: orders that ended per second;
right: commit→confirmed p50 and p99 of the paced runs, and the POST p99 of
--via api runs.
"""

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after the backend is chosen
from matplotlib import ticker


def load(paths: list[Path]) -> dict[tuple[str, float | None], list[dict]]:
    groups: dict[tuple[str, float | None], list[dict]] = defaultdict(list)
    for path in paths:
        report = json.loads(path.read_text())
        if not report.get("ok"):
            print(f"skipping {path}: a failed run", file=sys.stderr)
            continue
        options = report["options"]
        if options.get("refusals") == "last":  # documents from before --refusals were all this workload
            print(f"skipping {path}: --refusals last (the plot shows the default workload)", file=sys.stderr)
            continue
        label = (
            options["via"] if options["worker_pool"] == "prefork" else f"{options['via']}, -P {options['worker_pool']}"
        )
        groups[(label, options["rate"])].append(report)
    return groups


def median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def series(groups, via: str) -> list[dict]:
    points = []
    for (group_via, rate), runs in groups.items():
        if group_via != via:
            continue
        offered = rate or median([r["saga"]["accepted_per_s"] for r in runs])
        points.append(
            {
                "offered": offered,
                "burst": rate is None,
                "terminal": median([r["saga"]["terminal_per_s"] for r in runs]),
                "floor": median([r.get("floor", {}).get("done_per_s") for r in runs]),
                "p50": median([r["saga"]["latency_ms"]["commit_to_confirmed"]["p50"] for r in runs]),
                "p99": median([r["saga"]["latency_ms"]["commit_to_confirmed"]["p99"] for r in runs]),
                "accept_p99": median([r["saga"]["latency_ms"]["accept"]["p99"] for r in runs]),
                "runs": len(runs),
            }
        )
    return sorted(points, key=lambda p: p["offered"])


def plot(groups, output: Path, title: str) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    styles = {"service": ("tab:blue", "o"), "api": ("tab:orange", "s"), "service, -P threads": ("tab:green", "D")}
    top = 0.0
    for via, (colour, marker) in styles.items():
        points = series(groups, via)
        if not points:
            continue
        paced = [p for p in points if not p["burst"]]
        burst = [p for p in points if p["burst"]]
        top = max([top] + [p["offered"] for p in points])
        if paced:
            x = [p["offered"] for p in paced]
            left.plot(x, [p["terminal"] for p in paced], marker=marker, color=colour, label=f"saga via {via}, paced")
            right.plot(x, [p["p50"] for p in paced], marker=marker, color=colour, label=f"commit→confirmed p50 ({via})")
            right.plot(x, [p["p99"] for p in paced], marker=marker, color=colour, linestyle="--", label=f"p99 ({via})")
            if via == "api":
                right.plot(
                    x, [p["accept_p99"] for p in paced], marker="^", color="tab:red", linestyle="-.", label="POST p99"
                )
        for p in burst:
            left.scatter([p["offered"]], [p["terminal"]], marker="*", s=160, color=colour, zorder=3)
            left.annotate(f"burst ({via})", (p["offered"], p["terminal"]), textcoords="offset points", xytext=(6, -4))
            if p["floor"]:
                left.axhline(p["floor"], color=colour, linestyle=":", linewidth=1.2, label=f"floor, burst ({via} runs)")
    left.plot([0, top], [0, top], color="grey", linewidth=0.8, label="ended = offered")
    left.set(
        xlabel="offered load (orders/s; a burst at the rate its clients achieved)",
        ylabel="orders ended per second (median of runs)",
        title="Throughput",
    )
    right.set(xlabel="offered load (orders/s)", ylabel="milliseconds (median of runs)", title="Latency", yscale="log")
    right.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    right.yaxis.set_minor_formatter(
        ticker.FuncFormatter(lambda value, _: f"{value:g}" if str(value)[0] in "25" else "")
    )
    for axes in (left, right):
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    print(f"wrote {output}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", type=Path, help="JSON files written by bench_orders --json")
    parser.add_argument("-o", "--output", type=Path, default=Path("docs/img/bench.png"))
    parser.add_argument("--title", default="orderflow bench_orders (2 cores)")
    args = parser.parse_args()
    groups = load(args.inputs)
    if not groups:
        sys.exit("no successful runs among the inputs")
    plot(groups, args.output, args.title)


if __name__ == "__main__":
    main()
