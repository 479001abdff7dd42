"""Settings for every orderflow process (web, workers, beat, Flower).

Every deploy-time value comes from the environment (or a `.env` file beside
manage.py); the defaults give the embedded shape: SQLite and kombu's
`filesystem://` broker under `var/`, no servers. `.env.example` lists them all,
and docs/operations.md explains them.

Grouped by topic, in this order: paths and secrets; security; applications
and HTTP; databases; the REST API; throttles; orders and the saga; Celery and
the broker; logging. Importing it writes only into var/ and only what the
embedded shape cannot start without (the folder and a generated secret key,
when SECRET_KEY is unset); the broker's folders are made by the transport
(project/broker.py) and static files by collectstatic.
"""

import contextlib
import os
import secrets
from datetime import timedelta
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

from project import broker_publish, queues

BASE_DIR = Path(__file__).resolve().parent.parent


class _Env(environ.Env):
    """django-environ's Env, with a number setting's errors named and an empty number meaning its default.

    ``FOO=abc`` for ``env.int("FOO", …)`` raises ImproperlyConfigured ``FOO='abc': expected an
    integer`` instead of int()'s ``invalid literal for int() with base 10: 'abc'``, which names
    no setting; ``FOO=`` (set but empty, as compose's ``FOO: ${FOO:-}`` passes it) is the default.
    """

    _KINDS = {int: "an integer", float: "a number"}

    def get_value(self, var, cast=None, default=environ.Env.NOTSET, parse_default=False):
        if cast in self._KINDS and default is not environ.Env.NOTSET and self.ENVIRON.get(var, "").strip() == "":
            return default
        try:
            return super().get_value(var, cast=cast, default=default, parse_default=parse_default)
        except ValueError as exc:
            if cast not in self._KINDS:
                raise
            raise ImproperlyConfigured(f"{var}={self.ENVIRON.get(var)!r}: expected {self._KINDS[cast]}") from exc


env = _Env()
if (BASE_DIR / ".env").is_file():
    environ.Env.read_env(BASE_DIR / ".env")

# --- Paths and secrets -------------------------------------------------------
# Everything the embedded shape writes (database, broker folders, beat
# schedule, generated secret) lives here; SQLite needs the folder to exist.
# Relative to the working directory when relative (resolved once, so every path below is absolute).
VAR_DIR = Path(env("ORDERFLOW_VAR_DIR", default="") or BASE_DIR / "var").resolve()
VAR_DIR.mkdir(parents=True, exist_ok=True)


def _local_secret_key() -> str:
    """A per-checkout secret, generated once and kept out of git in var/.

    Processes that start together on a fresh var/ (two gunicorn workers, a
    worker beside them) must all read the one key: a candidate is written whole
    to a file of its own, then linked to the name, which fails if another
    process's key got there first (link(2) never replaces a name); every
    process then reads the winner. A reader never sees a half-written key.
    """
    path = VAR_DIR / "secret_key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        candidate = path.with_name(f"secret_key.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_urlsafe(50))
            with contextlib.suppress(FileExistsError):  # another process's key is the one
                os.link(candidate, path)
        finally:
            candidate.unlink()
    return path.read_text().strip()


SECRET_KEY = env("SECRET_KEY", default=None) or _local_secret_key()

# --- Security ------------------------------------------------------------------
DEBUG = env.bool("DEBUG", default=False)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])
# HTTPS hardening for production (`manage.py check --deploy`); all off by default so plain
# http on localhost keeps working. SECURE_PROXY_SSL_HEADER="HTTP_X_FORWARDED_PROTO,https" only
# behind a proxy that sets that header itself (else clients could claim https).
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=False)
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$"]  # probed over plain http from inside (compose, load balancers)
SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=False)
CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=False)
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=False)
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=False)
SECURE_PROXY_SSL_HEADER = env.tuple("SECURE_PROXY_SSL_HEADER", default=None) or None
if SECURE_PROXY_SSL_HEADER is not None and len(SECURE_PROXY_SSL_HEADER) != 2:
    raise ValueError("SECURE_PROXY_SSL_HEADER: expected HEADER,value, e.g. HTTP_X_FORWARDED_PROTO,https")

# Request bodies above this are refused before they are parsed (413).
DATA_UPLOAD_MAX_MEMORY_SIZE = env.int("DATA_UPLOAD_MAX_MEMORY_SIZE", default=64 * 1024)


# --- Applications and HTTP -----------------------------------------------------

