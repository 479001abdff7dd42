"""Send each service's models to the database that owns them (docs/design.md §6)."""

from django.conf import settings


class ServiceRouter:
    """Route orders/inventory/reports models to their alias; the rest to default.

    With no per-service URL set, every alias is `default` and this router is a
    no-op. Relations never cross services, so they never cross databases.
    """

    def _alias(self, app_label: str) -> str:
        return settings.SERVICE_DATABASES.get(app_label, "default")

    def db_for_read(self, model, **hints):
        return self._alias(model._meta.app_label)

    def db_for_write(self, model, **hints):
        return self._alias(model._meta.app_label)

    def allow_relation(self, obj1, obj2, **hints):
        return self._alias(obj1._meta.app_label) == self._alias(obj2._meta.app_label)

    def allow_migrate(self, db, app_label, model_name=None, **hints):
        return db == self._alias(app_label)
