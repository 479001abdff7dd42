"""Inventory's reads."""

from django.db.models import QuerySet

from project.db import service_db

from .models import Product


def product_list() -> QuerySet[Product]:
    return Product.objects.using(service_db("inventory")).order_by("id")


def product_get(*, product_id: int) -> Product | None:
    return Product.objects.using(service_db("inventory")).filter(pk=product_id).first()
