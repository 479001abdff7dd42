"""A three-node RabbitMQ cluster loses nodes under load, and two workers per queue lose one (issue 16, items 2 and 4).

Black-box, as the other drills (tests/test_faults.py, tests/test_availability.py):
the whole system (testing/stack.py) on instances of the test's own — a
three-node RabbitMQ cluster (testing/cluster.py) reached through Celery's
failover URL list, or one private node — and a private PostgreSQL cluster;
never the machine's shared services. Careful HTTP clients place the orders
(no answer or a 5xx is sent again with the same Idempotency-Key); the API,
the books (stock + units sold per product) and the consistency audit decide.
No speed is asserted: the bounds separate a hang from an answer. Each drill
prints its orders/s (`-s`); docs/testing.md keeps the last run's figures.

The cluster drill is the proof of issue 16 with BROKER_QUEUE_TYPE=quorum (the
service queues replicated on all three nodes, led by one of them); it is
skipped where that setting does not exist (classic queues only: each lives on
one node, and losing it stops that queue's workers).
"""

import itertools
import json
import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from django.conf import settings
from kombu import Connection, Queue

from testing.cluster import RabbitMQCluster
from testing.instances import RABBITMQ_SCRIPTS, rabbitmq_available
from testing.stack import SERVICE_QUEUES, Reply, Stack
from testing.workers import BASE_DIR, Workers, wait_for
from tests.test_faults import END_WITHIN, assert_accepted, assert_refusals_only, stream_lines
from tests.test_instances import processes_mentioning

pytestmark = [pytest.mark.private_instances, pytest.mark.timeout(900)]


