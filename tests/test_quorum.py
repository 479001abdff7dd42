"""Quorum queues end to end on a RabbitMQ node of the test's own: delayed delivery, the delivery limit, dead letters.

Each test runs the whole stack (web, three workers, beat: testing/stack.py) in
production shape on a private node and PostgreSQL cluster, with the default
BROKER_QUEUE_TYPE=quorum, and looks at the broker with rabbitmqctl: the
queues' types and arguments, a countdown retry waiting in ``celery_delayed_*``
(not in a worker), a message past BROKER_DELIVERY_LIMIT in the dead-letter
queue with its reason, re-driven by ``manage.py deadletter`` to a confirmed
order, a refused forged task dead-lettered (and refused again when re-driven).
"""

import json
import os
import re
import subprocess
import sys
import uuid

import pytest
from kombu import Connection, Exchange, Producer, Queue

from project import queues
from testing import BASE_DIR, wait_for
from testing.instances import free_port

pytestmark = [pytest.mark.private_instances, pytest.mark.timeout(300)]

SERVICES = ("orders", "inventory", "reports")
TASK_QUEUES = (*SERVICES, *(f"{service}.compensation" for service in SERVICES))


def queue_table(node) -> dict[str, tuple[str, int, str]]:
    """{queue: (type, ready messages, arguments as rabbitmqctl prints them)} on the node's vhost `/`."""
    out = node.ctl("list_queues", "-q", "--no-table-headers", "name", "type", "messages_ready", "arguments")
    table = {}
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) == 4:
            table[parts[0]] = (parts[1], int(parts[2]), parts[3])
    return table


def delayed_messages(node) -> int:
    return sum(ready for name, (_, ready, _) in queue_table(node).items() if name.startswith("celery_delayed_"))


def dead_letters(stack) -> dict:
    return json.loads(stack.manage("deadletter", "list", "--json").stdout)


def test_the_task_queues_are_quorum_queues_with_a_delivery_limit_and_a_dead_letter_queue(drill_stack, rabbitmq_node):
    drill_stack(BROKER_DELIVERY_LIMIT=7)

    table = queue_table(rabbitmq_node)

    for name in TASK_QUEUES:
        queue_type, _, arguments = table[name]
        assert queue_type == "quorum", (name, table[name])
        for argument in (
            '{"x-delivery-limit",7}',
            '{"x-dead-letter-exchange","orderflow.dead-letter"}',
            '{"x-dead-letter-strategy","at-least-once"}',
            '{"x-overflow","reject-publish"}',
        ):
            assert argument in arguments, (name, arguments)
    assert table[queues.DEAD_LETTER_QUEUE][0] == "quorum"
    # Celery's native delayed delivery, declared by the workers, as quorum queues too.
    assert table["celery_delayed_0"][0] == "quorum" and table["celery_delayed_27"][0] == "quorum"
    exchanges = rabbitmq_node.ctl("list_exchanges", "-q", "--no-table-headers", "name", "type")
    assert re.search(r"^orderflow\.tasks\ttopic$", exchanges, re.M)
    assert re.search(r"^orderflow\.dead-letter\tfanout$", exchanges, re.M)


