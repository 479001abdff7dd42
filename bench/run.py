"""One benchmark run: load through the real pipeline, measured against the floor.

Orders go through the real thing: `orders.services.order_create` (``--via
service``) or ``POST /api/orders/`` on a real web server (``--via api``), the
broker, real `celery worker` processes and the database. The bench creates
its own products, with stock sized so that ``--fail-ratio`` of the orders are
refused and compensated (bench/workload.py), places the orders from
``--concurrency`` client threads (optionally paced at ``--rate`` orders per
second), waits until every order is terminal (confirmed, or deleted with a
CancelledOrder) and reports throughput, latency percentiles and the
consistency audit. Where it runs and what it leaves: bench/isolation.py.

``--baseline`` also runs the floor in the same run, with the same clients,
broker, database and workers: a chain of three trivial tasks, one per service
queue, each committing one UPDATE of one row (bench/tasks.py). The saga's
throughput divided by the floor's is the ratio the performance doc reports.

Timestamps: commit→confirmed is ``Order.created_at`` → ``confirmed_at``,
commit→cancelled is ``created_at`` → ``CancelledOrder.cancelled_at``, both
written by the database's clients on this machine's clock; end-to-end rates
run from the first order sent to the last terminal timestamp.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

from celery import chain
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import close_old_connections, connections
from django.utils import timezone

from ops.audit import audit
from orders import services
from orders.models import CancelledOrder, Order
from project.celery import app
from testing.workers import SupervisionFailed, Workers, wait_for

from . import isolation
from .isolation import BenchFailed
from .models import BenchFloorChain
from .observe import Scraper
from .workload import product_create, workload

CHUNK = isolation.CHUNK


@dataclass
class BenchOptions:
    orders: int = 100
    concurrency: int = 4
    rate: float | None = None
    via: str = "service"
    fail_ratio: float = 0.1
    refusals: str = "spread"
    baseline: bool = False
    products: int = 20
    warmup: int | None = None
    timeout: float | None = None
    url: str | None = None
    idempotency_keys: bool = False
    spawn: bool = False
    keep: bool = False
    worker_pool: str = "prefork"
    worker_concurrency: int = 2
    worker_optimization: str = "fair"
    prefetch_multiplier: int = 4
    worker_loglevel: str = "INFO"
    web_workers: int = 2
    web_threads: int = 4
    web_access_log: bool = True
    # The spawned stack's metrics (each group counting and serving, as make run sets it up) and tracing
    # (to a span sink in this process); metrics_out: the scraped samples' JSON file (bench/observe.py).
    metrics: bool = False
    tracing: bool = False
    metrics_out: str | None = None
    scrape_interval: float = 1.0
    log: Callable[[str], None] = field(default=lambda message: None, repr=False)
    # Writes text to a terminal, for the live progress line; None draws nothing.
    progress: Callable[[str], None] | None = field(default=None, repr=False)

    def as_dict(self) -> dict:
        """The options as the report records them (not the callables)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("log", "progress")}


# --- figures -----------------------------------------------------------------


def percentiles(values: Iterable[float]) -> dict[str, float | None]:
    """p50/p95/p99/max (nearest rank) of seconds, in milliseconds."""
    ordered = sorted(values)
    if not ordered:
        return {"count": 0, "p50": None, "p95": None, "p99": None, "max": None}

    def rank(p: float) -> float:
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

    figures = {f"p{p}": round(rank(p) * 1000, 2) for p in (50, 95, 99)}
    return {"count": len(ordered), **figures, "max": round(ordered[-1] * 1000, 2)}


def _per_second(count: int, seconds: float) -> float | None:
    return round(count / seconds, 1) if seconds > 0 else None


def _epoch(value: datetime) -> float:
    return value.timestamp()


