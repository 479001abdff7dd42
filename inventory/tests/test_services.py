"""Inventory's services: reserving and releasing stock, idempotently and all or nothing.

These call the service functions in-process; the saga across real workers is
tested in tests/test_saga.py.
"""

import contextlib
from decimal import Decimal

import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inventory import services
from inventory.exceptions import StockRefused, UnknownProduct
from inventory.models import OrderReservation, Product, StockReservation
from project.db import service_db
from project.saga import InvalidMessage, SagaAborted
from testing import proved

pytestmark = pytest.mark.django_db

RESERVED = OrderReservation.Status.RESERVED
REFUSED = OrderReservation.Status.REFUSED
RELEASED = OrderReservation.Status.RELEASED


def stock_of(product: Product) -> int:
    return Product.objects.get(pk=product.pk).stock


def active_reservations(order_id: int) -> dict[int, int]:
    rows = StockReservation.objects.filter(order_id=order_id, released_at=None)
    return dict(rows.values_list("product_id", "quantity"))


def record(order_id: int) -> OrderReservation:
    return OrderReservation.objects.get(order_id=order_id)


# --- reserve -------------------------------------------------------------------


def test_reserve_takes_every_line(make_product):
    a, b = make_product(stock=5), make_product(stock=3)

    result = services.stock_reserve(
        order_id=1, lines=[{"product": a.pk, "quantity": 2}, {"product": b.pk, "quantity": 3}]
    )

    assert result == RESERVED
    assert (stock_of(a), stock_of(b)) == (3, 0)
    assert active_reservations(1) == {a.pk: 2, b.pk: 3}
    assert record(1).status == RESERVED
    assert record(1).reason == ""


def test_a_first_reservation_is_one_transaction_of_five_statements(make_product, django_assert_num_queries):
    """BEGIN, claim, the conditional UPDATE, the reservation rows, COMMIT: no read, no savepoint."""
    a = make_product(stock=5)

    with django_assert_num_queries(5, using=service_db("inventory")):
        services.stock_reserve(
            order_id=1, lines=[{"product": a.pk, "quantity": 2}]
        )  # in the test's transaction: SAVEPOINT … RELEASE

    assert (stock_of(a), record(1).status, active_reservations(1)) == (3, RESERVED, {a.pk: 2})


def test_stock_back_between_the_shortfall_and_the_locked_look_is_taken(make_product, monkeypatch):
    """The quick path fell short; by the time the rows are locked the stock is there: reserved, once."""
    a = make_product(stock=5)
    take = services._take
    calls = []

    def short_once(order_id, wanted):
        calls.append(order_id)
        if len(calls) == 1:
            raise services._Shortfall(f"insufficient stock for product {a.pk}")
        take(order_id, wanted)

    monkeypatch.setattr(services, "_take", short_once)

    assert services.stock_reserve(order_id=1, lines=[{"product": a.pk, "quantity": 2}]) == RESERVED
    assert len(calls) == 2
    assert (stock_of(a), record(1).status, record(1).reason, active_reservations(1)) == (3, RESERVED, "", {a.pk: 2})


def test_reserve_with_one_short_line_reserves_nothing_and_says_why(make_product):
    a, b, c = make_product(stock=5), make_product(stock=1), make_product(stock=5)
    lines = [{"product": a.pk, "quantity": 2}, {"product": b.pk, "quantity": 3}, {"product": c.pk, "quantity": 1}]

    with pytest.raises(StockRefused) as refused:
        services.stock_reserve(order_id=7, lines=lines)

    message = str(refused.value)
    assert f"product {b.pk}" in message
    assert "wanted 3" in message
    assert "have 1" in message
    assert refused.value.shortfalls == [f"insufficient stock for product {b.pk}: wanted 3, have 1"]
    assert (stock_of(a), stock_of(b), stock_of(c)) == (5, 1, 5)
    assert not StockReservation.objects.filter(order_id=7).exists()
    assert record(7).status == REFUSED
    assert record(7).reason == message


def test_reserve_names_every_short_line(make_product):
    a, b = make_product(stock=0), make_product(stock=1)

    with pytest.raises(StockRefused) as refused:
        services.stock_reserve(order_id=8, lines=[{"product": a.pk, "quantity": 1}, {"product": b.pk, "quantity": 2}])

    assert len(refused.value.shortfalls) == 2
    assert f"product {a.pk}: wanted 1, have 0" in str(refused.value)
    assert f"product {b.pk}: wanted 2, have 1" in str(refused.value)


