"""The orders REST API: placing, reading, listing and cancelling orders.

In-process: the saga's on-commit publish never runs inside these tests'
transactions, so orders stay `pending` unless a test drives the services.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
from django.conf import settings
from django.core.cache import caches
from django.core.cache.backends.filebased import FileBasedCache
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from orders import services
from orders.models import CancelledOrder, Order, OrderLine

pytestmark = pytest.mark.django_db

ORDERS = "/api/orders/"
MULTIPART = "multipart/form-data; boundary=x"


def detail(order_id: int) -> str:
    return f"{ORDERS}{order_id}/"


def assert_error(response, status: int, *, code: str | None = None, fields: bool | None = None) -> dict:
    """The API's one error shape: {"code", "detail"} and, for input errors, "fields"."""
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/json"
    body = response.json()
    assert set(body) <= {"code", "detail", "fields"}
    assert isinstance(body["code"], str) and body["code"]
    assert isinstance(body["detail"], str) and body["detail"]
    if code is not None:
        assert body["code"] == code
    if fields is True:
        assert isinstance(body["fields"], dict) and body["fields"]
    elif fields is False:
        assert "fields" not in body
    return body


def assert_nothing_written() -> None:
    assert Order.objects.count() == 0
    assert OrderLine.objects.count() == 0


@pytest.fixture(autouse=True)
def fresh_throttle():
    """No order-creation history from earlier tests or runs (the throttle's file cache outlives both)."""
    caches["throttle"].clear()
    yield
    caches["throttle"].clear()


@pytest.fixture
def product(make_product):
    return make_product(stock=10, price="2.50", name="Apple")


def place(user, product, quantity=1) -> Order:
    return services.order_create(user=user, lines=[{"product": product.pk, "quantity": quantity}]).order


# --- POST /api/orders/ -----------------------------------------------------------


def test_post_places_a_pending_order(api, product, user):
    response = api.post(ORDERS, {"lines": [{"product": product.pk, "quantity": 3}]}, format="json")

    assert response.status_code == 202, response.content
    body = response.json()
    order = Order.objects.get()
    assert body["id"] == order.pk
    assert body["status"] == "pending"
    assert body["user"] == user.username
    assert body["lines"] == [{"product": product.pk, "product_name": "Apple", "unit_price": "2.50", "quantity": 3}]
    assert "Idempotent-Replayed" not in response
    assert order.user == user


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"lines": None},
        {"lines": "lines"},
        {"lines": {"product": "P", "quantity": 1}},
        {"lines": []},
        {"lines": ["a line"]},
        {"lines": [{"product": "P"}]},
        {"lines": [{"quantity": 1}]},
        {"lines": [{"product": "P", "quantity": 0}]},
        {"lines": [{"product": "P", "quantity": -1}]},
        {"lines": [{"product": "P", "quantity": 1.5}]},
        {"lines": [{"product": "P", "quantity": "2"}]},
        {"lines": [{"product": "P", "quantity": None}]},
        {"lines": [{"product": "P", "quantity": True}]},
        {"lines": [{"product": "P", "quantity": settings.ORDER_MAX_QUANTITY + 1}]},
        {"lines": [{"product": "P", "quantity": 2**31}]},
        {"lines": [{"product": "P", "quantity": 99999999999999999999}]},
        {"lines": [{"product": "P", "quantity": -(2**63)}]},
        {"lines": [{"product": "P", "quantity": 1e3}]},
        {"lines": [{"product": "P", "quantity": "1e3"}]},
        {"lines": [{"product": "P", "quantity": 1e30}]},
        {"lines": [{"product": "P", "quantity": 1}, {"product": "P", "quantity": 2}]},
        {"lines": [{"product": "1", "quantity": 1}]},
        {"lines": [{"product": 0, "quantity": 1}]},
        {"lines": [{"product": 10_000_000, "quantity": 1}]},
        {"lines": [{"product": 2**63, "quantity": 1}]},
        {"lines": [{"product": 10**30, "quantity": 1}]},
        {"lines": [{"product": "1 OR 1=1", "quantity": 1}]},
        {"lines": [{"product": "1; DROP TABLE orders_order; --", "quantity": 1}]},
        {"lines": [{"product": "P", "quantity": "1 OR 1=1"}]},
        {"lines": [{"product": {"$gt": 0}, "quantity": 1}]},
        {"lines": [[{"product": "P", "quantity": 1}]]},
        [{"product": "P", "quantity": 1}],
    ],
)
def test_post_refuses_bad_bodies_and_writes_nothing(api, product, body):
    def resolve(value):
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v) for v in value]
        return product.pk if value == "P" else value

    response = api.post(ORDERS, resolve(body), format="json")

    assert_error(response, 400, code="invalid", fields=True)
    assert_nothing_written()


