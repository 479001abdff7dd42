"""What other apps may ask orders directly (reads only, no models leak).

The operations app (ops: the consistency audit and the saga dashboard) reads
orders through these functions, as it reads inventory and reports through
theirs.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Count, Q

from project.db import service_db

from .models import CancelledOrder, Order, OrderLine

STATUSES: tuple[str, ...] = tuple(Order.Status.values)
CONFIRMED: str = Order.Status.CONFIRMED.value


@dataclass(frozen=True)
class OrderState:
    id: int
    status: str
    updated_at: datetime


def order_states() -> dict[int, OrderState]:
    """Every live order's status and when it last changed, by id."""
    rows = Order.objects.using(service_db("orders")).order_by().values_list("pk", "status", "updated_at")
    return {row[0]: OrderState(*row) for row in rows}


def order_lines() -> dict[int, dict[int, int]]:
    """{order id: {product id: units}} of every live order."""
    rows = OrderLine.objects.using(service_db("orders")).values_list("order_id", "product_id", "quantity")
    lines: dict[int, dict[int, int]] = {}
    for order_id, product_id, quantity in rows:
        lines.setdefault(order_id, {})[product_id] = quantity
    return lines


def cancelled_order_ids() -> set[int]:
    """Ids of the orders the saga deleted (each has its CancelledOrder record)."""
    return set(CancelledOrder.objects.using(service_db("orders")).values_list("pk", flat=True))


def order_counts_by_status() -> dict[str, int]:
    """How many live orders have each status (every status is a key)."""
    counts = dict.fromkeys(STATUSES, 0)
    rows = Order.objects.using(service_db("orders")).order_by().values("status").annotate(count=Count("pk"))
    for row in rows:
        counts[row["status"]] = row["count"]
    return counts


def cancelled_order_count() -> int:
    return CancelledOrder.objects.using(service_db("orders")).count()


@dataclass(frozen=True)
class FinishedSince:
    since: datetime
    # Orders confirmed since then and confirmed still; one cancelled after it was
    # confirmed is no Order any more and counts as cancelled only.
    confirmed: int
    cancelled: int


def orders_finished_since(cutoffs: Iterable[datetime]) -> list[FinishedSince]:
    """For each cutoff, how many orders were confirmed and how many cancelled since (one query per table)."""
    cutoffs = list(cutoffs)
    db = service_db("orders")
    confirmed = (
        Order.objects.using(db)
        .filter(status=Order.Status.CONFIRMED)
        .aggregate(**{f"c{i}": Count("pk", filter=Q(confirmed_at__gte=cutoff)) for i, cutoff in enumerate(cutoffs)})
    )
    cancelled = CancelledOrder.objects.using(db).aggregate(
        **{f"c{i}": Count("pk", filter=Q(cancelled_at__gte=cutoff)) for i, cutoff in enumerate(cutoffs)}
    )
    return [FinishedSince(cutoff, confirmed[f"c{i}"], cancelled[f"c{i}"]) for i, cutoff in enumerate(cutoffs)]


@dataclass(frozen=True)
class StuckOrder:
    id: int
    username: str
    created_at: datetime
    dispatch_attempts: int
    last_dispatched_at: datetime | None


def stuck_pending_orders(*, now: datetime, limit: int) -> tuple[list[StuckOrder], int]:
    """The pending orders the saga sweeper picks up next, oldest first (at most `limit`), and how many there are.

    Stuck means what `orders.services.saga_sweep` means: last dispatched more
    than SAGA_TIMEOUT_SECONDS before `now`, or never.
    """
    stale = now - timedelta(seconds=settings.SAGA_TIMEOUT_SECONDS)
    stuck = Order.objects.using(service_db("orders")).filter(
        Q(last_dispatched_at__lt=stale) | Q(last_dispatched_at=None), status=Order.Status.PENDING
    )
    shown = [
        StuckOrder(o.pk, o.user.get_username(), o.created_at, o.dispatch_attempts, o.last_dispatched_at)
        for o in stuck.select_related("user").order_by("created_at", "pk")[:limit]
    ]
    return shown, len(shown) if len(shown) < limit else stuck.count()


@dataclass(frozen=True)
class Cancellation:
    order_id: int
    username: str
    reason: str
    cause: str  # orders.models.CancelCause's value
    cancelled_at: datetime


def latest_cancellations(*, limit: int) -> list[Cancellation]:
    """The `limit` orders cancelled last, newest first, with why."""
    rows = (
        CancelledOrder.objects.using(service_db("orders"))
        .order_by("-cancelled_at", "-order_id")
        .values_list("order_id", "username", "reason", "cause", "cancelled_at")[:limit]
    )
    return [Cancellation(*row) for row in rows]