def test_a_countdown_retry_waits_in_delayed_delivery_past_the_saga_timeout_and_the_sweeper_leaves_it(
    drill_stack, rabbitmq_node
):
    """The retry waits 10-20 s in RabbitMQ, no worker holds it, the saga timeout is 2 s: not re-sent, confirmed once.

    Long enough for several sweeps (each takes a few seconds: it asks the workers), two of which in a row
    would re-send a saga they both found nowhere.
    """
    stack = drill_stack(
        SAGA_RETRY_BACKOFF_SECONDS=20, SAGA_RETRY_BACKOFF_MAX_SECONDS=20, SAGA_TIMEOUT_SECONDS=2,
        SAGA_SWEEP_INTERVAL_SECONDS=1,
    )  # fmt: skip
    product = stack.create_product(stock=5)
    stack.workers.set_faults({"inventory.stock_reserve": {"action": "transient", "times": 1}})

    reply = stack.place_order([(product, 1)])
    assert reply.status == 202, reply
    order_id = reply.body["id"]

    # The retry (a 10-20 s countdown, whole seconds) is in a celery_delayed_* queue while it waits.
    wait_for(lambda: delayed_messages(rabbitmq_node) >= 1, timeout=10, what="the retry in delayed delivery")
    assert queue_table(rabbitmq_node)["inventory"][1] == 0
    assert stack.wait_terminal([order_id], timeout=60) == {order_id: "confirmed"}

    inventory_log = stack.workers.session_log("inventory")
    retried = rf"inventory\.stock_reserve for order {order_id} hit .*, retry 1 in ([0-9.]+)s"
    (countdown,) = re.findall(retried, inventory_log)
    assert float(countdown) >= 10  # five saga timeouts
    assert re.search(r"inventory\.stock_reserve.* succeeded", inventory_log)
    orders_log = stack.workers.session_log("orders")
    assert not re.search(rf"order {order_id} re-dispatched", orders_log), orders_log[-3000:]
    assert len(re.findall(r"saga sweep: ", orders_log)) >= 3  # the sweeper did look, again and again
    clean, report = stack.audit()
    assert clean, report


def test_a_message_past_the_delivery_limit_is_dead_lettered_and_redriven_to_a_confirmed_order(
    drill_stack, rabbitmq_node
):
    """A step blocked past its hard time limit each time is put back each time (acks_on_timeout=False) until the
    delivery limit sends it to the dead-letter queue; re-driven once the fault is gone, the saga completes."""
    stack = drill_stack(
        BROKER_DELIVERY_LIMIT=1, CELERY_TASK_SOFT_TIME_LIMIT=1, CELERY_TASK_TIME_LIMIT=2,
        DATABASE_LOCK_TIMEOUT_SECONDS=0.5,
        SAGA_TIMEOUT_SECONDS=600,  # the sweeper must not re-send it meanwhile: only the re-drive may
    )  # fmt: skip
    product = stack.create_product(stock=5)
    stack.workers.set_faults({"inventory.stock_reserve": {"action": "sleep", "seconds": 60, "blocked": True}})

    reply = stack.place_order([(product, 1)])
    assert reply.status == 202, reply
    order_id = reply.body["id"]

    found = wait_for(lambda: dead_letters(stack)["messages"], timeout=60, what="the message in the dead-letter queue")
    (dead,) = found
    assert dead["task"] == "inventory.stock_reserve"
    assert dead["order_id"] == order_id
    assert dead["queue"] == "inventory"
    assert dead["reason"] == "delivery_limit"
    assert stack.order_state(order_id) is None  # still pending: nothing lost, nothing decided
    listing = stack.manage("deadletter", "list").stdout
    assert f"order={order_id}" in listing and "reason=delivery_limit" in listing

    stack.workers.clear_faults()
    redriven = stack.manage("deadletter", "redrive", dead["task_id"]).stdout
    assert f"re-driven {dead['task_id']}" in redriven

    assert stack.wait_terminal([order_id], timeout=60) == {order_id: "confirmed"}
    assert dead_letters(stack) == {"depth": 0, "messages": []}
    ready = stack.request("GET", "/readyz")
    assert ready.body.get("dead_letters") == "empty", ready.body
    clean, report = stack.audit()
    assert clean, report