def test_post_takes_the_largest_quantity(api, make_product):
    product = make_product(stock=settings.ORDER_MAX_QUANTITY)

    response = api.post(
        ORDERS, {"lines": [{"product": product.pk, "quantity": settings.ORDER_MAX_QUANTITY}]}, format="json"
    )

    assert response.status_code == 202, response.content
    assert response.json()["lines"][0]["quantity"] == settings.ORDER_MAX_QUANTITY


def test_post_refuses_an_inactive_product(api, make_product):
    off = make_product(active=False)

    response = api.post(ORDERS, {"lines": [{"product": off.pk, "quantity": 1}]}, format="json")

    body = assert_error(response, 400, code="invalid", fields=True)
    assert "not on sale" in body["fields"]["lines"]["0"]["product"][0]
    assert_nothing_written()


def test_post_names_the_bad_line_and_field(api, product):
    response = api.post(
        ORDERS,
        {"lines": [{"product": product.pk, "quantity": 1}, {"product": product.pk + 1, "quantity": 0}]},
        format="json",
    )

    body = assert_error(response, 400, fields=True)
    assert "quantity" in body["fields"]["lines"]["1"]
    assert_nothing_written()


def test_post_refuses_too_many_lines(api, make_product):
    products = [make_product() for _ in range(settings.ORDER_MAX_LINES + 1)]

    response = api.post(ORDERS, {"lines": [{"product": p.pk, "quantity": 1} for p in products]}, format="json")

    body = assert_error(response, 400, fields=True)
    assert "lines" in body["fields"]
    assert_nothing_written()


@pytest.mark.parametrize(
    "raw",
    [
        b'{"lines": [',
        b'{"lines": [{"product": 1, "quantity": 1}]} trailing',
        b'{"lines": [{"product": NaN, "quantity": 1}]}',
        b'\xff\xfe{"lines": []}',  # not UTF-8
        b"[" * 30_000,  # nested past the json module's recursion limit, still under the size limit
        b'{"lines": ' + b"[" * 20_000 + b"]" * 20_000 + b"}",
    ],
)
def test_post_refuses_malformed_json(api, product, raw):
    response = api.post(ORDERS, raw, content_type="application/json")

    assert_error(response, 400, code="parse_error", fields=False)
    assert_nothing_written()


@pytest.mark.parametrize("raw", [b"", b"null", b"42", b'"lines"', b"true"])
def test_post_refuses_json_that_is_not_an_object(api, product, raw):
    response = api.post(ORDERS, raw, content_type="application/json")

    assert_error(response, 400, code="invalid", fields=True)
    assert_nothing_written()


@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        ("lines=1", "application/x-www-form-urlencoded"),
        ('{"lines": []}', "text/plain"),
        ("<lines><line product='1' quantity='1'/></lines>", "application/xml"),
        ('--x\r\nContent-Disposition: form-data; name="lines"\r\n\r\n1\r\n--x--\r\n', MULTIPART),
    ],
)
def test_post_refuses_other_content_types(api, product, data, content_type):
    response = api.post(ORDERS, data, content_type=content_type)

    assert_error(response, 415, code="unsupported_media_type")
    assert_nothing_written()


def test_post_refuses_an_oversized_body_unread(api, product):
    body = json.dumps(
        {"lines": [{"product": product.pk, "quantity": 1}], "padding": "x" * settings.DATA_UPLOAD_MAX_MEMORY_SIZE}
    )
    assert len(body) > settings.DATA_UPLOAD_MAX_MEMORY_SIZE

    response = api.post(ORDERS, body, content_type="application/json")

    assert_error(response, 413, code="request_too_large", fields=False)
    assert_nothing_written()


