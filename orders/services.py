"""Orders' writes: taking an order, confirming it, and compensating it.

`order_create` is the only way an order comes to exist (API and admin alike):
it commits the order and, on commit, publishes the saga. The order row is the
outbox record: `saga_sweep` publishes the saga of an order whose publish
failed, re-sends a saga only when nothing holds it any more, and cancels an
order at its deadline (docs/design.md, "The order row is the outbox record").
"""

import hashlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.db.models.functions import Now
from django.utils import timezone

from inventory import public as inventory
from project import logging as log_context
from project import metrics, tracing
from project.db import Statement, after_commit, service_db
from project.http.errors import Conflict, InvalidInput
from project.lines import InvalidLines, OrderLines
from project.saga import BROKER_ERRORS, SagaAborted, describe, faults, human_duration
from project.saga.inflight import held_order_ids
from reports import public as reports

from .models import CancelCause, CancelledOrder, Order, OrderLine, SweepLease
from .saga import compensation_saga, order_saga

logger = logging.getLogger(__name__)

PENDING = Order.Status.PENDING
CONFIRMED = Order.Status.CONFIRMED
CANCELLING = Order.Status.CANCELLING
# Why an order was cancelled, as Order.cancel_reason and CancelledOrder.reason
# keep it (both TextFields: no length to fit). The owner's own cancel, from the
# API or the admin, is USER_CANCEL_REASON; anyone else's names them, so the
# customer is never told they cancelled an order an orders manager cancelled.
USER_CANCEL_REASON = "cancelled by user"
STAFF_CANCEL_REASON = "cancelled by staff user {username!r}"
ADMIN_CANCEL_REASON = "cancelled by staff user {username!r} in the admin"
# Usernames are at most 150 characters in Django's user model; a custom one may allow more.
_REASON_USERNAME_MAX = 150
# How project.saga.SagaStep words a step that failed on a fault, not a refusal.
_STEP_FAULT = re.compile(r"^[a-z_]+\.[a-z_]+ failed: ")


def cause_of(reason: str) -> str:
    """The CancelCause of a reason that came without one, read from the words orderflow writes.

    For compensation messages from a worker of the version before causes
    (and migration 0008's records): a cancel by someone, the order deadline,
    a step's fault (``"<task> failed: …"``), else a service's refusal.
    """
    if reason.startswith("cancelled by "):  # USER_CANCEL_REASON, STAFF_CANCEL_REASON, ADMIN_CANCEL_REASON
        return CancelCause.USER
    if reason.startswith("order deadline passed"):
        return CancelCause.DEADLINE
    if _STEP_FAULT.match(reason):
        return CancelCause.INFRASTRUCTURE
    return CancelCause.REFUSED


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
    """Publish an order's saga; if the broker cannot take it, mark the order as not published.

    The order stays `pending` and committed either way; `last_dispatched_at`
    NULL tells the sweeper the saga is certainly not in the broker, so it is
    published at the next sweep without waiting for SAGA_TIMEOUT_SECONDS.
    """
    try:
        faults.inject("orders.dispatch", order_id)  # drills: die, or the broker refuses, between commit and publish
        saga.apply_async()
    except BROKER_ERRORS as exc:
        logger.warning("order %s: saga not published, the sweeper will (%s)", order_id, describe(exc))
        Order.objects.using(_db()).filter(pk=order_id, status=PENDING).update(last_dispatched_at=None)


def _publish_again(saga, order_id: int, traceparent: str) -> None:
    """`_publish` in a trace of its own that links to the order's first one (`traceparent`, "" for none).

    A re-dispatch's steps are the new trace's, not the original's
    (whose root span ended long ago); the link leads from one to the other.
    """
    with tracing.linked_root("orders.order_redispatch", traceparent, order_id=order_id):
        _publish(saga, order_id)


def _dispatch(order: Order, lines: list[OrderLine] | None = None, *, linked_to: str | None = None) -> None:
    """Publish the saga once the order's transaction commits.

    robust: if the broker is down the order is still committed and the client
    still gets its 202; the order stays pending and the sweeper publishes it.
    `linked_to`: a re-dispatch, published in a new trace linked to this
    traceparent (the order's `traceparent`).
    """
    if linked_to is None:
        after_commit(_db(), _publish, order_saga(order, lines), order.pk, robust=True)
    else:
        after_commit(_db(), _publish_again, order_saga(order, lines), order.pk, linked_to, robust=True)


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
                traceparent=tracing.current_traceparent(),
            )
            order.save(using=_db(), force_insert=True)
            # The request's span and log lines name the order from here on.
            tracing.annotate(order_id=order.pk)
            log_context.bind(order_id=order.pk)
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
            if metrics.enabled():  # counted once the order commits (project/metrics.py)
                after_commit(_db(), metrics.order_placed, robust=True)
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
    "UPDATE {table} SET {status} = %s, {confirmed_at} = %s, {updated_at} = %s WHERE {id} = %s AND {status} = %s"
    " RETURNING {created_at}",
    params=["status", "confirmed_at", "updated_at", "id", "status"],
    returns=["created_at"],
)