INSTALLED_APPS = [
    "project.apps.AdminConfig",  # django.contrib.admin with the project's site (project/admin.py)
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "django_filters",
    "orders",
    "inventory",
    "reports",
    "ops",
    "drf_spectacular",
    "drf_spectacular_sidecar",
]
# The benchmark (bench/: `manage.py bench_orders`, its table and floor tasks) is a tool, not
# a service: installed only where a benchmark runs. `make bench` sets ORDERFLOW_BENCH=1, and
# so do the processes the bench starts and the test suite; `make run`, compose and the image don't.
if env.bool("ORDERFLOW_BENCH", default=False):
    INSTALLED_APPS += ["bench"]

MIDDLEWARE = [
    # No cache keeps an /api/ answer (Cache-Control: no-store, private). First, so it also marks
    # the errors raised by the middleware below it (a bad Host header).
    "project.http.headers.ApiNoStoreMiddleware",
    # Every log line of a request on an order carries its order id and trace id (project/logging.py);
    # the tracing middleware, when on, is put before all.
    "project.logging.RequestContextMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # A database, disk or broker outage raised by a view is a 503 with Retry-After, not a 500.
    "project.http.errors.OutageMiddleware",
]

ROOT_URLCONF = "project.urls"
WSGI_APPLICATION = "project.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        # The landing page at / (project/templates/landing.html): project is not an app.
        "DIRS": [BASE_DIR / "project" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Databases -------------------------------------------------------------
# One database per service is possible (docs/design.md §6): DATABASE_URL_INVENTORY and
# DATABASE_URL_REPORTS move those services' tables to their own database;
# unset, every service shares `default`. project.db.routers does the routing and
# services name their alias through project.db.


# How long a statement waits for a row lock before PostgreSQL cancels it (SQLSTATE 55P03, which
# saga steps retry with backoff): below CELERY_TASK_SOFT_TIME_LIMIT, because Celery's soft limit
# cannot interrupt a wait inside libpq, and a step blocked until its hard limit is killed.
DATABASE_LOCK_TIMEOUT_SECONDS = env.float("DATABASE_LOCK_TIMEOUT_SECONDS", default=20.0)


# What sits between the processes and PostgreSQL: "" (nothing) or "pgbouncer" (PgBouncer in transaction
# pooling, docs/deploying.md). DATABASE_POOLER_INVENTORY / _REPORTS name it per split database
# (default: DATABASE_POOLER). Set it whenever a DATABASE_URL points at a PgBouncer.
DATABASE_POOLER = env.str("DATABASE_POOLER", default="")


def _database(url: str, name: str, pooler: str = "") -> dict:
    if pooler not in ("", "pgbouncer"):
        raise ImproperlyConfigured(f"{name}: DATABASE_POOLER {pooler!r} is not one of '' or 'pgbouncer'")
    config = env.db_url_config(url)
    if not config.get("ENGINE"):
        raise ImproperlyConfigured(f"{name}: {url!r} is not a database URL (postgres://… or sqlite:///…)")
    config["CONN_MAX_AGE"] = env.int("CONN_MAX_AGE", default=60)
    config["CONN_HEALTH_CHECKS"] = True
    if config["ENGINE"] == "django.db.backends.sqlite3":
        # Web and several worker processes write concurrently: take the write
        # lock at BEGIN (no lock upgrade deadlocks), wait for it instead of
        # failing, and let readers run beside the writer (WAL).
        config["OPTIONS"] = {
            "transaction_mode": "IMMEDIATE",
            "timeout": 30,
            "init_command": "PRAGMA journal_mode=WAL",
        }
        # Worker subprocesses share the test database, so it must be a file.
        config["TEST"] = {"NAME": str(VAR_DIR / f"test_{name}.sqlite3")}
    elif "postgresql" in config["ENGINE"]:
        # libpq's startup options (https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-CONNECT-OPTIONS).
        options = config.setdefault("OPTIONS", {})
        # A server that does not answer (frozen, or a network that drops packets) fails a connect in
        # seconds instead of hanging a request or a step (libpq's connect_timeout, seconds).
        options.setdefault("connect_timeout", env.int("DATABASE_CONNECT_TIMEOUT_SECONDS", default=5))
        if pooler == "pgbouncer":
            # Transaction pooling: each transaction may run on another server connection.
            # Django's "Transaction pooling and server-side cursors" (docs/ref/databases): a
            # server-side cursor (QuerySet.iterator()) outlives its transaction in autocommit and
            # would be read on a connection that does not have it, so Django must not open any.
            config["DISABLE_SERVER_SIDE_CURSORS"] = True
            # CONN_MAX_AGE stays as set: it keeps the client connection to PgBouncer (no PgBouncer
            # login per request), which holds no server connection between transactions; PgBouncer's
            # own pool bounds those (default_pool_size). max_client_conn must cover every thread.
            # No lock_timeout in libpq's startup `options`: PgBouncer 1.18 refuses an untracked startup
            # parameter. migrate makes it the role's default in the database instead (project/db/pooling.py).
        else:
            lock_timeout = f"-c lock_timeout={round(DATABASE_LOCK_TIMEOUT_SECONDS * 1000)}"
            options["options"] = f"{options['options']} {lock_timeout}" if options.get("options") else lock_timeout
    return config


DATABASES = {
    # Unset or empty: the embedded SQLite file.
    "default": _database(
        env("DATABASE_URL", default="") or f"sqlite:///{VAR_DIR / 'orderflow.sqlite3'}", "orderflow", DATABASE_POOLER
    ),
}
SERVICE_DATABASES = {"orders": "default", "inventory": "default", "reports": "default"}
for _service in ("inventory", "reports"):
    _url = env(f"DATABASE_URL_{_service.upper()}", default=None)
    if _url:
        DATABASES[_service] = _database(
            _url, _service, env.str(f"DATABASE_POOLER_{_service.upper()}", default=DATABASE_POOLER)
        )
        SERVICE_DATABASES[_service] = _service
DATABASE_ROUTERS = ["project.db.routers.ServiceRouter"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = env("STATIC_ROOT", default=str(VAR_DIR / "static"))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}

# Where the landing page (/) links to Flower: where `make run` starts it (FLOWER_PORT, FLOWER_URL_PREFIX)
# unless ORDERFLOW_FLOWER_URL says otherwise. Not FLOWER_URL: Flower takes every FLOWER_* variable
# for one of its own options and will not start on one it does not know.
_FLOWER_PREFIX = env("FLOWER_URL_PREFIX", default="").strip("/")
FLOWER_URL = env("ORDERFLOW_FLOWER_URL", default="") or (
    f"http://127.0.0.1:{env.int('FLOWER_PORT', default=5555)}/" + (f"{_FLOWER_PREFIX}/" if _FLOWER_PREFIX else "")
)

# --- REST API --------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    # DRF's JSON parser, but a body nested thousands deep is a 400, not a RecursionError (500).
    "DEFAULT_PARSER_CLASSES": ["project.http.parsers.JSONParser"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    # `?page=` and a bounded `?page_size=` (at most API_MAX_PAGE_SIZE) on every list.
    "DEFAULT_PAGINATION_CLASS": "project.http.pagination.PageNumberPagination",
    "PAGE_SIZE": 50,
    "EXCEPTION_HANDLER": "project.http.errors.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
    # Throttles that key on the client's address trust this many proxies' X-Forwarded-For entries;
    # 0 (the default) uses the connection's own address, so a client cannot pick its own key.
    "NUM_PROXIES": env.int("NUM_PROXIES", default=0),
}
API_MAX_PAGE_SIZE = env.int("API_MAX_PAGE_SIZE", default=200)

# OpenAPI 3 at /api/schema/, Swagger UI at /api/docs/ (drf-spectacular).
SPECTACULAR_SETTINGS = {
    "TITLE": "orderflow API",
    "DESCRIPTION": (
        "Orders, products and the sales read model. Authenticate with `Authorization: Token <key>` "
        "(`manage.py drf_create_token USER`) or the admin's session. Every error has one JSON shape: "
        '`{"code", "detail", "fields"}`.'
    ),
    "VERSION": "1.0.0",
    # /api/schema/ and /api/docs/ are public and the same for everyone (a bad token must not make them 401).
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SERVE_AUTHENTICATION": [],
    "SERVE_INCLUDE_SCHEMA": False,
    # Swagger UI's files come from drf-spectacular-sidecar through staticfiles, never from a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "SWAGGER_UI_SETTINGS": {"persistAuthorization": True},
    "ENUM_NAME_OVERRIDES": {"OrderStatusEnum": "orders.models.Order.Status"},
    # Every API URL also answers without its trailing slash (project/urls.py); the schema names each once.
    "PREPROCESSING_HOOKS": ["project.http.schema.one_path_per_endpoint"],
    # drf-spectacular's own enum hook, then: every operation documents its 503 (project.http.errors).
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "project.http.schema.document_outages",
    ],
}