def test_anonymous_requests_get_401(product, user):
    order = place(user, product)
    anonymous = APIClient()

    for response in (
        anonymous.post(ORDERS, {"lines": [{"product": product.pk, "quantity": 1}]}, format="json"),
        anonymous.get(ORDERS),
        anonymous.get(detail(order.pk)),
        anonymous.post(f"{detail(order.pk)}cancel/"),
    ):
        assert_error(response, 401, code="not_authenticated")
        # TokenAuthentication comes first, so DRF names the scheme (and answers 401, not 403)
        assert response["WWW-Authenticate"] == "Token"
    assert Order.objects.count() == 1


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("post", ORDERS, '{"lines": ['),  # malformed: still 401, not 400
        ("post", ORDERS, "lines=1"),  # wrong content type: 401, not 415
        ("get", detail(10**6), None),  # unknown id: 401, not 404
        ("post", f"{detail(10**6)}cancel/", None),
        ("get", f"{ORDERS}?status=shipped", None),
    ],
)
def test_anonymous_requests_learn_nothing_but_401(method, path, body):
    response = getattr(APIClient(), method)(path, body, content_type="application/json")

    assert_error(response, 401, code="not_authenticated")
    assert_nothing_written()


def test_a_token_authenticates(user, product):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")

    response = client.post(ORDERS, {"lines": [{"product": product.pk, "quantity": 1}]}, format="json")

    assert response.status_code == 202
    bad = APIClient()
    bad.credentials(HTTP_AUTHORIZATION="Token not-a-token")
    assert_error(bad.get(ORDERS), 401)


# --- Idempotency-Key -----------------------------------------------------------


def test_idempotency_key_replays_the_same_order(api, product):
    body = {"lines": [{"product": product.pk, "quantity": 2}]}

    first = api.post(ORDERS, body, format="json", HTTP_IDEMPOTENCY_KEY="retry-1")
    again = api.post(ORDERS, body, format="json", HTTP_IDEMPOTENCY_KEY="retry-1")

    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first
    assert Order.objects.count() == 1


def test_idempotency_key_with_another_body_is_a_conflict(api, product):
    api.post(ORDERS, {"lines": [{"product": product.pk, "quantity": 2}]}, format="json", HTTP_IDEMPOTENCY_KEY="k")

    response = api.post(
        ORDERS, {"lines": [{"product": product.pk, "quantity": 5}]}, format="json", HTTP_IDEMPOTENCY_KEY="k"
    )

    assert_error(response, 409, code="conflict")
    assert Order.objects.count() == 1


def test_an_idempotency_key_with_sql_is_just_a_key(api, product):
    body = {"lines": [{"product": product.pk, "quantity": 1}]}
    key = "k'); DELETE FROM orders_order; --"

    first = api.post(ORDERS, body, format="json", HTTP_IDEMPOTENCY_KEY=key)
    again = api.post(ORDERS, body, format="json", HTTP_IDEMPOTENCY_KEY=key)

    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert Order.objects.get().idempotency_key == key


@pytest.mark.parametrize("key", ["", "k" * 256])
def test_an_empty_or_overlong_idempotency_key_is_refused(api, product, key):
    response = api.post(
        ORDERS, {"lines": [{"product": product.pk, "quantity": 1}]}, format="json", HTTP_IDEMPOTENCY_KEY=key
    )

    assert_error(response, 400, fields=True)
    assert_nothing_written()


def test_idempotency_key_of_a_cancelled_order_answers_410(api, product, user):
    body = {"lines": [{"product": product.pk, "quantity": 1}]}
    first = api.post(ORDERS, body, format="json", HTTP_IDEMPOTENCY_KEY="gone").json()
    services.order_compensate(order_id=first["id"], reason="went away")
    services.order_delete(order_id=first["id"])

    again = api.post(ORDERS, body, format="json", HTTP_IDEMPOTENCY_KEY="gone")

    assert again.status_code == 410
    assert again.json()["id"] == first["id"]
    assert again.json()["status"] == "cancelled"
    assert Order.objects.count() == 0


# --- GET /api/orders/{id}/ ------------------------------------------------------


def test_get_a_pending_order(api, product, user):
    order = place(user, product, 2)

    response = api.get(detail(order.pk))

    assert response.status_code == 200
    body = response.json()
    assert (body["id"], body["status"]) == (order.pk, "pending")
    assert body["lines"][0]["quantity"] == 2


def test_get_a_cancelled_order_is_410_with_the_reason(api, product, user):
    order = place(user, product)
    services.order_compensate(order_id=order.pk, reason="out of apples", cause="refused")
    services.order_delete(order_id=order.pk)

    response = api.get(detail(order.pk))

    assert response.status_code == 410
    body = response.json()
    assert body["id"] == order.pk
    assert body["status"] == "cancelled"
    assert body["reason"] == "out of apples"
    assert body["cause"] == "refused"
    assert body["refusal"] == []
    assert body["lines"][0]["product"] == product.pk