def order_confirm(*, order_id: int) -> str:
    """The saga's last step: pending → confirmed. A no-op when already confirmed.

    One conditional UPDATE (the row lock is the statement's own), returning the
    order's commit time for the commit→confirmed latency (project/metrics.py)
    instead of a second read; only when it changed nothing is the order read
    to tell a duplicate from an abort.
    """
    now = timezone.now()
    changed = _CONFIRM.fetch(CONFIRMED, now, now, order_id, PENDING, using=_db())
    if changed is not None:
        if metrics.enabled():  # counted once the confirm commits (project/metrics.py)
            (created_at,) = changed
            after_commit(_db(), metrics.order_confirmed, created_at, robust=True)
        return CONFIRMED
    if Order.objects.using(_db()).filter(pk=order_id, status=CONFIRMED).exists():
        return CONFIRMED
    raise SagaAborted(f"order {order_id} is being cancelled or gone")


def order_compensate(
    *,
    order_id: int,
    reason: str = "",
    force: bool = False,
    failure: str = "",
    cause: str = "",
    robust: bool = False,
    new_trace: str = "",
) -> bool:
    """Mark the order `cancelling` and publish the compensation chain.

    Runs when a saga step failed for good (`failure`: why, carried in the
    message by that step; possibly more than once for one failure), from a
    user's cancel (`reason`, `force`: a confirmed order is undone too) and
    from the sweeper (`reason`: the order's deadline passed; or none, to
    re-publish compensation). `cause` is the reason's (or failure's)
    CancelCause value; without one it is read from the words (`cause_of`).
    The first reason and the first failure are kept, each with its cause. A
    confirmed order is left alone unless forced: its saga finished, whatever
    a late failure says. `new_trace`: the sweeper's, whose own span is no
    part of the order's trace: the name of a root span ("orders.order_expire")
    the chain is published in, a new trace linked to the order's
    (`Order.traceparent`), as a re-dispatch is. Returns whether compensation
    was published.
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
        if order.status != CANCELLING or (reason and not order.cancel_reason) or (failure and not order.failure_reason):
            if order.status != CANCELLING:
                order.cancelled_from = order.status
            order.status = CANCELLING
            if reason and not order.cancel_reason:
                order.cancel_reason, order.cancel_cause = reason, cause or cause_of(reason)
            if failure and not order.failure_reason:
                order.failure_reason, order.failure_cause = failure, cause or cause_of(failure)
            order.save(
                using=_db(),
                update_fields=[
                    "status", "cancelled_from", "cancel_reason", "cancel_cause", "failure_reason", "failure_cause",
                    "updated_at",
                ],
            )  # fmt: skip
        # A task wants a publish failure raised (it retries); a web request
        # (robust) wants its 202: the order is `cancelling` either way and the
        # sweeper re-publishes compensation for orders left so.
        if new_trace:
            after_commit(
                _db(), _compensate_in_new_trace, compensation_saga(order_id), new_trace, order.traceparent, order_id,
                order.cancel_cause, robust=robust,
            )  # fmt: skip
        else:
            after_commit(_db(), compensation_saga(order_id).apply_async, robust=robust)
    logger.info("order %s: compensation started (%s)", order_id, reason or failure or "published again")
    return True


def _compensate_in_new_trace(chain, name: str, traceparent: str, order_id: int, cause: str) -> None:
    """Publish an order's compensation `chain` in a trace of its own (root span `name`) linked to `traceparent`."""
    with tracing.linked_root(name, traceparent, order_id=order_id, cancel_cause=cause or None):
        chain.apply_async()


def _cancel_reason(order: Order) -> str:
    """Why: who asked (a user, the deadline), else the failed step's note, else the reason its message carried."""
    return (
        order.cancel_reason
        or inventory.order_failure_reason(order.pk)
        or reports.order_failure_reason(order.pk)
        or order.failure_reason
        or f"cancelled while {order.cancelled_from or order.status}; no step reported why"
    )