# --- Throttles -----------------------------------------------------------------


def _throttle_rate(name: str, default: str) -> str | None:
    """A DRF rate, N/second, N/minute, N/hour or N/day (s, sec, m, min, ...); "" or "off" for no limit."""
    rate = env(name, default=default).strip().lower()
    if rate in ("", "off", "none"):
        return None
    count, _, period = rate.partition("/")
    if (
        not count.isdigit()
        or int(count) < 1
        or period not in ("s", "sec", "second", "m", "min", "minute", "h", "hour", "d", "day")
    ):
        raise ValueError(f"{name}={rate!r}: expected N/second, N/minute, N/hour or N/day (e.g. 120/min), or off")
    return rate


# Orders one user may place (POST /api/orders/); over it: 429 with Retry-After.
ORDER_CREATE_THROTTLE = _throttle_rate("ORDER_CREATE_THROTTLE", "120/min")
# Password logins one client address may try (POST /api/auth/token/), right or wrong.
TOKEN_OBTAIN_THROTTLE = _throttle_rate("TOKEN_OBTAIN_THROTTLE", "10/min")
# The throttles' state must be shared by every web process (gunicorn runs several), and each
# step on it must be atomic (project/http/gcra.py): Redis (redis:// or rediss://, several web
# machines, the compose shape) or a file cache (filecache://, one machine; the default, under
# var/). Any other cache is refused: Django's database and memcached caches have no atomic step.
THROTTLE_REDIS_TIMEOUT_SECONDS = env.float("THROTTLE_REDIS_TIMEOUT_SECONDS", default=0.5)


