"""Every publish has a time bound (project/broker_publish.py, issue 14), on a private RabbitMQ node.

Each test has a node of its own (testing.plugin.rabbitmq_node: own ports, folders,
cookie and epmd), alarmed and frozen on purpose; never the machine's shared broker.
Each test publishes through a Celery app of its own configured as settings
configure the real one for RabbitMQ, so what is proved is the app's path:
``send_task`` → ``app.amqp.send_task_message`` → py-amqp.

Ceilings separate a hang from an answer (before the bound, each of these
publishes waited for as long as the alarm or the freeze lasted); the bound
itself is BROKER_PUBLISH_TIMEOUT_SECONDS (1 s).
"""

import logging
import threading
import time

import pytest
from celery import Celery
from django.conf import settings
from django.db import transaction

from project import broker_publish
from project.broker_publish import BrokerBlocked, BrokerUnavailable
from project.db import after_commit
from testing.instances import fill_disk, rabbitmq_available

pytestmark = [
    pytest.mark.private_instances,
    pytest.mark.timeout(120),  # a publish that hangs fails the test instead of the run
    pytest.mark.skipif(bool(rabbitmq_available()), reason=rabbitmq_available() or ""),
]

BOUND = settings.BROKER_PUBLISH_TIMEOUT_SECONDS
# A hang from an answer: every publish here must end well within this.
CEILING = 5.0
# A publish refused at once, without waiting on the broker.
AT_ONCE = 0.2


@pytest.fixture
def node(rabbitmq_node):
    """The test's own private RabbitMQ node (testing.plugin.rabbitmq_node), started and removed by the fixture."""
    return rabbitmq_node


@pytest.fixture(autouse=True)
def fresh_outage():
    """The process's outage state is global: every test starts with a broker believed to work."""
    broker_publish.forget_outages()
    yield
    broker_publish.forget_outages()


def make_app(url: str) -> Celery:
    """A Celery app configured as project/settings.py configures the real one for RabbitMQ, on `url`."""
    app = Celery(
        "bounded-publish-test",
        amqp="project.broker_publish:AMQP",
        events="project.broker_publish:Events",
        set_as_current=False,
    )
    app.config_from_object("django.conf:settings", namespace="CELERY")
    app.conf.update(
        # Publishing connects to broker_write_url, which (unlike broker_url) the environment's
        # CELERY_BROKER_URL does not override (celery.app.utils.Settings).
        broker_url=url,
        broker_write_url=url,
        broker_transport=None,
        broker_transport_options=broker_publish.amqp_transport_options(),
    )
    return app


@pytest.fixture
def app(node):
    app = make_app(node.url)
    yield app
    app.close()


def send(app: Celery) -> tuple[str, float]:
    """Publish one task; ("ok" or the exception's class name, seconds taken)."""
    started = time.monotonic()
    try:
        app.send_task("reports.product_sync", kwargs={"product_id": 1}, queue="bounded-publish-test")
        outcome = "ok"
    except BrokerUnavailable as exc:
        outcome = type(exc).__name__
    return outcome, time.monotonic() - started


