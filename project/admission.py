"""What a worker agrees to run: only its own services' tasks, and their steps only with proof of origin.

Every worker imports every app's tasks (one code base, `app.autodiscover_tasks`),
so a message that reaches a queue runs on that queue's worker whatever service
its task belongs to: ``inventory.stock_release`` published to the ``orders``
queue would run on the orders worker, against inventory's tables. A consumer
bootstep (`Admission`) puts a check in front of every task's strategy
(Celery's per-task message handler, celery.worker.strategy.default, run in the
worker's main process as each message arrives). A message is refused when

* its task belongs to no service (`task_service`): Celery's canvas tasks
  (``celery.group``, ``celery.map``, ...) which orderflow never sends as
  messages, and two of which run another task inline;
* its task belongs to a service the worker does not run (`worker_services`:
  the owners of the queues it consumes, or WORKER_SERVICES);
* it arrived on a queue of another service (its routing key names one), even
  in a worker that runs both;
* its task requires proof of origin (``requires_origin``: the saga's steps,
  ``reports.product_sync``) and the message carries none that matches
  (project/origin.py).

A refused message is never run: no pool process sees it and no task signal
fires. It is logged (ERROR, logger ``orderflow.admission``: task name, id,
queue, sender, reason) and rejected without requeue, as Celery does with a
task it does not know (Consumer.on_unknown_task): RabbitMQ drops it (or
dead-letters it where a queue has a dead-letter exchange; orderflow's queues
declare none) and the file broker deletes it, so it is not delivered again.
"""

import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

from celery import bootsteps
from django.conf import settings

from project import origin

logger = logging.getLogger("orderflow.admission")

#: Celery's own tasks a worker runs, and the service whose queue they are routed to.
#: beat schedules ``celery.backend_cleanup`` daily (a no-op without a result backend) to the default queue.
CELERY_TASKS = frozenset({"celery.backend_cleanup"})


def queue_owners() -> dict[str, str]:
    """Queue name -> the service it belongs to: each service queue and its compensation queue."""
    owners = {queue: queue for queue in settings.SERVICE_QUEUES}
    owners.update({queue: service for service, queue in settings.COMPENSATION_QUEUES.items()})
    return owners


def task_service(name: str) -> str | None:
    """The service a task belongs to: the part of its name before the first dot, when that names a service.

    ``inventory.stock_release`` -> ``"inventory"``; Celery's own tasks in
    CELERY_TASKS belong to the service of the default queue (where they are
    routed); anything else (``celery.group``, an unprefixed name) to none.
    """
    prefix = name.partition(".")[0]
    if prefix in settings.SERVICE_QUEUES:
        return prefix
    if name in CELERY_TASKS:
        return queue_owners().get(settings.CELERY_TASK_DEFAULT_QUEUE)
    return None


def worker_services(consumed: Iterable[str]) -> frozenset[str]:
    """The services whose tasks a worker consuming these queues runs.

    WORKER_SERVICES when set (a worker on a queue of its own, as in tests);
    otherwise the owners of the consumed queues (`-Q inventory` and the
    ``inventory.compensation`` queue project/celery.py adds: inventory). A
    queue that belongs to no service adds none.
    """
    if settings.WORKER_SERVICES:
        return frozenset(settings.WORKER_SERVICES)
    owners = queue_owners()
    return frozenset(owners[queue] for queue in consumed if queue in owners)


def refusal(task: Any, name: str, *, queue: str | None, services: frozenset[str], args: Any, kwargs: Any) -> str | None:
    """Why a worker running `services` must not run this message of `task` (registered as `name`), or None.

    `queue` is the routing key the message was published with (the queue's
    name for every queue orderflow declares); `args` and `kwargs` are the
    message body's, decoded (a list and a dict for a well-formed message).
    """
    service = task_service(name)
    if service is None:
        return "a task of no orderflow service"
    if service not in services:
        return f"a task of the {service} service, on a worker of {', '.join(sorted(services)) or 'no service'}"
    owner = queue_owners().get(queue or "")
    if owner is not None and owner != service:
        return f"a task of the {service} service, on a queue of the {owner} service"
    if getattr(task, "requires_origin", False):
        return origin.refusal(name, args, kwargs)
    return None


