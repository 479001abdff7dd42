"""The order gauges the orders worker's exporter reads from the orders database at each scrape."""

import logging
from collections.abc import Iterator
from datetime import timedelta

from django.conf import settings
from django.db import connections
from django.db.models import Q
from django.db.models.functions import Now
from prometheus_client.core import GaugeMetricFamily

from project.db import service_db

from .models import Order

logger = logging.getLogger(__name__)

#: Each gauge counts at most this many orders (the scrape stays a bounded read); more shows as this.
COUNT_LIMIT = 10_000


class OrderStateCollector:
    """``orderflow_orders_pending``, ``_cancelling`` and ``_stuck``: orders by state now, from the database.

    Stuck is what the sweeper would look at (orders.services.saga_sweep): a
    pending order whose saga was not published or showed no progress for
    SAGA_TIMEOUT_SECONDS, and a cancelling one not moved on for as long. Each
    count reads at most COUNT_LIMIT rows; a database that cannot answer leaves
    the gauges out of that scrape (the rest of it still answers).
    """

    def collect(self) -> Iterator[GaugeMetricFamily]:
        db = service_db("orders")
        orders = Order.objects.using(db)
        cutoff = Now() - timedelta(seconds=settings.SAGA_TIMEOUT_SECONDS)
        queries = {
            "pending": ("Orders pending (the saga under way).", orders.filter(status=Order.Status.PENDING)),
            "cancelling": (
                "Orders being compensated.",
                orders.filter(status=Order.Status.CANCELLING),
            ),
            "stuck": (
                "Orders the sweeper would move on: no progress for SAGA_TIMEOUT_SECONDS, or never published.",
                orders.filter(
                    Q(status=Order.Status.PENDING, last_dispatched_at=None)
                    | Q(status=Order.Status.PENDING, last_dispatched_at__lt=cutoff)
                    | Q(status=Order.Status.CANCELLING, updated_at__lt=cutoff)
                ),
            ),
        }
        try:
            counts = {name: query.values("pk")[:COUNT_LIMIT].count() for name, (_, query) in queries.items()}
        except Exception as exc:  # the scrape still answers with the counters
            logger.info("order gauges not read: %s", exc)
            return
        finally:
            # Each scrape is a thread of its own: its connection must not outlive it.
            connections[db].close()
        for name, (text, _) in queries.items():
            yield GaugeMetricFamily(f"orderflow_orders_{name}", text, value=counts[name])
