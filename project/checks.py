"""Settings that must agree with each other and with the broker, checked at start (Django's system checks).

Registered under the tag "orderflow" when orders' app is ready (orders.apps),
so `manage.py check` and every management command that checks (migrate, which
`make run` and compose run before anything else, runserver) fail with the
error; `celery worker` and `celery beat` run them too and refuse to start
(`refuse_to_start`, project/celery.py), since Celery runs Django's checks but
ignores what they find. docs/operations.md ("Timeouts and retries, together")
explains each one; SILENCED_SYSTEM_CHECKS skips one by id.

Every settings check is an Error: each contradiction either kills a worker
(RabbitMQ's consumer_timeout), lets the sweeper take a running saga for a lost
one, or cancels orders that could complete. orderflow.W014 is a database check
(run by migrate and `manage.py check --database ALIAS`): a Warning, because
migrate itself is what puts right what it finds; the same check turns PgBouncer's
refusal of Django's startup options into orderflow.E015, which names the setting.
"""

import sys
from collections.abc import Callable, Iterable
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register, run_checks
from django.db import DatabaseError, connections

from project.db import pooling
from project.lines import MAX_QUANTITY

TAG = "orderflow"
DOCS = "docs/operations.md, “Timeouts and retries, together”"
# The order deadline leaves room for this many of the slowest recoveries: a lost
# saga found (saga timeout), a step killed by its time limit, a retry at the ceiling.
DEADLINE_MARGIN = 10
AMQP_SCHEMES = ("amqp://", "amqps://", "pyamqp://", "librabbitmq://")


def _error(number: int, msg: str, hint: str) -> Error:
    return Error(msg, hint=f"{hint} ({DOCS}).", id=f"{TAG}.E{number:03d}")


def _amqp() -> bool:
    """Whether the broker is RabbitMQ (or another AMQP broker), the one with a consumer timeout."""
    return settings.CELERY_BROKER_URL.startswith(AMQP_SCHEMES)


def _quorum() -> bool:
    """Whether the task queues are quorum queues, whose countdown retries wait in RabbitMQ (project/queues.py)."""
    return _amqp() and settings.BROKER_QUEUE_TYPE == "quorum"