# --- processes the bench starts itself (--spawn) ------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(options: BenchOptions, run_id: str, *, otlp_url: str | None = None) -> tuple[Workers, str | None]:
    """One worker per service queue, and gunicorn for --via api (testing.workers supervises them); and its URL.

    With `options.metrics` each process group counts and serves its metrics on a loopback port of its
    own (`Workers.metrics_ports`, by group: "web" and each queue); with `otlp_url` every process exports
    its spans there (OTEL_EXPORTER_OTLP_ENDPOINT, the SDK's other settings at their defaults).
    """
    env = {
        "ORDERFLOW_BENCH": "1",
        "CELERY_WORKER_PREFETCH_MULTIPLIER": str(options.prefetch_multiplier),
        # One bench user places every order: the per-user limit of POST /api/orders/
        # is raised out of reach, and still runs (its cache round trips are measured).
        "ORDER_CREATE_THROTTLE": "1000000/min",
    }
    if otlp_url:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp_url
    workers = Workers(
        Path(settings.VAR_DIR) / "bench-logs" / run_id,
        env=env,
        node=f"{{queue}}-bench-{run_id}@%h",
        faults=False,
        metrics=options.metrics,
    )
    url = None
    try:
        for queue in settings.SERVICE_QUEUES:
            workers.start(
                queue,
                options.worker_concurrency,
                pool=options.worker_pool,
                loglevel=options.worker_loglevel,
                options=["-O", "fair"] if options.worker_optimization == "fair" else [],
            )
        if options.via == "api":
            port = _free_port()
            argv = [
                sys.executable, "-m", "gunicorn", "project.wsgi", "--bind", f"127.0.0.1:{port}",
                "--workers", str(options.web_workers), "--threads", str(options.web_threads),
                "--error-logfile", "-", "--no-control-socket",
            ]  # fmt: skip
            if options.web_access_log:
                argv += ["--access-logfile", "-"]
            workers.start_process("web", argv, env=workers.metrics_env("web") if options.metrics else None)
            url = f"http://127.0.0.1:{port}"
        for queue in settings.SERVICE_QUEUES:
            workers.wait_ready(queue)
        if url:
            _wait_web(workers, url)
    except SupervisionFailed as exc:
        workers.stop_all(warm=True)
        raise BenchFailed(f"{exc} (logs in {workers.directory})") from exc
    return workers, url