def _cancel_cause(order: Order) -> str:
    """The class of `_cancel_reason(order)`: the asked cancel's, else the failed step's, else a refusal's if any."""
    if order.cancel_reason:
        return order.cancel_cause or cause_of(order.cancel_reason)
    if order.failure_cause:
        return order.failure_cause
    return CancelCause.REFUSED if inventory.order_refusal(order.pk) else CancelCause.INFRASTRUCTURE


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
            cause=_cancel_cause(order),
            # A user's or the sweeper's cancel is the reason even if a step failed too.
            refusal=[] if order.cancel_reason else inventory.order_refusal(order.pk),
            status_before=order.cancelled_from or order.status,
            dispatch_attempts=order.dispatch_attempts,
            created_at=order.created_at,
        )
        order.delete()
        if metrics.enabled():  # counted once the deletion commits: never for a duplicate delivery
            after_commit(_db(), metrics.order_cancelled, cancelled.cause, order.created_at, robust=True)
    logger.info("order %s deleted: %s", order_id, cancelled.reason)
    return cancelled


def order_failure_note(*, order_id: int, reason: str) -> None:
    """Keep why the orders step failed (the first reason wins)."""
    Order.objects.using(_db()).filter(pk=order_id, failure_reason="").update(failure_reason=reason)


def cancel_reason_for(*, order: Order, actor: AbstractBaseUser, in_admin: bool = False) -> str:
    """The reason a cancel of `order` asked by `actor` records.

    USER_CANCEL_REASON when `actor` owns the order (wherever they asked);
    otherwise "cancelled by staff user 'bob'", plus " in the admin" when
    `in_admin`. A username longer than 150 characters is cut, marked "…".
    """
    if order.user_id == actor.pk:
        return USER_CANCEL_REASON
    username = actor.get_username()
    if len(username) > _REASON_USERNAME_MAX:
        username = username[: _REASON_USERNAME_MAX - 1] + "…"
    template = ADMIN_CANCEL_REASON if in_admin else STAFF_CANCEL_REASON
    return template.format(username=username)


def order_cancel(*, order: Order, actor: AbstractBaseUser, in_admin: bool = False) -> bool:
    """A cancel asked by `actor` (the signed-in Django user): undo whatever the saga did and delete the order.

    The reason names who asked (`cancel_reason_for`); a cancel of another
    user's order is also logged at INFO with the actor's id and username.
    Permission checks are the caller's (API view, admin action). Returns
    whether compensation was published (False: the order is already gone).
    A broker that cannot be reached is logged, not raised (a robust
    on-commit publish): the order stays `cancelling` and the sweeper
    publishes its compensation again.
    """
    reason = cancel_reason_for(order=order, actor=actor, in_admin=in_admin)
    # The cancel's request (its own trace) links to the order's trace.
    tracing.annotate(order_id=order.pk)
    tracing.link_current(order.traceparent)
    if reason != USER_CANCEL_REASON:
        logger.info(
            "order %s: cancel asked by user %s (id %s), not its owner, %s",
            order.pk,
            actor.get_username(),
            actor.pk,
            "in the admin" if in_admin else "through the API",
            extra={"order_id": order.pk, "actor_id": actor.pk, "actor_username": actor.get_username()},
        )
    return order_compensate(order_id=order.pk, reason=reason, cause=CancelCause.USER, force=True, robust=True)


def order_redispatch(*, order_id: int, dispatched_before=None) -> bool:
    """Publish the saga again for a pending order (the sweeper, or staff in the admin).

    `dispatched_before` (the sweeper's cutoff, a datetime or a database
    expression) is checked under the row lock, so two overlapping sweeps
    cannot both count a dispatch for the same order.
    """
    with transaction.atomic(using=_db()):
        orders = Order.objects.using(_db()).select_for_update().filter(pk=order_id, status=PENDING)
        if dispatched_before is not None:
            orders = orders.filter(Q(last_dispatched_at__lt=dispatched_before) | Q(last_dispatched_at=None))
        order = orders.first()
        if order is None:
            return False
        order.dispatch_attempts = F("dispatch_attempts") + 1
        order.last_dispatched_at = Now()
        order.save(using=_db(), update_fields=["dispatch_attempts", "last_dispatched_at", "updated_at"])
        _dispatch(order, linked_to=order.traceparent)
    logger.warning("order %s re-dispatched", order_id)
    return True


def _take_sweep_lease() -> bool:
    """Whether this sweep may run: none started within half an interval, by the database's clock."""
    SweepLease.objects.using(_db()).get_or_create(pk=1)
    recent = Now() - timedelta(seconds=settings.SAGA_SWEEP_INTERVAL_SECONDS / 2)
    return bool(
        SweepLease.objects.using(_db())
        .filter(Q(started_at__lt=recent) | Q(started_at=None), pk=1)
        .update(started_at=Now())
    )


