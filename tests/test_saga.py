"""The order saga end to end, with real worker processes (one per service queue).

Every test here publishes through the configured broker (filesystem or
RabbitMQ) and lets `celery worker` processes run the steps against the test
database (SQLite file or PostgreSQL). Nothing is eager and nothing is mocked.
After every test the consistency audit must find nothing.
"""

import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import pytest
from django.db import close_old_connections, connections, transaction

from inventory import services as inventory_services
from inventory.models import OrderReservation, Product, StockReservation
from ops.audit import audit
from orders import services as order_services
from orders.models import CancelledOrder, Order, OrderLine
from orders.saga import compensation_saga, order_saga
from project.celery import app
from reports.models import ProductReport, ReportedOrder
from testing import proved, signed, wait_for

pytestmark = [pytest.mark.saga, pytest.mark.timeout(180)]


@pytest.fixture(autouse=True)
def audited(workers):
    """Every scenario must leave the three services consistent."""
    yield
    violations = audit()
    assert violations == [], violations


def place(user, *lines):
    """Place an order through the service (so it dispatches on commit); lines are (product, quantity)."""
    placed = order_services.order_create(
        user=user, lines=[{"product": product.pk, "quantity": quantity} for product, quantity in lines]
    )
    return placed.order.pk


def terminal(order_id: int) -> str | None:
    """'confirmed', 'cancelled', or None while the saga is still running."""
    if CancelledOrder.objects.filter(pk=order_id).exists():
        return "cancelled"
    status = Order.objects.filter(pk=order_id).values_list("status", flat=True).first()
    return status if status == Order.Status.CONFIRMED else None


def wait_terminal(*order_ids: int, timeout: float = 60) -> dict[int, str]:
    def all_done():
        states = {order_id: terminal(order_id) for order_id in order_ids}
        return states if all(states.values()) else None

    return wait_for(all_done, timeout=timeout, what=f"orders {order_ids} to finish")


def stock(product) -> int:
    return Product.objects.get(pk=product.pk).stock


def report(product) -> ProductReport:
    return ProductReport.objects.get(product_id=product.pk)


def send(task_name: str, /, **kwargs) -> str:
    """Publish one task message, signed as orderflow signs it: a duplicate or an out-of-order delivery."""
    task_id = str(uuid.uuid4())
    app.send_task(task_name, kwargs=signed(task_name, kwargs), task_id=task_id)
    return task_id


def wait_logged(workers, queue: str, pattern: str, timeout: float = 30):
    return wait_for(lambda: re.search(pattern, workers.log(queue)), timeout=timeout, what=f"{pattern!r} in {queue}")


def test_happy_path_confirms_reserves_and_reports(workers, user, make_product):
    keyboard = make_product(stock=5, price="89.00", name="Keyboard")
    mouse = make_product(stock=10, price="29.50", name="Mouse")

    order_id = place(user, (keyboard, 2), (mouse, 3))

    assert wait_terminal(order_id) == {order_id: "confirmed"}
    assert stock(keyboard) == 3
    assert stock(mouse) == 7
    assert report(keyboard).units_sold == 2
    assert report(keyboard).orders_count == 1
    assert report(keyboard).revenue == Decimal("178.00")
    assert report(mouse).revenue == Decimal("88.50")
    assert OrderReservation.objects.get(order_id=order_id).status == "reserved"
    assert StockReservation.objects.filter(order_id=order_id, released_at=None).count() == 2
    assert Order.objects.get(pk=order_id).confirmed_at is not None
    # Each step ran on its own service's worker: task_routes did the routing.
    assert re.search(r"inventory\.stock_reserve\[[^]]+\] succeeded", workers.log("inventory"))
    assert re.search(r"reports\.sale_record\[[^]]+\] succeeded", workers.log("reports"))
    assert re.search(r"orders\.order_confirm\[[^]]+\] succeeded", workers.log("orders"))
    for queue, foreign in (("inventory", "reports."), ("reports", "inventory."), ("orders", "inventory.")):
        assert not re.search(rf"Task {re.escape(foreign)}\w+\[", workers.session_log(queue)), queue


