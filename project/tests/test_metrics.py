"""project.metrics' pure parts: how a publish failure, a sweep and a saga task's end are counted.

The counts served by real processes are tests/test_metrics.py's.
"""

from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY

from project import broker_publish, metrics
from project.broker_publish import BrokerBlocked, BrokerUnavailable


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (BrokerBlocked("blocked by the broker (low on memory)"), "blocked"),
        (BrokerUnavailable("timed out after 1 s"), "timeout"),
        (BrokerUnavailable("[Errno 111] Connection refused"), "unavailable"),
        (ValueError("a message the broker refused"), "refused"),
    ],
)
def test_a_failed_publish_is_classed_by_why(exc, kind):
    assert broker_publish._failure_kind(exc) == kind


def test_publish_ended_times_every_publish_and_counts_the_failed_ones():
    name = "tests.publish_ended"
    before = sample("orderflow_broker_publish_duration_seconds_count", task=name)

    metrics.publish_ended(name, 0.002)
    metrics.publish_ended(name, 1.0, "timeout")

    assert sample("orderflow_broker_publish_duration_seconds_count", task=name) == before + 2
    assert sample("orderflow_broker_publish_failures_total", task=name, reason="timeout") == 1
    assert sample("orderflow_broker_publish_failures_total", task=name, reason="refused") == 0


def test_a_sweep_counts_what_it_did_and_ignores_unknown_kinds():
    before = {kind: sample("orderflow_sweeper_actions_total", action=kind) for kind in metrics.SWEEP_ACTION_KINDS}

    metrics.sweep_counted({"published": 2, "expired": 0, "deferred": 1, "something_new": 5})
    metrics.sweep_counted(None)  # a sweep skipped on a passing fault

    after = {kind: sample("orderflow_sweeper_actions_total", action=kind) for kind in metrics.SWEEP_ACTION_KINDS}
    assert {kind: after[kind] - before[kind] for kind in after if after[kind] != before[kind]} == {
        "published": 2,
        "deferred": 1,
    }
    assert sample("orderflow_sweeper_actions_total", action="something_new") == 0


class FakeStep:
    """What the signal handlers read of a saga task: a name, run_step, and the request."""

    def __init__(self, name: str, saga_cause: str | None = None) -> None:
        self.name = name
        self.request = SimpleNamespace(saga_cause=saga_cause) if saga_cause else SimpleNamespace()

    def run_step(self):  # pragma: no cover (only its presence matters)
        raise NotImplementedError


@pytest.mark.parametrize(
    ("state", "cause", "outcome"),
    [
        ("SUCCESS", None, "succeeded"),
        ("RETRY", None, "retried"),
        ("IGNORED", None, "skipped"),  # SagaAborted: the step came after its undo
        ("IGNORED", "deadline", "failed"),  # _fail without an exception: the deadline had passed
        ("FAILURE", "refused", "failed"),
        ("FAILURE", None, "failed"),
        ("REJECTED", None, "rejected"),
    ],
)
def test_a_saga_task_run_is_counted_by_how_it_ended(state, cause, outcome):
    task = FakeStep(f"tests.step_{state.lower()}_{cause}", cause)
    metrics._step_started(task_id="t-1", task=task)

    metrics._step_ended(task_id="t-1", task=task, state=state)

    assert sample("orderflow_saga_task_runs_total", task=task.name, outcome=outcome) == 1
    assert sample("orderflow_saga_task_duration_seconds_count", task=task.name) == 1
    failures = sample("orderflow_saga_task_failures_total", task=task.name, cause=cause or "unhandled")
    assert failures == (1 if outcome == "failed" else 0)


def test_tasks_that_are_not_saga_steps_are_not_counted():
    task = SimpleNamespace(name="tests.plain_task", request=SimpleNamespace())
    metrics._step_started(task_id="t-2", task=task)
    metrics._step_ended(task_id="t-2", task=task, state="SUCCESS")

    assert sample("orderflow_saga_task_runs_total", task="tests.plain_task", outcome="succeeded") == 0


def test_a_retry_is_counted_by_the_fault_it_retries():
    from celery.exceptions import Retry
    from django.db import OperationalError

    task = FakeStep("tests.step_retried")
    metrics._step_retried(sender=task, reason=Retry(exc=OperationalError("connection refused")))

    assert sample("orderflow_saga_task_retries_total", task=task.name, exception="OperationalError") == 1


def test_empty_dir_removes_earlier_counts_but_the_callers_own(tmp_path, monkeypatch):
    monkeypatch.setenv(metrics.MULTIPROC_DIR_VARIABLE, str(tmp_path / "counts"))
    (tmp_path / "counts").mkdir()
    for name in ("counter_100.db", "histogram_100.db", "counter_7.db", "gauge_livesum_7.db"):
        (tmp_path / "counts" / name).write_bytes(b"")

    metrics.empty_dir(keep_pid=7)

    assert sorted(p.name for p in (tmp_path / "counts").iterdir()) == ["counter_7.db", "gauge_livesum_7.db"]
