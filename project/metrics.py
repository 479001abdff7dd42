"""The Prometheus metrics every process counts, and the exporter a worker's main process serves.

Counting is prometheus-client's multiprocess mode: every process that counts
(gunicorn's workers, Celery's pool processes) writes its own file under
PROMETHEUS_MULTIPROC_DIR, and one exporter per process group merges them on
each scrape, so a pool process that is replaced (max tasks, a kill) loses no
count. gunicorn's master serves the web's (gunicorn.conf.py); a worker's main
process serves its own (`serve_worker`, from project/celery.py); beat, one
process, serves the publishes of its sweeps (`serve_beat`). Nothing is
served unless METRICS_PORT is set, and then on METRICS_ADDRESS (127.0.0.1 by
default): docs/operations.md, "Metrics".

State changes are counted once their transaction commits (the services call
the counting functions through project.db.after_commit), so a rolled-back change or a duplicate
delivery that changed nothing is not counted.
"""

import logging
import os
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from celery.signals import (
    beat_init,
    task_postrun,
    task_prerun,
    task_retry,
    worker_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

logger = logging.getLogger(__name__)

#: Multiprocess mode is on when the launcher set this (prometheus-client reads it as it loads).
MULTIPROC_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

if os.environ.get(MULTIPROC_DIR_VARIABLE):
    # prometheus-client opens its files there as the first metric below is made: a folder missing
    # (a fresh var/, a container's first start) would stop the process from loading.
    os.makedirs(os.environ[MULTIPROC_DIR_VARIABLE], exist_ok=True)

# Order latencies span milliseconds (an idle system: commit->confirmed p50 about 13 ms, p99 about
# 40 ms at 50 orders/s here, docs/performance.md) to the order deadline (hours).
LATENCY_BUCKETS = (
    0.005, 0.01, 0.015, 0.025, 0.04, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 10800, float("inf"),
)  # fmt: skip
# A step is one or two statements and a publish: milliseconds, seconds when a lock is waited for.
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 90, float("inf"))
# A publish is bounded by BROKER_PUBLISH_TIMEOUT_SECONDS (1 s by default).
PUBLISH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, float("inf"))

# --- orders -------------------------------------------------------------------------------------

ORDERS_PLACED = Counter("orderflow_orders_placed_total", "Orders committed by order_create (not idempotent replays).")
ORDERS_CONFIRMED = Counter("orderflow_orders_confirmed_total", "Orders that became confirmed (pending -> confirmed).")
ORDERS_CANCELLED = Counter(
    "orderflow_orders_cancelled_total",
    "Orders deleted by compensation, a CancelledOrder kept, by cause class (docs/design.md, Outcomes).",
    ["cause"],
)
CONFIRMED_LATENCY = Histogram(
    "orderflow_order_confirmed_latency_seconds",
    "From the order's commit (created_at) to its confirm's commit, by the confirming worker's clock.",
    buckets=LATENCY_BUCKETS,
)
CANCELLED_LATENCY = Histogram(
    "orderflow_order_cancelled_latency_seconds",
    "From the order's commit (created_at) to its deletion (compensation's last step) committing, by cause class.",
    ["cause"],
    buckets=LATENCY_BUCKETS,
)

# --- saga steps and undo tasks (project.saga.SagaStep; counted by Celery's signals) ----------------

STEP_RUNS = Counter(
    "orderflow_saga_task_runs_total",
    "Runs of saga step and undo tasks by how they ended: succeeded, retried, failed, skipped (aborted), rejected.",
    ["task", "outcome"],
)
STEP_FAILURES = Counter(
    "orderflow_saga_task_failures_total",
    "Steps that failed for good, by cause class (refused, deadline, infrastructure; unhandled: none recorded).",
    ["task", "cause"],
)
STEP_RETRIES = Counter(
    "orderflow_saga_task_retries_total",
    "Retries of saga tasks after a passing fault, by the fault's exception class.",
    ["task", "exception"],
)
STEP_DURATION = Histogram(
    "orderflow_saga_task_duration_seconds", "Time a saga task ran, however it ended.", ["task"], buckets=STEP_BUCKETS
)

# --- the sweeper (orders.services.saga_sweep) -------------------------------------------------------

