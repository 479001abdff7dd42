"""The consistency audit: DESIGN §2's invariants checked on live data.

Reads orders' own tables and the other services' public read functions only,
so it works when each service has its own database. Orders still in flight
(`pending`/`cancelling`, younger than `stale_after`) are left out of the
balance checks: their steps may legitimately be half done.
"""

from collections import Counter
from dataclasses import asdict, dataclass
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from inventory import public as inventory
from project.db import read_snapshot, service_db
from reports import public as reports

from .models import CancelledOrder, Order, OrderLine


@dataclass(frozen=True)
class Violation:
    invariant: str
    message: str
    order_id: int | None = None
    product_id: int | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _order_lines() -> dict[int, dict[int, int]]:
    lines: dict[int, dict[int, int]] = {}
    rows = OrderLine.objects.using(service_db("orders")).values_list("order_id", "product_id", "quantity")
    for order_id, product_id, quantity in rows:
        lines.setdefault(order_id, {})[product_id] = quantity
    return lines


def audit(*, stale_after: timedelta | None = None, now=None) -> list[Violation]:
    """Every violation of DESIGN §2's invariants, read from one snapshot per database."""
    with read_snapshot(*(service_db(service) for service in settings.SERVICE_QUEUES)):
        return _audit(stale_after=stale_after, now=now)


def _audit(*, stale_after: timedelta | None, now) -> list[Violation]:
    now = now or timezone.now()
    if stale_after is None:
        stale_after = timedelta(seconds=settings.SAGA_TIMEOUT_SECONDS * (settings.SAGA_MAX_ATTEMPTS + 1))
    db = service_db("orders")
    violations: list[Violation] = []

    for product_id in inventory.negative_stock_products():
        violations.append(Violation("no-oversell", "stock is below zero", product_id=product_id))

    statuses = dict(Order.objects.using(db).values_list("pk", "status"))
    touched = dict(Order.objects.using(db).values_list("pk", "updated_at"))
    cancelled = set(CancelledOrder.objects.using(db).values_list("pk", flat=True))
    lines = _order_lines()
    held = inventory.active_units_by_order()
    sold = reports.recorded_orders()

    in_flight = set()
    for order_id, status in statuses.items():
        if status == Order.Status.CONFIRMED:
            continue
        in_flight.add(order_id)
        if now - touched[order_id] > stale_after:
            violations.append(Violation("every-order-ends", f"{status} for more than {stale_after}", order_id=order_id))

    for order_id, units in held.items():
        if order_id not in statuses and order_id not in cancelled:
            violations.append(Violation("no-orphans", f"stock held for unknown order: {units}", order_id=order_id))
        elif order_id in statuses and units != lines.get(order_id):
            violations.append(
                Violation(
                    "all-or-nothing",
                    f"holds {units} but the order's lines are {lines.get(order_id)}",
                    order_id=order_id,
                )
            )
        elif order_id in cancelled:
            violations.append(Violation("books-balance", f"cancelled but still holds {units}", order_id=order_id))
    for order_id, units in sold.items():
        if order_id not in statuses and order_id not in cancelled:
            violations.append(Violation("no-orphans", f"sale counted for unknown order: {units}", order_id=order_id))
        elif order_id in cancelled:
            violations.append(
                Violation("books-balance", f"cancelled but its sale is counted: {units}", order_id=order_id)
            )
        elif order_id in statuses and units != lines.get(order_id):
            violations.append(
                Violation("books-balance", f"sale counted {units}, lines are {lines.get(order_id)}", order_id=order_id)
            )
    for order_id, status in statuses.items():
        if status != Order.Status.CONFIRMED:
            continue
        if held.get(order_id) != lines.get(order_id):
            violations.append(Violation("books-balance", "confirmed but its stock is not held", order_id=order_id))
        if sold.get(order_id) != lines.get(order_id):
            violations.append(Violation("books-balance", "confirmed but its sale is not counted", order_id=order_id))

    # Per product: units held == units sold, once in-flight orders are set aside.
    held_units: Counter[int] = Counter()
    sold_units: Counter[int] = Counter()
    for source, total in ((held, held_units), (sold, sold_units)):
        for order_id, units in source.items():
            if order_id not in in_flight:
                total.update(units)
    inflight_sold: Counter[int] = Counter()
    for order_id, units in sold.items():
        if order_id in in_flight:
            inflight_sold.update(units)
    for product_id, units_sold in reports.units_sold_by_product().items():
        if units_sold - inflight_sold[product_id] != sold_units[product_id]:
            violations.append(
                Violation(
                    "books-balance",
                    f"report says {units_sold} sold, recorded sales add up to {sold_units[product_id]}"
                    f" (+{inflight_sold[product_id]} in flight)",
                    product_id=product_id,
                )
            )
    for product_id in set(held_units) | set(sold_units):
        if held_units[product_id] != sold_units[product_id]:
            violations.append(
                Violation(
                    "books-balance",
                    f"{held_units[product_id]} units held but {sold_units[product_id]} sold",
                    product_id=product_id,
                )
            )
    return violations