def test_insufficient_stock_deletes_the_order_with_its_reason(workers, user, make_product):
    lamp = make_product(stock=1, price="120.00")

    order_id = place(user, (lamp, 3))

    assert wait_terminal(order_id) == {order_id: "cancelled"}
    cancelled = CancelledOrder.objects.get(pk=order_id)
    assert cancelled.reason == f"insufficient stock for product {lamp.pk}: wanted 3, have 1"
    assert cancelled.cause == "refused"
    assert cancelled.username == user.username
    assert cancelled.lines == [{"product": lamp.pk, "product_name": lamp.name, "unit_price": "120.00", "quantity": 3}]
    assert not Order.objects.filter(pk=order_id).exists()
    assert not OrderLine.objects.filter(order_id=order_id).exists()
    assert stock(lamp) == 1
    assert not StockReservation.objects.filter(order_id=order_id, released_at=None).exists()
    assert ReportedOrder.objects.get(order_id=order_id).status == "reverted"  # a tombstone, nothing counted
    assert report(lamp).units_sold == 0
    # The error callback travelled through the broker to the orders worker.
    assert re.search(r"Task orders\.order_compensate\[", workers.log("orders"))
    # Never received there (a refusal of a misrouted copy, tests/test_origin.py, is logged without "Task ").
    assert not re.search(r"Task orders\.order_compensate\[", workers.session_log("inventory"))


def test_report_step_failure_releases_the_reserved_stock(workers, user, make_product):
    product = make_product(stock=4)
    # The reports step fails, after inventory reserved.
    workers.set_faults({"reports.sale_record": {"action": "fail"}})

    order_id = place(user, (product, 3))

    assert wait_terminal(order_id) == {order_id: "cancelled"}
    cancelled = CancelledOrder.objects.get(pk=order_id)
    assert (cancelled.reason, cancelled.cause) == ("injected failure in reports.sale_record", "refused")
    assert stock(product) == 4
    reservation = StockReservation.objects.get(order_id=order_id)
    assert reservation.released_at is not None  # it was reserved, then given back
    assert OrderReservation.objects.get(order_id=order_id).status == "released"
    assert report(product).units_sold == 0


def test_multi_line_order_with_one_short_line_reserves_nothing(workers, user, make_product):
    plenty = make_product(stock=50)
    scarce = make_product(stock=2)
    also_plenty = make_product(stock=50)

    order_id = place(user, (plenty, 5), (scarce, 3), (also_plenty, 1))

    assert wait_terminal(order_id) == {order_id: "cancelled"}
    assert stock(plenty) == 50
    assert stock(scarce) == 2
    assert stock(also_plenty) == 50
    assert not StockReservation.objects.filter(order_id=order_id).exists()
    reason = CancelledOrder.objects.get(pk=order_id).reason
    assert reason == f"insufficient stock for product {scarce.pk}: wanted 3, have 2"


def test_transient_errors_are_retried_then_succeed(workers, user, make_product):
    product = make_product(stock=3)
    workers.set_faults({"inventory.stock_reserve": {"action": "transient", "times": 2}})

    order_id = place(user, (product, 1))

    assert wait_terminal(order_id) == {order_id: "confirmed"}
    assert stock(product) == 2
    log = workers.log("inventory")
    assert re.search(
        rf"inventory\.stock_reserve for order {order_id} hit OperationalError: injected [^,]*, retry 1",
        log,
    )
    assert re.search(
        rf"inventory\.stock_reserve for order {order_id} hit OperationalError: injected [^,]*, retry 2",
        log,
    )


def test_transient_errors_are_retried_until_the_order_deadline_then_compensated_saying_so(
    workers, user, make_product, settings
):
    """Infrastructure never decides an outcome: only the order's deadline (carried in the message) ends the retries."""
    settings.ORDER_DEADLINE_SECONDS = 4  # the deadline travels in the messages this process publishes
    product = make_product(stock=3)
    workers.set_faults({"reports.sale_record": {"action": "transient", "times": 1000}})

    order_id = place(user, (product, 2))

    assert wait_terminal(order_id) == {order_id: "cancelled"}
    cancelled = CancelledOrder.objects.get(pk=order_id)
    assert cancelled.reason == (
        "order deadline passed after 4 s: reports.sale_record could not complete "
        "(OperationalError: injected transient error in reports.sale_record)"
    )
    assert cancelled.cause == "deadline"
    assert (
        len(re.findall(rf"reports\.sale_record for order {order_id} hit OperationalError", workers.log("reports"))) >= 3
    )
    assert stock(product) == 3
    assert report(product).units_sold == 0


