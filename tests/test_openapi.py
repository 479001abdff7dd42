"""The OpenAPI description (drf-spectacular): valid, public, complete, and its Swagger UI offline.

tests/test_fuzz.py checks the live API against it; these tests check the
document itself and that every error status an endpoint can answer is in it.
"""

import json

import pytest
from django.conf import settings
from django.contrib.staticfiles import finders
from django.core.cache import caches
from django.core.management import call_command
from django.test import RequestFactory
from rest_framework.test import APIClient

from inventory.serializers import ProductCreateInputSerializer, ProductUpdateInputSerializer
from orders.serializers import OrderCreateInputSerializer
from project.http.api import TokenObtainInputSerializer
from project.http.errors import error_body

# The document drf-spectacular builds from the code, and its Swagger UI: the same in every
# database/broker shape, so CI checks them in one (docs/testing.md#ci).
pytestmark = pytest.mark.shape_independent

SCHEMA = "/api/schema/"
DOCS = "/api/docs/"

# Every operation and the statuses it documents: what each view can answer (docs/design.md §5, docs/api.md).
OPERATIONS = {
    ("get", "/api/orders/"): {"200", "400", "401", "404"},
    ("post", "/api/orders/"): {"202", "400", "401", "403", "409", "410", "413", "415", "429"},
    ("get", "/api/orders/{order_id}/"): {"200", "401", "404", "410"},
    ("post", "/api/orders/{order_id}/cancel/"): {"200", "202", "401", "403", "404"},
    ("get", "/api/products/"): {"200", "400", "401", "404"},
    ("post", "/api/products/"): {"201", "400", "401", "403", "409", "413", "415"},
    ("get", "/api/products/{product_id}/"): {"200", "401", "404"},
    ("patch", "/api/products/{product_id}/"): {"200", "400", "401", "403", "404", "409", "413", "415"},
    ("get", "/api/reports/products/"): {"200", "401", "403", "404"},
    ("post", "/api/auth/token/"): {"200", "400", "413", "415", "429"},
}
# Every operation can also answer 503 with Retry-After: a database, disk or broker outage (project.http.errors).
for _statuses in OPERATIONS.values():
    _statuses.add("503")
ERROR = {"$ref": "#/components/schemas/Error"}


@pytest.fixture(scope="module")
def document() -> dict:
    response = APIClient().get(SCHEMA, HTTP_ACCEPT="application/json")
    assert response.status_code == 200
    return json.loads(response.content)


def test_spectacular_validates_the_schema_without_a_warning(tmp_path):
    # What CI would run by hand: generation warnings (an unguessable view, a
    # missing serializer) fail it, and --validate checks it against OpenAPI 3.
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "schema.yaml"))

    assert (tmp_path / "schema.yaml").read_text().startswith("openapi: 3.")


def test_the_schema_is_public_in_yaml_and_json():
    anonymous = APIClient()

    yaml = anonymous.get(SCHEMA)
    as_json = anonymous.get(SCHEMA, {"format": "json"})

    assert yaml.status_code == 200
    assert yaml["Content-Type"].startswith("application/vnd.oai.openapi")
    assert yaml.content.startswith(b"openapi: 3.")
    assert as_json.status_code == 200
    assert json.loads(as_json.content)["openapi"].startswith("3.")


def test_a_bad_token_does_not_lock_the_schema_away():
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token not-a-token")

    assert client.get(SCHEMA).status_code == 200
    assert client.get(DOCS).status_code == 200


def test_swagger_ui_is_public_and_needs_no_cdn():
    response = APIClient().get(DOCS)

    assert response.status_code == 200
    page = response.content.decode()
    assert "swagger-ui" in page
    assert "/static/drf_spectacular_sidecar/swagger-ui-dist/" in page
    assert "cdn" not in page.lower()
    assert SCHEMA in page
    # The files the page names ship in drf-spectacular-sidecar, served by whitenoise after collectstatic.
    for name in ("swagger-ui-bundle.js", "swagger-ui-standalone-preset.js", "swagger-ui.css"):
        assert finders.find(f"drf_spectacular_sidecar/swagger-ui-dist/{name}"), name


def test_every_endpoint_and_its_error_statuses_are_documented(document):
    documented = {
        (method, path): set(operation["responses"])
        for path, methods in document["paths"].items()
        for method, operation in methods.items()
    }

    assert documented == OPERATIONS


def test_every_error_response_has_the_one_error_shape(document):
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            for status, response in operation["responses"].items():
                if (status.startswith("4") and status != "410") or status == "503":
                    body = response["content"]["application/json"]["schema"]
                    assert body == ERROR, (method, path, status)
                    assert response["description"], (method, path, status)

    error = document["components"]["schemas"]["Error"]
    assert set(error["properties"]) == set(error_body("c", "d", {"f": ["m"]}))
    assert set(error["required"]) == set(error_body("c", "d"))


