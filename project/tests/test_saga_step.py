"""The parts of project.saga and project.saga.faults that need no worker.

Eager mode does not behave like a worker for a saga (docs/celery.md 10), so
the step tasks themselves are exercised with real workers in
tests/test_saga.py; here are the pure parts, and `run_step`'s mapping of
errors called directly on a registered task with a pushed request context.
"""

import itertools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded
from django.db import DataError, InternalError, OperationalError
from kombu.exceptions import OperationalError as BrokerOperationalError
from psycopg2.errors import ReadOnlySqlTransaction

import inventory.tasks  # noqa: F401  (registers inventory.stock_reserve)
from inventory.models import OrderReservation
from project.celery import app as celery_app
from project.http.errors import ApplicationError
from project.saga import InvalidMessage, SagaAborted, SagaStep, backoff_seconds, faults, order_id_arg
from testing import proved

BASE_DIR = Path(__file__).resolve().parents[2]


# --- backoff_seconds ---------------------------------------------------------


@pytest.fixture
def backoff(settings):
    # Classic queues: the delay is the jittered window itself (quorum rounding is tested below),
    # whichever broker this suite runs against.
    settings.QUORUM_QUEUES = False
    settings.SAGA_RETRY_BACKOFF_SECONDS = 0.5
    settings.SAGA_RETRY_BACKOFF_MAX_SECONDS = 30.0


@pytest.mark.parametrize("retries", range(12))
def test_backoff_stays_within_its_jittered_exponential_window(backoff, retries):
    ceiling = min(30.0, 0.5 * 2**retries)

    samples = [backoff_seconds(retries) for _ in range(200)]

    assert all(ceiling / 2 <= s <= ceiling for s in samples)


def test_backoff_grows_then_is_capped(backoff):
    def mean(retries: int) -> float:
        return sum(backoff_seconds(retries) for _ in range(500)) / 500

    # the ceiling doubles from 0.5 s up to retry 6, where the 30 s cap takes over
    means = [mean(r) for r in range(7)]
    assert all(later > earlier for earlier, later in itertools.pairwise(means))
    assert max(backoff_seconds(50) for _ in range(500)) <= 30.0
    assert min(backoff_seconds(50) for _ in range(500)) >= 15.0


def test_backoff_is_jittered(backoff):
    assert len({backoff_seconds(3) for _ in range(50)}) > 1


def test_backoff_follows_settings(backoff, settings):
    settings.SAGA_RETRY_BACKOFF_SECONDS = 0.05
    settings.SAGA_RETRY_BACKOFF_MAX_SECONDS = 0.2

    assert all(backoff_seconds(r) <= 0.2 for r in range(10) for _ in range(20))


@pytest.mark.parametrize("retries", range(8))
def test_backoff_on_quorum_queues_is_whole_seconds_never_before_the_window(backoff, settings, retries):
    # native delayed delivery counts whole seconds (project/saga/__init__.py backoff_seconds)
    settings.QUORUM_QUEUES = True
    ceiling = min(30.0, 0.5 * 2**retries)

    samples = [backoff_seconds(retries) for _ in range(200)]

    assert all(s == int(s) and s >= 1 for s in samples)
    assert all(max(1, ceiling / 2) <= s <= max(1, math.ceil(ceiling)) for s in samples)


# --- order_id_arg -------------------------------------------------------------


@pytest.mark.parametrize("value", [1, 42, 10**15])
def test_order_id_arg_accepts_positive_integers(value):
    assert order_id_arg(value) == value


@pytest.mark.parametrize("value", [0, -1, True, False, None, "1", 1.0, 2.5, [1], {"id": 1}])
def test_order_id_arg_rejects_everything_else(value):
    with pytest.raises(InvalidMessage) as rejected:
        order_id_arg(value)
    assert repr(value) in str(rejected.value)


def test_invalid_message_is_a_business_error():
    # so a malformed message is never retried as if it were transient
    assert issubclass(InvalidMessage, ApplicationError)
    assert not issubclass(SagaAborted, ApplicationError)


# --- run_step's mapping of outcomes --------------------------------------------


