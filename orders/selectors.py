"""Orders' reads: what a user may see of orders and cancelled orders."""

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import QuerySet

from project.db import service_db

from .models import CancelledOrder, Order


def order_list(*, user: AbstractBaseUser, status: str | None = None) -> QuerySet[Order]:
    orders = Order.objects.using(service_db("orders")).prefetch_related("lines").order_by("-id")
    if not user.is_staff:
        orders = orders.filter(user=user)
    if status:
        orders = orders.filter(status=status)
    return orders


def cancelled_order_list(*, user: AbstractBaseUser) -> QuerySet[CancelledOrder]:
    """The records of deleted orders `user` placed (staff: everyone's), newest order first."""
    cancelled = CancelledOrder.objects.using(service_db("orders")).order_by("-order_id")
    if not user.is_staff:
        cancelled = cancelled.filter(user=user)
    return cancelled


def order_or_cancelled(*, user: AbstractBaseUser, order_id: int) -> Order | CancelledOrder | None:
    """The live order, or its cancelled record, if `user` may see it (owner or staff)."""
    db = service_db("orders")
    order = Order.objects.using(db).prefetch_related("lines").filter(pk=order_id).first()
    found = order or CancelledOrder.objects.using(db).filter(pk=order_id).first()
    if found is None or not (user.is_staff or found.user_id == user.pk):
        return None
    return found
