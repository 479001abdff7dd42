"""Only a service runs its own steps, and only the steps orderflow sent (issue 15, item 4; docs/security.md).

The static tests read the proof of origin and the admission rules as the
workers apply them (project/origin.py, project/admission.py). The `saga`-marked
ones publish misrouted and forged messages to the real workers of
testing/plugin.py (one per service queue, each also consuming its service's
compensation queue) and look at what the workers logged and what the
databases hold afterwards.
"""

import re
import time
import uuid

import pytest
from django.conf import settings
from django.test import override_settings

from inventory import services as inventory_services
from inventory.models import OrderReservation, Product, StockReservation
from ops.audit import audit
from orders import services as order_services
from orders.models import CancelledOrder, Order
from orders.saga import compensation_saga, order_saga
from project import admission, origin
from project.celery import app
from reports.models import ProductReport, ReportedOrder
from testing import wait_for

ALL_QUEUES = (*settings.SERVICE_QUEUES, *settings.COMPENSATION_QUEUES.values())
STEP = "inventory.stock_reserve"
STEP_KWARGS = {"order_id": 7, "lines": [{"product": 3, "quantity": 2}], "placed_at": 1.5, "deadline": 10801.5}


# --- the proof (project/origin.py) -----------------------------------------------------------


def test_a_signed_message_holds_and_a_retry_keeps_its_proof():
    kwargs = origin.signed_kwargs(STEP, kwargs=STEP_KWARGS)

    assert origin.refusal(STEP, [], kwargs) is None
    # What the broker hands the worker: JSON, keys in another order, plus a retry's last_error.
    received = {**dict(reversed(list(kwargs.items()))), "last_error": "OperationalError: gone"}
    assert origin.refusal(STEP, [], received) is None


@pytest.mark.parametrize(
    ("name", "args", "change"),
    [
        ("inventory.stock_release", [], {}),  # another task
        (STEP, [7], {}),  # another positional argument
        (STEP, [], {"order_id": 8}),  # another order
        (STEP, [], {"lines": [{"product": 3, "quantity": 200}]}),  # more units
        (STEP, [], {"deadline": 99999.5}),  # a later deadline
        (STEP, [], {"force": True}),  # an argument added
    ],
)
def test_a_proof_covers_the_task_and_every_argument(name, args, change):
    kwargs = {**origin.signed_kwargs(STEP, kwargs=STEP_KWARGS), **change}

    assert origin.refusal(name, args, kwargs) == "a proof of origin that does not match the message"


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        (STEP_KWARGS, "no proof of origin"),
        ({**STEP_KWARGS, "proof": 1}, "a proof of origin that is not a string"),
        ({**STEP_KWARGS, "proof": "0" * 64}, "a proof of origin that does not match the message"),
        ({**STEP_KWARGS, "proof": "x", "lines": float("nan")}, "arguments that are not plain JSON"),
    ],
)
def test_a_message_without_a_valid_proof_is_refused(kwargs, reason):
    assert origin.refusal(STEP, [], kwargs) == reason


def test_the_proof_is_keyed_by_secret_key_and_survives_its_rotation():
    signed = origin.signed_kwargs(STEP, kwargs=STEP_KWARGS)
    old_key = settings.SECRET_KEY

    with override_settings(SECRET_KEY="another-key-" * 5):
        assert origin.refusal(STEP, [], signed) == "a proof of origin that does not match the message"
        assert origin.signed_kwargs(STEP, kwargs=STEP_KWARGS)["proof"] != signed["proof"]
    # Django's rotation: the old key listed in SECRET_KEY_FALLBACKS still verifies.
    with override_settings(SECRET_KEY="another-key-" * 5, SECRET_KEY_FALLBACKS=[old_key]):
        assert origin.refusal(STEP, [], signed) is None


@pytest.mark.django_db
def test_the_sagas_orders_sends_are_signed_step_by_step(user, make_product):
    product = make_product(stock=5)
    order = order_services.order_create(user=user, lines=[{"product": product.pk, "quantity": 2}]).order

    steps = [*order_saga(order).tasks, *compensation_saga(order.pk).tasks]

    assert [origin.refusal(step.task, list(step.args), dict(step.kwargs)) for step in steps] == [None] * len(steps)


