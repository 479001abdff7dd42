"""The metrics every process group serves (project/metrics.py) agree with the database, across a killed pool.

Real processes against the broker and database the settings name: the
session's workers (each serving its metrics, testing/workers.py
`metrics_env`) and a gunicorn web of this test's own, all scraped over HTTP.
Counts are compared as the difference between a scrape before and one after,
since the session's workers have counted earlier tests' orders too.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from rest_framework.authtoken.models import Token

from orders.models import CancelledOrder, Order
from project.metrics import CANCEL_CAUSES, PUBLISH_FAILURE_REASONS, STEP_FAILURE_CAUSES, SWEEP_ACTION_KINDS
from project.saga import CAUSES
from testing import wait_for
from testing.instances import free_port
from testing.workers import Workers, terminate

pytestmark = [pytest.mark.saga, pytest.mark.timeout(240)]

SERVICE_GROUPS = ("orders", "inventory", "reports")
Samples = Counter  # (sample name, sorted label pairs) -> value


def scrape(port: int) -> Samples:
    """Every sample of http://127.0.0.1:`port`/metrics, as the Prometheus text format gives it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    samples = Samples()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] += sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (sample, pairs), v in samples.items() if sample == name and wanted <= set(pairs))


@pytest.fixture
def web(workers: Workers) -> Iterator[int]:
    """A gunicorn web (2 workers, as the Procfile runs it) counting metrics; yields its port."""
    port = free_port()
    workers.start_process(
        "web-metrics",
        [sys.executable, "-m", "gunicorn", "project.wsgi", "--bind", f"127.0.0.1:{port}",
         "--workers", "2", "--threads", "2", "--no-control-socket"],
        env=workers.metrics_env("web"),
    )  # fmt: skip

    def ready():
        workers.check_alive()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                return True
        except OSError:
            return False

    try:
        wait_for(ready, timeout=60, interval=0.2, what="gunicorn to answer")
        wait_for(lambda: _answers(workers.metrics_ports["web"]), timeout=30, what="the web's metrics")
        yield port
    finally:
        terminate(workers.processes.pop("web-metrics"))


def _answers(port: int) -> bool:
    try:
        scrape(port)
    except OSError:
        return False
    return True


def scrape_all(workers: Workers) -> dict[str, Samples]:
    return {name: scrape(workers.metrics_ports[name]) for name in ("web", *SERVICE_GROUPS)}


def total(scrapes: dict[str, Samples], name: str, **labels: str) -> float:
    return sum(value(samples, name, **labels) for samples in scrapes.values())


