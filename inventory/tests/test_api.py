"""The products REST API: read for any signed-in user; writes need inventory.add_product / change_product."""

from decimal import Decimal
from urllib.parse import quote

import pytest
from rest_framework.test import APIClient

from inventory.models import Product
from project.db import service_db

pytestmark = pytest.mark.django_db

PRODUCTS = "/api/products/"
FIELDS = {"id", "sku", "name", "price", "stock", "active", "created_at", "updated_at"}


def detail(product_id: int) -> str:
    return f"{PRODUCTS}{product_id}/"


def assert_error(response, status: int, *, code: str | None = None) -> dict:
    assert response.status_code == status, response.content
    body = response.json()
    assert set(body) <= {"code", "detail", "fields"}
    assert body["code"] and body["detail"]
    if code is not None:
        assert body["code"] == code
    return body


def snapshot(product: Product) -> tuple:
    row = Product.objects.get(pk=product.pk)
    return row.sku, row.name, row.price, row.stock, row.active, row.version


# --- reads ---------------------------------------------------------------------


def test_any_signed_in_user_lists_and_reads_products(api, make_product):
    a = make_product(stock=3, price="2.50", sku="A-1", name="Apple")
    b = make_product(stock=0)

    listing = api.get(PRODUCTS)
    one = api.get(detail(a.pk))

    assert listing.status_code == 200
    body = listing.json()
    assert body["count"] == 2
    assert [p["id"] for p in body["results"]] == [a.pk, b.pk]
    assert set(body["results"][0]) == FIELDS
    assert one.status_code == 200
    assert {k: one.json()[k] for k in ("id", "sku", "name", "price", "stock", "active")} == {
        "id": a.pk,
        "sku": "A-1",
        "name": "Apple",
        "price": "2.50",
        "stock": 3,
        "active": True,
    }


def test_unknown_product_is_404(api, make_product):
    product = make_product()
    for product_id in (product.pk + 1000, 2**63, 10**30):
        assert_error(api.get(detail(product_id)), 404, code="not_found")


def test_anonymous_gets_401(make_product):
    product = make_product()
    anonymous = APIClient()

    assert_error(anonymous.get(PRODUCTS), 401)
    assert_error(anonymous.get(detail(product.pk)), 401)
    assert_error(anonymous.post(PRODUCTS, {"sku": "X", "name": "x", "price": "1"}, format="json"), 401)


# --- create --------------------------------------------------------------------


def test_a_stock_manager_creates_a_product(stock_api, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(using=service_db("inventory"), execute=False) as callbacks:
        response = stock_api.post(PRODUCTS, {"sku": "NEW-1", "name": "New", "price": "3.20", "stock": 7}, format="json")

    assert response.status_code == 201, response.content
    product = Product.objects.get(sku="NEW-1")
    assert response.json()["id"] == product.pk
    assert (product.name, product.price, product.stock, product.active) == ("New", Decimal("3.20"), 7, True)
    assert len(callbacks) == 1  # reports hears about it once the product is committed


@pytest.mark.parametrize(
    "who",
    [
        "user",
        "staff",  # the staff flag alone grants nothing
        "view",
        "add only",  # may create, not change
        "change only",  # may change, not create
    ],
)
def test_writes_without_the_permission_are_403_and_change_nothing(who, api, staff_api, api_with, make_product):
    product = make_product(stock=3, name="Keep")
    client = {
        "user": api,
        "staff": staff_api,
        "view": api_with("inventory.view_product"),
        "add only": api_with("inventory.add_product"),
        "change only": api_with("inventory.change_product"),
    }[who]

    created = client.post(PRODUCTS, {"sku": "NO-1", "name": "No", "price": "1.00"}, format="json")
    changed = client.patch(detail(product.pk), {"name": "Changed", "stock_delta": 5}, format="json")

    if who == "add only":
        assert created.status_code == 201
    else:
        body = assert_error(created, 403, code="permission_denied")
        assert "inventory.add_product" in body["detail"]
        assert not Product.objects.filter(sku="NO-1").exists()
    if who == "change only":
        assert changed.status_code == 200
    else:
        body = assert_error(changed, 403, code="permission_denied")
        assert "inventory.change_product" in body["detail"]
        assert snapshot(product)[1:4] == ("Keep", Decimal("10.00"), 3)


def test_a_group_grants_the_permission_as_in_the_admin(user, make_product):
    from django.contrib.auth.models import Group, Permission

    stock_keepers = Group.objects.create(name="stock keepers")
    stock_keepers.permissions.add(Permission.objects.get(codename="change_product"))
    user.groups.add(stock_keepers)
    client = APIClient()
    client.force_authenticate(user)
    product = make_product(stock=3)

    assert client.patch(detail(product.pk), {"stock_delta": 2}, format="json").status_code == 200
    assert snapshot(product)[3] == 5


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"sku": "", "name": "x", "price": "1.00"},
        {"sku": "has space", "name": "x", "price": "1.00"},
        {"sku": "OK-1", "name": "", "price": "1.00"},
        {"sku": "OK-1", "name": "x", "price": "-1.00"},
        {"sku": "OK-1", "name": "x", "price": "abc"},
        {"sku": "OK-1", "name": "x", "price": "1.00", "stock": -1},
        {"sku": "OK-1", "name": "x", "price": "1.00", "stock": "5"},
        {"sku": "OK-1", "name": "x", "price": "1.00", "stock": 1.5},
    ],
)
def test_bad_product_bodies_are_400(stock_api, body):
    response = stock_api.post(PRODUCTS, body, format="json")

    assert_error(response, 400, code="invalid")
    assert "fields" in response.json()
    assert not Product.objects.exists()


