"""The saga dashboard page, an admin page of its own (staff only; ops.urls wraps it in admin_view)."""

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest
from django.template.response import TemplateResponse

from .dashboard import REFRESH_SECONDS, dashboard_data, refresh_seconds

TEMPLATE = "admin/ops/dashboard.html"
# Who may view orders may view the dashboard; the admin index shows its link on the same condition.
PERMISSIONS = ("orders.view_order", "orders.change_order")


def dashboard_view(request: HttpRequest) -> TemplateResponse:
    if not any(request.user.has_perm(permission) for permission in PERMISSIONS):
        raise PermissionDenied
    site = admin.site
    context = {
        **site.each_context(request),
        "title": "Saga dashboard",
        "subtitle": None,
        "dashboard": dashboard_data(),
        "refresh_seconds": refresh_seconds(request.GET.get("refresh")),
        "refresh_default": REFRESH_SECONDS,
    }
    request.current_app = site.name
    return TemplateResponse(request, TEMPLATE, context)