def test_reserve_refuses_an_unknown_product(make_product):
    a = make_product(stock=5)
    missing = a.pk + 1000

    with pytest.raises(StockRefused) as refused:
        services.stock_reserve(
            order_id=2, lines=[{"product": a.pk, "quantity": 1}, {"product": missing, "quantity": 1}]
        )

    assert f"unknown product {missing}" in str(refused.value)
    assert stock_of(a) == 5
    assert not StockReservation.objects.filter(order_id=2).exists()
    assert record(2).status == REFUSED


def test_reserve_refuses_an_inactive_product(make_product):
    a, off = make_product(stock=5), make_product(stock=5, active=False)

    with pytest.raises(StockRefused) as refused:
        services.stock_reserve(order_id=3, lines=[{"product": a.pk, "quantity": 1}, {"product": off.pk, "quantity": 1}])

    assert f"product {off.pk}" in str(refused.value)
    assert "not on sale" in str(refused.value)
    assert (stock_of(a), stock_of(off)) == (5, 5)
    assert not StockReservation.objects.filter(order_id=3).exists()


def test_reserve_delivered_twice_has_one_effect(make_product):
    a = make_product(stock=5)
    lines = [{"product": a.pk, "quantity": 2}]

    assert services.stock_reserve(order_id=4, lines=lines) == RESERVED
    assert services.stock_reserve(order_id=4, lines=lines) == RESERVED

    assert stock_of(a) == 3
    assert StockReservation.objects.filter(order_id=4).count() == 1
    assert active_reservations(4) == {a.pk: 2}


def test_refused_reserve_delivered_again_is_refused_again_without_effect(make_product):
    a = make_product(stock=1)
    lines = [{"product": a.pk, "quantity": 2}]
    with pytest.raises(StockRefused):
        services.stock_reserve(order_id=5, lines=lines)
    services.stock_adjust(product_id=a.pk, delta=5)  # enough now, but the order was already refused

    with pytest.raises(StockRefused) as again:
        services.stock_reserve(order_id=5, lines=lines)

    assert "wanted 2, have 1" in str(again.value)
    assert stock_of(a) == 6
    assert not StockReservation.objects.filter(order_id=5).exists()


def test_a_refusal_is_kept_as_data_and_rendered_for_people(make_product):
    short, gone, off = make_product(stock=1), make_product(stock=5), make_product(stock=5, active=False)
    missing = gone.pk
    gone.delete()
    lines = [{"product": p, "quantity": q} for p, q in ((short.pk, 3), (missing, 1), (off.pk, 2))]

    with pytest.raises(StockRefused) as refused:
        services.stock_reserve(order_id=21, lines=lines)

    refusal = [
        {"product": short.pk, "code": "insufficient_stock", "wanted": 3, "available": 1},
        {"product": missing, "code": "unknown_product"},
        {"product": off.pk, "code": "inactive_product", "sku": off.sku},
    ]
    assert refused.value.refusal == refusal
    assert record(21).refusal == refusal
    assert (
        record(21).reason
        == str(refused.value)
        == (
            f"insufficient stock for product {short.pk}: wanted 3, have 1; unknown product {missing}; "
            f"product {off.pk} ({off.sku}) is not on sale"
        )
    )


def test_a_refusal_delivered_again_comes_from_the_record(make_product):
    a = make_product(stock=1)
    with pytest.raises(StockRefused) as first:
        services.stock_reserve(order_id=22, lines=[{"product": a.pk, "quantity": 2}])

    with pytest.raises(StockRefused) as again:
        services.stock_reserve(order_id=22, lines=[{"product": a.pk, "quantity": 2}])

    assert again.value.refusal == first.value.refusal
    assert str(again.value) == str(first.value)


def test_a_refusal_recorded_as_text_only_is_refused_with_its_text(make_product):
    """Rows written before refusals were data keep their text and no items."""
    a = make_product(stock=1)
    OrderReservation.objects.create(order_id=23, status=REFUSED, reason="insufficient stock for product 7: wanted 3")

    with pytest.raises(StockRefused) as again:
        services.stock_reserve(order_id=23, lines=[{"product": a.pk, "quantity": 2}])

    assert (str(again.value), again.value.refusal) == ("insufficient stock for product 7: wanted 3", [])
    assert again.value.shortfalls == ["insufficient stock for product 7: wanted 3"]


# --- release -------------------------------------------------------------------


def test_release_after_reserve_gives_the_stock_back(make_product):
    a, b = make_product(stock=5), make_product(stock=5)
    services.stock_reserve(order_id=10, lines=[{"product": a.pk, "quantity": 2}, {"product": b.pk, "quantity": 5}])

    assert services.stock_release(order_id=10) == RELEASED

    assert (stock_of(a), stock_of(b)) == (5, 5)
    assert active_reservations(10) == {}
    assert StockReservation.objects.filter(order_id=10, released_at__isnull=False).count() == 2
    assert record(10).status == RELEASED