@pytest.fixture
def step(settings, monkeypatch):
    """The real registered inventory.stock_reserve task, with a request context as a worker would give it."""
    settings.SAGA_RETRY_BACKOFF_SECONDS = 0.5
    settings.SAGA_RETRY_BACKOFF_MAX_SECONDS = 30.0
    settings.ORDERFLOW_FAULTS_FILE = None
    task = celery_app.tasks["inventory.stock_reserve"]
    assert isinstance(task, SagaStep)
    published = []  # (task name, kwargs, options): what the step would have sent, not sent
    messages = []  # the same, as the signatures themselves

    def publish(message, **options):
        if run.broker_down:
            raise BrokerOperationalError("broker unreachable")
        published.append((message.task, dict(message.kwargs), {**message.options, **options}))
        messages.append(message)

    monkeypatch.setattr(task, "publish", publish)

    def run(order_id, call, *, retries=0, chain=None, **saga):
        task.push_request(id="test-request", retries=retries, kwargs={"order_id": order_id, **saga}, chain=chain)
        try:
            return task.run_step(order_id, call, **saga)
        finally:
            task.pop_request()

    run.task = task
    run.published = published
    run.messages = messages
    run.broker_down = False
    return run


def reason(order_id: int) -> str:
    return OrderReservation.objects.filter(order_id=order_id).values_list("reason", flat=True).first() or ""


def test_run_step_returns_what_the_service_returns(step):
    assert step(5, lambda: "done") == "done"


@pytest.mark.parametrize("order_id", [0, "5", None, True])
def test_run_step_rejects_a_malformed_order_id_without_requeue(step, order_id):
    called = []

    with pytest.raises(Reject) as rejected:
        step(order_id, lambda: called.append(1))

    assert rejected.value.requeue is False
    assert called == []


def test_run_step_turns_saga_aborted_into_ignore(step):
    def aborted():
        raise SagaAborted("undo came first")

    with pytest.raises(Ignore):
        step(5, aborted)


def compensations(step) -> list[dict]:
    """The keyword arguments of the compensations the step published, each after checking its proof of origin."""
    return [
        proved(message.task, message.kwargs, message.args)
        for message in step.messages
        if message.task == "orders.order_compensate"
    ]


@pytest.mark.django_db
def test_run_step_notes_a_business_error_and_compensates_with_the_reason_in_the_message(step):
    def refused():
        raise ApplicationError("no stock for you")

    with pytest.raises(ApplicationError):
        step(6, refused)

    assert reason(6) == "no stock for you"
    assert compensations(step) == [{"failure": "no stock for you", "cause": "refused"}]


@pytest.mark.django_db
def test_run_step_treats_a_fault_of_the_data_or_the_code_as_a_failure_that_names_it(step):
    def overflow():
        raise DataError("numeric field overflow\nDETAIL: …")

    with pytest.raises(DataError):
        step(12, overflow)

    assert compensations(step) == [
        {"failure": "inventory.stock_reserve failed: DataError: numeric field overflow", "cause": "infrastructure"}
    ]


@pytest.mark.django_db
def test_run_step_retries_a_transient_error_with_backoff_and_says_why(step):
    def transient():
        raise OperationalError("database restarting")

    with pytest.raises(Retry):
        step(7, transient, retries=2, deadline=time.time() + 3600, placed_at=time.time())

    ((name, kwargs, options),) = step.published
    assert name == "inventory.stock_reserve"
    assert kwargs["last_error"] == "OperationalError: database restarting"
    assert 1.0 <= options["countdown"] <= 2.0  # 0.5 × 2² with jitter in [ceiling/2, ceiling]
    assert options["retries"] == 3
    assert reason(7) == ""  # not a failure