def _throttle_cache(url: str) -> dict:
    """CACHES["throttle"] for THROTTLE_CACHE_URL `url`; ImproperlyConfigured for a scheme other than redis or file."""
    scheme = url.partition("://")[0]
    if scheme == "filecache":
        config = environ.Env.cache_url_config(url)
        # The file cache culls at MAX_ENTRIES files (a user beyond it may find a fresh allowance).
        config.setdefault("OPTIONS", {}).setdefault("MAX_ENTRIES", 10_000)
    elif scheme in ("redis", "rediss"):
        config = environ.Env.cache_url_config(url, backend="django.core.cache.backends.redis.RedisCache")
        # A Redis that does not answer costs a request at most connect + read timeout (then it is let
        # through, loudly: project/http/throttles.py). redis-py's own default is 5 s each.
        options = config.setdefault("OPTIONS", {})
        options.setdefault("socket_connect_timeout", THROTTLE_REDIS_TIMEOUT_SECONDS)
        options.setdefault("socket_timeout", THROTTLE_REDIS_TIMEOUT_SECONDS)
    else:
        raise ImproperlyConfigured(
            f"THROTTLE_CACHE_URL: {scheme}:// has no atomic rate-limit step; use redis://HOST:6379/DB or "
            "filecache:///absolute/folder (one machine)"
        )
    return config


THROTTLE_CACHE_URL = env("THROTTLE_CACHE_URL", default="") or f"filecache://{VAR_DIR / 'cache' / 'throttle'}"
CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    "throttle": _throttle_cache(THROTTLE_CACHE_URL),
}

# --- Login lockout (django-axes) ------------------------------------------------
# Password logins, the admin's and POST /api/auth/token/'s (both call authenticate()), are
# counted per username and, separately, per client address: AXES_FAILURE_LIMIT failures of
# either lock it out for AXES_COOLOFF_MINUTES after the latest (0: until unlocked by hand).
# Locked out, even the right password is refused: 429, the admin with a page
# (project/templates/locked_out.html), the API with {"code": "locked_out"}. docs/security.md
# ("Rate limits and the admin login") says why both and how to unlock (manage.py axes_reset...).
INSTALLED_APPS += ["axes"]
AUTHENTICATION_BACKENDS = [
    # First: it refuses a locked-out login before any backend checks the password.
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
# Last, as django-axes requires: it turns a login its backend refused into the lockout answer.
MIDDLEWARE += ["axes.middleware.AxesMiddleware"]
AXES_HANDLER = "axes.handlers.database.AxesDatabaseHandler"
AXES_FAILURE_LIMIT = env.int("AXES_FAILURE_LIMIT", default=5)
AXES_COOLOFF_MINUTES = env.float("AXES_COOLOFF_MINUTES", default=15.0)
AXES_COOLOFF_TIME = timedelta(minutes=AXES_COOLOFF_MINUTES) if AXES_COOLOFF_MINUTES > 0 else None
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]  # either one: a list of two, not a pair [[...]]
# A right password does not wipe the failures: an attacker who knows one password cannot reset the
# count for the next guesses from the same address.
AXES_RESET_ON_SUCCESS = False
# Not verbose: no "AXES: BEGIN" banner in every process's log at start, and a failure's log line
# names only what it is counted by (username, address), not the user agent.
AXES_VERBOSE = False
# The address the throttles use: the connection's own, or NUM_PROXIES proxies' X-Forwarded-For.
AXES_CLIENT_IP_CALLABLE = "project.http.throttles.client_address"
# The admin's 429 page; under /api/ the JSON error shape (project.http.errors.lockout_response).
AXES_LOCKOUT_TEMPLATE = "locked_out.html"
AXES_LOCKOUT_CALLABLE = "project.http.errors.lockout_response"
if AXES_FAILURE_LIMIT < 1:
    raise ValueError(f"AXES_FAILURE_LIMIT={AXES_FAILURE_LIMIT}: expected a number of failures, 1 or more")