def send_concurrently(app: Celery, n: int) -> list[tuple[str, float]]:
    results: list[tuple[str, float]] = []
    threads = [threading.Thread(target=lambda: results.append(send(app)), daemon=True) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(CEILING * 2)
    assert not any(thread.is_alive() for thread in threads), "a publish is still waiting on the broker"
    return results


def test_a_memory_alarm_fails_every_publish_at_once_and_publishing_resumes_after(app, node):
    assert send(app)[0] == "ok"  # connected, the queue declared: the pooled connection is warm

    with node.memory_alarm():
        results = send_concurrently(app, 10)
        again = send(app)
        probe_started = time.monotonic()
        with pytest.raises(BrokerBlocked):
            broker_publish.probe(app)
        probe_seconds = time.monotonic() - probe_started
        state = broker_publish.broker_state(app)

    # connection.blocked ends the waiting publishes: none waits out the bound, let alone the alarm.
    assert {outcome for outcome, _ in results} == {"BrokerBlocked"}, results
    assert max(seconds for _, seconds in results) < BOUND, results
    # Known blocked: refused without touching the broker.
    assert again[0] == "BrokerBlocked" and again[1] < AT_ONCE, again
    assert probe_seconds < AT_ONCE
    assert state.startswith("blocked: ")

    time.sleep(broker_publish.RETRY_INTERVAL_SECONDS)  # the next publish is the trial
    assert send(app)[0] == "ok"
    assert broker_publish.broker_state(app) is None


def test_an_alarm_that_came_and_went_while_nothing_was_published_fails_nothing_after(app, node):
    """RabbitMQ told the idle pooled connection "blocked", then "unblocked": old news, read before the next publish."""
    assert send(app)[0] == "ok"
    with node.memory_alarm():
        time.sleep(0.5)

    assert send(app)[0] == "ok"
    assert broker_publish.broker_state(app) is None


def test_remote_control_under_an_alarm_fails_within_the_bound(app, node):
    """kombu's Mailbox broadcasts (inspect, ping: the sweeper asks the workers) through the app's producer pool."""
    outcome: list[BaseException | list] = []

    def ping():
        try:
            outcome.append(app.control.ping(timeout=0.5))
        except Exception as exc:
            outcome.append(exc)

    with node.memory_alarm():
        thread = threading.Thread(target=ping, daemon=True)
        started = time.monotonic()
        thread.start()
        thread.join(CEILING * 2)
        seconds = time.monotonic() - started
        assert not thread.is_alive(), "the broadcast is still waiting on the broker"

    assert isinstance(outcome[0], BrokerUnavailable), outcome
    assert seconds < CEILING


def test_a_disk_alarm_blocks_like_a_memory_alarm(app, node):
    with node.disk_alarm():
        outcome, seconds = send(app)

    assert outcome == "BrokerBlocked"
    assert seconds < BOUND


def test_a_frozen_broker_fails_a_publish_within_the_bound_and_the_next_ones_at_once(app, node):
    assert send(app)[0] == "ok"

    with node.frozen():
        results = send_concurrently(app, 10)
        later = send_concurrently(app, 10)
        with pytest.raises(BrokerUnavailable):
            broker_publish.probe(app)
        time.sleep(broker_publish.RETRY_INTERVAL_SECONDS)
        trial = send(app)  # one publish tries the broker again, and waits its bound
        state = broker_publish.broker_state(app)

    assert {outcome for outcome, _ in results} == {"BrokerUnavailable"}, results
    # Those in flight when it froze wait the bound (connecting, writing, the confirm), no longer;
    # and no more than WAITING_PUBLISHES of them: the others wait their turn until those look stuck.
    assert max(seconds for _, seconds in results) < BOUND + 0.5, results
    stuck_after = broker_publish.STALL_FRACTION * BOUND
    waited_the_bound = [seconds for _, seconds in results if seconds > stuck_after + 0.25]
    assert len(waited_the_bound) <= broker_publish.WAITING_PUBLISHES, results
    assert max(seconds for _, seconds in later) < AT_ONCE, later
    assert trial[0] == "BrokerUnavailable" and BOUND * 0.8 < trial[1] < BOUND + 0.5, trial
    assert state == f"unavailable: timed out after {BOUND:g} s"

    time.sleep(broker_publish.RETRY_INTERVAL_SECONDS)
    assert send(app)[0] == "ok"


def test_publishes_from_many_threads_to_a_healthy_broker_all_go_out(app):
    """The bulkhead lets two publishes wait on the broker at a time; the others wait their turn, none fails."""
    assert send(app)[0] == "ok"

    results = send_concurrently(app, 32)

    assert [outcome for outcome, _ in results] == ["ok"] * 32, results


def test_a_fresh_connection_to_a_frozen_broker_is_bounded_too(node):
    app = make_app(node.url)  # nothing pooled: the publish must connect (TCP connects, the handshake never comes)
    try:
        with node.frozen():
            outcome, seconds = send(app)
    finally:
        app.close()

    assert outcome == "BrokerUnavailable"
    assert seconds < BOUND + 0.5


def test_a_pooled_connection_the_broker_closed_is_replaced_within_the_same_publish(app, node):
    assert send(app)[0] == "ok"
    node.restart()  # stop_app/start_app: every connection closed by the broker

    outcome, seconds = send(app)

    assert outcome == "ok"
    assert seconds < BOUND


def test_a_broker_that_refuses_connections_fails_at_once():
    from testing.instances import free_port

    app = make_app(f"amqp://guest:guest@127.0.0.1:{free_port()}//")
    try:
        outcome, seconds = send(app)
    finally:
        app.close()

    assert outcome == "BrokerUnavailable"
    assert seconds < BOUND


def test_a_failover_list_whose_first_node_refuses_publishes_to_the_next_within_the_bound(node):
    """CELERY_BROKER_URL "amqp://down;amqp://up": each publish, and /readyz's probe, connects to the node that
    answers (kombu's next alternate after a refused connect), every time; the list is one broker, not in outage."""
    from testing.instances import free_port

    down = f"amqp://guest:guest@127.0.0.1:{free_port()}//"
    app = make_app(f"{down};{node.url}")
    try:
        results = [send(app) for _ in range(5)]
        probe_started = time.monotonic()
        broker_publish.probe(app)  # raises BrokerUnavailable if it stuck to the refusing node
        probe_seconds = time.monotonic() - probe_started
        state = broker_publish.broker_state(app)
    finally:
        app.close()

    assert [outcome for outcome, _ in results] == ["ok"] * 5, results
    assert max(seconds for _, seconds in results) < BOUND, results
    assert probe_seconds < BOUND
    assert state is None


def test_a_failover_list_with_no_node_up_fails_within_the_bound():
    from testing.instances import free_port

    app = make_app(";".join(f"amqp://guest:guest@127.0.0.1:{free_port()}//" for _ in range(3)))
    try:
        first, second = send(app), send(app)
    finally:
        app.close()

    assert first[0] == second[0] == "BrokerUnavailable"
    assert first[1] < BOUND and second[1] < AT_ONCE  # the second: the outage is known


@pytest.mark.django_db(transaction=True)
def test_an_on_commit_publish_that_cannot_go_out_is_one_warning_line(app, node, caplog):
    """The web's robust on-commit publish (orders, a cancel, product events): one line, no traceback."""
    with node.memory_alarm():
        with caplog.at_level(logging.WARNING), transaction.atomic():
            after_commit("default", app.send_task, "reports.product_sync", kwargs={"product_id": 7}, robust=True)
        lines = [r for r in caplog.records if "not published" in r.getMessage()]

    assert len(lines) == 1, caplog.text
    assert lines[0].exc_info is None
    assert "blocked by the broker" in lines[0].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


# --- the embedded broker (kombu's filesystem transport, project/broker.py) on a full disk ----------


@pytest.fixture
def full_disk(small_filesystem):
    """A 1 MB tmpfs of the test's own (testing.plugin.small_filesystem): a real ENOSPC once filled."""
    return small_filesystem("1m")


fill = fill_disk


def test_the_embedded_broker_on_a_full_disk_fails_the_publish_at_once(full_disk):
    app = Celery("full-disk-test", amqp="project.broker_publish:AMQP", set_as_current=False)
    app.config_from_object("django.conf:settings", namespace="CELERY")
    folders = {name: str(full_disk / "broker" / name) for name in ("queue", "processed", "control")}
    app.conf.update(
        broker_url="filesystem://localhost/",
        broker_write_url="filesystem://localhost/",
        broker_transport="project.broker:Transport",
        broker_transport_options={
            "data_folder_in": folders["queue"],
            "data_folder_out": folders["queue"],
            "processed_folder": folders["processed"],
            "control_folder": folders["control"],
            "store_processed": False,
        },
    )
    try:
        assert send(app)[0] == "ok"
        fill(full_disk)

        started = time.monotonic()
        with pytest.raises(BrokerUnavailable) as raised:
            app.send_task("reports.product_sync", kwargs={"product_id": 1}, queue="bounded-publish-test")
        seconds = time.monotonic() - started
    finally:
        app.close()

    assert raised.value.reason.startswith("disk full: ")
    assert seconds < AT_ONCE
