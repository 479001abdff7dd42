"""Users holding Django model permissions, for tests: `grant` and the permissions a stack's staff user needs."""

from collections.abc import Iterable

# What the stack's "stack-staff" user (testing.stack) does through the API: create and restock products,
# read and cancel everyone's orders, read cancelled records and the sales totals.
OPERATOR_PERMISSIONS = (
    "inventory.add_product",
    "inventory.change_product",
    "orders.view_order",
    "orders.change_order",
    "orders.view_cancelledorder",
    "reports.view_productreport",
)


def grant(user, names: Iterable[str]):
    """Give `user` the permissions `names` ("app_label.codename", e.g. "orders.view_order"); returns `user`.

    Raises LookupError naming a permission that does not exist (a typo must not pass as "no permission").
    Django caches a user's permissions on the object: the returned user is fetched again, so `has_perm`
    sees the new ones.
    """
    from django.contrib.auth.models import Permission

    permissions = []
    for name in names:
        app_label, _, codename = name.partition(".")
        found = Permission.objects.filter(content_type__app_label=app_label, codename=codename).first()
        if found is None:
            raise LookupError(f"No permission {name!r}.")
        permissions.append(found)
    user.user_permissions.add(*permissions)
    return type(user)._default_manager.get(pk=user.pk)