def test_release_delivered_twice_has_one_effect(make_product):
    a = make_product(stock=5)
    services.stock_reserve(order_id=11, lines=[{"product": a.pk, "quantity": 4}])

    services.stock_release(order_id=11)
    services.stock_release(order_id=11)

    assert stock_of(a) == 5
    assert record(11).status == RELEASED


def test_release_before_reserve_leaves_a_tombstone_and_stops_the_reserve(make_product):
    a = make_product(stock=5)

    assert services.stock_release(order_id=12) == RELEASED
    assert record(12).status == RELEASED

    with pytest.raises(SagaAborted):
        services.stock_reserve(order_id=12, lines=[{"product": a.pk, "quantity": 2}])

    assert stock_of(a) == 5
    assert not StockReservation.objects.filter(order_id=12).exists()
    assert record(12).status == RELEASED


def test_release_after_refusal_keeps_the_reason(make_product):
    a = make_product(stock=1)
    with pytest.raises(StockRefused) as refused:
        services.stock_reserve(order_id=13, lines=[{"product": a.pk, "quantity": 3}])

    services.stock_release(order_id=13)

    assert record(13).status == RELEASED
    assert record(13).reason == str(refused.value)
    assert stock_of(a) == 1


def test_failure_note_keeps_the_first_reason():
    services.stock_failure_note(order_id=14, reason="first")
    services.stock_failure_note(order_id=14, reason="second")

    assert record(14).reason == "first"
    assert record(14).status == REFUSED


def test_failure_note_does_not_overwrite_a_refusal(make_product):
    a = make_product(stock=0)
    with pytest.raises(StockRefused) as refused:
        services.stock_reserve(order_id=15, lines=[{"product": a.pk, "quantity": 1}])

    services.stock_failure_note(order_id=15, reason="the task's note")

    assert record(15).reason == str(refused.value)


def test_failure_note_on_a_reserved_order_keeps_the_reservation(make_product):
    a = make_product(stock=5)
    services.stock_reserve(order_id=16, lines=[{"product": a.pk, "quantity": 2}])

    services.stock_failure_note(order_id=16, reason="gave up after retries")

    assert record(16).status == RESERVED
    assert record(16).reason == "gave up after retries"
    services.stock_release(order_id=16)
    assert stock_of(a) == 5


# --- malformed messages --------------------------------------------------------


@pytest.mark.parametrize(
    "lines",
    [
        None,
        "not a list",
        {"product": 1, "quantity": 1},
        [],
        ["a line"],
        [{"product": 1}],
        [{"product": 1, "quantity": True}],
        [{"product": 1, "quantity": "2"}],
        [{"product": 1, "quantity": 1.5}],
        [{"product": 1, "quantity": 2.0}],
        [{"product": 1, "quantity": -1}],
        [{"product": 1, "quantity": 0}],
        [{"product": None, "quantity": 1}],
        [{"product": "1", "quantity": 1}],
        [{"product": 1, "quantity": 1}, {"product": 1, "quantity": 2}],
    ],
)
def test_malformed_lines_are_invalid_messages(make_product, lines):
    make_product(stock=5)

    with pytest.raises(InvalidMessage):
        services.stock_reserve(order_id=20, lines=lines)

    assert not OrderReservation.objects.filter(order_id=20).exists()
    assert not StockReservation.objects.exists()


# --- products ------------------------------------------------------------------


def test_database_refuses_negative_stock(make_product):
    a = make_product(stock=1)

    with pytest.raises(IntegrityError), transaction.atomic(using=service_db("inventory")):
        Product.objects.filter(pk=a.pk).update(stock=-1)

    assert stock_of(a) == 1