def test_every_task_that_changes_a_services_data_requires_proof_of_origin():
    """Left out: the sweeper (beat sends it; a forged one is one more idempotent sweep), the benchmark's floor."""
    app.loader.import_default_modules()
    unproved = {
        name for name, task in app.tasks.items() if not getattr(task, "requires_origin", False) and "." in name
    }  # fmt: skip
    unproved -= {name for name in unproved if name.startswith("celery.")}  # refused on every worker (below)

    assert unproved - {"inventory.bench_floor", "reports.bench_floor", "orders.bench_floor"} == {"orders.saga_sweep"}


# --- the admission rules (project/admission.py) ------------------------------------------------


def _owner(queue: str) -> str:
    return admission.queue_owners()[queue]


FOREIGN = [(queue, service) for queue in ALL_QUEUES for service in settings.SERVICE_QUEUES if service != _owner(queue)]


@pytest.mark.parametrize(("queue", "service"), FOREIGN)
def test_a_worker_refuses_another_services_task_even_on_its_own_queue(queue, service):
    app.loader.import_default_modules()
    task = app.tasks[f"{service}.saga_sweep" if service == "orders" else f"{service}.bench_floor"]
    served = admission.worker_services([_owner(queue), settings.COMPENSATION_QUEUES[_owner(queue)]])

    reason = admission.refusal(task, task.name, queue=queue, services=served, args=[], kwargs={})

    assert reason == f"a task of the {service} service, on a worker of {_owner(queue)}"
    # A worker that runs both services still refuses a task that arrived on the other's queue.
    both = frozenset({service, _owner(queue)})
    assert admission.refusal(task, task.name, queue=queue, services=both, args=[], kwargs={}) == (
        f"a task of the {service} service, on a queue of the {_owner(queue)} service"
    )
    assert admission.refusal(task, task.name, queue=service, services=both, args=[], kwargs={}) is None


@pytest.mark.parametrize("name", ["celery.group", "celery.map", "celery.starmap", "celery.chunks", "celery.chain"])
def test_celerys_canvas_tasks_run_nowhere(name):
    """orderflow never sends them as messages; celery.map would run any task inline, wherever it arrived."""
    app.loader.import_default_modules()
    every = frozenset(settings.SERVICE_QUEUES)

    assert admission.refusal(app.tasks[name], name, queue="orders", services=every, args=[], kwargs={}) == (
        "a task of no orderflow service"
    )
    assert admission.task_service("celery.backend_cleanup") == "orders"  # beat's daily no-op, on the default queue


def test_worker_services_come_from_the_queues_or_the_setting(settings):
    assert admission.worker_services(["inventory", "inventory.compensation"]) == {"inventory"}
    assert admission.worker_services(["logtest-1"]) == frozenset()
    settings.WORKER_SERVICES = ["orders"]
    assert admission.worker_services(["logtest-1"]) == {"orders"}


def test_what_a_forger_writes_in_the_headers_stays_on_one_log_line():
    assert admission._printable("gen42@web-1") == "gen42@web-1"
    assert admission._printable("x\nERROR orderflow: fake line") == repr("x\nERROR orderflow: fake line")
    assert len(admission._printable("a" * 10_000)) == 100


# --- with the real workers ----------------------------------------------------------------------


def refusals(workers, queue: str, task_id: str) -> list[str]:
    return re.findall(rf"refused \S+\[{re.escape(task_id)}\] .*", workers.log(queue))


def wait_refused(workers, queue: str, task_id: str) -> str:
    return wait_for(lambda: refusals(workers, queue, task_id), timeout=30, what=f"{task_id} refused by {queue}")[0]


def queued(queue: str) -> int:
    with app.connection_for_write() as connection:
        return connection.default_channel.queue_declare(queue=queue, passive=True).message_count


def confirmed_order(user, product, quantity: int = 2) -> int:
    order_id = order_services.order_create(user=user, lines=[{"product": product.pk, "quantity": quantity}]).order.pk
    wait_for(lambda: Order.objects.filter(pk=order_id, status="confirmed").exists(), what=f"order {order_id} confirmed")
    return order_id


# A foreign task with an effect that shows: what each would undo of a confirmed order.
UNDO = {
    "orders": ("orders.order_compensate", lambda order_id: ([order_id], {"force": True, "reason": "forged"})),
    "inventory": ("inventory.stock_release", lambda order_id: ([], {"order_id": order_id})),
    "reports": ("reports.sale_revert", lambda order_id: ([], {"order_id": order_id})),
}


