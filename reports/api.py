"""The sales read model, read-only."""

from drf_spectacular.utils import extend_schema
from rest_framework.views import APIView

from project.http.pagination import PageNumberPagination
from project.http.schema import WWW_AUTHENTICATE, errors
from project.http.serializers import represent_many

from . import selectors
from .serializers import ProductReportOutputSerializer


class ProductReportListApi(APIView):
    pagination_class = PageNumberPagination

    @extend_schema(
        operation_id="reports_products_list",
        summary="Sales per product",
        description="The sales read model: units sold, orders and revenue per product, updated by the saga.",
        parameters=[WWW_AUTHENTICATE],
        responses={
            200: ProductReportOutputSerializer(many=True),
            **errors(401, 404, _404="No such page (`page`)."),
        },
    )
    def get(self, request):
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(selectors.product_report_list(), request, self)
        return paginator.get_paginated_response(represent_many(ProductReportOutputSerializer, page))