@pytest.mark.django_db
@pytest.mark.parametrize(
    "error",
    [
        OperationalError("connection refused"),  # no SQLSTATE: could not connect
        InternalError("cannot execute UPDATE in a read-only transaction"),  # see the pgcode below
        OperationalError("database is locked"),  # SQLite
        OperationalError("database or disk is full"),  # SQLite
        BrokerOperationalError("broker unreachable"),
        SoftTimeLimitExceeded(),
    ],
    ids=["refused", "read-only", "locked", "disk-full", "broker", "soft-time-limit"],
)
def test_run_step_retries_every_infrastructure_fault(step, error):
    if isinstance(error, InternalError):
        # What Django wraps: psycopg2's error with the server's SQLSTATE (one made by hand has no pgcode).
        error.__cause__ = type("ReadOnlySqlTransaction", (ReadOnlySqlTransaction,), {"pgcode": "25006"})()

    def failing():
        raise error

    with pytest.raises(Retry):
        step(13, failing, deadline=time.time() + 60, placed_at=time.time())

    assert compensations(step) == []


@pytest.mark.django_db
def test_run_step_past_the_deadline_compensates_saying_so(step):
    def transient():
        raise OperationalError("database gone")

    with pytest.raises(Ignore):  # checked before the call: the step does not run
        step(8, transient, deadline=time.time() - 1, placed_at=time.time() - 3601)

    expected = "order deadline passed after 1 h: inventory.stock_reserve could not complete (no earlier error)"
    assert compensations(step) == [{"failure": expected, "cause": "deadline"}]


@pytest.mark.django_db
def test_run_step_that_hits_the_deadline_while_retrying_names_the_error(step):
    def transient():
        raise OperationalError("database gone")

    deadline = time.time() + 0.2
    with pytest.raises(Retry):
        step(14, transient, deadline=deadline, placed_at=deadline - 7200)
    time.sleep(0.3)
    with pytest.raises(Ignore):  # the redelivered retry finds the deadline passed: it names what it carried
        step(14, transient, deadline=deadline, placed_at=deadline - 7200, last_error="OperationalError: database gone")

    assert compensations(step) == [
        {"failure": "order deadline passed after 2 h: inventory.stock_reserve could not complete "
         "(OperationalError: database gone)", "cause": "deadline"}
    ]  # fmt: skip


@pytest.mark.django_db
def test_run_step_puts_the_message_back_when_the_broker_refuses_its_retry(step):
    """Celery's Task.retry would drop it (Reject(requeue=False)); an infrastructure fault must not lose a step."""
    step.broker_down = True

    def transient():
        raise OperationalError("database restarting")

    with pytest.raises(Reject) as rejected:
        step(15, transient)

    assert rejected.value.requeue is True


@pytest.mark.django_db
def test_run_step_publishes_the_next_step_itself_and_retries_if_it_cannot(step):
    following = celery_app.signature("reports.sale_record", kwargs={"order_id": 16}, immutable=True)

    assert step(16, lambda: "reserved", chain=[dict(following)]) == "reserved"
    assert [name for name, _, _ in step.published] == ["reports.sale_record"]

    step.published.clear()
    step.broker_down = True
    with pytest.raises(Reject):  # the retry cannot be published either: the message goes back
        step(16, lambda: "reserved", chain=[dict(following)])


@pytest.mark.django_db
def test_run_step_obeys_an_injected_fault(step, settings, tmp_path):
    path = tmp_path / "faults.json"
    path.write_text(json.dumps({"inventory.stock_reserve": {"action": "fail", "orders": [9]}}))
    settings.ORDERFLOW_FAULTS_FILE = str(path)
    called = []

    with pytest.raises(faults.InjectedFault):
        step(9, lambda: called.append(9))
    step(10, lambda: called.append(10))

    assert called == [10]
    assert reason(9) == "injected failure in inventory.stock_reserve"


@pytest.mark.django_db
def test_run_step_injects_after_the_service_call_too(step, settings, tmp_path):
    path = tmp_path / "faults.json"
    path.write_text(json.dumps({"inventory.stock_reserve:after": {"action": "fail", "orders": [11]}}))
    settings.ORDERFLOW_FAULTS_FILE = str(path)
    called = []

    with pytest.raises(faults.InjectedFault):
        step(11, lambda: called.append(11))

    assert called == [11]  # the service ran; the step failed after it


# --- the fault injector -------------------------------------------------------


@pytest.fixture
def fault_file(settings, tmp_path):
    path = tmp_path / "faults.json"
    settings.ORDERFLOW_FAULTS_FILE = str(path)

    def write(content) -> Path:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        return path

    return write


