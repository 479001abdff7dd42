"""The front door: the landing page, the API root, a token for a password, and API URLs without their slash."""

import os
import subprocess
import sys

import pytest
from django.core.cache import caches
from django.urls import get_resolver
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from orders.models import Order
from project.urls import without_trailing_slash

pytestmark = pytest.mark.django_db

TOKEN = "/api/auth/token/"
PASSWORD = "a-long-password-1"


@pytest.fixture(autouse=True)
def fresh_throttle():
    """No login or order history from earlier tests or runs (the throttle's file cache outlives both)."""
    caches["throttle"].clear()
    yield
    caches["throttle"].clear()


@pytest.fixture
def alice(django_user_model):
    return django_user_model.objects.create_user(username="alice", password=PASSWORD)


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/json"
    body = response.json()
    assert set(body) <= {"code", "detail", "fields"}
    assert body["code"] == code
    assert isinstance(body["detail"], str) and body["detail"]
    return body


# --- / ---------------------------------------------------------------------------


def test_the_landing_page_links_everything(client, settings):
    settings.FLOWER_URL = "http://flower.example:5555/"

    response = client.get("/")

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/html")
    page = response.content.decode()
    for href in ("/admin/", "/api/docs/", "/api/", "/api/schema/", TOKEN, "/healthz", "/readyz"):
        assert f'href="{href}"' in page, href
    assert 'href="http://flower.example:5555/"' in page
    assert "<script" not in page


def test_the_admins_view_site_link_leads_to_the_landing_page(admin_client):
    index = admin_client.get("/admin/").content.decode()

    assert 'href="/"' in index  # "View site"
    assert admin_client.get("/").status_code == 200


def test_flower_url_follows_flowers_port_and_prefix(tmp_path):
    """FLOWER_URL from FLOWER_PORT (what Procfile and `make run` start Flower on), or ORDERFLOW_FLOWER_URL."""

    def flower_url(**env):
        code = "import django; django.setup(); from django.conf import settings; print(settings.FLOWER_URL)"
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWER_", "ORDERFLOW_FLOWER"))}
        result = subprocess.run(
            [sys.executable, "-c", code],
            env={**clean, "ORDERFLOW_VAR_DIR": str(tmp_path), "DJANGO_SETTINGS_MODULE": "project.settings", **env},
            capture_output=True,
            text=True,
            check=True,
        )
        return result.stdout.strip()

    assert flower_url() == "http://127.0.0.1:5555/"
    assert flower_url(FLOWER_PORT="5600", FLOWER_URL_PREFIX="/flower/") == "http://127.0.0.1:5600/flower/"
    assert flower_url(ORDERFLOW_FLOWER_URL="https://ops.example/flower/") == "https://ops.example/flower/"


def test_the_landing_page_is_get_only(client):
    assert client.post("/").status_code == 405


# --- /api/ -----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/", "/api"])
def test_the_api_root_lists_the_endpoints_to_anyone(path):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token not-a-token")  # a bad token does not hide the map

    response = client.get(path)

    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert response.json() == {
        "orders": "http://testserver/api/orders/",
        "cancelled_orders": "http://testserver/api/orders/?status=cancelled",
        "products": "http://testserver/api/products/",
        "reports": "http://testserver/api/reports/products/",
        "token": f"http://testserver{TOKEN}",
        "schema": "http://testserver/api/schema/",
        "docs": "http://testserver/api/docs/",
    }


def test_every_link_of_the_api_root_answers(api, reports_api):
    for name, url in APIClient().get("/api/").json().items():
        # The sales totals are every customer's: a user needs reports.view_productreport (docs/security.md).
        client = reports_api if name == "reports" else api
        response = client.get(url) if name != "token" else client.options(url)
        assert response.status_code == 200, (name, response.status_code)
    assert api.get("/api/reports/products/").status_code == 403


# --- POST /api/auth/token/ -------------------------------------------------------


def test_a_user_who_is_not_staff_gets_a_token_with_a_password(alice):
    client = APIClient()

    response = client.post(TOKEN, {"username": "alice", "password": PASSWORD}, format="json")

    assert response.status_code == 200, response.content
    assert response.json() == {"token": Token.objects.get(user=alice).key}
    assert client.post(TOKEN, {"username": "alice", "password": PASSWORD}, format="json").json() == response.json()
    client.credentials(HTTP_AUTHORIZATION=f"Token {response.json()['token']}")
    assert client.get("/api/orders/").status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {"username": "alice", "password": "wrong"},
        {"username": "bob", "password": PASSWORD},
        {"username": "ALICE", "password": PASSWORD},
    ],
)
def test_bad_credentials_are_a_400_in_the_error_shape(alice, body):
    body = assert_error(APIClient().post(TOKEN, body, format="json"), 400, "invalid_credentials")

    assert "username and password" in body["detail"]
    assert not Token.objects.exists()


