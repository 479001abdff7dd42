"""WSGI entry point (gunicorn project.wsgi)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

application = get_wsgi_application()

# Queues of the other type (classic vs quorum) already on the broker would make every order's
# publish fail with PRECONDITION_FAILED: refuse to serve instead, saying how to migrate.
from project.celery import app  # noqa: E402 (needs the settings get_wsgi_application loaded)
from project.queues import verify_at_start  # noqa: E402

try:
    verify_at_start(app, "web")
except SystemExit as exc:
    # gunicorn restarts a worker that exits, status 1 or not, for ever; a worker whose application
    # raises while it loads is a boot error (status 3), on which the master halts ("Worker failed
    # to boot."): gunicorn/arbiter.py, Arbiter.spawn_worker and reap_workers.
    raise RuntimeError("web not started: the broker's queues disagree with the settings (the line above)") from exc
