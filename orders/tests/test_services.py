"""Orders' services: taking an order, confirming, compensating, deleting, sweeping.

Fast and in-process: on-commit callbacks are captured, never executed, so
nothing is published to the broker. The saga across real workers is tested
in tests/test_saga.py.
"""

import json
from datetime import timedelta
from decimal import Decimal

import pytest
from celery.canvas import Signature
from django.conf import settings as django_settings
from django.db import transaction
from django.utils import timezone
from kombu.utils.json import dumps as kombu_dumps
from kombu.utils.json import loads as kombu_loads

import inventory.tasks  # noqa: F401  (registers the real tasks with the app, as a worker does)
import orders.tasks  # noqa: F401
import reports.tasks  # noqa: F401
from inventory import services as inventory_services
from inventory.exceptions import StockRefused
from inventory.models import Product
from inventory.public import active_units_by_product
from orders import services
from orders.models import CancelledOrder, Order, OrderLine, SweepLease
from orders.saga import compensation_saga, order_saga
from project.celery import app as celery_app
from project.http.errors import Conflict, InvalidInput
from project.saga import SagaAborted
from reports import services as reports_services
from reports.public import units_sold_by_product
from testing import proved

pytestmark = pytest.mark.django_db

PENDING = Order.Status.PENDING
CONFIRMED = Order.Status.CONFIRMED
CANCELLING = Order.Status.CANCELLING
SAGA_STEPS = ["inventory.stock_reserve", "reports.sale_record", "orders.order_confirm"]
COMPENSATION_STEPS = ["reports.sale_revert", "inventory.stock_release", "orders.order_delete"]


def place(user, *lines, key=None):
    """order_create for (product, quantity) pairs; the order itself."""
    placed = services.order_create(
        user=user, lines=[{"product": p.pk, "quantity": q} for p, q in lines], idempotency_key=key
    )
    return placed.order


def chain_of(callback):
    """The one canvas a captured on-commit callback would publish (a partial over it or its apply_async)."""
    candidates = [getattr(callback.func, "__self__", None), *callback.args, *callback.keywords.values()]
    (canvas,) = [c for c in candidates if isinstance(c, Signature)]
    return canvas


def step_names(canvas) -> list[str]:
    return [step.task for step in canvas.tasks]


# --- order_create: validation -------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "field"),
    [
        (None, "lines"),
        ("lines", "lines"),
        ({"product": 1, "quantity": 1}, "lines"),
        ([], "lines"),
        (["a line"], "0"),
        ([{"product": "P", "quantity": 0}], "quantity"),
        ([{"product": "P", "quantity": -1}], "quantity"),
        ([{"product": "P", "quantity": 1.5}], "quantity"),
        ([{"product": "P", "quantity": 2.0}], "quantity"),
        ([{"product": "P", "quantity": "2"}], "quantity"),
        ([{"product": "P", "quantity": True}], "quantity"),
        ([{"product": "P", "quantity": None}], "quantity"),
        ([{"product": "P"}], "quantity"),
        ([{"product": None, "quantity": 1}], "product"),
        ([{"product": "1", "quantity": 1}], "product"),
        ([{"product": True, "quantity": 1}], "product"),
        ([{"product": -1, "quantity": 1}], "product"),
        ([{"product": 2**63, "quantity": 1}], "product"),
        ([{"product": "P", "quantity": 1}, {"product": "P", "quantity": 2}], "product"),
    ],
)
def test_order_create_refuses_bad_lines_and_writes_nothing(user, make_product, lines, field):
    product = make_product(stock=10)

    def resolve(value):
        return product.pk if value == "P" else value

    if isinstance(lines, list):
        lines = [{k: resolve(v) for k, v in line.items()} if isinstance(line, dict) else line for line in lines]

    with pytest.raises(InvalidInput) as refused:
        services.order_create(user=user, lines=lines)

    assert refused.value.fields
    assert field in json.dumps(refused.value.fields)
    assert Order.objects.count() == 0
    assert OrderLine.objects.count() == 0


def test_order_create_refuses_a_quantity_above_the_limit(user, make_product):
    product = make_product(stock=10_000)

    with pytest.raises(InvalidInput) as refused:
        services.order_create(
            user=user, lines=[{"product": product.pk, "quantity": django_settings.ORDER_MAX_QUANTITY + 1}]
        )

    assert "quantity" in refused.value.fields["lines"]["0"]
    assert Order.objects.count() == 0


