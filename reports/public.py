"""What other services may ask reports directly (reads only)."""

from project.db import service_db

from .models import ProductReport, ReportedOrder


def order_failure_reason(order_id: int) -> str:
    """Why the reports step failed for this order, or ''."""
    record = ReportedOrder.objects.using(service_db("reports")).filter(order_id=order_id).first()
    return record.reason if record else ""


def units_sold_by_product() -> dict[int, int]:
    return dict(ProductReport.objects.using(service_db("reports")).values_list("product_id", "units_sold"))


def recorded_orders(order_ids: list[int] | None = None) -> dict[int, dict[int, int]]:
    """{order id: {product id: units}} for sales currently counted."""
    rows = ReportedOrder.objects.using(service_db("reports")).filter(status=ReportedOrder.Status.RECORDED)
    if order_ids is not None:
        rows = rows.filter(order_id__in=order_ids)
    return {r.order_id: {line["product"]: line["quantity"] for line in r.lines} for r in rows}