@pytest.mark.saga
@pytest.mark.timeout(120)
@pytest.mark.parametrize(("queue", "service"), FOREIGN)
def test_another_services_step_published_to_a_queue_is_refused_not_run_not_requeued(
    workers, user, make_product, queue, service
):
    product = make_product(stock=5)
    order_id = confirmed_order(user, product)
    name, arguments = UNDO[service]
    args, kwargs = arguments(order_id)
    # A genuine proof: the only thing wrong with this message is where it was sent.
    kwargs = origin.signed_kwargs(name, args, kwargs)
    task_id = str(uuid.uuid4())

    app.send_task(name, args=args, kwargs=kwargs, task_id=task_id, queue=queue, routing_key=queue)

    line = wait_refused(workers, _owner(queue), task_id)
    assert f"refused {name}[{task_id}] from queue {queue}" in line
    assert f"a task of the {service} service, on a worker of {_owner(queue)}" in line
    assert re.search(rf"ERROR .*orderflow\.admission: refused {re.escape(name)}", workers.log(_owner(queue)))
    time.sleep(1.5)  # a requeued message would be delivered again at once (and refused again)
    assert len(refusals(workers, _owner(queue), task_id)) == 1
    assert queued(queue) == 0
    for other in settings.SERVICE_QUEUES:  # not run, not even received as a task, anywhere
        assert f"[{task_id}] received" not in workers.log(other), other
    assert Order.objects.get(pk=order_id).status == "confirmed"
    assert Product.objects.get(pk=product.pk).stock == 3
    assert StockReservation.objects.filter(order_id=order_id, released_at=None).count() == 1
    assert ReportedOrder.objects.get(order_id=order_id).status == "recorded"
    assert ProductReport.objects.get(product_id=product.pk).units_sold == 2
    assert audit() == []


def _forged_reserve(order_id: int, product_id: int) -> dict[str, dict]:
    lines = [{"product": product_id, "quantity": 2}]
    genuine = origin.signed_kwargs(STEP, kwargs={"order_id": 1, "lines": lines})
    with override_settings(SECRET_KEY="not-orderflows-key-" * 3):
        other_key = origin.signed_kwargs(STEP, kwargs={"order_id": order_id, "lines": lines})
    return {
        "no proof": {"order_id": order_id, "lines": lines},
        "another key's proof": other_key,
        "another order's proof": {**genuine, "order_id": order_id},
        "a proof for fewer units": {
            **origin.signed_kwargs(
                STEP, kwargs={"order_id": order_id, "lines": [{"product": product_id, "quantity": 1}]}
            ),
            "lines": lines,
        },
    }


@pytest.mark.saga
@pytest.mark.parametrize(
    "forgery", ["no proof", "another key's proof", "another order's proof", "a proof for fewer units"]
)
def test_a_forged_stock_reserve_for_an_order_nobody_placed_holds_nothing(workers, make_product, forgery):
    product = make_product(stock=5)
    order_id = 424242
    task_id = str(uuid.uuid4())

    app.send_task(STEP, kwargs=_forged_reserve(order_id, product.pk)[forgery], task_id=task_id)

    line = wait_refused(workers, "inventory", task_id)
    assert "proof of origin" in line
    time.sleep(1)
    assert len(refusals(workers, "inventory", task_id)) == 1
    assert queued("inventory") == 0
    assert Product.objects.get(pk=product.pk).stock == 5
    assert not OrderReservation.objects.filter(order_id=order_id).exists()
    assert not StockReservation.objects.filter(order_id=order_id).exists()
    assert audit() == []


