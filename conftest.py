"""Data fixtures shared by every test: users, products, API clients.

The real-worker fixtures (`workers`, `no_workers`, `sweeper`) come from the
suite's pytest plugin, testing/plugin.py.
"""

import os
import time
from decimal import Decimal

import pytest
from rest_framework.test import APIClient


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    """Tests that want no worker (`no_workers`) run before the first that wants the session's workers.

    Each `no_workers` test met after the workers started stops all three, and
    the next `workers` test starts them again (seconds per worker on a loaded
    2-core machine). Run after pytest-django's own ordering (transactional
    tests last), which this keeps: every `workers` test is transactional, so
    a moved test stays among the transactional ones. Order is otherwise kept.
    """
    first = next((i for i, item in enumerate(items) if "celery_workers" in getattr(item, "fixturenames", ())), None)
    if first is None:
        return
    later = items[first:]
    quiet = [item for item in later if "no_workers" in getattr(item, "fixturenames", ())]
    if quiet:
        rest = [item for item in later if "no_workers" not in getattr(item, "fixturenames", ())]
        items[first:] = quiet + rest


@pytest.fixture
def user(django_user_model):
    return django_user_model.objects.create_user(username="alice", password="alice-password-1")


@pytest.fixture
def other_user(django_user_model):
    return django_user_model.objects.create_user(username="bob", password="bob-password-1")


@pytest.fixture
def staff_user(django_user_model):
    """Staff (may sign in to the admin) without a single permission: it may do no more than any user."""
    return django_user_model.objects.create_user(username="staff", password="staff-password-1", is_staff=True)


@pytest.fixture
def make_product():
    """make_product(stock=5, price="10.00", sku=None, name=None, active=True) through the service."""
    from inventory import services

    counter = iter(range(1, 1_000_000))

    def make(*, stock: int = 10, price: str = "10.00", sku: str | None = None, name: str | None = None, active=True):
        n = next(counter)
        return services.product_create(
            sku=sku or f"SKU-{os.getpid()}-{n}-{time.monotonic_ns()}",
            name=name or f"Product {n}",
            price=Decimal(price),
            stock=stock,
            active=active,
        )

    return make


@pytest.fixture
def admin_superuser(django_user_model):
    return django_user_model.objects.create_superuser(username="root", password="root-password-1")


@pytest.fixture
def admin_client(client, admin_superuser):
    """Django's test client logged in to the admin as a superuser."""
    client.force_login(admin_superuser)
    return client


@pytest.fixture
def api(user) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


@pytest.fixture
def staff_api(staff_user) -> APIClient:
    """An API client of `staff_user`: staff, no permissions."""
    client = APIClient()
    client.force_authenticate(staff_user)
    return client


@pytest.fixture
def api_with(django_user_model):
    """api_with("orders.view_order", ...): an API client of a new staff user holding just those permissions."""
    from testing.permissions import grant

    counter = iter(range(1, 1_000_000))

    def make(*permissions: str) -> APIClient:
        user = django_user_model.objects.create_user(username=f"granted-{next(counter)}", is_staff=True)
        client = APIClient()
        client.force_authenticate(grant(user, permissions))
        return client

    return make


@pytest.fixture
def stock_api(api_with) -> APIClient:
    """An API client allowed to create and change products (inventory.add_product, inventory.change_product)."""
    return api_with("inventory.add_product", "inventory.change_product")


@pytest.fixture
def reports_api(api_with) -> APIClient:
    """An API client allowed to read the sales totals (reports.view_productreport)."""
    return api_with("reports.view_productreport")


@pytest.fixture(autouse=True)
def _fresh_throttle_history():
    """The order-create throttle keeps its history in a file cache: no test inherits another's."""
    from django.core.cache import caches

    caches["throttle"].clear()
