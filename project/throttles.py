"""Rate limits of the API: placing orders, at most ORDER_CREATE_THROTTLE per user."""

import logging
import math

from django.conf import settings
from django.core.cache import caches
from rest_framework.throttling import UserRateThrottle

logger = logging.getLogger(__name__)


class OrderCreateThrottle(UserRateThrottle):
    """Every POST /api/orders/ counts, refused ones too; over the rate the API answers 429 with Retry-After.

    The request history lives in the `throttle` cache, which every web process
    must share: Django's default LocMemCache is per process, so each gunicorn
    worker would grant its own allowance. settings.CACHES["throttle"] is a
    file cache under var/ unless THROTTLE_CACHE_URL names another.
    """

    scope = "order_create"

    @property
    def cache(self):
        return caches["throttle"]

    def get_rate(self) -> str | None:
        # Read per request, not at import: None (ORDER_CREATE_THROTTLE=off) lets everything through.
        return settings.ORDER_CREATE_THROTTLE

    def allow_request(self, request, view) -> bool:
        try:
            return super().allow_request(request, view)
        except Exception:
            # A rate limiter that cannot reach its cache must not stop orders: let it through, loudly.
            logger.exception("order throttle: the throttle cache failed; request allowed")
            return True

    def wait(self) -> float | None:
        # At least a second, so the 429 always carries a usable Retry-After.
        wait = super().wait()
        return None if wait is None else max(1, math.ceil(wait))
