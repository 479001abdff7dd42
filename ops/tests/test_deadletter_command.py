"""`manage.py deadletter` on the suite's RabbitMQ: what `--limit` leaves, and a queue left from quorum days.

The dead messages are written into the dead-letter queue by the test, with the
``x-death`` headers RabbitMQ gives a message past its delivery limit; no worker
runs (`no_workers`), so what is re-driven to ``orders`` is read back from there.
Dead-lettering itself, and a re-driven order that confirms, are in
tests/test_quorum.py (a private RabbitMQ node and real workers).
"""

import json
import uuid
from datetime import UTC, datetime
from io import StringIO

import pytest
from django.conf import settings
from django.core.management import call_command
from kombu import Exchange, Producer

from project import queues
from project.celery import app

pytestmark = pytest.mark.skipif(not settings.BROKER_IS_AMQP, reason="the dead-letter queue is RabbitMQ's")


def _bury(connection, count: int) -> list[str]:
    """Publish `count` forged dead orders.order_confirm messages into the dead-letter queue; their task ids."""
    with connection.channel() as channel:
        queues.dead_letter_queue().bind(channel).declare()
        channel.queue_purge(queues.DEAD_LETTER_QUEUE)
    producer = Producer(connection.default_channel, exchange=Exchange(""))
    ids = []
    for order_id in range(1, count + 1):
        task_id = str(uuid.uuid4())
        died = datetime(2026, 12, 5, 8, 0, tzinfo=UTC)
        producer.publish(
            json.dumps([[order_id], {}, {}]),
            routing_key=queues.DEAD_LETTER_QUEUE,
            headers={
                "id": task_id,
                "task": "orders.order_confirm",
                "x-first-death-queue": "orders",
                "x-first-death-reason": "delivery_limit",
                "x-death": [{"queue": "orders", "reason": "delivery_limit", "count": 1, "time": died}],
            },
            content_type="application/json",
            content_encoding="utf-8",
            delivery_mode=2,
            retry=False,
        )
        ids.append(task_id)
    return ids


def _take_all(connection, queue: str) -> list[str]:
    """Acknowledge every message in `queue`; their task ids, in order."""
    taken = []
    with connection.channel() as channel:
        while (message := channel.basic_get(queue=queue, no_ack=False)) is not None:
            taken.append(message.headers["id"])
            channel.basic_ack(message.delivery_tag)
    return taken


def _run(*args: str) -> str:
    out = StringIO()
    call_command("deadletter", *args, stdout=out, stderr=out)
    return out.getvalue()


@pytest.fixture
def broker(no_workers):
    with app.connection_for_write() as connection:
        _take_all(connection, "orders")
        try:
            yield connection
        finally:
            with connection.channel() as channel:
                channel.queue_purge(queues.DEAD_LETTER_QUEUE)
            _take_all(connection, "orders")


def test_redrive_with_a_limit_counts_what_it_did_not_look_at(broker):
    ids = _bury(broker, 3)

    said = _run("redrive", "--all", "--limit", "2")

    assert "2 re-driven, 1 left in the dead-letter queue (1 past --limit 2, not looked at)" in said
    assert _take_all(broker, "orders") == ids[:2]
    assert _take_all(broker, queues.DEAD_LETTER_QUEUE) == ids[2:]


def test_a_dead_letter_queue_left_from_quorum_queues_is_still_listed_and_redriven_on_classic(broker, settings):
    ids = _bury(broker, 2)
    settings.BROKER_QUEUE_TYPE, settings.QUORUM_QUEUES = "classic", False

    listed = _run("list")
    said = _run("redrive", ids[1])

    assert listed.startswith(f"2 dead message(s) in {queues.DEAD_LETTER_QUEUE}")
    assert all(task_id in listed for task_id in ids)
    assert "1 re-driven, 1 left in the dead-letter queue" in said
    assert _take_all(broker, "orders") == [ids[1]]
