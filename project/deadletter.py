"""The dead-letter queue: what is in it, and re-driving it to the queues its messages died in (quorum queues only).

A message lands in DEAD_LETTER_QUEUE (project/queues.py) when a quorum
queue returned it more than BROKER_DELIVERY_LIMIT times (reason
``delivery_limit``) or a worker rejected it without requeue (``rejected``:
project/admission.py's refusals, a malformed message). RabbitMQ records each
death in the message's ``x-death`` header (queue, reason, count, time; the
most recent first) and the first in ``x-first-death-queue`` /
``x-first-death-reason`` (https://www.rabbitmq.com/docs/dlx#effects).

Reading takes messages with ``basic.get`` and gives them back unacknowledged
(the channel closes); re-driving publishes a copy to the task exchange with
the original queue's routing key, waits for RabbitMQ's publisher confirm, and
only then acknowledges the dead message: a failure in between leaves it in
the dead-letter queue (it may then exist twice, which the idempotent saga
steps absorb), never nowhere.
"""

import json
import logging
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from kombu import Exchange, Producer

from project import broker_publish, queues
from project.celery import app

logger = logging.getLogger("orderflow.broker")

#: Messages read at most per listing or re-drive (the bound on the command's and the dashboard's work).
DEFAULT_LIMIT = 100
#: How long one listing or re-drive may take, connecting and closing included (seconds).
TIMEOUT_SECONDS = 30.0


class DeadLetterUnavailable(RuntimeError):
    """Not on quorum queues (BROKER_QUEUE_TYPE=classic or the embedded broker): there is no dead-letter queue."""


@dataclass(frozen=True)
class DeadLetter:
    """One dead message, as its headers and body say.

    `queue` is the task queue it died in (where re-driving sends it), `reason`
    RabbitMQ's death reason there (``delivery_limit``, ``rejected``, …), `count`
    how many times it died there, `died_at` when it first did (UTC, None if
    unknown): RabbitMQ keeps one ``x-death`` entry per queue and reason, counts
    the deaths in it and leaves its time as it was
    (https://www.rabbitmq.com/docs/dlx#effects).
    """

    task_id: str
    task: str
    order_id: int | None
    queue: str | None
    reason: str
    count: int
    first_death_queue: str
    first_death_reason: str
    died_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "died_at": self.died_at.isoformat() if self.died_at else None}


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    return "" if value is None else str(value)


def _order_id(body: bytes) -> int | None:
    """The order a Celery message names (``order_id`` keyword, or the first argument); None if it names none."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not (isinstance(payload, list) and len(payload) >= 2):
        return None
    args, kwargs = payload[0], payload[1]
    value = kwargs.get("order_id") if isinstance(kwargs, dict) else None
    if value is None and isinstance(args, list) and args:
        value = args[0]
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def describe(headers: dict[str, Any] | None, body: bytes) -> DeadLetter:
    """A dead message's DeadLetter from its AMQP headers (Celery's ``id``/``task``, RabbitMQ's ``x-death``) and body."""
    headers = headers or {}
    deaths = [d for d in headers.get("x-death") or [] if isinstance(d, dict)]
    ours = set(settings.SERVICE_QUEUES) | set(settings.COMPENSATION_QUEUES.values())
    # The death in one of our task queues; a retry's earlier hops through celery_delayed_* are deaths too (expired).
    death = next((d for d in deaths if _text(d.get("queue")) in ours), deaths[0] if deaths else {})
    died_at = death.get("time")
    if isinstance(died_at, datetime) and died_at.tzinfo is None:
        died_at = died_at.replace(tzinfo=UTC)  # an AMQP timestamp: seconds since the epoch, UTC
    return DeadLetter(
        task_id=_text(headers.get("id")),
        task=_text(headers.get("task")),
        order_id=_order_id(body),
        queue=_text(death.get("queue")) if _text(death.get("queue")) in ours else None,
        reason=_text(death.get("reason")) or "unknown",
        count=int(death.get("count") or 0),
        first_death_queue=_text(headers.get("x-first-death-queue")),
        first_death_reason=_text(headers.get("x-first-death-reason")),
        died_at=died_at if isinstance(died_at, datetime) else None,
    )


@contextmanager
def _connection(timeout: float) -> Iterator[Any]:
    # On classic queues nothing is dead-lettered any more, but a queue left from BROKER_QUEUE_TYPE=quorum
    # may still hold messages: it is read (and re-driven) all the same.
    if not settings.BROKER_IS_AMQP:
        raise DeadLetterUnavailable(
            "no dead-letter queue: it exists on RabbitMQ only, with BROKER_QUEUE_TYPE=quorum (docs/operations.md)"
        )
    connection = app.connection_for_write()
    with broker_publish.bounded_connection(connection, time.monotonic() + timeout):
        yield connection
        connection.release()


def depth(*, timeout: float | None = None) -> int:
    """Messages in the dead-letter queue (0 when it was never declared).

    Raises DeadLetterUnavailable off quorum queues; kombu/amqp errors or
    TimeoutError when RabbitMQ does not answer within `timeout` (default BROKER_PUBLISH_TIMEOUT_SECONDS).
    """
    with _connection(timeout or settings.BROKER_PUBLISH_TIMEOUT_SECONDS) as connection:
        try:
            with connection.channel() as channel:
                _, ready, _ = channel.queue_declare(queue=queues.DEAD_LETTER_QUEUE, passive=True)
        except connection.channel_errors:
            return 0
        return ready


