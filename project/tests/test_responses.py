"""Every answer under /api/: never cached (Cache-Control: no-store, private), and every error in the API's
JSON shape, Django's own refusals included (a bad Host header, too many parameters, a body too large).
Real requests through django.test.Client; other paths keep Django's HTML pages."""

import pytest
from django.test import Client

from orders.models import Order

pytestmark = pytest.mark.django_db

ORDERS = "/api/orders/"
ERROR_KEYS = {"code", "detail", "fields"}


def assert_api_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/json"
    body = response.json()
    assert set(body) <= ERROR_KEYS
    assert (body["code"], isinstance(body["detail"], str) and bool(body["detail"])) == (code, True)
    assert_not_stored(response)
    return body


def assert_not_stored(response) -> None:
    directives = {part.strip() for part in response["Cache-Control"].split(",")}
    assert {"no-store", "private"} <= directives, response["Cache-Control"]


def assert_html(response, status: int) -> None:
    assert response.status_code == status
    assert response["Content-Type"].startswith("text/html")
    assert "Cache-Control" not in response  # the API's rule only


@pytest.fixture
def signed_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def params(n: int) -> str:
    return "&".join(f"p{i}=1" for i in range(n))


# --- Cache-Control ----------------------------------------------------------------


def test_api_answers_are_never_stored(signed_in, make_product):
    product = make_product()
    for path in (ORDERS, "/api/products/", f"/api/products/{product.pk}/", "/api/"):
        response = signed_in.get(path)
        assert response.status_code == 200, path
        assert_not_stored(response)
    placed = signed_in.post(ORDERS, {"lines": [{"product": product.pk, "quantity": 1}]}, "application/json")
    assert placed.status_code == 202
    assert_not_stored(placed)


def test_api_errors_are_never_stored_either(signed_in):
    assert_api_error(Client().get(ORDERS), 401, "not_authenticated")
    assert_api_error(signed_in.get("/api/orders/999999/"), 404, "not_found")
    assert_api_error(signed_in.get("/api/nothing/here/"), 404, "not_found")  # no view matched
    assert_api_error(signed_in.get("/api/reports/products/"), 403, "permission_denied")


def test_the_token_answer_is_never_stored(user):
    user.set_password("a-long-password-1")
    user.save()

    response = Client().post(
        "/api/auth/token/", {"username": user.username, "password": "a-long-password-1"}, "application/json"
    )

    assert response.status_code == 200
    assert_not_stored(response)


def test_the_schema_docs_and_pages_outside_the_api_keep_their_caching():
    for path in ("/api/schema/", "/api/docs/", "/"):
        response = Client().get(path)
        assert response.status_code == 200, path
        assert "no-store" not in response.get("Cache-Control", ""), path


# --- Django's own 400s ----------------------------------------------------------------


def test_too_many_query_parameters_are_a_json_400(signed_in, settings):
    over = settings.DATA_UPLOAD_MAX_NUMBER_FIELDS + 100  # 1,100 with Django's default of 1,000

    body = assert_api_error(signed_in.get(f"{ORDERS}?{params(over)}"), 400, "too_many_fields")
    assert str(settings.DATA_UPLOAD_MAX_NUMBER_FIELDS) in body["detail"]
    assert_api_error(Client().get(f"/api/products/?{params(over)}"), 400, "too_many_fields")
    # At the limit: an answer as usual.
    assert signed_in.get(f"{ORDERS}?{params(settings.DATA_UPLOAD_MAX_NUMBER_FIELDS)}").status_code == 200


def test_too_many_query_parameters_elsewhere_keep_djangos_page(settings):
    over = settings.DATA_UPLOAD_MAX_NUMBER_FIELDS + 100

    assert_html(Client().get(f"/admin/login/?{params(over)}"), 400)


def test_a_host_not_allowed_is_a_json_400_that_does_not_echo_it():
    evil = Client(HTTP_HOST="evil.example")

    for response in (evil.get(ORDERS), evil.post(ORDERS, {}, "application/json"), evil.get("/api/nothing/")):
        body = assert_api_error(response, 400, "bad_host")
        assert "evil.example" not in body["detail"]
    assert Order.objects.count() == 0


def test_a_host_not_allowed_elsewhere_keeps_djangos_page():
    assert_html(Client(HTTP_HOST="evil.example").get("/"), 400)


# --- 413 -------------------------------------------------------------------------------


def test_a_body_too_large_is_a_json_413(signed_in, settings):
    body = b'{"lines": [' + b" " * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 1) + b"]}"

    assert_api_error(signed_in.post(ORDERS, body, "application/json"), 413, "request_too_large")
    assert Order.objects.count() == 0


@pytest.mark.urls("project.tests.urls_plain_views")
def test_a_body_too_large_for_a_plain_django_view_is_a_json_413_under_the_api(settings):
    # Django raises RequestDataTooBig (a 400 by its rules) while the view reads request.POST.
    form = {"field": "x" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 1)}

    assert_api_error(Client().post("/api/plain/form/", form), 413, "request_too_large")
    assert_html(Client().post("/plain/form/", form), 400)
    assert Client().post("/api/plain/form/", {"field": "x"}).content == b"1 fields"  # the view itself works


@pytest.mark.urls("project.tests.urls_plain_views")
def test_too_many_form_fields_for_a_plain_django_view_is_a_json_400(settings):
    form = {f"f{i}": "1" for i in range(settings.DATA_UPLOAD_MAX_NUMBER_FIELDS + 100)}

    assert_api_error(Client().post("/api/plain/form/", form), 400, "too_many_fields")
    assert_html(Client().post("/plain/form/", form), 400)


@pytest.mark.urls("project.tests.urls_plain_views")
def test_djangos_permission_denied_is_a_json_403_under_the_api():
    assert_api_error(Client().get("/api/plain/refuse/"), 403, "permission_denied")
    assert_html(Client().get("/plain/refuse/"), 403)
