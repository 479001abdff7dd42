"""`/healthz`: 200 only when every database and the broker answer."""

from unittest import mock

import pytest
from kombu.exceptions import OperationalError as BrokerOperationalError

from project import health
from project.celery import app as celery_app

pytestmark = pytest.mark.django_db

HEALTHZ = "/healthz"


def test_healthy_on_the_configured_database_and_broker(client):
    # Talks to the real broker the settings name (filesystem:// or RabbitMQ).
    response = client.get(HEALTHZ)

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "ok"
    assert body["checks"]["broker"] == "ok"
    assert body["checks"]["database:default"] == "ok"
    assert all(value == "ok" for value in body["checks"].values())
    assert "no-cache" in response["Cache-Control"] or "max-age=0" in response["Cache-Control"]


def test_needs_no_login(client):
    client.logout()
    assert client.get(HEALTHZ).status_code == 200


def test_unreachable_broker_is_503(client, monkeypatch):
    # A real connection attempt to a port nothing listens on (1 is privileged and unused).
    monkeypatch.setitem(celery_app.conf, "broker_write_url", "amqp://guest:guest@127.0.0.1:1//")
    monkeypatch.setitem(celery_app.conf, "broker_transport", "amqp")
    monkeypatch.setitem(celery_app.conf, "broker_transport_options", {})

    response = client.get(HEALTHZ)

    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["broker"].startswith("error: ")
    assert body["checks"]["database:default"] == "ok"


def test_broker_error_maps_to_503(client):
    # Mocked on purpose: what is under test is the view's mapping of a failed probe.
    with mock.patch.object(health, "_check_broker", side_effect=BrokerOperationalError("down")):
        response = client.get(HEALTHZ)

    assert response.status_code == 503
    assert response.json() == {
        "status": "unavailable",
        "checks": {"database:default": "ok", "broker": "error: OperationalError"},
    }


def test_database_error_maps_to_503(client):
    # Mocked on purpose, as above: the mapping, not a database outage.
    from django.db import OperationalError

    with mock.patch.object(health, "_check_database", side_effect=OperationalError("gone")):
        response = client.get(HEALTHZ)

    assert response.status_code == 503
    body = response.json()
    assert body["checks"]["database:default"] == "error: OperationalError"
    assert body["checks"]["broker"] == "ok"


def test_only_get(client):
    assert client.post(HEALTHZ).status_code == 405
