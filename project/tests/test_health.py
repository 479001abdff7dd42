"""`/healthz` (liveness: the process answers) and `/readyz` (every database and the broker answer)."""

import os
import re
import subprocess
import sys
import time
from unittest import mock

import pytest
from django.conf import settings
from django.db import connections
from kombu.exceptions import OperationalError as BrokerOperationalError

from project.celery import app as celery_app
from project.http import health

pytestmark = pytest.mark.django_db

HEALTHZ = "/healthz"
READYZ = "/readyz"


def all_databases_ok() -> dict[str, str]:
    return {f"database:{alias}": "ok" for alias in connections}


def disk_ok() -> dict[str, str]:
    """The "disk" check, where the processes write local folders (the embedded shape, the throttle's file cache)."""
    return {"disk": "ok"} if health.disk_folders() else {}


# --- /healthz: liveness ---------------------------------------------------------


def test_healthz_is_200_without_login(client):
    client.logout()
    response = client.get(HEALTHZ)

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert "no-cache" in response["Cache-Control"] or "max-age=0" in response["Cache-Control"]


def test_healthz_touches_neither_database_nor_broker(client):
    """A database or broker outage must not get live web processes restarted."""
    with (
        mock.patch.object(health, "_check_database", side_effect=AssertionError("database probed")),
        mock.patch.object(health, "_check_broker", side_effect=AssertionError("broker probed")),
        mock.patch.object(celery_app, "connection_for_write", side_effect=AssertionError("broker used")),
    ):
        response = client.get(HEALTHZ)

    assert response.status_code == 200


# --- /readyz: readiness ---------------------------------------------------------------


def test_ready_on_the_configured_databases_and_broker(client):
    # Talks to the real broker and every database alias the settings name.
    response = client.get(READYZ)

    assert response.status_code == 200, response.content
    body = response.json()
    queues = body.pop("queues")
    dead_letters = body.pop("dead_letters", None)
    assert body == {"status": "ok", "checks": {**all_databases_ok(), "broker": "ok", **disk_ok()}}
    # Reported, not judged here: earlier tests may have left messages behind.
    assert set(queues) == set(settings.SERVICE_QUEUES)
    if settings.QUORUM_QUEUES:  # the dead-letter queue, named (project/deadletter.py)
        assert dead_letters == "empty" or re.fullmatch(
            r"\d+ dead message\(s\) in orderflow\.dead-letter: .*", dead_letters
        )
    else:
        assert dead_letters is None
    assert all(state in ("ok", "idle") or state.startswith("stalled: ") for state in queues.values()), queues
    assert "no-cache" in response["Cache-Control"] or "max-age=0" in response["Cache-Control"]


def test_readyz_needs_no_login(client):
    client.logout()
    assert client.get(READYZ).status_code == 200


def test_every_database_alias_is_probed(client):
    with mock.patch.object(health, "_check_database") as probe:
        client.get(READYZ)

    assert sorted(call.args[0] for call in probe.call_args_list) == sorted(connections)


def test_unreachable_broker_is_503(client, monkeypatch):
    # A real connection attempt to a port nothing listens on (1 is privileged and unused).
    monkeypatch.setitem(celery_app.conf, "broker_write_url", "amqp://guest:guest@127.0.0.1:1//")
    monkeypatch.setitem(celery_app.conf, "broker_transport", "amqp")
    monkeypatch.setitem(celery_app.conf, "broker_transport_options", {})

    response = client.get(READYZ)

    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["broker"].startswith("unavailable: "), body
    assert "Connection refused" in body["checks"]["broker"]
    assert body["checks"]["database:default"] == "ok"
    # Liveness does not care.
    assert client.get(HEALTHZ).status_code == 200


def test_broker_error_maps_to_503(client):
    # Mocked on purpose: what is under test is the view's mapping of a failed probe.
    with mock.patch.object(health, "_check_broker", side_effect=BrokerOperationalError("down")):
        response = client.get(READYZ)

    assert response.status_code == 503
    assert response.json() == {
        "status": "unavailable",
        "checks": {**all_databases_ok(), "broker": "unavailable: OperationalError: down", **disk_ok()},
    }


