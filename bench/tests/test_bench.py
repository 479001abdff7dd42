"""`manage.py bench_orders` drives the real pipeline, ends with a clean audit, and leaves no data behind.

Smoke tests of the benchmark against real workers: no timing asserts (the
machine is shared), only that every order ended, the books balance, and what
the bench made is gone from any database that holds other data.
"""

import io
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connections

from bench.management.commands.bench_orders import Command
from inventory.models import OrderReservation, Product, StockReservation
from ops.audit import audit
from orders.models import CancelledOrder, Order
from reports.models import ProductReport, ReportedOrder
from testing import BASE_DIR

pytestmark = [pytest.mark.timeout(180)]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.saga
@pytest.mark.parametrize("refusals", ["spread", "last"])
def test_bench_orders_runs_the_saga_and_the_floor_and_stays_consistent(workers, refusals):
    out = io.StringIO()
    call_command(
        "bench_orders", "--orders", "20", "--concurrency", "4", "--via", "service", "--baseline", "--json",
        "--refusals", refusals, "--keep", stdout=out, stderr=io.StringIO(),
    )  # fmt: skip
    report = json.loads(out.getvalue())

    assert report["ok"], report.get("error")
    assert report["audit"] == {"ok": True, "violations": []}
    saga = report["saga"]
    assert saga["orders"] == 20
    assert saga["confirmed"] + saga["cancelled"] == 20
    # Stock refuses a tenth of the orders (fail ratio 0.1 by default).
    assert (saga["confirmed"], saga["cancelled"]) == (report["expected"]["confirmed"], 2)
    assert saga["confirmed"] == report["expected"]["confirmed"]
    assert saga["latency_ms"]["commit_to_confirmed"]["count"] == saga["confirmed"]
    assert report["floor"]["chains"] == 20
    assert report["ratio"] > 0
    # The warm-up orders too: nothing is left in flight.
    assert not Order.objects.exclude(status=Order.Status.CONFIRMED).exists()
    assert CancelledOrder.objects.count() == saga["cancelled"]
    assert audit() == []


def _service_tables_hold_only(product: Product) -> None:
    assert list(Product.objects.all()) == [product]
    assert not Order.objects.exists()
    assert not CancelledOrder.objects.exists()
    assert not StockReservation.objects.exists()
    assert not OrderReservation.objects.exists()
    assert not ReportedOrder.objects.exists()
    assert not ProductReport.objects.exclude(product_id=product.pk).exists()


@pytest.mark.saga
def test_in_place_it_deletes_what_it_made_and_talks_on_a_terminal(workers, make_product, user):
    mine = make_product(stock=3)
    out = Terminal()

    call_command(
        "bench_orders", "--orders", "12", "--concurrency", "3", "--products", "2", stdout=out, stderr=io.StringIO()
    )

    text = out.getvalue()
    assert "\rsaga: placed " in text  # the live line, redrawn in place
    assert "placed 12/12, terminal 12/12" in text
    # With the 3 warm-up orders; a sold-out and a warm-up product beside the 2.
    assert "cleanup: deleted the run's 15 orders, 4 products, 1 user" in text
    assert "what the figures mean:" in text
    for figure in ("accepted/s", "terminal/s", "accept ", "commit→confirmed", "saga/floor", "audit"):
        assert any(line.strip().startswith(figure) for line in text.splitlines()), figure
    _service_tables_hold_only(mine)
    assert list(get_user_model().objects.all()) == [user]
    assert audit() == []


def test_the_progress_line_is_drawn_only_on_a_terminal():
    command = Command(stdout=io.StringIO(), stderr=io.StringIO())
    options = {action.dest: action.default for action in command.create_parser("manage.py", "bench_orders")._actions}

    assert command._options(options).progress is None
    command = Command(stdout=Terminal(), stderr=io.StringIO())
    assert command._options(options).progress is not None
    assert command._options({**options, "json": True}).progress is None


@pytest.mark.saga
def test_without_workers_it_stops_within_seconds_and_says_to_spawn(no_workers, transactional_db):
    began = time.monotonic()

    with pytest.raises(CommandError, match="--spawn") as raised:
        call_command("bench_orders", "--orders", "5", stdout=io.StringIO(), stderr=io.StringIO())

    assert time.monotonic() - began < 15
    assert "no worker consumes the orders, inventory, reports queue(s)" in str(raised.value)
    assert not Product.objects.exists()  # nothing made before it gave up


