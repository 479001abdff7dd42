"""Log records as one JSON object per line (LOG_FORMAT=json), with the task context in workers.

`TaskContextFilter` stamps every record emitted while a Celery task runs with
the task's name and id, the order id it carries and, for saga steps, the step;
in the web, every record of a request on an order with its order id
(`RequestContextMiddleware`, `bind`); and, with tracing on, every record with
the current trace and span ids (project.tracing).
`JsonFormatter` writes the record with those fields. settings.LOGGING wires
both into the console handler; gunicorn.conf.py does the same for gunicorn's
own error and access logs.
"""

import contextlib
import contextvars
import json
import logging
import re
from datetime import UTC, datetime
from typing import Any

from celery import bootsteps
from celery.signals import after_setup_logger, after_setup_task_logger, celeryd_init

from project.lines import NotPositiveInt, positive_int

# Python's warnings (a library's UserWarning) go through logging too, so that with
# LOG_FORMAT=json every line a process writes is JSON (settings.LOGGING loads this module).
logging.captureWarnings(True)

# Attributes every LogRecord has; anything else on a record came from `extra=`
# or a filter and is written as a field of its own.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
CONTEXT_FIELDS = ("task_name", "task_id", "order_id", "saga_step", "trace_id", "span_id", "request_id")

# The web request being handled in this thread: {"order_id": …, "trace_id": …, "span_id": …} as far as
# known. Set by RequestContextMiddleware when a request starts and cleared when Django closes its
# response, which gunicorn does after writing the access line: that line gets the fields too.
_request: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("orderflow_request_log", default=None)


def start_request() -> None:
    """A web request begins in this thread: its log fields start empty (cleared by `end_request`)."""
    _request.set({})


def end_request() -> None:
    """The web request's response was closed: its fields no longer apply."""
    _request.set(None)


def bind(**fields: Any) -> None:
    """Add `fields` (order_id=…, trace_id=…) to every record the current web request logs from now on.

    A no-op outside a web request (a task's context comes from the task itself).
    """
    context = _request.get()
    if context is not None:
        context.update({key: value for key, value in fields.items() if value is not None})


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


# In the repr of a task's keyword arguments: the order it is about, and the proof of origin
# (project/origin.py), which has no place in a log.
_REPR_ORDER_ID = re.compile(r"'order_id': (\d+)")
_REPR_PROOF = re.compile(r"('proof': )'[^']*'")


def _without_proof(data: Any) -> Any:
    """The worker's record `data` with a saga step's ``proof`` keyword blanked in its arguments' repr."""
    if isinstance(data, dict) and isinstance(data.get("kwargs"), str) and "'proof'" in data["kwargs"]:
        return {**data, "kwargs": _REPR_PROOF.sub(r"\1'…'", data["kwargs"])}
    return data


# The trace id in the ``traceparent`` header of the task message the worker's main process is taking
# in (ReceivedTraceStep), while Celery's strategy handles it: its "Task … received" line is logged then.
_received_trace: contextvars.ContextVar[str | None] = contextvars.ContextVar("orderflow_received_trace", default=None)
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")


def trace_id_of(traceparent: Any) -> str | None:
    """The trace id (32 hex) of a W3C ``traceparent`` header value; None for anything else or the all-zero id."""
    found = _TRACEPARENT.match(traceparent) if isinstance(traceparent, str) else None
    return found.group(1) if found and found.group(1).strip("0") else None


class ReceivedTraceStep(bootsteps.StartStopStep):
    """A consumer bootstep: while the main process takes in a task message, its trace id is known to logging.

    Celery logs "Task … received" in the main process before any span
    exists there (tracing runs in the pool processes): the id comes from the
    message's ``traceparent`` header, which the Celery instrumentation put
    there on publish. Wraps each task's strategy (Consumer.strategies,
    rebuilt by the Tasks step on every connection, hence `requires`); only
    where tracing is on (project.tracing.enabled).
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, consumer: Any) -> None:
        from project import tracing

        if not tracing.enabled():
            return
        for name, strategy in list(consumer.strategies.items()):
            if not getattr(strategy, "orderflow_traced", False):
                consumer.strategies[name] = _with_received_trace(strategy)


def _with_received_trace(strategy: Any) -> Any:
    def handle(message, *args, **kwargs):
        token = _received_trace.set(trace_id_of((getattr(message, "headers", None) or {}).get("traceparent")))
        try:
            return strategy(message, *args, **kwargs)
        finally:
            _received_trace.reset(token)

    handle.orderflow_traced = True
    return handle


@celeryd_init.connect
def _add_received_trace_step(sender: Any = None, instance: Any = None, **_: Any) -> None:
    """Before the worker builds its consumer: add ReceivedTraceStep to the app's consumer steps."""
    app = getattr(instance, "app", None)
    if app is not None:
        app.steps["consumer"].add(ReceivedTraceStep)


