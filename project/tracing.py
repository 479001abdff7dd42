"""OpenTelemetry tracing of every orderflow process: one trace per order, on only when OTLP has somewhere to go.

`setup` installs the SDK's tracer provider (OTLP over HTTP, batched) and the
Django, Celery and psycopg2 instrumentations in the calling process; it is
called after fork (gunicorn.conf.py's post_fork, project/celery.py's
worker_process_init), because the BatchSpanProcessor's export thread does not
survive a fork. Without OTEL_EXPORTER_OTLP_ENDPOINT it does nothing and
imports nothing from OpenTelemetry (redis-py 8 may, by itself), and every other
function here is a no-op: tracing off costs one attribute check.

The trace context travels in each task message's headers (W3C
``traceparent``, put there by the Celery instrumentation on every publish,
read back by the worker), so the step a step publishes, its retry and the
compensation it publishes are children of the step's span, and the order's
POST is the root of them all. The order row keeps the POST's traceparent
(`Order.traceparent`): a re-dispatch by the sweeper starts a trace of its own
that links to it (`linked_root`). docs/operations.md, "Tracing".
"""

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

#: The variable that turns tracing on (the OTLP/HTTP collector's base URL, e.g. http://collector:4318);
#: the SDK reads it, and the other OTEL_* variables, itself.
ENDPOINT_VARIABLE = "OTEL_EXPORTER_OTLP_ENDPOINT"

# Span attributes orderflow sets, beside the instrumentations' own (celery.task_name, http.*, db.*).
#: the order's id (int), on the POST's span and on every step's
ORDER_ID = "orderflow.order_id"
#: the saga step ("stock_reserve", "sale_revert", "order_confirm", ...), on each step's span
SAGA_STEP = "orderflow.saga_step"
#: how the order ended, on the span of the step that ended it: "confirmed" or "cancelled"
OUTCOME = "orderflow.outcome"
#: why it was cancelled, as a class (orders.models.CancelCause: refused, user, deadline, infrastructure);
#: on the final delete's span, and on the span of the step that failed
CANCEL_CAUSE = "orderflow.cancel_cause"
#: "failed" on the span of a step that failed for good (its compensation is published from it)
STEP_OUTCOME = "orderflow.step_outcome"

_provider: Any = None  # the process's TracerProvider once `setup` ran with tracing on


def enabled() -> bool:
    """Whether tracing is asked for in this process's environment (OTEL_EXPORTER_OTLP_ENDPOINT set)."""
    return bool(os.environ.get(ENDPOINT_VARIABLE, "").strip())


def active() -> bool:
    """Whether `setup` installed tracing in this process."""
    return _provider is not None


def setup(role: str) -> bool:
    """Install tracing in this process, once: after fork, before the process serves anything.

    `role` names the process kind ("web", "worker"): the service.name is
    ``orderflow-<role>`` unless OTEL_SERVICE_NAME says otherwise. Spans go to
    OTEL_EXPORTER_OTLP_ENDPOINT + ``/v1/traces`` (OTLP/HTTP protobuf) through a
    BatchSpanProcessor (OTEL_BSP_* tune it), flushed by `shutdown`. The
    Django instrumentation adds its middleware to settings.MIDDLEWARE, so in
    the web process this must run before the WSGI application is built.
    Returns whether tracing is on.
    """
    global _provider
    if _provider is not None or not enabled():
        return _provider is not None
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.instrumentation.django import DjangoInstrumentor
    from opentelemetry.instrumentation.psycopg2 import Psycopg2Instrumentor
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; what is passed here wins, so
    # the default name is passed only when the environment gives none.
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: f"orderflow-{role}"}
    # A collector that cannot be reached: one warning a minute, not lines for every batch and retry.
    quiet_export_failures()
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _provider = provider
    # Publishing (every process publishes: the web its sagas, steps their successors) and running tasks.
    CeleryInstrumentor().instrument()
    if role == "web":
        DjangoInstrumentor().instrument()
    # Django connects with psycopg2.connect, which this wraps: connections opened from now on are traced.
    # skip_dep_check: psycopg2-binary provides the module, not a distribution named psycopg2.
    Psycopg2Instrumentor().instrument(skip_dep_check=True)
    return True


def shutdown() -> None:
    """Export the spans still batched, then stop (gunicorn's worker_exit, Celery's worker_process_shutdown)."""
    global _provider
    provider, _provider = _provider, None
    if provider is not None:
        provider.shutdown()


def annotate(**attributes: Any) -> None:
    """Set ``orderflow.<name>`` attributes (ORDER_ID, SAGA_STEP, ...: names without the prefix) on the current span.

    Values are str, int, float or bool; None is left out. No-op when tracing is off.
    """
    if _provider is None:
        return
    from opentelemetry import trace

    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes({f"orderflow.{key}": value for key, value in attributes.items() if value is not None})


