"""The queues' declarations by type (project/queues.py) and how a dead message is described (project/deadletter.py).

The queues at work are in tests/test_quorum.py (a private RabbitMQ node); here
the declarations, the setting's refusal of a bad value, a process's refusal to
start on queues declared otherwise (on the suite's RabbitMQ, under queue names
of its own), and the reading of RabbitMQ's ``x-death`` headers.
"""

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime

import pytest
from celery import Celery
from django.conf import settings

from project import deadletter, queues
from testing import BASE_DIR

NAMES = ("orders", "inventory.compensation")


def test_quorum_queues_are_bound_to_the_topic_exchange_with_the_delivery_limit_and_dead_lettering():
    declared = queues.task_queues(NAMES, queue_type="quorum", delivery_limit=20)

    for queue, name in zip(declared, NAMES, strict=True):
        assert (queue.name, queue.routing_key, queue.durable) == (name, name, True)
        assert (queue.exchange.name, queue.exchange.type) == ("orderflow.tasks", "topic")
        assert queue.queue_arguments == {
            "x-queue-type": "quorum",
            "x-delivery-limit": 20,
            "x-dead-letter-exchange": "orderflow.dead-letter",
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }


def test_classic_queues_are_declared_as_before():
    for queue, name in zip(queues.task_queues(NAMES, queue_type="classic", delivery_limit=20), NAMES, strict=True):
        assert (queue.name, queue.routing_key, queue.durable, queue.queue_arguments) == (name, name, True, None)
        assert queue.exchange.name == ""  # Celery's default exchange, filled in by app.amqp.queues


def test_an_unknown_queue_type_is_refused():
    with pytest.raises(ValueError, match="BROKER_QUEUE_TYPE='stream': expected one of quorum, classic"):
        queues.task_queues(NAMES, queue_type="stream", delivery_limit=20)


@pytest.mark.parametrize(("name", "value", "says"), [
    ("BROKER_QUEUE_TYPE", "Quorum", "BROKER_QUEUE_TYPE='Quorum': expected one of quorum, classic"),
    ("BROKER_DELIVERY_LIMIT", "0", "BROKER_DELIVERY_LIMIT=0: expected a count >= 1"),
    # every number setting names itself (project/settings.py _Env), not int()'s "invalid literal"
    ("BROKER_DELIVERY_LIMIT", "twenty", "BROKER_DELIVERY_LIMIT='twenty': expected an integer"),
    ("SAGA_SWEEP_INTERVAL_SECONDS", "often", "SAGA_SWEEP_INTERVAL_SECONDS='often': expected a number"),
])  # fmt: skip
def test_a_bad_setting_stops_the_process_at_start(name, value, says):
    env = {**os.environ, name: value, "CELERY_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672/unused"}
    done = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=BASE_DIR, env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode != 0
    assert says in done.stderr


