"""Load the real pipeline with orders; print throughput, latency percentiles and the audit.

See orders/bench.py and the README's "Performance" section. Exit status 1 when
the run failed: a client error, an order that never ended, or any violation
found by the consistency audit afterwards.
"""

import json

from django.core.management.base import BaseCommand, CommandError

from orders import bench


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(value)
    return number


class Command(BaseCommand):
    help = (
        "Place orders through the real pipeline (workers, broker, database), wait until every one is "
        "confirmed or cancelled, and print throughput, latency percentiles and the consistency audit. "
        "--baseline also measures the floor: a chain of three trivial tasks through the same broker, "
        "database and workers. --spawn starts (and stops) the workers and, for --via api, gunicorn."
    )

    def add_arguments(self, parser):
        parser.add_argument("--orders", type=_positive_int, default=100, help="orders to place (default 100)")
        parser.add_argument("--concurrency", type=_positive_int, default=4, help="concurrent clients (default 4)")
        parser.add_argument("--rate", type=float, default=None, help="orders per second to offer (default: burst)")
        parser.add_argument("--via", choices=["service", "api"], default="service", help="order_create or HTTP")
        parser.add_argument(
            "--fail-ratio", type=float, default=0.1, help="share of orders the stock refuses (default 0.1)"
        )
        parser.add_argument(
            "--refusals",
            choices=["spread", "last"],
            default="spread",
            help="refused orders evenly through the run (orders for a sold-out product; default), or the last "
            "of each product's orders once its stock is gone",
        )
        parser.add_argument("--baseline", action="store_true", help="also run the floor and print saga/floor")
        parser.add_argument("--json", action="store_true", help="print one JSON document (progress goes to stderr)")
        parser.add_argument("--products", type=_positive_int, default=20, help="products to spread orders over")
        parser.add_argument(
            "--warmup", type=int, default=None, help="uncounted warm-up orders (default: --concurrency)"
        )
        parser.add_argument("--timeout", type=float, default=None, help="seconds to wait for every order to end")
        parser.add_argument(
            "--url",
            default=None,
            help="web server for --via api, e.g. http://127.0.0.1:8000 (started with ORDER_CREATE_THROTTLE "
            "high enough for one user to place every order)",
        )
        parser.add_argument(
            "--idempotency-keys", action="store_true", help="send an Idempotency-Key with each POST (--via api)"
        )
        spawn = parser.add_argument_group("processes started by the bench (--spawn)")
        spawn.add_argument("--spawn", action="store_true", help="start one worker per queue (and gunicorn), stop after")
        spawn.add_argument("--worker-pool", default="prefork", choices=["prefork", "threads", "solo"], help="celery -P")
        spawn.add_argument("--worker-concurrency", type=_positive_int, default=2, help="celery -c, each worker")
        spawn.add_argument("--worker-optimization", default="fair", choices=["fair", "default"], help="celery -O")
        spawn.add_argument("--prefetch-multiplier", type=_positive_int, default=4, help="worker_prefetch_multiplier")
        spawn.add_argument("--worker-loglevel", default="INFO", help="celery -l (default INFO, as in the Procfile)")
        spawn.add_argument("--web-workers", type=_positive_int, default=2, help="gunicorn --workers")
        spawn.add_argument("--web-threads", type=_positive_int, default=4, help="gunicorn --threads")
        spawn.add_argument("--no-access-log", action="store_true", help="gunicorn without --access-logfile -")

    def handle(self, *args, **o):
        options = bench.BenchOptions(
            orders=o["orders"],
            concurrency=o["concurrency"],
            rate=o["rate"],
            via=o["via"],
            fail_ratio=o["fail_ratio"],
            refusals=o["refusals"],
            baseline=o["baseline"],
            products=o["products"],
            warmup=o["warmup"],
            timeout=o["timeout"],
            url=o["url"],
            idempotency_keys=o["idempotency_keys"],
            spawn=o["spawn"],
            worker_pool=o["worker_pool"],
            worker_concurrency=o["worker_concurrency"],
            worker_optimization=o["worker_optimization"],
            prefetch_multiplier=o["prefetch_multiplier"],
            worker_loglevel=o["worker_loglevel"],
            web_workers=o["web_workers"],
            web_threads=o["web_threads"],
            web_access_log=not o["no_access_log"],
            log=lambda message: self.stderr.write(f"bench_orders: {message}"),
        )
        report = bench.run(options)
        if o["json"]:
            self.stdout.write(json.dumps(report, indent=2, default=str))
        else:
            self.stdout.write(render(report))
        if not report["ok"]:
            raise CommandError(report.get("error") or "the consistency audit found violations", returncode=1)


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
        f"{env['database']} + {env['broker']}, {env['cpus']} cpus, load {env['load_average_before']}",
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
    if "ratio" in report:
        lines.append(f"saga/floor: {report['ratio']:.2f}")
    if "audit" in report:
        audit = report["audit"]
        lines.append("audit: consistent" if audit["ok"] else f"audit: {len(audit['violations'])} violation(s)")
        lines += [f"  VIOLATION {v}" for v in audit["violations"]]
    if report.get("error"):
        lines.append(f"FAILED: {report['error']}")
    return "\n".join(lines)
