"""The sales read model, read-only."""

from rest_framework.pagination import PageNumberPagination
from rest_framework.views import APIView

from . import selectors
from .serializers import ProductReportOutputSerializer


class ProductReportListApi(APIView):
    def get(self, request):
        paginator = PageNumberPagination()
        page = paginator.paginate_queryset(selectors.product_report_list(), request, self)
        return paginator.get_paginated_response(ProductReportOutputSerializer(page, many=True).data)