def test_no_faults_file_means_no_faults(settings):
    settings.ORDERFLOW_FAULTS_FILE = None
    faults.inject("reports.sale_record", 1)


def test_without_a_faults_file_injection_touches_no_file(settings, monkeypatch):
    settings.ORDERFLOW_FAULTS_FILE = None

    def no_file_access(*args, **kwargs):
        raise AssertionError("fault injection looked at a file while switched off")

    for name in ("read_text", "stat", "exists", "open"):
        monkeypatch.setattr(Path, name, no_file_access)
    monkeypatch.setattr(os, "open", no_file_access)
    monkeypatch.setattr(os, "stat", no_file_access)
    faults.inject("reports.sale_record", 1)
    faults.inject("reports.sale_record:after", 1)


def test_a_missing_or_broken_faults_file_is_ignored(fault_file, settings, tmp_path):
    settings.ORDERFLOW_FAULTS_FILE = str(tmp_path / "absent.json")
    faults.inject("reports.sale_record", 1)
    settings.ORDERFLOW_FAULTS_FILE = str(fault_file("{not json"))
    faults.inject("reports.sale_record", 1)


def test_fail_is_a_business_error_for_the_named_task_and_orders(fault_file):
    fault_file({"reports.sale_record": {"action": "fail", "orders": [12, 13]}})

    for order_id in (12, 13):
        with pytest.raises(faults.InjectedFault) as raised:
            faults.inject("reports.sale_record", order_id)
        assert isinstance(raised.value, ApplicationError)
    faults.inject("reports.sale_record", 14)
    faults.inject("inventory.stock_reserve", 12)


def test_fail_without_orders_hits_every_order(fault_file):
    fault_file({"orders.order_confirm": {"action": "fail"}})

    for order_id in (1, 2):
        with pytest.raises(faults.InjectedFault):
            faults.inject("orders.order_confirm", order_id)


def test_times_limits_a_fault_per_order(fault_file):
    fault_file({"reports.sale_record": {"action": "transient", "times": 2}})

    for _ in range(2):
        with pytest.raises(OperationalError):
            faults.inject("reports.sale_record", 20)
    faults.inject("reports.sale_record", 20)  # recovered
    faults.inject("reports.sale_record", 20)
    with pytest.raises(OperationalError):
        faults.inject("reports.sale_record", 21)  # counted per order


def test_without_times_a_fault_keeps_happening(fault_file):
    fault_file({"reports.sale_record": {"action": "transient"}})

    for _ in range(3):
        with pytest.raises(OperationalError):
            faults.inject("reports.sale_record", 30)


def test_sleep_stalls_the_step(fault_file):
    fault_file({"inventory.stock_release": {"action": "sleep", "seconds": 0.2}})

    started = time.monotonic()
    faults.inject("inventory.stock_release", 1)

    assert time.monotonic() - started >= 0.2


def test_a_fault_file_is_read_afresh_each_time(fault_file):
    fault_file({"orders.order_delete": {"action": "fail"}})
    with pytest.raises(faults.InjectedFault):
        faults.inject("orders.order_delete", 1)

    fault_file({})
    faults.inject("orders.order_delete", 1)


def test_exit_kills_the_process_at_once(tmp_path):
    # Must not run in pytest's own process: a child python stands in for the worker.
    path = tmp_path / "faults.json"
    path.write_text(json.dumps({"orders.order_confirm": {"action": "exit", "orders": [3]}}))
    script = (
        "import django; django.setup()\n"
        "from project.saga import faults\n"
        "faults.inject('orders.order_confirm', 4)\n"
        "print('order 4 passed', flush=True)\n"
        "faults.inject('orders.order_confirm', 3)\n"
        "print('still alive', flush=True)\n"
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "ORDERFLOW_FAULTS_FILE": str(path),
    }

    done = subprocess.run(
        [sys.executable, "-c", script], cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=60
    )

    assert done.returncode == 1, done.stderr
    assert "order 4 passed" in done.stdout
    assert "still alive" not in done.stdout