@register(TAG)
def check_time_limits(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """orderflow.E001: the soft time limit comes before the hard one, and both are set."""
    soft, hard = settings.CELERY_TASK_SOFT_TIME_LIMIT, settings.CELERY_TASK_TIME_LIMIT
    if soft and hard and 0 < soft < hard:
        return []
    return [
        _error(
            1,
            f"CELERY_TASK_SOFT_TIME_LIMIT ({soft}) must be more than 0 and less than CELERY_TASK_TIME_LIMIT "
            f"({hard}): the soft limit lets a step stop cleanly and retry before the hard one kills its process, "
            "and without a hard limit a blocked step holds its message (and its order) for ever.",
            "Set e.g. CELERY_TASK_SOFT_TIME_LIMIT=60 and CELERY_TASK_TIME_LIMIT=90",
        )
    ]


@register(TAG)
def check_retry_backoff(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """orderflow.E002, E003: the first retry delay and the ceiling are positive, the first below the ceiling."""
    first, ceiling = settings.SAGA_RETRY_BACKOFF_SECONDS, settings.SAGA_RETRY_BACKOFF_MAX_SECONDS
    if first <= 0 or ceiling <= 0:
        return [
            _error(
                2,
                f"SAGA_RETRY_BACKOFF_SECONDS ({first}) and SAGA_RETRY_BACKOFF_MAX_SECONDS ({ceiling}) must be more "
                "than 0: a step that meets a database or broker outage would retry in a busy loop.",
                "Set e.g. SAGA_RETRY_BACKOFF_SECONDS=0.5 and SAGA_RETRY_BACKOFF_MAX_SECONDS=30",
            )
        ]
    if first > ceiling:
        return [
            _error(
                3,
                f"SAGA_RETRY_BACKOFF_SECONDS ({first}) must not be more than SAGA_RETRY_BACKOFF_MAX_SECONDS "
                f"({ceiling}): the first retry delay is the smallest, the ceiling caps every later one.",
                "Lower SAGA_RETRY_BACKOFF_SECONDS or raise SAGA_RETRY_BACKOFF_MAX_SECONDS",
            )
        ]
    return []


@register(TAG)
def check_broker_consumer_timeout(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """orderflow.E004, E005, E011: nothing holds a message unacknowledged as long as RabbitMQ's consumer_timeout.

    On classic queues a retry's countdown is held, unacknowledged, by the
    worker that fetched it (up to SAGA_RETRY_BACKOFF_MAX_SECONDS); on quorum
    queues it waits in RabbitMQ instead (Celery's native delayed delivery), so
    E004 does not apply there. A running task holds its own message on either
    (acks_late, up to CELERY_TASK_TIME_LIMIT). RabbitMQ closes the channel of
    a consumer that holds one past `consumer_timeout` (PRECONDITION_FAILED),
    and the worker exits. Only AMQP brokers have it; 0 says the broker enforces none.
    """
    timeout = settings.BROKER_CONSUMER_TIMEOUT_SECONDS
    if timeout < 0:
        return [
            _error(
                11,
                f"BROKER_CONSUMER_TIMEOUT_SECONDS ({timeout}) must be 0 (the broker enforces none) or the broker's "
                "consumer_timeout in seconds.",
                "Set it to RabbitMQ's consumer_timeout divided by 1000 (the default 1800000 ms: 1800)",
            )
        ]
    if not timeout or not _amqp():
        return []
    errors = []
    ceiling = settings.SAGA_RETRY_BACKOFF_MAX_SECONDS
    if ceiling >= timeout and not _quorum():
        errors.append(
            _error(
                4,
                f"SAGA_RETRY_BACKOFF_MAX_SECONDS ({ceiling}) must be less than BROKER_CONSUMER_TIMEOUT_SECONDS "
                f"({timeout}): a retry's countdown is held unacknowledged by a worker, and RabbitMQ closes a "
                "consumer that holds a message past its consumer_timeout (the worker exits with PRECONDITION_FAILED).",
                "Lower SAGA_RETRY_BACKOFF_MAX_SECONDS, or raise consumer_timeout in rabbitmq.conf and "
                "BROKER_CONSUMER_TIMEOUT_SECONDS with it",
            )
        )
    limit = settings.CELERY_TASK_TIME_LIMIT
    if not limit or limit >= timeout:
        errors.append(
            _error(
                5,
                f"CELERY_TASK_TIME_LIMIT ({limit}) must be set and less than BROKER_CONSUMER_TIMEOUT_SECONDS "
                f"({timeout}): a running task holds its message unacknowledged (acks_late), and RabbitMQ closes a "
                "consumer that holds one past its consumer_timeout (the worker exits with PRECONDITION_FAILED).",
                "Lower CELERY_TASK_TIME_LIMIT, or raise consumer_timeout in rabbitmq.conf and "
                "BROKER_CONSUMER_TIMEOUT_SECONDS with it",
            )
        )
    return errors


@register(TAG)
def check_saga_timeout(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """orderflow.E006, E007: the sweeper waits longer than a step may run, and longer than a retry may wait.

    E007 is for classic queues, where a retry's countdown is held by a worker
    and could be asked about only while its worker answers. On quorum queues
    the countdown waits in RabbitMQ's delayed-delivery queues, which the
    sweeper reads (project/saga/inflight.py): it never takes such a saga for lost.
    """
    saga_timeout = settings.SAGA_TIMEOUT_SECONDS
    errors = []
    limit = settings.CELERY_TASK_TIME_LIMIT
    if limit and saga_timeout <= limit:
        errors.append(
            _error(
                6,
                f"SAGA_TIMEOUT_SECONDS ({saga_timeout}) must be more than CELERY_TASK_TIME_LIMIT ({limit}): a step "
                "may run that long and show no progress meanwhile, and the sweeper must not take its saga for lost.",
                "Raise SAGA_TIMEOUT_SECONDS or lower CELERY_TASK_TIME_LIMIT",
            )
        )
    ceiling = settings.SAGA_RETRY_BACKOFF_MAX_SECONDS
    if saga_timeout <= ceiling and not _quorum():
        errors.append(
            _error(
                7,
                f"SAGA_TIMEOUT_SECONDS ({saga_timeout}) must be more than SAGA_RETRY_BACKOFF_MAX_SECONDS ({ceiling}): "
                "a step waiting out a retry's countdown shows no progress, and the sweeper must not take its "
                "saga for lost.",
                "Raise SAGA_TIMEOUT_SECONDS or lower SAGA_RETRY_BACKOFF_MAX_SECONDS",
            )
        )
    return errors


@register(TAG)
def check_sweep_interval(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """orderflow.E008: the sweeper runs, and at least once per saga timeout."""
    interval, saga_timeout = settings.SAGA_SWEEP_INTERVAL_SECONDS, settings.SAGA_TIMEOUT_SECONDS
    if 0 < interval <= saga_timeout:
        return []
    return [
        _error(
            8,
            f"SAGA_SWEEP_INTERVAL_SECONDS ({interval}) must be more than 0 and at most SAGA_TIMEOUT_SECONDS "
            f"({saga_timeout}): beat runs the sweeper that often, and a lost saga should be found within about "
            "one saga timeout.",
            "Set e.g. SAGA_SWEEP_INTERVAL_SECONDS=15",
        )
    ]


@register(TAG)
def check_order_deadline(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """orderflow.E009: the order deadline leaves room for DEADLINE_MARGIN of the slowest recoveries.

    The deadline is the only cancellation time decides: before it, a lost
    saga is found (after SAGA_TIMEOUT_SECONDS), a step blocked past its time
    limit is killed and retried (CELERY_TASK_TIME_LIMIT), a retry waits up to
    SAGA_RETRY_BACKOFF_MAX_SECONDS. A deadline within a few of those cancels
    orders that one slow recovery would have completed.
    """
    deadline = getattr(settings, "ORDER_DEADLINE_SECONDS", None)
    if deadline is None:
        return []
    slowest = {
        "SAGA_TIMEOUT_SECONDS": settings.SAGA_TIMEOUT_SECONDS,
        "CELERY_TASK_TIME_LIMIT": settings.CELERY_TASK_TIME_LIMIT or 0,
        "SAGA_RETRY_BACKOFF_MAX_SECONDS": settings.SAGA_RETRY_BACKOFF_MAX_SECONDS,
    }
    name, seconds = max(slowest.items(), key=lambda item: item[1])
    if deadline >= DEADLINE_MARGIN * seconds:
        return []
    return [
        _error(
            9,
            f"ORDER_DEADLINE_SECONDS ({deadline}) must be at least {DEADLINE_MARGIN} × {name} ({seconds}), "
            f"{DEADLINE_MARGIN * seconds}: the deadline cancels an order still pending, and must leave room for "
            "that many lost sagas found, steps killed by the time limit or retries at the backoff ceiling, "
            "or orders that would have completed are cancelled.",
            f"Raise ORDER_DEADLINE_SECONDS (default 10800) or lower {name}",
        )
    ]


@register(TAG)
def check_order_limits(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """orderflow.E010: an order of ORDER_MAX_LINES lines of ORDER_MAX_QUANTITY units fits the quantity columns."""
    lines, quantity = settings.ORDER_MAX_LINES, settings.ORDER_MAX_QUANTITY
    if lines >= 1 and 1 <= quantity <= MAX_QUANTITY:
        return []
    return [
        _error(
            10,
            f"ORDER_MAX_LINES ({lines}) must be at least 1, and ORDER_MAX_QUANTITY ({quantity}) from 1 to "
            f"{MAX_QUANTITY}: the quantity columns (orders' lines, inventory's reservations) are 32-bit integers, "
            "and a larger quantity would be refused by the database after the order was accepted.",
            "Set ORDER_MAX_QUANTITY within the range (default 1000; docs/design.md, “Numeric ranges”)",
        )
    ]


def errors_found(tags: Iterable[str] = (TAG,)) -> list[CheckMessage]:
    """The serious (Error or worse), not silenced, messages of the checks tagged `tags`. Needs django.setup()."""
    return [m for m in run_checks(tags=list(tags)) if m.is_serious() and not m.is_silenced()]


def refuse_to_start(process: str, *, write: Callable[[str], Any] = sys.stderr.write) -> None:
    """Exit (status 1) with every orderflow check's error, as `manage.py check` prints them, if any.

    For processes that do not run Django's checks as a command would: Celery
    runs them at worker start but ignores what they find. `process` names the
    process in the message ("celery worker").
    """
    errors = errors_found()
    if not errors:
        return
    lines = [f"{process} not started: the settings contradict each other (manage.py check says the same):"]
    for error in errors:
        lines.append(f"  {error.id}: {error.msg}")
        if error.hint:
            lines.append(f"    HINT: {error.hint}")
    write("\n".join(lines) + "\n")
    raise SystemExit(1)


@register(TAG)
def check_lock_timeout(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """orderflow.E013: a lock wait ends (PostgreSQL's lock_timeout) before the soft time limit could not end it."""
    lock, soft = settings.DATABASE_LOCK_TIMEOUT_SECONDS, settings.CELERY_TASK_SOFT_TIME_LIMIT
    if not soft or 0 < lock < soft:  # no soft limit: orderflow.E001 says so
        return []
    return [
        _error(
            13,
            f"DATABASE_LOCK_TIMEOUT_SECONDS ({lock}) must be more than 0 and less than CELERY_TASK_SOFT_TIME_LIMIT "
            f"({soft}): Celery's soft limit cannot interrupt a step waiting for a row lock inside libpq, so only "
            "PostgreSQL's lock_timeout turns that wait into an error the step retries with backoff.",
            "Set e.g. DATABASE_LOCK_TIMEOUT_SECONDS=20 with CELERY_TASK_SOFT_TIME_LIMIT=60",
        )
    ]


def _refused_startup_options(alias: str, exc: Exception) -> Error:
    """orderflow.E015: the server of `alias` refused libpq's startup options, as PgBouncer does."""
    suffix = "" if alias == "default" else f"_{alias.upper()}"
    return Error(
        f"Database {alias!r} refused the connection: {str(exc).strip()}. PgBouncer refuses the startup options "
        "Django sends straight to PostgreSQL (lock_timeout).",
        hint=f"Behind PgBouncer set DATABASE_POOLER{suffix}=pgbouncer: no startup options, no server-side cursors, "
        "and migrate makes lock_timeout the role's default (docs/deploying.md, “PgBouncer”).",
        id=f"{TAG}.E015",
    )


@register(TAG, Tags.database)
def check_lock_timeout_in_force(app_configs: Any = None, databases: Iterable[str] | None = None, **kwargs: Any):
    """orderflow.W014: a transaction on each PostgreSQL alias in `databases` really gets DATABASE_LOCK_TIMEOUT_SECONDS.

    Through PgBouncer (DATABASE_POOLER=pgbouncer) lock_timeout is the role's
    default in the database, which migrate sets (project/db/pooling.py); a
    database migrated before, or a role changed by hand, has another. Runs only
    for the aliases a command names (Django's database checks); a database that
    does not answer is left to the command's own error, except a PgBouncer that
    refuses the startup options (DATABASE_POOLER unset): orderflow.E015, with the fix.
    """
    found: list[CheckMessage] = []
    for alias in databases or ():
        if connections[alias].vendor != "postgresql":
            continue
        try:
            in_force = pooling.lock_timeout_in_force(alias)
        except DatabaseError as exc:
            if pooling.REFUSED_STARTUP_OPTIONS in str(exc):
                found.append(_refused_startup_options(alias, exc))
            continue
        if in_force != pooling.lock_timeout_ms():
            found.append(
                Warning(
                    f"Database {alias!r}: a transaction runs with lock_timeout {in_force} ms, not "
                    f"DATABASE_LOCK_TIMEOUT_SECONDS ({settings.DATABASE_LOCK_TIMEOUT_SECONDS} s): a step waiting "
                    "for a row lock is not stopped before its soft time limit (orderflow.E013).",
                    hint=f"Run `manage.py migrate --database={alias}`: it makes lock_timeout the role's default in "
                    "the database (through PgBouncer no startup option can carry it) and replaces idle sessions; a "
                    "PgBouncer server connection busy meanwhile keeps the old value until RECONNECT on its console "
                    "(docs/deploying.md, “PgBouncer”).",
                    id=f"{TAG}.W014",
                )
            )
    return found
