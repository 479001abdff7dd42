"""The suite's pytest plugin (`-p testing.plugin`): real Celery workers for saga tests, private instances for drills.

Saga tests (`@pytest.mark.saga`) ask for `workers`: one real `celery worker`
process per service queue, for the whole session, against the broker and
database the settings name (SQLite + filesystem broker by default,
PostgreSQL + RabbitMQ when DATABASE_URL and CELERY_BROKER_URL are set), on
pytest-django's test database.

Fault drills that block, freeze or stop a broker or a database ask for
`rabbitmq_node`, `postgres_cluster` or `drill_stack`: a RabbitMQ node and a
PostgreSQL cluster of the test's own (testing/instances.py), and the whole
system running on them (testing/stack.py), all removed after the test;
`pgbouncer` puts a PgBouncer of the test's own in front of one (testing/pgbouncer.py);
`rabbitmq_cluster` and `cluster_stack` are the same with a three-node
RabbitMQ cluster (testing/cluster.py). Such tests get the `private_instances`
marker by themselves.
"""

import contextlib
import itertools
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from django.conf import settings
from pytest_django.fixtures import validate_django_db

from testing.cluster import RabbitMQCluster
from testing.instances import PostgresCluster, RabbitMQNode, postgres_available, rabbitmq_available, tmpfs
from testing.pgbouncer import PgBouncer, pgbouncer_available
from testing.stack import Stack
from testing.workers import Workers, purge_queues, quiesce, test_environment

# The fixtures that start private instances; a test using one is marked `private_instances`.
PRIVATE_INSTANCE_FIXTURES = {
    "rabbitmq_node",
    "postgres_cluster",
    "drill_stack",
    "pgbouncer",
    "rabbitmq_cluster",
    "cluster_stack",
}


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args):
    """The suite tests the benchmark too: install its app (project/settings.py) before pytest-django loads settings.

    The worker processes inherit it, so they register the benchmark's floor tasks.
    """
    os.environ["ORDERFLOW_BENCH"] = "1"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """Every test that uses the database may use all of them (the split shape, docs/design.md §6).

    Services write to their own alias (inventory, reports); pytest-django
    otherwise allows only `default`, and flushes only `default` after a
    transactional test. With one database this changes nothing.
    """
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if PRIVATE_INSTANCE_FIXTURES & fixtures and not item.get_closest_marker("private_instances"):
            item.add_marker(pytest.mark.private_instances)
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


# The session's Workers once a test has asked for them (`no_workers` stops them).
_SESSION_WORKERS: list[Workers] = []


