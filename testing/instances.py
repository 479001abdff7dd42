"""Private RabbitMQ nodes and PostgreSQL clusters for fault drills: start them, break them, remove them.

The machine's PostgreSQL (5432) and RabbitMQ (5672) are shared with CI and
other runs, so a drill that blocks, freezes or stops a broker or a database
does it to an instance of its own, on free loopback ports, made here and
removed afterwards:

- `RabbitMQNode(directory)`: a RabbitMQ node run from the Debian package's
  scripts with every path, port, node name, Erlang cookie and port mapper
  (epmd) of its own under `directory`; nothing of /etc/rabbitmq is read.
- `PostgresCluster(name)`: a Debian `pg_createcluster` cluster on a port of
  its own, trust authentication, removed with `pg_dropcluster`.

Both are context managers (start on enter, remove on exit, pass or fail).
Nothing here imports pytest: testing/plugin.py makes fixtures of them, and
the benchmark may use them too. docs/testing.md, "Fault drills", says how
they are made and how to run the drills alone.
"""

import atexit
import contextlib
import errno
import itertools
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

# The Debian package's own scripts. /usr/sbin/rabbitmq-server is a wrapper that
# changes to the rabbitmq user and reads /etc/rabbitmq; these are the scripts it runs.
RABBITMQ_SCRIPTS = Path("/usr/lib/rabbitmq/bin")
POSTGRES_CONFIG = Path("/etc/postgresql")
POSTGRES_SOCKET_DIR = "/var/run/postgresql"

_names = itertools.count(1)
# Where each kind of port is drawn from: apart from each other, and below Linux's ephemeral
# range (32768-60999), where outgoing connections take their local ports.
RABBITMQ_DIST_PORTS = (12000, 14000)  # the CLI listens 10000 above: 22000-24010
EPMD_PORTS = (14000, 15000)
AMQP_PORTS = (15000, 20000)
POSTGRES_PORTS = (25000, 27000)
WEB_PORTS = (27000, 30000)
_ports_lock = threading.Lock()
_ports_given: set[int] = set()
# Instances started and not removed yet, with the pid of the process that started them:
# removed at that process's exit if a caller could not (never by a forked child's exit).
# (testing/cluster.py registers its RabbitMQCluster here too: anything with a remove() method.)
_live: dict[int, tuple[int, Any]] = {}


@atexit.register
def remove_all() -> None:
    """Remove every instance this process started and has not removed (an interrupted run's last resort)."""
    for owner, instance in list(_live.values()):
        if owner == os.getpid():
            with contextlib.suppress(Exception):
                instance.remove()


class InstanceError(RuntimeError):
    """A private instance did not start, stop or change as asked; the message carries its log's end."""


def rabbitmq_available() -> str | None:
    """None when a private RabbitMQ node can be made here, else why not (a skip reason)."""
    for script in ("rabbitmq-server", "rabbitmqctl"):
        if not (RABBITMQ_SCRIPTS / script).exists():
            return f"{RABBITMQ_SCRIPTS / script} is missing (Debian package rabbitmq-server)"
    if shutil.which("epmd") is None:
        return "epmd is not on PATH (Debian package erlang-base)"
    return None


def postgres_available() -> str | None:
    """None when a private PostgreSQL cluster can be made here, else why not (a skip reason)."""
    for tool in ("pg_createcluster", "pg_ctlcluster", "pg_dropcluster"):
        if shutil.which(tool) is None:
            return f"{tool} is not on PATH (Debian package postgresql-common)"
    if not postgres_version():
        return f"no PostgreSQL version under {POSTGRES_CONFIG}"
    if os.geteuid() != 0:
        return "pg_createcluster for a cluster owned by postgres needs root"
    return None


def postgres_version() -> str | None:
    """The newest PostgreSQL major version installed (the folders of /etc/postgresql), e.g. "15"."""
    if not POSTGRES_CONFIG.is_dir():
        return None
    versions = [p.name for p in POSTGRES_CONFIG.iterdir() if p.is_dir() and re.fullmatch(r"\d+(\.\d+)?", p.name)]
    return max(versions, key=lambda v: tuple(int(x) for x in v.split(".")), default=None)


