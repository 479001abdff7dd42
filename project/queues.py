"""The broker's queues: their type (quorum or classic), the delivery limit, the dead-letter queue, and the start check.

Settings build CELERY_TASK_QUEUES with `task_queues`. On RabbitMQ with
BROKER_QUEUE_TYPE=quorum (the default there) every service and compensation
queue is a quorum queue bound to one topic exchange, which Celery's native
delayed delivery needs for countdown retries; a message redelivered more than
BROKER_DELIVERY_LIMIT times, or rejected without requeue, is dead-lettered to
DEAD_LETTER_QUEUE (project/deadletter.py reads and re-drives it). Classic
queues stay exactly as before (a direct exchange, no arguments). The embedded
filesystem broker has no queue types and ignores all of this.

RabbitMQ refuses to redeclare a queue with other arguments (PRECONDITION_FAILED,
"inequivalent arg 'x-queue-type'"): `verify_at_start` turns that into
`QueueTypeMismatch`, named, with the migration steps (docs/operations.md,
"Queue types: quorum or classic").
"""

import logging
import re
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from kombu import Exchange, Queue
from kombu.transport.native_delayed_delivery import MAX_LEVEL, level_name

logger = logging.getLogger("orderflow.broker")

#: How long a process's start may spend declaring the queues (seconds): creating a quorum
#: queue is a Raft group's start on every node, slower than a publish, and nobody waits on it.
START_DECLARE_TIMEOUT_SECONDS = 5.0

QUEUE_TYPES = ("quorum", "classic")
#: The topic exchange every task queue is bound to on quorum queues (routing key: the queue's name).
#: Native delayed delivery hands a message whose countdown is over to this exchange through
#: ``celery_delayed_delivery`` (kombu.transport.native_delayed_delivery), which a direct exchange cannot take.
TASK_EXCHANGE = "orderflow.tasks"
#: Where RabbitMQ sends a dead message (a fanout exchange: every routing key lands in the one queue).
DEAD_LETTER_EXCHANGE = "orderflow.dead-letter"
DEAD_LETTER_QUEUE = "orderflow.dead-letter"


class QueueTypeMismatch(RuntimeError):
    """A queue exists on the broker with other arguments than the settings declare.

    `queue` is its name, `reply` RabbitMQ's PRECONDITION_FAILED text, which names
    the first argument that differs ("inequivalent arg 'x-queue-type' …"): `argument`,
    or None when the text names none. The message says which setting differs (the
    queue type, or only BROKER_DELIVERY_LIMIT) and how to migrate (docs/operations.md,
    “Queue types: quorum or classic”).
    """

    def __init__(self, queue: str, reply: str, queue_type: str, delivery_limit: int | None = None) -> None:
        self.queue, self.reply, self.queue_type = queue, reply, queue_type
        # "inequivalent arg 'x-delivery-limit' for queue 'orders' in vhost '/': received the value '20' of type
        # 'signedint' but current is the value '5' of type 'long"; "received none" or "current is none" when one
        # side lacks the argument, which only another queue type explains (rabbit_misc:assert_args_equivalence).
        named = re.search(r"inequivalent arg '([^']+)'", reply)
        self.argument = named.group(1) if named else None
        if self.argument == "x-delivery-limit" and "received none" not in reply and "current is none" not in reply:
            differs = "its delivery limit differs from BROKER_DELIVERY_LIMIT"
            keep = "set BROKER_DELIVERY_LIMIT back to the queue's value"
            target = "BROKER_DELIVERY_LIMIT" + (f"={delivery_limit}" if delivery_limit is not None else "")
            from_quorum = True
        else:
            differs = f"it is not a {queue_type} queue as BROKER_QUEUE_TYPE={queue_type} declares"
            keep = f"keep BROKER_QUEUE_TYPE={'classic' if queue_type == 'quorum' else 'quorum'}"
            target = f"BROKER_QUEUE_TYPE={queue_type}"
            from_quorum = queue_type == "classic"
        # Retries waiting in delayed delivery go to their queue when due: deleted by then, they would be dropped.
        delayed = " and the delayed-delivery queues celery_delayed_*" if from_quorum else ""
        super().__init__(
            f"queue {queue!r} exists on the broker with other arguments: {differs} (RabbitMQ: {reply}). A queue's "
            f"arguments cannot change in place. Either {keep}, or migrate: stop the web and beat, let the workers "
            f"drain the queues{delayed} (rabbitmqctl -p <vhost> list_queues name messages shows 0), stop the "
            f"workers, delete the old queues (rabbitmqctl -p <vhost> delete_queue {queue}, and each other service "
            f"and .compensation queue), then start everything with {target}: the workers declare the new queues "
            f"(docs/operations.md, “Queue types: quorum or classic”)."
        )


