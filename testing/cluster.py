"""A private three-node RabbitMQ cluster for drills: start it, lose nodes under load, remove it.

`RabbitMQCluster(directory, size=3)` runs `size` RabbitMQNode-s
(testing/instances.py: own node names, ports, data folders; nothing of
/etc/rabbitmq) that share one Erlang cookie and one port mapper (epmd) of
the cluster's own, and joins them (`rabbitmqctl join_cluster`, the manual
way of https://www.rabbitmq.com/docs/clustering). Quorum queues need nothing
more on RabbitMQ 3.10: their feature flag is on in a fresh cluster, and a
quorum queue declared once all nodes have joined gets a member on each of
them (https://www.rabbitmq.com/docs/quorum-queues). The drill then kills,
stops and restarts nodes. Nothing here imports pytest; testing/plugin.py's
`rabbitmq_cluster` fixture is built on it.
"""

import contextlib
import json
import os
import random
import signal
import string
import time
from pathlib import Path
from urllib.parse import quote

from testing.instances import (
    EPMD_PORTS,
    InstanceError,
    RabbitMQNode,
    _live,
    _port_open,
    _stop_session,
    free_port,
    start_epmd,
)


class RabbitMQCluster:
    """`size` RabbitMQ nodes on loopback joined into one cluster, in `directory` (node1/, node2/, ...).

    A context manager: entering starts every node and joins them (about 15 s
    for three), leaving stops them and deletes `directory`'s nodes, pass or
    fail; testing/instances.remove_all (atexit) is the last resort for the
    nodes, and `remove` stops the shared epmd. Every node is configured with
    `cluster_partition_handling = pause_minority`, the setting RabbitMQ
    recommends for clusters of three or more nodes
    (https://www.rabbitmq.com/docs/partitions).

    `nodes[i]` is a RabbitMQNode (its `.nodename`, `.port`, `.url`, `.ctl`).
    Methods that name a node take the node or its index. InstanceError when a
    node does not start or a command fails.
    """

    def __init__(self, directory: Path, size: int = 3, *, start_timeout: float = 90.0) -> None:
        if size < 1:
            raise ValueError(f"size={size}: at least one node")
        self.directory = Path(directory).resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.epmd_port = free_port(*EPMD_PORTS)
        self.cookie = "".join(random.choices(string.ascii_uppercase, k=20))
        self.nodes = [
            RabbitMQNode(
                self.directory / f"node{i + 1}",
                start_timeout=start_timeout,
                epmd_port=self.epmd_port,
                extra_config=["cluster_partition_handling = pause_minority"],
            )
            for i in range(size)
        ]
        self._epmd = None

    # --- addresses

    @property
    def url(self) -> str:
        """Celery's failover list: ``amqp://guest:guest@127.0.0.1:P1//;amqp://…:P2//;…`` (every node, in order).

        Celery passes a broker_url holding ``;`` to kombu's Connection, which
        splits it into alternates and moves to the next after a failed
        connect (broker_failover_strategy "round-robin", the default;
        https://docs.celeryq.dev/en/stable/userguide/configuration.html#broker-url).
        """
        return ";".join(node.url for node in self.nodes)

    def vhost_url(self, vhost: str) -> str:
        """The failover list for virtual host `vhost` (made with `add_vhost`)."""
        return ";".join(f"amqp://guest:guest@127.0.0.1:{node.port}/{quote(vhost, safe='')}" for node in self.nodes)

    def node(self, which: "RabbitMQNode | int") -> RabbitMQNode:
        return self.nodes[which] if isinstance(which, int) else which

    def running(self) -> list[RabbitMQNode]:
        """The nodes whose Erlang VM is alive (started and not killed or stopped)."""
        return [node for node in self.nodes if node._server is not None and node._server.poll() is None]

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """`rabbitmqctl ARGS` on the first running node; its standard output."""
        running = self.running()
        if not running:
            raise InstanceError("no node of the cluster is running")
        return running[0].ctl(*args, timeout=timeout)

    # --- life cycle

    def start(self) -> "RabbitMQCluster":
        """Start the epmd and every node (booting together), then join nodes 2.. to node 1."""
        # Removed at interpreter exit if a caller could not (testing.instances.remove_all): the nodes, then the epmd.
        _live[id(self)] = (os.getpid(), self)
        try:
            self._epmd = start_epmd(self.epmd_port, self.nodes[0].env())
            deadline = time.monotonic() + 10
            while not _port_open(self.epmd_port):
                if self._epmd.poll() is not None or time.monotonic() > deadline:
                    raise InstanceError(f"epmd did not start on port {self.epmd_port}")
                time.sleep(0.05)
            for node in self.nodes:
                home = node.directory / "home"
                home.mkdir(parents=True, exist_ok=True)
                cookie = home / ".erlang.cookie"
                cookie.write_text(self.cookie)
                cookie.chmod(0o400)
                node.start(wait=False)
            for node in self.nodes:
                node.wait_started()
            first = self.nodes[0]
            for node in self.nodes[1:]:
                node.ctl("stop_app")
                node.ctl("join_cluster", first.nodename)
                node.ctl("start_app")
                node.ctl("await_startup")
            self.wait_members(len(self.nodes))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Stop every node, delete their folders, stop the epmd."""
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.remove()
        if self._epmd is not None:
            _stop_session(self._epmd, timeout=5)
            self._epmd = None
        _live.pop(id(self), None)

    def __enter__(self) -> "RabbitMQCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.remove()

    def wait_members(self, n: int, timeout: float = 60.0) -> None:
        """Until `n` nodes are running members of the cluster (`cluster_status`), else InstanceError."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(InstanceError):
                status = json.loads(self.ctl("cluster_status", "--formatter", "json"))
                if len(status.get("running_nodes", [])) >= n:
                    return
            if time.monotonic() > deadline:
                raise InstanceError(f"fewer than {n} running nodes after {timeout}s")
            time.sleep(0.5)

    # --- faults

    def kill(self, which: "RabbitMQNode | int") -> RabbitMQNode:
        """SIGKILL the node's Erlang VM (beam.smp), as a crashed machine: no goodbye to clients or peers."""
        node = self.node(which)
        beam = node.beam_pid()
        if beam is None:
            raise InstanceError(f"{node.nodename} has no pid file: not running")
        os.kill(beam, signal.SIGKILL)
        if node._server is not None:
            with contextlib.suppress(Exception):
                node._server.wait(timeout=10)
        node.stop(timeout=5)  # what is left of its process group; the cluster's epmd stays
        return node

    def stop(self, which: "RabbitMQNode | int") -> RabbitMQNode:
        """Stop the node gracefully (`rabbitmqctl stop`: it closes its connections and leaves its peers a note)."""
        node = self.node(which)
        node.ctl("stop", timeout=90)
        node.stop()
        return node

    def start_node(self, which: "RabbitMQNode | int") -> RabbitMQNode:
        """Start a killed or stopped node again on its data: it rejoins the cluster by itself."""
        node = self.node(which)
        node.start()
        self.wait_members(len(self.running()))
        return node

    # --- queues

    def queues(self, vhost: str = "/") -> list[dict]:
        """`rabbitmqctl list_queues name type leader members pid` as dicts (leader/members: quorum queues only)."""
        out = self.ctl("list_queues", "-p", vhost, "name", "type", "leader", "members", "pid", "--formatter", "json")
        return json.loads(out or "[]")

    def leader_of(self, queue: str, vhost: str = "/") -> RabbitMQNode:
        """The node leading quorum queue `queue` (a classic queue: the node it lives on); InstanceError if unknown."""
        for row in self.queues(vhost):
            if row.get("name") != queue:
                continue
            name = row.get("leader") if row.get("type") == "quorum" else None
            if not name:  # a classic queue: its process's pid, printed as text, is <node.N.N.N>
                table = self.ctl("list_queues", "-p", vhost, "name", "pid", "--no-table-headers")
                pids = dict(line.split("\t", 1) for line in table.splitlines() if "\t" in line)
                name = next((node.nodename for node in self.nodes if node.nodename in pids.get(queue, "")), None)
            for node in self.nodes:
                if node.nodename == name:
                    return node
            raise InstanceError(f"queue {queue}: leader {name!r} is not a node of this cluster ({row})")
        raise InstanceError(f"no queue {queue!r} in vhost {vhost!r}")

    def add_vhost(self, name: str) -> str:
        """A virtual host that guest may use fully (cluster-wide); its failover list."""
        self.ctl("add_vhost", name)
        self.ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        return self.vhost_url(name)