def test_a_cancelled_order_refused_by_inventory_shows_the_refusal_as_data(api, product, user):
    from inventory import services as inventory_services
    from inventory.exceptions import StockRefused

    order = place(user, product, quantity=product.stock + 2)
    with pytest.raises(StockRefused):
        inventory_services.stock_reserve(
            order_id=order.pk, lines=[{"product": product.pk, "quantity": product.stock + 2}]
        )
    services.order_compensate(order_id=order.pk)
    services.order_delete(order_id=order.pk)

    body = api.get(detail(order.pk)).json()

    wanted, have = product.stock + 2, product.stock
    assert body["reason"] == f"insufficient stock for product {product.pk}: wanted {wanted}, have {have}"
    assert body["refusal"] == [
        {"product": product.pk, "code": "insufficient_stock", "wanted": wanted, "available": have}
    ]


def test_someone_elses_order_is_404(product, user, other_user):
    order = place(user, product)
    cancelled = place(user, product)
    services.order_compensate(order_id=cancelled.pk, reason="x")
    services.order_delete(order_id=cancelled.pk)
    theirs = APIClient()
    theirs.force_authenticate(other_user)

    for path in (detail(order.pk), detail(cancelled.pk)):
        assert_error(theirs.get(path), 404, code="not_found")
        assert_error(theirs.post(f"{path}cancel/"), 404, code="not_found")
    assert_error(theirs.get(detail(order.pk + 1000)), 404)
    assert Order.objects.get(pk=order.pk).status == "pending"


@pytest.mark.parametrize("order_id", [2**63 - 1, 2**63, 10**30])
def test_an_id_beyond_the_column_is_404(api, order_id):
    assert_error(api.get(detail(order_id)), 404, code="not_found")
    assert_error(api.post(f"{detail(order_id)}cancel/"), 404, code="not_found")


@pytest.mark.parametrize(
    "raw_id",
    ["abc", "1 OR 1=1", "1; DROP TABLE orders_order", "1' --", "-1", "1.0", "0x1", "1e3", "\x00", "%00", "../1"],
)
def test_ids_that_are_strings_or_sql_are_404(api, product, user, raw_id):
    order = place(user, product)

    for path in (f"{ORDERS}{quote(raw_id)}/", f"{ORDERS}{quote(raw_id)}/cancel/"):
        assert_error(api.get(path), 404, code="not_found")
        assert_error(api.post(path), 404, code="not_found")
    order.refresh_from_db()
    assert order.status == "pending"
    assert Order.objects.count() == 1


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ({"status": "pending' OR '1'='1"}, 400),
        ({"status": "pending; DROP TABLE orders_order"}, 400),
        ({"page": "1 OR 1=1"}, 404),
        ({"page": "0"}, 404),
        ({"page": "99"}, 404),
    ],
)
def test_list_query_parameters_with_sql_are_refused(api, product, user, other_user, query, status):
    place(other_user, product)

    response = api.get(ORDERS, query)

    assert_error(response, status)
    assert Order.objects.count() == 1


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("put", ORDERS),
        ("patch", ORDERS),
        ("delete", ORDERS),
        ("put", "ORDER"),
        ("patch", "ORDER"),
        ("delete", "ORDER"),
        ("post", "ORDER"),
        ("get", "CANCEL"),
        ("delete", "CANCEL"),
    ],
)
def test_other_methods_are_405_and_change_nothing(api, product, user, method, path):
    order = place(user, product)
    path = {"ORDER": detail(order.pk), "CANCEL": f"{detail(order.pk)}cancel/"}.get(path, path)

    response = getattr(api, method)(path, {"lines": [{"product": product.pk, "quantity": 1}]}, format="json")

    assert_error(response, 405, code="method_not_allowed")
    assert method.upper() not in response["Allow"]
    order.refresh_from_db()
    assert order.status == "pending"
    assert Order.objects.count() == 1


def test_view_order_may_see_any_order_and_the_staff_flag_alone_may_not(staff_api, api_with, product, user):
    order = place(user, product)

    assert api_with("orders.view_order").get(detail(order.pk)).status_code == 200
    assert api_with("orders.change_order").get(detail(order.pk)).status_code == 200  # as in the admin
    assert_error(staff_api.get(detail(order.pk)), 404, code="not_found")