def test_a_setting_set_but_empty_is_its_default():
    # compose passes `FOO: ${FOO:-}` through as FOO=""
    env = {**os.environ, "BROKER_QUEUE_TYPE": "", "BROKER_DELIVERY_LIMIT": "", "CELERY_BROKER_URL": "amqp://g@h/unused"}
    code = "from django.conf import settings; print(settings.BROKER_QUEUE_TYPE, settings.BROKER_DELIVERY_LIMIT)"
    command = [sys.executable, "manage.py", "shell", "--verbosity", "0", "--command", code]
    done = subprocess.run(command, cwd=BASE_DIR, env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["quorum", "20"]


CLASSIC = {"queue_type": "classic", "delivery_limit": 20}
QUORUM = {"queue_type": "quorum", "delivery_limit": 20}


@pytest.mark.skipif(not settings.BROKER_IS_AMQP, reason="the embedded broker has no queue types or arguments")
@pytest.mark.parametrize(("existing", "declared", "says"), [
    (CLASSIC, QUORUM, "it is not a quorum queue as BROKER_QUEUE_TYPE=quorum declares (RabbitMQ: "
     "PRECONDITION_FAILED - inequivalent arg"),
    (QUORUM, CLASSIC, "Either keep BROKER_QUEUE_TYPE=quorum, or migrate"),
    ({**QUORUM, "delivery_limit": 5}, QUORUM, "its delivery limit differs from BROKER_DELIVERY_LIMIT (RabbitMQ: "
     "PRECONDITION_FAILED - inequivalent arg 'x-delivery-limit'"),
    ({**QUORUM, "delivery_limit": 5}, QUORUM, "Either set BROKER_DELIVERY_LIMIT back to the queue's value, or migrate"),
    ({**QUORUM, "delivery_limit": 5}, QUORUM, "drain the queues and the delayed-delivery queues celery_delayed_* ("),
    ({**QUORUM, "delivery_limit": 5}, QUORUM, "then start everything with BROKER_DELIVERY_LIMIT=20:"),
    (QUORUM, CLASSIC, "drain the queues and the delayed-delivery queues celery_delayed_* ("),
    (CLASSIC, QUORUM, "drain the queues (rabbitmqctl"),
])  # fmt: skip
def test_a_process_does_not_start_on_a_queue_declared_with_other_arguments(settings, existing, declared, says):
    name = f"orderflow-test-{uuid.uuid4().hex[:8]}"
    app = Celery("declared", broker=settings.CELERY_BROKER_URL, set_as_current=False)
    app.conf.update(
        task_queues=queues.task_queues([name], **declared),
        broker_transport_options=settings.CELERY_BROKER_TRANSPORT_OPTIONS,
    )
    settings.BROKER_QUEUE_TYPE, settings.BROKER_DELIVERY_LIMIT = declared["queue_type"], declared["delivery_limit"]
    written: list[str] = []
    with app.connection_for_write() as connection:
        queues.declare(connection, queues.task_queues([name], **existing), existing["queue_type"])
        try:
            with pytest.raises(SystemExit) as stopped:
                queues.verify_at_start(app, "celery worker", write=written.append)
        finally:
            with connection.channel() as channel:
                channel.queue_delete(name)

    assert stopped.value.code == 1
    assert written[0].startswith(f"celery worker not started: queue {name!r} exists on the broker with other arguments")
    assert says in written[0]


@pytest.mark.skipif(not settings.BROKER_IS_AMQP, reason="the embedded broker has no queue types or arguments")
def test_a_process_starts_on_queues_declared_as_the_settings_say(settings):
    name = f"orderflow-test-{uuid.uuid4().hex[:8]}"
    app = Celery("declared", broker=settings.CELERY_BROKER_URL, set_as_current=False)
    app.conf.update(task_queues=queues.task_queues([name], **QUORUM))
    settings.BROKER_QUEUE_TYPE = "quorum"
    with app.connection_for_write() as connection:
        queues.declare(connection, queues.task_queues([name], **QUORUM), "quorum")
        try:
            queues.verify_at_start(app, "web", write=pytest.fail)
            with connection.channel() as channel:
                assert channel.queue_declare(name, passive=True).queue == name
        finally:
            with connection.channel() as channel:
                channel.queue_delete(name)


def test_a_dead_message_is_described_by_its_death_in_a_task_queue():
    # A retry that went through delayed delivery (deaths "expired" there), then past the delivery limit.
    died = datetime(2026, 12, 4, 18, 0, tzinfo=UTC)
    headers = {
        "id": "5b0c",
        "task": "inventory.stock_reserve",
        "x-first-death-queue": "celery_delayed_3",
        "x-first-death-reason": "expired",
        "x-death": [
            {"queue": "inventory", "reason": "delivery_limit", "count": 1, "time": died, "routing-keys": ["inventory"]},
            {"queue": "celery_delayed_3", "reason": "expired", "count": 1, "time": died},
        ],
    }
    body = json.dumps([[], {"order_id": 42, "lines": [[1, 1]]}, {}]).encode()

    dead = deadletter.describe(headers, body)

    assert dead == deadletter.DeadLetter(
        task_id="5b0c", task="inventory.stock_reserve", order_id=42, queue="inventory", reason="delivery_limit",
        count=1, first_death_queue="celery_delayed_3", first_death_reason="expired", died_at=died,
    )  # fmt: skip


@pytest.mark.parametrize("body", [b"not json", b"{}", json.dumps([[True], {}, {}]).encode()])
def test_a_dead_message_that_names_no_order_or_queue_is_still_described(body):
    dead = deadletter.describe({"x-death": [{"queue": "elsewhere", "reason": "rejected", "count": 2}]}, body)

    assert (dead.order_id, dead.queue, dead.reason, dead.count, dead.task) == (None, None, "rejected", 2, "")
