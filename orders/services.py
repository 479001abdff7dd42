"""Orders' writes: taking an order, confirming it, and compensating it.

`order_create` is the only way an order comes to exist (API and admin alike):
it commits the order and, on commit, publishes the saga. The order row is the
outbox record: `saga_sweep` re-dispatches pending orders whose dispatch is
older than the saga timeout, then compensates them.
"""

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.utils import timezone

from inventory import public as inventory
from project.db import Statement, after_commit, service_db
from project.http.errors import Conflict, InvalidInput
from project.lines import InvalidLines, OrderLines
from project.saga import SagaAborted, faults
from reports import public as reports

from .models import CancelledOrder, Order, OrderLine
from .saga import compensation_saga, order_saga

logger = logging.getLogger(__name__)

PENDING = Order.Status.PENDING
CONFIRMED = Order.Status.CONFIRMED
CANCELLING = Order.Status.CANCELLING
USER_CANCEL_REASON = "cancelled by user"


def _db() -> str:
    return service_db("orders")


@dataclass(frozen=True)
class PlacedOrder:
    """What order_create did: the order (or its cancelled record) and whether it is new."""

    order: Order | None
    cancelled: CancelledOrder | None
    created: bool


def _fingerprint(wanted: dict[int, int]) -> str:
    canonical = json.dumps(sorted(wanted.items()), separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _replay(user: AbstractBaseUser, key: str, fingerprint: str) -> PlacedOrder | None:
    """The order an earlier request with this Idempotency-Key made, if any."""
    order = Order.objects.using(_db()).filter(user=user, idempotency_key=key).first()
    cancelled = None
    if order is None:
        cancelled = CancelledOrder.objects.using(_db()).filter(user=user, idempotency_key=key).first()
        if cancelled is None:
            return None
    previous = order.request_fingerprint if order else cancelled.request_fingerprint
    if previous != fingerprint:
        raise Conflict("This Idempotency-Key was already used with a different request body.")
    return PlacedOrder(order=order, cancelled=cancelled, created=False)


def _publish(saga, order_id: int) -> None:
    faults.inject("orders.dispatch", order_id)  # drills: die between commit and publish
    saga.apply_async()


def _dispatch(order: Order, lines: list[OrderLine] | None = None) -> None:
    """Publish the saga once the order's transaction commits.

    robust: if the broker is down the order is still committed and the client
    still gets its 202; the order stays pending and the sweeper publishes it.
    """
    after_commit(_db(), _publish, order_saga(order, lines), order.pk, robust=True)


def order_create(*, user: AbstractBaseUser, lines: OrderLines | Any, idempotency_key: str | None = None) -> PlacedOrder:
    """Commit a pending order with price/name snapshots, then start the saga.

    `lines` is the OrderLines the edge built (the API's serializer); anything
    else (the admin's form, the bench: JSON-like lines) is parsed into one
    here, by the same rules, and refused with InvalidInput.
    """
    if not isinstance(lines, OrderLines):
        try:
            lines = OrderLines.parse(lines)
        except InvalidLines as exc:
            raise InvalidInput(exc.message, fields=exc.fields) from exc
    wanted = lines.as_dict()
    fingerprint = _fingerprint(wanted)
    if idempotency_key is not None:
        if not idempotency_key or len(idempotency_key) > 255:
            raise InvalidInput(
                "The Idempotency-Key header must be 1 to 255 characters.",
                fields={"Idempotency-Key": ["1 to 255 characters."]},
            )
        replay = _replay(user, idempotency_key, fingerprint)
        if replay:
            return replay

    products = inventory.product_snapshots(list(wanted))
    errors = {}
    for index, product_id in enumerate(wanted):
        snapshot = products.get(product_id)
        if snapshot is None:
            errors[str(index)] = {"product": [f"Unknown product {product_id}."]}
        elif not snapshot.active:
            errors[str(index)] = {"product": [f"Product {product_id} is not on sale."]}
    if errors:
        raise InvalidInput("Some lines are not valid.", fields={"lines": errors})

    try:
        with transaction.atomic(using=_db()):
            order = Order(
                user=user,
                idempotency_key=idempotency_key,
                request_fingerprint=fingerprint,
                dispatch_attempts=1,
                last_dispatched_at=timezone.now(),
            )
            order.save(using=_db(), force_insert=True)
            # bulk_create reads the new keys back (RETURNING) on PostgreSQL and SQLite alike.
            created_lines = OrderLine.objects.using(_db()).bulk_create(
                [
                    OrderLine(
                        order=order,
                        product_id=product_id,
                        product_name=products[product_id].name,
                        unit_price=products[product_id].price,
                        quantity=quantity,
                    )
                    for product_id, quantity in wanted.items()
                ]
            )
            _dispatch(order, created_lines)
    except IntegrityError:
        # Two requests with one Idempotency-Key raced; the other one won.
        if idempotency_key is None:
            raise
        replay = _replay(user, idempotency_key, fingerprint)
        if replay is None:
            raise
        return replay
    logger.info("order %s placed by %s: %s", order.pk, user, wanted)
    return PlacedOrder(order=order, cancelled=None, created=True)


# pending → confirmed: ``filter(pk=…, status=PENDING).update(…)``, its SQL built
# once (project.db.Statement; the A/B in docs/performance.md).
_CONFIRM = Statement(
    Order,
    "UPDATE {table} SET {status} = %s, {confirmed_at} = %s, {updated_at} = %s WHERE {id} = %s AND {status} = %s",
    params=["status", "confirmed_at", "updated_at", "id", "status"],
)


def order_confirm(*, order_id: int) -> str:
    """The saga's last step: pending → confirmed. A no-op when already confirmed.

    One conditional UPDATE (the row lock is the statement's own); only when it
    changed nothing is the order read to tell a duplicate from an abort.
    """
    now = timezone.now()
    if _CONFIRM.execute(CONFIRMED, now, now, order_id, PENDING, using=_db()):
        return CONFIRMED
    if Order.objects.using(_db()).filter(pk=order_id, status=CONFIRMED).exists():
        return CONFIRMED
    raise SagaAborted(f"order {order_id} is being cancelled or gone")


def order_compensate(*, order_id: int, reason: str = "", force: bool = False, robust: bool = False) -> bool:
    """Mark the order `cancelling` and publish the compensation chain.

    Runs from the saga's error callback (possibly more than once for one
    failure: docs/celery.md 3), from a user's cancel (`force`: a confirmed order
    is undone too) and from the sweeper. A confirmed order is left alone
    unless forced: its saga finished, whatever a late error callback says.
    Returns whether compensation was published.
    """
    with transaction.atomic(using=_db()):
        order = Order.objects.using(_db()).select_for_update().filter(pk=order_id).first()
        if order is None:
            if not CancelledOrder.objects.using(_db()).filter(pk=order_id).exists():
                logger.error("compensation asked for unknown order %s", order_id)
            return False
        if order.status == CONFIRMED and not force:
            logger.warning("order %s is confirmed; late compensation request ignored", order_id)
            return False
        if order.status != CANCELLING or (reason and not order.cancel_reason):
            if order.status != CANCELLING:
                order.cancelled_from = order.status
            order.status = CANCELLING
            order.cancel_reason = order.cancel_reason or reason
            order.save(using=_db(), update_fields=["status", "cancelled_from", "cancel_reason", "updated_at"])
        # A task wants a publish failure raised (it retries); a web request
        # (robust) wants its 202: the order is `cancelling` either way and the
        # sweeper re-publishes compensation for orders left so.
        after_commit(_db(), compensation_saga(order_id).apply_async, robust=robust)
    logger.info("order %s: compensation started (%s)", order_id, reason or "a saga step failed")
    return True


def _cancel_reason(order: Order) -> str:
    return (
        order.cancel_reason
        or inventory.order_failure_reason(order.pk)
        or reports.order_failure_reason(order.pk)
        or order.failure_reason
        or "the order could not be completed (no step recorded a reason)"
    )


def order_delete(*, order_id: int) -> CancelledOrder | None:
    """Compensation's last step: keep everything about the order, then delete it."""
    with transaction.atomic(using=_db()):
        order = Order.objects.using(_db()).select_for_update().filter(pk=order_id).first()
        if order is None:
            return CancelledOrder.objects.using(_db()).filter(pk=order_id).first()
        if order.status != CANCELLING:
            # Only compensation deletes, and it marks the order first; a stray
            # delete must not orphan what a running saga holds.
            raise SagaAborted(f"order {order_id} is {order.status}, not cancelling")
        cancelled = CancelledOrder.objects.using(_db()).create(
            order_id=order.pk,
            user=order.user,
            username=order.user.get_username(),
            idempotency_key=order.idempotency_key,
            request_fingerprint=order.request_fingerprint,
            lines=[
                {
                    "product": line.product_id,
                    "product_name": line.product_name,
                    "unit_price": str(line.unit_price),
                    "quantity": line.quantity,
                }
                for line in order.lines.all()
            ],
            reason=_cancel_reason(order),
            # A user's or the sweeper's cancel is the reason even if a step failed too.
            refusal=[] if order.cancel_reason else inventory.order_refusal(order.pk),
            status_before=order.cancelled_from or order.status,
            dispatch_attempts=order.dispatch_attempts,
            created_at=order.created_at,
        )
        order.delete()
    logger.info("order %s deleted: %s", order_id, cancelled.reason)
    return cancelled


def order_failure_note(*, order_id: int, reason: str) -> None:
    """Keep why the orders step failed (the first reason wins)."""
    Order.objects.using(_db()).filter(pk=order_id, failure_reason="").update(failure_reason=reason)


def order_cancel(*, order: Order) -> bool:
    """A user's or staff's cancel: undo whatever the saga did and delete the order."""
    return order_compensate(order_id=order.pk, reason=USER_CANCEL_REASON, force=True, robust=True)


def order_redispatch(*, order_id: int, dispatched_before=None) -> bool:
    """Publish the saga again for a pending order (the sweeper, or staff in the admin).

    `dispatched_before` (the sweeper's cutoff) is checked under the row lock, so
    two overlapping sweeps cannot both count a dispatch for the same order.
    """
    with transaction.atomic(using=_db()):
        orders = Order.objects.using(_db()).select_for_update().filter(pk=order_id, status=PENDING)
        if dispatched_before is not None:
            orders = orders.filter(Q(last_dispatched_at__lt=dispatched_before) | Q(last_dispatched_at=None))
        order = orders.first()
        if order is None:
            return False
        order.dispatch_attempts = F("dispatch_attempts") + 1
        order.last_dispatched_at = timezone.now()
        order.save(using=_db(), update_fields=["dispatch_attempts", "last_dispatched_at", "updated_at"])
        _dispatch(order)
    logger.warning("order %s re-dispatched", order_id)
    return True


def saga_sweep(*, now=None) -> dict[str, int]:
    """Move every stuck order on: re-dispatch, compensate, or re-publish compensation.

    A `pending` order whose last dispatch is older than SAGA_TIMEOUT_SECONDS
    is dispatched again while it has had fewer than SAGA_MAX_ATTEMPTS
    dispatches, and compensated after that. A `cancelling` order untouched for
    as long gets its compensation chain published again (every undo is
    idempotent).
    """
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.SAGA_TIMEOUT_SECONDS)
    stuck = Order.objects.using(_db()).filter(
        Q(last_dispatched_at__lt=cutoff) | Q(last_dispatched_at=None), status=PENDING
    )
    counts = {"redispatched": 0, "compensated": 0, "recompensated": 0}
    for order_id, attempts in stuck.values_list("pk", "dispatch_attempts")[:500]:
        if attempts < settings.SAGA_MAX_ATTEMPTS:
            counts["redispatched"] += order_redispatch(order_id=order_id, dispatched_before=cutoff)
        else:
            reason = f"the saga did not finish after {attempts} dispatches; timed out"
            counts["compensated"] += order_compensate(order_id=order_id, reason=reason)
    stale = Order.objects.using(_db()).filter(status=CANCELLING, updated_at__lt=cutoff)
    for order_id in stale.values_list("pk", flat=True)[:500]:
        Order.objects.using(_db()).filter(pk=order_id).update(updated_at=now)
        counts["recompensated"] += order_compensate(order_id=order_id)
    if any(counts.values()):
        logger.warning("saga sweep: %s", counts)
    return counts
