"""Where a benchmark runs, and what it leaves behind: nothing, in a database that holds other data.

With ``--spawn`` the bench runs in a world of its own, unless ``--in-place``:
every database alias gets a database of its own whose name is derived from
the configured one (``orderflow.sqlite3`` → ``orderflow_bench.sqlite3``,
PostgreSQL ``orderflow`` → ``orderflow_bench``), and so does the broker (the
filesystem broker's folders under ``$ORDERFLOW_VAR_DIR/bench``, RabbitMQ's
vhost ``<vhost>_bench``), so running services never see its messages. The
command runs itself again with that environment (`own_environment`), and its
workers and web server inherit it. Without ``--spawn`` it has to use the
running workers' database and broker. Either way it deletes every product,
order and user it made when it ends, unless ``--keep``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import connections

from inventory.models import OrderReservation, Product, StockReservation
from orders.models import CancelledOrder, Order
from project.celery import app
from reports.models import ProductReport, ReportedOrder
from testing.workers import database_url, purge_queues

from .models import BenchFloorChain
from .workload import SKU_PREFIX

# Set (to "1") in the environment of a bench that runs in its own world, and of the processes it starts.
OWN_WORLD = "ORDERFLOW_BENCH_OWN_WORLD"
DATABASE_URL_VARIABLES = {
    "default": "DATABASE_URL",
    "inventory": "DATABASE_URL_INVENTORY",
    "reports": "DATABASE_URL_REPORTS",
}
CHUNK = 2000  # ids per IN (...) query


class BenchFailed(Exception):
    """The run could not finish (a client error, a timeout, a process that would not start, no workers)."""


# --- a world of its own ------------------------------------------------------------------


def own_database_name(config: dict) -> str:
    """The bench's database beside the configured one: a file of its own for SQLite, a name of its own otherwise."""
    if config["ENGINE"].endswith("sqlite3"):
        path = Path(config["NAME"])
        return str(path.with_name(f"{path.stem}_bench{path.suffix}"))
    return f"{config['NAME']}_bench"


def own_broker_url(url: str) -> str:
    """The configured AMQP URL with the vhost `<vhost>_bench` (`orderflow_bench` for the default vhost)."""
    parts = urlsplit(url)
    vhost = unquote(parts.path[1:])
    own = f"{vhost}_bench" if vhost not in ("", "/") else "orderflow_bench"
    return urlunsplit(parts._replace(path="/" + quote(own, safe="")))


def own_environment() -> dict[str, str]:
    """The environment of a bench in its own world (the command runs itself again with it)."""
    env = {"ORDERFLOW_BENCH": "1", OWN_WORLD: "1"}
    for alias in settings.DATABASES:
        env[DATABASE_URL_VARIABLES[alias]] = database_url(alias, name=own_database_name(settings.DATABASES[alias]))
    if settings.CELERY_BROKER_URL.startswith("filesystem"):
        # The broker's folders, and the throttle cache, of a data folder of its own.
        env["ORDERFLOW_VAR_DIR"] = str(Path(settings.VAR_DIR) / "bench")
    else:
        env["CELERY_BROKER_URL"] = own_broker_url(settings.CELERY_BROKER_URL)
    return env


def describe_world() -> str:
    databases = ", ".join(str(config["NAME"]) for config in settings.DATABASES.values())
    broker = settings.CELERY_BROKER_URL
    if broker.startswith("filesystem"):
        where = settings.CELERY_BROKER_TRANSPORT_OPTIONS["data_folder_in"]
    else:
        parts = urlsplit(broker)
        where = f"{parts.scheme}://{parts.hostname}:{parts.port or 5672}/{parts.path[1:]}"
    return f"database {databases}; broker {where}"


def _create_database(alias: str) -> None:
    connection = connections[alias]
    if connection.vendor != "postgresql":
        return  # SQLite makes its file on the first connection
    name = connection.settings_dict["NAME"]
    with connection._nodb_cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name])
        if cursor.fetchone() is None:
            cursor.execute(f"CREATE DATABASE {connection.ops.quote_name(name)}")


