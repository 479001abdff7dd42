"""The permission matrix of docs/api.md ("Who may do what"), request by request.

Both tables are read from the page itself: the roles (staff flag, superuser,
model permissions) and, for every endpoint and method, the status each role
gets. Every cell is one real request through DRF's APIClient with the role's
own token, against the database: the role's own orders and cancelled record,
another user's, a product. "own" / "all" in a cell say whose orders the list
holds; a refused request must change nothing, an accepted write must change
something. So the page cannot say one thing while the API does another.
"""

import re
from dataclasses import dataclass
from decimal import Decimal

import pytest
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from inventory.models import Product
from orders import services as orders
from orders.models import CancelledOrder, Order
from testing import BASE_DIR
from testing.permissions import grant

# HTTP through DRF and Django model permissions: no database or broker shape can change a cell,
# so CI runs the matrix in one shape (pyproject.toml, docs/testing.md#ci).
pytestmark = [pytest.mark.django_db, pytest.mark.shape_independent]

PAGE = BASE_DIR / "docs" / "api.md"
SECTION = "## Who may do what"
PASSWORD = "matrix-password-1"
ERROR_CODES = {401: "not_authenticated", 403: "permission_denied", 404: "not_found", 405: "method_not_allowed"}
# The bodies of the writes the matrix sends (a product id is filled in).
BODIES = {
    ("POST", "/api/auth/token/"): {"username": "bob", "password": PASSWORD},
    ("POST", "/api/orders/"): {"lines": [{"product": "PRODUCT", "quantity": 1}]},
    ("POST", "/api/products/"): {"sku": "MATRIX-NEW", "name": "New", "price": "1.00", "stock": 1},
    ("PATCH", "/api/products/{product_id}/"): {"price": "12.34"},
}
WRITES = {"POST", "PUT", "PATCH", "DELETE"}


# --- the page's tables -----------------------------------------------------------------


def section_tables(text: str, heading: str) -> list[list[list[str]]]:
    """The markdown tables under `heading` (until the next `## `), each a list of rows of cell texts."""
    start = text.index(heading + "\n")
    end = text.find("\n## ", start + len(heading))
    tables: list[list[list[str]]] = []
    current: list[list[str]] | None = None
    for line in text[start : end if end != -1 else None].splitlines():
        if not line.startswith("|"):
            current = None
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if all(re.fullmatch(r":?-+:?", cell) for cell in cells):
            continue  # the header's underline
        if current is None:
            current = []
            tables.append(current)
        current.append(cells)
    return tables


@dataclass(frozen=True)
class Role:
    name: str
    signed_in: bool
    staff: bool
    superuser: bool
    permissions: tuple[str, ...]


@dataclass(frozen=True)
class Call:
    label: str
    method: str
    path: str  # as the schema names it, with its query string if any
    target: str | None  # "mine", "another's", "mine, cancelled", "another's, cancelled"


@dataclass(frozen=True)
class Expected:
    status: int
    whose: str | None  # "own", "all"


def parse_role(row: list[str]) -> Role:
    name, staff, superuser, permissions = row
    return Role(
        name=name,
        signed_in=staff != "—",
        staff=staff == "yes",
        superuser=superuser == "yes",
        permissions=tuple(re.findall(r"`(\w+\.\w+)`", permissions)),
    )


def parse_call(label: str) -> Call:
    found = re.fullmatch(r"`([A-Z]+) (/[^`]*)`(?:: (.+))?", label)
    assert found, f"docs/api.md: a matrix row's first cell must read `METHOD /path/`[: target], not {label!r}"
    method, path, target = found.groups()
    return Call(label=label, method=method, path=path, target=target)


def parse_expected(cell: str) -> Expected:
    found = re.fullmatch(r"(\d{3})(?: (own|all))?", cell)
    assert found, f"docs/api.md: a matrix cell must read a status, optionally 'own' or 'all', not {cell!r}"
    return Expected(int(found[1]), found[2])


def read_page() -> tuple[list[Role], list[tuple[Call, dict[str, Expected]]]]:
    roles_table, matrix_table = section_tables(PAGE.read_text(), SECTION)
    assert roles_table[0] == ["role", "`is_staff`", "`is_superuser`", "permissions"], roles_table[0]
    roles = [parse_role(row) for row in roles_table[1:]]
    header, *rows = matrix_table
    assert header == ["request", *(role.name for role in roles)], "the matrix's columns are the roles, in order"
    matrix = []
    for row in rows:
        assert len(row) == len(header), row
        matrix.append(
            (parse_call(row[0]), {role.name: parse_expected(cell) for role, cell in zip(roles, row[1:], strict=True)})
        )
    return roles, matrix