def test_order_create_refuses_too_many_lines(user):
    lines = [{"product": n, "quantity": 1} for n in range(1, django_settings.ORDER_MAX_LINES + 2)]

    with pytest.raises(InvalidInput) as refused:
        services.order_create(user=user, lines=lines)

    assert "lines" in refused.value.fields
    assert Order.objects.count() == 0


def test_order_create_refuses_unknown_and_inactive_products(user, make_product):
    good, off = make_product(stock=5), make_product(stock=5, active=False)
    missing = good.pk + 1000

    with pytest.raises(InvalidInput) as refused:
        services.order_create(
            user=user,
            lines=[
                {"product": good.pk, "quantity": 1},
                {"product": missing, "quantity": 1},
                {"product": off.pk, "quantity": 1},
            ],
        )

    errors = refused.value.fields["lines"]
    assert set(errors) == {"1", "2"}
    assert "Unknown product" in errors["1"]["product"][0]
    assert "not on sale" in errors["2"]["product"][0]
    assert Order.objects.count() == 0
    assert OrderLine.objects.count() == 0


def test_order_create_refuses_a_bad_idempotency_key(user, make_product):
    product = make_product()
    for key in ("", "k" * 256):
        with pytest.raises(InvalidInput):
            services.order_create(user=user, lines=[{"product": product.pk, "quantity": 1}], idempotency_key=key)
    assert Order.objects.count() == 0


# --- order_create: a valid order -----------------------------------------------


def test_order_create_commits_a_pending_order_with_snapshots_and_dispatches_once(
    user, make_product, django_capture_on_commit_callbacks
):
    a = make_product(stock=5, price="2.50", name="Apple")
    b = make_product(stock=5, price="10.00", name="Banana")

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        placed = services.order_create(
            user=user, lines=[{"product": b.pk, "quantity": 1}, {"product": a.pk, "quantity": 3}]
        )

    assert placed.created
    assert placed.cancelled is None
    order = Order.objects.get(pk=placed.order.pk)
    assert order.status == PENDING
    assert order.user == user
    assert order.dispatch_attempts == 1
    assert order.last_dispatched_at is not None
    lines = [(line.product_id, line.product_name, line.unit_price, line.quantity) for line in order.lines.all()]
    assert lines == [(a.pk, "Apple", Decimal("2.50"), 3), (b.pk, "Banana", Decimal("10.00"), 1)]
    # the order keeps its snapshots when the catalogue changes
    inventory_services.product_update(product_id=a.pk, name="Renamed", price=Decimal("99.00"))
    assert order.lines.get(product_id=a.pk).product_name == "Apple"
    # nothing is reserved until the saga runs
    assert Product.objects.get(pk=a.pk).stock == 5

    assert len(callbacks) == 1
    saga = chain_of(callbacks[0])
    assert step_names(saga) == SAGA_STEPS
    assert all(step.kwargs["order_id"] == order.pk for step in saga.tasks)


def test_order_create_hands_back_the_rows_as_stored(user, make_product):
    """Its two INSERTs (save, bulk_create) read the database's keys back into the rows it returns."""
    products = [make_product(stock=5, price=f"{n}.25", name=f"P{n}") for n in range(1, 5)]

    placed = services.order_create(
        user=user, lines=[{"product": p.pk, "quantity": n} for n, p in enumerate(reversed(products), start=1)]
    )

    order = placed.order
    assert not order._state.adding
    row = Order.objects.get(pk=order.pk)
    assert (row.user, row.status, row.created_at, row.request_fingerprint) == (
        user,
        PENDING,
        order.created_at,
        order.request_fingerprint,
    )
    returned = list(order.lines.all())
    stored = {line.pk: line for line in OrderLine.objects.filter(order=order)}
    assert len(stored) == 4
    for line in returned:
        row = stored[line.pk]
        assert (row.order_id, row.product_id, row.product_name, row.unit_price, row.quantity) == (
            order.pk,
            line.product_id,
            line.product_name,
            line.unit_price,
            line.quantity,
        )


def test_order_create_in_a_rolled_back_transaction_dispatches_nothing(
    user, make_product, django_capture_on_commit_callbacks
):
    product = make_product(stock=5)

    class Boom(Exception):
        pass

    with (
        django_capture_on_commit_callbacks(execute=False) as callbacks,
        pytest.raises(Boom),
        transaction.atomic(),
    ):
        services.order_create(user=user, lines=[{"product": product.pk, "quantity": 1}])
        raise Boom

    assert callbacks == []
    assert Order.objects.count() == 0
    assert OrderLine.objects.count() == 0


