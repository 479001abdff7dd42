"""Reports' services: the sales read model, counted once per order and undone once."""

from decimal import Decimal

import pytest

from project.saga import InvalidMessage, SagaAborted
from reports import public, services
from reports.models import ProductReport, ReportedOrder

pytestmark = pytest.mark.django_db

RECORDED = ReportedOrder.Status.RECORDED
REVERTED = ReportedOrder.Status.REVERTED
FAILED = ReportedOrder.Status.FAILED


def sale(product: int, quantity: int, unit_price: str = "2.50", name: str = "") -> dict:
    return {"product": product, "quantity": quantity, "unit_price": unit_price, "product_name": name or f"P{product}"}


def report(product_id: int) -> ProductReport:
    return ProductReport.objects.get(product_id=product_id)


def totals(product_id: int) -> tuple[int, int, Decimal]:
    row = report(product_id)
    return row.units_sold, row.orders_count, row.revenue


@pytest.fixture
def products():
    services.product_sync(product_id=101, name="Widget", version=1)
    services.product_sync(product_id=102, name="Gadget", version=1)
    return 101, 102


def test_sale_record_counts_units_orders_and_revenue(products):
    services.sale_record(order_id=1, lines=[sale(101, 2, "2.50"), sale(102, 1, "10.00")])
    services.sale_record(order_id=2, lines=[sale(101, 3, "2.50")])

    assert totals(101) == (5, 2, Decimal("12.50"))
    assert totals(102) == (1, 1, Decimal("10.00"))
    recorded = ReportedOrder.objects.get(order_id=1)
    assert recorded.status == RECORDED
    assert recorded.lines == [
        {"product": 101, "quantity": 2, "amount": "5.00"},
        {"product": 102, "quantity": 1, "amount": "10.00"},
    ]
    assert public.recorded_orders([1, 2]) == {1: {101: 2, 102: 1}, 2: {101: 3}}


def test_a_first_sale_is_one_transaction_of_four_statements(products, django_assert_num_queries):
    """BEGIN, the record claimed as recorded, the totals' UPDATE, COMMIT."""
    from project.db import service_db

    with django_assert_num_queries(4, using=service_db("reports")):
        services.sale_record(order_id=1, lines=[sale(101, 2, "2.50")])  # in the test's transaction: SAVEPOINT … RELEASE

    assert totals(101) == (2, 1, Decimal("5.00"))
    assert ReportedOrder.objects.get(order_id=1).lines == [{"product": 101, "quantity": 2, "amount": "5.00"}]


def test_revenue_stays_exact_to_the_cent_through_many_sales_and_reverts(products):
    """The totals' UPDATE adds decimals on the database (SQLite keeps them as REAL): no cent drifts."""
    before = report(101).updated_at
    for order_id in range(1, 31):
        services.sale_record(order_id=order_id, lines=[sale(101, 1, "0.10"), sale(102, 3, "0.20")])
    for order_id in range(1, 31, 3):
        services.sale_revert(order_id=order_id)

    assert totals(101) == (20, 20, Decimal("2.00"))
    assert totals(102) == (60, 20, Decimal("12.00"))
    assert report(101).updated_at > before


def test_sale_record_delivered_twice_has_one_effect(products):
    lines = [sale(101, 2, "2.50")]

    assert services.sale_record(order_id=3, lines=lines) == RECORDED
    assert services.sale_record(order_id=3, lines=lines) == RECORDED

    assert totals(101) == (2, 1, Decimal("5.00"))


def test_sale_revert_undoes_the_sale_once(products):
    services.sale_record(order_id=1, lines=[sale(101, 1, "2.50")])
    services.sale_record(order_id=4, lines=[sale(101, 2, "2.50"), sale(102, 4, "1.00")])

    assert services.sale_revert(order_id=4) == REVERTED
    assert services.sale_revert(order_id=4) == REVERTED

    assert totals(101) == (1, 1, Decimal("2.50"))
    assert totals(102) == (0, 0, Decimal("0.00"))
    assert ReportedOrder.objects.get(order_id=4).status == REVERTED
    assert 4 not in public.recorded_orders()


def test_revert_before_record_stops_the_record(products):
    assert services.sale_revert(order_id=5) == REVERTED

    with pytest.raises(SagaAborted):
        services.sale_record(order_id=5, lines=[sale(101, 2)])

    assert totals(101) == (0, 0, Decimal("0.00"))
    assert ReportedOrder.objects.get(order_id=5).status == REVERTED