SWEEP_ACTIONS = Counter(
    "orderflow_sweeper_actions_total",
    "What the saga sweeper did: published, expired, redispatched, recompensated, deferred, skipped.",
    ["action"],
)
SWEEP_ACTION_KINDS = ("published", "expired", "redispatched", "recompensated", "deferred", "skipped")

# --- publishing (project.broker_publish) ------------------------------------------------------------

PUBLISH_DURATION = Histogram(
    "orderflow_broker_publish_duration_seconds",
    "Time to publish a task message (with RabbitMQ: until it confirmed), failed ones included.",
    ["task"],
    buckets=PUBLISH_BUCKETS,
)
PUBLISH_FAILURES = Counter(
    "orderflow_broker_publish_failures_total",
    "Task publishes that failed: timeout (BROKER_PUBLISH_TIMEOUT_SECONDS), blocked, unavailable, refused.",
    ["task", "reason"],
)


def enabled() -> bool:
    """Whether this process counts for an exporter (multiprocess mode, PROMETHEUS_MULTIPROC_DIR set).

    Without it the services register no counting callbacks and make no reads
    for them: nothing would serve the counts.
    """
    return bool(os.environ.get(MULTIPROC_DIR_VARIABLE))


# --- counting --------------------------------------------------------------------------------------


def _seconds_since(moment: datetime | None) -> float | None:
    return None if moment is None else max(time.time() - moment.timestamp(), 0.0)


def order_placed() -> None:
    ORDERS_PLACED.inc()


def order_confirmed(created_at: datetime | None) -> None:
    """Count a confirm; `created_at` (aware datetime, None: unknown) gives its commit->confirmed latency."""
    ORDERS_CONFIRMED.inc()
    seconds = _seconds_since(created_at)
    if seconds is not None:
        CONFIRMED_LATENCY.observe(seconds)


def order_cancelled(cause: str, created_at: datetime | None) -> None:
    """Count a cancelled order of `cause` (a CancelCause value); `created_at` gives its commit->cancelled latency."""
    ORDERS_CANCELLED.labels(cause=cause).inc()
    seconds = _seconds_since(created_at)
    if seconds is not None:
        CANCELLED_LATENCY.labels(cause=cause).observe(seconds)


def sweep_counted(counts: dict[str, int] | None) -> None:
    """Count one sweep's actions (orders.services.saga_sweep's answer; None: the sweep was skipped on a fault)."""
    for action, count in (counts or {}).items():
        if count and action in SWEEP_ACTION_KINDS:
            SWEEP_ACTIONS.labels(action=action).inc(count)


#: The cause classes of a cancelled order (project.saga.CAUSES, which imports what imports this module;
#: tests/test_metrics.py holds the two equal): the `cause` label's values.
CANCEL_CAUSES = ("refused", "user", "deadline", "infrastructure")
#: How a publish fails (project.broker_publish._failure_kind): the `reason` label's values.
PUBLISH_FAILURE_REASONS = ("timeout", "blocked", "unavailable", "refused")
#: Saga causes a step can fail for (project.saga.SagaStep._fail), and "unhandled": no cause recorded
#: (an exception Celery saw before the step could classify it: a hard time limit, a bug in a signal).
STEP_FAILURE_CAUSES = ("refused", "deadline", "infrastructure", "unhandled")
_zeroed_tasks: set[str] = set()


def zero_series(causes: tuple[str, ...]) -> None:
    """Create at 0 the series alerts and panels take ``increase()``/``rate()`` of, before anything counts.

    A labelled counter has no series until its first ``inc()``, and a series
    that first appears at 1 has an increase of 0: the first infrastructure
    cancel after a start would never fire OrderflowInfrastructureCancels
    (prometheus-client's docs: "Metrics with labels are not initialized when
    declared", https://prometheus.github.io/client_python/instrumenting/labels/).
    `causes`: every cause class (CANCEL_CAUSES). Called once per
    process group as it starts (a worker's main process before it forks).
    """
    for cause in causes:
        ORDERS_CANCELLED.labels(cause=cause)
        CANCELLED_LATENCY.labels(cause=cause)
    for action in SWEEP_ACTION_KINDS:
        SWEEP_ACTIONS.labels(action=action)


