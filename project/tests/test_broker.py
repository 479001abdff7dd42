"""The embedded broker (project/broker.py): claims survive their consumer, and workers poll from an event loop.

Each test runs its own kombu connection on a folder of its own, so nothing here
touches the broker the settings name.
"""

import contextlib
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.asynchronous import Hub

from project import broker

# kombu keeps declared bindings per process (Transport.global_state), not per folder:
# every test names its own queue, or a binding made in another test's folder is
# taken as made in this one.
QUEUE = Queue("work", Exchange("work", type="direct"), routing_key="work")


@pytest.fixture(autouse=True)
def _queue_of_its_own(monkeypatch):
    name = f"work{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(sys.modules[__name__], "QUEUE", Queue(name, Exchange(name, type="direct"), routing_key=name))


def _options(root: Path) -> dict:
    for sub in ("queue", "processed", "control"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return {
        "data_folder_in": str(root / "queue"),
        "data_folder_out": str(root / "queue"),
        "processed_folder": str(root / "processed"),
        "control_folder": str(root / "control"),
        "polling_interval": 0.01,
    }


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "broker"


@pytest.fixture
def connection(root):
    with Connection(transport=broker.Transport, transport_options=_options(root)) as conn:
        yield conn


def publish(connection, *bodies) -> None:
    producer = Producer(connection.channel())
    for body in bodies:
        producer.publish(
            body, exchange=QUEUE.exchange, routing_key=QUEUE.routing_key, declare=[QUEUE], serializer="json"
        )


def queued(root: Path) -> list[str]:
    return sorted(name for name in os.listdir(root / "queue") if name.endswith(f".{QUEUE.name}.msg"))


def claimed(root: Path) -> list[str]:
    claims = root / "claimed"
    if not claims.exists():
        return []
    return sorted(p.name for p in claims.glob("*/*.msg"))


def take(connection, count: int = 1, *, no_ack: bool = False) -> list:
    received = []
    consumer = Consumer(connection.channel(), [QUEUE], callbacks=[lambda body, message: received.append(message)])
    consumer.no_ack = no_ack
    consumer.consume()
    deadline = time.monotonic() + 5
    while len(received) < count and time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            connection.drain_events(timeout=0.1)
    assert len(received) == count
    return received


def test_a_taken_message_stays_on_disk_until_it_is_acknowledged(connection, root):
    publish(connection, {"n": 1})
    (message,) = take(connection)

    assert queued(root) == []
    assert len(claimed(root)) == 1  # not in memory only: a kill -9 now loses nothing

    message.ack()
    assert claimed(root) == []
    assert queued(root) == []


def test_a_rejected_message_goes_back_to_the_head_of_its_queue(connection, root):
    publish(connection, {"n": 1})
    first = queued(root)
    (message,) = take(connection)
    publish(connection, {"n": 2})

    message.reject(requeue=True)

    assert claimed(root) == []
    assert queued(root)[0] == first[0]  # the same file, before the newer message
    assert [m.payload["n"] for m in take(connection, 2)] == [1, 2]


def test_a_message_rejected_without_requeue_is_gone(connection, root):
    publish(connection, {"n": 1})
    (message,) = take(connection)

    message.reject(requeue=False)

    assert claimed(root) == [] and queued(root) == []


def test_a_message_taken_without_acknowledgement_is_not_kept(connection, root):
    publish(connection, {"n": 1})
    take(connection, no_ack=True)

    assert claimed(root) == [] and queued(root) == []


def test_closing_the_channel_requeues_what_it_had_not_acknowledged(root):
    with Connection(transport=broker.Transport, transport_options=_options(root)) as conn:
        publish(conn, {"n": 1}, {"n": 2})
        take(conn, 2)
        assert len(claimed(root)) == 2
    assert claimed(root) == []
    assert len(queued(root)) == 2


DIE_HOLDING = textwrap.dedent(
    """
    import os, sys, time
    from kombu import Connection, Consumer, Exchange, Queue
    from project import broker
    from project.tests.test_broker import _options
    from pathlib import Path
    QUEUE = Queue(sys.argv[4], Exchange(sys.argv[4], type="direct"), routing_key=sys.argv[4])
    conn = Connection(transport=broker.Transport, transport_options=_options(Path(sys.argv[1])))
    got = []
    consumer = Consumer(conn.channel(), [QUEUE], callbacks=[lambda body, message: got.append(message)])
    consumer.consume()
    while len(got) < int(sys.argv[2]):
        try:
            conn.drain_events(timeout=0.1)
        except TimeoutError:
            pass
    print("holding", flush=True)
    if sys.argv[3] == "die":
        os._exit(0)  # as under kill -9: no ack, no restore, no clean-up
    time.sleep(60)
    """
)


def _consumer_process(root: Path, count: int, how: str) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", DIE_HOLDING, str(root), str(count), how, QUEUE.name],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip() == "holding"
    return process


def test_the_claims_of_a_dead_process_are_requeued_and_a_live_ones_are_not(connection, root):
    publish(connection, {"n": 1}, {"n": 2}, {"n": 3})
    alive = _consumer_process(root, 1, "hold")  # takes n=1, then sleeps holding it
    try:
        _consumer_process(root, 2, "die").wait(timeout=10)  # takes n=2 and n=3, then dies
        assert len(claimed(root)) == 3 and queued(root) == []

        moved = broker.recover_orphaned_claims(root / "claimed", root / "queue")

        assert moved == 2
        assert len(queued(root)) == 2
        assert len(claimed(root)) == 1  # the live process keeps its message
        assert len(list((root / "claimed").iterdir())) == 1  # the dead owner's folder is gone
        assert sorted(m.payload["n"] for m in take(connection, 2)) == [2, 3]
    finally:
        alive.kill()
        alive.wait(timeout=10)


def test_a_consumer_requeues_dead_claims_by_itself(connection, root):
    publish(connection, {"n": 1})
    _consumer_process(root, 1, "die").wait(timeout=10)

    # No explicit recovery call: a live consumer looks for orphans as it polls.
    (message,) = take(connection)

    assert message.payload == {"n": 1}


def test_queue_consumers_names_live_consumers_only(connection, root):
    publish(connection, {"n": 1}, {"n": 2})
    _consumer_process(root, 1, "die").wait(timeout=10)
    assert broker.queue_consumers(root / "claimed", QUEUE.name) == []

    alive = _consumer_process(root, 1, "hold")
    try:
        (taken,) = broker.queue_consumers(root / "claimed", QUEUE.name)
        assert abs(time.time() - taken) < 30
        assert broker.queue_consumers(root / "claimed", "other") == []
    finally:
        alive.kill()
        alive.wait(timeout=10)


def test_abandoned_partial_writes_are_removed(root, connection):
    publish(connection, {"n": 1})
    stale = root / "queue" / "tmp-abandoned"
    stale.write_bytes(b'{"half')
    old = time.time() - broker.ABANDONED_WRITE_SECONDS - 1
    os.utime(stale, (old, old))
    fresh = root / "queue" / "tmp-being-written"
    fresh.write_bytes(b"")

    assert broker.remove_abandoned_writes(root / "queue") == 1
    assert not stale.exists() and fresh.exists()
    assert len(queued(root)) == 1


def test_an_unreadable_message_is_set_aside_and_the_next_one_delivered(connection, root):
    (root / "queue" / f"{0:020d}_bad.{QUEUE.name}.msg").write_bytes(b"not json")
    publish(connection, {"n": 1})

    (message,) = take(connection)

    assert message.payload == {"n": 1}
    assert os.listdir(root / "rejected") == [f"{0:020d}_bad.{QUEUE.name}.msg"]


def test_the_transport_delivers_from_an_event_loop(connection, root):
    """Celery runs asynloop + AsynPool only for asynchronous transports (WorkController.should_use_eventloop)."""
    assert broker.Transport.implements.asynchronous
    received = []
    consumer = Consumer(connection.channel(), [QUEUE], callbacks=[lambda body, message: received.append(body)])
    consumer.consume()
    hub = Hub()
    try:
        connection.transport.register_with_event_loop(connection.connection, hub)
        publish(connection, *({"n": n} for n in range(broker.DELIVERIES_PER_POLL + 5)))
        loop = hub.create_loop()
        deadline = time.monotonic() + 10
        while len(received) < broker.DELIVERIES_PER_POLL + 5 and time.monotonic() < deadline:
            next(loop)
    finally:
        connection.transport.unregister_from_event_loop(connection.connection, hub)
        hub.close()

    assert [body["n"] for body in received] == list(range(broker.DELIVERIES_PER_POLL + 5))


def test_asking_who_consumes_keeps_this_processs_own_lock(connection, root):
    """A POSIX lock taken and given back through a second descriptor releases the owner's own lock."""
    publish(connection, {"n": 1})
    take(connection)  # this process now owns a claim folder, locked
    (own,) = [p for p in (root / "claimed").iterdir() if not p.name.startswith(".")]

    assert len(broker.queue_consumers(root / "claimed", QUEUE.name)) == 1
    assert QUEUE.name in broker.consumed_queues(root / "claimed")

    probe = subprocess.run(
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
         "fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)", str(own / "lock")],
        capture_output=True,
    )  # fmt: skip
    assert probe.returncode != 0, "another process could take a live owner's lock"