def _wait_web(workers: Workers, url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    parts = urlsplit(url)
    while True:
        workers.check_alive()
        try:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SupervisionFailed(f"web server not ready after {timeout}s")
        time.sleep(0.2)


def cpu_seconds(workers: Workers) -> dict[str, float]:
    """CPU time (user + system) used so far by each started process with its children (Linux /proc)."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    ticks = os.sysconf("SC_CLK_TCK")
    used = {}
    for name, process in workers.processes.items():
        tree, grew = {process.pid}, True
        while grew:
            children = {pid for pid, (ppid, _) in stats.items() if ppid in tree} - tree
            grew = bool(children)
            tree |= children
        used[workers.logs[name]] = sum(stats[pid][1] for pid in tree if pid in stats) / ticks
    return used


# --- the live progress line -------------------------------------------------------------


class Progress:
    """`placed 120/500, terminal 96/500, 48.0/s` redrawn twice a second on a terminal; nothing elsewhere.

    `terminal(ids)` counts how many of the ids placed so far have ended; it
    runs in the drawing thread (with its own database connection), only
    when there is a terminal to draw on.
    """

    def __init__(
        self, draw: Callable[[str], None] | None, label: str, total: int, terminal: Callable[[list[int]], int]
    ) -> None:
        self.draw, self.label, self.total, self.count_terminal = draw, label, total, terminal
        self.placed: list[int] = []
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._draw_until_stopped, name="bench-progress", daemon=True)

    def sent(self, ident: int | None) -> None:
        if ident is not None:
            self.placed.append(ident)  # list.append is atomic

    def line(self, terminal: int) -> str:
        elapsed = time.monotonic() - self.started
        rate = terminal / elapsed if elapsed > 0 else 0.0
        return (
            f"{self.label}: placed {len(self.placed)}/{self.total}, terminal {terminal}/{self.total}, "
            f"{rate:.1f}/s ({elapsed:.0f} s)"
        )

    def _redraw(self) -> None:
        self.draw("\r" + self.line(self.count_terminal(list(self.placed))) + "\033[K")

    def _draw_until_stopped(self) -> None:
        try:
            while not self._stop.wait(0.5):
                self._redraw()
            self._redraw()
            self.draw("\n")
        finally:
            connections.close_all()  # this thread's connections

    def __enter__(self) -> Progress:
        if self.draw is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


# --- clients -----------------------------------------------------------------------


@dataclass
class Sent:
    """What one client call did: when it started (epoch s), how long it took, the id it got."""

    started: float
    seconds: float
    ident: int | None = None
    error: str | None = None


def drive(
    n: int,
    concurrency: int,
    rate: float | None,
    make_client: Callable[[], Callable[[int], int]],
    on_sent: Callable[[int | None], None] = lambda ident: None,
) -> list[Sent]:
    """Call a client `n` times from `concurrency` threads; at most `rate` calls/s when given.

    Call i is due at start + i/rate (an open schedule): a client that falls
    behind sends at once, so the achieved rate shows when the system cannot
    keep up.
    """
    results: list[Sent | None] = [None] * n
    counter = iter(range(n))
    lock = threading.Lock()
    start = time.perf_counter() + 0.05
    wall_start = time.time() + 0.05

    stopping = threading.Event()

    def run() -> None:
        try:
            send = make_client()
            while True:
                with lock:
                    i = None if stopping.is_set() else next(counter, None)
                if i is None:
                    return
                if rate:
                    delay = start + i / rate - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                began = time.perf_counter()
                try:
                    ident = send(i)
                    error = None
                except Exception as exc:  # reported, and fails the run
                    ident, error = None, f"{type(exc).__name__}: {exc}"
                ended = time.perf_counter()
                results[i] = Sent(wall_start + (began - start), ended - began, ident, error)
                on_sent(ident)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, name=f"bench-client-{k}", daemon=True) for k in range(concurrency)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    except KeyboardInterrupt:
        # Ctrl-C: the clients place nothing more, and every order they placed is known
        # (`on_sent`) before the run cleans up after itself.
        stopping.set()
        for thread in threads:
            thread.join()
        raise
    missing = [i for i, sent in enumerate(results) if sent is None]
    if missing:
        raise BenchFailed(f"{len(missing)} calls never ran (a client thread died)")
    return results  # type: ignore[return-value]


def service_client(user, lines_for: Callable[[int], list[dict]]) -> Callable[[], Callable[[int], int]]:
    def make():
        def send(i: int) -> int:
            return services.order_create(user=user, lines=lines_for(i)).order.pk

        return send

    return make


def api_client(url: str, token: str, lines_for: Callable[[int], list[dict]], keys: str | None):
    parts = urlsplit(url)
    headers = {"Authorization": f"Token {token}", "Content-Type": "application/json", "Accept": "application/json"}

    def make():
        conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=60)

        def send(i: int) -> int:
            nonlocal conn
            body = json.dumps({"lines": lines_for(i)})
            request_headers = dict(headers)
            if keys:
                request_headers["Idempotency-Key"] = f"{keys}-{i}"
            for attempt in (1, 2):
                try:
                    conn.request("POST", "/api/orders/", body=body, headers=request_headers)
                    response = conn.getresponse()
                    payload = response.read()
                    break
                except (http.client.RemoteDisconnected, ConnectionError):
                    conn.close()
                    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=60)
                    # Only an Idempotency-Key makes sending the order again safe.
                    if attempt == 2 or not keys:
                        raise
            if response.status != 202:
                raise BenchFailed(f"POST /api/orders/ answered {response.status}: {payload[:300]!r}")
            return json.loads(payload)["id"]

        return send

    return make


# --- waiting for the end -------------------------------------------------------------


def _chunks(ids: list[int]) -> Iterable[list[int]]:
    for k in range(0, len(ids), CHUNK):
        yield ids[k : k + CHUNK]


def terminal_orders(ids: list[int]) -> set[int]:
    """Those of the orders that are confirmed or cancelled (deleted with their CancelledOrder)."""
    done = set()
    for chunk in _chunks(ids):
        done.update(Order.objects.filter(pk__in=chunk, status=Order.Status.CONFIRMED).values_list("pk", flat=True))
        done.update(CancelledOrder.objects.filter(pk__in=chunk).values_list("pk", flat=True))
    return done


def done_chains(ids: list[int]) -> int:
    return sum(BenchFloorChain.objects.filter(pk__in=chunk, done_at__isnull=False).count() for chunk in _chunks(ids))


def wait_orders(ids: list[int], timeout: float) -> None:
    """Until every order is confirmed or cancelled (deleted with its CancelledOrder)."""
    open_ids = list(ids)
    deadline = time.monotonic() + timeout
    while open_ids:
        done = terminal_orders(open_ids)
        open_ids = [i for i in open_ids if i not in done]
        if not open_ids:
            return
        if time.monotonic() > deadline:
            raise BenchFailed(
                f"{len(open_ids)} of {len(ids)} orders not terminal after {timeout:.0f}s, e.g. {open_ids[:5]}"
            )
        time.sleep(0.2)


def wait_chains(ids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        done = done_chains(ids)
        if done == len(ids):
            return
        if time.monotonic() > deadline:
            raise BenchFailed(f"{len(ids) - done} of {len(ids)} floor chains unfinished after {timeout:.0f}s")
        time.sleep(0.2)


# --- the two runs ---------------------------------------------------------------------


def _client_figures(sent: list[Sent]) -> dict:
    errors = [s.error for s in sent if s.error]
    if errors:
        raise BenchFailed(f"{len(errors)} of {len(sent)} calls failed, e.g. {errors[0]}")
    first = min(s.started for s in sent)
    last_accept = max(s.started + s.seconds for s in sent)
    return {
        "first_sent": first,
        "send_seconds": round(last_accept - first, 3),
        "accepted_per_s": _per_second(len(sent), last_accept - first),
        "accept": percentiles(s.seconds for s in sent),
    }


def run_floor(options: BenchOptions, n: int, timeout: float, progress: Callable[[str], None] | None = None) -> dict:
    rows = BenchFloorChain.objects.bulk_create([BenchFloorChain() for _ in range(n)])
    ids = [row.pk for row in rows]
    if any(i is None for i in ids):  # a backend that does not return ids from bulk inserts
        ids = list(BenchFloorChain.objects.filter(done_at=None).order_by("-pk").values_list("pk", flat=True)[:n])
    ids.sort()

    def make():
        def send(i: int) -> int:
            chain_id = ids[i]
            chain(
                app.signature("inventory.bench_floor", args=(chain_id,), immutable=True),
                app.signature("reports.bench_floor", args=(chain_id,), immutable=True),
                app.signature("orders.bench_floor", args=(chain_id,), immutable=True),
            ).apply_async()
            return chain_id

        return send

    try:
        with Progress(progress, "floor", n, done_chains) as shown:
            sent = drive(n, options.concurrency, options.rate, make, shown.sent)
            figures = _client_figures(sent)
            wait_chains(ids, timeout)
        started = {s.ident: s.started for s in sent}
        done = dict(BenchFloorChain.objects.filter(pk__in=ids).values_list("pk", "done_at"))
    finally:
        for chunk in _chunks(ids):
            BenchFloorChain.objects.filter(pk__in=chunk).delete()
    last = max(_epoch(value) for value in done.values())
    seconds = last - figures["first_sent"]
    return {
        "chains": n,
        "accepted_per_s": figures["accepted_per_s"],
        "done_per_s": _per_second(n, seconds),
        "wall_seconds": round(seconds, 3),
        "latency_ms": {
            "publish": figures["accept"],
            "publish_to_done": percentiles(_epoch(done[i]) - started[i] for i in ids),
        },
    }


def run_saga(
    options: BenchOptions,
    *,
    make_client,
    n: int,
    timeout: float,
    placed: list[int],
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Place `n` orders and wait for their ends; the ids placed are added to `placed` as they come (for cleanup)."""

    def record(ident: int | None) -> None:
        if ident is not None:
            placed.append(ident)
        shown.sent(ident)

    with Progress(progress, "saga", n, lambda ids: len(terminal_orders(ids))) as shown:
        sent = drive(n, options.concurrency, options.rate, make_client, record)
        figures = _client_figures(sent)
        ids = sorted(s.ident for s in sent)
        if len(set(ids)) != n:
            raise BenchFailed(f"{n} orders sent but {len(set(ids))} distinct order ids came back")
        wait_orders(ids, timeout)
    confirmed, cancelled = [], []
    for chunk in _chunks(ids):
        rows = Order.objects.filter(pk__in=chunk, status=Order.Status.CONFIRMED)
        confirmed += rows.values_list("created_at", "confirmed_at")
        cancelled += CancelledOrder.objects.filter(pk__in=chunk).values_list("created_at", "cancelled_at")
    last = max(_epoch(end) for _, end in confirmed + cancelled)
    seconds = last - figures["first_sent"]
    return {
        "orders": n,
        "confirmed": len(confirmed),
        "cancelled": len(cancelled),
        "accepted_per_s": figures["accepted_per_s"],
        "terminal_per_s": _per_second(n, seconds),
        "wall_seconds": round(seconds, 3),
        "latency_ms": {
            "accept": figures["accept"],
            "commit_to_confirmed": percentiles(_epoch(b) - _epoch(a) for a, b in confirmed),
            "commit_to_cancelled": percentiles(_epoch(b) - _epoch(a) for a, b in cancelled),
        },
    }


def _bench_user(run_id: str):
    """A staff user of this run only (deleted with its orders at the end, unless --keep)."""
    user = get_user_model()._default_manager.create_user(username=f"bench-{run_id}", is_staff=True)
    user.set_unusable_password()
    user.save(update_fields=["password"])
    return user


def _environment() -> dict:
    db = connections[Order.objects.db]
    broker = settings.CELERY_BROKER_URL.split(":", 1)[0]
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "database": db.vendor,
        "broker": broker,
        "own_world": os.environ.get(isolation.OWN_WORLD) == "1",
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load] if load else None,
        "conn_max_age": db.settings_dict.get("CONN_MAX_AGE"),
        "python": sys.version.split()[0],
        "host": socket.gethostname(),
    }


