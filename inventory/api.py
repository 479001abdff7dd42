"""The products REST API: read for any signed-in user, write for staff."""

from django.db import transaction
from rest_framework import status
from rest_framework.pagination import PageNumberPagination
from rest_framework.permissions import SAFE_METHODS, BasePermission
from rest_framework.response import Response
from rest_framework.views import APIView

from project.db import service_db
from project.errors import NotFound

from . import selectors, services
from .serializers import ProductCreateInputSerializer, ProductOutputSerializer, ProductUpdateInputSerializer


class ReadOrStaffWrite(BasePermission):
    def has_permission(self, request, view):
        user = request.user
        return bool(user and user.is_authenticated and (request.method in SAFE_METHODS or user.is_staff))


class ProductListCreateApi(APIView):
    permission_classes = [ReadOrStaffWrite]

    def get(self, request):
        paginator = PageNumberPagination()
        page = paginator.paginate_queryset(selectors.product_list(), request, self)
        return paginator.get_paginated_response(ProductOutputSerializer(page, many=True).data)

    def post(self, request):
        payload = ProductCreateInputSerializer(data=request.data)
        payload.is_valid(raise_exception=True)
        product = services.product_create(**payload.validated_data)
        return Response(ProductOutputSerializer(product).data, status=status.HTTP_201_CREATED)


class ProductDetailApi(APIView):
    permission_classes = [ReadOrStaffWrite]

    def get(self, request, product_id: int):
        product = selectors.product_get(product_id=product_id)
        if product is None:
            raise NotFound(f"No product {product_id}.")
        return Response(ProductOutputSerializer(product).data)

    def patch(self, request, product_id: int):
        payload = ProductUpdateInputSerializer(data=request.data)
        payload.is_valid(raise_exception=True)
        changes = dict(payload.validated_data)
        delta = changes.pop("stock_delta", None)
        if selectors.product_get(product_id=product_id) is None:
            raise NotFound(f"No product {product_id}.")
        # One transaction: a refused stock change leaves the other fields alone too.
        with transaction.atomic(using=service_db("inventory")):
            product = services.product_update(product_id=product_id, **changes) if changes else None
            if delta:
                product = services.stock_adjust(product_id=product_id, delta=delta)
        product = selectors.product_get(product_id=product_id)
        return Response(ProductOutputSerializer(product).data)
