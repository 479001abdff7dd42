"""project.permissions.has_model_permission: the admin's question, asked by the API."""

import pytest
from django.contrib.auth.models import AnonymousUser, Group, Permission

from project.permissions import has_model_permission, permission_name
from testing.permissions import grant

pytestmark = pytest.mark.django_db


def test_a_users_own_permission_counts(user):
    user = grant(user, ["orders.view_order"])

    assert has_model_permission(user, "orders", "order", "view")
    assert not has_model_permission(user, "orders", "order", "change")
    assert not has_model_permission(user, "orders", "cancelledorder", "view")


def test_change_includes_view_as_in_the_admin_but_not_the_other_way(user):
    user = grant(user, ["inventory.change_product"])

    assert has_model_permission(user, "inventory", "product", "view")
    assert not has_model_permission(user, "inventory", "product", "add")
    assert not has_model_permission(user, "inventory", "product", "delete")


def test_a_groups_permission_counts(user):
    group = Group.objects.create(name="order desk")
    group.permissions.add(Permission.objects.get(codename="change_order"))
    user.groups.add(group)

    assert has_model_permission(user, "orders", "order", "change")


def test_the_staff_flag_alone_grants_nothing(staff_user):
    assert not any(
        has_model_permission(staff_user, app, model, action)
        for app, model in (("orders", "order"), ("inventory", "product"), ("reports", "productreport"))
        for action in ("view", "add", "change", "delete")
    )


def test_a_superuser_has_every_permission_while_active(admin_superuser):
    assert has_model_permission(admin_superuser, "inventory", "product", "delete")
    admin_superuser.is_active = False
    admin_superuser.save()

    assert not has_model_permission(admin_superuser, "inventory", "product", "delete")


def test_an_inactive_user_loses_their_permissions(user):
    user = grant(user, ["orders.change_order"])
    user.is_active = False
    user.save()

    assert not has_model_permission(user, "orders", "order", "change")


def test_anonymous_has_none():
    assert not has_model_permission(AnonymousUser(), "inventory", "product", "view")


def test_an_unknown_action_is_an_error_not_a_no():
    with pytest.raises(ValueError, match="cancel"):
        has_model_permission(AnonymousUser(), "orders", "order", "cancel")
    assert permission_name("orders", "cancelledorder", "view") == "orders.view_cancelledorder"


def test_grant_refuses_a_permission_that_does_not_exist(user):
    with pytest.raises(LookupError, match=r"orders\.cancel_order"):
        grant(user, ["orders.cancel_order"])
