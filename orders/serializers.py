"""Shapes of the orders API's input and output."""

from django.conf import settings
from rest_framework import serializers

from project.fields import StrictIntegerField

from .models import CancelledOrder, Order, OrderLine


class OrderLineInputSerializer(serializers.Serializer):
    product = StrictIntegerField(min_value=1)
    quantity = StrictIntegerField(min_value=1, max_value=settings.ORDER_MAX_QUANTITY)


class OrderCreateInputSerializer(serializers.Serializer):
    lines = serializers.ListField(
        child=OrderLineInputSerializer(),
        allow_empty=False,
        max_length=settings.ORDER_MAX_LINES,
    )

    def validate_lines(self, lines):
        seen = set()
        for line in lines:
            if line["product"] in seen:
                raise serializers.ValidationError(f"Product {line['product']} appears in more than one line.")
            seen.add(line["product"])
        return lines


class OrderLineOutputSerializer(serializers.ModelSerializer):
    product = serializers.IntegerField(source="product_id")

    class Meta:
        model = OrderLine
        fields = ["product", "product_name", "unit_price", "quantity"]


class OrderOutputSerializer(serializers.ModelSerializer):
    lines = OrderLineOutputSerializer(many=True)
    user = serializers.CharField(source="user.get_username")

    class Meta:
        model = Order
        fields = [
            "id",
            "status",
            "user",
            "lines",
            "created_at",
            "updated_at",
            "confirmed_at",
            "dispatch_attempts",
            "last_dispatched_at",
        ]


class CancelledOrderOutputSerializer(serializers.ModelSerializer):
    id = serializers.IntegerField(source="order_id")
    status = serializers.SerializerMethodField()
    user = serializers.CharField(source="username")

    class Meta:
        model = CancelledOrder
        fields = ["id", "status", "reason", "user", "lines", "created_at", "cancelled_at"]

    def get_status(self, obj) -> str:
        return "cancelled"
