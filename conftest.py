"""Fixtures shared by every test: users, products, API clients, and real Celery workers.

Saga tests (`@pytest.mark.saga`) run real `celery worker` processes, one per
service queue, against the broker and database the settings name (SQLite +
filesystem broker by default, PostgreSQL + RabbitMQ when DATABASE_URL and
CELERY_BROKER_URL are set). The workers use pytest-django's test database.
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from urllib.parse import quote

import pytest
from celery.utils.nodenames import host_format
from django.conf import settings
from django.db import connections
from pytest_django.fixtures import validate_django_db
from rest_framework.test import APIClient

from project.celery import app as celery_app

BASE_DIR = Path(__file__).resolve().parent
# The saga timeout the workers and beat use in tests that run the sweeper.
SWEEP_TIMEOUT_SECONDS = 6


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """Every test that uses the database may use all of them (the split shape, DESIGN §6).

    Services write to their own alias (inventory, reports); pytest-django
    otherwise allows only `default`, and flushes only `default` after a
    transactional test. With one database this changes nothing.
    """
    for item in items:
        marker = item.get_closest_marker("django_db")
        if marker is None and not {"db", "transactional_db", "live_server"} & set(getattr(item, "fixturenames", ())):
            continue
        transaction, reset_sequences, databases, serialized_rollback, available_apps = (
            validate_django_db(marker) if marker else (False, False, None, False, None)
        )
        if databases is None:
            item.add_marker(
                pytest.mark.django_db(
                    transaction=transaction,
                    reset_sequences=reset_sequences,
                    databases="__all__",
                    serialized_rollback=serialized_rollback,
                    available_apps=available_apps,
                ),
                append=False,
            )


def wait_for(predicate: Callable[[], object], *, timeout: float = 30.0, interval: float = 0.05, what: str = ""):
    """Poll `predicate` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


# --- data -------------------------------------------------------------------


@pytest.fixture
def user(django_user_model):
    return django_user_model.objects.create_user(username="alice", password="alice-password-1")


@pytest.fixture
def other_user(django_user_model):
    return django_user_model.objects.create_user(username="bob", password="bob-password-1")


@pytest.fixture
def staff_user(django_user_model):
    return django_user_model.objects.create_user(username="staff", password="staff-password-1", is_staff=True)


@pytest.fixture
def make_product():
    """make_product(stock=5, price="10.00", sku=None, name=None, active=True) through the service."""
    from inventory import services

    counter = iter(range(1, 1_000_000))

    def make(*, stock: int = 10, price: str = "10.00", sku: str | None = None, name: str | None = None, active=True):
        n = next(counter)
        return services.product_create(
            sku=sku or f"SKU-{os.getpid()}-{n}-{time.monotonic_ns()}",
            name=name or f"Product {n}",
            price=Decimal(price),
            stock=stock,
            active=active,
        )

    return make


@pytest.fixture
def admin_superuser(django_user_model):
    return django_user_model.objects.create_superuser(username="root", password="root-password-1")


@pytest.fixture
def admin_client(client, admin_superuser):
    """Django's test client logged in to the admin as a superuser."""
    client.force_login(admin_superuser)
    return client


@pytest.fixture
def api(user) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


@pytest.fixture
def staff_api(staff_user) -> APIClient:
    client = APIClient()
    client.force_authenticate(staff_user)
    return client


# --- real workers --------------------------------------------------------------


