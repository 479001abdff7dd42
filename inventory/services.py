"""Inventory's writes: products, and reserving/releasing stock for orders.

Reservation is all or nothing per order and cannot oversell: every line is
taken, in product primary-key order, with a conditional
``UPDATE … SET stock = stock - n WHERE stock >= n`` (which locks the row; the
only guard on SQLite, where row locks do not exist), inside one transaction
that rolls back whole if a line cannot be had, and the database's
CheckConstraint forbids negative stock whatever happens. Every write is keyed
by order id through OrderReservation, so each step and undo is idempotent.
"""

import contextlib
import logging
from decimal import Decimal
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import F, Sum
from django.utils import timezone

from project.celery import app
from project.db import Statement, after_commit, claim_row, service_db
from project.http.errors import Conflict
from project.origin import signed_kwargs
from project.saga import SagaAborted, step_lines

from .exceptions import (
    INACTIVE_PRODUCT,
    INSUFFICIENT_STOCK,
    UNKNOWN_PRODUCT,
    StockLimitExceeded,
    StockRefused,
    UnknownProduct,
    refusal_item,
    refusal_text,
)
from .models import STOCK_MAX, OrderReservation, Product, StockReservation

logger = logging.getLogger(__name__)

RESERVED = OrderReservation.Status.RESERVED
REFUSED = OrderReservation.Status.REFUSED
RELEASED = OrderReservation.Status.RELEASED


def _db() -> str:
    return service_db("inventory")


# --- products ----------------------------------------------------------------


def _announce(product: Product) -> None:
    """Tell reports about the product once this transaction commits."""
    event = {"product_id": product.pk, "sku": product.sku, "name": product.name, "version": product.version}
    # robust: a broker outage must not turn a committed change into a 500; the
    # reports row is also created by the first sale, and the next change
    # re-announces the product.
    kwargs = signed_kwargs("reports.product_sync", kwargs=event)  # reports runs it only so (project/origin.py)
    after_commit(_db(), app.send_task, "reports.product_sync", kwargs=kwargs, robust=True)


def product_create(*, sku: str, name: str, price: Decimal, stock: int = 0, active: bool = True) -> Product:
    with transaction.atomic(using=_db()):
        product = Product(sku=sku, name=name, price=price, stock=stock, active=active)
        product.full_clean()
        try:
            product.save(using=_db())
        except IntegrityError as exc:  # a concurrent create with the same sku
            raise Conflict(f"a product with sku {sku!r} exists") from exc
        _announce(product)
    return product


def product_update(*, product_id: int, **changes: Any) -> Product:
    """Change name/sku/price/active; stock changes go through stock_adjust."""
    allowed = {"sku", "name", "price", "active"}
    unknown = set(changes) - allowed
    if unknown:
        raise ValueError(f"product_update cannot change {sorted(unknown)}")
    with transaction.atomic(using=_db()):
        product = Product.objects.using(_db()).select_for_update().filter(pk=product_id).first()
        if product is None:
            raise UnknownProduct(f"unknown product {product_id}")
        for field, value in changes.items():
            setattr(product, field, value)
        product.version = F("version") + 1
        product.full_clean(exclude=["version"])
        product.save(using=_db())
        product.refresh_from_db(using=_db())
        _announce(product)
    return product


def stock_adjust(*, product_id: int, delta: int) -> Product:
    """Add `delta` units to the product's stock (negative: remove them); returns the product.

    Never below zero, and never more than STOCK_MAX units on hand and held by
    reservations together: held units come back on release, which must not
    overflow the column (docs/design.md "Numeric ranges"). The product row is
    locked first, so the units held are counted with no reserve or release
    between the check and the write.

    Raises UnknownProduct; StockRefused (409 `insufficient_stock`) when fewer
    than -delta units are in stock; StockLimitExceeded (409, naming
    `stock_delta`) when stock + held + delta would pass STOCK_MAX. Nothing is
    written then.
    """
    with transaction.atomic(using=_db()):
        product = Product.objects.using(_db()).select_for_update().filter(pk=product_id).first()
        if product is None:
            raise UnknownProduct(f"unknown product {product_id}")
        if product.stock + delta < 0:
            raise StockRefused(
                [refusal_item(product_id, INSUFFICIENT_STOCK, wanted=-delta)],
                text=f"cannot remove {-delta} units of product {product_id}: not in stock",
            )
        if delta > 0:
            held = _held_units(product_id)
            if product.stock + held + delta > STOCK_MAX:
                raise StockLimitExceeded(
                    product_id=product_id, delta=delta, stock=product.stock, held=held, limit=STOCK_MAX
                )
        Product.objects.using(_db()).filter(pk=product_id).update(stock=F("stock") + delta)
    return Product.objects.using(_db()).get(pk=product_id)


def _held_units(product_id: int) -> int:
    held = StockReservation.objects.using(_db()).filter(product_id=product_id, released_at=None)
    return held.aggregate(units=Sum("quantity"))["units"] or 0


# --- the saga step and its undo ------------------------------------------------


class _Shortfall(Exception):
    """A line's conditional UPDATE changed nothing; the argument is its refusal item."""