def free_port(low: int = WEB_PORTS[0], high: int = WEB_PORTS[1]) -> int:
    """A TCP port in [low, high) that nothing listens on at 127.0.0.1 now, not handed out before by this process.

    Random rather than the OS's pick (port 0) so a range can be kept: RabbitMQ's
    CLI, for instance, listens 10000 above the node's distribution port. Another
    process may still take the port before the instance binds it; the instance
    then fails to start, with the reason in its log.
    """
    for _ in range(200):
        port = random.randrange(low, high)
        with _ports_lock:
            if port in _ports_given:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _ports_given.add(port)
            return port
    raise InstanceError(f"no free port in [{low}, {high})")


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0): it has ended all the same.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _children(pid: int) -> list[int]:
    """The direct children of `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def _stop_session(process: subprocess.Popen, *, timeout: float) -> None:
    """SIGCONT then SIGTERM to the process group `process` leads, SIGKILL after `timeout` s, then reap."""
    for signum in (signal.SIGCONT, signal.SIGTERM):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path} does not exist)"


# --- RabbitMQ ---------------------------------------------------------------------------------


def start_epmd(port: int, env: dict[str, str]) -> subprocess.Popen:
    """An Erlang port mapper of our own on 127.0.0.1:`port`, in a session of its own (not waited for)."""
    return subprocess.Popen(  # noqa: S603 (fixed arguments)
        ["epmd", "-port", str(port), "-address", "127.0.0.1"],  # noqa: S607
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


class RabbitMQNode:
    """A private RabbitMQ node: its own node name, ports, folders, Erlang cookie and epmd.

    `directory` (created if missing) holds everything: the node's database
    (mnesia/), logs (log/), its configuration files, its cookie (home/) and
    the server's own output (server.out). The node runs as the current user
    (root here) straight from the package's scripts, so it never reads
    /etc/rabbitmq (whose listener pins 5672) and needs no other user's
    access to `directory`. Its port mapper (epmd) is one of its own on a free
    port, started and stopped with the node: the machine's epmd, which the
    shared broker registers with, is never used, and stopping the node never
    stops a process it did not start.

    `consumer_timeout` (ms) goes into the node's configuration
    (`consumer_timeout`): a delivery not acknowledged within it closes the
    consumer's channel with PRECONDITION_FAILED. None: RabbitMQ's default
    (30 minutes in 3.10).

    `epmd_port`: the port of an epmd that the caller runs and shares between
    nodes (testing/cluster.py: nodes of one cluster must find each other in
    one port mapper); the node then neither starts nor stops an epmd.
    `extra_config`: more rabbitmq.conf lines (e.g. "cluster_partition_handling = pause_minority").

    Raises InstanceError from `start` and `ctl` with the end of the node's
    log when the node does not come up or a command fails.
    """

    def __init__(
        self,
        directory: Path,
        *,
        consumer_timeout: int | None = None,
        start_timeout: float = 60.0,
        epmd_port: int | None = None,
        extra_config: Iterable[str] = (),
    ) -> None:
        self.directory = Path(directory).resolve()
        self.consumer_timeout = consumer_timeout
        self.start_timeout = start_timeout
        self.extra_config = list(extra_config)
        self.nodename = f"drill-{os.getpid()}-{next(_names)}@localhost"
        self.port = free_port(*AMQP_PORTS)
        # The CLI listens on the distribution port + 10000 (RABBITMQ_CTL_DIST_PORT_MIN below),
        # away from the shared broker's 25672 and its CLI's 35672-35682.
        self.dist_port = free_port(*RABBITMQ_DIST_PORTS)
        self.own_epmd = epmd_port is None
        self.epmd_port = free_port(*EPMD_PORTS) if epmd_port is None else epmd_port
        self._server: subprocess.Popen | None = None
        self._epmd: subprocess.Popen | None = None
        self._frozen: list[int] = []
        self._deadline = 0.0

    # --- paths and environment

    @property
    def url(self) -> str:
        """amqp://guest:guest@127.0.0.1:PORT// (guest may log in from loopback only: enough)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    @property
    def log_file(self) -> Path:
        return self.directory / "log" / f"{self.nodename}.log"

    @property
    def pid_file(self) -> Path:
        return self.directory / "beam.pid"

    def env(self) -> dict[str, str]:
        """The environment of the node and of every CLI call to it: nothing of /etc/rabbitmq."""
        d = self.directory
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            # The cookie is read from $HOME/.erlang.cookie by the server and the CLI alike.
            "HOME": str(d / "home"),
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "RABBITMQ_CTL_DIST_PORT_MIN": str(self.dist_port + 10000),
            "RABBITMQ_CTL_DIST_PORT_MAX": str(self.dist_port + 10010),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def _write_files(self) -> None:
        d = self.directory
        for sub in ("mnesia", "log", "home"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        cookie = d / "home" / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text("".join(random.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=20)))
            cookie.chmod(0o400)
        (d / "rabbitmq-env.conf").write_text("# empty: this node's settings are in its environment\n")
        (d / "enabled_plugins").write_text("[].\n")
        config = [
            f"listeners.tcp.1 = 127.0.0.1:{self.port}",
            "log.console = false",
            "log.file.level = info",
            # Off: a drill that alarms on memory should not see a disk alarm too (a nearly full /tmp).
            "disk_free_limit.absolute = 1",
        ]
        if self.consumer_timeout is not None:
            config.append(f"consumer_timeout = {int(self.consumer_timeout)}")
        config += self.extra_config
        (d / "rabbitmq.conf").write_text("\n".join(config) + "\n")

    # --- life cycle

    def start(self, *, wait: bool = True) -> "RabbitMQNode":
        """Start the node and wait until `rabbitmqctl await_startup` says it has booted (`start_timeout` s).

        With `wait=False` it returns once the node's processes are started;
        `wait_started()` then waits (something else can start meanwhile).
        After `stop()` it starts the node again on the same ports and data.
        InstanceError, with the end of the node's log, if it exits or does not boot in time.
        """
        if self._server is not None and self._server.poll() is None:
            return self.wait_started() if wait else self
        self._write_files()
        _live[id(self)] = (os.getpid(), self)
        env = self.env()
        if self.own_epmd:
            self._epmd = start_epmd(self.epmd_port, env)
        self._deadline = time.monotonic() + self.start_timeout
        while not _port_open(self.epmd_port):
            if (self._epmd is not None and self._epmd.poll() is not None) or time.monotonic() > self._deadline:
                self.stop()
                raise InstanceError(f"epmd did not start on port {self.epmd_port}")
            time.sleep(0.05)
        with (self.directory / "server.out").open("ab") as out:
            self._server = subprocess.Popen(  # noqa: S603
                [str(RABBITMQ_SCRIPTS / "rabbitmq-server")],
                cwd=self.directory,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self.wait_started() if wait else self

    def wait_started(self) -> "RabbitMQNode":
        """Until the started node has booted (`start_timeout` s from `start`); else stop it, InstanceError."""
        if self._server is None:
            raise InstanceError(f"{self.nodename} was not started")
        try:
            while True:
                if self._server.poll() is not None:
                    raise InstanceError(
                        f"RabbitMQ node {self.nodename} exited with {self._server.returncode}:\n{self.log_tail()}"
                    )
                left = self._deadline - time.monotonic()
                if left <= 0:
                    raise InstanceError(
                        f"RabbitMQ node {self.nodename} did not boot in {self.start_timeout}s:\n{self.log_tail()}"
                    )
                # Fails at once while the node is not registered yet; waits while it boots.
                done = self._run_ctl(["await_startup", "--timeout", str(max(1, int(left)))], timeout=left + 15)
                if done.returncode == 0:
                    return self
                time.sleep(0.2)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the node (thawed first if frozen) and its epmd: SIGTERM, then SIGKILL after `timeout` s.

        Everything in the node's process group goes (beam.smp, erl_child_setup,
        inet_gethost); the Erlang VM's pid file names beam.smp, which is checked too.
        """
        self.thaw()
        beam = self.beam_pid()
        if self._server is not None:
            _stop_session(self._server, timeout=timeout)
            self._server = None
        if beam is not None and _alive(beam):  # not in the group any more (never seen, but cheap)
            with contextlib.suppress(ProcessLookupError):
                os.kill(beam, signal.SIGKILL)
        if self._epmd is not None:
            _stop_session(self._epmd, timeout=5)
            self._epmd = None
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()

    def remove(self) -> None:
        """Stop the node and delete its folder."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
        _live.pop(id(self), None)

    def restart(self) -> None:
        """`stop_app` then `start_app`: the broker closes every connection and comes back (the node stays up)."""
        self.ctl("stop_app")
        self.ctl("start_app")
        self.ctl("await_startup")

    def __enter__(self) -> "RabbitMQNode":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.remove()

    # --- commands

    def _run_ctl(self, args: list[str], timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(  # noqa: S603
            [str(RABBITMQ_SCRIPTS / "rabbitmqctl"), "-q", "-n", self.nodename, *args],
            env=self.env(),
            cwd=self.directory,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """`rabbitmqctl -q -n NODE ARGS...` and its standard output; InstanceError if it fails or takes `timeout` s.

        Each call starts an Erlang VM: about a second.
        """
        try:
            done = self._run_ctl(list(args), timeout)
        except subprocess.TimeoutExpired as exc:
            raise InstanceError(f"rabbitmqctl {' '.join(args)} took over {timeout}s on {self.nodename}") from exc
        if done.returncode != 0:
            raise InstanceError(
                f"rabbitmqctl {' '.join(args)} failed on {self.nodename} ({done.returncode}):\n"
                f"{done.stdout}{done.stderr}"
            )
        return done.stdout

    def add_vhost(self, name: str) -> str:
        """A virtual host `name` that guest may use fully; its URL (amqp://guest:guest@127.0.0.1:PORT/NAME)."""
        self.ctl("add_vhost", name)
        self.ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        return f"amqp://guest:guest@127.0.0.1:{self.port}/{name}"

    def eval(self, expression: str) -> str:
        """An Erlang expression evaluated on the node (`rabbitmqctl eval`), its printed result."""
        return self.ctl("eval", expression).strip()

    def alarms(self) -> str:
        """The node's resource alarms as Erlang prints them: "[]" when none."""
        return self.eval("rabbit_alarm:get_alarms().")

    def _wait_alarm(self, kind: str, present: bool, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            alarms = self.alarms()
            if (f"{{resource_limit,{kind}," in alarms) == present:
                return
            if time.monotonic() > deadline:
                state = "set" if present else "cleared"
                raise InstanceError(f"the {kind} alarm was not {state} within {timeout}s: {alarms}")
            time.sleep(0.2)

    @contextlib.contextmanager
    def memory_alarm(self) -> Iterator["RabbitMQNode"]:
        """A memory alarm for the block: every publishing connection is blocked until it ends.

        `set_vm_memory_high_watermark 0.00001` (a few hundred bytes: always
        exceeded), waited for until `rabbit_alarm:get_alarms()` lists it;
        afterwards 0.4 (the default) and waited for until it clears.
        Consumers keep receiving: RabbitMQ blocks only connections that publish.
        """
        self.ctl("set_vm_memory_high_watermark", "0.00001")
        try:
            self._wait_alarm("memory", True)
            yield self
        finally:
            self.ctl("set_vm_memory_high_watermark", "0.4")
            self._wait_alarm("memory", False)

    @contextlib.contextmanager
    def disk_alarm(self) -> Iterator["RabbitMQNode"]:
        """A free-disk alarm for the block (`set_disk_free_limit` 1 PB), cleared after (back to 1 byte).

        Blocks publishers like the memory alarm does; the node checks the disk
        at once on a limit change, and this waits until the alarm is listed.
        """
        self.ctl("set_disk_free_limit", "1000000GB")
        try:
            self._wait_alarm("disk", True)
            yield self
        finally:
            self.ctl("set_disk_free_limit", "1")
            self._wait_alarm("disk", False)

    # --- freezing

    def beam_pid(self) -> int | None:
        """The Erlang VM's (beam.smp's) pid, from the pid file the node writes as it boots; None before."""
        with contextlib.suppress(OSError, ValueError):
            return int(self.pid_file.read_text().strip())
        return None

    def freeze(self) -> None:
        """SIGSTOP the Erlang VM: connections stay open and the port accepts, but nothing answers (a stalled broker)."""
        pid = self.beam_pid()
        if pid is None:
            raise InstanceError(f"{self.nodename} has no pid file: not started")
        os.kill(pid, signal.SIGSTOP)
        self._frozen = [pid]

    def thaw(self) -> None:
        """SIGCONT what `freeze` stopped (nothing if it is not frozen)."""
        for pid in self._frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self._frozen = []

    @contextlib.contextmanager
    def frozen(self) -> Iterator["RabbitMQNode"]:
        """`freeze()` for the block, `thaw()` after it, pass or fail."""
        self.freeze()
        try:
            yield self
        finally:
            self.thaw()

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the node's log, or of its startup output when the log was never opened."""
        if self.log_file.exists():
            return _tail(self.log_file, chars)
        return _tail(self.directory / "server.out", chars)


# --- PostgreSQL ---------------------------------------------------------------------------------


class PostgresCluster:
    """A private PostgreSQL cluster (Debian's postgresql-common) on a port of its own.

    `name` is the cluster's name (letters, digits and `_`; unique on the
    machine: the fixtures use drill_<pid>_<n>); `port` a free port when None.
    `start()` creates it the first time (`pg_createcluster VERSION NAME -p
    PORT --start-conf manual -- --auth=trust`: every local and loopback
    connection is trusted, as user postgres) and starts it (`pg_ctlcluster`);
    `remove()` is `pg_dropcluster --stop`. Made for drills: fsync and
    synchronous commit are off (nothing here must survive a machine crash).

    The control connection of `sql()` goes through the Unix socket, so it
    keeps working while `refuse_connections()` turns the app's TCP
    connections away. Needs root (the cluster belongs to the postgres user).
    Commands that fail raise InstanceError with their output and the log's end.
    """

    def __init__(self, name: str, port: int | None = None, *, version: str | None = None) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_]+", name):
            raise ValueError(f"cluster name {name!r}: letters, digits and _ only")
        self.name = name
        self.port = port or free_port(*POSTGRES_PORTS)
        self.version = version or postgres_version()
        if not self.version:
            raise InstanceError(f"no PostgreSQL under {POSTGRES_CONFIG}")
        self.created = False
        self._frozen: list[int] = []

    # --- addresses

    def url(self, dbname: str) -> str:
        """postgres://postgres@127.0.0.1:PORT/DBNAME, for DATABASE_URL (over TCP: what refuse_connections refuses)."""
        return f"postgres://postgres@127.0.0.1:{self.port}/{dbname}"

    @property
    def config_dir(self) -> Path:
        return POSTGRES_CONFIG / self.version / self.name

    @property
    def data_dir(self) -> Path:
        return Path("/var/lib/postgresql") / self.version / self.name

    @property
    def log_file(self) -> Path:
        return Path("/var/log/postgresql") / f"postgresql-{self.version}-{self.name}.log"

    # --- commands

    def _run(self, argv: list[str], timeout: float = 120.0) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)  # noqa: S603
        except subprocess.TimeoutExpired as exc:
            raise InstanceError(f"{' '.join(argv)} took over {timeout}s:\n{_tail(self.log_file)}") from exc
        if done.returncode != 0:
            raise InstanceError(
                f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout}{done.stderr}\n{_tail(self.log_file)}"
            )
        return done.stdout

    def _ctl(self, action: str, *options: str) -> None:
        self._run(["pg_ctlcluster", "--skip-systemctl-redirect", self.version, self.name, action, *options])

    def create(self) -> None:
        """pg_createcluster, not started. InstanceError if the name or port is taken."""
        if self.created:
            return
        self._run(
            [
                "pg_createcluster", self.version, self.name, "-p", str(self.port), "--start-conf", "manual",
                "-o", "fsync=off", "-o", "synchronous_commit=off",
                "-o", "full_page_writes=off", "-o", "max_connections=200",
                "--", "--auth=trust",
            ],
        )  # fmt: skip
        self.created = True
        _live[id(self)] = (os.getpid(), self)

    def start(self) -> "PostgresCluster":
        """Create the cluster if needed and start it; returns once it accepts connections."""
        self.create()
        if not self.running():
            self._ctl("start")
        self._wait_ready()
        return self

    def stop(self) -> None:
        """Stop the server (fast shutdown: sessions are cut, transactions rolled back). Thawed first if frozen."""
        self.thaw()
        if self.running():
            self._ctl("stop", "-m", "fast")

    def restart(self) -> None:
        """Fast shutdown then start: every connection is cut and refused for the second or so it takes."""
        self.thaw()
        self._ctl("restart", "-m", "fast")
        self._wait_ready()

    def remove(self) -> None:
        """pg_dropcluster --stop: the server, its data and configuration are gone."""
        self.thaw()
        if self.created:  # never a cluster of the same name that this object did not create
            postmaster = self.postmaster_pid()
            self._run(["pg_dropcluster", "--stop", self.version, self.name])
            self.created = False
            # pg_ctl returns when the pid file is gone; the process ends a moment later.
            deadline = time.monotonic() + 10
            while postmaster is not None and _alive(postmaster) and time.monotonic() < deadline:
                time.sleep(0.05)
        _live.pop(id(self), None)

    def __enter__(self) -> "PostgresCluster":
        try:
            return self.start()
        except BaseException:
            self.remove()
            raise

    def __exit__(self, *exc) -> None:
        self.remove()

    def running(self) -> bool:
        pid = self.postmaster_pid()
        return pid is not None and _alive(pid)

    def _wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            ready = subprocess.run(  # noqa: S603
                ["pg_isready", "-q", "-h", "127.0.0.1", "-p", str(self.port)],  # noqa: S607
                check=False,
            )
            if ready.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise InstanceError(f"cluster {self.name} not ready after {timeout}s:\n{_tail(self.log_file)}")
            time.sleep(0.1)

    # --- SQL

    def connect(self, dbname: str = "postgres"):
        """A psycopg2 connection (autocommit) as postgres over the Unix socket: not refused by refuse_connections."""
        import psycopg2

        connection = psycopg2.connect(
            host=POSTGRES_SOCKET_DIR, port=self.port, user="postgres", dbname=dbname, connect_timeout=10
        )
        connection.autocommit = True
        return connection

    def sql(self, query: str, dbname: str = "postgres", params: Iterable | None = None) -> list[tuple]:
        """Run one statement (autocommit, as postgres, in `dbname`) and return its rows ([] when it returns none).

        `params` fills %s placeholders (psycopg2). psycopg2.Error as the server raises it.
        """
        connection = self.connect(dbname)
        try:
            with connection.cursor() as cursor:
                cursor.execute(query, params)
                return cursor.fetchall() if cursor.description is not None else []
        finally:
            connection.close()

    def create_database(self, name: str) -> str:
        """CREATE DATABASE (if missing) and return its URL."""
        from psycopg2 import sql as pgsql

        if not self.sql("SELECT 1 FROM pg_database WHERE datname = %s", params=[name]):
            connection = self.connect()
            try:
                with connection.cursor() as cursor:
                    cursor.execute(pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(name)))
            finally:
                connection.close()
        return self.url(name)

    def terminate_backends(self, databases: Iterable[str] | None = None) -> int:
        """pg_terminate_backend every client session (of `databases`, or all) but the caller's; how many."""
        names = list(databases) if databases is not None else None
        rows = self.sql(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() "
            "AND (%s::text[] IS NULL OR datname = ANY(%s::text[]))",
            params=[names, names],
        )
        return rows[0][0]

    # --- faults

    @contextlib.contextmanager
    def refuse_connections(self, databases: Iterable[str] | None = None) -> Iterator["PostgresCluster"]:
        """For the block, the server refuses every TCP connection (to `databases`, or to all), and cuts those open.

        A `reject` rule for 127.0.0.1 and ::1 goes first in pg_hba.conf, the
        server reloads it, and the sessions are terminated: a new connection
        fails at once with "FATAL: pg_hba.conf rejects connection for host
        ..." (SQLSTATE 28000; psycopg2 raises OperationalError), an open one
        with "terminating connection due to administrator command" (57P01) on
        its next statement. The server stays up, as a database does that
        turns an application away (an access rule, a database being
        maintained); the Unix-socket control connection of `sql()` still
        works. (An idle session that is cut sees only "server closed the
        connection unexpectedly" when it next speaks; psycopg2 raises
        OperationalError for all three.) The old pg_hba.conf is back, and reloaded, after the block.
        """
        hba = self.config_dir / "pg_hba.conf"
        original = hba.read_text()
        targets = ",".join(databases) if databases is not None else "all"
        rules = f"host {targets} all 127.0.0.1/32 reject\nhost {targets} all ::1/128 reject\n"
        hba.write_text(rules + original)
        try:
            self.sql("SELECT pg_reload_conf()")
            self._wait_hba(rejecting=True)
            self.terminate_backends(databases)
            yield self
        finally:
            hba.write_text(original)
            self.sql("SELECT pg_reload_conf()")
            self._wait_hba(rejecting=False)

    def _wait_hba(self, *, rejecting: bool, timeout: float = 10.0) -> None:
        """Until pg_hba_file_rules shows the reloaded file (a reload is asynchronous)."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.sql("SELECT count(*) FROM pg_hba_file_rules WHERE auth_method = 'reject'")
            if bool(rows[0][0]) == rejecting:
                # The view reads the file; the postmaster applies it on SIGHUP, a moment later.
                time.sleep(0.2)
                return
            if time.monotonic() > deadline:
                raise InstanceError(f"pg_hba.conf reload not seen in {timeout}s")
            time.sleep(0.05)

    @contextlib.contextmanager
    def read_only(self) -> Iterator["PostgresCluster"]:
        """For the block, every new transaction is read-only: a write fails with SQLSTATE 25006.

        `ALTER SYSTEM SET default_transaction_read_only = on`, `pg_reload_conf()`,
        and the client sessions terminated so that they reconnect to a
        read-only server: what a managed failover to a node that is not (yet)
        the primary looks like. Reset, and reloaded, after the block.
        """
        self._set_read_only(True)
        try:
            self.terminate_backends()
            yield self
        finally:
            self._set_read_only(False)

    def _set_read_only(self, on: bool) -> None:
        connection = self.connect()
        try:
            with connection.cursor() as cursor:
                cursor.execute("SET default_transaction_read_only = off")  # this session may still change it
                if on:
                    cursor.execute("ALTER SYSTEM SET default_transaction_read_only = on")
                else:
                    cursor.execute("ALTER SYSTEM RESET default_transaction_read_only")
                cursor.execute("SELECT pg_reload_conf()")
        finally:
            connection.close()
        deadline = time.monotonic() + 10
        while self.sql("SHOW default_transaction_read_only")[0][0] != ("on" if on else "off"):
            if time.monotonic() > deadline:
                raise InstanceError(f"default_transaction_read_only did not become {on} in 10 s")
            time.sleep(0.05)

    def postmaster_pid(self) -> int | None:
        """The server's main process, from postmaster.pid; None when it is not running."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        return None

    def freeze(self) -> None:
        """SIGSTOP the postmaster and every backend: connections hang instead of failing (a stalled database)."""
        postmaster = self.postmaster_pid()
        if postmaster is None:
            raise InstanceError(f"cluster {self.name} is not running")
        os.kill(postmaster, signal.SIGSTOP)  # first: it starts no new backend meanwhile
        self._frozen = [postmaster]
        for pid in _children(postmaster):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                self._frozen.append(pid)

    def thaw(self) -> None:
        """SIGCONT what `freeze` stopped, backends first (nothing if not frozen)."""
        for pid in reversed(self._frozen):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self._frozen = []

    @contextlib.contextmanager
    def frozen(self) -> Iterator["PostgresCluster"]:
        """`freeze()` for the block, `thaw()` after it, pass or fail."""
        self.freeze()
        try:
            yield self
        finally:
            self.thaw()


# --- a small filesystem of the test's own, to fill --------------------------------------------


@contextlib.contextmanager
def tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (mount's syntax: "1m", "48m") at `mount` (made if missing), unmounted after (root only)."""
    mount.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=True)  # noqa: S603, S607
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)  # noqa: S603, S607


def fill_disk(folder: Path) -> Path:
    """Write zeros into `folder`/filler until the filesystem refuses (ENOSPC, asserted); the filler's path."""
    filler = folder / "filler"
    with open(filler, "wb") as file:
        try:
            while True:
                file.write(b"\0" * 65536)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler
