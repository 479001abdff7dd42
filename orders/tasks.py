"""Orders' broker endpoints: confirm, compensate, delete, and the sweeper."""

import logging

from celery import shared_task

from project import metrics, tracing
from project.saga import SagaStep, describe, is_transient, order_id_arg

from . import services
from .models import CancelCause

logger = logging.getLogger(__name__)


class OrdersStep(SagaStep):
    failure_note = staticmethod(services.order_failure_note)


def _confirm(order_id: int) -> str:
    outcome = services.order_confirm(order_id=order_id)
    tracing.annotate(outcome=outcome)  # "confirmed": how the order ended, on the step that ended it
    return outcome


def _delete(order_id: int) -> None:
    cancelled = services.order_delete(order_id=order_id)
    if cancelled is not None:
        tracing.annotate(outcome="cancelled", cancel_cause=cancelled.cause)


# `saga`: the saga's context (deadline, last_error), read by SagaStep.run_step.
@shared_task(bind=True, base=OrdersStep, name="orders.order_confirm")
def order_confirm(self, order_id, **saga):
    return self.run_step(order_id, lambda: _confirm(order_id), **saga)


# `failure`: why a step failed for good, and `cause` its class, carried in the message by the step that
# published it (project.saga.SagaStep._fail), so it reaches the order even when that
# step's database could not take the note. One positional parameter, as when this
# was an error callback (docs/celery.md 2): messages from older chains still call it so.
@shared_task(bind=True, base=OrdersStep, name="orders.order_compensate", compensates=False)
def order_compensate(self, order_id, *, reason="", force=False, failure="", cause="", **saga):
    # An unknown `cause` (a newer worker's class) is read from the words instead.
    cause = cause if cause in CancelCause.values else ""
    return self.run_step(
        order_id,
        lambda: services.order_compensate(
            order_id=order_id, reason=str(reason), force=bool(force), failure=str(failure), cause=cause
        ),
        **saga,
    )


@shared_task(bind=True, base=OrdersStep, name="orders.order_delete", compensates=False)
def order_delete(self, order_id, **saga):
    self.run_step(order_id, lambda: _delete(order_id), **saga)


@shared_task(name="orders.saga_sweep", ignore_result=True)
def saga_sweep():
    """One sweep (orders.services.saga_sweep); while the database or broker is away, one line and the next sweep."""
    try:
        counts = services.saga_sweep()
        metrics.sweep_counted(counts)  # each action committed in its own transaction inside the sweep
        return counts
    except Exception as exc:
        if not is_transient(exc):
            raise
        logger.warning("saga sweep skipped: %s", describe(exc))
        return None


__all__ = ["order_compensate", "order_confirm", "order_delete", "order_id_arg", "saga_sweep"]