def test_a_taken_sku_is_refused_not_a_500(stock_api, make_product):
    make_product(sku="TAKEN")
    other = make_product(sku="OTHER", name="Other")

    created = stock_api.post(PRODUCTS, {"sku": "TAKEN", "name": "Again", "price": "1.00"}, format="json")
    renamed = stock_api.patch(detail(other.pk), {"sku": "TAKEN", "name": "Renamed"}, format="json")

    for response in (created, renamed):
        assert 400 <= response.status_code < 500
        assert "sku" in assert_error(response, response.status_code)["fields"]
    assert Product.objects.filter(sku="TAKEN").count() == 1
    assert snapshot(other)[:2] == ("OTHER", "Other")


# --- update --------------------------------------------------------------------


def test_a_stock_manager_updates_fields_and_stock(stock_api, make_product, django_capture_on_commit_callbacks):
    product = make_product(stock=3, name="Old")
    version = snapshot(product)[5]

    with django_capture_on_commit_callbacks(using=service_db("inventory"), execute=False) as callbacks:
        response = stock_api.patch(
            detail(product.pk), {"name": "New", "price": "4.00", "stock_delta": 2}, format="json"
        )

    assert response.status_code == 200, response.content
    assert (response.json()["name"], response.json()["stock"]) == ("New", 5)
    assert snapshot(product) == (product.sku, "New", Decimal("4.00"), 5, True, version + 1)
    assert len(callbacks) == 1  # the rename reaches reports


def test_stock_delta_below_zero_is_409_and_changes_nothing(stock_api, make_product):
    product = make_product(stock=3, name="Keep", price="2.00")
    before = snapshot(product)

    response = stock_api.patch(
        detail(product.pk), {"name": "Changed", "price": "9.99", "stock_delta": -4}, format="json"
    )

    assert_error(response, 409, code="insufficient_stock")
    assert snapshot(product) == before


def test_stock_delta_may_empty_the_stock(stock_api, make_product):
    product = make_product(stock=3)

    response = stock_api.patch(detail(product.pk), {"stock_delta": -3}, format="json")

    assert response.status_code == 200
    assert response.json()["stock"] == 0


@pytest.mark.parametrize(
    "body", [{"stock_delta": "1"}, {"stock_delta": 1.5}, {"stock_delta": True}, {"price": "-1"}, {"sku": "a b"}]
)
def test_bad_patches_are_refused(stock_api, make_product, body):
    product = make_product(stock=3)
    before = snapshot(product)

    response = stock_api.patch(detail(product.pk), {"name": "Changed", **body}, format="json")

    assert_error(response, 400, code="invalid")
    assert snapshot(product) == before


