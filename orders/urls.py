from django.urls import path

from . import api

urlpatterns = [
    path("orders/", api.OrderListCreateApi.as_view(), name="order-list"),
    path("orders/<int:order_id>/", api.OrderDetailApi.as_view(), name="order-detail"),
    path("orders/<int:order_id>/cancel/", api.OrderCancelApi.as_view(), name="order-cancel"),
]