def test_failure_note_stops_a_late_record_and_keeps_the_first_reason(products):
    services.sale_failure_note(order_id=6, reason="first")
    services.sale_failure_note(order_id=6, reason="second")

    with pytest.raises(SagaAborted):
        services.sale_record(order_id=6, lines=[sale(101, 1)])

    assert ReportedOrder.objects.get(order_id=6).reason == "first"
    assert public.order_failure_reason(6) == "first"
    assert totals(101) == (0, 0, Decimal("0.00"))
    services.sale_revert(order_id=6)
    row = ReportedOrder.objects.get(order_id=6)
    assert (row.status, row.reason) == (REVERTED, "first")


def test_failure_note_after_a_record_is_undone_by_the_revert(products):
    services.sale_record(order_id=7, lines=[sale(101, 2, "1.00")])

    services.sale_failure_note(order_id=7, reason="a later step gave up")
    services.sale_revert(order_id=7)

    assert totals(101) == (0, 0, Decimal("0.00"))


# --- products ------------------------------------------------------------------


def test_product_sync_creates_and_renames():
    services.product_sync(product_id=201, name="First", version=1)
    assert (report(201).product_name, report(201).name_version) == ("First", 1)

    services.product_sync(product_id=201, name="Second", version=2)
    assert (report(201).product_name, report(201).name_version) == ("Second", 2)
    assert ProductReport.objects.filter(product_id=201).count() == 1


def test_an_older_product_event_does_not_overwrite_a_newer_one():
    services.product_sync(product_id=202, name="Newest", version=3)
    services.product_sync(product_id=202, name="Older", version=2)
    services.product_sync(product_id=202, name="Same version", version=3)

    assert (report(202).product_name, report(202).name_version) == ("Newest", 3)


def test_product_sync_keeps_the_totals():
    services.product_sync(product_id=203, name="Before", version=1)
    services.sale_record(order_id=8, lines=[sale(203, 2, "3.00")])

    services.product_sync(product_id=203, name="After", version=2)

    assert report(203).product_name == "After"
    assert totals(203) == (2, 1, Decimal("6.00"))


def test_a_sale_before_the_product_event_uses_the_snapshot_name_until_the_event():
    services.sale_record(order_id=9, lines=[sale(204, 2, "1.50", name="Snapshot name")])
    assert report(204).product_name == "Snapshot name"
    assert totals(204) == (2, 1, Decimal("3.00"))

    services.product_sync(product_id=204, name="Catalogue name", version=1)

    assert report(204).product_name == "Catalogue name"
    assert totals(204) == (2, 1, Decimal("3.00"))


# --- malformed messages --------------------------------------------------------


@pytest.mark.parametrize(
    "lines",
    [
        None,
        "lines",
        [],
        [1],
        [{"product": 1, "quantity": 0, "unit_price": "1"}],
        [{"product": 1, "quantity": -2, "unit_price": "1"}],
        [{"product": 1, "quantity": True, "unit_price": "1"}],
        [{"product": 1, "quantity": "2", "unit_price": "1"}],
        [{"product": 1, "quantity": 1.5, "unit_price": "1"}],
        [{"product": 0, "quantity": 1, "unit_price": "1"}],
        [{"product": 1, "quantity": 1, "unit_price": "abc"}],
        [{"product": 1, "quantity": 1, "unit_price": "-1"}],
        [{"product": 1, "quantity": 1, "unit_price": "NaN"}],
        [{"product": 1, "quantity": 1, "unit_price": "Infinity"}],
        [{"product": 1, "quantity": 1, "unit_price": "10000000000.00"}],
        [{"product": 1, "quantity": 1, "unit_price": "1e30"}],
        [{"product": 1, "quantity": 1, "unit_price": "0.001"}],
        [{"product": 1, "quantity": 1}],
        [{"product": 1, "quantity": 1, "unit_price": "1"}, {"product": 1, "quantity": 2, "unit_price": "1"}],
    ],
)
def test_malformed_sale_lines_are_invalid_messages(lines):
    with pytest.raises(InvalidMessage):
        services.sale_record(order_id=10, lines=lines)

    assert not ReportedOrder.objects.filter(order_id=10).exists()
    assert not ProductReport.objects.exists()
