"""The consistency audit finds each kind of broken invariant, and says so through the command."""

import json
import threading
from datetime import timedelta
from decimal import Decimal

import pytest
from django.core.management import call_command
from django.db import connections
from django.utils import timezone

from inventory import services as inventory
from inventory.models import Product, StockReservation
from ops.audit import (
    CHECKS,
    Books,
    Violation,
    audit,
    held_equals_sold,
    no_oversell,
    sales_match_lines,
)
from orders import services as orders
from orders.models import CancelledOrder, Order
from orders.public import OrderState
from reports import public as reports_public
from reports import services as reports
from reports.models import ProductReport

pytestmark = pytest.mark.django_db


def confirmed_order(user, product, quantity=2) -> Order:
    """An order taken through every step, as the saga would, without a broker."""
    order = orders.order_create(user=user, lines=[{"product": product.pk, "quantity": quantity}]).order
    inventory.stock_reserve(order_id=order.pk, lines=[{"product": product.pk, "quantity": quantity}])
    reports.sale_record(
        order_id=order.pk,
        lines=[{"product": product.pk, "quantity": quantity, "unit_price": str(product.price)}],
    )
    orders.order_confirm(order_id=order.pk)
    return Order.objects.get(pk=order.pk)


def cancelled_order(user, product, quantity=1) -> int:
    order = orders.order_create(user=user, lines=[{"product": product.pk, "quantity": quantity}]).order
    orders.order_compensate(order_id=order.pk, reason="test")
    reports.sale_revert(order_id=order.pk)
    inventory.stock_release(order_id=order.pk)
    orders.order_delete(order_id=order.pk)
    return order.pk


def audit_books(books: Books) -> list[Violation]:
    return [violation for check in CHECKS for violation in check(books)]


def invariants(violations) -> set[str]:
    return {v.invariant for v in violations}


def test_a_consistent_history_passes(user, make_product):
    product = make_product(stock=10)
    confirmed_order(user, product)
    cancelled_order(user, product)
    orders.order_create(user=user, lines=[{"product": product.pk, "quantity": 1}])  # in flight: left out

    assert audit() == []
    call_command("check_consistency")  # exits 0


def test_confirmed_order_without_its_sale_is_reported(user, make_product):
    product = make_product(stock=10)
    order = confirmed_order(user, product)
    reports.sale_revert(order_id=order.pk)  # the books no longer balance

    found = audit()

    assert "books-balance" in invariants(found)
    assert any(v.order_id == order.pk and "sale is not counted" in v.message for v in found)


def test_cancelled_order_still_holding_stock_is_reported(user, make_product):
    product = make_product(stock=10)
    order_id = cancelled_order(user, product)
    StockReservation.objects.create(order_id=order_id, product=product, quantity=1)

    assert any(v.order_id == order_id and v.invariant == "books-balance" for v in audit())


def test_stock_held_for_an_order_that_never_existed_is_an_orphan(make_product):
    product = make_product(stock=10)
    inventory.stock_reserve(order_id=987654, lines=[{"product": product.pk, "quantity": 1}])

    found = audit()

    assert any(v.invariant == "no-orphans" and v.order_id == 987654 for v in found)


def test_partial_reservation_breaks_all_or_nothing(user, make_product):
    a, b = make_product(stock=10), make_product(stock=10)
    order = orders.order_create(
        user=user, lines=[{"product": a.pk, "quantity": 1}, {"product": b.pk, "quantity": 1}]
    ).order
    StockReservation.objects.create(order_id=order.pk, product=a, quantity=1)

    assert any(v.invariant == "all-or-nothing" and v.order_id == order.pk for v in audit())


def test_stuck_orders_break_every_order_ends(user, make_product):
    product = make_product(stock=10)
    order = orders.order_create(user=user, lines=[{"product": product.pk, "quantity": 1}]).order
    # Older than the order deadline (3 h) and a saga timeout: the sweeper should have ended it.
    Order.objects.filter(pk=order.pk).update(updated_at=timezone.now() - timedelta(hours=4))

    assert any(v.invariant == "every-order-ends" and v.order_id == order.pk for v in audit())
    assert audit(stale_after=timedelta(days=1)) == []


def test_report_totals_that_do_not_add_up_are_reported(user, make_product):
    product = make_product(stock=10, price="3.00")
    confirmed_order(user, product)
    ProductReport.objects.filter(product_id=product.pk).update(units_sold=7)

    found = audit()

    assert any(v.product_id == product.pk and "report says 7 sold" in v.message for v in found)


