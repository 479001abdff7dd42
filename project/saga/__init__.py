"""What every saga step shares: the abort signal, the retry rule and the thin task wrapper.

A step task parses its JSON arguments, calls one service function and maps
what goes wrong (docs/design.md §3). Only a business outcome ends an order;
infrastructure never does:

* `ApplicationError` (insufficient stock, unknown product, bad arguments) and
  any other fault of the data or the code (a `DataError`, an `IntegrityError`,
  a bug): the service's failure note records why, and the step publishes
  ``orders.order_compensate`` with the reason in the message, so the reason
  reaches the order even when this service's database cannot take the note.
* a passing fault of the infrastructure (`is_transient`: a database refusing
  connections, read-only, full, or in contention; the broker unreachable or
  not confirming; a soft time limit while blocked): retried with capped
  exponential backoff and full jitter, for as long as the order's deadline
  (``deadline`` in the message, ORDER_DEADLINE_SECONDS after the order was
  placed) allows; after it, the order is compensated with a reason that says so.
  A worker lost mid-step is retried the same way (Celery's
  ``retry_on_worker_lost``); a hard time limit puts the message back (``acks_on_timeout``).
* `SagaAborted` (compensation already ran here for this order): the step is a
  no-op and the chain stops.

The next step of the chain is published by the step itself, inside the
task, so a broker that cannot take it makes the step retry (it is
idempotent) instead of failing the order (docs/celery.md 17).
"""

import logging
import math
import random
import time
from collections.abc import Callable
from typing import Any

from amqp.exceptions import AMQPError
from celery import Task
from celery.canvas import Signature, signature
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded
from django.conf import settings
from kombu.exceptions import OperationalError as BrokerOperationalError

from project import tracing
from project.db.errors import database_fault
from project.http.errors import ApplicationError
from project.lines import InvalidLines, NotPositiveInt, OrderLines, positive_int
from project.origin import signed_kwargs

from . import faults

logger = logging.getLogger("orderflow.saga")

#: What a publish raises when the broker cannot take a message: kombu's
#: connection errors, py-amqp's (refused, closed, a nack), and the socket's
#: (OSError covers ConnectionError, TimeoutError and a full disk under the file broker).
BROKER_ERRORS: tuple[type[BaseException], ...] = (BrokerOperationalError, AMQPError, OSError)

#: The longest text of an exception kept in a reason.
REASON_CHARS = 300

# Why an order was cancelled, as a class (docs/design.md, "Outcomes"): the reason says it in words.
#: a service refused the order (insufficient stock, an unknown product: an ApplicationError of a step)
CAUSE_REFUSED = "refused"
#: its owner or a staff user cancelled it (API or admin)
CAUSE_USER = "user"
#: its deadline passed (ORDER_DEADLINE_SECONDS) before the saga could complete
CAUSE_DEADLINE = "deadline"
#: a step failed for good on a fault that is neither a refusal nor passing (a DataError, a bug):
#: passing faults of the database or the broker are retried and never land here
CAUSE_INFRASTRUCTURE = "infrastructure"
CAUSES = (CAUSE_REFUSED, CAUSE_USER, CAUSE_DEADLINE, CAUSE_INFRASTRUCTURE)


class SagaAborted(Exception):
    """The step arrived after its undo: do nothing and stop the chain."""


