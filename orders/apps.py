from django.apps import AppConfig


class OrdersConfig(AppConfig):
    name = "orders"

    def ready(self) -> None:
        # The settings checks of the saga orders runs (time limits, backoff, saga timeout,
        # sweep interval, order deadline, order limits): registered with Django's system checks.
        from project import checks  # noqa: F401
