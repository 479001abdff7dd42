"""Real Celery worker processes for the tests and the benchmark: start them, wait, stop them, break them.

`Workers` runs one `celery worker` per queue (and beat, or any other process)
in a session of its own, each logging to a file in one folder; `quiesce`
waits until nothing is queued or running; `terminate` stops a process and
everything it started. Faults (project/saga/faults.py) reach the processes through
the faults file `Workers` hands them. Nothing here imports pytest: the
benchmark (bench/) supervises its workers with the same code.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from urllib.parse import quote

from celery.utils.nodenames import host_format
from django.conf import settings
from django.db import connections

from project import queues
from project.celery import app as celery_app
from testing.instances import free_port

BASE_DIR = Path(__file__).resolve().parent.parent
# The saga timeout the test workers and beat use in tests that run the sweeper.
SWEEP_TIMEOUT_SECONDS = 6


class SupervisionFailed(AssertionError):
    """A process did not start, died, or a condition was not met in time (a test failure, not an error)."""


def wait_for(predicate: Callable[[], object], *, timeout: float = 30.0, interval: float = 0.05, what: str = ""):
    """Poll `predicate` until it returns something truthy, and return that; SupervisionFailed after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SupervisionFailed(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def database_url(alias: str, *, name: str | None = None) -> str:
    """A URL for the database `alias` is connected to now (the test database in tests), for child processes.

    `name` replaces the database's name (a file path for SQLite).
    """
    config = connections[alias].settings_dict
    name = name or config["NAME"]
    if config["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{name}"
    auth = quote(config["USER"] or "")
    if config["PASSWORD"]:
        auth += ":" + quote(config["PASSWORD"])
    return f"postgres://{auth}@{config['HOST'] or '127.0.0.1'}:{config['PORT'] or 5432}/{quote(name)}"


def _held_by_broker() -> list[str]:
    """Queues other than the task queues that hold our messages: on quorum queues, delayed delivery and dead letters."""
    if not settings.QUORUM_QUEUES:
        return []
    return [*queues.delayed_delivery_queues(), queues.DEAD_LETTER_QUEUE]


def purge_queues() -> None:
    """Declare and empty every service queue on the configured broker (and, on quorum queues, delayed and dead ones).

    A queue an earlier run left with other arguments (classic queues from before
    BROKER_QUEUE_TYPE=quorum, another delivery limit) makes the declaration fail
    with PRECONDITION_FAILED: it is deleted and declared again. The suite and the
    bench own their vhost and empty these queues anyway; a production broker gets
    the migration steps instead (project.queues.QueueTypeMismatch).
    """
    with celery_app.connection_for_write() as connection:
        for queue in settings.CELERY_TASK_QUEUES:
            try:
                with connection.channel() as channel:
                    queue(channel).declare()
            except connection.channel_errors as exc:
                print(f"testing: {queue.name} was declared with other arguments ({exc}): deleted, declared again")
                with connection.channel() as channel:
                    channel.queue_delete(queue.name)
                with connection.channel() as channel:
                    queue(channel).declare()
            with connection.channel() as channel:
                queue(channel).purge()
        for name in _held_by_broker():
            with contextlib.suppress(*connection.channel_errors), connection.channel() as other:
                other.queue_purge(name)  # a queue not declared yet: nothing to purge


def _queued_messages() -> int:
    """Messages ready in the task queues and, on quorum queues, retries waiting in delayed delivery."""
    names = [*settings.SERVICE_QUEUES, *settings.COMPENSATION_QUEUES.values()]
    if settings.QUORUM_QUEUES:
        names += queues.delayed_delivery_queues()
    total = 0
    with celery_app.connection_for_write() as connection:
        for name in names:
            with contextlib.suppress(*connection.channel_errors), connection.channel() as channel:
                total += channel.queue_declare(queue=name, passive=True).message_count
    return total


def _busy_workers(nodes: list[str]) -> int:
    """Tasks running, prefetched or waiting for their countdown in the named workers.

    Addressed to the workers by name with a reply limit, so each question ends
    when all have answered instead of always waiting out its timeout; the
    longer timeout is for a busy worker, which answers late rather than never.
    """
    if not nodes:
        return 0
    inspect = celery_app.control.inspect(destination=nodes, limit=len(nodes), timeout=2.0)
    busy = 0
    for replies in (inspect.active(), inspect.reserved(), inspect.scheduled()):
        busy += sum(len(tasks) for tasks in (replies or {}).values())
    return busy


def quiesce(nodes: list[str], timeout: float = 90) -> None:
    """Wait until no message is queued, held or running in these workers (seen twice in a row)."""
    idle = 0

    def settled():
        nonlocal idle
        idle = idle + 1 if _queued_messages() == 0 and _busy_workers(nodes) == 0 else 0
        return idle >= 2

    wait_for(settled, timeout=timeout, interval=0.5, what="the workers to go idle")


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)


def terminate(process: subprocess.Popen, *, warm: bool = False, timeout: float = 20) -> None:
    """Stop a process started in its own session, and anything of its group left behind.

    SIGTERM goes to the whole group, or with `warm` to the main process only:
    a Celery worker then finishes its running tasks and stops its own pool (a
    pool process signalled too counts as lost). SIGKILL after `timeout` s.
    """
    if process.poll() is None:
        if warm:
            process.send_signal(signal.SIGTERM)
        else:
            _signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait(timeout=10)
    _signal_group(process, signal.SIGKILL)


def test_environment() -> dict[str, str]:
    """What saga test workers run with: the test databases, fast retries, a short saga timeout."""
    env = {
        "DATABASE_URL": database_url("default"),
        "SAGA_RETRY_BACKOFF_SECONDS": "0.05",
        "SAGA_RETRY_BACKOFF_MAX_SECONDS": "1.0",
        # Only matter where a test runs beat (the sweeper).
        "SAGA_TIMEOUT_SECONDS": str(SWEEP_TIMEOUT_SECONDS),
        "SAGA_SWEEP_INTERVAL_SECONDS": "1",
        # A row lock held by a test ends a step's wait quickly (PostgreSQL's lock_timeout).
        "DATABASE_LOCK_TIMEOUT_SECONDS": "1",
        # The sweeper looks after 6 s while a step may run 90 s (a fault's 30 s sleep): on
        # purpose here, so the workers' start-up check of it is off (project/checks.py).
        "SILENCED_SYSTEM_CHECKS": "orderflow.E006",
        "CONN_MAX_AGE": "0",
        "CELERY_WORKER_LOST_WAIT": "1",
    }
    for alias in ("inventory", "reports"):
        if alias in settings.DATABASES:
            env[f"DATABASE_URL_{alias.upper()}"] = database_url(alias)
    return env


class Workers:
    """Worker processes (one per queue) and any others, their logs, and the faults they obey.

    `env` is added to this process's environment for the children; without
    it they get `test_environment()`. `node` names each worker (`{queue}` is
    filled in, `%h` is the host). With `faults`, the children read a faults
    file in `directory` (project/saga/faults.py), which `set_faults` rewrites.
    With `metrics`, each worker counts and serves its metrics (`metrics_env`).
    """

    def __init__(
        self,
        directory: Path,
        *,
        env: Mapping[str, str] | None = None,
        node: str = "{queue}-test@%h",
        faults: bool = True,
        metrics: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.extra_env = dict(env) if env is not None else test_environment()
        self.node = node
        self.faults_file: Path | None = None
        if faults:
            self.faults_file = self.directory / "faults.json"
            self.faults_file.write_text("{}")
        self.processes: dict[str, subprocess.Popen] = {}
        #: process name -> the port its metrics exporter listens on (METRICS_PORT), kept across restarts
        self.metrics_ports: dict[str, int] = {}
        self.metrics = metrics
        self.logs: dict[str, str] = {}  # process name -> its log file's name
        self.log_offsets: dict[str, int] = {}

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.extra_env)
        env["PYTHONUNBUFFERED"] = "1"
        if self.faults_file is not None:
            env["ORDERFLOW_FAULTS_FILE"] = str(self.faults_file)
        return env

    # --- logs -----------------------------------------------------------------------

    def log_path(self, name: str) -> Path:
        return self.directory / f"{name}.log"

    def session_log(self, queue: str) -> str:
        """Everything the queue's worker logged (its file is appended to across restarts)."""
        path = self.log_path(f"worker-{queue}")
        return path.read_text(errors="replace") if path.exists() else ""

    def log(self, queue: str) -> str:
        """What the queue's worker logged since `mark_logs()`.

        Order ids repeat between tests (test_fuzz resets the sequences), so a
        count of "order N …" lines must not see an earlier test's order N.
        """
        path = self.log_path(f"worker-{queue}")
        if not path.exists():
            return ""
        with path.open("rb") as file:
            file.seek(self.log_offsets.get(queue, 0))
            return file.read().decode(errors="replace")

    def mark_logs(self) -> None:
        """Start each service queue's `log()` here (the test fixtures call it as each test begins)."""
        for queue in settings.SERVICE_QUEUES:
            path = self.log_path(f"worker-{queue}")
            self.log_offsets[queue] = path.stat().st_size if path.exists() else 0

    # --- starting -------------------------------------------------------------------

    def start_process(
        self, name: str, argv: Sequence[str], *, log: str | None = None, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen:
        """Start `argv` in a session of its own from the project folder, its output appended to `log`.log.

        `env` is added to the children's environment for this process only.
        """
        self.logs[name] = log or name
        with self.log_path(self.logs[name]).open("ab") as file:  # the child keeps its own copy
            process = subprocess.Popen(  # noqa: S603 (our own interpreter and fixed arguments)
                list(argv),
                cwd=BASE_DIR,
                env=self.env() | dict(env or {}),
                stdout=file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes[name] = process
        return process

    def node_name(self, queue: str) -> str:
        return host_format(self.node.format(queue=queue))

    def start(
        self,
        queue: str,
        concurrency: int = 2,
        *,
        pool: str | None = None,
        loglevel: str = "INFO",
        options: Sequence[str] = (),
        prefix: Sequence[str] = (),
    ) -> None:
        """Start a `celery worker` consuming `queue` (not waiting for it: see `wait_ready`).

        `prefix` goes before the interpreter (e.g. ``["faketime", "-f", "+60s"]``: a clock of its own).
        """
        argv = [*prefix,
            sys.executable, "-m", "celery", "-A", "project", "worker", "-Q", queue, "-n", self.node_name(queue),
            "-c", str(concurrency), "-l", loglevel, "--without-gossip", "--without-mingle",
        ]  # fmt: skip
        if pool:
            argv += ["-P", pool]
        env = self.metrics_env(queue) if self.metrics else None
        self.start_process(queue, [*argv, *options], log=f"worker-{queue}", env=env)

    def metrics_env(self, name: str) -> dict[str, str]:
        """The metrics of process group `name` (project/metrics.py): its own multiprocess folder and loopback port.

        The port is picked once per name and kept across restarts, so a test
        scrapes http://127.0.0.1:{metrics_ports[name]}/metrics whenever it asks.
        """
        if name not in self.metrics_ports:
            self.metrics_ports[name] = free_port()
        return {
            "PROMETHEUS_MULTIPROC_DIR": str(self.directory / "metrics" / name),
            "METRICS_PORT": str(self.metrics_ports[name]),
            "METRICS_ADDRESS": "127.0.0.1",
        }

    def start_beat(self) -> None:
        """Start `celery beat` (its schedule file in this folder), serving its metrics as the workers do."""
        self.start_process(
            "beat",
            [sys.executable, "-m", "celery", "-A", "project", "beat", "-l", "INFO",
             "-s", str(self.directory / "beat-schedule")],
            env=self.metrics_env("beat") if self.metrics else None,
        )  # fmt: skip

    def tail(self, name: str, chars: int = 3000) -> str:
        path = self.log_path(self.logs.get(name, name))
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def check_alive(self) -> None:
        """SupervisionFailed, with the end of its log, for a started process that has exited."""
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise SupervisionFailed(f"{name} exited with {process.returncode}:\n{self.tail(name)}")

    def wait_ready(self, queue: str, timeout: float = 60) -> None:
        """Until the queue's worker answers a ping by its node name (at any log level)."""
        process = self.processes[queue]
        node = self.node_name(queue)

        def ready():
            if process.poll() is not None:
                raise SupervisionFailed(f"worker for {queue} exited with {process.returncode}:\n{self.tail(queue)}")
            return any(node in reply for reply in celery_app.control.ping(destination=[node], timeout=0.5) or [])

        wait_for(ready, timeout=timeout, interval=0.1, what=f"the {queue} worker to start")

    def start_services(self) -> None:
        """A worker for every service queue, all started before any is waited for (they boot side by side)."""
        for queue in settings.SERVICE_QUEUES:
            self.start(queue)
        for queue in settings.SERVICE_QUEUES:
            self.wait_ready(queue)

    def node_names(self) -> list[str]:
        """The node names of the service workers still running."""
        return [
            self.node_name(queue)
            for queue, process in self.processes.items()
            if queue in settings.SERVICE_QUEUES and process.poll() is None
        ]

    # --- stopping and breaking ----------------------------------------------------------

    def stop(self, queue: str, *, warm: bool = False) -> None:
        process = self.processes.pop(queue, None)
        if process is not None:
            terminate(process, warm=warm)

    def stop_all(self, *, warm: bool = False) -> None:
        """Stop every process, signalling them all first so their shutdowns overlap."""
        processes = list(self.processes.values())
        self.processes.clear()
        for process in processes:
            if process.poll() is None:
                if warm:
                    process.send_signal(signal.SIGTERM)
                else:
                    _signal_group(process, signal.SIGTERM)
        for process in processes:
            terminate(process, warm=warm)

    def restart(self, queue: str) -> None:
        if queue in self.processes:
            self.stop(queue)
        self.start(queue)
        self.wait_ready(queue)

    def pid(self, queue: str) -> int:
        return self.processes[queue].pid

    def children(self, queue: str) -> list[int]:
        """The pool processes (ForkPoolWorker-N) of a queue's worker."""
        out = subprocess.run(  # noqa: S603
            ["pgrep", "-P", str(self.pid(queue))],  # noqa: S607
            capture_output=True,
            text=True,
            check=False,
        )
        return [int(pid) for pid in out.stdout.split()]

    def kill_children(self, queue: str) -> list[int]:
        """kill -9 the pool processes: the tasks they run die mid-step."""
        pids = self.children(queue)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return pids

    def kill(self, queue: str) -> None:
        """kill -9 the whole worker (main process and pool), as a crashed machine would."""
        process = self.processes.pop(queue)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)

    # --- faults (project/saga/faults.py) --------------------------------------------------------

    def set_faults(self, faults: dict) -> None:
        tmp = self.faults_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(faults))
        tmp.replace(self.faults_file)  # atomic: a worker never reads half a file

    def clear_faults(self) -> None:
        self.set_faults({})
        for counter in self.directory.glob("faults.json.*"):
            counter.unlink()

    def kill_sleeper(self, point: str, order_id: int) -> int:
        """kill -9 the process that sleeps in a `sleep` fault at `point` for `order_id`."""
        pid_file = Path(f"{self.faults_file}.{point.replace(':', '-')}.{order_id}.pid")
        pid = int(wait_for(lambda: pid_file.exists() and pid_file.read_text(), what=f"a process asleep in {point}"))
        os.kill(pid, signal.SIGKILL)
        return pid