def test_a_cancelled_record_of_another_user_needs_view_cancelledorder(api_with, product, user):
    order = place(user, product)
    services.order_compensate(order_id=order.pk, reason="x")
    services.order_delete(order_id=order.pk)

    assert api_with("orders.view_cancelledorder").get(detail(order.pk)).status_code == 410
    # Seeing live orders is not seeing the records of deleted ones.
    assert_error(api_with("orders.view_order", "orders.change_order").get(detail(order.pk)), 404, code="not_found")


def test_an_order_one_may_see_but_not_cancel_is_403_and_stays(api_with, product, user):
    order = place(user, product)
    cancelled = place(user, product)
    services.order_compensate(order_id=cancelled.pk, reason="x")
    services.order_delete(order_id=cancelled.pk)
    viewer = api_with("orders.view_order", "orders.view_cancelledorder")

    body = assert_error(viewer.post(f"{detail(order.pk)}cancel/"), 403, code="permission_denied")
    assert "orders.change_order" in body["detail"]
    assert_error(viewer.post(f"{detail(cancelled.pk)}cancel/"), 403, code="permission_denied")
    assert Order.objects.get(pk=order.pk).status == "pending"


def test_a_cancel_deleted_at_once_shows_the_record_only_to_whom_may_see_it(django_user_model, product, user):
    """The 202's body once compensation has already deleted the order (a worker faster than the request)."""
    from orders.api import cancelled_as_seen_by
    from testing.permissions import grant

    order = place(user, product)
    services.order_cancel(order=order, actor=order.user)
    services.order_delete(order_id=order.pk)
    manager = grant(django_user_model.objects.create_user("manager"), ["orders.view_order", "orders.change_order"])
    auditor = grant(
        django_user_model.objects.create_user("auditor"), ["orders.change_order", "orders.view_cancelledorder"]
    )

    assert not Order.objects.filter(pk=order.pk).exists()
    assert cancelled_as_seen_by(user, order)["status"] == "cancelled"
    assert cancelled_as_seen_by(auditor, order)["status"] == "cancelled"
    shown = cancelled_as_seen_by(manager, order)
    assert (shown["id"], shown["status"]) == (order.pk, "cancelling")
    assert "reason" not in shown


def test_change_order_cancels_another_users_order(
    api, api_with, product, user, django_user_model, django_capture_on_commit_callbacks, caplog
):
    order = place(user, product)
    manager = api_with("orders.view_order", "orders.change_order")
    staff = django_user_model.objects.get(username="granted-1")  # api_with's first user

    with (
        caplog.at_level("INFO", logger="orders.services"),
        django_capture_on_commit_callbacks(execute=False) as callbacks,
    ):
        response = manager.post(f"{detail(order.pk)}cancel/")

    assert response.status_code == 202
    assert response.json()["status"] == "cancelling"
    order.refresh_from_db()
    # The customer is not told they cancelled it: the reason names the orders manager.
    reason = f"cancelled by staff user '{staff.username}'"
    assert (order.status, order.cancel_reason) == ("cancelling", reason)
    assert len(callbacks) == 1
    [asked] = [r for r in caplog.records if getattr(r, "actor_id", None) is not None]
    assert asked.levelname == "INFO"
    assert (asked.order_id, asked.actor_id, asked.actor_username) == (order.pk, staff.pk, staff.username)
    assert f"order {order.pk}: cancel asked by user {staff.username} (id {staff.pk})" in asked.getMessage()
    services.order_delete(order_id=order.pk)
    assert api.get(detail(order.pk)).json()["reason"] == reason  # the owner's 410 says who


# --- GET /api/orders/ -----------------------------------------------------------


def test_list_shows_only_my_orders_and_view_order_sees_all(api, staff_api, api_with, product, user, other_user):
    mine = [place(user, product).pk for _ in range(2)]
    theirs = place(other_user, product).pk

    response = api.get(ORDERS)

    assert response.status_code == 200
    body = response.json()
    assert {"count", "next", "previous", "results"} <= set(body)
    assert sorted(o["id"] for o in body["results"]) == sorted(mine)
    assert body["count"] == 2
    viewer = api_with("orders.view_order").get(ORDERS).json()
    assert sorted(o["id"] for o in viewer["results"]) == sorted([*mine, theirs])
    # The staff flag alone: its own orders (none).
    assert staff_api.get(ORDERS).json()["results"] == []


