"""The start-up checks of settings that must agree (project/checks.py, reports/checks.py).

Each contradiction is an Error with its id, from the check function and from
Django's check run; `manage.py check` and a real `celery worker` / `celery beat`
started with a contradictory environment exit non-zero naming the settings.
"""

import os
import subprocess
import sys

import pytest
from django.core.checks import run_checks

from project import checks
from reports import checks as reports_checks
from reports.models import ProductReport
from testing import BASE_DIR

AMQP = "amqp://guest:guest@127.0.0.1:5672/ranges"


def ids(messages) -> list[str]:
    return [message.id for message in messages]


def orderflow_errors() -> list[str]:
    return ids(checks.errors_found())


def test_the_defaults_agree():
    assert orderflow_errors() == []
    assert [m for m in run_checks(tags=[checks.TAG]) if m.is_serious()] == []


def test_the_defaults_agree_with_rabbitmq_too(settings):
    settings.CELERY_BROKER_URL = AMQP

    assert orderflow_errors() == []


@pytest.mark.parametrize(("soft", "hard"), [(90, 90), (100, 90), (0, 90), (60, 0), (None, 90)])
def test_e001_soft_time_limit_before_the_hard_one(settings, soft, hard):
    settings.CELERY_TASK_SOFT_TIME_LIMIT, settings.CELERY_TASK_TIME_LIMIT = soft, hard

    (error,) = checks.check_time_limits()

    assert error.id == "orderflow.E001"
    assert "CELERY_TASK_SOFT_TIME_LIMIT" in error.msg and "CELERY_TASK_TIME_LIMIT" in error.msg
    assert error.hint
    assert "orderflow.E001" in orderflow_errors()


@pytest.mark.parametrize(("first", "ceiling"), [(0, 30), (-1, 30), (0.5, 0), (0.5, -5)])
def test_e002_backoff_positive(settings, first, ceiling):
    settings.SAGA_RETRY_BACKOFF_SECONDS, settings.SAGA_RETRY_BACKOFF_MAX_SECONDS = first, ceiling

    assert ids(checks.check_retry_backoff()) == ["orderflow.E002"]


def test_e003_first_backoff_within_the_ceiling(settings):
    settings.SAGA_RETRY_BACKOFF_SECONDS, settings.SAGA_RETRY_BACKOFF_MAX_SECONDS = 40, 30

    (error,) = checks.check_retry_backoff()

    assert error.id == "orderflow.E003"
    assert "SAGA_RETRY_BACKOFF_SECONDS (40)" in error.msg and "SAGA_RETRY_BACKOFF_MAX_SECONDS (30)" in error.msg


def test_e004_backoff_ceiling_below_the_consumer_timeout(settings):
    settings.CELERY_BROKER_URL = AMQP
    settings.BROKER_QUEUE_TYPE = "classic"
    settings.SAGA_RETRY_BACKOFF_MAX_SECONDS = 1800
    settings.SAGA_TIMEOUT_SECONDS = 3600  # E007 kept quiet: this test is about the broker

    (error,) = checks.check_broker_consumer_timeout()

    assert error.id == "orderflow.E004"
    assert "BROKER_CONSUMER_TIMEOUT_SECONDS (1800)" in error.msg and "PRECONDITION_FAILED" in error.msg


def test_quorum_queues_make_e004_and_e007_moot_but_not_e005(settings):
    # A countdown waits in RabbitMQ's delayed-delivery queues, which the sweeper reads; a running task
    # still holds its message unacknowledged.
    settings.CELERY_BROKER_URL = AMQP
    settings.BROKER_QUEUE_TYPE = "quorum"
    settings.SAGA_RETRY_BACKOFF_MAX_SECONDS = 1800
    settings.SAGA_TIMEOUT_SECONDS = 600
    assert checks.check_broker_consumer_timeout() == []
    assert checks.check_saga_timeout() == []

    settings.CELERY_TASK_TIME_LIMIT = 1800
    assert ids(checks.check_broker_consumer_timeout()) == ["orderflow.E005"]


