"""Which sagas are still in the broker's or a worker's hands: what tells the sweeper a queued saga from a lost one.

A saga's message is somewhere until its step runs: ready in a service queue,
waiting out a retry's countdown (on quorum queues in RabbitMQ's delayed-delivery
queues, on classic queues in a worker), or held by a worker (prefetched or
running). RabbitMQ and the file broker count what is ready per queue and
who consumes it; Celery's remote control (``inspect``) lists what each
worker holds, with the task's arguments. The sweeper re-sends a saga only
when the answer is certain: every queue it could be in was empty before and
after every consumer of them answered, and none of them holds the order
(docs/design.md, "The sweeper re-sends only what is lost").
"""

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from kombu.exceptions import OperationalError as BrokerOperationalError

from project import broker, broker_publish, queues
from project.celery import app

logger = logging.getLogger("orderflow.saga")

#: How long the sweeper waits for every worker's answer, in seconds.
INSPECT_TIMEOUT_SECONDS = 2.0


@dataclass(frozen=True)
class QueueDepth:
    """One queue: messages ready (not yet delivered to any consumer) and live consumers."""

    ready: int
    consumers: int


def saga_queues() -> list[str]:
    """Every queue a saga message can wait in: the services' queues and their compensation queues."""
    return [*settings.SERVICE_QUEUES, *settings.COMPENSATION_QUEUES.values()]


def waiting_queues() -> list[str]:
    """The queues holding saga messages no worker has: `saga_queues`, and on quorum queues the delayed-delivery ones.

    On quorum queues a retry's countdown waits in RabbitMQ (Celery's native
    delayed delivery: ``celery_delayed_0`` … ``celery_delayed_27``), neither in
    the step's queue nor in a worker. Those queues are shared by every Celery
    application on the virtual host and their messages cannot be read without
    taking them, so any message there counts as possibly one of ours.
    """
    if not settings.QUORUM_QUEUES:
        return saga_queues()
    return [*saga_queues(), *queues.delayed_delivery_queues()]


def queue_depths(queues: Iterable[str]) -> dict[str, QueueDepth]:
    """{queue: QueueDepth} from the broker (passive declares); a queue never declared is empty with no consumer.

    Raises kombu.exceptions.OperationalError (project.broker_publish.BrokerUnavailable)
    or TimeoutError when RabbitMQ does not answer within BROKER_PUBLISH_TIMEOUT_SECONDS,
    connecting and closing included.
    """
    options = app.conf.broker_transport_options or {}
    claimed_root = Path(options["data_folder_in"]).parent / "claimed" if "data_folder_in" in options else None
    connection = app.connection_for_write()
    if claimed_root is not None:  # the embedded broker: files, nothing to wait on
        with connection:
            return _depths_on(connection, queues, claimed_root)
    # RabbitMQ: connecting, every declare and the close within the publish bound (a frozen broker never answers).
    with broker_publish.bounded_connection(connection, time.monotonic() + settings.BROKER_PUBLISH_TIMEOUT_SECONDS):
        depths = _depths_on(connection, queues, None)
        connection.release()
    return depths


def _depths_on(connection, queues: Iterable[str], claimed_root: Path | None) -> dict[str, QueueDepth]:
    depths = {}
    connection.ensure_connection(max_retries=0)
    for queue in queues:
        try:
            # A channel per queue: on AMQP a passive declare of a missing queue closes its channel.
            with connection.channel() as channel:
                _, ready, consumers = channel.queue_declare(queue=queue, passive=True)
        except connection.channel_errors:
            depths[queue] = QueueDepth(0, 0)
            continue
        if claimed_root is not None:  # the file broker counts consumers by their live markers
            consumers = len(broker.queue_consumers(claimed_root, queue))
        depths[queue] = QueueDepth(ready, consumers)
    return depths


def _order_id(request: dict) -> int | None:
    kwargs = request.get("kwargs") or {}
    args = request.get("args") or []
    value = kwargs.get("order_id", args[0] if args else None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def held_order_ids() -> set[int] | None:
    """The ids of the orders whose saga messages workers hold now, or None when that cannot be known.

    None (the sweeper then re-sends nothing this time) when a saga queue has
    messages ready (a backlog: anything pending may be queued) or, on quorum
    queues, a retry waits out its countdown in delayed delivery (`waiting_queues`);
    when a queue's consumers did not all answer within INSPECT_TIMEOUT_SECONDS, or
    when the broker cannot be reached. The queues are read before and after
    the workers are asked, so a message moving from a queue to a worker
    while they are asked is seen in one or the other.
    """
    consumed = saga_queues()
    waiting = waiting_queues()
    try:
        before = queue_depths(waiting)
        if any(depth.ready for depth in before.values()):
            return None
        inspect = app.control.inspect(timeout=INSPECT_TIMEOUT_SECONDS)
        consuming = inspect.active_queues() or {}
        for queue in consumed:
            answered = sum(1 for items in consuming.values() if any(item.get("name") == queue for item in items))
            if answered < before[queue].consumers:
                logger.info("saga sweep: %d of %d consumers of %s answered", answered, before[queue].consumers, queue)
                return None
        held: set[int] = set()
        if consuming:
            workers = list(consuming)
            ask = app.control.inspect(destination=workers, limit=len(workers), timeout=INSPECT_TIMEOUT_SECONDS)
            for method in (ask.active, ask.reserved, ask.scheduled):
                replies = method()
                if replies is None or len(replies) < len(workers):
                    return None
                for tasks in replies.values():
                    for task in tasks:
                        order_id = _order_id(task.get("request", task))
                        if order_id is not None:
                            held.add(order_id)
        after = queue_depths(waiting)
        if any(depth.ready for depth in after.values()):
            return None
        return held
    except (BrokerOperationalError, OSError) as exc:
        logger.warning("saga sweep: the broker could not say what is queued (%s)", exc)
        return None
