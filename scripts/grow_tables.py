"""Add N settled orders to a PostgreSQL database in one go, consistent across the three services.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/of_bench_big \\
        .venv/bin/python scripts/grow_tables.py 100000

For the "cost per order stays flat as the tables grow" check (docs/performance.md):
bench_orders before and after, on this database (so
``make bench ARGS="--spawn --in-place ..."``: without --in-place the bench
runs in a fresh database of its own), and EXPLAIN of the queries
that scan rather than look up by key. The orders are confirmed, one line
each of one product, with the reservation, the recorded sale and the
report totals the audit expects; about 2% are cancelled records instead.
Writes with SQL straight into the tables, PostgreSQL only, single database.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

import django  # after sys.path and the settings module are set

django.setup()

from django.contrib.auth import get_user_model  # noqa: E402
from django.db import connection, transaction  # noqa: E402

STATEMENTS = [
    # Confirmed orders, with their lines.
    """
    INSERT INTO orders_order (user_id, status, idempotency_key, request_fingerprint, dispatch_attempts,
                              last_dispatched_at, cancel_reason, cancelled_from, failure_reason,
                              created_at, updated_at, confirmed_at)
    SELECT %(user)s, 'confirmed', NULL, '', 1, now() - interval '1 day', '', '', '',
           now() - interval '1 day', now() - interval '1 day', now() - interval '1 day'
    FROM generate_series(1, %(confirmed)s)
    """,
    """
    INSERT INTO orders_orderline (order_id, product_id, product_name, unit_price, quantity)
    SELECT id, %(product)s, 'Grown product', 1.00, 1 FROM orders_order
    WHERE status = 'confirmed' AND id > %(first)s AND user_id = %(user)s
    """,
    # Inventory: a reservation record and the units held for each.
    """
    INSERT INTO inventory_orderreservation (order_id, status, reason, created_at, updated_at)
    SELECT id, 'reserved', '', now(), now() FROM orders_order WHERE id > %(first)s AND user_id = %(user)s
    """,
    """
    INSERT INTO inventory_stockreservation (order_id, product_id, quantity, created_at, released_at)
    SELECT id, %(product)s, 1, now(), NULL FROM orders_order WHERE id > %(first)s AND user_id = %(user)s
    """,
    # Reports: the recorded sale and the product's totals.
    """
    INSERT INTO reports_reportedorder (order_id, status, lines, reason, created_at, updated_at)
    SELECT id, 'recorded', jsonb_build_array(jsonb_build_object('product', %(product)s, 'quantity', 1,
           'amount', '1.00')), '', now(), now()
    FROM orders_order WHERE id > %(first)s AND user_id = %(user)s
    """,
    """
    INSERT INTO reports_productreport (product_id, product_name, name_version, units_sold, orders_count, revenue,
                                       updated_at)
    VALUES (%(product)s, 'Grown product', 1, %(confirmed)s, %(confirmed)s, %(confirmed)s, now())
    """,
    # Cancelled orders: only their record is left (their ids beyond the live ones).
    """
    INSERT INTO orders_cancelledorder (order_id, user_id, username, idempotency_key, request_fingerprint, lines,
                                       reason, status_before, dispatch_attempts, created_at, cancelled_at)
    SELECT %(last)s + g, %(user)s, 'bench-grow', NULL, '', '[]'::jsonb, 'grown', 'cancelling', 1,
           now() - interval '1 day', now() - interval '1 day'
    FROM generate_series(1, %(cancelled)s) AS g
    """,
]


def main() -> None:
    total = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    if connection.vendor != "postgresql":
        sys.exit("grow_tables.py writes PostgreSQL SQL; set DATABASE_URL to a PostgreSQL database")
    cancelled = total // 50
    user = get_user_model()._default_manager.get_or_create(username="bench-grow")[0]
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO inventory_product (sku, name, price, stock, active, version, created_at, updated_at) "
            "VALUES ('GROWN-' || md5(random()::text), 'Grown product', 1.00, 0, false, 1, now(), now()) RETURNING id"
        )
        product = cursor.fetchone()[0]
        cursor.execute("SELECT coalesce(max(id), 0) FROM orders_order")
        first = cursor.fetchone()[0]
        params = {"user": user.pk, "product": product, "confirmed": total - cancelled, "first": first}
        for statement in STATEMENTS[:-1]:
            cursor.execute(statement, params)
        cursor.execute(
            "SELECT greatest((SELECT coalesce(max(id), 0) FROM orders_order),"
            " (SELECT coalesce(max(order_id), 0) FROM orders_cancelledorder))"
        )
        params["last"] = cursor.fetchone()[0]
        params["cancelled"] = cancelled
        cursor.execute(STATEMENTS[-1], params)
        # Later orders must not collide with the cancelled records' ids.
        cursor.execute(
            "SELECT setval(pg_get_serial_sequence('orders_order', 'id'), %s)", [params["last"] + cancelled + 1]
        )
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
    print(f"added {total - cancelled} confirmed and {cancelled} cancelled orders (product {product})")


if __name__ == "__main__":
    main()