def test_idempotency_key_replays_the_same_order(user, make_product, django_capture_on_commit_callbacks):
    product = make_product(stock=5)
    lines = [{"product": product.pk, "quantity": 2}]
    first = services.order_create(user=user, lines=lines, idempotency_key="key-1")

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        again = services.order_create(user=user, lines=list(reversed(lines)), idempotency_key="key-1")

    assert first.created
    assert not again.created
    assert again.order.pk == first.order.pk
    assert Order.objects.count() == 1
    assert callbacks == []


def test_idempotency_key_with_a_different_body_is_a_conflict(user, make_product):
    product = make_product(stock=5)
    services.order_create(user=user, lines=[{"product": product.pk, "quantity": 2}], idempotency_key="key-2")

    with pytest.raises(Conflict):
        services.order_create(user=user, lines=[{"product": product.pk, "quantity": 3}], idempotency_key="key-2")

    assert Order.objects.count() == 1


def test_different_users_may_use_the_same_idempotency_key(user, other_user, make_product):
    product = make_product(stock=5)
    lines = [{"product": product.pk, "quantity": 1}]

    mine = services.order_create(user=user, lines=lines, idempotency_key="shared")
    theirs = services.order_create(user=other_user, lines=lines, idempotency_key="shared")

    assert mine.created and theirs.created
    assert mine.order.pk != theirs.order.pk
    assert Order.objects.count() == 2


def test_idempotency_key_of_a_cancelled_order_replays_the_cancellation(user, make_product):
    product = make_product(stock=5)
    lines = [{"product": product.pk, "quantity": 1}]
    order = services.order_create(user=user, lines=lines, idempotency_key="gone").order
    services.order_compensate(order_id=order.pk, reason="test")
    services.order_delete(order_id=order.pk)

    again = services.order_create(user=user, lines=lines, idempotency_key="gone")

    assert not again.created
    assert again.order is None
    assert again.cancelled.pk == order.pk
    assert Order.objects.count() == 0
    with pytest.raises(Conflict):
        services.order_create(user=user, lines=[{"product": product.pk, "quantity": 2}], idempotency_key="gone")


# --- confirm -------------------------------------------------------------------


def test_order_confirm_confirms_a_pending_order_once(user, make_product):
    order = place(user, (make_product(), 1))

    assert services.order_confirm(order_id=order.pk) == CONFIRMED
    first = Order.objects.get(pk=order.pk)
    assert services.order_confirm(order_id=order.pk) == CONFIRMED

    again = Order.objects.get(pk=order.pk)
    assert again.status == CONFIRMED
    assert again.confirmed_at == first.confirmed_at is not None


def test_order_confirm_on_a_cancelling_or_missing_order_aborts(user, make_product):
    order = place(user, (make_product(), 1))
    services.order_compensate(order_id=order.pk)

    with pytest.raises(SagaAborted):
        services.order_confirm(order_id=order.pk)
    with pytest.raises(SagaAborted):
        services.order_confirm(order_id=order.pk + 1000)

    assert Order.objects.get(pk=order.pk).status == CANCELLING


# --- compensate ----------------------------------------------------------------


def test_order_compensate_marks_a_pending_order_and_publishes_compensation(
    user, make_product, django_capture_on_commit_callbacks
):
    order = place(user, (make_product(), 1))

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        assert services.order_compensate(order_id=order.pk) is True

    assert Order.objects.get(pk=order.pk).status == CANCELLING
    assert len(callbacks) == 1
    compensation = chain_of(callbacks[0])
    assert step_names(compensation) == COMPENSATION_STEPS
    assert all(proved(step.task, step.kwargs) == {"order_id": order.pk} for step in compensation.tasks)


def test_order_compensate_leaves_a_confirmed_order_unless_forced(
    user, make_product, django_capture_on_commit_callbacks
):
    order = place(user, (make_product(), 1))
    services.order_confirm(order_id=order.pk)

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        assert services.order_compensate(order_id=order.pk) is False
    assert callbacks == []
    assert Order.objects.get(pk=order.pk).status == CONFIRMED

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        assert services.order_compensate(order_id=order.pk, reason="staff said so", force=True) is True
    assert len(callbacks) == 1
    order.refresh_from_db()
    assert (order.status, order.cancel_reason) == (CANCELLING, "staff said so")


def test_order_compensate_keeps_the_first_reason(user, make_product):
    order = place(user, (make_product(), 1))

    services.order_compensate(order_id=order.pk, reason="first")
    services.order_compensate(order_id=order.pk, reason="second")

    assert Order.objects.get(pk=order.pk).cancel_reason == "first"