def test_list_filters_by_status(api, product, user):
    pending = place(user, product).pk
    confirmed = place(user, product).pk
    services.order_confirm(order_id=confirmed)

    assert [o["id"] for o in api.get(ORDERS, {"status": "confirmed"}).json()["results"]] == [confirmed]
    assert [o["id"] for o in api.get(ORDERS, {"status": "pending"}).json()["results"]] == [pending]
    assert api.get(ORDERS, {"status": "cancelling"}).json()["results"] == []


def test_list_refuses_an_unknown_status(api):
    body = assert_error(api.get(ORDERS, {"status": "shipped"}), 400, fields=True)
    assert "status" in body["fields"]


def cancel(order: Order, reason: str = "out of stock") -> None:
    services.order_compensate(order_id=order.pk, reason=reason)
    services.order_delete(order_id=order.pk)


def test_status_cancelled_lists_my_cancelled_orders_and_view_cancelledorder_sees_all(
    api, api_with, product, user, other_user
):
    mine = [place(user, product) for _ in range(2)]
    theirs = place(other_user, product)
    live = place(user, product)
    for order in (*mine, theirs):
        cancel(order, reason=f"reason {order.pk}")

    response = api.get(ORDERS, {"status": "cancelled"})

    assert response.status_code == 200
    body = response.json()
    assert body["count"] == 2
    assert [o["id"] for o in body["results"]] == sorted((o.pk for o in mine), reverse=True)
    for row in body["results"]:
        assert row["status"] == "cancelled"
        assert row["reason"] == f"reason {row['id']}"
        assert row == api.get(detail(row["id"])).json()  # what the 410 answers
    viewer = api_with("orders.view_cancelledorder").get(ORDERS, {"status": "cancelled"}).json()
    assert {o["id"] for o in viewer["results"]} == {*(o.pk for o in mine), theirs.pk}
    orders_only = api_with("orders.view_order").get(ORDERS, {"status": "cancelled"}).json()
    assert orders_only["results"] == []
    # without the filter: the orders that exist, as before
    assert [o["id"] for o in api.get(ORDERS).json()["results"]] == [live.pk]


def test_cancelled_orders_are_paginated_like_the_rest(api, product, user):
    orders = [place(user, product) for _ in range(3)]
    for order in orders:
        cancel(order)

    first = api.get(ORDERS, {"status": "cancelled", "page_size": 2}).json()
    second = api.get(first["next"]).json()

    assert first["count"] == 3
    assert len(first["results"]) == 2
    assert "status=cancelled" in first["next"]
    assert [o["id"] for o in first["results"] + second["results"]] == [o.pk for o in reversed(orders)]
    assert_error(api.get(ORDERS, {"status": "cancelled", "page": 9}), 404)


def test_an_unknown_status_names_cancelled_among_the_choices(api):
    body = assert_error(api.get(ORDERS, {"status": "canceled"}), 400, fields=True)

    assert "cancelled" in body["fields"]["status"][0]


def test_page_size_is_bounded(api, product, user, settings):
    settings.API_MAX_PAGE_SIZE = 3
    for _ in range(5):
        place(user, product)

    assert len(api.get(ORDERS, {"page_size": 2}).json()["results"]) == 2
    assert len(api.get(ORDERS, {"page_size": 1000}).json()["results"]) == 3
    assert len(api.get(ORDERS).json()["results"]) == 3  # 50 by default, cut to the maximum too


@pytest.mark.parametrize(
    ("body", "path", "says"),
    [
        ({"lines": [{"product": "P", "quantity": 1}], "status": "confirmed"}, ("status",), "cancel"),
        ({"lines": [{"product": "P", "quantity": 1}], "user": "someone"}, ("user",), "Read-only"),
        ({"lines": [{"product": "P", "quantity": 1}], "note": "x"}, ("note",), "Unknown field"),
        ({"lines": [{"product": "P", "quantity": 1, "unit_price": "0.01"}]}, ("lines", "0", "unit_price"), "price"),
        ({"lines": [{"product": "P", "quantity": 1, "qty": 5}]}, ("lines", "0", "qty"), "quantity"),
    ],
)
def test_fields_an_order_does_not_take_are_refused_not_dropped(api, product, body, path, says):
    def resolve(value):
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v) for v in value]
        return product.pk if value == "P" else value

    response = api.post(ORDERS, resolve(body), format="json")

    error = assert_error(response, 400, code="invalid", fields=True)["fields"]
    for key in path:
        error = error[key]
    assert says in error[0]
    assert_nothing_written()


