"""LOG_FORMAT=json: one JSON object per line, with the task context in workers (project/logging.py)."""

import contextlib
import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
import urllib.request
import uuid

import pytest
from kombu import Queue

from project.celery import app
from project.logging import JsonFormatter, RoutineTaskFilter, TaskContextFilter
from project.saga import SagaStep
from testing import BASE_DIR, Workers, signed, wait_for

REQUIRED = {"timestamp", "level", "logger", "message", "process", "pid"}


def capture(logger_name: str) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(TaskContextFilter())
    logger = logging.getLogger(logger_name)
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, stream


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_record_is_one_json_line_with_the_required_fields():
    logger, stream = capture(f"test.logging.{uuid.uuid4().hex}")

    try:
        raise ValueError("line one\nline two")
    except ValueError:
        logger.exception("it broke for order %s", 7, extra={"product_id": 3})

    assert len(stream.getvalue().splitlines()) == 1  # the traceback's newlines are escaped
    [entry] = lines(stream)
    assert set(entry) >= REQUIRED
    assert entry["level"] == "ERROR"
    assert entry["message"] == "it broke for order 7"
    assert entry["product_id"] == 3  # extra= fields are kept
    assert "ValueError: line one\\nline two" in json.dumps(entry["exception"])
    assert entry["timestamp"].endswith("+00:00")
    assert (entry["process"], entry["pid"]) == ("MainProcess", os.getpid())
    assert "task_id" not in entry  # not inside a task


def test_inside_a_saga_step_the_task_order_and_step_are_added():
    logger, stream = capture(f"test.logging.{uuid.uuid4().hex}")
    name = f"testsvc.step_{uuid.uuid4().hex[:8]}"

    @app.task(bind=True, base=SagaStep, name=name)
    def step(self, order_id):
        logger.info("working on it")

    try:
        # apply() runs the task here with a real request context (not a saga test: no chain, no errback).
        result = step.apply(kwargs={"order_id": 42}, task_id="tid-1")
    finally:
        app.tasks.unregister(name)

    assert result.successful()
    [entry] = lines(stream)
    assert entry["message"] == "working on it"
    assert entry["task_name"] == name
    assert entry["task_id"] == "tid-1"
    assert entry["order_id"] == 42
    assert entry["saga_step"] == name.rpartition(".")[2]


def test_a_plain_task_gets_no_saga_step_and_a_bad_order_id_is_left_out():
    logger, stream = capture(f"test.logging.{uuid.uuid4().hex}")
    name = f"testsvc.plain_{uuid.uuid4().hex[:8]}"

    @app.task(name=name)
    def plain(order_id=None):
        logger.info("plain")

    try:
        plain.apply(kwargs={"order_id": "DROP TABLE"}, task_id="tid-2")
    finally:
        app.tasks.unregister(name)

    [entry] = lines(stream)
    assert entry["task_name"] == name
    assert entry["task_id"] == "tid-2"
    assert "order_id" not in entry
    assert "saga_step" not in entry


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "DJANGO_SETTINGS_MODULE": "project.settings", "PYTHONUNBUFFERED": "1", **extra}


def test_settings_wire_json_logs_into_every_django_process():
    code = "import django, logging; django.setup(); logging.getLogger('orders.services').warning('hello %s', 1)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=BASE_DIR, env=_env(LOG_FORMAT="json"),
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip

    entries = [json.loads(line) for line in result.stderr.splitlines()]
    assert [e["message"] for e in entries] == ["hello 1"]
    assert entries[0]["logger"] == "orders.services"
    assert set(entries[0]) >= REQUIRED


def test_an_unknown_log_format_is_refused():
    result = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"], cwd=BASE_DIR, env=_env(LOG_FORMAT="xml"),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip

    assert result.returncode != 0
    assert "LOG_FORMAT='xml'" in result.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_gunicorn_logs_json_lines_including_its_access_log(tmp_path):
    port = _free_port()
    out, err = tmp_path / "out.log", tmp_path / "err.log"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "project.wsgi", "--bind", f"127.0.0.1:{port}", "--workers", "1",
             "--access-logfile", "-", "--error-logfile", "-", "--no-control-socket"],
            cwd=BASE_DIR, env=_env(LOG_FORMAT="json"), stdout=stdout, stderr=stderr, start_new_session=True,
        )  # fmt: skip
        try:

            def answers():
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                        return response.status == 200
                except OSError:
                    return False

            wait_for(answers, timeout=30, interval=0.2, what="gunicorn")
            wait_for(lambda: "/healthz" in out.read_text(), timeout=10, what="the access log line")
        finally:
            os.killpg(process.pid, 15)
            process.wait(timeout=20)

    entries = [json.loads(line) for line in (out.read_text() + err.read_text()).splitlines() if line.strip()]
    access = [e for e in entries if e["logger"] == "gunicorn.access"]
    assert access, entries
    assert access[-1]["path"] == "/healthz"
    assert access[-1]["status"] == 200
    assert access[-1]["method"] == "GET"
    assert any(e["logger"] == "gunicorn.error" for e in entries)
    assert all(set(e) >= REQUIRED for e in entries)


@pytest.mark.saga
def test_a_real_worker_logs_the_task_order_and_step(transactional_db, tmp_path, monkeypatch):
    """A worker process with LOG_FORMAT=json, on a queue of its own, running a real saga step."""
    monkeypatch.setenv("LOG_FORMAT", "json")
    monkeypatch.setenv("WORKER_SERVICES", "orders")  # its queue is no service's (project/admission.py)
    queue = f"logtest-{uuid.uuid4().hex[:8]}"
    workers = Workers(tmp_path)
    workers.start(queue, concurrency=1)
    try:
        workers.wait_ready(queue)
        # No such order: the step logs that it skipped and stops, writing nothing.
        task_id = str(uuid.uuid4())
        kwargs = signed("orders.order_confirm", {"order_id": 987654})
        app.send_task("orders.order_confirm", kwargs=kwargs, task_id=task_id, queue=Queue(queue))

        def step_logged():
            for line in workers.log(queue).splitlines():
                entry = json.loads(line) if line.startswith("{") else {}
                if entry.get("task_id") == task_id and "skipped" in entry.get("message", ""):
                    return entry
            return None

        entry = wait_for(step_logged, timeout=30, what="the step's log line")
    finally:
        workers.stop(queue)
        with app.connection_for_write() as connection, contextlib.suppress(Exception):
            Queue(queue).bind(connection.default_channel).delete()  # leave nothing behind on RabbitMQ

    assert entry["task_name"] == "orders.order_confirm"
    assert entry["order_id"] == 987654
    assert entry["saga_step"] == "order_confirm"
    assert entry["logger"] == "orderflow.saga"
    # Every log record the worker wrote is a JSON object, its pool's too (the SIGTERM
    # above ends the pool process with an error record). Celery's start banner and
    # shutdown notices are printed, not logged (`celery --quiet` drops the banner).
    log = workers.log(queue)
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert all(set(record) >= REQUIRED for record in records)
    assert any(record["logger"] == "celery.apps.worker" for record in records)
    assert not re.search(r"^\[\d{4}-\d\d-\d\d ", log, re.MULTILINE), "a record in Celery's plain format"


def test_the_workers_own_task_records_carry_the_task_outside_it():
    logger, stream = capture(f"test.logging.{uuid.uuid4().hex}")

    logger.info("Task x[abc] received", extra={"data": {"id": "abc", "name": "inventory.stock_reserve", "kwargs": {}}})

    [entry] = lines(stream)
    assert entry["task_id"] == "abc"
    assert entry["task_name"] == "inventory.stock_reserve"


def test_the_workers_received_record_names_the_order_and_hides_the_proof():
    # What Celery passes: the arguments' repr (celery.worker.request.Request.info(safe=True)).
    logger, stream = capture(f"test.logging.{uuid.uuid4().hex}")
    kwargs = "{'order_id': 42, 'lines': [{'product': 3, 'quantity': 1}], 'proof': 'c2VjcmV0LWhtYWM='}"
    data = {"id": "abc", "name": "inventory.stock_reserve", "kwargs": kwargs}

    logger.info("Task x[abc] received", extra={"data": data})

    [entry] = lines(stream)
    assert entry["order_id"] == 42
    assert "c2VjcmV0LWhtYWM" not in json.dumps(entry)
    assert "'proof': '…'" in entry["data"]["kwargs"]