def test_database_error_maps_to_503(client):
    # Mocked on purpose, as above: the mapping, not a database outage.
    from django.db import OperationalError

    with mock.patch.object(health, "_check_database", side_effect=OperationalError("gone")):
        response = client.get(READYZ)

    assert response.status_code == 503
    body = response.json()
    assert body["checks"]["database:default"] == "unavailable: OperationalError: gone"
    assert body["checks"]["broker"] == "ok"


def test_one_failing_service_database_is_named(client):
    real = health._check_database

    def probe(alias):
        if alias == list(connections)[-1]:
            raise RuntimeError("gone")
        real(alias)

    with mock.patch.object(health, "_check_database", side_effect=probe):
        body = client.get(READYZ).json()

    last = list(connections)[-1]
    assert body["status"] == "unavailable"
    assert body["checks"][f"database:{last}"] == "unavailable: RuntimeError: gone"
    assert all(value == "ok" for name, value in body["checks"].items() if name != f"database:{last}")


@pytest.mark.parametrize("path", [HEALTHZ, READYZ])
def test_only_get(client, path):
    assert client.post(path).status_code == 405


@pytest.mark.parametrize("path", [HEALTHZ, READYZ])
def test_probes_answer_over_plain_http_with_the_ssl_redirect_on(client, settings, path):
    """Probes come over plain http from inside (compose healthchecks, load balancers)."""
    settings.SECURE_SSL_REDIRECT = True

    assert client.get(path).status_code == 200
    assert client.get("/api/products/").status_code == 301  # everything else is redirected


# --- /readyz: the service queues' consumers ---------------------------------------------

EMBEDDED = settings.CELERY_BROKER_URL.startswith("filesystem")


def _publish_to(queue: str) -> None:
    celery_app.send_task(f"{queue}.readyz_probe", args=[1], queue=queue, routing_key=queue)


@pytest.fixture
def quiet_queues(no_workers):
    """No worker consumes: what a test publishes waits in its queue (purged after, by no_workers)."""
    from testing import purge_queues

    purge_queues()


def test_an_empty_queue_is_idle(client, quiet_queues):
    assert client.get(READYZ).json()["queues"] == {queue: "idle" for queue in settings.SERVICE_QUEUES}


def test_messages_waiting_with_no_consumer_are_a_stalled_queue_that_leaves_the_web_ready(client, quiet_queues):
    _publish_to("inventory")

    response = client.get(READYZ)

    assert response.status_code == 200  # a worker problem: the web still takes orders
    assert response.json()["queues"]["inventory"] == "stalled: 1 waiting, no consumer"
    assert response.json()["queues"]["orders"] == "idle"


# A consumer of the configured broker that takes one message of a queue, then holds it and takes no more.
HOLD_ONE = """
import sys, time
import django
django.setup()
from django.conf import settings
from kombu import Consumer
from project.celery import app
queue = next(q for q in settings.CELERY_TASK_QUEUES if q.name == sys.argv[1])
with app.connection_for_read() as connection:
    got = []
    Consumer(connection.channel(), [queue], callbacks=[lambda body, message: got.append(message)]).consume()
    while not got:
        try:
            connection.drain_events(timeout=0.1)
        except TimeoutError:
            pass
    print("holding", flush=True)
    time.sleep(60)
"""


@pytest.mark.skipif(not EMBEDDED, reason="the embedded broker tells when a consumer last took a message")
def test_a_live_consumer_that_took_nothing_for_a_while_is_stalled(client, quiet_queues, settings):
    """The wedge of issue 19 as /readyz sees it: a live worker, messages waiting, nothing taken."""
    _publish_to("reports")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_ONE, "reports"],
        cwd=settings.BASE_DIR,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "project.settings"},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        _publish_to("reports")  # a second message, which the live consumer never takes
        settings.CONSUMER_STALL_SECONDS = 0.5
        time.sleep(1)

        state = client.get(READYZ).json()["queues"]["reports"]

        assert re.fullmatch(r"stalled: \d+ waiting, none taken for \d+ s by 1 consumer\(s\)", state), state
        settings.CONSUMER_STALL_SECONDS = 60
        assert client.get(READYZ).json()["queues"]["reports"] == "ok"
    finally:
        holder.kill()
        holder.wait(timeout=10)
