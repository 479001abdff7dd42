"""The products list's query parameters: search, filters and ordering (django-filter)."""

import django_filters
from django import forms
from django.db.models import Q, QuerySet

from project.lines import MAX_PRICE

from .models import STOCK_MAX, Product


class IntegerFilter(django_filters.NumberFilter):
    field_class = forms.IntegerField


class ProductFilter(django_filters.FilterSet):
    search = django_filters.CharFilter(
        method="search_name_or_sku", max_length=200, help_text="Products whose name or sku contains this (any case)."
    )
    sku = django_filters.CharFilter(lookup_expr="iexact", max_length=64, help_text="The product with this sku.")
    active = django_filters.BooleanFilter(help_text="`true`: on sale only; `false`: withdrawn only.")
    stock_min = IntegerFilter(
        field_name="stock", lookup_expr="gte", min_value=0, max_value=STOCK_MAX, help_text="At least this in stock."
    )
    stock_max = IntegerFilter(
        field_name="stock", lookup_expr="lte", min_value=0, max_value=STOCK_MAX, help_text="At most this in stock."
    )
    price_min = django_filters.NumberFilter(
        field_name="price",
        lookup_expr="gte",
        min_value=0,
        max_value=MAX_PRICE,
        max_digits=12,
        decimal_places=2,
        help_text="Priced at least this.",
    )
    price_max = django_filters.NumberFilter(
        field_name="price",
        lookup_expr="lte",
        min_value=0,
        max_value=MAX_PRICE,
        max_digits=12,
        decimal_places=2,
        help_text="Priced at most this.",
    )
    ordering = django_filters.OrderingFilter(
        fields=["id", "sku", "name", "price", "stock", "created_at", "updated_at"],
        help_text="Sort by this field (`-` before it: descending); several, comma-separated. Default: `id`.",
    )

    class Meta:
        model = Product
        fields = []  # every parameter is declared above

    def search_name_or_sku(self, queryset: QuerySet[Product], name: str, value: str) -> QuerySet[Product]:
        return queryset.filter(Q(name__icontains=value) | Q(sku__icontains=value))