def test_an_inactive_user_gets_no_token(alice):
    alice.is_active = False
    alice.save()

    assert_error(
        APIClient().post(TOKEN, {"username": "alice", "password": PASSWORD}, format="json"), 400, "invalid_credentials"
    )


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"username": "alice"}, "password"),
        ({"password": PASSWORD}, "username"),
        ({"username": "alice", "password": PASSWORD, "is_staff": True}, "is_staff"),
    ],
)
def test_a_missing_or_unknown_field_is_named(alice, body, field):
    body = assert_error(APIClient().post(TOKEN, body, format="json"), 400, "invalid")

    assert field in body["fields"]


def test_the_token_endpoint_takes_json_only(alice):
    response = APIClient().post(TOKEN, {"username": "alice", "password": PASSWORD})  # multipart

    assert_error(response, 415, "unsupported_media_type")


def test_a_session_or_token_sent_along_changes_nothing(alice, staff_user):
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(staff_user)  # a browser signed in to the admin: no CSRF token needed here
    client.credentials(HTTP_AUTHORIZATION="Token not-a-token")

    response = client.post(TOKEN, {"username": "alice", "password": PASSWORD}, format="json")

    assert response.status_code == 200, response.content
    assert response.json()["token"] == Token.objects.get(user=alice).key


def test_logins_are_throttled_per_address_with_retry_after(alice, settings):
    settings.TOKEN_OBTAIN_THROTTLE = "3/min"
    client = APIClient()

    answers = [client.post(TOKEN, {"username": "alice", "password": p}, format="json") for p in ("x", "y", PASSWORD)]
    over = client.post(TOKEN, {"username": "alice", "password": PASSWORD}, format="json")
    elsewhere = client.post(TOKEN, {"username": "alice", "password": PASSWORD}, format="json", REMOTE_ADDR="192.0.2.7")
    spoofed = client.post(
        TOKEN, {"username": "alice", "password": PASSWORD}, format="json", HTTP_X_FORWARDED_FOR="198.51.100.1"
    )

    assert [a.status_code for a in answers] == [400, 400, 200]
    assert_error(over, 429, "throttled")
    assert int(over["Retry-After"]) >= 1
    assert elsewhere.status_code == 200
    # NUM_PROXIES=0 (the default): X-Forwarded-For is not the client's to choose
    assert spoofed.status_code == 429


def test_login_throttling_can_be_switched_off(alice, settings):
    settings.TOKEN_OBTAIN_THROTTLE = None
    # The failed-login lockout (django-axes: project/tests/test_login_lockout.py) is a limit of its own.
    settings.AXES_FAILURE_LIMIT = 16

    answers = [
        APIClient().post(TOKEN, {"username": "alice", "password": "wrong"}, format="json").status_code
        for _ in range(15)
    ]

    assert answers == [400] * 15


# --- every API URL without its trailing slash --------------------------------------


def api_routes() -> list[str]:
    """Every route under api/ with a trailing slash, as project/urls.py declares them."""
    api = next(p for p in get_resolver().url_patterns if str(p.pattern) == "api/")
    return ["/" + str(alias.pattern) + "/" for alias in without_trailing_slash([api])]


def test_every_api_url_has_a_slashless_alias():
    routes = api_routes()

    assert {
        "/api/",
        "/api/auth/token/",
        "/api/orders/",
        "/api/orders/<int:order_id>/",
        "/api/orders/<int:order_id>/cancel/",
        "/api/products/",
        "/api/products/<int:product_id>/",
        "/api/reports/products/",
        "/api/schema/",
        "/api/docs/",
    } == set(routes)


def test_a_post_without_the_slash_places_the_order(api, make_product, user):
    product = make_product(stock=5)

    response = api.post("/api/orders", {"lines": [{"product": product.pk, "quantity": 2}]}, format="json")

    assert response.status_code == 202, response.content
    assert Order.objects.get().lines.get().quantity == 2
    order_id = response.json()["id"]
    assert api.get(f"/api/orders/{order_id}").json()["id"] == order_id
    assert api.post(f"/api/orders/{order_id}/cancel").status_code == 202


def test_writes_without_the_slash_reach_every_endpoint(api_with, make_product, alice):
    product = make_product(stock=5)
    staff_api = api_with("inventory.add_product", "inventory.change_product", "reports.view_productreport")

    created = staff_api.post(
        "/api/products", {"sku": "NEW-1", "name": "New", "price": "1.00", "stock": 1}, format="json"
    )
    changed = staff_api.patch(f"/api/products/{product.pk}", {"stock_delta": 2}, format="json")
    token = APIClient().post("/api/auth/token", {"username": "alice", "password": PASSWORD}, format="json")

    assert created.status_code == 201, created.content
    assert changed.status_code == 200 and changed.json()["stock"] == 7
    assert token.status_code == 200
    for path in ("/api/reports/products", "/api/products", "/api/orders"):
        assert staff_api.get(path).status_code == 200, path


def test_an_unknown_api_url_without_a_slash_is_a_json_404_not_a_redirect(api):
    for method in ("get", "post"):
        assert_error(getattr(api, method)("/api/nothing", {}, format="json"), 404, "not_found")
        assert_error(getattr(api, method)("/api/orders/1/nothing", {}, format="json"), 404, "not_found")


def test_the_schema_names_each_endpoint_once_with_its_slash():
    paths = APIClient().get("/api/schema/", {"format": "json"}).json()["paths"]

    assert all(path.endswith("/") for path in paths)
