"""Shapes of the products API's input and output."""

from decimal import Decimal

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from project.db.fields import StrictIntegerField
from project.http.serializers import InputSerializer
from project.lines import MAX_PRICE

from .models import STOCK_MAX, Product

READ_ONLY = dict.fromkeys(["id", "created_at", "updated_at"], "Read-only: the server sets it.")


@extend_schema_field({"type": "string", "format": "decimal", "pattern": r"^\d{1,10}(\.\d{1,2})?$", "example": "9.99"})
class PriceField(serializers.DecimalField):
    """A price from 0 to MAX_PRICE (9999999999.99), to the cent: a JSON string ("9.99"), or a number."""

    def __init__(self, **kwargs):
        super().__init__(max_digits=12, decimal_places=2, min_value=Decimal("0"), max_value=MAX_PRICE, **kwargs)


class ProductCreateInputSerializer(InputSerializer):
    refused_fields = {
        **READ_ONLY,
        "stock_delta": "Only when changing a product (PATCH); a new product takes its starting `stock`.",
    }

    sku = serializers.RegexField(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=64)
    name = serializers.CharField(min_length=1, max_length=200)
    price = PriceField()
    stock = StrictIntegerField(min_value=0, max_value=STOCK_MAX, default=0)
    active = serializers.BooleanField(default=True)


class ProductUpdateInputSerializer(InputSerializer):
    refused_fields = {
        **READ_ONLY,
        # Never a blind set, which would race with the saga's reservations.
        "stock": "Read-only here: change the stock with `stock_delta`, added to the current stock "
        "(negative: taken from it).",
    }

    sku = serializers.RegexField(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=64, required=False)
    name = serializers.CharField(min_length=1, max_length=200, required=False)
    price = PriceField(required=False)
    active = serializers.BooleanField(required=False)
    # Added to (or, negative, taken from) the current stock; the sum is checked by stock_adjust (409).
    stock_delta = StrictIntegerField(min_value=-STOCK_MAX, max_value=STOCK_MAX, required=False)


class ProductOutputSerializer(serializers.ModelSerializer):
    class Meta:
        model = Product
        fields = ["id", "sku", "name", "price", "stock", "active", "created_at", "updated_at"]
        read_only_fields = fields
