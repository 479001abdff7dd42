"""The orders REST API: thin views over orders.services and orders.selectors."""

from drf_spectacular.utils import (
    OpenApiExample,
    OpenApiParameter,
    OpenApiResponse,
    PolymorphicProxySerializer,
    extend_schema,
)
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import APIView

from project.http.errors import InvalidInput, NotFound
from project.http.pagination import PageNumberPagination
from project.http.schema import RETRY_AFTER, WWW_AUTHENTICATE, errors, id_parameter
from project.http.serializers import represent, represent_many
from project.http.throttles import OrderCreateThrottle

from . import permissions, selectors, services
from .models import CancelledOrder, Order
from .serializers import CancelledOrderOutputSerializer, OrderCreateInputSerializer, OrderOutputSerializer

STATUSES = sorted(choice.value for choice in Order.Status)
# Not a status an Order row has: a cancelled order is deleted, and its CancelledOrder record listed.
CANCELLED = "cancelled"

ORDER_ID = id_parameter("order_id", "order")
IDEMPOTENCY_KEY = OpenApiParameter(
    "Idempotency-Key",
    type={"type": "string", "minLength": 1, "maxLength": 255},
    location=OpenApiParameter.HEADER,
    description=(
        "Makes a retried POST safe: a repeat with the same key (per user) and the same lines returns the "
        "original order instead of placing another; the same key with other lines is a 409."
    ),
)
IDEMPOTENT_REPLAYED = OpenApiParameter(
    "Idempotent-Replayed",
    type={"type": "string", "enum": ["true"]},
    location=OpenApiParameter.HEADER,
    response=[202],
    description="Present when the answer is the order an earlier request with this Idempotency-Key placed.",
)


def _order_or_cancelled(many: bool = False) -> PolymorphicProxySerializer:
    """An order, or the record a cancelled one left (its `status` is `cancelled`)."""
    return PolymorphicProxySerializer(
        component_name="OrderOrCancelledOrder",
        serializers=[OrderOutputSerializer, CancelledOrderOutputSerializer],
        resource_type_field_name=None,
        many=many,
    )


def _gone(cancelled: CancelledOrder) -> Response:
    return Response(represent(CancelledOrderOutputSerializer, cancelled), status=status.HTTP_410_GONE)


class OrderListCreateApi(APIView):
    pagination_class = PageNumberPagination

    def get_throttles(self):
        # Only placing orders is rate limited; reading them is cheap.
        return [OrderCreateThrottle()] if self.request.method == "POST" else []

    @extend_schema(
        operation_id="orders_list",
        summary="List orders",
        description=(
            "Your orders (with `orders.view_order`: everyone's), newest first, 50 per page. Without `status`, "
            "the orders that exist (`pending`, `confirmed`, `cancelling`); `status=cancelled` lists the records "
            "of the deleted ones instead (as `GET /api/orders/{id}/` answers them with 410: `status` `cancelled`, "
            "the `reason`; everyone's with `orders.view_cancelledorder`)."
        ),
        parameters=[
            OpenApiParameter(
                "status",
                enum=[*STATUSES, CANCELLED],
                description="Only orders in this status; `cancelled`: the records of cancelled (deleted) orders.",
            ),
            WWW_AUTHENTICATE,
        ],
        responses={
            # Bare (no OpenApiResponse), or drf-spectacular would not see a paginated list.
            200: _order_or_cancelled(many=True),
            **errors(400, 401, 404, _400="Unknown `status` filter.", _404="No such page (`page`)."),
        },
    )
    def get(self, request):
        wanted = request.query_params.get("status")
        paginator = self.pagination_class()
        if wanted == CANCELLED:
            page = paginator.paginate_queryset(selectors.cancelled_order_list(user=request.user), request, self)
            return paginator.get_paginated_response(represent_many(CancelledOrderOutputSerializer, page))
        if wanted is not None and wanted not in STATUSES:
            allowed = ", ".join([*STATUSES, CANCELLED])
            raise InvalidInput("Unknown status filter.", fields={"status": [f"One of: {allowed}."]})
        page = paginator.paginate_queryset(selectors.order_list(user=request.user, status=wanted), request, self)
        return paginator.get_paginated_response(represent_many(OrderOutputSerializer, page))

    @extend_schema(
        operation_id="orders_create",
        summary="Place an order",
        description=(
            "Checks the lines, commits the order as `pending` and starts the saga; poll the order to see it "
            "`confirmed`, or answered with 410 once compensated. Rate limited per user (`ORDER_CREATE_THROTTLE`)."
        ),
        request=OrderCreateInputSerializer,
        examples=[
            OpenApiExample(
                "one line",
                description="One of the first demo product (`seed_demo`).",
                value={"lines": [{"product": 1, "quantity": 1}]},
                request_only=True,
            ),
            OpenApiExample(
                "two lines",
                value={"lines": [{"product": 1, "quantity": 1}, {"product": 2, "quantity": 2}]},
                request_only=True,
            ),
        ],
        parameters=[IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED, RETRY_AFTER, WWW_AUTHENTICATE],
        responses={
            202: OpenApiResponse(OrderOutputSerializer, description="Accepted: the order, `pending`."),
            410: OpenApiResponse(
                CancelledOrderOutputSerializer,
                description="Idempotent replay of an order that has since been cancelled: its record.",
            ),
            **errors(
                400,
                401,
                403,
                409,
                413,
                415,
                429,
                _400="Bad lines (missing or empty, too many, bad quantity, unknown or inactive product, a product "
                "twice), a bad Idempotency-Key, or malformed JSON. Nothing was written.",
                _409="This Idempotency-Key was already used with other lines (`conflict`). Nothing was written.",
            ),
        },
    )
    def post(self, request):
        payload = OrderCreateInputSerializer(data=request.data)
        payload.is_valid(raise_exception=True)
        placed = services.order_create(
            user=request.user,
            lines=payload.validated_data["lines"],
            idempotency_key=request.headers.get("Idempotency-Key"),
        )
        if placed.cancelled is not None:
            return _gone(placed.cancelled)
        response = Response(represent(OrderOutputSerializer, placed.order), status=status.HTTP_202_ACCEPTED)
        if not placed.created:
            response["Idempotent-Replayed"] = "true"
        return response


