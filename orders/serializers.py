"""Shapes of the orders API's input and output."""

from django.conf import settings
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from project.db.fields import MAX_ID, StrictIntegerField
from project.http.serializers import InputSerializer
from project.lines import InvalidLines, OrderLines

from .models import CancelledOrder, Order, OrderLine

READ_ONLY = "Read-only: the server sets it."


class OrderLineInputSerializer(InputSerializer):
    product = StrictIntegerField(min_value=1, max_value=MAX_ID)
    quantity = StrictIntegerField(min_value=1, max_value=settings.ORDER_MAX_QUANTITY)

    refused_fields = dict.fromkeys(
        ["product_name", "unit_price"], "Read-only: a line takes the product's name and price when the order is placed."
    )


class OrderCreateInputSerializer(InputSerializer):
    refused_fields = {
        **dict.fromkeys(
            ["id", "user", "created_at", "updated_at", "confirmed_at", "dispatch_attempts", "last_dispatched_at"],
            READ_ONLY,
        ),
        "status": "Read-only: an order starts `pending`; cancel one with POST /api/orders/{id}/cancel/.",
    }

    lines = serializers.ListField(
        child=OrderLineInputSerializer(),
        allow_empty=False,
        min_length=1,
        max_length=settings.ORDER_MAX_LINES,
    )

    def validate_lines(self, lines) -> OrderLines:
        """The lines as the typed value order_create takes (project.lines: the rules as a whole)."""
        try:
            return OrderLines.parse([dict(line) for line in lines])
        except InvalidLines as exc:
            raise serializers.ValidationError(exc.fields["lines"]) from exc


class OrderLineOutputSerializer(serializers.ModelSerializer):
    product = serializers.IntegerField(source="product_id", read_only=True)

    class Meta:
        model = OrderLine
        fields = ["product", "product_name", "unit_price", "quantity"]
        read_only_fields = fields


class OrderOutputSerializer(serializers.ModelSerializer):
    lines = OrderLineOutputSerializer(many=True, read_only=True)
    user = serializers.CharField(source="user.get_username", read_only=True)

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
        read_only_fields = fields


class CancelledOrderLineOutputSerializer(serializers.Serializer):
    """A line as the order had it, kept on the CancelledOrder (a JSON snapshot, not a row)."""

    product = serializers.IntegerField()
    product_name = serializers.CharField()
    unit_price = serializers.DecimalField(max_digits=12, decimal_places=2)
    quantity = serializers.IntegerField()


class RefusalItemOutputSerializer(serializers.Serializer):
    """One line inventory could not reserve, as data (`reason` says the same in words)."""

    product = serializers.IntegerField()
    code = serializers.ChoiceField(choices=["insufficient_stock", "unknown_product", "inactive_product"])
    wanted = serializers.IntegerField(required=False, help_text="Units the order asked for.")
    available = serializers.IntegerField(required=False, help_text="Units in stock when it was refused.")


class CancelledOrderOutputSerializer(serializers.ModelSerializer):
    id = serializers.IntegerField(source="order_id", read_only=True)
    status = serializers.SerializerMethodField()
    user = serializers.CharField(source="username", read_only=True)
    lines = CancelledOrderLineOutputSerializer(many=True, read_only=True)
    refusal = RefusalItemOutputSerializer(
        many=True,
        read_only=True,
        help_text="When inventory refused the stock: why, line by line (empty otherwise).",
    )

    class Meta:
        model = CancelledOrder
        fields = ["id", "status", "reason", "cause", "refusal", "user", "lines", "created_at", "cancelled_at"]
        read_only_fields = fields
        extra_kwargs = {
            "cause": {
                "help_text": "Why, as a class: `refused` (a service refused the order: see `refusal`), `user` (its "
                "owner or staff cancelled it), `deadline` (its deadline passed first), `infrastructure` (a step "
                "failed on a fault that is not a refusal; passing outages are retried and never end here)."
            }
        }

    @extend_schema_field({"type": "string", "enum": ["cancelled"]})
    def get_status(self, obj) -> str:
        return "cancelled"
