"""Rate limits of the API: placing orders (ORDER_CREATE_THROTTLE per user), and password logins
for a token (TOKEN_OBTAIN_THROTTLE per client address); and the client address they, and django-axes's
login lockout, key on."""

import logging
import math

from django.conf import settings
from rest_framework.throttling import BaseThrottle, SimpleRateThrottle

from project.http import gcra

logger = logging.getLogger(__name__)


class SettingRateThrottle(SimpleRateThrottle):
    """A scoped throttle whose rate is the Django setting `rate_setting`; over it the API answers 429.

    The rate is kept as GCRA (the generic cell rate algorithm: N per period,
    a burst of up to N, then one every period/N): one number per key, the
    time the next request is due. DRF's own throttles keep every request
    time of the period instead, a list pickled into and out of the cache on
    each request whose size is the limit itself: 0.5 ms a POST at a thousand
    requests in the minute, growing with the limit (docs/performance.md).

    The state lives in the `throttle` cache, which every web process must
    share: Redis (THROTTLE_CACHE_URL=redis://...) or, by default, a file
    cache under var/ for one machine. The read, the comparison and the write
    are one atomic step in that store (project.http.gcra), so requests with
    one key that arrive together in different processes cannot pass the
    limit between them. The time is the web process's clock.
    """

    _retry_after: float | None = None

    rate_setting: str

    def get_rate(self) -> str | None:
        # Read per request, not at import: None (e.g. ORDER_CREATE_THROTTLE=off) lets everything through.
        return getattr(settings, self.rate_setting)

    def allow_request(self, request, view) -> bool:
        try:
            return self._allow(request, view)
        except Exception:
            # A rate limiter that cannot reach its cache must not stop the API: let it through, loudly.
            logger.exception("%s throttle: the throttle cache failed; request allowed", self.scope)
            return True

    def _allow(self, request, view) -> bool:
        if self.rate is None:
            return True
        key = self.get_cache_key(request, view)
        if key is None:
            return True
        interval = self.duration / self.num_requests
        # How far ahead of now the next due time may run; after `duration` a stored time is in the past.
        decision = gcra.step(
            key, now=self.timer(), interval=interval, burst=self.duration - interval, ttl=self.duration
        )
        if not decision.allowed:
            self._retry_after = decision.retry_after
        return decision.allowed

    def wait(self) -> float | None:
        # At least a second, so the 429 always carries a usable Retry-After.
        return None if self._retry_after is None else max(1, math.ceil(self._retry_after))


class OrderCreateThrottle(SettingRateThrottle):
    """Every POST /api/orders/ counts, refused ones too, per user."""

    scope = "order_create"
    rate_setting = "ORDER_CREATE_THROTTLE"

    def get_cache_key(self, request, view) -> str:
        user = request.user
        ident = user.pk if user and user.is_authenticated else self.get_ident(request)
        return self.cache_format % {"scope": self.scope, "ident": ident}


class TokenObtainThrottle(SettingRateThrottle):
    """Every POST /api/auth/token/ counts, right password or wrong, per client address.

    Per address rather than per username, so nobody can throttle another user
    by failing their logins; django-axes's lockout, which does count per
    username, lasts only its cool-off (docs/security.md). The address is the
    connection's own unless REST_FRAMEWORK["NUM_PROXIES"] says how many
    proxies' X-Forwarded-For to trust (`client_address`).
    """

    scope = "token_obtain"
    rate_setting = "TOKEN_OBTAIN_THROTTLE"

    def get_cache_key(self, request, view) -> str:
        return self.cache_format % {"scope": self.scope, "ident": self.get_ident(request)}


def client_address(request) -> str | None:
    """The client's address as the throttles key it (DRF's `get_ident`), for django-axes (AXES_CLIENT_IP_CALLABLE).

    `request` is a Django HttpRequest or a DRF Request. The connection's own
    address (REMOTE_ADDR) unless REST_FRAMEWORK["NUM_PROXIES"] trusts that many
    proxies' X-Forwarded-For entries, counted from the right; a client cannot
    choose its own address with a header the proxies did not write. None when
    the request has no address at all (Django's test client without REMOTE_ADDR).
    """
    return BaseThrottle().get_ident(request) or None