def test_e005_time_limit_below_the_consumer_timeout(settings):
    settings.CELERY_BROKER_URL = AMQP
    settings.BROKER_CONSUMER_TIMEOUT_SECONDS = 60

    assert ids(checks.check_broker_consumer_timeout()) == ["orderflow.E005"]  # time limit 90 ≥ 60


def test_the_consumer_timeout_matters_only_on_amqp_and_when_set(settings):
    settings.BROKER_CONSUMER_TIMEOUT_SECONDS = 60
    settings.CELERY_BROKER_URL = "filesystem://localhost/"
    assert checks.check_broker_consumer_timeout() == []

    settings.CELERY_BROKER_URL = AMQP
    settings.BROKER_CONSUMER_TIMEOUT_SECONDS = 0  # the broker enforces none
    assert checks.check_broker_consumer_timeout() == []


def test_e011_consumer_timeout_not_negative(settings):
    settings.BROKER_CONSUMER_TIMEOUT_SECONDS = -1

    assert ids(checks.check_broker_consumer_timeout()) == ["orderflow.E011"]


@pytest.mark.parametrize("saga_timeout", [90, 60])
def test_e006_saga_timeout_beyond_the_time_limit(settings, saga_timeout):
    settings.SAGA_TIMEOUT_SECONDS, settings.CELERY_TASK_TIME_LIMIT = saga_timeout, 90

    assert "orderflow.E006" in ids(checks.check_saga_timeout())


def test_e007_saga_timeout_beyond_the_backoff_ceiling(settings):
    settings.CELERY_BROKER_URL = "filesystem://localhost/"  # countdowns held by workers (classic queues too)
    settings.SAGA_TIMEOUT_SECONDS, settings.SAGA_RETRY_BACKOFF_MAX_SECONDS = 120, 120
    settings.CELERY_TASK_TIME_LIMIT = 90

    assert ids(checks.check_saga_timeout()) == ["orderflow.E007"]


@pytest.mark.parametrize("interval", [0, -1, 121])
def test_e008_sweep_interval_positive_and_within_the_saga_timeout(settings, interval):
    settings.SAGA_SWEEP_INTERVAL_SECONDS, settings.SAGA_TIMEOUT_SECONDS = interval, 120

    (error,) = checks.check_sweep_interval()

    assert error.id == "orderflow.E008"
    assert "SAGA_SWEEP_INTERVAL_SECONDS" in error.msg


def test_e009_order_deadline_ten_times_the_slowest_recovery(settings):
    settings.SAGA_TIMEOUT_SECONDS, settings.CELERY_TASK_TIME_LIMIT = 120, 90
    settings.SAGA_RETRY_BACKOFF_MAX_SECONDS = 30
    settings.ORDER_DEADLINE_SECONDS = 1199

    (error,) = checks.check_order_deadline()

    assert error.id == "orderflow.E009"
    assert "ORDER_DEADLINE_SECONDS (1199)" in error.msg and "SAGA_TIMEOUT_SECONDS (120)" in error.msg

    settings.ORDER_DEADLINE_SECONDS = 1200
    assert checks.check_order_deadline() == []


def test_e009_is_skipped_without_an_order_deadline(settings):
    del settings.ORDER_DEADLINE_SECONDS

    assert checks.check_order_deadline() == []


@pytest.mark.parametrize(("lines", "quantity"), [(50, 0), (50, 2**31), (0, 1000), (50, -1)])
def test_e010_order_limits_fit_the_quantity_columns(settings, lines, quantity):
    settings.ORDER_MAX_LINES, settings.ORDER_MAX_QUANTITY = lines, quantity

    assert ids(checks.check_order_limits()) == ["orderflow.E010"]