ROLES, MATRIX = read_page()
CASES = [
    pytest.param(call, role, expected[role.name], id=f"{call.label} as {role.name}")
    for call, expected in MATRIX
    for role in ROLES
]


# --- the world each request meets ---------------------------------------------------------


@dataclass
class World:
    client: APIClient
    product: Product
    orders: dict[str, int]  # target -> order id
    own_live: set[int]
    all_live: set[int]
    own_cancelled: set[int]
    all_cancelled: set[int]


def place(user, product: Product, *, cancelled: bool = False) -> int:
    order = orders.order_create(user=user, lines=[{"product": product.pk, "quantity": 1}]).order
    if cancelled:
        orders.order_compensate(order_id=order.pk, reason="matrix")
        orders.order_delete(order_id=order.pk)
    return order.pk


def make_user(django_user_model, role: Role):
    # No password: the role signs in with its token.
    if role.superuser:
        return django_user_model.objects.create_superuser(username="matrix-role", password=None)
    user = django_user_model.objects.create_user(username="matrix-role", password=None, is_staff=role.staff)
    return grant(user, role.permissions)


@pytest.fixture
def world(django_user_model, make_product, role, settings) -> World:
    # bob's password is checked by the token row only: a fast hash, not a million PBKDF2 rounds per test.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    product = make_product(stock=100, price="10.00")
    bob = django_user_model.objects.create_user(username="bob", password=PASSWORD)
    theirs = {"another's": place(bob, product), "another's, cancelled": place(bob, product, cancelled=True)}
    client = APIClient()
    if role.signed_in:
        user = make_user(django_user_model, role)
        client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
        mine = {"mine": place(user, product), "mine, cancelled": place(user, product, cancelled=True)}
    else:
        mine = {"mine": theirs["another's"], "mine, cancelled": theirs["another's, cancelled"]}  # 401 anyway
    return World(
        client=client,
        product=product,
        orders={**theirs, **mine},
        own_live={mine["mine"]},
        all_live={mine["mine"], theirs["another's"]},
        own_cancelled={mine["mine, cancelled"]},
        all_cancelled={mine["mine, cancelled"], theirs["another's, cancelled"]},
    )


def snapshot() -> tuple:
    """What a write could change: the orders and their states, the cancelled records, the products."""
    return (
        sorted(Order.objects.values_list("id", "status")),
        sorted(CancelledOrder.objects.values_list("order_id", flat=True)),
        sorted((p.pk, p.sku, p.name, p.price, p.stock, p.active) for p in Product.objects.all()),
    )


def send(call: Call, world: World):
    path = call.path.replace("{product_id}", str(world.product.pk))
    if "{order_id}" in path:
        path = path.replace("{order_id}", str(world.orders[call.target]))
    body = BODIES.get((call.method, call.path))
    if body is not None and "lines" in body:
        body = {"lines": [{"product": world.product.pk, "quantity": 1}]}
    return getattr(world.client, call.method.lower())(path, body, format="json" if body is not None else None)


@pytest.mark.parametrize(("call", "role", "expected"), CASES)
def test_the_permission_matrix(call: Call, role: Role, expected: Expected, world: World):
    before = snapshot()

    response = send(call, world)

    assert response.status_code == expected.status, response.content
    if expected.status in ERROR_CODES:
        assert response.json()["code"] == ERROR_CODES[expected.status]
    if expected.whose is not None:
        cancelled = "status=cancelled" in call.path
        own, every = (world.own_cancelled, world.all_cancelled) if cancelled else (world.own_live, world.all_live)
        assert {row["id"] for row in response.json()["results"]} == (own if expected.whose == "own" else every)
    changed = expected.status in (201, 202) or (call.method, expected.status) == ("PATCH", 200)
    if call.method in WRITES and changed:
        assert snapshot() != before
    else:
        assert snapshot() == before
    if (call.method, expected.status) == ("PATCH", 200):
        assert Product.objects.get(pk=world.product.pk).price == Decimal("12.34")


def test_the_matrix_names_every_operation_of_the_schema():
    schema = APIClient().get("/api/schema/", {"format": "json"}).json()
    documented = {(method.upper(), path) for path, methods in schema["paths"].items() for method in methods}
    in_matrix = {(call.method, call.path.split("?")[0]) for call, _ in MATRIX}

    assert documented <= in_matrix, documented - in_matrix
    assert {role.name for role in ROLES} >= {"anonymous", "user", "staff", "superuser"}