def test_stock_cannot_be_set_blindly(stock_api, make_product):
    product = make_product(stock=3)
    before = snapshot(product)

    response = stock_api.patch(detail(product.pk), {"stock": 500}, format="json")

    # not a writable field: only stock_delta changes stock, so it cannot race reservations;
    # said as a 400 (issue 13), no longer a silent 200 that changed nothing
    body = assert_error(response, 400, code="invalid")
    assert "stock_delta" in body["fields"]["stock"][0]
    assert snapshot(product) == before


def test_patch_of_an_unknown_product_is_404(stock_api, make_product):
    product = make_product()
    for product_id in (product.pk + 1000, 2**63):
        assert_error(stock_api.patch(detail(product_id), {"name": "x"}, format="json"), 404)


# --- hostile input -------------------------------------------------------------


@pytest.mark.parametrize("raw_id", ["abc", "1 OR 1=1", "1; DROP TABLE inventory_product", "1' --", "-1", "1.0", "%00"])
def test_ids_that_are_strings_or_sql_are_404(stock_api, make_product, raw_id):
    product = make_product(stock=3, name="Keep")
    before = snapshot(product)
    path = f"{PRODUCTS}{quote(raw_id)}/"

    assert_error(stock_api.get(path), 404, code="not_found")
    assert_error(stock_api.patch(path, {"name": "Changed", "stock_delta": -3}, format="json"), 404, code="not_found")
    assert snapshot(product) == before
    assert Product.objects.count() == 1


@pytest.mark.parametrize(
    ("raw", "content_type", "status", "code"),
    [
        (b'{"sku": "X-1", "name": ', "application/json", 400, "parse_error"),
        (b"[" * 30_000, "application/json", 400, "parse_error"),
        (b"null", "application/json", 400, "invalid"),
        (b"sku=X-1&name=x&price=1", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
        (b'{"sku": "X-1", "name": "x", "price": "1"}', "text/plain", 415, "unsupported_media_type"),
    ],
)
def test_bad_bodies_write_nothing(stock_api, make_product, raw, content_type, status, code):
    product = make_product(stock=3, name="Keep")
    before = snapshot(product)

    assert_error(stock_api.post(PRODUCTS, raw, content_type=content_type), status, code=code)
    assert_error(stock_api.patch(detail(product.pk), raw, content_type=content_type), status, code=code)
    assert snapshot(product) == before
    assert Product.objects.count() == 1


@pytest.mark.parametrize(("method", "path"), [("put", "DETAIL"), ("delete", "DETAIL"), ("put", PRODUCTS)])
def test_other_methods_are_405_and_change_nothing(api_with, make_product, method, path):
    product = make_product(stock=3, name="Keep")
    before = snapshot(product)
    # Every product permission: the 405 is the method's, not a missing permission's 403.
    allowed = api_with(*(f"inventory.{action}_product" for action in ("view", "add", "change", "delete")))

    response = getattr(allowed, method)(detail(product.pk) if path == "DETAIL" else path, {}, format="json")

    assert_error(response, 405, code="method_not_allowed")
    assert snapshot(product) == before


def test_anonymous_writes_are_401_before_anything_else(make_product):
    product = make_product(stock=3, name="Keep")
    before = snapshot(product)
    anonymous = APIClient()

    assert_error(anonymous.patch(detail(product.pk), {"stock_delta": -3}, format="json"), 401)
    assert_error(anonymous.patch(detail(10**6), {"stock_delta": -3}, format="json"), 401)  # not 404
    assert_error(anonymous.post(PRODUCTS, b"{", content_type="application/json"), 401)  # not 400
    assert snapshot(product) == before
    assert Product.objects.count() == 1


def test_read_only_fields_on_patch_are_a_400_naming_them(stock_api, make_product):
    product = make_product(stock=3, name="Keep")
    before = snapshot(product)

    response = stock_api.patch(
        detail(product.pk), {"name": "Changed", "id": 7, "created_at": "2020-01-01"}, format="json"
    )

    fields = assert_error(response, 400, code="invalid")["fields"]
    assert set(fields) == {"id", "created_at"}
    assert all("Read-only" in messages[0] for messages in fields.values())
    assert snapshot(product) == before


@pytest.mark.parametrize(
    ("field", "says"), [("stock_delta", "stock"), ("colour", "Unknown field"), ("id", "Read-only")]
)
def test_fields_a_new_product_does_not_take_are_refused(stock_api, field, says):
    body = {"sku": "NEW-1", "name": "New", "price": "1.00", field: 3}

    fields = assert_error(stock_api.post(PRODUCTS, body, format="json"), 400, code="invalid")["fields"]

    assert says in fields[field][0]
    assert not Product.objects.exists()


# --- search, filters, ordering, page_size (django-filter) ------------------------------


@pytest.fixture
def catalogue(make_product):
    return {
        "cable": make_product(sku="CB-USB", name="USB-C cable", price="9.99", stock=200),
        "hub": make_product(sku="HUB-1", name="Desk hub (usb)", price="39.00", stock=0),
        "lamp": make_product(sku="LT-01", name="Lamp", price="120.00", stock=1, active=False),
        "mouse": make_product(sku="MS-01", name="Wireless mouse", price="29.50", stock=40),
    }


def ids(response) -> list[int]:
    assert response.status_code == 200, response.content
    return [p["id"] for p in response.json()["results"]]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"search": "usb"}, ["cable", "hub"]),  # name or sku, any case
        ({"search": "ms-"}, ["mouse"]),
        ({"sku": "lt-01"}, ["lamp"]),
        ({"active": "false"}, ["lamp"]),
        ({"active": "true", "stock_min": 1}, ["cable", "mouse"]),
        ({"stock_max": 1}, ["hub", "lamp"]),
        ({"stock_min": 1, "stock_max": 40}, ["lamp", "mouse"]),
        ({"price_min": "29.50", "price_max": "100"}, ["hub", "mouse"]),
        ({"search": "nothing like it"}, []),
    ],
)
def test_products_can_be_searched_and_filtered(api, catalogue, query, expected):
    assert ids(api.get(PRODUCTS, query)) == [catalogue[name].pk for name in expected]


