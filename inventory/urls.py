from django.urls import path

from . import api

urlpatterns = [
    path("products/", api.ProductListCreateApi.as_view(), name="product-list"),
    path("products/<int:product_id>/", api.ProductDetailApi.as_view(), name="product-detail"),
]