def test_order_compensate_on_a_gone_order_is_a_no_op(user, make_product, django_capture_on_commit_callbacks):
    order = place(user, (make_product(), 1))
    services.order_compensate(order_id=order.pk)
    services.order_delete(order_id=order.pk)

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        assert services.order_compensate(order_id=order.pk) is False
        assert services.order_compensate(order_id=order.pk + 1000) is False

    assert callbacks == []


def test_order_cancel_is_a_forced_compensation_with_the_user_reason(user, make_product):
    order = place(user, (make_product(), 1))
    services.order_confirm(order_id=order.pk)

    assert services.order_cancel(order=Order.objects.get(pk=order.pk), actor=user) is True

    order.refresh_from_db()
    assert (order.status, order.cancel_reason) == (CANCELLING, services.USER_CANCEL_REASON)


def test_order_cancel_by_someone_else_names_them(user, other_user, django_user_model, make_product):
    api_order = place(user, (make_product(), 1))
    admin_order = place(user, (make_product(), 1))
    long_name = django_user_model(username="m" * 200)  # longer than Django's own 150: a custom user model's

    assert services.order_cancel(order=Order.objects.get(pk=api_order.pk), actor=other_user) is True
    assert services.order_cancel(order=Order.objects.get(pk=admin_order.pk), actor=other_user, in_admin=True)

    assert Order.objects.get(pk=api_order.pk).cancel_reason == "cancelled by staff user 'bob'"
    assert Order.objects.get(pk=admin_order.pk).cancel_reason == "cancelled by staff user 'bob' in the admin"
    assert {Order.objects.get(pk=o.pk).cancel_cause for o in (api_order, admin_order)} == {"user"}
    assert services.cancel_reason_for(order=api_order, actor=user, in_admin=True) == services.USER_CANCEL_REASON
    assert services.cancel_reason_for(order=api_order, actor=long_name) == (
        "cancelled by staff user '" + "m" * 149 + "…'"
    )


# --- delete --------------------------------------------------------------------


def test_order_delete_keeps_everything_about_the_order(user, make_product):
    a = make_product(price="2.50", name="Apple")
    b = make_product(price="1.00", name="Bread")
    order = place(user, (a, 3), (b, 1), key="delete-me")
    services.order_compensate(order_id=order.pk, reason="because")

    cancelled = services.order_delete(order_id=order.pk)

    assert isinstance(cancelled, CancelledOrder)
    assert cancelled.pk == order.pk
    assert cancelled.reason == "because"
    assert cancelled.user == user
    assert cancelled.username == "alice"
    assert cancelled.idempotency_key == "delete-me"
    assert cancelled.status_before == "pending"  # what it was when compensation began
    assert cancelled.dispatch_attempts == 1
    assert cancelled.created_at == order.created_at
    assert cancelled.lines == [
        {"product": a.pk, "product_name": "Apple", "unit_price": "2.50", "quantity": 3},
        {"product": b.pk, "product_name": "Bread", "unit_price": "1.00", "quantity": 1},
    ]
    assert not Order.objects.filter(pk=order.pk).exists()
    assert not OrderLine.objects.filter(order_id=order.pk).exists()


def test_order_delete_twice_returns_the_record(user, make_product):
    order = place(user, (make_product(), 1))
    services.order_compensate(order_id=order.pk, reason="once")
    first = services.order_delete(order_id=order.pk)

    again = services.order_delete(order_id=order.pk)

    assert again == first
    assert CancelledOrder.objects.count() == 1
    assert services.order_delete(order_id=order.pk + 1000) is None


@pytest.mark.parametrize("confirm", [False, True])
def test_order_delete_refuses_an_order_that_is_not_cancelling(user, make_product, confirm):
    order = place(user, (make_product(), 2))
    if confirm:
        services.order_confirm(order_id=order.pk)

    with pytest.raises(SagaAborted):
        services.order_delete(order_id=order.pk)

    assert Order.objects.filter(pk=order.pk).exists()
    assert OrderLine.objects.filter(order_id=order.pk).count() == 1
    assert not CancelledOrder.objects.exists()


# --- why an order was cancelled ------------------------------------------------


def compensate_and_delete(order_id: int) -> CancelledOrder:
    """What the compensation chain does, step by step, in-process."""
    services.order_compensate(order_id=order_id)
    reports_services.sale_revert(order_id=order_id)
    inventory_services.stock_release(order_id=order_id)
    return services.order_delete(order_id=order_id)


def reserve(order: Order) -> None:
    inventory_services.stock_reserve(
        order_id=order.pk,
        lines=[{"product": line.product_id, "quantity": line.quantity} for line in order.lines.all()],
    )


