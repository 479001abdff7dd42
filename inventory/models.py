"""Inventory owns products, their stock, and what each order holds of it."""

from decimal import Decimal

from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q

from project.lines import MAX_PRICE

# The most units a product may count, on hand and held by reservations together:
# the stock column's range (PostgreSQL `integer`, 32-bit; SQLite's 64-bit
# column keeps the same bound). Held units come back to the stock on release,
# so stock_adjust refuses a change that would pass it counting them too.
STOCK_MAX = 2**31 - 1


class Product(models.Model):
    sku = models.CharField(max_length=64, unique=True)
    name = models.CharField(max_length=200)
    # numeric(12, 2): 0 to MAX_PRICE, the bound of every price column (project.lines).
    price = models.DecimalField(
        max_digits=12, decimal_places=2, validators=[MinValueValidator(Decimal("0")), MaxValueValidator(MAX_PRICE)]
    )
    stock = models.PositiveIntegerField(default=0, validators=[MaxValueValidator(STOCK_MAX)])
    active = models.BooleanField(default=True)
    # Bumped on every change that reports must hear about, so a late event
    # never overwrites a newer one (events may be delivered out of order).
    # 64-bit: one more per change, so a product changed every second for centuries still counts.
    version = models.PositiveBigIntegerField(default=1)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.CheckConstraint(condition=Q(stock__gte=0), name="product_stock_not_negative"),
            models.CheckConstraint(condition=Q(price__gte=0), name="product_price_not_negative"),
        ]

    def __str__(self) -> str:
        return f"{self.sku} {self.name}"


class OrderReservation(models.Model):
    """Inventory's record of one order: the idempotency key of reserve and release.

    Its first write claims the order id. `reserved` means the order's
    StockReservation rows hold stock; `refused` keeps why nothing was
    reserved; `released` means compensation ran here, before or after a
    reservation, and any later reserve for this order is a no-op.
    """

    class Status(models.TextChoices):
        NEW = "new"
        RESERVED = "reserved"
        REFUSED = "refused"
        RELEASED = "released"

    order_id = models.BigIntegerField(primary_key=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.NEW)
    # Why, for people: the refusal as text, or a step's failure note.
    reason = models.TextField(blank=True)
    # Why, as data, when refused: [{"product", "code", "wanted", "available"}, …]
    # (inventory.exceptions; empty for rows older than it and for failure notes).
    refusal = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"order {self.order_id}: {self.status}"


class StockReservation(models.Model):
    """Units of one product held for one order; active until released."""

    order_id = models.BigIntegerField(db_index=True)
    product = models.ForeignKey(Product, on_delete=models.PROTECT, related_name="reservations")
    quantity = models.PositiveIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)
    released_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["order_id", "product_id"]
        constraints = [
            models.UniqueConstraint(fields=["order_id", "product"], name="one_reservation_per_order_product"),
            models.CheckConstraint(condition=Q(quantity__gt=0), name="reservation_quantity_positive"),
        ]

    def __str__(self) -> str:
        return f"order {self.order_id}: {self.quantity} × product {self.product_id}"

    @property
    def active(self) -> bool:
        return self.released_at is None
