"""Reports' start-up check: the largest line an order may have fits the sales totals (Django's system checks).

Registered under the "orderflow" tag by ReportsConfig.ready(), beside the
settings checks of project/checks.py (docs/operations.md).
"""

from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, register

from project.checks import TAG
from project.lines import MAX_PRICE

from .models import ProductReport


def largest(field_name: str) -> Decimal:
    """The largest value a DecimalField of ProductReport holds (numeric(p, s): 10^(p-s) - 10^-s)."""
    field = ProductReport._meta.get_field(field_name)
    return Decimal(10) ** (field.max_digits - field.decimal_places) - Decimal(10) ** -field.decimal_places


@register(TAG)
def check_line_fits_revenue(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """orderflow.E012: ORDER_MAX_QUANTITY × the largest price fits ProductReport.revenue, many times over.

    One sale adds up to that to a product's revenue in one UPDATE; the column
    must hold a lifetime of them (docs/design.md "Numeric ranges": as many as
    units_sold can count, 2^63 - 1 units at the largest price).
    """
    line = settings.ORDER_MAX_QUANTITY * MAX_PRICE
    lifetime = (2**63 - 1) * MAX_PRICE  # units_sold's ceiling at the largest price
    ceiling = largest("revenue")
    if max(line, lifetime) <= ceiling:
        return []
    return [
        Error(
            f"ORDER_MAX_QUANTITY ({settings.ORDER_MAX_QUANTITY}) × the largest price ({MAX_PRICE}) is {line}, and "
            f"a product's lifetime revenue must hold 2^63 - 1 units at that price; ProductReport.revenue holds at "
            f"most {ceiling}: sales would overflow it and cancel orders.",
            hint="Lower ORDER_MAX_QUANTITY, or widen ProductReport.revenue (max_digits) with a migration "
            "(docs/design.md, “Numeric ranges”).",
            id=f"{TAG}.E012",
        )
    ]