def test_reason_is_the_inventory_refusal(user, make_product):
    product = make_product(stock=1)
    order = place(user, (product, 3))
    with pytest.raises(StockRefused):
        reserve(order)

    cancelled = compensate_and_delete(order.pk)

    assert cancelled.reason == f"insufficient stock for product {product.pk}: wanted 3, have 1"
    assert cancelled.refusal == [{"product": product.pk, "code": "insufficient_stock", "wanted": 3, "available": 1}]


def test_reason_asked_for_wins_over_the_steps_reasons(user, make_product):
    product = make_product(stock=1)
    order = place(user, (product, 3))
    with pytest.raises(StockRefused):
        reserve(order)
    services.order_cancel(order=Order.objects.get(pk=order.pk), actor=user)

    cancelled = compensate_and_delete(order.pk)

    assert cancelled.reason == services.USER_CANCEL_REASON
    assert cancelled.refusal == []


def test_reason_is_inventory_note_then_reports_note(user, make_product):
    product = make_product(stock=5)
    noted = place(user, (product, 1))
    inventory_services.stock_failure_note(order_id=noted.pk, reason="inventory gave up")
    reports_services.sale_failure_note(order_id=noted.pk, reason="reports gave up")

    reported = place(user, (product, 1))
    reserve(reported)  # inventory succeeded and recorded no reason
    reports_services.sale_failure_note(order_id=reported.pk, reason="reports gave up")

    assert compensate_and_delete(noted.pk).reason == "inventory gave up"
    assert compensate_and_delete(reported.pk).reason == "reports gave up"
    assert Product.objects.get(pk=product.pk).stock == 5


def test_reason_is_the_orders_note_then_a_fallback(user, make_product):
    product = make_product(stock=5)
    noted = place(user, (product, 1))
    services.order_failure_note(order_id=noted.pk, reason="confirm gave up")
    silent = place(user, (product, 1))

    assert compensate_and_delete(noted.pk).reason == "confirm gave up"
    fallback = compensate_and_delete(silent.pk).reason
    # Unreachable from the saga (every path that compensates gives a reason): what a hand-edited row says.
    assert fallback == "cancelled while pending; no step reported why"


def test_compensation_after_a_full_saga_undoes_every_effect(user, make_product):
    product = make_product(stock=5, price="3.00")
    order = place(user, (product, 2))
    reserve(order)
    line = order.lines.get()
    reports_services.sale_record(
        order_id=order.pk,
        lines=[{"product": product.pk, "quantity": 2, "unit_price": str(line.unit_price), "product_name": "x"}],
    )
    services.order_confirm(order_id=order.pk)
    services.order_cancel(order=Order.objects.get(pk=order.pk), actor=user)

    cancelled = compensate_and_delete(order.pk)

    assert cancelled.reason == services.USER_CANCEL_REASON
    assert cancelled.status_before == "confirmed"  # a user undid a confirmed order
    assert Product.objects.get(pk=product.pk).stock == 5
    assert active_units_by_product().get(product.pk, 0) == 0
    assert units_sold_by_product()[product.pk] == 0


# --- the sweeper ---------------------------------------------------------------


def age(order: Order, seconds: float) -> None:
    Order.objects.filter(pk=order.pk).update(last_dispatched_at=timezone.now() - timedelta(seconds=seconds))


def swept(**done: int) -> dict[str, int]:
    """saga_sweep's counts: `done` and zeros."""
    return {"published": 0, "expired": 0, "redispatched": 0, "recompensated": 0, "deferred": 0, "skipped": 0} | done


def sweep(in_flight=()) -> dict[str, int]:
    """One sweep, however soon after the last one (the lease's time is cleared; what it suspects is kept)."""
    SweepLease.objects.update(started_at=None)
    return services.saga_sweep(in_flight=lambda: None if in_flight is None else set(in_flight))


def test_sweep_resends_a_quiet_order_nothing_holds_and_never_gives_up_on_it(
    user, make_product, settings, django_capture_on_commit_callbacks
):
    """No progress for SAGA_TIMEOUT_SECONDS and held by no queue or worker: lost, so sent again, as often as needed."""
    settings.SAGA_TIMEOUT_SECONDS = 60
    product = make_product()
    stuck = place(user, (product, 1))
    fresh = place(user, (product, 2))

    for attempts in (2, 3, 4, 5):
        age(stuck, 61)
        with django_capture_on_commit_callbacks(execute=False) as callbacks:
            assert sweep() == swept(deferred=1)  # lost at one look: a message in transit is missed by one look
            assert sweep() == swept(redispatched=1)  # and at the next: re-sent
        stuck.refresh_from_db()
        assert (stuck.status, stuck.dispatch_attempts) == (PENDING, attempts)
        assert len(callbacks) == 1
        saga = chain_of(callbacks[0])
        assert step_names(saga) == SAGA_STEPS
        assert saga.tasks[0].kwargs["order_id"] == stuck.pk
    fresh.refresh_from_db()
    assert (fresh.status, fresh.dispatch_attempts) == (PENDING, 1)


