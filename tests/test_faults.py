"""Nothing lost, nothing oversold, when things break (docs/design.md §3), with real processes.

Workers are killed with SIGKILL mid-step, the broker and the database are
stopped or cut off while orders flow, a process dies between commit and
publish. Each scenario ends with every order terminal (confirmed, or deleted
with a CancelledOrder) and the consistency audit clean. Tests that stop
RabbitMQ or PostgreSQL stop a node or cluster of their own (testing/instances.py,
the `drill_stack` fixture), never the machine's shared ones.
"""

import re
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from django.conf import settings
from django.db import InterfaceError, OperationalError, connections, transaction

from inventory.models import Product
from ops.audit import audit
from orders import services as order_services
from orders.models import CancelledOrder, Order
from project.celery import app as celery_app
from reports.models import ProductReport
from testing import BASE_DIR, SWEEP_TIMEOUT_SECONDS, wait_for

pytestmark = [pytest.mark.saga, pytest.mark.faults, pytest.mark.timeout(300)]

ON_POSTGRES = settings.DATABASES["default"]["ENGINE"].endswith("postgresql")
# Long enough for the sweeper to re-send a lost order a few times.
END_WITHIN = SWEEP_TIMEOUT_SECONDS * 4 + 60


def _retrying(query):
    """Run a read, reconnecting while the database is being disrupted."""
    for _ in range(200):
        try:
            return query()
        except (OperationalError, InterfaceError):
            connections.close_all()
            time.sleep(0.1)
    return query()


def terminal(order_id: int) -> str | None:
    def read():
        if CancelledOrder.objects.filter(pk=order_id).exists():
            return "cancelled"
        status = Order.objects.filter(pk=order_id).values_list("status", flat=True).first()
        return status if status == Order.Status.CONFIRMED else None

    return _retrying(read)


def wait_terminal(order_ids, timeout: float = END_WITHIN) -> dict[int, str]:
    def all_done():
        states = {order_id: terminal(order_id) for order_id in order_ids}
        return states if all(states.values()) else None

    return wait_for(all_done, timeout=timeout, interval=0.2, what=f"{len(order_ids)} orders to finish")


def assert_consistent():
    violations = _retrying(audit)
    assert violations == [], violations


def place(user, lines, key: str | None = None) -> int:
    """Place an order like a careful client: retry on errors with the same Idempotency-Key."""
    key = key or str(uuid.uuid4())
    for _ in range(300):
        try:
            return order_services.order_create(
                user=user, lines=[{"product": p.pk, "quantity": q} for p, q in lines], idempotency_key=key
            ).order.pk
        except (OperationalError, InterfaceError):
            connections.close_all()
            time.sleep(0.1)
    pytest.fail("could not place an order for 30 s")


class Stream:
    """Orders placed from a background thread while a test breaks something."""

    def __init__(self, user, products, count: int, interval: float = 0.05) -> None:
        self.ids: list[int] = []
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(user, products, count, interval), daemon=True)

    def _run(self, user, products, count, interval):
        try:
            for i in range(count):
                product = products[i % len(products)]
                lines = [(product, 1 + i % 2)]
                if i % 4 == 0 and len(products) > 1:
                    lines.append((products[(i + 1) % len(products)], 1))
                self.ids.append(place(user, lines))
                time.sleep(interval)
        except BaseException as exc:  # reported by join()
            self.errors.append(exc)
        finally:
            connections.close_all()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.join()

    def join(self) -> list[int]:
        self._thread.join(timeout=120)
        assert not self._thread.is_alive(), "the order stream did not finish"
        assert not self.errors, self.errors
        return self.ids


def check_books(products, order_ids, initial: dict[int, int]):
    """Stock + units of confirmed orders == initial stock; reports agree; nothing negative."""
    states = wait_terminal(order_ids)
    assert_consistent()
    for product in products:
        product_row = _retrying(lambda p=product: Product.objects.get(pk=p.pk))
        sold = _retrying(lambda p=product: ProductReport.objects.get(product_id=p.pk).units_sold)
        assert product_row.stock >= 0
        assert product_row.stock + sold == initial[product.pk], (product.pk, product_row.stock, sold)
    return states


@pytest.fixture
def goods(make_product):
    products = [make_product(stock=12), make_product(stock=6), make_product(stock=30)]
    wait_for(lambda: ProductReport.objects.filter(product_id__in=[p.pk for p in products]).count() == 3)
    return products


def initial_stock(products) -> dict[int, int]:
    return {p.pk: p.stock for p in products}


# --- workers killed ------------------------------------------------------------

