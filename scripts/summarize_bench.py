"""Medians of `bench_orders --json` runs, one Markdown table row per configuration.

    .venv/bin/python scripts/summarize_bench.py var/bench-results/postgres-*.json

Files are grouped by name with the trailing run number removed
(``postgres-service-burst-2.json`` → ``postgres-service-burst``).

    .venv/bin/python scripts/summarize_bench.py --overhead var/bench-results/overhead-*.json

``--overhead``: the table of docs/performance.md's "What metrics and tracing
cost" instead: each configuration's medians with every run's figure, and the
change against the configuration whose name ends in ``-off``.
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


def each(runs: list[dict], get, digits: int = 1) -> str:
    """The median in bold, then every run's figure in the order the runs were numbered."""
    values = [get(r) for r in runs]
    return f"**{fmt(median(values), digits)}** ({', '.join(fmt(v, digits) for v in values)})"


def overhead(groups: dict[str, list[dict]]) -> None:
    """Metrics off / on / on with tracing: medians, each run, and the change against the `-off` configuration."""
    off_name = next((name for name in groups if name.endswith("-off")), None)
    off = groups.get(off_name)

    def change(runs, get):
        if off is None or runs[0] in off:
            return ""
        base, now = median([get(r) for r in off]), median([get(r) for r in runs])
        return f" ({(now - base) / base * 100:+.1f} %)" if base and now is not None else ""

    def ended(r):
        return r["saga"]["terminal_per_s"]

    def cpu(r, name=None):
        figures = r["saga"].get("cpu_ms_per_item") or {}
        return figures.get("per_process", {}).get(name) if name else figures.get("spawned")

    print(
        "| configuration | runs | saga ended/s | saga/floor | floor chains/s | POST p50 / p99 ms "
        "| commit→confirmed p50 ms | CPU ms per order, all spawned | of which gunicorn | spans received |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, runs in sorted(groups.items(), key=lambda item: (not item[0].endswith("-off"), item[0])):
        runs = sorted(runs, key=lambda r: r["started_at"])
        print(
            f"| {name} | {len(runs)} | {each(runs, ended)}{change(runs, ended)} "
            f"| {each(runs, lambda r: r.get('ratio'), 2)}{change(runs, lambda r: r.get('ratio'))} "
            f"| {fmt(median([r['floor']['done_per_s'] for r in runs]))} "
            f"| {fmt(median([lat(r, 'accept', 'p50') for r in runs]))} / "
            f"{fmt(median([lat(r, 'accept', 'p99') for r in runs]))} "
            f"| {fmt(median([lat(r, 'commit_to_confirmed', 'p50') for r in runs]))} "
            f"| {each(runs, cpu, 2)}{change(runs, cpu)} "
            f"| {fmt(median([cpu(r, 'web') for r in runs]), 2)}{change(runs, lambda r: cpu(r, 'web'))} "
            f"| {fmt(median([(r.get('tracing') or {}).get('spans') for r in runs]), 0)} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", type=Path)
    parser.add_argument("--overhead", action="store_true", help="the metrics/tracing overhead table")
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
    if args.overhead:
        overhead(dict(groups))
        for name, count in sorted(failed.items()):
            print(f"{name}: {count} failed run(s) left out")
        return
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