# --- Orders and the saga -------------------------------------------------------
ORDER_MAX_LINES = env.int("ORDER_MAX_LINES", default=50)
ORDER_MAX_QUANTITY = env.int("ORDER_MAX_QUANTITY", default=1000)
# An order still pending this long after it was placed is cancelled, and says so
# ("order deadline passed after 3 h: …"): the only cancellation time decides. Until
# then every infrastructure fault (a database or broker down, a lost worker, a step
# blocked past its time limit) makes the saga wait and retry.
ORDER_DEADLINE_SECONDS = env.int("ORDER_DEADLINE_SECONDS", default=3 * 3600)
# The sweeper looks at a `pending` order whose saga showed no progress for this long
# (or a `cancelling` one), and re-sends its saga only when the broker and every
# worker say they hold nothing for it (project/saga/inflight.py).
SAGA_TIMEOUT_SECONDS = env.int("SAGA_TIMEOUT_SECONDS", default=120)
SAGA_SWEEP_INTERVAL_SECONDS = env.float("SAGA_SWEEP_INTERVAL_SECONDS", default=15.0)
# Infrastructure faults are retried with exponential backoff and full jitter, the
# delay capped, until the order's deadline (undo steps: until they succeed).
SAGA_RETRY_BACKOFF_SECONDS = env.float("SAGA_RETRY_BACKOFF_SECONDS", default=0.5)
SAGA_RETRY_BACKOFF_MAX_SECONDS = env.float("SAGA_RETRY_BACKOFF_MAX_SECONDS", default=30.0)
# Fault injection for tests and drills (project/saga/faults.py); unset in production.
ORDERFLOW_FAULTS_FILE = env("ORDERFLOW_FAULTS_FILE", default=None)

# --- Celery and the broker -----------------------------------------------------
SERVICE_QUEUES = ("orders", "inventory", "reports")
# Each service's undo steps have a queue of their own, which its workers consume beside
# the service queue (project/celery.py), so compensation never waits behind a backlog
# of forward steps: a stale step queued there finds the undo done and stops.
COMPENSATION_QUEUES = {name: f"{name}.compensation" for name in SERVICE_QUEUES}
COMPENSATION_TASKS = {
    "orders.order_compensate": "orders",
    "orders.order_delete": "orders",
    "reports.sale_revert": "reports",
    "inventory.stock_release": "inventory",
}
# Every publish (the web's on commit, a worker's next step, retry or compensation, beat's
# sweep, a product event) completes within this or fails as "broker unavailable"
# (project/broker_publish.py: connecting, declaring, writing and the publisher confirm together).
# After such a failure, or a RabbitMQ resource alarm (connection.blocked), each process fails
# its publishes at once and tries one every 2 s.
BROKER_PUBLISH_TIMEOUT_SECONDS = env.float("BROKER_PUBLISH_TIMEOUT_SECONDS", default=1.0)
if BROKER_PUBLISH_TIMEOUT_SECONDS <= 0:
    raise ValueError(f"BROKER_PUBLISH_TIMEOUT_SECONDS={BROKER_PUBLISH_TIMEOUT_SECONDS}: expected seconds > 0")