# --- the routine sweep stays quiet at INFO -------------------------------------------------


def _record(name: str, level: int, msg: str, args=(), **extra) -> logging.LogRecord:
    record = logging.LogRecord(name, level, __file__, 1, msg, args, None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


@pytest.mark.parametrize(
    "record",
    [
        _record(
            "celery.beat",
            logging.INFO,
            "Scheduler: Sending due task %s (%s)",
            ("orders.saga_sweep", "orders.saga_sweep"),
        ),
        _record(
            "celery.worker.strategy",
            logging.INFO,
            "Task %(name)s[%(id)s] received",
            data={"name": "orders.saga_sweep", "id": "x"},
        ),
        _record(
            "celery.app.trace",
            logging.INFO,
            "Task %(name)s[%(id)s] succeeded",
            data={"name": "orders.saga_sweep", "id": "x"},
        ),
    ],
    ids=["beat-sends", "worker-receives", "task-succeeds"],
)
def test_the_routine_sweep_is_silent_at_info(record):
    assert RoutineTaskFilter().filter(record) is False


@pytest.mark.parametrize(
    "record",
    [
        _record(
            "celery.worker.strategy", logging.INFO, "Task received", data={"name": "inventory.stock_reserve", "id": "x"}
        ),
        _record("celery.app.trace", logging.ERROR, "Task failed", data={"name": "orders.saga_sweep", "id": "x"}),
        _record("orders.services", logging.WARNING, "saga sweep: %s", ({"redispatched": 1},)),
        _record("celery.beat", logging.INFO, "beat: Starting..."),
    ],
    ids=["other-task", "sweep-error", "sweep-found-something", "beat-start"],
)
def test_everything_else_is_kept(record):
    assert RoutineTaskFilter().filter(record) is True


# A process traced as tracing.setup traces it, exporting to a port nothing listens on: `batches` export
# batches fail, then, once the interval has passed, `more` others. It prints how many lines were held back.
_UNREACHABLE_COLLECTOR = """
import json, sys, time
import django
django.setup()
from opentelemetry import trace
from project import tracing

tracing.EXPORT_FAILURE_INTERVAL_SECONDS = {interval}
assert tracing.setup("worker")
tracer = trace.get_tracer("test")
started = time.monotonic()
for batches in ({batches}, {more}):
    for number in range(batches):
        with tracer.start_as_current_span(f"span {{number}}"):
            pass
        trace.get_tracer_provider().force_flush()  # one export batch, which fails
    if batches == {batches}:
        assert time.monotonic() - started < {interval}, "the first batches took longer than the interval"
        time.sleep({interval} + 0.2)
tracing.shutdown()
print(json.dumps({{"held": tracing.export_failures.held_total}}))
"""


def test_an_unreachable_collector_is_one_warning_a_minute_not_a_line_per_batch():
    """OTLP export to a closed port: the exporter logs an error for every batch (and a warning per retry);
    one warning goes through, then one an interval (60 s; 3 s here) saying how many were held back."""
    closed = _free_port()  # bound, then closed: nothing listens there
    code = _UNREACHABLE_COLLECTOR.format(interval=3, batches=30, more=5)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=BASE_DIR, capture_output=True, text=True, timeout=120,
        env=_env(
            LOG_FORMAT="json", OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{closed}",
            OTEL_EXPORTER_OTLP_TIMEOUT="0.5",  # seconds: each batch gives up at once, no backoff
        ),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr

    entries = [json.loads(line) for line in result.stderr.splitlines()]
    assert all(set(e) >= REQUIRED for e in entries)
    exporting = [e for e in entries if e["logger"].startswith("opentelemetry")]
    assert [e["level"] for e in exporting] == ["WARNING", "WARNING"], exporting
    assert all("exception" not in e for e in exporting)
    first, later = (e["message"] for e in exporting)
    assert "Failed to export spans batch" in first
    assert first.endswith("(further span export failures are logged at most once every 3 s)")
    held = int(re.search(r"\((\d+) more span export failure lines held back since the last one; ", later).group(1))
    assert later.endswith("; logged at most once every 3 s)")
    assert held >= 29  # every other batch of the first 30 failed too, each logging at least once
    total = json.loads(result.stdout)["held"]
    assert total >= 29 + 4, total  # 35 batches failed; 2 lines were written