def test_every_step_delivered_twice_has_one_effect(workers, user, make_product):
    product = make_product(stock=10, price="5.00")
    order_id = place(user, (product, 4))
    assert wait_terminal(order_id) == {order_id: "confirmed"}
    order = Order.objects.get(pk=order_id)

    # The whole saga again (as the sweeper would), and each step alone, twice.
    order_saga(order).apply_async()
    line = {"product": product.pk, "quantity": 4}
    ids = [
        send("inventory.stock_reserve", order_id=order_id, lines=[line]),
        send("inventory.stock_reserve", order_id=order_id, lines=[line]),
        send("reports.sale_record", order_id=order_id, lines=[{**line, "unit_price": "5.00"}]),
        send("reports.sale_record", order_id=order_id, lines=[{**line, "unit_price": "5.00"}]),
        send("orders.order_confirm", order_id=order_id),
        send("orders.order_confirm", order_id=order_id),
    ]
    for task_id in ids:
        wait_for(
            lambda t=task_id: any(f"[{t}] succeeded" in workers.log(q) for q in ("orders", "inventory", "reports")),
            what=f"task {task_id}",
        )
    assert stock(product) == 6
    assert report(product).units_sold == 4
    assert report(product).orders_count == 1
    assert report(product).revenue == Decimal("20.00")
    assert Order.objects.get(pk=order_id).status == "confirmed"


def test_every_undo_delivered_twice_has_one_effect(workers, user, make_product):
    product = make_product(stock=10)
    order_id = place(user, (product, 4))
    assert wait_terminal(order_id) == {order_id: "confirmed"}

    order_services.order_cancel(order=Order.objects.get(pk=order_id), actor=user)
    # The compensation chain twice more, and each undo alone twice more.
    compensation_saga(order_id).apply_async()
    compensation_saga(order_id).apply_async()
    ids = [send(name, order_id=order_id) for name in ("reports.sale_revert", "inventory.stock_release") * 2]
    ids.append(send("orders.order_compensate", order_id=order_id))

    assert wait_terminal(order_id) == {order_id: "cancelled"}
    for task_id in ids:
        wait_for(
            lambda t=task_id: any(f"[{t}] succeeded" in workers.log(q) for q in ("orders", "inventory", "reports")),
            what=f"task {task_id}",
        )
    wait_for(lambda: workers.log("orders").count(f"order {order_id} deleted") >= 1)
    assert stock(product) == 10
    assert report(product).units_sold == 0
    assert report(product).orders_count == 0
    assert CancelledOrder.objects.filter(pk=order_id).count() == 1
    cancelled = CancelledOrder.objects.get(pk=order_id)
    assert (cancelled.reason, cancelled.cause) == ("cancelled by user", "user")
    assert workers.log("orders").count(f"order {order_id} deleted") == 1


def test_undo_before_its_step_makes_the_step_a_no_op_and_stops_the_chain(workers, user, make_product):
    product = make_product(stock=5)
    # An order whose saga has not been published yet: written here directly,
    # because order_create would publish it on commit.
    order = Order.objects.create(user=user, dispatch_attempts=1)
    OrderLine.objects.create(order=order, product_id=product.pk, product_name=product.name, unit_price=product.price,
                             quantity=2)  # fmt: skip

    # The undos arrive first (reordering, or a sweeper racing the original)…
    release = send("inventory.stock_release", order_id=order.pk)
    revert = send("reports.sale_revert", order_id=order.pk)
    wait_logged(workers, "inventory", rf"\[{release}\] succeeded")
    wait_logged(workers, "reports", rf"\[{revert}\] succeeded")
    # …then the steps.
    order_saga(order).apply_async()

    wait_logged(workers, "inventory", rf"inventory\.stock_reserve for order {order.pk} skipped")
    time.sleep(1.5)  # long enough for a wrongly continued chain to reach the next two steps
    assert stock(product) == 5
    assert not StockReservation.objects.filter(order_id=order.pk).exists()
    assert ReportedOrder.objects.get(order_id=order.pk).status == "reverted"
    assert not re.search(rf"sale_record for order {order.pk}", workers.log("reports"))
    assert Order.objects.get(pk=order.pk).status == "pending"  # the chain stopped before confirm

    # Finish it the way the sweeper would: compensate, and the order ends.
    order_services.order_compensate(order_id=order.pk, reason="test: abandoned")
    assert wait_terminal(order.pk) == {order.pk: "cancelled"}
    assert CancelledOrder.objects.get(pk=order.pk).reason == "test: abandoned"