def test_sweep_leaves_a_quiet_order_alone_while_a_worker_holds_it_or_a_queue_may(
    user, make_product, settings, django_capture_on_commit_callbacks
):
    settings.SAGA_TIMEOUT_SECONDS = 60
    order = place(user, (make_product(), 1))
    age(order, 600)

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        assert sweep(in_flight={order.pk}) == swept()  # a worker holds it (running, prefetched, retrying)
        assert sweep(in_flight=None) == swept(deferred=1)  # a queue has a backlog, or a worker did not answer
    assert callbacks == []
    assert Order.objects.get(pk=order.pk).dispatch_attempts == 1


def test_sweep_publishes_an_order_whose_publish_failed_at_once(
    user, make_product, settings, django_capture_on_commit_callbacks
):
    settings.SAGA_TIMEOUT_SECONDS = 60
    order = place(user, (make_product(), 1))
    Order.objects.filter(pk=order.pk).update(last_dispatched_at=None)  # what _publish leaves when the broker refused

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        assert sweep(in_flight=None) == swept(published=1)  # certain: it never reached the broker

    assert len(callbacks) == 1
    order.refresh_from_db()
    assert order.dispatch_attempts == 2 and order.last_dispatched_at is not None


def test_sweep_cancels_an_order_at_its_deadline_naming_the_step_it_waited_for(
    user, make_product, settings, django_capture_on_commit_callbacks
):
    settings.ORDER_DEADLINE_SECONDS = 3 * 3600
    product = make_product()
    waiting = place(user, (product, 1))
    reserved = place(user, (product, 1))
    inventory_services.stock_reserve(order_id=reserved.pk, lines=[{"product": product.pk, "quantity": 1}])
    young = place(user, (product, 1))
    Order.objects.filter(pk__in=[waiting.pk, reserved.pk]).update(
        created_at=timezone.now() - timedelta(hours=3, seconds=1)
    )

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        assert sweep(in_flight={waiting.pk, reserved.pk}) == swept(expired=2)  # held or not: the deadline is business

    assert [step_names(chain_of(callback)) for callback in callbacks] == [COMPENSATION_STEPS] * 2
    reasons = dict(Order.objects.filter(status=CANCELLING).values_list("pk", "cancel_reason"))
    assert reasons == {
        waiting.pk: "order deadline passed after 3 h: inventory.stock_reserve did not complete",
        reserved.pk: "order deadline passed after 3 h: reports.sale_record did not complete",
    }
    assert set(Order.objects.filter(status=CANCELLING).values_list("cancel_cause", flat=True)) == {"deadline"}
    assert Order.objects.get(pk=young.pk).status == PENDING


def test_sweeps_closer_than_half_an_interval_run_once(user, make_product, settings):
    """Sweeps queued while the orders worker was away cost one UPDATE each (no `expires`: clocks may disagree)."""
    settings.SAGA_SWEEP_INTERVAL_SECONDS = 60
    assert sweep() == swept()
    assert services.saga_sweep(in_flight=set) == swept(skipped=1)
    SweepLease.objects.update(started_at=timezone.now() - timedelta(seconds=31))
    assert services.saga_sweep(in_flight=set) == swept()


def test_sweep_leaves_recent_and_finished_orders_alone(
    user, make_product, settings, django_capture_on_commit_callbacks
):
    settings.SAGA_TIMEOUT_SECONDS = 60
    product = make_product()
    recent = place(user, (product, 1))
    confirmed = place(user, (product, 1))
    services.order_confirm(order_id=confirmed.pk)
    age(recent, 30)
    age(confirmed, 3600)

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        assert sweep() == swept()

    assert callbacks == []


