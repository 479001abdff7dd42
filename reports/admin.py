"""Reports' admin: the sales read model, read-only (only reports.services writes it, from events and the saga)."""

import json

from django.contrib import admin
from django.utils.html import format_html, format_html_join

from project.admin import ReadOnlyAdmin

from .models import ProductReport, ReportedOrder


@admin.register(ProductReport)
class ProductReportAdmin(ReadOnlyAdmin):
    list_display = ("product_id", "product_name", "units_sold", "orders_count", "revenue", "updated_at")
    list_display_links = ("product_id", "product_name")
    search_fields = ("product_id__exact", "product_name")
    search_help_text = "Product id (exact) or name."
    ordering = ("product_id",)


@admin.register(ReportedOrder)
class ReportedOrderAdmin(ReadOnlyAdmin):
    list_display = ("order_id", "status", "lines_summary", "reason", "created_at", "updated_at")
    list_filter = ("status",)
    search_fields = ("order_id__exact", "reason")
    search_help_text = "Order id (exact) or words of the reason."
    ordering = ("-order_id",)
    fields = ("order_id", "status", "reason", "lines_table", "created_at", "updated_at")
    readonly_fields = fields

    @admin.display(description="lines")
    def lines_summary(self, record: ReportedOrder) -> str:
        lines = record.lines if isinstance(record.lines, list) else []
        return ", ".join(
            f"{line.get('quantity')} × product {line.get('product')}" for line in lines if isinstance(line, dict)
        )

    @admin.display(description="lines counted")
    def lines_table(self, record: ReportedOrder) -> str:
        lines = record.lines
        if not isinstance(lines, list) or not all(isinstance(line, dict) for line in lines):
            return format_html("<pre>{}</pre>", json.dumps(lines, indent=2))
        if not lines:
            return "none"
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            ((line.get("product"), line.get("quantity"), line.get("amount")) for line in lines),
        )
        return format_html(
            "<table><thead><tr><th>Product</th><th>Quantity</th><th>Amount</th></tr></thead><tbody>{}</tbody></table>",
            rows,
        )
