"""Reports owns the sales read model: per-product totals and the orders counted in them."""

from django.db import models
from django.db.models import Q


class ProductReport(models.Model):
    """One product's sales totals over its lifetime.

    Sized so that no total overflows before `units_sold` does, and that one at
    9.2e18 units (docs/design.md "Numeric ranges"): `revenue` holds
    units_sold's ceiling × the largest price (numeric(12, 2)), 9.2e28, in 29
    digits before the point. reports.checks holds ORDER_MAX_QUANTITY to it.
    """

    product_id = models.BigIntegerField(primary_key=True)
    product_name = models.CharField(max_length=200)
    # Version of the product event the name came from; older events are ignored (inventory's 64-bit version).
    name_version = models.PositiveBigIntegerField(default=0)
    units_sold = models.BigIntegerField(default=0)
    orders_count = models.BigIntegerField(default=0)
    revenue = models.DecimalField(max_digits=31, decimal_places=2, default=0)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["product_id"]
        constraints = [
            models.CheckConstraint(condition=Q(units_sold__gte=0), name="report_units_not_negative"),
            models.CheckConstraint(condition=Q(orders_count__gte=0), name="report_orders_not_negative"),
        ]

    def __str__(self) -> str:
        return f"{self.product_id} {self.product_name}"


class ReportedOrder(models.Model):
    """Reports' record of one order: the idempotency key of record and revert.

    `recorded`: the lines are counted in ProductReport. `reverted`:
    compensation ran here (before or after recording) and any later record
    for this order is a no-op. `failed`: the record step gave up; `reason` says why.
    """

    class Status(models.TextChoices):
        NEW = "new"
        RECORDED = "recorded"
        FAILED = "failed"
        REVERTED = "reverted"

    order_id = models.BigIntegerField(primary_key=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.NEW)
    # [{"product": id, "quantity": n, "amount": "12.50"}, …] as counted.
    lines = models.JSONField(default=list, blank=True)
    reason = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"order {self.order_id}: {self.status}"