def test_sale_revert_before_sale_record_stops_the_chain_after_inventory(workers, user, make_product):
    """The reports undo came first: stock is reserved, then compensation gives it back."""
    product = make_product(stock=5)
    order = Order.objects.create(user=user, dispatch_attempts=1)
    OrderLine.objects.create(order=order, product_id=product.pk, product_name=product.name, unit_price=product.price,
                             quantity=2)  # fmt: skip
    revert = send("reports.sale_revert", order_id=order.pk)
    wait_logged(workers, "reports", rf"\[{revert}\] succeeded")

    order_saga(order).apply_async()

    wait_logged(workers, "reports", rf"reports\.sale_record for order {order.pk} skipped")
    assert stock(product) == 3  # inventory's step ran; its undo has not yet
    wait_for(lambda: ProductReport.objects.filter(product_id=product.pk).exists(), what="the report row")
    assert report(product).units_sold == 0
    assert Order.objects.get(pk=order.pk).status == "pending"
    order_services.order_compensate(order_id=order.pk, reason="test: abandoned")
    assert wait_terminal(order.pk) == {order.pk: "cancelled"}
    assert stock(product) == 5


def test_product_created_and_renamed_reaches_reports(workers, make_product):
    product = make_product(stock=1, name="Desk lamp")

    row = wait_for(lambda: ProductReport.objects.filter(product_id=product.pk).first(), what="the report row")
    assert row.product_name == "Desk lamp"
    assert row.units_sold == 0

    inventory_services.product_update(product_id=product.pk, name="Desk lamp, brass")
    wait_for(lambda: report(product).product_name == "Desk lamp, brass", what="the rename")
    assert report(product).name_version == 2


def test_nothing_is_dispatched_when_the_order_transaction_rolls_back(workers, user, make_product):
    product = make_product(stock=5)

    class Abort(Exception):
        pass

    with pytest.raises(Abort), transaction.atomic():
        rolled_back = place(user, (product, 2))
        raise Abort

    assert not Order.objects.filter(pk=rolled_back).exists()
    # A saga takes well under a second here (see the next order); wait longer.
    time.sleep(2)
    assert not OrderReservation.objects.filter(order_id=rolled_back).exists()
    assert not ReportedOrder.objects.filter(order_id=rolled_back).exists()
    assert stock(product) == 5
    # The workers were alive all along: a committed order goes through at once.
    # (Checked after, since SQLite may hand the rolled-back id to this order.)
    started = time.monotonic()
    committed = place(user, (product, 1))
    assert wait_terminal(committed) == {committed: "confirmed"}
    assert time.monotonic() - started < 2
    assert stock(product) == 4


def test_two_requests_racing_with_one_idempotency_key_make_one_order_and_one_saga(
    workers, user, make_product, monkeypatch
):
    """The second INSERT waits on the first's uncommitted key, fails, and replays the committed order.

    The first request is held between its INSERTs and its commit, so the
    second finds no earlier order, inserts, and meets the unique key.
    """
    if connections["default"].vendor != "postgresql":
        pytest.skip("SQLite serializes writers: the second request cannot insert beside the first")
    product = make_product(stock=5)
    dispatch = order_services._dispatch
    inserted, release = threading.Event(), threading.Event()

    def held_dispatch(order, lines=None):
        if not inserted.is_set():
            inserted.set()
            release.wait(10)
        dispatch(order, lines)

    monkeypatch.setattr(order_services, "_dispatch", held_dispatch)

    def request(_):
        try:
            return order_services.order_create(
                user=user, lines=[{"product": product.pk, "quantity": 2}], idempotency_key="race-1"
            )
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=2) as pool:
        first = pool.submit(request, 0)
        assert inserted.wait(10)
        second = pool.submit(request, 1)
        time.sleep(0.5)  # the second request is now waiting on the first's key
        release.set()
        placed = [first.result(timeout=30), second.result(timeout=30)]

    assert sorted(p.created for p in placed) == [False, True]
    assert placed[0].order.pk == placed[1].order.pk
    order_id = placed[0].order.pk
    assert wait_terminal(order_id) == {order_id: "confirmed"}
    assert Order.objects.filter(user=user, idempotency_key="race-1").count() == 1
    # one saga: the stock was taken once
    assert stock(product) == 3
    assert list(StockReservation.objects.filter(order_id=order_id).values_list("quantity", flat=True)) == [2]
    assert report(product).units_sold == 2