def _printable(value: Any) -> str:
    """A header value fit for one log line: a forger chooses it, so no newline and no screenful."""
    text = str(value)
    return text if _PLAIN.fullmatch(text) else repr(text)[:100]


_PLAIN = re.compile(r"[\w.@:+-]{1,100}")


def _message_parts(message: Any) -> tuple[str, Any, Any, str]:
    """(task id, args, kwargs, sender) of a task message, in Celery's protocol 2 or 1.

    The sender is what the message says (Celery's ``origin`` header, ``gen<pid>@<host>``
    of the publishing process); a forger can write anything there.
    """
    headers = message.headers or {}
    if "id" in headers:  # protocol 2: [args, kwargs, embed] in the body
        body = message.payload
        args, kwargs = (body[0], body[1]) if isinstance(body, list | tuple) and len(body) >= 2 else (None, None)
        return _printable(headers["id"]), args, kwargs, _printable(headers.get("origin") or "unknown")
    body = message.payload  # protocol 1: everything in the body
    if not isinstance(body, dict):
        return "unknown", None, None, "unknown"
    return _printable(body.get("id")), body.get("args"), body.get("kwargs"), "unknown"


def _order_id(args: Any, kwargs: Any) -> int | None:
    """The order a message names (keyword ``order_id``, or the first positional argument), for the log."""
    value = kwargs.get("order_id") if isinstance(kwargs, dict) else None
    if value is None and isinstance(args, list | tuple) and args:
        value = args[0]
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def admit(consumer: Any, name: str, strategy: Callable[..., Any]) -> Callable[..., Any]:
    """`strategy` (a task's message handler), preceded by the checks of `refusal`."""
    task = consumer.app.tasks[name]

    def handler(message, body, ack, reject, callbacks, **options):
        queue = (message.delivery_info or {}).get("routing_key")
        services = worker_services(q.name for q in consumer.task_consumer.queues)
        task_id, args, kwargs, sender = _message_parts(message)
        reason = refusal(task, name, queue=queue, services=services, args=args, kwargs=kwargs)
        if reason is None:
            return strategy(message, body, ack, reject, callbacks, **options)
        logger.error(
            "refused %s[%s] from queue %s (sent by %s): %s; not run, not requeued",
            name, task_id, queue, sender, reason,
            extra={"task_name": name, "task_id": task_id, "order_id": _order_id(args, kwargs), "queue": queue,
                   "sender": sender, "refusal": reason},
        )  # fmt: skip
        message.reject_log_error(logger, consumer.connection_errors, requeue=False)
        if consumer.event_dispatcher is not None and consumer.event_dispatcher.enabled:
            consumer.event_dispatcher.send("task-rejected", uuid=task_id, requeue=False)  # as Request.reject does
        return None

    handler.admitted = True
    return handler


class Admission(bootsteps.StartStopStep):
    """Consumer bootstep: every task's strategy goes through `admit`.

    Starts after Celery's Tasks step, which builds the strategies
    (Consumer.update_strategies) each time the consumer (re)starts, and before
    the event loop delivers the first message (celery.worker.consumer.Evloop
    is the last step).
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c):
        for name, strategy in list(c.strategies.items()):
            if not getattr(strategy, "admitted", False):
                c.strategies[name] = admit(c, name, strategy)
        services = worker_services(q.name for q in c.task_consumer.queues)
        if services:
            logger.info("this worker runs the tasks of: %s", ", ".join(sorted(services)))
        else:
            logger.warning(
                "this worker consumes no service's queue and WORKER_SERVICES is unset: it refuses every task"
            )
