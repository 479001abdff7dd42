"""orderflow: the Django project that hosts the orders, inventory and reports services."""

from .celery import app as celery_app

__all__ = ("celery_app",)