def _zero_task(task: str, *, step: bool) -> None:
    """A task's failure series at 0 the first time this process sees it (publishes every reason; a step every cause)."""
    if task in _zeroed_tasks:
        return
    _zeroed_tasks.add(task)
    for reason in PUBLISH_FAILURE_REASONS:
        PUBLISH_FAILURES.labels(task=task, reason=reason)
    if step:
        for cause in STEP_FAILURE_CAUSES:
            STEP_FAILURES.labels(task=task, cause=cause)


def publish_ended(task: str, seconds: float, failure: str | None = None) -> None:
    """Count a task publish that took `seconds`; `failure` is why it failed (timeout, blocked, unavailable, refused)."""
    _zero_task(task, step=False)
    PUBLISH_DURATION.labels(task=task).observe(seconds)
    if failure:
        PUBLISH_FAILURES.labels(task=task, reason=failure).inc()


# --- serving ---------------------------------------------------------------------------------------


def empty_dir(*, keep_pid: int | None = None) -> None:
    """Remove the counts a previous run of this process group left in PROMETHEUS_MULTIPROC_DIR (made if missing).

    `keep_pid`: the files of that process (the caller's own, made as its
    modules loaded) stay. Called as the group starts, before it forks.
    """
    directory = os.environ.get(MULTIPROC_DIR_VARIABLE)
    if not directory:
        return
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    for file in path.glob("*.db"):
        if keep_pid is None or not file.stem.endswith(f"_{keep_pid}"):
            file.unlink(missing_ok=True)


def process_dead(pid: int) -> None:
    """prometheus-client's `mark_process_dead` for a pool process or gunicorn worker that exited."""
    if enabled():
        mark_process_dead(pid)


def registry(*collectors: Any) -> CollectorRegistry:
    """A registry merging every process's files (MultiProcessCollector), plus `collectors` read at scrape time."""
    merged = CollectorRegistry()
    MultiProcessCollector(merged)
    for collector in collectors:
        merged.register(collector)
    return merged


def serve(port: int, address: str, *collectors: Any) -> Any:
    """Serve the merged metrics over HTTP on `address`:`port` from a thread; returns the server (``.shutdown()``).

    Raises OSError when the port is taken.
    """
    server, _thread = start_http_server(port, addr=address, registry=registry(*collectors))
    logger.info("metrics served on http://%s:%s/metrics", address, port)
    return server


class QueueDepthCollector:
    """``orderflow_broker_queue_messages{queue}``: messages ready in each named queue, asked of the broker per scrape.

    A passive declare per queue on one connection, within BROKER_PUBLISH_TIMEOUT_SECONDS
    (connect and each reply); a queue the broker cannot answer for in time is left out
    of that scrape. On the embedded filesystem broker kombu counts the queue's files.
    """

    def __init__(self, app: Any, queues: list[str]) -> None:
        self.app = app
        self.queues = queues

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from django.conf import settings

        family = GaugeMetricFamily(
            "orderflow_broker_queue_messages", "Messages ready in a queue, as the broker tells it.", labels=["queue"]
        )
        timeout = settings.BROKER_PUBLISH_TIMEOUT_SECONDS
        try:
            with self.app.connection_for_read(connect_timeout=timeout) as connection:
                connection.ensure_connection(max_retries=0, timeout=timeout)
                transport = getattr(connection.connection, "transport", None)
                if getattr(transport, "sock", None) is not None:
                    transport.sock.settimeout(timeout)
                for name in self.queues:
                    try:
                        with connection.channel() as channel:
                            family.add_metric([name], channel.queue_declare(queue=name, passive=True).message_count)
                    except connection.channel_errors:  # not declared yet
                        continue
        except Exception as exc:  # the scrape still answers with everything else
            logger.info("queue depth not read: %s", exc)
        yield family


