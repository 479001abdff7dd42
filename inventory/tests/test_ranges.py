"""Inventory's numbers at their edges, through the API, the admin and the services (docs/api.md "Numeric ranges").

Every value either fits its column or is refused with the field named: a 400
(out of range), or a 409 when the value is fine but the stock it would make is
not (the sum passes STOCK_MAX with what reservations hold). Run on SQLite
and on PostgreSQL (DATABASE_URL), whose `integer` column is 32-bit where
SQLite's is 64-bit: the bounds are the same on both.
"""

from decimal import Decimal

import pytest
from django.urls import reverse

from inventory import services
from inventory.exceptions import StockLimitExceeded, StockRefused
from inventory.models import STOCK_MAX, OrderReservation, Product, StockReservation
from project.lines import MAX_PRICE

pytestmark = pytest.mark.django_db

PRODUCTS = "/api/products/"
HUGE = 99999999999999999999


def detail(product: Product) -> str:
    return f"{PRODUCTS}{product.pk}/"


def stock_of(product: Product) -> int:
    return Product.objects.get(pk=product.pk).stock


def error(response, status: int) -> dict:
    assert response.status_code == status, response.content
    body = response.json()
    assert set(body) <= {"code", "detail", "fields"} and body["code"] and body["detail"]
    return body


def hold(product: Product, units: int, order_id: int = 1) -> None:
    """`units` of the product held by an order, as stock_reserve leaves them (taken from stock)."""
    Product.objects.filter(pk=product.pk).update(stock=stock_of(product) - units)
    OrderReservation.objects.create(order_id=order_id, status=OrderReservation.Status.RESERVED)
    StockReservation.objects.create(order_id=order_id, product=product, quantity=units)


# --- the API: the reproduction, then each edge ------------------------------------------


def test_stock_delta_twice_past_the_column_is_a_409_naming_stock_delta(stock_api, make_product):
    # issue 14: stock 1000000000 + 1000000000 twice; the second was a 500 (integer out of range) on PostgreSQL
    product = make_product(stock=1_000_000_000)

    first = stock_api.patch(detail(product), {"stock_delta": 1_000_000_000}, format="json")
    second = stock_api.patch(detail(product), {"stock_delta": 1_000_000_000}, format="json")

    assert first.status_code == 200, first.content
    body = error(second, 409)
    assert body["code"] == "stock_limit_exceeded"
    assert "stock_delta" in body["fields"]
    assert stock_of(product) == 2_000_000_000


def test_stock_may_reach_stock_max_and_not_one_more(stock_api, make_product):
    product = make_product(stock=STOCK_MAX - 10)

    over = stock_api.patch(detail(product), {"stock_delta": 11}, format="json")
    exact = stock_api.patch(detail(product), {"stock_delta": 10}, format="json")

    assert error(over, 409)["fields"]["stock_delta"]
    assert exact.status_code == 200, exact.content
    assert exact.json()["stock"] == STOCK_MAX


def test_units_held_by_reservations_count_toward_stock_max(stock_api, make_product):
    # Stock held for an order comes back on release: were it not counted, that release would overflow.
    product = make_product(stock=STOCK_MAX - 100)
    hold(product, 50)

    over = stock_api.patch(detail(product), {"stock_delta": 101}, format="json")
    exact = stock_api.patch(detail(product), {"stock_delta": 100}, format="json")

    assert error(over, 409)["code"] == "stock_limit_exceeded"
    assert exact.status_code == 200
    assert stock_of(product) == STOCK_MAX - 50
    services.stock_release(order_id=1)  # all 50 come back, and fit
    assert stock_of(product) == STOCK_MAX


def test_a_refused_stock_delta_changes_nothing_else(stock_api, make_product):
    product = make_product(stock=STOCK_MAX, name="Keep")

    response = stock_api.patch(detail(product), {"name": "Changed", "stock_delta": 1}, format="json")

    error(response, 409)
    saved = Product.objects.get(pk=product.pk)
    assert (saved.name, saved.stock) == ("Keep", STOCK_MAX)


