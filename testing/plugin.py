"""The pytest plugin of the suite (`-p testing.plugin`): real Celery workers for saga tests.

Saga tests (`@pytest.mark.saga`) ask for `workers`: one real `celery worker`
process per service queue, for the whole session, against the broker and
database the settings name (SQLite + filesystem broker by default,
PostgreSQL + RabbitMQ when DATABASE_URL and CELERY_BROKER_URL are set), on
pytest-django's test database.
"""

import os
from collections.abc import Iterator

import pytest
from django.conf import settings
from pytest_django.fixtures import validate_django_db

from testing.workers import Workers, purge_queues, quiesce


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args):
    """The suite tests the benchmark too: install its app (project/settings.py) before pytest-django loads settings.

    The worker processes inherit it, so they register the benchmark's floor tasks.
    """
    os.environ["ORDERFLOW_BENCH"] = "1"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """Every test that uses the database may use all of them (the split shape, docs/design.md §6).

    Services write to their own alias (inventory, reports); pytest-django
    otherwise allows only `default`, and flushes only `default` after a
    transactional test. With one database this changes nothing.
    """
    for item in items:
        marker = item.get_closest_marker("django_db")
        if marker is None and not {"db", "transactional_db", "live_server"} & set(getattr(item, "fixturenames", ())):
            continue
        transaction, reset_sequences, databases, serialized_rollback, available_apps = (
            validate_django_db(marker) if marker else (False, False, None, False, None)
        )
        if databases is None:
            item.add_marker(
                pytest.mark.django_db(
                    transaction=transaction,
                    reset_sequences=reset_sequences,
                    databases="__all__",
                    serialized_rollback=serialized_rollback,
                    available_apps=available_apps,
                ),
                append=False,
            )


# The session's Workers once a test has asked for them (`no_workers` stops them).
_SESSION_WORKERS: list[Workers] = []


@pytest.fixture(scope="session")
def celery_workers(django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[Workers]:
    """One real worker process per service queue, for the whole session."""
    purge_queues()
    workers = Workers(tmp_path_factory.mktemp("workers"))
    _SESSION_WORKERS.append(workers)
    try:
        for queue in settings.SERVICE_QUEUES:
            workers.start(queue)
        for queue in settings.SERVICE_QUEUES:
            workers.wait_ready(queue)
        yield workers
    finally:
        workers.stop_all()


@pytest.fixture
def no_workers() -> Iterator[None]:
    """No service worker consumes during the test: what it publishes stays queued, and is purged after.

    Stops the session's workers if an earlier test started them (a warm
    shutdown: unacknowledged messages go back to their queues); the next test
    that asks for `workers` starts them again, and must not be handed this
    test's messages for orders its flushed tables no longer hold.
    """
    for session_workers in _SESSION_WORKERS:
        for queue in settings.SERVICE_QUEUES:
            session_workers.stop(queue)
    yield
    purge_queues()


@pytest.fixture
def workers(celery_workers: Workers, transactional_db) -> Iterator[Workers]:
    """Real workers, with committed data they can see, and no faults unless a test sets them."""
    celery_workers.clear_faults()
    for queue in settings.SERVICE_QUEUES:  # a test may have killed one
        if queue not in celery_workers.processes or celery_workers.processes[queue].poll() is not None:
            celery_workers.restart(queue)
    celery_workers.mark_logs()
    yield celery_workers
    celery_workers.clear_faults()
    celery_workers.stop("beat")
    # Late messages (a redelivery after a kill, a duplicate) must not reach the
    # next test's freshly flushed tables.
    quiesce(celery_workers.node_names())


@pytest.fixture
def sweeper(workers: Workers) -> Workers:
    """Celery beat running the saga sweeper every second (saga timeout: SWEEP_TIMEOUT_SECONDS)."""
    workers.start_beat()
    return workers