def peek(*, limit: int = DEFAULT_LIMIT, timeout: float = TIMEOUT_SECONDS) -> tuple[int, list[DeadLetter]]:
    """(depth, up to `limit` dead messages from the head of the queue), leaving every one in the queue.

    RabbitMQ has no way to read a quorum queue without delivering: each
    message is taken unacknowledged and given back when the channel closes,
    which counts a delivery on it (``x-delivery-count``) and puts it at the
    back, so listings in a row go round the queue `limit` at a time. The
    dead-letter queue is declared without a delivery limit, so this never
    drops one (project/queues.py `dead_letter_queue`). Raises as `depth` does.
    """
    with _connection(timeout) as connection:
        channel = connection.channel()
        try:
            _, ready, _ = channel.queue_declare(queue=queues.DEAD_LETTER_QUEUE, passive=True)
        except connection.channel_errors:
            return 0, []
        found = []
        try:
            for _ in range(min(limit, ready)):
                message = channel.basic_get(queue=queues.DEAD_LETTER_QUEUE, no_ack=False)
                if message is None:
                    break
                found.append(describe(message.headers, message.body))
        finally:
            channel.close()  # every message taken goes back, unacknowledged (to the back of the queue)
        return ready, found


@dataclass(frozen=True)
class Redriven:
    """What a re-drive did.

    `sent`: re-published (confirmed) and removed; `skipped`: looked at and left
    (not chosen, or its queue unknown or missing); `depth`: messages in the
    dead-letter queue when it started, so ``depth - len(sent) - len(skipped)``
    were past the limit and not looked at.
    """

    sent: list[DeadLetter]
    skipped: list[DeadLetter]
    depth: int = 0

    @property
    def not_looked_at(self) -> int:
        """Messages past `limit`, left without being read (0 or more)."""
        return max(0, self.depth - len(self.sent) - len(self.skipped))


def _queue_exists(connection, name: str) -> bool:
    """Whether queue `name` exists: a passive declare on a channel of its own (a missing queue closes the channel)."""
    try:
        with connection.channel() as probe:
            probe.queue_declare(queue=name, passive=True)
    except connection.channel_errors:
        return False
    return True


def redrive(
    *,
    task_ids: Collection[str] = (),
    queue: str | None = None,
    limit: int = DEFAULT_LIMIT,
    timeout: float = TIMEOUT_SECONDS,
) -> Redriven:
    """Re-publish dead messages to the task queue each died in, each removed only once RabbitMQ confirmed its copy.

    Chooses the messages whose task id is in `task_ids` (every one when
    empty) and, with `queue`, that died in that queue; looks at no more than
    `limit` messages nor more than were there at the start (a message that
    dies again while this runs waits for the next re-drive). A message whose
    queue is unknown (no ``x-death`` in a task queue) or does not exist on the
    broker now is skipped and stays (RabbitMQ confirms an unroutable publish
    and drops it; a queue deleted between the check and the publish is the one
    window left). Raises as
    `depth` does; a publish not confirmed raises and leaves its message in
    the dead-letter queue.
    """
    wanted = set(task_ids)
    sent: list[DeadLetter] = []
    skipped: list[DeadLetter] = []
    with _connection(timeout) as connection:
        channel = connection.channel()
        try:
            _, ready, _ = channel.queue_declare(queue=queues.DEAD_LETTER_QUEUE, passive=True)
        except connection.channel_errors:
            return Redriven([], [])
        # The connection's default channel is in confirm mode (confirm_publish): publish returns once confirmed.
        # The default exchange routes to the queue of that name, quorum or classic (AMQP 0-9-1 §3.1.3.1:
        # every queue is bound to it by its name), so a message re-drives after a change of queue type too.
        producer = Producer(connection.default_channel, exchange=Exchange(""))
        try:
            for _ in range(min(limit, ready)):
                message = channel.basic_get(queue=queues.DEAD_LETTER_QUEUE, no_ack=False)
                if message is None:
                    break
                dead = describe(message.headers, message.body)
                chosen = (not wanted or dead.task_id in wanted) and (queue is None or dead.queue == queue)
                if not chosen or dead.queue is None:
                    skipped.append(dead)
                    continue  # left unacknowledged: back in the queue when the channel closes
                if not _queue_exists(connection, dead.queue):
                    # RabbitMQ confirms a publish that no queue takes and drops it: never re-drive into nothing
                    # (a queue deleted mid-migration, a vhost no worker started on yet).
                    logger.warning(
                        "dead letter %s[%s] left: its queue %s does not exist", dead.task, dead.task_id, dead.queue
                    )
                    skipped.append(dead)
                    continue
                properties = message.properties  # py-amqp's basic.get: a raw message, acknowledged on its channel
                producer.publish(
                    message.body,
                    routing_key=dead.queue,
                    headers=dict(message.headers or {}),
                    content_type=properties.get("content_type"),
                    content_encoding=properties.get("content_encoding"),
                    delivery_mode=2,  # persistent
                    correlation_id=properties.get("correlation_id"),
                    reply_to=properties.get("reply_to"),
                    retry=False,
                )
                channel.basic_ack(message.delivery_tag)
                sent.append(dead)
                logger.info(
                    "dead letter %s[%s] for order %s re-driven to %s (died %d time(s): %s)",
                    dead.task, dead.task_id, dead.order_id, dead.queue, dead.count, dead.reason,
                )  # fmt: skip
        finally:
            channel.close()
    return Redriven(sent, skipped, ready)
