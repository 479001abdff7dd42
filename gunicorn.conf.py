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
        "handlers": {
            "stdout": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stdout"},
            "stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"},
        },
        "root": {"level": os.environ.get("LOG_LEVEL", "INFO"), "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"level": "INFO", "handlers": ["stderr"], "propagate": False},
            "gunicorn.access": {"level": "INFO", "handlers": ["stdout"], "propagate": False},
        },
    }
