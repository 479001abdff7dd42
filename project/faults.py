"""Fault injection for tests and drills: make a saga step fail, stall or die.

Off unless ORDERFLOW_FAULTS_FILE names a JSON file. The file maps a task name
to a fault, read afresh at each step so a running worker picks up changes::

    {"reports.sale_record": {"action": "fail", "orders": [12, 13]}}

`action` is one of ``fail`` (a business error), ``transient`` (a database
OperationalError, retried), ``sleep`` (``seconds``) or ``exit`` (the worker
process dies at once, as under ``kill -9``). `orders` limits the fault to
those order ids; `times` (for ``transient``) lets it happen only that many
times per order, counted in the file's sibling ``.count`` files.
"""

import json
import os
import time
from pathlib import Path

from django.conf import settings
from django.db import OperationalError

from project.errors import ApplicationError


class InjectedFault(ApplicationError):
    code = "injected_fault"


def inject(task_name: str, order_id: int) -> None:
    path = settings.ORDERFLOW_FAULTS_FILE
    if not path:
        return
    try:
        faults = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return
    fault = faults.get(task_name)
    if not fault or ("orders" in fault and order_id not in fault["orders"]):
        return
    action = fault.get("action")
    if action == "fail":
        raise InjectedFault(f"injected failure in {task_name}")
    if action == "transient":
        counter = Path(f"{path}.{task_name}.{order_id}.count")
        seen = int(counter.read_text()) if counter.exists() else 0
        if seen < fault.get("times", 1):
            counter.write_text(str(seen + 1))
            raise OperationalError(f"injected transient error in {task_name}")
    elif action == "sleep":
        time.sleep(float(fault.get("seconds", 1)))
    elif action == "exit":
        os._exit(1)
