"""Load the real pipeline with orders; print throughput, latency percentiles and the audit.

    make bench ARGS="--orders 200 --spawn --baseline"
    ORDERFLOW_BENCH=1 .venv/bin/python manage.py bench_orders --orders 200 --spawn --baseline

See bench/run.py, bench/isolation.py and the performance doc. Exit status 1
when the run failed: a client error, an order that never ended, no workers,
or any violation found by the consistency audit afterwards.
"""

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from bench import isolation, run
from bench.report import render


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(value)
    return number


@contextlib.contextmanager
def _quiet_services() -> Iterator[None]:
    """The services' INFO lines ("order 12 placed by ...") stay in the workers' logs, not the bench's output."""
    loggers = [logging.getLogger(name) for name in ("orders", "inventory", "reports")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


class Command(BaseCommand):
    help = (
        "Place orders through the real pipeline (workers, broker, database), wait until every one is "
        "confirmed or cancelled, and print throughput, latency percentiles and the consistency audit. "
        "--spawn starts (and stops) the workers and, for --via api, gunicorn, in a database and broker of "
        "the bench's own; without it the bench uses the running workers and their database. Either way it "
        "deletes the products, orders and user it made unless --keep. --baseline also measures the floor: "
        "a chain of three trivial tasks through the same broker, database and workers."
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
        parser.add_argument(
            "--keep", action="store_true", help="keep the run's products, orders and user (deleted by default)"
        )
        spawn = parser.add_argument_group("processes started by the bench (--spawn)")
        spawn.add_argument(
            "--spawn",
            action="store_true",
            help="start one worker per queue (and gunicorn), stop them after; in a database and broker of the "
            "bench's own (names derived from the configured ones)",
        )
        spawn.add_argument(
            "--in-place", action="store_true", help="with --spawn: use the configured database and broker instead"
        )
        spawn.add_argument("--worker-pool", default="prefork", choices=["prefork", "threads", "solo"], help="celery -P")
        spawn.add_argument("--worker-concurrency", type=_positive_int, default=2, help="celery -c, each worker")
        spawn.add_argument("--worker-optimization", default="fair", choices=["fair", "default"], help="celery -O")
        spawn.add_argument("--prefetch-multiplier", type=_positive_int, default=4, help="worker_prefetch_multiplier")
        spawn.add_argument("--worker-loglevel", default="INFO", help="celery -l (default INFO, as in the Procfile)")
        spawn.add_argument("--web-workers", type=_positive_int, default=2, help="gunicorn --workers")
        spawn.add_argument("--web-threads", type=_positive_int, default=4, help="gunicorn --threads")
        spawn.add_argument("--no-access-log", action="store_true", help="gunicorn without --access-logfile -")
        observe = parser.add_argument_group("metrics and tracing in the spawned processes (--spawn)")
        observe.add_argument(
            "--metrics",
            action="store_true",
            help="each process group counts and serves its metrics as make run sets it up (a multiprocess "
            "folder and a loopback port each), scraped every --scrape-interval; with --via service the orders "
            "are placed, and counted, in the bench's own process, which serves nothing",
        )
        observe.add_argument(
            "--metrics-out",
            metavar="FILE",
            default=None,
            help="write every scrape's samples to FILE as JSON (implies --metrics; scripts/plot_metrics.py draws it)",
        )
        observe.add_argument(
            "--scrape-interval", type=float, default=1.0, help="seconds between scrapes of each group (default 1)"
        )
        observe.add_argument(
            "--tracing",
            action="store_true",
            help="every process exports its spans (OTEL_EXPORTER_OTLP_ENDPOINT) to an OTLP/HTTP sink in the "
            "bench, which counts them",
        )

    def run_from_argv(self, argv):
        self.argv = argv  # to run itself again in a world of its own
        super().run_from_argv(argv)

    def log(self, message: str) -> None:
        # Progress, not an error: stderr keeps stdout for the report, without Django's ERROR style.
        self.stderr.write(f"bench_orders: {message}", style_func=str)

    def handle(self, *args, **o):
        own_world = o["spawn"] and not o["in_place"]
        if own_world and os.environ.get(isolation.OWN_WORLD) != "1":
            self._run_in_own_world()  # does not return
        try:
            if own_world:
                isolation.prepare_own_world()
                self.log(f"in a world of its own: {isolation.describe_world()}")
            else:
                self.log(
                    f"in the configured {isolation.describe_world()}; "
                    + ("keeps what it makes (--keep)" if o["keep"] else "deletes what it makes at the end")
                )
            with _quiet_services():
                report = run.run(self._options(o))
        except isolation.BenchFailed as exc:
            raise CommandError(str(exc), returncode=1) from exc
        if o["json"]:
            self.stdout.write(json.dumps(report, indent=2, default=str))
        else:
            self.stdout.write(render(report))
        if not report["ok"]:
            raise CommandError(report.get("error") or "the consistency audit found violations", returncode=1)

    def _run_in_own_world(self) -> None:
        """Run this command again with the environment of its own database and broker (bench/isolation.py)."""
        argv = getattr(self, "argv", None)
        if not argv:
            raise CommandError(
                "--spawn runs the bench in a database of its own, which needs the command line "
                "(manage.py bench_orders ...); pass --in-place to use the configured database"
            )
        self.log("--spawn: running in a database and broker of its own (--in-place uses the configured ones)")
        sys.stdout.flush()
        sys.stderr.flush()
        manage = str(settings.BASE_DIR / "manage.py")
        env = {**os.environ, **isolation.own_environment()}
        os.execve(sys.executable, [sys.executable, manage, *argv[1:]], env)  # noqa: S606 (our interpreter, our argv)

    def _options(self, o: dict) -> run.BenchOptions:
        return run.BenchOptions(
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
            keep=o["keep"],
            worker_pool=o["worker_pool"],
            worker_concurrency=o["worker_concurrency"],
            worker_optimization=o["worker_optimization"],
            prefetch_multiplier=o["prefetch_multiplier"],
            worker_loglevel=o["worker_loglevel"],
            web_workers=o["web_workers"],
            web_threads=o["web_threads"],
            web_access_log=not o["no_access_log"],
            metrics=o["metrics"] or bool(o["metrics_out"]),
            tracing=o["tracing"],
            metrics_out=o["metrics_out"],
            scrape_interval=o["scrape_interval"],
            log=self.log,
            # A live progress line only for a person watching a terminal.
            progress=self._draw if self.stdout.isatty() and not o["json"] else None,
        )

    def _draw(self, text: str) -> None:
        self.stdout.write(text, ending="")
        self.stdout.flush()