def test_command_prints_each_violation_and_exits_1(user, make_product, capsys):
    product = make_product(stock=10)
    order = confirmed_order(user, product)
    Product.objects.filter(pk=product.pk).update(stock=0)  # irrelevant to the books: still consistent
    reports.sale_revert(order_id=order.pk)

    with pytest.raises(SystemExit) as exit_info:
        call_command("check_consistency")
    out = capsys.readouterr().out
    assert exit_info.value.code == 1
    assert f"VIOLATION books-balance order={order.pk}" in out

    with pytest.raises(SystemExit):
        call_command("check_consistency", "--json")
    document = json.loads(capsys.readouterr().out)
    assert document["ok"] is False
    assert {"invariant": "books-balance", "order_id": order.pk} in [
        {k: v[k] for k in ("invariant", "order_id") if k in v} for v in document["violations"]
    ]
    assert CancelledOrder.objects.count() == 0
    assert Decimal(ProductReport.objects.get(product_id=product.pk).revenue) == Decimal("0.00")


@pytest.mark.django_db(transaction=True)
def test_a_sale_committed_while_the_audit_reads_is_seen_whole_or_not_at_all(
    no_workers, user, make_product, monkeypatch
):
    """The audit under live traffic: a step that commits between two of its reads is no violation.

    The steps run here, in process: a worker must not run the order's saga meanwhile.
    """
    if connections["default"].vendor != "postgresql":
        pytest.skip("SQLite reads without a snapshot (project.db.read_snapshot)")
    product = make_product(stock=10)
    confirmed_order(user, product)
    order = orders.order_create(user=user, lines=[{"product": product.pk, "quantity": 1}]).order
    inventory.stock_reserve(order_id=order.pk, lines=[{"product": product.pk, "quantity": 1}])
    read_totals = reports_public.units_sold_by_product

    def totals_after_a_sale_lands():
        # The audit has read each order's recorded sale; now another process records one more.
        def record():
            try:
                reports.sale_record(
                    order_id=order.pk, lines=[{"product": product.pk, "quantity": 1, "unit_price": "10.00"}]
                )
            finally:
                connections.close_all()

        thread = threading.Thread(target=record)
        thread.start()
        thread.join()
        return read_totals()

    monkeypatch.setattr(reports_public, "units_sold_by_product", totals_after_a_sale_lands)

    assert audit() == []
    assert ProductReport.objects.get(product_id=product.pk).units_sold == 3  # the sale did land


# --- each check on books written by hand (no database) ----------------------------------------


def books(**fields) -> Books:
    empty = {"live_orders": {}, "cancelled": set(), "lines": {}, "held": {}, "sold": {}, "units_sold": {}}
    return Books(now=timezone.now(), stale_after=timedelta(minutes=10), **{"negative_stock": [], **empty, **fields})


def confirmed(order_id: int) -> OrderState:
    return OrderState(order_id, "confirmed", timezone.now())


def test_stock_below_zero_breaks_no_oversell():
    # The database refuses negative stock (a CheckConstraint), so only hand-written books can show one.
    assert list(no_oversell(books(negative_stock=[7]))) == [
        Violation("no-oversell", "stock is below zero", product_id=7)
    ]


def test_a_sale_counted_for_a_cancelled_or_unknown_order_is_reported():
    found = audit_books(books(cancelled={1}, sold={1: {7: 2}, 2: {7: 1}}))

    assert Violation("books-balance", "cancelled but its sale is counted: {7: 2}", order_id=1) in found
    assert Violation("no-orphans", "sale counted for unknown order: {7: 1}", order_id=2) in found


def test_a_sale_that_is_not_the_orders_lines_is_reported():
    found = list(sales_match_lines(books(live_orders={1: confirmed(1)}, lines={1: {7: 2}}, sold={1: {7: 3}})))

    assert found == [Violation("books-balance", "sale counted {7: 3}, lines are {7: 2}", order_id=1)]


def test_units_held_against_units_sold_per_product_leave_in_flight_orders_out():
    pending = OrderState(2, "pending", timezone.now())
    settled = books(
        live_orders={1: confirmed(1), 2: pending},
        lines={1: {7: 2}, 2: {7: 1}},
        held={1: {7: 2}, 2: {7: 1}},  # order 2 is reserved, its sale not recorded yet
        sold={1: {7: 2}},
        units_sold={7: 2},
    )
    assert audit_books(settled) == []

    unbalanced = books(live_orders={1: confirmed(1)}, lines={1: {7: 2}}, held={1: {7: 2}, 3: {7: 1}}, cancelled={3})
    assert Violation("books-balance", "3 units held but 0 sold", product_id=7) in list(held_equals_sold(unbalanced))


def test_each_check_stands_alone_an_order_breaking_two_is_reported_twice():
    # Confirmed, holding only part of its lines: all-or-nothing and books-balance both see it.
    found = audit_books(books(live_orders={1: confirmed(1)}, lines={1: {7: 2, 8: 1}}, held={1: {7: 2}}))

    assert {(v.invariant, v.order_id) for v in found} >= {("all-or-nothing", 1), ("books-balance", 1)}
    assert audit_books(books()) == []