def _worker_event_context(data: Any) -> dict[str, Any]:
    """The worker's own "Task … received/succeeded" records carry the task in `data` (no task is running);
    the trace id of a received one comes from its message (ReceivedTraceStep)."""
    if not isinstance(data, dict) or not data.get("id") or not data.get("name"):
        return {}
    context: dict[str, Any] = {"task_name": data["name"], "task_id": data["id"]}
    trace_id = _received_trace.get()
    if trace_id is not None:
        context["trace_id"] = trace_id
    kwargs = data.get("kwargs")
    if isinstance(kwargs, str):  # Celery logs the arguments' repr (Request.info(safe=True): kwargsrepr)
        found = _REPR_ORDER_ID.search(kwargs)
        kwargs = {"order_id": int(found.group(1))} if found else None
    order_id = _order_id(kwargs.get("order_id")) if isinstance(kwargs, dict) else None
    if order_id is not None:
        context["order_id"] = order_id
    return context


#: The model whose admin pages (change, delete, history: ``object_id``) are pages on an order.
ORDER_MODEL = "orders.order"


def order_id_of_view(view_func: Any, view_kwargs: dict[str, Any]) -> int | None:
    """The order a view is about: the API's ``order_id`` URL argument, or the order admin's ``object_id``.

    None for any other view, or an argument that is not a positive integer
    (the view answers 404 for it itself).
    """
    value = view_kwargs.get("order_id")
    if value is None:
        model_admin = getattr(view_func, "model_admin", None)  # Django's admin marks its wrapped views so
        if model_admin is not None and model_admin.model._meta.label_lower == ORDER_MODEL:
            value = view_kwargs.get("object_id")
    return _order_id(value)


#: The header the front door (deploy/nginx/nginx.conf.template) sets to its own $request_id, and a
#: value of it worth logging: letters, digits, "-", "_" and "." only, at most 64 (nginx's: 32 hex digits).
REQUEST_ID_HEADER = "HTTP_X_REQUEST_ID"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def request_id_of(meta: Any) -> str | None:
    """The request id in a WSGI environ / request.META (X-Request-ID); None when absent or not a plain token."""
    value = meta.get(REQUEST_ID_HEADER)
    return value if isinstance(value, str) and _REQUEST_ID.match(value) else None


class RequestContextMiddleware:
    """Start a web request's log fields: the request id and the trace's ids now, the order's at the view.

    After the tracing middleware (project.tracing puts it first), so the
    request's span is current here. The request id is the X-Request-ID
    header nginx sets (`request_id_of`): nginx's access line carries it too,
    so its line and the web's join up. orders.services.order_create adds the
    id of the order a POST placed (`bind`). The fields last until Django
    closes the response (request_finished), which gunicorn does after
    writing its access line: that line carries them too.
    """

    def __init__(self, get_response):
        from django.core.signals import request_finished

        self.get_response = get_response
        request_finished.connect(_end_request, dispatch_uid="orderflow.logging.end_request")

    def __call__(self, request):
        start_request()
        bind(request_id=request_id_of(request.META), **_trace_ids())
        return self.get_response(request)

    def process_view(self, request, view_func, view_args, view_kwargs):
        bind(order_id=order_id_of_view(view_func, view_kwargs))


def _end_request(**_: Any) -> None:
    end_request()


def _trace_ids() -> dict[str, str]:
    from project.tracing import current_ids

    return current_ids()


class TaskContextFilter(logging.Filter):
    """Add task_name, task_id, order_id and saga_step to records logged inside a task; order_id in a web
    request on an order; trace_id and span_id wherever a span is current (tracing on)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            data = getattr(record, "data", None)
            if data is not None:
                record.data = _without_proof(data)
            context = task_context() or _worker_event_context(data)
            # The request's fields first: its trace ids outlive its span (gunicorn's access line).
            context = {**(_request.get() or {}), **context, **_trace_ids()}
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
    """One JSON object per line: timestamp, level, logger, message, process (name), pid, then context and extras.

    ``process`` is the multiprocessing name (a Celery pool's ForkPoolWorker-N, else MainProcess: a
    gunicorn worker too), ``pid`` the operating system's process id, which tells gunicorn's workers apart.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.processName,
            "pid": record.process,
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