@pytest.mark.parametrize(
    ("queue", "task", "kwargs"),
    [
        ("inventory", "inventory.stock_reserve", {"order_id": "DROP TABLE", "lines": "x"}),
        ("inventory", "inventory.stock_release", {"order_id": -1}),
        ("reports", "reports.sale_record", {"order_id": None, "lines": [1]}),
        ("reports", "reports.product_sync", {"product_id": "x", "name": 3, "version": None}),
        ("orders", "orders.order_delete", {"order_id": 1.5}),
        ("orders", "orders.order_compensate", {"order_id": []}),
    ],
)
def test_poison_message_is_rejected_once_and_the_worker_keeps_serving(workers, user, make_product, queue, task, kwargs):
    task_id = send(task, **kwargs)

    wait_logged(workers, queue, rf"rejected a malformed (message|event) {task_id}")
    product = make_product(stock=2)
    order_id = place(user, (product, 1))
    assert wait_terminal(order_id) == {order_id: "confirmed"}
    # Rejected, not retried: it was delivered and refused exactly once.
    assert len(re.findall(rf"rejected a malformed (?:message|event) {task_id}", workers.log(queue))) == 1
    assert workers.log(queue).count(f"[{task_id}] received") == 1


def test_bad_lines_for_a_valid_order_are_refused_and_compensated(workers, user, make_product):
    """A step message with malformed lines fails fast (no retry) and the errback compensates."""
    product = make_product(stock=5)
    order = Order.objects.create(user=user, dispatch_attempts=1)
    OrderLine.objects.create(order=order, product_id=product.pk, product_name=product.name, unit_price=product.price,
                             quantity=1)  # fmt: skip
    saga = order_saga(order)
    # Signed again, as a sender that built bad lines would sign them: the step's own parsing is under test.
    reserve = saga.tasks[0]
    bad = {**proved(reserve.task, reserve.kwargs), "lines": [{"product": product.pk, "quantity": "lots"}]}
    reserve.kwargs.update(signed(reserve.task, bad))

    saga.apply_async()

    assert wait_terminal(order.pk) == {order.pk: "cancelled"}
    cancelled = CancelledOrder.objects.get(pk=order.pk)
    assert "must be positive integers" in cancelled.reason
    assert cancelled.cause == "refused"
    assert stock(product) == 5
    assert workers.log("inventory").count(f"stock_reserve for order {order.pk} failed") == 1


def test_concurrent_orders_never_oversell(workers, django_user_model, make_product):
    scarce = make_product(stock=7)
    other = make_product(stock=100)
    buyers = [django_user_model.objects.create_user(username=f"buyer{i}") for i in range(6)]

    def buy(i: int) -> int:
        try:
            lines = [(scarce, 1 + i % 2)] + ([(other, 1)] if i % 3 == 0 else [])
            return place(buyers[i % len(buyers)], *lines)
        finally:
            close_old_connections()
            connections.close_all()

    with ThreadPoolExecutor(max_workers=6) as pool:
        order_ids = list(pool.map(buy, range(24)))

    states = wait_terminal(*order_ids, timeout=120)
    confirmed = [i for i, s in states.items() if s == "confirmed"]
    units = sum(OrderLine.objects.get(order_id=i, product_id=scarce.pk).quantity for i in confirmed)
    assert stock(scarce) == 7 - units
    assert stock(scarce) >= 0
    assert units >= 6  # 7 units, orders of 1 or 2: at most one unit can be left
    assert report(scarce).units_sold == units
    assert len(confirmed) + CancelledOrder.objects.filter(pk__in=order_ids).count() == 24
