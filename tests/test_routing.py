"""One worker pool per queue (docs/design.md §4): every task reaches its own service's workers, and only theirs.

The static tests read the Celery app as every process builds it; the
`saga`-marked ones run against the real workers of testing/plugin.py — exactly
one `celery worker` per service queue, each consuming only its queue — so a
task that is missing a route, or registered under the wrong service, fails
here instead of being run by whichever worker happened to share a queue.
"""

import importlib
import re
import uuid

import pytest
from django.conf import settings

from project.celery import app
from testing import wait_for

SERVICES = tuple(settings.SERVICE_QUEUES)


@pytest.fixture(scope="module")
def registered() -> dict[str, object]:
    app.loader.import_default_modules()  # what a worker imports at start (autodiscovery)
    return dict(app.tasks)


def queue_of(task_name: str) -> str:
    return app.amqp.router.route({}, task_name)["queue"].name


def service_queue_of(task_name: str) -> str:
    """The queue a task must land on: its service's, or its service's compensation queue for an undo step."""
    service = task_name.partition(".")[0]
    if task_name in settings.COMPENSATION_TASKS:
        return settings.COMPENSATION_QUEUES[service]
    return service


def test_every_service_task_routes_to_its_own_queue(registered):
    service_tasks = [name for name in registered if name.partition(".")[0] in SERVICES]
    assert service_tasks, "no service task registered: autodiscovery found nothing"
    wrong = {name: queue_of(name) for name in service_tasks if queue_of(name) != service_queue_of(name)}
    assert wrong == {}
    undo = {name for name in service_tasks if queue_of(name).endswith(".compensation")}
    assert undo == {"orders.order_compensate", "orders.order_delete", "reports.sale_revert", "inventory.stock_release"}


def test_every_task_belongs_to_a_service_or_to_celery(registered):
    """An unprefixed task would fall to the default queue and run on the orders workers."""
    strays = [name for name in registered if name.partition(".")[0] not in (*SERVICES, "celery")]
    assert strays == []


@pytest.mark.parametrize("service", SERVICES)
def test_a_services_tasks_module_registers_only_its_own_tasks(registered, service):
    """`inventory/tasks.py` defines `inventory.*` tasks only, so they land on inventory's queue."""
    module = importlib.import_module(f"{service}.tasks")
    defined = [name for name, task in registered.items() if getattr(task, "__module__", None) == module.__name__]
    assert defined, f"{service}.tasks registers no task"
    assert [name for name in defined if not name.startswith(f"{service}.")] == []


def test_the_saga_names_only_registered_tasks(registered, user):
    """Every step and undo the chains publish exists, on the queue of the service it names."""
    from orders.models import Order, OrderLine
    from orders.saga import compensation_saga, order_saga

    order = Order.objects.create(user=user)
    OrderLine.objects.create(order=order, product_id=1, product_name="p", unit_price=1, quantity=1)
    forward = order_saga(order)
    # The compensation a failing step publishes (project.saga.SagaStep._fail) is named by string too.
    names = [step.task for step in forward.tasks] + ["orders.order_compensate"]
    names += [step.task for step in compensation_saga(order.pk).tasks]
    assert set(names) <= set(registered), set(names) - set(registered)
    assert [queue_of(name) for name in names] == [service_queue_of(name) for name in names]


def test_celerys_own_tasks_go_to_a_consumed_queue():
    """docs/celery.md 14: the default queue is one of the three, or Celery's tasks would wait forever."""
    assert settings.CELERY_TASK_DEFAULT_QUEUE in SERVICES
    assert queue_of("celery.chord_unlock") in SERVICES


# --- with the real workers: exactly one per queue ------------------------------------


@pytest.mark.saga
def test_the_saga_runs_with_exactly_one_worker_per_queue(workers, user, make_product):
    from orders import services as order_services
    from orders.models import Order

    def consumed_queues():
        replies = app.control.inspect(timeout=2).active_queues() or {}
        return len(replies) >= len(SERVICES) and {
            worker: sorted(queue["name"] for queue in queues) for worker, queues in replies.items()
        }

    consumed = wait_for(consumed_queues, timeout=30, interval=0.5, what="every worker to answer")
    # Three workers on this broker, each consuming exactly one service queue, a different one,
    # and that service's compensation queue (project/celery.py adds it at start).
    assert sorted(consumed.values()) == [[queue, settings.COMPENSATION_QUEUES[queue]] for queue in sorted(SERVICES)], (
        consumed
    )

    product = make_product(stock=2)
    order_id = order_services.order_create(user=user, lines=[{"product": product.pk, "quantity": 1}]).order.pk

    wait_for(
        lambda: Order.objects.filter(pk=order_id, status=Order.Status.CONFIRMED).exists(),
        what=f"order {order_id} to be confirmed",
    )
    steps = {"inventory": "inventory.stock_reserve", "reports": "reports.sale_record", "orders": "orders.order_confirm"}
    for queue, task in steps.items():
        assert re.search(rf"Task {re.escape(task)}\[[^]]+\] received", workers.log(queue)), queue
        for other in set(steps) - {queue}:
            assert not re.search(rf"Task {re.escape(task)}\[", workers.session_log(other)), (task, other)


@pytest.mark.saga
def test_an_unregistered_task_is_refused_by_the_queues_only_worker(workers):
    """A step name nobody registered (a typo, a task left out of the worker's code) fails loudly."""
    name = f"inventory.no_such_step_{uuid.uuid4().hex[:8]}"
    task_id = str(uuid.uuid4())

    app.send_task(name, kwargs={"order_id": 1}, task_id=task_id)

    wait_for(
        lambda: f"Received unregistered task of type '{name}'" in workers.log("inventory"),
        what="the inventory worker to refuse the task",
    )
    assert task_id not in workers.log("orders")
    assert task_id not in workers.log("reports")