STEP_QUEUES = {
    "inventory.stock_reserve": "inventory",
    "reports.sale_record": "reports",
    "orders.order_confirm": "orders",
    "reports.sale_revert": "reports",
    "inventory.stock_release": "inventory",
    "orders.order_delete": "orders",
}
COMPENSATION_STEPS = {"reports.sale_revert", "inventory.stock_release", "orders.order_delete"}


@pytest.mark.parametrize("moment", ["", ":after"], ids=["before-commit", "after-commit"])
@pytest.mark.parametrize("step", list(STEP_QUEUES))
def test_pool_process_killed_mid_step(sweeper, user, make_product, step, moment):
    """kill -9 of the process running a step: the message is redelivered, the step is idempotent."""
    queue = STEP_QUEUES[step]
    product = make_product(stock=3)
    wait_for(lambda: ProductReport.objects.filter(product_id=product.pk).exists())
    sweeper.set_faults({f"{step}{moment}": {"action": "sleep", "seconds": 30, "times": 1}})
    # A compensation step runs only for an order that fails: ask for too much.
    quantity = 5 if step in COMPENSATION_STEPS else 2

    order_id = place(user, [(product, quantity)])
    killed = sweeper.kill_sleeper(f"{step}{moment}", order_id)

    expected = "cancelled" if step in COMPENSATION_STEPS else "confirmed"
    assert wait_terminal([order_id]) == {order_id: expected}
    # (After a commit the order may end before the pool notices its lost process.)
    wait_for(lambda: f"pid:{killed} exited with 'signal 9 (SIGKILL)'" in sweeper.log(queue), what="the kill")
    assert Product.objects.get(pk=product.pk).stock == (3 if expected == "cancelled" else 1)
    assert_consistent()


def test_step_that_always_kills_its_worker_is_retried_until_the_order_deadline(workers, user, make_product, settings):
    """A lost worker is infrastructure: retried with backoff (docs/celery.md 6) until the order's deadline."""
    settings.ORDER_DEADLINE_SECONDS = 8  # carried in the messages this process publishes
    product = make_product(stock=3)
    workers.set_faults({"reports.sale_record": {"action": "exit"}})

    order_id = place(user, [(product, 1)])

    assert wait_terminal([order_id]) == {order_id: "cancelled"}
    reason = CancelledOrder.objects.get(pk=order_id).reason
    assert reason == (
        "order deadline passed after 8 s: reports.sale_record could not complete (its worker process was lost)"
    )
    assert len(re.findall(r"Process .* exited with 'exitcode 1'", workers.log("reports"))) >= 2
    assert Product.objects.get(pk=product.pk).stock == 3
    assert_consistent()


def test_a_bug_in_a_step_cancels_the_order_naming_it(workers, user, make_product):
    """A fault of the code is not retried: the order is compensated at once, and the reason says what failed."""
    product = make_product(stock=3)
    workers.set_faults({"reports.sale_record": {"action": "bug"}})

    order_id = place(user, [(product, 1)])

    assert wait_terminal([order_id]) == {order_id: "cancelled"}
    cancelled = CancelledOrder.objects.get(pk=order_id)
    assert cancelled.reason == "reports.sale_record failed: RuntimeError: injected bug in reports.sale_record"
    assert cancelled.cause == "infrastructure"  # a fault, not a refusal: what alerts watch (docs/design.md)
    assert Product.objects.get(pk=product.pk).stock == 3
    assert_consistent()


@pytest.mark.parametrize(
    ("soft", "hard", "blocked", "logged"),
    [
        (2, 30, False, "Soft time limit (2s) exceeded"),
        # Blocked where the soft limit cannot interrupt it (a lock wait in C): the hard limit kills the process.
        (2, 4, True, "Hard time limit (4s) exceeded"),
    ],
    ids=["soft", "hard"],
)
def test_a_step_blocked_past_its_time_limit_runs_again(
    workers, user, make_product, monkeypatch, soft, hard, blocked, logged
):
    """Blocked past a time limit is infrastructure: the step runs again (a retry, or the message put back).

    A message carries the time limits of the process that published it, and
    the worker obeys them (docs/celery.md 19): this process publishes the
    step, so its task's limits are the ones set here.
    """
    celery_app.loader.import_default_modules()  # register the tasks in this process, as a worker does
    task = celery_app.tasks["inventory.stock_reserve"]
    monkeypatch.setattr(task, "soft_time_limit", soft)
    monkeypatch.setattr(task, "time_limit", hard)
    monkeypatch.setattr(task, "_exec_options", None)  # Celery caches the options it stamps on messages
    product = make_product(stock=3)
    workers.set_faults({"inventory.stock_reserve": {"action": "sleep", "seconds": 8, "times": 1, "blocked": blocked}})

    order_id = place(user, [(product, 1)])

    assert wait_terminal([order_id]) == {order_id: "confirmed"}
    assert logged in workers.log("inventory")
    assert Product.objects.get(pk=product.pk).stock == 2
    assert_consistent()