def serve_worker(consumer: Any) -> Any:
    """Serve a Celery worker's metrics from its main process (worker_ready), or nothing without METRICS_PORT.

    `consumer` is the worker's Consumer (the worker_ready signal's sender): its
    queues are the ones whose depth is served. The orders worker also serves
    the order gauges (orders.metrics, read from its database at scrape time).
    """
    from django.conf import settings
    from django.utils.module_loading import import_string

    port = settings.METRICS_PORT
    if not port:
        return None
    if not enabled():
        logger.error("METRICS_PORT is set but %s is not: metrics not served", MULTIPROC_DIR_VARIABLE)
        return None
    app = consumer.app
    queues = sorted(app.amqp.queues.consume_from)
    collectors: list[Any] = [QueueDepthCollector(app, queues)]
    if "orders" in queues:
        # By name: the kernel imports no service (.importlinter).
        collectors.append(import_string("orders.metrics.OrderStateCollector")())
    return serve(port, settings.METRICS_ADDRESS, *collectors)


def serve_beat() -> Any:
    """Serve celery beat's metrics (its publishes: the sweeps), or nothing without METRICS_PORT.

    Beat is one process and forks nothing: its multiprocess folder holds its
    own files only, emptied of a previous run's first. The exporter's thread
    is a daemon's and ends with the process. Raises OSError when the port is taken.
    """
    from django.conf import settings

    port = settings.METRICS_PORT
    if not port:
        return None
    if not enabled():
        logger.error("METRICS_PORT is set but %s is not: metrics not served", MULTIPROC_DIR_VARIABLE)
        return None
    empty_dir(keep_pid=os.getpid())
    return serve(port, settings.METRICS_ADDRESS)


# --- Celery's signals: saga tasks, and the exporter's life in a worker --------------------------------
# Connected when project/celery.py imports this module; they do nothing for tasks that are not saga
# steps, and a worker serves nothing without METRICS_PORT.

_started: dict[str, float] = {}  # task id -> perf_counter at its start, in the process that runs it
_server: list[Any] = []  # the worker's exporter, shut down with it

# Celery's end states of a run, as the `outcome` label says them.
_OUTCOMES = {"SUCCESS": "succeeded", "RETRY": "retried", "FAILURE": "failed", "REJECTED": "rejected"}


def _is_saga_task(task: Any) -> bool:
    return callable(getattr(task, "run_step", None))  # project.saga.SagaStep, without importing it here


@task_prerun.connect
def _step_started(sender=None, task_id=None, task=None, **kwargs):
    if _is_saga_task(task) and task_id:
        _zero_task(task.name, step=True)
        _started[task_id] = time.perf_counter()


@task_postrun.connect
def _step_ended(sender=None, task_id=None, task=None, state=None, **kwargs):
    if not _is_saga_task(task):
        return
    started = _started.pop(task_id, None)
    if started is not None:
        STEP_DURATION.labels(task=task.name).observe(time.perf_counter() - started)
    # SagaStep._fail puts the cause class on the request; an Ignore without one is an abort (SagaAborted).
    cause = getattr(task.request, "saga_cause", None)
    outcome = _OUTCOMES.get(state or "", "failed")
    if state == "IGNORED":
        outcome = "failed" if cause else "skipped"
    STEP_RUNS.labels(task=task.name, outcome=outcome).inc()
    if outcome == "failed":
        STEP_FAILURES.labels(task=task.name, cause=cause or "unhandled").inc()


@task_retry.connect
def _step_retried(sender=None, reason=None, **kwargs):
    if _is_saga_task(sender):
        exc = getattr(reason, "exc", None) or reason  # a Retry carries the fault it retries
        STEP_RETRIES.labels(task=sender.name, exception=type(exc).__name__).inc()


@worker_init.connect
def _empty_at_worker_start(sender=None, **kwargs):
    # Before the pool forks: the counts of this worker's previous run go; this process's own files,
    # made as its modules loaded, stay.
    empty_dir(keep_pid=os.getpid())
    zero_series(CANCEL_CAUSES)


@worker_ready.connect
def _serve_at_worker_ready(sender=None, **kwargs):
    server = serve_worker(sender)
    if server is not None:
        _server.append(server)


@worker_shutdown.connect
def _stop_serving(sender=None, **kwargs):
    while _server:
        _server.pop().shutdown()


@beat_init.connect
def _serve_at_beat_start(sender=None, **kwargs):
    server = serve_beat()
    if server is not None:
        _server.append(server)


@worker_process_shutdown.connect
def _pool_process_exits(sender=None, pid=None, **kwargs):
    process_dead(pid or os.getpid())
