"""The products REST API: read for any signed-in user; writes need inventory's model permissions
(`inventory.add_product`, `inventory.change_product`), as in the admin."""

from django.db import transaction
from django_filters.rest_framework import DjangoFilterBackend
from drf_spectacular.utils import OpenApiExample, extend_schema
from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import APIView

from project.db import service_db
from project.http.errors import NotFound
from project.http.pagination import PageNumberPagination
from project.http.permissions import ModelPermissions
from project.http.schema import WWW_AUTHENTICATE, errors, id_parameter
from project.http.serializers import represent, represent_many

from . import selectors, services
from .filters import ProductFilter
from .serializers import ProductCreateInputSerializer, ProductOutputSerializer, ProductUpdateInputSerializer

PRODUCT_ID = id_parameter("product_id", "product")
CSRF = "or a session-authenticated write without its CSRF token"
NO_ADD = f"Without the permission `inventory.add_product` (`permission_denied`), {CSRF}."
NO_CHANGE = f"Without the permission `inventory.change_product` (`permission_denied`), {CSRF}."


class ProductPermissions(ModelPermissions):
    """Every signed-in user reads products (customers choose from them); writes need inventory's model
    permissions: POST `add_product`, PATCH `change_product`, DELETE `delete_product` (then 405: no endpoint
    deletes a product)."""

    app_label = "inventory"
    model = "product"
    reads_need_permission = False


class ProductListCreateApi(APIView):
    permission_classes = [ProductPermissions]
    pagination_class = PageNumberPagination
    filter_backends = [DjangoFilterBackend]
    filterset_class = ProductFilter

    def get_queryset(self):
        return selectors.product_list()

    @extend_schema(
        operation_id="products_list",
        summary="List products",
        description=(
            "Every product, active or not, by id, 50 per page; `search`, the filters and `ordering` narrow "
            "and sort it (e.g. `?search=usb&active=true&stock_min=1&ordering=-price`)."
        ),
        parameters=[WWW_AUTHENTICATE],
        responses={
            200: ProductOutputSerializer(many=True),
            **errors(
                400,
                401,
                404,
                _400="A bad filter or `ordering` value (`invalid`, with `fields`).",
                _404="No such page (`page`).",
            ),
        },
    )
    def get(self, request):
        products = DjangoFilterBackend().filter_queryset(request, self.get_queryset(), self)
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(products, request, self)
        return paginator.get_paginated_response(represent_many(ProductOutputSerializer, page))

    @extend_schema(
        operation_id="products_create",
        summary="Create a product (inventory.add_product)",
        description="Reports hears about it once it is committed.",
        request=ProductCreateInputSerializer,
        examples=[
            OpenApiExample(
                "a new product",
                value={"sku": "DESK-01", "name": "Standing desk", "price": "349.00", "stock": 3, "active": True},
                request_only=True,
            )
        ],
        parameters=[WWW_AUTHENTICATE],
        responses={
            201: ProductOutputSerializer,
            **errors(
                400,
                401,
                403,
                409,
                413,
                415,
                _400="Bad fields, or a taken `sku`. Nothing was written.",
                _403=NO_ADD,
                _409="Another create took the same `sku` at the same moment (`conflict`).",
            ),
        },
    )
    def post(self, request):
        payload = ProductCreateInputSerializer(data=request.data)
        payload.is_valid(raise_exception=True)
        product = services.product_create(**payload.validated_data)
        return Response(represent(ProductOutputSerializer, product), status=status.HTTP_201_CREATED)


class ProductDetailApi(APIView):
    permission_classes = [ProductPermissions]

    @extend_schema(
        operation_id="products_retrieve",
        summary="Get a product",
        parameters=[PRODUCT_ID, WWW_AUTHENTICATE],
        responses={200: ProductOutputSerializer, **errors(401, 404)},
    )
    def get(self, request, product_id: int):
        product = selectors.product_get(product_id=product_id)
        if product is None:
            raise NotFound(f"No product {product_id}.")
        return Response(represent(ProductOutputSerializer, product))

    @extend_schema(
        operation_id="products_update",
        summary="Change a product (inventory.change_product)",
        description=(
            "Any of the fields; stock only through `stock_delta`, added to (or, negative, taken from) the "
            "current stock (`stock` itself is a 400 that says so). All or nothing: a refused `stock_delta` "
            "leaves the other fields alone too."
        ),
        request=ProductUpdateInputSerializer,
        examples=[
            OpenApiExample("add stock", value={"stock_delta": 5}, request_only=True),
            OpenApiExample("new price", value={"price": "79.00"}, request_only=True),
            OpenApiExample("withdraw from sale", value={"active": False}, request_only=True),
        ],
        parameters=[PRODUCT_ID, WWW_AUTHENTICATE],
        responses={
            200: ProductOutputSerializer,
            **errors(
                400,
                401,
                403,
                404,
                409,
                413,
                415,
                _400="Bad fields, a field it does not take (`stock`: use `stock_delta`), or a taken `sku`. "
                "Nothing was written.",
                _403=NO_CHANGE,
                _409="`stock_delta` would take the stock below 0 (`insufficient_stock`), or past 2147483647 units "
                "with those held by orders (`stock_limit_exceeded`, naming `stock_delta` in `fields`). "
                "Nothing was written.",
            ),
        },
    )
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
        return Response(represent(ProductOutputSerializer, product))
