"""Orders' broker endpoints: confirm, compensate, delete, and the sweeper."""

from celery import shared_task

from project.saga import SagaStep, order_id_arg

from . import services


class OrdersStep(SagaStep):
    failure_note = staticmethod(services.order_failure_note)


@shared_task(bind=True, base=OrdersStep, name="orders.order_confirm")
def order_confirm(self, order_id):
    return self.run_step(order_id, lambda: services.order_confirm(order_id=order_id))


# One positional parameter only: as an immutable error callback it must be
# published through the broker, not called inline (docs/celery.md 2;
# celery.backends.base._call_task_errbacks counts the positional parameters).
@shared_task(bind=True, base=OrdersStep, name="orders.order_compensate")
def order_compensate(self, order_id, *, reason="", force=False):
    return self.run_step(
        order_id,
        lambda: services.order_compensate(order_id=order_id, reason=str(reason), force=bool(force)),
    )


@shared_task(bind=True, base=OrdersStep, name="orders.order_delete")
def order_delete(self, order_id):
    self.run_step(order_id, lambda: services.order_delete(order_id=order_id))


@shared_task(name="orders.saga_sweep", ignore_result=True)
def saga_sweep():
    return services.saga_sweep()


__all__ = ["order_compensate", "order_confirm", "order_delete", "order_id_arg", "saga_sweep"]