class OrderDetailApi(APIView):
    @extend_schema(
        operation_id="orders_retrieve",
        summary="Get an order",
        description=(
            "Yours; another user's with `orders.view_order` (a cancelled one's record: "
            "`orders.view_cancelledorder`). One you may not see is a 404, as if it did not exist."
        ),
        parameters=[ORDER_ID, WWW_AUTHENTICATE],
        responses={
            200: OrderOutputSerializer,
            410: OpenApiResponse(
                CancelledOrderOutputSerializer, description="Cancelled and deleted: its record, with the reason."
            ),
            **errors(401, 404),
        },
    )
    def get(self, request, order_id: int):
        found = selectors.order_or_cancelled(user=request.user, order_id=order_id)
        if found is None:
            raise NotFound(f"No order {order_id}.")
        if isinstance(found, CancelledOrder):
            return _gone(found)
        return Response(represent(OrderOutputSerializer, found))


class OrderCancelApi(APIView):
    @extend_schema(
        operation_id="orders_cancel",
        summary="Cancel an order",
        description=(
            "Starts the compensation saga (a confirmed order is undone too): stock released, sale reverted, "
            "order deleted with the reason `cancelled by user` (yours) or `cancelled by staff user '<username>'` "
            "(another user's, which needs `orders.change_order`; an order you may see but not cancel is a 403; "
            "one you may not see, a 404)."
        ),
        request=None,
        parameters=[ORDER_ID, WWW_AUTHENTICATE],
        responses={
            202: OpenApiResponse(
                _order_or_cancelled(),
                description="Accepted: the order as it is now, `cancelling` (or its record if already deleted).",
            ),
            200: OpenApiResponse(
                CancelledOrderOutputSerializer,
                description="Already cancelled (not an error: cancelling is idempotent): its record, with the reason.",
            ),
            **errors(
                401,
                403,
                404,
                _403="Another user's order you may see but not cancel (`permission_denied`: it needs "
                "`orders.change_order`), or a session-authenticated request without its CSRF token.",
            ),
        },
    )
    def post(self, request, order_id: int):
        found = selectors.order_or_cancelled(user=request.user, order_id=order_id)
        if found is None:
            raise NotFound(f"No order {order_id}.")
        if not permissions.may_cancel(request.user, found):
            raise exceptions.PermissionDenied(
                "Cancelling another user's order needs the permission orders.change_order."
            )
        if isinstance(found, CancelledOrder):
            return Response(represent(CancelledOrderOutputSerializer, found), status=status.HTTP_200_OK)
        services.order_cancel(order=found, actor=request.user)
        return Response(cancelled_as_seen_by(request.user, found), status=status.HTTP_202_ACCEPTED)


def cancelled_as_seen_by(user, order: Order) -> dict:
    """What the cancel's 202 shows `user` of `order` (which order_cancel has marked `cancelling`): as it is now.

    Compensation may already have deleted it: then its CancelledOrder record, if `user` may see that
    (owner, `orders.view_cancelledorder`); otherwise the order as order_cancel committed it, `cancelling`
    (an orders manager with `change_order` but not `view_cancelledorder`).
    """
    now = selectors.order_or_cancelled(user=user, order_id=order.pk)
    if now is None:
        order.status = Order.Status.CANCELLING
        now = order
    if isinstance(now, CancelledOrder):
        return represent(CancelledOrderOutputSerializer, now)
    return represent(OrderOutputSerializer, now)