CELERY_BROKER_URL = env("CELERY_BROKER_URL", default="") or "filesystem://localhost/"
_BROKER_DIR = VAR_DIR / "broker"
if CELERY_BROKER_URL.startswith("filesystem"):
    # kombu's filesystem transport, made safe for process deaths (project/broker.py;
    # it makes its folders when a connection is made).
    CELERY_BROKER_TRANSPORT = "project.broker:Transport"
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        # One folder is both the in and the out box: every process on this
        # machine shares the same queues.
        "data_folder_in": str(_BROKER_DIR / "queue"),
        "data_folder_out": str(_BROKER_DIR / "queue"),
        "processed_folder": str(_BROKER_DIR / "processed"),
        "control_folder": str(_BROKER_DIR / "control"),
        "store_processed": False,
        # The default of 1 s would cost up to a second per saga hop.
        "polling_interval": env.float("FILESYSTEM_POLLING_INTERVAL", default=0.05),
    }
else:
    # Publisher confirms (apply_async returns only once RabbitMQ has the message), and
    # RabbitMQ's connection.blocked / unblocked (a memory or disk alarm) reported to
    # project/broker_publish.py: a blocked publish fails at once, and the next ones until it clears.
    CELERY_BROKER_TRANSPORT_OPTIONS = broker_publish.amqp_transport_options()
# Bounded by project/broker_publish.py, which retries a dead pooled connection once itself:
# Celery's own publish retries would each get the whole timeout again.
CELERY_TASK_PUBLISH_RETRY = False
# Waiting for a free producer (every one busy publishing) is part of the bound too.
CELERY_BROKER_POOL_ACQUIRE_TIMEOUT = BROKER_PUBLISH_TIMEOUT_SECONDS
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# --- Queue types, delivery limit, dead-letter queue (project/queues.py, docs/celery.md) ----------
BROKER_IS_AMQP = not CELERY_BROKER_URL.startswith("filesystem")
# `quorum` (the default): on RabbitMQ every service and compensation queue is a quorum queue
# (replicated by Raft, always durable), countdown retries wait in RabbitMQ (native delayed
# delivery) instead of in a worker, and a message that keeps failing is dead-lettered.
# `classic`: the queues orderflow declared before, for brokers without quorum queues (or
# existing classic queues not migrated yet: docs/operations.md). The embedded filesystem
# broker has no queue types and ignores the setting.
BROKER_QUEUE_TYPE = env("BROKER_QUEUE_TYPE", default="").strip() or "quorum"  # set but empty: the default
if BROKER_QUEUE_TYPE not in queues.QUEUE_TYPES:
    raise ValueError(f"BROKER_QUEUE_TYPE={BROKER_QUEUE_TYPE!r}: expected one of {', '.join(queues.QUEUE_TYPES)}")
# Quorum queues only: a message returned to its queue more than this many times goes to the
# dead-letter queue instead of round again. RabbitMQ counts a return when the consumer's
# connection or channel is lost with the message unacknowledged (the whole worker killed
# mid-task), a reject with requeue (a step past its hard time limit), never an ack: a step's
# retry and a lost pool process's retry are new messages, which start at 0. 20 is RabbitMQ
# 4.0's own default for quorum queues: far above what an outage does to one message (a worker
# restart or two), and it stops a message that kills its worker every time within minutes.
BROKER_DELIVERY_LIMIT = env.int("BROKER_DELIVERY_LIMIT", default=20)
if BROKER_DELIVERY_LIMIT < 1:
    raise ValueError(f"BROKER_DELIVERY_LIMIT={BROKER_DELIVERY_LIMIT}: expected a count >= 1")
QUORUM_QUEUES = BROKER_IS_AMQP and BROKER_QUEUE_TYPE == "quorum"
CELERY_TASK_QUEUES = queues.task_queues(
    (*SERVICE_QUEUES, *COMPENSATION_QUEUES.values()),
    queue_type=BROKER_QUEUE_TYPE if BROKER_IS_AMQP else "classic",
    delivery_limit=BROKER_DELIVERY_LIMIT,
)
if QUORUM_QUEUES:
    # Anything Celery declares by itself uses the same exchange and type; native delayed
    # delivery's own celery_delayed_* queues are quorum queues too (Celery's default).
    CELERY_TASK_DEFAULT_EXCHANGE = queues.TASK_EXCHANGE
    CELERY_TASK_DEFAULT_EXCHANGE_TYPE = "topic"
    CELERY_TASK_DEFAULT_QUEUE_TYPE = "quorum"
    CELERY_BROKER_NATIVE_DELAYED_DELIVERY_QUEUE_TYPE = "quorum"
