"""Medians of `bench_orders --json` runs, one Markdown table row per configuration.

    .venv/bin/python scripts/summarize_bench.py var/bench-results/postgres-*.json

Files are grouped by name with the trailing run number removed
(``postgres-service-burst-2.json`` → ``postgres-service-burst``).
"""

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, digits=1):
    return "–" if value is None else f"{value:.{digits}f}"


def lat(report: dict, kind: str, figure: str):
    return report["saga"]["latency_ms"][kind][figure]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", type=Path)
    args = parser.parse_args()
    groups = defaultdict(list)
    failed = defaultdict(int)
    for path in args.inputs:
        name = re.sub(r"-\d+$", "", path.stem)
        try:
            report = json.loads(path.read_text())
        except ValueError:
            failed[name] += 1
            continue
        if report.get("ok"):
            groups[name].append(report)
        else:
            failed[name] += 1
    print(
        "| configuration | runs | floor chains/s | saga accepted/s | saga ended/s | saga/floor "
        "| accept p50 / p99 ms | commit→confirmed p50 / p99 ms | commit→cancelled p50 ms | floor p50 ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, runs in sorted(groups.items()):

        def m(get, runs=runs):
            return median([get(r) for r in runs])

        print(
            f"| {name} | {len(runs)}{f' (+{failed[name]} failed)' if failed[name] else ''} "
            f"| {fmt(m(lambda r: r['floor']['done_per_s']))} "
            f"| {fmt(m(lambda r: r['saga']['accepted_per_s']))} "
            f"| {fmt(m(lambda r: r['saga']['terminal_per_s']))} "
            f"| {fmt(m(lambda r: r.get('ratio')), 2)} "
            f"| {fmt(m(lambda r: lat(r, 'accept', 'p50')))} / {fmt(m(lambda r: lat(r, 'accept', 'p99')))} "
            f"| {fmt(m(lambda r: lat(r, 'commit_to_confirmed', 'p50')))} / "
            f"{fmt(m(lambda r: lat(r, 'commit_to_confirmed', 'p99')))} "
            f"| {fmt(m(lambda r: lat(r, 'commit_to_cancelled', 'p50')))} "
            f"| {fmt(m(lambda r: r['floor']['latency_ms']['publish_to_done']['p50']))} |"
        )
    for name, count in sorted(failed.items()):
        if name not in groups:
            print(f"| {name} | 0 (+{count} failed) | | | | | | | | |")


if __name__ == "__main__":
    main()