def test_e010_takes_the_quantity_columns_whole_range(settings):
    settings.ORDER_MAX_QUANTITY = 2**31 - 1

    assert checks.check_order_limits() == []
    assert reports_checks.check_line_fits_revenue() == []


def test_e012_revenue_must_hold_a_lifetime_of_the_largest_lines(monkeypatch):
    monkeypatch.setattr(ProductReport._meta.get_field("revenue"), "max_digits", 16)  # what it once was

    (error,) = reports_checks.check_line_fits_revenue()

    assert error.id == "orderflow.E012"
    assert "ORDER_MAX_QUANTITY" in error.msg and "ProductReport.revenue" in error.msg


def test_a_check_silenced_by_id_is_left_out(settings):
    settings.SAGA_TIMEOUT_SECONDS = 60  # ≤ the 90 s time limit: E006
    assert "orderflow.E006" in orderflow_errors()

    settings.SILENCED_SYSTEM_CHECKS = ["orderflow.E006"]

    assert "orderflow.E006" not in orderflow_errors()


# --- the real commands ------------------------------------------------------------------


def contradictory_environment(tmp_path) -> dict[str, str]:
    """This process's environment with a saga timeout below the task time limit (E006), in a folder of its own."""
    env = {k: v for k, v in os.environ.items() if k != "SILENCED_SYSTEM_CHECKS"}
    env.update(ORDERFLOW_VAR_DIR=str(tmp_path), SAGA_TIMEOUT_SECONDS="60", CELERY_TASK_TIME_LIMIT="90")
    return env


def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=60, check=False)


# A contradiction of the saga's own timeouts (E006) stops every command before it touches a database
# or a broker: the same in every shape, so CI runs these in one (docs/testing.md#ci).
@pytest.mark.shape_independent
def test_manage_py_check_fails_naming_the_settings(tmp_path):
    result = run([sys.executable, "manage.py", "check"], contradictory_environment(tmp_path))

    assert result.returncode != 0
    assert "orderflow.E006" in result.stderr
    assert "SAGA_TIMEOUT_SECONDS (60) must be more than CELERY_TASK_TIME_LIMIT (90)" in result.stderr


def test_manage_py_check_passes_with_the_defaults(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGA_", "CELERY_TASK_", "ORDER_"))}

    result = run([sys.executable, "manage.py", "check"], env | {"ORDERFLOW_VAR_DIR": str(tmp_path)})

    assert result.returncode == 0, result.stderr


@pytest.mark.shape_independent
@pytest.mark.parametrize("command", [["worker", "-Q", "orders", "-n", "checks-test@%h", "-c", "1"], ["beat"]])
def test_a_celery_process_refuses_to_start_naming_the_settings(tmp_path, command):
    argv = [sys.executable, "-m", "celery", "-A", "project", *command, "-l", "INFO"]
    if command[0] == "beat":
        argv += ["-s", str(tmp_path / "beat-schedule")]

    result = run(argv, contradictory_environment(tmp_path))

    assert result.returncode == 1, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert f"celery {command[0]} not started" in output
    assert "orderflow.E006: SAGA_TIMEOUT_SECONDS (60) must be more than CELERY_TASK_TIME_LIMIT (90)" in output
    assert "ready." not in output  # the worker never came up


@pytest.mark.parametrize("lock", [0, 60, 120])
def test_e013_lock_timeout_below_the_soft_limit(settings, lock):

    settings.CELERY_TASK_SOFT_TIME_LIMIT = 60
    settings.DATABASE_LOCK_TIMEOUT_SECONDS = lock

    (error,) = checks.check_lock_timeout()

    assert error.id == "orderflow.E013"
    assert "DATABASE_LOCK_TIMEOUT_SECONDS" in error.msg


def test_e013_passes_below_the_soft_limit(settings):

    settings.CELERY_TASK_SOFT_TIME_LIMIT = 60
    settings.DATABASE_LOCK_TIMEOUT_SECONDS = 20

    assert checks.check_lock_timeout() == []
