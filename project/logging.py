"""Log records as one JSON object per line (LOG_FORMAT=json), with the task context in workers.

`TaskContextFilter` stamps every record emitted while a Celery task runs with
the task's name and id, the order id it carries and, for saga steps, the step;
`JsonFormatter` writes the record with those fields. settings.LOGGING wires
both into the console handler; gunicorn.conf.py does the same for gunicorn's
own error and access logs.
"""

import contextlib
import json
import logging
from datetime import UTC, datetime
from typing import Any

from celery.signals import after_setup_logger, after_setup_task_logger

from project.lines import NotPositiveInt, positive_int

# Python's warnings (a library's UserWarning) go through logging too, so that with
# LOG_FORMAT=json every line a process writes is JSON (settings.LOGGING loads this module).
logging.captureWarnings(True)

# Attributes every LogRecord has; anything else on a record came from `extra=`
# or a filter and is written as a field of its own.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
CONTEXT_FIELDS = ("task_name", "task_id", "order_id", "saga_step")


def _order_id(value: Any) -> int | None:
    try:
        return positive_int(value, "order_id")
    except NotPositiveInt:
        return None


def task_context() -> dict[str, Any]:
    """The running task's name, id, order id and saga step; {} outside a task."""
    from celery import current_task

    task = current_task
    request = getattr(task, "request", None) if task else None
    if request is None or not request.id:
        return {}
    context: dict[str, Any] = {"task_name": task.name, "task_id": request.id}
    kwargs = request.kwargs if isinstance(request.kwargs, dict) else {}
    args = request.args if isinstance(request.args, list | tuple) else ()
    order_id = _order_id(kwargs.get("order_id", args[0] if args else None))
    if order_id is not None:
        context["order_id"] = order_id
    from project.saga import SagaStep  # imported late: this module loads while settings are configured

    if isinstance(task, SagaStep):
        # Task names are "<service>.<step>" (inventory.stock_reserve): the step is the second part.
        context["saga_step"] = task.name.rpartition(".")[2]
    return context


def _worker_event_context(data: Any) -> dict[str, Any]:
    """The worker's own "Task … received/succeeded" records carry the task in `data` (no task is running)."""
    if not isinstance(data, dict) or not data.get("id") or not data.get("name"):
        return {}
    context: dict[str, Any] = {"task_name": data["name"], "task_id": data["id"]}
    kwargs = data.get("kwargs")
    order_id = _order_id(kwargs.get("order_id")) if isinstance(kwargs, dict) else None
    if order_id is not None:
        context["order_id"] = order_id
    return context


class TaskContextFilter(logging.Filter):
    """Add task_name, task_id, order_id and saga_step to records logged inside a task."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            context = task_context() or _worker_event_context(getattr(record, "data", None))
        except Exception:  # logging must never fail because the context could not be read
            context = {}
        for key, value in context.items():
            if getattr(record, key, None) is None:  # an explicit extra= wins
                setattr(record, key, value)
        return True


#: Tasks that run on a timer whether or not there is work: their routine INFO lines
#: (beat sending it, the worker receiving it, its success) are dropped. What they
#: find is logged by the task itself (the sweeper warns when it moved an order on).
ROUTINE_TASKS = frozenset({"orders.saga_sweep"})


class RoutineTaskFilter(logging.Filter):
    """Drop INFO (and lower) records of Celery's about the periodic tasks in ROUTINE_TASKS."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO:
            return True
        if record.name == "celery.beat":
            return not any(str(arg) in ROUTINE_TASKS for arg in (record.args or ()) if isinstance(arg, str))
        if record.name in ("celery.worker.strategy", "celery.app.trace"):
            data = getattr(record, "data", None)
            return not (isinstance(data, dict) and data.get("name") in ROUTINE_TASKS)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp, level, logger, message, then context and extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.processName,
        }
        for key in CONTEXT_FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and key not in entry and not key.startswith("_"):
                entry[key] = value
        if record.name == "gunicorn.access" and hasattr(record.args, "get"):
            entry.update(_access_fields(record.args))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def _access_fields(atoms: Any) -> dict[str, Any]:
    """gunicorn's access-log atoms as fields (h remote, m method, U path, s status, D microseconds)."""
    fields = {"remote": atoms.get("h"), "method": atoms.get("m"), "path": atoms.get("U"), "status": atoms.get("s")}
    with contextlib.suppress(TypeError, ValueError):
        fields["duration_ms"] = round(int(atoms.get("D")) / 1000, 3)
    with contextlib.suppress(TypeError, ValueError):
        fields["status"] = int(fields["status"])
    return {key: value for key, value in fields.items() if value not in (None, "-")}


def _json_handlers(logger: logging.Logger | None) -> None:
    from django.conf import settings

    if logger is None or getattr(settings, "LOG_FORMAT", "plain") != "json":
        return
    for handler in logger.handlers:
        if not isinstance(handler.formatter, JsonFormatter):
            handler.setFormatter(JsonFormatter())
            handler.addFilter(TaskContextFilter())


@after_setup_logger.connect
def _json_pool_logger(**_: Any) -> None:
    """A worker's pool (billiard) logs through a handler Celery gives it: make it write JSON too."""
    from billiard.util import get_logger

    _json_handlers(get_logger())


@after_setup_task_logger.connect
def _json_task_logger(logger=None, **_: Any) -> None:
    """Celery gives its `celery.task` logger a handler of its own: make it write JSON too."""
    _json_handlers(logger)