@pytest.mark.skipif(not ON_POSTGRES, reason="row locks: PostgreSQL only (SQLite serializes writers instead)")
def test_a_step_waiting_on_a_row_lock_retries_instead_of_blocking_until_killed(workers, user, make_product):
    """lock_timeout ends the wait (SQLSTATE 55P03, retried with backoff): the soft limit could not interrupt libpq."""
    product = make_product(stock=3)
    locked, release = threading.Event(), threading.Event()

    def hold_the_row():
        try:
            with transaction.atomic():
                Product.objects.select_for_update().get(pk=product.pk)
                locked.set()
                release.wait(30)
        finally:
            connections.close_all()

    holder = threading.Thread(target=hold_the_row, daemon=True)
    holder.start()
    assert locked.wait(10)
    try:
        order_id = place(user, [(product, 1)])
        wait_for(
            lambda: re.search(rf"inventory\.stock_reserve for order {order_id} hit OperationalError: "
                              r"canceling statement due to lock timeout", workers.log("inventory")),
            timeout=30, what="the lock wait to end in a retry",
        )  # fmt: skip
    finally:
        release.set()
        holder.join(10)

    assert wait_terminal([order_id]) == {order_id: "confirmed"}
    assert Product.objects.get(pk=product.pk).stock == 2
    assert_consistent()


def test_whole_worker_killed_mid_step_then_restarted(sweeper, user, goods):
    """kill -9 of the main process too: RabbitMQ redelivers; the file broker loses it, the sweeper re-dispatches."""
    initial = initial_stock(goods)
    sweeper.set_faults({"inventory.stock_reserve": {"action": "sleep", "seconds": 30, "times": 1}})

    order_id = place(user, [(goods[0], 2)])
    wait_for(
        lambda: Path(f"{sweeper.faults_file}.inventory.stock_reserve.{order_id}.count").exists(),
        what="the reserve step to start",
    )
    sweeper.kill("inventory")
    sweeper.clear_faults()
    with Stream(user, goods, 10) as stream:
        time.sleep(1)
        sweeper.restart("inventory")
    states = check_books(goods, [order_id, *stream.ids], initial)
    assert states[order_id] == "confirmed"


# --- broker and database outages ---------------------------------------------------


def stream_lines(products: list[int]):
    """Order i of a stream: like `Stream`'s, one or two units, every fourth order with a second product."""

    def lines(i: int) -> list[tuple[int, int]]:
        order = [(products[i % len(products)], 1 + i % 2)]
        if i % 4 == 0:
            order.append((products[(i + 1) % len(products)], 1))
        return order

    return lines


def assert_accepted(replies, n: int) -> None:
    """Each of `n` careful clients' orders was placed once: 202, or 410 where an answer was lost after the commit
    and the same Idempotency-Key, sent again, found the order already cancelled by a refusal (its record).
    A refusal is the only cancellation a drill on plentiful infrastructure may see: `assert_refusals_only`."""
    assert len(replies) == n
    for reply in replies:
        assert reply.status == 202 or (reply.status == 410 and reply.body["reason"].startswith("insufficient stock")), (
            reply,
            replies,
        )


def assert_refusals_only(stack) -> None:
    """Every cancelled order was refused for stock: no fault of the broker or database decided an outcome."""
    reasons = stack.cancelled_reasons()
    assert all(reason.startswith("insufficient stock") for reason in reasons.values()), reasons


def stack_goods(stack) -> dict[int, int]:
    """`goods`' three products, made through the stack's API: {id: initial stock}."""
    return {stack.create_product(stock=stock): stock for stock in (12, 6, 30)}


def test_rabbitmq_restarted_while_orders_flow(drill_stack, rabbitmq_node):
    """A private RabbitMQ node stops and starts its broker while HTTP clients place 30 orders."""
    stack = drill_stack()
    initial = stack_goods(stack)
    with ThreadPoolExecutor(1) as client:
        # A careful client: no answer or a 5xx is sent again, with the same Idempotency-Key.
        placing = client.submit(
            stack.place_orders, 30, lines=stream_lines(list(initial)), threads=1, interval=0.1, attempts=100
        )
        time.sleep(1)
        rabbitmq_node.ctl("stop_app")
        time.sleep(3)
        rabbitmq_node.ctl("start_app")
        replies = placing.result(timeout=240)
    assert_accepted(replies, 30)
    states = stack.wait_terminal(stack.order_ids(replies), timeout=END_WITHIN)
    assert len(states) == 30
    assert_refusals_only(stack)
    stack.check_books(initial)


