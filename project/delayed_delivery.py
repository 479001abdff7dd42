"""Celery's native delayed delivery on a cluster's failover list: set up on the node the worker is connected to.

Celery 5.7's DelayedDelivery consumer step (celery/worker/consumer/delayed_delivery.py,
included when quorum queues are detected) declares the ``celery_delayed_*`` exchanges and
queues and binds the task queues to them on *every* URL of ``broker_url``, at every
(re)connect, before the worker consumes, and retries a URL that refuses 3 times with
pauses of 1, 3 and 5 s. With one node of a three-node cluster down, every reconnect of
every worker (which is exactly when a node is lost) stopped consuming for 15-17 s
(tests/test_cluster.py, on two busy cores). A RabbitMQ cluster shares exchanges, queues
and bindings between its nodes (https://www.rabbitmq.com/docs/clustering: "all data/state
required for the operation of a RabbitMQ broker is replicated across all nodes"), so this
step does the same setup once, on the node the worker's consumer connection has just
reached; a worker that fails over to another node does it again there. One URL: the same
as Celery's own step.
"""

from typing import Any

from celery.utils.log import get_logger
from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.consumer.delayed_delivery import (
    MAX_RETRIES,
    RETRIED_EXCEPTIONS,
    RETRY_INTERVAL,
    DelayedDelivery,
)
from kombu.utils.functional import retry_over_time
from kombu.utils.url import maybe_sanitize_url

logger = get_logger(__name__)

CELERY_STEP = "celery.worker.consumer.delayed_delivery:DelayedDelivery"


class ConnectedNodeDelayedDelivery(DelayedDelivery):
    """Celery's DelayedDelivery step, on the node of the consumer's connection only (see the module docstring)."""

    def start(self, c: Any) -> None:
        """Declare and bind on `c.connection`'s node, with Celery's retries; a failure is logged, as Celery logs it.

        Raises ValueError, as Celery's step does, when the delayed-delivery settings are invalid.
        """
        self._validate_configuration(c.app)
        url = c.connection.as_uri(include_password=True)
        try:
            retry_over_time(
                self._setup_delayed_delivery,
                args=(c, url),
                catch=RETRIED_EXCEPTIONS,
                errback=self._on_retry,
                interval_start=RETRY_INTERVAL,
                max_retries=MAX_RETRIES,
            )
        except Exception as exc:
            logger.critical(
                "Failed to setup delayed delivery for %r: %s. Native delayed delivery will not be available.",
                maybe_sanitize_url(url),
                exc,
            )


class Consumer(CeleryConsumer):
    """Celery's consumer with ConnectedNodeDelayedDelivery in place of its DelayedDelivery step (worker_consumer)."""

    class Blueprint(CeleryConsumer.Blueprint):
        default_steps = [
            f"{__name__}:ConnectedNodeDelayedDelivery" if step == CELERY_STEP else step
            for step in CeleryConsumer.Blueprint.default_steps
        ]