def prepare_own_world() -> None:
    """Create and migrate the bench's databases, check its broker, and drop messages a killed run left."""
    for alias in settings.DATABASES:
        _create_database(alias)
        call_command("migrate", database=alias, interactive=False, verbosity=0)
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1)
    except Exception as exc:
        hint = ""
        if not settings.CELERY_BROKER_URL.startswith("filesystem"):
            parts = urlsplit(settings.CELERY_BROKER_URL)
            vhost, user = unquote(parts.path[1:]), parts.username or "guest"
            hint = (
                f"; the bench's own RabbitMQ vhost may be missing: rabbitmqctl add_vhost {vhost} && "
                f"rabbitmqctl set_permissions -p {vhost} {user} '.*' '.*' '.*' (or run with --in-place)"
            )
        raise BenchFailed(f"the bench's broker is unreachable: {exc}{hint}") from exc
    purge_queues()


# --- workers that somebody else started --------------------------------------------------------


def check_workers(*, floor: bool, timeout: float = 2.0) -> None:
    """BenchFailed within `timeout` s unless a running worker consumes each service queue (with the floor's task)."""
    inspect = app.control.inspect(timeout=timeout)
    consumers: dict[str, set[str]] = {queue: set() for queue in settings.SERVICE_QUEUES}
    for node, queues in (inspect.active_queues() or {}).items():
        for queue in queues:
            if queue.get("name") in consumers:
                consumers[queue["name"]].add(node)
    missing = [queue for queue, nodes in consumers.items() if not nodes]
    if missing:
        raise BenchFailed(
            f"no worker consumes the {', '.join(missing)} queue(s) (asked the broker for {timeout:g} s): "
            "start them (make run), or pass --spawn to let the bench start its own"
        )
    if floor:
        registered = inspect.registered() or {}
        lacking = [
            queue
            for queue, nodes in consumers.items()
            if not any(f"{queue}.bench_floor" in registered.get(node, ()) for node in nodes)
        ]
        if lacking:
            raise BenchFailed(
                f"--baseline: the {', '.join(lacking)} worker(s) lack the floor's tasks (bench is not installed "
                "in them): pass --spawn, or start the workers with ORDERFLOW_BENCH=1"
            )


def check_floor_table() -> None:
    """BenchFailed unless the configured database has the floor's table (bench's migration is not applied there)."""
    connection = connections[BenchFloorChain.objects.db]
    if BenchFloorChain._meta.db_table not in connection.introspection.table_names():
        raise BenchFailed(
            "--baseline needs the bench's table, which this database lacks: run without --in-place "
            "(a database of its own), or `ORDERFLOW_BENCH=1 manage.py migrate bench` first"
        )


# --- cleaning up -------------------------------------------------------------------------------


def _chunks(ids: list[int]) -> Iterable[list[int]]:
    for k in range(0, len(ids), CHUNK):
        yield ids[k : k + CHUNK]


def cleanup(run_id: str, order_ids: Iterable[int], user_id: int | None) -> dict[str, int]:
    """Delete what the run made in every service's database: its orders, products and user; counts by kind."""
    ids = sorted(set(order_ids))
    deleted = {"orders": 0, "products": 0, "users": 0}
    for chunk in _chunks(ids):
        deleted["orders"] += Order.objects.filter(pk__in=chunk).delete()[1].get(Order._meta.label, 0)
        deleted["orders"] += CancelledOrder.objects.filter(pk__in=chunk).delete()[0]
        StockReservation.objects.filter(order_id__in=chunk).delete()
        OrderReservation.objects.filter(order_id__in=chunk).delete()
        ReportedOrder.objects.filter(order_id__in=chunk).delete()
    products = list(Product.objects.filter(sku__startswith=f"{SKU_PREFIX}{run_id}-").values_list("pk", flat=True))
    for chunk in _chunks(products):
        ProductReport.objects.filter(product_id__in=chunk).delete()
        deleted["products"] += Product.objects.filter(pk__in=chunk).delete()[0]
    if user_id is not None and not Order.objects.filter(user_id=user_id).exists():
        deleted["users"] = (
            get_user_model()._default_manager.filter(pk=user_id).delete()[1].get(get_user_model()._meta.label, 0)
        )
    return deleted
