"""The orders REST API: thin views over orders.services and orders.selectors."""

from rest_framework import status
from rest_framework.pagination import PageNumberPagination
from rest_framework.response import Response
from rest_framework.views import APIView

from project.errors import InvalidInput, NotFound

from . import selectors, services
from .models import CancelledOrder, Order
from .serializers import CancelledOrderOutputSerializer, OrderCreateInputSerializer, OrderOutputSerializer

STATUSES = {choice.value for choice in Order.Status}


def _gone(cancelled: CancelledOrder) -> Response:
    return Response(CancelledOrderOutputSerializer(cancelled).data, status=status.HTTP_410_GONE)


class OrderListCreateApi(APIView):
    def get(self, request):
        wanted = request.query_params.get("status")
        if wanted is not None and wanted not in STATUSES:
            raise InvalidInput("Unknown status filter.", fields={"status": [f"One of: {', '.join(sorted(STATUSES))}."]})
        paginator = PageNumberPagination()
        page = paginator.paginate_queryset(selectors.order_list(user=request.user, status=wanted), request, self)
        return paginator.get_paginated_response(OrderOutputSerializer(page, many=True).data)

    def post(self, request):
        payload = OrderCreateInputSerializer(data=request.data)
        payload.is_valid(raise_exception=True)
        placed = services.order_create(
            user=request.user,
            lines=[dict(line) for line in payload.validated_data["lines"]],
            idempotency_key=request.headers.get("Idempotency-Key"),
        )
        if placed.cancelled is not None:
            return _gone(placed.cancelled)
        response = Response(OrderOutputSerializer(placed.order).data, status=status.HTTP_202_ACCEPTED)
        if not placed.created:
            response["Idempotent-Replayed"] = "true"
        return response


class OrderDetailApi(APIView):
    def get(self, request, order_id: int):
        found = selectors.order_or_cancelled(user=request.user, order_id=order_id)
        if found is None:
            raise NotFound(f"No order {order_id}.")
        if isinstance(found, CancelledOrder):
            return _gone(found)
        return Response(OrderOutputSerializer(found).data)


class OrderCancelApi(APIView):
    def post(self, request, order_id: int):
        found = selectors.order_or_cancelled(user=request.user, order_id=order_id)
        if found is None:
            raise NotFound(f"No order {order_id}.")
        if isinstance(found, CancelledOrder):
            return _gone(found)
        services.order_cancel(order=found)
        # Compensation may already have deleted it: answer with what is there now.
        found = selectors.order_or_cancelled(user=request.user, order_id=order_id)
        if isinstance(found, CancelledOrder):
            data = CancelledOrderOutputSerializer(found).data
        else:
            data = OrderOutputSerializer(found).data
        return Response(data, status=status.HTTP_202_ACCEPTED)
