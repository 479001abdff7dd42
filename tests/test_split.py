"""The split-database shape (docs/design.md §6): each service's tables live in its own database.

The router tests run in every shape (they only read settings). The rest run
when DATABASE_URL_INVENTORY / DATABASE_URL_REPORTS are set, as in CI's split
run: they look at the databases themselves, with plain SQL on each alias.
"""

import pytest
from django.apps import apps
from django.db import connections
from django.test import override_settings

from project.db import service_db
from project.db.routers import ServiceRouter
from testing import wait_for

SPLIT = {"orders": "default", "inventory": "inventory", "reports": "reports"}
OWN_TABLES = {
    "orders": {"orders_order", "orders_orderline", "orders_cancelledorder"},
    "inventory": {"inventory_product", "inventory_orderreservation", "inventory_stockreservation"},
    "reports": {"reports_productreport", "reports_reportedorder"},
}
IS_SPLIT = {"inventory", "reports"} <= set(connections)
split_only = pytest.mark.skipif(not IS_SPLIT, reason="needs DATABASE_URL_INVENTORY and DATABASE_URL_REPORTS")


# --- the router (every shape) ---------------------------------------------------------------


@override_settings(SERVICE_DATABASES=SPLIT)
@pytest.mark.parametrize("service", SPLIT)
def test_each_services_models_read_and_write_their_own_alias(service):
    router = ServiceRouter()
    for model in apps.get_app_config(service).get_models():
        assert router.db_for_read(model) == SPLIT[service], model
        assert router.db_for_write(model) == SPLIT[service], model


@override_settings(SERVICE_DATABASES=SPLIT)
def test_migrations_go_to_the_owning_alias_only():
    router = ServiceRouter()
    assert router.allow_migrate("inventory", "inventory")
    assert not router.allow_migrate("default", "inventory")
    assert not router.allow_migrate("inventory", "orders")
    assert router.allow_migrate("default", "orders")
    # Django's own apps (auth, sessions, admin, contenttypes, authtoken) stay in default.
    for app_label in ("auth", "contenttypes", "sessions", "admin", "authtoken"):
        assert router.allow_migrate("default", app_label)
        assert not router.allow_migrate("reports", app_label)


@override_settings(SERVICE_DATABASES=SPLIT)
def test_no_relation_across_services():
    from django.contrib.auth import get_user_model

    from inventory.models import Product
    from orders.models import Order
    from reports.models import ProductReport

    router = ServiceRouter()
    assert not router.allow_relation(Order(), Product())
    assert not router.allow_relation(Product(), ProductReport())
    # An order's user lives in default, with the orders tables.
    assert router.allow_relation(Order(), get_user_model()())


@override_settings(SERVICE_DATABASES={"orders": "default", "inventory": "default", "reports": "default"})
def test_unsplit_everything_is_default():
    router = ServiceRouter()
    for service in SPLIT:
        for model in apps.get_app_config(service).get_models():
            assert router.db_for_write(model) == "default"


def test_no_foreign_key_crosses_a_service():
    """What makes the split possible: ids and snapshots, never a foreign key to another service."""
    for service in SPLIT:
        for model in apps.get_app_config(service).get_models():
            for field in model._meta.get_fields():
                if field.is_relation and field.related_model is not None and field.concrete:
                    target = field.related_model._meta.app_label
                    assert target == service or target not in SPLIT, f"{model.__name__}.{field.name} → {target}"


# --- the databases themselves (split shape) ------------------------------------------------


def tables(alias: str) -> set[str]:
    with connections[alias].cursor() as cursor:
        return set(connections[alias].introspection.table_names(cursor))


@split_only
@pytest.mark.django_db(databases="__all__")
def test_each_services_tables_exist_only_in_its_database():
    assert {service: service_db(service) for service in SPLIT} == SPLIT
    assert len({connections[alias].settings_dict["NAME"] for alias in SPLIT.values()}) == 3
    for service, alias in SPLIT.items():
        present = tables(alias)
        assert OWN_TABLES[service] <= present, (alias, present)
        for other in set(SPLIT) - {service}:
            assert not (OWN_TABLES[other] & present), (alias, OWN_TABLES[other] & present)
    assert "auth_user" in tables("default")
    assert "auth_user" not in tables("inventory") | tables("reports")


def count(alias: str, sql: str, *params) -> int:
    with connections[alias].cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()[0]


@split_only
@pytest.mark.saga
def test_a_saga_writes_each_services_rows_in_its_own_database(workers, user, make_product):
    from ops.audit import audit
    from orders import services as order_services

    product = make_product(stock=3)
    order_id = order_services.order_create(user=user, lines=[{"product": product.pk, "quantity": 2}]).order.pk
    wait_for(
        lambda: count("default", "SELECT count(*) FROM orders_order WHERE id = %s AND status = 'confirmed'", order_id),
        what=f"order {order_id} to be confirmed",
    )

    assert count("inventory", "SELECT stock FROM inventory_product WHERE id = %s", product.pk) == 1
    assert count("inventory", "SELECT count(*) FROM inventory_stockreservation WHERE order_id = %s", order_id) == 1
    assert count("reports", "SELECT units_sold FROM reports_productreport WHERE product_id = %s", product.pk) == 2
    assert count("reports", "SELECT count(*) FROM reports_reportedorder WHERE order_id = %s", order_id) == 1
    # The consistency audit reads all three databases through the public modules.
    assert audit() == []
