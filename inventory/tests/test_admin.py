"""Inventory's admin: products are written only through inventory.services, and nothing is deleted.

Rendered with Django's test client; no workers run. A product event for reports
is asserted as the one on-commit callback product_create registers (never executed here).
"""

from decimal import Decimal

import pytest
from django.urls import reverse

from inventory import services
from inventory.models import OrderReservation, Product, StockReservation
from project.db import service_db

pytestmark = pytest.mark.django_db


@pytest.fixture
def calls(monkeypatch):
    """Record every call made to the inventory services (they still run); tests clear it after their setup."""
    seen: list[tuple[str, dict]] = []

    def spy(name):
        real = getattr(services, name)

        def wrapper(**kwargs):
            seen.append((name, kwargs))
            return real(**kwargs)

        monkeypatch.setattr(services, name, wrapper)

    for name in ("product_create", "product_update", "stock_adjust"):
        spy(name)
    return seen


def change_data(product: Product, **overrides) -> dict:
    data = {
        "sku": product.sku,
        "name": product.name,
        "price": str(product.price),
        "active": "on" if product.active else "",
        "stock_delta": "0",
        "_save": "Save",
    }
    data.update(overrides)
    return {k: v for k, v in data.items() if v != ""}


def change_url(product: Product) -> str:
    return reverse("admin:inventory_product_change", args=[product.pk])


def fresh(product: Product) -> Product:
    return Product.objects.get(pk=product.pk)


# --- add ------------------------------------------------------------------------------


def test_add_product_goes_through_product_create_and_announces_it(
    admin_client, calls, django_capture_on_commit_callbacks
):
    data = {"sku": "ADM-1", "name": "Admin widget", "price": "12.50", "stock": "7", "active": "on", "_save": "Save"}

    with django_capture_on_commit_callbacks(using=service_db("inventory"), execute=False) as callbacks:
        response = admin_client.post(reverse("admin:inventory_product_add"), data)

    assert response.status_code == 302, response.context["adminform"].form.errors
    product = Product.objects.get(sku="ADM-1")
    assert (product.name, product.price, product.stock, product.active) == ("Admin widget", Decimal("12.50"), 7, True)
    assert [name for name, _ in calls] == ["product_create"]
    # The product event for reports, published once the admin's transaction commits.
    assert len(callbacks) == 1
    assert response.url == reverse("admin:inventory_product_changelist")


def test_add_product_with_a_taken_sku_is_a_form_error(admin_client, make_product, calls):
    make_product(sku="TAKEN")
    calls.clear()
    data = {"sku": "TAKEN", "name": "Again", "price": "1.00", "stock": "1", "active": "on"}

    response = admin_client.post(reverse("admin:inventory_product_add"), data)

    assert response.status_code == 200
    assert "sku" in response.context["adminform"].form.errors
    assert Product.objects.filter(sku="TAKEN").count() == 1
    assert calls == []


def test_add_product_refused_by_the_service_shows_its_reason_and_writes_nothing(admin_client, monkeypatch):
    from project.http.errors import Conflict

    def refuse(**kwargs):
        Product.objects.create(sku="HALF-WRITTEN", name="x", price=1)  # must be rolled back
        raise Conflict("a product with sku 'RACE' exists")

    monkeypatch.setattr(services, "product_create", refuse)
    data = {"sku": "RACE", "name": "Racer", "price": "1.00", "stock": "1", "active": "on", "_save": "Save"}

    response = admin_client.post(reverse("admin:inventory_product_add"), data)

    assert response.status_code == 200
    assert response.context["adminform"].form.non_field_errors() == ["a product with sku 'RACE' exists"]
    assert b"a product with sku" in response.content
    assert not Product.objects.filter(sku__in=["RACE", "HALF-WRITTEN"]).exists()


# --- change -----------------------------------------------------------------------------


def test_change_product_goes_through_product_update(
    admin_client, make_product, calls, django_capture_on_commit_callbacks
):
    product = make_product(stock=4, price="10.00", name="Old name")
    calls.clear()

    with django_capture_on_commit_callbacks(using=service_db("inventory"), execute=False) as callbacks:
        response = admin_client.post(change_url(product), change_data(product, name="New name", price="11.00"))

    assert response.status_code == 302
    saved = fresh(product)
    assert (saved.name, saved.price, saved.stock) == ("New name", Decimal("11.00"), 4)
    assert saved.version == product.version + 1
    assert calls == [("product_update", {"product_id": product.pk, "name": "New name", "price": Decimal("11.00")})]
    assert len(callbacks) == 1  # the rename reaches reports


def test_saving_an_unchanged_product_writes_nothing(admin_client, make_product, calls):
    product = make_product(stock=4)
    calls.clear()

    response = admin_client.post(change_url(product), change_data(product))

    assert response.status_code == 302
    assert calls == []
    assert fresh(product).version == product.version


def test_stock_delta_adds_and_removes_stock(admin_client, make_product, calls):
    product = make_product(stock=10)
    calls.clear()

    assert admin_client.post(change_url(product), change_data(product, stock_delta="5")).status_code == 302
    assert fresh(product).stock == 15
    assert admin_client.post(change_url(product), change_data(product, stock_delta="-15")).status_code == 302
    assert fresh(product).stock == 0
    assert calls == [
        ("stock_adjust", {"product_id": product.pk, "delta": 5}),
        ("stock_adjust", {"product_id": product.pk, "delta": -15}),
    ]