class Throughput:
    """Samples how many orders are terminal (confirmed + cancelled, from the API's counts) every `every` s."""

    def __init__(self, stack: Stack, every: float = 1.0) -> None:
        self.stack = stack
        self.every = every
        self.samples: list[tuple[float, int]] = []  # (monotonic s, terminal orders)
        self.marks: list[tuple[float, str]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _count(self, status: str) -> int | None:
        reply = self.stack.request("GET", f"/api/orders/?status={status}&page_size=1", token=self.stack.staff_token)
        return reply.body["count"] if reply.status == 200 and isinstance(reply.body, dict) else None

    def _run(self) -> None:
        while not self._done.is_set():
            confirmed, cancelled = self._count("confirmed"), self._count("cancelled")
            if confirmed is not None and cancelled is not None:
                self.samples.append((time.monotonic(), confirmed + cancelled))
            self._done.wait(self.every)

    def __enter__(self) -> "Throughput":
        self.mark("start")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join(10)
        confirmed, cancelled = self._count("confirmed"), self._count("cancelled")
        if confirmed is not None and cancelled is not None:
            self.samples.append((time.monotonic(), confirmed + cancelled))
        self.mark("end")

    def mark(self, what: str) -> None:
        self.marks.append((time.monotonic(), what))

    def count_at(self, moment: float) -> int:
        """Terminal orders at a monotonic time: the last sample taken by then (0 before the first)."""
        return max((n for t, n in self.samples if t <= moment), default=0)

    def rate(self, start: float, end: float) -> float:
        """Orders that became terminal per second between two monotonic times (samples every `every` s)."""
        return (self.count_at(end) - self.count_at(start)) / (end - start) if end > start else 0.0

    def report(self, title: str) -> list[str]:
        """One line per phase between marks: its length and orders/s; printed, and returned."""
        lines = [title]
        for (t0, what), (t1, _) in itertools.pairwise(self.marks):
            lines.append(f"  {what:<40} {t1 - t0:6.1f} s  {self.rate(t0, t1):6.1f} orders/s")
        (start, _), (end, _) = self.marks[0], self.marks[-1]
        lines.append(f"  {'whole run':<40} {end - start:6.1f} s  {self.rate(start, end):6.1f} orders/s")
        print("\n".join(lines))
        return lines


def place_in_background(
    stack: Stack, n: int, products: list[int], threads: int, interval: float = 0.0
) -> tuple[ThreadPoolExecutor, object]:
    """`n` orders from `threads` careful clients (attempts=100, same Idempotency-Key), in a thread: (pool, future).

    `interval` (s) spaces the orders' starts (Stack.place_orders): a stream that lasts n × interval s.
    """
    pool = ThreadPoolExecutor(1)
    future = pool.submit(
        stack.place_orders,
        n,
        lines=stream_lines(products),
        threads=threads,
        attempts=100,
        timeout=15,
        interval=interval,
    )
    return pool, future


def wait_terminal_count(meter: Throughput, at_least: int, timeout: float = 120.0) -> None:
    """Until the meter has counted `at_least` terminal orders (two API calls a second, not one per order)."""
    wait_for(lambda: meter.samples and meter.samples[-1][1] >= at_least, timeout=timeout, interval=0.2,
             what=f"{at_least} orders terminal")  # fmt: skip


def settle(stack: Stack, replies: list[Reply], n: int) -> dict[int, str]:
    """Each of the `n` careful clients' orders accepted once, and every one of them terminal: {id: state}."""
    assert_accepted(replies, n)
    states = stack.wait_terminal(stack.order_ids(replies), timeout=END_WITHIN + 120)
    assert len(states) == n
    return states


def assert_nothing_doubled(stack: Stack, initial: dict[int, int]) -> None:
    """Refusals the only cancellations, stock + units sold == the initial stock per product, the audit clean."""
    assert_refusals_only(stack)
    stack.check_books(initial)


# --- the machinery: testing/cluster.py ----------------------------------------------------------


def compose_healthcheck_passes(node) -> bool:
    """Whether docker-compose.cluster.yml's healthcheck of a node (run in its container there) passes on `node`.

    The file's `test: ["CMD-SHELL", "…"]` line is a JSON array; compose turns ``$$`` into ``$``.
    The CLI reaches the node through its environment (RABBITMQ_NODENAME, the cookie in $HOME).
    """
    compose = (BASE_DIR / "docker-compose.cluster.yml").read_text().splitlines()
    (line,) = [line for line in compose if line.strip().startswith("test:") and "running_nodes" in line]
    kind, command = json.loads(line.split("test:", 1)[1])
    assert kind == "CMD-SHELL"
    env = {**node.env(), "PATH": f"{RABBITMQ_SCRIPTS}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    done = subprocess.run(
        ["/bin/sh", "-c", command.replace("$$", "$")], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    return done.returncode == 0


@pytest.mark.skipif(rabbitmq_available() is not None, reason=f"{rabbitmq_available()}")
def test_rabbitmq_cluster_fails_over_rejoins_and_leaves_nothing(tmp_path):
    """Three nodes joined; a quorum queue declared through the failover list has a member on each; its leader
    killed, another member leads and the list still connects; the node restarts and rejoins; a graceful stop;
    after an error inside the block every process and folder is gone."""
    directory = tmp_path / "cluster"
    cluster = RabbitMQCluster(directory)
    with pytest.raises(RuntimeError, match="the drill failed"), cluster:
        status = json.loads(cluster.ctl("cluster_status", "--formatter", "json"))
        assert sorted(status["running_nodes"]) == sorted(node.nodename for node in cluster.nodes)
        assert all(compose_healthcheck_passes(node) for node in cluster.nodes)
        assert cluster.url == ";".join(node.url for node in cluster.nodes)
        with Connection(cluster.url) as connection:
            queue = Queue("drill", durable=True, auto_delete=False, queue_arguments={"x-queue-type": "quorum"})
            queue(connection.default_channel).declare()
        (row,) = [row for row in cluster.queues() if row["name"] == "drill"]
        assert row["type"] == "quorum" and len(row["members"]) == 3, row

        leader = cluster.leader_of("drill")
        cluster.kill(leader)
        wait_for(lambda: cluster.leader_of("drill") is not leader, timeout=30, what="a new leader")
        with Connection(cluster.url, connect_timeout=2) as connection:  # the dead node first or not: one answers
            connection.ensure_connection(max_retries=len(cluster.nodes))
        cluster.start_node(leader)
        cluster.stop(cluster.nodes[2] if leader is not cluster.nodes[2] else cluster.nodes[1])
        cluster.wait_members(2)
        pids = [node.beam_pid() for node in cluster.running()]
        # compose's healthcheck: healthy with a peer, not alone (docker-compose.cluster.yml).
        assert all(compose_healthcheck_passes(node) for node in cluster.running())
        alone = cluster.running()[0]
        cluster.stop(cluster.running()[1])
        assert not compose_healthcheck_passes(alone)
        raise RuntimeError("the drill failed")

    assert pids and all(not Path(f"/proc/{pid}").exists() for pid in pids)
    for node in cluster.nodes:
        assert processes_mentioning(node.nodename) == []
    assert processes_mentioning(str(directory)) == []
    assert not any(directory.glob("node*"))


# --- item 2: the cluster loses its inventory leader, then another node ---------------------

CLUSTER_ORDERS = 600
CLUSTER_CLIENTS = 16
# A stream of 600 orders over 120 s (5 a second, below what the stack settles here): every fault
# falls while orders still arrive, however fast the machine is.
CLUSTER_INTERVAL = 0.2


def cluster_goods(stack: Stack) -> dict[int, int]:
    """Four products with 300 units each: enough for most of 600 orders of 1-3 units, so some are refused."""
    return {stack.create_product(stock=300): 300 for _ in range(4)}


@pytest.mark.skipif(
    not hasattr(settings, "BROKER_QUEUE_TYPE"),
    reason="no BROKER_QUEUE_TYPE setting (quorum queues): a classic queue lives on one node, so losing it stops the "
    "queue's workers (NOT_FOUND - home node … is down) and the drill would only show why quorum queues are needed",
)
def test_cluster_loses_the_inventory_leader_then_another_node_under_load(cluster_stack, rabbitmq_cluster):
    """600 orders from 16 clients over 120 s on the cluster's failover list; SIGKILL the node leading `inventory`,
    start it again, then stop another node gracefully (it stays down): nothing lost, nothing doubled, refusals only."""
    cluster = rabbitmq_cluster
    stack = cluster_stack(BROKER_QUEUE_TYPE="quorum")
    initial = cluster_goods(stack)
    queues = {row["name"]: row for row in cluster.queues()}
    kinds = {queue: queues.get(queue, {}).get("type") for queue in SERVICE_QUEUES}
    print(f"service queues: {kinds}")

    with Throughput(stack) as meter:
        pool, placing = place_in_background(stack, CLUSTER_ORDERS, list(initial), CLUSTER_CLIENTS, CLUSTER_INTERVAL)
        with pool:
            wait_terminal_count(meter, 100)
            leader = cluster.leader_of("inventory")
            meter.mark(f"inventory leader {leader.nodename.split('@')[0]} killed")
            cluster.kill(leader)
            time.sleep(5)
            meter.mark("killed node restarting")
            cluster.start_node(leader)
            meter.mark("all three up again")
            time.sleep(5)
            other = next(node for node in cluster.nodes if node is not leader)
            assert not placing.done(), "the drill's stream ended before its last fault: lengthen CLUSTER_INTERVAL"
            meter.mark(f"{other.nodename.split('@')[0]} stopping gracefully")
            cluster.stop(other)
            meter.mark("two nodes of three")
            replies = placing.result(timeout=600)
        meter.mark("every order placed, settling")
        wait_terminal_count(meter, CLUSTER_ORDERS, timeout=END_WITHIN + 120)
        meter.mark("every order terminal")
    states = settle(stack, replies, CLUSTER_ORDERS)
    assert_nothing_doubled(stack, initial)
    meter.report(f"cluster drill, {CLUSTER_ORDERS} orders from {CLUSTER_CLIENTS} clients, queues {kinds}:")
    print(f"outcome: {sorted(states.values()).count('confirmed')} confirmed, "
          f"{sorted(states.values()).count('cancelled')} refused for stock")  # fmt: skip
    ready = stack.request("GET", "/readyz", timeout=10)
    assert ready.status == 200, ready  # the web's broker check and the queues' consumers, with one node down
    stack.check_alive()


# --- item 4: two workers per service queue, one of each pair killed ---------------------------

PAIR_ORDERS = 300
PAIR_CLIENTS = 8


def start_second_workers(stack: Stack, directory: Path) -> Workers:
    """A second `celery worker` per service queue with node names of their own ({queue}-second@host), as on a second
    host: the Procfile's worker line (prefork, concurrency 2, -O fair) and the stack's environment."""
    second = Workers(directory, env=stack.env, node="{queue}-second@%h")
    offsets = {}
    for queue in SERVICE_QUEUES:
        path = second.log_path(f"worker-{queue}")
        offsets[queue] = path.stat().st_size if path.exists() else 0
        second.start(queue, 2, pool="prefork", options=["-O", "fair"])
    for queue in SERVICE_QUEUES:
        node = second.node_name(queue)
        wait_for(lambda q=queue, node=node: f"{node} ready." in second.tail(q, 100000), timeout=90,
                 what=f"{node} ready")  # fmt: skip
    return second


def succeeded(log: str) -> int:
    """How many tasks a worker's log says it finished ("Task … succeeded in …s")."""
    return log.count("] succeeded in ")


def test_two_workers_per_queue_one_of_each_pair_killed_under_load(drill_stack, tmp_path):
    """Two worker nodes per service queue share the load; mid-run one of each pair is SIGKILLed (main process
    and pool): every order terminal, refusals only, the books balanced and the audit clean.

    A second beat runs all along, as a deploy that started one per host would: two sweeps per interval
    (orders/tests/test_services.py::test_two_overlapping_sweeps_count_one_dispatch is the unit proof that
    overlapping sweeps dispatch an order once); the audit says nothing was doubled.
    """
    stack = drill_stack()
    initial = {stack.create_product(stock=200): 200 for _ in range(3)}
    second = start_second_workers(stack, tmp_path / "second")
    second.start_beat()
    try:
        with Throughput(stack) as meter:
            pool, placing = place_in_background(stack, PAIR_ORDERS, list(initial), PAIR_CLIENTS)
            with pool:
                wait_terminal_count(meter, 60)
                meter.mark("one worker of each pair SIGKILLed")
                for queue in SERVICE_QUEUES:
                    stack.workers.kill(queue)
                replies = placing.result(timeout=600)
            meter.mark("every order placed, settling")
            wait_terminal_count(meter, PAIR_ORDERS, timeout=END_WITHIN + 120)
            meter.mark("every order terminal")
        settle(stack, replies, PAIR_ORDERS)
        assert_nothing_doubled(stack, initial)
        meter.report(f"two workers per queue, {PAIR_ORDERS} orders from {PAIR_CLIENTS} clients:")
        for queue in SERVICE_QUEUES:
            first_done = succeeded(stack.workers.session_log(queue))
            second_done = succeeded(second.session_log(queue))
            print(f"{queue}: {first_done} tasks on the killed worker, {second_done} on its pair")
            assert first_done > 0 and second_done > 0, (queue, first_done, second_done)
        second.check_alive()
    finally:
        second.stop_all()
