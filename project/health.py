"""Probes for load balancers and orchestrators: `/healthz` (liveness) and `/readyz` (readiness).

`/healthz` answers 200 whenever this process can serve a request at all; it
touches no database or broker, so an outage elsewhere never gets healthy web
processes restarted. `/readyz` answers 200 only when every database alias
and the broker answer, else 503 naming what failed: send traffic on it.
"""

import logging

from django.db import connections
from django.http import JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from project.celery import app

logger = logging.getLogger(__name__)


def _check_database(alias: str) -> None:
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()


def _check_broker() -> None:
    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=3)


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
    return JsonResponse(body, status=200 if ready else 503)
