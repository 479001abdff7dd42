"""Inventory's broker endpoints: reserve and release stock for an order."""

from celery import shared_task

from project.saga import SagaStep

from . import services


class InventoryStep(SagaStep):
    failure_note = staticmethod(services.stock_failure_note)


@shared_task(bind=True, base=InventoryStep, name="inventory.stock_reserve")
def stock_reserve(self, order_id, lines=None):
    return self.run_step(order_id, lambda: services.stock_reserve(order_id=order_id, lines=lines))


@shared_task(bind=True, base=InventoryStep, name="inventory.stock_release")
def stock_release(self, order_id):
    return self.run_step(order_id, lambda: services.stock_release(order_id=order_id))