def test_headers_parameters_and_enums_are_described(document):
    create = document["paths"]["/api/orders/"]["post"]
    listing = document["paths"]["/api/orders/"]["get"]

    (key,) = [p for p in create["parameters"] if p["name"] == "Idempotency-Key"]
    assert (key["in"], key["schema"]["minLength"], key["schema"]["maxLength"]) == ("header", 1, 255)
    assert "Retry-After" in create["responses"]["429"]["headers"]
    assert "Retry-After" in create["responses"]["503"]["headers"]
    assert "Idempotent-Replayed" in create["responses"]["202"]["headers"]
    assert "WWW-Authenticate" in create["responses"]["401"]["headers"]
    filters = {p["name"]: p for p in listing["parameters"]}
    # `cancelled` lists the records of deleted orders (issue 13)
    assert set(filters["status"]["schema"]["enum"]) == {"pending", "confirmed", "cancelling", "cancelled"}
    assert filters["page"]["schema"]["type"] == "integer"
    page = listing["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    assert set(document["components"]["schemas"][page]["properties"]) == {"count", "next", "previous", "results"}
    line = document["components"]["schemas"]["OrderLineInput"]["properties"]["quantity"]
    assert (line["minimum"], line["maximum"]) == (1, settings.ORDER_MAX_QUANTITY)
    order_id = document["paths"]["/api/orders/{order_id}/"]["get"]["parameters"][0]
    assert (order_id["in"], order_id["schema"]["type"]) == ("path", "integer")
    assert set(document["components"]["securitySchemes"]) == {"tokenAuth", "cookieAuth"}


# --- Swagger UI's examples: each write operation's default is a request that succeeds ---------

# The serializer that reads each operation's request body.
REQUEST_BODIES = {
    ("post", "/api/orders/"): OrderCreateInputSerializer,
    ("post", "/api/products/"): ProductCreateInputSerializer,
    ("patch", "/api/products/{product_id}/"): ProductUpdateInputSerializer,
    ("post", "/api/auth/token/"): TokenObtainInputSerializer,
}
# .env.example's superuser: the token example's credentials.
EXAMPLE_USER = {"username": "admin", "password": "change-me"}


def operations(document):
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            yield method, path, operation


def request_examples(operation) -> list:
    """The bodies Swagger UI offers, the first one pre-filled."""
    return [
        example["value"] for example in operation["requestBody"]["content"]["application/json"]["examples"].values()
    ]


def filled_path(path: str, operation) -> str:
    """The path with each parameter's example, as Swagger UI fills it in."""
    for parameter in operation.get("parameters", []):
        if parameter["in"] == "path":
            (example,) = parameter["examples"].values()
            path = path.replace(f"{{{parameter['name']}}}", str(example["value"]))
    assert "{" not in path, path
    return path


def test_every_request_body_has_examples_its_serializer_accepts(document, django_user_model, make_product):
    django_user_model.objects.create_user(**EXAMPLE_USER)  # the token serializer checks the password
    with_bodies = {(method, path) for method, path, operation in operations(document) if "requestBody" in operation}

    assert with_bodies == set(REQUEST_BODIES)
    for method, path, operation in operations(document):
        if (method, path) not in REQUEST_BODIES:
            continue
        examples = request_examples(operation)
        assert examples, (method, path)
        # The token serializer's authenticate() needs the request: django-axes counts failed logins by it.
        request = RequestFactory().post(path)
        for body in examples:
            serializer = REQUEST_BODIES[method, path](data=body, context={"request": request})
            assert serializer.is_valid(), (method, path, body, serializer.errors)


def test_every_path_parameter_has_an_example(document):
    for method, path, operation in operations(document):
        for parameter in operation.get("parameters", []):
            if parameter["in"] == "path":
                assert parameter["examples"], (method, path, parameter["name"])


@pytest.mark.django_db(transaction=True, reset_sequences=True)
def test_swagger_uis_default_requests_succeed_on_the_demo_data(document, django_user_model, no_workers):
    """What a newcomer gets by pressing "Try it out" then "Execute" on each operation, after `make run`."""
    caches["throttle"].clear()
    call_command("seed_demo")
    django_user_model.objects.create_superuser(email="", **EXAMPLE_USER)
    client = APIClient()
    client.force_authenticate(django_user_model.objects.get(username=EXAMPLE_USER["username"]))
    # Creates before reads and changes of what they created (order 1 is placed by the first POST).
    order = ["/api/orders/", "/api/orders/{order_id}/", "/api/orders/{order_id}/cancel/"]
    ordered = sorted(operations(document), key=lambda op: order.index(op[1]) if op[1] in order else len(order))

    answers = {}
    for method, path, operation in ordered:
        body = request_examples(operation)[0] if "requestBody" in operation else None
        response = getattr(client, method)(filled_path(path, operation), body, format="json")
        answers[method, path] = response.status_code

    assert all(200 <= status < 300 for status in answers.values()), answers
    caches["throttle"].clear()