def post(port: int, path: str, token: str, body: bytes = b"{}") -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=body,
        method="POST",
        headers={"Authorization": f"Token {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())["id"]


def place(port: int, token: str, product_id: int, quantity: int) -> int:
    body = f'{{"lines": [{{"product": {product_id}, "quantity": {quantity}}}]}}'.encode()
    return post(port, "/api/orders/", token, body)


def wait_settled(order_ids: list[int]) -> None:
    def settled():
        live = set(Order.objects.filter(pk__in=order_ids, status=Order.Status.CONFIRMED).values_list("pk", flat=True))
        gone = set(CancelledOrder.objects.filter(pk__in=order_ids).values_list("pk", flat=True))
        return live | gone == set(order_ids)

    wait_for(settled, timeout=90, interval=0.2, what=f"orders {order_ids} to finish")


def wait_counted(workers: Workers, name: str, at_least: float, before: dict[str, Samples]) -> None:
    """Counts land after the commit, a moment after the row: wait until `name` has grown by `at_least`."""
    wait_for(
        lambda: total(scrape_all(workers), name) - total(before, name) >= at_least,
        timeout=30,
        interval=0.2,
        what=f"{name} to count {at_least}",
    )


def test_counts_served_by_every_process_group_equal_the_database_and_survive_a_killed_pool(
    workers, web, user, make_product
):
    token = Token.objects.create(user=user).key
    plenty, scarce = make_product(stock=100), make_product(stock=1)
    before = scrape_all(workers)
    # The series alerts take increase() of are there before anything counts (project.metrics.zero_series):
    # one first appearing at 1 would have increased by nothing.
    assert set(CANCEL_CAUSES) == set(CAUSES)
    for cause in CAUSES:
        assert ("orderflow_orders_cancelled_total", (("cause", cause),)) in before["orders"], cause
    for action in SWEEP_ACTION_KINDS:
        assert ("orderflow_sweeper_actions_total", (("action", action),)) in before["orders"], action

    # Three confirm, one is refused for stock; then the user cancels one that confirmed.
    first = [place(web, token, plenty.pk, 1) for _ in range(3)] + [place(web, token, scarce.pk, 2)]
    wait_settled(first)
    post(web, f"/api/orders/{first[0]}/cancel/", token)
    wait_settled(first)
    wait_for(lambda: CancelledOrder.objects.filter(pk=first[0]).exists(), timeout=60, what="the user's cancel")
    wait_counted(workers, "orderflow_orders_cancelled_total", 2, before)

    # Every pool process of every worker killed (idle: between tasks): their counts stay.
    counted = scrape_all(workers)
    for queue in SERVICE_GROUPS:
        killed = workers.kill_children(queue)
        assert killed, f"the {queue} worker has no pool process"
        wait_for(lambda q=queue, k=killed: len(set(workers.children(q)) - set(k)) >= 2, what=f"{queue}'s new pool")
    after_kill = scrape_all(workers)
    for name in (
        "orderflow_saga_task_runs_total",
        "orderflow_orders_confirmed_total",
        "orderflow_orders_cancelled_total",
        "orderflow_saga_task_duration_seconds_count",
    ):
        assert total(after_kill, name) == total(counted, name), name

    # The new pool processes count on from there.
    second = [place(web, token, plenty.pk, 1) for _ in range(2)]
    wait_settled(second)
    orders = first + second
    wait_counted(workers, "orderflow_orders_confirmed_total", 5, before)
    time.sleep(0.5)  # the last step's own counts (its run, after its commit) land with its end
    after = scrape_all(workers)

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    def web_delta(name: str, **labels: str) -> float:
        return value(after["web"], name, **labels) - value(before["web"], name, **labels)

    confirmed = Order.objects.filter(pk__in=orders, status=Order.Status.CONFIRMED).count()
    cancelled = CancelledOrder.objects.filter(pk__in=orders)
    in_flight = Order.objects.filter(pk__in=orders).exclude(status=Order.Status.CONFIRMED).count()
    by_cause = {cause: cancelled.filter(cause=cause).count() for cause in ("refused", "user", "deadline")}
    was_confirmed = cancelled.filter(status_before=Order.Status.CONFIRMED).count()
    assert (confirmed, cancelled.count(), in_flight, by_cause["refused"], by_cause["user"]) == (4, 2, 0, 1, 1)

    # placed = confirmed + cancelled + in flight, from the web's exporter.
    assert delta("orderflow_orders_placed_total") == len(orders) == confirmed + cancelled.count() + in_flight
    assert (
        value(after["web"], "orderflow_orders_placed_total") - value(before["web"], "orderflow_orders_placed_total")
        == 6
    )
    # Every confirm counted once, the one cancelled after it included.
    assert delta("orderflow_orders_confirmed_total") == confirmed + was_confirmed == 5
    assert delta("orderflow_order_confirmed_latency_seconds_count") == 5
    for cause, count in by_cause.items():
        assert delta("orderflow_orders_cancelled_total", cause=cause) == count, cause
        assert delta("orderflow_order_cancelled_latency_seconds_count", cause=cause) == count, cause

    # Per step: each forward step once per order that reached it, each undo once per cancelled order.
    runs = "orderflow_saga_task_runs_total"
    assert delta(runs, task="inventory.stock_reserve", outcome="succeeded") == 5
    assert delta(runs, task="inventory.stock_reserve", outcome="failed") == by_cause["refused"] == 1
    assert delta("orderflow_saga_task_failures_total", task="inventory.stock_reserve", cause="refused") == 1
    assert delta(runs, task="reports.sale_record", outcome="succeeded") == 5
    assert delta(runs, task="orders.order_confirm", outcome="succeeded") == 5
    assert delta(runs, task="orders.order_compensate") == by_cause["refused"]
    for undo in ("reports.sale_revert", "inventory.stock_release", "orders.order_delete"):
        assert delta(runs, task=undo) == cancelled.count() == 2, undo
    assert delta(runs, outcome="retried") == delta("orderflow_saga_task_retries_total") == 0
    assert delta("orderflow_saga_task_duration_seconds_count") == delta(runs)

    # Publishing: the web published each order's saga; the gauges are read from the database now.
    assert web_delta("orderflow_broker_publish_duration_seconds_count", task="inventory.stock_reserve") == len(orders)
    assert delta("orderflow_broker_publish_failures_total") == 0
    # A task's failure series exist at 0 from its first publish (every reason) and first run (every cause).
    for reason in PUBLISH_FAILURE_REASONS:
        key = ("orderflow_broker_publish_failures_total", (("reason", reason), ("task", "inventory.stock_reserve")))
        assert after["web"].get(key) == 0, reason
    # The reports worker is the session's: earlier tests may have counted failures, so its series must
    # be there (every cause) and none may have grown here; the web above is this test's own, born at 0.
    for cause in STEP_FAILURE_CAUSES:
        key = ("orderflow_saga_task_failures_total", (("cause", cause), ("task", "reports.sale_record")))
        assert key in after["reports"], cause
        assert after["reports"][key] - before["reports"].get(key, 0) == 0, cause
    assert value(after["orders"], "orderflow_orders_pending") == 0
    assert value(after["orders"], "orderflow_orders_cancelling") == 0
    assert value(after["orders"], "orderflow_orders_stuck") == 0
    for queue in SERVICE_GROUPS:
        assert (("orderflow_broker_queue_messages", (("queue", queue),))) in after[queue], queue
    # django-prometheus's HTTP metrics from the web's workers: 7 POSTs answered.
    assert web_delta("django_http_requests_total_by_method_total", method="POST") == 7
    # django-prometheus's database engines (METRICS_DATABASE=1, testing/workers.py metrics_env): the
    # statements of the web's and every worker's processes counted and timed, none failed.
    for group in ("web", *SERVICE_GROUPS):
        executed = value(after[group], "django_db_execute_total") - value(before[group], "django_db_execute_total")
        timed = value(after[group], "django_db_query_duration_seconds_count") - value(
            before[group], "django_db_query_duration_seconds_count"
        )
        assert executed > 0 and timed > 0, group
    assert delta("django_db_errors_total") == 0


def test_metrics_are_not_served_on_the_address_of_the_web(workers, web):
    """The web's own port has no /metrics: the counts are on a loopback port of their own."""
    request = urllib.request.Request(f"http://127.0.0.1:{web}/metrics")
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(request, timeout=5)
    assert answer.value.code == 404


@pytest.mark.parametrize("metrics_port", ["taken", " "])
def test_a_metrics_port_that_cannot_serve_leaves_the_web_serving(workers, tmp_path, metrics_port):
    """Metrics never take the web down: a taken port is logged and the web answers; a blank one is none.

    (A value that is no number at all is refused by the settings as every process starts.)
    """
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = free_port()
    log = tmp_path / "gunicorn.log"
    environment = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
        "METRICS_PORT": str(holder.getsockname()[1]) if metrics_port == "taken" else metrics_port,
    }
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "project.wsgi", "--bind", f"127.0.0.1:{port}",
             "--workers", "2", "--no-control-socket", "--log-file", "-"],
            env=environment, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:

        def healthy():
            assert process.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as answer:
                    return answer.status == 200
            except OSError:
                return False

        wait_for(healthy, timeout=60, interval=0.2, what="gunicorn to answer")
        if metrics_port == "taken":
            assert "metrics not served: cannot listen on" in log.read_text()
        else:
            assert "metrics served on" not in log.read_text()
    finally:
        terminate(process)
        holder.close()


