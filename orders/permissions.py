"""Who may see and cancel which orders: the owner, or whoever holds the admin's model permissions.

An order (and the record a cancelled one leaves) is its owner's to see and to
cancel. Others' orders need the permissions the admin asks for:

* seeing another user's order: ``orders.view_order`` (or ``change_order``);
* cancelling it: ``orders.change_order`` (the admin's "Cancel selected orders");
* seeing another user's cancelled record: ``orders.view_cancelledorder``
  (or ``change_cancelledorder``).

The selectors use these to decide what a user sees at all (what is not
visible is a 404, as if it did not exist); the API answers 403 for an order
the user sees but may not cancel.
"""

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser

from project.permissions import has_model_permission

from .models import CancelledOrder, Order

User = AbstractBaseUser | AnonymousUser


def may_see_others_orders(user: User) -> bool:
    """``orders.view_order`` (or ``change_order``): every user's live orders."""
    return has_model_permission(user, "orders", "order", "view")


def may_cancel_others_orders(user: User) -> bool:
    """``orders.change_order``: cancel any user's order."""
    return has_model_permission(user, "orders", "order", "change")


def may_see_others_cancelled_orders(user: User) -> bool:
    """``orders.view_cancelledorder`` (or ``change_cancelledorder``): every user's cancelled records."""
    return has_model_permission(user, "orders", "cancelledorder", "view")


def _owns(user: User, found: Order | CancelledOrder) -> bool:
    # A cancelled record whose user was deleted has user_id None, as has an anonymous user's pk.
    return user.is_authenticated and found.user_id is not None and found.user_id == user.pk


def may_see(user: User, found: Order | CancelledOrder) -> bool:
    """Whether `user` may see this order or cancelled record: its owner, or the permission for its kind."""
    if _owns(user, found):
        return True
    if isinstance(found, CancelledOrder):
        return may_see_others_cancelled_orders(user)
    return may_see_others_orders(user)


def may_cancel(user: User, found: Order | CancelledOrder) -> bool:
    """Whether `user` may cancel it (or, already cancelled, ask again): its owner, or ``orders.change_order``."""
    return _owns(user, found) or may_cancel_others_orders(user)
