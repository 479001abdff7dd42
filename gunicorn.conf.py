"""gunicorn reads this file from its working directory (the checkout, /app in the image).

Only logging is set here; everything else is on the command line (Procfile,
docker-compose.yml). With LOG_FORMAT=json gunicorn's own error and access logs
are JSON lines too, in the same shape as Django's and Celery's (project/logging.py).
"""

import os

# Behind nginx (NUM_PROXIES set, as make run's proxy and compose set it) gunicorn accepts what
# nginx lets through (deploy/nginx/nginx.conf.template: 16 KiB per request line or header, 4 of
# them), so the request reaches Django and gets the API's answer, not gunicorn's HTML 414/431.
# Served directly, gunicorn keeps its own defaults (4094-byte line, 100 headers of 8190 bytes).
# https://docs.gunicorn.org/en/stable/settings.html#limit-request-line (0: no limit of its own)
if int(os.environ.get("NUM_PROXIES") or 0) > 0:
    limit_request_line = 0
    limit_request_fields = 1000
    limit_request_field_size = 0

if os.environ.get("LOG_FORMAT", "plain") == "json":
    logconfig_dict = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "project.logging.JsonFormatter"}},
        # The request's order id and trace id on gunicorn's lines too (the access line is written after the view).
        "filters": {"context": {"()": "project.logging.TaskContextFilter"}},
        "handlers": {
            "stdout": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "stream": "ext://sys.stdout",
                "filters": ["context"],
            },
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "stream": "ext://sys.stderr",
                "filters": ["context"],
            },
        },
        "root": {"level": os.environ.get("LOG_LEVEL", "INFO"), "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"level": "INFO", "handlers": ["stderr"], "propagate": False},
            "gunicorn.access": {"level": "INFO", "handlers": ["stdout"], "propagate": False},
        },
    }


# --- Metrics (project/metrics.py; docs/operations.md, "Metrics") ---------------------------------------
# With PROMETHEUS_MULTIPROC_DIR set, every gunicorn worker counts into its own files there; the master
# empties the directory as it starts (before the first fork), serves the merged counts on METRICS_PORT
# (METRICS_ADDRESS, loopback by default) once ready, and marks a worker's live files dead as it exits.
# Only prometheus-client here: the master does not load Django.
def on_starting(server):
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        os.makedirs(directory, exist_ok=True)
        for name in os.listdir(directory):
            if name.endswith(".db"):
                os.unlink(os.path.join(directory, name))


# The master's exporter (an HTTP server on its own thread), closed in each worker after the fork.
_metrics_server = []


def when_ready(server):
    # Metrics never take the web down: a bad or taken METRICS_PORT is logged and the web serves on
    # without them, as a worker does (project/metrics.py).
    text = (os.environ.get("METRICS_PORT") or "").strip()
    try:
        port = int(text or 0)
    except ValueError:
        server.log.error("METRICS_PORT=%r is not a port number: metrics not served", text)
        return
    if not port:
        return
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        server.log.error("METRICS_PORT is set but PROMETHEUS_MULTIPROC_DIR is not: metrics not served")
        return
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    address = os.environ.get("METRICS_ADDRESS") or "127.0.0.1"
    try:
        httpd, _thread = start_http_server(port, addr=address, registry=registry)
    except (OSError, OverflowError) as exc:  # taken, not ours to bind, or not a port (OverflowError)
        server.log.error("metrics not served: cannot listen on %s:%s: %s", address, port, exc)
        return
    _metrics_server.append(httpd)
    server.log.info("metrics served on http://%s:%s/metrics", address, port)


def child_exit(server, worker):
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client.multiprocess import mark_process_dead

        mark_process_dead(worker.pid)


# --- Tracing (project/tracing.py): on only with OTEL_EXPORTER_OTLP_ENDPOINT set.
# In each worker after the fork (the span exporter's thread does not survive one) and before it
# loads the application: the Django instrumentation adds its middleware to the settings first.
def post_fork(server, worker):
    for httpd in _metrics_server:  # the master's listening socket is no worker's to hold open
        httpd.socket.close()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    from django.conf import settings

    from project import tracing

    settings.LOG_FORMAT  # noqa: B018 (loads the settings, which read .env into the environment)
    tracing.setup("web")


def worker_exit(server, worker):
    """Export the spans still batched before the worker process ends."""
    import sys

    tracing = sys.modules.get("project.tracing")
    if tracing is not None:
        tracing.shutdown()
