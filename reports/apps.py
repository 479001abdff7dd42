from django.apps import AppConfig


class ReportsConfig(AppConfig):
    name = "reports"

    def ready(self) -> None:
        from . import checks  # noqa: F401 (registers reports' start-up check)