def _claim(order_id: int, status: str, reason: str = "") -> tuple[OrderReservation, bool]:
    """Insert the order's record if absent, then lock and return it, and whether it is new.

    ON CONFLICT DO NOTHING makes two concurrent deliveries serialize on the
    primary key: the second waits for the first to commit and then sees it
    (project.db.claim_row: one statement when the record is new).
    """
    return claim_row(OrderReservation, using=_db(), order_id=order_id, status=status, reason=reason)


def _shortfalls(wanted: dict[int, int]) -> list[dict[str, Any]]:
    """Lock the order's products in key order and say which lines cannot be had (refusal items)."""
    products = {p.pk: p for p in Product.objects.using(_db()).select_for_update().filter(pk__in=wanted).order_by("pk")}
    problems = []
    for product_id, quantity in wanted.items():
        product = products.get(product_id)
        if product is None:
            problems.append(refusal_item(product_id, UNKNOWN_PRODUCT))
        elif not product.active:
            problems.append(refusal_item(product_id, INACTIVE_PRODUCT, sku=product.sku))
        elif product.stock < quantity:
            problems.append(refusal_item(product_id, INSUFFICIENT_STOCK, wanted=quantity, available=product.stock))
    return problems


# The conditional take of every line: ``filter(pk=…, active=True, stock__gte=n)
# .update(stock=F("stock") - n)``, its SQL built once (project.db.Statement; the
# A/B in docs/performance.md).
_TAKE_STOCK = Statement(
    Product,
    "UPDATE {table} SET {stock} = {stock} - %s WHERE {id} = %s AND {active} = %s AND {stock} >= %s",
    params=["stock", "id", "active", "stock"],
)


def _take(order_id: int, wanted: dict[int, int]) -> None:
    """Take every line with a conditional UPDATE (it locks the row), then write the reservation rows."""
    for product_id, quantity in wanted.items():
        if not _TAKE_STOCK.execute(quantity, product_id, True, quantity, using=_db()):
            raise _Shortfall(refusal_item(product_id, INSUFFICIENT_STOCK, wanted=quantity))
    StockReservation.objects.using(_db()).bulk_create(
        [StockReservation(order_id=order_id, product_id=p, quantity=q) for p, q in wanted.items()]
    )


def stock_reserve(*, order_id: int, lines: Any) -> str:
    """Reserve every line of the order (its message's JSON lines), or none. Returns the order's status here.

    Raises StockRefused (after recording why) when any line cannot be had, and
    SagaAborted when the order was already released (the undo came first).
    """
    wanted = {line.product: line.quantity for line in step_lines(lines).by_product()}
    # First delivery with enough stock, the usual case: claim the record as
    # reserved and take every line in one transaction (5 statements for one
    # line). A line that cannot be had rolls all of it back, the claim too,
    # and the locked path below finds out why and records it.
    with contextlib.suppress(_Shortfall), transaction.atomic(using=_db()):
        record, created = _claim(order_id, RESERVED)
        if created:
            _take(order_id, wanted)
            return RESERVED
    with transaction.atomic(using=_db()):
        record, _ = _claim(order_id, OrderReservation.Status.NEW)
        if record.status == RESERVED:
            return RESERVED  # a duplicate delivery: already done
        if record.status == RELEASED:
            raise SagaAborted(f"stock for order {order_id} was already released")
        if record.status == REFUSED:
            # Refused before: the same refusal again (a record older than `refusal` has its text only).
            refusal = StockRefused(record.refusal, text=None if record.refusal else record.reason or "refused")
        else:
            # Rows locked in primary-key order, then checked: what is found
            # wanting is the reason; if stock came back meanwhile, it is taken.
            problems = _shortfalls(wanted)
            if not problems:
                try:
                    with transaction.atomic(using=_db()):  # a savepoint: all lines or none
                        _take(order_id, wanted)
                except _Shortfall as exc:
                    problems = [exc.args[0]]
            record.status = REFUSED if problems else RESERVED
            record.refusal = problems
            record.reason = refusal_text(problems)  # for people, and for readers of the text
            record.save(using=_db(), update_fields=["status", "refusal", "reason", "updated_at"])
            if not problems:
                return RESERVED
            refusal = StockRefused(problems)
    raise refusal


def stock_release(*, order_id: int) -> str:
    """Give back everything the order holds; leave a tombstone if it holds nothing.

    Decided from the database, not from which step failed: safe to run at any
    time, any number of times.
    """
    with transaction.atomic(using=_db()):
        record, _ = _claim(order_id, RELEASED)
        if record.status == RESERVED:
            now = timezone.now()
            held = StockReservation.objects.using(_db()).filter(order_id=order_id, released_at=None)
            for reservation in held.order_by("product_id"):
                Product.objects.using(_db()).filter(pk=reservation.product_id).update(
                    stock=F("stock") + reservation.quantity
                )
            held.update(released_at=now)
        if record.status != RELEASED:
            record.status = RELEASED
            record.save(using=_db(), update_fields=["status", "updated_at"])
    return RELEASED


def stock_failure_note(*, order_id: int, reason: str) -> None:
    """Keep why the inventory step failed for this order (the first reason wins)."""
    with transaction.atomic(using=_db()):
        record, _ = _claim(order_id, REFUSED, reason)
        if not record.reason:
            record.reason = reason
            record.save(using=_db(), update_fields=["reason", "updated_at"])
