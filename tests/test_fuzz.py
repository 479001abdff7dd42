"""The live API against its own OpenAPI description: schemathesis generates requests from /api/schema/.

Every operation gets schema-valid and schema-invalid requests (bodies, path
ids, query and header parameters, other methods and content types) over real
HTTP to pytest-django's live_server, as a normal user (refused writes: 403)
and as staff holding the model permissions the API asks for. Any 5xx,
or any answer whose status, content type, headers or body the schema does not
describe, fails the test. Bounded and derandomized: CI sends the same ~1,000
requests each run, in under a minute.

Generated ids are mostly unknown (404s, 400s); hooks swap some of them for
ids that exist, so placing, reading and cancelling real orders and changing
real products are fuzzed and checked too. Their on-commit publishes go to the
configured broker with no worker listening (`no_workers` stops the session's,
which would otherwise confirm the order the fixture is about to cancel); the
queues are purged before each test and, by `no_workers`, after it.
"""

import pytest
import schemathesis
from django.test import Client, override_settings
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from rest_framework.authtoken.models import Token

from orders import services as orders
from testing import purge_queues
from testing.permissions import OPERATOR_PERMISSIONS, grant

# Fresh sequences: the ids the coverage phase tries first (1, 2, ...) then name rows that exist.
# shape_independent: the document and the views are the same in every shape; CI fuzzes in the
# PostgreSQL + RabbitMQ step, whose 32-bit integer columns are the stricter bound (docs/testing.md#ci).
pytestmark = [
    pytest.mark.fuzz,
    pytest.mark.shape_independent,
    pytest.mark.django_db(transaction=True, reset_sequences=True),
]

# Hypothesis examples per operation and user (the coverage phase adds its own, deterministic, cases).
EXAMPLES_PER_OPERATION = 20
# "Answers as its schema says". The other checks judge business rules a schema cannot
# express: an unknown product id is schema-valid and still a 400.
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
)
CONFIG = schemathesis.Config.from_dict({"checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}}})

# Loaded through the real view, in process; the requests then go over HTTP to live_server.
schema = schemathesis.openapi.from_dict(
    Client().get("/api/schema/", HTTP_ACCEPT="application/json", HTTP_HOST="localhost").json(),
    config=CONFIG,
)

# Ids of what the current test's database holds, for the hooks below (set by the `live_api` fixture).
EXISTING: dict[str, list[int]] = {}


@schema.hook
def flatmap_path_parameters(context, path_parameters):
    """Sometimes an id that exists: an order of this user, of another user, a cancelled one, a product."""
    name = next((key for key in ("order_id", "product_id") if key in (path_parameters or {})), None)
    ids = EXISTING.get("orders" if name == "order_id" else "products")
    if name is None or not ids:  # not every operation names an id; schema examples are drawn at collection
        return st.just(path_parameters)
    return st.one_of(st.just(path_parameters), st.sampled_from(ids).map(lambda i: {**path_parameters, name: i}))


@schema.hook
def flatmap_body(context, body):
    """Sometimes order lines naming products that exist, so orders are placed, not only refused."""
    lines = body.get("lines") if isinstance(body, dict) and context.operation.path == "/api/orders/" else None
    if not EXISTING or not isinstance(lines, list) or not lines or not all(isinstance(x, dict) for x in lines):
        return st.just(body)
    products = st.lists(st.sampled_from(EXISTING["products"]), min_size=len(lines), max_size=len(lines))
    return st.one_of(
        st.just(body),
        products.map(
            lambda ids: {**body, "lines": [{**line, "product": i} for line, i in zip(lines, ids, strict=True)]}
        ),
    )


@pytest.fixture
def token(django_user_model, actor) -> str:
    user = django_user_model.objects.create_user(username=f"fuzz-{actor}", is_staff=actor == "staff")
    if actor == "staff":
        # Products, everyone's orders and records, the sales totals: every write is tried for real.
        user = grant(user, OPERATOR_PERMISSIONS)
    return Token.objects.create(user=user).key


@pytest.fixture
def live_api(no_workers, live_server, make_product, django_user_model, token):
    user = Token.objects.get(key=token).user
    other = django_user_model.objects.create_user(username="fuzz-other")
    products = [make_product(stock=1_000_000) for _ in range(4)] + [make_product(active=False)]

    def place(who):
        return orders.order_create(user=who, lines=[{"product": products[0].pk, "quantity": 1}]).order.pk

    pending, confirmed, cancelled, others = place(user), place(user), place(user), place(other)
    orders.order_confirm(order_id=confirmed)
    orders.order_compensate(order_id=cancelled, reason="fuzz")
    orders.order_delete(order_id=cancelled)
    EXISTING.update(products=[p.pk for p in products], orders=[pending, confirmed, cancelled, others])
    purge_queues()
    # Fuzzing places hundreds of orders: the rate limit would answer most of them 429.
    with override_settings(ORDER_CREATE_THROTTLE=None):
        yield live_server.url
    EXISTING.clear()


@pytest.mark.parametrize("actor", ["user", "staff"])
@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    derandomize=True,
    database=None,
    deadline=None,
    # The function-scoped fixtures (live_api, token) are shared by a test's examples on purpose,
    # and a loaded CI machine must not turn slow generation into a failure.
    suppress_health_check=list(HealthCheck),
)
def test_the_api_answers_as_its_schema_says(case, live_api, token, actor):
    case.call_and_validate(base_url=live_api, headers={"Authorization": f"Token {token}"})
