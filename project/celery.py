"""The Celery application shared by every service's workers, beat and Flower."""

import os
import time

from celery import Celery
from celery.signals import (
    beat_init,
    celeryd_after_setup,
    task_postrun,
    task_prerun,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
)
from django.conf import settings
from django.db import connections

# Metrics: importing it connects its Celery signals (saga task counts, the exporter).
from project import metrics  # noqa: F401
from project.admission import Admission

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

# Every publish (a task from the web, a chain's next step, a retry, a compensation, beat's
# sweep, an event) goes through project.broker_publish, which bounds it in time.
app = Celery("orderflow", amqp="project.broker_publish:AMQP", events="project.broker_publish:Events")
app.config_from_object("django.conf:settings", namespace="CELERY")
# Every installed app's tasks.py: the services', and bench's floor tasks only where
# the benchmark is installed (ORDERFLOW_BENCH=1).
app.autodiscover_tasks()
# A worker runs only its own services' tasks, their steps only with proof of origin
# (project/admission.py): checked as each message arrives, before anything runs.
app.steps["consumer"].add(Admission)


def _recycle_db_connections() -> None:
    """Django's request rule for tasks: keep a connection for CONN_MAX_AGE, drop a broken one.

    Like django.db.close_old_connections, except that a connection with no
    error and time left is not health-checked again before every task: that
    check is one more round trip per task. A connection broken while idle
    (a database restart) fails its task's first query, which is a transient
    error the task retries, and is replaced before the next task.
    """
    for connection in connections.all(initialized_only=True):
        if connection.connection is None:
            continue
        expired = connection.close_at is not None and time.monotonic() >= connection.close_at
        leaked = connection.get_autocommit() != connection.settings_dict["AUTOCOMMIT"]
        if connection.errors_occurred or expired or leaked:
            connection.close_if_unusable_or_obsolete()


# Celery's Django fixup closes every database connection before and after each
# task unless CELERY_DB_REUSE_MAX is set, so each task paid a fresh PostgreSQL
# connection (about a quarter of a pool process's time, seen with py-spy).
# Settings set CELERY_DB_REUSE_MAX out of reach; CONN_MAX_AGE=0 closes the
# connection after every task again.
@task_prerun.connect
@task_postrun.connect
def _reuse_db_connections(sender=None, **kwargs):
    if not getattr(getattr(sender, "request", None), "is_eager", False):
        _recycle_db_connections()


@celeryd_after_setup.connect
def _consume_compensation_queues(sender=None, instance=None, **kwargs):
    """A worker of a service queue (``-Q inventory``) also consumes its compensation queue.

    Undo steps are routed to ``<service>.compensation`` (settings.COMPENSATION_QUEUES),
    so they are delivered beside the service's forward steps instead of behind
    them (docs/design.md, "Compensation does not wait behind a backlog"); the
    command lines stay as they were. Celery's documented way to add a queue
    at start (celery.signals.celeryd_after_setup; `select_add`).
    """
    queues = instance.app.amqp.queues
    for service, compensation in settings.COMPENSATION_QUEUES.items():
        if service in queues.consume_from and compensation not in queues.consume_from:
            # The configured Queue, not its name: a name would be redeclared with Celery's defaults,
            # without the quorum arguments (PRECONDITION_FAILED against the queue as declared).
            queues.select_add(queues[compensation])


# Celery runs Django's system checks when a worker starts, but goes on whatever
# they find: settings that contradict each other (a time limit past RabbitMQ's
# consumer_timeout kills the worker later, with PRECONDITION_FAILED) stop it here
# instead, with the message `manage.py check` gives (project/checks.py).
@worker_init.connect
def _check_settings_at_worker_start(sender=None, **kwargs):
    from project.checks import refuse_to_start
    from project.queues import verify_at_start

    refuse_to_start("celery worker")
    # Existing queues of the other type would make every declare fail with PRECONDITION_FAILED.
    verify_at_start(app, "celery worker")


@beat_init.connect
def _check_settings_at_beat_start(sender=None, **kwargs):
    from project.checks import refuse_to_start
    from project.queues import verify_at_start

    refuse_to_start("celery beat")
    verify_at_start(app, "celery beat")


# Tracing (project/tracing.py): on only with OTEL_EXPORTER_OTLP_ENDPOINT set.
# Per pool process, after the fork: the span exporter's thread does not survive one.
@worker_process_init.connect
def _trace_pool_process(**kwargs):
    from project import tracing

    tracing.setup("worker")


@worker_process_shutdown.connect
def _flush_pool_process_spans(**kwargs):
    from project import tracing

    tracing.shutdown()


# A worker without a forking pool (-P solo or threads) runs its tasks in the main process.
@worker_init.connect
def _trace_unforked_worker(sender=None, **kwargs):
    from celery.concurrency import get_implementation
    from celery.concurrency.prefork import TaskPool

    pool = get_implementation(sender.pool_cls)  # a name ("prefork", "processes", "solo") or the class
    if not (isinstance(pool, type) and issubclass(pool, TaskPool)):
        from project import tracing

        tracing.setup("worker")


@worker_shutdown.connect
def _flush_unforked_worker_spans(**kwargs):
    from project import tracing

    tracing.shutdown()
