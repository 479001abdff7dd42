"""Inventory's broker endpoints: reserve and release stock for an order."""

from celery import shared_task

from project.saga import SagaStep

from . import services


class InventoryStep(SagaStep):
    failure_note = staticmethod(services.stock_failure_note)


# `saga`: the saga's context (deadline, last_error), read by SagaStep.run_step.
@shared_task(bind=True, base=InventoryStep, name="inventory.stock_reserve")
def stock_reserve(self, order_id, lines=None, **saga):
    return self.run_step(order_id, lambda: services.stock_reserve(order_id=order_id, lines=lines), **saga)


@shared_task(bind=True, base=InventoryStep, name="inventory.stock_release", compensates=False)
def stock_release(self, order_id, **saga):
    return self.run_step(order_id, lambda: services.stock_release(order_id=order_id), **saga)