@pytest.mark.parametrize("value", [STOCK_MAX + 1, -STOCK_MAX - 1, HUGE, -HUGE, 2**63, "1e30", 1e30, 1e3, "NaN", None])
def test_a_stock_delta_out_of_range_is_a_400_naming_it(stock_api, make_product, value):
    product = make_product(stock=5)

    body = error(stock_api.patch(detail(product), {"stock_delta": value}, format="json"), 400)

    assert "stock_delta" in body["fields"]
    assert stock_of(product) == 5


@pytest.mark.parametrize("value", [0, 1, STOCK_MAX])
def test_starting_stock_within_the_range_is_taken(stock_api, value):
    response = stock_api.post(PRODUCTS, {"sku": "S-1", "name": "s", "price": "1.00", "stock": value}, format="json")

    assert response.status_code == 201, response.content
    assert Product.objects.get(sku="S-1").stock == value


@pytest.mark.parametrize("value", [STOCK_MAX + 1, -1, HUGE, -HUGE, "1e30", 1e30, 2.0])
def test_starting_stock_out_of_range_is_a_400_naming_it(stock_api, value):
    body = error(
        stock_api.post(PRODUCTS, {"sku": "S-1", "name": "s", "price": "1.00", "stock": value}, format="json"), 400
    )

    assert "stock" in body["fields"]
    assert not Product.objects.exists()


@pytest.mark.parametrize("price", ["0", "0.01", "9999999999.99", 9999999999.99, 12])
def test_prices_within_the_column_are_taken(stock_api, price):
    response = stock_api.post(PRODUCTS, {"sku": "P-1", "name": "p", "price": price}, format="json")

    assert response.status_code == 201, response.content
    assert Product.objects.get(sku="P-1").price == Decimal(str(price))


@pytest.mark.parametrize(
    "price",
    ["10000000000.00", "99999999999999999999", "1e30", 1e30, "1e-30", "0.001", "-0.01", "NaN", "Infinity", "-1e3"],
)
def test_prices_past_the_column_are_a_400_naming_price(stock_api, make_product, price):
    product = make_product(price="5.00")

    created = stock_api.post(PRODUCTS, {"sku": "P-1", "name": "p", "price": price}, format="json")
    changed = stock_api.patch(detail(product), {"price": price}, format="json")

    assert "price" in error(created, 400)["fields"]
    assert "price" in error(changed, 400)["fields"]
    assert Product.objects.get(pk=product.pk).price == Decimal("5.00")


def test_the_price_bound_is_the_columns():
    field = Product._meta.get_field("price")
    largest = Decimal(10) ** (field.max_digits - field.decimal_places) - Decimal(10) ** -field.decimal_places

    assert largest == MAX_PRICE == Decimal("9999999999.99")


@pytest.mark.parametrize("query", ["stock_min=2147483648", "stock_max=-1", f"stock_min={HUGE}", "price_min=1e30"])
def test_filters_out_of_range_are_a_400(api, query):
    assert error(api.get(f"{PRODUCTS}?{query}"), 400)["fields"]


# --- the admin ---------------------------------------------------------------------------


def change_data(product: Product, **overrides) -> dict:
    data = {"sku": product.sku, "name": product.name, "price": str(product.price), "active": "on", "stock_delta": "0"}
    return {**data, **overrides}


def form_errors(response) -> dict:
    assert response.status_code == 200, "expected the form again, with errors"
    return response.context["adminform"].form.errors


def test_admin_stock_delta_past_the_column_is_a_form_error(admin_client, make_product):
    # issue 14: the product form took 99999999999999999999 and answered an HTML 500
    product = make_product(stock=5)
    url = reverse("admin:inventory_product_change", args=[product.pk])

    response = admin_client.post(url, change_data(product, stock_delta=str(HUGE)))

    assert "stock_delta" in form_errors(response)
    assert stock_of(product) == 5


