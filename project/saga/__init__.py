"""What every saga step shares: the abort signal and the thin task wrapper.

A step task parses its JSON arguments, calls one service function and maps
what goes wrong (docs/design.md §3):

* `ApplicationError` (insufficient stock, unknown product, bad arguments):
  the service's failure note records why, then the task fails at once, so
  the chain stops and its immutable error callback (`orders.order_compensate`)
  is published through the broker.
* transient errors (database or broker unreachable): retried with
  exponential backoff and full jitter, at most SAGA_STEP_MAX_RETRIES times;
  the last failure is noted and fails the task like a business error.
* `SagaAborted` (compensation already ran here for this order): the step is a
  no-op and the chain stops without calling the error callback again.
"""

import logging
import random
from collections.abc import Callable
from typing import Any

from amqp.exceptions import ConnectionError as AMQPConnectionError
from billiard.exceptions import WorkerLostError
from celery import Task
from celery.exceptions import Ignore, Reject
from celery.signals import task_failure
from django.conf import settings
from django.db import InterfaceError, OperationalError
from kombu.exceptions import OperationalError as BrokerOperationalError

from project.http.errors import ApplicationError
from project.lines import InvalidLines, NotPositiveInt, OrderLines, positive_int

from . import faults

logger = logging.getLogger("orderflow.saga")

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OperationalError,
    InterfaceError,
    BrokerOperationalError,
    AMQPConnectionError,
    ConnectionError,
    TimeoutError,
)


class SagaAborted(Exception):
    """The step arrived after its undo: do nothing and stop the chain."""


class InvalidMessage(ApplicationError):
    code = "invalid_message"


def backoff_seconds(retries: int) -> float:
    """Exponential backoff with full jitter, capped."""
    ceiling = min(
        settings.SAGA_RETRY_BACKOFF_MAX_SECONDS,
        settings.SAGA_RETRY_BACKOFF_SECONDS * (2**retries),
    )
    return random.uniform(ceiling / 2, ceiling)


# --- parsing a step's JSON message (one parser for every step) ---------------------


def order_id_arg(value: Any) -> int:
    """A message's order id, or InvalidMessage (the step rejects the message)."""
    try:
        return positive_int(value, "order_id")
    except NotPositiveInt as exc:
        raise InvalidMessage(str(exc)) from exc


def step_lines(data: Any) -> OrderLines:
    """A message's ``lines`` as OrderLines (the rules of project.lines), or InvalidMessage saying why."""
    try:
        return OrderLines.parse(data, limits=False)
    except InvalidLines as exc:
        raise InvalidMessage(exc.problem) from exc


class SagaStep(Task):
    """Base class of saga step tasks: `run_step` does the work."""

    # Redelivered after a worker crash; bounded so a step that always kills
    # its worker ends in compensation instead of looping (docs/celery.md 6).
    acks_late = True
    reject_on_worker_lost = True
    retry_on_worker_lost = True
    # Bounds both transient-error retries and worker-lost redeliveries.
    max_retries = settings.SAGA_STEP_MAX_RETRIES
    # The delay before a step whose worker died runs again (Celery's default is 180 s).
    default_retry_delay = settings.SAGA_RETRY_BACKOFF_SECONDS
    # Business errors are expected outcomes: logged without a traceback.
    throws = (ApplicationError,)

    #: service function that records why this step failed for an order,
    #: so compensation can tell the user (keyword arguments order_id, reason).
    failure_note: Callable[..., None] | None = None

    def run_step(self, order_id: Any, call: Callable[[], Any]) -> Any:
        try:
            order_id = order_id_arg(order_id)
        except InvalidMessage as exc:
            # A poison message: refuse it once, loudly, without requeueing.
            logger.error("%s rejected a malformed message %s: %s", self.name, self.request.id, exc)
            raise Reject(str(exc), requeue=False) from exc
        try:
            faults.inject(self.name, order_id)
            result = call()
            faults.inject(f"{self.name}:after", order_id)
            return result
        except SagaAborted as exc:
            logger.info("%s for order %s skipped: %s", self.name, order_id, exc)
            raise Ignore() from exc
        except ApplicationError as exc:
            logger.warning("%s for order %s failed: %s", self.name, order_id, exc)
            self._note_failure(order_id, str(exc))
            raise
        except TRANSIENT_ERRORS as exc:
            max_retries = self.max_retries
            if self.request.retries >= max_retries:
                reason = f"{self.name} gave up after {max_retries} retries: {type(exc).__name__}: {exc}"
                logger.error("order %s: %s", order_id, reason)
                self._note_failure(order_id, reason)
                raise
            countdown = backoff_seconds(self.request.retries)
            logger.warning(
                "%s for order %s hit %s, retry %d in %.2fs",
                self.name,
                order_id,
                type(exc).__name__,
                self.request.retries + 1,
                countdown,
            )
            raise self.retry(exc=exc, countdown=countdown) from exc

    def _note_failure(self, order_id: int, reason: str) -> None:
        if self.failure_note is None:
            return
        try:
            type(self).failure_note(order_id=order_id, reason=reason)
        except Exception:  # the failure itself must still propagate
            logger.exception("%s could not record the failure of order %s", self.name, order_id)


@task_failure.connect
def _note_worker_lost(sender=None, exception=None, args=None, kwargs=None, **_):
    """A step that kept killing its worker failed for good: say so in the order's record.

    Runs in the worker's main process after the error callback was published
    (compensation reads the note three hops later).
    """
    if not isinstance(sender, SagaStep) or not isinstance(exception, WorkerLostError):
        return
    order_id = (kwargs or {}).get("order_id", args[0] if args else None)
    try:
        order_id = order_id_arg(order_id)
    except InvalidMessage:
        return
    sender._note_failure(order_id, f"{sender.name} failed: its worker process died each time it ran ({exception})")