class InvalidMessage(ApplicationError):
    code = "invalid_message"


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` is a passing fault of the infrastructure, which running the step again can get past.

    A database's passing faults (project.db.errors.database_fault: unavailable,
    read-only, disk full, contention), a broker error (BROKER_ERRORS), and
    Celery's soft time limit (a step blocked on a lock past
    CELERY_TASK_SOFT_TIME_LIMIT). Anything else is a fault of the data or
    the code.
    """
    if isinstance(exc, SoftTimeLimitExceeded):
        return True
    if database_fault(exc):
        return True
    return isinstance(exc, BROKER_ERRORS)


def backoff_seconds(retries: int) -> float:
    """The delay before retry number `retries + 1`, in seconds.

    Exponential (SAGA_RETRY_BACKOFF_SECONDS × 2^retries), capped at
    SAGA_RETRY_BACKOFF_MAX_SECONDS, with jitter over the upper half so
    steps that failed together do not retry together. On quorum queues
    (settings.QUORUM_QUEUES) rounded up to whole seconds, at least 1.
    """
    ceiling = min(
        settings.SAGA_RETRY_BACKOFF_MAX_SECONDS,
        settings.SAGA_RETRY_BACKOFF_SECONDS * (2 ** min(retries, 32)),
    )
    delay = random.uniform(ceiling / 2, ceiling)
    if settings.QUORUM_QUEUES:
        # Native delayed delivery counts whole seconds (kombu's calculate_routing_key takes
        # int(countdown)), and Celery 5.7 raises ValueError for 0 < countdown < 1 on quorum
        # queues: round up, so the message never arrives before its ETA and waits in a worker.
        return float(math.ceil(delay))
    return delay


def human_duration(seconds: float) -> str:
    """``10800`` → ``"3 h"``, ``5400`` → ``"1 h 30 min"``, ``90`` → ``"90 s"``: for reasons people read."""
    seconds = round(seconds)
    if seconds < 120:
        return f"{seconds} s"
    hours, minutes = divmod(seconds // 60, 60)
    if not hours:
        return f"{minutes} min"
    return f"{hours} h" + (f" {minutes} min" if minutes else "")


def deadline_context(placed_at: float) -> dict[str, float]:
    """The saga context a forward step's message carries: ``{"placed_at", "deadline"}`` in Unix seconds.

    `placed_at` is when the order was placed; the deadline is ORDER_DEADLINE_SECONDS later.
    """
    return {"placed_at": placed_at, "deadline": placed_at + settings.ORDER_DEADLINE_SECONDS}


def describe(exc: BaseException) -> str:
    """``"OperationalError: connection refused"``: an exception's type and the first line of its text."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if len(text) > REASON_CHARS:
        text = text[:REASON_CHARS] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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


def _deadline_arg(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


class SagaStep(Task):
    """Base class of saga step tasks: `run_step` does the work.

    A step task takes ``order_id``, its own arguments, and the saga's context
    as keywords: ``deadline`` (Unix seconds; forward steps only) and
    ``last_error`` (what made the previous attempt retry), passed on to `run_step`.
    """

    # Redelivered after a worker crash (docs/celery.md 6), with backoff (signature_from_request).
    acks_late = True
    reject_on_worker_lost = True
    retry_on_worker_lost = True
    # A hard time limit puts the message back: a step blocked past it runs again.
    acks_on_timeout = False
    # No count: retries end at the order's deadline (forward steps) or never (undo steps).
    max_retries = None
    default_retry_delay = settings.SAGA_RETRY_BACKOFF_SECONDS
    # Business errors are expected outcomes: logged without a traceback.
    throws = (ApplicationError,)
    # A worker runs a step only with a proof that orderflow sent it (project/admission.py).
    requires_origin = True

    #: service function that records why this step failed for an order
    #: (keyword arguments order_id, reason), in the step's own database.
    failure_note: Callable[..., None] | None = None
    #: A forward step compensates the order when it fails for good; an undo
    #: step (and order_compensate itself) never gives up: it retries, and the
    #: sweeper re-publishes compensation for an order left `cancelling`.
    compensates = True

    def run_step(
        self,
        order_id: Any,
        call: Callable[[], Any],
        *,
        deadline: Any = None,
        placed_at: Any = None,
        last_error: str = "",
        **_: Any,
    ) -> Any:
        """Run `call()` for the order, publish the chain's next step, and map what goes wrong (the module's docstring).

        `deadline` is the order's deadline and `placed_at` when it was placed,
        in Unix seconds (None: no deadline, as for undo steps and messages from
        before deadlines existed); `last_error` says why the previous attempt retried.
        """
        try:
            order_id = order_id_arg(order_id)
        except InvalidMessage as exc:
            # A poison message: refuse it once, loudly, without requeueing.
            logger.error("%s rejected a malformed message %s: %s", self.name, self.request.id, exc)
            raise Reject(str(exc), requeue=False) from exc
        # The step's span (the Celery instrumentation's) names the order and the step.
        tracing.annotate(order_id=order_id, saga_step=self.name.rpartition(".")[2])
        deadline = _deadline_arg(deadline)
        placed_at = _deadline_arg(placed_at)
        # On the request, not the task: a threads pool runs several at once.
        self.request.saga_allowed = (deadline - placed_at) if deadline is not None and placed_at is not None else None
        if self._past(deadline):
            self._fail(order_id, self._deadline_reason(last_error or "no earlier error"), None, CAUSE_DEADLINE)
        try:
            faults.inject(self.name, order_id)
            result = call()
            faults.inject(f"{self.name}:after", order_id)
        except SagaAborted as exc:
            logger.info("%s for order %s skipped: %s", self.name, order_id, exc)
            self.request.chain = None
            raise Ignore() from exc
        except ApplicationError as exc:
            logger.warning("%s for order %s failed: %s", self.name, order_id, exc)
            self._fail(order_id, str(exc), exc, CAUSE_REFUSED)
        except Exception as exc:
            if is_transient(exc):
                self._retry(order_id, exc, deadline)
            logger.exception("%s for order %s failed", self.name, order_id)
            self._fail(order_id, f"{self.name} failed: {describe(exc)}", exc, CAUSE_INFRASTRUCTURE)
        self._continue(order_id, deadline)
        return result

    # --- the ways a step ends ---------------------------------------------------------

    def _past(self, deadline: float | None) -> bool:
        return self.compensates and deadline is not None and time.time() > deadline

    def _deadline_reason(self, cause: str) -> str:
        allowed = getattr(self.request, "saga_allowed", None) or settings.ORDER_DEADLINE_SECONDS
        return f"order deadline passed after {human_duration(allowed)}: {self.name} could not complete ({cause})"

    def _continue(self, order_id: int, deadline: float | None) -> None:
        """Publish the chain's next step now; a broker that cannot take it makes this step retry."""
        chain = self.request.chain
        if not chain:
            return
        try:
            self.publish(signature(chain[-1], app=self.app), chain=chain[:-1] or None)
        except BROKER_ERRORS as exc:
            self._retry(order_id, exc, deadline)
        self.request.chain = None  # published: Celery's trace must not publish it again

    def _retry(self, order_id: int, exc: BaseException, deadline: float | None) -> None:
        """Run the step again after a backoff; past the deadline, fail the order instead. Always raises."""
        cause = describe(exc)
        if self._past(deadline):
            self._fail(order_id, self._deadline_reason(cause), exc, CAUSE_DEADLINE)
        countdown = backoff_seconds(self.request.retries)
        kwargs = {**(self.request.kwargs or {}), "last_error": cause}
        retry = self.signature_from_request(
            self.request, None, kwargs, countdown=countdown, retries=self.request.retries + 1
        )
        try:
            self.publish(retry)
        except BROKER_ERRORS as publish_error:
            # Celery's own retry would drop the message here (Task.retry: Reject(requeue=False)).
            # Put it back instead: it runs again when a worker takes it.
            logger.warning("%s for order %s: the retry could not be published (%s); requeued", self.name, order_id,
                           describe(publish_error))  # fmt: skip
            raise Reject(cause, requeue=True) from exc
        logger.warning(
            "%s for order %s hit %s, retry %d in %.2fs", self.name, order_id, cause, self.request.retries + 1, countdown
        )
        raise Retry(exc=exc, when=countdown, sig=retry) from exc

    def _fail(self, order_id: int, reason: str, exc: BaseException | None, cause: str) -> None:
        """End the order's saga here for `reason` (one of CAUSES): note it, compensate with both, fail the task.

        Always raises.
        """
        self._note_failure(order_id, reason)
        self.request.saga_cause = cause  # the failure's class, for project.metrics
        tracing.annotate(step_outcome="failed", cancel_cause=cause)
        self.request.chain = None
        self.request.errbacks = None  # the reason travels in our own message (messages from older chains had one)
        if self.compensates:
            name, args = "orders.order_compensate", (order_id,)
            kwargs = signed_kwargs(name, args, {"failure": reason, "cause": cause})
            compensation = self.app.signature(name, args=args, kwargs=kwargs, immutable=True)
            try:
                self.publish(compensation)
            except BROKER_ERRORS as publish_error:
                # Not compensated yet: run the step again later (it fails the same way, idempotently).
                self._retry(order_id, publish_error, None)
        else:
            logger.error("%s for order %s failed and will be retried by the sweeper: %s", self.name, order_id, reason)
        if exc is None:
            raise Ignore()
        raise exc

    def publish(self, message: Signature, **options: Any) -> None:
        """Publish a message this step sends (its successor, its retry, a compensation) as this step's child.

        Raises one of BROKER_ERRORS when the broker cannot take it within the publish timeout.
        """
        if "task_id" not in message.options:  # a retry keeps its task id
            options.setdefault("parent_id", self.request.id)
            options.setdefault("root_id", self.request.root_id or self.request.id)
        message.apply_async(**options)

    def _note_failure(self, order_id: int, reason: str) -> None:
        if self.failure_note is None:
            return
        try:
            type(self).failure_note(order_id=order_id, reason=reason)
        except Exception:  # the reason still travels in the compensation message
            logger.warning("%s could not note the failure of order %s", self.name, order_id, exc_info=True)

    def signature_from_request(self, request=None, args=None, kwargs=None, queue=None, **options):
        """Celery's, with backoff for a retry after a lost worker.

        celery.worker.request.Request._retry_worker_lost calls this with no
        `kwargs` and ``countdown=default_retry_delay`` (Celery 5.7); `_retry`
        always passes `kwargs`. The retry says why in ``last_error``.
        """
        if kwargs is None and "countdown" in options:
            request = self.request if request is None else request
            kwargs = {**(request.kwargs or {}), "last_error": "its worker process was lost"}
            options["countdown"] = backoff_seconds(request.retries or 0)
        return super().signature_from_request(request, args, kwargs, queue, **options)