@pytest.mark.parametrize(
    ("ordering", "expected"),
    [
        ("-price", ["lamp", "hub", "mouse", "cable"]),
        ("stock", ["hub", "lamp", "mouse", "cable"]),
        ("name", ["hub", "lamp", "cable", "mouse"]),
        ("-stock,name", ["cable", "mouse", "lamp", "hub"]),
    ],
)
def test_products_can_be_ordered(api, catalogue, ordering, expected):
    assert ids(api.get(PRODUCTS, {"ordering": ordering})) == [catalogue[name].pk for name in expected]


@pytest.mark.parametrize(
    "query",
    [
        {"ordering": "secret"},
        {"ordering": "price; DROP TABLE inventory_product"},
        {"stock_min": "many"},
        {"stock_min": -1},
        {"stock_max": 10**30},
        {"price_min": "abc"},
        {"price_max": "1" * 40},
        {"search": "x" * 201},
    ],
)
def test_bad_filters_are_a_400_naming_the_parameter(api, catalogue, query):
    body = assert_error(api.get(PRODUCTS, query), 400, code="invalid")

    assert set(body["fields"]) == set(query)
    assert Product.objects.count() == 4


def test_page_size_is_bounded(api, catalogue, settings):
    settings.API_MAX_PAGE_SIZE = 3

    first = api.get(PRODUCTS, {"page_size": 2, "ordering": "-price"}).json()

    assert [p["sku"] for p in first["results"]] == ["LT-01", "HUB-1"]
    assert "page_size=2" in first["next"] and "ordering=-price" in first["next"]
    assert len(api.get(PRODUCTS, {"page_size": 500}).json()["results"]) == 3
    assert len(api.get(PRODUCTS, {"page_size": "x"}).json()["results"]) == 3  # the default, cut to the maximum