def _where_it_stands(order_id: int) -> str:
    """Which step an order's saga is waiting for, from each service's own record."""
    note = inventory.order_failure_reason(order_id) or reports.order_failure_reason(order_id)
    if not inventory.active_units_by_order([order_id]).get(order_id):
        where = "inventory.stock_reserve did not complete"
    elif not reports.recorded_orders([order_id]).get(order_id):
        where = "reports.sale_record did not complete"
    else:
        where = "orders.order_confirm did not complete"
    return f"{where} ({note})" if note else where


SWEEP_BATCH = 500


def saga_sweep(*, in_flight: Callable[[], set[int] | None] = held_order_ids) -> dict[str, int]:
    """Move every stuck order on; returns what it did, by kind.

    All times are the database's (the processes' clocks need not agree):

    * ``published``: a pending order whose publish failed (`last_dispatched_at`
      NULL) has its saga published;
    * ``expired``: a pending order older than ORDER_DEADLINE_SECONDS is
      compensated, the reason naming the deadline and the step it waited for;
    * ``redispatched`` / ``recompensated``: a pending (cancelling) order that
      showed no progress for SAGA_TIMEOUT_SECONDS has its saga (compensation)
      published again only if no queue and no worker can hold it
      (project.saga.inflight.held_order_ids) in two sweeps in a row;
      ``deferred`` counts the ones left for a later sweep because that could
      not be known, or was seen once so far.

    A sweep that finds another started within half an interval does nothing
    (``skipped``). `in_flight` answers what the broker and workers hold
    (tests pass their own answer).
    """
    counts = {"published": 0, "expired": 0, "redispatched": 0, "recompensated": 0, "deferred": 0, "skipped": 0}
    if not _take_sweep_lease():
        counts["skipped"] = 1
        return counts
    orders = Order.objects.using(_db())
    for order_id in orders.filter(status=PENDING, last_dispatched_at=None).values_list("pk", flat=True)[:SWEEP_BATCH]:
        counts["published"] += order_redispatch(order_id=order_id, dispatched_before=Now())

    deadline = Now() - timedelta(seconds=settings.ORDER_DEADLINE_SECONDS)
    expired = orders.filter(status=PENDING, created_at__lt=deadline).values_list("pk", flat=True)[:SWEEP_BATCH]
    for order_id in expired:
        reason = (
            f"order deadline passed after {human_duration(settings.ORDER_DEADLINE_SECONDS)}: "
            f"{_where_it_stands(order_id)}"
        )
        counts["expired"] += order_compensate(
            order_id=order_id, reason=reason, cause=CancelCause.DEADLINE, new_trace="orders.order_expire"
        )

    cutoff = Now() - timedelta(seconds=settings.SAGA_TIMEOUT_SECONDS)
    quiet = list(
        orders.filter(status=PENDING, last_dispatched_at__lt=cutoff).values_list("pk", flat=True)[:SWEEP_BATCH]
    )
    stale = list(orders.filter(status=CANCELLING, updated_at__lt=cutoff).values_list("pk", flat=True)[:SWEEP_BATCH])
    if quiet or stale:
        held = in_flight()
        lease = SweepLease.objects.using(_db()).filter(pk=1)
        if held is None:
            counts["deferred"] = len(quiet) + len(stale)
            lease.update(suspects=[])
        else:
            suspected = set(lease.values_list("suspects", flat=True).first() or [])
            lost = {order_id for order_id in (*quiet, *stale) if order_id not in held}
            # Seen lost once: the next sweep must agree. The ones re-sent now start afresh.
            lease.update(suspects=sorted(lost - suspected))
            counts["deferred"] = len(lost - suspected)
            for order_id in quiet:
                if order_id in lost & suspected:
                    counts["redispatched"] += order_redispatch(order_id=order_id, dispatched_before=cutoff)
            for order_id in stale:
                if order_id in lost & suspected and orders.filter(
                    pk=order_id, status=CANCELLING, updated_at__lt=cutoff
                ).update(updated_at=Now()):
                    counts["recompensated"] += order_compensate(
                        order_id=order_id, new_trace="orders.order_recompensate"
                    )
    if any(counts[kind] for kind in ("published", "expired", "redispatched", "recompensated")):
        logger.warning("saga sweep: %s", counts)
    elif counts["deferred"]:
        logger.info("saga sweep: %s", counts)
    return counts
