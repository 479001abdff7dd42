"""The two chains of the order saga, built from task names (docs/design.md §1).

Services never import each other's tasks: a chain names each step
(``inventory.stock_reserve``…) and `task_routes` puts each on its own service's
queue as it is published (docs/celery.md 9), so no ``queue=`` is passed here.
"""

from celery import chain
from celery.canvas import Signature

from project.celery import app
from project.origin import signed_kwargs
from project.saga import deadline_context

from .models import Order, OrderLine


def _step(name: str, **kwargs) -> Signature:
    # Immutable: a step gets its own JSON arguments, never the previous result. Signed:
    # the step's worker runs it only with this proof that orders sent it (project/origin.py).
    return app.signature(name, kwargs=signed_kwargs(name, kwargs=kwargs), immutable=True)


def order_saga(order: Order, lines: list[OrderLine] | None = None) -> Signature:
    """stock_reserve → sale_record → order_confirm; each step carries the order's deadline.

    No error callback: a step that fails for good publishes
    ``orders.order_compensate`` itself, with the reason in the message
    (project.saga.SagaStep), and a step that cannot publish its successor
    retries instead of failing the order (docs/celery.md 17).
    """
    if lines is None:  # order_create passes the lines it just wrote: no query
        lines = order.lines.all()
    lines = sorted(lines, key=lambda line: line.product_id)
    context = deadline_context(order.created_at.timestamp())
    return chain(
        _step(
            "inventory.stock_reserve",
            order_id=order.pk,
            lines=[{"product": line.product_id, "quantity": line.quantity} for line in lines],
            **context,
        ),
        _step(
            "reports.sale_record",
            order_id=order.pk,
            lines=[
                {
                    "product": line.product_id,
                    "quantity": line.quantity,
                    "unit_price": str(line.unit_price),
                    "product_name": line.product_name,
                }
                for line in lines
            ],
            **context,
        ),
        _step("orders.order_confirm", order_id=order.pk, **context),
    )


def compensation_saga(order_id: int) -> Signature:
    """sale_revert → stock_release → order_delete: each undo decides from its own data.

    No deadline: an undo retries until it is done.
    """
    return chain(
        _step("reports.sale_revert", order_id=order_id),
        _step("inventory.stock_release", order_id=order_id),
        _step("orders.order_delete", order_id=order_id),
    )
