"""Shape of the sales read model over REST."""

from rest_framework import serializers

from .models import ProductReport


class ProductReportOutputSerializer(serializers.ModelSerializer):
    product = serializers.IntegerField(source="product_id", read_only=True)

    class Meta:
        model = ProductReport
        fields = ["product", "product_name", "units_sold", "orders_count", "revenue", "updated_at"]
        read_only_fields = fields