def current_traceparent() -> str:
    """The W3C ``traceparent`` of the current span ("00-<32 hex>-<16 hex>-01"), "" when tracing is off or none."""
    if _provider is None:
        return ""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return carrier.get("traceparent", "")


def _span_context(traceparent: str) -> Any:
    """The SpanContext a stored ``traceparent`` names, or None for "" or a malformed one."""
    if not traceparent:
        return None
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    context = trace.get_current_span(TraceContextTextMapPropagator().extract({"traceparent": traceparent}))
    span_context = context.get_span_context()
    return span_context if span_context.is_valid else None


def link_current(traceparent: str) -> None:
    """Link the current span to the trace `traceparent` names (a user's cancel, to the order's own trace)."""
    if _provider is None:
        return
    from opentelemetry import trace

    span_context = _span_context(traceparent)
    span = trace.get_current_span()
    if span_context is not None and span.is_recording():
        span.add_link(span_context, {"orderflow.link": "order"})


@contextlib.contextmanager
def linked_root(name: str, traceparent: str, **attributes: Any) -> Iterator[None]:
    """Run the block in a new trace (a root span `name`) linked to the trace `traceparent` names.

    For the sweeper's re-dispatch: what is published inside (the saga again)
    belongs to the new trace, and the link leads back to the order's
    original one. `attributes` as for `annotate`. No-op when tracing is off.
    """
    if _provider is None:
        yield
        return
    from opentelemetry import context, trace

    span_context = _span_context(traceparent)
    links = [trace.Link(span_context, {"orderflow.link": "order"})] if span_context is not None else None
    tracer = trace.get_tracer("orderflow")
    # An empty context: no parent, whatever span (the sweep task's) is current.
    with tracer.start_as_current_span(name, context=context.Context(), links=links) as span:
        span.set_attributes({f"orderflow.{key}": value for key, value in attributes.items() if value is not None})
        yield


def current_ids() -> dict[str, str]:
    """``{"trace_id": 32 hex, "span_id": 16 hex}`` of the current span, for log lines; {} when there is none.

    Reads OpenTelemetry only where `setup` turned tracing on: elsewhere {} at once (redis 8 imports
    OpenTelemetry's SDK by itself when it is installed, so "imported" does not mean "on").
    """
    import sys

    trace = sys.modules.get("opentelemetry.trace")
    if _provider is None or trace is None:
        return {}
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return {}
    return {"trace_id": format(span_context.trace_id, "032x"), "span_id": format(span_context.span_id, "016x")}


#: The loggers OpenTelemetry's span export writes to when the collector cannot be reached: the OTLP/HTTP
#: exporter (a warning per retry, an error per batch given up) and the SDK's batch processor
#: ("Exception while exporting", "Queue full, dropping span").
EXPORT_LOGGERS = ("opentelemetry.exporter.otlp.proto.http.trace_exporter", "opentelemetry.sdk._shared_internal")
#: Seconds between two lines about span export failing, while it keeps failing.
EXPORT_FAILURE_INTERVAL_SECONDS = 60.0


class ExportFailureFilter(logging.Filter):
    """At most one line a minute (`interval`) about span export failing, instead of several per batch.

    Put on the EXPORT_LOGGERS by `setup`. A collector that
    cannot be reached makes the exporter log a warning for every retry and
    an error for every batch it gives up (every OTEL_BSP_SCHEDULE_DELAY
    milliseconds, 5 s by default), each process on its own. The first such
    record goes through as a WARNING, without traceback, saying that more
    are held back; then one per `interval`, saying how many were held back
    since the last (`interval`: seconds, EXPORT_FAILURE_INTERVAL_SECONDS
    unless given). Records below WARNING pass untouched. Thread-safe (the
    export thread logs; so may the application's, when the queue is full).
    """

    def __init__(self, interval: float | None = None) -> None:
        super().__init__()
        self.interval = EXPORT_FAILURE_INTERVAL_SECONDS if interval is None else interval
        #: records held back since the last one let through, and in all
        self.held = 0
        self.held_total = 0
        self._last: float | None = None
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        now = time.monotonic()
        with self._lock:
            if self._last is not None and now - self._last < self.interval:
                self.held += 1
                self.held_total += 1
                return False
            first, held = self._last is None, self.held
            self._last, self.held = now, 0
        every = f"at most once every {self.interval:g} s"
        note = (
            f"further span export failures are logged {every}"
            if first or not held
            else f"{held} more span export failure lines held back since the last one; logged {every}"
        )
        record.msg, record.args = f"{record.getMessage()} ({note})", None
        record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


#: The filter `setup` put on the EXPORT_LOGGERS in this process, if any.
export_failures: ExportFailureFilter | None = None


def quiet_export_failures() -> ExportFailureFilter:
    """Put one ExportFailureFilter on the EXPORT_LOGGERS (once per process) and return it."""
    global export_failures
    if export_failures is None:
        export_failures = ExportFailureFilter()
        for name in EXPORT_LOGGERS:
            logging.getLogger(name).addFilter(export_failures)
    return export_failures