def test_postgres_connections_killed_while_orders_flow(drill_stack, postgres_cluster):
    """Every session of a private PostgreSQL cluster is terminated six times while HTTP clients place 40 orders."""
    stack = drill_stack()
    initial = stack_goods(stack)
    killed = 0
    with ThreadPoolExecutor(1) as client:
        placing = client.submit(
            stack.place_orders, 40, lines=stream_lines(list(initial)), threads=1, interval=0.05, attempts=100
        )
        for _ in range(6):
            time.sleep(0.3)
            killed += postgres_cluster.terminate_backends()
        replies = placing.result(timeout=240)
    assert killed > 0
    assert_accepted(replies, 40)
    states = stack.wait_terminal(stack.order_ids(replies), timeout=END_WITHIN)
    assert len(states) == 40
    assert_refusals_only(stack)
    stack.check_books(initial)


def test_postgres_restarted_while_orders_flow(drill_stack, postgres_cluster):
    """A private PostgreSQL cluster restarts (fast shutdown) while HTTP clients place 30 orders."""
    stack = drill_stack()
    initial = stack_goods(stack)
    with ThreadPoolExecutor(1) as client:
        placing = client.submit(
            stack.place_orders, 30, lines=stream_lines(list(initial)), threads=1, interval=0.1, attempts=100
        )
        time.sleep(1)
        postgres_cluster.restart()
        replies = placing.result(timeout=240)
    assert_accepted(replies, 30)
    states = stack.wait_terminal(stack.order_ids(replies), timeout=END_WITHIN)
    assert len(states) == 30
    assert_refusals_only(stack)
    stack.check_books(initial)


# --- crash between commit and publish ---------------------------------------------------

CRASHING_CLIENT = """
import django, sys
django.setup()
from django.contrib.auth import get_user_model
from orders.services import order_create
user = get_user_model().objects.get(pk=int(sys.argv[1]))
order = order_create(user=user, lines=[{"product": int(sys.argv[2]), "quantity": 1}]).order
print("unreachable: the process should have died after commit", order.pk)
"""


def test_process_dies_after_commit_before_publish(sweeper, user, make_product):
    """The order row is the outbox record: the sweeper publishes what the dead process could not."""
    product = make_product(stock=2)
    sweeper.set_faults({"orders.dispatch": {"action": "exit"}})
    env = sweeper.env() | {"DJANGO_SETTINGS_MODULE": "project.settings"}

    result = subprocess.run(
        [sys.executable, "-c", CRASHING_CLIENT, str(user.pk), str(product.pk)],
        cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip

    assert result.returncode == 1, result.stdout + result.stderr
    assert "unreachable" not in result.stdout
    order = Order.objects.get(user=user)
    assert order.status == "pending"  # committed, never published
    sweeper.clear_faults()
    assert wait_terminal([order.pk]) == {order.pk: "confirmed"}
    order.refresh_from_db()
    assert order.dispatch_attempts == 2  # the sweeper's dispatch
    assert re.search(rf"order {order.pk} re-dispatched", sweeper.log("orders"))
    assert_consistent()


def test_a_queued_saga_is_not_resent_and_only_its_deadline_cancels_it(sweeper, user, make_product, settings):
    """Inventory has no worker: its step waits in the queue; the sweeper sees it queued and re-sends nothing."""
    settings.ORDER_DEADLINE_SECONDS = SWEEP_TIMEOUT_SECONDS * 3  # carried in the message
    product = make_product(stock=5)
    sweeper.stop("inventory")
    order_id = place(user, [(product, 1)])
    try:
        # Long past the saga timeout, in several sweeps: deferred, never re-dispatched.
        wait_for(
            lambda: re.search(r"saga sweep: .*'deferred': [1-9]", sweeper.log("orders")),
            timeout=SWEEP_TIMEOUT_SECONDS * 4,
            interval=0.2,
            what="a sweep to defer the queued order",
        )
        time.sleep(SWEEP_TIMEOUT_SECONDS * 2)
        assert Order.objects.get(pk=order_id).dispatch_attempts == 1
    finally:
        sweeper.restart("inventory")
    assert wait_terminal([order_id]) == {order_id: "cancelled"}
    cancelled = CancelledOrder.objects.get(pk=order_id)
    assert cancelled.reason == (
        f"order deadline passed after {SWEEP_TIMEOUT_SECONDS * 3} s: "
        "inventory.stock_reserve could not complete (no earlier error)"
    )
    assert cancelled.dispatch_attempts == 1
    assert Product.objects.get(pk=product.pk).stock == 5
    assert_consistent()
