"""The sales totals near their ceiling (docs/design.md "Numeric ranges").

`units_sold` and `orders_count` are 64-bit, and `revenue` is numeric(31, 2):
room for units_sold's ceiling times the largest price, so a product's totals
take a sale at the largest quantity and price right up to 2^63 - 1 units, and
the API still reads them. PostgreSQL keeps revenue exact; SQLite has no
decimal type and keeps it as an 8-byte float (15 significant digits), which
these tests allow for there.
"""

from decimal import Decimal

import pytest
from django.conf import settings
from django.db import connections

from project.db import service_db
from project.lines import MAX_PRICE, MAX_QUANTITY
from reports import services
from reports.models import ProductReport

pytestmark = pytest.mark.django_db

BIGINT_MAX = 2**63 - 1
REPORTS = "/api/reports/products/"


def exact_decimals() -> bool:
    return connections[service_db("reports")].vendor != "sqlite"


def same_amount(stored: Decimal, expected: Decimal) -> bool:
    """Equal, to the cent on PostgreSQL, to 15 significant digits on SQLite."""
    if exact_decimals():
        return stored == expected
    return abs(stored - expected) <= abs(expected) * Decimal("1e-14")


def near_the_ceiling(product_id: int, *, units_left: int) -> ProductReport:
    units = BIGINT_MAX - units_left
    return ProductReport.objects.create(
        product_id=product_id,
        product_name="Ceiling",
        units_sold=units,
        orders_count=units,
        revenue=units * MAX_PRICE,
    )


def test_revenue_holds_the_largest_price_times_the_most_units():
    field = ProductReport._meta.get_field("revenue")
    largest = Decimal(10) ** (field.max_digits - field.decimal_places) - Decimal(10) ** -field.decimal_places

    assert largest >= BIGINT_MAX * MAX_PRICE
    assert largest >= MAX_QUANTITY * MAX_PRICE


def test_a_sale_at_the_largest_quantity_and_price_fills_the_totals_to_their_ceiling(reports_api):
    quantity = settings.ORDER_MAX_QUANTITY
    near_the_ceiling(7, units_left=quantity)
    line = {"product": 7, "quantity": quantity, "unit_price": str(MAX_PRICE), "product_name": "Ceiling"}

    services.sale_record(order_id=1, lines=[line])

    row = ProductReport.objects.get(product_id=7)
    assert row.units_sold == BIGINT_MAX
    assert row.orders_count == BIGINT_MAX - quantity + 1
    assert same_amount(row.revenue, BIGINT_MAX * MAX_PRICE)
    response = reports_api.get(REPORTS)
    assert response.status_code == 200, response.content
    (shown,) = response.json()["results"]
    assert shown["units_sold"] == BIGINT_MAX
    assert same_amount(Decimal(shown["revenue"]), BIGINT_MAX * MAX_PRICE)

    services.sale_revert(order_id=1)

    row = ProductReport.objects.get(product_id=7)
    assert row.units_sold == BIGINT_MAX - quantity
    assert same_amount(row.revenue, (BIGINT_MAX - quantity) * MAX_PRICE)


def test_one_line_of_the_most_units_the_columns_take_fits_revenue():
    # ORDER_MAX_QUANTITY may be raised to the quantity columns' range (reports.checks refuses more).
    services.sale_record(
        order_id=2,
        lines=[{"product": 8, "quantity": MAX_QUANTITY, "unit_price": str(MAX_PRICE), "product_name": "Big"}],
    )

    row = ProductReport.objects.get(product_id=8)
    assert (row.units_sold, row.orders_count) == (MAX_QUANTITY, 1)
    assert same_amount(row.revenue, MAX_QUANTITY * MAX_PRICE)


def test_a_product_event_with_a_64_bit_version_is_kept():
    services.product_sync(product_id=9, name="Old", version=1)
    services.product_sync(product_id=9, name="New", version=BIGINT_MAX)

    row = ProductReport.objects.get(product_id=9)
    assert (row.product_name, row.name_version) == ("New", BIGINT_MAX)
