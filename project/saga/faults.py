"""Fault injection for tests and drills: make a saga step fail, stall or die.

Off unless ORDERFLOW_FAULTS_FILE names a JSON file, and then free: with the
setting unset `inject` returns after one attribute read, without looking for
a file (production never sets it; the test workers do). The file maps an
injection point to a fault, read afresh each time so running workers pick up
changes::

    {"reports.sale_record": {"action": "fail", "orders": [12, 13]},
     "inventory.stock_reserve:after": {"action": "sleep", "seconds": 5, "times": 1}}

Points: every saga task name (before its service call), the same name with
``:after`` (after the service committed, before the message is acknowledged),
and ``orders.dispatch`` (after the order committed, before the saga is published).

`action` is ``fail`` (a business error), ``transient`` (a database
OperationalError, retried), ``broker`` (the broker refuses: kombu's
OperationalError), ``bug`` (a RuntimeError: a fault of the code), ``sleep``
(``seconds``; a window to kill the process in; with ``"blocked": true`` the
soft time limit does not interrupt it) or ``exit`` (the process dies at
once, as under ``kill -9``).
`orders` limits the fault to those order ids; `times` lets it happen only that
many times per order (counted in files beside the faults file). A sleeping
process writes its pid beside the faults file too.
"""

import json
import os
import time
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import OperationalError
from kombu.exceptions import OperationalError as BrokerOperationalError

from project.http.errors import ApplicationError


class InjectedFault(ApplicationError):
    code = "injected_fault"


def _consume(path: str, point: str, order_id: int, times: int | None) -> bool:
    """Count one occurrence; False once `times` occurrences happened for this order."""
    if times is None:
        return True
    counter = Path(f"{path}.{point.replace(':', '-')}.{order_id}.count")
    # O_APPEND writes of one byte are atomic: concurrent processes count right.
    fd = os.open(counter, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, b".")
    finally:
        os.close(fd)
    return counter.stat().st_size <= times


def _sleep(seconds: float, *, blocked: bool) -> None:
    """Sleep; `blocked`: as a call blocked in C (a lock wait in libpq), which Celery's soft limit cannot interrupt."""
    until = time.monotonic() + seconds
    while (left := until - time.monotonic()) > 0:
        try:
            time.sleep(left)
        except SoftTimeLimitExceeded:
            if not blocked:
                raise


def inject(point: str, order_id: int) -> None:
    """Obey the fault set for `point` and this order, if any (see the module's docstring)."""
    path = settings.ORDERFLOW_FAULTS_FILE
    if not path:
        return  # production: no file is stat'ed or read
    try:
        faults = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return
    fault = faults.get(point)
    if not fault or ("orders" in fault and order_id not in fault["orders"]):
        return
    if not _consume(path, point, order_id, fault.get("times")):
        return
    action = fault.get("action")
    if action == "fail":
        raise InjectedFault(f"injected failure in {point}")
    if action == "transient":
        raise OperationalError(f"injected transient error in {point}")
    if action == "broker":
        raise BrokerOperationalError(f"injected broker error in {point}")
    if action == "bug":
        raise RuntimeError(f"injected bug in {point}")
    if action == "sleep":
        # Say who is sleeping, so a drill can kill exactly this process.
        Path(f"{path}.{point.replace(':', '-')}.{order_id}.pid").write_text(str(os.getpid()))
        _sleep(float(fault.get("seconds", 1)), blocked=bool(fault.get("blocked")))
    elif action == "exit":
        os._exit(1)
