"""Retryable failures say so (issue 14): 503 + Retry-After in the one error shape, and /readyz names each.

The failures are real: a private PostgreSQL cluster (testing/instances.py, a
port of its own; never the machine's shared server) that refuses connections,
cuts sessions or turns read-only, and SQLite and plain files on a 1 MB tmpfs
that is full. Where a request must meet the failure, the test points the
`default` connection at that cluster for the request (the test database is
SQLite), so the API, the admin and /readyz meet the driver's own errors.
"""

import json
import logging
import os

import environ
import pytest
from django.db import DataError, IntegrityError, ProgrammingError, connections
from django.test import RequestFactory, override_settings
from rest_framework.test import APIClient

from project.http import errors
from project.http.errors import (
    BROKER_BLOCKED,
    DATABASE_READ_ONLY,
    DATABASE_UNAVAILABLE,
    DISK_FULL,
    outage_of,
)
from testing.instances import PostgresCluster, fill_disk, postgres_available

pytestmark = [pytest.mark.django_db, pytest.mark.timeout(120)]
# The tests that use the private cluster (the plugin marks only its own fixtures' users).
private = pytest.mark.private_instances


# --- instances ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    if reason := postgres_available():
        pytest.skip(reason)
    with PostgresCluster(f"web_outages_{os.getpid()}") as cluster:
        cluster.create_database("outages")
        yield cluster


def pg_connection(cluster, alias: str = "default"):
    """A Django connection (not registered) to the cluster's `outages` database."""
    from django.db.backends.postgresql.base import DatabaseWrapper

    config = environ.Env.db_url_config(cluster.url("outages"))
    config = connections.configure_settings({alias: config})[alias]
    return DatabaseWrapper(config, alias)


@pytest.fixture
def default_on(cluster):
    """default_on(): the `default` connection is the cluster's for the rest of the test."""
    original = connections["default"]
    swapped = []

    def swap():
        connection = pg_connection(cluster)
        connections["default"] = connection
        swapped.append(connection)
        return connection

    yield swap
    for connection in swapped:
        connection.close()
    connections["default"] = original


def raised_by(call) -> BaseException:
    try:
        call()
    except Exception as exc:
        return exc
    raise AssertionError("nothing was raised")


@pytest.fixture
def full_tmpfs(small_filesystem):
    """A 1 MB tmpfs of the test's own (testing.plugin.small_filesystem), filled by `fill()`: a real ENOSPC."""
    return small_filesystem("1m")


fill = fill_disk


# --- what is an outage: real errors, classified -------------------------------------------


@private
def test_a_database_that_refuses_connections_is_unavailable(cluster):
    connection = pg_connection(cluster)
    with cluster.refuse_connections():
        exc = raised_by(connection.ensure_connection)

    assert outage_of(exc) is DATABASE_UNAVAILABLE, repr(exc)


@private
def test_a_session_the_server_cut_is_unavailable(cluster):
    connection = pg_connection(cluster)
    connection.ensure_connection()
    cluster.terminate_backends(["outages"])  # 57P01, or "server closed the connection unexpectedly"

    exc = raised_by(lambda: connection.cursor().execute("SELECT 1"))
    connection.close()

    assert outage_of(exc) is DATABASE_UNAVAILABLE, repr(exc)


@private
def test_a_read_only_database_is_read_only_by_its_sqlstate(cluster):
    cluster.sql("CREATE TABLE IF NOT EXISTS t (n integer)", dbname="outages")
    connection = pg_connection(cluster)
    with cluster.read_only():
        exc = raised_by(lambda: connection.cursor().execute("INSERT INTO t VALUES (1)"))
    connection.close()

    assert exc.__cause__.pgcode == "25006"
    assert outage_of(exc) is DATABASE_READ_ONLY


@private
def test_errors_that_retrying_cannot_fix_are_not_outages(cluster):
    cluster.sql("CREATE TABLE IF NOT EXISTS u (n integer PRIMARY KEY)", dbname="outages")
    cluster.sql("INSERT INTO u VALUES (1) ON CONFLICT DO NOTHING", dbname="outages")
    connection = pg_connection(cluster)
    failures = [
        raised_by(lambda: connection.cursor().execute("INSERT INTO u VALUES (1)")),
        raised_by(lambda: connection.cursor().execute("INSERT INTO u VALUES (2147483648)")),
        raised_by(lambda: connection.cursor().execute("SELECT * FROM no_such_table")),
    ]
    connection.close()

    assert [type(exc) for exc in failures] == [IntegrityError, DataError, ProgrammingError]
    assert [outage_of(exc) for exc in failures] == [None, None, None]


def test_sqlite_on_a_full_disk_is_disk_full(full_tmpfs):
    from django.db.backends.sqlite3.base import DatabaseWrapper

    config = connections.configure_settings(
        {"default": environ.Env.db_url_config(f"sqlite:///{full_tmpfs}/db.sqlite3")}
    )
    database = DatabaseWrapper(config["default"], "full")
    database.cursor().execute("CREATE TABLE blobs (b blob)")

    def write_until_full():
        while True:
            database.cursor().execute("INSERT INTO blobs VALUES (zeroblob(65536))")

    exc = raised_by(write_until_full)
    database.close()

    assert "database or disk is full" in str(exc)
    assert outage_of(exc) is DISK_FULL


