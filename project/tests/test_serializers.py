"""project.serializers: the same output as a fresh serializer, from one shared instance, in any thread."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from inventory.serializers import ProductOutputSerializer
from orders import services
from orders.models import CancelledOrder, Order
from orders.serializers import CancelledOrderOutputSerializer, OrderOutputSerializer
from project.serializers import represent, represent_many

pytestmark = pytest.mark.django_db


def test_represent_is_what_a_fresh_serializer_gives(user, make_product):
    a, b = make_product(stock=5, price="2.50"), make_product(stock=5, price="10.00")
    placed = services.order_create(
        user=user, lines=[{"product": a.pk, "quantity": 2}, {"product": b.pk, "quantity": 1}]
    )
    gone = services.order_create(user=user, lines=[{"product": a.pk, "quantity": 1}]).order
    services.order_compensate(order_id=gone.pk, reason="out of stock")
    services.order_delete(order_id=gone.pk)
    order = Order.objects.get(pk=placed.order.pk)
    cancelled = CancelledOrder.objects.get(pk=gone.pk)

    assert represent(OrderOutputSerializer, order) == OrderOutputSerializer(order).data
    assert represent(OrderOutputSerializer, placed.order) == OrderOutputSerializer(order).data
    assert represent(CancelledOrderOutputSerializer, cancelled) == CancelledOrderOutputSerializer(cancelled).data
    assert represent_many(ProductOutputSerializer, [a, b]) == ProductOutputSerializer([a, b], many=True).data


def test_one_shared_serializer_in_many_threads_keeps_each_object_apart(make_product):
    products = [make_product(stock=n, price=f"{n}.00") for n in range(1, 41)]
    expected = [ProductOutputSerializer(p).data for p in products]

    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda p: represent(ProductOutputSerializer, p), products * 5))

    assert got == expected * 5
