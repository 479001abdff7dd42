"""Reports' broker endpoints: count and uncount sales, follow product events."""

import logging

from celery import shared_task
from celery.exceptions import Reject

from project.lines import NotPositiveInt, positive_int
from project.saga import SagaStep, backoff_seconds, is_transient

from . import services

logger = logging.getLogger(__name__)


class ReportsStep(SagaStep):
    failure_note = staticmethod(services.sale_failure_note)


@shared_task(bind=True, base=ReportsStep, name="reports.sale_record")
def sale_record(self, order_id, lines=None, **saga):
    return self.run_step(order_id, lambda: services.sale_record(order_id=order_id, lines=lines), **saga)


@shared_task(bind=True, base=ReportsStep, name="reports.sale_revert", compensates=False)
def sale_revert(self, order_id, **saga):
    return self.run_step(order_id, lambda: services.sale_revert(order_id=order_id), **saga)


# requires_origin: run only with inventory's proof that it sent the event (project/admission.py).
@shared_task(bind=True, name="reports.product_sync", acks_late=True, max_retries=10, requires_origin=True)
def product_sync(self, product_id=None, name=None, version=None, **extra):
    try:
        positive_int(product_id, "product_id")
        positive_int(version, "version", minimum=0)
        valid = isinstance(name, str) and bool(name)
    except NotPositiveInt:
        valid = False
    if not valid:
        logger.error(
            "reports.product_sync rejected a malformed event %s: %r",
            self.request.id,
            {"product_id": product_id, "name": name, "version": version},
        )
        raise Reject("malformed product event", requeue=False)
    try:
        services.product_sync(product_id=product_id, name=name, version=version)
    except Exception as exc:
        if not is_transient(exc):
            raise
        raise self.retry(exc=exc, countdown=backoff_seconds(self.request.retries)) from exc