def test_no_space_left_on_a_write_is_disk_full(full_tmpfs):
    fill(full_tmpfs)
    exc = raised_by(lambda: (full_tmpfs / "more").write_bytes(b"x" * 8192))

    assert outage_of(exc) is DISK_FULL


# --- the answers: 503, Retry-After, the one shape ------------------------------------------


@private
def test_the_api_answers_503_with_retry_after_when_the_database_refuses(default_on, cluster, caplog):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token 0123456789abcdef0123456789abcdef01234567")
    default_on()
    with cluster.refuse_connections(), caplog.at_level(logging.INFO):
        listing = client.get("/api/orders/")
        placing = client.post("/api/orders/", {"lines": [{"product": 1, "quantity": 1}]}, format="json")

    # One warning line per request, with the cause; no traceback, no "Service Unavailable" error line.
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage().split(" (")[0] for r in lines] == [
        "GET /api/orders/: 503 database_unavailable",
        "POST /api/orders/: 503 database_unavailable",
    ], caplog.text
    assert all(r.exc_info is None for r in lines)

    for response in (listing, placing):
        assert response.status_code == 503, response.content
        assert response.json() == {"code": "database_unavailable", "detail": DATABASE_UNAVAILABLE.detail}
        assert response["Retry-After"] == str(DATABASE_UNAVAILABLE.retry_after)


@private
def test_the_admin_answers_503_not_500_when_the_database_refuses(client, default_on, cluster):
    client.cookies["sessionid"] = "a-session-the-database-must-look-up"
    default_on()
    with cluster.refuse_connections():
        response = client.get("/admin/orders/order/")

    assert response.status_code == 503
    assert response["Content-Type"].startswith("text/html")
    assert response["Retry-After"] == str(DATABASE_UNAVAILABLE.retry_after)
    assert DATABASE_UNAVAILABLE.detail in response.content.decode()


@private
def test_an_outage_outside_any_view_is_503_too(cluster):
    """Django's handler500 (errors.server_error_view) sees the exception: a middleware's, for one."""
    request = RequestFactory().get("/api/orders/")
    connection = pg_connection(cluster)
    try:
        with cluster.read_only():
            connection.cursor().execute("CREATE TABLE v (n integer)")
    except Exception:
        response = errors.server_error_view(request)
    connection.close()

    assert response.status_code == 503
    assert response["Retry-After"] == str(DATABASE_READ_ONLY.retry_after)
    assert json.loads(response.content)["code"] == "database_read_only"


def test_a_blocked_broker_is_503_broker_unavailable_where_a_request_needs_it():
    from project.broker_publish import BrokerBlocked

    response = errors.exception_handler(BrokerBlocked("blocked by the broker"), {"request": None})

    assert response.status_code == 503
    assert response.data == {"code": "broker_unavailable", "detail": BROKER_BLOCKED.detail}
    assert response["Retry-After"] == str(BROKER_BLOCKED.retry_after)


# --- /readyz names each --------------------------------------------------------------------


@private
def test_readyz_names_a_database_that_refuses_connections(client, default_on, cluster):
    default_on()
    with cluster.refuse_connections():
        response = client.get("/readyz")

    assert response.status_code == 503
    state = response.json()["checks"]["database:default"]
    assert state.startswith("unavailable: OperationalError: "), state
    assert "pg_hba.conf rejects connection" in state


@private
def test_readyz_names_a_read_only_database(client, default_on, cluster):
    default_on()
    with cluster.read_only():
        response = client.get("/readyz")

    assert response.status_code == 503
    assert response.json()["checks"]["database:default"] == (
        "read-only: the server accepts no writes (transaction_read_only is on)"
    )


def test_readyz_names_a_full_disk(client, full_tmpfs, settings):
    throttle = {"BACKEND": "django.core.cache.backends.filebased.FileBasedCache", "LOCATION": str(full_tmpfs)}
    with override_settings(CACHES={**settings.CACHES, "throttle": throttle}, DISK_FREE_MIN_MB=0.25):
        ready = client.get("/readyz")
        fill(full_tmpfs)
        full = client.get("/readyz")

    assert ready.json()["checks"]["disk"] == "ok", ready.json()
    assert full.status_code == 503
    state = full.json()["checks"]["disk"]
    assert state == f"disk full: 0.0 MB free at {full_tmpfs} (DISK_FREE_MIN_MB is 0.25)", state


def test_readyz_names_a_disk_below_the_free_space_minimum(client, full_tmpfs, settings):
    throttle = {"BACKEND": "django.core.cache.backends.filebased.FileBasedCache", "LOCATION": str(full_tmpfs)}
    with override_settings(CACHES={**settings.CACHES, "throttle": throttle}, DISK_FREE_MIN_MB=64):
        response = client.get("/readyz")

    assert response.status_code == 503
    state = response.json()["checks"]["disk"]
    assert state.startswith("disk nearly full: 1.0 MB free at ") or state.startswith("disk full: 0."), state
    assert state.endswith("(DISK_FREE_MIN_MB is 64)"), state
