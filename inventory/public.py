"""What other services may ask inventory directly (reads only, no models leak)."""

from dataclasses import dataclass
from decimal import Decimal

from django.db.models import Sum

from project.db import service_db

from .models import OrderReservation, Product, StockReservation


@dataclass(frozen=True)
class ProductSnapshot:
    id: int
    sku: str
    name: str
    price: Decimal
    active: bool


def product_snapshots(product_ids: list[int]) -> dict[int, ProductSnapshot]:
    """Name and price of each existing product, as an order keeps them."""
    rows = Product.objects.using(service_db("inventory")).filter(pk__in=product_ids)
    return {p.pk: ProductSnapshot(p.pk, p.sku, p.name, p.price, p.active) for p in rows}


def order_failure_reason(order_id: int) -> str:
    """Why inventory refused or failed this order, or ''."""
    record = OrderReservation.objects.using(service_db("inventory")).filter(order_id=order_id).first()
    return record.reason if record else ""


def order_refusal(order_id: int) -> list[dict]:
    """Why inventory refused this order, as data (inventory.exceptions.refusal_item), or []."""
    record = OrderReservation.objects.using(service_db("inventory")).filter(order_id=order_id).first()
    return list(record.refusal) if record else []


def active_units_by_product() -> dict[int, int]:
    rows = (
        StockReservation.objects.using(service_db("inventory"))
        .filter(released_at=None)
        .values("product_id")
        .annotate(units=Sum("quantity"))
    )
    return {row["product_id"]: row["units"] for row in rows}


def active_units_by_order(order_ids: list[int] | None = None) -> dict[int, dict[int, int]]:
    """{order id: {product id: units}} for reservations still held."""
    rows = StockReservation.objects.using(service_db("inventory")).filter(released_at=None)
    if order_ids is not None:
        rows = rows.filter(order_id__in=order_ids)
    held: dict[int, dict[int, int]] = {}
    for order_id, product_id, quantity in rows.values_list("order_id", "product_id", "quantity"):
        held.setdefault(order_id, {})[product_id] = quantity
    return held


def negative_stock_products() -> list[int]:
    return list(Product.objects.using(service_db("inventory")).filter(stock__lt=0).values_list("pk", flat=True))


@dataclass(frozen=True)
class ProductStock:
    id: int
    sku: str
    name: str
    stock: int
    active: bool


def product_stock_levels(*, limit: int | None = None) -> list[ProductStock]:
    """Units on hand of every product (the first `limit` by id), for the saga dashboard (ops)."""
    rows = (
        Product.objects.using(service_db("inventory"))
        .order_by("pk")
        .values_list("pk", "sku", "name", "stock", "active")
    )
    if limit is not None:
        rows = rows[:limit]
    return [ProductStock(*row) for row in rows]


@dataclass(frozen=True)
class ProductOffer:
    """A product that can be ordered now, as the admin's order form lists it."""

    id: int
    sku: str
    name: str
    price: Decimal
    stock: int


def products_on_sale() -> list[ProductOffer]:
    rows = (
        Product.objects.using(service_db("inventory"))
        .filter(active=True)
        .order_by("pk")
        .values_list("pk", "sku", "name", "price", "stock")
    )
    return [ProductOffer(*row) for row in rows]