@pytest.mark.saga
def test_a_forged_message_in_celerys_older_protocol_is_refused_too(workers, user, make_product):
    """Protocol 1 carries the task name, id and arguments in the body; workers still take it (proto1_to_proto2)."""
    product = make_product(stock=5)
    order_id = confirmed_order(user, product)
    task_id = str(uuid.uuid4())
    body = {"task": "inventory.stock_release", "id": task_id, "args": [], "kwargs": {"order_id": order_id}}

    # The exchange the queue is bound to: the default queue's direct one, or on quorum queues the topic one.
    exchange = app.amqp.queues["inventory.compensation"].exchange.name
    with app.producer_or_acquire() as producer:
        producer.publish(body, exchange=exchange, routing_key="inventory.compensation",
                         serializer="json", delivery_mode=2)  # fmt: skip

    line = wait_refused(workers, "inventory", task_id)
    assert "refused inventory.stock_release" in line and "no proof of origin" in line
    time.sleep(1)
    assert len(refusals(workers, "inventory", task_id)) == 1
    assert Product.objects.get(pk=product.pk).stock == 3
    assert StockReservation.objects.filter(order_id=order_id, released_at=None).count() == 1


@pytest.mark.saga
def test_flowers_async_apply_of_a_forced_compensation_is_refused(workers, user, make_product):
    """What Flower's POST /api/task/async-apply/orders.order_compensate publishes: Task.apply_async, no proof."""
    product = make_product(stock=5)
    order_id = confirmed_order(user, product)
    task_id = str(uuid.uuid4())
    app.loader.import_default_modules()  # Flower's app registers every task, as a worker's does

    app.tasks["orders.order_compensate"].apply_async(args=[order_id], kwargs={"force": True}, task_id=task_id)

    line = wait_refused(workers, "orders", task_id)
    assert "from queue orders.compensation" in line and "no proof of origin" in line
    time.sleep(1)
    assert Order.objects.get(pk=order_id).status == "confirmed"
    assert Product.objects.get(pk=product.pk).stock == 3


@pytest.mark.saga
@pytest.mark.timeout(120)
def test_what_orderflow_sends_itself_runs_everywhere_with_nothing_refused(workers, user, make_product):
    """The saga, a refusal's compensation (published by inventory), a user's cancel, a product event."""
    product = make_product(stock=3, name="Lamp")
    confirmed = confirmed_order(user, product, quantity=2)
    refused = order_services.order_create(user=user, lines=[{"product": product.pk, "quantity": 5}]).order.pk
    cancelled = confirmed_order(user, product, quantity=1)
    order_services.order_cancel(order=Order.objects.get(pk=cancelled), actor=user)
    inventory_services.product_update(product_id=product.pk, name="Desk lamp")

    wait_for(lambda: CancelledOrder.objects.filter(pk__in=[refused, cancelled]).count() == 2, what="both cancelled")
    renamed = ProductReport.objects.filter(product_id=product.pk, product_name="Desk lamp")
    wait_for(renamed.exists, what="the product's new name in reports")

    assert Order.objects.get(pk=confirmed).status == "confirmed"
    assert Product.objects.get(pk=product.pk).stock == 1
    for queue in settings.SERVICE_QUEUES:
        assert "orderflow.admission: refused" not in workers.log(queue), workers.log(queue)[-2000:]
        assert f"this worker runs the tasks of: {queue}" in workers.session_log(queue)
    assert audit() == []


@pytest.mark.saga
@pytest.mark.timeout(120)
def test_an_unsigned_saga_from_before_the_upgrade_is_refused_and_the_sweeper_sends_it_again(
    sweeper, user, make_product
):
    """In-flight messages sent before steps carried proofs: refused, and their order re-sent (signed) by the sweeper."""
    product = make_product(stock=5)
    sweeper.stop("inventory", warm=True)
    order = order_services.order_create(user=user, lines=[{"product": product.pk, "quantity": 2}]).order
    with app.connection_for_write() as connection:  # the signed saga this version sent: gone
        connection.default_channel.queue_purge("inventory")
    saga = order_saga(order)
    for step in saga.tasks:
        del step.kwargs[origin.PROOF]  # what the previous version sent
    saga.apply_async()

    sweeper.restart("inventory")

    wait_for(lambda: re.search(r"refused inventory\.stock_reserve\[[^]]+\] .*no proof", sweeper.log("inventory")))
    wait_for(
        lambda: Order.objects.filter(pk=order.pk, status="confirmed").exists(),
        timeout=60,
        what="the sweeper to send the saga again",
    )
    assert re.search(rf"order {order.pk} re-dispatched", sweeper.log("orders"))
    assert Order.objects.get(pk=order.pk).dispatch_attempts == 2
    assert Product.objects.get(pk=product.pk).stock == 3
    assert audit() == []
