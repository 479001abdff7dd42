"""Admin pieces the three services (and the operations pages) share."""

from datetime import datetime

from django.contrib import admin
from django.utils import timezone


def humanized_age(since: datetime, now: datetime | None = None) -> str:
    """'45 s', '3 min', '2 h', '4 d': coarse, like a glance at a clock."""
    seconds = max(0, int(((now or timezone.now()) - since).total_seconds()))
    for unit, size in (("d", 86_400), ("h", 3_600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows only the saga's services write: the admin shows them and changes nothing."""

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False
