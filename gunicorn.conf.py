"""gunicorn reads this file from its working directory (the checkout, /app in the image).

Only logging is set here; everything else is on the command line (Procfile,
docker-compose.yml). With LOG_FORMAT=json gunicorn's own error and access logs
are JSON lines too, in the same shape as Django's and Celery's (project/logging.py).
"""

import os

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