@pytest.mark.saga
def test_spawned_it_runs_in_a_database_and_broker_of_its_own(transactional_db, make_product, user, tmp_path):
    """The configured database (here the test database, holding other data) is never written to."""
    if connections["default"].vendor != "sqlite" or len(settings.DATABASES) > 1:
        pytest.skip("shown on the embedded default (one SQLite database)")
    mine = make_product(stock=3)
    configured = Path(connections["default"].settings_dict["NAME"])
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{configured}",
        "ORDERFLOW_VAR_DIR": str(tmp_path),
        "CELERY_BROKER_URL": "",
        "DJANGO_SETTINGS_MODULE": "project.settings",
    }
    result = subprocess.run(
        [sys.executable, "manage.py", "bench_orders", "--spawn", "--baseline", "--orders", "8",
         "--concurrency", "2", "--json"],
        cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=170, check=False,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["ok"], report.get("error")
    assert report["environment"]["own_world"] is True
    assert report["floor"]["chains"] == 8  # the spawned workers have the bench app: they ran the floor
    assert report["saga"]["confirmed"] + report["saga"]["cancelled"] == 8
    assert "a database and broker of its own" in result.stderr
    own = configured.with_name(f"{configured.stem}_bench{configured.suffix}")
    assert f"database {own}" in result.stderr
    assert str(tmp_path / "bench" / "broker") in result.stderr
    # Its own database is emptied at the end too; the configured one was never touched.
    with sqlite3.connect(own) as db:
        assert db.execute("SELECT count(*) FROM orders_order").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM inventory_product").fetchone() == (0,)
    _service_tables_hold_only(mine)
    assert list(get_user_model().objects.all()) == [user]
    banner = (tmp_path / "bench" / "bench-logs" / report["run_id"] / "worker-inventory.log").read_text()
    assert "inventory.bench_floor" in banner


@pytest.mark.saga
def test_spawned_with_metrics_and_tracing_the_scrapes_agree_with_the_orders_and_spans_arrive(tmp_path):
    """The whole stack (three workers and gunicorn) counting, served, scraped every second, and traced.

    In a world of its own on the embedded default (SQLite and the filesystem broker under
    tmp_path), whatever this suite's own database is: nothing here reads the test database.
    """
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'orderflow.sqlite3'}",
        "ORDERFLOW_VAR_DIR": str(tmp_path),
        "CELERY_BROKER_URL": "",
        "DJANGO_SETTINGS_MODULE": "project.settings",
    }
    for inherited in ("PROMETHEUS_MULTIPROC_DIR", "METRICS_PORT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        env.pop(inherited, None)  # the bench sets them per process; none of this process's may leak in
    samples = tmp_path / "samples.json"
    result = subprocess.run(
        [sys.executable, "manage.py", "bench_orders", "--spawn", "--via", "api", "--orders", "10",
         "--concurrency", "2", "--warmup", "2", "--metrics-out", str(samples), "--tracing", "--json"],
        cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=170, check=False,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["ok"], report.get("error")
    assert report["options"]["metrics"] and report["options"]["tracing"]
    scraped = report["metrics"]["endpoints"]
    assert set(scraped) == {"web", "orders", "inventory", "reports"}
    assert all(made["scrapes"] >= 2 and made["failed"] == 0 for made in scraped.values()), scraped
    # Every order (the 2 warm-up ones too) is at least a POST, and a publish and a run of each forward step.
    assert report["tracing"]["spans"] >= 7 * 12

    document = json.loads(samples.read_text())
    assert [phase["name"] for phase in document["phases"]] == ["warmup", "saga", "end"]
    last = {scrape["group"]: scrape["samples"] for scrape in document["scrapes"][-4:]}

    def total(name: str, **labels: str) -> float:
        return sum(
            value
            for samples in last.values()
            for sample, sample_labels, value in samples
            if sample == name and labels.items() <= sample_labels.items()
        )

    saga = report["saga"]
    assert total("orderflow_orders_placed_total") == 12  # by the web: the POSTs
    assert total("orderflow_orders_confirmed_total") == saga["confirmed"] + 2
    assert total("orderflow_orders_cancelled_total", cause="refused") == saga["cancelled"]
    assert total("orderflow_saga_task_runs_total", task="inventory.stock_reserve") == 12
    assert total("django_http_requests_total_by_method_total", method="POST") == 12
    assert total("orderflow_orders_pending") == 0
    assert {labels["queue"] for sample, labels, _ in last["inventory"] if sample == "orderflow_broker_queue_messages"}
