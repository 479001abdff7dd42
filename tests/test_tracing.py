"""One OpenTelemetry trace per order, from the POST through every step, with log lines that join up (issue 17).

The web part runs in this process (the API through Django's test client, with
tracing set up as gunicorn's post_fork sets it up); the steps run in real
`celery worker` processes on the configured broker and database, started
with OTEL_EXPORTER_OTLP_ENDPOINT pointing at `testing.otlp.Collector`, a small
OTLP/HTTP receiver that decodes what the exporters send with opentelemetry-proto.
Nothing is mocked: the trace context crosses the broker in the messages'
headers as it does in production.
"""

import json
import os
import socket
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest
from django.conf import settings
from django.db import connection
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from rest_framework.authtoken.models import Token

from ops.audit import audit
from orders.models import CancelledOrder, Order, SweepLease
from orders.services import saga_sweep
from project import logging as log_context
from project import tracing
from testing import Workers, purge_queues, quiesce, wait_for
from testing import workers as supervision
from testing.otlp import Collector, Span

pytestmark = [pytest.mark.saga, pytest.mark.faults, pytest.mark.timeout(240)]

ORDERS = "/api/orders/"


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    collector = Collector()
    yield collector
    collector.stop()


@pytest.fixture(scope="module")
def traced(collector, django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[Workers]:
    """Workers exporting to `collector` and writing JSON logs; this process traced as a web process is.

    The session's own workers (testing.plugin), if a test started them, are
    stopped first: two workers per queue would split the messages. A later
    `workers` test starts them again.
    """
    from testing import plugin

    for session_workers in plugin._SESSION_WORKERS:
        for queue in settings.SERVICE_QUEUES:
            session_workers.stop(queue)
    otel = {
        tracing.ENDPOINT_VARIABLE: collector.url,
        # Export within a fifth of a second, not the default 5 s: the test waits for the spans.
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    with django_db_blocker.unblock():
        env = supervision.test_environment() | otel | {"LOG_FORMAT": "json"}
        workers = Workers(tmp_path_factory.mktemp("traced-workers"), env=env)
    saved = {key: os.environ.get(key) for key in otel}
    os.environ.update(otel)
    assert tracing.setup("web")
    try:
        workers.start_services()
        yield workers
    finally:
        workers.stop_all()
        _untrace_this_process()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _untrace_this_process() -> None:
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.instrumentation.django import DjangoInstrumentor
    from opentelemetry.instrumentation.psycopg2 import Psycopg2Instrumentor

    tracing.shutdown()
    for instrumentor in (CeleryInstrumentor(), DjangoInstrumentor(), Psycopg2Instrumentor()):
        instrumentor.uninstrument()


@pytest.fixture
def workers(traced, transactional_db, settings) -> Iterator[Workers]:
    """The traced workers for one test (this module's stand-in for testing.plugin's `workers`)."""
    traced.clear_faults()
    traced.mark_logs()
    settings.ORDERFLOW_FAULTS_FILE = str(traced.faults_file)  # this process places the orders
    yield traced
    traced.clear_faults()
    traced.stop("beat")
    quiesce(traced.node_names())
    assert audit() == []


def _terminal(order_id: int) -> str | None:
    if CancelledOrder.objects.filter(pk=order_id).exists():
        return "cancelled"
    return "confirmed" if Order.objects.filter(pk=order_id, status=Order.Status.CONFIRMED).exists() else None


def _place(api, product, quantity: int) -> int:
    response = api.post(ORDERS, {"lines": [{"product": product.pk, "quantity": quantity}]}, format="json")
    assert response.status_code == 202, response.content
    return response.json()["id"]


def _root(collector: Collector, order_id: int) -> Span:
    """The POST's span: the server span that placed the order (its trace's root)."""
    roots = [
        span for span in collector.of_order(order_id) if span.kind == ProtoSpan.SPAN_KIND_SERVER and not span.parent_id
    ]
    assert len(roots) == 1, roots
    return roots[0]


def _step_spans(trace: list[Span], order_id: int) -> dict[str, Span]:
    """The task runs of the order in `trace`, by task name (the Celery instrumentation's ``run/<task>``)."""
    return {
        span.attributes["celery.task_name"]: span
        for span in trace
        if span.name.startswith("run/") and span.attributes.get(tracing.ORDER_ID) == order_id
    }


def _wait_for_steps(collector: Collector, order_id: int, steps: list[str]) -> tuple[Span, list[Span]]:
    """The order's root span and its whole trace, once every one of `steps` ran in it and every span's
    parent has arrived (the processes export in batches, each at its own time)."""

    def complete():
        roots = [span for span in collector.of_order(order_id) if span.kind == ProtoSpan.SPAN_KIND_SERVER]
        if not roots:
            return None
        trace = collector.trace(roots[0].trace_id)
        ids = {span.span_id for span in trace}
        if not set(steps) <= set(_step_spans(trace, order_id)):
            return None
        if any(span.parent_id and span.parent_id not in ids for span in trace):
            return None
        return roots[0], trace

    return wait_for(complete, timeout=30, what=f"the spans of order {order_id}'s {steps}")


def _wait_for_trace(collector: Collector, trace_id: str, order_id: int, steps: list[str]) -> list[Span]:
    """Trace `trace_id` once every one of `steps` ran in it and every span's parent has arrived."""

    def complete():
        trace = collector.trace(trace_id)
        ids = {span.span_id for span in trace}
        if not set(steps) <= set(_step_spans(trace, order_id)):
            return None
        return None if any(span.parent_id and span.parent_id not in ids for span in trace) else trace

    return wait_for(complete, timeout=30, what=f"the spans of {steps} in trace {trace_id}")


def _assert_tree(root: Span, trace: list[Span]) -> None:
    """One root; every other span of the trace descends from it, whichever process sent it."""
    by_id = {span.span_id: span for span in trace}
    assert [span for span in trace if not span.parent_id] == [root]
    for span in trace:
        seen = span
        while seen.parent_id:
            seen = by_id[seen.parent_id]
        assert seen is root, f"{span.name} does not descend from {root.name}"


def _json_lines(text: str) -> list[dict]:
    lines = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
    return lines


def test_a_confirmed_order_is_one_trace_from_the_post_to_the_confirm(workers, collector, api, make_product, caplog):
    product = make_product(stock=5)
    caplog.handler.addFilter(log_context.TaskContextFilter())  # as settings.LOGGING's console handler has it

    order_id = _place(api, product, 2)

    assert wait_for(lambda: _terminal(order_id), what=f"order {order_id} to finish") == "confirmed"
    steps = ["inventory.stock_reserve", "reports.sale_record", "orders.order_confirm"]
    root, trace = _wait_for_steps(collector, order_id, steps)
    _assert_tree(root, trace)
    assert root.attributes.get("http.request.method", root.attributes.get("http.method")) == "POST"
    assert root.service == "orderflow-web"
    assert root.name == "POST api/orders/"
    runs = _step_spans(trace, order_id)
    assert {span.service for span in runs.values()} == {"orderflow-worker"}
    assert {name: span.attributes[tracing.SAGA_STEP] for name, span in runs.items()} == {
        "inventory.stock_reserve": "stock_reserve",
        "reports.sale_record": "sale_record",
        "orders.order_confirm": "order_confirm",
    }
    assert runs["orders.order_confirm"].attributes[tracing.OUTCOME] == "confirmed"
    # Each step is published by the one before it, from inside its run: a chain, not a fan-out.
    by_id = {span.span_id: span for span in trace}
    confirm_publish = by_id[runs["orders.order_confirm"].parent_id]
    assert by_id[confirm_publish.parent_id] is runs["reports.sale_record"]
    if connection.vendor == "postgresql":  # the steps' SQL statements are spans of the trace too (psycopg2)
        sql = [
            span
            for span in trace
            if "postgresql" in (span.attributes.get("db.system"), span.attributes.get("db.system.name"))
        ]
        assert "orderflow-worker" in {span.service for span in sql}
    # The order row keeps the POST's trace context (what a re-dispatch links to).
    assert Order.objects.get(pk=order_id).traceparent.startswith(f"00-{root.trace_id}-{root.span_id}-")

    # Logs join up: the web's line about the order, and every worker line written in a step of it.
    placed = [record for record in caplog.records if record.getMessage().startswith(f"order {order_id} placed")]
    assert placed and placed[0].order_id == order_id and placed[0].trace_id == root.trace_id
    for queue in settings.SERVICE_QUEUES:
        in_steps = [
            line
            for line in _json_lines(workers.log(queue))
            if line.get("order_id") == order_id and line.get("process", "").startswith("ForkPoolWorker")
        ]
        assert in_steps, f"no JSON line of order {order_id} from the {queue} worker's steps"
        for line in in_steps:
            assert line.get("trace_id") == root.trace_id, line
            assert line.get("span_id") in by_id, line
            assert line.get("pid") in workers.children(queue), line  # the pool process that wrote it
        # The worker's main process logs each message it takes in, before any span exists there: the
        # trace id comes from the message's traceparent header.
        received = [
            line
            for line in _json_lines(workers.log(queue))
            if line.get("logger") == "celery.worker.strategy" and line.get("order_id") == order_id
        ]
        assert received, f"no 'received' line of order {order_id} from the {queue} worker"
        for line in received:
            assert (line.get("trace_id"), line.get("pid"), line.get("process")) == (
                root.trace_id, workers.pid(queue), "MainProcess"
            ), line  # fmt: skip


def test_a_compensated_order_is_one_trace_through_every_undo(workers, collector, api, make_product):
    product = make_product(stock=1)

    order_id = _place(api, product, 3)  # more than the stock: inventory refuses it

    assert wait_for(lambda: _terminal(order_id), what=f"order {order_id} to finish") == "cancelled"
    undo = ["orders.order_compensate", "reports.sale_revert", "inventory.stock_release", "orders.order_delete"]
    root, trace = _wait_for_steps(collector, order_id, ["inventory.stock_reserve", *undo])
    _assert_tree(root, trace)
    runs = _step_spans(trace, order_id)
    assert "reports.sale_record" not in runs and "orders.order_confirm" not in runs
    refused = runs["inventory.stock_reserve"].attributes
    assert (refused[tracing.STEP_OUTCOME], refused[tracing.CANCEL_CAUSE]) == ("failed", "refused")
    deleted = runs["orders.order_delete"].attributes
    assert (deleted[tracing.OUTCOME], deleted[tracing.CANCEL_CAUSE]) == ("cancelled", "refused")
    assert CancelledOrder.objects.get(pk=order_id).cause == "refused"
    # The compensation is published from the failed step's run, and the undo chain from order_compensate's.
    by_id = {span.span_id: span for span in trace}
    assert by_id[runs["orders.order_compensate"].parent_id].parent_id == runs["inventory.stock_reserve"].span_id
    assert by_id[runs["reports.sale_revert"].parent_id].parent_id == runs["orders.order_compensate"].span_id


def test_a_retried_step_stays_in_the_order_trace(workers, collector, api, make_product):
    """A step that hits a passing fault retries with a countdown: the retry runs in the same trace."""
    product = make_product(stock=5)
    workers.set_faults({"reports.sale_record": {"action": "transient", "times": 2}})

    order_id = _place(api, product, 1)

    assert wait_for(lambda: _terminal(order_id), what=f"order {order_id} to finish") == "confirmed"
    root, trace = _wait_for_steps(collector, order_id, ["orders.order_confirm"])
    _assert_tree(root, trace)
    attempts = [span for span in trace if span.name == "run/reports.sale_record"]
    assert len(attempts) == 3, [span.attributes.get("celery.retry.reason") for span in attempts]


def test_a_redispatched_saga_is_a_new_trace_linked_to_the_order(workers, collector, api, make_product):
    product = make_product(stock=5)
    workers.set_faults({"orders.dispatch": {"action": "broker", "times": 1}})  # the POST's publish fails
    workers.start_beat()

    order_id = _place(api, product, 1)

    assert wait_for(lambda: _terminal(order_id), what=f"order {order_id} to finish") == "confirmed"
    original = Order.objects.get(pk=order_id).traceparent
    _, original_trace_id, original_span_id, _ = original.split("-")

    def redispatch():
        spans = [span for span in collector.of_order(order_id) if span.name == "orders.order_redispatch"]
        return spans[0] if spans else None

    resent = wait_for(redispatch, timeout=30, what=f"order {order_id}'s re-dispatch span")
    assert not resent.parent_id and resent.trace_id != original_trace_id
    assert (original_trace_id, original_span_id) in resent.links
    # The saga published again runs in the new trace.
    confirm = wait_for(
        lambda: _step_spans(collector.trace(resent.trace_id), order_id).get("orders.order_confirm"),
        timeout=30,
        what="the re-dispatched saga's confirm",
    )
    assert confirm.attributes[tracing.OUTCOME] == "confirmed"
    assert not _step_spans(collector.trace(original_trace_id), order_id)  # the first publish never left


def test_a_deadline_compensation_by_the_sweeper_is_a_new_trace_linked_to_the_order(
    workers, collector, api, make_product
):
    """The sweeper cancels an order past ORDER_DEADLINE_SECONDS: its undo chain is a trace of its own, rooted
    in an ``orders.order_expire`` span that links to the order's trace, as a re-dispatch is."""
    product = make_product(stock=5)
    # Inventory has no worker: the order's first step waits in the queue and the order stays pending
    # until the sweeper (in the orders worker, with a deadline of 2 s) finds it past its deadline.
    workers.stop("inventory")
    deadline = {"ORDER_DEADLINE_SECONDS": "2", "SILENCED_SYSTEM_CHECKS": "orderflow.E006,orderflow.E009"}
    saved = {key: workers.extra_env.get(key) for key in deadline}
    workers.extra_env.update(deadline)
    try:
        workers.restart("orders")
        order_id = _place(api, product, 1)
        original = Order.objects.get(pk=order_id).traceparent
        workers.start_beat()
        wait_for(
            lambda: not Order.objects.filter(pk=order_id, status=Order.Status.PENDING).exists(),
            timeout=30,
            what=f"the sweeper to find order {order_id} past its deadline",
        )
        workers.stop("beat")
    finally:
        for key, value in saved.items():
            if value is None:
                workers.extra_env.pop(key)
            else:
                workers.extra_env[key] = value
        workers.restart("orders")
        workers.restart("inventory")
    assert wait_for(lambda: _terminal(order_id), what=f"order {order_id} to finish") == "cancelled"
    assert CancelledOrder.objects.get(pk=order_id).cause == "deadline"
    _, original_trace_id, original_span_id, _ = original.split("-")

    def expired():
        spans = [span for span in collector.of_order(order_id) if span.name == "orders.order_expire"]
        return spans[0] if spans else None

    expire = wait_for(expired, timeout=30, what=f"order {order_id}'s expiry span")
    assert not expire.parent_id and expire.trace_id != original_trace_id
    assert (original_trace_id, original_span_id) in expire.links
    assert expire.attributes[tracing.CANCEL_CAUSE] == "deadline"
    assert expire.service == "orderflow-worker"
    # Every undo step ran in the new trace, under the expiry span.
    undo = ["reports.sale_revert", "inventory.stock_release", "orders.order_delete"]
    trace = _wait_for_trace(collector, expire.trace_id, order_id, undo)
    _assert_tree(expire, trace)
    deleted = _step_spans(trace, order_id)["orders.order_delete"].attributes
    assert (deleted[tracing.OUTCOME], deleted[tracing.CANCEL_CAUSE]) == ("cancelled", "deadline")
    assert not set(undo) & set(_step_spans(collector.trace(original_trace_id), order_id))


def test_a_compensation_published_again_by_the_sweeper_is_a_new_trace_linked_to_the_order(
    workers, collector, api, make_product, settings
):
    """A user's cancel whose compensation was lost (purged from the queue before any worker took it): the
    sweeper publishes it again in a trace of its own, rooted in ``orders.order_recompensate`` and linked
    to the order's trace, and the real workers run the undo chain in it."""
    product = make_product(stock=5)
    order_id = _place(api, product, 1)
    assert wait_for(lambda: _terminal(order_id), what=f"order {order_id} to finish") == "confirmed"
    _, original_trace_id, original_span_id, _ = Order.objects.get(pk=order_id).traceparent.split("-")
    workers.stop("reports")  # the compensation's first step, sale_revert, waits in its queue...
    try:
        assert api.post(f"{ORDERS}{order_id}/cancel/").status_code < 300
        purge_queues()  # ... and is lost there
    finally:
        workers.restart("reports")
    settings.SAGA_TIMEOUT_SECONDS = 1  # this process sweeps: an order cancelling for 1 s is stale
    time.sleep(1.5)
    counts = []
    for _ in range(2):  # seen lost by two sweeps in a row (nothing holds it: the queue was emptied)
        SweepLease.objects.update(started_at=None)
        counts.append(saga_sweep(in_flight=set))
    assert [(c["deferred"], c["recompensated"]) for c in counts] == [(1, 0), (0, 1)], counts
    assert wait_for(lambda: _terminal(order_id), what=f"order {order_id} to be cancelled") == "cancelled"

    def recompensated():
        spans = [span for span in collector.of_order(order_id) if span.name == "orders.order_recompensate"]
        return spans[0] if spans else None

    root = wait_for(recompensated, timeout=30, what=f"order {order_id}'s re-compensation span")
    assert not root.parent_id and root.trace_id != original_trace_id
    assert (original_trace_id, original_span_id) in root.links
    undo = ["reports.sale_revert", "inventory.stock_release", "orders.order_delete"]
    trace = _wait_for_trace(collector, root.trace_id, order_id, undo)
    _assert_tree(root, trace)
    deleted = _step_spans(trace, order_id)["orders.order_delete"].attributes
    assert (deleted[tracing.OUTCOME], deleted[tracing.CANCEL_CAUSE]) == ("cancelled", "user")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _http(method: str, url: str, token: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Authorization", f"Token {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, json.loads(response.read() or b"{}")


def test_gunicorn_traces_the_post_and_its_lines_carry_the_order_and_trace(workers, collector, user, make_product):
    """The web as the Procfile runs it (gunicorn, JSON logs): post_fork sets tracing up, the POST is the
    root of the order's trace, and gunicorn's own access lines (written after the view) name the order
    and the request's trace, for the POST and for a GET of the order, and the worker (pid) that served it."""
    product = make_product(stock=5)
    token = Token.objects.create(user=user).key
    port = _free_port()
    workers.start_process(
        "web",
        [
            sys.executable, "-m", "gunicorn", "project.wsgi", "--bind", f"127.0.0.1:{port}", "--workers", "2",
            "--threads", "2", "--access-logfile", "-", "--error-logfile", "-", "--no-control-socket",
        ],
        env={"LOG_FORMAT": "json"},
    )  # fmt: skip
    master = workers.pid("web")
    try:
        base = f"http://127.0.0.1:{port}"

        def up():
            try:
                with urllib.request.urlopen(f"{base}/healthz", timeout=1):
                    return True
            except OSError:
                workers.check_alive()
                return False

        wait_for(up, timeout=60, what="gunicorn to answer")
        status, placed = _http("POST", f"{base}{ORDERS}", token, {"lines": [{"product": product.pk, "quantity": 1}]})
        assert status == 202
        order_id = placed["id"]
        assert wait_for(lambda: _terminal(order_id), what=f"order {order_id} to finish") == "confirmed"
        assert _http("GET", f"{base}{ORDERS}{order_id}/", token)[0] == 200
    finally:
        workers.stop("web")  # SIGTERM: worker_exit exports what is batched

    root, trace = _wait_for_steps(
        collector, order_id, ["inventory.stock_reserve", "reports.sale_record", "orders.order_confirm"]
    )
    _assert_tree(root, trace)
    assert root.service == "orderflow-web"
    access = [line for line in _json_lines(workers.tail("web", 200_000)) if line.get("logger") == "gunicorn.access"]
    post = [line for line in access if line.get("method") == "POST" and line.get("path") == ORDERS]
    get = [line for line in access if line.get("method") == "GET" and line.get("path") == f"{ORDERS}{order_id}/"]
    assert len(post) == 1 and len(get) == 1, access
    assert (post[0].get("order_id"), post[0].get("trace_id")) == (order_id, root.trace_id)
    assert get[0].get("order_id") == order_id
    assert get[0].get("trace_id") and get[0]["trace_id"] != root.trace_id  # a request of its own: its own trace
    # A request on no order names none; the next request in the thread does not inherit one.
    health = [line for line in access if line.get("path") == "/healthz"]
    assert health and all("order_id" not in line for line in health)
    # Every line names the process that wrote it: the master's, or the worker's that served the request.
    lines = _json_lines(workers.tail("web", 200_000))
    booted = {line["pid"] for line in lines if line.get("message", "").startswith("Booting worker with pid")}
    assert booted == {int(line["message"].rpartition(" ")[2]) for line in lines if "Booting worker" in line["message"]}
    assert len(booted) == 2 and master not in booted, booted
    assert {line["pid"] for line in access} <= booted
    assert all(line["pid"] == master for line in lines if line.get("message", "").startswith("Listening at"))
    assert all(isinstance(line.get("pid"), int) for line in lines), [line for line in lines if "pid" not in line]


def test_a_users_cancel_is_a_trace_of_its_own_linked_to_the_order(workers, collector, api, make_product):
    product = make_product(stock=5)
    order_id = _place(api, product, 1)
    assert wait_for(lambda: _terminal(order_id), what=f"order {order_id} to finish") == "confirmed"
    _, original_trace_id, original_span_id, _ = Order.objects.get(pk=order_id).traceparent.split("-")

    response = api.post(f"{ORDERS}{order_id}/cancel/")

    assert response.status_code < 300, response.content
    assert wait_for(lambda: _terminal(order_id) == "cancelled", what=f"order {order_id} to be cancelled")

    def cancel_trace():
        roots = [
            span
            for span in collector.of_order(order_id)
            if span.kind == ProtoSpan.SPAN_KIND_SERVER and span.trace_id != original_trace_id
        ]
        if not roots:
            return None
        trace = collector.trace(roots[0].trace_id)
        return (roots[0], trace) if "orders.order_delete" in _step_spans(trace, order_id) else None

    root, trace = wait_for(cancel_trace, timeout=30, what=f"order {order_id}'s cancel trace")
    assert (original_trace_id, original_span_id) in root.links
    deleted = _step_spans(trace, order_id)["orders.order_delete"].attributes
    assert (deleted[tracing.OUTCOME], deleted[tracing.CANCEL_CAUSE]) == ("cancelled", "user")


def test_a_step_retried_after_its_worker_was_lost_stays_in_the_order_trace(workers, collector, api, make_product):
    """The retry of a step whose pool process died is published by the worker's main process (Celery's
    Request._retry_worker_lost, with the lost message's headers): still the order's trace."""
    product = make_product(stock=5)
    workers.set_faults({"reports.sale_record": {"action": "sleep", "seconds": 30, "times": 1}})

    order_id = _place(api, product, 1)
    workers.kill_sleeper("reports.sale_record", order_id)

    assert wait_for(lambda: _terminal(order_id), timeout=60, what=f"order {order_id} to finish") == "confirmed"
    root, trace = _wait_for_steps(collector, order_id, ["orders.order_confirm"])
    _assert_tree(root, trace)
