"""Shapes of the products API's input and output."""

from decimal import Decimal

from rest_framework import serializers

from project.fields import StrictIntegerField

from .models import Product


class ProductCreateInputSerializer(serializers.Serializer):
    sku = serializers.RegexField(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=64)
    name = serializers.CharField(max_length=200)
    price = serializers.DecimalField(max_digits=12, decimal_places=2, min_value=Decimal("0"))
    stock = StrictIntegerField(min_value=0, max_value=1_000_000_000, default=0)
    active = serializers.BooleanField(default=True)


class ProductUpdateInputSerializer(serializers.Serializer):
    sku = serializers.RegexField(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=64, required=False)
    name = serializers.CharField(max_length=200, required=False)
    price = serializers.DecimalField(max_digits=12, decimal_places=2, min_value=Decimal("0"), required=False)
    active = serializers.BooleanField(required=False)
    # Added to (or, negative, taken from) the current stock: never a blind set
    # that would race with reservations.
    stock_delta = StrictIntegerField(min_value=-1_000_000_000, max_value=1_000_000_000, required=False)


class ProductOutputSerializer(serializers.ModelSerializer):
    class Meta:
        model = Product
        fields = ["id", "sku", "name", "price", "stock", "active", "created_at", "updated_at"]
