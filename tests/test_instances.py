"""The drill machinery works: private RabbitMQ nodes and PostgreSQL clusters break as asked and leave nothing behind.

testing/instances.py makes them, testing/stack.py runs the whole system on
them. Nothing here touches the machine's shared PostgreSQL or RabbitMQ.
"""

import subprocess
import threading
import time
from pathlib import Path

import psycopg2
import pytest
from kombu import Connection, Exchange, Queue

from testing.instances import PostgresCluster, RabbitMQNode, postgres_available, rabbitmq_available

pytestmark = [pytest.mark.private_instances, pytest.mark.timeout(180)]

needs_rabbitmq = pytest.mark.skipif(rabbitmq_available() is not None, reason=f"{rabbitmq_available()}")
needs_postgres = pytest.mark.skipif(postgres_available() is not None, reason=f"{postgres_available()}")


class Publisher:
    """One kombu publish with publisher confirms in a thread: `done_within(s)` says whether it completed in time."""

    def __init__(self, url: str) -> None:
        self.outcome: str | None = None
        self._thread = threading.Thread(target=self._publish, args=(url,), daemon=True)
        self._thread.start()

    def _publish(self, url: str) -> None:
        try:
            with Connection(url, transport_options={"confirm_publish": True}, connect_timeout=2) as connection:
                queue = Queue("drill", Exchange("drill"), "drill")
                connection.Producer().publish({"n": 1}, exchange=queue.exchange, routing_key="drill", declare=[queue])
            self.outcome = "published"
        except Exception as exc:
            self.outcome = f"{type(exc).__name__}: {exc}"

    def done_within(self, seconds: float) -> bool:
        self._thread.join(seconds)
        return not self._thread.is_alive()


def processes_mentioning(text: str) -> list[str]:
    """The command lines of running processes that contain `text` (read from /proc; nothing is signalled)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            line = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in line:
            found.append(f"{cmdline.parent.name}: {line[:200]}")
    return found


def alive(pid: int) -> bool:
    """Whether `pid` is a running process (a zombie waiting for its parent to reap it has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def clusters() -> str:
    return subprocess.run(["pg_lsclusters", "--no-header"], capture_output=True, text=True, check=True).stdout


@needs_rabbitmq
def test_rabbitmq_node_alarms_block_publishes_freezes_restarts_and_leaves_nothing(tmp_path):
    directory = tmp_path / "node"
    node = RabbitMQNode(directory, consumer_timeout=5000)
    with pytest.raises(RuntimeError, match="the drill failed"), node:
        assert node.port != 5672 and node.url == f"amqp://guest:guest@127.0.0.1:{node.port}//"
        assert Publisher(node.url).done_within(5)
        assert node.eval("application:get_env(rabbit, consumer_timeout).") == "{ok,5000}"

        with node.memory_alarm():
            assert "{resource_limit,memory," in node.alarms()
            blocked = Publisher(node.url)
            assert not blocked.done_within(2), blocked.outcome
        assert blocked.done_within(10) and blocked.outcome == "published"  # released when the alarm clears
        assert node.alarms() == "[]"

        with node.disk_alarm():
            blocked = Publisher(node.url)
            assert not blocked.done_within(2), blocked.outcome
        assert blocked.done_within(10) and blocked.outcome == "published"

        with node.frozen():
            stalled = Publisher(node.url)
            assert not stalled.done_within(1)
        assert stalled.done_within(10)
        node.restart()
        assert Publisher(node.url).done_within(5)

        beam, epmd = node.beam_pid(), node._epmd.pid
        node.freeze()  # removed while frozen, and while a test fails
        raise RuntimeError("the drill failed")

    assert not alive(beam) and not alive(epmd)
    assert processes_mentioning(str(directory)) == []
    assert processes_mentioning(node.nodename) == []
    assert not directory.exists()


@needs_postgres
def test_postgres_cluster_refuses_goes_read_only_freezes_and_leaves_nothing():
    cluster = PostgresCluster(f"drill_smoke_{time.monotonic_ns()}")
    with pytest.raises(RuntimeError, match="the drill failed"), cluster:
        assert f" {cluster.name} " in clusters() and cluster.port != 5432
        url = cluster.create_database("app")
        app = psycopg2.connect(url)
        app.autocommit = True
        app.cursor().execute("CREATE TABLE t (x int)")

        with cluster.refuse_connections(["app"]):
            with pytest.raises(psycopg2.OperationalError, match="rejects connection"):
                psycopg2.connect(url)
            with pytest.raises(psycopg2.OperationalError):  # the open session was cut
                app.cursor().execute("SELECT 1")
            assert cluster.sql("SELECT count(*) FROM t", dbname="app") == [(0,)]  # the control socket still works
        app = psycopg2.connect(url)
        app.autocommit = True
        app.cursor().execute("INSERT INTO t VALUES (1)")

        with cluster.read_only():
            app = psycopg2.connect(url)
            with pytest.raises(psycopg2.Error) as refused:
                app.cursor().execute("INSERT INTO t VALUES (2)")
            assert refused.value.pgcode == "25006"
        app = psycopg2.connect(url)
        app.autocommit = True
        app.cursor().execute("INSERT INTO t VALUES (3)")

        cluster.restart()
        with cluster.frozen(), pytest.raises(psycopg2.OperationalError, match="timeout"):
            psycopg2.connect(url, connect_timeout=1)
        assert cluster.sql("SELECT x FROM t ORDER BY x", dbname="app") == [(1,), (3,)]

        postmaster = cluster.postmaster_pid()
        cluster.freeze()  # dropped while frozen, and while a test fails
        raise RuntimeError("the drill failed")

    assert f" {cluster.name} " not in clusters()
    assert not alive(postmaster)
    assert not cluster.config_dir.exists() and not cluster.data_dir.exists()


def test_stack_on_private_instances_confirms_orders_and_audits_clean(drill_stack, rabbitmq_node, postgres_cluster):
    stack = drill_stack()
    assert str(rabbitmq_node.port) in stack.env["CELERY_BROKER_URL"]
    assert str(postgres_cluster.port) in stack.env["DATABASE_URL"]
    product = stack.create_product(stock=2)

    replies = stack.place_orders(3, [product])

    assert [reply.status for reply in replies] == [202, 202, 202]
    states = stack.wait_terminal(stack.order_ids(replies), timeout=60)
    assert sorted(states.values()) == ["cancelled", "confirmed", "confirmed"]
    assert list(stack.cancelled_reasons().values()) == [f"insufficient stock for product {product}: wanted 1, have 0"]
    stack.check_books({product: 2})
    assert stack.request("GET", "/readyz").status == 200

    stack.stop_worker("inventory")
    stack.start_worker("inventory")
    replies = stack.place_orders(1, [product])
    assert stack.wait_terminal(stack.order_ids(replies), timeout=60) == {replies[0].body["id"]: "cancelled"}