def test_product_create_announces_on_commit(django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(using=service_db("inventory"), execute=False) as callbacks:
        product = services.product_create(sku="ANN-1", name="Announced", price=Decimal("2.50"), stock=3)

    assert len(callbacks) == 1
    assert callbacks[0].args == ("reports.product_sync",)
    assert proved("reports.product_sync", callbacks[0].keywords["kwargs"]) == {
        "product_id": product.pk,
        "sku": "ANN-1",
        "name": "Announced",
        "version": 1,
    }


def test_product_create_with_a_taken_sku_is_refused(make_product, django_capture_on_commit_callbacks):
    make_product(sku="DUP-1")

    # full_clean's unique check answers first; the database's constraint (Conflict) covers a race
    with (
        django_capture_on_commit_callbacks(using=service_db("inventory"), execute=False) as callbacks,
        pytest.raises(ValidationError) as raised,
    ):
        services.product_create(sku="DUP-1", name="Again", price=Decimal("1.00"))

    assert "sku" in raised.value.message_dict
    assert Product.objects.filter(sku="DUP-1").count() == 1
    assert callbacks == []


def test_product_update_bumps_the_version_and_announces(make_product, django_capture_on_commit_callbacks):
    product = make_product(name="Old name")

    with django_capture_on_commit_callbacks(using=service_db("inventory"), execute=False) as callbacks:
        updated = services.product_update(product_id=product.pk, name="New name")

    assert updated.version == product.version + 1
    assert Product.objects.get(pk=product.pk).name == "New name"
    assert len(callbacks) == 1
    assert callbacks[0].keywords["kwargs"]["version"] == updated.version
    assert callbacks[0].keywords["kwargs"]["name"] == "New name"


def test_product_update_refuses_stock_and_unknown_products(make_product):
    product = make_product(stock=3)

    with pytest.raises(ValueError):
        services.product_update(product_id=product.pk, stock=100)
    with pytest.raises(UnknownProduct):
        services.product_update(product_id=product.pk + 1000, name="x")

    assert stock_of(product) == 3


def test_stock_adjust_adds_and_removes(make_product):
    product = make_product(stock=3)

    assert services.stock_adjust(product_id=product.pk, delta=4).stock == 7
    assert services.stock_adjust(product_id=product.pk, delta=-7).stock == 0


def test_stock_adjust_refuses_going_negative(make_product):
    product = make_product(stock=3)

    with pytest.raises(StockRefused):
        services.stock_adjust(product_id=product.pk, delta=-4)
    with pytest.raises(UnknownProduct):
        services.stock_adjust(product_id=product.pk + 1000, delta=1)

    assert stock_of(product) == 3


# --- property: any interleaving keeps the books -------------------------------


class _Rollback(Exception):
    """Undo one hypothesis example's writes (all examples share the test's transaction)."""


order_lines = st.dictionaries(st.integers(0, 2), st.integers(1, 4), min_size=1, max_size=3)
operations = st.lists(
    st.tuples(st.sampled_from(["reserve", "release"]), st.integers(0, 3), st.booleans()),
    max_size=14,
)


def check_books(products: list[Product], initial: list[int], orders: dict[int, dict[int, int]], released: set[int]):
    for product, start in zip(products, initial, strict=True):
        stock = stock_of(product)
        held = sum(
            StockReservation.objects.filter(product=product, released_at=None).values_list("quantity", flat=True)
        )
        assert stock >= 0
        assert stock + held == start, f"product {product.pk}: stock {stock} + held {held} != {start}"
    for order_id, wanted in orders.items():
        held = active_reservations(order_id)
        assert held in ({}, wanted), f"order {order_id} holds {held} of {wanted}"
        status = OrderReservation.objects.filter(order_id=order_id).values_list("status", flat=True).first()
        assert (status == RESERVED) == bool(held)
        if order_id in released:
            assert held == {}
            assert status == RELEASED


# database=None: no .hypothesis folder in the checkout; failures print their example.
@settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    initial=st.lists(st.integers(0, 5), min_size=3, max_size=3),
    wanted=st.lists(order_lines, min_size=4, max_size=4),
    steps=operations,
)
def test_any_interleaving_of_steps_and_undos_keeps_the_books(initial, wanted, steps):
    try:
        with transaction.atomic(using=service_db("inventory")):
            products = [
                services.product_create(sku=f"PROP-{i}", name=f"prop {i}", price=Decimal("1.00"), stock=stock)
                for i, stock in enumerate(initial)
            ]
            # order ids 1..4, each with its own lines over the three products
            orders = {
                n + 1: {products[index].pk: quantity for index, quantity in lines.items()}
                for n, lines in enumerate(wanted)
            }
            released: set[int] = set()
            for action, index, twice in steps:
                order_id = index + 1
                for _ in range(2 if twice else 1):  # a duplicate delivery
                    if action == "reserve":
                        lines = [{"product": p, "quantity": q} for p, q in orders[order_id].items()]
                        with contextlib.suppress(StockRefused, SagaAborted):
                            services.stock_reserve(order_id=order_id, lines=lines)
                    else:
                        services.stock_release(order_id=order_id)
                        released.add(order_id)
                    check_books(products, initial, orders, released)
            raise _Rollback
    except _Rollback:
        pass
