"""The bench is installed only where a benchmark runs: no production process has its app or its tasks."""

import os
import subprocess
import sys

import pytest

from testing import BASE_DIR

LIST_TASKS = (
    "import django; django.setup(); from django.conf import settings; from project.celery import app; "
    "app.loader.import_default_modules(); print('bench' in settings.INSTALLED_APPS, *sorted(app.tasks))"
)


@pytest.mark.parametrize(("bench", "installed"), [(None, False), ("0", False), ("1", True)])
def test_the_bench_app_and_its_floor_tasks_exist_only_with_orderflow_bench(bench, installed):
    env = {key: value for key, value in os.environ.items() if key != "ORDERFLOW_BENCH"}
    if bench is not None:
        env["ORDERFLOW_BENCH"] = bench

    out = subprocess.run(
        [sys.executable, "-c", LIST_TASKS],
        cwd=BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()

    assert out[0] == str(installed)
    assert "inventory.stock_reserve" in out
    floor = {"inventory.bench_floor", "reports.bench_floor", "orders.bench_floor"}
    assert (floor <= set(out)) is installed
    assert not (floor & set(out)) or installed
