from django.urls import path

from . import api

urlpatterns = [
    path("reports/products/", api.ProductReportListApi.as_view(), name="product-report-list"),
]