def test_stock_delta_below_zero_is_a_form_error_and_nothing_changes(admin_client, make_product):
    product = make_product(stock=2, name="Keep me")

    response = admin_client.post(change_url(product), change_data(product, name="Renamed", stock_delta="-3"))

    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert errors["stock_delta"] == ["Cannot remove 3 units: only 2 in stock."]
    assert b"Cannot remove 3 units: only 2 in stock." in response.content
    saved = fresh(product)
    # The rename in the same save was rolled back with it.
    assert (saved.stock, saved.name, saved.version) == (2, "Keep me", product.version)


def test_stock_cannot_be_set_directly(admin_client, make_product):
    product = make_product(stock=3)

    response = admin_client.post(change_url(product), change_data(product, stock="999"))

    assert response.status_code == 302
    assert fresh(product).stock == 3


def test_change_page_shows_stock_read_only_with_a_delta_field(admin_client, make_product):
    product = make_product(stock=3)

    response = admin_client.get(change_url(product))

    assert response.status_code == 200
    form = response.context["adminform"].form
    assert "stock" not in form.fields
    assert "stock_delta" in form.fields
    content = response.content.decode()
    assert "Add/remove stock" in content
    assert "can never go below zero" in content
    assert 'name="stock"' not in content


def test_deactivate_action_goes_through_product_update(admin_client, make_product, calls):
    a, b = make_product(), make_product(active=False)
    calls.clear()

    response = admin_client.post(
        reverse("admin:inventory_product_changelist"),
        {"action": "deactivate_products", "_selected_action": [a.pk, b.pk]},
    )

    assert response.status_code == 302
    assert (fresh(a).active, fresh(b).active) == (False, False)
    assert calls == [("product_update", {"product_id": a.pk, "active": False})]


# --- nothing is deleted, reservations are read-only -------------------------------------------


def test_products_cannot_be_deleted(admin_client, make_product):
    product = make_product()

    assert admin_client.get(reverse("admin:inventory_product_delete", args=[product.pk])).status_code == 403
    assert (
        admin_client.post(reverse("admin:inventory_product_delete", args=[product.pk]), {"post": "yes"}).status_code
        == 403
    )
    response = admin_client.post(
        reverse("admin:inventory_product_changelist"),
        {"action": "delete_selected", "_selected_action": [product.pk], "post": "yes"},
    )
    assert response.status_code == 302  # back to the list with "No action selected."
    assert Product.objects.filter(pk=product.pk).exists()
    listed = admin_client.get(reverse("admin:inventory_product_changelist"))
    offered = [name for name, _ in listed.context["action_form"].fields["action"].choices]
    assert "delete_selected" not in offered
    assert "deactivate_products" in offered


@pytest.mark.parametrize("model", [OrderReservation, StockReservation])
def test_reservations_are_read_only(admin_client, make_product, model):
    product = make_product(stock=5)
    services.stock_reserve(order_id=41, lines=[{"product": product.pk, "quantity": 2}])
    obj = model.objects.filter(order_id=41).first()
    name = f"admin:inventory_{model._meta.model_name}"

    assert admin_client.get(reverse(f"{name}_add")).status_code == 403
    assert admin_client.get(reverse(f"{name}_delete", args=[obj.pk])).status_code == 403
    view = admin_client.get(reverse(f"{name}_change", args=[obj.pk]))
    assert view.status_code == 200
    assert b'name="_save"' not in view.content
    assert admin_client.post(reverse(f"{name}_change", args=[obj.pk]), {}).status_code == 403


# --- every page renders ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "url_name",
    [
        "admin:inventory_product_changelist",
        "admin:inventory_product_add",
        "admin:inventory_orderreservation_changelist",
        "admin:inventory_stockreservation_changelist",
    ],
)
def test_pages_render(admin_client, make_product, url_name):
    product = make_product(stock=5)
    services.stock_reserve(order_id=42, lines=[{"product": product.pk, "quantity": 1}])

    assert admin_client.get(reverse(url_name)).status_code == 200
    assert admin_client.get(reverse(url_name), {"q": "not-a-number"}).status_code == 200
    assert admin_client.get(reverse(url_name), {"q": "42"}).status_code == 200


def test_changelist_filters_and_links(admin_client, make_product):
    product = make_product(stock=5, sku="FIND-ME")
    make_product(active=False, sku="HIDDEN")
    services.stock_reserve(order_id=43, lines=[{"product": product.pk, "quantity": 2}])

    listed = admin_client.get(reverse("admin:inventory_product_changelist"), {"active__exact": "1", "q": "find"})
    assert [p.sku for p in listed.context["cl"].result_list] == ["FIND-ME"]

    page = admin_client.get(change_url(product))
    assert b"2 (<a href=" in page.content  # units held, with a link to the reservations
    reservations = admin_client.get(
        reverse("admin:inventory_stockreservation_changelist"), {"product__id__exact": product.pk, "state": "active"}
    )
    assert reservations.status_code == 200
    assert [r.order_id for r in reservations.context["cl"].result_list] == [43]
