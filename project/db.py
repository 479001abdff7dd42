"""Which database alias owns each service's tables (DESIGN §6)."""

from django.conf import settings


def service_db(service: str) -> str:
    """The alias that owns `service`'s rows: name it in every atomic/on_commit."""
    return settings.SERVICE_DATABASES[service]