def _database_url(alias: str) -> str:
    """A URL for the test database behind `alias`, for the worker processes."""
    config = connections[alias].settings_dict
    if config["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{config['NAME']}"
    auth = quote(config["USER"] or "")
    if config["PASSWORD"]:
        auth += ":" + quote(config["PASSWORD"])
    return f"postgres://{auth}@{config['HOST'] or '127.0.0.1'}:{config['PORT'] or 5432}/{config['NAME']}"


def purge_queues() -> None:
    with celery_app.connection_for_write() as connection:
        channel = connection.default_channel
        for queue in settings.CELERY_TASK_QUEUES:
            queue(channel).declare()
            queue(channel).purge()


def _queued_messages() -> int:
    with celery_app.connection_for_write() as connection:
        channel = connection.default_channel
        return sum(channel.queue_declare(queue=q, passive=True).message_count for q in settings.SERVICE_QUEUES)


def _busy_workers(nodes: list[str]) -> int:
    """Tasks running, prefetched or waiting for their countdown in the named workers.

    Addressed to the workers by name with a reply limit, so each question ends
    when all have answered instead of always waiting out its timeout (three
    timeouts twice made every real-worker test's teardown take 3.5 s); the
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


def terminate(process: subprocess.Popen) -> None:
    """Stop a process started in its own session: SIGTERM to its group, SIGKILL after 20 s."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


class Workers:
    """The worker processes of a saga test session, and the faults they obey."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.faults_file = directory / "faults.json"
        self.faults_file.write_text("{}")
        self.processes: dict[str, subprocess.Popen] = {}
        self.log_offsets: dict[str, int] = {}

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            DATABASE_URL=_database_url("default"),
            ORDERFLOW_FAULTS_FILE=str(self.faults_file),
            SAGA_STEP_MAX_RETRIES="5",
            SAGA_RETRY_BACKOFF_SECONDS="0.05",
            SAGA_RETRY_BACKOFF_MAX_SECONDS="1.0",
            # Only matter where a test runs beat (the sweeper).
            SAGA_TIMEOUT_SECONDS=str(SWEEP_TIMEOUT_SECONDS),
            SAGA_SWEEP_INTERVAL_SECONDS="1",
            SAGA_MAX_ATTEMPTS="3",
            CONN_MAX_AGE="0",
            CELERY_WORKER_LOST_WAIT="1",
            PYTHONUNBUFFERED="1",
        )
        for alias in ("inventory", "reports"):
            if alias in settings.DATABASES:
                env[f"DATABASE_URL_{alias.upper()}"] = _database_url(alias)
        return env

    def session_log(self, queue: str) -> str:
        """Everything the queue's worker logged this session (its file is appended to across restarts)."""
        path = self.directory / f"worker-{queue}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log(self, queue: str) -> str:
        """What the queue's worker logged since the current test began.

        Order ids repeat between tests (test_fuzz resets the sequences), so a
        count of "order N …" lines must not see an earlier test's order N.
        """
        path = self.directory / f"worker-{queue}.log"
        if not path.exists():
            return ""
        with path.open("rb") as file:
            file.seek(self.log_offsets.get(queue, 0))
            return file.read().decode(errors="replace")

    def mark_logs(self) -> None:
        """Start each queue's `log()` here: called as each test gets the workers."""
        for queue in settings.SERVICE_QUEUES:
            path = self.directory / f"worker-{queue}.log"
            self.log_offsets[queue] = path.stat().st_size if path.exists() else 0

    def start(self, queue: str, concurrency: int = 2) -> None:
        log = open(self.directory / f"worker-{queue}.log", "ab")  # noqa: SIM115 (closed with the process)
        self.processes[queue] = subprocess.Popen(
            [
                sys.executable, "-m", "celery", "-A", "project", "worker",
                "-Q", queue, "-n", f"{queue}-test@%h", "-c", str(concurrency),
                "-l", "INFO", "--without-gossip", "--without-mingle",
            ],
            cwd=BASE_DIR, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def wait_ready(self, queue: str, timeout: float = 60, seen: int = 0) -> None:
        process = self.processes[queue]

        def ready():
            if process.poll() is not None:
                pytest.fail(f"worker for {queue} exited with {process.returncode}:\n{self.session_log(queue)[-3000:]}")
            return self.session_log(queue).count(" ready.") > seen

        wait_for(ready, timeout=timeout, what=f"the {queue} worker to start")

    def node_names(self) -> list[str]:
        """The node names of the service workers still running (as `-n {queue}-test@%h` expands)."""
        return [
            host_format(f"{queue}-test@%h")
            for queue, process in self.processes.items()
            if queue in settings.SERVICE_QUEUES and process.poll() is None
        ]

    def stop(self, queue: str) -> None:
        process = self.processes.pop(queue, None)
        if process is not None:
            terminate(process)

    def pid(self, queue: str) -> int:
        return self.processes[queue].pid

    def children(self, queue: str) -> list[int]:
        """The pool processes (ForkPoolWorker-N) of a queue's worker."""
        out = subprocess.run(["pgrep", "-P", str(self.pid(queue))], capture_output=True, text=True, check=False)
        return [int(pid) for pid in out.stdout.split()]

    def kill_children(self, queue: str) -> list[int]:
        """kill -9 the pool processes: the tasks they run die mid-step."""
        pids = self.children(queue)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return pids

    def kill_sleeper(self, point: str, order_id: int) -> int:
        """kill -9 the process that sleeps in a `sleep` fault at `point` for `order_id`."""
        pid_file = Path(f"{self.faults_file}.{point.replace(':', '-')}.{order_id}.pid")
        pid = int(wait_for(lambda: pid_file.exists() and pid_file.read_text(), what=f"a process asleep in {point}"))
        os.kill(pid, signal.SIGKILL)
        return pid

    def kill(self, queue: str) -> None:
        """kill -9 the whole worker (main process and pool), as a crashed machine would."""
        process = self.processes.pop(queue)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)

    def restart(self, queue: str) -> None:
        if queue in self.processes:
            self.stop(queue)
        seen = self.session_log(queue).count(" ready.")
        self.start(queue)
        self.wait_ready(queue, seen=seen)

    def start_beat(self) -> None:
        log = open(self.directory / "beat.log", "ab")  # noqa: SIM115 (closed with the process)
        self.processes["beat"] = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "project", "beat", "-l", "INFO",
             "-s", str(self.directory / "beat-schedule")],
            cwd=BASE_DIR, env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def set_faults(self, faults: dict) -> None:
        tmp = self.faults_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(faults))
        tmp.replace(self.faults_file)  # atomic: a worker never reads half a file

    def clear_faults(self) -> None:
        self.set_faults({})
        for counter in self.directory.glob("faults.json.*"):
            counter.unlink()