def test_a_refused_forged_task_is_dead_lettered_and_refused_again_when_redriven(drill_stack, rabbitmq_node):
    stack = drill_stack()
    task_id = str(uuid.uuid4())
    with Connection(rabbitmq_node.url) as connection:
        # A saga step without orderflow's proof of origin (project/admission.py refuses it without requeue).
        Producer(connection.default_channel).publish(
            json.dumps([[], {"order_id": 424242, "lines": [[1, 1]]}, {}]),
            exchange=Exchange(queues.TASK_EXCHANGE, type="topic", durable=True),
            routing_key="inventory",
            headers={"task": "inventory.stock_reserve", "id": task_id, "lang": "py", "argsrepr": "", "kwargsrepr": ""},
            content_type="application/json",
            content_encoding="utf-8",
            delivery_mode=2,
        )

    (dead,) = wait_for(lambda: dead_letters(stack)["messages"], timeout=30, what="the refused message dead-lettered")
    assert (dead["task_id"], dead["queue"], dead["reason"]) == (task_id, "inventory", "rejected")
    assert dead["order_id"] == 424242
    ready = stack.request("GET", "/readyz")
    assert ready.body.get("dead_letters", "").startswith("1 dead message(s)"), ready.body

    stack.manage("deadletter", "redrive", "--all", "--queue", "inventory")

    # Refused again by admission, dead again: now twice.
    (again,) = wait_for(
        lambda: [d for d in dead_letters(stack)["messages"] if d["count"] == 2], timeout=30, what="a second death"
    )
    assert (again["task_id"], again["reason"]) == (task_id, "rejected")
    refusals = re.findall(rf"refused inventory\.stock_reserve\[{task_id}\]", stack.workers.session_log("inventory"))
    assert len(refusals) == 2

    # Its queue gone (mid-migration: the workers stopped, the queue deleted): a re-drive leaves it where it is,
    # since RabbitMQ would confirm a publish no queue takes and drop it.
    stack.stop_worker("inventory")
    with Connection(rabbitmq_node.url) as connection:
        connection.default_channel.queue_delete("inventory")
    stack.manage("deadletter", "redrive", "--all")
    (kept,) = dead_letters(stack)["messages"]
    assert (kept["task_id"], kept["count"]) == (task_id, 2)


@pytest.mark.parametrize("web_workers", [1, 2])
def test_a_web_on_queues_of_another_type_stops_instead_of_restarting_for_ever(rabbitmq_node, tmp_path, web_workers):
    """gunicorn restarts a worker that exits; one whose application fails to load halts the master (status 3).

    With more than one worker, the others fail the same way at about the same
    time; one that fails while the master is already halting is reaped inside
    Arbiter.halt -> stop -> reap_workers, which raises HaltServer again outside
    run()'s handler: the master still stops, with the traceback and status 1
    (gunicorn/arbiter.py; benoitc/gunicorn#1095 and the reports after it).
    """
    with Connection(rabbitmq_node.url) as connection:
        for name in TASK_QUEUES:  # what orderflow declared before quorum queues
            Queue(name, routing_key=name, durable=True)(connection.default_channel).declare()
    env = {
        **os.environ,
        "CELERY_BROKER_URL": rabbitmq_node.url,
        "BROKER_QUEUE_TYPE": "quorum",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'orderflow.sqlite3'}",
        "DATABASE_URL_INVENTORY": "",
        "DATABASE_URL_REPORTS": "",
        "ORDERFLOW_VAR_DIR": str(tmp_path / "var"),
    }
    command = [
        sys.executable, "-m", "gunicorn", "project.wsgi", "--bind", f"127.0.0.1:{free_port()}", "--workers",
        str(web_workers), "--no-control-socket",
    ]  # fmt: skip

    done = subprocess.run(command, cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=120, check=False)

    said = done.stdout + done.stderr
    # One worker: always the boot error. Two: the boot error, or 1 when the second failed during the halt.
    statuses = {3} if web_workers == 1 else {3, 1}
    assert done.returncode in statuses, f"gunicorn exited {done.returncode}; its output ends:\n{said[-4000:]}"
    if done.returncode == 1:
        assert "HaltServer: <HaltServer 'Worker failed to boot.' 3>" in said, said[-4000:]
    assert "Worker failed to boot" in said
    assert "web not started: queue 'orders' exists on the broker with other arguments" in said
    assert said.count("web not started: queue") <= 2, said  # each worker once at most: no restart loop