def quorum_arguments(delivery_limit: int) -> dict[str, Any]:
    """The ``x-`` arguments of a task queue on quorum queues.

    - ``x-delivery-limit``: RabbitMQ counts each return of a message to the
      queue (a consumer's channel closed, a worker killed with it unacknowledged,
      a reject with requeue); past `delivery_limit` returns it dead-letters the
      message with reason ``delivery_limit`` instead of delivering it again
      (https://www.rabbitmq.com/docs/quorum-queues#poison-message-handling).
    - ``x-dead-letter-exchange``: dead messages (delivery limit, or a reject
      without requeue: project/admission.py's refusals) go to DEAD_LETTER_EXCHANGE.
    - ``x-dead-letter-strategy: at-least-once`` with ``x-overflow: reject-publish``:
      RabbitMQ keeps a dead message in the source queue until the dead-letter
      queue confirms it, so dead-lettering cannot lose it (RabbitMQ >= 3.10,
      quorum source queues only, needs the ``stream_queue`` feature flag; with
      any other overflow it falls back to at-most-once;
      https://www.rabbitmq.com/docs/quorum-queues#dead-lettering).
    """
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": delivery_limit,
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def task_queues(names: Iterable[str], *, queue_type: str, delivery_limit: int) -> list[Queue]:
    """Celery's ``task_queues``: one durable queue per name, routing key = name.

    `queue_type` "quorum": quorum queues with `quorum_arguments`, bound to the
    topic exchange TASK_EXCHANGE. "classic": what orderflow always declared
    (Celery's default direct exchange, no arguments), so existing classic
    queues keep working. Raises ValueError for another `queue_type`.
    """
    if queue_type not in QUEUE_TYPES:
        raise ValueError(f"BROKER_QUEUE_TYPE={queue_type!r}: expected one of {', '.join(QUEUE_TYPES)}")
    if queue_type == "classic":
        return [Queue(name, routing_key=name, durable=True) for name in names]
    exchange = Exchange(TASK_EXCHANGE, type="topic", durable=True)
    arguments = quorum_arguments(delivery_limit)
    return [Queue(name, exchange, routing_key=name, durable=True, queue_arguments=arguments) for name in names]


def dead_letter_queue() -> Queue:
    """The dead-letter queue: a quorum queue (replicated like the rest), bound to DEAD_LETTER_EXCHANGE, no limit."""
    return Queue(
        DEAD_LETTER_QUEUE,
        Exchange(DEAD_LETTER_EXCHANGE, type="fanout", durable=True),
        routing_key="",
        durable=True,
        queue_arguments={"x-queue-type": "quorum"},
    )


def delayed_delivery_queues() -> list[str]:
    """The queues where native delayed delivery holds a countdown retry: ``celery_delayed_0`` … ``celery_delayed_27``.

    kombu.transport.native_delayed_delivery: a message waits in the level of
    each set bit of its delay in seconds and is dead-lettered from level to level.
    """
    return [level_name(level) for level in range(MAX_LEVEL + 1)]


def declare(connection, queues: Iterable[Queue], queue_type: str, delivery_limit: int | None = None) -> None:
    """Declare the dead-letter queue (quorum only), then `queues`, on `connection` (kombu, connected).

    The dead-letter queue first: RabbitMQ retains a message dead-lettered
    at-least-once while nothing is there to take it. Raises QueueTypeMismatch
    (naming `delivery_limit`, the setting's value, when only that differs)
    when a queue exists with other arguments; kombu/amqp errors otherwise.
    """
    from amqp.exceptions import PreconditionFailed

    todo = [dead_letter_queue(), *queues] if queue_type == "quorum" else list(queues)
    for queue in todo:
        try:
            with connection.channel() as channel:  # a failed declare closes its channel
                queue.bind(channel).declare()
        except PreconditionFailed as exc:
            raise QueueTypeMismatch(queue.name, str(exc.reply_text or exc), queue_type, delivery_limit) from exc


def verify_at_start(app, process: str, *, write: Callable[[str], Any] = sys.stderr.write) -> None:
    """Declare the queues at a process's start; exit (status 1) with QueueTypeMismatch's text if one disagrees.

    RabbitMQ only (a no-op on the embedded broker). A broker that cannot be
    reached within START_DECLARE_TIMEOUT_SECONDS is logged and not fatal:
    the process starts and its publishes fail as "broker unavailable" until it
    is back, as before. `app` is the Celery app (its queues and connection),
    `process` names the process in the message.
    """
    from django.conf import settings

    from project import broker_publish

    if not settings.BROKER_IS_AMQP:
        return
    connection = app.connection_for_write()
    try:
        with broker_publish.bounded_connection(connection, time.monotonic() + START_DECLARE_TIMEOUT_SECONDS):
            connection.ensure_connection(max_retries=0)
            declare(connection, app.amqp.queues.values(), settings.BROKER_QUEUE_TYPE, settings.BROKER_DELIVERY_LIMIT)
            connection.release()
    except QueueTypeMismatch as exc:
        write(f"{process} not started: {exc}\n")
        raise SystemExit(1) from exc
    except Exception as exc:  # the broker is away: starting anyway is the documented behaviour
        logger.warning("%s: could not check the broker's queues at start (%s)", process, exc)