def test_a_consumer_is_known_before_its_first_message(connection, root):
    consumer = Consumer(connection.channel(), [QUEUE], callbacks=[lambda body, message: None])
    consumer.consume()

    assert broker.queue_consumers(root / "claimed", QUEUE.name)
    consumer.cancel()
    assert not broker.queue_consumers(root / "claimed", QUEUE.name)


def test_a_transient_queue_nobody_consumes_is_deleted_after_it_expires(connection, root, monkeypatch):
    """Flower's `celeryev.<id>` queue outlived Flower and kept filling (Celery declares it to expire)."""
    monkeypatch.setattr(broker, "TRANSIENT_QUEUE_EXPIRES", 0.3)
    monkeypatch.setattr(broker, "EXPIRY_CHECK_SECONDS", 0.0)
    events = Exchange(f"celeryev{uuid.uuid4().hex[:6]}", type="topic")
    gone = Queue(f"celeryev.{uuid.uuid4().hex}", events, routing_key="#")
    producer = Producer(connection.channel())
    for n in range(3):  # declared and bound, then filled, but consumed by nobody
        producer.publish({"n": n}, exchange=events, routing_key="worker.heartbeat", declare=[gone])
    table = root / "control" / f"{events.name}.exchange"
    assert gone.name in table.read_text()
    assert any(name.endswith(f".{gone.name}.msg") for name in os.listdir(root / "queue"))

    publish(connection, {"n": 1})
    take(connection)  # a consumer's polls do the clean-up: the first sees the queue unused...
    time.sleep(0.4)
    publish(connection, {"n": 2})
    take(connection)  # ...the next, after it expired, deletes it

    assert gone.name not in table.read_text()
    assert not any(name.endswith(f".{gone.name}.msg") for name in os.listdir(root / "queue"))
    producer.publish({"n": 9}, exchange=events, routing_key="worker.heartbeat")
    assert not any(name.endswith(f".{gone.name}.msg") for name in os.listdir(root / "queue"))

    # A message that landed after the purge (published while the queue was deleted) goes too.
    (root / "queue" / f"{time.monotonic_ns():020d}_late.{gone.name}.msg").write_text("{}")
    for n in (3, 4):
        time.sleep(0.4)
        publish(connection, {"n": n})
        take(connection)
    assert not any(name.endswith(f".{gone.name}.msg") for name in os.listdir(root / "queue"))