def test_beat_serves_the_publishes_of_its_sweeps(sweeper):
    """Beat (one process, no pool) counts each sweep it publishes and serves it on its own port."""
    port = sweeper.metrics_ports["beat"]
    wait_for(lambda: _answers(port), timeout=60, interval=0.2, what="beat's metrics")

    def published(samples: Samples) -> float:
        return value(samples, "orderflow_broker_publish_duration_seconds_count", task="orders.saga_sweep")

    # The sweeper fixture's beat sweeps every second: two publishes counted, each timed.
    wait_for(lambda: published(scrape(port)) >= 2, timeout=30, interval=0.2, what="beat to count two sweeps")
    samples = scrape(port)
    assert value(samples, "orderflow_broker_publish_duration_seconds_sum", task="orders.saga_sweep") > 0
    assert value(samples, "orderflow_broker_publish_failures_total") == 0
    # Beat publishes sweeps and nothing else; the workers count what the sweeps did.
    published_tasks = {
        dict(pairs)["task"]
        for (name, pairs), _ in samples.items()
        if name.startswith("orderflow_broker_publish_duration")
    }
    assert published_tasks == {"orders.saga_sweep"}
    # Beat runs no task and serves no HTTP: no other process group's counts in its scrape.
    assert not any(name.startswith(("orderflow_saga_task", "django_http")) for name, _ in samples)


@pytest.mark.parametrize(
    ("environment", "engine"),
    [
        ({}, "django.db.backends"),
        ({"METRICS_DATABASE": "1"}, "django.db.backends"),
        ({"PROMETHEUS_MULTIPROC_DIR": "{dir}"}, "django.db.backends"),
        ({"PROMETHEUS_MULTIPROC_DIR": "{dir}", "METRICS_DATABASE": "1"}, "django_prometheus.db.backends"),
    ],
)
def test_database_engines_count_only_with_metrics_on_and_keep_their_options(tmp_path, environment, engine):
    """With metrics and METRICS_DATABASE on, each alias's engine is django-prometheus's subclass of it, else Django's.

    OPTIONS and the rest of each alias's settings are the same either way.

    (NAME left out: pytest-django renamed this process's to the test database's.)
    """
    import os
    import subprocess

    from django.conf import settings

    script = (
        "import json, django; django.setup(); from django.conf import settings; "
        "print(json.dumps({alias: db for alias, db in settings.DATABASES.items()}, default=str))"
    )
    env = {
        key: value for key, value in os.environ.items() if key not in ("PROMETHEUS_MULTIPROC_DIR", "METRICS_DATABASE")
    }
    env |= {key: value.format(dir=tmp_path) for key, value in environment.items()}
    env["DJANGO_SETTINGS_MODULE"] = "project.settings"
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    databases = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(databases) == set(settings.DATABASES)
    for alias, config in databases.items():
        vendor = settings.DATABASES[alias]["ENGINE"].rsplit(".", 1)[1]
        assert config["ENGINE"] == f"{engine}.{vendor}", alias
        expected = {
            key: value for key, value in settings.DATABASES[alias].items() if key not in ("ENGINE", "NAME", "TEST")
        }
        assert {key: config[key] for key in expected} == json.loads(json.dumps(expected, default=str)), alias
