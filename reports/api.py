"""The sales read model, read-only: every customer's sales summed, so it needs
`reports.view_productreport`, as the admin's page of it does."""

from drf_spectacular.utils import extend_schema
from rest_framework.views import APIView

from project.http.pagination import PageNumberPagination
from project.http.permissions import ModelPermissions
from project.http.schema import WWW_AUTHENTICATE, errors
from project.http.serializers import represent_many

from . import selectors
from .serializers import ProductReportOutputSerializer


class ProductReportPermissions(ModelPermissions):
    """The totals add up every user's orders (units and revenue per product): business data, not a
    customer's own, so reading them needs `reports.view_productreport` (or `change_productreport`)."""

    app_label = "reports"
    model = "productreport"
    reads_need_permission = True


class ProductReportListApi(APIView):
    permission_classes = [ProductReportPermissions]
    pagination_class = PageNumberPagination

    @extend_schema(
        operation_id="reports_products_list",
        summary="Sales per product",
        description=(
            "The sales read model: units sold, orders and revenue per product, updated by the saga. "
            "Needs `reports.view_productreport`: the totals are every customer's."
        ),
        parameters=[WWW_AUTHENTICATE],
        responses={
            200: ProductReportOutputSerializer(many=True),
            **errors(
                401,
                403,
                404,
                _403="Without the permission `reports.view_productreport` (`permission_denied`).",
                _404="No such page (`page`).",
            ),
        },
    )
    def get(self, request):
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(selectors.product_report_list(), request, self)
        return paginator.get_paginated_response(represent_many(ProductReportOutputSerializer, page))
