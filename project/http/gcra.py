"""One GCRA step (the generic cell rate algorithm) of the API's throttles, atomic in the store that
every web process shares: settings.CACHES["throttle"], Redis or the embedded shape's file cache.

The state of a key is one integer, the time in microseconds at which its next request is due.
A step reads it, compares it with now and, when the request is allowed, moves it on by one
interval. Two processes that read the same due time both pass, so the read and the write must be
one step: on Redis a Lua script (Redis runs a script alone, https://redis.io/docs/latest/develop/
interact/programmability/eval-intro/), on the file cache an exclusive lock (`fcntl.flock`) on a
lock file beside the cache's files. Any other cache is refused (ImproperlyConfigured): Django's
database and memcached caches have no such step.
"""

import fcntl
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import redis
from django.conf import settings
from django.core.cache import caches
from django.core.exceptions import ImproperlyConfigured
from redis.backoff import NoBackoff
from redis.retry import Retry

MICROSECONDS = 1_000_000
REDIS_BACKEND = "django.core.cache.backends.redis.RedisCache"
FILE_BACKEND = "django.core.cache.backends.filebased.FileBasedCache"
# Beside the cache's own `*.djcache` files, which clear() and culling delete; this one they leave alone.
LOCK_FILE = "gcra.lock"

# KEYS[1]: the key. ARGV: now, interval, burst (integer microseconds), the key's expiry (milliseconds).
# Returns {1, 0} (allowed) or {0, microseconds until it would be}. Integers written with %.0f:
# Redis turns a Lua number into a string with 14 significant digits, and a time in microseconds has 16.
# A value that is not a number (what an older version stored) counts as no entry.
_GCRA_LUA = """
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local due = tonumber(redis.call("GET", KEYS[1]))
if due == nil or due < now then
    due = now
end
if due - now > burst then
    return {0, due - now - burst}
end
redis.call("SET", KEYS[1], string.format("%.0f", due + interval), "PX", ARGV[4])
return {1, 0}
"""


@dataclass(frozen=True)
class Decision:
    """A step's outcome: `retry_after` is how many seconds until the key's next request would pass (0 if allowed)."""

    allowed: bool
    retry_after: float


def step(key: str, *, now: float, interval: float, burst: float, ttl: float) -> Decision:
    """One atomic GCRA step for `key` in the `throttle` cache.

    `now` is a Unix time, `interval` the seconds one request uses up, `burst`
    how far ahead of `now` the due time may run (seconds: period − interval
    for N per period), `ttl` how long the stored due time must outlive this
    step (seconds; the period). The key goes through the cache's own key
    function (KEY_PREFIX, VERSION), so `caches["throttle"].get(key)` reads the
    same integer.

    Raises ImproperlyConfigured when the `throttle` cache is neither Redis nor
    a file cache, redis.RedisError when Redis fails or does not answer within
    its socket timeouts, OSError when the cache folder fails.
    """
    cache = caches["throttle"]
    config = settings.CACHES["throttle"]
    full_key = cache.make_and_validate_key(key)
    args = (_micro(now), _micro(interval), _micro(burst))
    if config["BACKEND"] == REDIS_BACKEND:
        allowed, wait = _redis_script(config)(keys=[full_key], args=[*args, max(1, math.ceil(ttl * 1000))])
    elif config["BACKEND"] == FILE_BACKEND:
        allowed, wait = _file_step(cache, Path(config["LOCATION"]), key, *args, ttl=ttl)
    else:
        raise ImproperlyConfigured(
            f"CACHES['throttle'] is {config['BACKEND']}: the throttles need Redis or a file cache (THROTTLE_CACHE_URL)"
        )
    return Decision(bool(allowed), int(wait) / MICROSECONDS)


def _micro(seconds: float) -> int:
    return round(seconds * MICROSECONDS)


def _file_step(cache, folder: Path, key: str, now: int, interval: int, burst: int, *, ttl: float) -> tuple[int, int]:
    """The step under an exclusive lock on the cache folder's lock file: one step at a time on this machine.

    flock(2) locks an open file description, so two threads of one process
    exclude each other too (each opens the file itself). One lock for every
    key: a step is a file read and a rename, far shorter than a request.
    """
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        due = cache.get(key)
        due = max(due, now) if isinstance(due, int) and not isinstance(due, bool) else now
        if due - now > burst:
            return 0, due - now - burst
        cache.set(key, due + interval, ttl)
        return 1, 0
    finally:
        os.close(fd)  # releases the lock


_scripts: dict[tuple, redis.commands.core.Script] = {}
_scripts_lock = threading.Lock()


def _redis_script(config: dict) -> "redis.commands.core.Script":
    """The GCRA script on a client of the cache's Redis (its first LOCATION, where Django's RedisCache writes).

    One client per process and location, with the cache's socket timeouts
    and no retries: a Redis that does not answer fails the step within
    `socket_connect_timeout` + `socket_timeout`, and the throttle lets the
    request through (project.http.throttles). redis-py's Script sends
    EVALSHA and loads the script on NOSCRIPT.
    """
    location = config["LOCATION"]
    location = location[0] if isinstance(location, list | tuple) else location
    options = config.get("OPTIONS", {})
    timeouts = (options.get("socket_connect_timeout"), options.get("socket_timeout"))
    with _scripts_lock:
        script = _scripts.get((location, timeouts))
        if script is None:
            client = redis.Redis.from_url(
                location,
                socket_connect_timeout=timeouts[0],
                socket_timeout=timeouts[1],
                retry=Retry(NoBackoff(), 0),
            )
            script = _scripts[(location, timeouts)] = client.register_script(_GCRA_LUA)
        return script