def test_sweep_republishes_compensation_for_a_stale_cancelling_order(
    user, make_product, settings, django_capture_on_commit_callbacks
):
    settings.SAGA_TIMEOUT_SECONDS = 60
    order = place(user, (make_product(), 1))
    services.order_compensate(order_id=order.pk, reason="stuck in compensation")
    Order.objects.filter(pk=order.pk).update(updated_at=timezone.now() - timedelta(seconds=120))

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        assert sweep(in_flight={order.pk}) == swept()  # its undo is still held somewhere
        assert sweep() == swept(deferred=1)
        assert sweep(in_flight={order.pk}) == swept()  # held again: what was suspected is forgotten
        assert sweep() == swept(deferred=1)
        assert sweep() == swept(recompensated=1)

    assert len(callbacks) == 1
    assert step_names(chain_of(callbacks[0])) == COMPENSATION_STEPS
    order.refresh_from_db()
    assert (order.status, order.cancel_reason) == (CANCELLING, "stuck in compensation")


def test_redispatch_only_touches_pending_orders(user, make_product, django_capture_on_commit_callbacks):
    order = place(user, (make_product(), 1))
    services.order_confirm(order_id=order.pk)

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        assert services.order_redispatch(order_id=order.pk) is False

    assert callbacks == []
    assert Order.objects.get(pk=order.pk).dispatch_attempts == 1


def test_two_overlapping_sweeps_count_one_dispatch(user, make_product, django_capture_on_commit_callbacks):
    """Both sweeps listed the order as stuck; the second finds it dispatched since, under the lock."""
    order = place(user, (make_product(), 1))
    cutoff = timezone.now()
    Order.objects.filter(pk=order.pk).update(last_dispatched_at=cutoff - timedelta(minutes=5))

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        assert services.order_redispatch(order_id=order.pk, dispatched_before=cutoff) is True
        assert services.order_redispatch(order_id=order.pk, dispatched_before=cutoff) is False

    assert len(callbacks) == 1
    assert Order.objects.get(pk=order.pk).dispatch_attempts == 2


# --- the saga's shape (orders/saga.py) ------------------------------------------


def test_order_saga_is_a_chain_of_immutable_steps_with_json_arguments(user, make_product):
    a = make_product(price="2.50", name="Apple")
    b = make_product(price="1.00", name="Bread")
    order = place(user, (a, 3), (b, 1))

    saga = order_saga(order)

    assert step_names(saga) == SAGA_STEPS
    assert all(step.immutable for step in saga.tasks)
    assert all(step.args == () for step in saga.tasks)
    reserve_step, record_step, confirm_step = saga.tasks
    context = {"placed_at": order.created_at.timestamp(), "deadline": order.created_at.timestamp() + 3 * 3600}
    assert proved(reserve_step.task, reserve_step.kwargs) == {
        **context,
        "order_id": order.pk,
        "lines": [{"product": a.pk, "quantity": 3}, {"product": b.pk, "quantity": 1}],
    }
    assert proved(record_step.task, record_step.kwargs) == {
        **context,
        "order_id": order.pk,
        "lines": [
            {"product": a.pk, "quantity": 3, "unit_price": "2.50", "product_name": "Apple"},
            {"product": b.pk, "quantity": 1, "unit_price": "1.00", "product_name": "Bread"},
        ],
    }
    assert proved(confirm_step.task, confirm_step.kwargs) == {**context, "order_id": order.pk}
    for step in saga.tasks:
        assert json.loads(json.dumps(step.kwargs)) == step.kwargs
    # the whole canvas goes through the broker's serializer unchanged
    assert kombu_loads(kombu_dumps(saga)) == json.loads(json.dumps(saga))
    # no queue is forced on the chain: task_routes routes each step (docs/celery.md 9)
    assert "queue" not in saga.options


def test_order_saga_has_no_error_callback_its_steps_compensate_with_the_reason(user, make_product):
    """A failing step publishes orders.order_compensate itself, the reason in the message (project.saga.SagaStep._fail).

    Celery's error callback cannot carry the exception through the broker
    (docs/celery.md 2), and it fired for infrastructure faults too (a
    successor that could not be published: docs/celery.md 17).
    """
    order = place(user, (make_product(), 1))

    saga = order_saga(order)

    assert "link_error" not in saga.options
    assert all("link_error" not in step.options for step in saga.unchain_tasks())


def test_compensation_saga_is_a_chain_of_immutable_undos():
    saga = compensation_saga(42)

    assert step_names(saga) == COMPENSATION_STEPS
    assert all(step.immutable and proved(step.task, step.kwargs) == {"order_id": 42} for step in saga.tasks)
    assert "link_error" not in saga.options