def run(options: BenchOptions) -> dict:
    """The whole benchmark; returns the report (report["ok"] says whether the run passed)."""
    if options.orders < 1 or options.concurrency < 1:
        raise BenchFailed("--orders and --concurrency must be at least 1")
    if not 0 <= options.fail_ratio < 1:
        raise BenchFailed("--fail-ratio must be in [0, 1)")
    if options.via == "api" and not (options.url or options.spawn):
        raise BenchFailed("--via api needs --url of a running web server, or --spawn")
    if (options.metrics or options.tracing or options.metrics_out) and not options.spawn:
        raise BenchFailed("--metrics, --tracing and --metrics-out set up the processes the bench starts: add --spawn")
    if options.metrics_out and not options.metrics:
        raise BenchFailed("--metrics-out needs --metrics")
    n = options.orders
    run_id = timezone.now().strftime("%Y%m%d%H%M%S") + "-" + uuid.uuid4().hex[:6]
    timeout = options.timeout or max(60.0, n / 20)
    warmup = options.concurrency if options.warmup is None else options.warmup
    log = options.log
    report: dict = {
        "run_id": run_id,
        "started_at": timezone.now().isoformat(),
        "options": options.as_dict(),
        "environment": _environment(),
    }
    workers = None
    placed: list[int] = []
    user = None
    collector = scraper = None
    try:
        if options.spawn:
            if options.baseline and not report["environment"]["own_world"]:
                isolation.check_floor_table()
            if options.tracing:
                from testing.otlp import Collector  # opentelemetry-proto: only when tracing

                collector = Collector(keep=False)
                log(f"tracing on: spans to {collector.url} (counted, not kept)")
            log(f"starting workers{' and web server' if options.via == 'api' else ''}")
            workers, url = spawn(options, run_id, otlp_url=collector.url if collector else None)
            log(f"workers ready (logs in {workers.directory})")
            if options.metrics:
                scraper = Scraper(workers.metrics_ports, interval=options.scrape_interval)
                try:
                    wait_for(scraper.answering, timeout=30, interval=0.2, what="every process group's metrics")
                except SupervisionFailed as exc:
                    raise BenchFailed(f"{exc} (logs in {workers.directory})") from exc
                scraper.start()
                ports = ", ".join(f"{group} :{port}" for group, port in scraper.endpoints.items())
                log(f"metrics on: scraping {ports} every {options.scrape_interval:g} s")
        else:
            isolation.check_workers(floor=options.baseline)
            url = options.url
        user = _bench_user(run_id)
        lines_for, stock = workload(options, run_id, n)
        report["expected"] = {"confirmed": min(stock, n), "cancelled": n - min(stock, n)}

        if options.via == "api":
            from rest_framework.authtoken.models import Token

            token = Token.objects.create(user=user).key
            keys = f"bench-{run_id}" if options.idempotency_keys else None
            report["environment"]["url"] = url

            def client_for(lines):
                return api_client(url, token, lines, keys)

        else:

            def client_for(lines):
                return service_client(user, lines)

        make_client = client_for(lines_for)

        if scraper:
            scraper.mark("warmup")
        if warmup:
            log(f"warming up: {warmup} orders{' and floor chains' if options.baseline else ''}")
            warm_lines = [{"product": product_create(run_id, "warmup", warmup, price="1.00"), "quantity": 1}]
            warm = drive(warmup, options.concurrency, None, client_for(lambda i: warm_lines))
            placed += [s.ident for s in warm if s.ident is not None]
            if any(s.error for s in warm):
                raise BenchFailed(f"warm-up failed: {next(s.error for s in warm if s.error)}")
            wait_orders([s.ident for s in warm], timeout)
            if options.baseline:
                run_floor(options, warmup, timeout)

        def measured(phase: Callable[[], dict]) -> dict:
            """Run a phase; with --spawn, add the CPU its processes and this one used, per item."""
            cpu_before = (cpu_seconds(workers) if workers else {}, time.process_time())
            figures = phase()
            if workers:
                items = figures.get("chains") or figures.get("orders")
                after = cpu_seconds(workers)
                per_process = {
                    name: round((after[name] - cpu_before[0].get(name, 0.0)) * 1000 / items, 2) for name in after
                }
                figures["cpu_ms_per_item"] = {
                    "spawned": round(sum(per_process.values()), 2),
                    "bench_process": round((time.process_time() - cpu_before[1]) * 1000 / items, 2),
                    "per_process": per_process,
                }
            return figures

        if options.baseline:
            if scraper:
                scraper.mark("floor")
            log(f"floor: {n} chains of three trivial tasks")
            report["floor"] = measured(lambda: run_floor(options, n, timeout, options.progress))
        log(f"saga: {n} orders via {options.via}")
        if scraper:
            scraper.mark("saga")
        report["saga"] = measured(
            lambda: run_saga(
                options, make_client=make_client, n=n, timeout=timeout, placed=placed, progress=options.progress
            )
        )
        if scraper:
            scraper.mark("end")
        if options.baseline and report["floor"]["done_per_s"]:
            report["ratio"] = round(report["saga"]["terminal_per_s"] / report["floor"]["done_per_s"], 3)
        violations = audit()
        report["audit"] = {"ok": not violations, "violations": [v.as_dict() for v in violations[:50]]}
        report["ok"] = not violations
    except BenchFailed as exc:
        report["ok"] = False
        report["error"] = str(exc)
    except KeyboardInterrupt:
        report["ok"] = False
        report["error"] = "interrupted"
    finally:
        if placed and not options.keep:
            # No saga of the run may still be moving when its rows are deleted, or a late
            # step would write behind the cleanup (a sale for a deleted order).
            log(f"waiting for the run's {len(placed)} orders to end before deleting them")
            try:
                wait_orders(placed, timeout)
            except (BenchFailed, KeyboardInterrupt) as exc:
                report["ok"] = False
                report["error"] = (
                    f"{report.get('error') or 'run'}; orders still moving at clean-up ({exc or 'interrupted'})"
                )
        if scraper:
            scraper.stop()
            report["metrics"] = {"interval": options.scrape_interval, "endpoints": scraper.summary()}
            if options.metrics_out:
                scraper.write(Path(options.metrics_out), run_id=run_id, options=options.as_dict())
                report["metrics"]["out"] = options.metrics_out
                log(f"metrics samples written to {options.metrics_out}")
        if workers:
            log("stopping the processes the bench started")
            workers.stop_all(warm=True)
        if collector:
            # After the processes stopped: each exports what it still batched as it ends.
            report["tracing"] = {"spans": collector.span_count, "export_requests": collector.requests}
            collector.stop()
        if options.keep:
            report["kept"] = {"run_id": run_id, "orders": len(placed)}
        elif user is not None:
            log("deleting what the run made (--keep keeps it)")
            try:
                report["deleted"] = isolation.cleanup(run_id, placed, user.pk)
            except Exception as exc:  # reported: the run must say it left data behind
                report["ok"] = False
                report["error"] = f"{report.get('error') or 'cleanup'}; cleanup failed ({type(exc).__name__}: {exc})"
        close_old_connections()
    return report
