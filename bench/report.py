"""The bench's report as text for people: the figures, then one line on what each means."""

LEGEND = [
    "what the figures mean:",
    "  accepted/s        orders placed per second: a client's call returns once its order is committed",
    "  terminal/s        orders that ended (confirmed or cancelled) per second, first order sent to last one ended",
    "  accept            how long one client call took (order_create, or POST /api/orders/)",
    "  commit→confirmed  from an order's commit to its saga's last step; commit→cancelled: to its compensation's",
    "  floor             3 trivial tasks per chain through the same clients, broker, database and workers: the limit",
    "  saga/floor        the saga's terminal/s over the floor's done/s: how near the saga comes to the limit",
    "  cpu ms per item   CPU milliseconds per order (or chain) in the processes the bench started, and in itself",
    "  audit             the consistency invariants checked on the data afterwards (check_consistency)",
]


def _row(name: str, figures: dict | None) -> str:
    if not figures or not figures.get("count"):
        return f"  {name:<22}{'-':>9}"
    cells = "".join(f"{figures[k]:>9.1f}" for k in ("p50", "p95", "p99", "max"))
    return f"  {name:<22}{cells}   (n={figures['count']})"


def _cpu(figures: dict) -> list[str]:
    cpu = figures.get("cpu_ms_per_item")
    if not cpu:
        return []
    parts = ", ".join(f"{name} {ms}" for name, ms in cpu.get("per_process", {}).items())
    return [
        f"  cpu ms per item: {cpu['spawned']} in the spawned processes ({parts}), {cpu['bench_process']} in the bench"
    ]


def render(report: dict) -> str:
    o, env = report["options"], report["environment"]
    pace = f"{o['rate']:g}/s" if o["rate"] else "burst"
    lines = [
        f"bench_orders {report['run_id']}: {o['orders']} orders, {o['concurrency']} clients, {pace}, "
        f"via {o['via']}, fail ratio {o['fail_ratio']:g} ({o['refusals']}); "
        f"{env['database']} + {env['broker']}{' of its own' if env.get('own_world') else ''}, "
        f"{env['cpus']} cpus, load {env['load_average_before']}",
    ]
    if o["spawn"]:
        lines.append(
            f"spawned workers: -P {o['worker_pool']} -c {o['worker_concurrency']} -O {o['worker_optimization']} "
            f"prefetch {o['prefetch_multiplier']} -l {o['worker_loglevel']}"
            + (f"; gunicorn {o['web_workers']}x{o['web_threads']} threads" if o["via"] == "api" else "")
        )
    header = f"  {'latency (ms)':<22}{'p50':>9}{'p95':>9}{'p99':>9}{'max':>9}"
    floor = report.get("floor")
    if floor:
        lines += [
            f"floor: {floor['chains']} chains of 3 trivial tasks: published {floor['accepted_per_s']}/s, "
            f"done {floor['done_per_s']}/s end to end ({floor['wall_seconds']} s)",
            header,
            _row("publish", floor["latency_ms"]["publish"]),
            _row("publish→done", floor["latency_ms"]["publish_to_done"]),
        ]
        lines += _cpu(floor)
    saga = report.get("saga")
    if saga:
        lines += [
            f"saga: accepted {saga['accepted_per_s']}/s; terminal {saga['terminal_per_s']}/s end to end "
            f"({saga['wall_seconds']} s): {saga['confirmed']} confirmed, {saga['cancelled']} cancelled "
            f"(stock allows {report['expected']['confirmed']})",
            header,
            _row("accept", saga["latency_ms"]["accept"]),
            _row("commit→confirmed", saga["latency_ms"]["commit_to_confirmed"]),
            _row("commit→cancelled", saga["latency_ms"]["commit_to_cancelled"]),
        ]
        lines += _cpu(saga)
    if "metrics" in report:
        scraped = ", ".join(
            f"{group} {made['scrapes']}" + (f" ({made['failed']} failed)" if made["failed"] else "")
            for group, made in report["metrics"]["endpoints"].items()
        )
        out = f"; samples in {report['metrics']['out']}" if report["metrics"].get("out") else ""
        lines.append(f"metrics on: scrapes every {report['metrics']['interval']:g} s: {scraped}{out}")
    if "tracing" in report:
        t = report["tracing"]
        lines.append(f"tracing on: {t['spans']} spans received in {t['export_requests']} OTLP exports")
    if "ratio" in report:
        lines.append(f"saga/floor: {report['ratio']:.2f}")
    if "audit" in report:
        audit = report["audit"]
        lines.append("audit: consistent" if audit["ok"] else f"audit: {len(audit['violations'])} violation(s)")
        lines += [f"  VIOLATION {v}" for v in audit["violations"]]
    if "deleted" in report:
        d = report["deleted"]
        lines.append(f"cleanup: deleted the run's {d['orders']} orders, {d['products']} products, {d['users']} user")
    elif "kept" in report:
        lines.append(f"kept (--keep): the run's orders, products (SKU BENCH-{report['run_id']}-…) and user")
    if saga or floor:
        lines += LEGEND
    if report.get("error"):
        lines.append(f"FAILED: {report['error']}")
    return "\n".join(lines)
