"""Orders owns orders, their lines, and the record of every order that was cancelled."""

from django.conf import settings
from django.db import models
from django.db.models import Q

from project.saga import CAUSE_DEADLINE, CAUSE_INFRASTRUCTURE, CAUSE_REFUSED, CAUSE_USER


class CancelCause(models.TextChoices):
    """Why an order was cancelled, as a class (project.saga's CAUSE_*; docs/design.md, "Outcomes")."""

    REFUSED = CAUSE_REFUSED, "refused by a service"
    USER = CAUSE_USER, "cancelled by a user"
    DEADLINE = CAUSE_DEADLINE, "deadline passed"
    INFRASTRUCTURE = CAUSE_INFRASTRUCTURE, "a step failed (not a refusal)"


class Order(models.Model):
    """An order; the row is also the saga's outbox record.

    It is committed `pending` with `dispatch_attempts=1` before the saga is
    published, so a crash between commit and publish leaves a row the
    sweeper finds (last_dispatched_at older than the saga timeout) and
    dispatches again.
    """

    class Status(models.TextChoices):
        PENDING = "pending"
        CONFIRMED = "confirmed"
        CANCELLING = "cancelling"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="orders")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    idempotency_key = models.CharField(max_length=255, null=True, blank=True)
    # sha256 of the canonical request lines: a retried POST with the same key
    # must carry the same body.
    request_fingerprint = models.CharField(max_length=64, blank=True)
    dispatch_attempts = models.PositiveIntegerField(default=0)
    last_dispatched_at = models.DateTimeField(null=True, blank=True)
    # Why the order is being cancelled when someone asked for it (a user, the
    # sweeper); failures of the saga's own steps are recorded by their services.
    cancel_reason = models.TextField(blank=True)
    # The class of cancel_reason (user, or deadline from the sweeper).
    cancel_cause = models.CharField(max_length=16, choices=CancelCause.choices, blank=True)
    # The status the order had when compensation started (kept on its CancelledOrder).
    cancelled_from = models.CharField(max_length=16, choices=Status.choices, blank=True)
    failure_reason = models.TextField(blank=True)
    # The class of the failure a step's compensation message carried (project.saga.SagaStep._fail).
    failure_cause = models.CharField(max_length=16, choices=CancelCause.choices, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    confirmed_at = models.DateTimeField(null=True, blank=True)
    # The W3C traceparent of the request that placed it ("00-<trace id>-<span id>-01"; "" with tracing
    # off): a re-dispatch's trace links to the order's first one (project.tracing.linked_root).
    traceparent = models.CharField(max_length=55, blank=True, default="")

    class Meta:
        ordering = ["-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["user", "idempotency_key"],
                condition=Q(idempotency_key__isnull=False),
                name="order_idempotency_key_per_user",
            ),
        ]
        indexes = [
            # The sweeper's scan.
            models.Index(fields=["status", "last_dispatched_at"], name="order_status_dispatch_idx"),
            # The API's list, newest first: a page is read off the index however
            # many orders there are (staff ?status=, a user's own, a user's ?status=).
            models.Index(fields=["status", "-id"], name="order_status_id_idx"),
            models.Index(fields=["user", "-id"], name="order_user_id_idx"),
            models.Index(fields=["user", "status", "-id"], name="order_user_status_idx"),
        ]

    def __str__(self) -> str:
        return f"order {self.pk} ({self.status})"


class OrderLine(models.Model):
    """One product of an order, with the name and price it had when ordered.

    `product_id` is inventory's id: a plain integer, no foreign key across services.
    """

    order = models.ForeignKey(Order, on_delete=models.CASCADE, related_name="lines")
    product_id = models.BigIntegerField()
    product_name = models.CharField(max_length=200)
    unit_price = models.DecimalField(max_digits=12, decimal_places=2)
    quantity = models.PositiveIntegerField()

    class Meta:
        ordering = ["product_id"]
        constraints = [
            models.UniqueConstraint(fields=["order", "product_id"], name="one_line_per_order_product"),
            models.CheckConstraint(condition=Q(quantity__gt=0), name="line_quantity_positive"),
        ]

    def __str__(self) -> str:
        return f"{self.quantity} × {self.product_name}"


class CancelledOrder(models.Model):
    """Everything about an order that the saga deleted, and why.

    Written in the same transaction that deletes the Order, so nothing about it
    is lost; the API answers `410 Gone` with it.
    """

    order_id = models.BigIntegerField(primary_key=True)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="cancelled_orders"
    )
    username = models.CharField(max_length=150)
    idempotency_key = models.CharField(max_length=255, null=True, blank=True)
    request_fingerprint = models.CharField(max_length=64, blank=True)
    # [{"product", "product_name", "unit_price", "quantity"}, …]
    lines = models.JSONField(default=list)
    # Why, for people; and, when inventory refused the stock, why as data:
    # [{"product", "code", "wanted", "available"}, …] (inventory.exceptions).
    reason = models.TextField()
    # The reason's class: what metrics count and alerts watch (an infrastructure cause is a defect to look at).
    cause = models.CharField(max_length=16, choices=CancelCause.choices)
    refusal = models.JSONField(default=list, blank=True)
    status_before = models.CharField(max_length=16)
    dispatch_attempts = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField()
    cancelled_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-order_id"]
        indexes = [models.Index(fields=["user", "idempotency_key"], name="cancelled_user_key_idx")]

    def __str__(self) -> str:
        return f"cancelled order {self.order_id}"


class SweepLease(models.Model):
    """One row: when a sweep last started, by the database's clock.

    Beat publishes a sweep every SAGA_SWEEP_INTERVAL_SECONDS; the ones that
    queue up while the orders worker is away each find the lease taken and
    end after one UPDATE. Times are the database's, so the processes' clocks
    need not agree (no `expires` on the sweep message).
    """

    id = models.PositiveSmallIntegerField(primary_key=True, default=1)
    started_at = models.DateTimeField(null=True)
    # The orders the last sweep found quiet and held by nothing: re-sent only if the next
    # sweep finds them so again (a message moving between a queue and a worker, or between
    # two of inspect's questions, is missed by one look, not by two).
    suspects = models.JSONField(default=list)

    def __str__(self) -> str:
        return f"saga sweep lease (last started {self.started_at})"