@pytest.fixture(scope="session")
def celery_workers(django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[Workers]:
    """One real worker process per service queue, for the whole session."""
    purge_queues()
    # Counting metrics as production does (tests/test_metrics.py scrapes them; every saga test runs the code),
    # django-prometheus's database engines included (METRICS_DATABASE, off by default): every test with
    # real processes runs them, and tests/test_metrics.py reads their counts.
    workers = Workers(
        tmp_path_factory.mktemp("workers"), metrics=True, env=test_environment() | {"METRICS_DATABASE": "1"}
    )
    _SESSION_WORKERS.append(workers)
    try:
        workers.start_services()
        yield workers
    finally:
        workers.stop_all()


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
    # A test may have killed or stopped some: start them all, then wait, so their boots overlap.
    missing = [
        queue
        for queue in settings.SERVICE_QUEUES
        if queue not in celery_workers.processes or celery_workers.processes[queue].poll() is not None
    ]
    for queue in missing:
        celery_workers.stop(queue)
        celery_workers.start(queue)
    for queue in missing:
        celery_workers.wait_ready(queue)
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


# --- private instances (testing/instances.py, testing/stack.py) ------------------------------

_cluster_numbers = itertools.count(1)


def _instance_options(request) -> dict:
    """The keyword arguments of the test's `private_instances` marker, e.g. consumer_timeout=5000."""
    marker = request.node.get_closest_marker("private_instances")
    return dict(marker.kwargs) if marker else {}


@pytest.fixture
def rabbitmq_node(request, tmp_path_factory) -> Iterator[RabbitMQNode]:
    """A RabbitMQ node of this test's own on free ports (about 5 s to start), stopped and deleted after it.

    `@pytest.mark.private_instances(consumer_timeout=MS)` sets the node's
    consumer_timeout. Skipped where the rabbitmq-server package is missing.
    A test that also uses `postgres_cluster` gets it made while the node boots.
    """
    reason = rabbitmq_available()
    if reason:
        pytest.skip(f"no private RabbitMQ node: {reason}")
    options = _instance_options(request)
    node = RabbitMQNode(tmp_path_factory.mktemp("rabbitmq"), consumer_timeout=options.get("consumer_timeout"))
    try:
        node.start(wait=False)
        if "postgres_cluster" in request.fixturenames:
            request.getfixturevalue("postgres_cluster")
        node.wait_started()
        yield node
    finally:  # pass or fail
        node.remove()


@pytest.fixture
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster of this test's own on a free port (about 3 s), dropped after it.

    Named drill_<pid>_<n>. Skipped where postgresql-common is missing or not root.
    """
    reason = postgres_available()
    if reason:
        pytest.skip(f"no private PostgreSQL cluster: {reason}")
    with PostgresCluster(f"drill_{os.getpid()}_{next(_cluster_numbers)}") as cluster:
        yield cluster


@contextlib.contextmanager
def _stacks(broker, postgres_cluster, tmp_path_factory) -> Iterator[Callable[..., Stack]]:
    """make(**settings) -> a started Stack on `broker` (a RabbitMQNode or RabbitMQCluster: `url`, `add_vhost`)
    and `postgres_cluster`; every one made is stopped on exit. Each call gets a database of its own
    (orderflow_1, orderflow_2, ...) and, after the first, a vhost of its own (stack2, ...)."""
    stacks: list[Stack] = []

    def make(**overrides) -> Stack:
        n = len(stacks) + 1
        database_url = postgres_cluster.create_database(f"orderflow_{n}")
        broker_url = broker.url if n == 1 else broker.add_vhost(f"stack{n}")
        stack = Stack(
            tmp_path_factory.mktemp("stack"),
            database_url=database_url,
            broker_url=broker_url,
            settings={key: str(value) for key, value in overrides.items()},
        )
        stacks.append(stack)
        return stack.start()

    try:
        yield make
    finally:
        for stack in stacks:
            stack.stop()


@pytest.fixture
def drill_stack(rabbitmq_node, postgres_cluster, tmp_path_factory) -> Iterator[Callable[..., Stack]]:
    """drill_stack(**settings) -> a started Stack on the private node and cluster (about 6 s), stopped after the test.

    Settings are environment variables for every process of the stack
    (`drill_stack(SAGA_TIMEOUT_SECONDS=30)`). Each call gets a database of its
    own (orderflow_1, orderflow_2, ...) and, after the first, a vhost of its own.
    """
    with _stacks(rabbitmq_node, postgres_cluster, tmp_path_factory) as make:
        yield make


@pytest.fixture
def pgbouncer() -> Iterator[Callable[..., PgBouncer]]:
    """pgbouncer(upstream_port=..., pool_size=20, ...) -> a started PgBouncer (testing/pgbouncer.py), removed after.

    In transaction pooling on a free loopback port, in front of the given
    PostgreSQL (upstream_host 127.0.0.1 unless given), pass or fail. Skipped
    where Debian's pgbouncer package is missing (make install-pgbouncer), failed
    under CI=true, where .ci/run installs it.
    """
    reason = pgbouncer_available()
    if reason:
        # CI installs it first (.ci/run, make install-pgbouncer): there a missing PgBouncer is a failure.
        if os.environ.get("CI") == "true":
            pytest.fail(f"no private PgBouncer under CI: {reason}")
        pytest.skip(f"no private PgBouncer: {reason}")
    started: list[PgBouncer] = []

    def make(**options) -> PgBouncer:
        # Not under pytest's tmp folder (root's, mode 0700): PgBouncer run by root switches to
        # the postgres user, who must reach its files.
        bouncer = PgBouncer(Path(tempfile.mkdtemp(prefix="orderflow-pgbouncer-")), **options)
        started.append(bouncer)
        return bouncer.start()

    try:
        yield make
    finally:
        for bouncer in started:
            bouncer.remove()


@pytest.fixture
def rabbitmq_cluster(request, tmp_path_factory) -> Iterator[RabbitMQCluster]:
    """A three-node RabbitMQ cluster of this test's own (testing/cluster.py; 15-40 s to start), removed after it.

    Skipped where the rabbitmq-server package is missing. A test that also uses
    `postgres_cluster` gets it made first.
    """
    reason = rabbitmq_available()
    if reason:
        pytest.skip(f"no private RabbitMQ cluster: {reason}")
    if "postgres_cluster" in request.fixturenames:
        request.getfixturevalue("postgres_cluster")
    with RabbitMQCluster(tmp_path_factory.mktemp("rabbitmq-cluster"), size=3) as cluster:
        yield cluster


@pytest.fixture
def cluster_stack(rabbitmq_cluster, postgres_cluster, tmp_path_factory) -> Iterator[Callable[..., Stack]]:
    """cluster_stack(**settings) -> a started Stack on the private cluster's failover URL list and a private
    PostgreSQL cluster, stopped after the test. As `drill_stack`: a database (orderflow_N) per call, and after
    the first a vhost (stackN) of its own."""
    with _stacks(rabbitmq_cluster, postgres_cluster, tmp_path_factory) as make:
        yield make


@pytest.fixture
def small_filesystem(tmp_path) -> Iterator[Callable[[str], Path]]:
    """small_filesystem(size) -> a tmpfs of `size` ("1m") of this test's own, unmounted after; skipped unless root.

    A real ENOSPC for the full-disk drills (testing.instances.fill_disk fills it).
    """
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    with contextlib.ExitStack() as mounts:
        numbers = itertools.count(1)
        yield lambda size: mounts.enter_context(tmpfs(tmp_path / f"tmpfs{next(numbers)}", size))
