"""EXPLAIN the queries that filter or sort orders rather than fetch one by key.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/of_bench_big .venv/bin/python scripts/explain_queries.py

The sweeper's two scans and the API's list (staff, per user, by status),
built with the same querysets the code uses, each with its plan's first
line. Every other query of the saga is a primary-key lookup.
"""

import os
import sys
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

import django  # after sys.path and the settings module are set

django.setup()

from django.contrib.auth import get_user_model  # noqa: E402
from django.db import connection  # noqa: E402
from django.db.models import Q  # noqa: E402
from django.utils import timezone  # noqa: E402

from orders import selectors  # noqa: E402
from orders.models import Order  # noqa: E402


def explain(title: str, queryset=None, sql: str = "", params=()) -> None:
    if queryset is not None:
        sql, params = queryset.query.sql_with_params()
    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN (ANALYZE, BUFFERS OFF, TIMING ON) {sql}", params)
        plan = [row[0] for row in cursor.fetchall()]
    print(f"-- {title}")
    for line in plan:
        print(f"   {line}")


def main() -> None:
    cutoff = timezone.now() - timedelta(seconds=60)
    users = get_user_model()._default_manager
    # Everyone's orders: what a user holding orders.view_order sees (a superuser holds every permission).
    staff = users.filter(is_superuser=True, is_active=True).first() or users.first()
    by_orders = Order.objects.values("user_id").order_by().annotate(n=django.db.models.Count("id")).order_by("-n")
    # The per-user list, as a customer sees it: the busiest user, and the next one.
    customers = [users.get(pk=row["user_id"]) for row in by_orders[:2]] or [staff]
    for customer in customers:
        # No permissions at all (ModelBackend reads this cache before the database): their own orders only.
        customer.is_superuser = False
        customer._perm_cache = set()
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM orders_order")
        print(f"orders in the table: {cursor.fetchone()[0]}")
    explain(
        "sweeper: pending orders whose dispatch timed out",
        Order.objects.filter(
            Q(status="pending", last_dispatched_at__lt=cutoff) | Q(status="pending", last_dispatched_at=None)
        ).values_list("pk", "dispatch_attempts")[:500],
    )
    explain(
        "sweeper: cancelling orders left untouched",
        Order.objects.filter(status="cancelling", updated_at__lt=cutoff).values_list("pk", flat=True)[:500],
    )
    explain("API list, staff, first page", selectors.order_list(user=staff)[:50])
    explain("API list, staff, ?status=pending", selectors.order_list(user=staff, status="pending")[:50])
    for user in customers:
        mine = Order.objects.filter(user=user).count()
        explain(f"API list, user {user.pk} ({mine} orders), first page", selectors.order_list(user=user)[:50])
        explain(
            f"API list, user {user.pk}, ?status=confirmed", selectors.order_list(user=user, status="confirmed")[:50]
        )
    explain("API list: the paginator's COUNT(*) (staff)", sql="SELECT count(*) FROM orders_order")


if __name__ == "__main__":
    main()
