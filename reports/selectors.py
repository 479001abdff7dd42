"""Reports' reads."""

from django.db.models import QuerySet

from project.db import service_db

from .models import ProductReport


def product_report_list() -> QuerySet[ProductReport]:
    return ProductReport.objects.using(service_db("reports")).order_by("product_id")