@pytest.mark.parametrize(
    ("name", "queue"),
    [
        ("inventory.stock_reserve", "inventory"),
        ("inventory.stock_release", "inventory.compensation"),
        ("reports.sale_record", "reports"),
        ("reports.sale_revert", "reports.compensation"),
        ("reports.product_sync", "reports"),
        ("orders.order_confirm", "orders"),
        ("orders.order_compensate", "orders.compensation"),
        ("orders.order_delete", "orders.compensation"),
        ("orders.saga_sweep", "orders"),
    ],
)
def test_each_task_routes_to_its_service_queue(name, queue):
    assert name in celery_app.tasks
    route = celery_app.amqp.router.route({}, name)
    assert route["queue"].name == queue
    assert route["routing_key"] == queue


@pytest.mark.django_db(transaction=True)
def test_a_publish_failure_after_commit_keeps_the_order_for_the_sweeper(user, settings, tmp_path, caplog):
    """The broker refuses the saga after the order committed: the caller still gets its order.

    Django logs a failed robust on_commit callback by its __qualname__; a bare
    functools.partial has none, and the AttributeError used to escape as a 500.
    """
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"orders.dispatch": {"action": "transient"}}))  # fails before publishing
    settings.ORDERFLOW_FAULTS_FILE = str(faults)
    product = Product.objects.create(sku="PUB-1", name="Published", price=Decimal("1.00"), stock=3)

    placed = services.order_create(user=user, lines=[{"product": product.pk, "quantity": 1}])

    order = Order.objects.get(pk=placed.order.pk)
    assert order.status == "pending"
    assert order.dispatch_attempts == 1  # the sweeper takes it from here
    assert "Error calling _publish in on_commit()" in caplog.text
    assert "injected transient error in orders.dispatch" in caplog.text


def test_a_sweep_while_the_database_is_away_logs_one_line_and_waits_for_the_next(monkeypatch, caplog):
    from django.db import OperationalError

    from orders import tasks

    def away(**_):
        raise OperationalError("connection refused")

    monkeypatch.setattr(services, "saga_sweep", away)

    assert tasks.saga_sweep.run() is None
    assert "saga sweep skipped: OperationalError: connection refused" in caplog.text
    assert "Traceback" not in caplog.text


def test_a_sweep_that_hits_a_bug_fails_loudly(monkeypatch):
    from orders import tasks

    def bug(**_):
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(services, "saga_sweep", bug)

    with pytest.raises(ZeroDivisionError):
        tasks.saga_sweep.run()


# --- why, as a class: CancelledOrder.cause --------------------------------------------------


@pytest.mark.parametrize(("reason", "cause"), [
    ("cancelled by user", "user"),
    ("cancelled by staff user 'bob' in the admin", "user"),
    ("order deadline passed after 3 h: inventory.stock_reserve did not complete", "deadline"),
    ("reports.sale_record failed: RuntimeError: injected bug in reports.sale_record", "infrastructure"),
    ("insufficient stock for product 7: wanted 3, have 1", "refused"),
    ("product 9 does not exist", "refused"),
])  # fmt: skip
def test_a_reason_without_a_cause_is_classified_by_its_words(reason, cause):
    # A compensation message from a worker of the version before causes carries none.
    assert services.cause_of(reason) == cause


def test_the_cancel_asked_wins_over_a_step_failure_and_each_keeps_its_first_cause(user, make_product):
    order = place(user, (make_product(), 1))

    services.order_compensate(order_id=order.pk, failure="injected failure in reports.sale_record", cause="refused")
    services.order_compensate(order_id=order.pk, failure="reports.sale_record failed: a bug", cause="infrastructure")
    services.order_compensate(order_id=order.pk, reason="order deadline passed after 3 h: …", cause="deadline")
    services.order_compensate(order_id=order.pk, reason="cancelled by user", cause="user")
    kept = Order.objects.get(pk=order.pk)
    cancelled = services.order_delete(order_id=order.pk)

    assert (kept.failure_reason, kept.failure_cause) == ("injected failure in reports.sale_record", "refused")
    assert (kept.cancel_reason, kept.cancel_cause) == ("order deadline passed after 3 h: …", "deadline")
    assert (cancelled.reason, cancelled.cause) == ("order deadline passed after 3 h: …", "deadline")


def test_a_step_failure_alone_gives_its_cause_and_none_at_all_reads_the_refusal(user, make_product):
    failed = place(user, (make_product(), 1))
    silent = place(user, (make_product(), 1))

    services.order_compensate(order_id=failed.pk, failure="reports.sale_record failed: a bug", cause="infrastructure")
    services.order_compensate(order_id=silent.pk)  # the sweeper re-publishing: no reason, no refusal recorded

    assert services.order_delete(order_id=failed.pk).cause == "infrastructure"
    assert services.order_delete(order_id=silent.pk).cause == "infrastructure"
