"""Reports' writes: product rows from inventory's events, and sales from the saga.

Every sale write is keyed by order id through ReportedOrder, so recording and
reverting are idempotent and a revert that arrives first makes the record a no-op.
"""

from decimal import Decimal, InvalidOperation
from typing import Any

from django.db import transaction
from django.utils import timezone

from project.db import Statement, claim_row, service_db
from project.lines import MAX_PRICE
from project.saga import InvalidMessage, SagaAborted, step_lines

from .models import ProductReport, ReportedOrder

CENT = Decimal("0.01")
RECORDED = ReportedOrder.Status.RECORDED
FAILED = ReportedOrder.Status.FAILED
REVERTED = ReportedOrder.Status.REVERTED


def _db() -> str:
    return service_db("reports")


def product_sync(*, product_id: int, name: str, version: int, **_: Any) -> None:
    """Create or rename the product's report row, ignoring stale events."""
    with transaction.atomic(using=_db()):
        ProductReport.objects.using(_db()).bulk_create(
            [ProductReport(product_id=product_id, product_name=name, name_version=version)],
            ignore_conflicts=True,
        )
        ProductReport.objects.using(_db()).filter(product_id=product_id, name_version__lt=version).update(
            product_name=name, name_version=version
        )


def parse_sale_lines(lines: Any) -> list[dict[str, Any]]:
    """JSON ``[{"product", "quantity", "unit_price", "product_name"}, …]`` → counted lines, in product order.

    Product and quantity follow the rules of every step's lines (project.saga.step_lines);
    a unit price is a price column's value, 0 to MAX_PRICE to the cent, so that
    what a line adds to `revenue` is bounded (docs/design.md "Numeric ranges").
    Raises InvalidMessage otherwise.
    """
    order_lines = step_lines(lines)
    by_product = {line["product"]: line for line in lines}
    parsed = []
    for line in order_lines.by_product():
        raw = by_product[line.product]
        try:
            unit_price = Decimal(str(raw.get("unit_price")))
        except InvalidOperation as exc:
            raise InvalidMessage(f"unit_price is not a number: {dict(raw)!r}") from exc
        if not unit_price.is_finite() or not 0 <= unit_price <= MAX_PRICE or unit_price != unit_price.quantize(CENT):
            raise InvalidMessage(f"unit_price must be a price from 0 to {MAX_PRICE}, to the cent: {dict(raw)!r}")
        parsed.append(
            {
                "product": line.product,
                "quantity": line.quantity,
                "amount": str(unit_price * line.quantity),
                "product_name": str(raw.get("product_name") or f"product {line.product}"),
            }
        )
    return parsed


def _claim(order_id: int, status: str, **values: Any) -> tuple[ReportedOrder, bool]:
    # The record, locked, and whether it is new: one statement then (project.db.claim_row).
    return claim_row(ReportedOrder, using=_db(), order_id=order_id, status=status, **values)


# A sale added to (sign +1) or taken out of (-1) its product's totals:
# ``filter(product_id=…).update(units_sold=F("units_sold") + n, …)``, its SQL
# built once (project.db.Statement; the A/B in docs/performance.md).
_COUNT_SALE = Statement(
    ProductReport,
    "UPDATE {table} SET {units_sold} = {units_sold} + %s, {orders_count} = {orders_count} + %s,"
    " {revenue} = {revenue} + %s, {updated_at} = %s WHERE {product_id} = %s",
    params=["units_sold", "orders_count", "revenue", "updated_at", "product_id"],
)


def _count(lines: list[dict[str, Any]], sign: int) -> list[dict[str, Any]]:
    """Add the lines to their products' totals; returns the lines whose product has no row yet."""
    missing = []
    now = timezone.now()
    for line in lines:  # sorted by product: a consistent lock order
        amount = sign * Decimal(line["amount"])
        if not _COUNT_SALE.execute(sign * line["quantity"], sign, amount, now, line["product"], using=_db()):
            missing.append(line)
    return missing


def sale_record(*, order_id: int, lines: Any) -> str:
    """Count the order's lines in the product totals, once."""
    parsed = parse_sale_lines(lines)
    counted = [{k: line[k] for k in ("product", "quantity", "amount")} for line in parsed]
    with transaction.atomic(using=_db()):
        # Claimed as recorded: the record and the totals commit together or not at all.
        record, created = _claim(order_id, RECORDED, lines=counted)
        if not created:
            if record.status == RECORDED:
                return RECORDED  # a duplicate delivery: already counted
            if record.status in (REVERTED, FAILED):
                raise SagaAborted(f"the sale of order {order_id} was already {record.status}")
        missing = _count(parsed, +1)
        if missing:
            # A sale may arrive before the product's event: the row starts from the
            # order's snapshot of the name, and the event (newer version) renames it.
            ProductReport.objects.using(_db()).bulk_create(
                [ProductReport(product_id=line["product"], product_name=line["product_name"]) for line in missing],
                ignore_conflicts=True,
            )
            _count(missing, +1)
        if not created:  # `new`: no delivery finished it; this one does
            record.status = RECORDED
            record.lines = counted
            record.save(using=_db(), update_fields=["status", "lines", "updated_at"])
    return RECORDED


def sale_revert(*, order_id: int) -> str:
    """Take the order out of the totals if it was counted; leave a tombstone either way."""
    with transaction.atomic(using=_db()):
        record, _ = _claim(order_id, REVERTED)
        if record.status == RECORDED:
            _count(record.lines, -1)
        if record.status != REVERTED:
            record.status = REVERTED
            record.save(using=_db(), update_fields=["status", "updated_at"])
    return REVERTED


def sale_failure_note(*, order_id: int, reason: str) -> None:
    """Keep why the reports step failed for this order (the first reason wins)."""
    with transaction.atomic(using=_db()):
        record, _ = _claim(order_id, FAILED, reason=reason)
        if not record.reason:
            record.reason = reason
            record.save(using=_db(), update_fields=["reason", "updated_at"])
