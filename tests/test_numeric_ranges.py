"""Orders at the numeric edges go through the whole saga, with real workers (docs/design.md "Numeric ranges").

What the API accepts must fit every column the saga writes, read models
included: an order of ORDER_MAX_QUANTITY units at the largest price, again and
again, from a product stocked to STOCK_MAX, is confirmed every time and
counted exactly, never cancelled by a step overflowing a total.
"""

from decimal import Decimal

import pytest
from django.conf import settings
from django.db import connections

from inventory.models import STOCK_MAX, Product
from ops.audit import audit
from orders import services as order_services
from orders.models import CancelledOrder, Order
from project.db import service_db
from project.lines import MAX_PRICE
from reports.models import ProductReport
from testing import wait_for

pytestmark = [pytest.mark.saga, pytest.mark.timeout(180)]


def test_orders_of_the_most_units_at_the_largest_price_all_confirm(workers, user, make_product):
    product = make_product(stock=STOCK_MAX, price=str(MAX_PRICE))
    quantity = settings.ORDER_MAX_QUANTITY
    # 12 × 1000 × 9999999999.99 = 1.2e14 of revenue: past the numeric(16, 2) the column once was.
    placed = [
        order_services.order_create(user=user, lines=[{"product": product.pk, "quantity": quantity}]).order.pk
        for _ in range(12)
    ]

    wait_for(
        lambda: (
            Order.objects.filter(pk__in=placed, status=Order.Status.CONFIRMED).count() == len(placed)
            or CancelledOrder.objects.filter(pk__in=placed).exists()
        ),
        timeout=90,
        what="the orders to finish",
    )

    assert list(CancelledOrder.objects.filter(pk__in=placed).values_list("reason", flat=True)) == []
    assert Product.objects.get(pk=product.pk).stock == STOCK_MAX - 12 * quantity
    report = ProductReport.objects.get(product_id=product.pk)
    assert (report.units_sold, report.orders_count) == (12 * quantity, 12)
    expected = 12 * quantity * MAX_PRICE
    if connections[service_db("reports")].vendor == "sqlite":  # decimals are 8-byte floats there
        assert abs(report.revenue - expected) <= expected * Decimal("1e-14")
    else:
        assert report.revenue == expected
    assert audit() == []