# Celery turns global QoS off by itself on quorum queues, which do not support it
# (worker_detect_quorum_queues, True by default; celery/worker/consumer/tasks.py).
CELERY_TASK_DEFAULT_QUEUE = "orders"
# --- Which worker runs which task (project/admission.py, docs/security.md) -----------
# A worker runs only the tasks of the services whose queues it consumes (`-Q inventory`:
# inventory's); WORKER_SERVICES names them instead, for a worker on a queue of no service.
# A task of another service that arrives on its queue is refused (logged, not run, not
# requeued), and so is a saga step without a valid proof of origin (project/origin.py,
# an HMAC keyed by SECRET_KEY, which every process must therefore share).
WORKER_SERVICES = env.list("WORKER_SERVICES", default=[])
if set(WORKER_SERVICES) - set(SERVICE_QUEUES):
    raise ValueError(f"WORKER_SERVICES={','.join(WORKER_SERVICES)}: expected names among {', '.join(SERVICE_QUEUES)}")
# --- end of which worker runs which task ------------------------------------------------
# Exact task names win over the patterns (celery.app.routes.MapRoute).
CELERY_TASK_ROUTES = {
    **{
        task: {"queue": COMPENSATION_QUEUES[service], "routing_key": COMPENSATION_QUEUES[service]}
        for task, service in COMPENSATION_TASKS.items()
    },
    **{f"{name}.*": {"queue": name, "routing_key": name} for name in SERVICE_QUEUES},
}
CELERY_TASK_DEFAULT_DELIVERY_MODE = "persistent"
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
# A message is acknowledged only after its task finished; a worker that dies
# mid-task has its message redelivered (steps are idempotent).
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
# Nothing reads task results: the database holds the saga's state.
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_SOFT_TIME_LIMIT = env.int("CELERY_TASK_SOFT_TIME_LIMIT", default=60)
CELERY_TASK_TIME_LIMIT = env.int("CELERY_TASK_TIME_LIMIT", default=90)
# What RabbitMQ is configured with as `consumer_timeout` (its default: 30 min), in
# seconds; 0 when it enforces none. A consumer that holds a delivery unacknowledged
# longer is closed with PRECONDITION_FAILED, and the worker with it: a running task
# (acks_late) and a retry's countdown are both held so. The checks of project/checks.py
# keep the time limit and the backoff ceiling below it (AMQP brokers only).
BROKER_CONSUMER_TIMEOUT_SECONDS = env.int("BROKER_CONSUMER_TIMEOUT_SECONDS", default=1800)
# System checks to skip, by id (Django's setting): e.g. orderflow.E006 where a test's
# sweeper looks sooner than a task may run, on purpose (docs/operations.md).
SILENCED_SYSTEM_CHECKS = env.list("SILENCED_SYSTEM_CHECKS", default=[])
CELERY_WORKER_PREFETCH_MULTIPLIER = env.int("CELERY_WORKER_PREFETCH_MULTIPLIER", default=4)
# How long a worker waits for a result from a pool process that died before
# declaring the job lost (and redelivering it).
CELERY_WORKER_LOST_WAIT = env.float("CELERY_WORKER_LOST_WAIT", default=10.0)
# Celery's consumer, with native delayed delivery set up on the node the worker reached rather than on
# every node of a failover list (a node that is down held every reconnect for 15 s: project/delayed_delivery.py).
CELERY_WORKER_CONSUMER = "project.delayed_delivery:Consumer"
# Each worker's remote-control queue (<node>.celery.pidbox) is auto-deleted and expires, but not
# exclusive to one connection (Celery's default since 5.5): a worker that fails over to another node
# of the cluster redeclares it on a new connection while RabbitMQ may still hold the old one's
# exclusive lock, and RESOURCE_LOCKED ends the worker (seen in tests/test_cluster.py after a node stop).
CELERY_CONTROL_QUEUE_EXCLUSIVE = False
# /readyz reports a service queue as "stalled" when messages wait and no consumer
# took one for this long (project/http/health.py; seconds).
CONSUMER_STALL_SECONDS = env.float("CONSUMER_STALL_SECONDS", default=60.0)
# /readyz is 503 "disk full" when a local folder the processes write (SQLite, the file broker,
# the throttle's file cache) has less free space than this (MB), or refuses a small write.
DISK_FREE_MIN_MB = env.float("DISK_FREE_MIN_MB", default=64.0)
# Tasks reuse database connections as requests do (CONN_MAX_AGE): the
# handlers in project/celery.py close old connections around each task, so
# Celery's own close-after-every-task is turned off here.
CELERY_DB_REUSE_MAX = 2**31
# Task events are for monitors (Flower). Each one is a message, and on RabbitMQ
# the worker's main loop waits for its publisher confirm like any other: with
# both on, py-spy saw half of that loop's time there, and `bench_orders` lost
# a quarter of its floor and 10-20 % of the saga (docs/performance.md). Off unless asked
# for; Flower switches workers' events on (enable_events) while it runs, and
# CELERY_TASK_SEND_SENT_EVENT=true adds the "sent" state to what it shows.
CELERY_WORKER_SEND_TASK_EVENTS = env.bool("CELERY_WORKER_SEND_TASK_EVENTS", default=False)
CELERY_TASK_SEND_SENT_EVENT = env.bool("CELERY_TASK_SEND_SENT_EVENT", default=False)
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")
CELERY_BEAT_SCHEDULE = {
    "orders.saga_sweep": {
        "task": "orders.saga_sweep",
        "schedule": SAGA_SWEEP_INTERVAL_SECONDS,
        # No `expires`: a worker compares it with its own clock, and one a minute
        # ahead dropped every sweep. Sweeps that pile up while the orders worker is
        # away cost one UPDATE each (orders.services.saga_sweep's lease).
    },
}