# The session's Workers once a test has asked for them (`no_workers` stops them).
_SESSION_WORKERS: list[Workers] = []


@pytest.fixture(scope="session")
def celery_workers(django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[Workers]:
    """One real worker process per service queue, for the whole session."""
    purge_queues()
    workers = Workers(tmp_path_factory.mktemp("workers"))
    _SESSION_WORKERS.append(workers)
    try:
        for queue in settings.SERVICE_QUEUES:
            workers.start(queue)
        for queue in settings.SERVICE_QUEUES:
            workers.wait_ready(queue)
        yield workers
    finally:
        for queue in list(workers.processes):
            workers.stop(queue)


@pytest.fixture
def no_workers() -> Iterator[None]:
    """No service worker consumes during the test: what it publishes stays queued, and is purged after.

    Stops the session's workers if an earlier test started them (a warm
    shutdown: unacknowledged messages go back to their queues); the next test
    that asks for `workers` starts them again, and must not be handed this
    test's messages for orders its flushed tables no longer hold.
    """
    for session_workers in _SESSION_WORKERS:
        for queue in settings.SERVICE_QUEUES:
            session_workers.stop(queue)
    yield
    purge_queues()


@pytest.fixture
def workers(celery_workers: Workers, transactional_db) -> Iterator[Workers]:
    """Real workers, with committed data they can see, and no faults unless a test sets them."""
    celery_workers.clear_faults()
    for queue in settings.SERVICE_QUEUES:  # a test may have killed one
        if queue not in celery_workers.processes or celery_workers.processes[queue].poll() is not None:
            celery_workers.restart(queue)
    celery_workers.mark_logs()
    yield celery_workers
    celery_workers.clear_faults()
    celery_workers.stop("beat")
    # Late messages (a redelivery after a kill, a duplicate) must not reach the
    # next test's freshly flushed tables.
    quiesce(celery_workers.node_names())


@pytest.fixture
def sweeper(workers: Workers) -> Workers:
    """Celery beat running the saga sweeper every second (saga timeout: SWEEP_TIMEOUT_SECONDS)."""
    workers.start_beat()
    return workers


@pytest.fixture(autouse=True)
def _fresh_throttle_history():
    """The order-create throttle keeps its history in a file cache: no test inherits another's."""
    from django.core.cache import caches

    caches["throttle"].clear()