# --- POST /api/orders/{id}/cancel/ ----------------------------------------------


def test_cancel_starts_compensation(api, product, user, django_capture_on_commit_callbacks, caplog):
    caplog.set_level("INFO", logger="orders.services")
    order = place(user, product)
    services.order_confirm(order_id=order.pk)

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = api.post(f"{detail(order.pk)}cancel/")

    assert response.status_code == 202
    assert response.json()["status"] == "cancelling"
    order.refresh_from_db()
    assert (order.status, order.cancel_reason) == ("cancelling", services.USER_CANCEL_REASON)
    assert len(callbacks) == 1
    assert not [r for r in caplog.records if getattr(r, "actor_id", None) is not None]  # only another's is logged


def test_cancel_of_a_cancelled_order_is_not_an_error(api, product, user):
    order = place(user, product)
    services.order_compensate(order_id=order.pk, reason="gone")
    services.order_delete(order_id=order.pk)

    response = api.post(f"{detail(order.pk)}cancel/")

    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    assert response.json()["reason"] == "gone"  # the first reason stays
    assert CancelledOrder.objects.count() == 1


# --- throttling (ORDER_CREATE_THROTTLE) -------------------------------------------


def test_order_creation_is_throttled_per_user_with_retry_after(api, product, other_user, settings):
    settings.ORDER_CREATE_THROTTLE = "3/min"
    body = {"lines": [{"product": product.pk, "quantity": 1}]}

    placed = [api.post(ORDERS, body, format="json").status_code for _ in range(3)]
    refused = api.post(ORDERS, body, format="json")

    assert placed == [202, 202, 202]
    assert_error(refused, 429, code="throttled", fields=False)
    assert 1 <= int(refused["Retry-After"]) <= 60
    assert Order.objects.count() == 3
    # Only placing orders is limited, and per user.
    assert api.get(ORDERS).status_code == 200
    theirs = APIClient()
    theirs.force_authenticate(other_user)
    assert theirs.post(ORDERS, body, format="json").status_code == 202


def test_refused_posts_count_too(api, product, settings):
    settings.ORDER_CREATE_THROTTLE = "2/min"

    bad = [api.post(ORDERS, {"lines": []}, format="json").status_code for _ in range(2)]
    good = api.post(ORDERS, {"lines": [{"product": product.pk, "quantity": 1}]}, format="json")

    assert bad == [400, 400]
    assert_error(good, 429, code="throttled")
    assert_nothing_written()


def test_throttling_can_be_switched_off(api, product, settings):
    settings.ORDER_CREATE_THROTTLE = None

    statuses = {api.post(ORDERS, {"lines": [{"product": product.pk, "quantity": 1}]}, format="json").status_code}
    statuses |= {api.post(ORDERS, {"lines": [{"product": product.pk, "quantity": 1}]}, format="json").status_code}

    assert statuses == {202}


SEE_THROTTLE = """
import sys, types
import django
django.setup()
from project.http.throttles import OrderCreateThrottle
user = types.SimpleNamespace(pk=int(sys.argv[1]), is_authenticated=True)
request = types.SimpleNamespace(user=user, method="POST", META={})
print("allowed" if OrderCreateThrottle().allow_request(request, None) else "throttled")
"""


def test_every_web_process_shares_the_throttle(api, product, user, settings):
    """gunicorn runs several processes: a history kept per process would multiply the limit."""
    if not isinstance(caches["throttle"], FileBasedCache):
        pytest.skip("THROTTLE_CACHE_URL names another cache than the default file cache")
    settings.ORDER_CREATE_THROTTLE = "2/min"
    for _ in range(2):
        assert api.post(ORDERS, {"lines": [{"product": product.pk, "quantity": 1}]}, format="json").status_code == 202

    env = {**os.environ, "ORDER_CREATE_THROTTLE": "2/min", "DJANGO_SETTINGS_MODULE": "project.settings"}
    other_process = subprocess.run(
        [sys.executable, "-c", SEE_THROTTLE, str(user.pk)],
        cwd=Path(settings.BASE_DIR),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    assert other_process.stdout.strip() == "throttled", other_process.stderr
