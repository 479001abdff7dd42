"""`/healthz`: 200 only when every database and the broker answer."""

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


@never_cache
@require_GET
def healthz(request):
    checks = {}
    probes = {f"database:{alias}": (lambda a=alias: _check_database(a)) for alias in connections}
    probes["broker"] = _check_broker
    for name, probe in probes.items():
        try:
            probe()
            checks[name] = "ok"
        except Exception as exc:  # any failure means "not healthy", with the reason
            logger.warning("health check %s failed: %s", name, exc)
            checks[name] = f"error: {type(exc).__name__}"
    healthy = all(value == "ok" for value in checks.values())
    body = {"status": "ok" if healthy else "unavailable", "checks": checks}
    return JsonResponse(body, status=200 if healthy else 503)
