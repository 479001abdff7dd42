"""The consistency audit: docs/design.md §2's invariants checked on live data.

`audit()` reads what every check needs once (`Books`), then runs one small
function per invariant; each returns its own violations. It reads the
services only through their public modules, so it works when each service
has its own database. Orders still in flight (not confirmed yet, or being
cancelled) are set aside in the per-product balance: their steps may
legitimately be half done.
"""

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from functools import cached_property

from django.conf import settings
from django.utils import timezone

from inventory import public as inventory
from orders import public as orders
from project.db import read_snapshot, service_db
from reports import public as reports

# {order id: {product id: units}}: an order's lines, its held reservations, its recorded sale.
Units = dict[int, dict[int, int]]


@dataclass(frozen=True)
class Violation:
    invariant: str
    message: str
    order_id: int | None = None
    product_id: int | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Books:
    """Everything the checks compare, read at one moment (one snapshot per database)."""

    now: datetime
    stale_after: timedelta
    negative_stock: list[int]
    live_orders: dict[int, orders.OrderState]
    cancelled: set[int]
    lines: Units
    held: Units
    sold: Units
    units_sold: dict[int, int]  # reports' per-product totals

    @cached_property
    def in_flight(self) -> set[int]:
        return {order_id for order_id, order in self.live_orders.items() if order.status != orders.CONFIRMED}

    def known(self, order_id: int) -> bool:
        return order_id in self.live_orders or order_id in self.cancelled

    def settled_units(self, source: Units) -> Counter[int]:
        """Units per product over the orders that are not in flight."""
        total: Counter[int] = Counter()
        for order_id, units in source.items():
            if order_id not in self.in_flight:
                total.update(units)
        return total


def read_books(*, stale_after: timedelta | None = None, now: datetime | None = None) -> Books:
    """What the checks compare; `stale_after` defaults to the order deadline and one saga timeout more."""
    if stale_after is None:
        stale_after = timedelta(seconds=settings.ORDER_DEADLINE_SECONDS + settings.SAGA_TIMEOUT_SECONDS)
    # Recorded sales before reports' totals: the snapshot test (ops/tests/test_audit.py) commits a sale between them.
    return Books(
        now=now or timezone.now(),
        stale_after=stale_after,
        negative_stock=inventory.negative_stock_products(),
        live_orders=orders.order_states(),
        cancelled=orders.cancelled_order_ids(),
        lines=orders.order_lines(),
        held=inventory.active_units_by_order(),
        sold=reports.recorded_orders(),
        units_sold=reports.units_sold_by_product(),
    )


# --- one check per invariant ---------------------------------------------------------------
# Each judges the books on its own: an order that breaks two invariants is reported under both.


def no_oversell(books: Books) -> Iterable[Violation]:
    """§2.1: no product's stock is below zero."""
    for product_id in books.negative_stock:
        yield Violation("no-oversell", "stock is below zero", product_id=product_id)


def all_or_nothing(books: Books) -> Iterable[Violation]:
    """§2.2: a live order holds stock for every line, in full, or for none."""
    for order_id, units in books.held.items():
        if order_id in books.live_orders and units != books.lines.get(order_id):
            message = f"holds {units} but the order's lines are {books.lines.get(order_id)}"
            yield Violation("all-or-nothing", message, order_id=order_id)


def every_order_ends(books: Books) -> Iterable[Violation]:
    """§2.3: no order stays unconfirmed (pending or cancelling) for longer than `stale_after`."""
    for order_id, order in books.live_orders.items():
        if order.status != orders.CONFIRMED and books.now - order.updated_at > books.stale_after:
            message = f"{order.status} for more than {books.stale_after}"
            yield Violation("every-order-ends", message, order_id=order_id)


def no_orphans(books: Books) -> Iterable[Violation]:
    """§2.4: every step's effect belongs to an order that exists or was cancelled."""
    for what, source in (("stock held", books.held), ("sale counted", books.sold)):
        for order_id, units in source.items():
            if not books.known(order_id):
                yield Violation("no-orphans", f"{what} for unknown order: {units}", order_id=order_id)


def cancelled_orders_keep_nothing(books: Books) -> Iterable[Violation]:
    """§2.5: a cancelled order has neither reservations nor a recorded sale."""
    for order_id, units in books.held.items():
        if order_id in books.cancelled:
            yield Violation("books-balance", f"cancelled but still holds {units}", order_id=order_id)
    for order_id, units in books.sold.items():
        if order_id in books.cancelled:
            yield Violation("books-balance", f"cancelled but its sale is counted: {units}", order_id=order_id)


def sales_match_lines(books: Books) -> Iterable[Violation]:
    """§2.5: a sale recorded for a live order counts exactly the order's lines."""
    for order_id, units in books.sold.items():
        if order_id in books.live_orders and units != books.lines.get(order_id):
            message = f"sale counted {units}, lines are {books.lines.get(order_id)}"
            yield Violation("books-balance", message, order_id=order_id)


def confirmed_orders_are_booked(books: Books) -> Iterable[Violation]:
    """§2.5: a confirmed order has its stock held and its sale recorded, line for line."""
    for order_id, order in books.live_orders.items():
        if order.status != orders.CONFIRMED:
            continue
        lines = books.lines.get(order_id)
        if books.held.get(order_id) != lines:
            yield Violation("books-balance", "confirmed but its stock is not held", order_id=order_id)
        if books.sold.get(order_id) != lines:
            yield Violation("books-balance", "confirmed but its sale is not counted", order_id=order_id)


def reports_add_up(books: Books) -> Iterable[Violation]:
    """§2.5: reports' per-product totals are the sum of the sales recorded (settled plus in flight)."""
    settled = books.settled_units(books.sold)
    in_flight: Counter[int] = Counter()
    for order_id in books.in_flight & books.sold.keys():
        in_flight.update(books.sold[order_id])
    for product_id, units_sold in books.units_sold.items():
        if units_sold - in_flight[product_id] != settled[product_id]:
            message = (
                f"report says {units_sold} sold, recorded sales add up to {settled[product_id]}"
                f" (+{in_flight[product_id]} in flight)"
            )
            yield Violation("books-balance", message, product_id=product_id)


def held_equals_sold(books: Books) -> Iterable[Violation]:
    """§2.5: per product, units in active reservations == units sold, once in-flight orders are set aside."""
    held, sold = books.settled_units(books.held), books.settled_units(books.sold)
    for product_id in sorted(held.keys() | sold.keys()):
        if held[product_id] != sold[product_id]:
            message = f"{held[product_id]} units held but {sold[product_id]} sold"
            yield Violation("books-balance", message, product_id=product_id)


CHECKS: tuple[Callable[[Books], Iterable[Violation]], ...] = (
    no_oversell,
    every_order_ends,
    no_orphans,
    all_or_nothing,
    cancelled_orders_keep_nothing,
    sales_match_lines,
    confirmed_orders_are_booked,
    reports_add_up,
    held_equals_sold,
)


def audit(*, stale_after: timedelta | None = None, now: datetime | None = None) -> list[Violation]:
    """Every violation of docs/design.md §2's invariants, read from one snapshot per database.

    On PostgreSQL each service database is read in one REPEATABLE READ
    transaction (project.db.read_snapshot): a saga step that commits while the
    audit reads is seen whole or not at all, never as books that do not balance.
    """
    with read_snapshot(*(service_db(service) for service in settings.SERVICE_QUEUES)):
        books = read_books(stale_after=stale_after, now=now)
    return [violation for check in CHECKS for violation in check(books)]