@pytest.mark.parametrize("value", [str(STOCK_MAX + 1), str(-STOCK_MAX - 1), str(-HUGE), "1e30", "1e3", "NaN", "0x10"])
def test_admin_stock_delta_out_of_range_or_not_an_integer_is_a_form_error(admin_client, make_product, value):
    product = make_product(stock=5)
    url = reverse("admin:inventory_product_change", args=[product.pk])

    assert "stock_delta" in form_errors(admin_client.post(url, change_data(product, stock_delta=value)))
    assert stock_of(product) == 5


def test_admin_stock_sum_past_stock_max_is_a_form_error_naming_stock_delta(admin_client, make_product):
    product = make_product(stock=1_000_000_000)
    url = reverse("admin:inventory_product_change", args=[product.pk])

    first = admin_client.post(url, change_data(product, stock_delta="1000000000"))
    second = admin_client.post(url, change_data(product, stock_delta="1000000000", name="Renamed"))

    assert first.status_code == 302
    errors = form_errors(second)
    assert "2147483647" in errors["stock_delta"][0]
    saved = Product.objects.get(pk=product.pk)
    assert (saved.stock, saved.name) == (2_000_000_000, product.name)


def test_admin_stock_may_reach_stock_max(admin_client, make_product):
    product = make_product(stock=STOCK_MAX - 1)
    url = reverse("admin:inventory_product_change", args=[product.pk])

    assert admin_client.post(url, change_data(product, stock_delta="1")).status_code == 302
    assert stock_of(product) == STOCK_MAX


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("stock", str(STOCK_MAX + 1)),
        ("stock", str(HUGE)),
        ("stock", "-1"),
        ("stock", "1e30"),
        ("price", "10000000000.00"),
        ("price", "1e30"),
        ("price", "-0.01"),
        ("price", "0.001"),
        ("price", "NaN"),
        ("price", "Infinity"),
    ],
)
def test_admin_add_product_out_of_range_is_a_form_error(admin_client, field, value):
    data = {"sku": "ADD-1", "name": "n", "price": "1.00", "stock": "1", "active": "on", field: value}

    assert field in form_errors(admin_client.post(reverse("admin:inventory_product_add"), data))
    assert not Product.objects.exists()


@pytest.mark.parametrize(("stock", "price"), [(str(STOCK_MAX), "9999999999.99"), ("0", "0")])
def test_admin_add_product_at_the_edges(admin_client, stock, price):
    data = {"sku": "ADD-1", "name": "n", "price": price, "stock": stock, "active": "on"}

    assert admin_client.post(reverse("admin:inventory_product_add"), data).status_code == 302
    product = Product.objects.get(sku="ADD-1")
    assert (product.stock, product.price) == (int(stock), Decimal(price))


@pytest.mark.parametrize("price", ["10000000000.00", "1e30", "-1"])
def test_admin_change_price_out_of_range_is_a_form_error(admin_client, make_product, price):
    product = make_product(price="5.00")
    url = reverse("admin:inventory_product_change", args=[product.pk])

    assert "price" in form_errors(admin_client.post(url, change_data(product, price=price)))
    assert Product.objects.get(pk=product.pk).price == Decimal("5.00")


# --- the services --------------------------------------------------------------------------


def test_stock_adjust_refuses_a_sum_past_stock_max_before_writing(make_product):
    product = make_product(stock=STOCK_MAX - 1)

    with pytest.raises(StockLimitExceeded) as refused:
        services.stock_adjust(product_id=product.pk, delta=2)

    assert refused.value.http_status == 409
    assert list(refused.value.fields) == ["stock_delta"]
    assert stock_of(product) == STOCK_MAX - 1


def test_stock_adjust_still_refuses_stock_below_zero(make_product):
    product = make_product(stock=1)

    with pytest.raises(StockRefused):
        services.stock_adjust(product_id=product.pk, delta=-2)


def test_product_create_refuses_stock_past_stock_max():
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError) as refused:
        services.product_create(sku="BIG", name="big", price=Decimal("1"), stock=STOCK_MAX + 1)

    assert "stock" in refused.value.message_dict
    assert not Product.objects.exists()