# --- Logging ---------------------------------------------------------------
# LOG_FORMAT=json: one JSON object per line, with task name/id, order id and saga
# step inside workers (project/logging.py); "plain" is for people reading a terminal.
LOG_FORMAT = env("LOG_FORMAT", default="plain")
if LOG_FORMAT not in ("plain", "json"):
    raise ValueError(f"LOG_FORMAT={LOG_FORMAT!r}: expected plain or json")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {
        "task_context": {"()": "project.logging.TaskContextFilter"},
        "routine_tasks": {"()": "project.logging.RoutineTaskFilter"},
    },
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"},
        "json": {"()": "project.logging.JsonFormatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": LOG_FORMAT,
            "filters": ["task_context", "routine_tasks"],
        },
    },
    "root": {"handlers": ["console"], "level": env("LOG_LEVEL", default="INFO")},
    "loggers": {
        "django.db.backends": {"level": "WARNING"},
    },
}

# --- Metrics (Prometheus; docs/operations.md, "Metrics") ----------------------------
# METRICS_PORT: the port this process group's exporter listens on (gunicorn's master, a Celery
# worker's main process); unset or 0: none is served. METRICS_ADDRESS: where it listens, loopback
# by default so nothing outside the machine reads it (compose sets 0.0.0.0 inside its network and
# publishes no port). Counting needs PROMETHEUS_MULTIPROC_DIR, one directory per process group,
# set by the launcher (prometheus-client reads it as it loads): make run and compose set both.
METRICS_PORT = env.int("METRICS_PORT", default=0)
METRICS_ADDRESS = env.str("METRICS_ADDRESS", default="127.0.0.1")
if not 0 <= METRICS_PORT < 65536:
    raise ValueError(f"METRICS_PORT={METRICS_PORT}: expected a port number (0: no metrics served)")
# METRICS_DATABASE=1: with metrics on, django-prometheus's database engines too (its django_db_*
# counters of connections, statements, errors and statement time per alias). Off by default: they
# took metrics past 5 % of the API burst's throughput in every round measured (docs/performance.md,
# "What metrics and tracing cost"); off, metrics have the middleware's HTTP metrics only.
METRICS_DATABASE = env.bool("METRICS_DATABASE", default=False)
# Each Django engine and django-prometheus's subclass of it (the same wrapper, with each cursor's
# execute counted and timed): OPTIONS, the pooler's DISABLE_SERVER_SIDE_CURSORS and the rest stay.
_PROMETHEUS_ENGINES = {
    "django.db.backends.postgresql": "django_prometheus.db.backends.postgresql",
    "django.db.backends.sqlite3": "django_prometheus.db.backends.sqlite3",
}
if env.str("PROMETHEUS_MULTIPROC_DIR", default=""):
    # django-prometheus's request, response and latency metrics (its middleware).
    # First and last, so they time everything between.
    MIDDLEWARE = [
        "django_prometheus.middleware.PrometheusBeforeMiddleware",
        *MIDDLEWARE,
        "django_prometheus.middleware.PrometheusAfterMiddleware",
    ]
    if METRICS_DATABASE:
        for _config in DATABASES.values():
            _config["ENGINE"] = _PROMETHEUS_ENGINES.get(_config["ENGINE"], _config["ENGINE"])
