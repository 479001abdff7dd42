"""Orders' reads: what a user may see of orders and cancelled orders (orders.permissions decides)."""

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import QuerySet

from project.db import service_db

from . import permissions
from .models import CancelledOrder, Order


def order_list(*, user: AbstractBaseUser, status: str | None = None) -> QuerySet[Order]:
    """The orders `user` may see, newest first: their own, or everyone's with ``orders.view_order``.

    `status`, when given, is one of Order.Status's values.
    """
    orders = Order.objects.using(service_db("orders")).prefetch_related("lines").order_by("-id")
    if not permissions.may_see_others_orders(user):
        orders = orders.filter(user=user)
    if status:
        orders = orders.filter(status=status)
    return orders


def cancelled_order_list(*, user: AbstractBaseUser) -> QuerySet[CancelledOrder]:
    """The records of deleted orders `user` placed (with ``orders.view_cancelledorder``: everyone's), newest first."""
    cancelled = CancelledOrder.objects.using(service_db("orders")).order_by("-order_id")
    if not permissions.may_see_others_cancelled_orders(user):
        cancelled = cancelled.filter(user=user)
    return cancelled


def order_or_cancelled(*, user: AbstractBaseUser, order_id: int) -> Order | CancelledOrder | None:
    """The live order, or its cancelled record, if `user` may see it (orders.permissions.may_see); else None."""
    db = service_db("orders")
    order = Order.objects.using(db).prefetch_related("lines").filter(pk=order_id).first()
    found = order or CancelledOrder.objects.using(db).filter(pk=order_id).first()
    if found is None or not permissions.may_see(user, found):
        return None
    return found
