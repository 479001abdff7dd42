from rest_framework import serializers

from .models import ProductReport


class ProductReportOutputSerializer(serializers.ModelSerializer):
    product = serializers.IntegerField(source="product_id")

    class Meta:
        model = ProductReport
        fields = ["product", "product_name", "units_sold", "orders_count", "revenue", "updated_at"]
