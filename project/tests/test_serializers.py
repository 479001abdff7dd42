"""project.http.serializers: the same output as a fresh serializer, from one shared instance, in any thread;
input serializers that refuse the fields they do not take."""

from concurrent.futures import ThreadPoolExecutor

import pytest
from rest_framework import serializers

from inventory.serializers import ProductOutputSerializer
from orders import services
from orders.models import CancelledOrder, Order
from orders.serializers import CancelledOrderOutputSerializer, OrderOutputSerializer
from project.http.serializers import InputSerializer, represent, represent_many

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


# --- InputSerializer: fields a write does not take are a 400, not dropped -----------------


class LineInput(InputSerializer):
    quantity = serializers.IntegerField(min_value=1)
    total = serializers.IntegerField(read_only=True)


class Body(InputSerializer):
    name = serializers.CharField()
    lines = LineInput(many=True, required=False)

    refused_fields = {"stock": "Read-only here: send `stock_delta`."}


def errors_of(data) -> dict:
    body = Body(data=data)
    assert not body.is_valid()
    return body.errors


def test_an_input_with_only_its_fields_is_valid():
    body = Body(data={"name": "x", "lines": [{"quantity": 2}]})

    assert body.is_valid(), body.errors
    assert body.validated_data == {"name": "x", "lines": [{"quantity": 2}]}


def test_a_refused_field_says_what_to_send_instead():
    assert errors_of({"name": "x", "stock": 5}) == {"stock": ["Read-only here: send `stock_delta`."]}


def test_an_unknown_field_names_the_fields_it_takes():
    assert errors_of({"name": "x", "colour": "red"}) == {"colour": ["Unknown field; this takes: name, lines."]}


def test_a_read_only_field_of_a_nested_input_is_refused_at_its_path():
    errors = errors_of({"name": "x", "lines": [{"quantity": 1}, {"quantity": 1, "total": 9}]})

    assert errors == {"lines": {1: {"total": ["Unknown field; this takes: quantity."]}}}


def test_refused_fields_come_with_the_other_errors():
    errors = errors_of({"stock": 5})

    assert set(errors) == {"name", "stock"}


def test_a_body_that_is_not_an_object_is_the_usual_error():
    assert set(errors_of(["name"])) == {"non_field_errors"}
