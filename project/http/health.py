"""Probes for load balancers and orchestrators: `/healthz` (liveness) and `/readyz` (readiness).

`/healthz` answers 200 whenever this process can serve a request at all; it
touches no database or broker, so an outage elsewhere never gets healthy web
processes restarted. `/readyz` answers 200 only when every database alias
and the broker answer, else 503 naming what failed: send traffic on it.

`/readyz` also reports each service queue's consumers under "queues": a queue
with messages waiting and no consumer, or (on the embedded broker, which can
tell) none that took a message for CONSUMER_STALL_SECONDS, is "stalled". That
is a worker problem, not the web's: it is reported, and does not make the web
process unready (a load balancer would otherwise take every web process away
while orders can still be taken and wait for the worker).
"""

import logging
import time
from pathlib import Path

from amqp.exceptions import NotFound
from django.conf import settings
from django.db import connections
from django.http import JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from project import broker
from project.celery import app

logger = logging.getLogger(__name__)


def _check_database(alias: str) -> None:
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()


def _check_broker() -> None:
    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=3)


def _queue_state(waiting: int, consumers: int, taken: list[float] | None, stall_after: float) -> str:
    """One queue's state from its depth, the broker's consumer count and (embedded broker) when each took last."""
    if not waiting:
        return "idle"
    if taken is None:  # AMQP: only the consumer count is known
        return "ok" if consumers else f"stalled: {waiting} waiting, no consumer"
    if not taken:
        return f"stalled: {waiting} waiting, no consumer"
    quiet = time.time() - max(taken)
    if quiet > stall_after:
        return f"stalled: {waiting} waiting, none taken for {quiet:.0f} s by {len(taken)} consumer(s)"
    return "ok"


def queue_states() -> dict[str, str]:
    """{queue: "idle" | "ok" | "stalled: …" | "error: …"} for every service queue.

    "stalled" when messages wait and no live consumer took one for
    CONSUMER_STALL_SECONDS (embedded broker: claim markers, project.broker.queue_consumers),
    or when messages wait and the broker counts no consumer (AMQP's queue.declare-ok
    consumer_count; RabbitMQ cannot tell a consumer that stopped taking messages).
    """
    states = {}
    options = app.conf.broker_transport_options or {}
    claimed_root = Path(options["data_folder_in"]).parent / "claimed" if "data_folder_in" in options else None
    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=3)
        for queue in settings.SERVICE_QUEUES:
            # A channel per queue: on AMQP a passive declare of a missing queue closes its channel.
            try:
                with connection.channel() as channel:
                    _, waiting, consumers = channel.queue_declare(queue=queue, passive=True)
            except NotFound:
                states[queue] = "idle"  # never declared: no worker has consumed it, nothing was sent to it
                continue
            except Exception as exc:  # reported like any other failure
                states[queue] = f"error: {type(exc).__name__}"
                continue
            taken = broker.queue_consumers(claimed_root, queue) if claimed_root else None
            states[queue] = _queue_state(waiting, consumers, taken, settings.CONSUMER_STALL_SECONDS)
    return states


def readiness_checks() -> dict[str, str]:
    """{"database:<alias>": "ok" | "error: <type>", …, "broker": …} for every alias and the broker."""
    checks = {}
    probes = {f"database:{alias}": (lambda a=alias: _check_database(a)) for alias in connections}
    probes["broker"] = _check_broker
    for name, probe in probes.items():
        try:
            probe()
            checks[name] = "ok"
        except Exception as exc:  # any failure means "not ready", with the reason
            logger.warning("readiness check %s failed: %s", name, exc)
            checks[name] = f"error: {type(exc).__name__}"
    return checks


@never_cache
@require_GET
def healthz(request):
    return JsonResponse({"status": "ok"})


@never_cache
@require_GET
def readyz(request):
    checks = readiness_checks()
    ready = all(value == "ok" for value in checks.values())
    body = {"status": "ok" if ready else "unavailable", "checks": checks}
    if checks.get("broker") == "ok":
        try:
            body["queues"] = queue_states()
        except Exception as exc:  # reported, never fatal: see the module docstring
            logger.warning("queue check failed: %s", exc)
            body["queues"] = {"error": type(exc).__name__}
    return JsonResponse(body, status=200 if ready else 503)
