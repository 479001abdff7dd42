"""`manage.py bench_orders`: load through the real pipeline, measured against the floor.

Orders go through the real thing: `orders.services.order_create` (``--via
service``) or ``POST /api/orders/`` on a real web server (``--via api``), the
configured broker, real `celery worker` processes and the configured
database. The bench creates its own products, with stock sized so that
``--fail-ratio`` of the orders are refused and compensated (evenly through
the run, or with ``--refusals last`` all at its end), places the orders
from ``--concurrency`` client threads (optionally paced at ``--rate`` orders
per second), waits until every order is terminal (confirmed, or deleted with a
CancelledOrder) and reports throughput, latency percentiles and the
consistency audit.

``--baseline`` also runs the floor in the same run, with the same clients,
broker, database and workers: a chain of three trivial tasks, one per service
queue, each committing one UPDATE of one row (orders/bench_tasks.py). The
saga's throughput divided by the floor's is the ratio the README reports.

Timestamps: commit→confirmed is ``Order.created_at`` → ``confirmed_at``,
commit→cancelled is ``created_at`` → ``CancelledOrder.cancelled_at``, both
written by the database's clients on this machine's clock; end-to-end rates
run from the first order sent to the last terminal timestamp.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

from celery import chain
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import close_old_connections, connections
from django.utils import timezone

from inventory import services as inventory_services
from ops.audit import audit
from project.celery import app
from project.db import service_db

from . import services
from .models import BenchFloorChain, CancelledOrder, Order

logger = logging.getLogger(__name__)

BASE_DIR = Path(settings.BASE_DIR)
BENCH_USERNAME = "bench"
CHUNK = 2000  # ids per IN (...) query


class BenchFailed(Exception):
    """The run could not finish (a client error, a timeout, a process that would not start)."""


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
    worker_pool: str = "prefork"
    worker_concurrency: int = 2
    worker_optimization: str = "fair"
    prefetch_multiplier: int = 4
    worker_loglevel: str = "INFO"
    web_workers: int = 2
    web_threads: int = 4
    web_access_log: bool = True
    log: Callable[[str], None] = field(default=lambda message: None, repr=False)

    def as_dict(self) -> dict:
        data = asdict(self)
        data.pop("log")
        return data


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


class Spawned:
    """One celery worker per service queue, and gunicorn for --via api; stopped by `stop()`."""

    def __init__(self, options: BenchOptions, run_id: str) -> None:
        self.options = options
        self.run_id = run_id
        self.directory = Path(settings.VAR_DIR) / "bench-logs" / run_id
        self.directory.mkdir(parents=True, exist_ok=True)
        self.processes: dict[str, subprocess.Popen] = {}
        self.url: str | None = None

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["CELERY_WORKER_PREFETCH_MULTIPLIER"] = str(self.options.prefetch_multiplier)
        env.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
        env["PYTHONUNBUFFERED"] = "1"
        # One bench user places every order: the per-user limit of POST /api/orders/
        # is raised out of reach, and still runs (its cache round trips are measured).
        env["ORDER_CREATE_THROTTLE"] = "1000000/min"
        return env

    def _popen(self, name: str, argv: list[str]) -> None:
        log = open(self.directory / f"{name}.log", "ab")  # noqa: SIM115 (the child keeps its own copy)
        self.processes[name] = subprocess.Popen(  # noqa: S603 (our own interpreter and fixed arguments)
            argv, cwd=BASE_DIR, env=self._env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()

    def worker_names(self) -> list[str]:
        return [f"{queue}-bench-{self.run_id}@{socket.gethostname()}" for queue in settings.SERVICE_QUEUES]

    def start(self) -> None:
        o = self.options
        for queue, name in zip(settings.SERVICE_QUEUES, self.worker_names(), strict=True):
            argv = [
                sys.executable, "-m", "celery", "-A", "project", "worker", "-Q", queue, "-n", name,
                "-P", o.worker_pool, "-c", str(o.worker_concurrency), "-l", o.worker_loglevel,
                "--without-gossip", "--without-mingle",
            ]  # fmt: skip
            if o.worker_optimization == "fair":
                argv += ["-O", "fair"]
            self._popen(f"worker-{queue}", argv)
        if o.via == "api":
            port = _free_port()
            argv = [
                sys.executable, "-m", "gunicorn", "project.wsgi", "--bind", f"127.0.0.1:{port}",
                "--workers", str(o.web_workers), "--threads", str(o.web_threads),
                "--error-logfile", "-", "--no-control-socket",
            ]  # fmt: skip
            if o.web_access_log:
                argv += ["--access-logfile", "-"]
            self._popen("web", argv)
            self.url = f"http://127.0.0.1:{port}"
        self.wait_ready()

    def _check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                tail = (self.directory / f"{name}.log").read_text(errors="replace")[-2000:]
                raise BenchFailed(f"{name} exited with {process.returncode}:\n{tail}")

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        waiting = set(self.worker_names())
        while waiting:
            self._check_alive()
            if time.monotonic() > deadline:
                raise BenchFailed(f"workers not ready after {timeout}s: {sorted(waiting)} (logs in {self.directory})")
            for reply in app.control.ping(destination=sorted(waiting), timeout=0.5) or []:
                waiting -= set(reply)
        while self.url:
            self._check_alive()
            if time.monotonic() > deadline:
                raise BenchFailed(f"web server not ready after {timeout}s (log in {self.directory})")
            try:
                parts = urlsplit(self.url)
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=2)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)

    def cpu_seconds(self) -> dict[str, float]:
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
        for name, process in self.processes.items():
            tree, grew = {process.pid}, True
            while grew:
                children = {pid for pid, (ppid, _) in stats.items() if ppid in tree} - tree
                grew = bool(children)
                tree |= children
            used[name] = sum(stats[pid][1] for pid in tree if pid in stats) / ticks
        return used

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                # The main process only: a warm shutdown stops its own pool (a
                # pool process signalled too counts as lost, and costs worker_lost_wait).
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # anything of its group left behind
        self.processes.clear()


# --- clients -----------------------------------------------------------------------


@dataclass
class Sent:
    """What one client call did: when it started (epoch s), how long it took, the id it got."""

    started: float
    seconds: float
    ident: int | None = None
    error: str | None = None


def drive(n: int, concurrency: int, rate: float | None, make_client: Callable[[], Callable[[int], int]]) -> list[Sent]:
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

    def run() -> None:
        try:
            send = make_client()
            while True:
                with lock:
                    i = next(counter, None)
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
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, name=f"bench-client-{k}", daemon=True) for k in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
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


def wait_orders(ids: list[int], timeout: float) -> None:
    """Until every order is confirmed or cancelled (deleted with its CancelledOrder)."""
    db = service_db("orders")
    open_ids = list(ids)
    deadline = time.monotonic() + timeout
    while open_ids:
        done = set()
        for chunk in _chunks(open_ids):
            done.update(
                Order.objects.using(db).filter(pk__in=chunk, status=Order.Status.CONFIRMED).values_list("pk", flat=True)
            )
            done.update(CancelledOrder.objects.using(db).filter(pk__in=chunk).values_list("pk", flat=True))
        open_ids = [i for i in open_ids if i not in done]
        if not open_ids:
            return
        if time.monotonic() > deadline:
            raise BenchFailed(
                f"{len(open_ids)} of {len(ids)} orders not terminal after {timeout:.0f}s, e.g. {open_ids[:5]}"
            )
        time.sleep(0.2)


def wait_chains(ids: list[int], timeout: float) -> None:
    db = service_db("orders")
    deadline = time.monotonic() + timeout
    while True:
        done = sum(
            BenchFloorChain.objects.using(db).filter(pk__in=chunk, done_at__isnull=False).count()
            for chunk in _chunks(ids)
        )
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


def run_floor(options: BenchOptions, n: int, timeout: float) -> dict:
    db = service_db("orders")
    rows = BenchFloorChain.objects.using(db).bulk_create([BenchFloorChain() for _ in range(n)])
    ids = [row.pk for row in rows]
    if any(i is None for i in ids):  # a backend that does not return ids from bulk inserts
        ids = list(
            BenchFloorChain.objects.using(db).filter(done_at=None).order_by("-pk").values_list("pk", flat=True)[:n]
        )
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

    sent = drive(n, options.concurrency, options.rate, make)
    figures = _client_figures(sent)
    wait_chains(ids, timeout)
    started = {s.ident: s.started for s in sent}
    done = dict(BenchFloorChain.objects.using(db).filter(pk__in=ids).values_list("pk", "done_at"))
    for chunk in _chunks(ids):
        BenchFloorChain.objects.using(db).filter(pk__in=chunk).delete()
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


def refused_orders(n: int, fail_ratio: float) -> set[int]:
    """The orders, of 0..n-1, that ``--refusals spread`` places for a sold-out product.

    round(n × fail_ratio) of them, evenly through the run: order ⌊(j + ½)·n/k⌋
    for each j of the k.
    """
    k = n - round(n * (1 - fail_ratio))
    return {int((j + 0.5) * n / k) for j in range(k)}


def _workload(options: BenchOptions, run_id: str, n: int) -> tuple[Callable[[int], list[dict]], int]:
    """Products for `n` orders of one unit each, and order i's lines; returns those and the stock made.

    Stock is sized so that round(n × fail_ratio) orders are refused: with
    ``--refusals spread`` the refused ones order a product made with no stock
    (a sold-out item) and every other order's product has stock for exactly
    its orders; with ``last`` all orders go round robin and each product has
    stock for all but about fail_ratio of its orders, so the last of each
    product's orders are refused and every refusal and its compensation comes
    in the last tenth of the run (the first three sessions' workload).
    """
    refused = refused_orders(n, options.fail_ratio) if options.refusals == "spread" else set()
    served = [i for i in range(n) if i not in refused]
    count = max(1, min(options.products, len(served)))
    demand = [0] * count
    for position in range(len(served)):
        demand[position % count] += 1
    if options.refusals == "spread":
        stocks = demand
    else:
        allowed = round(n * (1 - options.fail_ratio))
        stocks = [wanted * allowed // n for wanted in demand]
        for k in range(count):  # what the rounding down left, one unit each
            if sum(stocks) < allowed and stocks[k] < demand[k]:
                stocks[k] += 1

    def create(k: int | str, stock: int) -> int:
        return inventory_services.product_create(
            sku=f"BENCH-{run_id}-{k}", name=f"Bench product {k} ({run_id})", price=Decimal("9.99"), stock=stock
        ).pk

    ids = [create(k, stock) for k, stock in enumerate(stocks)]
    product_of = {i: ids[position % count] for position, i in enumerate(served)}
    if refused:
        sold_out = create("sold-out", 0)
        product_of.update(dict.fromkeys(refused, sold_out))

    def lines_for(i: int) -> list[dict]:
        return [{"product": product_of[i], "quantity": 1}]

    return lines_for, sum(stocks)


def run_saga(options: BenchOptions, *, make_client, n: int, timeout: float) -> dict:
    sent = drive(n, options.concurrency, options.rate, make_client)
    figures = _client_figures(sent)
    ids = sorted(s.ident for s in sent)
    if len(set(ids)) != n:
        raise BenchFailed(f"{n} orders sent but {len(set(ids))} distinct order ids came back")
    wait_orders(ids, timeout)
    db = service_db("orders")
    confirmed, cancelled = [], []
    for chunk in _chunks(ids):
        rows = Order.objects.using(db).filter(pk__in=chunk, status=Order.Status.CONFIRMED)
        confirmed += rows.values_list("created_at", "confirmed_at")
        cancelled += CancelledOrder.objects.using(db).filter(pk__in=chunk).values_list("created_at", "cancelled_at")
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


def _bench_user():
    user_model = get_user_model()
    user, created = user_model._default_manager.get_or_create(
        **{user_model.USERNAME_FIELD: BENCH_USERNAME}, defaults={"is_staff": True}
    )
    if created:
        user.set_unusable_password()
        user.save()
    elif not user.is_staff:
        user.is_staff = True
        user.save(update_fields=["is_staff"])
    return user


def _environment() -> dict:
    db = connections[service_db("orders")]
    broker = settings.CELERY_BROKER_URL.split(":", 1)[0]
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "database": db.vendor,
        "broker": broker,
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
    spawned = Spawned(options, run_id) if options.spawn else None
    try:
        if spawned:
            log(f"starting workers{' and web server' if options.via == 'api' else ''} (logs in {spawned.directory})")
            spawned.start()
        user = _bench_user()
        lines_for, stock = _workload(options, run_id, n)
        report["expected"] = {"confirmed": min(stock, n), "cancelled": n - min(stock, n)}

        if options.via == "api":
            from rest_framework.authtoken.models import Token

            token = Token.objects.using(service_db("orders")).get_or_create(user=user)[0].key
            url = options.url or spawned.url
            keys = f"bench-{run_id}" if options.idempotency_keys else None
            report["environment"]["url"] = url

            def client_for(lines):
                return api_client(url, token, lines, keys)

        else:

            def client_for(lines):
                return service_client(user, lines)

        make_client = client_for(lines_for)

        if warmup:
            log(f"warming up: {warmup} orders{' and floor chains' if options.baseline else ''}")
            spare = inventory_services.product_create(
                sku=f"BENCH-{run_id}-warmup", name=f"Bench warm-up ({run_id})", price=Decimal("1.00"), stock=warmup
            )
            warm_lines = [{"product": spare.pk, "quantity": 1}]
            warm = drive(warmup, options.concurrency, None, client_for(lambda i: warm_lines))
            if any(s.error for s in warm):
                raise BenchFailed(f"warm-up failed: {next(s.error for s in warm if s.error)}")
            wait_orders([s.ident for s in warm], timeout)
            if options.baseline:
                run_floor(options, warmup, timeout)

        def measured(phase: Callable[[], dict]) -> dict:
            """Run a phase; with --spawn, add the CPU its processes and this one used, per item."""
            cpu_before = (spawned.cpu_seconds() if spawned else {}, time.process_time())
            figures = phase()
            if spawned:
                items = figures.get("chains") or figures.get("orders")
                after = spawned.cpu_seconds()
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
            log(f"floor: {n} chains of three trivial tasks")
            report["floor"] = measured(lambda: run_floor(options, n, timeout))
        log(f"saga: {n} orders via {options.via}")
        report["saga"] = measured(lambda: run_saga(options, make_client=make_client, n=n, timeout=timeout))
        if options.baseline and report["floor"]["done_per_s"]:
            report["ratio"] = round(report["saga"]["terminal_per_s"] / report["floor"]["done_per_s"], 3)
        violations = audit()
        report["audit"] = {"ok": not violations, "violations": [v.as_dict() for v in violations[:50]]}
        report["ok"] = not violations
    except BenchFailed as exc:
        report["ok"] = False
        report["error"] = str(exc)
    finally:
        if spawned:
            log("stopping the processes the bench started")
            spawned.stop()
        close_old_connections()
    return report
